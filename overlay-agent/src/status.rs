//! What the agent knows of its own health, shared between the run loop, the node
//! source and whoever reports it (logs, HTTP endpoints).

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::watch;

use crate::{datapath::conntrack::Collected, fast_path::Pass, host::flanneld_leftovers::Leftover};

/// Upper bounds of the reconcile duration histogram, in seconds: a pass that only
/// compares takes milliseconds, one that rewrites thousands of routes seconds.
const RECONCILE_SECONDS_BUCKETS: [f64; 10] =
    [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0];

/// The node source's health.
#[derive(Debug, Clone, Default)]
pub struct SourceHealth {
    /// The source delivered a complete node set and is following changes.
    pub synced: bool,
    /// The last error, while the source is failing.
    pub error: Option<String>,
    pub errors_total: u64,
}

impl SourceHealth {
    fn succeeded(&mut self) {
        self.synced = true;
        self.error = None;
    }

    fn failed(&mut self, error: String) {
        self.error = Some(error);
        self.errors_total += 1;
    }
}

/// The last reconcile pass.
#[derive(Debug, Clone)]
pub struct Convergence {
    pub at: Instant,
    pub took: Duration,
    /// The pass succeeded: maps and routes match the node set it was given.
    pub ok: bool,
    pub nodes: usize,
    pub remote_subnets: usize,
}

/// Reconcile passes so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReconcileTotals {
    pub passes: u64,
    pub failures: u64,
}

/// Connection-table sweeps so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepTotals {
    pub sweeps: u64,
    pub expired: u64,
    pub orphans: u64,
    /// Entries left after the last sweep: the table's fill level without walking it
    /// again.
    pub entries: Option<usize>,
}

/// The fast path as the agent runs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FastPathReport {
    /// The programs may take admitted flows.
    pub on: bool,
    /// Why it is off although asked for (`--fast-path=established`).
    pub blocked: Option<String>,
    /// Changes of the host's ruleset seen.
    pub ruleset_changes: u64,
    pub admitted: u64,
    pub refused: u64,
    pub refreshed: u64,
    pub forgotten: u64,
}

/// flanneld's forward rules (`--iptables-forward-rules`), as the agent keeps them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardRulesReport {
    /// The last pass found or put them in place.
    pub in_place: bool,
    /// Passes that found some missing and wrote them again (the first pass included).
    pub written: u64,
    pub errors_total: u64,
    /// The last error, while passes fail.
    pub error: Option<String>,
}

#[derive(Debug)]
pub struct Status {
    source: Mutex<SourceHealth>,
    convergence: Mutex<Option<Convergence>>,
    started: Instant,
    heartbeat: Mutex<Option<Instant>>,
    reconciles: Mutex<ReconcileTotals>,
    reconcile_seconds: Histogram,
    sweeps: Mutex<SweepTotals>,
    /// The flannel annotations on this node's Node (Kubernetes API source), which
    /// tell the other nodes this node's tunnel address; `synced`: last seen in place.
    annotations: Mutex<SourceHealth>,
    /// The datapath is up and this node's routes are in place (set once, at the first
    /// pass that got there): what the node's `NetworkUnavailable=False` condition
    /// waits for.
    network_up: watch::Sender<bool>,
    /// That condition on this node's Node (Kubernetes API source, with
    /// --set-node-network-unavailable); `synced`: last seen in place.
    network_condition: Mutex<SourceHealth>,
    /// The uplink the agent selected (empty until it has).
    uplink: Mutex<String>,
    fast_path: Mutex<FastPathReport>,
    leases: Mutex<LeaseTotals>,
    /// None without --iptables-forward-rules.
    forward_rules: Mutex<Option<ForwardRulesReport>>,
    flanneld_leftovers: Mutex<LeftoverTotals>,
}

/// What flanneld left on the node that the agent removed, by kind
/// (`host::flanneld_leftovers`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeftoverTotals {
    pub devices: u64,
    pub iptables_rules: u64,
    pub iptables_chains: u64,
    pub nftables_chains: u64,
}

/// This node's subnet lease (etcd source): lost while running, and changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaseTotals {
    /// The lease was deleted or taken over, and leased again.
    pub lost: u64,
    /// Leasing again gave another subnet.
    pub subnet_changes: u64,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            source: Mutex::default(),
            convergence: Mutex::default(),
            started: Instant::now(),
            heartbeat: Mutex::default(),
            reconciles: Mutex::default(),
            reconcile_seconds: Histogram::new(RECONCILE_SECONDS_BUCKETS),
            sweeps: Mutex::default(),
            annotations: Mutex::default(),
            network_up: watch::Sender::new(false),
            network_condition: Mutex::default(),
            uplink: Mutex::default(),
            fast_path: Mutex::default(),
            leases: Mutex::default(),
            forward_rules: Mutex::default(),
            flanneld_leftovers: Mutex::default(),
        }
    }
}

impl Status {
    pub fn source_synced(&self) {
        self.source.lock().unwrap().succeeded();
    }

    pub fn source_failed(&self, error: String) {
        self.source.lock().unwrap().failed(error);
    }

    /// This node's lease was lost and leased again, on `changed` another subnet.
    pub fn lease_lost(&self, changed: bool) {
        let mut l = self.leases.lock().unwrap();
        l.lost += 1;
        l.subnet_changes += u64::from(changed);
    }

    /// Records a pass over the forward rules: `Ok(true)` when it wrote them.
    pub fn forward_rules_pass(&self, outcome: Result<bool, String>) {
        let mut guard = self.forward_rules.lock().unwrap();
        let f = guard.get_or_insert_with(ForwardRulesReport::default);
        f.in_place = outcome.is_ok();
        match outcome {
            Ok(written) => {
                f.written += u64::from(written);
                f.error = None;
            }
            Err(e) => {
                f.errors_total += 1;
                f.error = Some(e);
            }
        }
    }

    /// None until the first pass, and without --iptables-forward-rules.
    pub fn forward_rules(&self) -> Option<ForwardRulesReport> {
        self.forward_rules.lock().unwrap().clone()
    }

    pub fn flanneld_leftovers_removed(&self, removed: &[Leftover]) {
        let mut t = self.flanneld_leftovers.lock().unwrap();
        for r in removed {
            *match r {
                Leftover::Device => &mut t.devices,
                Leftover::IptablesJump { .. } => &mut t.iptables_rules,
                Leftover::IptablesChain { .. } => &mut t.iptables_chains,
                Leftover::NftChain => &mut t.nftables_chains,
            } += 1;
        }
    }

    pub fn flanneld_leftovers(&self) -> LeftoverTotals {
        *self.flanneld_leftovers.lock().unwrap()
    }

    pub fn leases(&self) -> LeaseTotals {
        *self.leases.lock().unwrap()
    }

    pub fn set_uplink(&self, name: &str) {
        *self.uplink.lock().unwrap() = name.to_owned();
    }

    pub fn uplink(&self) -> String {
        self.uplink.lock().unwrap().clone()
    }

    pub fn annotations_published(&self) {
        self.annotations.lock().unwrap().succeeded();
    }

    pub fn annotations_failed(&self, error: String) {
        self.annotations.lock().unwrap().failed(error);
    }

    pub fn annotations(&self) -> SourceHealth {
        self.annotations.lock().unwrap().clone()
    }

    /// The datapath is up and this node's routes are in place.
    pub fn network_is_up(&self) {
        self.network_up
            .send_if_modified(|up| !std::mem::replace(up, true));
    }

    /// Follows [`Status::network_is_up`].
    pub fn network_up(&self) -> watch::Receiver<bool> {
        self.network_up.subscribe()
    }

    pub fn network_condition_published(&self) {
        self.network_condition.lock().unwrap().succeeded();
    }

    pub fn network_condition_failed(&self, error: String) {
        self.network_condition.lock().unwrap().failed(error);
    }

    pub fn network_condition(&self) -> SourceHealth {
        self.network_condition.lock().unwrap().clone()
    }

    /// Records a reconcile pass.
    pub fn converged(&self, c: Convergence) {
        {
            let mut totals = self.reconciles.lock().unwrap();
            totals.passes += 1;
            totals.failures += u64::from(!c.ok);
        }
        self.reconcile_seconds.observe(c.took.as_secs_f64());
        *self.convergence.lock().unwrap() = Some(c);
    }

    /// The run loop made progress (it calls this on every turn).
    pub fn heartbeat(&self) {
        *self.heartbeat.lock().unwrap() = Some(Instant::now());
    }

    /// Records a sweep of the connection table.
    pub fn swept(&self, c: Collected) {
        let mut s = self.sweeps.lock().unwrap();
        s.sweeps += 1;
        s.expired += c.expired as u64;
        s.orphans += c.orphans as u64;
        s.entries = Some(c.remaining);
    }

    /// The fast path is on, or off and why.
    pub fn fast_path_switched(&self, on: bool, blocked: Option<&str>) {
        let mut f = self.fast_path.lock().unwrap();
        f.on = on;
        f.blocked = blocked.map(str::to_owned);
    }

    pub fn ruleset_changed(&self) {
        self.fast_path.lock().unwrap().ruleset_changes += 1;
    }

    /// Records an admission pass.
    pub fn admission(&self, pass: Pass) {
        let mut f = self.fast_path.lock().unwrap();
        f.admitted += pass.admitted as u64;
        f.refused += pass.refused as u64;
        f.refreshed += pass.refreshed as u64;
        f.forgotten += pass.forgotten as u64;
    }

    pub fn fast_path(&self) -> FastPathReport {
        self.fast_path.lock().unwrap().clone()
    }

    pub fn source(&self) -> SourceHealth {
        self.source.lock().unwrap().clone()
    }

    pub fn convergence(&self) -> Option<Convergence> {
        self.convergence.lock().unwrap().clone()
    }

    pub fn reconciles(&self) -> ReconcileTotals {
        *self.reconciles.lock().unwrap()
    }

    /// Durations of all reconcile passes.
    pub fn reconcile_seconds(&self) -> &Histogram {
        &self.reconcile_seconds
    }

    pub fn sweeps(&self) -> SweepTotals {
        *self.sweeps.lock().unwrap()
    }

    /// Alive: the run loop beat within `within`; before its first beat (while the
    /// datapath loads), the process started within `within`.
    pub fn alive(&self, within: Duration) -> Result<(), String> {
        let (since, what) = match *self.heartbeat.lock().unwrap() {
            Some(beat) => (beat, "the run loop last made progress"),
            None => (
                self.started,
                "the run loop has not started; the agent started",
            ),
        };
        let age = since.elapsed();
        if age <= within {
            Ok(())
        } else {
            Err(format!("{what} {:.1}s ago", age.as_secs_f64()))
        }
    }

    /// Why a ready agent is degraded: its node source fails after it had synced, or
    /// the forward rules cannot be put in place. It stays ready, because the datapath
    /// works on with the last node set (an agent turning unready with its etcd or API
    /// server would stall every rollout), and flanneld runs on without its rules too,
    /// but says so.
    pub fn degraded(&self) -> Option<String> {
        let source = self.source();
        let source = source.error.filter(|_| source.synced).map(|error| {
            format!("the node source is failing, the datapath keeps the last node set: {error}")
        });
        let forward = self.forward_rules().and_then(|f| f.error).map(|error| {
            format!("the forward rules (--iptables-forward-rules) are not in place: {error}")
        });
        let why: Vec<String> = source.into_iter().chain(forward).collect();
        (!why.is_empty()).then(|| why.join("; "))
    }

    /// Ready: the node set is known and the last pass made the datapath match it.
    pub fn ready(&self) -> Result<(), String> {
        let source = self.source();
        if !source.synced {
            return Err(source
                .error
                .unwrap_or_else(|| "the node set is not known yet".into()));
        }
        match self.convergence() {
            Some(c) if c.ok => Ok(()),
            Some(_) => Err("the last reconcile pass failed".into()),
            None => Err("not converged yet".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_a_synced_source_and_a_good_pass() {
        let s = Status::default();
        assert!(s.ready().is_err());
        s.source_synced();
        assert_eq!(s.ready().unwrap_err(), "not converged yet");
        let pass = |ok| Convergence {
            at: Instant::now(),
            took: Duration::ZERO,
            ok,
            nodes: 4,
            remote_subnets: 3,
        };
        s.converged(pass(false));
        assert!(s.ready().is_err());
        s.converged(pass(true));
        assert!(s.ready().is_ok());
        assert_eq!(s.degraded(), None);
        // A failing source keeps the datapath: ready, and degraded for the reason.
        s.source_failed("watch: connection refused".into());
        assert!(s.ready().is_ok());
        assert!(
            s.degraded()
                .unwrap()
                .ends_with(": watch: connection refused")
        );
        assert_eq!(s.source().errors_total, 1);
        s.source_synced();
        assert_eq!(s.degraded(), None);
        assert_eq!(
            s.reconciles(),
            ReconcileTotals {
                passes: 2,
                failures: 1
            }
        );
    }

    #[test]
    fn alive_needs_a_recent_heartbeat() {
        let s = Status::default();
        let long = Duration::from_secs(3600);
        assert!(s.alive(long).is_ok(), "starting up");
        std::thread::sleep(Duration::from_millis(5));
        let err = s.alive(Duration::from_millis(1)).unwrap_err();
        assert!(err.contains("has not started"), "{err}");
        s.heartbeat();
        assert!(s.alive(long).is_ok());
        std::thread::sleep(Duration::from_millis(5));
        let err = s.alive(Duration::from_millis(1)).unwrap_err();
        assert!(err.starts_with("the run loop last made progress"), "{err}");
    }

    #[test]
    fn forward_rule_passes_accumulate() {
        let s = Status::default();
        assert_eq!(s.forward_rules(), None);
        s.forward_rules_pass(Ok(true));
        s.forward_rules_pass(Err("running iptables: not found".into()));
        assert_eq!(
            s.degraded().unwrap(),
            "the forward rules (--iptables-forward-rules) are not in place: running iptables: not found"
        );
        let f = s.forward_rules().unwrap();
        assert!(!f.in_place);
        assert_eq!((f.written, f.errors_total), (1, 1));
        s.forward_rules_pass(Ok(false));
        assert_eq!(s.degraded(), None);
        assert_eq!(
            s.forward_rules().unwrap(),
            ForwardRulesReport {
                in_place: true,
                written: 1,
                errors_total: 1,
                error: None
            }
        );
    }

    #[test]
    fn sweeps_accumulate() {
        let s = Status::default();
        assert_eq!(s.sweeps().entries, None);
        for (expired, orphans, remaining) in [(3, 1, 10), (0, 2, 8)] {
            s.swept(Collected {
                expired,
                orphans,
                remaining,
            });
        }
        assert_eq!(
            s.sweeps(),
            SweepTotals {
                sweeps: 2,
                expired: 3,
                orphans: 3,
                entries: Some(8)
            }
        );
    }
}
