//! `bridge_egress`: attached to the pod bridge's egress, so it sees what the host stack
//! sends to local pods through the bridge.
//!
//! It only records: a packet the host forwarded to a local pod from elsewhere (a remote
//! pod after decapsulation, or the outside for a masqueraded flow's reply after
//! translation) marks its flow's direction as forwarded unchanged under the current
//! ruleset, which the fast path needs before the agent may admit the flow (`flows`).
//! Every packet goes on unchanged: delivering it is the bridge's business.

use aya_ebpf::{macros::classifier, programs::TcContext};
use overlay_common::{Hook, Reason};

use crate::{
    counters::run,
    encap, flows,
    maps::config,
    parse::{self, ETH_LEN, Frame},
    verdict::{Verdict, pass},
};

#[classifier]
fn bridge_egress(ctx: TcContext) -> i32 {
    run(&ctx, Hook::BridgeEgress, record_delivered)
}

fn record_delivered(ctx: &TcContext) -> Verdict {
    let Some(cfg) = config() else {
        return pass(Reason::PassNotConfigured);
    };
    if !cfg.fast_path() {
        return pass(Reason::PassFastPathOff);
    }
    let ip = match parse::frame(ctx) {
        Frame::Ipv4(ip) => ip,
        Frame::Other | Frame::Truncated => return pass(Reason::PassNotIpv4),
    };
    if !cfg.fast_path_inbound(ip.src_addr, ip.dst_addr) {
        return pass(Reason::PassNotOverlay);
    }
    // A directly routed node's pods send plainly: no flow of theirs is ever
    // decapsulated, which is where the fast path would take it.
    if cfg.in_cluster(ip.src_addr) && encap::direct(ip.src_addr) {
        return pass(Reason::PassDirectRoute);
    }
    match flows::key(ctx, &ip, ETH_LEN) {
        Some((key, flags)) => {
            flows::record(cfg, &key, flags);
            pass(Reason::PassFlowRecorded)
        }
        None => pass(Reason::PassNotOverlay),
    }
}
