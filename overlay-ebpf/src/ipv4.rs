//! In-place edits of the IPv4 header at `ETH_LEN`, with incremental checksum updates
//! (RFC 1624) read from the packet itself, so edits compose in any order.

use aya_ebpf::programs::TcContext;
use network_types::ip::Ipv4Hdr;

use overlay_common::ip::ECN_CE;

use crate::{
    checksum,
    parse::{ETH_LEN, ptr_at},
};

/// Applies `edit`, which changes fields of the header and returns the checksum
/// updated from the one it is given. False if the header is not linear.
#[inline(always)]
fn edit(ctx: &TcContext, edit: impl FnOnce(&mut Ipv4Hdr, u16) -> u16) -> bool {
    let Some(hdr) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else {
        return false;
    };
    // SAFETY: `ptr_at` checked that the header lies within the linear data, which no
    // helper changes while `edit` runs; `Ipv4Hdr` has alignment 1.
    unsafe {
        let check = edit(&mut *hdr, u16::from_be_bytes((*hdr).check));
        (*hdr).check = check.to_be_bytes();
    }
    true
}

/// Replaces the source address (`source`) or the destination address with `addr`.
#[inline(always)]
pub(crate) fn set_address(ctx: &TcContext, source: bool, addr: [u8; 4]) -> bool {
    edit(ctx, |h, check| {
        let field = if source {
            &mut h.src_addr
        } else {
            &mut h.dst_addr
        };
        let old = core::mem::replace(field, addr);
        checksum::replace4(check, old, addr)
    })
}

/// One forwarding hop: TTL minus one.
#[inline(always)]
pub(crate) fn decrement_ttl(ctx: &TcContext) -> bool {
    edit(ctx, |h, check| {
        let old = u16::from_be_bytes([h.ttl, h.proto]);
        h.ttl = h.ttl.wrapping_sub(1);
        checksum::replace(check, old, u16::from_be_bytes([h.ttl, h.proto]))
    })
}

/// Marks congestion experienced (ECN CE).
#[inline(always)]
pub(crate) fn set_ce(ctx: &TcContext) -> bool {
    edit(ctx, |h, check| {
        let old = u16::from_be_bytes([h.vihl, h.tos]);
        h.tos |= ECN_CE;
        checksum::replace(check, old, u16::from_be_bytes([h.vihl, h.tos]))
    })
}
