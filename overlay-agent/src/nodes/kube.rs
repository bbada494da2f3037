//! Node source: the Kubernetes API, as flanneld's `--kube-subnet-mgr`.
//!
//! A kube-rs watcher lists and watches Nodes (as `SlimNode`s: only what the overlay
//! reads) into a reflector store. The store only takes a relist's result once the
//! whole list has arrived, so after every (re)list the node set is exactly the listed
//! nodes: a node deleted while the watch was down disappears at the relist (flannel
//! issue #2554, where stale entries survived).
//! Complete sets are published, never a partial one; watch events in between update
//! the set one node at a time and publish only when what the overlay uses changed.
//! Errors keep the last set published (the dataplane keeps running on it), are
//! recorded in `Status`, and the watcher retries with backoff.
//!
//! On the way, this node's flannel annotations are kept at what it publishes
//! ([`annotations::Publisher`]), so that flanneld nodes and ours find each other, and
//! once the network is up its `NetworkUnavailable` condition is set to `False`
//! ([`condition::ConditionPublisher`]).

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path, pin::pin, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _, reflector,
        reflector::{ObjectRef, Store},
        utils::Backoff,
        watcher::{self, DefaultBackoff, Event},
    },
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{
    address::OwnAddress,
    annotations::{Names, Publisher},
    condition::ConditionPublisher,
    node_set::{NodeError, NodeInfo, NodeSet},
    slim::SlimNode,
};
use crate::status::Status;

/// A client from `kubeconfig`, else from the environment: `KUBECONFIG` or
/// `~/.kube/config`, else the in-cluster service account (as a DaemonSet pod).
/// `api_url` (flanneld's `--kube-api-url`) replaces the server's URL; without a
/// kubeconfig it goes with the service account's credentials, or none outside a pod,
/// as client-go's `BuildConfigFromFlags` that flanneld calls.
pub async fn client(kubeconfig: Option<&Path>, api_url: Option<&str>) -> Result<Client> {
    let mut config = match (kubeconfig, api_url) {
        (Some(path), _) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using the kubeconfig {}", path.display()))?
        }
        (None, Some(url)) => match Config::incluster() {
            Ok(config) => config,
            Err(_) => Config::new(api_uri(url)?),
        },
        (None, None) => Config::infer().await.context(
            "finding the Kubernetes API: not in a pod (no service account) and no kubeconfig (--kubeconfig, KUBECONFIG, ~/.kube/config)",
        )?,
    };
    if let Some(url) = api_url {
        config.cluster_url = api_uri(url)?;
    }
    Client::try_from(config).context("creating the Kubernetes client")
}

fn api_uri<T: std::str::FromStr>(url: &str) -> Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    url.parse()
        .with_context(|| format!("--kube-api-url {url:?} is not a URL"))
}

/// The node the pod `namespace/pod` runs on, as flanneld finds its node.
pub async fn pod_node_name(client: &Client, namespace: &str, pod: &str) -> Result<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let found = pods
        .get(pod)
        .await
        .with_context(|| format!("error retrieving pod spec for '{namespace}/{pod}'"))?;
    found
        .spec
        .and_then(|s| s.node_name)
        .filter(|n| !n.is_empty())
        .with_context(|| format!("node name not present in pod spec '{namespace}/{pod}'"))
}

/// The `annotation` (flannel's `node-public-ip`) of Node `name`, when it holds an
/// IPv4 address; anything else is logged and ignored, as flanneld does.
pub async fn stored_public_ip(client: &Client, name: &str, annotation: &str) -> Option<Ipv4Addr> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = match nodes.get(name).await {
        Ok(node) => node,
        Err(e) => {
            warn!(node = name, error = %e, "cannot read this node's {annotation} annotation; going on without it");
            return None;
        }
    };
    let value = node.metadata.annotations?.remove(annotation)?;
    match value.parse() {
        Ok(ip) => {
            info!(node = name, address = %ip, "{annotation} annotation found: it replaces --public-ip");
            Some(ip)
        }
        Err(_) => {
            warn!(
                node = name,
                value, "{annotation} is not an IPv4 address; ignored"
            );
            None
        }
    }
}

/// How long the watcher waits after an error before trying again.
pub enum Retry {
    /// kube-rs's default, client-go's: 0.8 s doubling to 30 s, with jitter, so that
    /// thousands of agents do not come back to a recovering API server at once.
    Default(DefaultBackoff),
    /// Doubling from `min` to `max`, without jitter (tests).
    Exponential {
        min: Duration,
        max: Duration,
        next: Duration,
    },
}

impl Retry {
    pub fn exponential(min: Duration, max: Duration) -> Self {
        Self::Exponential {
            min,
            max,
            next: min,
        }
    }
}

impl Iterator for Retry {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        match self {
            Retry::Default(b) => b.next(),
            Retry::Exponential { max, next, .. } => {
                let now = *next;
                *next = (*next * 2).min(*max);
                Some(now)
            }
        }
    }
}

impl Backoff for Retry {
    fn reset(&mut self) {
        match self {
            Retry::Default(b) => b.reset(),
            Retry::Exponential { min, next, .. } => *next = *min,
        }
    }
}

/// What the overlay makes of each node in the store, by name.
#[derive(Default)]
struct Index(BTreeMap<String, Result<NodeInfo, NodeError>>);

impl Index {
    /// Exactly the nodes of `store`.
    fn of(store: &Store<SlimNode>, names: &Names) -> Self {
        Self(
            store
                .state()
                .iter()
                .filter_map(|n| Some((n.metadata.name.clone()?, NodeInfo::from_node(n, names))))
                .collect(),
        )
    }

    /// Takes in an added or changed node; true if what the overlay uses changed.
    fn apply(&mut self, node: &SlimNode, names: &Names) -> bool {
        let Some(name) = node.metadata.name.clone() else {
            return false;
        };
        let info = NodeInfo::from_node(node, names);
        if self.0.get(&name) == Some(&info) {
            return false;
        }
        self.0.insert(name, info);
        true
    }

    fn remove(&mut self, node: &SlimNode) -> bool {
        node.metadata
            .name
            .as_ref()
            .is_some_and(|n| self.0.remove(n).is_some())
    }

    fn set(&self) -> NodeSet {
        self.0.values().cloned().collect()
    }

    fn own(&self, name: &str) -> Option<&NodeInfo> {
        self.0.get(name).and_then(|r| r.as_ref().ok())
    }

    /// Names in `self` but not in `other`.
    fn missing_from<'a>(&'a self, other: &Self) -> Vec<&'a str> {
        self.0
            .keys()
            .filter(|k| !other.0.contains_key(*k))
            .map(String::as_str)
            .collect()
    }
}

/// The node set as the watch events build it.
struct Follower {
    store: Store<SlimNode>,
    index: Index,
    /// A complete list has arrived: from then on every state is a complete set.
    listed: bool,
    names: Names,
}

impl Follower {
    /// Takes in one watcher event (already applied to the store): whether the node
    /// set changed, or None while there is no complete set to publish.
    fn take(&mut self, event: watcher::Result<Event<SlimNode>>, status: &Status) -> Option<bool> {
        let changed = match event {
            Ok(Event::Init) => {
                debug!("listing Nodes");
                return None;
            }
            Ok(Event::InitApply(_)) => return None,
            Ok(Event::InitDone) => {
                let relisted = Index::of(&self.store, &self.names);
                let gone = self.index.missing_from(&relisted);
                let new = relisted.missing_from(&self.index).len();
                info!(
                    nodes = relisted.0.len(),
                    new,
                    gone = gone.len(),
                    gone_names = ?&gone[..gone.len().min(10)],
                    "node list complete"
                );
                self.index = relisted;
                self.listed = true;
                status.source_synced();
                true
            }
            Ok(Event::Apply(node)) => {
                status.source_synced();
                self.index.apply(&node, &self.names)
            }
            Ok(Event::Delete(node)) => {
                status.source_synced();
                self.index.remove(&node)
            }
            Err(e) => {
                let error = format!("{e}");
                warn!("node watch failed, keeping the last node set: {error}");
                status.source_failed(error);
                return None;
            }
        };
        self.listed.then_some(changed)
    }
}

/// The Kubernetes API node source of one node.
pub struct KubeSource {
    client: Client,
    node_name: String,
    own_address: OwnAddress,
    retry: Retry,
    watcher: watcher::Config,
    annotations: Names,
    network_condition: bool,
}

impl KubeSource {
    pub fn new(client: Client, node_name: &str, own_address: OwnAddress) -> Self {
        Self {
            client,
            node_name: node_name.to_owned(),
            own_address,
            retry: Retry::Default(DefaultBackoff::default()),
            // Paged lists (500 Nodes a page) bound what a relist holds at once.
            watcher: watcher::Config::default(),
            annotations: Names::default(),
            network_condition: true,
        }
    }

    /// Whether to set the node's `NetworkUnavailable` condition to `False` once the
    /// network is up (flanneld's `--set-node-network-unavailable`, true by default).
    pub fn with_network_condition(mut self, on: bool) -> Self {
        self.network_condition = on;
        self
    }

    /// flannel's annotations under another prefix than flanneld's default.
    pub fn with_annotations(mut self, names: Names) -> Self {
        self.annotations = names;
        self
    }

    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    pub fn with_watcher(mut self, config: watcher::Config) -> Self {
        self.watcher = config;
        self
    }

    /// Runs until the receiver of `tx` goes away.
    pub async fn run(self, tx: watch::Sender<Option<NodeSet>>, status: Arc<Status>) {
        // Nodes are listed and watched slim (see `SlimNode`), and patched as Nodes.
        let nodes: Api<SlimNode> = Api::all(self.client.clone());
        let (store, writer) = reflector::store();
        let mut events = pin!(
            watcher::watcher(nodes, self.watcher)
                .backoff(self.retry)
                .reflect(writer)
        );
        let own_ref = ObjectRef::new(&self.node_name);
        let mut publisher = Publisher::new(
            Api::<Node>::all(self.client.clone()),
            &self.node_name,
            self.annotations.clone(),
        );
        let mut condition = self
            .network_condition
            .then(|| ConditionPublisher::new(Api::all(self.client.clone()), &self.node_name));
        let mut network_up = status.network_up();
        // The datapath is up and its routes are in place: the condition may be set.
        let mut up = false;
        let mut follower = Follower {
            store,
            index: Index::default(),
            listed: false,
            names: self.annotations,
        };
        info!(
            node = self.node_name,
            "watching Nodes through the Kubernetes API"
        );
        loop {
            let retry_at = [
                publisher.retry_at(),
                condition.as_ref().and_then(|c| c.retry_at()),
            ]
            .into_iter()
            .flatten()
            .min();
            let event = tokio::select! {
                event = events.next() => match event {
                    Some(event) => Some(event),
                    None => {
                        warn!("the node watch ended");
                        return;
                    }
                },
                () = sleep_until(retry_at) => None,
                // The sender lives in `status`, which outlives this loop.
                _ = network_up.wait_for(|up| *up), if condition.is_some() && !up => {
                    up = true;
                    None
                }
            };
            let changed = match event {
                // A publisher's retry time came, or the network came up.
                None => false,
                Some(event) => match follower.take(event, &status) {
                    Some(changed) => changed,
                    None => continue,
                },
            };
            if tx.is_closed() {
                return;
            }
            let index = &follower.index;
            if changed {
                // A relist that found what we had changes nothing downstream.
                let set = index.set();
                tx.send_if_modified(|current| {
                    let differs = current.as_ref() != Some(&set);
                    if differs {
                        *current = Some(set);
                    }
                    differs
                });
            }
            if let Some(own) = index.own(&self.node_name) {
                let address = self.own_address.resolve(own);
                let current = follower.store.get(&own_ref).map(|n| n.annotations.clone());
                publisher
                    .reconcile(&current.unwrap_or_default(), address, &status)
                    .await;
            }
            if up
                && let Some(condition) = condition.as_mut()
                && let Some(own) = follower.store.get(&own_ref)
            {
                condition
                    .reconcile(own.network_unavailable.as_deref(), &status)
                    .await;
            }
        }
    }
}

async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_doubles_to_its_cap_and_resets() {
        let mut r = Retry::exponential(Duration::from_millis(10), Duration::from_millis(35));
        let ms: Vec<u128> = r.by_ref().take(4).map(|d| d.as_millis()).collect();
        assert_eq!(ms, [10, 20, 35, 35]);
        r.reset();
        assert_eq!(r.next(), Some(Duration::from_millis(10)));
    }
}
