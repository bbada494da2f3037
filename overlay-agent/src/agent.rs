//! The agent's life: set the node up, load and attach the datapath, converge on the
//! node set as it changes, and leave the node clean on the way out.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow, bail};
use overlay_common::Hook;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::watch,
};
use tracing::{debug, error, info, warn};

use crate::{
    bpf_log::BpfLogLevel,
    bpffs,
    datapath::{Datapath, LoadOptions},
    fast_path::{self, Driver},
    host::{
        self, Host,
        events::{Change, HostEvents},
        flanneld_leftovers,
        forward_rules::{self, ForwardRules, Frontend},
    },
    masq,
    nodes::{
        NodeName, NodeSet, OpenSource, Source,
        address::{Interfaces, OwnAddress, Selection},
    },
    reconcile::{Desired, IPIP_OVERHEAD, NodeSettings, Reconciler, Uplink},
    status::{Convergence, Status},
};

/// Everything `overlay-agent run` is told.
#[derive(Debug, Clone)]
pub struct Options {
    pub node_name: NodeName,
    pub source: Source,
    pub net_conf: PathBuf,
    /// Which interface carries the tunnel, and the node's public address.
    pub interface: Selection,
    pub bridge: String,
    pub subnet_file: PathBuf,
    pub bpffs: PathBuf,
    pub resync: Duration,
    pub masq: masq::Settings,
    pub conntrack_entries: u32,
    pub ct_sweep: Duration,
    pub bpf_log_level: BpfLogLevel,
    /// `--fast-path`.
    pub fast_path: fast_path::Mode,
    /// A blackhole route for this node's pod subnet (flanneld's `--ip-blackhole-route`).
    pub blackhole_route: bool,
    /// flanneld's FORWARD accept rules (`--iptables-forward-rules`), checked at this
    /// period (`--iptables-resync`); None without them.
    pub forward_rules: Option<Duration>,
}

/// Signals that end the run.
struct Shutdown {
    term: Signal,
    int: Signal,
}

impl Shutdown {
    fn install() -> Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn requested(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

pub async fn run(opts: Options, status: Arc<Status>) -> Result<()> {
    // Before anything is installed, so that no signal can skip the cleanup.
    let mut shutdown = Shutdown::install()?;
    if opts.masq.enabled {
        masq::check_against_ephemeral(&opts.masq.ports, &masq::ephemeral_range()?)?;
    }
    let host = Host::connect()?;
    let opening = opts.source.clone().open(&opts.node_name).await?;
    let node_name = opening.name.clone();
    let mut selection = opts.interface.clone();
    if let Some(stored) = opening.stored_public_ip().await {
        selection.public_ip = Some(stored);
    }
    let uplink = select_uplink(&selection).await?;
    let own_address = OwnAddress {
        authority: opts.source.authority(),
        public_ip: selection.public_ip,
        interface: uplink.address,
    };
    let source = opening.finish(own_address).await?;
    let net_conf = source.net_conf(&opts.net_conf)?;
    host::enable_forwarding()?;
    let forward_rules = opts.forward_rules.map(|period| {
        let frontend = if net_conf.enable_nftables {
            Frontend::Nftables
        } else {
            Frontend::Iptables
        };
        let rules = ForwardRules::new(frontend, net_conf.network);
        tokio::spawn(forward_rules::keep(rules, period, Arc::clone(&status)))
    });
    let pin_dir = bpffs::prepare(&opts.bpffs)?;
    let mut dp = Datapath::load(&LoadOptions {
        pin_dir: Some(pin_dir.clone()),
        conntrack_entries: opts.conntrack_entries,
        log_level: opts.bpf_log_level,
    })?;
    info!(node = node_name, uplink = uplink.name, address = %uplink.address, mtu = uplink.mtu, network = %net_conf.network, direct_routing = net_conf.direct_routing, pins = %pin_dir.display(), bpf_log_level = %opts.bpf_log_level, "datapath loaded");
    let program_log = dp.take_log().map(|log| tokio::spawn(log.forward()));
    let uplink_name = uplink.name.clone();
    status.set_uplink(&uplink_name);

    let settings = NodeSettings {
        uplink,
        bridge: opts.bridge.clone(),
        network: net_conf.network,
        subnet_file: opts.subnet_file.clone(),
        masq: opts.masq.clone(),
        blackhole_route: opts.blackhole_route,
        direct_routing: net_conf.direct_routing,
    };
    let mut reconciler = Reconciler::new(host, settings);
    let node = NodeIdentity {
        network: net_conf.network,
        name: &node_name,
        own_address: &own_address,
        uplink: &uplink_name,
    };
    let result = serve(
        &opts,
        node,
        source,
        &status,
        &mut shutdown,
        &mut dp,
        &mut reconciler,
    )
    .await;
    for task in [forward_rules, program_log].into_iter().flatten() {
        task.abort();
    }
    // Programs, maps and routes stay: the next agent (a restart, an upgrade) takes
    // them over without a gap. `overlay-agent cleanup` removes them.
    info!("exiting; the datapath stays in place (`overlay-agent cleanup` removes it)");
    result
}

/// The interface `selection` picks, as the uplink.
async fn select_uplink(selection: &Selection) -> Result<Uplink> {
    let selected = selection.select(&Interfaces::read(selection.can_reach).await?)?;
    let iface = selected.interface;
    // The pod MTU is the uplink's minus the outer header, and IPv4 needs 68.
    if iface.mtu < IPIP_OVERHEAD + 68 {
        bail!("MTU {} of {} is too small for IPIP", iface.mtu, iface.name);
    }
    info!(
        iface = iface.name,
        address = %selected.address,
        "tunnel interface selected"
    );
    Ok(Uplink {
        name: iface.name,
        ifindex: iface.index,
        mtu: iface.mtu,
        address: selected.address,
    })
}

/// Who this node is, as the run loop needs it.
#[derive(Clone, Copy)]
struct NodeIdentity<'a> {
    name: &'a str,
    /// net-conf.json's `Network`, which must hold this node's pod subnet.
    network: ipnet::Ipv4Net,
    own_address: &'a OwnAddress,
    uplink: &'a str,
}

async fn serve(
    opts: &Options,
    node: NodeIdentity<'_>,
    source: OpenSource,
    status: &Arc<Status>,
    shutdown: &mut Shutdown,
    dp: &mut Datapath,
    rec: &mut Reconciler,
) -> Result<()> {
    let (tx, mut nodes) = watch::channel::<Option<NodeSet>>(None);
    let source = tokio::spawn(source.run(tx, Arc::clone(status)));
    let mut resync = tokio::time::interval(opts.resync);
    let mut ct_sweep = tokio::time::interval(opts.ct_sweep);
    let mut events = match HostEvents::subscribe() {
        Ok(events) => Some(events),
        Err(e) => {
            warn!(
                error = format!("{e:#}"),
                "no rtnetlink notifications; looking at the pods' side of the node every second instead"
            );
            None
        }
    };
    // The pods' side of the node (see `look_at_pods`), looked at after notifications and
    // anyway at this pace; the first tick is at once.
    let mut look = tokio::time::interval(if events.is_some() { LOOK_ANYWAY } else { POLL });
    let mut looks = Looks::default();
    let mut warned = BTreeSet::new();
    let mut bridge_seen = BridgeSeen::default();
    let mut fast = Driver::start(opts.fast_path);
    switch_fast_path(&fast, status, dp, rec)?;
    let mut admission = tokio::time::interval(fast_path::PASS_EVERY);
    let mut flanneld_looked_at = false;
    let result = loop {
        // /healthz judges the loop by this: every branch below returns to it.
        status.heartbeat();
        tokio::select! {
            _ = shutdown.requested() => break Ok(()),
            changed = nodes.changed() => {
                if changed.is_err() {
                    break Err(anyhow!("the node source stopped"));
                }
            }
            _ = resync.tick() => {}
            _ = ct_sweep.tick() => {
                sweep(dp, status);
                continue;
            }
            event = fast.next_event() => {
                if matches!(event, Ok(fast_path::netfilter::Event::Committed)) {
                    status.ruleset_changed();
                }
                if fast.handle(event, &mut dp.flows)
                    && let Err(e) = switch_fast_path(&fast, status, dp, rec)
                {
                    break Err(e);
                }
                continue;
            }
            _ = admission.tick() => {
                if fast.check_legacy()
                    && let Err(e) = switch_fast_path(&fast, status, dp, rec)
                {
                    break Err(e);
                }
                match fast.pass(&mut dp.flows, crate::conntrack::monotonic_ns()) {
                    Ok(pass) => status.admission(pass),
                    Err(e) => warn!(error = format!("{e:#}"), "fast path admission failed; retrying"),
                }
                continue;
            }
            changed = next_change(&mut events) => {
                match changed {
                    Ok(Change::Forwarding) => looks.forwarding(Instant::now()),
                    Ok(Change::Node) => looks.notified(Instant::now()),
                    Err(e) => {
                        warn!(error = format!("{e:#}"), "rtnetlink notifications failed; looking at the pods' side of the node every second instead");
                        events = None;
                        look = tokio::time::interval(POLL);
                        looks.notified(Instant::now());
                    }
                }
                continue;
            }
            _ = until(looks.ports) => {
                looks.ports = None;
                sync_pod_ports(opts, dp);
                continue;
            }
            _ = until(looks.soon) => {
                if !look_at_pods(opts, dp, rec, &mut bridge_seen, &mut looks).await {
                    continue;
                }
            }
            _ = look.tick() => {
                if !look_at_pods(opts, dp, rec, &mut bridge_seen, &mut looks).await {
                    continue;
                }
            }
        }
        let set = nodes.borrow_and_update().clone();
        let mut attach_failed = None;
        // Only once the maps match the node set (and before the routes): taking over
        // the links an earlier run left (or attaching for the first time) then
        // changes nothing for traffic already flowing.
        let attach = |dp: &mut Datapath| {
            if dp.attachment(Hook::UplinkIngress).is_some() {
                return Ok(());
            }
            take_over_uplink(opts, node.uplink, dp).inspect_err(|e| {
                attach_failed = Some(anyhow!("{e:#}"));
            })
        };
        let converged = match set {
            Some(set) => converge(node, &set, status, dp, rec, &mut warned, attach).await,
            None => false,
        };
        if let Some(e) = attach_failed {
            break Err(e);
        }
        if converged {
            // Maps, routes and programs in place: the node's network is up, and what
            // flanneld left carries nothing any more.
            if !flanneld_looked_at {
                flanneld_looked_at = remove_flanneld_leftovers(&rec.host, status).await;
            }
            status.network_is_up();
        }
    };
    source.abort();
    result
}

/// Tells the programs (and the status) whether the fast path is on, and under which
/// ruleset generation. A failure to write the configuration ends the run: the
/// programs would go on trusting rules the host has changed.
fn switch_fast_path(
    fast: &Driver,
    status: &Status,
    dp: &mut Datapath,
    rec: &mut Reconciler,
) -> Result<()> {
    let state = fast.state();
    status.fast_path_switched(state.on(), state.blocked());
    rec.set_fast_path(dp, state.switch())
}

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

/// The bridge's addresses and MAC at the last look: the CNI plugin gives the bridge
/// its gateway address after creating it, and its MAC is the pods' gateway, which
/// `pod_ingress` looks for.
type BridgeSeen = (Vec<std::net::Ipv4Addr>, Option<[u8; 6]>);

/// The next notification that concerns the pods' side of the node; never, without
/// notifications.
async fn next_change(events: &mut Option<HostEvents>) -> Result<Change> {
    match events {
        Some(events) => events.changed().await,
        None => std::future::pending().await,
    }
}

/// Waits until `at`; forever when there is nothing to wait for.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// When to look at the pods' side of the node before the next periodic tick.
#[derive(Debug, Default)]
struct Looks {
    /// The look due: after notifications, or when a new veth settles.
    soon: Option<Instant>,
    /// When the last look began.
    last: Option<Instant>,
    /// A read of the bridge's forwarding table alone, due after notifications of it
    /// only: not held back by the spacing between looks, as it costs one file read,
    /// and a new pod's packets take the bridge until its port is known.
    ports: Option<Instant>,
}

impl Looks {
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
        self.soon = Some(self.soon.map_or(at, |s| s.min(at)));
    }

    /// A look (which reads the forwarding table too) begins at `now`.
    fn begin(&mut self, now: Instant) {
        self.soon = None;
        self.ports = None;
        self.last = Some(now);
    }
}

/// Looks at the pods' side of the node: the pods' ports on the bridge (`POD_PORTS`)
/// and `pod_ingress` on their veths follow at once, and the next look is brought
/// forward to when the next new veth settles. Returns whether the bridge appeared or
/// changed its addresses or MAC, which takes a full pass: it attaches to the bridge
/// and sources host traffic from the gateway.
async fn look_at_pods(
    opts: &Options,
    dp: &mut Datapath,
    rec: &Reconciler,
    bridge_seen: &mut BridgeSeen,
    looks: &mut Looks,
) -> bool {
    let now = Instant::now();
    looks.begin(now);
    sync_pod_ports(opts, dp);
    let net = Path::new("/sys/class/net");
    match dp.sync_pod_hooks(&rec.host, net, &opts.bridge, now).await {
        Ok(c) if !c.is_empty() => info!(changes = %c, "pod veths synced"),
        Ok(_) => {}
        Err(e) => debug!(error = %e, "reading the bridge's ports"),
    }
    if let Some(at) = dp.pod_hooks.next_settled() {
        looks.by(at);
    }
    let Some(bridge) = host::ifindex_by_name(&opts.bridge) else {
        return false;
    };
    let addresses = match rec.host.addresses(Some(bridge)).await {
        Ok(a) => a,
        Err(e) => {
            debug!(error = format!("{e:#}"), "reading the bridge's addresses");
            return false;
        }
    };
    let seen = (addresses, host::mac_by_name(&opts.bridge));
    let appeared = dp.attachment(Hook::BridgeIngress).is_none();
    if !appeared && seen == *bridge_seen {
        return false;
    }
    *bridge_seen = seen;
    true
}

/// The pods' ports on the bridge (`POD_PORTS`) from its forwarding table.
fn sync_pod_ports(opts: &Options, dp: &mut Datapath) {
    match dp.pod_ports.sync(&opts.bridge) {
        Ok(c) if !c.is_empty() => debug!(changes = %c, "pod ports synced"),
        Ok(_) => {}
        Err(e) => debug!(error = %e, "reading the bridge's forwarding table"),
    }
}

fn take_over_uplink(opts: &Options, uplink: &str, dp: &mut Datapath) -> Result<()> {
    dp.attach(Hook::UplinkIngress, uplink)?;
    dp.attach(Hook::UplinkEgress, uplink)?;
    let pin_dir = bpffs::pin_dir(&opts.bpffs);
    for old in bpffs::remove_other_versions(&pin_dir)? {
        info!(pins = %old.display(), "removed the pins of another layout version");
    }
    Ok(())
}

/// Removes what flanneld left on the node (`host::flanneld_leftovers`), logging each
/// item; returns whether that is done (a failure is retried at the next pass).
async fn remove_flanneld_leftovers(host: &Host, status: &Status) -> bool {
    match flanneld_leftovers::remove(host).await {
        Ok((removed, unseen)) => {
            for item in &removed {
                info!(removed = %item, "took the node over from flanneld");
            }
            status.flanneld_leftovers_removed(&removed);
            if !unseen.is_empty() {
                warn!(
                    missing = unseen.join(", "),
                    "flanneld's masquerade rules were not looked for: no such tool on this node"
                );
            }
            true
        }
        Err(e) => {
            warn!(
                error = format!("{e:#}"),
                "removing what flanneld left failed; retrying at the next pass"
            );
            false
        }
    }
}

/// Hands the memory freed since the last pass back to the kernel. A list of thousands
/// of Nodes and a pass over as many routes leave holes in the heap that glibc keeps
/// resident; for 5,000 nodes that was a third of the agent's RSS.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn sweep(dp: &mut Datapath, status: &Status) {
    match dp.conntrack.collect() {
        Ok(c) => {
            status.swept(c);
            if c.expired + c.orphans > 0 {
                debug!(
                    expired = c.expired,
                    orphans = c.orphans,
                    remaining = c.remaining,
                    "connection table swept"
                );
            }
        }
        Err(e) => warn!(
            error = format!("{e:#}"),
            "sweeping the connection table failed"
        ),
    }
}

/// One reconcile pass; failures are logged and retried on the next trigger, keeping
/// the last state in place. Returns whether the datapath now matches the node set.
/// `warned` holds the skipped nodes already warned about, so that each resync does not
/// repeat them.
async fn converge(
    node: NodeIdentity<'_>,
    set: &NodeSet,
    status: &Status,
    dp: &mut Datapath,
    rec: &mut Reconciler,
    warned: &mut BTreeSet<String>,
    attach: impl FnOnce(&mut Datapath) -> Result<()>,
) -> bool {
    let started = std::time::Instant::now();
    let record = |ok: bool, remote_subnets: usize| {
        let took = started.elapsed();
        status.converged(Convergence {
            at: started,
            took,
            ok,
            nodes: set.nodes.len(),
            remote_subnets,
        });
    };
    let desired = match Desired::compute(set, node.name, node.own_address, node.network) {
        Ok(d) => d,
        Err(e) => {
            error!(error = %e, "node set unusable; keeping the current state");
            record(false, 0);
            return false;
        }
    };
    for why in &desired.skipped {
        if !warned.contains(why) {
            warn!(reason = why, "node skipped");
        }
    }
    *warned = desired.skipped.iter().cloned().collect();
    let applied = rec.apply(dp, &desired, attach).await;
    release_freed_memory();
    match applied {
        Ok(o) => {
            record(true, desired.remotes.len());
            if !(o.map_routes.is_empty() && o.map_peers.is_empty() && o.kernel_routes.is_empty()) {
                info!(
                    remote_subnets = desired.remotes.len(),
                    map_changes = %o.map_routes,
                    peer_changes = %o.map_peers,
                    route_changes = %o.kernel_routes,
                    unreachable_peers = o.unreachable_peers,
                    bridge_attached = o.bridge_attached,
                    took_ms = started.elapsed().as_millis() as u64,
                    "converged"
                );
            }
            true
        }
        Err(e) => {
            record(false, desired.remotes.len());
            error!(error = format!("{e:#}"), "reconcile failed; will retry");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_gather_and_looks_keep_their_spacing() {
        let t0 = Instant::now();
        let mut looks = Looks::default();
        // The first notifications: a look once they have gathered.
        looks.notified(t0);
        looks.notified(t0 + Duration::from_millis(50));
        assert_eq!(looks.soon, Some(t0 + AFTER_NOTIFICATION));
        looks.begin(t0 + AFTER_NOTIFICATION);
        assert_eq!(looks.soon, None);
        // More right after that look: not before the spacing is over.
        let t1 = t0 + Duration::from_millis(200);
        looks.notified(t1);
        assert_eq!(looks.soon, Some(t0 + AFTER_NOTIFICATION + LOOK_SPACING));
        // A veth settling earlier brings it forward.
        looks.by(t0 + Duration::from_millis(500));
        assert_eq!(looks.soon, Some(t0 + Duration::from_millis(500)));
        // Long after the last look, only the gathering delay is left.
        looks.begin(t1);
        let t2 = t1 + Duration::from_secs(5);
        looks.notified(t2);
        assert_eq!(looks.soon, Some(t2 + AFTER_NOTIFICATION));
    }

    #[test]
    fn forwarding_entries_are_read_without_waiting_for_the_spacing() {
        let t0 = Instant::now();
        let mut looks = Looks::default();
        looks.begin(t0);
        // A pod's MAC learned right after a look: its port is read once the
        // notifications have gathered, not a second after the look.
        let t1 = t0 + Duration::from_millis(10);
        looks.forwarding(t1);
        looks.forwarding(t1 + Duration::from_millis(50));
        assert_eq!(looks.ports, Some(t1 + AFTER_NOTIFICATION));
        assert_eq!(looks.soon, None, "no full look for a forwarding entry");
        // A full look reads the table as well.
        looks.begin(t1 + Duration::from_millis(20));
        assert_eq!(looks.ports, None);
    }
}
