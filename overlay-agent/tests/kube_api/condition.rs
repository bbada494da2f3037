//! This node's `NetworkUnavailable` condition (`--set-node-network-unavailable`): set
//! to `False` as flanneld sets it, once the network is up, only when it is not so
//! already, and retried.

use std::time::Duration;

use serde_json::{Value, json};

use super::{
    fake::{FakeApi, Request, Which},
    harness::{Harness, agent_address},
    nodes::{bare_node, flannel_node},
};

const STRATEGIC: &str = "application/strategic-merge-patch+json";

/// Our node n0 with `condition` (a NetworkUnavailable entry) among kubelet's, and a
/// flanneld node.
async fn cluster(condition: Option<Value>) -> FakeApi {
    let api = FakeApi::start().await;
    let mut n0 = bare_node("n0", "10.244.0.0/24", "192.168.0.10");
    if let Some(c) = condition {
        n0["status"]["conditions"].as_array_mut().unwrap().push(c);
    }
    api.apply(n0);
    api.apply(flannel_node(
        "f1",
        "10.244.1.0/24",
        "192.168.0.11",
        "192.168.3.11",
    ));
    api
}

fn start(api: FakeApi, on: bool) -> Harness {
    Harness::start_with(api, "n0", agent_address("192.168.3.10"), 500, |s| {
        s.with_network_condition(on)
    })
}

/// The condition patches sent so far.
fn sent(h: &Harness) -> Vec<Request> {
    h.api
        .patches()
        .into_iter()
        .filter(|p| p.content_type.as_deref() == Some(STRATEGIC))
        .collect()
}

async fn sent_eventually(h: &Harness, count: usize) -> Vec<Request> {
    h.eventually(&format!("{count} condition patches"), |h| {
        sent(h).len() >= count
    })
    .await;
    let sent = sent(h);
    assert_eq!(sent.len(), count, "{sent:#?}");
    sent
}

/// The node's conditions on the server, by type: (status, reason).
fn conditions(api: &FakeApi) -> Vec<(String, String, String)> {
    let node = api.node("n0").unwrap();
    node["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
            (s("type"), s("status"), s("reason"))
        })
        .collect()
}

/// Up to the annotations, in place and quiet.
async fn annotated(h: &mut Harness) {
    h.next_set().await;
    h.eventually("annotations in place", |h| h.status.annotations().synced)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_once_the_network_is_up_as_flanneld_sets_it() {
    let mut h = start(cluster(None).await, true);
    annotated(&mut h).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sent(&h).is_empty(), "not before the network is up");

    h.status.network_is_up();
    let p = &sent_eventually(&h, 1).await[0];
    assert_eq!(p.path, "/api/v1/nodes/n0/status");
    let mut body: Value = serde_json::from_str(&p.body).unwrap();
    let condition = &mut body["status"]["conditions"][0];
    for time in ["lastTransitionTime", "lastHeartbeatTime"] {
        let stamp = condition.as_object_mut().unwrap().remove(time).unwrap();
        let stamp: k8s_openapi::jiff::Timestamp = stamp.as_str().unwrap().parse().unwrap();
        let age = k8s_openapi::jiff::Timestamp::now().duration_since(stamp);
        assert!(age.as_secs() < 60, "{time} {stamp}");
    }
    assert_eq!(
        body,
        json!({"status": {"conditions": [{
            "type": "NetworkUnavailable",
            "status": "False",
            "reason": "FlannelIsUp",
            "message": "Flannel is running on this node",
        }]}})
    );
    // Merged on `type`: kubelet's conditions stay.
    let on_server = conditions(&h.api);
    assert_eq!(on_server.len(), 5, "{on_server:?}");
    assert!(on_server.contains(&("Ready".into(), "True".into(), "KubeletReady".into())));
    assert!(on_server.contains(&(
        "NetworkUnavailable".into(),
        "False".into(),
        "FlannelIsUp".into()
    )));
    h.eventually("seen in place", |h| h.status.network_condition().synced)
        .await;
    // Seen back through the watch, other nodes' events: nothing more.
    h.api.apply(flannel_node(
        "f2",
        "10.244.2.0/24",
        "192.168.0.12",
        "192.168.3.12",
    ));
    h.next_set().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sent(&h).len(), 1);
    assert_eq!(h.status.network_condition().errors_total, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_already_up_is_not_patched() {
    let up = json!({"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp",
                    "message": "Flannel is running on this node",
                    "lastTransitionTime": "2026-12-01T08:00:00Z",
                    "lastHeartbeatTime": "2026-12-01T08:00:00Z"});
    let mut h = start(cluster(Some(up)).await, true);
    annotated(&mut h).await;
    h.status.network_is_up();
    h.eventually("seen in place", |h| h.status.network_condition().synced)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sent(&h).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_retried_and_a_condition_set_back_is_put_back() {
    // As a cloud route controller leaves a node it has no route for.
    let down = json!({"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated",
                      "message": "Node created without a route",
                      "lastTransitionTime": "2026-12-01T08:00:00Z",
                      "lastHeartbeatTime": "2026-12-01T08:00:00Z"});
    let mut h = start(cluster(Some(down.clone())).await, true);
    annotated(&mut h).await;
    h.api.fail(Which::Patch, 500, 2);
    h.status.network_is_up();
    // Retried by the publisher's own timer (1 s, then 2 s): no node event is needed.
    let patches = sent_eventually(&h, 3).await;
    assert_eq!(
        patches.iter().map(|p| p.status).collect::<Vec<_>>(),
        [500, 500, 200]
    );
    h.eventually("recovered", |h| h.status.network_condition().synced)
        .await;
    let c = h.status.network_condition();
    assert_eq!((c.errors_total, c.error), (2, None));
    // The entry is replaced in place, not added.
    let on_server = conditions(&h.api);
    assert_eq!(on_server.len(), 5, "{on_server:?}");
    assert!(on_server.contains(&(
        "NetworkUnavailable".into(),
        "False".into(),
        "FlannelIsUp".into()
    )));
    assert_eq!(
        h.api.node("n0").unwrap()["status"]["conditions"][4]["message"],
        "Flannel is running on this node"
    );

    // Someone sets it back: it is put back (once the last patch had time to settle).
    let mut n0 = h.api.node("n0").unwrap();
    n0["status"]["conditions"][4] = down;
    h.api.apply(n0);
    h.eventually("put back", |h| {
        conditions(&h.api).contains(&(
            "NetworkUnavailable".into(),
            "False".into(),
            "FlannelIsUp".into(),
        ))
    })
    .await;
    assert_eq!(sent(&h).len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn left_alone_when_switched_off() {
    let mut h = start(cluster(None).await, false);
    annotated(&mut h).await;
    h.status.network_is_up();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(sent(&h).is_empty());
    assert_eq!(conditions(&h.api).len(), 4);
}
