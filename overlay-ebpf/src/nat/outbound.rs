//! The masquerade fast path: a local pod's packet of a flow to the outside that the
//! connection table already translates, and that the fast path admits (`flows`), is
//! translated on the pod bridge and sent out of the uplink in place of the host's
//! router, as decapsulation sends replies straight to the pod. Every other packet goes
//! through the host, whose rules, kube-proxy's included, decide it.

use aya_ebpf::{bindings::__sk_buff, programs::TcContext};
use overlay_common::{DatapathConfig, Reason};

use crate::{
    fib::{self, Path},
    flows, ipv4,
    nat::{known_outbound, translate},
    parse::{self, ETH_LEN, Frame},
    verdict::{Packed, Verdict, drop, pack, pass, unpack},
};

/// Forwards an IPv4 packet on the bridge that is for no remote pod: translated and
/// out of the uplink when it is a plain datagram from a local pod of a known flow,
/// else to the host stack as any such packet.
#[inline(always)]
pub(crate) fn forward(ctx: &TcContext, cfg: &DatapathConfig) -> Verdict {
    unpack(forward_known(ctx.skb.skb, cfg))
}

/// [`forward`] as a BPF subprogram, like `icmp::reply_frag_needed`: its lookups' state
/// (the FIB parameters, the flow's tuple) stays off `bridge_ingress`'s frame, which
/// must fit 6.1's 512-byte limit with the ICMP subprogram's. The header is read again
/// here for the same reason.
#[inline(never)]
fn forward_known(skb: *mut __sk_buff, cfg: &DatapathConfig) -> Packed {
    pack(translate_and_send(&TcContext::new(skb), cfg))
}

#[inline(always)]
fn translate_and_send(ctx: &TcContext, cfg: &DatapathConfig) -> Verdict {
    let untouched = pass(Reason::PassNotOverlay);
    let Frame::Ipv4(ip) = parse::frame(ctx) else {
        return untouched;
    };
    let ip = &ip;
    if cfg
        .fast_path_allows(ip.src_addr, ip.vihl, ip.frags, ip.ttl)
        .is_err()
        || !parse::well_formed(ip, ctx.len() - ETH_LEN as u32)
    {
        return untouched;
    }
    let Some((l4, entry)) = known_outbound(ctx, cfg, ip) else {
        return untouched;
    };
    // Like every fast path, only for a flow the host forwarded unchanged.
    let key = l4.tuple.flow_key();
    if !flows::admitted(cfg, &key, l4.tcp_flags) {
        return pass(Reason::PassToHost);
    }
    // Routed as the host would route it (from the bridge, with the pod's address);
    // the packet is left as it is unless it can leave at once: a neighbour to resolve,
    // a route MTU to report or a local destination are the host's business.
    // SAFETY: `ctx.skb.skb` is the `__sk_buff` the kernel passed this run, readable while
    // it lasts.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let tot_len = parse::wire_len(ctx, ip);
    let Path::Resolved {
        ifindex: out,
        smac,
        dmac,
    } = fib::lookup(ctx, ifindex, ip.src_addr, ip.dst_addr, tot_len)
    else {
        return untouched;
    };
    match translate(ctx, cfg, ip, &l4, entry) {
        Ok(true) => {}
        Ok(false) => return untouched,
        Err(reason) => return drop(reason),
    }
    if !fib::set_macs(ctx, smac, dmac) || !ipv4::decrement_ttl(ctx) {
        return drop(Reason::DropHelperError);
    }
    (Reason::MasqueradedToUplink, fib::out(out, None))
}
