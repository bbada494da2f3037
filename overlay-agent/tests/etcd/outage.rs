//! etcd killed while the subnets change and started again: the node set published
//! before the outage stays the last one for its whole length (nothing empties it, so
//! the datapath keeps its peers), and afterwards the source converges on what etcd
//! holds, a change made after the restart included.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use etcd_client::Client;

use super::{
    server::Etcd,
    source::{NET_CONF, configured, key, net, reserve, subnets_in_etcd, two_nodes},
};

/// Traffic: reservations of 10.244.150-189.0/24 put one after another, then deleted
/// one after another, over and over, every 10 ms; failures (etcd down) are skipped.
/// The nodes' own subnets are below: they pick among the first 100 free ones.
async fn churn(mut client: Client, stop: Arc<AtomicBool>, written: Arc<AtomicUsize>) {
    let mut step = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let subnet = net(&format!("10.244.{}.0/24", 150 + step % 40));
        let done = if (step / 40).is_multiple_of(2) {
            let value = format!(
                r#"{{"PublicIP":"198.51.100.{}","BackendType":"ipip"}}"#,
                step % 40
            );
            client.put(key(subnet), value, None).await.is_ok()
        } else {
            client.delete(key(subnet), None).await.is_ok()
        };
        if done {
            written.fetch_add(1, Ordering::Relaxed);
            step += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn etcd_killed_under_traffic_keeps_the_last_set_then_converges() {
    let etcd = Etcd::start();
    let opts = etcd.options();
    etcd.run(|| async {
        configured(&etcd, NET_CONF).await;
        let [(w1, _), (_w2, s2)] = two_nodes(&opts).await;
        let (stop, written) = (Arc::default(), Arc::new(AtomicUsize::new(0)));
        let traffic = tokio::spawn(churn(
            etcd.client().await,
            Arc::clone(&stop),
            Arc::clone(&written),
        ));
        w1.eventually("the traffic's subnets", |n| n.subnets().len() > 10)
            .await;

        etcd.stop();
        // Once the watch has failed nothing more can arrive: the last set is final.
        w1.eventually("the failure reported", |n| {
            n.status.source().error.is_some()
        })
        .await;
        let mut rx = w1.rx.clone();
        let last = rx
            .borrow_and_update()
            .clone()
            .expect("a set before the outage");
        assert!(w1.peer(s2).is_some() && last.nodes.len() > 10, "{last:?}");
        let (errors, before) = (
            w1.status.source().errors_total,
            written.load(Ordering::Relaxed),
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            !rx.has_changed().unwrap(),
            "nothing published while etcd is down: {:?}",
            w1.set()
        );
        assert_eq!(w1.set(), Some(last));
        assert!(
            w1.status.source().errors_total > errors,
            "the source kept trying"
        );
        assert_eq!(written.load(Ordering::Relaxed), before, "etcd was down");

        etcd.spawn();
        let mut client = etcd.client().await;
        let after = net("10.244.200.0/24");
        reserve(&mut client, &after.to_string(), "192.0.2.200").await;
        w1.eventually("the change after the restart", |n| n.peer(after).is_some())
            .await;
        // The traffic resumed too; once it stops the set is etcd's exactly.
        let resumed = written.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            written.load(Ordering::Relaxed) > resumed,
            "traffic after the restart"
        );
        stop.store(true, Ordering::Relaxed);
        traffic.await.unwrap();
        let want = subnets_in_etcd(&mut client).await;
        w1.eventually("etcd's content", |n| n.subnets() == want)
            .await;
        assert!(w1.peer(s2).is_some() && w1.status.source().error.is_none());
    });
}
