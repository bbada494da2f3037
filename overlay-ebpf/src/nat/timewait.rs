//! Handing a translated port on when the outside may still hold its tuple in TIME_WAIT.
//!
//! The end that sends the first FIN keeps the tuple in TIME_WAIT after the close (60 s
//! on Linux). When a pod closes first, that end is the pod, behind the translation, and
//! the port can go to a new flow at once. When the outside closes first (a server that
//! closes its connections), its TIME_WAIT accepts a new SYN on the tuple only if the
//! SYN is newer than the old connection: a newer timestamp (RFC 6191; Linux's
//! `tcp_timewait_state_process`), or without timestamps a sequence number beyond the
//! old one (RFC 1122 4.2.2.13). Any other SYN is answered with an ACK of the old
//! connection, the client resets it and sends its SYN again after a timeout: a stall of
//! 10 ms to a second per connection. Pods' timestamps and initial sequence numbers
//! start at random per connection, so such a port is given only to a SYN it accepts;
//! the FIN's marks this needs are kept in the flow's entry, and the decision itself is
//! `CtEntry::time_wait_accepts`.

use aya_ebpf::programs::TcContext;
use network_types::ip::Ipv4Hdr;
use overlay_common::conntrack::{CtEntry, Marks, flags};

use super::tuple::L4;
use crate::parse::{load_exact, tcp};

const TCP_MIN_LEN: usize = 20;
const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_TIMESTAMP: u8 = 8;
const OPT_TIMESTAMP_LEN: u8 = 10;
/// Options looked at before the timestamp is given up for missing. Stacks put it
/// early: the 3rd in a Linux SYN (MSS, SACK permitted), the 3rd after two NOPs in
/// later segments, the 6th in a macOS or FreeBSD SYN. A bound the verifier walks
/// quickly (each option may branch its walk in two).
const MAX_OPTIONS: usize = 8;

/// The marks of a TCP segment (`ip` its header, `l4` its transport view).
#[inline(always)]
fn marks(ctx: &TcContext, ip: &Ipv4Hdr, l4: &L4) -> Option<Marks> {
    let mut head = [0u8; TCP_MIN_LEN];
    if !load_exact(ctx, l4.off, &mut head) {
        return None;
    }
    let seq = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    let header = usize::from(head[12] >> 4) * 4;
    let payload = usize::from(ip.tot_len()).checked_sub(ip.ihl() as usize + header)?;
    // SYN and FIN each take one sequence number.
    let flags = l4.tcp_flags & (tcp::SYN | tcp::FIN);
    let seq_end = seq
        .wrapping_add(payload as u32)
        .wrapping_add(flags.count_ones());
    let options = header.checked_sub(TCP_MIN_LEN)?;
    Some(Marks {
        seq,
        seq_end,
        tsval: timestamp(ctx, l4.off + TCP_MIN_LEN, options),
    })
}

/// The TSval of the timestamp option among the `len` option bytes at `off`.
#[inline(always)]
fn timestamp(ctx: &TcContext, off: usize, len: usize) -> Option<u32> {
    let mut at = 0;
    for _ in 0..MAX_OPTIONS {
        if at >= len {
            return None;
        }
        let mut kind = [0u8; 2];
        if !load_exact(ctx, off + at, &mut kind) {
            return None;
        }
        match kind[0] {
            OPT_END => return None,
            OPT_NOP => at += 1,
            OPT_TIMESTAMP => {
                let mut ts = [0u8; OPT_TIMESTAMP_LEN as usize];
                if kind[1] != OPT_TIMESTAMP_LEN
                    || at + ts.len() > len
                    || !load_exact(ctx, off + at, &mut ts)
                {
                    return None;
                }
                return Some(u32::from_be_bytes([ts[2], ts[3], ts[4], ts[5]]));
            }
            _ if kind[1] < 2 => return None,
            _ => at += usize::from(kind[1]),
        }
    }
    None
}

/// The marks of a flow's first segment, when it is a SYN: what decides whether it may
/// take a port the outside holds in TIME_WAIT.
#[inline(always)]
pub(crate) fn syn(ctx: &TcContext, ip: &Ipv4Hdr, l4: &L4) -> Option<Marks> {
    if l4.tcp_flags & tcp::SYN == 0 {
        return None;
    }
    marks(ctx, ip, l4)
}

/// Keeps the marks of an inside FIN in the flow's entry: the last the outside saw
/// before its TIME_WAIT.
#[inline(always)]
pub(crate) fn record_fin(ctx: &TcContext, ip: &Ipv4Hdr, l4: &L4, entry: *mut CtEntry) {
    if l4.tcp_flags & tcp::FIN == 0 {
        return;
    }
    let Some(m) = marks(ctx, ip, l4) else {
        return;
    };
    // SAFETY: `entry` is a CONNTRACK value a lookup of this run returned, valid and
    // aligned while the program runs. Racing writers are packets of the same flow: the
    // last FIN's marks win.
    unsafe {
        (*entry).fin_seq_end = m.seq_end;
        match m.tsval {
            Some(tsval) => {
                (*entry).fin_tsval = tsval;
                (*entry).flags |= flags::FIN_TIMESTAMP;
            }
            None => (*entry).flags &= !flags::FIN_TIMESTAMP,
        }
    }
}
