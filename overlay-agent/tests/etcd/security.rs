//! TLS with client certificates, and username/password authentication.

use std::time::Duration;

use overlay_agent::nodes::etcd::{EtcdOptions, EtcdSource};

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
        .await
        .expect("a clear error, not retries");
        let error = format!("{:#}", refused.err().expect("a wrong password is refused"));
        assert!(error.contains("refuses --etcd-username"), "{error}");
        let anonymous = tokio::time::timeout(
            Duration::from_secs(3),
            EtcdSource::open(&opts, "w2", address("192.0.2.2")),
        )
        .await;
        assert!(!matches!(anonymous, Ok(Ok(_))), "no user, no configuration");
    });
}

/// What etcd can never accept stops the agent at start with the setting named:
/// a file without a certificate, a CA that does not vouch for etcd's certificate.
#[test]
fn bad_certificates_are_clear_errors() {
    let etcd = Etcd::start_tls();
    let other = Etcd::start_tls();
    let open = |opts: EtcdOptions| {
        etcd.run(|| async {
            let opened = tokio::time::timeout(
                Duration::from_secs(10),
                EtcdSource::open(&opts, "w1", address("192.0.2.1")),
            )
            .await
            .expect("a clear error, not retries");
            format!("{:#}", opened.err().expect("refused"))
        })
    };

    let mut garbage = etcd.options();
    let not_pem = etcd.dir().join("not-a-certificate.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    garbage.certfile = Some(not_pem.clone());
    let error = open(garbage);
    assert!(
        error.contains("unusable") && error.contains(&not_pem.display().to_string()),
        "{error}"
    );

    let mut untrusted = etcd.options();
    let other_ca = other.certs.as_ref().unwrap().ca.clone();
    untrusted.cafile = Some(other_ca.clone());
    let error = open(untrusted);
    assert!(
        error.contains("vouches for") && error.contains(&other_ca.display().to_string()),
        "{error}"
    );
}
