//! The fast path's admission, and the record of what the host forwarded (see
//! `overlay_common::flows` for the rule they implement together with the agent).

use aya_ebpf::{
    bindings::{__sk_buff, BPF_ANY},
    helpers::bpf_ktime_get_coarse_ns,
    programs::TcContext,
};
use network_types::ip::Ipv4Hdr;
use overlay_common::{
    DatapathConfig,
    flows::{CLOSING, FlowKey, FlowState, TCP_CLOSE, filter_bit},
};

use crate::{
    encap,
    maps::{FLOW_FILTER, FLOWS},
    parse::{self, ETH_LEN, IPPROTO_TCP, IPPROTO_UDP, ensure_linear, is_fragment, ptr_at},
};

const NS_PER_SEC: u64 = 1_000_000_000;
/// A SYN without ACK: a new connection on the tuple.
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// The flow key and TCP flags (0 for UDP) of an unfragmented TCP or UDP packet whose
/// IPv4 header `ip` is at `l3`; None for anything else, which never takes the fast
/// path.
#[inline(always)]
pub(crate) fn key(ctx: &TcContext, ip: &Ipv4Hdr, l3: usize) -> Option<(FlowKey, u8)> {
    if !(ip.proto == IPPROTO_TCP || ip.proto == IPPROTO_UDP) || is_fragment(ip) {
        return None;
    }
    let l4 = l3 + ip.ihl() as usize;
    // The ports, and for TCP the flags at byte 13 of its header.
    let (ports, flags) = if ip.proto == IPPROTO_TCP {
        if !ensure_linear(ctx, l4 + 14) {
            return None;
        }
        // SAFETY: `ptr_at` checked that the bytes lie within the linear data, which
        // `ensure_linear` made them; a byte array has alignment 1.
        let head = unsafe { *ptr_at::<[u8; 14]>(ctx, l4)? };
        ([head[0], head[1], head[2], head[3]], head[13])
    } else {
        if !ensure_linear(ctx, l4 + 4) {
            return None;
        }
        // SAFETY: as above.
        (unsafe { *ptr_at::<[u8; 4]>(ctx, l4)? }, 0)
    };
    let key = FlowKey {
        src: ip.src_addr,
        dst: ip.dst_addr,
        sport: [ports[0], ports[1]],
        dport: [ports[2], ports[3]],
        proto: ip.proto,
        _pad: [0; 3],
    };
    Some((key, flags))
}

/// Whether the fast path may take the packet whose IPv4 header `ip` starts the frame's
/// network layer. Most packets checked here belong to flows the host decides: for an
/// address pair with no admitted direction, the filter answers from the header alone.
#[inline(always)]
pub(crate) fn admits(ctx: &TcContext, cfg: &DatapathConfig, ip: &Ipv4Hdr) -> bool {
    cfg.fast_path()
        && may_be_admitted(ip.src_addr, ip.dst_addr)
        && admits_subprogram(ctx.skb.skb, cfg)
}

/// Whether the agent may have admitted a direction from `src` to `dst`
/// (`FLOW_FILTER`); false means it certainly did not.
#[inline(always)]
fn may_be_admitted(src: [u8; 4], dst: [u8; 4]) -> bool {
    let (word, mask) = filter_bit(src, dst);
    FLOW_FILTER.get(word).is_some_and(|bits| bits & mask != 0)
}

/// The lookup of [`admits`] as a BPF subprogram: its key, the copy of the entry and of
/// the header it reads again stay off the calling program's frame, which with the ICMP
/// subprogram must fit 512 bytes on kernels before 6.4 (see `counters::log_drop`);
/// passing the caller's copy of the header would pin that copy to the caller's stack.
#[inline(never)]
fn admits_subprogram(skb: *mut __sk_buff, cfg: &DatapathConfig) -> bool {
    let ctx = TcContext::new(skb);
    let parse::Frame::Ipv4(ip) = parse::frame(&ctx) else {
        return false;
    };
    key(&ctx, &ip, ETH_LEN).is_some_and(|(key, flags)| in_table(cfg, &key, flags))
}

/// Records a local pod's packet the host routed to the uplink (`uplink_egress`, before
/// masquerade or encapsulation change it) when the fast path could take its flow: to
/// a remote pod the tunnel carries (not a directly routed one), or to the outside
/// when masquerade is on.
#[inline(always)]
pub(crate) fn record_forwarded(ctx: &TcContext, cfg: &DatapathConfig, ip: &Ipv4Hdr) {
    if !cfg.fast_path()
        || !cfg.fast_path_outbound(ip.src_addr, ip.dst_addr)
        || cfg.in_cluster(ip.dst_addr) && encap::direct(ip.dst_addr)
    {
        return;
    }
    if let Some((key, flags)) = key(ctx, ip, ETH_LEN) {
        record(cfg, &key, flags);
    }
}

/// Whether the fast path may take this packet of `key`'s direction. A FIN or RST of an
/// admitted flow sends the rest of the flow, both directions, through the host.
#[inline(always)]
pub(crate) fn admitted(cfg: &DatapathConfig, key: &FlowKey, tcp_flags: u8) -> bool {
    cfg.fast_path() && may_be_admitted(key.src, key.dst) && in_table(cfg, key, tcp_flags)
}

/// [`admitted`] once the filter let the key through: its entry in the table decides.
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values by reference: passed by value, the compiler builds other, larger programs, with more stack than older kernels' verifiers allow"
)]
#[inline(always)]
fn in_table(cfg: &DatapathConfig, key: &FlowKey, tcp_flags: u8) -> bool {
    let Some(state) = FLOWS.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: a value of the map, valid while this program runs; concurrent writers
    // (other CPUs, the agent) only ever store whole fields, and a torn read of one
    // sends a packet to the host, never a wrong one past it. Read in place: a copy
    // would take 32 bytes of a frame that must stay small on kernels before 6.4.
    let seen = unsafe { &*state };
    if seen.admitted != 0 && tcp_flags & TCP_CLOSE != 0 {
        close(state);
        if let Some(other) = FLOWS.get_ptr_mut(&key.reversed()) {
            close(other);
        }
        return false;
    }
    // SAFETY: a helper without arguments; it reads the kernel's coarse clock.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if !seen.fast(cfg.ruleset_gen, tcp_flags, now) {
        return false;
    }
    // Written at most once a second: the entry is shared by every CPU.
    if now.wrapping_sub(seen.last_fast_ns) > NS_PER_SEC {
        // SAFETY: as above; a lost race costs a later refresh, never a wrong packet.
        unsafe { (*state).last_fast_ns = now };
    }
    true
}

#[inline(always)]
fn close(state: *mut FlowState) {
    // SAFETY: as in `in_table`.
    unsafe { (*state).flags |= CLOSING };
}

/// Records that the host forwarded this packet of `key`'s direction, whose tuple is
/// the one it arrived with (the callers see packets after the host's last hook, and
/// only directions whose tuple the host did not translate are ever looked up by it).
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values by reference: passed by value, the compiler builds other, larger programs, with more stack than older kernels' verifiers allow"
)]
#[inline(always)]
pub(crate) fn record(cfg: &DatapathConfig, key: &FlowKey, tcp_flags: u8) {
    let fresh = FlowState {
        seen_gen: cfg.ruleset_gen,
        host_packets: 1,
        ..FlowState::default()
    };
    if tcp_flags & (SYN | ACK) == SYN {
        // A new connection on the tuple: nothing of an earlier one carries over.
        let _ = FLOWS.insert(key, &fresh, u64::from(BPF_ANY));
        return;
    }
    let Some(state) = FLOWS.get_ptr_mut(key) else {
        let _ = FLOWS.insert(key, fresh, u64::from(BPF_ANY));
        return;
    };
    // SAFETY: as in `in_table`.
    unsafe {
        if (*state).seen_gen != cfg.ruleset_gen {
            (*state).seen_gen = cfg.ruleset_gen;
        }
        let packets = (*state).host_packets;
        if (*state).admitted != 0 && (*state).stale(bpf_ktime_get_coarse_ns()) {
            // Admitted long ago and idle, or its agent is gone: the agent must look at
            // it again before it takes the fast path.
            (*state).admitted = 0;
            (*state).host_packets = 1;
        } else if packets < u32::MAX {
            (*state).host_packets = packets + 1;
        }
        if tcp_flags & TCP_CLOSE != 0 {
            (*state).flags |= CLOSING;
        }
    }
}
