//! `uplink_egress`: what the host stack routes out of the uplink to a remote pod subnet
//! is encapsulated as it is: the stack already did the router's work (TTL, options,
//! fragmentation).

use overlay_common::{Hook::UplinkEgress, Reason};

use super::{
    expect::{encapsulated, towards},
    fixture::{
        Act, Node, SkBuff, assert_bytes_eq, check_verdict, with_masquerading_node, with_node,
    },
    packet::{HeaderChange, Transport, datagram, from_host, from_pod, ipv4, outbound},
    slow_path::slow_path_headers,
    topology::{POD, Remote, W2, W3, W4, W5},
};

/// The uplink's own egress: a resolved next hop on it needs no redirect.
fn assert_encapsulated(node: &Node, frame: &[u8], remote: &Remote) {
    let (act, reason) = match remote.next_hop_mac {
        Some(_) => (Act::Next, Reason::Encapsulated),
        None => (Act::Redirect, Reason::EncapsulatedNeighResolve),
    };
    let expected = encapsulated(frame, remote, 0, towards(remote));
    node.expect_frame(UplinkEgress, frame, act, reason, &expected);
}

/// A datagram the host sends to a pod of `remote`.
fn from_host_to(remote: &Remote, transport: Transport, change: HeaderChange) -> Vec<u8> {
    outbound(UplinkEgress, remote.pod, transport, 120, change)
}

#[test]
fn host_traffic_is_encapsulated_with_its_ttl() {
    with_node(|node| {
        for transport in [Transport::Tcp, Transport::Udp, Transport::Icmp] {
            for remote in [W2, W3, W4] {
                assert_encapsulated(node, &from_host_to(&remote, transport, |_| {}), &remote);
            }
        }
    });
}

#[test]
fn what_the_bridge_leaves_to_the_stack_is_encapsulated_here() {
    // TTL 1, options and fragments come back from the stack through this hook.
    with_node(|node| {
        for (what, change, _) in slow_path_headers() {
            eprintln!("case: {what}");
            assert_encapsulated(node, &from_host_to(&W2, Transport::Udp, change), &W2);
        }
    });
}

#[test]
fn route_through_another_device_is_a_redirect() {
    // Seen from another device's egress (here: cni0), the FIB's answer (eth0) is not the
    // current device, so the packet must be redirected. This also shows the kernel runs
    // the program with the ifindex of the context.
    with_node(|node| {
        let frame = from_host_to(&W2, Transport::Tcp, |_| {});
        let ctx = SkBuff {
            ifindex: node.cni0,
            ..Default::default()
        };
        let out = node.run_with(UplinkEgress, &frame, ctx);
        check_verdict(
            UplinkEgress,
            &frame,
            &out,
            Act::Redirect,
            Reason::Encapsulated,
        );
        assert_eq!(
            out.ctx.ifindex, node.cni0,
            "the kernel ran the program on another device"
        );
        assert_bytes_eq(
            &out.data,
            &encapsulated(&frame, &W2, 0, towards(&W2)),
            "output",
        );
    });
}

#[test]
fn peer_without_an_underlay_route_is_dropped() {
    with_node(|node| {
        let frame = from_host_to(&W5, Transport::Tcp, |_| {});
        node.expect(UplinkEgress, &frame, Act::Shot, Reason::DropNoRouteToPeer);
    });
}

#[test]
fn a_pods_reply_to_a_peer_nodes_own_address_is_tunnelled_to_it() {
    // The reply to a flow that node's host masqueraded (a NodePort client, the bridge
    // plugin's masquerade): no pod address crosses the underlay unencapsulated.
    with_node(|node| {
        for remote in [W2, W3] {
            for transport in [Transport::Tcp, Transport::Udp, Transport::Icmp] {
                let frame = from_host(&datagram(ipv4(POD, remote.node), transport, 120));
                assert_encapsulated(node, &frame, &remote);
            }
        }
        // An address that is no peer's (w4 may not send us IPIP) stays as it is.
        let frame = from_host(&datagram(ipv4(POD, W4.node), Transport::Tcp, 120));
        node.expect(UplinkEgress, &frame, Act::Next, Reason::PassNotOverlay);
    });
}

#[test]
fn a_pods_new_flow_to_a_peer_node_is_masqueraded_not_tunnelled() {
    // With masquerade on, a node address is outside the pod network (rule 5): the flow
    // leaves from this node's address, translated first.
    with_masquerading_node(|node| {
        let frame = from_host(&datagram(ipv4(POD, W2.node), Transport::Udp, 120));
        node.expect(UplinkEgress, &frame, Act::Next, Reason::Masqueraded);
    });
}

#[test]
fn the_bridge_leaves_a_pods_packet_for_a_node_address_to_the_host() {
    // Even on the fast path: the host may have to masquerade it first.
    with_node(|node| {
        let frame = from_pod(&datagram(ipv4(POD, W2.node), Transport::Tcp, 120));
        node.admit(&frame);
        node.expect(
            overlay_common::Hook::BridgeIngress,
            &frame,
            Act::Next,
            Reason::PassNotOverlay,
        );
    });
}
