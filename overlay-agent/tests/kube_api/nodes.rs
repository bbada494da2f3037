//! Node documents as `kubectl get node -o json` prints them, made from a real kind
//! worker (kind-worker.json) with another name, subnet and address.

use std::sync::LazyLock;

use serde_json::{Value, json};

static KIND_WORKER: LazyLock<Value> =
    LazyLock::new(|| serde_json::from_str(include_str!("kind-worker.json")).unwrap());

pub(super) const PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
pub(super) const OVERWRITE: &str = "flannel.alpha.coreos.com/public-ip-overwrite";
pub(super) const BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";
pub(super) const BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
pub(super) const KUBE_SUBNET_MANAGER: &str = "flannel.alpha.coreos.com/kube-subnet-manager";

/// A node whose agent (flanneld's ipip backend, or ours) has published `public_ip`.
pub(super) fn flannel_node(
    name: &str,
    pod_cidr: &str,
    internal_ip: &str,
    public_ip: &str,
) -> Value {
    let mut node = bare_node(name, pod_cidr, internal_ip);
    let annotations = &mut node["metadata"]["annotations"];
    annotations[PUBLIC_IP] = public_ip.into();
    annotations[BACKEND_TYPE] = "ipip".into();
    annotations[BACKEND_DATA] = "null".into();
    annotations[KUBE_SUBNET_MANAGER] = "true".into();
    node
}

/// A node no flannel agent has annotated yet.
pub(super) fn bare_node(name: &str, pod_cidr: &str, internal_ip: &str) -> Value {
    let mut node = KIND_WORKER.clone();
    let meta = &mut node["metadata"];
    meta["name"] = name.into();
    meta["labels"]["kubernetes.io/hostname"] = name.into();
    meta["uid"] = format!("00000000-0000-4000-8000-{:012x}", fnv(name)).into();
    meta.as_object_mut().unwrap().remove("resourceVersion");
    let annotations = meta["annotations"].as_object_mut().unwrap();
    annotations.retain(|k, _| !k.starts_with("flannel.alpha.coreos.com/"));
    node["spec"]["podCIDR"] = pod_cidr.into();
    node["spec"]["podCIDRs"] = json!([pod_cidr]);
    node["spec"]["providerID"] = format!("kind://docker/kind/{name}").into();
    node["status"]["addresses"] = json!([
        {"address": internal_ip, "type": "InternalIP"},
        {"address": name, "type": "Hostname"},
    ]);
    node
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3) & 0xffff_ffff_ffff
    })
}
