//! `uplink_ingress`: IPIP from a known node for a pod of this node loses its outer
//! header and goes straight to the pod when the fast path admits its flow, else to the
//! host stack, which forwards it as it would without us.

use std::net::Ipv4Addr;

use aya::util::KernelVersion;
use etherparse::{IpEcn, Ipv4Header};
use overlay_common::{Hook::UplinkIngress, Reason};

use super::{
    expect::{L2, TO_POD, decapsulated},
    fixture::{Act, Node, with_node},
    packet::{
        Transport, add_router_alert, datagram, first_fragment, from_peer, ipv4, last_fragment,
        tunnelled_tcp,
    },
    topology::{GATEWAY, NODE_IP, POD, POD_UNRESOLVED, STRANGER, W2, W3, W4},
};

/// A frame from w2 around `transport` from a pod of w2 to `dst`, with outer ECN
/// `outer_ecn` and `change` applied to the inner header.
fn tunnelled(
    dst: Ipv4Addr,
    transport: Transport,
    outer_ecn: IpEcn,
    change: impl FnOnce(&mut Ipv4Header),
) -> Vec<u8> {
    let mut ip = ipv4(W2.pod, dst);
    change(&mut ip);
    from_peer(W2.node, outer_ecn, &datagram(ip, transport, 90))
}

/// Admits `frame`'s flow and checks that it goes straight to the pod.
fn assert_to_pod(node: &mut Node, frame: &[u8]) {
    node.admit(frame);
    node.expect_frame(
        UplinkIngress,
        frame,
        Act::Redirect,
        Reason::DecapsulatedToBridge,
        &decapsulated(frame, 1, TO_POD),
    );
}

/// Checks that `frame` reaches the host stack decapsulated, inner packet untouched.
fn assert_to_host(node: &Node, frame: &[u8]) {
    node.expect_frame(
        UplinkIngress,
        frame,
        Act::Next,
        Reason::DecapsulatedToHost,
        &decapsulated(frame, 0, L2::Kept),
    );
}

#[test]
fn admitted_tcp_and_udp_go_straight_to_the_pod() {
    with_node(|node| {
        for transport in [Transport::Tcp, Transport::Udp] {
            for peer in [W2.node, W3.node] {
                let inner = datagram(ipv4(W2.pod, POD), transport, 90);
                assert_to_pod(node, &from_peer(peer, IpEcn::NotEct, &inner));
            }
        }
    });
}

#[test]
fn flows_not_admitted_and_icmp_go_to_the_host() {
    with_node(|node| {
        for transport in [Transport::Tcp, Transport::Udp, Transport::Icmp] {
            let inner = datagram(ipv4(W2.pod, POD), transport, 90);
            assert_to_host(node, &from_peer(W2.node, IpEcn::NotEct, &inner));
        }
    });
}

#[test]
fn a_kernel_that_refuses_the_decap_flag_is_asked_only_once() {
    // 6.3 added BPF_F_ADJ_ROOM_DECAP_L3_IPV4; an older kernel refuses it, and from then
    // on the header is removed without asking again.
    let refuses = KernelVersion::current().expect("kernel version") < KernelVersion::new(6, 3, 0);
    with_node(move |node| {
        assert!(!node.decap_flag_refused(), "learned before any packet");
        let frame = tunnelled(POD, Transport::Tcp, IpEcn::NotEct, |_| {});
        assert_to_pod(node, &frame);
        assert_eq!(node.decap_flag_refused(), refuses);
        // Once learned, the packet comes out the same.
        assert_to_pod(node, &frame);
        assert_eq!(node.decap_flag_refused(), refuses);
    });
}

#[test]
fn inner_options_go_straight_to_the_pod_and_fragments_to_the_host() {
    // Only the outer header must be plain: the inner one is the pod's business. A
    // fragment carries no ports to find its flow by.
    with_node(|node| {
        assert_to_pod(
            node,
            &tunnelled(POD, Transport::Udp, IpEcn::NotEct, add_router_alert),
        );
        for change in [first_fragment, last_fragment] {
            let frame = tunnelled(POD, Transport::Udp, IpEcn::NotEct, change);
            node.admit(&frame);
            assert_to_host(node, &frame);
        }
    });
}

#[test]
fn congestion_experienced_is_carried_inside() {
    use IpEcn::*;
    with_node(|node| {
        for outer in [NotEct, Ect1, Ect0, CongestionExperienced] {
            for inner in [NotEct, Ect1, Ect0, CongestionExperienced] {
                eprintln!("case: outer {outer:?}, inner {inner:?}");
                let frame = tunnelled(POD, Transport::Tcp, outer, |ip| ip.ecn = inner);
                if outer == CongestionExperienced && inner == NotEct {
                    // RFC 6040: the sender cannot take the mark.
                    node.expect(UplinkIngress, &frame, Act::Shot, Reason::DropCeOnNotEct);
                } else {
                    assert_to_pod(node, &frame);
                }
            }
        }
    });
}

#[test]
fn what_cannot_go_straight_to_a_pod_goes_to_the_stack() {
    // The stack gets the inner packet as it came (TTL untouched, CE carried inside) in
    // the frame it came in: it answers time-exceeded, delivers locally, or resolves;
    // also for an admitted flow.
    use IpEcn::*;
    let cases: [(&str, Ipv4Addr, u8, IpEcn, IpEcn); 6] = [
        ("ttl 1", POD, 1, NotEct, NotEct),
        ("ttl 0", POD, 0, NotEct, NotEct),
        ("ttl 1, congestion", POD, 1, CongestionExperienced, Ect0),
        ("the gateway itself", GATEWAY, 63, NotEct, NotEct),
        (
            "the gateway itself, congestion",
            GATEWAY,
            63,
            CongestionExperienced,
            Ect1,
        ),
        (
            "a pod without a neighbour entry",
            POD_UNRESOLVED,
            63,
            NotEct,
            NotEct,
        ),
    ];
    with_node(move |node| {
        for (what, dst, ttl, outer_ecn, inner_ecn) in cases {
            eprintln!("case: {what}");
            let frame = tunnelled(dst, Transport::Tcp, outer_ecn, |ip| {
                ip.time_to_live = ttl;
                ip.ecn = inner_ecn;
            });
            node.admit(&frame);
            let expected = decapsulated(&frame, 0, L2::Kept);
            node.expect_frame(
                UplinkIngress,
                &frame,
                Act::Next,
                Reason::DecapsulatedToStack,
                &expected,
            );
        }
    });
}

#[test]
fn spoofed_outer_source_is_dropped() {
    // A stranger, and a node we route to but that is no peer of ours.
    with_node(|node| {
        for src in [STRANGER, W4.node] {
            node.expect(
                UplinkIngress,
                &tunnelled_tcp(src, W2.pod, POD, 40),
                Act::Shot,
                Reason::DropUnknownPeer,
            );
        }
    });
}

#[test]
fn inner_destination_outside_this_node_is_dropped() {
    // Another node's pod, and an address outside the cluster (the relay attack).
    with_node(|node| {
        for dst in [W3.pod, Ipv4Addr::new(192, 0, 2, 80)] {
            node.expect(
                UplinkIngress,
                &tunnelled_tcp(W2.node, W2.pod, dst, 40),
                Act::Shot,
                Reason::DropNotForThisNode,
            );
        }
    });
}

#[test]
fn a_remote_pods_packet_for_this_nodes_address_goes_to_the_host() {
    // A reply to a flow this node's host masqueraded: its conntrack translates it back,
    // whether or not the flow is on the fast path.
    with_node(|node| {
        for transport in [Transport::Tcp, Transport::Udp, Transport::Icmp] {
            let frame = tunnelled(NODE_IP, transport, IpEcn::NotEct, |_| {});
            node.admit(&frame);
            node.expect_frame(
                UplinkIngress,
                &frame,
                Act::Next,
                Reason::DecapsulatedToNode,
                &decapsulated(&frame, 0, L2::Kept),
            );
        }
    });
}
