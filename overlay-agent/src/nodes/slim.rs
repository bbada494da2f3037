//! A Node as the overlay reads it.
//!
//! A Node document is kilobytes (managed fields, images, conditions, labels) of which
//! the overlay reads a few dozen bytes. Deserializing straight into this type skips
//! the rest without allocating it: a 500-Node list page never exists as 500 full
//! `Node` values, and the watch store holds about 1 KB a node instead of ~6 KB of
//! parsed JSON plus a 1.5 KB `Node` struct. It is a Kubernetes resource of its own for
//! kube-rs (`/api/v1/nodes`, kind Node), so the watcher lists and watches it directly.

use std::collections::BTreeMap;

use k8s_openapi::{
    ClusterResourceScope, Metadata, Resource, api::core::v1::Node,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{Deserialize, Deserializer};

/// What follows the prefix in the name of each annotation the agent reads or writes.
pub const SUFFIXES: [&str; 6] = [
    PUBLIC_IP,
    PUBLIC_IP_OVERWRITE,
    NODE_PUBLIC_IP,
    BACKEND_TYPE,
    BACKEND_DATA,
    KUBE_SUBNET_MANAGER,
];
pub const PUBLIC_IP: &str = "public-ip";
pub const PUBLIC_IP_OVERWRITE: &str = "public-ip-overwrite";
pub const NODE_PUBLIC_IP: &str = "node-public-ip";
pub const BACKEND_TYPE: &str = "backend-type";
pub const BACKEND_DATA: &str = "backend-data";
pub const KUBE_SUBNET_MANAGER: &str = "kube-subnet-manager";
/// The type of the condition the agent reads and publishes (`nodes::condition`).
pub const NETWORK_UNAVAILABLE: &str = "NetworkUnavailable";

/// flannel's annotations of a node, sorted by key: those whose name ends as one the
/// agent reads (`public-ip`, ...), whatever their prefix (`--kube-annotation-prefix`
/// decides which are read). A few entries: a sorted vector is a fraction of a map's
/// size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Annotations(Vec<(String, String)>);

impl Annotations {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| self.0[i].1.as_str())
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Annotations {
    /// Keeps flannel's annotations only.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut all: Vec<(String, String)> = iter
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .filter(|(k, _)| SUFFIXES.iter().any(|s| k.ends_with(s)))
            .collect();
        all.sort();
        all.dedup_by(|a, b| a.0 == b.0);
        all.shrink_to_fit();
        Self(all)
    }
}

#[derive(Debug, Clone, Default)]
pub struct SlimNode {
    /// Name and resourceVersion only: what the watcher and its store use.
    pub metadata: ObjectMeta,
    pub annotations: Annotations,
    /// `spec.podCIDRs`, else `spec.podCIDR`.
    pub pod_cidrs: Vec<String>,
    /// The `InternalIP` entries of `status.addresses`.
    pub internal_ips: Vec<String>,
    /// The status (`True`, `False`, `Unknown`) of the `NetworkUnavailable` entry of
    /// `status.conditions`, which the agent sets to `False` on its own node.
    pub network_unavailable: Option<String>,
}

impl<'de> Deserialize<'de> for SlimNode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Every field not named here is skipped by serde without being kept.
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default)]
            metadata: Option<Meta>,
            #[serde(default)]
            spec: Option<Spec>,
            #[serde(default)]
            status: Option<Status>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Meta {
            name: Option<String>,
            resource_version: Option<String>,
            annotations: Option<BTreeMap<String, String>>,
        }
        #[derive(Deserialize)]
        struct Spec {
            #[serde(rename = "podCIDR")]
            pod_cidr: Option<String>,
            #[serde(rename = "podCIDRs")]
            pod_cidrs: Option<Vec<String>>,
        }
        #[derive(Deserialize)]
        struct Status {
            addresses: Option<Vec<Address>>,
            conditions: Option<Vec<Condition>>,
        }
        #[derive(Deserialize)]
        struct Condition {
            #[serde(rename = "type")]
            kind: String,
            status: String,
        }
        #[derive(Deserialize)]
        struct Address {
            address: String,
            #[serde(rename = "type")]
            kind: String,
        }

        let raw = Raw::deserialize(d)?;
        let meta = raw.metadata.unwrap_or(Meta {
            name: None,
            resource_version: None,
            annotations: None,
        });
        let pod_cidrs = raw
            .spec
            .map(|s| match s.pod_cidrs {
                Some(all) if !all.is_empty() => all,
                _ => s.pod_cidr.into_iter().collect(),
            })
            .unwrap_or_default();
        let (addresses, conditions) = raw
            .status
            .map(|s| (s.addresses, s.conditions))
            .unwrap_or_default();
        let internal_ips = addresses
            .into_iter()
            .flatten()
            .filter(|a| a.kind == "InternalIP")
            .map(|a| a.address)
            .collect();
        let network_unavailable = conditions
            .into_iter()
            .flatten()
            .find(|c| c.kind == NETWORK_UNAVAILABLE)
            .map(|c| c.status);
        Ok(Self {
            metadata: ObjectMeta {
                name: meta.name,
                resource_version: meta.resource_version,
                ..ObjectMeta::default()
            },
            annotations: meta.annotations.into_iter().flatten().collect(),
            pod_cidrs,
            internal_ips,
            network_unavailable,
        })
    }
}

/// The same resource as `Node`, for kube-rs's `Api`, watcher and store.
impl Resource for SlimNode {
    const API_VERSION: &'static str = <Node as Resource>::API_VERSION;
    const GROUP: &'static str = <Node as Resource>::GROUP;
    const KIND: &'static str = <Node as Resource>::KIND;
    const VERSION: &'static str = <Node as Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <Node as Resource>::URL_PATH_SEGMENT;
    type Scope = ClusterResourceScope;
}

impl Metadata for SlimNode {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_what_the_overlay_reads() {
        let node: SlimNode = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {
                "name": "w1", "resourceVersion": "42", "uid": "u",
                "labels": {"kubernetes.io/hostname": "w1"},
                "annotations": {
                    "flannel.alpha.coreos.com/public-ip": "172.18.0.9",
                    "flannel.alpha.coreos.com/backend-type": "ipip",
                    "example.com/team-public-ip": "172.18.0.10",
                    "node.alpha.kubernetes.io/ttl": "0"
                },
                "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]
            },
            "spec": {"podCIDR": "fd00::/64", "podCIDRs": ["fd00::/64", "10.244.1.0/24"],
                     "taints": [{"key": "k", "effect": "NoSchedule"}]},
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": "172.18.0.3"},
                    {"type": "ExternalIP", "address": "203.0.113.1"},
                    {"type": "Hostname", "address": "w1"}
                ],
                "conditions": [
                    {"type": "Ready", "status": "True", "reason": "KubeletReady"},
                    {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp",
                     "lastTransitionTime": "2026-12-06T21:00:00Z"}
                ],
                "images": [{"names": ["a"], "sizeBytes": 1}]
            }
        }))
        .unwrap();
        assert_eq!(node.metadata.name.as_deref(), Some("w1"));
        assert_eq!(node.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(node.metadata.uid, None);
        assert_eq!(node.metadata.labels, None);
        assert_eq!(
            node.annotations,
            [
                ("example.com/team-public-ip", "172.18.0.10"),
                ("flannel.alpha.coreos.com/backend-type", "ipip"),
                ("flannel.alpha.coreos.com/public-ip", "172.18.0.9"),
            ]
            .into_iter()
            .collect()
        );
        assert_eq!(
            node.annotations.get("flannel.alpha.coreos.com/public-ip"),
            Some("172.18.0.9")
        );
        assert_eq!(node.annotations.get("node.alpha.kubernetes.io/ttl"), None);
        assert_eq!(node.pod_cidrs, ["fd00::/64", "10.244.1.0/24"]);
        assert_eq!(node.internal_ips, ["172.18.0.3"]);
        assert_eq!(node.network_unavailable.as_deref(), Some("False"));

        let bare: SlimNode =
            serde_json::from_value(serde_json::json!({"spec": {"podCIDR": "10.244.2.0/24"}}))
                .unwrap();
        assert_eq!(bare.pod_cidrs, ["10.244.2.0/24"]);
        assert_eq!(bare.network_unavailable, None);
        assert_eq!(bare.metadata.name, None);
        assert!(serde_json::from_value::<SlimNode>(serde_json::json!({"spec": 3})).is_err());
    }
}
