//! What the agent needs to know of a Kubernetes Node, and where Nodes come from.

pub mod file;

use std::{net::Ipv4Addr, path::PathBuf};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;

use crate::status::Status;
use thiserror::Error;

/// flannel's annotation for the address other nodes reach this node's tunnel at.
pub const PUBLIC_IP_ANNOTATION: &str = "flannel.alpha.coreos.com/public-ip";

/// A node as the overlay sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeInfo {
    pub name: String,
    /// `spec.podCIDR`.
    pub pod_cidr: Ipv4Net,
    /// Outer address of its tunnel: the public-ip annotation, else its InternalIP.
    pub tunnel_ip: Ipv4Addr,
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
    #[error("node {node}: annotation {PUBLIC_IP_ANNOTATION}={value:?} is not an IPv4 address")]
    BadPublicIp { node: String, value: String },
    #[error("node {0} has neither the {PUBLIC_IP_ANNOTATION} annotation nor an IPv4 InternalIP")]
    NoAddress(String),
}

impl NodeError {
    /// The node the error is about, when it has a name.
    pub fn node(&self) -> Option<&str> {
        match self {
            NodeError::NoName => None,
            NodeError::NoPodCidr(n) | NodeError::NoAddress(n) => Some(n),
            NodeError::BadPodCidr { node, .. } | NodeError::BadPublicIp { node, .. } => Some(node),
        }
    }
}

impl NodeInfo {
    pub fn from_node(node: &Node) -> Result<Self, NodeError> {
        let name = node.metadata.name.clone().ok_or(NodeError::NoName)?;
        let value = node
            .spec
            .as_ref()
            .and_then(|s| s.pod_cidr.clone())
            .ok_or_else(|| NodeError::NoPodCidr(name.clone()))?;
        let pod_cidr = value
            .parse::<Ipv4Net>()
            .map_err(|_| NodeError::BadPodCidr {
                node: name.clone(),
                value,
            })?
            .trunc();
        let tunnel_ip = tunnel_ip(node, &name)?;
        Ok(Self {
            name,
            pod_cidr,
            tunnel_ip,
        })
    }
}

fn tunnel_ip(node: &Node, name: &str) -> Result<Ipv4Addr, NodeError> {
    if let Some(value) = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PUBLIC_IP_ANNOTATION))
    {
        return value.parse().map_err(|_| NodeError::BadPublicIp {
            node: name.to_owned(),
            value: value.clone(),
        });
    }
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok())
        .ok_or_else(|| NodeError::NoAddress(name.to_owned()))
}

/// Where the agent learns the nodes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A file as `kubectl get nodes -o json` prints it, re-read on change.
    File(PathBuf),
}

impl Source {
    /// Publishes the node set on `tx` until the receiver goes away, reporting its
    /// health in `status`.
    pub async fn run(
        self,
        tx: tokio::sync::watch::Sender<Option<NodeSet>>,
        status: std::sync::Arc<Status>,
    ) {
        match self {
            Source::File(path) => file::watch_file(path, tx, &status).await,
        }
    }
}

/// All nodes a source currently knows: the usable ones, and why the others are not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSet {
    pub nodes: Vec<NodeInfo>,
    pub errors: Vec<NodeError>,
}

impl FromIterator<Node> for NodeSet {
    fn from_iter<I: IntoIterator<Item = Node>>(iter: I) -> Self {
        let mut set = NodeSet::default();
        for node in iter {
            match NodeInfo::from_node(&node) {
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
    pub fn node_json(
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
            node["metadata"]["annotations"][PUBLIC_IP_ANNOTATION] = ip.into();
        }
        node
    }

    fn info(v: serde_json::Value) -> Result<NodeInfo, NodeError> {
        NodeInfo::from_node(&serde_json::from_value(v).unwrap())
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
            Err(NodeError::NoAddress("w1".into()))
        );
        assert!(matches!(
            info(node_json("w1", Some("10.244.1.0/24"), None, Some("x"))),
            Err(NodeError::BadPublicIp { .. })
        ));
        assert!(NodeError::NoPodCidr("w1".into()).to_string().contains("w1"));
    }
}
