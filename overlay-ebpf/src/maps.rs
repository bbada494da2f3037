//! The maps, as named in `overlay_common::maps::names`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use overlay_common::{
    Counter, DatapathConfig, PeerStats, Route,
    conntrack::{CtEntry, CtKey},
    counters::{COUNTER_SLOTS, NAT_EVENT_SLOTS},
    flows::{FILTER_WORDS, FLOW_ENTRIES, FlowKey, FlowState},
    maps::{CONNTRACK_ENTRIES, MAX_NODES, MAX_POD_PORTS, PodPort},
};

#[map(name = "ROUTES")]
pub(crate) static ROUTES: LpmTrie<[u8; 4], Route> = LpmTrie::with_max_entries(MAX_NODES, 0);

#[map(name = "PEERS")]
pub(crate) static PEERS: PerCpuHashMap<[u8; 4], PeerStats> =
    PerCpuHashMap::with_max_entries(MAX_NODES, 0);

#[map(name = "CONFIG")]
pub(crate) static CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);

#[map(name = "COUNTERS")]
pub(crate) static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Sized by the agent at load time (`map_max_entries`).
#[map(name = "CONNTRACK")]
pub(crate) static CONNTRACK: HashMap<CtKey, CtEntry> =
    HashMap::with_max_entries(CONNTRACK_ENTRIES, 0);

#[map(name = "NAT_EVENTS")]
pub(crate) static NAT_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NAT_EVENT_SLOTS, 0);

#[map(name = "POD_PORTS")]
pub(crate) static POD_PORTS: HashMap<[u8; 6], PodPort> =
    HashMap::with_max_entries(MAX_POD_PORTS, 0);

#[map(name = "FLOWS")]
pub(crate) static FLOWS: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(FLOW_ENTRIES, 0);

#[map(name = "FLOW_FILTER")]
pub(crate) static FLOW_FILTER: Array<u64> = Array::with_max_entries(FILTER_WORDS, 0);

/// This node's configuration, once the agent has written it.
#[inline(always)]
pub(crate) fn config() -> Option<&'static DatapathConfig> {
    CONFIG.get(0).filter(|c| c.node_ip != [0; 4])
}
