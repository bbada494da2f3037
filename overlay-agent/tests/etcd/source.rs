//! Etcd sources of test nodes, and ways to wait on what they publish.

use std::{collections::BTreeSet, net::Ipv4Addr, sync::Arc, time::Duration};

use etcd_client::Client;
use ipnet::Ipv4Net;
use overlay_agent::{
    net_conf::SubnetRange,
    nodes::{
        NodeInfo, NodeSet,
        address::{Authority, OwnAddress},
        etcd::{EtcdOptions, EtcdSource, LeaseAttrs, Registry},
        kube::Retry,
    },
    status::Status,
};
use tokio::{sync::watch, task::JoinHandle};

use super::server::Etcd;

/// Generous: only a broken source takes this long.
pub(super) const PATIENCE: Duration = Duration::from_secs(20);

pub(super) const PREFIX: &str = "/coreos.com/network";

/// Writes the network configuration.
pub(super) async fn configure(client: &mut Client, conf: &str) {
    client
        .put(format!("{PREFIX}/config"), conf, None)
        .await
        .unwrap();
}

/// A network of 10.244.0.0/16 handing out /24s.
pub(super) const NET_CONF: &str = r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "ipip"}}"#;

/// A client of `etcd`, once it has written the network configuration `conf`.
pub(super) async fn configured(etcd: &Etcd, conf: &str) -> Client {
    let mut client = etcd.client().await;
    configure(&mut client, conf).await;
    client
}

/// 10.244.0.0/16 handing out the /24s from `min` to `max` only.
pub(super) fn net_conf_from(min: &str, max: &str) -> String {
    format!(
        r#"{{"Network": "10.244.0.0/16", "SubnetMin": "{min}", "SubnetMax": "{max}", "Backend": {{"Type": "ipip"}}}}"#
    )
}

/// The registry and its subnet range, as a node reads them.
pub(super) async fn registry(client: &Client) -> (Registry, SubnetRange) {
    let mut registry = Registry::new(client.clone(), PREFIX);
    let (_, range) = registry.net_conf().await.unwrap();
    (registry, range)
}

/// Nodes w1 (192.0.2.1) and w2 (192.0.2.2) with their subnets, once each sees the
/// other as a peer.
pub(super) async fn two_nodes(opts: &EtcdOptions) -> [(Node, Ipv4Net); 2] {
    let w1 = Node::start(opts, "w1", "192.0.2.1").await;
    let w2 = Node::start(opts, "w2", "192.0.2.2").await;
    let (s1, s2) = (w1.leased().await, w2.leased().await);
    w1.eventually("w2 is a peer", |n| n.peer(s2).is_some())
        .await;
    w2.eventually("w1 is a peer", |n| n.peer(s1).is_some())
        .await;
    [(w1, s1), (w2, s2)]
}

pub(super) fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

pub(super) fn address(public_ip: &str) -> OwnAddress {
    OwnAddress {
        authority: Authority::Agent,
        public_ip: None,
        interface: ip(public_ip),
    }
}

/// One node's etcd source, running.
pub(super) struct Node {
    pub name: String,
    pub rx: watch::Receiver<Option<NodeSet>>,
    pub status: Arc<Status>,
    task: JoinHandle<()>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Node {
    /// Starts the source of node `name` reached at `public_ip`.
    pub(super) async fn start(opts: &EtcdOptions, name: &str, public_ip: &str) -> Self {
        let source = EtcdSource::open(opts, name, address(public_ip))
            .await
            .unwrap();
        Self::run(source, name)
    }

    /// Runs `source`, opened for node `name`, retrying fast.
    pub(super) fn run(source: EtcdSource, name: &str) -> Self {
        let source = source.with_retry(Retry::exponential(
            Duration::from_millis(50),
            Duration::from_millis(500),
        ));
        let (tx, rx) = watch::channel(None);
        let status = Arc::new(Status::default());
        let task = tokio::spawn(source.run(tx, Arc::clone(&status)));
        Self {
            name: name.to_owned(),
            rx,
            status,
            task,
        }
    }

    /// Stops the source; its lease stays in etcd.
    pub(super) fn stop(&self) {
        self.task.abort();
    }

    pub(super) fn set(&self) -> Option<NodeSet> {
        self.rx.borrow().clone()
    }

    /// This node's subnet in the last set.
    pub(super) fn subnet(&self) -> Option<Ipv4Net> {
        let set = self.set()?;
        set.nodes
            .iter()
            .find(|n| n.name == self.name)
            .map(|n| n.pod_cidr)
    }

    /// Every subnet in the last set, this node's included.
    pub(super) fn subnets(&self) -> BTreeSet<Ipv4Net> {
        self.set()
            .map(|s| s.nodes.iter().map(|n| n.pod_cidr).collect())
            .unwrap_or_default()
    }

    /// The peer with `subnet` in the last set.
    pub(super) fn peer(&self, subnet: Ipv4Net) -> Option<NodeInfo> {
        let set = self.set()?;
        set.nodes
            .into_iter()
            .find(|n| n.name != self.name && n.pod_cidr == subnet)
    }

    /// Waits until `check` holds, within `within`.
    pub(super) async fn within(&self, within: Duration, what: &str, check: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + within;
        while !check(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: not within {within:?}: {what}; set {:?}, source {:?}",
                self.name,
                self.set(),
                self.status.source()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub(super) async fn eventually(&self, what: &str, check: impl Fn(&Self) -> bool) {
        self.within(PATIENCE, what, check).await;
    }

    /// Waits for this node's first subnet.
    pub(super) async fn leased(&self) -> Ipv4Net {
        self.eventually("a subnet leased", |n| n.subnet().is_some())
            .await;
        self.subnet().unwrap()
    }
}

/// The lease at `subnet`: its attributes and etcd lease.
pub(super) async fn lease_at(client: &mut Client, subnet: Ipv4Net) -> Option<(LeaseAttrs, i64)> {
    let key = format!(
        "{PREFIX}/subnets/{}",
        overlay_agent::nodes::etcd::subnet_key(subnet)
    );
    let resp = client.get(key, None).await.unwrap();
    let kv = resp.kvs().first()?;
    Some((serde_json::from_slice(kv.value()).unwrap(), kv.lease()))
}

/// The subnet of every key under `<prefix>/subnets/` in etcd now.
pub(super) async fn subnets_in_etcd(client: &mut Client) -> BTreeSet<Ipv4Net> {
    let prefix = format!("{PREFIX}/subnets/");
    let resp = client
        .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap();
    resp.kvs()
        .iter()
        .map(|kv| {
            overlay_agent::nodes::etcd::parse_subnet_key(kv.key_str().unwrap())
                .expect("a subnet key")
        })
        .collect()
}

/// The key of `subnet`'s lease.
pub(super) fn key(subnet: Ipv4Net) -> String {
    format!(
        "{PREFIX}/subnets/{}",
        overlay_agent::nodes::etcd::subnet_key(subnet)
    )
}

pub(super) fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

/// Puts a reservation: a lease without an etcd lease.
pub(super) async fn reserve(client: &mut Client, subnet: &str, public_ip: &str) {
    let net: Ipv4Net = subnet.parse().unwrap();
    let value = serde_json::to_string(&LeaseAttrs::ipip(ip(public_ip))).unwrap();
    let key = format!(
        "{PREFIX}/subnets/{}",
        overlay_agent::nodes::etcd::subnet_key(net)
    );
    client.put(key, value, None).await.unwrap();
}
