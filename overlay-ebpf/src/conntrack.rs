//! The masquerade connection table: lookups, state updates and flow creation with
//! collision-free port allocation.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
};
use overlay_common::{
    DatapathConfig,
    conntrack::{CtEntry, CtKey, DIR_ORIGINAL, DIR_REPLY, Marks, Rule, flags},
    counters::NatEvent,
    flows::FlowKey,
};

use crate::maps::CONNTRACK;

const NS_PER_SEC: u64 = 1_000_000_000;
/// A deadline is rewritten only when it moves by more than this: keeps the hot path
/// from writing the shared entry on every packet.
const REFRESH_SLACK_NS: u64 = NS_PER_SEC;
/// Ports tried before a new flow is refused.
const PORT_TRIES: u32 = 32;
/// Distance between successive candidate ports (a prime).
const PORT_STRIDE: u32 = 7919;
const E2BIG: i32 = 7;
const ENOMEM: i32 = 12;

/// A flow as seen by one packet: addresses and ports in network order.
#[derive(Clone, Copy)]
pub(crate) struct Tuple {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
}

impl Tuple {
    pub(crate) fn key(&self, dir: u8) -> CtKey {
        CtKey {
            src: self.src,
            dst: self.dst,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            dir,
            _pad: [0; 2],
        }
    }

    /// The same direction as a key of the fast path's flow table.
    pub(crate) fn flow_key(&self) -> FlowKey {
        FlowKey {
            src: self.src,
            dst: self.dst,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    /// The tuple of a packet going the other way.
    pub(crate) fn reversed(&self) -> Tuple {
        Tuple {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
        }
    }
}

/// Why a new flow could not be created.
pub(crate) enum CreateError {
    TableFull,
    PortsExhausted,
}

/// CLOCK_MONOTONIC at the last tick: what the agent's CLOCK_MONOTONIC reads, at most
/// a tick behind, which deadlines in seconds do not mind. It reads no clock source:
/// per packet, a clock source read is costly,
/// as the kernel's connection tracking avoids too (it counts in jiffies).
#[inline(always)]
fn now() -> u64 {
    // SAFETY: a helper without arguments; it reads the kernel's coarse clock.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The live ORIGINAL entry for `t` (expired entries count as absent; the agent's
/// collector removes them).
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values by reference: passed by value, the compiler builds other, larger programs, with more stack than older kernels' verifiers allow"
)]
#[inline(always)]
pub(crate) fn original(t: &Tuple) -> Option<*mut CtEntry> {
    let entry = CONNTRACK.get_ptr_mut(&t.key(DIR_ORIGINAL))?;
    // SAFETY: a value the lookup just returned, valid and aligned while the program
    // runs (the map frees a deleted entry only after an RCU grace period).
    (unsafe { (*entry).expires_ns } > now()).then_some(entry)
}

/// The live flow a reply tuple belongs to: the REPLY entry (which holds the original
/// source) and the flow's ORIGINAL entry.
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values by reference: passed by value, the compiler builds other, larger programs, with more stack than older kernels' verifiers allow"
)]
#[inline(always)]
pub(crate) fn reply(t: &Tuple) -> Option<(CtEntry, *mut CtEntry)> {
    // SAFETY: as in `original`: a value the lookup returned, copied at once.
    let rev = unsafe { *CONNTRACK.get_ptr(&t.key(DIR_REPLY))? };
    // The ORIGINAL key: the original source talking to the reply's sender.
    let orig = Tuple {
        src: rev.addr,
        dst: t.src,
        sport: rev.port,
        dport: t.sport,
        proto: t.proto,
    };
    let entry = original(&orig)?;
    // The flow must still be translated to this reply's destination: once a flow
    // expires and starts over on another port, the REPLY entry of its old port lingers
    // until the agent collects it, and must not lead to the new flow.
    // SAFETY: as in `original`; other CPUs write only whole fields of this flow.
    let e = unsafe { &*entry };
    if e.addr != t.dst || e.port != t.dport {
        return None;
    }
    Some((rev, entry))
}

/// Records that a packet with TCP flags `tcp` (0 for other protocols) went through
/// the flow, in the reply direction if `is_reply`, and extends its deadline. Returns
/// whether the entry was written (at most about once a second on a steady flow).
#[inline(always)]
pub(crate) fn touch(
    cfg: &DatapathConfig,
    entry: *mut CtEntry,
    proto: u8,
    tcp: u8,
    is_reply: bool,
) -> bool {
    use crate::parse::tcp::{ACK, FIN, RST, SYN};
    // SAFETY: `entry` is a CONNTRACK value a lookup of this run returned (`original`,
    // `reply`, `create`), valid and aligned while the program runs.
    let old = unsafe { (*entry).flags };
    let mut new = old;
    // A SYN from the inside on a tuple that is over opens a new connection on it (the
    // pod reusing its port): it starts afresh, keeping its translation.
    if !is_reply && tcp & (SYN | ACK) == SYN && flags::closed(old) {
        new = 0;
    }
    if is_reply {
        new |= flags::SEEN_REPLY;
    }
    if tcp & RST != 0 {
        new |= flags::RST;
    }
    if tcp & FIN != 0 {
        new |= if is_reply {
            flags::FIN_REPLY
        } else {
            flags::FIN_ORIGINAL
        };
        // Only a translated flow's port is handed on; an untranslated one's TIME_WAIT
        // is the pod's business.
        if is_reply
            && old & flags::FIN_ORIGINAL == 0
            // SAFETY: as above.
            && unsafe { (*entry).rule } != Rule::Untranslated as u8
        {
            new |= flags::REPLY_CLOSED_FIRST;
        }
    }
    let expires = now() + u64::from(cfg.ct_timeouts.for_state(proto, new)) * NS_PER_SEC;
    // SAFETY: as above. Racing writers from other CPUs can only lose a refresh or a flag
    // bit of the same flow, which the next packet restores.
    unsafe {
        if new != old {
            (*entry).flags = new;
        }
        let current = (*entry).expires_ns;
        let refresh = new != old || expires > current + REFRESH_SLACK_NS || expires < current;
        if refresh {
            (*entry).expires_ns = expires;
        }
        refresh
    }
}

/// Tracks a flow that is not translated (so that its replies are not either).
#[inline(always)]
pub(crate) fn track_untranslated(
    cfg: &DatapathConfig,
    t: &Tuple,
) -> Result<*mut CtEntry, CreateError> {
    insert_original(cfg, t, t.src, t.sport, Rule::Untranslated as u8, now())
}

/// Creates a translated flow for `t`: claims a REPLY key for a free port of the
/// configured range on `nat_ip`, then the ORIGINAL entry. Returns the ORIGINAL entry.
/// `syn`: the marks of the flow's first segment if it is a TCP SYN.
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values by reference: passed by value, the compiler builds other, larger programs, with more stack than older kernels' verifiers allow"
)]
#[inline(always)]
pub(crate) fn create(
    cfg: &DatapathConfig,
    t: &Tuple,
    nat_ip: [u8; 4],
    rule: u8,
    syn: Option<&Marks>,
) -> Result<*mut CtEntry, CreateError> {
    let span = u32::from(cfg.nat_port_max.saturating_sub(cfg.nat_port_min)) + 1;
    // SAFETY: a helper without arguments; it reads the kernel's pseudo-random state.
    let start = unsafe { bpf_get_prandom_u32() } % span;
    let born = now();
    // A prime stride over the range gives a fresh candidate on every try, unless the
    // range is a multiple of it: then every try would be the same port (a range of
    // 7919 ports exhausted by one taken port); step by one there.
    let stride = if span % PORT_STRIDE == 0 {
        1
    } else {
        PORT_STRIDE
    };
    for i in 0..PORT_TRIES {
        let port = (cfg.nat_port_min as u32 + (start + i * stride) % span) as u16;
        let port = port.to_be_bytes();
        let reply = reply_tuple(t, nat_ip, port);
        let value = reply_entry(t, rule, born);
        match CONNTRACK.insert(&reply.key(DIR_REPLY), &value, u64::from(BPF_NOEXIST)) {
            Ok(()) => {}
            Err(e) if e == -E2BIG || e == -ENOMEM => return Err(CreateError::TableFull),
            // Taken by a flow that is over: take the port over (the collector would
            // free it only at its next sweep).
            Err(_) if reclaim(&reply, &value, born, syn) => {}
            // Taken (by a live flow, or one being created): try another port.
            Err(_) => {
                crate::counters::nat_event(NatEvent::PortCollision);
                continue;
            }
        }
        return match insert_original(cfg, t, nat_ip, port, rule, born) {
            Ok(entry) => Ok(entry),
            Err(e) => {
                let _ = CONNTRACK.remove(&reply.key(DIR_REPLY));
                Err(e)
            }
        };
    }
    Err(CreateError::PortsExhausted)
}

/// A REPLY entry whose flow is gone may be a flow being created on another CPU (its
/// REPLY entry comes first): only one older than this is an orphan.
const ORPHAN_AGE_NS: u64 = 2 * NS_PER_SEC;

/// Takes over the REPLY slot of `reply` for `value` when the flow holding it is over:
/// expired (not collected yet), reset, closed in both directions (if the outside
/// closed first, only for a SYN its TIME_WAIT accepts: [`timewait`]), or gone and the
/// slot an old orphan. A closed TCP flow's port is reused at once, as the kernel's NAT
/// reuses a tuple in TIME_WAIT: a connection rate to one destination is otherwise
/// bound by ports ÷ (the closed timeout + the collector's interval). The old flow's ORIGINAL entry goes too, so that a late packet of it cannot
/// be translated to the port's new owner.
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values by reference: passed by value, the compiler builds other, larger programs, with more stack than older kernels' verifiers allow"
)]
#[inline(always)]
fn reclaim(reply: &Tuple, value: &CtEntry, now: u64, syn: Option<&Marks>) -> bool {
    const TCP: u8 = 6;
    let key = reply.key(DIR_REPLY);
    let Some(old) = CONNTRACK.get_ptr(&key) else {
        // Removed meanwhile: the next candidate port is as good.
        return false;
    };
    // SAFETY: as in `original`: a value the lookup returned, copied at once.
    let old = unsafe { *old };
    let old_flow = Tuple {
        src: old.addr,
        dst: reply.src,
        sport: old.port,
        dport: reply.sport,
        proto: reply.proto,
    };
    let old_key = old_flow.key(DIR_ORIGINAL);
    let owner = CONNTRACK
        .get_ptr(&old_key)
        // SAFETY: as in `original`: a value the lookup returned, copied at once.
        .map(|e| unsafe { *e })
        .filter(|e| e.addr == reply.dst && e.port == reply.dport);
    let over = match owner {
        Some(e) => {
            // Over, and the outside holds no TIME_WAIT the new flow's SYN would hit.
            let free = flags::closed(e.flags)
                && (!flags::outside_time_wait(e.flags)
                    || syn.is_some_and(|syn| e.time_wait_accepts(syn)));
            e.expires_ns <= now || (reply.proto == TCP && free)
        }
        None => now.saturating_sub(old.created_ns) > ORPHAN_AGE_NS,
    };
    if !over {
        return false;
    }
    if owner.is_some() {
        let _ = CONNTRACK.remove(&old_key);
    }
    CONNTRACK.insert(&key, value, 0).is_ok()
}

/// Puts back the REPLY entry of the translated flow `entry` (`t` its original tuple)
/// if it is missing: the agent's collector may remove it in the instant the flow's
/// port changes hands, and the flow's answers would then find no way back. Called for
/// a SYN sent again (the connection then costs one retry) and whenever an outgoing
/// packet refreshes a flow's deadline (a datagram flow, which has no SYN, recovers
/// within about a second).
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values by reference: passed by value, the compiler builds other, larger programs, with more stack than older kernels' verifiers allow"
)]
#[inline(always)]
pub(crate) fn restore_reply(t: &Tuple, entry: &CtEntry) {
    let key = reply_tuple(t, entry.addr, entry.port).key(DIR_REPLY);
    // Taken (its own entry, or a port that moved on meanwhile): left as it is. Almost
    // always so; a lookup sees it without the bucket lock a refused insert takes.
    if CONNTRACK.get_ptr(&key).is_some() {
        return;
    }
    // Born with its flow, as at creation: the collector removes it with the flow.
    let value = reply_entry(t, entry.rule, entry.created_ns);
    let _ = CONNTRACK.insert(&key, &value, u64::from(BPF_NOEXIST));
}

/// The REPLY entry of a flow with original tuple `t`, created at `born`: it leads
/// replies back to the original source.
#[inline(always)]
fn reply_entry(t: &Tuple, rule: u8, born: u64) -> CtEntry {
    // Every field spelled out: `..CtEntry::default()` compiled to a call to memset, a
    // subprogram whose frame the 512-byte limit of a call chain counts before 6.4.
    CtEntry {
        expires_ns: 0,
        created_ns: born,
        addr: t.src,
        port: t.sport,
        flags: 0,
        rule,
        fin_seq_end: 0,
        fin_tsval: 0,
    }
}

/// The tuple replies to `t` carry once its source is translated to `nat_ip:port`.
#[inline(always)]
fn reply_tuple(t: &Tuple, nat_ip: [u8; 4], port: [u8; 2]) -> Tuple {
    Tuple {
        src: t.dst,
        dst: nat_ip,
        sport: t.dport,
        dport: port,
        proto: t.proto,
    }
}

#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values by reference: passed by value, the compiler builds other, larger programs, with more stack than older kernels' verifiers allow"
)]
#[inline(always)]
fn insert_original(
    cfg: &DatapathConfig,
    t: &Tuple,
    addr: [u8; 4],
    port: [u8; 2],
    rule: u8,
    born: u64,
) -> Result<*mut CtEntry, CreateError> {
    let expires = born + u64::from(cfg.ct_timeouts.for_state(t.proto, 0)) * NS_PER_SEC;
    // Every field spelled out, as in `reply_entry`.
    let value = CtEntry {
        expires_ns: expires,
        created_ns: born,
        addr,
        port,
        flags: 0,
        rule,
        fin_seq_end: 0,
        fin_tsval: 0,
    };
    let key = t.key(DIR_ORIGINAL);
    match CONNTRACK.insert(&key, &value, 0) {
        Ok(()) => CONNTRACK.get_ptr_mut(&key).ok_or(CreateError::TableFull),
        Err(_) => Err(CreateError::TableFull),
    }
}
