//! `pod_ingress`: attached to the ingress of a local pod's veth (its host end), before
//! the bridge; the agent attaches it to the veths no one else filters.
//!
//! It does `bridge_ingress`'s work one hop earlier, for the frames the pod sends to its
//! gateway (the bridge's own MAC address): the fast path's packets leave for the uplink
//! without crossing the bridge. The bridge then sees only what this program leaves to
//! it, and its own hook treats that as it would have.
//!
//! A frame for another pod of this node is the bridge's to deliver (the pod may route it
//! on), and everything `bridge_ingress` leaves to the host stack is left to it here too,
//! for the same reasons.

use aya_ebpf::{macros::classifier, programs::TcContext};
use overlay_common::{Hook, Reason};

use super::bridge_ingress::from_local_pod;
use crate::{
    counters::run,
    maps::config,
    parse::ptr_at,
    verdict::{Verdict, pass},
};

#[classifier]
fn pod_ingress(ctx: TcContext) -> i32 {
    run(&ctx, Hook::PodIngress, pod)
}

fn pod(ctx: &TcContext) -> Verdict {
    let Some(cfg) = config() else {
        return pass(Reason::PassNotConfigured);
    };
    // Only what the pod sends to its gateway, as the bridge would hand it to the
    // bridge's own hook; a frame for another pod of this node (which may route it on)
    // is the bridge's to deliver.
    match ptr_at::<[u8; 6]>(ctx, 0) {
        // SAFETY: `ptr_at` checked that the destination MAC address lies within the
        // linear data; a byte array has alignment 1.
        Some(dst) if cfg.bridge_mac != [0; 6] && unsafe { *dst } == cfg.bridge_mac => {
            from_local_pod(ctx, cfg)
        }
        _ => pass(Reason::PassNotForGateway),
    }
}
