//! ICMP errors about masqueraded flows (RFC 5508 section 4.2): the error's own address
//! and the datagram it quotes are translated together, so that the error reaches (or
//! comes from) the right end and quotes the datagram as that end knows it.
//!
//! The expected errors are built from the other side's view: an error about a packet
//! the pod sent must quote that packet exactly as the pod sent it, and an error the pod
//! sends about a reply must quote the reply exactly as it came from the outside. Every
//! checksum (outer IP, ICMP, quoted IP, and quoted transport when the whole datagram is
//! quoted) is checked with etherparse.

use std::collections::BTreeMap;

use etherparse::{
    Icmpv4Type, IpEcn,
    icmpv4::{
        DestUnreachableHeader::{self, FragmentationNeeded},
        TimeExceededCode,
    },
};
use overlay_common::{
    Hook::{self, UplinkEgress, UplinkIngress},
    Reason,
    counters::NatEvent,
};

use super::{
    expect::{assert_checksums, encapsulated, towards},
    fixture::{Act, Node, assert_bytes_eq, with_masquerading_node},
    nat::{PAYLOAD, client, incoming, next_port, open, reply_outcome, translate_back},
    packet::{
        ACK, Conn, IPV4_LEN, Proto, SYN, Transport, datagram, from_host, from_peer, from_underlay,
        icmp_message, ipv4, nest, tunnel_header,
    },
    topology::{GATEWAY, NODE_IP, NODE_OTHER_IP, OUTSIDE, OUTSIDE_ROUTER, POD, W2},
};

fn port_unreachable() -> Icmpv4Type {
    Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port)
}

/// The errors a router or host sends back.
fn error_types() -> [Icmpv4Type; 3] {
    [
        port_unreachable(),
        Icmpv4Type::DestinationUnreachable(FragmentationNeeded { next_hop_mtu: 1280 }),
        Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit),
    ]
}

/// How much of the offending datagram `datagram` an error quotes: all of it (as Linux
/// does up to 576 bytes), the IP header and 8 bytes (RFC 792's minimum: for TCP, without
/// the checksum), or for TCP the whole header without payload.
fn quote_lengths(proto: Proto, datagram: &[u8]) -> Vec<usize> {
    let mut lens = vec![datagram.len(), IPV4_LEN + 8];
    if proto == Proto::Tcp {
        lens.push(IPV4_LEN + 20);
    }
    lens
}

/// Runs `frame` through `hook` and checks that it leaves as `expected` with `act` and
/// `reason`, counted as one translated ICMP error.
fn assert_translated_error(
    node: &Node,
    hook: Hook,
    frame: &[u8],
    (act, reason): (Act, Reason),
    expected: &[u8],
) {
    let out = node.expect_outcome(hook, frame, act, reason);
    assert_bytes_eq(&out.data, expected, "translated ICMP error");
    assert_checksums(&out.data);
    assert_eq!(
        out.events,
        BTreeMap::from([(NatEvent::IcmpErrorTranslated, 1)]),
        "events"
    );
}

/// Runs `frame` through `hook` and checks that it passes untouched with `reason`,
/// translating nothing.
fn assert_untranslated_error(node: &Node, hook: Hook, frame: &[u8], reason: Reason) {
    let out = node.expect_outcome(hook, frame, Act::Next, reason);
    assert_bytes_eq(&out.data, frame, "untranslated ICMP error");
    assert_eq!(out.events, BTreeMap::new(), "events");
}

#[test]
fn errors_about_masqueraded_packets_reach_their_pod() {
    // Also when the frame carries an Ethernet trailer: it is outside the IP datagram (so
    // outside the quote and the ICMP checksum), and must not be taken for quoted bytes
    // when the quote stops short (e.g. before the TCP checksum).
    const TRAILER: [u8; 16] = [0xa5; 16];
    with_masquerading_node(|node| {
        for proto in Proto::ALL {
            let conn = client(proto, POD, OUTSIDE);
            let translated = open(node, conn, SYN, NODE_IP);
            let sent = conn.datagram(SYN, PAYLOAD);
            let left = translated.datagram(SYN, PAYLOAD);
            for len in quote_lengths(proto, &left) {
                for icmp_type in error_types() {
                    for trailer in [&[][..], &TRAILER] {
                        eprintln!(
                            "case: {proto:?}, {len} bytes quoted, {icmp_type:?}, {} trailing",
                            trailer.len()
                        );
                        let error =
                            icmp_message(OUTSIDE_ROUTER, NODE_IP, icmp_type.clone(), &left[..len]);
                        let expected =
                            icmp_message(OUTSIDE_ROUTER, POD, icmp_type.clone(), &sent[..len]);
                        let back = [from_underlay(&expected).as_slice(), trailer].concat();
                        let (act, reason, expected) = reply_outcome(back);
                        assert_translated_error(
                            node,
                            UplinkIngress,
                            &[from_underlay(&error).as_slice(), trailer].concat(),
                            (act, reason),
                            &expected,
                        );
                    }
                }
            }
        }
    });
}

#[test]
fn errors_pods_send_about_replies_leave_masqueraded() {
    // The pod quotes the reply as it received it (translated back to it); outside, the
    // error must come from the masquerade address and quote the reply as it was sent.
    with_masquerading_node(|node| {
        for proto in Proto::ALL {
            let conn = client(proto, POD, OUTSIDE);
            let translated = open(node, conn, SYN, NODE_IP);
            translate_back(node, conn, translated, SYN | ACK);
            let received = conn.reversed().datagram(SYN | ACK, PAYLOAD);
            let replied = translated.reversed().datagram(SYN | ACK, PAYLOAD);
            for len in quote_lengths(proto, &received) {
                eprintln!("case: {proto:?}, {len} bytes quoted");
                let icmp_type = port_unreachable();
                let error = from_host(&icmp_message(
                    POD,
                    OUTSIDE,
                    icmp_type.clone(),
                    &received[..len],
                ));
                let expected =
                    from_host(&icmp_message(NODE_IP, OUTSIDE, icmp_type, &replied[..len]));
                assert_translated_error(
                    node,
                    UplinkEgress,
                    &error,
                    (Act::Next, Reason::Masqueraded),
                    &expected,
                );
            }
        }
    });
}

#[test]
fn errors_of_host_traffic_to_remote_pods_are_translated_both_ways() {
    // Rule 6. A remote pod's error about the host's packet comes through the tunnel to
    // the gateway: decapsulated and translated to the host. The host's error about the
    // remote pod's reply leaves from the gateway, encapsulated.
    with_masquerading_node(|node| {
        for proto in Proto::ALL {
            eprintln!("case: {proto:?}");
            let conn = client(proto, NODE_OTHER_IP, W2.pod);
            let translated = open(node, conn, SYN, GATEWAY);
            let icmp_type = port_unreachable();

            let left = translated.datagram(SYN, PAYLOAD);
            let error = from_peer(
                W2.node,
                IpEcn::NotEct,
                &icmp_message(W2.pod, GATEWAY, icmp_type.clone(), &left),
            );
            let sent = conn.datagram(SYN, PAYLOAD);
            let expected = from_underlay(&icmp_message(
                W2.pod,
                NODE_OTHER_IP,
                icmp_type.clone(),
                &sent,
            ));
            assert_translated_error(
                node,
                UplinkIngress,
                &error,
                (Act::Next, Reason::Unmasqueraded),
                &expected,
            );

            translate_back(node, conn, translated, SYN | ACK);
            let received = conn.reversed().datagram(SYN | ACK, PAYLOAD);
            let error = from_host(&icmp_message(
                NODE_OTHER_IP,
                W2.pod,
                icmp_type.clone(),
                &received,
            ));
            let replied = translated.reversed().datagram(SYN | ACK, PAYLOAD);
            let translated_error = from_host(&icmp_message(GATEWAY, W2.pod, icmp_type, &replied));
            let expected = encapsulated(&translated_error, &W2, 0, towards(&W2));
            assert_translated_error(
                node,
                UplinkEgress,
                &error,
                (Act::Next, Reason::Encapsulated),
                &expected,
            );
        }
    });
}

#[test]
fn errors_about_anything_else_pass_untouched() {
    with_masquerading_node(|node| {
        let frag_needed =
            Icmpv4Type::DestinationUnreachable(FragmentationNeeded { next_hop_mtu: 1400 });
        let conn = client(Proto::Udp, POD, OUTSIDE);
        let translated = open(node, conn, 0, NODE_IP);
        let port = translated.src.1;
        let other_port = next_port(node, port);
        let to_node = |quoted: &Conn| {
            let d = quoted.datagram(0, PAYLOAD);
            from_underlay(&icmp_message(
                OUTSIDE_ROUTER,
                NODE_IP,
                port_unreachable(),
                &d,
            ))
        };
        let tcp = open(node, client(Proto::Tcp, POD, OUTSIDE), SYN, NODE_IP).datagram(SYN, PAYLOAD);
        let to_node_cut = |len: usize| {
            from_underlay(&icmp_message(
                OUTSIDE_ROUTER,
                NODE_IP,
                port_unreachable(),
                &tcp[..len],
            ))
        };
        let mut our_tunnel = tunnel_header(NODE_IP, IpEcn::NotEct);
        our_tunnel.destination = W2.node.octets();
        let ipip = nest(our_tunnel, &datagram(ipv4(POD, W2.pod), Transport::Tcp, 60));
        let an_error = icmp_message(
            NODE_IP,
            OUTSIDE,
            port_unreachable(),
            &conn.datagram(0, PAYLOAD),
        );
        let cases = [
            // A port no flow holds; the host's own connection.
            (
                "another port",
                to_node(&translated.with_src((NODE_IP, other_port))),
            ),
            (
                "another server",
                to_node(&translated.with_dst((OUTSIDE_ROUTER, 443))),
            ),
            (
                "the host's own flow",
                to_node(&conn.with_src((NODE_IP, 33000))),
            ),
            // The underlay's path MTU discovery for our tunnel must reach the host.
            (
                "frag needed for our tunnel",
                from_underlay(&icmp_message(W2.node, NODE_IP, frag_needed, &ipip[..48])),
            ),
            // Fewer than the 8 transport bytes RFC 792 asks for, whatever trails the frame.
            (
                "a quote cut inside the TCP header",
                [to_node_cut(IPV4_LEN + 4).as_slice(), &[0; 16]].concat(),
            ),
            // Errors are never sent about errors.
            (
                "an error about an error",
                from_underlay(&icmp_message(
                    OUTSIDE,
                    NODE_IP,
                    port_unreachable(),
                    &an_error,
                )),
            ),
        ];
        for (what, frame) in cases {
            eprintln!("case: {what}");
            assert_untranslated_error(node, UplinkIngress, &frame, Reason::PassNotTunnel);
        }

        // A pod's error about a flow from the outside (rule 4): untranslated both ways.
        let inbound = client(Proto::Udp, OUTSIDE, POD);
        node.expect_untouched(UplinkIngress, &incoming(&inbound, 0), Reason::PassNotTunnel);
        let error = from_host(&icmp_message(
            POD,
            OUTSIDE,
            port_unreachable(),
            &inbound.datagram(0, PAYLOAD),
        ));
        assert_untranslated_error(node, UplinkEgress, &error, Reason::PassNotOverlay);
        // And the pod's error about a packet no flow knows.
        let unknown = client(Proto::Tcp, OUTSIDE_ROUTER, POD).datagram(SYN, PAYLOAD);
        let error = from_host(&icmp_message(
            POD,
            OUTSIDE_ROUTER,
            port_unreachable(),
            &unknown,
        ));
        assert_untranslated_error(node, UplinkEgress, &error, Reason::PassNotOverlay);
    });
}
