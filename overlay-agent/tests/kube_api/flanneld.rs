//! What flanneld's flags and environment make the Kubernetes API source do: the
//! node's name from its pod (`POD_NAMESPACE`/`POD_NAME`), the API at
//! `--kube-api-url`, and flannel's annotations under `--kube-annotation-prefix`.

use overlay_agent::nodes::{annotations::Names, kube};
use serde_json::json;

use super::{
    fake::FakeApi,
    harness::{Harness, agent_address, ip, node},
    nodes::{PUBLIC_IP, bare_node},
};

fn pod(namespace: &str, name: &str, node_name: Option<&str>) -> serde_json::Value {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"containers": [{"name": "kube-flannel", "image": "flannel"}]},
    });
    if let Some(n) = node_name {
        pod["spec"]["nodeName"] = n.into();
    }
    pod
}

#[tokio::test]
async fn the_node_name_comes_from_the_pod_through_kube_api_url() {
    let api = FakeApi::start().await;
    api.add_pod(pod("kube-flannel", "kube-flannel-ds-abcde", Some("n0")));
    api.add_pod(pod("kube-flannel", "pending", None));
    // --kube-api-url alone: outside a pod, the URL without credentials.
    let client = kube::client(None, Some(&api.url())).await.unwrap();
    let name = kube::pod_node_name(&client, "kube-flannel", "kube-flannel-ds-abcde").await;
    assert_eq!(name.unwrap(), "n0");
    let e = kube::pod_node_name(&client, "kube-flannel", "gone")
        .await
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("error retrieving pod spec for 'kube-flannel/gone'"),
        "{e:#}"
    );
    let e = kube::pod_node_name(&client, "kube-flannel", "pending")
        .await
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("node name not present in pod spec 'kube-flannel/pending'"),
        "{e:#}"
    );
    let asked: Vec<String> = api.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(
        asked[0],
        "/api/v1/namespaces/kube-flannel/pods/kube-flannel-ds-abcde"
    );
}

#[tokio::test]
async fn kube_api_url_replaces_the_kubeconfigs_server() {
    let api = FakeApi::start().await;
    api.add_pod(pod("kube-flannel", "p", Some("n7")));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    // A server nothing listens on: only the override reaches the fake.
    std::fs::write(
        &kubeconfig,
        r#"apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: "http://127.0.0.1:9"}
users:
- name: u
  user: {token: t}
contexts:
- name: x
  context: {cluster: c, user: u}
current-context: x
"#,
    )
    .unwrap();
    let client = kube::client(Some(&kubeconfig), Some(&api.url()))
        .await
        .unwrap();
    assert_eq!(
        kube::pod_node_name(&client, "kube-flannel", "p")
            .await
            .unwrap(),
        "n7"
    );
    let e = kube::client(None, Some("not a url"))
        .await
        .err()
        .expect("refused");
    assert!(format!("{e:#}").contains("--kube-api-url"), "{e:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotations_under_another_prefix() {
    let api = FakeApi::start().await;
    api.apply(bare_node("n0", "10.244.0.0/24", "192.168.0.10"));
    // A flanneld run with --kube-annotation-prefix=example.com/team; stale annotations
    // under the default prefix are not ours to read.
    let mut f1 = bare_node("f1", "10.244.1.0/24", "192.168.0.11");
    f1["metadata"]["annotations"]["example.com/team-public-ip"] = "192.168.3.11".into();
    f1["metadata"]["annotations"]["example.com/team-backend-type"] = "ipip".into();
    f1["metadata"]["annotations"][PUBLIC_IP] = "192.168.9.9".into();
    api.apply(f1);
    let names = Names::new("example.com/team").unwrap();
    let mut h = Harness::start_with(api, "n0", agent_address("192.168.3.10"), 500, |s| {
        s.with_annotations(names)
    });
    let set = h.next_set().await;
    assert_eq!(node(&set, "f1").tunnel_ip, ip("192.168.3.11"));
    h.eventually("n0 annotated", |h| {
        h.api.node("n0").is_some_and(|n| {
            n["metadata"]["annotations"]["example.com/team-public-ip"] == "192.168.3.10"
        })
    })
    .await;
    let annotations = &h.api.node("n0").unwrap()["metadata"]["annotations"];
    assert_eq!(annotations["example.com/team-backend-type"], "ipip");
    assert_eq!(annotations["example.com/team-backend-data"], "null");
    assert_eq!(annotations["example.com/team-kube-subnet-manager"], "true");
    assert!(annotations.get(PUBLIC_IP).is_none(), "{annotations}");
}
