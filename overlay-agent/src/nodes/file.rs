//! Node source: a file holding `kubectl get nodes -o json` output, re-read on change.
//! flannel's annotations are read under `--kube-annotation-prefix`, as from the API.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;
use tokio::sync::watch;
use tracing::{error, info};

use super::{annotations::Names, node_set::NodeSet, slim::SlimNode};
use crate::status::Status;

/// How often the file is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Parses what `kubectl get nodes -o json` prints (`kind: List`, or `NodeList` from
/// the API), or a single `Node` from `kubectl get node NAME -o json`.
pub fn parse(text: &[u8], names: &Names) -> Result<NodeSet> {
    #[derive(Deserialize)]
    struct Kind {
        kind: Option<String>,
    }
    #[derive(Deserialize)]
    struct List {
        items: Vec<SlimNode>,
    }
    let kind = serde_json::from_slice::<Kind>(text)
        .context("not a JSON object")?
        .kind;
    match kind.as_deref() {
        Some("List" | "NodeList") => {
            let list: List = serde_json::from_slice(text).context("not a list of Nodes")?;
            Ok(NodeSet::of(&list.items, names))
        }
        Some("Node") => {
            let node: SlimNode = serde_json::from_slice(text).context("not a valid Node")?;
            Ok(NodeSet::of([&node], names))
        }
        other => bail!(
            "expected kind List, NodeList or Node (kubectl get nodes -o json), found {other:?}"
        ),
    }
}

/// Watches `path`, publishing each new, valid content. A missing or unreadable file,
/// or one that does not parse, is reported (once per distinct problem) and the last
/// good set stays published.
pub async fn watch_file(
    path: PathBuf,
    names: Names,
    tx: watch::Sender<Option<NodeSet>>,
    status: &Status,
) {
    let mut last_bytes: Option<Vec<u8>> = None;
    let mut last_error: Option<String> = None;
    let mut interval = tokio::time::interval(POLL_INTERVAL);
    loop {
        interval.tick().await;
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) => {
                report(
                    &path,
                    &mut last_error,
                    status,
                    format!("cannot read the node file: {e}"),
                );
                last_bytes = None;
                continue;
            }
        };
        if last_bytes.as_deref() == Some(&bytes[..]) {
            continue;
        }
        match parse(&bytes, &names) {
            Ok(set) => {
                last_error = None;
                status.source_synced();
                info!(path = %path.display(), nodes = set.nodes.len(), "node file read");
                if tx.send(Some(set)).is_err() {
                    return;
                }
            }
            Err(e) => report(&path, &mut last_error, status, format!("{e:#}")),
        }
        last_bytes = Some(bytes);
    }
}

fn report(path: &std::path::Path, last: &mut Option<String>, status: &Status, problem: String) {
    if last.as_ref() != Some(&problem) {
        status.source_failed(problem.clone());
        error!(path = %path.display(), problem, "node file unusable; keeping the last known nodes");
        *last = Some(problem);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nodes::node_set::tests::node_json;

    #[test]
    fn kubectl_list_shapes() {
        let items = vec![
            node_json("cp", Some("10.244.0.0/24"), Some("172.18.0.2"), None),
            node_json("w1", Some("10.244.1.0/24"), Some("172.18.0.3"), None),
            node_json("new", None, Some("172.18.0.9"), None),
        ];
        for kind in ["List", "NodeList"] {
            let doc = serde_json::json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": ""}, "items": items});
            let set = parse(doc.to_string().as_bytes(), &Names::default()).unwrap();
            assert_eq!(
                set.nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>(),
                ["cp", "w1"]
            );
            assert_eq!(set.errors.len(), 1);
        }
        let one = parse(items[1].to_string().as_bytes(), &Names::default()).unwrap();
        assert_eq!(one.nodes.len(), 1);
        assert!(parse(b"{\"items\": 3}", &Names::default()).is_err());
        assert!(parse(b"{\"kind\": \"List\", \"items\": 3}", &Names::default()).is_err());
        assert!(parse(b"{\"kind\": \"Pod\"}", &Names::default()).is_err());
        assert!(parse(b"not json", &Names::default()).is_err());
        // flannel's annotations under --kube-annotation-prefix.
        let mut node = items[1].clone();
        node["metadata"]["annotations"]["example.com/team-public-ip"] = "192.0.2.3".into();
        let custom = Names::new("example.com/team").unwrap();
        let set = parse(node.to_string().as_bytes(), &custom).unwrap();
        assert_eq!(
            set.nodes[0].tunnel_ip,
            std::net::Ipv4Addr::new(192, 0, 2, 3)
        );
        let set = parse(node.to_string().as_bytes(), &Names::default()).unwrap();
        assert_eq!(
            set.nodes[0].tunnel_ip,
            std::net::Ipv4Addr::new(172, 18, 0, 3)
        );
    }

    #[tokio::test]
    async fn rereads_on_change_and_keeps_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nodes.json");
        let list = |n: usize| {
            let items: Vec<_> = (0..n)
                .map(|i| {
                    node_json(
                        &format!("n{i}"),
                        Some(&format!("10.244.{i}.0/24")),
                        Some(&format!("172.18.0.{}", i + 2)),
                        None,
                    )
                })
                .collect();
            serde_json::json!({"kind": "List", "items": items}).to_string()
        };
        std::fs::write(&path, list(2)).unwrap();
        let (tx, mut rx) = watch::channel(None);
        let status = std::sync::Arc::new(Status::default());
        let task = tokio::spawn({
            let (status, path) = (std::sync::Arc::clone(&status), path.clone());
            async move { watch_file(path, Names::default(), tx, &status).await }
        });
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().as_ref().unwrap().nodes.len(), 2);

        std::fs::write(&path, "{ broken").unwrap();
        std::fs::write(&path, list(3)).unwrap();
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().as_ref().unwrap().nodes.len(), 3);

        std::fs::write(&path, "{ broken").unwrap();
        tokio::time::sleep(POLL_INTERVAL * 3).await;
        assert!(
            !rx.has_changed().unwrap(),
            "a broken file must not replace the last good node set"
        );
        assert!(
            status.source().error.is_some(),
            "the broken file is reported"
        );
        assert_eq!(rx.borrow().as_ref().unwrap().nodes.len(), 3);
        task.abort();
    }
}
