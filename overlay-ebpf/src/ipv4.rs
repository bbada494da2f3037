//! In-place edits of the IPv4 header at `ETH_LEN`, with incremental checksum updates
//! (RFC 1624) read from the packet itself, so edits compose in any order.

use aya_ebpf::programs::TcContext;
use network_types::ip::Ipv4Hdr;

use crate::{
    checksum,
    parse::{ETH_LEN, ptr_at},
};

const ECN_CE: u8 = 0x03;

/// Applies `word`, which edits one 16-bit word of the header and returns its old and
/// new value, and updates the checksum. False if the header is not linear.
#[inline(always)]
fn edit_word(ctx: &TcContext, word: impl FnOnce(&mut Ipv4Hdr) -> (u16, u16)) -> bool {
    let Some(hdr) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else {
        return false;
    };
    unsafe {
        let (old, new) = word(&mut *hdr);
        (*hdr).check = checksum::replace(u16::from_be_bytes((*hdr).check), old, new).to_be_bytes();
    }
    true
}

/// Replaces the source address (`source`) or the destination address with `addr`.
/// False if the header is not linear.
#[inline(always)]
pub fn set_address(ctx: &TcContext, source: bool, addr: [u8; 4]) -> bool {
    let Some(hdr) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else {
        return false;
    };
    unsafe {
        let field = if source {
            &mut (*hdr).src_addr
        } else {
            &mut (*hdr).dst_addr
        };
        let old = *field;
        *field = addr;
        (*hdr).check =
            checksum::replace4(u16::from_be_bytes((*hdr).check), old, addr).to_be_bytes();
    }
    true
}

/// One forwarding hop: TTL minus one.
#[inline(always)]
pub fn decrement_ttl(ctx: &TcContext) -> bool {
    edit_word(ctx, |h| {
        let old = u16::from_be_bytes([h.ttl, h.proto]);
        h.ttl = h.ttl.wrapping_sub(1);
        (old, u16::from_be_bytes([h.ttl, h.proto]))
    })
}

/// Marks congestion experienced (ECN CE).
#[inline(always)]
pub fn set_ce(ctx: &TcContext) -> bool {
    edit_word(ctx, |h| {
        let old = u16::from_be_bytes([h.vihl, h.tos]);
        h.tos |= ECN_CE;
        (old, u16::from_be_bytes([h.vihl, h.tos]))
    })
}
