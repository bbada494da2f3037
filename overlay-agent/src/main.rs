use std::{io::IsTerminal as _, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use overlay_agent::{
    agent,
    bpf_log::BpfLogLevel,
    bpffs, cleanup, http,
    inspect::{self, Format, View},
    masq::{self, PortRange, TimeoutOverride},
    metrics::Interfaces,
    nodes::Source,
    status::Status,
};
use tracing::error;

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
    Run(Box<RunArgs>),
    /// Print the datapath's outcome counters.
    Counters {
        #[command(flatten)]
        inspect: InspectArgs,
        /// Also print counters that are zero.
        #[arg(long)]
        all: bool,
    },
    /// Print this node's configuration, the remote subnets and per-peer traffic.
    Nodes {
        #[command(flatten)]
        inspect: InspectArgs,
    },
    /// Print the masquerade connection table and its events.
    Nat {
        #[command(flatten)]
        inspect: InspectArgs,
    },
    /// Remove everything the agent installed: programs, pinned maps, routes and
    /// subnet.env. The agent leaves them in place when it exits, so that a restart or
    /// an upgrade does not interrupt traffic; stop it first.
    Cleanup {
        #[command(flatten)]
        pins: PinArgs,
        /// The subnet.env the agent wrote.
        #[arg(long, default_value = "/run/flannel/subnet.env")]
        subnet_file: PathBuf,
    },
}

/// What the inspection commands share: they only open the pinned maps, so they run
/// beside the agent.
#[derive(clap::Args)]
struct InspectArgs {
    #[command(flatten)]
    pins: PinArgs,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    json: bool,
}

impl InspectArgs {
    fn pin_dir(&self) -> PathBuf {
        bpffs::pin_dir(&self.pins.bpffs)
    }

    fn print(&self, view: Result<impl View>) -> Result<()> {
        let format = if self.json {
            Format::Json
        } else {
            Format::Table
        };
        print!("{}", view?.render(format)?);
        Ok(())
    }
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
    /// Where to serve /healthz, /readyz and /metrics, or `off`.
    #[arg(long, default_value = "0.0.0.0:9101")]
    http_addr: http::Listen,
    /// What the eBPF programs log (drops are logged at debug). Fixed at load; off costs
    /// the datapath nothing. Their records are log events with target `bpf`.
    #[arg(long, value_enum, default_value_t = BpfLogLevel::Off)]
    bpf_log_level: BpfLogLevel,
}

fn init_logging(format: LogFormat) {
    // The programs' records (target `bpf`) were filtered by --bpf-log-level in the
    // kernel already: let them all through unless RUST_LOG says otherwise.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,bpf=trace"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
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
        Command::Run(args) => run(*args).await,
        Command::Counters { inspect, all } => {
            inspect.print(inspect::counters(&inspect.pin_dir(), all))
        }
        Command::Nodes { inspect } => inspect.print(inspect::nodes(&inspect.pin_dir())),
        Command::Nat { inspect } => inspect.print(inspect::nat(&inspect.pin_dir())),
        Command::Cleanup { pins, subnet_file } => cleanup::run(&pins.bpffs, &subnet_file)
            .await
            .map(|t| print!("{t}")),
    };
    if let Err(e) = result {
        error!(error = format!("{e:#}"), "failed");
        std::process::exit(1);
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let node_name = match args.node_name {
        Some(n) => n,
        None => hostname()?,
    };
    let masq = masq::Settings {
        enabled: args.ip_masq,
        ports: args.nat_ports.0,
        timeouts: masq::timeouts(&args.ct_timeouts)?,
    };
    let status = Arc::new(Status::default());
    // Started before the agent so that probes answer while the datapath loads.
    let server = match args.http_addr.0 {
        Some(addr) => {
            let interfaces = Interfaces {
                uplink: args.iface.clone(),
                bridge: args.bridge.clone(),
            };
            let pin_dir = bpffs::pin_dir(&args.pins.bpffs);
            Some(http::start(addr, Arc::clone(&status), pin_dir, interfaces).await?)
        }
        None => None,
    };
    let result = agent::run(
        agent::Options {
            node_name,
            source: Source::File(args.nodes_file),
            net_conf: args.net_conf,
            iface: args.iface,
            bridge: args.bridge,
            subnet_file: args.subnet_file,
            bpffs: args.pins.bpffs,
            resync: Duration::from_secs(args.resync_seconds.max(1)),
            masq,
            conntrack_entries: args.conntrack_size,
            ct_sweep: Duration::from_secs(args.ct_gc_seconds.max(1)),
            bpf_log_level: args.bpf_log_level,
        },
        status,
    )
    .await;
    if let Some(server) = server {
        server.abort();
    }
    result
}

fn hostname() -> Result<String> {
    let name =
        std::fs::read_to_string("/proc/sys/kernel/hostname").context("reading the hostname")?;
    Ok(name.trim().to_owned())
}
