//! The pods' side of the node, a controller beside the node reconcile (`reconcile`):
//! the pods' ports on the bridge (`POD_PORTS`, [`ports`]), `pod_ingress` on their veths
//! ([`veths`]), and the bridge's addresses and MAC, which the node pass acts on (it
//! attaches to the bridge and sources host traffic from the gateway).
//!
//! Shaped as a kube-rs controller (kube-rs/kube `examples/configmapgen_controller.rs`,
//! commit 02c44ed): [`Pods::next`] waits for a [`Trigger`], what the host's
//! notifications ([`events`]) and a slow periodic resync ask for, and
//! [`Pods::reconcile`] reads the state itself and converges on it. Failures are only
//! logged: the next trigger reads everything again.

pub mod events;
pub mod ports;
pub mod veths;

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Result;
use overlay_common::Hook;
use tokio::time::{Interval, sleep_until};
use tracing::{debug, info, warn};

use crate::{
    datapath::Datapath,
    host::{self, Host},
};
use events::{Change, HostEvents};
use veths::PodHooks;

/// How long the agent lets notifications gather before it looks: a pod's start is a
/// burst of them (veth created, plugged into the bridge, up, its MAC learned).
const AFTER_NOTIFICATION: Duration = Duration::from_millis(100);
/// The least time between two looks that notifications ask for: a node whose devices
/// or filters keep changing costs no more than polling did.
const LOOK_SPACING: Duration = Duration::from_secs(1);
/// How often the agent looks at the pods' side of the node when nothing told it to: for
/// what sends no notification (another program attached to a veth through TCX).
const LOOK_ANYWAY: Duration = Duration::from_secs(10);
/// The pace without notifications.
const POLL: Duration = Duration::from_secs(1);

/// Why the pods' side is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Notifications of the bridge's forwarding table alone, gathered: `POD_PORTS` is
    /// read again, and nothing else.
    Forwarding,
    /// Notifications of devices, addresses or tc (gathered, and spaced), or a new veth
    /// that has settled: a full look.
    HostEvent,
    /// The periodic look, for what sends no notification (and, without notifications,
    /// the only one).
    Resync,
}

/// What a look found that the node pass must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing the node pass depends on changed.
    Unchanged,
    /// The bridge appeared, or changed its addresses or MAC: the node pass attaches to
    /// it and sources host traffic from its gateway address.
    BridgeChanged,
}

/// When the pods' side is due a look, besides the periodic one.
#[derive(Debug, Default)]
struct Schedule {
    /// The full look due: after notifications, or when a new veth settles.
    look: Option<Instant>,
    /// When the last full look began.
    last: Option<Instant>,
    /// A read of the bridge's forwarding table alone, due after notifications of it
    /// only: not held back by the spacing between looks, as it costs one file read,
    /// and a new pod's packets take the bridge until its port is known.
    ports: Option<Instant>,
}

impl Schedule {
    /// Notifications of the bridge's forwarding table alone arrived at `now`: its
    /// entries are read once they have gathered.
    fn forwarding(&mut self, now: Instant) {
        self.ports.get_or_insert(now + AFTER_NOTIFICATION);
    }

    /// Notifications arrived at `now`: a look once they have gathered, and not sooner
    /// than [`LOOK_SPACING`] after the last one.
    fn notified(&mut self, now: Instant) {
        let gathered = now + AFTER_NOTIFICATION;
        self.by(self
            .last
            .map_or(gathered, |l| gathered.max(l + LOOK_SPACING)));
    }

    /// A look at `at` at the latest.
    fn by(&mut self, at: Instant) {
        self.look = Some(self.look.map_or(at, |s| s.min(at)));
    }

    /// A look (which reads the forwarding table too) begins at `now`.
    fn begin(&mut self, now: Instant) {
        self.look = None;
        self.ports = None;
        self.last = Some(now);
    }
}

/// The bridge as the node pass last acted on it: the CNI plugin gives the bridge its
/// gateway address after creating it, and its MAC is the pods' gateway, which
/// `pod_ingress` looks for.
#[derive(Debug, Default, PartialEq, Eq)]
struct BridgeState {
    addresses: Vec<Ipv4Addr>,
    mac: Option<[u8; 6]>,
}

/// The controller of the pods' side of the node.
pub struct Pods {
    /// The pods' bridge (`cni0`).
    bridge: String,
    /// The host's notifications; None when they failed (the periodic look runs at
    /// [`POLL`] then).
    events: Option<HostEvents>,
    periodic: Interval,
    schedule: Schedule,
    bridge_state: BridgeState,
    hooks: PodHooks,
    host: Host,
}

impl Pods {
    /// The controller of the pods on `bridge`, reading the node through `host` and
    /// following its notifications if it can subscribe to them, else looking every
    /// [`POLL`]. The first periodic look is at once.
    pub fn new(bridge: &str, host: Host) -> Self {
        let events = match HostEvents::subscribe() {
            Ok(events) => Some(events),
            Err(e) => {
                warn!(
                    error = format!("{e:#}"),
                    "no rtnetlink notifications; looking at the pods' side of the node every second instead"
                );
                None
            }
        };
        let pace = if events.is_some() { LOOK_ANYWAY } else { POLL };
        Self {
            bridge: bridge.to_owned(),
            events,
            periodic: tokio::time::interval(pace),
            schedule: Schedule::default(),
            bridge_state: BridgeState::default(),
            hooks: PodHooks::default(),
            host,
        }
    }

    /// Waits for the next look that is due, taking in the notifications that come
    /// meanwhile. Cancel-safe: what a notification asks for is kept in the schedule.
    pub async fn next(&mut self) -> Trigger {
        loop {
            // A branch whose time is None is off (its sleep, to `now`, is not polled).
            let (ports, look) = (self.schedule.ports, self.schedule.look);
            let now = Instant::now();
            tokio::select! {
                changed = next_change(&mut self.events) => {
                    let now = Instant::now();
                    match changed {
                        Ok(Change::Forwarding) => self.schedule.forwarding(now),
                        Ok(Change::Node) => self.schedule.notified(now),
                        Err(e) => {
                            warn!(error = format!("{e:#}"), "rtnetlink notifications failed; looking at the pods' side of the node every second instead");
                            self.events = None;
                            self.periodic = tokio::time::interval(POLL);
                            self.schedule.notified(now);
                        }
                    }
                }
                _ = sleep_until(ports.unwrap_or(now).into()), if ports.is_some() => {
                    return Trigger::Forwarding;
                }
                _ = sleep_until(look.unwrap_or(now).into()), if look.is_some() => {
                    return Trigger::HostEvent;
                }
                _ = self.periodic.tick() => return Trigger::Resync,
            }
        }
    }

    /// Looks at the pods' side of the node for `trigger`: the pods' ports on the bridge
    /// (`POD_PORTS`), and on a full look `pod_ingress` on their veths, with the next
    /// look brought forward to when the next new veth settles, and the bridge's
    /// addresses and MAC.
    pub async fn reconcile(&mut self, trigger: Trigger, dp: &mut Datapath) -> Outcome {
        let now = Instant::now();
        match trigger {
            Trigger::Forwarding => self.schedule.ports = None,
            Trigger::HostEvent | Trigger::Resync => self.schedule.begin(now),
        }
        self.sync_ports(dp);
        if trigger == Trigger::Forwarding {
            return Outcome::Unchanged;
        }
        let net = Path::new("/sys/class/net");
        let prog = dp.program_mut(Hook::PodIngress);
        match self
            .hooks
            .sync(prog, &self.host, net, &self.bridge, now)
            .await
        {
            Ok(c) if !c.is_empty() => info!(changes = %c, "pod veths synced"),
            Ok(_) => {}
            Err(e) => debug!(error = %e, "reading the bridge's ports"),
        }
        if let Some(at) = self.hooks.next_settled() {
            self.schedule.by(at);
        }
        let Some(bridge) = host::ifindex_by_name(&self.bridge) else {
            return Outcome::Unchanged;
        };
        let addresses = match self.host.addresses(Some(bridge)).await {
            Ok(a) => a,
            Err(e) => {
                debug!(error = format!("{e:#}"), "reading the bridge's addresses");
                return Outcome::Unchanged;
            }
        };
        let seen = BridgeState {
            addresses,
            mac: host::mac_by_name(&self.bridge),
        };
        let appeared = dp.attachment(Hook::BridgeIngress).is_none();
        if !appeared && seen == self.bridge_state {
            return Outcome::Unchanged;
        }
        self.bridge_state = seen;
        Outcome::BridgeChanged
    }

    /// The pods' ports on the bridge (`POD_PORTS`) from its forwarding table.
    fn sync_ports(&self, dp: &mut Datapath) {
        let net = Path::new("/sys/class/net");
        match ports::sync(&mut dp.pod_ports, net, &self.bridge) {
            Ok(c) if !c.is_empty() => debug!(changes = %c, "pod ports synced"),
            Ok(_) => {}
            Err(e) => debug!(error = %e, "reading the bridge's forwarding table"),
        }
    }
}

/// The next notification that concerns the pods' side of the node; never, without
/// notifications.
async fn next_change(events: &mut Option<HostEvents>) -> Result<Change> {
    match events {
        Some(events) => events.changed().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_gather_and_looks_keep_their_spacing() {
        let t0 = Instant::now();
        let mut schedule = Schedule::default();
        // The first notifications: a look once they have gathered.
        schedule.notified(t0);
        schedule.notified(t0 + Duration::from_millis(50));
        assert_eq!(schedule.look, Some(t0 + AFTER_NOTIFICATION));
        schedule.begin(t0 + AFTER_NOTIFICATION);
        assert_eq!(schedule.look, None);
        // More right after that look: not before the spacing is over.
        let t1 = t0 + Duration::from_millis(200);
        schedule.notified(t1);
        assert_eq!(schedule.look, Some(t0 + AFTER_NOTIFICATION + LOOK_SPACING));
        // A veth settling earlier brings it forward.
        schedule.by(t0 + Duration::from_millis(500));
        assert_eq!(schedule.look, Some(t0 + Duration::from_millis(500)));
        // Long after the last look, only the gathering delay is left.
        schedule.begin(t1);
        let t2 = t1 + Duration::from_secs(5);
        schedule.notified(t2);
        assert_eq!(schedule.look, Some(t2 + AFTER_NOTIFICATION));
    }

    #[test]
    fn forwarding_entries_are_read_without_waiting_for_the_spacing() {
        let t0 = Instant::now();
        let mut schedule = Schedule::default();
        schedule.begin(t0);
        // A pod's MAC learned right after a look: its port is read once the
        // notifications have gathered, not a second after the look.
        let t1 = t0 + Duration::from_millis(10);
        schedule.forwarding(t1);
        schedule.forwarding(t1 + Duration::from_millis(50));
        assert_eq!(schedule.ports, Some(t1 + AFTER_NOTIFICATION));
        assert_eq!(schedule.look, None, "no full look for a forwarding entry");
        // A full look reads the table as well.
        schedule.begin(t1 + Duration::from_millis(20));
        assert_eq!(schedule.ports, None);
    }
}
