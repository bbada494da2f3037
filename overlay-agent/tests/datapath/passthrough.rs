//! What is not overlay traffic passes every hook untouched, counted under its reason.

use etherparse::{IpEcn, IpNumber};
use overlay_common::{
    Hook::{self, BridgeIngress, UplinkEgress, UplinkIngress},
    Reason,
};

use super::{
    fixture::{with_node, with_unconfigured_node},
    packet::{
        Transport, arp, datagram, from_host, from_peer, from_pod, from_underlay, ipv4, ipv6_udp,
        nest, outbound, tunnel_header, vlan_tagged,
    },
    topology::{CNI0_MAC, GATEWAY, NODE_IP, OUTSIDE, POD, POD_UNRESOLVED, STRANGER, W2},
};

/// A TCP datagram from a pod of w2 to a pod here.
fn to_pod() -> Vec<u8> {
    datagram(ipv4(W2.pod, POD), Transport::Tcp, 20)
}

#[test]
fn non_ipv4_passes_every_hook() {
    with_node(|node| {
        // The VLAN frame carries what would be overlay traffic untagged.
        let tagged = vlan_tagged(&datagram(ipv4(POD, W2.pod), Transport::Tcp, 20));
        for hook in Hook::ALL {
            for frame in [arp(), ipv6_udp(), tagged.clone()] {
                // A pod's veth looks no further than a frame not for the gateway (ARP
                // is broadcast).
                let reason = match hook {
                    Hook::PodIngress if frame[..6] != CNI0_MAC.0 => Reason::PassNotForGateway,
                    _ => Reason::PassNotIpv4,
                };
                node.expect_untouched(hook, &frame, reason);
            }
        }
    });
}

#[test]
fn ipv4_outside_the_overlay_passes() {
    with_node(|node| {
        // To the gateway, to another pod of this node, out of the cluster.
        for dst in [GATEWAY, POD_UNRESOLVED, OUTSIDE] {
            let frame = outbound(BridgeIngress, dst, Transport::Udp, 30, |_| {});
            node.expect_untouched(BridgeIngress, &frame, Reason::PassNotOverlay);
        }
        // The host's own underlay traffic: to another node, out of the cluster.
        for dst in [W2.node, OUTSIDE] {
            let frame = outbound(UplinkEgress, dst, Transport::Tcp, 30, |_| {});
            node.expect_untouched(UplinkEgress, &frame, Reason::PassNotOverlay);
        }
    });
}

#[test]
fn tunnels_that_are_not_overlay_traffic_pass() {
    with_node(|node| {
        // A pod running its own IPIP tunnel to somewhere outside.
        let pods_tunnel = from_pod(&nest(ipv4(POD, OUTSIDE), &to_pod()));
        node.expect_untouched(BridgeIngress, &pods_tunnel, Reason::PassTunnelled);
        // What bridge_ingress encapsulated, leaving through the uplink.
        let mut ours = tunnel_header(NODE_IP, IpEcn::NotEct);
        ours.destination = W2.node.octets();
        node.expect_untouched(
            UplinkEgress,
            &from_host(&nest(ours, &to_pod())),
            Reason::PassTunnelled,
        );
    });
}

#[test]
fn uplink_passes_what_is_not_a_tunnel_to_this_node() {
    with_node(|node| {
        for transport in [Transport::Tcp, Transport::Udp, Transport::Icmp] {
            let frame = from_underlay(&datagram(ipv4(W2.node, NODE_IP), transport, 50));
            node.expect_untouched(UplinkIngress, &frame, Reason::PassNotTunnel);
        }
        // IPIP to another address (a tunnel that is none of our business).
        let mut elsewhere = tunnel_header(W2.node, IpEcn::NotEct);
        elsewhere.destination = STRANGER.octets();
        node.expect_untouched(
            UplinkIngress,
            &from_underlay(&nest(elsewhere, &to_pod())),
            Reason::PassNotTunnel,
        );
        // Protocol 41 (IPv6 in IPv4) to this node.
        let sit = from_underlay(&datagram(
            ipv4(W2.node, NODE_IP),
            Transport::Raw(IpNumber::IPV6),
            60,
        ));
        node.expect_untouched(UplinkIngress, &sit, Reason::PassNotTunnel);
    });
}

#[test]
fn unconfigured_node_passes_everything() {
    // Before the agent writes CONFIG, the datapath must not interfere at all.
    with_unconfigured_node(|node| {
        let cases = [
            (
                BridgeIngress,
                outbound(BridgeIngress, W2.pod, Transport::Tcp, 40, |_| {}),
            ),
            (
                UplinkEgress,
                outbound(UplinkEgress, W2.pod, Transport::Tcp, 40, |_| {}),
            ),
            (UplinkIngress, from_peer(W2.node, IpEcn::NotEct, &to_pod())),
        ];
        for (hook, frame) in cases {
            node.expect_untouched(hook, &frame, Reason::PassNotConfigured);
        }
    });
}
