//! Rewriting one end (address and port) of a packet, with every checksum that covers
//! it. The transport checksum goes through the kernel's helpers, which keep
//! CHECKSUM_PARTIAL and CHECKSUM_COMPLETE skbs right (a program cannot see which
//! kind it has): pseudo-header changes through `BPF_F_PSEUDO_HDR`, and a zero UDP
//! checksum ("none") stays zero through `BPF_F_MARK_MANGLED_0`. The address, the port
//! and the IPv4 header checksum are written in place: no offload computes the header
//! checksum, and each field changes with the checksum that covers it, so a
//! CHECKSUM_COMPLETE sum stays right (one helper call each cost more than the write).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use overlay_common::Reason;

use super::tuple::{Kind, L4};
use crate::{ipv4, parse::ptr_at};

/// Which end of the packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    Source,
    Destination,
}

#[inline(always)]
fn be32(a: [u8; 4]) -> u64 {
    u64::from(u32::from_ne_bytes(a))
}

#[inline(always)]
fn be16(p: [u8; 2]) -> u64 {
    u64::from(u16::from_ne_bytes(p))
}

/// Replaces `end` of the packet described by `l4` (IPv4 header at `ETH_LEN`),
/// currently `old_addr:old_port`, with `addr:port`.
#[inline(always)]
pub(crate) fn rewrite(
    ctx: &TcContext,
    l4: &L4,
    end: End,
    (old_addr, old_port): ([u8; 4], [u8; 2]),
    (addr, port): ([u8; 4], [u8; 2]),
) -> Result<(), Reason> {
    let csum = l4.csum_off();
    let udp = if l4.kind == Kind::Udp {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let replaced = match l4.kind {
        Kind::Tcp | Kind::Udp => ctx
            .l4_csum_replace(
                csum,
                be32(old_addr),
                be32(addr),
                u64::from(BPF_F_PSEUDO_HDR) | udp | 4,
            )
            .and_then(|()| ctx.l4_csum_replace(csum, be16(old_port), be16(port), udp | 2)),
        // ICMP has no pseudo-header: only the identifier is covered.
        Kind::EchoRequest | Kind::EchoReply => {
            ctx.l4_csum_replace(csum, be16(old_port), be16(port), 2)
        }
        Kind::IcmpError => Ok(()),
    };
    if replaced.is_err() || !ipv4::set_address(ctx, end == End::Source, addr) {
        return Err(Reason::DropHelperError);
    }
    if l4.kind != Kind::IcmpError {
        let port_off = match end {
            End::Source => l4.sport_off(),
            End::Destination => l4.dport_off(),
        };
        // Linear since `tuple::parse` read it; the pointer is taken after the helpers,
        // which invalidate packet pointers.
        let Some(p) = ptr_at::<[u8; 2]>(ctx, port_off) else {
            return Err(Reason::DropHelperError);
        };
        // SAFETY: `ptr_at` checked that the two bytes lie within the linear data.
        unsafe { p.write_unaligned(port) };
    }
    Ok(())
}
