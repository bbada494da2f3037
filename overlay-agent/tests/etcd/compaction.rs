//! A watch that falls behind a compaction: etcd cancels it with the compacted
//! revision, and the source lists again and converges, without reporting a failure
//! (compaction is routine housekeeping in etcd, not a fault).
//!
//! etcd only drops history under a watcher that lags: one that stopped reading. The
//! test stalls the source's runtime (its thread blocks while another thread writes),
//! as when an agent is starved of CPU or stopped. etcd parks a watcher whose send
//! buffer is full among the slow ones (`etcd_debugging_mvcc_slow_watcher_total`),
//! the test then compacts past the watcher's revision, and once the source reads
//! again etcd answers the watch with the compacted revision (etcd-io/etcd v3.4,
//! mvcc/watchable_store.go: `notify` moves a watcher that cannot take an event to the
//! victims, `chooseAll` cancels a watcher behind the compaction with
//! `CompactRevision`).

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use etcd_client::{Client, CompactionOptions};
use overlay_agent::nodes::etcd::LeaseAttrs;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{
    server::Etcd,
    source::{NET_CONF, Node, configured, ip, key, net, reserve, subnets_in_etcd},
};

/// The source's log, kept to check which path it took.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    /// Captures this thread's log until the guard goes.
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let capture = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || capture.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A gauge or counter of etcd's /metrics.
async fn metric(name: &str) -> f64 {
    let mut stream = tokio::net::TcpStream::connect("127.0.0.1:2379")
        .await
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in etcd's metrics"))
}

/// Subnets whose keys the flood rewrites, each put one revision. The test's subnets
/// are above 10.244.101.0/24: the node picks among the first 100 free ones.
const FLOOD: [&str; 4] = [
    "10.244.200.0/24",
    "10.244.201.0/24",
    "10.244.202.0/24",
    "10.244.203.0/24",
];

/// Whether etcd counts a watcher as slow (unsynced or a victim).
async fn slow_watchers() -> bool {
    metric("etcd_debugging_mvcc_slow_watcher_total").await > 0.0
}

/// Rewrites the flood keys with 64 KiB values until etcd holds the stalled source's
/// watcher as a victim. Returns how many puts that took.
///
/// The gauge also counts a watcher that is merely unsynced: w1 leases after it lists,
/// so its watch starts behind by its own lease until etcd's next sync (every 100 ms).
/// Such a watcher catches up by itself, so the flood starts only once etcd counts no
/// slow watcher, and ends once one stays slow through several syncs without puts:
/// only a victim, whose reader is stalled, does that.
async fn flood_until_slow(client: &mut Client) -> usize {
    let settle = std::time::Duration::from_millis(400);
    for _ in 0..50 {
        if !slow_watchers().await {
            break;
        }
        tokio::time::sleep(settle / 4).await;
    }
    assert!(!slow_watchers().await, "etcd keeps a watcher unsynced");
    let mut attrs = LeaseAttrs::ipip(ip("192.0.2.100"));
    for put in 0..2000 {
        attrs.backend_data = Some(format!("{put}:{}", "x".repeat(65536)).into());
        client
            .put(
                key(net(FLOOD[put % FLOOD.len()])),
                serde_json::to_string(&attrs).unwrap(),
                None,
            )
            .await
            .unwrap();
        if put % 16 == 15 && slow_watchers().await {
            tokio::time::sleep(settle).await;
            if slow_watchers().await {
                return put + 1;
            }
        }
    }
    panic!("2000 puts of 64 KiB and the stalled watch is still not slow");
}

#[test]
fn a_watch_behind_compaction_lists_again_without_failing() {
    let etcd = Etcd::start();
    let opts = etcd.options();
    let log = Capture::default();
    etcd.run(|| async {
        let _log = log.install();
        let mut client = configured(&etcd, NET_CONF).await;
        let (gone, added, later) = (net("10.244.160.0/24"), "10.244.161.0/24", "10.244.162.0/24");
        reserve(&mut client, &gone.to_string(), "192.0.2.160").await;
        let w1 = Node::start(&opts, "w1", "192.0.2.1").await;
        let own = w1.leased().await;
        w1.eventually("the reservation", |n| n.peer(gone).is_some())
            .await;

        // This thread, w1's runtime, is stalled until the other thread is done.
        let (puts, compacted) = etcd.run(|| async {
            let mut client = etcd.client().await;
            let puts = flood_until_slow(&mut client).await;
            for subnet in FLOOD.map(net).into_iter().chain([gone]) {
                client.delete(key(subnet), None).await.unwrap();
            }
            reserve(&mut client, added, "192.0.2.161").await;
            let revision = client.status().await.unwrap().header().unwrap().revision();
            client
                .compact(revision, Some(CompactionOptions::new().with_physical()))
                .await
                .unwrap();
            (puts, revision)
        });

        // What changed while w1 was stalled is only in etcd's current state now.
        w1.eventually("etcd's content after the compaction", |n| {
            n.subnets() == [own, net(added)].into()
        })
        .await;
        // The watch is back: a change after the compaction arrives.
        reserve(&mut client, later, "192.0.2.162").await;
        w1.eventually("a change after the compaction", |n| {
            n.peer(net(later)).is_some()
        })
        .await;
        assert_eq!(w1.subnets(), subnets_in_etcd(&mut client).await);
        let text = log.text();
        assert!(
            text.contains("fell behind compaction"),
            "the watch got the compacted error ({puts} puts, compacted at {compacted}): {text}"
        );
        assert_eq!(
            w1.status.source().errors_total,
            0,
            "a compaction is not a failure: {text}"
        );
    });
}
