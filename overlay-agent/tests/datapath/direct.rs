//! `Backend.DirectRouting`: a pod subnet whose node the uplink reaches directly
//! (`ROUTE_DIRECT` in ROUTES) is never encapsulated, on the bridge, on a pod's veth or
//! on the uplink's egress: its packets go to the host, whose plain route carries them;
//! a tunnelled node's subnet, in the same ROUTES, still is. What such a node sends
//! arrives unencapsulated and goes to the host as before, and masquerade keeps its
//! rules: pod to pod untranslated, host or outside to a remote pod translated (rule 6,
//! to the uplink's address as MASQUERADE on the plain route gives it) and sent plain,
//! its reply translated back. A pod's reply to a direct node's own address leaves
//! plain too (`ROUTE_NODE_ADDRESS`). The fast path records none of their flows. The
//! agent's reconcile pass decides which nodes are direct from the kernel's routes to
//! them, and follows those routes.

use std::collections::BTreeMap;

use ipnet::Ipv4Net;

use overlay_common::{
    Hook::{BridgeEgress, BridgeIngress, PodIngress, UplinkEgress, UplinkIngress},
    Reason,
};

use super::{
    expect::{assert_checksums, encapsulated, towards},
    fixture::{
        Act, Node, Passes, assert_bytes_eq, check_verdict, flow_key, ip, run_tool,
        with_masquerading_node, with_node,
    },
    nat::{PAYLOAD, assert_table, client, outgoing, translation},
    packet::{
        ACK, Conn, Proto, SYN, Transport, datagram, from_host, from_pod, from_underlay, ipv4,
        outbound,
    },
    topology::{GATEWAY, NODE_IP, NODE_OTHER_IP, POD, POD_SUBNET, ROUTER, Remote, W2, W3},
};

/// w2 (on the uplink's link) routed directly, w3 (behind the router) tunnelled.
fn direct_w2(node: &mut Node) {
    node.route_directly(&[W2]);
}

#[test]
fn pods_packets_to_a_direct_node_stay_plain_and_to_a_tunnelled_one_are_encapsulated() {
    with_node(|node| {
        direct_w2(node);
        for transport in [Transport::Tcp, Transport::Udp] {
            // Admitted flows: the fast path takes them when they are tunnelled.
            let to_w2 = outbound(BridgeIngress, W2.pod, transport, 100, |_| {});
            node.admit(&to_w2);
            let to_w3 = outbound(BridgeIngress, W3.pod, transport, 100, |_| {});
            node.admit(&to_w3);
            let tunnelled = encapsulated(&to_w3, &W3, 1, towards(&W3));
            for hook in [BridgeIngress, PodIngress] {
                node.expect_untouched(hook, &to_w2, Reason::PassDirectRoute);
                node.expect_frame(
                    hook,
                    &to_w3,
                    Act::Redirect,
                    Reason::Encapsulated,
                    &tunnelled,
                );
            }
        }
    });
}

/// On the uplink's egress: `to_w2` leaves as it is, `to_w3` through the tunnel.
fn plain_to_w2_tunnelled_to_w3(node: &Node, to_w2: &[u8], to_w3: &[u8]) {
    node.expect_untouched(UplinkEgress, to_w2, Reason::PassDirectRoute);
    let tunnelled = encapsulated(to_w3, &W3, 0, towards(&W3));
    node.expect_frame(
        UplinkEgress,
        to_w3,
        Act::Next,
        Reason::Encapsulated,
        &tunnelled,
    );
}

#[test]
fn what_the_host_routes_to_a_direct_node_leaves_plain() {
    // The host's own packets, and pods' packets it forwarded, on the uplink's egress.
    with_node(|node| {
        direct_w2(node);
        for transport in [Transport::Tcp, Transport::Udp, Transport::Icmp] {
            let to = |remote: &Remote| outbound(UplinkEgress, remote.pod, transport, 120, |_| {});
            plain_to_w2_tunnelled_to_w3(node, &to(&W2), &to(&W3));
        }
        let forwarded = outgoing(&client(Proto::Tcp, POD, W2.pod), ACK);
        node.expect_untouched(UplinkEgress, &forwarded, Reason::PassDirectRoute);
    });
}

#[test]
fn a_pods_reply_to_a_direct_nodes_own_address_leaves_plain() {
    // The reply to a flow w2's host masqueraded to its own address (MASQUERADE on its
    // plain route to our pods takes the uplink's): sent as flanneld's host sends it,
    // plain; to w3's address, behind the router, still through the tunnel.
    with_node(|node| {
        direct_w2(node);
        for transport in [Transport::Tcp, Transport::Udp, Transport::Icmp] {
            let to = |remote: &Remote| from_host(&datagram(ipv4(POD, remote.node), transport, 120));
            plain_to_w2_tunnelled_to_w3(node, &to(&W2), &to(&W3));
        }
        // The host's own packets to w2 leave as they are, as before.
        let own = from_host(&datagram(ipv4(NODE_IP, W2.node), Transport::Udp, 120));
        node.expect_untouched(UplinkEgress, &own, Reason::PassDirectRoute);
    });
}

#[test]
fn a_direct_nodes_plain_packets_reach_the_host_as_before() {
    with_masquerading_node(|node| {
        direct_w2(node);
        let from_w2 = from_underlay(&client(Proto::Udp, W2.pod, POD).datagram(0, PAYLOAD));
        node.expect_untouched(UplinkIngress, &from_w2, Reason::PassNotTunnel);
    });
}

#[test]
fn masquerade_keeps_its_rules_for_direct_traffic() {
    with_masquerading_node(|node| {
        direct_w2(node);
        // Rule 2: a pod's packet to a direct node's pod is neither translated nor
        // tracked.
        for proto in [Proto::Tcp, Proto::Udp, Proto::Echo] {
            let frame = outgoing(&client(proto, POD, W2.pod), SYN);
            let out = node.run(UplinkEgress, &frame);
            check_verdict(
                UplinkEgress,
                &frame,
                &out,
                Act::Next,
                Reason::PassDirectRoute,
            );
            assert_bytes_eq(&out.data, &frame, "pod to pod");
            assert_eq!(out.events, BTreeMap::new(), "masquerade events");
        }
        assert_table(node, &[]);
        // Rule 6: a client outside the cluster (here another address of this host)
        // talking to a direct node's pod leaves from the uplink's address, as
        // flanneld's MASQUERADE on the plain route gives it, unencapsulated; the pod's
        // reply comes back plain to that address and is translated back. A tunnelled
        // node's pod still sees the pod gateway.
        let conn = client(Proto::Tcp, NODE_OTHER_IP, W2.pod);
        let frame = outgoing(&conn, SYN);
        let out = node.run(UplinkEgress, &frame);
        let (addr, port) = translation(node, &conn).expect("rule 6 opened a flow");
        assert_eq!(addr, NODE_IP);
        let to_w3 = client(Proto::Tcp, NODE_OTHER_IP, W3.pod);
        node.run(UplinkEgress, &outgoing(&to_w3, SYN));
        let (addr_w3, _) = translation(node, &to_w3).expect("rule 6 opened a flow");
        assert_eq!(addr_w3, GATEWAY);
        let translated = conn.with_src((addr, port));
        check_verdict(UplinkEgress, &frame, &out, Act::Next, Reason::Masqueraded);
        assert_bytes_eq(&out.data, &outgoing(&translated, SYN), "rule 6, plain");
        assert_checksums(&out.data);
        let reply = from_underlay(&translated.reversed().datagram(SYN | ACK, PAYLOAD));
        let back = from_underlay(&conn.reversed().datagram(SYN | ACK, PAYLOAD));
        let out = node.expect_outcome(UplinkIngress, &reply, Act::Next, Reason::Unmasqueraded);
        assert_bytes_eq(&out.data, &back, "reply translated back");
        assert_checksums(&out.data);
    });
}

#[test]
fn the_fast_path_records_no_direct_flow() {
    // Nothing a direct node's pods exchange with ours is ever decapsulated, where the
    // fast path would take it: recording it would only fill FLOWS and the agent's
    // admission work. A tunnelled node's flow is recorded as before.
    with_node(|node| {
        direct_w2(node);
        for (remote, recorded) in [(W2, false), (W3, true)] {
            let conn = Conn::new(Proto::Tcp, (POD, 40000), (remote.pod, 8080));
            let sent = from_pod(&conn.datagram(ACK, 100));
            node.run(UplinkEgress, &sent);
            assert_eq!(
                node.flow(&flow_key(&sent)).is_some(),
                recorded,
                "to {remote:?}"
            );
            let reply = from_underlay(&conn.reversed().datagram(ACK, 100));
            let reason = if recorded {
                Reason::PassFlowRecorded
            } else {
                Reason::PassDirectRoute
            };
            node.expect_untouched(BridgeEgress, &reply, reason);
            assert_eq!(
                node.flow(&flow_key(&reply)).is_some(),
                recorded,
                "from {remote:?}"
            );
        }
    });
}

/// Which entries of ROUTES (remote subnets, direct nodes' addresses) are direct.
fn direct_subnets(node: &Node) -> BTreeMap<Ipv4Net, bool> {
    let routes = node.dp.routes.entries().expect("reading ROUTES");
    routes.into_iter().map(|(n, r)| (n, r.direct())).collect()
}

#[test]
fn the_agent_routes_nodes_on_the_uplinks_link_directly_and_follows_their_routes() {
    with_node(|node| {
        let passes = Passes::new();
        let nodes = [
            ("w1", POD_SUBNET, NODE_IP),
            ("w2", W2.subnet, W2.node),
            ("w3", W3.subnet, W3.node),
        ];
        let pass = |node: &mut Node, direct_routing: bool| {
            passes.run(node, &nodes, |s| s.direct_routing = direct_routing)
        };
        let routes = || ip("-4 route show proto 191").unwrap();
        let tunnelled =
            |subnet: Ipv4Net, via| format!("{subnet} via {via} dev eth0 src {GATEWAY} mtu 1480 \n");
        let direct = |subnet: Ipv4Net, via| format!("{subnet} via {via} dev eth0 mtu 1500 \n");

        // w2 shares the uplink's link, w3 is behind the router: w2's pods are routed
        // as host-gw routes them, w3's through the tunnel.
        pass(node, true);
        assert_eq!(
            routes(),
            direct(W2.subnet, W2.node) + &tunnelled(W3.subnet, ROUTER)
        );
        // And w2's own address, for pods' replies to it.
        assert_eq!(
            direct_subnets(node),
            BTreeMap::from([
                (W2.subnet, true),
                (W3.subnet, false),
                (Ipv4Net::from(W2.node), true)
            ])
        );
        // The host's own packets take the plain route, from the uplink's address.
        let route = ip(&format!("-4 route get {}", W2.pod)).unwrap();
        assert!(
            route.contains(&format!("via {} dev eth0 src {NODE_IP}", W2.node)),
            "{route}"
        );

        // w2 now reached through the router: tunnelled from the next pass on.
        run_tool(
            "ip",
            &format!("route add {}/32 via {ROUTER} dev eth0", W2.node),
        );
        pass(node, true);
        assert_eq!(
            routes(),
            tunnelled(W2.subnet, ROUTER) + &tunnelled(W3.subnet, ROUTER)
        );
        assert_eq!(direct_subnets(node).get(&W2.subnet), Some(&false));
        assert_eq!(direct_subnets(node).get(&W2.node.into()), None);
        run_tool(
            "ip",
            &format!("route del {}/32 via {ROUTER} dev eth0", W2.node),
        );
        pass(node, true);
        assert_eq!(direct_subnets(node).get(&W2.subnet), Some(&true));

        // Without DirectRouting every node is tunnelled, as before.
        pass(node, false);
        assert_eq!(
            routes(),
            tunnelled(W2.subnet, W2.node) + &tunnelled(W3.subnet, ROUTER)
        );
        assert_eq!(
            direct_subnets(node),
            BTreeMap::from([(W2.subnet, false), (W3.subnet, false)])
        );
    });
}
