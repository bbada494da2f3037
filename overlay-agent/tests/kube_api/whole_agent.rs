//! The real agent binary against the fake API, with flanneld's node switches as a
//! DaemonSet would give them: the `NetworkUnavailable` condition comes only after the
//! node's routes are in place, and `--ip-blackhole-route` leaves the blackhole route
//! for its own subnet. Needs root (a network namespace of the test's own thread, as the
//! benchmark's).

use std::process::Command;

use serde_json::Value;

use super::{
    bench::{address, name, plumb, spawn_agent},
    fake::FakeApi,
    nodes,
};
use crate::agent::overlay_routes;

const NODES: u32 = 3;

fn in_own_netns(test: impl AsyncFnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        // SAFETY: unshare(2) takes no pointer; CLONE_NEWNET moves only this thread.
        let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(unshared, 0, "unshare(CLONE_NEWNET) needs root");
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
            .block_on(test());
    })
    .join()
    .unwrap();
}

/// Node 0 (ours, bare) and flanneld nodes.
async fn cluster() -> FakeApi {
    let api = FakeApi::start().await;
    for i in 0..NODES {
        let cidr = format!("10.0.{i}.0/24");
        api.apply(match i {
            0 => nodes::bare_node(&name(i), &cidr, &address(i)),
            _ => nodes::flannel_node(&name(i), &cidr, &address(i), &address(i)),
        });
    }
    api
}

fn network_unavailable(api: &FakeApi) -> Option<Value> {
    let node = api.node(&name(0)).unwrap();
    node["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "NetworkUnavailable")
        .cloned()
}

#[test]
fn the_condition_follows_the_routes_and_the_blackhole_is_left() {
    in_own_netns(async || {
        plumb();
        let api = cluster().await;
        let dir = tempfile::tempdir().unwrap();
        let mut agent = spawn_agent(dir.path(), &api.url(), &["-ip-blackhole-route"]);
        let remote = u64::from(NODES - 1);
        agent.wait_for("convergence", |l| l.converged() == Some(remote));
        let set = agent.wait_for("the condition", |l| {
            l.message() == "node condition NetworkUnavailable set to False"
        });
        assert!(
            set.json["fields"]["reason"] == "FlannelIsUp",
            "{}",
            set.json
        );
        let condition = network_unavailable(&api).expect("the condition on the server");
        assert_eq!(condition["status"], "False");
        assert_eq!(condition["reason"], "FlannelIsUp");
        assert_eq!(condition["message"], "Flannel is running on this node");
        // The remote subnets' routes and the blackhole for our own.
        assert_eq!(overlay_routes() as u64, remote + 1);
        let out = Command::new("ip")
            .args(["-4", "route", "show", "proto", "191", "type", "blackhole"])
            .output()
            .unwrap();
        let blackholes = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            blackholes.trim_end(),
            "blackhole 10.0.0.0/24 metric 4294967295"
        );
    });
}

#[test]
fn switched_off_the_condition_is_left_alone() {
    in_own_netns(async || {
        plumb();
        let api = cluster().await;
        let dir = tempfile::tempdir().unwrap();
        let mut agent = spawn_agent(
            dir.path(),
            &api.url(),
            &["--set-node-network-unavailable=false"],
        );
        agent.wait_for("convergence", |l| {
            l.converged() == Some(u64::from(NODES - 1))
        });
        // Ample time for the node source to act on the network being up (it does
        // within milliseconds when switched on).
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        assert!(!api.patches().is_empty(), "the annotations were published");
        assert_eq!(network_unavailable(&api), None);
        let strategic = api
            .patches()
            .iter()
            .filter(|p| p.content_type.as_deref() != Some("application/merge-patch+json"))
            .count();
        assert_eq!(strategic, 0);
        assert_eq!(
            overlay_routes() as u64,
            u64::from(NODES - 1),
            "no blackhole"
        );
    });
}

/// An operator's `node-public-ip` annotation, read at start, replaces `--public-ip`:
/// the agent publishes it though it is no address of the node (a NAT's).
#[test]
fn the_stored_node_public_ip_is_published() {
    in_own_netns(async || {
        plumb();
        let api = cluster().await;
        let mut own = api.node(&name(0)).unwrap();
        own["metadata"]["annotations"]["flannel.alpha.coreos.com/node-public-ip"] =
            "203.0.113.50".into();
        api.apply(own);
        let dir = tempfile::tempdir().unwrap();
        let mut agent = spawn_agent(dir.path(), &api.url(), &["--public-ip", "203.0.113.9"]);
        agent.wait_for("convergence", |l| {
            l.converged() == Some(u64::from(NODES - 1))
        });
        let published = || {
            api.node(&name(0)).unwrap()["metadata"]["annotations"]
                ["flannel.alpha.coreos.com/public-ip"]
                .clone()
        };
        for _ in 0..50 {
            if !published().is_null() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(published(), "203.0.113.50");
    });
}
