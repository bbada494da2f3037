//! The cluster as data: the kind cluster of the walkthrough (a control-plane and two
//! workers on docker's `kind` network, 172.18.0.0/16) plus a worker on another subnet
//! behind a router. Plain routing (flannel host-gw: `podCIDR via nodeIP`) cannot reach
//! that worker's pods, because its address is not on-link for the others; the overlay can.
//!
//! Every segment is a bridge in the switch namespace, and the router has a leg on each.
//! Beyond the router, on a segment of its own, an outside host stands for everything
//! that is not the cluster: the router knows no pod subnet, so pods reach it only
//! masqueraded behind their node's address (flanneld `--ip-masq`).
//!
//! With flannel's etcd subnet manager (`lab --etcd`) an etcd host joins the kind
//! segment, and the nodes' subnets are no longer the lab's to give: each agent leases
//! one, and the lab adopts what the agents wrote ([`Topology::adopt_subnets`]).

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context as _, Result, bail, ensure};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// An L2 segment of the underlay.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Segment {
    pub name: String,
    /// The router's address on the segment, with the segment's prefix length: every
    /// host on the segment uses it as its default gateway.
    pub gateway: Ipv4Net,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Role {
    ControlPlane,
    Worker,
}

/// A Kubernetes node: a namespace with an uplink on a segment, the pod bridge and pods.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Node {
    pub name: String,
    pub role: Role,
    pub segment: String,
    pub address: Ipv4Addr,
    /// The node's subnet: `spec.podCIDR`, as the controller-manager allocates it; with
    /// etcd, the lease its agent took (until the agents have leased, a placeholder).
    pub pod_cidr: Ipv4Net,
}

impl Node {
    /// The pod gateway: the first address of the pod subnet, held by `cni0`. The
    /// agent's routes make it the source of the node's own traffic to remote pods, and
    /// masquerade rule 6 translates to it.
    pub(crate) fn gateway(&self) -> Ipv4Addr {
        overlay_common::subnet_env::gateway(self.pod_cidr)
    }
}

/// A host outside the cluster (neither node nor pod), on a segment of its own.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Outside {
    pub name: String,
    pub segment: String,
    pub address: Ipv4Addr,
}

/// The etcd that flannel's etcd subnet manager keeps its configuration and leases in:
/// a host on a segment of the underlay, like the outside host neither node nor pod.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct EtcdHost {
    pub name: String,
    pub segment: String,
    pub address: Ipv4Addr,
}

/// A pod: a namespace whose `eth0` hangs on its node's `cni0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pod {
    pub name: String,
    pub node: String,
    pub address: Ipv4Addr,
}

/// What a host of the lab is, for the probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Node,
    Pod,
    Outside,
}

/// A host that probes run from or to: a node, a pod or the outside host, with the
/// address it is reached at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Host {
    pub name: String,
    pub kind: Kind,
    /// The node a pod runs on, or the node itself; None for the outside host.
    pub node: Option<String>,
    pub address: Ipv4Addr,
}

impl From<Pod> for Host {
    fn from(pod: Pod) -> Self {
        Host {
            name: pod.name,
            kind: Kind::Pod,
            node: Some(pod.node),
            address: pod.address,
        }
    }
}

impl From<&Node> for Host {
    fn from(node: &Node) -> Self {
        Host {
            name: node.name.clone(),
            kind: Kind::Node,
            node: Some(node.name.clone()),
            address: node.address,
        }
    }
}

impl From<&Outside> for Host {
    fn from(outside: &Outside) -> Self {
        Host {
            name: outside.name.clone(),
            kind: Kind::Outside,
            node: None,
            address: outside.address,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Topology {
    /// flannel's `Network`.
    pub pod_network: Ipv4Net,
    pub pods_per_node: u8,
    pub segments: Vec<Segment>,
    pub nodes: Vec<Node>,
    pub outside: Outside,
    /// With etcd, the agents lease their subnets there instead of reading a node list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<EtcdHost>,
    /// net-conf.json's `Backend.DirectRouting`: nodes on one segment talk
    /// unencapsulated, through the tunnel only across the router.
    #[serde(default)]
    pub direct_routing: bool,
}

impl Topology {
    /// The walkthrough's kind cluster, plus `w3` behind the router, plus an outside host
    /// on a documentation network (TEST-NET-2) beyond the router.
    pub(crate) fn kind() -> Self {
        let net = |s: &str| s.parse::<Ipv4Net>().expect("literal CIDR");
        let node = |name: &str, role, segment: &str, address: [u8; 4], pod_cidr: &str| Node {
            name: name.into(),
            role,
            segment: segment.into(),
            address: address.into(),
            pod_cidr: net(pod_cidr),
        };
        Self {
            pod_network: net("10.244.0.0/16"),
            pods_per_node: 2,
            segments: vec![
                Segment {
                    name: "kind".into(),
                    gateway: net("172.18.0.1/16"),
                },
                Segment {
                    name: "remote".into(),
                    gateway: net("172.19.0.1/24"),
                },
                Segment {
                    name: "wan".into(),
                    gateway: net("198.51.100.1/24"),
                },
            ],
            nodes: vec![
                node(
                    "cp",
                    Role::ControlPlane,
                    "kind",
                    [172, 18, 0, 2],
                    "10.244.0.0/24",
                ),
                node("w1", Role::Worker, "kind", [172, 18, 0, 3], "10.244.1.0/24"),
                node("w2", Role::Worker, "kind", [172, 18, 0, 4], "10.244.2.0/24"),
                node(
                    "w3",
                    Role::Worker,
                    "remote",
                    [172, 19, 0, 2],
                    "10.244.3.0/24",
                ),
            ],
            outside: Outside {
                name: "outside".into(),
                segment: "wan".into(),
                address: [198, 51, 100, 10].into(),
            },
            etcd: None,
            direct_routing: false,
        }
    }

    /// The same cluster on flannel's etcd subnet manager: etcd on a host of its own on
    /// the kind segment, where the etcd cluster that flannel's etcd mode needs would
    /// stand (it is not Kubernetes' etcd). There, nothing the checks do to a node
    /// (stopping its agent, its iptables, a reference datapath) reaches it, and w3's
    /// agent reaches it through the router as a remote node would.
    pub(crate) fn with_etcd(mut self) -> Self {
        self.etcd = Some(EtcdHost {
            name: "etcd".into(),
            segment: "kind".into(),
            address: [172, 18, 0, 10].into(),
        });
        self
    }

    /// The same cluster with flannel's `Backend.DirectRouting`.
    pub(crate) fn with_direct_routing(mut self) -> Self {
        self.direct_routing = true;
        self
    }

    /// Whether `from` routes plainly to `to`'s pods: with DirectRouting, `to` is
    /// another node on its segment (reached without a gateway).
    pub(crate) fn routes_directly(&self, from: &Node, to: &Node) -> bool {
        self.direct_routing && from.segment == to.segment && from.name != to.name
    }

    /// The other nodes' pod subnets that `node` routes plainly.
    pub(crate) fn direct_subnets(&self, node: &Node) -> Vec<Ipv4Net> {
        (self.nodes.iter())
            .filter(|n| self.routes_directly(node, n))
            .map(|n| n.pod_cidr)
            .collect()
    }

    /// Two workers of the kind cluster, one pod each, and the outside host beyond the
    /// router: the benchmark's and the interoperability test's cluster.
    pub(crate) fn pair() -> Self {
        let mut t = Self::kind();
        t.nodes.retain(|n| n.name == "w1" || n.name == "w2");
        t.pods_per_node = 1;
        t
    }

    /// Catches what would otherwise surface as a confusing failure halfway through
    /// building the namespaces.
    pub(crate) fn validate(&self) -> Result<()> {
        // The probes and the wire proof talk between pods.
        ensure!(self.pods_per_node >= 1, "every node needs at least one pod");
        for (i, node) in self.nodes.iter().enumerate() {
            ensure!(
                !self.nodes[..i].iter().any(|n| n.name == node.name),
                "node {} is listed twice",
                node.name
            );
            self.check_host_address(&node.name, &node.segment, node.address)?;
            ensure!(
                self.pod_network.contains(&node.pod_cidr),
                "node {}: {} is outside {}",
                node.name,
                node.pod_cidr,
                self.pod_network
            );
            if let Some(other) = self.nodes[..i].iter().find(|n| {
                n.pod_cidr.contains(&node.pod_cidr) || node.pod_cidr.contains(&n.pod_cidr)
            }) {
                bail!(
                    "nodes {} and {} have overlapping pod subnets",
                    other.name,
                    node.name
                );
            }
            // The gateway and the pods must fit into the subnet.
            ensure!(
                node.pod_cidr.hosts().count() > usize::from(self.pods_per_node) + 1,
                "node {}: {} is too small for {} pods",
                node.name,
                node.pod_cidr,
                self.pods_per_node
            );
        }
        let outside = &self.outside;
        self.check_host_address(&outside.name, &outside.segment, outside.address)?;
        ensure!(
            !self.nodes.iter().any(|n| n.segment == outside.segment),
            "the outside host's segment {} is the cluster's: no node may be on it",
            outside.segment
        );
        ensure!(
            !self.pod_network.contains(&outside.address),
            "the outside host {} lies in the pod network {}",
            outside.address,
            self.pod_network
        );
        ensure!(
            !self.nodes.iter().any(|n| n.name == outside.name),
            "{} names both a node and the outside host",
            outside.name
        );
        if let Some(etcd) = &self.etcd {
            self.check_host_address(&etcd.name, &etcd.segment, etcd.address)?;
            ensure!(
                !self
                    .nodes
                    .iter()
                    .any(|n| n.name == etcd.name || n.address == etcd.address)
                    && outside.name != etcd.name,
                "the etcd host {} ({}) shares its name or address with another host",
                etcd.name,
                etcd.address
            );
        }
        Ok(())
    }

    /// Takes each node's subnet from what its agent wrote into subnet.env
    /// (FLANNEL_SUBNET, by node name), which the pods and every check then build on.
    /// With etcd the leases are the only source: they replace the placeholders. Without,
    /// the agent read the node list the lab wrote, and must have taken its podCIDR.
    pub(crate) fn adopt_subnets(&mut self, written: &BTreeMap<String, Ipv4Net>) -> Result<()> {
        let leased = self.etcd.is_some();
        for node in &mut self.nodes {
            let subnet = written
                .get(&node.name)
                .with_context(|| format!("no subnet.env of {}", node.name))?
                .trunc();
            ensure!(
                leased || subnet == node.pod_cidr,
                "the agent of {} wrote FLANNEL_SUBNET in {subnet}, but its podCIDR is {}",
                node.name,
                node.pod_cidr
            );
            node.pod_cidr = subnet;
        }
        self.validate()
            .context("the subnets the agents took do not fit the lab")
    }

    /// `address` must be a host address of `segment` (not its gateway, the router's).
    fn check_host_address(&self, host: &str, segment: &str, address: Ipv4Addr) -> Result<()> {
        let segment = self.segment(segment).with_context(|| host.to_owned())?;
        ensure!(
            segment.gateway.contains(&address) && segment.gateway.addr() != address,
            "{host}: {address} is not a host address of segment {} ({})",
            segment.name,
            segment.gateway.trunc()
        );
        Ok(())
    }

    pub(crate) fn node(&self, name: &str) -> Result<&Node> {
        match self.nodes.iter().find(|n| n.name == name) {
            Some(n) => Ok(n),
            None => bail!("no node {name}"),
        }
    }

    pub(crate) fn segment(&self, name: &str) -> Result<&Segment> {
        match self.segments.iter().find(|s| s.name == name) {
            Some(s) => Ok(s),
            None => bail!("no segment {name}"),
        }
    }

    /// `address` with the prefix length of `segment`, as configured on a host there.
    pub(crate) fn address_on(&self, segment: &str, address: Ipv4Addr) -> Result<Ipv4Net> {
        Ok(Ipv4Net::new(
            address,
            self.segment(segment)?.gateway.prefix_len(),
        )?)
    }

    /// The pods of `node`, addressed from .2 up as host-local IPAM hands them out (.1
    /// is the bridge's gateway address).
    pub(crate) fn pods_of(&self, node: &Node) -> Vec<Pod> {
        (1..=self.pods_per_node)
            .map(|i| Pod {
                name: format!("{}-pod{i}", node.name),
                node: node.name.clone(),
                address: Ipv4Addr::from(u32::from(node.gateway()) + u32::from(i)),
            })
            .collect()
    }

    pub(crate) fn pods(&self) -> Vec<Pod> {
        self.nodes.iter().flat_map(|n| self.pods_of(n)).collect()
    }

    /// Every node and pod (each node followed by its pods), then the outside host.
    pub(crate) fn hosts(&self) -> Vec<Host> {
        let mut hosts = Vec::new();
        for node in &self.nodes {
            hosts.push(Host::from(node));
            hosts.extend(self.pods_of(node).into_iter().map(Host::from));
        }
        hosts.push(Host::from(&self.outside));
        hosts
    }

    /// The node that `host` is or runs on.
    pub(crate) fn node_of(&self, host: &Host) -> Option<&Node> {
        self.nodes
            .iter()
            .find(|n| Some(&n.name) == host.node.as_ref())
    }

    /// The nodes as `kubectl get nodes -o json` prints them (the fields the agent reads
    /// and the labels kind sets).
    pub(crate) fn node_list(&self) -> Value {
        let items: Vec<Value> = self
            .nodes
            .iter()
            .map(|node| {
                let mut labels = json!({
                    "beta.kubernetes.io/arch": "amd64",
                    "beta.kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "kubernetes.io/hostname": node.name,
                    "kubernetes.io/os": "linux",
                });
                if node.role == Role::ControlPlane {
                    labels["node-role.kubernetes.io/control-plane"] = "".into();
                    labels["node-role.kubernetes.io/master"] = "".into();
                }
                json!({
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": { "labels": labels, "name": node.name },
                    "spec": {
                        "podCIDR": node.pod_cidr.to_string(),
                        "podCIDRs": [node.pod_cidr.to_string()],
                        "providerID": format!("kind://docker/overlay-lab/{}", node.name),
                    },
                    "status": {
                        "addresses": [
                            { "address": node.address.to_string(), "type": "InternalIP" },
                            { "address": node.name, "type": "Hostname" },
                        ],
                    },
                })
            })
            .collect();
        json!({ "apiVersion": "v1", "items": items, "kind": "List", "metadata": { "resourceVersion": "" } })
    }

    /// flannel's `net-conf.json` (the walkthrough's ConfigMap).
    pub(crate) fn net_conf(&self) -> Value {
        let mut backend = json!({ "Type": "ipip" });
        if self.direct_routing {
            backend["DirectRouting"] = true.into();
        }
        json!({ "Network": self.pod_network.to_string(), "Backend": backend })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_cluster_is_valid_and_addresses_pods_like_host_local() {
        let t = Topology::kind();
        t.validate().unwrap();
        let pods: Vec<_> = t
            .pods_of(t.node("w3").unwrap())
            .into_iter()
            .map(|p| (p.name, p.address.to_string()))
            .collect();
        assert_eq!(
            pods,
            [
                ("w3-pod1".to_owned(), "10.244.3.2".to_owned()),
                ("w3-pod2".to_owned(), "10.244.3.3".to_owned())
            ]
        );
        assert_eq!(
            t.address_on("remote", t.node("w3").unwrap().address)
                .unwrap()
                .to_string(),
            "172.19.0.2/24"
        );
    }

    #[test]
    fn validation_names_the_problem() {
        let mut t = Topology::kind();
        t.nodes[3].address = [172, 18, 0, 9].into();
        assert!(
            format!("{:#}", t.validate().unwrap_err())
                .contains("not a host address of segment remote")
        );
        let mut t = Topology::kind();
        t.nodes[1].pod_cidr = "10.244.0.0/23".parse().unwrap();
        assert!(format!("{:#}", t.validate().unwrap_err()).contains("overlapping"));
        let mut t = Topology::kind();
        t.nodes[2].segment = "nowhere".into();
        assert!(t.validate().is_err());
        let mut t = Topology::kind();
        t.outside.segment = "kind".into();
        t.outside.address = [172, 18, 0, 99].into();
        assert!(format!("{:#}", t.validate().unwrap_err()).contains("no node may be on it"));
        let mut t = Topology::kind();
        t.outside.address = [198, 51, 100, 1].into();
        assert!(format!("{:#}", t.validate().unwrap_err()).contains("not a host address"));
    }

    #[test]
    fn the_etcd_host_is_checked_like_the_others() {
        Topology::kind().with_etcd().validate().unwrap();
        let mut t = Topology::kind().with_etcd();
        t.etcd.as_mut().unwrap().address = [172, 18, 0, 3].into();
        assert!(format!("{:#}", t.validate().unwrap_err()).contains("shares its name"));
        let mut t = Topology::kind().with_etcd();
        t.etcd.as_mut().unwrap().segment = "remote".into();
        assert!(format!("{:#}", t.validate().unwrap_err()).contains("not a host address"));
    }

    #[test]
    fn subnets_come_from_the_agents() {
        let written = |subnets: [&str; 4]| -> BTreeMap<String, Ipv4Net> {
            ["cp", "w1", "w2", "w3"]
                .into_iter()
                .zip(subnets)
                .map(|(n, s)| (n.to_owned(), s.parse().unwrap()))
                .collect()
        };
        let leases = written([
            "10.244.57.1/24",
            "10.244.3.1/24",
            "10.244.9.1/24",
            "10.244.0.1/24",
        ]);

        // With etcd the leases replace the lab's subnets; the pods follow.
        let mut t = Topology::kind().with_etcd();
        t.adopt_subnets(&leases).unwrap();
        assert_eq!(t.node("cp").unwrap().pod_cidr.to_string(), "10.244.57.0/24");
        assert_eq!(t.node("w3").unwrap().gateway().to_string(), "10.244.0.1");
        assert_eq!(t.pods()[0].address.to_string(), "10.244.57.2");

        // Without, the agent must have taken the podCIDR of the node list.
        let mut t = Topology::kind();
        let e = t.adopt_subnets(&leases).unwrap_err();
        assert!(format!("{e:#}").contains("agent of cp wrote FLANNEL_SUBNET in 10.244.57.0/24, but its podCIDR is 10.244.0.0/24"), "{e:#}");
        t.adopt_subnets(&written([
            "10.244.0.1/24",
            "10.244.1.1/24",
            "10.244.2.1/24",
            "10.244.3.1/24",
        ]))
        .unwrap();

        // Leases that overlap, leave the network or miss a node are refused.
        let mut t = Topology::kind().with_etcd();
        let e = t
            .adopt_subnets(&written([
                "10.244.1.1/24",
                "10.244.1.1/24",
                "10.244.2.1/24",
                "10.244.3.1/24",
            ]))
            .unwrap_err();
        assert!(format!("{e:#}").contains("overlapping"), "{e:#}");
        let e = t
            .adopt_subnets(&written([
                "10.245.0.1/24",
                "10.244.1.1/24",
                "10.244.2.1/24",
                "10.244.3.1/24",
            ]))
            .unwrap_err();
        assert!(format!("{e:#}").contains("outside 10.244.0.0/16"), "{e:#}");
        let mut three = leases.clone();
        three.remove("w2");
        let e = Topology::kind()
            .with_etcd()
            .adopt_subnets(&three)
            .unwrap_err();
        assert!(format!("{e:#}").contains("no subnet.env of w2"), "{e:#}");
    }

    #[test]
    fn hosts_are_nodes_with_their_pods_then_the_outside() {
        let t = Topology::kind();
        let hosts = t.hosts();
        let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(&names[..4], ["cp", "cp-pod1", "cp-pod2", "w1"]);
        let outside = hosts.last().unwrap();
        assert_eq!(
            (outside.name.as_str(), outside.kind, outside.node.as_deref()),
            ("outside", Kind::Outside, None)
        );
        assert_eq!(outside.address.to_string(), "198.51.100.10");
        let pod = &hosts[1];
        assert_eq!(t.node_of(pod).unwrap().name, "cp");
        assert_eq!(t.node("w1").unwrap().gateway().to_string(), "10.244.1.1");
    }

    #[test]
    fn node_list_reads_like_kubectl() {
        let list = Topology::kind().node_list();
        assert_eq!(list["kind"], "List");
        let cp = &list["items"][0];
        assert_eq!(cp["kind"], "Node");
        assert_eq!(cp["metadata"]["name"], "cp");
        assert_eq!(
            cp["metadata"]["labels"]["node-role.kubernetes.io/control-plane"],
            ""
        );
        assert_eq!(cp["spec"]["podCIDR"], "10.244.0.0/24");
        assert_eq!(cp["spec"]["podCIDRs"][0], "10.244.0.0/24");
        assert_eq!(
            cp["status"]["addresses"][0],
            serde_json::json!({"address": "172.18.0.2", "type": "InternalIP"})
        );
        assert_eq!(
            cp["status"]["addresses"][1],
            serde_json::json!({"address": "cp", "type": "Hostname"})
        );
        let w3 = &list["items"][3];
        assert!(
            w3["metadata"]["labels"]
                .get("node-role.kubernetes.io/control-plane")
                .is_none()
        );
    }
}
