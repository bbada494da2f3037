//! Encapsulation: a packet for a remote pod subnet gets an outer IPv4 header addressed
//! to the node that owns the subnet, the way the kernel's ipip device (`ttl inherit`,
//! `nopmtudisc`, as flannel creates it) would build it.

use aya_ebpf::{
    bindings::{
        __sk_buff, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_FIXED_GSO,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    maps::lpm_trie::Key,
    programs::TcContext,
};
use network_types::ip::Ipv4Hdr;
use overlay_common::{DatapathConfig, Hook, Reason};

use crate::{
    checksum,
    counters::{Packed, Verdict, drop, pack, pass, run, unpack},
    fib::{self, Path},
    flows, icmp, ipv4,
    maps::{PEERS, ROUTES, config},
    nat,
    parse::{self, ETH_LEN, Frame, IPPROTO_IPIP, IPV4_LEN, ptr_at},
};

const ECN_MASK: u8 = 0x03;
const ECN_ECT0: u8 = 0x02;
const ECN_CE: u8 = 0x03;

/// `bridge_ingress`: packets from local pods.
#[inline(always)]
pub fn from_bridge(ctx: &TcContext) -> i32 {
    run(ctx, Hook::BridgeIngress, bridge)
}

/// `pod_ingress`: packets from one local pod, on its veth before the bridge, which
/// then sees only what this program leaves to it.
#[inline(always)]
pub fn from_pod(ctx: &TcContext) -> i32 {
    run(ctx, Hook::PodIngress, pod)
}

/// `uplink_egress`: packets the host stack routes out of the uplink.
#[inline(always)]
pub fn from_host(ctx: &TcContext) -> i32 {
    run(ctx, Hook::UplinkEgress, |ctx| {
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

fn bridge(ctx: &TcContext) -> Verdict {
    let Some(cfg) = config() else {
        return pass(Reason::PassNotConfigured);
    };
    from_local_pod(ctx, cfg)
}

fn pod(ctx: &TcContext) -> Verdict {
    let Some(cfg) = config() else {
        return pass(Reason::PassNotConfigured);
    };
    // Only what the pod sends to its gateway, as the bridge would hand it to the
    // bridge's own hook; a frame for another pod of this node (which may route it on)
    // is the bridge's to deliver.
    match ptr_at::<[u8; 6]>(ctx, 0) {
        Some(dst) if cfg.bridge_mac != [0; 6] && unsafe { *dst } == cfg.bridge_mac => {
            from_local_pod(ctx, cfg)
        }
        _ => pass(Reason::PassNotForGateway),
    }
}

/// A frame from a local pod to its gateway, at the bridge or before it.
#[inline(always)]
fn from_local_pod(ctx: &TcContext, cfg: &DatapathConfig) -> Verdict {
    // Node addresses are left out here: a pod's packet for a node's own address may
    // belong to a flow this node masquerades, which `uplink_egress` translates first.
    let (ip, peer) = match ipv4_frame(ctx).and_then(|ip| overlay_packet(ctx, cfg, ip, false)) {
        Ok(found) => found,
        // Perhaps a packet of a masqueraded flow to the outside.
        Err((Reason::PassNotOverlay, _)) => return nat::outbound::forward(ctx, cfg),
        Err(verdict) => return verdict,
    };
    if let Err(reason) = fast_path_allows(cfg, &ip) {
        return pass(reason);
    }
    // The host decides every flow it has not been seen to forward unchanged: kube-proxy,
    // policy engines, firewalls and its conntrack see such packets as they would
    // without us, and `uplink_egress` encapsulates what it routes to the overlay.
    if !flows::admits(ctx, cfg, &ip) {
        return pass(Reason::PassToHost);
    }
    let path = match peer_path(ctx, cfg, &ip, peer) {
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
    push_outer(ctx, cfg, &ip, ip.ttl - 1, peer, path, None)
}

fn host(ctx: &TcContext) -> Verdict {
    let Some(cfg) = config() else {
        return pass(Reason::PassNotConfigured);
    };
    let ip = match ipv4_frame(ctx) {
        Ok(ip) => ip,
        Err(verdict) => return verdict,
    };
    // What `bridge_ingress` or `pod_ingress` encapsulated and redirected here (a
    // redirect to a device's egress goes through its queueing, where this hook sits,
    // with TCX as with cls_bpf): nothing more to do. Skipping masquerade and the route
    // lookup cuts this run by a fifth (program cost `tunnelled`).
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
    let (ip, peer) = match overlay_packet(ctx, cfg, ip, !masqueraded) {
        Ok(found) => found,
        // Translated for the outside: it leaves unencapsulated.
        Err(_) if masqueraded => return pass(Reason::Masqueraded),
        Err(verdict) => return verdict,
    };
    // The host stack already routed this packet (TTL, options and fragments are its
    // business), so everything well-formed is carried as is.
    let path = match peer_path(ctx, cfg, &ip, peer) {
        // The agent's routes carry MTU = uplink - 20, so the stack should never hand us
        // this; no ICMP can be addressed to a local sender from here.
        Path::FragNeeded { .. } => return drop(Reason::DropTooBig),
        Path::Local | Path::NoRoute => return drop(Reason::DropNoRouteToPeer),
        path => path,
    };
    push_outer(ctx, cfg, &ip, ip.ttl, peer, path, Some(ctx_ifindex(ctx)))
}

/// Whether a packet on the bridge may skip the host stack, else the reason it may not.
#[inline(always)]
pub fn fast_path_allows(cfg: &DatapathConfig, ip: &Ipv4Hdr) -> Result<(), Reason> {
    // Only this node's pods; anything else meets the host's own routing and
    // reverse-path filter.
    if !cfg.in_pod_subnet(ip.src_addr) {
        return Err(Reason::PassForeignSource);
    }
    // Plain datagrams only; the host stack handles the rest and routes it back to us
    // through the uplink egress hook.
    if ip.ihl() as usize != IPV4_LEN {
        return Err(Reason::PassIpOptions);
    }
    if parse::is_fragment(ip) {
        return Err(Reason::PassFragment);
    }
    if ip.ttl <= 1 {
        return Err(Reason::PassTtlExpired);
    }
    Ok(())
}

/// The IPv4 header of an IPv4 frame; anything else ends here with its verdict.
#[inline(always)]
fn ipv4_frame(ctx: &TcContext) -> Result<Ipv4Hdr, Verdict> {
    match parse::frame(ctx) {
        Frame::Ipv4(ip) => Ok(ip),
        Frame::Other => Err(pass(Reason::PassNotIpv4)),
        Frame::Truncated => Err(drop(Reason::DropMalformed)),
    }
}

/// The peer node of a well-formed packet for a remote pod subnet, or, with
/// `node_addresses`, of a local pod's packet for a peer node's own address; anything
/// else ends here with its verdict.
///
/// A pod's packet for another node's address is the reply to a flow that node's host
/// masqueraded to its address (kube-proxy for a NodePort or an external client, the
/// bridge plugin when flannel's CNI asks it to): it is tunnelled to that node like any
/// pod traffic, so that no pod address crosses the underlay unencapsulated (a cloud's
/// anti-spoofing check would drop it), as flannel's tunnel device carries replies to
/// its own address.
#[inline(always)]
fn overlay_packet(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    ip: Ipv4Hdr,
    node_addresses: bool,
) -> Result<(Ipv4Hdr, [u8; 4]), Verdict> {
    let peer = match ROUTES.get(Key::new(32, ip.dst_addr)) {
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

#[inline(always)]
fn ctx_ifindex(ctx: &TcContext) -> u32 {
    unsafe { (*ctx.skb.skb).ifindex }
}

/// The FIB's path to `peer` for the encapsulated form of this packet, whose size it
/// checks against the route's MTU.
#[inline(always)]
fn peer_path(ctx: &TcContext, cfg: &DatapathConfig, ip: &Ipv4Hdr, peer: [u8; 4]) -> Path {
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
fn push_outer(
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
