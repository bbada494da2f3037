//! ICMP errors about translated flows (RFC 5508 section 4.2): the error's own address
//! and the datagram it quotes are translated together, with the quoted IP and
//! transport checksums and the ICMP checksum kept consistent.

use aya_ebpf::programs::TcContext;
use overlay_common::{Reason, conntrack::Rule, counters::NatEvent};

use super::{
    rewrite::End,
    tuple::{self, Kind, L4},
};
use crate::{
    checksum,
    conntrack::{self, Tuple},
    counters::nat_event,
    parse::load_exact,
};

const IP_CHECK: usize = 10;
const IP_SRC: usize = 12;
const IP_DST: usize = 16;

/// Translates an ICMP error (header at `icmp`, IPv4 header at `l3`) if it concerns a
/// flow we translated. On the way out (`End::Source`) it is a local sender's error
/// about a reply it received; on the way in (`End::Destination`) an error about a
/// packet we sent. Returns whether it was translated.
#[inline(always)]
pub(crate) fn translate(ctx: &TcContext, l3: usize, icmp: &L4, end: End) -> Result<bool, Reason> {
    let Some(quoted_ip) = tuple::quoted_header(ctx, icmp) else {
        return Ok(false);
    };
    let q_l3 = icmp.off + 8;
    let Ok(quoted) = tuple::parse(ctx, &quoted_ip, q_l3, true) else {
        return Ok(false);
    };
    if quoted.kind == Kind::IcmpError {
        return Ok(false);
    }
    // The quote ends where the error's IP datagram does: whatever follows in the frame
    // (an Ethernet trailer) is no part of it, nor covered by the ICMP checksum, and must
    // not be read as quoted ports or rewritten as a quoted checksum.
    let ip_end = l3 + usize::from(read16(ctx, l3 + 2)?);
    if quoted.off + 8 > ip_end {
        return Ok(false);
    }
    // The quoted datagram travelled the other way: reversing its tuple gives the key.
    let flow: Tuple = quoted.tuple.reversed();
    // (packet end to change, old and new address/port)
    let (old, new) = match end {
        End::Source => {
            let Some(entry) = conntrack::original(&flow) else {
                return Ok(false);
            };
            // SAFETY: a CONNTRACK value the lookup returned, valid and aligned while the
            // program runs; copied at once.
            let e = unsafe { *entry };
            if e.rule == Rule::Untranslated as u8 {
                return Ok(false);
            }
            ((flow.src, flow.sport), (e.addr, e.port))
        }
        End::Destination => {
            let Some((rev, _)) = conntrack::reply(&flow) else {
                return Ok(false);
            };
            ((flow.dst, flow.dport), (rev.addr, rev.port))
        }
    };
    // The quoted datagram's field on our side: its destination on the way out (it was
    // addressed to us), its source on the way in (we sent it).
    let (q_addr_off, q_port_off) = match end {
        End::Source => (q_l3 + IP_DST, quoted.dport_off()),
        End::Destination => (q_l3 + IP_SRC, quoted.sport_off()),
    };
    let icmp_check_off = icmp.off + 2;
    let mut icmp_check = read16(ctx, icmp_check_off)?;

    // Quoted IP header: address and its checksum.
    let q_check_old = u16::from_be_bytes(quoted_ip.check);
    let q_check_new = checksum::replace4(q_check_old, old.0, new.0);
    icmp_check = checksum::replace4(icmp_check, old.0, new.0);
    icmp_check = checksum::replace(icmp_check, q_check_old, q_check_new);
    store(ctx, q_addr_off, &new.0)?;
    store(ctx, q_l3 + IP_CHECK, &q_check_new.to_be_bytes())?;

    // Quoted transport port and, when quoted and in use, its checksum.
    icmp_check = checksum::replace(
        icmp_check,
        u16::from_be_bytes(old.1),
        u16::from_be_bytes(new.1),
    );
    store(ctx, q_port_off, &new.1)?;
    let q_csum_off = quoted.csum_off();
    let q_sum = if q_csum_off + 2 <= ip_end {
        read16(ctx, q_csum_off).ok()
    } else {
        None
    };
    if let Some(q_sum_old) = q_sum {
        let skip = quoted.kind == Kind::Udp && q_sum_old == 0;
        if !skip {
            let mut q_sum_new = q_sum_old;
            if matches!(quoted.kind, Kind::Tcp | Kind::Udp) {
                q_sum_new = checksum::replace4(q_sum_new, old.0, new.0);
            }
            q_sum_new = checksum::replace(
                q_sum_new,
                u16::from_be_bytes(old.1),
                u16::from_be_bytes(new.1),
            );
            icmp_check = checksum::replace(icmp_check, q_sum_old, q_sum_new);
            store(ctx, q_csum_off, &q_sum_new.to_be_bytes())?;
        }
    }
    store(ctx, icmp_check_off, &icmp_check.to_be_bytes())?;

    // The error's own header: source on the way out, destination on the way in. The
    // ICMP checksum does not cover it.
    let outer_off = l3 + if end == End::Source { IP_SRC } else { IP_DST };
    let mut outer_old = [0u8; 4];
    if !load_exact(ctx, outer_off, &mut outer_old) {
        return Err(Reason::DropMalformed);
    }
    let ip_check = checksum::replace4(read16(ctx, l3 + IP_CHECK)?, outer_old, new.0);
    store(ctx, outer_off, &new.0)?;
    store(ctx, l3 + IP_CHECK, &ip_check.to_be_bytes())?;
    nat_event(NatEvent::IcmpErrorTranslated);
    Ok(true)
}

#[inline(always)]
fn read16(ctx: &TcContext, off: usize) -> Result<u16, Reason> {
    let mut b = [0u8; 2];
    if load_exact(ctx, off, &mut b) {
        Ok(u16::from_be_bytes(b))
    } else {
        Err(Reason::DropMalformed)
    }
}

#[inline(always)]
fn store<T>(ctx: &TcContext, off: usize, v: &T) -> Result<(), Reason> {
    ctx.store(off, v, 0).map_err(|_| Reason::DropHelperError)
}
