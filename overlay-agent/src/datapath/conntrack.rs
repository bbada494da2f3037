//! The masquerade connection table from userspace: listing flows for operators, and
//! collecting expired entries (the datapath only ignores them).

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, Map, MapData};
use overlay_common::{
    conntrack::{CtEntry, CtKey, DIR_ORIGINAL, DIR_REPLY, Rule, flags},
    maps::names,
};

use super::batch;

/// A REPLY entry whose flow is missing is only collected after this long: the
/// datapath inserts the REPLY entry of a new flow just before its ORIGINAL entry.
const ORPHAN_GRACE: Duration = Duration::from_secs(10);

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One tracked flow, as an operator reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub proto: u8,
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    /// The translated source, for translated flows.
    pub translated: Option<(Ipv4Addr, u16)>,
    pub rule: Option<Rule>,
    pub flags: u8,
    pub expires_in: Duration,
    pub age: Duration,
}

impl Flow {
    pub fn state(&self) -> &'static str {
        let f = self.flags;
        match self.proto {
            6 if f & flags::RST != 0 => "reset",
            // The outside closed first: it holds the tuple in TIME_WAIT.
            6 if flags::outside_time_wait(f) => "time-wait",
            6 if flags::fin_both(f) => "closed",
            6 if f & (flags::FIN_ORIGINAL | flags::FIN_REPLY) != 0 => "closing",
            _ if f & flags::SEEN_REPLY != 0 => "established",
            _ => "unreplied",
        }
    }
}

/// What one collection pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    pub expired: usize,
    pub orphans: usize,
    /// Entries left in the table.
    pub remaining: usize,
}

pub struct Conntrack(HashMap<MapData, CtKey, CtEntry>);

/// The entries of the table at the start of a collection pass.
pub struct Snapshot(Vec<(CtKey, CtEntry)>);

fn reply_key_of(k: &CtKey, v: &CtEntry) -> CtKey {
    CtKey {
        src: k.dst,
        dst: v.addr,
        sport: k.dport,
        dport: v.port,
        proto: k.proto,
        dir: DIR_REPLY,
        _pad: [0; 2],
    }
}

fn original_key_of(k: &CtKey, v: &CtEntry) -> CtKey {
    CtKey {
        src: v.addr,
        dst: k.src,
        sport: v.port,
        dport: k.sport,
        proto: k.proto,
        dir: DIR_ORIGINAL,
        _pad: [0; 2],
    }
}

impl Conntrack {
    pub fn new(map: Map) -> Result<Self> {
        Ok(Self(HashMap::try_from(map).context(names::CONNTRACK)?))
    }

    fn entries(&self) -> Result<Vec<(CtKey, CtEntry)>> {
        batch::entries(&self.0).context("reading the connection table")
    }

    /// Live flows (ORIGINAL entries), oldest first.
    pub fn flows(&self) -> Result<Vec<Flow>> {
        let now = monotonic_ns();
        let mut out: Vec<Flow> = self
            .entries()?
            .into_iter()
            .filter(|(k, v)| k.dir == DIR_ORIGINAL && v.expires_ns > now)
            .map(|(k, v)| {
                let rule = Rule::from_u8(v.rule);
                Flow {
                    proto: k.proto,
                    src: (k.src.into(), u16::from_be_bytes(k.sport)),
                    dst: (k.dst.into(), u16::from_be_bytes(k.dport)),
                    translated: (rule != Some(Rule::Untranslated))
                        .then(|| (v.addr.into(), u16::from_be_bytes(v.port))),
                    rule,
                    flags: v.flags,
                    expires_in: Duration::from_nanos(v.expires_ns - now),
                    age: Duration::from_nanos(now.saturating_sub(v.created_ns)),
                }
            })
            .collect();
        out.sort_by_key(|f| std::cmp::Reverse(f.age));
        Ok(out)
    }

    /// Removes expired flows (both of their entries) and REPLY entries that lost
    /// their flow.
    pub fn collect(&mut self) -> Result<Collected> {
        let snapshot = self.snapshot()?;
        self.sweep(snapshot)
    }

    /// The table as a collection pass starts from.
    pub fn snapshot(&self) -> Result<Snapshot> {
        Ok(Snapshot(self.entries()?))
    }

    /// The removals of a collection pass over `snapshot`. The datapath goes on meanwhile:
    /// a new flow may take over the port of an entry the snapshot shows expired or
    /// orphaned (the REPLY key is the port). So every entry is read again just before
    /// it goes, and stays if it changed: removing a new flow's REPLY entry would leave
    /// its replies untranslated, and the connection would time out.
    pub fn sweep(&mut self, snapshot: Snapshot) -> Result<Collected> {
        let now = monotonic_ns();
        let listed = snapshot.0.len();
        let mut removed = 0;
        let mut remove = |map: &mut HashMap<MapData, CtKey, CtEntry>, k: &CtKey| {
            if map.remove(k).is_ok() {
                removed += 1;
            }
        };
        let (originals, replies): (Vec<_>, Vec<_>) = snapshot
            .0
            .into_iter()
            .partition(|(k, _)| k.dir == DIR_ORIGINAL);
        let mut done = Collected::default();
        let mut live = std::collections::HashMap::new();
        let mut gone = std::collections::HashSet::new();
        for (k, v) in originals {
            if v.expires_ns > now {
                live.insert(k, v);
                continue;
            }
            // The datapath may have revived the flow since the snapshot.
            if self.0.get(&k, 0).is_ok_and(|now_v| now_v.expires_ns > now) {
                continue;
            }
            remove(&mut self.0, &k);
            if v.rule != Rule::Untranslated as u8 {
                let reply = reply_key_of(&k, &v);
                // Still this flow's: it leads back to it, and is no younger than it.
                if self.0.get(&reply, 0).is_ok_and(|r| {
                    r.addr == k.src && r.port == k.sport && r.created_ns <= v.created_ns
                }) {
                    remove(&mut self.0, &reply);
                }
                gone.insert(reply);
            }
            done.expired += 1;
        }
        for (k, v) in replies {
            if gone.contains(&k) {
                continue;
            }
            let owned = live
                .get(&original_key_of(&k, &v))
                .is_some_and(|o: &CtEntry| o.addr == k.dst && o.port == k.dport);
            let unchanged = || self.0.get(&k, 0).is_ok_and(|now_v| now_v == v);
            if !owned
                && now.saturating_sub(v.created_ns) > ORPHAN_GRACE.as_nanos() as u64
                && unchanged()
            {
                remove(&mut self.0, &k);
                done.orphans += 1;
            }
        }
        // As the snapshot showed the table, less what went: no walk of the table again.
        done.remaining = listed.saturating_sub(removed);
        Ok(done)
    }
}
