//! etcd going away and coming back: the last node set stays, the failure is reported,
//! and the source carries on once etcd is back.

use std::time::Duration;

use super::{
    server::Etcd,
    source::{NET_CONF, Node, configured, two_nodes},
};

#[test]
fn keeps_the_last_set_while_etcd_is_down_and_recovers() {
    let etcd = Etcd::start();
    let opts = etcd.options();
    etcd.run(|| async {
        configured(&etcd, NET_CONF).await;
        let [(w1, _), (_w2, s2)] = two_nodes(&opts).await;
        let before = w1.set();

        etcd.stop();
        w1.eventually("the failure reported", |n| {
            n.status.source().error.is_some()
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(w1.set(), before, "nothing new while etcd is down");

        etcd.spawn();
        w1.eventually("healthy again", |n| n.status.source().error.is_none())
            .await;
        let w3 = Node::start(&opts, "w3", "192.0.2.3").await;
        let s3 = w3.leased().await;
        w1.eventually("w3 is a peer", |n| n.peer(s3).is_some())
            .await;
        assert_eq!(w1.peer(s2).map(|p| p.pod_cidr), Some(s2));
    });
}
