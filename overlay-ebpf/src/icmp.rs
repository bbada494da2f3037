//! ICMP "fragmentation needed" (type 3, code 4) sent back to a local pod whose packet,
//! once encapsulated, would not fit the uplink (RFC 1191).

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::generated::bpf_skb_change_tail,
    programs::TcContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use overlay_common::{DatapathConfig, Reason};

use crate::{
    checksum, fib,
    parse::{self, ETH_LEN, IPPROTO_ICMP, IPV4_LEN, ptr_at},
    verdict::{Packed, Verdict, drop, pack, unpack},
};

/// Bytes of the offending datagram's payload quoted after its IP header: more than
/// RFC 792's 8 so the sender sees its whole TCP header, and a fixed size, which keeps
/// the reply and its checksum simple for the verifier.
pub(crate) const QUOTE_LEN: usize = 64;
const ICMP_LEN: usize = 8;
const REPLY_LEN: usize = IPV4_LEN + ICMP_LEN + IPV4_LEN + QUOTE_LEN;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// IPTOS_PREC_INTERNETCONTROL, as the kernel marks its own ICMP errors.
const TOS_INTERNET_CONTROL: u8 = 0xc0;
const TTL: u8 = 64;

/// Turns the packet into the ICMP error for it and sends that back out of the device
/// it came in on. `mtu` is the next-hop MTU to announce.
#[inline(always)]
pub(crate) fn frag_needed(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    ip: &Ipv4Hdr,
    mtu: u16,
) -> Verdict {
    unpack(reply_frag_needed(ctx.skb.skb, cfg, ip.src_addr, mtu))
}

/// [`frag_needed`], as a function of its own (a BPF subprogram): its buffers stay off
/// the stack frame of `bridge_ingress`, whose deepest call chain must
/// fit in 512 bytes, each frame rounded up to 32 before 6.4 (see `counters::log_drop`).
/// A subprogram returns one register: the verdict comes back packed.
#[inline(never)]
fn reply_frag_needed(skb: *mut __sk_buff, cfg: &DatapathConfig, src: [u8; 4], mtu: u16) -> Packed {
    let ctx = &TcContext::new(skb);
    pack(build_frag_needed(ctx, cfg, src, mtu))
}

#[inline(always)]
fn build_frag_needed(ctx: &TcContext, cfg: &DatapathConfig, src: [u8; 4], mtu: u16) -> Verdict {
    let mut quoted = [0u8; IPV4_LEN + QUOTE_LEN];
    if !parse::load_exact(ctx, ETH_LEN, &mut quoted) {
        return drop(Reason::DropHelperError);
    }
    let mut reply = [0u8; REPLY_LEN];
    reply[IPV4_LEN + ICMP_LEN..].copy_from_slice(&quoted);
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return drop(Reason::DropHelperError);
    };
    // SAFETY: `ptr_at` checked that the Ethernet header lies within the linear data; the
    // MAC addresses are byte arrays, read at any alignment.
    let (pod_mac, bridge_mac) = unsafe { ((*eth).src_addr, (*eth).dst_addr) };
    // SAFETY: `ctx.skb.skb` is the `__sk_buff` the kernel passed this run, readable while
    // it lasts.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };

    // Trim to what is quoted, then open room in front of it for the new headers.
    let quoted_end = (ETH_LEN + IPV4_LEN + QUOTE_LEN) as u32;
    // SAFETY: the helper takes this run's context and integers; the packet pointers it
    // invalidates are taken again (`ptr_at`, `store`) after it.
    if unsafe { bpf_skb_change_tail(ctx.as_ptr().cast(), quoted_end, 0) } != 0 {
        return drop(Reason::DropHelperError);
    }
    if ctx
        .adjust_room((IPV4_LEN + ICMP_LEN) as i32, BPF_ADJ_ROOM_MAC, 0)
        .is_err()
    {
        return drop(Reason::DropHelperError);
    }

    reply[IPV4_LEN] = ICMP_DEST_UNREACH;
    reply[IPV4_LEN + 1] = ICMP_FRAG_NEEDED;
    reply[IPV4_LEN + 6..IPV4_LEN + 8].copy_from_slice(&mtu.to_be_bytes());
    let icmp_check = checksum::finish(checksum::sum(&reply[IPV4_LEN..]));
    reply[IPV4_LEN + 2..IPV4_LEN + 4].copy_from_slice(&icmp_check.to_be_bytes());

    let mut hdr = Ipv4Hdr {
        vihl: 0x45,
        tos: TOS_INTERNET_CONTROL,
        tot_len: (REPLY_LEN as u16).to_be_bytes(),
        id: [0; 2],
        frags: [0; 2],
        ttl: TTL,
        proto: IPPROTO_ICMP,
        check: [0; 2],
        // The pod's gateway is the router that refuses the packet.
        src_addr: cfg.gateway(),
        dst_addr: src,
    };
    hdr.check = checksum::finish(checksum::sum(parse::bytes(&hdr))).to_be_bytes();
    reply[..IPV4_LEN].copy_from_slice(parse::bytes(&hdr));

    // Stored rather than written through `fib::set_macs`: that variant takes more of
    // this subprogram's stack than the call chain's limit before 6.4 leaves it.
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&pod_mac);
    macs[6..].copy_from_slice(&bridge_mac);
    if ctx.store(ETH_LEN, &reply, 0).is_err() || ctx.store(0, &macs, 0).is_err() {
        return drop(Reason::DropHelperError);
    }
    (Reason::FragNeededSent, fib::out(ifindex, None))
}
