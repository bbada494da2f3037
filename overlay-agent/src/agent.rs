//! The agent's life: set the node up, load and attach the datapath, converge on the
//! node set as it changes, and leave the node clean on the way out.
//!
//! The run loop is a controller's, as kube-rs's (kube-rs/kube
//! `examples/configmapgen_controller.rs`, commit 02c44ed: `reconcile`, `error_policy`
//! and a `Context`): it waits for a [`Trigger`], hands it to [`reconcile`] with the
//! [`Context`], and a failure returned from there ends the run (the error policy). Two
//! controllers do the work: the node reconcile (`reconcile`) and the pods' side of the
//! node (`pods`).

use std::{collections::BTreeSet, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Result, bail};
use overlay_common::Hook;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::watch,
};
use tracing::{debug, error, info, warn};

use crate::{
    bpf_log::BpfLogLevel,
    bpffs,
    datapath::{Datapath, LoadOptions, conntrack},
    fast_path::{self, Driver},
    host::{
        self, Host, flanneld_leftovers,
        forward_rules::{self, ForwardRules, Frontend},
        uplink::Selection,
    },
    masq,
    nodes::{NodeName, NodeSet, Source, address::OwnAddress},
    pods::{self, Pods},
    reconcile::{Desired, NodeSettings, Reconciler},
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
    let uplink = selection.uplink().await?;
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
        let status = Arc::clone(&status);
        tokio::spawn(forward_rules::keep(rules, period, move |pass| {
            status.forward_rules_pass(pass)
        }))
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
    let reconciler = Reconciler::new(host.clone(), settings);
    let node = NodeIdentity {
        network: net_conf.network,
        name: &node_name,
        own_address: &own_address,
        uplink: &uplink_name,
    };
    let (tx, nodes) = watch::channel::<Option<NodeSet>>(None);
    let source = tokio::spawn(source.run(tx, Arc::clone(&status)));
    let mut context = Context {
        opts: &opts,
        node,
        status: &status,
        nodes,
        dp,
        rec: reconciler,
        pods: Pods::new(&opts.bridge, host.clone()),
        fast: Driver::start(opts.fast_path),
        host,
        warned: BTreeSet::new(),
        flanneld_looked_at: false,
    };
    let result = serve(&mut context, &mut shutdown).await;
    source.abort();
    for task in [forward_rules, program_log].into_iter().flatten() {
        task.abort();
    }
    // Programs, maps and routes stay: the next agent (a restart, an upgrade) takes
    // them over without a gap. `overlay-agent cleanup` removes them.
    info!("exiting; the datapath stays in place (`overlay-agent cleanup` removes it)");
    result
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

/// Why the run loop wakes.
enum Trigger {
    /// The node source delivered another node set.
    NodeSet,
    /// The periodic node pass (`--resync`).
    Resync,
    /// The connection table's sweep is due.
    Sweep,
    /// The host's netfilter told of a change (ruleset or conntrack).
    Netfilter(Result<fast_path::netfilter::Event>),
    /// The fast path's admission pass is due.
    Admission,
    /// The pods' side of the node is due a look.
    Pods(pods::Trigger),
}

/// What the controllers of the run loop work on.
struct Context<'a> {
    opts: &'a Options,
    node: NodeIdentity<'a>,
    status: &'a Arc<Status>,
    /// The node source's latest node set.
    nodes: watch::Receiver<Option<NodeSet>>,
    dp: Datapath,
    rec: Reconciler,
    pods: Pods,
    fast: Driver,
    host: Host,
    /// The skipped nodes already warned about, so that each resync does not repeat them.
    warned: BTreeSet<String>,
    /// Whether what flanneld left was removed.
    flanneld_looked_at: bool,
}

/// Waits for triggers and hands each to [`reconcile`] until a shutdown is requested,
/// the node source stops, or a failure ends the run.
async fn serve(ctx: &mut Context<'_>, shutdown: &mut Shutdown) -> Result<()> {
    let opts = ctx.opts;
    let mut resync = tokio::time::interval(opts.resync);
    let mut ct_sweep = tokio::time::interval(opts.ct_sweep);
    let mut admission = tokio::time::interval(fast_path::PASS_EVERY);
    switch_fast_path(ctx)?;
    loop {
        // /healthz judges the loop by this: every trigger returns to it.
        ctx.status.heartbeat();
        let trigger = tokio::select! {
            _ = shutdown.requested() => return Ok(()),
            changed = ctx.nodes.changed() => match changed {
                Ok(()) => Trigger::NodeSet,
                Err(_) => bail!("the node source stopped"),
            },
            _ = resync.tick() => Trigger::Resync,
            _ = ct_sweep.tick() => Trigger::Sweep,
            event = ctx.fast.next_event() => Trigger::Netfilter(event),
            _ = admission.tick() => Trigger::Admission,
            why = ctx.pods.next() => Trigger::Pods(why),
        };
        reconcile(trigger, ctx).await?;
    }
}

/// Does what `trigger` asks. Failures a later trigger can mend are logged (and
/// counted) where they happen; an error returned here ends the run.
async fn reconcile(trigger: Trigger, ctx: &mut Context<'_>) -> Result<()> {
    match trigger {
        Trigger::NodeSet | Trigger::Resync => node_pass(ctx).await,
        Trigger::Sweep => {
            sweep(&mut ctx.dp, ctx.status);
            Ok(())
        }
        Trigger::Netfilter(event) => {
            if matches!(event, Ok(fast_path::netfilter::Event::Committed)) {
                ctx.status.ruleset_changed();
            }
            if ctx.fast.handle(event, &mut ctx.dp.flows) {
                switch_fast_path(ctx)?;
            }
            Ok(())
        }
        Trigger::Admission => {
            if ctx.fast.check_legacy() {
                switch_fast_path(ctx)?;
            }
            match ctx.fast.pass(&mut ctx.dp.flows, conntrack::monotonic_ns()) {
                Ok(pass) => ctx.status.admission(pass),
                Err(e) => warn!(
                    error = format!("{e:#}"),
                    "fast path admission failed; retrying"
                ),
            }
            Ok(())
        }
        Trigger::Pods(why) => match ctx.pods.reconcile(why, &mut ctx.dp).await {
            pods::Outcome::BridgeChanged => node_pass(ctx).await,
            pods::Outcome::Unchanged => Ok(()),
        },
    }
}

/// One pass of the node reconcile on the latest node set (none before the source's
/// first); once the datapath matches it, the node's network is up, and what flanneld
/// left is removed. Only a failure to take the uplink over ends the run.
async fn node_pass(ctx: &mut Context<'_>) -> Result<()> {
    let set = ctx.nodes.borrow_and_update().clone();
    let Some(set) = set else {
        return Ok(());
    };
    let (opts, node) = (ctx.opts, ctx.node);
    // Only once the maps match the node set (and before the routes): taking over
    // the links an earlier run left (or attaching for the first time) then
    // changes nothing for traffic already flowing.
    let attach = |dp: &mut Datapath| {
        if dp.attachment(Hook::UplinkIngress).is_some() {
            return Ok(());
        }
        take_over_uplink(opts, node.uplink, dp)
    };
    let converged = converge(
        node,
        &set,
        ctx.status,
        &mut ctx.dp,
        &mut ctx.rec,
        &mut ctx.warned,
        attach,
    )
    .await?;
    if converged {
        // Maps, routes and programs in place: the node's network is up, and what
        // flanneld left carries nothing any more.
        if !ctx.flanneld_looked_at {
            ctx.flanneld_looked_at = remove_flanneld_leftovers(&ctx.host, ctx.status).await;
        }
        ctx.status.network_is_up();
    }
    Ok(())
}

/// Tells the programs (and the status) whether the fast path is on, and under which
/// ruleset generation. A failure to write the configuration ends the run: the
/// programs would go on trusting rules the host has changed.
fn switch_fast_path(ctx: &mut Context<'_>) -> Result<()> {
    let state = ctx.fast.state();
    ctx.status.fast_path_switched(state.on(), state.blocked());
    ctx.rec.set_fast_path(&mut ctx.dp, state.switch())
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

/// Hands the memory freed since the last pass back to the kernel: a list of thousands
/// of Nodes and a pass over as many routes leave holes in the heap that glibc keeps
/// resident otherwise.
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
/// the last state in place, except a failure of `attach`, which is returned (and not
/// logged: whoever ends the run with it reports it). Returns whether the datapath now
/// matches the node set. `warned` holds the skipped nodes already warned about, so
/// that each resync does not repeat them.
async fn converge(
    node: NodeIdentity<'_>,
    set: &NodeSet,
    status: &Status,
    dp: &mut Datapath,
    rec: &mut Reconciler,
    warned: &mut BTreeSet<String>,
    attach: impl FnOnce(&mut Datapath) -> Result<()>,
) -> Result<bool> {
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
            return Ok(false);
        }
    };
    for why in &desired.skipped {
        if !warned.contains(why) {
            warn!(reason = why, "node skipped");
        }
    }
    *warned = desired.skipped.iter().cloned().collect();
    let mut attach_failed = false;
    let attach = |dp: &mut Datapath| attach(dp).inspect_err(|_| attach_failed = true);
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
            Ok(true)
        }
        Err(e) => {
            record(false, desired.remotes.len());
            if attach_failed {
                return Err(e);
            }
            error!(error = format!("{e:#}"), "reconcile failed; will retry");
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        net::Ipv4Addr,
        sync::{Arc, Mutex},
    };

    use anyhow::anyhow;

    use super::*;
    use crate::{
        host::uplink::Uplink,
        nodes::{NodeInfo, address::Authority},
        reconcile,
    };

    /// Where the test's log lines go.
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A pass whose uplink cannot be taken over ends the run with that failure, which
    /// is then reported once (by whoever ends the run): the pass itself does not log it
    /// as a failure to retry. It still counts as a failed pass. In a network namespace
    /// of the test's own (needs root), with the datapath loaded and attached nowhere.
    #[test]
    fn a_failed_uplink_takeover_is_returned_not_logged() {
        const WHY: &str = "the uplink refused the programs";
        std::thread::spawn(|| {
            // SAFETY: unshare(2) takes no pointer; CLONE_NEWNET moves only this
            // thread, which ends with the test.
            let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(unshared, 0, "needs root");
            let logs = Logs::default();
            let writer = {
                let logs = logs.clone();
                move || logs.clone()
            };
            let subscriber = tracing_subscriber::fmt()
                .with_writer(writer)
                .with_ansi(false)
                .finish();
            let _logging = tracing::subscriber::set_default(subscriber);
            let status = Status::default();
            let network = "10.244.0.0/16".parse().unwrap();
            let own_address = OwnAddress {
                authority: Authority::NodeList,
                public_ip: None,
                interface: Ipv4Addr::new(172, 18, 0, 3),
            };
            let node = NodeIdentity {
                name: "w1",
                network,
                own_address: &own_address,
                uplink: "eth0",
            };
            let set = NodeSet {
                nodes: vec![NodeInfo {
                    name: "w1".into(),
                    pod_cidr: "10.244.1.0/24".parse().unwrap(),
                    tunnel_ip: own_address.interface,
                    overwrite: None,
                    foreign_backend: None,
                }],
                errors: vec![],
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let passed = rt.block_on(async {
                let mut dp = Datapath::load(&LoadOptions::default()).unwrap();
                let uplink = Uplink {
                    name: "eth0".into(),
                    ifindex: 2,
                    mtu: 1500,
                    address: own_address.interface,
                };
                let settings = reconcile::tests::settings(uplink, network);
                let mut rec = Reconciler::new(Host::connect().unwrap(), settings);
                let refuse = |_: &mut Datapath| Err(anyhow!(WHY));
                let mut warned = BTreeSet::new();
                converge(node, &set, &status, &mut dp, &mut rec, &mut warned, refuse).await
            });
            let e = passed.expect_err("the failure ends the run");
            assert!(format!("{e:#}").contains(WHY), "{e:#}");
            let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
            assert!(
                !logged.contains(WHY),
                "reported before the run ends with it:\n{logged}"
            );
            assert_eq!(
                status.reconciles().failures,
                1,
                "not counted as a failed pass"
            );
        })
        .join()
        .unwrap();
    }
}
