//! Typed access to the datapath's maps, from the loaded object or from their pins.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::Path,
};

use anyhow::{Context as _, Result};
use aya::maps::{
    Array, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues,
    lpm_trie::{Key, LpmTrie},
};
use ipnet::Ipv4Net;
use overlay_common::{
    Counter, DatapathConfig, Hook, PeerStats, Reason, Route,
    counters::{NatEvent, index},
    flows::{FlowKey, FlowState},
    maps::{PodPort, names},
};

use super::batch;

/// Opens a pinned map of the datapath by name.
pub fn open_pinned(pin_dir: &Path, name: &str) -> Result<Map> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening pinned map {} (is the agent running with this --bpffs?)",
            path.display()
        )
    })?;
    Ok(Map::from_map_data(data)?)
}

/// What a sync changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

/// `+added/~updated/-removed`: one token in a log line, whatever the log format.
impl std::fmt::Display for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "+{}/~{}/-{}", self.added, self.updated, self.removed)
    }
}

/// `ROUTES`: remote pod subnet -> owning node's tunnel address, and whether the
/// tunnel carries it.
pub struct Routes(LpmTrie<MapData, [u8; 4], Route>);

impl Routes {
    pub fn new(map: Map) -> Result<Self> {
        Ok(Self(LpmTrie::try_from(map).context(names::ROUTES)?))
    }

    pub fn entries(&self) -> Result<BTreeMap<Ipv4Net, Route>> {
        let mut out = BTreeMap::new();
        for entry in self.0.iter() {
            let (key, route) = entry?;
            let net = Ipv4Net::new(Ipv4Addr::from(key.data()), key.prefix_len() as u8)?;
            out.insert(net, route);
        }
        Ok(out)
    }

    /// Makes the map hold exactly `desired`.
    pub fn sync(&mut self, desired: &BTreeMap<Ipv4Net, Route>) -> Result<Changes> {
        let current = self.entries()?;
        let mut changes = Changes::default();
        for (net, route) in desired {
            match current.get(net) {
                Some(old) if old == route => continue,
                Some(_) => changes.updated += 1,
                None => changes.added += 1,
            }
            self.0.insert(&key(*net), route, 0)?;
        }
        for net in current.keys().filter(|n| !desired.contains_key(n)) {
            self.0.remove(&key(*net))?;
            changes.removed += 1;
        }
        Ok(changes)
    }
}

fn key(net: Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(net.prefix_len()), net.network().octets())
}

/// `PEERS`: the nodes allowed to send us IPIP, with what each sent.
pub struct Peers(PerCpuHashMap<MapData, [u8; 4], PeerStats>);

impl Peers {
    pub fn new(map: Map) -> Result<Self> {
        Ok(Self(PerCpuHashMap::try_from(map).context(names::PEERS)?))
    }

    /// Received traffic per peer, summed over CPUs.
    pub fn stats(&self) -> Result<BTreeMap<Ipv4Addr, PeerStats>> {
        let mut out = BTreeMap::new();
        for entry in self.0.iter() {
            let (addr, per_cpu) = entry?;
            let total = per_cpu.iter().fold(PeerStats::default(), |a, s| PeerStats {
                rx_packets: a.rx_packets + s.rx_packets,
                rx_bytes: a.rx_bytes + s.rx_bytes,
            });
            out.insert(Ipv4Addr::from(addr), total);
        }
        Ok(out)
    }

    /// Makes the map hold exactly `desired`; peers already present keep their counts.
    pub fn sync(&mut self, desired: &BTreeSet<Ipv4Addr>) -> Result<Changes> {
        let current: BTreeSet<Ipv4Addr> = self.stats()?.into_keys().collect();
        let mut changes = Changes::default();
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        for peer in desired.difference(&current) {
            let zero = PerCpuValues::try_from(vec![PeerStats::default(); cpus])?;
            self.0.insert(peer.octets(), zero, 0)?;
            changes.added += 1;
        }
        for peer in current.difference(desired) {
            self.0.remove(&peer.octets())?;
            changes.removed += 1;
        }
        Ok(changes)
    }
}

/// `CONFIG`: this node's datapath configuration.
pub struct Config(Array<MapData, DatapathConfig>);

impl Config {
    pub fn new(map: Map) -> Result<Self> {
        Ok(Self(Array::try_from(map).context(names::CONFIG)?))
    }

    pub fn get(&self) -> Result<DatapathConfig> {
        Ok(self.0.get(&0, 0)?)
    }

    pub fn set(&mut self, config: DatapathConfig) -> Result<()> {
        Ok(self.0.set(0, config, 0)?)
    }
}

/// `COUNTERS`: outcome counters per hook and reason.
pub struct Counters(PerCpuArray<MapData, Counter>);

impl Counters {
    pub fn new(map: Map) -> Result<Self> {
        Ok(Self(PerCpuArray::try_from(map).context(names::COUNTERS)?))
    }

    /// One (hook, reason) summed over CPUs.
    pub fn get(&self, hook: Hook, reason: Reason) -> Result<Counter> {
        let per_cpu = self.0.get(&index(hook, reason), 0)?;
        Ok(per_cpu.iter().fold(Counter::default(), |a, c| Counter {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
        }))
    }

    /// Every (hook, reason) with its total, in declaration order.
    pub fn all(&self) -> Result<Vec<(Hook, Reason, Counter)>> {
        let mut out = Vec::new();
        for hook in Hook::ALL {
            for reason in Reason::ALL {
                out.push((hook, reason, self.get(hook, reason)?));
            }
        }
        Ok(out)
    }
}

/// `NAT_EVENTS`: masquerade events.
pub struct NatEvents(PerCpuArray<MapData, u64>);

impl NatEvents {
    pub fn new(map: Map) -> Result<Self> {
        Ok(Self(PerCpuArray::try_from(map).context(names::NAT_EVENTS)?))
    }

    /// Every event with its total over CPUs.
    pub fn all(&self) -> Result<Vec<(NatEvent, u64)>> {
        NatEvent::ALL
            .iter()
            .map(|e| Ok((*e, self.0.get(&(*e as u32), 0)?.iter().sum())))
            .collect()
    }
}

/// `FLOWS` and `FLOW_FILTER`: the fast path's flow table and the filter the programs
/// read before they look a flow up in it (`overlay_common::flows`).
pub struct Flows {
    table: HashMap<MapData, FlowKey, FlowState>,
    filter: Array<MapData, u64>,
    /// What `filter` holds: the agent is its only writer.
    bits: Vec<u64>,
}

impl Flows {
    pub fn new(table: Map, filter: Map) -> Result<Self> {
        let table = HashMap::try_from(table).context(names::FLOWS)?;
        let filter = Array::try_from(filter).context(names::FLOW_FILTER)?;
        // Pinned: an earlier agent's bits stand for the flows it admitted.
        let bits = (0..filter.len())
            .map(|i| filter.get(&i, 0))
            .collect::<Result<_, _>>()
            .context("reading the flow filter")?;
        Ok(Self {
            table,
            filter,
            bits,
        })
    }

    /// Bits set in the filter.
    pub fn filter_bits_set(&self) -> u32 {
        self.bits.iter().map(|w| w.count_ones()).sum()
    }

    /// Whether `key`'s bit is set in the filter.
    pub fn in_filter(&self, key: &FlowKey) -> bool {
        let (word, mask) = key.filter_bit();
        self.bits[word as usize] & mask != 0
    }

    /// Sets `key`'s bit in the filter.
    fn mark(&mut self, key: &FlowKey) -> Result<()> {
        let (word, mask) = key.filter_bit();
        let held = self.bits[word as usize];
        if held & mask == 0 {
            self.write_word(word, held | mask)?;
        }
        Ok(())
    }

    fn write_word(&mut self, word: u32, value: u64) -> Result<()> {
        self.filter
            .set(word, value, 0)
            .context("writing the flow filter")?;
        self.bits[word as usize] = value;
        Ok(())
    }

    /// Leaves in the filter the bits of `admitted` (every direction still admitted),
    /// and no other: what a direction the table no longer admits needed goes. Returns
    /// how many words changed.
    pub fn keep_filter_to(&mut self, admitted: &[FlowKey]) -> Result<usize> {
        let mut want = vec![0u64; self.bits.len()];
        for key in admitted {
            let (word, mask) = key.filter_bit();
            want[word as usize] |= mask;
        }
        let mut changed = 0;
        for (word, value) in want.into_iter().enumerate() {
            if self.bits[word] != value {
                // Lossless: the filter has FILTER_WORDS words.
                self.write_word(word as u32, value)?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Every entry, as the kernel walks the table (the datapath changes it meanwhile).
    pub fn entries(&self) -> Result<Vec<(FlowKey, FlowState)>> {
        batch::entries(&self.table).context("reading the flow table")
    }

    /// Writes `new` for `key` if the entry still reads `old`, leaving what the
    /// datapath wrote since (a FIN, a new connection) in place. A write can still meet
    /// a packet's in the instant between: it then loses that packet's count or a
    /// generation, which sends the flow's next packet through the host, never one past
    /// it. Returns whether it wrote.
    pub fn update_if_unchanged(
        &mut self,
        key: &FlowKey,
        old: &FlowState,
        new: FlowState,
    ) -> Result<bool> {
        let current = match self.table.get(key, 0) {
            Ok(v) => v,
            Err(e) if absent(&e) => return Ok(false),
            Err(e) => return Err(e).context("reading a flow"),
        };
        // The datapath's own bookkeeping may move on; the state that decides may not.
        let same = current.admitted == old.admitted
            && current.flags == old.flags
            && current.seen_gen == old.seen_gen;
        if !same {
            return Ok(false);
        }
        let new = FlowState {
            host_packets: current.host_packets,
            last_fast_ns: current.last_fast_ns,
            ..new
        };
        // The filter first: the programs must find the bit of an admitted direction.
        if new.admitted != 0 {
            self.mark(key)?;
        }
        // EXIST: an entry the table evicted meanwhile stays evicted.
        match self
            .table
            .insert(key, new, u64::from(aya_obj::generated::BPF_EXIST))
        {
            Ok(()) => Ok(true),
            Err(e) if absent(&e) => Ok(false),
            Err(e) => Err(e).context("writing a flow"),
        }
    }

    /// Writes `state` for `key` whatever the entry holds (an admitted direction's bit
    /// set first).
    pub fn insert(&mut self, key: &FlowKey, state: FlowState) -> Result<()> {
        if state.admitted != 0 {
            self.mark(key)?;
        }
        self.table.insert(key, state, 0).context("writing a flow")
    }

    /// Removes `key`'s entry; returns whether there was one.
    pub fn remove(&mut self, key: &FlowKey) -> Result<bool> {
        match self.table.remove(key) {
            Ok(()) => Ok(true),
            Err(e) if absent(&e) => Ok(false),
            Err(e) => Err(e).context("removing a flow"),
        }
    }
}

/// Whether a map operation failed only because the key is not there.
fn absent(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// `POD_PORTS`: each local pod's MAC, with its veth and bridge (filled by
/// `pods::ports`).
pub struct PodPorts(HashMap<MapData, [u8; 6], PodPort>);

impl PodPorts {
    pub fn new(map: Map) -> Result<Self> {
        Ok(Self(HashMap::try_from(map).context(names::POD_PORTS)?))
    }

    pub fn entries(&self) -> Result<BTreeMap<[u8; 6], PodPort>> {
        Ok(self.0.iter().collect::<Result<_, _>>()?)
    }

    /// Makes the map hold exactly `desired` (the pods the bridge has learned).
    pub fn sync(&mut self, desired: &BTreeMap<[u8; 6], PodPort>) -> Result<Changes> {
        let current = self.entries()?;
        let mut changes = Changes::default();
        for (mac, port) in desired {
            match current.get(mac) {
                Some(p) if p == port => continue,
                Some(_) => changes.updated += 1,
                None => changes.added += 1,
            }
            self.0.insert(mac, port, 0)?;
        }
        for mac in current.keys().filter(|m| !desired.contains_key(*m)) {
            self.0.remove(mac)?;
            changes.removed += 1;
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_read_as_one_token() {
        let c = Changes {
            added: 3,
            updated: 0,
            removed: 12,
        };
        assert_eq!(c.to_string(), "+3/~0/-12");
    }
}
