//! TLS with client certificates, and username/password authentication.

use std::time::Duration;

use overlay_agent::nodes::etcd::EtcdSource;

use super::{
    server::Etcd,
    source::{NET_CONF, Node, address, configured},
};

#[test]
fn tls_with_client_certificates() {
    let etcd = Etcd::start_tls();
    let opts = etcd.options();
    etcd.run(|| async {
        configured(&etcd, NET_CONF).await;
        let w1 = Node::start(&opts, "w1", "192.0.2.1").await;
        w1.leased().await;
        // Without a client certificate etcd lets nobody in.
        let mut anonymous = opts.clone();
        anonymous.certfile = None;
        anonymous.keyfile = None;
        let refused = tokio::time::timeout(
            Duration::from_secs(3),
            EtcdSource::open(&anonymous, "w2", address("192.0.2.2")),
        )
        .await;
        assert!(
            !matches!(refused, Ok(Ok(_))),
            "no certificate, no configuration"
        );
    });
}

#[test]
fn username_and_password() {
    let etcd = Etcd::start();
    let opts = etcd.options();
    etcd.run(|| async {
        let mut client = configured(&etcd, NET_CONF).await;
        client.user_add("root", "s3cret", None).await.unwrap();
        client.user_grant_role("root", "root").await.unwrap();
        client.auth_enable().await.unwrap();

        let mut user = opts.clone();
        user.username = Some("root".into());
        user.password = Some("s3cret".into());
        let w1 = Node::start(&user, "w1", "192.0.2.1").await;
        w1.leased().await;

        let mut wrong = user.clone();
        wrong.password = Some("wrong".into());
        let refused = tokio::time::timeout(
            Duration::from_secs(3),
            EtcdSource::open(&wrong, "w2", address("192.0.2.2")),
        )
        .await;
        assert!(
            refused.is_err(),
            "a wrong password never gets the configuration"
        );
        let anonymous = tokio::time::timeout(
            Duration::from_secs(3),
            EtcdSource::open(&opts, "w2", address("192.0.2.2")),
        )
        .await;
        assert!(!matches!(anonymous, Ok(Ok(_))), "no user, no configuration");
    });
}
