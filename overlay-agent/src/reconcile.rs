//! Converges the datapath maps and the host's routes on the node set: computes the
//! desired state from the nodes, then applies only the difference. Running it twice
//! with the same input changes nothing the second time.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
};

use anyhow::Result;
use futures::{StreamExt as _, TryStreamExt as _, stream};
use ipnet::Ipv4Net;
use overlay_common::{
    DatapathConfig, Hook, Route,
    config::{FLAG_FAST_PATH, FLAG_MASQUERADE},
    maps::{ROUTE_DIRECT, ROUTE_NODE_ADDRESS},
};
use thiserror::Error;
use tracing::{info, warn};

use crate::{
    datapath::{Datapath, maps::Changes},
    fast_path,
    host::{self, Host, NextHop, OverlayRoute, uplink::Uplink},
    masq,
    nodes::{NodeError, NodeInfo, NodeSet, address::OwnAddress},
    subnet_env::{self, SubnetEnv},
};

/// Netlink requests a pass keeps in flight at once.
const NETLINK_IN_FLIGHT: usize = 64;

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
    /// As flanneld's kube subnet manager refuses the lease (flannel-io/flannel
    /// v0.28.9 `pkg/subnet/kube/kube.go` `AcquireLease`), and stops.
    #[error(
        "subnet \"{network}\" specified in the flannel net config doesn't contain \"{pod_cidr}\" PodCIDR of the \"{node}\" node"
    )]
    OwnOutsideNetwork {
        node: String,
        pod_cidr: Ipv4Net,
        network: Ipv4Net,
    },
}

impl Desired {
    /// `own_address` decides this node's tunnel address (`own.tunnel_ip`), the one
    /// peers send to: the node object's may be stale or another NIC's.
    /// This node's pod subnet must lie in `network` (net-conf.json's `Network`).
    pub fn compute(
        set: &NodeSet,
        own_name: &str,
        own_address: &OwnAddress,
        network: Ipv4Net,
    ) -> Result<Self, DesiredError> {
        if let Some(e) = set.errors.iter().find(|e| e.node() == Some(own_name)) {
            return Err(DesiredError::OwnInvalid(e.clone()));
        }
        let mut own = set
            .nodes
            .iter()
            .find(|n| n.name == own_name)
            .cloned()
            .ok_or_else(|| DesiredError::OwnMissing(own_name.to_owned()))?;
        own.tunnel_ip = own_address.resolve(&own);
        if !network.contains(&own.pod_cidr) {
            return Err(DesiredError::OwnOutsideNetwork {
                node: own.name,
                pod_cidr: own.pod_cidr,
                network,
            });
        }
        let mut skipped: Vec<String> = set.errors.iter().map(ToString::to_string).collect();
        let mut remotes = BTreeMap::new();
        let mut owners: BTreeMap<Ipv4Net, &str> = BTreeMap::new();
        // Nodes are sorted by name, so the first claim of a subnet wins deterministically.
        for node in set.nodes.iter().filter(|n| n.name != own_name) {
            // As flanneld's route network: a node announcing another backend cannot
            // decapsulate what we send it.
            if let Some(backend) = &node.foreign_backend {
                skipped.push(format!(
                    "node {}: its agent runs flannel backend {backend:?}, not ipip",
                    node.name
                ));
                continue;
            }
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

fn with_fast_path(mut config: DatapathConfig, switch: fast_path::Switch) -> DatapathConfig {
    config.flags &= !FLAG_FAST_PATH;
    if switch.on {
        config.flags |= FLAG_FAST_PATH;
    }
    config.ruleset_gen = switch.generation;
    config
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
    /// A blackhole route for this node's pod subnet (flanneld's `--ip-blackhole-route`).
    pub blackhole_route: bool,
    /// net-conf.json's `Backend.DirectRouting`.
    pub direct_routing: bool,
}

/// Whether the uplink reaches a node directly, so that with `Backend.DirectRouting`
/// its pods' packets go unencapsulated: as flannel decides (flannel-io/flannel v0.28.9
/// `pkg/ip/iface.go` `DirectRouting`: the kernel's route to the node's public address
/// has no gateway, i.e. the node is on a link of this one), and that link is the
/// uplink, the device flannel's direct route names (`pkg/backend/ipip/ipip.go`
/// `RegisterNetwork`, `route.LinkIndex = n.ExtIface.Iface.Index`) and the one whose
/// egress our programs see.
pub fn reached_directly(hop: &NextHop, uplink: u32) -> bool {
    hop.gateway.is_none() && hop.oif == uplink
}

/// The `ROUTES` entries and the kernel routes that carry the remote subnets.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    map: BTreeMap<Ipv4Net, Route>,
    kernel: BTreeMap<Ipv4Net, OverlayRoute>,
    /// Nodes of `desired.remotes` the kernel has no route to.
    unreachable: usize,
}

impl Plan {
    /// One entry per remote subnet in the map; a kernel route for each whose node the
    /// kernel reaches (`next_hops`). A subnet whose node is [`reached_directly`] under
    /// `direct_routing` is routed as flannel's host-gw routes it, `podCIDR via <node>
    /// dev <uplink>` at the uplink's MTU from the uplink's address, and marked
    /// `ROUTE_DIRECT` so that the programs leave its packets to that route; the others
    /// go through the tunnel, at the uplink's MTU less the outer header, from `src`.
    fn new(
        desired: &Desired,
        next_hops: &BTreeMap<Ipv4Addr, Result<NextHop>>,
        uplink: &Uplink,
        direct_routing: bool,
        src: Option<Ipv4Addr>,
    ) -> Self {
        let mut plan = Plan::default();
        for (subnet, node) in &desired.remotes {
            let hop = match &next_hops[node] {
                Ok(hop) => hop,
                Err(e) => {
                    warn!(node = %node, error = format!("{e:#}"), "no underlay route to a node; its pods are unreachable until there is");
                    plan.unreachable += 1;
                    plan.map.extend(map_entries(*subnet, *node, false));
                    continue;
                }
            };
            let direct = direct_routing && reached_directly(hop, uplink.ifindex);
            let kernel = if direct {
                OverlayRoute {
                    dst: *subnet,
                    via: *node,
                    oif: uplink.ifindex,
                    src: None,
                    mtu: uplink.mtu,
                }
            } else {
                OverlayRoute {
                    dst: *subnet,
                    via: hop.gateway.unwrap_or(*node),
                    oif: hop.oif,
                    src,
                    mtu: uplink.pod_mtu(),
                }
            };
            plan.map.extend(map_entries(*subnet, *node, direct));
            plan.kernel.insert(*subnet, kernel);
        }
        plan
    }
}

/// The `ROUTES` entries for `node`'s pod `subnet`: tunnelled, or, `direct`, left to
/// the host's plain route, and then `node`'s own address as well
/// (`ROUTE_NODE_ADDRESS`: a pod's reply to it leaves plain, as under flanneld, where a
/// tunnelled node's is encapsulated). At most two entries per node: `MAX_NODES`
/// leaves room for Kubernetes' 5,000.
pub fn map_entries(
    subnet: Ipv4Net,
    node: Ipv4Addr,
    direct: bool,
) -> impl Iterator<Item = (Ipv4Net, Route)> {
    let node_ip = node.octets();
    let flags = if direct { ROUTE_DIRECT } else { 0 };
    let address = direct.then(|| {
        let route = Route {
            node_ip,
            flags: ROUTE_DIRECT | ROUTE_NODE_ADDRESS,
        };
        (Ipv4Net::from(node), route)
    });
    std::iter::once((subnet, Route { node_ip, flags })).chain(address)
}

/// Converges the maps and the host's routes on the node set (see [`Reconciler::apply`]).
pub struct Reconciler {
    host: Host,
    settings: NodeSettings,
    subnet_env: Option<SubnetEnv>,
    config: Option<DatapathConfig>,
    fast_path: fast_path::Switch,
}

impl Reconciler {
    pub fn new(host: Host, settings: NodeSettings) -> Self {
        Self {
            host,
            settings,
            subnet_env: None,
            config: None,
            fast_path: fast_path::Switch::default(),
        }
    }

    /// Turns the fast path on or off and moves its ruleset generation, in the
    /// programs' configuration at once when there is one already: until they see a new
    /// generation, admitted flows keep skipping rules the host just changed.
    pub fn set_fast_path(&mut self, dp: &mut Datapath, switch: fast_path::Switch) -> Result<()> {
        self.fast_path = switch;
        if let Some(config) = self.config {
            let config = with_fast_path(config, switch);
            dp.config.set(config)?;
            self.config = Some(config);
        }
        Ok(())
    }

    /// The datapath configuration for `desired` under these settings.
    pub fn datapath_config(&self, desired: &Desired) -> DatapathConfig {
        let s = &self.settings;
        let config = DatapathConfig {
            // The interface's own address, whatever this node publishes: a published
            // address behind a NAT is not on the node, and the router translates
            // to and from this one (flannel's tunnel keeps `Local` = the interface's).
            node_ip: s.uplink.address.octets(),
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
            // Until the CNI plugin creates the bridge: zero, and `pod_ingress` (not
            // attached anywhere yet either) takes nothing.
            bridge_mac: host::mac_by_name(&s.bridge).unwrap_or_default(),
            _pad2: [0; 2],
            ruleset_gen: 0,
            _pad3: 0,
        };
        with_fast_path(config, self.fast_path)
    }

    /// One pass: datapath maps first, then `attach` (the uplink's programs, so that
    /// encapsulation is ready before routes steer traffic to it: routes installed
    /// first would send pods' packets out unencapsulated, and on a node flanneld ran,
    /// where ours replace its tunnel routes, lose them), then kernel routes, the
    /// bridge, and subnet.env.
    pub async fn apply(
        &mut self,
        dp: &mut Datapath,
        desired: &Desired,
        attach: impl FnOnce(&mut Datapath) -> Result<()>,
    ) -> Result<Outcome> {
        let config = self.datapath_config(desired);
        if self.config != Some(config) {
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
        let plan = self.plan(desired).await?;
        let mut outcome = Outcome {
            map_routes: dp.routes.sync(&plan.map)?,
            map_peers: dp.peers.sync(&desired.peers)?,
            unreachable_peers: plan.unreachable,
            ..Outcome::default()
        };
        attach(dp)?;
        outcome.kernel_routes = self.sync_routes(&plan.kernel).await?;
        let blackhole = self.sync_blackhole(desired).await?;
        outcome.kernel_routes.added += blackhole.added;
        outcome.kernel_routes.removed += blackhole.removed;
        outcome.bridge_attached = self.sync_bridge(dp).await?;

        let s = &self.settings;
        let env = SubnetEnv::new(
            s.network,
            desired.own.pod_cidr,
            s.uplink.pod_mtu(),
            s.masq.enabled,
        );
        if self.subnet_env.as_ref() != Some(&env) {
            subnet_env::write(&env, &s.subnet_file)?;
            info!(path = %s.subnet_file.display(), subnet = %env.subnet, mtu = env.mtu, "subnet.env written");
            self.subnet_env = Some(env);
        }
        Ok(outcome)
    }

    /// How each remote subnet is to be carried, from the kernel's routes to the nodes
    /// as they are now: a node that moved behind a router, or next to this one, is
    /// tunnelled or routed directly from the next pass on.
    async fn plan(&self, desired: &Desired) -> Result<Plan> {
        // The host's own packets to remote pods leave from the pod gateway once the
        // bridge holds it, as flanneld's tunnel address: replies then come back through
        // the tunnel instead of as pod-sourced packets on the underlay.
        let gateway = subnet_env::gateway(desired.own.pod_cidr);
        let src = self
            .host
            .addresses(None)
            .await?
            .contains(&gateway)
            .then_some(gateway);
        // One lookup per node, many in flight: each is a netlink round trip, and
        // thousands of them one after another would hold the pass up.
        let nodes: BTreeSet<Ipv4Addr> = desired.remotes.values().copied().collect();
        let next_hops: BTreeMap<Ipv4Addr, Result<NextHop>> = stream::iter(nodes)
            .map(|node| async move { (node, self.host.next_hop(node).await) })
            .buffer_unordered(NETLINK_IN_FLIGHT)
            .collect()
            .await;
        Ok(Plan::new(
            desired,
            &next_hops,
            &self.settings.uplink,
            self.settings.direct_routing,
            src,
        ))
    }

    /// Installs the routes in `want`, and removes our routes that are no longer
    /// wanted.
    async fn sync_routes(&self, want: &BTreeMap<Ipv4Net, OverlayRoute>) -> Result<Changes> {
        let have: BTreeMap<Ipv4Net, OverlayRoute> = self
            .host
            .overlay_routes()
            .await?
            .into_iter()
            .map(|r| (r.dst, r))
            .collect();
        let mut changes = Changes::default();
        let mut install = Vec::new();
        for (dst, route) in want {
            match have.get(dst) {
                Some(old) if old == route => continue,
                Some(_) => changes.updated += 1,
                None => changes.added += 1,
            }
            install.push(route);
        }
        let remove: Vec<&OverlayRoute> = have
            .values()
            .filter(|r| !want.contains_key(&r.dst))
            .collect();
        changes.removed = remove.len();
        stream::iter(install)
            .map(|route| self.host.replace_route(route))
            .buffer_unordered(NETLINK_IN_FLIGHT)
            .try_collect::<()>()
            .await?;
        stream::iter(remove)
            .map(|route| self.host.delete_route(route))
            .buffer_unordered(NETLINK_IN_FLIGHT)
            .try_collect::<()>()
            .await?;
        if !changes.is_empty() {
            self.warn_off_uplink(want);
        }
        Ok(changes)
    }

    /// With `--ip-blackhole-route`, a blackhole route for this node's pod subnet, as
    /// flanneld's (flannel-io/flannel v0.28.9 `main.go`, `pkg/ip/iface.go`
    /// `AddBlackholeV4Route`: main table, added when missing every
    /// --iptables-resync seconds, never removed), so that packets to addresses of the
    /// subnet that no pod holds are dropped here instead of following the default
    /// route out (flannel: for CNI setups without the bridge, as Canal). Ours yields
    /// to every other route to the subnet ([`host::BLACKHOLE_METRIC`]), is checked at
    /// every pass, carries the agent's protocol, and is removed when the flag goes or
    /// the subnet changes, and by `overlay-agent cleanup`.
    async fn sync_blackhole(&self, desired: &Desired) -> Result<Changes> {
        let want: BTreeSet<Ipv4Net> = self
            .settings
            .blackhole_route
            .then_some(desired.own.pod_cidr)
            .into_iter()
            .collect();
        let have: BTreeSet<Ipv4Net> = self.host.blackhole_routes().await?.into_iter().collect();
        let mut changes = Changes::default();
        for dst in want.difference(&have) {
            self.host.add_blackhole(*dst).await?;
            info!(subnet = %dst, "blackhole route for this node's pod subnet installed");
            changes.added += 1;
        }
        for dst in have.difference(&want) {
            self.host.delete_blackhole(*dst).await?;
            info!(subnet = %dst, "blackhole route removed");
            changes.removed += 1;
        }
        Ok(changes)
    }

    /// Only the uplink has `uplink_egress`: the host's own packets routed out of
    /// another interface leave unencapsulated. With several NICs, that is a node the
    /// selected interface does not reach (calico's multi-NIC case): say so.
    fn warn_off_uplink(&self, routes: &BTreeMap<Ipv4Net, OverlayRoute>) {
        let uplink = &self.settings.uplink;
        let off: Vec<Ipv4Addr> = routes
            .values()
            .filter(|r| r.oif != uplink.ifindex)
            .map(|r| r.via)
            .collect();
        if let Some(first) = off.first() {
            warn!(
                uplink = uplink.name,
                nodes = off.len(),
                example_next_hop = %first,
                "some nodes are reached through another interface than the uplink, where the host's own traffic to their pods is not encapsulated; pick the interface that reaches them (--iface, --iface-regex)"
            );
        }
    }

    /// Attaches to the pod bridge (both ways) once it exists (the CNI bridge plugin
    /// creates it with the first pod) and again if it is recreated. Returns whether it
    /// is attached.
    async fn sync_bridge(&self, dp: &mut Datapath) -> Result<bool> {
        const HOOKS: [Hook; 2] = [Hook::BridgeIngress, Hook::BridgeEgress];
        let (bridge, pod_mtu) = (&self.settings.bridge, self.settings.uplink.pod_mtu());
        let Some(ifindex) = host::ifindex_by_name(bridge) else {
            if dp.attachment(Hook::BridgeIngress).is_some() {
                warn!(
                    bridge,
                    "pod bridge disappeared; waiting for it to come back"
                );
            }
            HOOKS.into_iter().for_each(|hook| dp.detach(hook));
            return Ok(false);
        };
        let attached =
            |dp: &Datapath, hook| dp.attachment(hook).is_some_and(|a| a.ifindex == ifindex);
        if HOOKS.iter().all(|hook| attached(dp, *hook)) {
            return Ok(true);
        }
        if self.host.mtu(ifindex).await? != pod_mtu {
            self.host.set_mtu(ifindex, pod_mtu).await?;
        }
        for hook in HOOKS {
            if !attached(dp, hook) {
                dp.attach(hook, bridge)?;
            }
        }
        info!(bridge, mtu = pod_mtu, "attached to the pod bridge");
        Ok(true)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::nodes::{
        address::{Authority, OwnAddress},
        annotations,
    };

    fn node(name: &str, cidr: &str, ip: [u8; 4]) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            pod_cidr: cidr.parse().unwrap(),
            tunnel_ip: ip.into(),
            overwrite: None,
            foreign_backend: None,
        }
    }

    /// The file source's rule without --public-ip: the node list decides.
    const AS_LISTED: OwnAddress = OwnAddress {
        authority: Authority::NodeList,
        public_ip: None,
        interface: Ipv4Addr::UNSPECIFIED,
    };

    fn network() -> Ipv4Net {
        "10.244.0.0/16".parse().unwrap()
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
        let d = Desired::compute(&s, "w1", &AS_LISTED, network()).unwrap();
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
        let d = Desired::compute(&s, "me", &AS_LISTED, network()).unwrap();
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
            Desired::compute(&s, "w9", &AS_LISTED, network()),
            Err(DesiredError::OwnMissing("w9".into()))
        );
        let mut s = s;
        s.errors.push(NodeError::NoPodCidr("w2".into()));
        assert!(
            Desired::compute(&s, "w1", &AS_LISTED, network()).is_ok(),
            "another node's problem is not ours"
        );
        assert_eq!(
            Desired::compute(&s, "w2", &AS_LISTED, network()),
            Err(DesiredError::OwnInvalid(NodeError::NoPodCidr("w2".into())))
        );
    }

    #[test]
    fn own_pod_cidr_outside_the_network_is_refused_as_flanneld() {
        let s = set(vec![
            node("w1", "10.245.1.0/24", [172, 18, 0, 3]),
            node("w2", "10.244.2.0/24", [172, 18, 0, 4]),
            node("w3", "10.244.0.0/15", [172, 18, 0, 5]),
        ]);
        let e = Desired::compute(&s, "w1", &AS_LISTED, network()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "subnet \"10.244.0.0/16\" specified in the flannel net config doesn't contain \"10.245.1.0/24\" PodCIDR of the \"w1\" node"
        );
        // Larger than the network: not contained either (flannel's containsCIDR).
        assert!(matches!(
            Desired::compute(&s, "w3", &AS_LISTED, network()),
            Err(DesiredError::OwnOutsideNetwork { .. })
        ));
        // Other nodes outside it are routed, as flanneld routes their leases.
        let d = Desired::compute(&s, "w2", &AS_LISTED, network()).unwrap();
        assert!(d.remotes.contains_key(&"10.245.1.0/24".parse().unwrap()));
    }

    #[test]
    fn foreign_backends_are_skipped() {
        let mut vxlan = node("vx", "10.244.7.0/24", [172, 18, 0, 7]);
        vxlan.foreign_backend = Some("vxlan".into());
        let s = set(vec![node("w1", "10.244.1.0/24", [172, 18, 0, 3]), vxlan]);
        let d = Desired::compute(&s, "w1", &AS_LISTED, network()).unwrap();
        assert!(d.remotes.is_empty());
        assert!(d.skipped[0].contains("vxlan"), "{:?}", d.skipped);
    }

    fn hop(gateway: Option<[u8; 4]>, oif: u32) -> Result<NextHop> {
        Ok(NextHop {
            gateway: gateway.map(Ipv4Addr::from),
            oif,
        })
    }

    /// The lab's w1 (uplink eth0, index 2): cp and w2 on its switch, w3 behind the
    /// router 172.18.0.254, and a node on-link through another interface (index 3).
    fn lab_plan(direct_routing: bool) -> Plan {
        let s = set(vec![
            node("cp", "10.244.0.0/24", [172, 18, 0, 2]),
            node("w1", "10.244.1.0/24", [172, 18, 0, 3]),
            node("w2", "10.244.2.0/24", [172, 18, 0, 4]),
            node("w3", "10.244.3.0/24", [172, 19, 0, 2]),
            node("x", "10.244.4.0/24", [192, 168, 9, 2]),
            node("gone", "10.244.5.0/24", [203, 0, 113, 9]),
        ]);
        let d = Desired::compute(&s, "w1", &AS_LISTED, network()).unwrap();
        let next_hops = BTreeMap::from([
            ([172, 18, 0, 2].into(), hop(None, 2)),
            ([172, 18, 0, 4].into(), hop(None, 2)),
            ([172, 19, 0, 2].into(), hop(Some([172, 18, 0, 254]), 2)),
            ([192, 168, 9, 2].into(), hop(None, 3)),
            (
                [203, 0, 113, 9].into(),
                Err(anyhow::anyhow!("no route to 203.0.113.9")),
            ),
        ]);
        let uplink = Uplink {
            name: "eth0".into(),
            ifindex: 2,
            mtu: 1500,
            address: [172, 18, 0, 3].into(),
        };
        Plan::new(
            &d,
            &next_hops,
            &uplink,
            direct_routing,
            Some([10, 244, 1, 1].into()),
        )
    }

    fn subnet(third: u8) -> Ipv4Net {
        Ipv4Net::new([10, 244, third, 0].into(), 24).unwrap()
    }

    /// Key, node, flags: a map entry.
    type MapRow = (String, [u8; 4], u32);
    /// Third octet of the subnet, via, oif, whether it has a source, MTU: a route.
    type KernelRow = (u8, [u8; 4], u32, bool, u32);

    fn summary(plan: &Plan) -> (Vec<MapRow>, Vec<KernelRow>) {
        let map = plan
            .map
            .iter()
            .map(|(n, r)| (n.to_string(), r.node_ip, r.flags))
            .collect();
        let kernel = plan
            .kernel
            .iter()
            .map(|(n, r)| {
                (
                    n.network().octets()[2],
                    r.via.octets(),
                    r.oif,
                    r.src.is_some(),
                    r.mtu,
                )
            })
            .collect();
        (map, kernel)
    }

    #[test]
    fn direct_routing_skips_the_tunnel_for_nodes_on_the_uplinks_link() {
        let plan = lab_plan(true);
        assert_eq!(plan.unreachable, 1);
        assert_eq!(
            summary(&plan),
            (
                vec![
                    ("10.244.0.0/24".into(), [172, 18, 0, 2], ROUTE_DIRECT),
                    ("10.244.2.0/24".into(), [172, 18, 0, 4], ROUTE_DIRECT),
                    // Behind a gateway, on another link, or unknown: the tunnel.
                    ("10.244.3.0/24".into(), [172, 19, 0, 2], 0),
                    ("10.244.4.0/24".into(), [192, 168, 9, 2], 0),
                    ("10.244.5.0/24".into(), [203, 0, 113, 9], 0),
                    // The direct nodes' own addresses, for pods' replies to them.
                    (
                        "172.18.0.2/32".into(),
                        [172, 18, 0, 2],
                        ROUTE_DIRECT | ROUTE_NODE_ADDRESS
                    ),
                    (
                        "172.18.0.4/32".into(),
                        [172, 18, 0, 4],
                        ROUTE_DIRECT | ROUTE_NODE_ADDRESS
                    ),
                ],
                vec![
                    // As flannel's host-gw: via the node, the uplink's MTU and address.
                    (0, [172, 18, 0, 2], 2, false, 1500),
                    (2, [172, 18, 0, 4], 2, false, 1500),
                    (3, [172, 18, 0, 254], 2, true, 1480),
                    (4, [192, 168, 9, 2], 3, true, 1480),
                ]
            )
        );
        assert!(reached_directly(&hop(None, 2).unwrap(), 2));
        assert!(!reached_directly(
            &hop(Some([172, 18, 0, 254]), 2).unwrap(),
            2
        ));
        assert!(!reached_directly(&hop(None, 3).unwrap(), 2));
    }

    #[test]
    fn without_direct_routing_every_node_is_tunnelled() {
        let plan = lab_plan(false);
        let (map, kernel) = summary(&plan);
        // One entry per subnet, all tunnelled: no node address.
        assert_eq!(map.len(), 5, "{map:?}");
        assert!(map.iter().all(|(_, _, flags)| *flags == 0), "{map:?}");
        assert_eq!(
            kernel,
            vec![
                (0, [172, 18, 0, 2], 2, true, 1480),
                (2, [172, 18, 0, 4], 2, true, 1480),
                (3, [172, 18, 0, 254], 2, true, 1480),
                (4, [192, 168, 9, 2], 3, true, 1480),
            ]
        );
        assert_eq!(plan.map.get(&subnet(0)).map(Route::direct), Some(false));
    }

    /// Settings of a test node on `uplink`, in `network`, whose subnet.env goes nowhere.
    pub(crate) fn settings(uplink: Uplink, network: Ipv4Net) -> NodeSettings {
        NodeSettings {
            uplink,
            bridge: "cni0".into(),
            network,
            subnet_file: "/nonexistent/subnet.env".into(),
            masq: masq::Settings::default(),
            blackhole_route: false,
            direct_routing: false,
        }
    }

    /// What node2 publishes and what its datapath puts in outer headers (and
    /// accepts), with its agent on eth1 (192.168.3.111) and `public_ip` given.
    fn published_and_on_the_wire(public_ip: Option<Ipv4Addr>) -> (Ipv4Addr, Ipv4Addr) {
        let own_address = OwnAddress {
            authority: Authority::Agent,
            public_ip,
            interface: Ipv4Addr::new(192, 168, 3, 111),
        };
        let s = set(vec![
            node("node2", "10.122.124.128/26", [192, 168, 0, 111]),
            node("node4", "10.122.157.128/26", [192, 168, 3, 113]),
            // Another node claiming the stale address is no longer our twin.
            node("stale", "10.122.1.0/26", [192, 168, 0, 111]),
        ]);
        let network: Ipv4Net = "10.122.0.0/16".parse().unwrap();
        let d = Desired::compute(&s, "node2", &own_address, network).unwrap();
        assert_eq!(d.remotes.len(), 2, "{:?}", d.skipped);

        let own_node = s.nodes.iter().find(|n| n.name == "node2").unwrap();
        let names = annotations::Names::default();
        let published =
            annotations::patch(&Default::default(), own_address.resolve(own_node), &names).unwrap();
        let published: Ipv4Addr = published["metadata"]["annotations"][&names.public_ip]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(d.own.tunnel_ip, published);

        let uplink = Uplink {
            name: "eth1".into(),
            ifindex: 3,
            mtu: 1500,
            address: own_address.interface,
        };
        let rec = Reconciler::new(Host::connect().unwrap(), settings(uplink, network));
        (published, Ipv4Addr::from(rec.datapath_config(&d).node_ip))
    }

    /// Calico's multi-NIC case: node2's Node still says 192.168.0.111 (an earlier run
    /// on eth0), the agent now runs on eth1. What it publishes, what it puts in outer
    /// headers and what it accepts must all be the new address.
    #[tokio::test]
    async fn published_and_encapsulated_addresses_agree() {
        let eth1 = Ipv4Addr::new(192, 168, 3, 111);
        assert_eq!(published_and_on_the_wire(None), (eth1, eth1));
    }

    /// A public IP behind a NAT is published, but the outer headers carry the
    /// interface's address, the one the router translates it to.
    #[tokio::test]
    async fn a_public_ip_behind_a_nat_is_published_not_put_on_the_wire() {
        let public = Ipv4Addr::new(203, 0, 113, 7);
        assert_eq!(
            published_and_on_the_wire(Some(public)),
            (public, Ipv4Addr::new(192, 168, 3, 111))
        );
    }
}
