//! This node's flannel annotations: what is patched, when, and how flanneld nodes and
//! ours read each other.

use std::time::Duration;

use serde_json::{Value, json};

use super::{
    fake::{FakeApi, Request, Which},
    harness::{Harness, agent_address, ip, node},
    nodes::{
        BACKEND_DATA, BACKEND_TYPE, KUBE_SUBNET_MANAGER, OVERWRITE, PUBLIC_IP, bare_node,
        flannel_node,
    },
};

/// Our node n0 (eth1 at 192.168.3.10, its InternalIP on eth0 192.168.0.10), not yet
/// annotated; a flanneld ipip node reached at an address other than its InternalIP;
/// a flanneld vxlan node.
async fn mixed_cluster() -> FakeApi {
    let api = FakeApi::start().await;
    api.apply(bare_node("n0", "10.244.0.0/24", "192.168.0.10"));
    api.apply(flannel_node(
        "f1",
        "10.244.1.0/24",
        "192.168.0.11",
        "192.168.3.11",
    ));
    let mut vxlan = flannel_node("v2", "10.244.2.0/24", "192.168.0.12", "192.168.0.12");
    vxlan["metadata"]["annotations"][BACKEND_TYPE] = "vxlan".into();
    vxlan["metadata"]["annotations"][BACKEND_DATA] =
        r#"{"VNI":1,"VtepMAC":"5e:2a:7f:10:00:02"}"#.into();
    api.apply(vxlan);
    api.apply(flannel_node(
        "n3",
        "10.244.3.0/24",
        "192.168.0.13",
        "192.168.3.13",
    ));
    api
}

fn start(api: FakeApi) -> Harness {
    Harness::start(api, "n0", agent_address("192.168.3.10"), 500)
}

fn body(patch: &Request) -> Value {
    serde_json::from_str(&patch.body).unwrap()
}

async fn patched(h: &Harness, count: usize) -> Vec<Request> {
    h.eventually(&format!("{count} patches"), |h| {
        h.api.patches().len() >= count
    })
    .await;
    let patches = h.api.patches();
    assert_eq!(patches.len(), count, "{patches:#?}");
    patches
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_once_as_flanneld_does_and_read_back_by_flanneld() {
    let mut h = start(mixed_cluster().await);
    let set = h.next_set().await;
    // flanneld's annotations are read: f1 at its public-ip, v2 flagged for its backend.
    assert_eq!(node(&set, "f1").tunnel_ip, ip("192.168.3.11"));
    assert_eq!(node(&set, "v2").foreign_backend.as_deref(), Some("vxlan"));
    assert_eq!(node(&set, "n3").foreign_backend, None);

    let patches = patched(&h, 1).await;
    let p = &patches[0];
    assert_eq!(p.path, "/api/v1/nodes/n0/status");
    assert_eq!(
        p.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(
        body(p),
        json!({"metadata": {"annotations": {
            "flannel.alpha.coreos.com/backend-data": "null",
            "flannel.alpha.coreos.com/backend-type": "ipip",
            "flannel.alpha.coreos.com/kube-subnet-manager": "true",
            "flannel.alpha.coreos.com/public-ip": "192.168.3.10",
        }}})
    );
    h.eventually("the published annotations are seen", |h| {
        h.status.annotations().synced
    })
    .await;
    // Our published address comes back as n0's (which the dataplane does not need:
    // it decides its own address).
    h.eventually("n0 read back", |h| {
        h.rx.borrow()
            .as_ref()
            .is_some_and(|s| node(s, "n0").tunnel_ip == ip("192.168.3.10"))
    })
    .await;
    h.rx.borrow_and_update();

    // What flanneld's kube subnet manager requires of a node to route to it: the
    // manager flag, our backend type and a parseable public IPv4 address.
    let ours = h.api.node("n0").unwrap();
    let a = &ours["metadata"]["annotations"];
    assert_eq!(a[KUBE_SUBNET_MANAGER], "true");
    assert_eq!(a[BACKEND_TYPE], "ipip");
    assert_eq!(
        a[PUBLIC_IP]
            .as_str()
            .unwrap()
            .parse::<std::net::Ipv4Addr>()
            .unwrap(),
        ip("192.168.3.10")
    );
    assert_eq!(
        a["kubeadm.alpha.kubernetes.io/cri-socket"], "unix:///run/containerd/containerd.sock",
        "others' annotations stay"
    );

    // Other nodes' events, and ours coming back, cause no further patch.
    h.api.apply(flannel_node(
        "f4",
        "10.244.4.0/24",
        "192.168.0.14",
        "192.168.3.14",
    ));
    assert!(h.next_set().await.nodes.iter().any(|n| n.name == "f4"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.api.patches().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_annotations_are_put_back_and_the_overwrite_wins() {
    let mut h = start(mixed_cluster().await);
    h.next_set().await;
    patched(&h, 1).await;

    // Someone (a flanneld that ran here before) writes another address.
    annotate_n0(&h, PUBLIC_IP, "192.168.0.10", 2, "192.168.3.10").await;
    // The operator's overwrite annotation decides the published address.
    annotate_n0(&h, OVERWRITE, "203.0.113.10", 3, "203.0.113.10").await;
}

/// Sets annotation `key` of n0 from outside; the agent must answer with its patch
/// number `count`, which sets public-ip to `published` and nothing else.
async fn annotate_n0(h: &Harness, key: &str, value: &str, count: usize, published: &str) {
    let mut node = h.api.node("n0").unwrap();
    node["metadata"]["annotations"][key] = value.into();
    h.api.apply(node);
    let patches = patched(h, count).await;
    assert_eq!(
        body(&patches[count - 1]),
        json!({"metadata": {"annotations": {PUBLIC_IP: published}}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_flanneld_left_right_is_not_patched() {
    let api = FakeApi::start().await;
    api.apply(flannel_node(
        "n0",
        "10.244.0.0/24",
        "192.168.0.10",
        "192.168.3.10",
    ));
    let mut h = start(api);
    h.next_set().await;
    h.eventually("in place", |h| h.status.annotations().synced)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(h.api.patches().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_patches_are_recorded_and_retried() {
    let api = mixed_cluster().await;
    api.fail(Which::Patch, 500, 2);
    let mut h = start(api);
    h.next_set().await;
    // Retried by the publisher's own timer: no node event is needed.
    let patches = patched(&h, 3).await;
    assert_eq!(
        patches.iter().map(|p| p.status).collect::<Vec<_>>(),
        [500, 500, 200]
    );
    assert!(patches.iter().all(|p| p.body == patches[0].body));
    h.eventually("recovered", |h| h.status.annotations().synced)
        .await;
    let a = h.status.annotations();
    assert_eq!(a.errors_total, 2);
    assert_eq!(a.error, None);
}
