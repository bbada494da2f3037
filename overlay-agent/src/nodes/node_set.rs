//! A node as the overlay sees it ([`NodeInfo`]), read from a Kubernetes Node's slim
//! form, and the node sets the sources deliver ([`NodeSet`]): what every source
//! (`nodes::kube`, `nodes::etcd`, `nodes::file`) shares, below all of them.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use thiserror::Error;

use super::{
    annotations::{BACKEND, Names},
    slim::SlimNode,
};

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
