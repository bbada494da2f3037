//! Rewriting one end (address and port) of a packet, with every checksum that covers
//! it. The kernel helpers keep CHECKSUM_PARTIAL and CHECKSUM_COMPLETE skbs right:
//! pseudo-header changes go through `BPF_F_PSEUDO_HDR`, and a zero UDP checksum
//! ("none") stays zero through `BPF_F_MARK_MANGLED_0`.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};

use super::tuple::{Kind, L4};

/// Which end of the packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Source,
    Destination,
}

const IP_CHECK: usize = 10;
const IP_SRC: usize = 12;
const IP_DST: usize = 16;

#[inline(always)]
fn be32(a: [u8; 4]) -> u64 {
    u64::from(u32::from_ne_bytes(a))
}

#[inline(always)]
fn be16(p: [u8; 2]) -> u64 {
    u64::from(u16::from_ne_bytes(p))
}

/// Replaces `end` of the packet described by `l4` (IPv4 header at `l3`), currently
/// `old_addr:old_port`, with `addr:port`.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    l3: usize,
    l4: &L4,
    end: End,
    (old_addr, old_port): ([u8; 4], [u8; 2]),
    (addr, port): ([u8; 4], [u8; 2]),
) -> Result<(), i64> {
    let csum = l4.csum_off();
    let udp = if l4.kind == Kind::Udp {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    match l4.kind {
        Kind::Tcp | Kind::Udp => {
            ctx.l4_csum_replace(
                csum,
                be32(old_addr),
                be32(addr),
                u64::from(BPF_F_PSEUDO_HDR) | udp | 4,
            )?;
            ctx.l4_csum_replace(csum, be16(old_port), be16(port), udp | 2)?;
        }
        // ICMP has no pseudo-header: only the identifier is covered.
        Kind::EchoRequest | Kind::EchoReply => {
            ctx.l4_csum_replace(csum, be16(old_port), be16(port), 2)?
        }
        Kind::IcmpError => {}
    }
    ctx.l3_csum_replace(l3 + IP_CHECK, be32(old_addr), be32(addr), 4)?;
    let (addr_off, port_off) = match end {
        End::Source => (l3 + IP_SRC, l4.sport_off()),
        End::Destination => (l3 + IP_DST, l4.dport_off()),
    };
    ctx.store(addr_off, &addr, 0)?;
    if l4.kind != Kind::IcmpError {
        ctx.store(port_off, &port, 0)?;
    }
    Ok(())
}
