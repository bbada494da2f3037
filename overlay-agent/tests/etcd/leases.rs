//! Acquisition: distinct subnets under concurrency, flannel's order, reservations,
//! running out, and the network configuration's errors.

use std::{collections::BTreeSet, time::Duration};

use futures::future::join_all;
use overlay_agent::nodes::etcd::{EtcdSource, LEASE_TTL, LeaseAttrs};

use super::{
    server::Etcd,
    source::{
        NET_CONF, Node, address, configure, configured, ip, lease_at, net_conf_from, registry,
        reserve,
    },
};

#[test]
fn twenty_concurrent_acquisitions_take_twenty_subnets() {
    let etcd = Etcd::start();
    etcd.run(|| async {
        // 24 subnets for 20 nodes: picks collide and the losers pick again.
        let mut client = configured(&etcd, &net_conf_from("10.244.1.0", "10.244.24.0")).await;
        let (registry, range) = registry(&client).await;
        let acquisitions = (1..=20).map(|i| {
            let mut registry = registry.clone();
            async move {
                let attrs = LeaseAttrs::ipip(ip(&format!("192.0.2.{i}")));
                registry
                    .acquire(&range, &attrs, None, LEASE_TTL)
                    .await
                    .unwrap()
            }
        });
        let leased = join_all(acquisitions).await;
        let subnets: BTreeSet<_> = leased.iter().map(|l| l.subnet).collect();
        assert_eq!(subnets.len(), 20, "{leased:?}");
        for (i, own) in leased.iter().enumerate() {
            let (attrs, lease) = lease_at(&mut client, own.subnet).await.unwrap();
            assert_eq!(attrs.public_ip, ip(&format!("192.0.2.{}", i + 1)));
            assert_eq!(Some(lease), own.lease_id);
            assert!(range.holds(own.subnet));
        }
    });
}

#[test]
fn own_lease_then_previous_subnet_then_any() {
    let etcd = Etcd::start();
    let opts = etcd.options();
    etcd.run(|| async {
        let mut client = configured(&etcd, NET_CONF).await;
        // The subnet of the last subnet.env, while free.
        std::fs::write(
            &opts.subnet_file,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\n",
        )
        .unwrap();
        let node = Node::start(&opts, "w1", "192.0.2.1").await;
        assert_eq!(node.leased().await, "10.244.7.0/24".parse().unwrap());
        let (_, first) = lease_at(&mut client, node.subnet().unwrap()).await.unwrap();
        node.stop();
        // Our own lease, found by our address, beats the previous subnet; it moves to
        // a new etcd lease and the old one is revoked.
        std::fs::write(&opts.subnet_file, "FLANNEL_SUBNET=10.244.9.1/24\n").unwrap();
        let again = Node::start(&opts, "w1", "192.0.2.1").await;
        assert_eq!(again.leased().await, "10.244.7.0/24".parse().unwrap());
        let (_, second) = lease_at(&mut client, again.subnet().unwrap())
            .await
            .unwrap();
        assert_ne!(first, second);
        let leases = client.leases().await.unwrap();
        assert!(
            leases.leases().iter().all(|l| l.id() != first),
            "the old etcd lease is revoked"
        );
        // Another node does not get the previous subnet when it is taken.
        std::fs::write(&opts.subnet_file, "FLANNEL_SUBNET=10.244.7.1/24\n").unwrap();
        let other = Node::start(&opts, "w2", "192.0.2.2").await;
        let got = other.leased().await;
        assert_ne!(got, "10.244.7.0/24".parse().unwrap());
        assert_eq!(got.prefix_len(), 24);
    });
}

#[test]
fn renews_before_the_lease_ends() {
    let etcd = Etcd::start();
    let mut opts = etcd.options();
    opts.renew_margin = Duration::from_secs(3);
    etcd.run(|| async {
        let mut client = configured(&etcd, NET_CONF).await;
        // A 5 s lease renewed 3 s before its end: every 2 s.
        let source = EtcdSource::open(&opts, "w1", address("192.0.2.1"))
            .await
            .unwrap()
            .with_ttl(Duration::from_secs(5));
        let node = Node::run(source, "w1");
        let subnet = node.leased().await;
        let mut seen = BTreeSet::new();
        for _ in 0..16 {
            let (attrs, lease) = lease_at(&mut client, subnet).await.expect("never expires");
            assert_eq!(attrs.public_ip, ip("192.0.2.1"));
            seen.insert(lease);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(seen.len() >= 3, "renewed on new etcd leases: {seen:?}");
        // The replaced etcd leases are revoked, not left to expire.
        let leases = client.leases().await.unwrap();
        assert_eq!(leases.leases().len(), 1);
    });
}

#[test]
fn reservations_are_honoured_until_the_subnets_run_out() {
    let etcd = Etcd::start();
    etcd.run(|| async {
        let mut client = configured(&etcd, &net_conf_from("10.244.1.0", "10.244.3.0")).await;
        reserve(&mut client, "10.244.1.0/24", "192.0.2.50").await;
        reserve(&mut client, "10.244.3.0/24", "192.0.2.51").await;
        let (registry, range) = registry(&client).await;
        let acquire = |who: &str| {
            let attrs = LeaseAttrs::ipip(ip(who));
            let mut registry = registry.clone();
            async move { registry.acquire(&range, &attrs, None, LEASE_TTL).await }
        };
        // The one subnet that is not reserved.
        let a = acquire("192.0.2.1").await.unwrap();
        assert_eq!(a.subnet, "10.244.2.0/24".parse().unwrap());
        // None left: a clear error.
        let e = format!("{:#}", acquire("192.0.2.2").await.unwrap_err());
        assert!(
            e.contains("out of subnets") && e.contains("10.244.1.0 to 10.244.3.0"),
            "{e}"
        );
        // A reservation for our address is ours, and stays a reservation.
        let r = acquire("192.0.2.50").await.unwrap();
        assert_eq!(
            (r.subnet, r.lease_id),
            ("10.244.1.0/24".parse().unwrap(), None)
        );
        let (attrs, lease) = lease_at(&mut client, r.subnet).await.unwrap();
        assert_eq!((attrs.backend_type.as_str(), lease), ("ipip", 0));
        // The others' reservations are untouched.
        let (attrs, lease) = lease_at(&mut client, "10.244.3.0/24".parse().unwrap())
            .await
            .unwrap();
        assert_eq!((attrs.public_ip, lease), (ip("192.0.2.51"), 0));
    });
}

#[test]
fn missing_or_invalid_configuration_says_what_to_put() {
    let etcd = Etcd::start();
    let opts = etcd.options();
    etcd.run(|| async {
        let open = || async {
            let opened = tokio::time::timeout(
                Duration::from_secs(10),
                EtcdSource::open(&opts, "w1", address("192.0.2.1")),
            )
            .await
            .expect("no retrying on a configuration error");
            format!("{:#}", opened.err().expect("refused"))
        };
        let e = open().await;
        assert!(
            e.contains("/coreos.com/network/config") && e.contains("etcdctl put"),
            "{e}"
        );
        let mut client = etcd.client().await;
        configure(
            &mut client,
            r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#,
        )
        .await;
        let e = open().await;
        assert!(
            e.contains("unusable") && e.contains("vxlan") && e.contains("etcdctl put"),
            "{e}"
        );
        configure(
            &mut client,
            r#"{"Network": "10.244.0.0/30", "Backend": {"Type": "ipip"}}"#,
        )
        .await;
        assert!(open().await.contains("too small"));
    });
}
