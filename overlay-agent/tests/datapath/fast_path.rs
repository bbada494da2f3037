//! The fast path's rule (`overlay_common::flows`): what the host forwarded is recorded
//! (`uplink_egress` before encapsulation, `bridge_egress` on the way to a pod), and the
//! ingress programs skip the host only for a direction the agent admitted, seen under
//! the current ruleset generation, recently refreshed, and never for a SYN, FIN or RST.

use etherparse::IpEcn;
use overlay_common::{
    Hook::{BridgeEgress, BridgeIngress, PodIngress, UplinkEgress, UplinkIngress},
    Reason,
    flows::{CLOSING, FAST_FOR_NS, FlowState},
};

use super::{
    expect::to_pod,
    fixture::{
        Act, GENERATION, Node, flow_key, masquerade, monotonic_ns_after, no_fast_path,
        with_masquerading_node, with_node, with_node_setup,
    },
    nat::{client, open},
    packet::{
        ACK, Conn, FIN, PSH, Proto, RST, SYN, Transport, arp, from_peer, from_pod, from_underlay,
        outbound,
    },
    topology::{GATEWAY, NODE_IP, OUTSIDE, POD, W2},
};

/// A TCP segment of `conn` with `flags`, as a pod sends it to its gateway.
fn pod_sends(conn: &Conn, flags: u8) -> Vec<u8> {
    from_pod(&conn.datagram(flags, 100))
}

/// A TCP segment of `conn` with `flags` from w2's pod, as it arrives through the tunnel.
fn tunnelled(conn: &Conn, flags: u8) -> Vec<u8> {
    from_peer(W2.node, IpEcn::NotEct, &conn.datagram(flags, 100))
}

/// The same segment as the host forwards it to a pod (after decapsulation): the frame
/// `bridge_egress` sees.
fn delivered(conn: &Conn, flags: u8) -> Vec<u8> {
    from_underlay(&conn.datagram(flags, 100))
}

fn to_w2() -> Conn {
    Conn::new(Proto::Tcp, (POD, 40000), (W2.pod, 8080))
}

/// The host forwards `frame` (a pod's packet) to the uplink: `uplink_egress` encapsulates
/// it and records its direction.
fn host_forwards(node: &Node, frame: &[u8]) {
    let out = node.run(UplinkEgress, frame);
    assert_eq!(out.counted[0].1, Reason::Encapsulated, "{:?}", out.counted);
}

#[test]
fn what_the_host_forwards_is_recorded_per_direction() {
    with_node(|node| {
        let conn = to_w2();
        let key = flow_key(&pod_sends(&conn, ACK));
        assert_eq!(node.flow(&key), None);
        // The host's egress: a local pod's packets to a remote pod.
        host_forwards(node, &pod_sends(&conn, SYN));
        for n in 2..=4 {
            host_forwards(node, &pod_sends(&conn, ACK | PSH));
            let state = node.flow(&key).expect("recorded");
            assert_eq!(
                (state.seen_gen, state.host_packets, state.admitted),
                (GENERATION, n, 0)
            );
        }
        // The other direction, on its way from the host to the pod.
        let reply = delivered(&conn.reversed(), ACK);
        node.expect_untouched(BridgeEgress, &reply, Reason::PassFlowRecorded);
        let back = node.flow(&flow_key(&reply)).expect("recorded");
        assert_eq!((back.seen_gen, back.host_packets), (GENERATION, 1));
    });
}

#[test]
fn a_syn_starts_afresh_and_a_fin_or_rst_closes() {
    with_node(|node| {
        let conn = to_w2();
        let key = flow_key(&pod_sends(&conn, ACK));
        node.admit(&pod_sends(&conn, ACK));
        host_forwards(node, &pod_sends(&conn, SYN));
        assert_eq!(
            node.flow(&key),
            Some(FlowState {
                seen_gen: GENERATION,
                host_packets: 1,
                ..FlowState::default()
            }),
            "a new connection on the tuple"
        );
        for close in [FIN | ACK, RST] {
            node.admit(&pod_sends(&conn, ACK));
            host_forwards(node, &pod_sends(&conn, close));
            assert_ne!(
                node.flow(&key).unwrap().flags & CLOSING,
                0,
                "flags {close:#x}"
            );
        }
    });
}

#[test]
fn the_gateways_own_traffic_and_other_destinations_are_not_recorded() {
    with_node(|node| {
        let from_host = outbound(UplinkEgress, W2.pod, Transport::Udp, 10, |ip| {
            ip.source = GATEWAY.octets()
        });
        host_forwards(node, &from_host);
        assert_eq!(node.flow(&flow_key(&from_host)), None, "the host's own");
        // Without masquerade nothing of a pod's traffic to the outside can take the fast
        // path: nothing to record.
        let to_outside = pod_sends(&client(Proto::Tcp, POD, OUTSIDE), ACK);
        node.run(UplinkEgress, &to_outside);
        assert_eq!(node.flow(&flow_key(&to_outside)), None);
        // On the bridge's egress: a local pod's own traffic, and what is not TCP or UDP.
        let local = delivered(&Conn::new(Proto::Udp, (POD, 53), (POD, 5353)), 0);
        node.expect_untouched(BridgeEgress, &local, Reason::PassNotOverlay);
        node.expect_untouched(BridgeEgress, &arp(), Reason::PassNotIpv4);
        let echo = delivered(&client(Proto::Echo, W2.pod, POD), 0);
        node.expect_untouched(BridgeEgress, &echo, Reason::PassNotOverlay);
    });
}

/// `to_w2`, admitted both ways: the connection, a segment the pod sends and one of the
/// reply through the tunnel.
fn admitted_both_ways(node: &mut Node) -> (Conn, Vec<u8>, Vec<u8>) {
    let conn = to_w2();
    let out = pod_sends(&conn, ACK | PSH);
    let back = tunnelled(&conn.reversed(), ACK);
    node.admit(&out);
    node.admit(&back);
    (conn, out, back)
}

#[test]
fn an_admitted_flow_skips_the_host_both_ways_until_the_ruleset_changes() {
    with_node(|node| {
        let (conn, out, back) = admitted_both_ways(node);
        for hook in [PodIngress, BridgeIngress] {
            node.expect(hook, &out, Act::Redirect, Reason::Encapsulated);
        }
        node.expect(
            UplinkIngress,
            &back,
            Act::Redirect,
            Reason::DecapsulatedToBridge,
        );
        // The host's rules changed: nothing skips them until the host forwarded the
        // direction again under the new ones.
        node.reconfigure(|c| c.ruleset_gen = GENERATION + 1);
        node.expect_untouched(BridgeIngress, &out, Reason::PassToHost);
        node.expect(UplinkIngress, &back, Act::Next, Reason::DecapsulatedToHost);
        host_forwards(node, &out);
        node.expect(BridgeIngress, &out, Act::Redirect, Reason::Encapsulated);
        node.expect(UplinkIngress, &back, Act::Next, Reason::DecapsulatedToHost);
        node.expect_untouched(
            BridgeEgress,
            &delivered(&conn.reversed(), ACK),
            Reason::PassFlowRecorded,
        );
        node.expect(
            UplinkIngress,
            &back,
            Act::Redirect,
            Reason::DecapsulatedToBridge,
        );
    });
}

#[test]
fn an_admitted_flow_whose_filter_bit_is_clear_goes_through_the_host() {
    // The programs look a flow up only when the agent set its slot's bit: without it,
    // as for every flow the agent never admitted, the host decides.
    with_node(|node| {
        let (_, out, back) = admitted_both_ways(node);
        node.dp.flows.keep_filter_to(&[]).unwrap();
        node.expect_untouched(BridgeIngress, &out, Reason::PassToHost);
        node.expect(UplinkIngress, &back, Act::Next, Reason::DecapsulatedToHost);
    });
}

#[test]
fn control_segments_go_through_the_host_and_a_fin_sends_the_rest_of_the_flow_there() {
    with_node(|node| {
        let conn = to_w2();
        let out = pod_sends(&conn, ACK);
        node.admit(&out);
        node.admit(&tunnelled(&conn.reversed(), ACK));
        node.expect_untouched(BridgeIngress, &pod_sends(&conn, SYN), Reason::PassToHost);
        node.expect(BridgeIngress, &out, Act::Redirect, Reason::Encapsulated);
        node.expect_untouched(
            BridgeIngress,
            &pod_sends(&conn, FIN | ACK),
            Reason::PassToHost,
        );
        for key in [flow_key(&out), flow_key(&tunnelled(&conn.reversed(), ACK))] {
            assert_ne!(
                node.flow(&key).unwrap().flags & CLOSING,
                0,
                "both directions closing"
            );
        }
        node.expect_untouched(BridgeIngress, &out, Reason::PassToHost);
        node.expect(
            UplinkIngress,
            &tunnelled(&conn.reversed(), ACK),
            Act::Next,
            Reason::DecapsulatedToHost,
        );
    });
}

#[test]
fn a_stale_admission_goes_to_the_host_which_hands_the_flow_back_to_the_agent() {
    with_node(|node| {
        let conn = to_w2();
        let out = pod_sends(&conn, ACK);
        let key = flow_key(&out);
        // Admitted when the clock has a time past the limit to set it back to.
        monotonic_ns_after(FAST_FOR_NS + 1_000_000_000);
        node.admit(&out);
        let admitted = node.flow(&key).unwrap();
        node.set_flow(
            key,
            FlowState {
                // A second more than the limit: the programs' clock is coarse.
                refreshed_ns: admitted.refreshed_ns - FAST_FOR_NS - 1_000_000_000,
                ..admitted
            },
        );
        node.expect_untouched(BridgeIngress, &out, Reason::PassToHost);
        host_forwards(node, &out);
        let demoted = node.flow(&key).unwrap();
        assert_eq!((demoted.admitted, demoted.host_packets), (0, 1));
    });
}

#[test]
fn with_the_fast_path_off_nothing_skips_the_host_and_nothing_is_recorded() {
    with_node_setup(Default::default(), no_fast_path, |node| {
        let conn = to_w2();
        let out = pod_sends(&conn, ACK);
        let back = tunnelled(&conn.reversed(), ACK);
        node.admit(&out);
        node.admit(&back);
        node.expect_untouched(BridgeIngress, &out, Reason::PassToHost);
        node.expect(UplinkIngress, &back, Act::Next, Reason::DecapsulatedToHost);
        node.expect_untouched(
            BridgeEgress,
            &delivered(&conn.reversed(), ACK),
            Reason::PassFastPathOff,
        );
        let fresh = pod_sends(&Conn::new(Proto::Udp, (POD, 5000), (W2.pod, 53)), 0);
        host_forwards(node, &fresh);
        assert_eq!(node.flow(&flow_key(&fresh)), None);
    });
}

#[test]
fn admitted_replies_of_masqueraded_flows_go_straight_to_the_pod() {
    with_masquerading_node(|node| {
        let conn = client(Proto::Tcp, POD, OUTSIDE);
        let translated = open(node, conn, SYN, NODE_IP);
        let reply = from_underlay(&translated.reversed().datagram(ACK, 100));
        // The host decides the reply until its direction is admitted, as it arrives at
        // the pod: from the outside to the pod's own address.
        node.expect(UplinkIngress, &reply, Act::Next, Reason::Unmasqueraded);
        let back = delivered(&conn.reversed(), ACK);
        node.admit(&back);
        node.expect_frame(
            UplinkIngress,
            &reply,
            Act::Redirect,
            Reason::UnmasqueradedToBridge,
            &to_pod(&back),
        );
    });
}

#[test]
fn masquerade_records_the_pods_flow_as_the_host_forwarded_it() {
    with_node_setup(Default::default(), masquerade, |node| {
        let conn = client(Proto::Udp, POD, OUTSIDE);
        let frame = pod_sends(&conn, 0);
        node.run(UplinkEgress, &frame);
        // Recorded before translation: the tuple the pod sends, which the bridge looks up.
        assert_eq!(
            node.flow(&flow_key(&frame)).map(|s| s.host_packets),
            Some(1)
        );
    });
}
