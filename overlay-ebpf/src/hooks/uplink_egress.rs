//! `uplink_egress`: attached to the uplink's egress (the node's interface to the other
//! nodes), so it sees everything the host stack routes out of it.
//!
//! What the host routes to a remote pod subnet (every flow the fast path does not take,
//! the host's own traffic to pods, Service traffic kube-proxy sent there) is
//! encapsulated on its way out: this hook is flannel's ipip device. Before that,
//! masquerade translates what flanneld's `--ip-masq` rules translate (`nat`), and a
//! local pod's packet the host forwarded unchanged is recorded for the fast path
//! (`flows`).
//!
//! The host stack has already routed the packet, so TTL, options and fragments were its
//! business; packets for no remote pod and not translated leave as the host sent them.

use aya_ebpf::{bindings::__sk_buff, macros::classifier, programs::TcContext};
use overlay_common::{Hook, Reason};

use crate::{
    counters::run,
    encap,
    fib::Path,
    flows,
    maps::config,
    nat,
    parse::{self, IPPROTO_IPIP},
    verdict::{Packed, Verdict, drop, pack, pass, unpack},
};

#[classifier]
fn uplink_egress(ctx: TcContext) -> i32 {
    run(&ctx, Hook::UplinkEgress, |ctx| {
        unpack(host_subprogram(ctx.skb.skb))
    })
}

/// `host` as a BPF subprogram: masquerade and encapsulation together need a large
/// frame, and before 6.4 the verifier adds the program's frame to those of aya-log's
/// `log_drop` and the copy it calls, each rounded up to 32 bytes, against 512. With
/// the work in a subprogram the program's own frame (accounting, logging) is small.
#[inline(never)]
fn host_subprogram(skb: *mut __sk_buff) -> Packed {
    pack(host(&TcContext::new(skb)))
}

fn host(ctx: &TcContext) -> Verdict {
    let Some(cfg) = config() else {
        return pass(Reason::PassNotConfigured);
    };
    let ip = match parse::ipv4(ctx) {
        Ok(ip) => ip,
        Err(verdict) => return verdict,
    };
    // What `bridge_ingress` or `pod_ingress` encapsulated and redirected here (a
    // redirect to a device's egress goes through its queueing, where this hook sits,
    // with TCX as with cls_bpf): nothing more to do, neither masquerade nor a route
    // lookup.
    if ip.proto == IPPROTO_IPIP && ip.src_addr == cfg.node_ip && !cfg.in_cluster(ip.dst_addr) {
        return pass(Reason::PassTunnelled);
    }
    flows::record_forwarded(ctx, cfg, &ip);
    // Masquerade first: a translated packet may still be bound for a remote pod (rule 6).
    // Translation changes only the source (and checksums) of the header: `ip` still
    // holds all that encapsulation reads.
    let masqueraded = match nat::egress(ctx, cfg, &ip) {
        Ok(translated) => translated,
        Err(reason) => return drop(reason),
    };
    // `ip` is the header as it came (the source before translation): a masqueraded
    // packet is no pod's any more.
    let (ip, peer) = match encap::overlay_packet(ctx, cfg, ip, !masqueraded) {
        Ok(found) => found,
        // Translated for the outside: it leaves unencapsulated.
        Err(_) if masqueraded => return pass(Reason::Masqueraded),
        Err(verdict) => return verdict,
    };
    let path = match encap::peer_path(ctx, cfg, &ip, peer) {
        // The agent's routes carry MTU = uplink - 20, so the stack should never hand us
        // this; no ICMP can be addressed to a local sender from here.
        Path::FragNeeded { .. } => return drop(Reason::DropTooBig),
        Path::Local | Path::NoRoute => return drop(Reason::DropNoRouteToPeer),
        path => path,
    };
    encap::push_outer(
        ctx,
        cfg,
        &ip,
        ip.ttl,
        peer,
        path,
        Some(encap::ctx_ifindex(ctx)),
    )
}
