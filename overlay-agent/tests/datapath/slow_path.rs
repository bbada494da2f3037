//! `bridge_ingress` leaves what the fast path does not take to the host stack,
//! untouched: the stack sends time-exceeded, or routes the packet to the uplink where
//! `uplink_egress` encapsulates it.

use overlay_common::{Hook::BridgeIngress, Reason};

use super::{
    fixture::with_node,
    packet::{HeaderChange, Transport, add_router_alert, first_fragment, last_fragment, outbound},
    topology::W2,
};

/// Header changes that take a packet off the fast path, with the verdict each gets.
pub(super) fn slow_path_headers() -> [(&'static str, HeaderChange, Reason); 5] {
    [
        ("ttl 1", |ip| ip.time_to_live = 1, Reason::PassTtlExpired),
        ("ttl 0", |ip| ip.time_to_live = 0, Reason::PassTtlExpired),
        ("ip options", add_router_alert, Reason::PassIpOptions),
        ("first fragment", first_fragment, Reason::PassFragment),
        ("last fragment", last_fragment, Reason::PassFragment),
    ]
}

#[test]
fn ttl_expiry_options_and_fragments_pass_untouched() {
    with_node(|node| {
        for (what, change, reason) in slow_path_headers() {
            eprintln!("case: {what}");
            let frame = outbound(BridgeIngress, W2.pod, Transport::Udp, 100, change);
            node.expect_untouched(BridgeIngress, &frame, reason);
        }
    });
}
