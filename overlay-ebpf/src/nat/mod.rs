//! Masquerade with flanneld's `--ip-masq` semantics, rule by rule (see README):
//!
//! 1. packets kube-proxy marked for masquerade (0x4000) are left to kube-proxy;
//! 2. local pod -> any pod, 3. any pod -> local pod, 4. outside/host -> local pod: kept;
//! 5. pod -> outside the cluster network (not multicast): source becomes the uplink's
//!    address;
//! 6. host/outside -> a remote pod: source becomes this node's pod gateway, so that
//!    replies come back through the overlay (the uplink's address for a node
//!    DirectRouting reaches plainly, as MASQUERADE there gives it); not from the
//!    uplink's own address, which the host chose (a socket bound to it, or its own
//!    masquerade: see `masquerade_rule`).
//!
//! Translation happens on the uplink's egress, the reverse on its ingress (after
//! decapsulation for rule 6), with our own connection table; packets of flows the
//! table knows are translated on the pod bridge already (`outbound`).

pub(crate) mod icmp_error;
pub(crate) mod outbound;
pub(crate) mod rewrite;
pub(crate) mod timewait;
pub(crate) mod tuple;

use aya_ebpf::programs::TcContext;
use network_types::ip::Ipv4Hdr;
use overlay_common::{
    DatapathConfig, Reason,
    config::KUBE_PROXY_MASQ_MARK,
    conntrack::{CtEntry, Rule},
    counters::NatEvent,
};

use self::{
    rewrite::End,
    tuple::{Kind, L4},
};
use crate::{
    conntrack::{self, CreateError},
    counters::nat_event,
    encap,
    parse::{self, ETH_LEN, tcp},
};

#[inline(always)]
fn mark(ctx: &TcContext) -> u32 {
    // SAFETY: `ctx.skb.skb` is the `__sk_buff` the kernel passed this run, readable while
    // it lasts.
    unsafe { (*ctx.skb.skb).mark }
}

/// Egress: translates the source of the packet (IPv4 header `ip` at `ETH_LEN`) when a
/// rule says so. Returns whether it did; an error is the reason to drop it.
#[inline(always)]
pub(crate) fn egress(ctx: &TcContext, cfg: &DatapathConfig, ip: &Ipv4Hdr) -> Result<bool, Reason> {
    if !cfg.masquerade() || mark(ctx) & KUBE_PROXY_MASQ_MARK != 0 {
        return Ok(false);
    }
    let Some((rule, nat_ip)) =
        cfg.masquerade_rule(ip.src_addr, ip.dst_addr, || encap::direct(ip.dst_addr))
    else {
        return Ok(false);
    };
    if !parse::well_formed(ip, ctx.len() - ETH_LEN as u32) {
        return Err(Reason::DropMalformed);
    }
    if parse::is_fragment(ip) {
        return Err(Reason::DropNatFragment);
    }
    let l4 = tuple::parse(ctx, ip, ETH_LEN, false)?;
    if l4.kind == Kind::IcmpError {
        return icmp_error::translate(ctx, ETH_LEN, &l4, End::Source);
    }
    let t = l4.tuple;
    let entry = match conntrack::original(&t) {
        Some(entry) => entry,
        None => {
            // A reply of a flow that started on the outside is never translated.
            if let Some(entry) = conntrack::original(&t.reversed()) {
                conntrack::touch(cfg, entry, t.proto, l4.tcp_flags, true);
                return Ok(false);
            }
            if !l4.opens_flow() {
                return Ok(false);
            }
            let syn = timewait::syn(ctx, ip, &l4);
            let entry = conntrack::create(cfg, &t, nat_ip, rule as u8, syn.as_ref()).map_err(
                |e| match e {
                    CreateError::TableFull => Reason::DropNatTableFull,
                    CreateError::PortsExhausted => Reason::DropNatPortsExhausted,
                },
            )?;
            nat_event(NatEvent::FlowCreated);
            entry
        }
    };
    translate(ctx, cfg, ip, &l4, entry)
}

/// The transport view and the table entry of a local pod's packet (IPv4 header `ip` at
/// `ETH_LEN`, well-formed, not a fragment) to the outside, when the table already
/// translates its flow (rule 5). Only such packets may skip the host: a flow's first
/// packet must pass through it, where kube-proxy may change its destination before
/// the uplink's egress creates the flow. SYNs (which may reopen a closed flow or start
/// one on a port the outside holds in TIME_WAIT) and ICMP errors take that path too.
#[inline(always)]
pub(crate) fn known_outbound(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    ip: &Ipv4Hdr,
) -> Option<(L4, *mut CtEntry)> {
    // Whether the destination is routed directly matters to rule 6 only.
    if !cfg.masquerade()
        || !matches!(
            cfg.masquerade_rule(ip.src_addr, ip.dst_addr, || false),
            Some((Rule::PodToOutside, _))
        )
    {
        return None;
    }
    let l4 = tuple::parse(ctx, ip, ETH_LEN, false).ok()?;
    if l4.kind == Kind::IcmpError || l4.tcp_flags & tcp::SYN != 0 {
        return None;
    }
    let entry = conntrack::original(&l4.tuple)?;
    // SAFETY: a CONNTRACK value the lookup returned, valid and aligned while the program
    // runs.
    (unsafe { (*entry).rule } == Rule::PodToOutside as u8).then_some((l4, entry))
}

/// Tracks a packet of `entry`'s flow in its original direction and translates its
/// source as the entry says; false for a flow kept untranslated.
#[inline(always)]
pub(crate) fn translate(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    ip: &Ipv4Hdr,
    l4: &L4,
    entry: *mut CtEntry,
) -> Result<bool, Reason> {
    let t = l4.tuple;
    let refreshed = conntrack::touch(cfg, entry, t.proto, l4.tcp_flags, false);
    // SAFETY: `entry` is a CONNTRACK value a lookup of this run returned, valid and
    // aligned while the program runs; copied once `touch` has written it.
    let e = unsafe { *entry };
    if e.rule == Rule::Untranslated as u8 {
        return Ok(false);
    }
    // A SYN sent again, or a flow's periodic refresh: see `restore_reply`.
    if refreshed || l4.tcp_flags & (tcp::SYN | tcp::ACK) == tcp::SYN {
        conntrack::restore_reply(&t, &e);
    }
    timewait::record_fin(ctx, ip, l4, entry);
    rewrite::rewrite(ctx, l4, End::Source, (t.src, t.sport), (e.addr, e.port))?;
    Ok(true)
}

/// Ingress: translates the destination of a reply (IPv4 header `ip` at `ETH_LEN`,
/// decapsulated already if it came through the tunnel) back to the flow's original
/// source, and tracks flows from the outside to local pods so that their replies stay
/// untranslated. Returns whether it translated. Anything it cannot parse is left alone:
/// it is ordinary host traffic.
#[inline(always)]
pub(crate) fn ingress(ctx: &TcContext, cfg: &DatapathConfig, ip: &Ipv4Hdr) -> Result<bool, Reason> {
    if !cfg.masquerade() {
        return Ok(false);
    }
    let to_nat = ip.dst_addr == cfg.masq_ip || ip.dst_addr == cfg.gateway();
    let from_outside_to_pod = cfg.in_pod_subnet(ip.dst_addr) && !cfg.in_cluster(ip.src_addr);
    if !(to_nat || from_outside_to_pod)
        || !parse::well_formed(ip, ctx.len() - ETH_LEN as u32)
        || parse::is_fragment(ip)
    {
        return Ok(false);
    }
    let Ok(l4) = tuple::parse(ctx, ip, ETH_LEN, false) else {
        return Ok(false);
    };
    if l4.kind == Kind::IcmpError {
        return icmp_error::translate(ctx, ETH_LEN, &l4, End::Destination);
    }
    let t = l4.tuple;
    if let Some((rev, entry)) = conntrack::reply(&t) {
        conntrack::touch(cfg, entry, t.proto, l4.tcp_flags, true);
        rewrite::rewrite(
            ctx,
            &l4,
            End::Destination,
            (t.dst, t.dport),
            (rev.addr, rev.port),
        )?;
        return Ok(true);
    }
    if from_outside_to_pod {
        let entry = match conntrack::original(&t) {
            Some(entry) => entry,
            // A full table only costs the untranslated flow its protection.
            None => match conntrack::track_untranslated(cfg, &t) {
                Ok(entry) => entry,
                Err(_) => return Ok(false),
            },
        };
        conntrack::touch(cfg, entry, t.proto, l4.tcp_flags, false);
    }
    Ok(false)
}
