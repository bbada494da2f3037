//! The node source against the fake API: lists, watch events, relists, expiry and
//! outages.

use std::time::Duration;

use super::{
    fake::{FakeApi, Which},
    harness::{Harness, agent_address, ip, names, node},
    nodes::{PUBLIC_IP, flannel_node},
};

const SHORT: Duration = Duration::from_millis(300);

/// n0..n{count-1}: subnet 10.244.i.0/24, address 172.18.0.(10+i).
async fn cluster(count: u8) -> FakeApi {
    let api = FakeApi::start().await;
    for i in 0..count {
        api.apply(worker(i));
    }
    api
}

fn worker(i: u8) -> serde_json::Value {
    let address = format!("172.18.0.{}", 10 + i);
    flannel_node(
        &format!("n{i}"),
        &format!("10.244.{i}.0/24"),
        &address,
        &address,
    )
}

fn start(api: FakeApi, page_size: u32) -> Harness {
    Harness::start(api, "n0", agent_address("172.18.0.10"), page_size)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_list_is_published_only_once_complete() {
    let api = cluster(5).await;
    // The second page fails: what the first page brought must not be published, and
    // the list starts over.
    api.fail(Which::ListContinue, 500, 1);
    let mut h = start(api, 2);
    let set = h.next_set().await;
    assert_eq!(names(&set), ["n0", "n1", "n2", "n3", "n4"]);
    assert_eq!(node(&set, "n3").pod_cidr, "10.244.3.0/24".parse().unwrap());
    assert_eq!(node(&set, "n3").tunnel_ip, ip("172.18.0.13"));
    assert_eq!(h.api.count(Which::ListStart), 2);
    assert_eq!(
        h.api.count(Which::ListContinue),
        3,
        "one failed page, then two"
    );
    let source = h.status.source();
    assert!(source.synced && source.error.is_none(), "{source:?}");
    assert_eq!(source.errors_total, 1);
    h.quiet(SHORT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_synced_until_the_api_answers() {
    let api = cluster(2).await;
    api.stop().await;
    let mut h = start(api, 500);
    h.eventually("connection errors recorded", |h| {
        h.status.source().errors_total >= 2
    })
    .await;
    let source = h.status.source();
    assert!(!source.synced);
    let not_ready = h.status.ready().unwrap_err();
    assert!(
        not_ready.contains("failed to perform initial object list"),
        "{not_ready}"
    );
    assert!(h.rx.borrow().is_none(), "nothing published without a list");

    h.api.resume().await;
    assert_eq!(names(&h.next_set().await), ["n0", "n1"]);
    let source = h.status.source();
    assert!(source.synced && source.error.is_none(), "{source:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_add_update_and_delete() {
    let api = cluster(2).await;
    let mut h = start(api, 500);
    assert_eq!(names(&h.next_set().await), ["n0", "n1"]);

    h.api.apply(worker(2));
    assert_eq!(names(&h.next_set().await), ["n0", "n1", "n2"]);

    let mut moved = worker(1);
    moved["metadata"]["annotations"][PUBLIC_IP] = "192.168.3.11".into();
    h.api.apply(moved);
    assert_eq!(
        node(&h.next_set().await, "n1").tunnel_ip,
        ip("192.168.3.11")
    );

    h.api.delete("n2");
    assert_eq!(names(&h.next_set().await), ["n0", "n1"]);

    // The kubelet's status updates change nothing the overlay uses.
    let mut heartbeat = h.api.node("n1").unwrap();
    heartbeat["status"]["conditions"][3]["lastHeartbeatTime"] = "2026-11-02T07:00:00Z".into();
    h.api.apply(heartbeat);
    h.quiet(SHORT).await;
    assert_eq!(h.api.count(Which::ListStart), 1, "events, not relists");
}

/// flannel issue #2554: a node deleted while the agent could not watch must not
/// survive the relist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relist_drops_nodes_that_vanished_meanwhile() {
    let api = cluster(4).await;
    let mut h = start(api, 2);
    assert_eq!(names(&h.next_set().await), ["n0", "n1", "n2", "n3"]);

    h.api.stop().await;
    h.eventually("the outage is noticed", |h| {
        h.status.source().error.is_some()
    })
    .await;
    // Meanwhile n3 goes and n4 comes, and the history is compacted: the watch cannot
    // resume and the watcher must list again.
    h.api.delete_unseen("n3");
    h.api.apply(worker(4));
    h.api.compact();
    assert_eq!(
        names(h.rx.borrow().as_ref().unwrap()),
        ["n0", "n1", "n2", "n3"],
        "the last known set stays while the API is away"
    );
    assert!(
        h.status.source().synced,
        "an outage does not unready a synced source"
    );

    h.api.resume().await;
    assert_eq!(names(&h.next_set().await), ["n0", "n1", "n2", "n4"]);
    assert_eq!(h.api.count(Which::ListStart), 2);
    let source = h.status.source();
    assert!(source.synced && source.error.is_none(), "{source:?}");
    assert!(h.status.source().errors_total >= 1, "the outage is counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_watch_relists() {
    let api = cluster(3).await;
    let mut h = start(api, 500);
    assert_eq!(names(&h.next_set().await), ["n0", "n1", "n2"]);

    // 410 Gone in the middle of a watch (the server's watch cache moved on).
    h.eventually("the watch", |h| h.api.open_watches() == 1)
        .await;
    h.api.expire_watches();
    h.eventually("the relist", |h| h.api.count(Which::ListStart) == 2)
        .await;
    // The same nodes: nothing to publish.
    h.quiet(SHORT).await;
    assert!(h.status.source().errors_total >= 1, "the 410 is recorded");

    // 410 when resuming: the watch is dropped, and a change happened meanwhile whose
    // event is compacted away before the watch comes back.
    h.eventually("the watch again", |h| h.api.open_watches() == 1)
        .await;
    h.api.apply_unseen(worker(3));
    h.api.drop_watches();
    assert_eq!(names(&h.next_set().await), ["n0", "n1", "n2", "n3"]);
    assert_eq!(h.api.count(Which::ListStart), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_keep_the_last_set_and_recovery_is_recorded() {
    let api = cluster(2).await;
    let mut h = start(api, 500);
    assert_eq!(names(&h.next_set().await), ["n0", "n1"]);

    h.eventually("the watch", |h| h.api.open_watches() == 1)
        .await;
    h.api.fail(Which::Watch, 500, 3);
    h.api.drop_watches();
    h.eventually("three failed watches", |h| {
        h.status.source().errors_total >= 3
    })
    .await;
    let error = h.status.source().error.unwrap_or_default();
    assert!(error.contains("injected failure"), "{error}");
    assert_eq!(names(h.rx.borrow().as_ref().unwrap()), ["n0", "n1"]);

    // Once the server answers again, the watch resumes where it was (no relist),
    // and its first event clears the error.
    h.api.apply(worker(2));
    assert_eq!(names(&h.next_set().await), ["n0", "n1", "n2"]);
    assert_eq!(h.status.source().error, None);
    assert_eq!(h.api.count(Which::ListStart), 1);
}
