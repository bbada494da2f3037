//! `bridge_ingress` (and `pod_ingress`, the same work on the pod's veth): a local pod's
//! packet for a remote pod subnet leaves encapsulated, straight towards the owning node,
//! when the fast path admits its flow; else the host stack routes it.

use etherparse::IpEcn;
use overlay_common::{
    Hook::{BridgeIngress, PodIngress},
    Reason,
};

use super::{
    expect::{encapsulated, towards},
    fixture::{Act, Node, with_node},
    packet::{Transport, filling, outbound},
    topology::{Remote, W2, W3, W4, W5},
};

/// Sends a pod's datagram of an admitted flow to a pod of `remote` (header adjusted by
/// `change`) and checks that it leaves exactly as the spec builds it: one TTL hop less
/// inside, outer header to `remote`, MACs from the FIB; on the bridge and on the pod's
/// veth alike.
fn assert_encapsulated(
    node: &mut Node,
    remote: &Remote,
    transport: Transport,
    payload_len: usize,
    change: impl FnOnce(&mut etherparse::Ipv4Header),
) {
    let frame = outbound(BridgeIngress, remote.pod, transport, payload_len, change);
    node.admit(&frame);
    let reason = match remote.next_hop_mac {
        Some(_) => Reason::Encapsulated,
        None => Reason::EncapsulatedNeighResolve,
    };
    let expected = encapsulated(&frame, remote, 1, towards(remote));
    for hook in [BridgeIngress, PodIngress] {
        node.expect_frame(hook, &frame, Act::Redirect, reason, &expected);
    }
}

#[test]
fn tcp_and_udp_of_any_size() {
    with_node(|node| {
        for transport in [Transport::Tcp, Transport::Udp] {
            // Up to the largest datagram whose encapsulation fits the uplink.
            for payload_len in [0, 1, 333, filling(W2.mtu, transport)] {
                assert_encapsulated(node, &W2, transport, payload_len, |_| {});
            }
        }
    });
}

#[test]
fn dont_fragment_is_copied_outside() {
    with_node(|node| {
        for df in [true, false] {
            assert_encapsulated(node, &W2, Transport::Udp, 64, |ip| ip.dont_fragment = df);
        }
    });
}

#[test]
fn ecn_is_copied_outside_except_ce() {
    with_node(|node| {
        for ecn in [
            IpEcn::NotEct,
            IpEcn::Ect1,
            IpEcn::Ect0,
            IpEcn::CongestionExperienced,
        ] {
            assert_encapsulated(node, &W2, Transport::Tcp, 200, |ip| ip.ecn = ecn);
        }
    });
}

#[test]
fn peer_behind_a_router_gets_the_routers_mac() {
    with_node(|node| assert_encapsulated(node, &W3, Transport::Tcp, 100, |_| {}));
}

#[test]
fn unresolved_next_hop_is_left_to_the_kernel_to_resolve() {
    // The MACs stay as they came: bpf_redirect_neigh fills them in.
    with_node(|node| assert_encapsulated(node, &W4, Transport::Tcp, 100, |_| {}));
}

#[test]
fn last_forwarding_hop_still_encapsulates() {
    // TTL 2 is the smallest a router may forward: it leaves with TTL 1 in and out.
    with_node(|node| assert_encapsulated(node, &W2, Transport::Udp, 56, |ip| ip.time_to_live = 2));
}

#[test]
fn flows_not_admitted_and_icmp_are_left_to_the_host() {
    with_node(|node| {
        for transport in [Transport::Tcp, Transport::Udp, Transport::Icmp] {
            let frame = outbound(BridgeIngress, W2.pod, transport, 100, |_| {});
            for hook in [BridgeIngress, PodIngress] {
                node.expect_untouched(hook, &frame, Reason::PassToHost);
            }
        }
    });
}

#[test]
fn peer_without_an_underlay_route_is_dropped() {
    with_node(|node| {
        let frame = outbound(BridgeIngress, W5.pod, Transport::Tcp, 100, |_| {});
        node.admit(&frame);
        node.expect(BridgeIngress, &frame, Act::Shot, Reason::DropNoRouteToPeer);
    });
}
