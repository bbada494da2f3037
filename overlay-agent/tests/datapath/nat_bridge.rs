//! Masquerade on the pod bridge: once the uplink's egress has opened a flow and the
//! fast path admitted it, the pod's later packets of it are translated by
//! `bridge_ingress` and sent straight out of the uplink to the next hop; everything else
//! takes the host's path.

use std::collections::BTreeMap;

use etherparse::Icmpv4Type;
use overlay_common::{
    Hook::BridgeIngress,
    Reason,
    conntrack::{Rule, flags::SEEN_REPLY},
};

use super::{
    expect::{L2, forwarded},
    fixture::{Act, Node, assert_bytes_eq, check_verdict, with_masquerading_node, with_node},
    nat::{PAYLOAD, Tracked, assert_table, client, open, translate_back},
    packet::{
        ACK, Conn, FIN, HeaderChange, PSH, Proto, SYN, add_router_alert, first_fragment, from_pod,
        icmp_message,
    },
    topology::{ETH0_MAC, NODE_IP, OUTSIDE, OUTSIDE_2, POD, ROUTER_MAC},
};

/// A packet of `conn` as the pod sends it to its gateway.
fn from_the_pod(conn: &Conn, flags: u8, change: HeaderChange) -> Vec<u8> {
    from_pod(&conn.datagram_with(flags, PAYLOAD, change))
}

/// Sends a packet of `conn` (translated to `translated`, admitted) into the bridge and
/// checks that it leaves translated, one hop on, addressed to the router on the uplink.
fn leaves_translated(node: &Node, conn: &Conn, translated: &Conn, flags: u8) {
    let frame = from_the_pod(conn, flags, |_| {});
    let out = node.run(BridgeIngress, &frame);
    check_verdict(
        BridgeIngress,
        &frame,
        &out,
        Act::Redirect,
        Reason::MasqueradedToUplink,
    );
    let expected = forwarded(
        &from_the_pod(translated, flags, |_| {}),
        L2::Rewritten {
            dst: ROUTER_MAC,
            src: ETH0_MAC,
        },
    );
    assert_bytes_eq(&out.data, &expected, "translated on the bridge");
    super::expect::assert_checksums(&out.data);
    assert_eq!(out.events, BTreeMap::new(), "masquerade events");
}

#[test]
fn later_packets_of_a_masqueraded_flow_leave_from_the_bridge() {
    with_masquerading_node(|node| {
        let mut tracked = Vec::new();
        for proto in [Proto::Tcp, Proto::Udp] {
            eprintln!("case: {proto:?}");
            let conn = client(proto, POD, OUTSIDE);
            // The first packet goes to the host, which may change its destination
            // (kube-proxy) before the uplink's egress opens the flow.
            node.expect_untouched(
                BridgeIngress,
                &from_the_pod(&conn, SYN, |_| {}),
                Reason::PassNotOverlay,
            );
            let translated = open(node, conn, SYN, NODE_IP);
            // Known to the table, not yet admitted: the host still decides.
            let later = from_the_pod(&conn, ACK | PSH, |_| {});
            node.expect_untouched(BridgeIngress, &later, Reason::PassToHost);
            node.admit(&later);
            leaves_translated(node, &conn, &translated, ACK | PSH);
            assert_eq!(
                translate_back(node, conn, translated, ACK),
                BTreeMap::new(),
                "events of a reply"
            );
            leaves_translated(node, &conn, &translated, ACK);
            tracked.push(Tracked::translated(
                conn,
                translated,
                Rule::PodToOutside,
                SEEN_REPLY,
            ));
        }
        assert_table(node, &tracked);

        // A FIN is for the host's connection tracking to see: it takes the host's
        // path, and so does the rest of the flow.
        let conn = client(Proto::Tcp, POD, OUTSIDE);
        for flags in [FIN | ACK, ACK] {
            node.expect_untouched(
                BridgeIngress,
                &from_the_pod(&conn, flags, |_| {}),
                Reason::PassToHost,
            );
        }
        assert_table(node, &tracked);
        // An ICMP echo flow is never on the fast path.
        let echo = client(Proto::Echo, POD, OUTSIDE);
        open(node, echo, 0, NODE_IP);
        node.expect_untouched(
            BridgeIngress,
            &from_the_pod(&echo, 0, |_| {}),
            Reason::PassToHost,
        );
    });
}

#[test]
fn what_the_bridge_does_not_translate_takes_the_hosts_path() {
    with_masquerading_node(|node| {
        let conn = client(Proto::Tcp, POD, OUTSIDE);
        let translated = open(node, conn, SYN, NODE_IP);
        node.admit(&from_the_pod(&conn, ACK, |_| {}));
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            // May reopen the flow or need a port the outside accepts: the egress decides.
            ("a SYN of the known flow", from_the_pod(&conn, SYN, |_| {})),
            ("TTL 1", from_the_pod(&conn, ACK, |ip| ip.time_to_live = 1)),
            ("IP options", from_the_pod(&conn, ACK, add_router_alert)),
            ("a fragment", from_the_pod(&conn, ACK, first_fragment)),
            (
                "a flow the table does not know",
                from_the_pod(&conn.with_src((POD, 40100)), ACK, |_| {}),
            ),
        ];
        // An ICMP error the pod sends about the flow: translated on the uplink (RFC 5508).
        let quoted = translated.reversed().datagram(ACK, PAYLOAD);
        let unreachable =
            Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port);
        cases.push((
            "an ICMP error about the flow",
            from_pod(&icmp_message(POD, OUTSIDE, unreachable, &quoted)),
        ));
        // A flow to a destination this node has no route for: the host answers.
        let unroutable = client(Proto::Udp, POD, OUTSIDE_2);
        open(node, unroutable, 0, NODE_IP);
        node.admit(&from_the_pod(&unroutable, 0, |_| {}));
        cases.push(("no route", from_the_pod(&unroutable, 0, |_| {})));
        for (what, frame) in cases {
            eprintln!("case: {what}");
            node.expect_untouched(BridgeIngress, &frame, Reason::PassNotOverlay);
        }
        // None of them changed the flow: its later packets still leave from the bridge.
        leaves_translated(node, &conn, &translated, ACK);
    });
}

#[test]
fn nothing_is_translated_on_the_bridge_with_masquerade_off() {
    with_node(|node| {
        let conn = client(Proto::Udp, POD, OUTSIDE);
        node.expect_untouched(
            BridgeIngress,
            &from_the_pod(&conn, 0, |_| {}),
            Reason::PassNotOverlay,
        );
    });
}
