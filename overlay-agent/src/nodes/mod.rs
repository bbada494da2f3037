//! What the agent needs to know of a Kubernetes Node, and where Nodes come from.

pub mod address;
pub mod annotations;
pub mod condition;
pub mod etcd;
pub mod file;
pub mod kube;
pub mod slim;

use std::{net::Ipv4Addr, path::PathBuf, sync::Arc};

use anyhow::{Context as _, Result, bail};

use crate::net_conf::NetConf;
use ipnet::Ipv4Net;
use thiserror::Error;
use tokio::sync::watch;

use crate::status::Status;
use address::{Authority, OwnAddress};
use annotations::{BACKEND, Names};
pub use slim::SlimNode;

/// A node as the overlay sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeInfo {
    pub name: String,
    /// Its IPv4 pod subnet: the IPv4 entry of `spec.podCIDRs`, else `spec.podCIDR`.
    pub pod_cidr: Ipv4Net,
    /// Outer address of its tunnel: the public-ip annotation, else its InternalIP.
    pub tunnel_ip: Ipv4Addr,
    /// The public-ip-overwrite annotation: the address an operator set for the node's
    /// own agent to publish (it only matters to that agent).
    pub overwrite: Option<Ipv4Addr>,
    /// The flannel backend the node announces when it is not ours (`ipip`): flanneld
    /// ignores nodes of another backend type, and so do we.
    pub foreign_backend: Option<String>,
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum NodeError {
    #[error("a node has no metadata.name")]
    NoName,
    #[error(
        "node {0} has no spec.podCIDR (not allocated yet? the controller-manager needs --allocate-node-cidrs)"
    )]
    NoPodCidr(String),
    #[error("node {node}: spec.podCIDR {value:?} is not an IPv4 CIDR")]
    BadPodCidr { node: String, value: String },
    #[error("node {node}: annotation {annotation}={value:?} is not an IPv4 address")]
    BadAddress {
        node: String,
        annotation: String,
        value: String,
    },
    #[error("node {node} has neither the {annotation} annotation nor an IPv4 InternalIP")]
    NoAddress { node: String, annotation: String },
}

impl NodeError {
    /// The node the error is about, when it has a name.
    pub fn node(&self) -> Option<&str> {
        match self {
            NodeError::NoName => None,
            NodeError::NoPodCidr(node)
            | NodeError::NoAddress { node, .. }
            | NodeError::BadPodCidr { node, .. }
            | NodeError::BadAddress { node, .. } => Some(node),
        }
    }
}

impl NodeInfo {
    /// The node as the overlay sees it, with flannel's annotations named `names`.
    pub fn from_node(node: &SlimNode, names: &Names) -> Result<Self, NodeError> {
        let name = node.metadata.name.clone().ok_or(NodeError::NoName)?;
        let pod_cidr = pod_cidr(node, &name)?;
        let tunnel_ip = match annotation_address(node, &name, &names.public_ip)? {
            Some(ip) => ip,
            None => node
                .internal_ips
                .iter()
                .find_map(|a| a.parse().ok())
                .ok_or_else(|| NodeError::NoAddress {
                    node: name.clone(),
                    annotation: names.public_ip.clone(),
                })?,
        };
        let overwrite = annotation_address(node, &name, &names.public_ip_overwrite)?;
        let foreign_backend = node
            .annotations
            .get(&names.backend_type)
            .filter(|b| *b != BACKEND)
            .map(str::to_owned);
        Ok(Self {
            name,
            pod_cidr,
            tunnel_ip,
            overwrite,
            foreign_backend,
        })
    }
}

fn annotation_address(
    node: &SlimNode,
    name: &str,
    key: &str,
) -> Result<Option<Ipv4Addr>, NodeError> {
    node.annotations
        .get(key)
        .map(|value| {
            value.parse().map_err(|_| NodeError::BadAddress {
                node: name.to_owned(),
                annotation: key.to_owned(),
                value: value.to_owned(),
            })
        })
        .transpose()
}

/// On a dual-stack node `spec.podCIDR` is the first of `spec.podCIDRs`, which may be
/// the IPv6 one; the overlay carries IPv4, so it takes the IPv4 entry as flanneld does.
fn pod_cidr(node: &SlimNode, name: &str) -> Result<Ipv4Net, NodeError> {
    if let Some(net) = node
        .pod_cidrs
        .iter()
        .find_map(|c| c.parse::<Ipv4Net>().ok())
    {
        return Ok(net.trunc());
    }
    match node.pod_cidrs.first() {
        None => Err(NodeError::NoPodCidr(name.to_owned())),
        Some(value) => Err(NodeError::BadPodCidr {
            node: name.to_owned(),
            value: value.clone(),
        }),
    }
}

/// Where the agent learns the nodes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A file as `kubectl get nodes -o json` prints it, re-read on change; flannel's
    /// annotations named `annotations`.
    File { path: PathBuf, annotations: Names },
    /// The Kubernetes API (flanneld's `--kube-subnet-mgr`), in-cluster or through a
    /// kubeconfig, at `api_url` when given; flannel's annotations named `annotations`.
    Kube {
        kubeconfig: Option<PathBuf>,
        api_url: Option<String>,
        annotations: Names,
        /// Set the node's `NetworkUnavailable` condition to `False` once the network
        /// is up.
        network_condition: bool,
    },
    /// flannel's etcd subnet manager: leases this node's subnet and learns the others'.
    Etcd(Box<etcd::EtcdOptions>),
}

impl Source {
    /// Who has the last word on this node's tunnel address with this source.
    pub fn authority(&self) -> Authority {
        match self {
            Source::File { .. } => Authority::NodeList,
            Source::Kube { .. } | Source::Etcd(_) => Authority::Agent,
        }
    }

    /// Prepares the source and finds this node's name. Connection settings are
    /// checked here, so that a missing kubeconfig stops the agent before it touches
    /// the node. This node's address is decided next ([`Opening::stored_public_ip`]
    /// may take part), then [`Opening::finish`] makes the source ready.
    pub async fn open(self, node_name: &NodeName) -> Result<Opening> {
        Ok(match self {
            Source::File { path, annotations } => Opening {
                name: node_name.without_api()?,
                kind: OpeningKind::File { path, annotations },
            },
            Source::Kube {
                kubeconfig,
                api_url,
                annotations,
                network_condition,
            } => {
                let client = kube::client(kubeconfig.as_deref(), api_url.as_deref()).await?;
                let name = match node_name {
                    NodeName::OfPod { namespace, pod } => {
                        kube::pod_node_name(&client, namespace, pod).await?
                    }
                    other => other.without_api()?,
                };
                Opening {
                    name,
                    kind: OpeningKind::Kube {
                        client,
                        annotations,
                        network_condition,
                    },
                }
            }
            Source::Etcd(opts) => Opening {
                name: node_name.without_api()?,
                kind: OpeningKind::Etcd(opts),
            },
        })
    }
}

/// A source whose node name is known, waiting for this node's address.
pub struct Opening {
    pub name: String,
    kind: OpeningKind,
}

enum OpeningKind {
    File {
        path: PathBuf,
        annotations: Names,
    },
    Kube {
        client: ::kube::Client,
        annotations: Names,
        network_condition: bool,
    },
    Etcd(Box<etcd::EtcdOptions>),
}

impl Opening {
    /// The address an operator stored for this node in its `node-public-ip`
    /// annotation, read once at start: as flanneld (flannel-io/flannel v0.28.9
    /// `main.go`, `GetStoredPublicIP` in `pkg/subnet/kube/kube.go`) it takes the place
    /// of `--public-ip`. An unreadable Node or a bad value is logged and ignored, as
    /// flanneld ignores them. Only the Kubernetes source has one.
    pub async fn stored_public_ip(&self) -> Option<Ipv4Addr> {
        let OpeningKind::Kube {
            client,
            annotations,
            ..
        } = &self.kind
        else {
            return None;
        };
        kube::stored_public_ip(client, &self.name, &annotations.node_public_ip).await
    }

    /// Makes the source ready: etcd is connected to (waiting for it) and its network
    /// configuration read.
    pub async fn finish(self, own_address: OwnAddress) -> Result<OpenSource> {
        Ok(match self.kind {
            OpeningKind::File { path, annotations } => OpenSource::File { path, annotations },
            OpeningKind::Kube {
                client,
                annotations,
                network_condition,
            } => OpenSource::Kube(Box::new(
                kube::KubeSource::new(client, &self.name, own_address)
                    .with_annotations(annotations)
                    .with_network_condition(network_condition),
            )),
            OpeningKind::Etcd(opts) => OpenSource::Etcd(Box::new(
                etcd::EtcdSource::open(&opts, &self.name, own_address).await?,
            )),
        })
    }
}

/// Where this node's name comes from, in flanneld's order (flannel-io/flannel
/// v0.28.9 `pkg/subnet/kube/kube.go` `NewSubnetManager`): `NODE_NAME`, else the
/// `spec.nodeName` of the pod `POD_NAMESPACE`/`POD_NAME` read from the Kubernetes
/// API. `--node-name` comes first; where flanneld gives up (neither variable set)
/// the agent takes the hostname, as it does with the other sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeName {
    /// `--node-name` or `NODE_NAME`.
    Given(String),
    /// The node the pod runs on (the Kubernetes API source only).
    OfPod { namespace: String, pod: String },
    /// This host's name.
    Hostname,
}

impl NodeName {
    /// From `--node-name` and the environment (`env` gives a variable's value); empty
    /// values count as unset, as in flanneld. `api` says whether the source is the
    /// Kubernetes API, where the pod can be looked up.
    pub fn find(
        flag: Option<String>,
        api: bool,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        let var = |k: &str| env(k).filter(|v| !v.is_empty());
        if let Some(name) = flag.filter(|n| !n.is_empty()).or_else(|| var("NODE_NAME")) {
            return Ok(Self::Given(name));
        }
        if !api {
            return Ok(Self::Hostname);
        }
        match (var("POD_NAMESPACE"), var("POD_NAME")) {
            (Some(namespace), Some(pod)) => Ok(Self::OfPod { namespace, pod }),
            (None, None) => Ok(Self::Hostname),
            _ => bail!(
                "env variables POD_NAME and POD_NAMESPACE must be set (or NODE_NAME, or --node-name)"
            ),
        }
    }

    /// The name where no API lookup is needed.
    fn without_api(&self) -> Result<String> {
        match self {
            NodeName::Given(name) => Ok(name.clone()),
            NodeName::Hostname => {
                let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .context("reading the hostname")?;
                Ok(name.trim().to_owned())
            }
            NodeName::OfPod { namespace, pod } => bail!(
                "the node of pod {namespace}/{pod} can only be looked up with --kube-subnet-mgr"
            ),
        }
    }
}

/// A source ready to run.
pub enum OpenSource {
    File { path: PathBuf, annotations: Names },
    Kube(Box<kube::KubeSource>),
    Etcd(Box<etcd::EtcdSource>),
}

impl OpenSource {
    /// The network configuration: etcd's with the etcd source, else the file's.
    pub fn net_conf(&self, file: &std::path::Path) -> Result<NetConf> {
        match self {
            OpenSource::Etcd(source) => Ok(source.net_conf().clone()),
            OpenSource::File { .. } | OpenSource::Kube(_) => NetConf::load(file),
        }
    }

    /// Publishes complete node sets on `tx` until the receiver goes away, reporting
    /// the source's health in `status`.
    pub async fn run(self, tx: watch::Sender<Option<NodeSet>>, status: Arc<Status>) {
        match self {
            OpenSource::File { path, annotations } => {
                file::watch_file(path, annotations, tx, &status).await
            }
            OpenSource::Kube(source) => source.run(tx, status).await,
            OpenSource::Etcd(source) => source.run(tx, status).await,
        }
    }
}

/// All nodes a source currently knows: the usable ones, and why the others are not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSet {
    pub nodes: Vec<NodeInfo>,
    pub errors: Vec<NodeError>,
}

impl NodeSet {
    /// The set of `nodes`, flannel's annotations named `names`.
    pub fn of<'a>(nodes: impl IntoIterator<Item = &'a SlimNode>, names: &Names) -> Self {
        nodes
            .into_iter()
            .map(|n| NodeInfo::from_node(n, names))
            .collect()
    }
}

impl FromIterator<Result<NodeInfo, NodeError>> for NodeSet {
    fn from_iter<I: IntoIterator<Item = Result<NodeInfo, NodeError>>>(iter: I) -> Self {
        let mut set = NodeSet::default();
        for node in iter {
            match node {
                Ok(info) => set.nodes.push(info),
                Err(e) => set.errors.push(e),
            }
        }
        set.nodes.sort();
        set
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A Node as `kubectl get node -o json` prints it (trimmed).
    pub(crate) fn node_json(
        name: &str,
        pod_cidr: Option<&str>,
        internal_ip: Option<&str>,
        public_ip: Option<&str>,
    ) -> serde_json::Value {
        let mut node = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": name, "annotations": {} },
            "spec": {},
            "status": { "addresses": [ { "type": "Hostname", "address": name } ] }
        });
        if let Some(c) = pod_cidr {
            node["spec"]["podCIDR"] = c.into();
            node["spec"]["podCIDRs"] = serde_json::json!([c]);
        }
        if let Some(ip) = internal_ip {
            node["status"]["addresses"]
                .as_array_mut()
                .unwrap()
                .insert(0, serde_json::json!({"type": "InternalIP", "address": ip}));
        }
        if let Some(ip) = public_ip {
            node["metadata"]["annotations"][Names::default().public_ip] = ip.into();
        }
        node
    }

    fn info(v: serde_json::Value) -> Result<NodeInfo, NodeError> {
        NodeInfo::from_node(&serde_json::from_value(v).unwrap(), &Names::default())
    }

    #[test]
    fn internal_ip_and_pod_cidr() {
        let n = info(node_json(
            "w1",
            Some("10.244.1.0/24"),
            Some("172.18.0.3"),
            None,
        ))
        .unwrap();
        assert_eq!(n.pod_cidr, "10.244.1.0/24".parse().unwrap());
        assert_eq!(n.tunnel_ip, Ipv4Addr::new(172, 18, 0, 3));
    }

    #[test]
    fn public_ip_annotation_wins() {
        let n = info(node_json(
            "w1",
            Some("10.244.1.0/24"),
            Some("172.18.0.3"),
            Some("192.168.9.9"),
        ))
        .unwrap();
        assert_eq!(n.tunnel_ip, Ipv4Addr::new(192, 168, 9, 9));
    }

    #[test]
    fn dual_stack_takes_the_ipv4_pod_subnet() {
        let mut v = node_json("w1", Some("fd00:10:244:1::/64"), Some("172.18.0.3"), None);
        v["spec"]["podCIDRs"] = serde_json::json!(["fd00:10:244:1::/64", "10.244.1.0/24"]);
        assert_eq!(info(v).unwrap().pod_cidr, "10.244.1.0/24".parse().unwrap());
        let v6_only = node_json("w1", Some("fd00:10:244:1::/64"), Some("172.18.0.3"), None);
        assert!(matches!(info(v6_only), Err(NodeError::BadPodCidr { .. })));
    }

    #[test]
    fn flannel_annotations_of_other_agents() {
        let mut v = node_json("w1", Some("10.244.1.0/24"), Some("172.18.0.3"), None);
        v["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-type"] = "vxlan".into();
        v["metadata"]["annotations"]["flannel.alpha.coreos.com/public-ip-overwrite"] =
            "203.0.113.3".into();
        let n = info(v.clone()).unwrap();
        assert_eq!(n.foreign_backend.as_deref(), Some("vxlan"));
        assert_eq!(n.overwrite, Some(Ipv4Addr::new(203, 0, 113, 3)));
        v["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-type"] = "ipip".into();
        assert_eq!(info(v.clone()).unwrap().foreign_backend, None);
        v["metadata"]["annotations"]["flannel.alpha.coreos.com/public-ip-overwrite"] = "x".into();
        assert!(matches!(
            info(v),
            Err(NodeError::BadAddress {
                annotation,
                ..
            }) if annotation == Names::default().public_ip_overwrite
        ));
        // Under another prefix, flanneld's default names are not read.
        let custom = Names::new("example.com/team").unwrap();
        let mut v = node_json("w1", Some("10.244.1.0/24"), Some("172.18.0.3"), None);
        v["metadata"]["annotations"]["example.com/team-public-ip"] = "203.0.113.7".into();
        v["metadata"]["annotations"]["example.com/team-backend-type"] = "vxlan".into();
        v["metadata"]["annotations"]["flannel.alpha.coreos.com/public-ip"] = "203.0.113.8".into();
        let n = NodeInfo::from_node(&serde_json::from_value(v).unwrap(), &custom).unwrap();
        assert_eq!(n.tunnel_ip, Ipv4Addr::new(203, 0, 113, 7));
        assert_eq!(n.foreign_backend.as_deref(), Some("vxlan"));
    }

    #[test]
    fn node_name_in_flanneld_order() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let pod = &[
            ("POD_NAME", "kube-flannel-ds-x"),
            ("POD_NAMESPACE", "kube-flannel"),
        ];
        let given = |n: &str| NodeName::Given(n.into());
        assert_eq!(
            NodeName::find(Some("a".into()), true, env(&[("NODE_NAME", "b")])).unwrap(),
            given("a")
        );
        assert_eq!(
            NodeName::find(None, true, env(&[("NODE_NAME", "b"), ("POD_NAME", "p")])).unwrap(),
            given("b")
        );
        assert_eq!(
            NodeName::find(None, true, env(pod)).unwrap(),
            NodeName::OfPod {
                namespace: "kube-flannel".into(),
                pod: "kube-flannel-ds-x".into()
            }
        );
        // Empty is unset, as in flanneld.
        let empty = &[
            ("NODE_NAME", ""),
            ("POD_NAME", "p"),
            ("POD_NAMESPACE", "ns"),
        ];
        assert!(matches!(
            NodeName::find(None, true, env(empty)).unwrap(),
            NodeName::OfPod { .. }
        ));
        // The pod is only looked up through the Kubernetes API.
        assert_eq!(
            NodeName::find(None, false, env(pod)).unwrap(),
            NodeName::Hostname
        );
        assert_eq!(
            NodeName::find(None, true, env(&[])).unwrap(),
            NodeName::Hostname
        );
        let e = NodeName::find(None, true, env(&[("POD_NAME", "p")])).unwrap_err();
        assert!(e.to_string().contains("POD_NAME and POD_NAMESPACE"), "{e}");
    }

    #[test]
    fn ipv6_internal_ip_is_skipped() {
        let mut v = node_json("w1", Some("10.244.1.0/24"), Some("172.18.0.3"), None);
        v["status"]["addresses"].as_array_mut().unwrap().insert(
            0,
            serde_json::json!({"type": "InternalIP", "address": "fc00::3"}),
        );
        assert_eq!(info(v).unwrap().tunnel_ip, Ipv4Addr::new(172, 18, 0, 3));
    }

    #[test]
    fn errors_name_the_node() {
        assert_eq!(
            info(node_json("w1", None, Some("172.18.0.3"), None)),
            Err(NodeError::NoPodCidr("w1".into()))
        );
        assert_eq!(
            info(node_json(
                "w1",
                Some("10.244.1.0/33"),
                Some("172.18.0.3"),
                None
            )),
            Err(NodeError::BadPodCidr {
                node: "w1".into(),
                value: "10.244.1.0/33".into()
            })
        );
        assert_eq!(
            info(node_json("w1", Some("10.244.1.0/24"), None, None)),
            Err(NodeError::NoAddress {
                node: "w1".into(),
                annotation: "flannel.alpha.coreos.com/public-ip".into()
            })
        );
        assert_eq!(
            info(node_json("w1", Some("10.244.1.0/24"), None, Some("x"))),
            Err(NodeError::BadAddress {
                node: "w1".into(),
                annotation: "flannel.alpha.coreos.com/public-ip".into(),
                value: "x".into()
            })
        );
        assert!(NodeError::NoPodCidr("w1".into()).to_string().contains("w1"));
    }
}
