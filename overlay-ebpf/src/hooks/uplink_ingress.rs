//! `uplink_ingress`: attached to the uplink's ingress, so it sees everything the other
//! nodes and the outside send to this node, before the host stack does.
//!
//! IPIP from a known node, for a pod of this node, is checked and decapsulated: this
//! hook is flannel's ipip device receiving. A packet of a flow the fast path admits then
//! goes straight to the pod, in place of the host's router; so does the reply to a flow
//! masqueraded for a local pod, once translated back (`nat`).
//!
//! Everything else goes to the host stack, which decides it as it would without us:
//! traffic that is not our tunnel, decapsulated packets of flows the host has not been
//! seen forwarding unchanged (its netfilter and connection tracking, kube-proxy's
//! reverse DNAT included), packets for this node's own address, and what cannot be
//! forwarded here (an expiring TTL, an unresolved neighbour).

use aya_ebpf::{macros::classifier, programs::TcContext};
use overlay_common::{
    DatapathConfig, Hook, Reason,
    ip::{ECN_CE, ECN_MASK},
};

use crate::{
    counters::{peer_received, run},
    decap, ipv4,
    maps::config,
    nat,
    parse::{self, Frame, IPPROTO_IPIP},
    verdict::{Verdict, drop, pass},
};

#[classifier]
fn uplink_ingress(ctx: TcContext) -> i32 {
    run(&ctx, Hook::UplinkIngress, uplink)
}

fn uplink(ctx: &TcContext) -> Verdict {
    let Some(cfg) = config() else {
        return pass(Reason::PassNotConfigured);
    };
    // Matched in place: through `parse::ipv4`, as the other hooks read it, this program
    // compiles to more instructions.
    let outer = match parse::frame(ctx) {
        Frame::Ipv4(ip) => ip,
        Frame::Other => return pass(Reason::PassNotIpv4),
        Frame::Truncated => return drop(Reason::DropMalformed),
    };
    if outer.proto != IPPROTO_IPIP || outer.dst_addr != cfg.node_ip {
        // Not our tunnel; it may be the reply to a masqueraded flow.
        return match nat::ingress(ctx, cfg, &outer) {
            Ok(true) => unmasqueraded(ctx, cfg),
            Ok(false) => pass(Reason::PassNotTunnel),
            Err(reason) => drop(reason),
        };
    }
    let (inner, peer) = match decap::tunnel_payload(ctx, cfg, &outer) {
        Ok(found) => found,
        Err(verdict) => return verdict,
    };
    // Congestion marked on the outside is carried inside (RFC 6040); a packet whose
    // sender does not speak ECN cannot carry the mark and is dropped, as the kernel does.
    let outer_ce = outer.tos & ECN_MASK == ECN_CE;
    if outer_ce && inner.tos & ECN_MASK == 0 {
        return drop(Reason::DropCeOnNotEct);
    }
    peer_received(peer, ctx.len());
    if !decap::pop_outer(ctx) {
        return drop(Reason::DropHelperError);
    }
    if outer_ce && !ipv4::set_ce(ctx) {
        return drop(Reason::DropHelperError);
    }
    // Replies to flows masqueraded under rule 6 come back through the tunnel to our
    // pod gateway address.
    match nat::ingress(ctx, cfg, &inner) {
        Ok(true) => return unmasqueraded(ctx, cfg),
        Ok(false) => {}
        Err(reason) => return drop(reason),
    }
    if inner.dst_addr == cfg.node_ip {
        return pass(Reason::DecapsulatedToNode);
    }
    decap::forward_to_pod(
        ctx,
        cfg,
        &inner,
        [Reason::Decapsulated, Reason::DecapsulatedToBridge],
        Reason::DecapsulatedToStack,
        Reason::DecapsulatedToHost,
    )
}

/// A reply translated back to its flow's original source: straight to it when that
/// is a pod of this node (rule 5), as a decapsulated packet goes; to the stack
/// otherwise (the host or the outside, rule 6).
#[inline(always)]
fn unmasqueraded(ctx: &TcContext, cfg: &DatapathConfig) -> Verdict {
    match parse::frame(ctx) {
        Frame::Ipv4(ip) if cfg.in_pod_subnet(ip.dst_addr) => decap::forward_to_pod(
            ctx,
            cfg,
            &ip,
            [Reason::UnmasqueradedToPod, Reason::UnmasqueradedToBridge],
            Reason::Unmasqueraded,
            Reason::Unmasqueraded,
        ),
        _ => pass(Reason::Unmasqueraded),
    }
}
