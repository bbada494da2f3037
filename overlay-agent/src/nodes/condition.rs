//! The `NetworkUnavailable` condition of this node's Node, set to `False` once the
//! node's network is up, as flanneld's `--set-node-network-unavailable` (true unless
//! told otherwise; Kubernetes API source only).
//!
//! What flanneld does (flannel-io/flannel v0.28.9, commit 5cd0d52, read, not copied):
//! `main.go` calls the subnet manager's `CompleteLease` last, after the backend network
//! is registered, the masquerade rules are in place, subnet.env is written and the
//! backend runs; `pkg/subnet/kube/kube.go` `CompleteLease` then sends one patch of the
//! status subresource (client-go `PatchStatus`: `PATCH /api/v1/nodes/NAME/status`,
//! `application/strategic-merge-patch+json`) of
//! `{"status":{"conditions":[{"type":"NetworkUnavailable","status":"False",
//! "reason":"FlannelIsUp","message":"Flannel is running on this node",
//! "lastTransitionTime":NOW,"lastHeartbeatTime":NOW}]}}`. The API server merges
//! `conditions` on `type` (its patch merge key in `NodeStatus`), so the node's other
//! conditions stay. flanneld sends it at every start whatever the condition is, and an
//! error is only logged (no retry). `Documentation/kube-flannel.yml` grants `patch` on
//! `nodes/status` for it.
//!
//! Here: the same patch, sent once the datapath is up and this node's routes are in
//! place ([`Status::network_is_up`]), only while the node is seen with the condition
//! other than `False` (a restart sends nothing; a node someone set back to `True` is
//! put back), and retried with backoff on errors, which [`Status`] counts. A cloud
//! route controller that also manages the condition (a cluster with
//! `--configure-cloud-routes`, which flannel clusters switch off) would set it back
//! each time: the agent logs each such change at warn level.

use std::time::Instant;

use k8s_openapi::{
    api::core::v1::{Node, NodeCondition},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{Api, api::Patch};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::{
    annotations::{Pacing, patch_status},
    slim::NETWORK_UNAVAILABLE,
};
use crate::status::Status;

/// flanneld's reason and message.
pub const REASON: &str = "FlannelIsUp";
pub const MESSAGE: &str = "Flannel is running on this node";

/// The strategic merge patch flanneld sends, stamped `now`.
pub fn patch(now: Timestamp) -> Value {
    let condition = NodeCondition {
        type_: NETWORK_UNAVAILABLE.to_owned(),
        status: "False".to_owned(),
        reason: Some(REASON.to_owned()),
        message: Some(MESSAGE.to_owned()),
        last_transition_time: Some(Time(now)),
        last_heartbeat_time: Some(Time(now)),
    };
    json!({ "status": { "conditions": [condition] } })
}

/// Whether the condition's status (as the node was last seen) is what the agent sets.
pub fn in_place(status: Option<&str>) -> bool {
    status == Some("False")
}

/// Keeps the condition at `False` once the network is up.
pub struct ConditionPublisher {
    api: Api<Node>,
    node_name: String,
    pacing: Pacing,
}

impl ConditionPublisher {
    pub fn new(api: Api<Node>, node_name: &str) -> Self {
        Self {
            api,
            node_name: node_name.to_owned(),
            pacing: Pacing::default(),
        }
    }

    /// When a failed patch should be retried even if the node does not change.
    pub fn retry_at(&self) -> Option<Instant> {
        self.pacing.retry_at()
    }

    /// Sets the condition if `current` (its status as last seen) is not `False`.
    pub async fn reconcile(&mut self, current: Option<&str>, status: &Status) {
        if in_place(current) {
            if self.pacing.settled() || !status.network_condition().synced {
                info!(
                    node = self.node_name,
                    "node condition NetworkUnavailable=False is in place"
                );
            }
            status.network_condition_published();
            return;
        }
        // Before the last patch can have come back through the watch (or before
        // its retry time).
        if self.pacing.waiting() {
            return;
        }
        if status.network_condition().synced {
            warn!(node = self.node_name, condition = ?current, "node condition NetworkUnavailable changed by someone else; setting it back to False");
        }
        let patch = patch(Timestamp::now());
        let result = patch_status(&self.api, &self.node_name, &Patch::Strategic(&patch)).await;
        let retry = self.pacing.sent(result.is_ok());
        match result {
            Ok(()) => info!(
                node = self.node_name,
                reason = REASON,
                "node condition NetworkUnavailable set to False"
            ),
            Err(e) => {
                let error = format!(
                    "setting the NetworkUnavailable condition of node {}: {e}",
                    self.node_name
                );
                warn!(retry_in = ?retry, "{error}");
                status.network_condition_failed(error);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_patch_is_flanneld_s() {
        let now: Timestamp = "2026-12-06T21:18:03Z".parse().unwrap();
        assert_eq!(
            patch(now),
            json!({"status": {"conditions": [{
                "type": "NetworkUnavailable",
                "status": "False",
                "reason": "FlannelIsUp",
                "message": "Flannel is running on this node",
                "lastTransitionTime": "2026-12-06T21:18:03Z",
                "lastHeartbeatTime": "2026-12-06T21:18:03Z",
            }]}})
        );
        assert!(in_place(Some("False")));
        for other in [None, Some("True"), Some("Unknown")] {
            assert!(!in_place(other));
        }
    }
}
