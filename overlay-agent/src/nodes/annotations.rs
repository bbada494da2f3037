//! flannel's node annotations: what flanneld's kube subnet manager writes on its own
//! Node and reads on the others. Writing the same ones, with the same values, is what
//! lets flanneld nodes and ours route to each other in one cluster, and lets a cluster
//! move from one to the other node by node. Their prefix is flanneld's
//! `--kube-annotation-prefix` ([`Names`]).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use super::slim::{
    Annotations, BACKEND_DATA, BACKEND_TYPE, KUBE_SUBNET_MANAGER, NODE_PUBLIC_IP, PUBLIC_IP,
    PUBLIC_IP_OVERWRITE,
};

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::{Map, Value, json};
use tracing::{info, warn};

use crate::status::Status;

/// The prefix flanneld uses unless told `--kube-annotation-prefix`.
pub const DEFAULT_PREFIX: &str = "flannel.alpha.coreos.com";

/// Our backend type, as flanneld's ipip backend names itself.
pub const BACKEND: &str = "ipip";
/// flanneld's ipip backend has no backend data and marshals its nil JSON to `null`.
const NO_BACKEND_DATA: &str = "null";

/// The names of flannel's annotations under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The address other nodes send this node's tunnel traffic to.
    pub public_ip: String,
    /// Set by an operator: the address the node's agent must publish as its public-ip.
    pub public_ip_overwrite: String,
    /// Set by an operator: read once at start, it takes the place of `--public-ip`.
    pub node_public_ip: String,
    /// The backend the node's agent runs; flanneld ignores nodes of another backend.
    pub backend_type: String,
    /// Backend-specific data (a VXLAN MAC, a WireGuard key); ipip has none.
    pub backend_data: String,
    /// flanneld's kube subnet manager only considers nodes that carry this with "true".
    pub kube_subnet_manager: String,
}

impl Names {
    /// The names under `prefix`, derived and checked as flanneld's `newAnnotations`
    /// (flannel-io/flannel v0.28.9 `pkg/subnet/kube/annotations.go`): at most one
    /// `/`, appended when there is none; after a `/NAME` a `-` is appended; the result
    /// must look like `fqdn/[name-]` (the check searches, as Go's MatchString does).
    pub fn new(prefix: &str) -> Result<Self, String> {
        let mut p = prefix.to_owned();
        match p.matches('/').count() {
            0 => p.push('/'),
            1 => {}
            _ => {
                return Err(format!(
                    "annotation prefix {prefix:?} has more than one \"/\""
                ));
            }
        }
        if !p.ends_with('/') && !p.ends_with('-') {
            p.push('-');
        }
        let format = regex::Regex::new(r"(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?$")
            .expect("a valid expression");
        if !format.is_match(&p) {
            return Err(format!(
                "annotation prefix {prefix:?} is not in the format fqdn/[0-9a-z-_]*"
            ));
        }
        let name = |suffix: &str| format!("{p}{suffix}");
        Ok(Self {
            public_ip: name(PUBLIC_IP),
            public_ip_overwrite: name(PUBLIC_IP_OVERWRITE),
            node_public_ip: name(NODE_PUBLIC_IP),
            backend_type: name(BACKEND_TYPE),
            backend_data: name(BACKEND_DATA),
            kube_subnet_manager: name(KUBE_SUBNET_MANAGER),
        })
    }
}

impl std::str::FromStr for Names {
    type Err = String;

    fn from_str(prefix: &str) -> Result<Self, String> {
        Self::new(prefix)
    }
}

impl Default for Names {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX).expect("flannel's default prefix is valid")
    }
}

/// The annotations this node must carry when it is reached at `address`: those
/// flanneld's `AcquireLease` writes for the ipip backend.
pub fn wanted(address: Ipv4Addr, names: &Names) -> BTreeMap<&str, String> {
    BTreeMap::from([
        (names.backend_type.as_str(), BACKEND.to_owned()),
        (names.backend_data.as_str(), NO_BACKEND_DATA.to_owned()),
        (names.public_ip.as_str(), address.to_string()),
        (names.kube_subnet_manager.as_str(), "true".to_owned()),
    ])
}

/// The JSON merge patch that brings `current` to what `address` wants, with only the
/// annotations that differ; None when nothing does.
pub fn patch(current: &Annotations, address: Ipv4Addr, names: &Names) -> Option<Value> {
    let differing: Map<String, Value> = wanted(address, names)
        .into_iter()
        .filter(|(key, value)| current.get(key) != Some(value.as_str()))
        .map(|(key, value)| (key.to_owned(), Value::String(value)))
        .collect();
    (!differing.is_empty()).then(|| json!({ "metadata": { "annotations": differing } }))
}

/// How long a patch that was accepted may take to come back through the watch before
/// a still-differing node is patched again.
pub(super) const SETTLE: Duration = Duration::from_secs(10);
/// Retry delays after a failed patch, doubling up to the maximum.
pub(super) const RETRY_MIN: Duration = Duration::from_secs(1);
pub(super) const RETRY_MAX: Duration = Duration::from_secs(60);
/// A patch that hangs (an unreachable API) must not hold up the node source for long.
const PATCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Patches the status subresource of Node `name`, as flanneld does for both its
/// annotations and the NetworkUnavailable condition: its RBAC grants `patch` on
/// nodes/status only, and ours can be the same.
pub(super) async fn patch_status<P: serde::Serialize + std::fmt::Debug>(
    api: &Api<Node>,
    name: &str,
    patch: &Patch<P>,
) -> Result<(), String> {
    let params = PatchParams::default();
    let request = api.patch_status(name, &params, patch);
    match tokio::time::timeout(PATCH_TIMEOUT, request).await {
        Ok(r) => r.map(drop).map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {PATCH_TIMEOUT:?}")),
    }
}

/// When a patch of the node may be sent again: after one that succeeded, once it had
/// time to come back through the watch; after failures, with doubling delays.
#[derive(Default)]
pub(super) struct Pacing {
    /// Whether the last patch succeeded, and when the node may be looked at again.
    last: Option<(bool, Instant)>,
    failures: u32,
}

impl Pacing {
    /// When a failed patch should be retried even if the node does not change.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.last.filter(|(ok, _)| !ok).map(|(_, at)| at)
    }

    /// A patch now would come too early.
    pub(super) fn waiting(&self) -> bool {
        self.last.is_some_and(|(_, at)| Instant::now() < at)
    }

    /// Records a patch's result; returns the delay before a retry after a failure.
    pub(super) fn sent(&mut self, ok: bool) -> Duration {
        let delay = if ok {
            self.failures = 0;
            SETTLE
        } else {
            let retry = RETRY_MIN
                .saturating_mul(1 << self.failures.min(16))
                .min(RETRY_MAX);
            self.failures += 1;
            retry
        };
        self.last = Some((ok, Instant::now() + delay));
        delay
    }

    /// The node is as wanted: forgets the past; returns whether a patch had been sent.
    pub(super) fn settled(&mut self) -> bool {
        self.failures = 0;
        self.last.take().is_some()
    }
}

/// Keeps this node's annotations at what it publishes: reconciles on every change of
/// the node seen through the watch, patches only what differs, and retries failures
/// with backoff.
pub struct Publisher {
    api: Api<Node>,
    node_name: String,
    names: Names,
    /// The last patch sent.
    sent: Option<Value>,
    pacing: Pacing,
}

impl Publisher {
    pub fn new(api: Api<Node>, node_name: &str, names: Names) -> Self {
        Self {
            api,
            node_name: node_name.to_owned(),
            names,
            sent: None,
            pacing: Pacing::default(),
        }
    }

    /// When a failed patch should be retried even if the node does not change.
    pub fn retry_at(&self) -> Option<Instant> {
        self.pacing.retry_at()
    }

    /// Makes the node's annotations (`current`, as last seen) announce `address`.
    pub async fn reconcile(&mut self, current: &Annotations, address: Ipv4Addr, status: &Status) {
        let Some(patch) = patch(current, address, &self.names) else {
            self.sent = None;
            if self.pacing.settled() || !status.annotations().synced {
                info!(node = self.node_name, %address, "flannel annotations are in place");
            }
            status.annotations_published();
            return;
        };
        // The same patch again before its answer can have come back through the
        // watch (or before its retry time) would only add load on the API server.
        if self.sent.as_ref() == Some(&patch) && self.pacing.waiting() {
            return;
        }
        let result = patch_status(&self.api, &self.node_name, &Patch::Merge(&patch)).await;
        let retry = self.pacing.sent(result.is_ok());
        match result {
            Ok(()) => {
                info!(node = self.node_name, %address, patch = %patch, "flannel annotations published");
            }
            Err(e) => {
                let error = format!("patching the annotations of node {}: {e}", self.node_name);
                warn!(retry_in = ?retry, "{error}");
                status.annotations_failed(error);
            }
        }
        self.sent = Some(patch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_the_prefix_as_flanneld() {
        let n = |p: &str| Names::new(p).map(|n| n.public_ip);
        assert_eq!(
            Names::default().public_ip,
            "flannel.alpha.coreos.com/public-ip"
        );
        assert_eq!(
            Names::default().backend_type,
            "flannel.alpha.coreos.com/backend-type"
        );
        assert_eq!(n("example.com").unwrap(), "example.com/public-ip");
        assert_eq!(n("example.com/").unwrap(), "example.com/public-ip");
        assert_eq!(n("example.com/team").unwrap(), "example.com/team-public-ip");
        assert_eq!(
            n("example.com/team-").unwrap(),
            "example.com/team-public-ip"
        );
        let overwrite = Names::new("example.com/team").unwrap().public_ip_overwrite;
        assert_eq!(overwrite, "example.com/team-public-ip-overwrite");
        assert!(n("a/b/c").unwrap_err().contains("more than one"));
        for bad in ["example", "example.com/Team", "example.com/a.b", ""] {
            let e = n(bad).unwrap_err();
            assert!(e.contains("fqdn/"), "{bad}: {e}");
        }
        // Go's MatchString searches: a tail in the format is enough, as in flanneld.
        assert_eq!(n("Example.com").unwrap(), "Example.com/public-ip");
        assert_eq!(n("exa mple.com").unwrap(), "exa mple.com/public-ip");
    }

    fn annotations<K: AsRef<str>>(pairs: &[(K, &str)]) -> Annotations {
        pairs.iter().map(|(k, v)| (k.as_ref(), *v)).collect()
    }

    const ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 168, 3, 113);

    #[test]
    fn a_bare_node_gets_all_four_as_flanneld_writes_them() {
        let p = patch(&Annotations::default(), ADDRESS, &Names::default()).unwrap();
        assert_eq!(
            p,
            json!({"metadata": {"annotations": {
                "flannel.alpha.coreos.com/backend-type": "ipip",
                "flannel.alpha.coreos.com/backend-data": "null",
                "flannel.alpha.coreos.com/public-ip": "192.168.3.113",
                "flannel.alpha.coreos.com/kube-subnet-manager": "true",
            }}})
        );
        assert_eq!(
            patch(
                &annotations(&[("other/x", "y")]),
                ADDRESS,
                &Names::default()
            ),
            Some(p)
        );
    }

    #[test]
    fn only_what_differs_is_sent_and_nothing_when_in_place() {
        // As flanneld's ipip backend left the node, with another address, and with
        // annotations of others that must be left alone.
        let n = Names::default();
        let flanneld = annotations(&[
            (n.backend_type.as_str(), "ipip"),
            (n.backend_data.as_str(), "null"),
            (n.public_ip.as_str(), "192.168.0.113"),
            (n.kube_subnet_manager.as_str(), "true"),
            ("node.alpha.kubernetes.io/ttl", "0"),
        ]);
        assert_eq!(
            patch(&flanneld, ADDRESS, &n),
            Some(
                json!({"metadata": {"annotations": {"flannel.alpha.coreos.com/public-ip": "192.168.3.113"}}})
            )
        );
        assert_eq!(patch(&flanneld, Ipv4Addr::new(192, 168, 0, 113), &n), None);
        // A vxlan node moving to us: type and data change, the rest stays.
        let vxlan = annotations(&[
            (n.backend_type.as_str(), "vxlan"),
            (
                n.backend_data.as_str(),
                r#"{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}"#,
            ),
            (n.public_ip.as_str(), "192.168.3.113"),
            (n.kube_subnet_manager.as_str(), "true"),
        ]);
        assert_eq!(
            patch(&vxlan, ADDRESS, &n),
            Some(json!({"metadata": {"annotations": {
                "flannel.alpha.coreos.com/backend-type": "ipip",
                "flannel.alpha.coreos.com/backend-data": "null",
            }}}))
        );
    }
}
