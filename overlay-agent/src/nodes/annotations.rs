//! flannel's node annotations: what flanneld's kube subnet manager writes on its own
//! Node and reads on the others. Writing the same ones, with the same values, is what
//! lets flanneld nodes and ours route to each other in one cluster, and lets a cluster
//! move from one to the other node by node.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use super::slim::Annotations;

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::{Map, Value, json};
use tracing::{info, warn};

use crate::status::Status;

/// The prefix flanneld uses unless told `--kube-annotation-prefix`.
pub const PREFIX: &str = "flannel.alpha.coreos.com/";
/// The address other nodes send this node's tunnel traffic to.
pub const PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
/// Set by an operator: the address the node's agent must publish as its public-ip.
pub const PUBLIC_IP_OVERWRITE: &str = "flannel.alpha.coreos.com/public-ip-overwrite";
/// The backend the node's agent runs; flanneld ignores nodes of another backend.
pub const BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";
/// Backend-specific data (a VXLAN MAC, a WireGuard key); ipip has none.
pub const BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
/// flanneld's kube subnet manager only considers nodes that carry this with "true".
pub const KUBE_SUBNET_MANAGER: &str = "flannel.alpha.coreos.com/kube-subnet-manager";

/// Our backend type, as flanneld's ipip backend names itself.
pub const BACKEND: &str = "ipip";
/// flanneld's ipip backend has no backend data and marshals its nil JSON to `null`.
const NO_BACKEND_DATA: &str = "null";

/// The annotations this node must carry when it is reached at `address`: those
/// flanneld's `AcquireLease` writes for the ipip backend.
pub fn wanted(address: Ipv4Addr) -> BTreeMap<&'static str, String> {
    BTreeMap::from([
        (BACKEND_TYPE, BACKEND.to_owned()),
        (BACKEND_DATA, NO_BACKEND_DATA.to_owned()),
        (PUBLIC_IP, address.to_string()),
        (KUBE_SUBNET_MANAGER, "true".to_owned()),
    ])
}

/// The JSON merge patch that brings `current` to what `address` wants, with only the
/// annotations that differ; None when nothing does.
pub fn patch(current: &Annotations, address: Ipv4Addr) -> Option<Value> {
    let differing: Map<String, Value> = wanted(address)
        .into_iter()
        .filter(|(key, value)| current.get(key) != Some(value.as_str()))
        .map(|(key, value)| (key.to_owned(), Value::String(value)))
        .collect();
    (!differing.is_empty()).then(|| json!({ "metadata": { "annotations": differing } }))
}

/// How long a patch that was accepted may take to come back through the watch before
/// a still-differing node is patched again.
const SETTLE: Duration = Duration::from_secs(10);
/// Retry delays after a failed patch, doubling up to the maximum.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// A patch that hangs (an unreachable API) must not hold up the node source for long.
const PATCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The last patch sent, and when the node may be looked at again.
struct Sent {
    patch: Value,
    ok: bool,
    again_at: Instant,
}

/// Keeps this node's annotations at what it publishes: reconciles on every change of
/// the node seen through the watch, patches only what differs, and retries failures
/// with backoff.
pub struct Publisher {
    api: Api<Node>,
    node_name: String,
    sent: Option<Sent>,
    retry: Duration,
}

impl Publisher {
    pub fn new(api: Api<Node>, node_name: &str) -> Self {
        Self {
            api,
            node_name: node_name.to_owned(),
            sent: None,
            retry: RETRY_MIN,
        }
    }

    /// When a failed patch should be retried even if the node does not change.
    pub fn retry_at(&self) -> Option<Instant> {
        self.sent.as_ref().filter(|s| !s.ok).map(|s| s.again_at)
    }

    /// Makes the node's annotations (`current`, as last seen) announce `address`.
    pub async fn reconcile(&mut self, current: &Annotations, address: Ipv4Addr, status: &Status) {
        let Some(patch) = patch(current, address) else {
            if self.sent.take().is_some() || !status.annotations().synced {
                info!(node = self.node_name, %address, "flannel annotations are in place");
            }
            self.retry = RETRY_MIN;
            status.annotations_published();
            return;
        };
        // The same patch again before its answer can have come back through the
        // watch (or before its retry time) would only add load on the API server.
        if let Some(sent) = &self.sent
            && sent.patch == patch
            && Instant::now() < sent.again_at
        {
            return;
        }
        let params = PatchParams::default();
        let merge = Patch::Merge(&patch);
        // Through the status subresource, as flanneld: its RBAC grants `patch` on
        // nodes/status only, and ours can be the same.
        let request = self.api.patch_status(&self.node_name, &params, &merge);
        let result = match tokio::time::timeout(PATCH_TIMEOUT, request).await {
            Ok(r) => r.map(drop).map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {PATCH_TIMEOUT:?}")),
        };
        let ok = result.is_ok();
        let again_at = Instant::now() + if ok { SETTLE } else { self.retry };
        match result {
            Ok(()) => {
                info!(node = self.node_name, %address, patch = %patch, "flannel annotations published");
                self.retry = RETRY_MIN;
            }
            Err(e) => {
                let error = format!("patching the annotations of node {}: {e}", self.node_name);
                warn!(retry_in = ?self.retry, "{error}");
                status.annotations_failed(error);
                self.retry = (self.retry * 2).min(RETRY_MAX);
            }
        }
        self.sent = Some(Sent {
            patch,
            ok,
            again_at,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> Annotations {
        pairs.iter().copied().collect()
    }

    const ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 168, 3, 113);

    #[test]
    fn a_bare_node_gets_all_four_as_flanneld_writes_them() {
        let p = patch(&Annotations::default(), ADDRESS).unwrap();
        assert_eq!(
            p,
            json!({"metadata": {"annotations": {
                "flannel.alpha.coreos.com/backend-type": "ipip",
                "flannel.alpha.coreos.com/backend-data": "null",
                "flannel.alpha.coreos.com/public-ip": "192.168.3.113",
                "flannel.alpha.coreos.com/kube-subnet-manager": "true",
            }}})
        );
        assert_eq!(patch(&annotations(&[("other/x", "y")]), ADDRESS), Some(p));
    }

    #[test]
    fn only_what_differs_is_sent_and_nothing_when_in_place() {
        // As flanneld's ipip backend left the node, with another address, and with
        // annotations of others that must be left alone.
        let flanneld = annotations(&[
            (BACKEND_TYPE, "ipip"),
            (BACKEND_DATA, "null"),
            (PUBLIC_IP, "192.168.0.113"),
            (KUBE_SUBNET_MANAGER, "true"),
            ("node.alpha.kubernetes.io/ttl", "0"),
        ]);
        assert_eq!(
            patch(&flanneld, ADDRESS),
            Some(
                json!({"metadata": {"annotations": {"flannel.alpha.coreos.com/public-ip": "192.168.3.113"}}})
            )
        );
        assert_eq!(patch(&flanneld, Ipv4Addr::new(192, 168, 0, 113)), None);
        // A vxlan node moving to us: type and data change, the rest stays.
        let vxlan = annotations(&[
            (BACKEND_TYPE, "vxlan"),
            (BACKEND_DATA, r#"{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}"#),
            (PUBLIC_IP, "192.168.3.113"),
            (KUBE_SUBNET_MANAGER, "true"),
        ]);
        assert_eq!(
            patch(&vxlan, ADDRESS),
            Some(json!({"metadata": {"annotations": {
                "flannel.alpha.coreos.com/backend-type": "ipip",
                "flannel.alpha.coreos.com/backend-data": "null",
            }}}))
        );
    }
}
