//! Migrating a flanneld network node by node: the agent takes over the lease flanneld
//! held on its node (same PublicIP), and flanneld's ipip nodes are its peers.

use etcd_client::{Client, PutOptions};
use overlay_agent::nodes::etcd::LEASE_TTL;

use super::{
    server::Etcd,
    source::{NET_CONF, Node, configured, ip, key, lease_at, net},
};

/// A lease as flanneld v0.28's ipip backend writes it: its exact JSON, on an etcd
/// lease of 24 h of its own. Returns the etcd lease.
async fn flanneld_lease(client: &mut Client, subnet: &str, public_ip: &str) -> i64 {
    let grant = client
        .lease_grant(LEASE_TTL.as_secs() as i64, None)
        .await
        .unwrap();
    let value = format!(r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"ipip"}}"#);
    client
        .put(
            key(net(subnet)),
            value,
            Some(PutOptions::new().with_lease(grant.id())),
        )
        .await
        .unwrap();
    grant.id()
}

#[test]
fn the_agent_takes_over_flanneld_lease_and_peers_with_flanneld_nodes() {
    let etcd = Etcd::start();
    let opts = etcd.options();
    etcd.run(|| async {
        let mut client = configured(&etcd, NET_CONF).await;
        // node1 and node2 ran flanneld; node1 now runs the agent.
        let old = flanneld_lease(&mut client, "10.244.31.0/24", "192.0.2.1").await;
        flanneld_lease(&mut client, "10.244.32.0/24", "192.0.2.2").await;
        let node1 = Node::start(&opts, "node1", "192.0.2.1").await;
        assert_eq!(
            node1.leased().await,
            net("10.244.31.0/24"),
            "flanneld's subnet"
        );
        let (attrs, lease) = lease_at(&mut client, net("10.244.31.0/24")).await.unwrap();
        assert_eq!(
            (attrs.public_ip, attrs.backend_type.as_str()),
            (ip("192.0.2.1"), "ipip")
        );
        assert_ne!(lease, old, "on a lease of the agent's own");
        let leases = client.leases().await.unwrap();
        assert!(
            leases.leases().iter().all(|l| l.id() != old),
            "flanneld's etcd lease is revoked"
        );
        node1
            .eventually("node2 (flanneld) as a peer", |n| {
                n.peer(net("10.244.32.0/24"))
                    .is_some_and(|p| p.tunnel_ip == ip("192.0.2.2") && p.foreign_backend.is_none())
            })
            .await;
    });
}
