//! flannel's kernel backends, set up on a node the way flanneld sets them up: the
//! baselines of the benchmark, and the other side of the interoperability test.
//!
//! From flannel-io/flannel pkg/backend (ipip/ipip.go, vxlan/device.go,
//! vxlan/vxlan_network.go, hostgw/hostgw.go, route_network.go):
//!
//! - ipip: a device `flannel.ipip` (`netlink.Iptun` with only `Local` set: TTL 0 =
//!   inherit, PMTU discovery off, TOS 0), MTU = uplink - 20, the pod subnet's network
//!   address as a /32, up; per remote node `podCIDR via <node address> dev
//!   flannel.ipip onlink`.
//! - vxlan: a device `flannel.1` (VNI 1, local = the node address, dev = the uplink,
//!   port 0 = the kernel's 8472, no learning), MTU = uplink - 50, the network address as
//!   a /32, up; per remote node a permanent ARP entry for its network address with its
//!   VTEP MAC, an FDB entry sending that MAC to its node address, and `podCIDR via
//!   <its network address> dev flannel.1 onlink`.
//! - host-gw: per remote node `podCIDR via <node address> dev <uplink>`; MTU = uplink.
//!
//! flanneld publishes a node's VTEP MAC in a node annotation; here each node's MAC is
//! derived from its address, so every node can be set up without the others.
//!
//! The remote nodes are the lab's ([`Backend::configure`]), or those a subnet manager
//! gave, as flanneld on etcd learns them from the leases (`etcd::flanneld`).

use std::{net::Ipv4Addr, process::Command};

use anyhow::{Context as _, Result};
use ipnet::Ipv4Net;

use super::{
    agents::{SubnetEnv, UPLINK},
    netns,
    state::LabState,
    topology::Node,
};

/// The uplinks' MTU (veth default).
const UPLINK_MTU: u32 = 1500;
pub(crate) const IPIP_DEVICE: &str = "flannel.ipip";
const VXLAN_DEVICE: &str = "flannel.1";
const VXLAN_VNI: &str = "1";
/// Linux's own VXLAN port, which a port of 0 (flannel's default) selects.
const VXLAN_PORT: &str = "8472";

/// A remote node as flanneld routes to it: its subnet and its PublicIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Peer {
    pub subnet: Ipv4Net,
    pub address: Ipv4Addr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Ipip,
    Vxlan,
    HostGw,
}

impl Backend {
    /// FLANNEL_MTU: the uplink's less the encapsulation.
    pub(crate) fn mtu(self) -> u32 {
        match self {
            Backend::Ipip => UPLINK_MTU - 20,
            Backend::Vxlan => UPLINK_MTU - 50,
            Backend::HostGw => UPLINK_MTU,
        }
    }

    /// Sets `node` up with this backend towards every other node of the lab, and
    /// returns the subnet.env flanneld would have written.
    pub(crate) fn configure(self, lab: &LabState, node: &Node) -> Result<SubnetEnv> {
        let peers: Vec<Peer> = (lab.topology.nodes.iter())
            .filter(|p| p.name != node.name)
            .map(|p| Peer {
                subnet: p.pod_cidr,
                address: p.address,
            })
            .collect();
        self.configure_with(lab, node, node.pod_cidr, &peers)
    }

    /// [`Backend::configure`] with the node's subnet and its peers given: where
    /// flanneld learns them from its subnet manager rather than from the lab.
    pub(crate) fn configure_with(
        self,
        lab: &LabState,
        node: &Node,
        subnet: Ipv4Net,
        peers: &[Peer],
    ) -> Result<SubnetEnv> {
        let ns = lab.netns(&node.name);
        // The node as its subnet manager placed it.
        let leased = Node {
            pod_cidr: subnet,
            ..node.clone()
        };
        let network = format!("{}/32", subnet.network());
        let local = node.address.to_string();
        let mtu = self.mtu().to_string();
        match self {
            Backend::Ipip => {
                // The module makes the namespace's fallback device tunl0 too; a VM's
                // kernel has it, this machine's may not.
                let _ = netns::run(Command::new("modprobe").arg("ipip"));
                ip(
                    &ns,
                    &[
                        "link",
                        "add",
                        IPIP_DEVICE,
                        "type",
                        "ipip",
                        "local",
                        &local,
                        "ttl",
                        "inherit",
                        "nopmtudisc",
                    ],
                )?;
                ip(&ns, &["link", "set", IPIP_DEVICE, "mtu", &mtu])?;
                ip(&ns, &["address", "add", &network, "dev", IPIP_DEVICE])?;
                ip(&ns, &["link", "set", IPIP_DEVICE, "up"])?;
            }
            Backend::Vxlan => {
                ip(
                    &ns,
                    &[
                        "link",
                        "add",
                        VXLAN_DEVICE,
                        "address",
                        &vtep_mac(node.address),
                        "mtu",
                        &mtu,
                        "type",
                        "vxlan",
                        "id",
                        VXLAN_VNI,
                        "local",
                        &local,
                        "dev",
                        UPLINK,
                        "dstport",
                        VXLAN_PORT,
                        "nolearning",
                    ],
                )?;
                ip(&ns, &["address", "add", &network, "dev", VXLAN_DEVICE])?;
                ip(&ns, &["link", "set", VXLAN_DEVICE, "up"])?;
            }
            Backend::HostGw => {}
        }
        for peer in peers {
            self.route(&ns, peer)?;
        }
        // Like the agent, flanneld's hosts forward; the lab's nodes do already.
        netns::enable_forwarding(&ns)?;
        Ok(SubnetEnv {
            network: lab.topology.pod_network,
            subnet: Ipv4Net::new(leased.gateway(), subnet.prefix_len())?,
            mtu: self.mtu(),
            // As flannel's DaemonSet runs flanneld (kube-flannel.yml: --ip-masq), so
            // that the bridge plugin adds no masquerade of its own; where flanneld's
            // rules matter, they are installed as such (`iptables`).
            ipmasq: true,
        })
    }

    /// What flanneld installs for one remote node.
    fn route(self, ns: &str, peer: &Peer) -> Result<()> {
        let cidr = peer.subnet.to_string();
        let via = peer.address.to_string();
        match self {
            Backend::Ipip => ip(
                ns,
                &[
                    "route",
                    "replace",
                    &cidr,
                    "via",
                    &via,
                    "dev",
                    IPIP_DEVICE,
                    "onlink",
                ],
            ),
            Backend::HostGw => ip(ns, &["route", "replace", &cidr, "via", &via, "dev", UPLINK]),
            Backend::Vxlan => {
                let mac = vtep_mac(peer.address);
                let gateway = peer.subnet.network().to_string();
                ip(
                    ns,
                    &[
                        "neighbour",
                        "replace",
                        &gateway,
                        "lladdr",
                        &mac,
                        "dev",
                        VXLAN_DEVICE,
                        "nud",
                        "permanent",
                    ],
                )?;
                netns::run(Command::new("bridge").args([
                    "-n",
                    ns,
                    "fdb",
                    "append",
                    &mac,
                    "dev",
                    VXLAN_DEVICE,
                    "dst",
                    &via,
                    "self",
                    "permanent",
                ]))
                .context("adding a VXLAN FDB entry")?;
                ip(
                    ns,
                    &[
                        "route",
                        "replace",
                        &cidr,
                        "via",
                        &gateway,
                        "dev",
                        VXLAN_DEVICE,
                        "onlink",
                    ],
                )
            }
        }
    }
}

fn ip(ns: &str, args: &[&str]) -> Result<()> {
    netns::run(Command::new("ip").args(["-n", ns]).args(args)).map(drop)
}

/// A node's VTEP MAC: locally administered, from its address.
fn vtep_mac(address: Ipv4Addr) -> String {
    let [a, b, c, d] = address.octets();
    format!("0e:f1:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtus_and_macs_are_flannels() {
        assert_eq!(Backend::Ipip.mtu(), 1480);
        assert_eq!(Backend::Vxlan.mtu(), 1450);
        assert_eq!(Backend::HostGw.mtu(), 1500);
        assert_eq!(vtep_mac([172, 18, 0, 3].into()), "0e:f1:ac:12:00:03");
    }
}
