//! `bridge_ingress`: attached to the pod bridge's ingress (flannel's `cni0`), so it sees
//! every frame a local pod sends through the bridge (the ones `pod_ingress` left to it).
//!
//! A packet of a flow the fast path admits, to a remote pod subnet, is encapsulated here
//! and sent straight out of the uplink, in place of the host's router: its TTL drops by
//! one, and one too big for the tunnel gets the ICMP "fragmentation needed" a router
//! sends. A packet to the outside of a flow the masquerade table already translates
//! takes the same shortcut, translated (`nat::outbound`).
//!
//! Everything else is left to the host stack: a flow's first packets, packets of
//! flows the host has not been seen forwarding unchanged, packets with IP options,
//! fragments, expiring TTLs, foreign sources. kube-proxy, policy engines, firewalls and
//! the host's connection tracking see those as they would without us, and
//! `uplink_egress` encapsulates what the host routes to the overlay.

use aya_ebpf::{macros::classifier, programs::TcContext};
use overlay_common::{DatapathConfig, Hook, Reason};

use crate::{
    counters::run,
    encap,
    fib::Path,
    flows, icmp, ipv4,
    maps::config,
    nat,
    parse::{self, IPV4_LEN},
    verdict::{Verdict, drop, pass},
};

#[classifier]
fn bridge_ingress(ctx: TcContext) -> i32 {
    run(&ctx, Hook::BridgeIngress, bridge)
}

fn bridge(ctx: &TcContext) -> Verdict {
    let Some(cfg) = config() else {
        return pass(Reason::PassNotConfigured);
    };
    from_local_pod(ctx, cfg)
}

/// A frame from a local pod to its gateway, at the bridge or before it (`pod_ingress`).
#[inline(always)]
pub(super) fn from_local_pod(ctx: &TcContext, cfg: &DatapathConfig) -> Verdict {
    // Node addresses are left out here: a pod's packet for a node's own address may
    // belong to a flow this node masquerades, which `uplink_egress` translates first.
    let (ip, peer) =
        match parse::ipv4(ctx).and_then(|ip| encap::overlay_packet(ctx, cfg, ip, false)) {
            Ok(found) => found,
            // Perhaps a packet of a masqueraded flow to the outside.
            Err((Reason::PassNotOverlay, _)) => return nat::outbound::forward(ctx, cfg),
            Err(verdict) => return verdict,
        };
    if let Err(reason) = cfg.fast_path_allows(ip.src_addr, ip.vihl, ip.frags, ip.ttl) {
        return pass(reason);
    }
    // A flow the host has not been seen forwarding unchanged is the host's to decide.
    if !flows::admits(ctx, cfg, &ip) {
        return pass(Reason::PassToHost);
    }
    let path = match encap::peer_path(ctx, cfg, &ip, peer) {
        Path::FragNeeded { mtu } if parse::dont_fragment(&ip) => {
            return icmp::frag_needed(ctx, cfg, &ip, mtu.saturating_sub(IPV4_LEN as u16));
        }
        Path::FragNeeded { .. } => return pass(Reason::PassFragmentationNeeded),
        Path::Local | Path::NoRoute => return drop(Reason::DropNoRouteToPeer),
        path => path,
    };
    // We forward in place of the host's router: the inner TTL drops by one, and the
    // outer header inherits it.
    if !ipv4::decrement_ttl(ctx) {
        return drop(Reason::DropHelperError);
    }
    encap::push_outer(ctx, cfg, &ip, ip.ttl - 1, peer, path, None)
}
