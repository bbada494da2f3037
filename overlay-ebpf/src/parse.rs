//! Header access and validation.
//!
//! The programs judge only what they would touch: a packet is first classified with
//! the fewest fields possible (EtherType, protocol, addresses); only packets that are
//! ours are then checked strictly, so foreign traffic passes untouched even when odd.

use aya_ebpf::{EbpfContext, helpers::generated::bpf_skb_load_bytes, programs::TcContext};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};
use overlay_common::Reason;

use crate::verdict::{Verdict, drop, pass};

pub(crate) const ETH_LEN: usize = EthHdr::LEN;
pub(crate) const IPV4_LEN: usize = Ipv4Hdr::LEN;
pub(crate) use overlay_common::ip::{IPPROTO_ICMP, IPPROTO_IPIP, IPPROTO_TCP, IPPROTO_UDP};

/// Bits of the TCP flags byte.
pub(crate) mod tcp {
    pub(crate) const FIN: u8 = 0x01;
    pub(crate) const SYN: u8 = 0x02;
    pub(crate) const RST: u8 = 0x04;
    pub(crate) const ACK: u8 = 0x10;
}

const IP_DF: u16 = 0x4000;

/// Raw pointer to a `T` at `off` if the linear data holds it. Invalidated by any helper
/// that changes the packet's shape.
#[inline(always)]
pub(crate) fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Makes the first `len` bytes linear, pulling them in from paged data if needed.
#[inline(always)]
pub(crate) fn ensure_linear(ctx: &TcContext, len: usize) -> bool {
    if ctx.data() + len <= ctx.data_end() {
        return true;
    }
    len <= ctx.len() as usize
        && ctx.pull_data(len as u32).is_ok()
        && ctx.data() + len <= ctx.data_end()
}

/// Copies exactly `N` bytes from `off` (linear or not); false if the packet is shorter.
/// (A constant length keeps the verifier satisfied, unlike a length clamped to the packet.)
#[inline(always)]
pub(crate) fn load_exact<const N: usize>(ctx: &TcContext, off: usize, dst: &mut [u8; N]) -> bool {
    // SAFETY: `dst` is a writable array of exactly the `N` bytes the helper copies.
    unsafe { bpf_skb_load_bytes(ctx.as_ptr(), off as u32, dst.as_mut_ptr().cast(), N as u32) == 0 }
}

/// What the start of a frame is.
pub(crate) enum Frame {
    /// Not an IPv4 frame (ARP, IPv6, VLAN, ...).
    Other,
    /// IPv4 EtherType but not even a full Ethernet + minimal IPv4 header.
    Truncated,
    /// A copy of the (unvalidated) IPv4 header.
    Ipv4(Ipv4Hdr),
}

/// Reads the Ethernet header and, for IPv4, copies the first 20 bytes of the IP header.
#[inline(always)]
pub(crate) fn frame(ctx: &TcContext) -> Frame {
    if !ensure_linear(ctx, ETH_LEN) {
        return Frame::Truncated;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Frame::Truncated;
    };
    // SAFETY: `ptr_at` checked that the header lies within the linear data; BPF loads the
    // 16-bit EtherType at any alignment.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return Frame::Other;
    }
    if !ensure_linear(ctx, ETH_LEN + IPV4_LEN) {
        return Frame::Truncated;
    }
    match ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) {
        // SAFETY: `ptr_at` checked that the header lies within the linear data;
        // `Ipv4Hdr` has alignment 1.
        Some(ip) => Frame::Ipv4(unsafe { *ip }),
        None => Frame::Truncated,
    }
}

/// The IPv4 header of an IPv4 frame; anything else ends here with its verdict: passed
/// when it is no IPv4 frame, dropped when it is one too short to hold a header.
#[inline(always)]
pub(crate) fn ipv4(ctx: &TcContext) -> Result<Ipv4Hdr, Verdict> {
    match frame(ctx) {
        Frame::Ipv4(ip) => Ok(ip),
        Frame::Other => Err(pass(Reason::PassNotIpv4)),
        Frame::Truncated => Err(drop(Reason::DropMalformed)),
    }
}

/// Version 4, IHL of at least 5 words, and a total length that covers the header and
/// fits in the `available` bytes after the Ethernet header.
#[inline(always)]
pub(crate) fn well_formed(ip: &Ipv4Hdr, available: u32) -> bool {
    let tot_len = u32::from(ip.tot_len());
    ip.version() == 4
        && ip.ihl() as usize >= IPV4_LEN
        && tot_len >= u32::from(ip.ihl())
        && tot_len <= available
}

#[inline(always)]
pub(crate) fn is_fragment(ip: &Ipv4Hdr) -> bool {
    overlay_common::ip::is_fragment(ip.frags)
}

#[inline(always)]
pub(crate) fn dont_fragment(ip: &Ipv4Hdr) -> bool {
    u16::from_be_bytes(ip.frags) & IP_DF != 0
}

/// Bytes the header occupies when viewed as a byte array.
#[inline(always)]
pub(crate) fn bytes(ip: &Ipv4Hdr) -> &[u8; IPV4_LEN] {
    // SAFETY: `Ipv4Hdr` is 20 bytes of byte fields and byte arrays, no padding: the same
    // size, alignment and validity as the array, borrowed for as long.
    unsafe { &*(ip as *const Ipv4Hdr).cast::<[u8; IPV4_LEN]>() }
}

/// Length on the wire of the largest packet this skb becomes: the IP total length, or
/// for a GSO skb one segment (headers + gso_size).
#[inline(always)]
pub(crate) fn wire_len(ctx: &TcContext, ip: &Ipv4Hdr) -> u16 {
    // SAFETY: `ctx.skb.skb` is the `__sk_buff` the kernel passed this run, readable while
    // it lasts.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 {
        return ip.tot_len();
    }
    let l4_off = ETH_LEN + ip.ihl() as usize;
    let l4_len = match ip.proto {
        IPPROTO_TCP => match ctx.load::<u8>(l4_off + 12) {
            Ok(doff) => u32::from(doff >> 4) * 4,
            Err(_) => 0,
        },
        IPPROTO_UDP => 8,
        _ => 0,
    };
    (u32::from(ip.ihl()) + l4_len + gso_size).min(u32::from(u16::MAX)) as u16
}
