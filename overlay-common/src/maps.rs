//! Keys, values, names and sizes of the maps the agent fills and the datapath reads.

/// Map names as they appear in the object file and under the pin directory.
pub mod names {
    /// `LpmTrie<[u8; 4], Route>`: remote pod subnet -> the node that owns it.
    pub const ROUTES: &str = "ROUTES";
    /// `PerCpuHashMap<[u8; 4], PeerStats>`: tunnel addresses of known nodes; only these
    /// may send us IPIP. The value counts what each peer sent.
    pub const PEERS: &str = "PEERS";
    /// `Array<DatapathConfig>` with one entry.
    pub const CONFIG: &str = "CONFIG";
    /// `PerCpuArray<Counter>` indexed by [`crate::counters::index`].
    pub const COUNTERS: &str = "COUNTERS";
    /// `HashMap<CtKey, CtEntry>`: the masquerade connection table.
    pub const CONNTRACK: &str = "CONNTRACK";
    /// `PerCpuArray<u64>` indexed by [`crate::counters::NatEvent`].
    pub const NAT_EVENTS: &str = "NAT_EVENTS";
    /// `HashMap<[u8; 6], PodPort>`: a local pod's MAC address -> the host end of its
    /// veth on the pod bridge. Not pinned: the agent fills it again within a second of
    /// starting, from the bridge's forwarding table.
    pub const POD_PORTS: &str = "POD_PORTS";
    /// `LruHashMap<FlowKey, FlowState>`: the fast path's flow table
    /// ([`crate::flows`]). Pinned, so that flows stay on the fast path across restarts.
    pub const FLOWS: &str = "FLOWS";
    /// `Array<u64>` of [`crate::flows::FILTER_WORDS`]: a bit per hash slot of the flows
    /// the agent admitted ([`crate::flows::FlowKey::filter_bit`]). Pinned with `FLOWS`.
    pub const FLOW_FILTER: &str = "FLOW_FILTER";
}

/// Capacity of `POD_PORTS`: pods on one node (Kubernetes allows 110 by default).
pub const MAX_POD_PORTS: u32 = 1024;

/// Value of `POD_PORTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodPort {
    /// The host end of the pod's veth.
    pub ifindex: u32,
    /// The bridge it is a port of: used only when the FIB names that bridge.
    pub bridge: u32,
}

/// Default capacity of `CONNTRACK` (two entries per translated flow); the agent can
/// size it at load time.
pub const CONNTRACK_ENTRIES: u32 = 131_072;

/// Capacity of `ROUTES` and `PEERS`: Kubernetes supports 5,000 nodes per cluster; leave
/// room for nodes that own several subnets and for churn.
pub const MAX_NODES: u32 = 16_384;

/// `Route::flags`: the owning node is reached without a gateway through the uplink
/// and the network says `Backend.DirectRouting`: its pods' packets are not
/// encapsulated but left to the host, whose route (`podCIDR via <node> dev <uplink>`,
/// as flannel's host-gw) carries them as they are.
pub const ROUTE_DIRECT: u32 = 1 << 0;

/// `Route::flags`, beside `ROUTE_DIRECT`: the entry is no pod subnet but a directly
/// routed node's own address (/32). A pod's packet for it (the reply to a flow that
/// node's host masqueraded to its address, as MASQUERADE on the plain route does) then
/// leaves by the host's plain route, as under flanneld, where a tunnelled node's is
/// encapsulated. The programs read only `ROUTE_DIRECT`; this bit tells the agent's
/// views the entry apart from a subnet.
pub const ROUTE_NODE_ADDRESS: u32 = 1 << 1;

/// Value of `ROUTES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    /// Tunnel address of the node owning the subnet: the outer destination.
    pub node_ip: [u8; 4],
    /// `ROUTE_*` bits.
    pub flags: u32,
}

impl Route {
    pub const fn direct(&self) -> bool {
        self.flags & ROUTE_DIRECT != 0
    }

    pub const fn node_address(&self) -> bool {
        self.flags & ROUTE_NODE_ADDRESS != 0
    }
}

/// Value of `PEERS`: what a known node sent us (per CPU; the agent sums).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `#[repr(C)]` of integers and byte arrays with explicit padding fields (its
    // size is pinned by a test), so every byte is initialised and any bit pattern is valid.
    unsafe impl aya::Pod for super::Route {}
    // SAFETY: `#[repr(C)]` of integers and byte arrays with explicit padding fields (its
    // size is pinned by a test), so every byte is initialised and any bit pattern is valid.
    unsafe impl aya::Pod for super::PeerStats {}
    // SAFETY: `#[repr(C)]` of integers and byte arrays with explicit padding fields (its
    // size is pinned by a test), so every byte is initialised and any bit pattern is valid.
    unsafe impl aya::Pod for super::PodPort {}
}

/// Version of the map layout (names, key and value types, sizes). Pinned maps live
/// under a directory named after it, so a build with another layout never picks up
/// maps it cannot read.
pub const LAYOUT_VERSION: u32 = 7;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_fixed() {
        assert_eq!(size_of::<Route>(), 8);
        assert_eq!(size_of::<PeerStats>(), 16);
        assert_eq!(size_of::<PodPort>(), 8);
    }
}
