//! ICMP fragmentation-needed: a pod's DF packet of an admitted flow, too big for the
//! uplink once encapsulated, is answered by its gateway, so the pod lowers its path
//! MTU (the host's route MTU does the same for the flows it forwards).

use overlay_common::{Hook::BridgeIngress, Reason};

use super::{
    expect::{self, frag_needed},
    fixture::{Act, Node, with_node},
    packet::{ETH_LEN, HeaderChange, IPV4_LEN, Transport, filling, outbound},
    topology::{Remote, W2, W3},
};

/// A pod's DF datagram to a pod of `remote` whose encapsulation is one byte too big for
/// the route to `remote`; `change` adjusts its header.
fn one_byte_too_big(remote: &Remote, transport: Transport, change: HeaderChange) -> Vec<u8> {
    outbound(
        BridgeIngress,
        remote.pod,
        transport,
        filling(remote.mtu, transport) + 1,
        change,
    )
}

/// The reply must be the spec's, byte for byte: 126 bytes, announcing the route's MTU
/// minus the outer header.
fn assert_frag_needed(node: &mut Node, frame: &[u8], remote: &Remote) {
    let expected = frag_needed(frame, remote.mtu - IPV4_LEN as u16);
    assert_eq!(expected.len(), 126, "the spec's reply size");
    node.admit(frame);
    node.expect_frame(
        BridgeIngress,
        frame,
        Act::Redirect,
        Reason::FragNeededSent,
        &expected,
    );
}

#[test]
fn reply_to_a_packet_for_a_direct_peer() {
    with_node(|node| {
        for transport in [Transport::Tcp, Transport::Udp] {
            assert_frag_needed(node, &one_byte_too_big(&W2, transport, |_| {}), &W2);
        }
    });
}

#[test]
fn reply_announces_the_route_mtu_not_the_devices() {
    // w3's route has a locked MTU of 1400 on a 1500-byte uplink.
    with_node(|node| assert_frag_needed(node, &one_byte_too_big(&W3, Transport::Tcp, |_| {}), &W3));
}

#[test]
fn reply_quotes_the_packet_as_sent() {
    // ECN, DSCP and the original TTL appear in the quote: the ICMP error is about the
    // packet the pod sent, before this hop touched it.
    with_node(|node| {
        let frame = one_byte_too_big(&W2, Transport::Udp, |ip| {
            ip.ecn = etherparse::IpEcn::Ect0;
            ip.time_to_live = 9;
        });
        assert_frag_needed(node, &frame, &W2);
        // Independently of how the expected reply was built: the quote is the start of
        // the original datagram.
        let out = node.run(BridgeIngress, &frame).data;
        let quote = ETH_LEN + IPV4_LEN + 8;
        assert_eq!(
            &out[quote..],
            &frame[ETH_LEN..ETH_LEN + IPV4_LEN + expect::QUOTE_LEN]
        );
    });
}
