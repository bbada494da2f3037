//! The inspection commands read the pins of a loaded datapath (as beside a running
//! agent), and their `--json` output parses and says what the maps hold.

use overlay_agent::inspect::{self, Format, View};
use overlay_common::{Hook, Reason};
use serde_json::{Value, json};

use super::{
    fixture::{Act, GENERATION, masquerade, with_pinned_node},
    nat::{client, outgoing},
    packet::Proto,
    topology::{NODE_IP, OUTSIDE, POD, POD_SUBNET, REMOTES, W2},
    traffic::{Exchange, exchange},
};

fn json(view: impl View) -> Value {
    let text = view.render(Format::Json).expect("rendering");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn counters_and_nodes_as_json() {
    with_pinned_node(
        |_| {},
        |node, pins| {
            let Exchange {
                to_w2,
                from_w2,
                spoofed,
            } = exchange(node);

            let counters = json(inspect::counters(pins, false).unwrap());
            assert_eq!(
                counters,
                json!({"counters": [
                    {"hook": "bridge_ingress", "reason": "encapsulated", "kind": "forward",
                     "packets": 1, "bytes": to_w2.len()},
                    {"hook": "uplink_ingress", "reason": "drop_unknown_peer", "kind": "drop",
                     "packets": 1, "bytes": spoofed.len()},
                    {"hook": "uplink_ingress", "reason": "decapsulated_to_bridge", "kind": "forward",
                     "packets": 1, "bytes": from_w2.len()},
                ]})
            );
            let all = json(inspect::counters(pins, true).unwrap());
            let rows = all["counters"].as_array().unwrap();
            assert_eq!(rows.len(), Hook::ALL.len() * Reason::ALL.len());

            let nodes = json(inspect::nodes(pins).unwrap());
            assert_eq!(
                nodes["this_node"],
                json!({"tunnel_ip": NODE_IP.to_string(), "pod_subnet": POD_SUBNET.to_string()})
            );
            let remotes = nodes["remote_subnets"].as_array().unwrap();
            assert_eq!(remotes.len(), REMOTES.len());
            let w2 = remotes
                .iter()
                .find(|r| r["subnet"] == W2.subnet.to_string())
                .expect("w2's subnet");
            assert_eq!(
                *w2,
                json!({"subnet": W2.subnet.to_string(), "node": W2.node.to_string(),
                       "path": "tunnel", "rx_packets": 1, "rx_bytes": from_w2.len()})
            );

            // Routed directly, w2's subnet says so; its address (in ROUTES for pods'
            // replies to it) is no subnet and not listed.
            node.route_directly(&[W2]);
            let nodes = json(inspect::nodes(pins).unwrap());
            let remotes = nodes["remote_subnets"].as_array().unwrap();
            assert_eq!(remotes.len(), REMOTES.len(), "{remotes:#?}");
            let paths: Vec<(&str, &str)> = remotes
                .iter()
                .map(|r| (r["subnet"].as_str().unwrap(), r["path"].as_str().unwrap()))
                .filter(|(_, path)| *path == "direct")
                .collect();
            assert_eq!(paths, [(W2.subnet.to_string().as_str(), "direct")]);
        },
    );
}

#[test]
fn nat_as_json() {
    with_pinned_node(masquerade, |node, pins| {
        let conn = client(Proto::Udp, POD, OUTSIDE);
        let frame = outgoing(&conn, 0);
        node.expect(Hook::UplinkEgress, &frame, Act::Next, Reason::Masqueraded);

        let nat = json(inspect::nat(pins).unwrap());
        let flows = nat["flows"].as_array().unwrap();
        assert_eq!(flows.len(), 1, "{nat}");
        let flow = &flows[0];
        assert_eq!(flow["proto"], "udp");
        assert_eq!(
            flow["src"],
            json!({"ip": POD.to_string(), "port": conn.src.1})
        );
        assert_eq!(
            flow["dst"],
            json!({"ip": OUTSIDE.to_string(), "port": conn.dst.1})
        );
        assert_eq!(flow["translated"]["ip"], NODE_IP.to_string());
        assert_eq!(flow["state"], "unreplied");
        assert!(flow["expires_in_seconds"].as_u64().unwrap() > 0);
        assert_eq!(nat["events"]["flow_created"], 1);
        assert_eq!(nat["events"]["port_collision"], 0);

        // The tables come from the same views.
        let table = inspect::nat(pins).unwrap().render(Format::Table).unwrap();
        assert!(
            table.contains(&format!("{}:{}", POD, conn.src.1)),
            "{table}"
        );
        assert!(table.contains("1 flows"), "{table}");
    });
}

#[test]
fn flows_as_json() {
    with_pinned_node(
        |_| {},
        |node, pins| {
            let Exchange { to_w2, .. } = exchange(node);
            // A direction the host forwarded once, besides the admitted ones.
            let host = super::packet::from_pod(&super::packet::datagram(
                super::packet::ipv4(POD, W2.pod),
                super::packet::Transport::Tcp,
                10,
            ));
            node.expect(Hook::UplinkEgress, &host, Act::Next, Reason::Encapsulated);
            let view = json(inspect::flows(pins).unwrap());
            assert_eq!(view["fast_path_on"], true);
            assert_eq!(view["ruleset_generation"], GENERATION);
            let flows = view["flows"].as_array().unwrap();
            let state = |sport: u16, proto: &str| {
                flows
                    .iter()
                    .find(|f| f["src"]["port"] == sport && f["proto"] == proto)
                    .map(|f| f["state"].clone())
                    .unwrap_or_else(|| panic!("no {proto} flow from port {sport}: {view}"))
            };
            // `exchange`'s UDP flow to w2, admitted and just carried by the fast path.
            let udp_sport = u16::from_be_bytes([to_w2[34], to_w2[35]]);
            assert_eq!(state(udp_sport, "udp"), "fast");
            assert_eq!(state(40000, "tcp"), "host");
        },
    );
}
