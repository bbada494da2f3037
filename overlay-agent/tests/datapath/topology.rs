//! Addresses of the test node (w1) and of the cluster around it.
//!
//! One place for every address, so that what the fixture builds and what the tests
//! expect cannot drift apart.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Mac(pub [u8; 6]);

/// Formats a MAC address as `ip` wants it.
impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// This node's tunnel address, on the uplink eth0.
pub(super) const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 3);
/// Another address of this node (a second IP of a host process's): rule 6 translates
/// what leaves from it, as from any source but the uplink's own.
pub(super) const NODE_OTHER_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 3);
pub(super) const ETH0_MAC: Mac = Mac([0x02, 0x00, 0xac, 0x12, 0x00, 0x03]);
/// The other end of the uplink's veth (never addressed; it only gives eth0 a carrier).
pub(super) const UNDERLAY_PEER_MAC: Mac = Mac([0x02, 0x00, 0xac, 0x12, 0xff, 0xff]);

/// This node's pod subnet, its gateway on cni0, and a pod with a resolved neighbour.
pub(super) const CLUSTER: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 244, 0, 0), 16);
pub(super) const POD_SUBNET: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 244, 1, 0), 24);
pub(super) const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
pub(super) const CNI0_MAC: Mac = Mac([0x02, 0x00, 0x0a, 0xf4, 0x01, 0x01]);
pub(super) const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
pub(super) const POD_MAC: Mac = Mac([0x02, 0x00, 0x0a, 0xf4, 0x01, 0x02]);
/// The bridge port of the pod's veth.
pub(super) const POD_PORT_MAC: Mac = Mac([0x02, 0x00, 0x0a, 0xf4, 0x01, 0xfe]);
/// A pod address of this node with no neighbour entry.
pub(super) const POD_UNRESOLVED: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);

/// The underlay router, and the network only it reaches (with a locked route MTU).
pub(super) const ROUTER: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 1);
pub(super) const ROUTER_MAC: Mac = Mac([0x02, 0x00, 0xac, 0x12, 0x00, 0x01]);
pub(super) const BEHIND_ROUTER: &str = "172.19.0.0/24";
pub(super) const BEHIND_ROUTER_MTU: u16 = 1400;
/// The uplink's MTU (veth default).
pub(super) const UPLINK_MTU: u16 = 1500;

pub(super) const W2_MAC: Mac = Mac([0x02, 0x00, 0xac, 0x12, 0x00, 0x04]);

/// A remote node as ROUTES knows it, and how the underlay reaches it from here.
#[derive(Clone, Copy, Debug)]
pub(super) struct Remote {
    pub node: Ipv4Addr,
    pub subnet: Ipv4Net,
    /// A pod in `subnet`.
    pub pod: Ipv4Addr,
    /// The MAC of the next hop towards `node`, if the neighbour is resolved.
    pub next_hop_mac: Option<Mac>,
    /// MTU of the underlay route to `node`.
    pub mtu: u16,
}

const fn net(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len)
}

/// w2: on the uplink's link, neighbour resolved.
pub(super) const W2: Remote = Remote {
    node: Ipv4Addr::new(172, 18, 0, 4),
    subnet: net(10, 244, 2, 0, 24),
    pod: Ipv4Addr::new(10, 244, 2, 7),
    next_hop_mac: Some(W2_MAC),
    mtu: UPLINK_MTU,
};
/// w3: behind the router, so its frames carry the router's MAC.
pub(super) const W3: Remote = Remote {
    node: Ipv4Addr::new(172, 19, 0, 2),
    subnet: net(10, 244, 3, 0, 24),
    pod: Ipv4Addr::new(10, 244, 3, 9),
    next_hop_mac: Some(ROUTER_MAC),
    mtu: BEHIND_ROUTER_MTU,
};
/// w4: on the link but without a neighbour entry: the kernel must resolve it.
pub(super) const W4: Remote = Remote {
    node: Ipv4Addr::new(172, 18, 0, 9),
    subnet: net(10, 244, 4, 0, 24),
    pod: Ipv4Addr::new(10, 244, 4, 4),
    next_hop_mac: None,
    mtu: UPLINK_MTU,
};
/// w5: in ROUTES, but the underlay has no route to its address at all.
pub(super) const W5: Remote = Remote {
    node: Ipv4Addr::new(192, 0, 2, 5),
    subnet: net(10, 244, 5, 0, 24),
    pod: Ipv4Addr::new(10, 244, 5, 5),
    next_hop_mac: None,
    mtu: 0,
};

/// Every entry of ROUTES.
pub(super) const REMOTES: [Remote; 4] = [W2, W3, W4, W5];
/// PEERS: the nodes allowed to send us IPIP (w4 and w5 are not).
pub(super) const PEERS: [Ipv4Addr; 2] = [W2.node, W3.node];

/// An address on the underlay that is no node.
pub(super) const STRANGER: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 66);

/// Addresses outside the cluster and the underlay: an Internet server pods talk to,
/// another one, and a router on the way that reports errors.
pub(super) const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub(super) const OUTSIDE_2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
pub(super) const OUTSIDE_ROUTER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 254);
