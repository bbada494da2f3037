//! Peers: nodes find each other, revoked leases leave the set, and a node whose key is
//! deleted or taken over leases again.

use std::time::Duration;

use ipnet::Ipv4Net;
use overlay_agent::{nodes::etcd::subnet_key, status::LeaseTotals};

use super::{
    server::Etcd,
    source::{NET_CONF, Node, PREFIX, configured, ip, lease_at, reserve, two_nodes},
};

#[test]
fn two_nodes_take_distinct_subnets_and_see_each_other() {
    let etcd = Etcd::start();
    let opts = etcd.options();
    etcd.run(|| async {
        let mut client = configured(&etcd, NET_CONF).await;
        let [(w1, s1), (_w2, s2)] = two_nodes(&opts).await;
        assert_ne!(s1, s2);
        let peer = w1.peer(s2).unwrap();
        assert_eq!((peer.name, peer.tunnel_ip, peer.foreign_backend), (subnet_key(s2), ip("192.0.2.2"), None));
        let own = w1.set().unwrap().nodes.into_iter().find(|n| n.name == "w1").unwrap();
        assert_eq!(own.tunnel_ip, ip("192.0.2.1"));
        // A flanneld node of another backend is seen, marked as such.
        client
            .put(
                format!("{PREFIX}/subnets/10.244.200.0-24"),
                r#"{"PublicIP":"192.0.2.9","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#,
                None,
            )
            .await
            .unwrap();
        let vxlan: Ipv4Net = "10.244.200.0/24".parse().unwrap();
        w1.eventually("the vxlan node", |n| n.peer(vxlan).is_some()).await;
        assert_eq!(w1.peer(vxlan).unwrap().foreign_backend.as_deref(), Some("vxlan"));
    });
}

#[test]
fn a_revoked_lease_leaves_the_other_node_set_within_a_second() {
    let etcd = Etcd::start();
    let opts = etcd.options();
    etcd.run(|| async {
        let mut client = configured(&etcd, NET_CONF).await;
        let [(w1, _), (w2, s2)] = two_nodes(&opts).await;
        // w2 goes away and its lease ends (as when it expires).
        w2.stop();
        let (_, lease) = lease_at(&mut client, s2).await.unwrap();
        client.lease_revoke(lease).await.unwrap();
        w1.within(Duration::from_secs(1), "w2 gone", |n| n.peer(s2).is_none())
            .await;
        assert!(w1.subnet().is_some());
    });
}

#[test]
fn a_node_leases_again_when_its_key_is_deleted_or_taken() {
    let etcd = Etcd::start();
    let opts = etcd.options();
    etcd.run(|| async {
        let mut client = configured(&etcd, NET_CONF).await;
        let w1 = Node::start(&opts, "w1", "192.0.2.1").await;
        let s1 = w1.leased().await;
        let (_, first) = lease_at(&mut client, s1).await.unwrap();
        // Deleted: the same subnet again, while free.
        let key = format!("{PREFIX}/subnets/{}", subnet_key(s1));
        client.delete(key.as_str(), None).await.unwrap();
        let mut again = None;
        for _ in 0..200 {
            again = lease_at(&mut client, s1).await.filter(|(_, l)| *l != first);
            if again.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (attrs, _) = again.expect("w1 leased its subnet again");
        assert_eq!(attrs.public_ip, ip("192.0.2.1"));
        assert_eq!(w1.subnet(), Some(s1));
        w1.eventually("the loss counted", |n| n.status.leases().lost == 1)
            .await;
        assert_eq!(w1.status.leases().subnet_changes, 0, "the same subnet");
        // Taken over by an operator's reservation for another node: another subnet,
        // which the node set carries (and with it subnet.env).
        reserve(&mut client, &s1.to_string(), "192.0.2.77").await;
        w1.eventually("a new subnet", |n| n.subnet().is_some_and(|s| s != s1))
            .await;
        let s1b = w1.subnet().unwrap();
        assert_eq!(
            w1.status.leases(),
            LeaseTotals {
                lost: 2,
                subnet_changes: 1
            }
        );
        assert_eq!(
            lease_at(&mut client, s1b).await.unwrap().0.public_ip,
            ip("192.0.2.1")
        );
        assert_eq!(
            lease_at(&mut client, s1).await.unwrap(),
            (
                overlay_agent::nodes::etcd::LeaseAttrs::ipip(ip("192.0.2.77")),
                0
            )
        );
        w1.eventually("the reservation is a peer", |n| n.peer(s1).is_some())
            .await;
    });
}
