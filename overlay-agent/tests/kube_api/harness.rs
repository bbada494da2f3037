//! The Kubernetes API node source running against the fake, and ways to watch what it
//! publishes and reports.

use std::{net::Ipv4Addr, sync::Arc, time::Duration};

use kube::{Client, Config, runtime::watcher};
use overlay_agent::{
    nodes::{
        NodeInfo, NodeSet,
        address::{Authority, OwnAddress},
        kube::{KubeSource, Retry},
    },
    status::Status,
};
use tokio::{sync::watch, task::JoinHandle};

use super::fake::FakeApi;

/// Generous: only a broken source takes this long.
const PATIENCE: Duration = Duration::from_secs(15);

pub(super) struct Harness {
    pub api: FakeApi,
    pub rx: watch::Receiver<Option<NodeSet>>,
    pub status: Arc<Status>,
    task: JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// This node's address rule as with `--kube-subnet-mgr` and an interface address.
pub(super) fn agent_address(interface: &str) -> OwnAddress {
    OwnAddress {
        authority: Authority::Agent,
        public_ip: None,
        interface: interface.parse().unwrap(),
    }
}

impl Harness {
    /// Runs the source of node `own` against `api`, listing `page_size` nodes a page.
    pub(super) fn start(api: FakeApi, own: &str, own_address: OwnAddress, page_size: u32) -> Self {
        Self::start_with(api, own, own_address, page_size, |s| s)
    }

    /// The same with the source as `configure` makes it.
    pub(super) fn start_with(
        api: FakeApi,
        own: &str,
        own_address: OwnAddress,
        page_size: u32,
        configure: impl FnOnce(KubeSource) -> KubeSource,
    ) -> Self {
        let client = Client::try_from(Config::new(api.url().parse().unwrap())).unwrap();
        let source = configure(KubeSource::new(client, own, own_address))
            .with_retry(Retry::exponential(
                Duration::from_millis(20),
                Duration::from_millis(200),
            ))
            .with_watcher(watcher::Config::default().page_size(page_size));
        let (tx, rx) = watch::channel(None);
        let status = Arc::new(Status::default());
        let task = tokio::spawn(source.run(tx, Arc::clone(&status)));
        Self {
            api,
            rx,
            status,
            task,
        }
    }

    /// The next set the source publishes.
    pub(super) async fn next_set(&mut self) -> NodeSet {
        tokio::time::timeout(PATIENCE, self.rx.changed())
            .await
            .expect("the source published nothing")
            .expect("the source stopped");
        self.rx
            .borrow_and_update()
            .clone()
            .expect("a published set")
    }

    /// Asserts that nothing is published for `d`.
    pub(super) async fn quiet(&mut self, d: Duration) {
        tokio::time::sleep(d).await;
        assert!(
            !self.rx.has_changed().unwrap(),
            "published {:?}",
            self.rx.borrow().as_ref().map(names)
        );
    }

    /// Waits until `check` holds.
    pub(super) async fn eventually(&self, what: &str, check: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !check(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never: {what}; source {:?}, annotations {:?}, condition {:?}",
                self.status.source(),
                self.status.annotations(),
                self.status.network_condition()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

pub(super) fn names(set: &NodeSet) -> Vec<&str> {
    set.nodes.iter().map(|n| n.name.as_str()).collect()
}

pub(super) fn node<'a>(set: &'a NodeSet, name: &str) -> &'a NodeInfo {
    set.nodes
        .iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("{name} not in {:?}", names(set)))
}

pub(super) fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}
