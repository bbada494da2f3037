//! Decapsulation: the checks a tunnelled packet must pass, the removal of its outer
//! header, and the forwarding of a packet straight to a pod of this node in place of
//! the host's router. `uplink_ingress` decides when.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::generated::bpf_redirect_peer,
    programs::TcContext,
};
use network_types::ip::Ipv4Hdr;
use overlay_common::{DatapathConfig, PeerStats, Reason};

use crate::{
    checksum,
    fib::{self, Path},
    flows, ipv4,
    maps::{PEERS, POD_PORTS},
    parse::{self, ETH_LEN, IPPROTO_IPIP, IPV4_LEN, ptr_at},
    verdict::{Verdict, drop, pass},
};

/// Forwards a packet (IPv4 header `ip`, at the start of the frame's network layer) to
/// a pod of this node in place of the host's router, counted as `fast[0]` when it goes
/// straight into the pod and `fast[1]` when the bridge delivers it; when it cannot,
/// hands it to the host stack, counted as `slow`, and when its flow is not on the fast
/// path, counted as `host`: the host's netfilter and connection tracking then decide
/// it (and undo kube-proxy's DNAT of a reply) as they would without us.
#[inline(always)]
pub(crate) fn forward_to_pod(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    ip: &Ipv4Hdr,
    fast: [Reason; 2],
    slow: Reason,
    host: Reason,
) -> Verdict {
    if ip.ttl <= 1 {
        // Let the stack answer with time-exceeded.
        return pass(slow);
    }
    if !flows::admits(ctx, cfg, ip) {
        return pass(host);
    }
    // SAFETY: `ctx.skb.skb` is the `__sk_buff` the kernel passed this run, readable while
    // it lasts.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    match fib::lookup(ctx, ifindex, ip.src_addr, ip.dst_addr, 0) {
        Path::Resolved {
            ifindex: out,
            smac,
            dmac,
        } => {
            if !fib::set_macs(ctx, smac, dmac) || !ipv4::decrement_ttl(ctx) {
                return drop(Reason::DropHelperError);
            }
            to_pod(out, dmac, fast)
        }
        // Local destination (the gateway), unresolved pod neighbour, or anything odd:
        // the host stack delivers, resolves or reports.
        _ => pass(slow),
    }
}

/// Sends a decapsulated packet on its way to `out` (the FIB's device) for `dmac`.
/// When that device is the pod bridge and the agent knows the pod's port
/// (`POD_PORTS`, from the bridge's forwarding table), the packet goes straight into the
/// pod's namespace through its veth (`bpf_redirect_peer`, allowed from an ingress
/// hook), counted as `reasons[0]`: no bridge, no veth queue. Besides saving those hops,
/// this keeps a GSO packet whole on kernels before 6.3, where it is still marked as
/// encapsulated (see `pop_outer`) and the bridge, which has no offloads for
/// encapsulated packets, would cut it into segments in software. Otherwise (a new pod
/// the agent has not seen yet) the bridge delivers it, counted as `reasons[1]`.
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values by reference: passed by value, the compiler builds other, larger programs, with more stack than older kernels' verifiers allow"
)]
#[inline(always)]
fn to_pod(out: u32, dmac: [u8; 6], reasons: [Reason; 2]) -> Verdict {
    match POD_PORTS.get_ptr(&dmac) {
        // SAFETY: a value the lookup returned, valid and aligned while the program runs.
        Some(port) if unsafe { (*port).bridge } == out => {
            // SAFETY: as above.
            let peer = unsafe { (*port).ifindex };
            // SAFETY: the helper takes plain integers; an ifindex that is no veth makes
            // it return TC_ACT_SHOT, a counted drop.
            (reasons[0], unsafe { bpf_redirect_peer(peer, 0) } as i32)
        }
        _ => (reasons[1], fib::out(out, None)),
    }
}

/// Removes the outer header. FIXED_GSO: the inner segments keep their size.
/// DECAP_L3_IPV4 (kernel 6.3+) also clears the skb's IPIP GSO state, so that a GSO
/// packet is a plain TCP/UDP one again; older kernels (Debian 12's 6.1, Ubuntu 22.04's
/// 5.15) refuse the flag with EINVAL before touching the packet, and we remove the
/// header without it. There the skb keeps SKB_GSO_IPXIP4 and its encapsulation mark:
/// harmless for local delivery (TCP takes GSO packets whatever their type, the inner
/// checksum offsets stay valid because the inner headers do not move) and for veth and
/// bridge ports (which accept every encapsulation GSO type); a device without IPXIP4
/// offload segments it in software from the headers it finds (the helper marks a
/// shrunk GSO skb DODGY, so they are checked and the segment count recomputed). The
/// lab's TCP transfers and the benchmark's streams run over this path on 6.1.
#[inline(always)]
pub(crate) fn pop_outer(ctx: &TcContext) -> bool {
    let shrink = -(IPV4_LEN as i32);
    let fixed = u64::from(BPF_F_ADJ_ROOM_FIXED_GSO);
    let refused = &raw mut DECAP_FLAG_REFUSED;
    // SAFETY: a global of this program's own; a race between CPUs can only write the
    // same value twice.
    let ask = !unsafe { refused.read_volatile() };
    let decap = u64::from(BPF_F_ADJ_ROOM_DECAP_L3_IPV4);
    if ask
        && ctx
            .adjust_room(shrink, BPF_ADJ_ROOM_MAC, fixed | decap)
            .is_ok()
    {
        return true;
    }
    if ctx.adjust_room(shrink, BPF_ADJ_ROOM_MAC, fixed).is_err() {
        return false;
    }
    // The flag adds only a minimum inner length, which a checked packet has: the call
    // without it succeeding means the kernel refused the flag itself.
    if ask {
        // SAFETY: as the read above.
        unsafe { refused.write_volatile(true) };
    }
    true
}

/// Set once this kernel refused BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (before 6.3): from then
/// on a decapsulation makes the one helper call that works, not a refused one first.
/// A global (`.bss`), learned anew by each load of the programs.
static mut DECAP_FLAG_REFUSED: bool = false;

/// Checks the tunnel header and returns the inner IPv4 header and the sending peer's
/// statistics, or the verdict that refuses the packet.
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values by reference: passed by value, the compiler builds other, larger programs, with more stack than older kernels' verifiers allow"
)]
#[inline(always)]
pub(crate) fn tunnel_payload(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    outer: &Ipv4Hdr,
) -> Result<(Ipv4Hdr, *mut PeerStats), Verdict> {
    if !parse::well_formed(outer, ctx.len() - ETH_LEN as u32) {
        return Err(drop(Reason::DropMalformed));
    }
    // Options before the checksum: the checksum below covers only the 20-byte base
    // header, so it would call a correct header with options corrupt (DropMalformed).
    if outer.ihl() as usize != IPV4_LEN {
        return Err(drop(Reason::DropOuterOptions));
    }
    if checksum::finish(checksum::sum(parse::bytes(outer))) != 0 {
        return Err(drop(Reason::DropMalformed));
    }
    if parse::is_fragment(outer) {
        return Err(drop(Reason::DropOuterFragment));
    }
    let Some(peer) = PEERS.get_ptr_mut(&outer.src_addr) else {
        return Err(drop(Reason::DropUnknownPeer));
    };
    let inner_off = ETH_LEN + IPV4_LEN;
    if !parse::ensure_linear(ctx, inner_off + IPV4_LEN) {
        return Err(drop(Reason::DropMalformed));
    }
    let Some(inner) = ptr_at::<Ipv4Hdr>(ctx, inner_off) else {
        return Err(drop(Reason::DropMalformed));
    };
    // SAFETY: `ptr_at` checked that the header lies within the linear data, which no
    // helper has changed since; `Ipv4Hdr` has alignment 1.
    let inner = unsafe { *inner };
    if !parse::well_formed(&inner, u32::from(outer.tot_len()) - IPV4_LEN as u32)
        || u32::from(inner.tot_len()) + IPV4_LEN as u32 != u32::from(outer.tot_len())
    {
        return Err(drop(Reason::DropMalformed));
    }
    // A pod's reply to a flow the host masqueraded to this node's address also comes
    // through the tunnel (see `encap::overlay_packet`).
    if !cfg.in_pod_subnet(inner.dst_addr) && inner.dst_addr != cfg.node_ip {
        return Err(drop(Reason::DropNotForThisNode));
    }
    if inner.proto == IPPROTO_IPIP {
        return Err(drop(Reason::DropNestedTunnel));
    }
    Ok((inner, peer))
}
