use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use overlay_agent::{
    bpffs,
    config::NetConf,
    datapath::{Datapath, LoadOptions, MAP_NAMES},
    host::{self, Host},
    inspect,
    masq::{self, PortRange, TimeoutOverride},
    nodes::{NodeSet, file::watch_file},
    reconcile::{Desired, NodeSettings, Reconciler, Uplink},
};
use overlay_common::Hook;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing::{debug, error, info, warn};

/// eBPF IPIP overlay for Kubernetes: a drop-in for flanneld's ipip backend.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent on this node (in the current network namespace).
    Run(RunArgs),
    /// Print the datapath's outcome counters.
    Counters {
        #[command(flatten)]
        pins: PinArgs,
        /// Also print counters that are zero.
        #[arg(long)]
        all: bool,
    },
    /// Print this node's configuration, the remote subnets and per-peer traffic.
    Nodes {
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Print the masquerade connection table and its events.
    Nat {
        #[command(flatten)]
        pins: PinArgs,
    },
}

#[derive(clap::Args)]
struct PinArgs {
    /// bpffs where the agent pins its maps (mounted by the agent when absent).
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
}

#[derive(clap::Args)]
struct RunArgs {
    /// This node's name in the node list (the DaemonSet passes it via the downward API).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// File with the nodes as `kubectl get nodes -o json` prints them; re-read on change.
    #[arg(long)]
    nodes_file: PathBuf,
    /// flannel's network configuration.
    #[arg(long, default_value = "/etc/kube-flannel/net-conf.json")]
    net_conf: PathBuf,
    /// Uplink interface: carries the tunnel.
    #[arg(long, default_value = "eth0")]
    iface: String,
    /// Pod bridge created by the CNI bridge plugin.
    #[arg(long, default_value = "cni0")]
    bridge: String,
    /// Where to write flannel's subnet.env for the flannel CNI plugin.
    #[arg(long, default_value = "/run/flannel/subnet.env")]
    subnet_file: PathBuf,
    #[command(flatten)]
    pins: PinArgs,
    /// Seconds between full re-convergence passes (routes can be changed by others).
    #[arg(long, default_value_t = 30)]
    resync_seconds: u64,
    /// Masquerade traffic leaving the pod network, as flanneld's --ip-masq.
    #[arg(long)]
    ip_masq: bool,
    /// Translated source ports (and ICMP identifiers); must lie outside the kernel's
    /// ephemeral range (net.ipv4.ip_local_port_range).
    #[arg(long, default_value = "61000-65535")]
    nat_ports: PortRange,
    /// Capacity of the connection table (two entries per translated flow).
    #[arg(long, default_value_t = overlay_common::maps::CONNTRACK_ENTRIES)]
    conntrack_size: u32,
    /// Override an idle timeout, NAME=SECONDS (tcp_syn, tcp_established, tcp_fin,
    /// tcp_closed, udp, udp_assured, icmp); repeatable.
    #[arg(long = "ct-timeout")]
    ct_timeouts: Vec<TimeoutOverride>,
    /// Seconds between sweeps of expired connections.
    #[arg(long, default_value_t = 10)]
    ct_gc_seconds: u64,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run(args) => run(args).await,
        Command::Counters { pins, all } => {
            inspect::counters(&bpffs::pin_dir(&pins.bpffs), all).map(|t| print!("{t}"))
        }
        Command::Nodes { pins } => inspect::nodes(&bpffs::pin_dir(&pins.bpffs)).map(|t| print!("{t}")),
        Command::Nat { pins } => inspect::nat(&bpffs::pin_dir(&pins.bpffs)).map(|t| print!("{t}")),
    };
    if let Err(e) = result {
        error!("{e:#}");
        std::process::exit(1);
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let node_name = match args.node_name.clone() {
        Some(n) => n,
        None => hostname()?,
    };
    let net_conf = NetConf::load(&args.net_conf)?;
    let masq = masq::Settings {
        enabled: args.ip_masq,
        ports: args.nat_ports.0.clone(),
        timeouts: masq::timeouts(&args.ct_timeouts)?,
    };
    if masq.enabled {
        masq::check_against_ephemeral(&masq.ports, &masq::ephemeral_range()?)?;
    }
    let host = Host::connect()?;
    let uplink = Uplink::find(&host, &args.iface).await?;
    host::enable_forwarding()?;
    let pin_dir = bpffs::prepare(&args.pins.bpffs)?;
    let mut dp = Datapath::load(&LoadOptions { pin_dir: Some(pin_dir.clone()), conntrack_entries: args.conntrack_size })?;
    info!(node = node_name, uplink = uplink.name, mtu = uplink.mtu, network = %net_conf.network, pins = %pin_dir.display(), "datapath loaded");

    let settings = NodeSettings {
        uplink,
        bridge: args.bridge.clone(),
        network: net_conf.network,
        subnet_file: args.subnet_file.clone(),
        masq,
    };
    let mut reconciler = Reconciler::new(host, settings);
    let result = serve(&args, &node_name, &mut dp, &mut reconciler).await;

    // Leave the node as we found it, whatever ended the run.
    dp.detach_all();
    match reconciler.remove_routes().await {
        Ok(n) => info!(routes = n, "routes removed"),
        Err(e) => warn!("removing routes: {e:#}"),
    }
    for name in MAP_NAMES {
        let _ = std::fs::remove_file(pin_dir.join(name));
    }
    info!("programs detached, pins removed");
    result
}

async fn serve(args: &RunArgs, node_name: &str, dp: &mut Datapath, rec: &mut Reconciler) -> Result<()> {
    dp.attach(Hook::UplinkIngress, &args.iface)?;
    dp.attach(Hook::UplinkEgress, &args.iface)?;
    info!(iface = args.iface, "attached to the uplink");

    let (tx, mut nodes) = watch::channel::<Option<NodeSet>>(None);
    let watcher = tokio::spawn(watch_file(args.nodes_file.clone(), tx));
    let mut resync = tokio::time::interval(Duration::from_secs(args.resync_seconds.max(1)));
    let mut bridge_check = tokio::time::interval(Duration::from_secs(1));
    let mut ct_gc = tokio::time::interval(Duration::from_secs(args.ct_gc_seconds.max(1)));
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let result = loop {
        tokio::select! {
            _ = sigterm.recv() => break Ok(()),
            _ = sigint.recv() => break Ok(()),
            changed = nodes.changed() => {
                if changed.is_err() {
                    break Err(anyhow::anyhow!("the node source stopped"));
                }
            }
            _ = resync.tick() => {}
            _ = bridge_check.tick() => {
                if dp.attachment(Hook::BridgeIngress).is_some() {
                    continue;
                }
            }
            _ = ct_gc.tick() => {
                match dp.conntrack.collect() {
                    Ok(c) if c.expired + c.orphans > 0 => {
                        debug!(expired = c.expired, orphans = c.orphans, remaining = c.remaining, "connection table swept");
                    }
                    Ok(_) => {}
                    Err(e) => warn!("sweeping the connection table: {e:#}"),
                }
                continue;
            }
        }
        let set = nodes.borrow_and_update().clone();
        if let Some(set) = set {
            converge(node_name, &set, dp, rec).await;
        }
    };
    watcher.abort();
    result
}

/// One reconcile pass; failures are logged and retried on the next trigger, keeping
/// the last state in place.
async fn converge(node_name: &str, set: &NodeSet, dp: &mut Datapath, rec: &mut Reconciler) {
    let desired = match Desired::compute(set, node_name) {
        Ok(d) => d,
        Err(e) => {
            error!("{e}; keeping the current state");
            return;
        }
    };
    for why in &desired.skipped {
        warn!("skipping: {why}");
    }
    let started = std::time::Instant::now();
    match rec.apply(dp, &desired).await {
        Ok(o) => {
            if !(o.map_routes.is_empty() && o.map_peers.is_empty() && o.kernel_routes.is_empty()) {
                info!(
                    remote_subnets = desired.remotes.len(),
                    map_changes = ?o.map_routes,
                    peer_changes = ?o.map_peers,
                    route_changes = ?o.kernel_routes,
                    unreachable_peers = o.unreachable_peers,
                    bridge_attached = o.bridge_attached,
                    took_ms = started.elapsed().as_millis() as u64,
                    "converged"
                );
            }
        }
        Err(e) => error!("reconcile failed, will retry: {e:#}"),
    }
}

fn hostname() -> Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").context("reading the hostname")?;
    Ok(name.trim().to_owned())
}
