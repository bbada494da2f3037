//! Converges the datapath maps and the host's routes on the node set: computes the
//! desired state from the nodes, then applies only the difference. Running it twice
//! with the same input changes nothing the second time.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
};

use anyhow::{Context as _, Result};
use ipnet::Ipv4Net;
use overlay_common::{DatapathConfig, Hook, config::FLAG_MASQUERADE};
use thiserror::Error;
use tracing::{info, warn};

use crate::{
    datapath::{Datapath, maps::Changes},
    host::{self, Host, OverlayRoute},
    masq,
    nodes::{NodeError, NodeInfo, NodeSet},
    subnet_env::SubnetEnv,
};

/// Outer IPv4 header overhead.
pub const IPIP_OVERHEAD: u32 = 20;

/// What the node set asks of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub own: NodeInfo,
    /// Remote pod subnet -> owning node's tunnel address.
    pub remotes: BTreeMap<Ipv4Net, Ipv4Addr>,
    /// Tunnel addresses allowed to send us IPIP.
    pub peers: BTreeSet<Ipv4Addr>,
    /// Nodes left out, and why.
    pub skipped: Vec<String>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DesiredError {
    #[error("this node ({0}) is not in the node list")]
    OwnMissing(String),
    #[error("this node is unusable: {0}")]
    OwnInvalid(NodeError),
}

impl Desired {
    pub fn compute(set: &NodeSet, own_name: &str) -> Result<Self, DesiredError> {
        if let Some(e) = set.errors.iter().find(|e| e.node() == Some(own_name)) {
            return Err(DesiredError::OwnInvalid(e.clone()));
        }
        let own = set
            .nodes
            .iter()
            .find(|n| n.name == own_name)
            .cloned()
            .ok_or_else(|| DesiredError::OwnMissing(own_name.to_owned()))?;
        let mut skipped: Vec<String> = set.errors.iter().map(ToString::to_string).collect();
        let mut remotes = BTreeMap::new();
        let mut owners: BTreeMap<Ipv4Net, &str> = BTreeMap::new();
        // Nodes are sorted by name, so the first claim of a subnet wins deterministically.
        for node in set.nodes.iter().filter(|n| n.name != own_name) {
            if node.pod_cidr.contains(&own.pod_cidr) || own.pod_cidr.contains(&node.pod_cidr) {
                skipped.push(format!(
                    "node {}: podCIDR {} overlaps this node's {}",
                    node.name, node.pod_cidr, own.pod_cidr
                ));
                continue;
            }
            if node.tunnel_ip == own.tunnel_ip {
                skipped.push(format!(
                    "node {}: tunnel address {} is this node's own",
                    node.name, node.tunnel_ip
                ));
                continue;
            }
            if let Some(first) = owners.get(&node.pod_cidr) {
                skipped.push(format!(
                    "node {}: podCIDR {} is already claimed by node {first}",
                    node.name, node.pod_cidr
                ));
                continue;
            }
            owners.insert(node.pod_cidr, &node.name);
            remotes.insert(node.pod_cidr, node.tunnel_ip);
        }
        let peers = remotes.values().copied().collect();
        Ok(Self {
            own,
            remotes,
            peers,
            skipped,
        })
    }
}

/// The node's uplink.
#[derive(Debug, Clone)]
pub struct Uplink {
    pub name: String,
    pub ifindex: u32,
    pub mtu: u32,
    /// Its first IPv4 address: what masquerade translates pod traffic to (rule 5).
    pub address: Ipv4Addr,
}

impl Uplink {
    pub async fn find(host: &Host, name: &str) -> Result<Self> {
        let ifindex = host::ifindex_by_name(name).with_context(|| {
            format!("uplink interface {name} does not exist in this network namespace (--iface)")
        })?;
        let mtu = host.mtu(ifindex).await?;
        let address = *host
            .addresses(Some(ifindex))
            .await?
            .first()
            .with_context(|| format!("uplink interface {name} has no IPv4 address"))?;
        Ok(Self {
            name: name.to_owned(),
            ifindex,
            mtu,
            address,
        })
    }

    /// MTU left for pods once the outer header is added.
    pub fn pod_mtu(&self) -> u32 {
        self.mtu - IPIP_OVERHEAD
    }
}

/// What one pass changed.
#[derive(Debug, Default)]
pub struct Outcome {
    pub map_routes: Changes,
    pub map_peers: Changes,
    pub kernel_routes: Changes,
    pub bridge_attached: bool,
    pub unreachable_peers: usize,
}

/// What the node is told to be, besides the node set.
pub struct NodeSettings {
    pub uplink: Uplink,
    pub bridge: String,
    pub network: Ipv4Net,
    pub subnet_file: PathBuf,
    pub masq: masq::Settings,
}

pub struct Reconciler {
    pub host: Host,
    pub settings: NodeSettings,
    subnet_env: Option<SubnetEnv>,
    config: Option<DatapathConfig>,
}

impl Reconciler {
    pub fn new(host: Host, settings: NodeSettings) -> Self {
        Self {
            host,
            settings,
            subnet_env: None,
            config: None,
        }
    }

    /// The datapath configuration for `desired` under these settings.
    pub fn datapath_config(&self, desired: &Desired) -> DatapathConfig {
        let s = &self.settings;
        DatapathConfig {
            node_ip: desired.own.tunnel_ip.octets(),
            pod_subnet: desired.own.pod_cidr.network().octets(),
            pod_prefix_len: desired.own.pod_cidr.prefix_len(),
            cluster_net: s.network.network().octets(),
            cluster_prefix_len: s.network.prefix_len(),
            masq_ip: s.uplink.address.octets(),
            flags: if s.masq.enabled { FLAG_MASQUERADE } else { 0 },
            _pad: 0,
            nat_port_min: *s.masq.ports.start(),
            nat_port_max: *s.masq.ports.end(),
            ct_timeouts: s.masq.timeouts,
        }
    }

    /// One pass: datapath maps first (so encapsulation is ready before routes steer
    /// traffic to it), then kernel routes, the bridge, and subnet.env.
    pub async fn apply(&mut self, dp: &mut Datapath, desired: &Desired) -> Result<Outcome> {
        let config = self.datapath_config(desired);
        if self.config != Some(config) {
            if !self.settings.network.contains(&desired.own.pod_cidr) {
                warn!(pod_cidr = %desired.own.pod_cidr, network = %self.settings.network, "this node's podCIDR is outside the Network of net-conf.json");
            }
            if !self
                .host
                .addresses(None)
                .await?
                .contains(&desired.own.tunnel_ip)
            {
                warn!(address = %desired.own.tunnel_ip, "this node's tunnel address is not assigned to any local interface: tunnelled packets will not arrive");
            }
            dp.config.set(config)?;
            self.config = Some(config);
            info!(
                node = desired.own.name,
                address = %desired.own.tunnel_ip,
                pod_cidr = %desired.own.pod_cidr,
                masquerade = self.settings.masq.enabled,
                "datapath configured"
            );
        }
        let mut outcome = Outcome {
            map_routes: dp.routes.sync(&desired.remotes)?,
            map_peers: dp.peers.sync(&desired.peers)?,
            ..Outcome::default()
        };
        (outcome.kernel_routes, outcome.unreachable_peers) = self.sync_routes(desired).await?;
        outcome.bridge_attached = self.sync_bridge(dp).await?;

        let s = &self.settings;
        let env = SubnetEnv::new(
            s.network,
            desired.own.pod_cidr,
            s.uplink.pod_mtu(),
            s.masq.enabled,
        );
        if self.subnet_env.as_ref() != Some(&env) {
            env.write(&s.subnet_file)?;
            info!(path = %s.subnet_file.display(), subnet = %env.subnet, mtu = env.mtu, "subnet.env written");
            self.subnet_env = Some(env);
        }
        Ok(outcome)
    }

    /// Installs a route per remote subnet via the next hop towards its node, and
    /// removes our routes that are no longer wanted.
    async fn sync_routes(&self, desired: &Desired) -> Result<(Changes, usize)> {
        // The host's own packets to remote pods leave from the pod gateway once the
        // bridge holds it, as flanneld's tunnel address: replies then come back through
        // the tunnel instead of as pod-sourced packets on the underlay.
        let gateway = Ipv4Addr::from(u32::from(desired.own.pod_cidr.network()) + 1);
        let src = self
            .host
            .addresses(None)
            .await?
            .contains(&gateway)
            .then_some(gateway);
        let mut want = BTreeMap::new();
        let mut unreachable = 0;
        let mut next_hops = BTreeMap::new();
        for (subnet, node) in &desired.remotes {
            let hop = match next_hops.get(node) {
                Some(hop) => *hop,
                None => match self.host.next_hop(*node).await {
                    Ok(hop) => *next_hops.entry(*node).or_insert(hop),
                    Err(e) => {
                        warn!(node = %node, error = format!("{e:#}"), "no underlay route to a node; its pods are unreachable until there is");
                        unreachable += 1;
                        continue;
                    }
                },
            };
            let (via, oif) = hop;
            want.insert(
                *subnet,
                OverlayRoute {
                    dst: *subnet,
                    via,
                    oif,
                    src,
                    mtu: self.settings.uplink.pod_mtu(),
                },
            );
        }
        let have: BTreeMap<Ipv4Net, OverlayRoute> = self
            .host
            .overlay_routes()
            .await?
            .into_iter()
            .map(|r| (r.dst, r))
            .collect();
        let mut changes = Changes::default();
        for (dst, route) in &want {
            match have.get(dst) {
                Some(old) if old == route => continue,
                Some(_) => changes.updated += 1,
                None => changes.added += 1,
            }
            self.host.replace_route(route).await?;
        }
        for route in have.values().filter(|r| !want.contains_key(&r.dst)) {
            self.host.delete_route(route).await?;
            changes.removed += 1;
        }
        Ok((changes, unreachable))
    }

    /// Attaches to the pod bridge once it exists (the CNI bridge plugin creates it with
    /// the first pod) and again if it is recreated. Returns whether it is attached.
    async fn sync_bridge(&self, dp: &mut Datapath) -> Result<bool> {
        let (bridge, pod_mtu) = (&self.settings.bridge, self.settings.uplink.pod_mtu());
        let Some(ifindex) = host::ifindex_by_name(bridge) else {
            if dp.attachment(Hook::BridgeIngress).is_some() {
                warn!(
                    bridge,
                    "pod bridge disappeared; waiting for it to come back"
                );
                dp.detach(Hook::BridgeIngress);
            }
            return Ok(false);
        };
        if dp
            .attachment(Hook::BridgeIngress)
            .is_some_and(|a| a.ifindex == ifindex)
        {
            return Ok(true);
        }
        if self.host.mtu(ifindex).await? != pod_mtu {
            self.host.set_mtu(ifindex, pod_mtu).await?;
        }
        dp.attach(Hook::BridgeIngress, bridge)?;
        info!(bridge, mtu = pod_mtu, "attached to the pod bridge");
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cidr: &str, ip: [u8; 4]) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            pod_cidr: cidr.parse().unwrap(),
            tunnel_ip: ip.into(),
        }
    }

    fn set(nodes: Vec<NodeInfo>) -> NodeSet {
        let mut s = NodeSet {
            nodes,
            errors: vec![],
        };
        s.nodes.sort();
        s
    }

    #[test]
    fn remotes_and_peers_exclude_self() {
        let s = set(vec![
            node("cp", "10.244.0.0/24", [172, 18, 0, 2]),
            node("w1", "10.244.1.0/24", [172, 18, 0, 3]),
            node("w3", "10.244.3.0/24", [172, 19, 0, 2]),
        ]);
        let d = Desired::compute(&s, "w1").unwrap();
        assert_eq!(d.own.name, "w1");
        assert_eq!(d.remotes.len(), 2);
        assert_eq!(
            d.remotes[&"10.244.3.0/24".parse().unwrap()],
            Ipv4Addr::new(172, 19, 0, 2)
        );
        assert_eq!(
            d.peers,
            [Ipv4Addr::new(172, 18, 0, 2), Ipv4Addr::new(172, 19, 0, 2)].into()
        );
    }

    #[test]
    fn conflicts_are_skipped_with_reasons() {
        let s = set(vec![
            node("a", "10.244.5.0/24", [172, 18, 0, 5]),
            node("b", "10.244.5.0/24", [172, 18, 0, 6]),
            node("c", "10.244.0.0/16", [172, 18, 0, 7]),
            node("me", "10.244.1.0/24", [172, 18, 0, 3]),
            node("twin", "10.244.9.0/24", [172, 18, 0, 3]),
        ]);
        let d = Desired::compute(&s, "me").unwrap();
        assert_eq!(
            d.remotes
                .keys()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.244.5.0/24"]
        );
        assert_eq!(
            d.remotes.values().next(),
            Some(&Ipv4Addr::new(172, 18, 0, 5))
        );
        assert_eq!(d.skipped.len(), 3, "{:?}", d.skipped);
    }

    #[test]
    fn own_node_problems_are_errors() {
        let s = set(vec![node("w1", "10.244.1.0/24", [172, 18, 0, 3])]);
        assert_eq!(
            Desired::compute(&s, "w9"),
            Err(DesiredError::OwnMissing("w9".into()))
        );
        let mut s = s;
        s.errors.push(NodeError::NoPodCidr("w2".into()));
        assert!(
            Desired::compute(&s, "w1").is_ok(),
            "another node's problem is not ours"
        );
        assert_eq!(
            Desired::compute(&s, "w2"),
            Err(DesiredError::OwnInvalid(NodeError::NoPodCidr("w2".into())))
        );
    }
}
