//! Size decisions on the fast path (flows admitted): what fits the uplink once
//! encapsulated is sent; what does not is answered with ICMP (DF, see `icmp`), left to
//! the stack to fragment (no DF), or dropped (host traffic). For GSO packets the size
//! that counts is that of one segment on the wire.

use overlay_common::{
    Hook::{self, BridgeIngress, UplinkEgress},
    Reason,
};

use super::{
    expect::{encapsulated, frag_needed, towards},
    fixture::{Act, Node, Outcome, SkBuff, assert_bytes_eq, check_verdict, with_node},
    packet::{IPV4_LEN, Transport, filling, outbound},
    topology::{Remote, W2, W3},
};

/// A TCP datagram from `hook`'s sender to a pod of `remote`, `extra` bytes bigger than
/// what fits the route to `remote` once encapsulated.
fn sized(hook: Hook, remote: &Remote, extra: usize, df: bool) -> Vec<u8> {
    let payload = filling(remote.mtu, Transport::Tcp) + extra;
    outbound(hook, remote.pod, Transport::Tcp, payload, |ip| {
        ip.dont_fragment = df
    })
}

#[test]
fn largest_fitting_packet_is_encapsulated() {
    with_node(|node| {
        for remote in [W2, W3] {
            let frame = sized(BridgeIngress, &remote, 0, true);
            node.admit(&frame);
            let expected = encapsulated(&frame, &remote, 1, towards(&remote));
            node.expect_frame(
                BridgeIngress,
                &frame,
                Act::Redirect,
                Reason::Encapsulated,
                &expected,
            );
        }
    });
}

#[test]
fn too_big_without_df_is_left_to_the_stack_to_fragment() {
    with_node(|node| {
        for remote in [W2, W3] {
            let frame = sized(BridgeIngress, &remote, 1, false);
            node.admit(&frame);
            node.expect_untouched(BridgeIngress, &frame, Reason::PassFragmentationNeeded);
        }
    });
}

#[test]
fn too_big_host_traffic_is_dropped() {
    with_node(|node| {
        for df in [true, false] {
            node.expect(
                UplinkEgress,
                &sized(UplinkEgress, &W2, 1, df),
                Act::Shot,
                Reason::DropTooBig,
            );
        }
    });
}

/// The largest `gso_size` whose segments, encapsulated, fit w2's route: one segment is
/// the IP header, the transport header and `gso_size` bytes of payload.
fn largest_gso_size(transport: Transport) -> u32 {
    filling(W2.mtu, transport) as u32
}

/// Runs a GSO packet as a sender's stack hands it over (3000 bytes of payload in one
/// skb, to be cut into `gso_size`-byte segments) through `hook`, and checks the verdict.
/// Returns the frame sent and what became of it.
fn run_gso(
    node: &mut Node,
    hook: Hook,
    transport: Transport,
    df: bool,
    gso_size: u32,
    verdict: (Act, Reason),
) -> (Vec<u8>, Outcome) {
    let frame = outbound(hook, W2.pod, transport, 3000, |ip| ip.dont_fragment = df);
    node.admit(&frame);
    let ctx = SkBuff {
        ifindex: node.device(hook),
        gso_size,
        gso_segs: 3,
        ..Default::default()
    };
    let out = node.run_with(hook, &frame, ctx);
    check_verdict(hook, &frame, &out, verdict.0, verdict.1);
    (frame, out)
}

/// The transports whose header length the segment size must include: a TCP header with
/// options (32 bytes) and a UDP header.
const GSO_TRANSPORTS: [Transport; 2] = [Transport::TcpTimestamps, Transport::Udp];

#[test]
fn gso_segment_one_byte_too_big_is_answered() {
    with_node(|node| {
        for transport in GSO_TRANSPORTS {
            let verdict = (Act::Redirect, Reason::FragNeededSent);
            let (frame, out) = run_gso(
                node,
                BridgeIngress,
                transport,
                true,
                largest_gso_size(transport) + 1,
                verdict,
            );
            assert_bytes_eq(
                &out.data,
                &frag_needed(&frame, W2.mtu - IPV4_LEN as u16),
                "reply",
            );
            // The reply is one small packet: no segmentation state may survive.
            assert_eq!(out.ctx.gso_segs, 0, "GSO state of the reply");
        }
    });
}

#[test]
fn gso_segment_one_byte_too_big_without_df_is_left_to_the_stack() {
    with_node(|node| {
        for transport in GSO_TRANSPORTS {
            let verdict = (Act::Next, Reason::PassFragmentationNeeded);
            let (frame, out) = run_gso(
                node,
                BridgeIngress,
                transport,
                false,
                largest_gso_size(transport) + 1,
                verdict,
            );
            assert_bytes_eq(&out.data, &frame, "untouched");
        }
    });
}

#[test]
fn gso_segment_one_byte_too_big_from_the_host_is_dropped() {
    with_node(|node| {
        for transport in GSO_TRANSPORTS {
            let verdict = (Act::Shot, Reason::DropTooBig);
            run_gso(
                node,
                UplinkEgress,
                transport,
                false,
                largest_gso_size(transport) + 1,
                verdict,
            );
        }
    });
}

#[test]
fn gso_segments_that_fit_pass_the_size_check() {
    // The skb (3000+ bytes) is far bigger than the uplink's MTU, but its segments fit, so
    // the program must go on to encapsulate it. BPF_PROG_TEST_RUN cannot set the skb's
    // gso_type (the context has no such field), and bpf_skb_adjust_room refuses a GSO
    // skb without a TCP or UDP-L4 type (-ENOTSUPP): here that ends in DropHelperError.
    // That verdict can only come after the size check passed; a size check on the whole
    // skb would have answered FragNeededSent or PassFragmentationNeeded instead.
    with_node(|node| {
        for transport in GSO_TRANSPORTS {
            for df in [true, false] {
                let verdict = (Act::Shot, Reason::DropHelperError);
                run_gso(
                    node,
                    BridgeIngress,
                    transport,
                    df,
                    largest_gso_size(transport),
                    verdict,
                );
            }
        }
    });
}
