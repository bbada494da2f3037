//! Encapsulation: which peer node carries a packet, the path to it, and the outer IPv4
//! header addressed to it, built the way the kernel's ipip device (`ttl inherit`,
//! `nopmtudisc`, as flannel creates it) would build it. The hooks that encapsulate
//! (`bridge_ingress`, `pod_ingress`, `uplink_egress`) decide when.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    maps::lpm_trie::Key,
    programs::TcContext,
};
use network_types::ip::Ipv4Hdr;
use overlay_common::{
    DatapathConfig, Reason,
    ip::{ECN_CE, ECN_ECT0, ECN_MASK},
};

use crate::{
    checksum,
    fib::{self, Path},
    maps::{PEERS, ROUTES},
    parse::{self, ETH_LEN, IPPROTO_IPIP, IPV4_LEN, ptr_at},
    verdict::{Verdict, drop, pass},
};

/// The peer node of a well-formed packet for a remote pod subnet the tunnel carries
/// (not a directly routed one: `PassDirectRoute`), or, with
/// `node_addresses`, of a local pod's packet for a peer node's own address; anything
/// else ends here with its verdict.
///
/// A pod's packet for another node's address is the reply to a flow that node's host
/// masqueraded to its address (kube-proxy for a NodePort or an external client, the
/// bridge plugin when flannel's CNI asks it to): it is tunnelled to that node like any
/// pod traffic, so that no pod address crosses the underlay unencapsulated (a cloud's
/// anti-spoofing check would drop it), as flannel's tunnel device carries replies to
/// its own address. A directly routed node's address is in `ROUTES` as a direct /32
/// (`ROUTE_NODE_ADDRESS`): what goes to it is left to the host's plain route, as
/// flanneld's host sends it.
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values by reference: passed by value, the compiler builds other, larger programs, with more stack than older kernels' verifiers allow"
)]
#[inline(always)]
pub(crate) fn overlay_packet(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    ip: Ipv4Hdr,
    node_addresses: bool,
) -> Result<(Ipv4Hdr, [u8; 4]), Verdict> {
    let peer = match ROUTES.get(Key::new(32, ip.dst_addr)) {
        // DirectRouting: the host's plain route to that node carries it as it is,
        // as it carries what a host-gw node sends.
        Some(route) if route.direct() => return Err(pass(Reason::PassDirectRoute)),
        Some(route) => route.node_ip,
        None if node_addresses
            && cfg.in_pod_subnet(ip.src_addr)
            && PEERS.get_ptr(&ip.dst_addr).is_some() =>
        {
            ip.dst_addr
        }
        // IPIP to a node address: our own encapsulated packets passing the uplink.
        None if ip.proto == IPPROTO_IPIP => return Err(pass(Reason::PassTunnelled)),
        None => return Err(pass(Reason::PassNotOverlay)),
    };
    if !parse::well_formed(&ip, ctx.len() - ETH_LEN as u32) {
        return Err(drop(Reason::DropMalformed));
    }
    if ip.proto == IPPROTO_IPIP {
        return Err(drop(Reason::DropNestedTunnel));
    }
    Ok((ip, peer))
}

/// Whether `addr` is in a remote pod subnet DirectRouting reaches by the host's plain
/// route (`ROUTE_DIRECT`): the tunnel never carries its packets, and the fast path
/// has nothing to take.
#[inline(always)]
pub(crate) fn direct(addr: [u8; 4]) -> bool {
    ROUTES
        .get(Key::new(32, addr))
        .is_some_and(|route| route.direct())
}

/// The device the packet is on: the hook's own.
#[inline(always)]
pub(crate) fn ctx_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `ctx.skb.skb` is the `__sk_buff` the kernel passed this run, readable while
    // it lasts.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// The FIB's path to `peer` for the encapsulated form of this packet, whose size it
/// checks against the route's MTU.
#[inline(always)]
pub(crate) fn peer_path(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    ip: &Ipv4Hdr,
    peer: [u8; 4],
) -> Path {
    fib::lookup(ctx, ctx_ifindex(ctx), cfg.node_ip, peer, outer_len(ctx, ip))
}

/// Length of the largest outer packet this skb will become on the wire.
#[inline(always)]
fn outer_len(ctx: &TcContext, ip: &Ipv4Hdr) -> u16 {
    parse::wire_len(ctx, ip).saturating_add(IPV4_LEN as u16)
}

/// The outer header for `inner`, sent from this node to `peer`.
#[inline(always)]
fn outer_header(inner: &Ipv4Hdr, ttl: u8, src: [u8; 4], dst: [u8; 4]) -> Ipv4Hdr {
    // ECN as INET_ECN_encapsulate: copy the inner codepoint, but never put CE on the
    // outside (a congestion mark is already recorded inside). DSCP 0 as flannel's device.
    let inner_ecn = inner.tos & ECN_MASK;
    let tos = if inner_ecn == ECN_CE {
        ECN_ECT0
    } else {
        inner_ecn
    };
    // DF is copied from the inner header (ip_tunnel_xmit without pmtudisc), and the
    // inner ID is reused so fragments of one inner datagram stay distinguishable.
    let frags = if parse::dont_fragment(inner) {
        [0x40, 0]
    } else {
        [0, 0]
    };
    let mut outer = Ipv4Hdr {
        vihl: 0x45,
        tos,
        tot_len: inner
            .tot_len()
            .saturating_add(IPV4_LEN as u16)
            .to_be_bytes(),
        id: inner.id,
        frags,
        ttl,
        proto: IPPROTO_IPIP,
        check: [0; 2],
        src_addr: src,
        dst_addr: dst,
    };
    outer.check = checksum::finish(checksum::sum(parse::bytes(&outer))).to_be_bytes();
    outer
}

/// Inserts the outer header and sends the packet along `path`. `egress_dev` is the
/// device of an egress hook (None at ingress).
#[inline(always)]
pub(crate) fn push_outer(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    inner: &Ipv4Hdr,
    ttl: u8,
    peer: [u8; 4],
    path: Path,
    egress_dev: Option<u32>,
) -> Verdict {
    let outer = outer_header(inner, ttl, cfg.node_ip, peer);
    // FIXED_GSO: pod MTU already leaves room for the outer header, so segment sizes
    // stay as the sender chose them; ENCAP_L3_IPV4 marks the skb as IPIP for GSO.
    let flags = u64::from(BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4);
    if ctx
        .adjust_room(IPV4_LEN as i32, BPF_ADJ_ROOM_MAC, flags)
        .is_err()
    {
        return drop(Reason::DropHelperError);
    }
    let Some(hdr) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else {
        return drop(Reason::DropHelperError);
    };
    // SAFETY: `ptr_at` checked, after the helper that opened the room, that the header
    // lies within the linear data; `Ipv4Hdr` has alignment 1.
    unsafe { *hdr = outer };
    match path {
        Path::Resolved {
            ifindex,
            smac,
            dmac,
        } => {
            if !fib::set_macs(ctx, smac, dmac) {
                return drop(Reason::DropHelperError);
            }
            (Reason::Encapsulated, fib::out(ifindex, egress_dev))
        }
        Path::Unresolved { ifindex, nexthop } => (
            Reason::EncapsulatedNeighResolve,
            fib::out_resolving(ifindex, nexthop),
        ),
        // Callers only pass forwarding paths.
        _ => drop(Reason::DropNoRouteToPeer),
    }
}
