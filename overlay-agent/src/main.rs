use std::{
    io::{IsTerminal as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::{ArgGroup, CommandFactory as _, Parser, Subcommand, ValueEnum};
use overlay_agent::{
    agent,
    bpf_log::BpfLogLevel,
    bpffs, cleanup, fast_path, flanneld_args,
    host::uplink::{IfaceSpec, Selection},
    http,
    inspect::{self, Format, View},
    masq::{self, PortRange, TimeoutOverride},
    metrics,
    nodes::{NodeName, Source, annotations::Names, etcd::EtcdOptions},
    status::Status,
};
use regex::Regex;
use tokio::task::JoinHandle;
use tracing::{error, warn};

/// eBPF IPIP overlay for Kubernetes: a drop-in for flanneld's ipip backend.
///
/// Without a subcommand it runs the agent (`run`), taking flanneld's command line:
/// Go-style flags (`-ip-masq`, `--ip-masq=false`) and every flag of `run` from a
/// `FLANNELD_<FLAG>` environment variable when the command line does not set it.
#[derive(Parser)]
#[command(version, propagate_version = true, args_override_self = true)]
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
    /// Run the agent on this node (in the current network namespace); the default.
    ///
    /// Every flag can also come from the environment variable FLANNELD_<FLAG> (upper
    /// case, `-` as `_`) when the command line leaves it unset, as with flanneld;
    /// booleans there and in `--flag=BOOL` take Go's values (1, t, true, 0, f, false...).
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
    /// Print the fast path's flow table: which flows skip the host stack, and why the
    /// others do not.
    Flows {
        #[command(flatten)]
        inspect: InspectArgs,
    },
    /// Remove everything the agent installed: programs (first), pinned maps and
    /// routes. The agent leaves them in place when it exits, so that a restart or an
    /// upgrade does not interrupt traffic; stop it first. subnet.env stays: flanneld
    /// writes the same file, and the CNI plugin needs it.
    Cleanup {
        #[command(flatten)]
        pins: PinArgs,
        /// Also remove flanneld's forward rules (chain FLANNEL-FWD, table ip
        /// flannel-ipv4). Kept by default: they are flanneld's own, which a flanneld
        /// running after a rollback relies on (it writes the nftables form only at
        /// start), and flanneld never removes them either.
        #[arg(long)]
        forward_rules: bool,
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
        let text = view?.render(format)?;
        match std::io::stdout().lock().write_all(text.as_bytes()) {
            // The reader left early (`| head`): nothing more to do.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            written => written.context("writing to stdout"),
        }
    }
}

#[derive(clap::Args)]
struct PinArgs {
    /// bpffs where the agent pins its maps (mounted by the agent when absent).
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
}

/// flanneld's `--etcd-endpoints` default (its `main.go`).
const DEFAULT_ETCD_ENDPOINTS: &str = "http://127.0.0.1:4001,http://127.0.0.1:2379";

/// The node sources other than etcd, which the etcd flags make no sense with.
const OTHER_SOURCES: [&str; 2] = ["kube_subnet_mgr", "nodes_file"];

#[derive(clap::Args)]
#[command(group(ArgGroup::new("source").args(["kube_subnet_mgr", "nodes_file", "etcd_endpoints"])))]
struct RunArgs {
    /// This node's name in the node list. Default, as flanneld: NODE_NAME, else (with
    /// --kube-subnet-mgr) the spec.nodeName of the pod POD_NAMESPACE/POD_NAME, else
    /// the hostname.
    #[arg(long)]
    node_name: Option<String>,
    /// Learn the nodes from the Kubernetes API and publish this node's flannel
    /// annotations, as flanneld's --kube-subnet-mgr.
    #[arg(long)]
    kube_subnet_mgr: bool,
    /// kubeconfig for the Kubernetes API (default: KUBECONFIG, ~/.kube/config, else the
    /// pod's service account).
    #[arg(long, alias = "kubeconfig-file")]
    kubeconfig: Option<PathBuf>,
    /// The Kubernetes API server's URL, in place of the kubeconfig's or the
    /// in-cluster one (the pod's service account credentials are still used).
    #[arg(long)]
    kube_api_url: Option<String>,
    /// Once the datapath is up and this node's routes are in place, set the Node's
    /// NetworkUnavailable condition to False (reason FlannelIsUp), as flanneld
    /// (--kube-subnet-mgr only); `=false` leaves the condition alone.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true",
          value_parser = flanneld_args::go_bool)]
    set_node_network_unavailable: bool,
    /// Prefix of flannel's Node annotations (read from the API or --nodes-file):
    /// `FQDN[/NAME]`; without a `/` one is appended, a NAME gets a `-` (flanneld's
    /// derivation).
    #[arg(long, default_value = overlay_agent::nodes::annotations::DEFAULT_PREFIX)]
    kube_annotation_prefix: Names,
    /// File with the nodes as `kubectl get nodes -o json` prints them; re-read on change.
    #[arg(long)]
    nodes_file: Option<PathBuf>,
    /// Lease this node's subnet from flannel's etcd subnet manager and learn the others
    /// there: the etcd endpoints, comma-separated. As flanneld, this is the node source
    /// when neither --kube-subnet-mgr nor --nodes-file is given, at flanneld's default
    /// endpoints.
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_ETCD_ENDPOINTS)]
    etcd_endpoints: Vec<String>,
    /// etcd prefix of flannel's keys (`<prefix>/config`, `<prefix>/subnets/`).
    #[arg(long, default_value = overlay_agent::nodes::etcd::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// TLS key of the etcd client certificate.
    #[arg(long, conflicts_with_all = OTHER_SOURCES)]
    etcd_keyfile: Option<PathBuf>,
    /// TLS client certificate for etcd.
    #[arg(long, conflicts_with_all = OTHER_SOURCES)]
    etcd_certfile: Option<PathBuf>,
    /// CA that signed etcd's server certificate.
    #[arg(long, conflicts_with_all = OTHER_SOURCES)]
    etcd_cafile: Option<PathBuf>,
    /// etcd user.
    #[arg(long, conflicts_with_all = OTHER_SOURCES)]
    etcd_username: Option<String>,
    /// etcd password (better from the environment than on the command line).
    #[arg(long, requires = "etcd_username")]
    etcd_password: Option<String>,
    /// Minutes before its end that the subnet lease (24 h) is renewed.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=1439))]
    subnet_lease_renew_margin: u64,
    /// flannel's network configuration (with etcd, `<etcd-prefix>/config` instead).
    #[arg(
        long,
        alias = "net-config-path",
        default_value = "/etc/kube-flannel/net-conf.json"
    )]
    net_conf: PathBuf,
    /// Interface to carry the tunnel, by name or by one of its IPv4 addresses;
    /// repeatable, the first that exists wins (default: the default route's).
    #[arg(long)]
    iface: Vec<IfaceSpec>,
    /// Regular expression matched against interface addresses, then names, after
    /// every --iface; repeatable, the first match wins.
    #[arg(long)]
    iface_regex: Vec<Regex>,
    /// When no --iface or --iface-regex matches (or none is given): the interface
    /// the route to this IPv4 address leaves through, with the route's source address.
    #[arg(long)]
    iface_can_reach: Option<Ipv4Addr>,
    /// The address other nodes reach this node at (default: the interface's). The
    /// Node annotation flannel.alpha.coreos.com/public-ip-overwrite overrides it.
    #[arg(long)]
    public_ip: Option<Ipv4Addr>,
    /// flanneld's IPv6 public address: refused, the ipip backend carries IPv4 only.
    #[arg(long)]
    public_ipv6: Option<String>,
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
    /// Add a blackhole route for this node's pod subnet, as flanneld: addresses of the
    /// subnet no pod holds are dropped instead of following the default route. Ours
    /// has the highest metric, so the pod bridge's own route keeps precedence.
    #[arg(long)]
    ip_blackhole_route: bool,
    /// Accept the pod network's traffic in the FORWARD hook with flanneld's rules (chain
    /// FLANNEL-FWD through iptables, or table flannel-ipv4 through nft with
    /// net-conf.json's EnableNFTables), for hosts whose FORWARD policy is DROP;
    /// `=false` leaves FORWARD alone.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true",
          value_parser = flanneld_args::go_bool)]
    iptables_forward_rules: bool,
    /// Seconds between checks of the forward rules (missing ones are written again).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    iptables_resync: u64,
    /// flanneld's switch from `MASQUERADE --random-fully` to plain `MASQUERADE`.
    /// Accepted for flanneld's command lines; it changes nothing (logged at start):
    /// the BPF masquerade never keeps a pod's source port, it always picks a free port
    /// of --nat-ports from a random start (see deploy/README.md).
    #[arg(long)]
    ip_masq_fully_random_disable: bool,
    /// Translated source ports (and ICMP identifiers); must lie outside the kernel's
    /// ephemeral range (net.ipv4.ip_local_port_range).
    #[arg(long, default_value = "61000-65535")]
    nat_ports: PortRange,
    /// Capacity of the connection table (two entries per translated flow).
    #[arg(long, default_value_t = overlay_common::maps::CONNTRACK_ENTRIES)]
    conntrack_size: u32,
    /// Override an idle timeout, NAME=SECONDS (tcp_syn, tcp_established, tcp_fin,
    /// tcp_closed, tcp_time_wait, udp, udp_assured, icmp); repeatable.
    #[arg(long = "ct-timeout")]
    ct_timeouts: Vec<TimeoutOverride>,
    /// Seconds between sweeps of expired connections.
    #[arg(long, default_value_t = 10)]
    ct_gc_seconds: u64,
    /// Where to serve /healthz, /readyz and /metrics, or `off`.
    #[arg(long, default_value = "0.0.0.0:9101")]
    http_addr: http::Listen,
    /// flanneld's health server: /healthz and /readyz (and /metrics) also served on
    /// --healthz-ip:--healthz-port when the port is not 0.
    #[arg(long, default_value = "0.0.0.0")]
    healthz_ip: IpAddr,
    /// Port of flanneld's health server; 0 leaves it off.
    #[arg(long, default_value_t = 0)]
    healthz_port: u16,
    /// klog verbosity, as flanneld's -v: the log level when RUST_LOG is unset (0-1
    /// info, 2-4 debug, 5 and more trace).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    v: i32,
    /// What the eBPF programs log (drops are logged at debug). Fixed at load; off costs
    /// the datapath nothing. Their records are log events with target `bpf`.
    #[arg(long, value_enum, default_value_t = BpfLogLevel::Off)]
    bpf_log_level: BpfLogLevel,
    /// Which flows may skip the host stack. `established`: established flows the host
    /// forwarded unchanged under its current netfilter ruleset (everything else, and
    /// every flow while the legacy iptables backend holds tables, goes through it).
    /// `off`: every packet goes through the host stack, as with flanneld's kernel
    /// tunnel; for hosts whose netfilter rules decide on more than a flow's first
    /// packets and its conntrack state (per-packet rate or size limits, ipset
    /// blocklists without a conntrack accept before them).
    #[arg(long, value_enum, default_value_t = fast_path::Mode::Established)]
    fast_path: fast_path::Mode,
    /// The per-peer series of /metrics (overlay_peer_received_*{peer}): two per peer on
    /// every node, 2N(N-1) across N nodes. `auto` exports them up to 100 peers.
    #[arg(long, value_enum, default_value_t = metrics::PerPeer::Auto)]
    metrics_per_peer: metrics::PerPeer,
}

/// The HTTP endpoints at --http-addr, and at flanneld's --healthz-ip:--healthz-port
/// when that port is not 0 (flanneld serves /healthz and /readyz there).
async fn start_servers(args: &RunArgs, status: &Arc<Status>) -> Result<Vec<JoinHandle<()>>> {
    let pin_dir = bpffs::pin_dir(&args.pins.bpffs);
    let healthz = (args.healthz_port != 0)
        .then(|| SocketAddr::new(args.healthz_ip, args.healthz_port))
        .map(|a| (a, "--healthz-port"));
    let http = args.http_addr.0.map(|a| (a, "--http-addr"));
    let mut servers = Vec::new();
    for (addr, flag) in http.into_iter().chain(healthz) {
        let (status, bridge) = (Arc::clone(status), args.bridge.clone());
        let (pins, per_peer) = (pin_dir.clone(), args.metrics_per_peer);
        servers.push(http::start(addr, flag, status, pins, bridge, per_peer).await?);
    }
    Ok(servers)
}

/// The log level of klog's verbosity `-v`, after Kubernetes' logging conventions
/// (sig-instrumentation `logging.md`): up to 1 what an operator wants to see, 2 to 4
/// steady-state and change details up to debug level, 5 and up trace level.
fn klog_level(v: i32) -> &'static str {
    match v {
        ..=1 => "info",
        2..=4 => "debug",
        _ => "trace",
    }
}

fn init_logging(format: LogFormat, verbosity: i32) {
    // The programs' records (target `bpf`) were filtered by --bpf-log-level in the
    // kernel already: let them all through unless RUST_LOG says otherwise.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{},bpf=trace", klog_level(verbosity)))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() {
    single_malloc_arena();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(async_main()),
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            std::process::exit(1);
        }
    }
}

/// One malloc arena for the whole process instead of one per thread. The agent does
/// little allocation, but the node source's lists leave each arena a few megabytes of
/// partly used pages; with the runtime's threads each in their own arena that
/// doubled the resident heap for a 5,000-node cluster.
/// Called before any thread exists, so that none gets an arena of its own.
fn single_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: sets a glibc tunable; no other thread runs yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// The command line as clap reads it: flanneld's translated ([`flanneld_args`]).
fn parse() -> (Cli, Vec<String>) {
    let env_names = std::env::vars_os().filter_map(|(k, _)| k.into_string().ok());
    let translated = match flanneld_args::translate(
        &Cli::command(),
        std::env::args_os(),
        |k| std::env::var(k).ok(),
        env_names,
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    match Cli::try_parse_from(&translated.args) {
        Ok(cli) => (cli, translated.ignored_env),
        Err(e) => {
            let _ = e.print();
            if e.use_stderr() {
                for (var, flag) in &translated.from_env {
                    eprintln!("note: {flag} was taken from the environment variable {var}");
                }
            }
            std::process::exit(e.exit_code());
        }
    }
}

async fn async_main() {
    let (cli, ignored_env) = parse();
    let verbosity = match &cli.command {
        Command::Run(args) => args.v,
        _ => 0,
    };
    init_logging(cli.log_format, verbosity);
    for var in ignored_env {
        warn!(
            variable = var,
            "flanneld would read this variable; the agent has no such flag and ignores it"
        );
    }
    let result = match cli.command {
        Command::Run(args) => run(*args).await,
        Command::Counters { inspect, all } => {
            inspect.print(inspect::counters(&inspect.pin_dir(), all))
        }
        Command::Nodes { inspect } => inspect.print(inspect::nodes(&inspect.pin_dir())),
        Command::Nat { inspect } => inspect.print(inspect::nat(&inspect.pin_dir())),
        Command::Flows { inspect } => inspect.print(inspect::flows(&inspect.pin_dir())),
        Command::Cleanup {
            pins,
            forward_rules,
        } => cleanup::run(&pins.bpffs, forward_rules)
            .await
            .map(|t| print!("{t}")),
    };
    if let Err(e) = result {
        error!(error = format!("{e:#}"), "failed");
        std::process::exit(1);
    }
}

async fn run(args: RunArgs) -> Result<()> {
    check_kube_flags(&args)?;
    if let Some(v6) = args.public_ipv6.as_deref().filter(|v| !v.is_empty()) {
        anyhow::bail!(
            "--public-ipv6 {v6}: flannel's ipip backend carries IPv4 only (flanneld runs it without IPv6); remove the flag"
        );
    }
    let node_name = NodeName::find(args.node_name.clone(), args.kube_subnet_mgr, |k| {
        std::env::var(k).ok()
    })?;
    if args.ip_masq_fully_random_disable {
        warn!("{}", masq::FULLY_RANDOM_DISABLE_IGNORED);
    }
    let status = Arc::new(Status::default());
    // Started before the agent so that probes answer while the datapath loads.
    let servers = start_servers(&args, &status).await?;
    let masq = masq::Settings {
        enabled: args.ip_masq,
        ports: args.nat_ports.0,
        timeouts: masq::timeouts(&args.ct_timeouts)?,
    };
    // The group makes clap refuse two; without any, etcd at its default endpoints.
    let source = if let Some(path) = args.nodes_file {
        Source::File {
            path,
            annotations: args.kube_annotation_prefix,
        }
    } else if !args.kube_subnet_mgr {
        Source::Etcd(Box::new(EtcdOptions {
            endpoints: args.etcd_endpoints,
            prefix: args.etcd_prefix,
            keyfile: args.etcd_keyfile,
            certfile: args.etcd_certfile,
            cafile: args.etcd_cafile,
            username: args.etcd_username,
            password: args.etcd_password,
            renew_margin: Duration::from_secs(args.subnet_lease_renew_margin * 60),
            subnet_file: args.subnet_file.clone(),
        }))
    } else {
        Source::Kube {
            kubeconfig: args.kubeconfig,
            api_url: args.kube_api_url,
            annotations: args.kube_annotation_prefix,
            network_condition: args.set_node_network_unavailable,
        }
    };
    let result = agent::run(
        agent::Options {
            node_name,
            source,
            net_conf: args.net_conf,
            interface: Selection {
                ifaces: args.iface,
                regexes: args.iface_regex,
                can_reach: args.iface_can_reach,
                public_ip: args.public_ip,
            },
            bridge: args.bridge,
            subnet_file: args.subnet_file,
            bpffs: args.pins.bpffs,
            resync: Duration::from_secs(args.resync_seconds.max(1)),
            masq,
            conntrack_entries: args.conntrack_size,
            ct_sweep: Duration::from_secs(args.ct_gc_seconds.max(1)),
            bpf_log_level: args.bpf_log_level,
            fast_path: args.fast_path,
            blackhole_route: args.ip_blackhole_route,
            forward_rules: args
                .iptables_forward_rules
                .then(|| Duration::from_secs(args.iptables_resync)),
        },
        status,
    )
    .await;
    for server in servers {
        server.abort();
    }
    result
}

/// The Kubernetes API's settings without `--kube-subnet-mgr` would be silently unused
/// (flanneld ignores them): refused. Checked here, since the etcd endpoints' default
/// keeps clap from telling an etcd source from none.
fn check_kube_flags(args: &RunArgs) -> Result<()> {
    for (set, flag) in [
        (args.kubeconfig.is_some(), "--kubeconfig"),
        (args.kube_api_url.is_some(), "--kube-api-url"),
    ] {
        if set && !args.kube_subnet_mgr {
            anyhow::bail!(
                "{flag} needs --kube-subnet-mgr: it configures the Kubernetes API source"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let argv = ["overlay-agent", "run", "--node-name", "w1"]
            .iter()
            .chain(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Run(run) => Ok(*run),
            _ => unreachable!(),
        }
    }

    fn error(args: &[&str]) -> String {
        match parse(args) {
            Ok(a) => match check_kube_flags(&a) {
                Ok(()) => panic!("{args:?} should be refused"),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        }
    }

    /// What a flanneld command line and environment make of the daemon's flags.
    fn flanneld(argv: &[&str], env: &[(&str, &str)]) -> Result<RunArgs, String> {
        let argv = std::iter::once("/opt/bin/flanneld")
            .chain(argv.iter().copied())
            .map(std::ffi::OsString::from);
        let var = |k: &str| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        let names = env.iter().map(|(k, _)| k.to_string());
        let t = flanneld_args::translate(&Cli::command(), argv, var, names)
            .map_err(|e| format!("{e:#}"))?;
        match Cli::try_parse_from(t.args)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Run(run) => Ok(*run),
            _ => unreachable!(),
        }
    }

    #[test]
    fn flanneld_node_and_masquerade_switches() {
        let a = flanneld(&["--kube-subnet-mgr"], &[]).unwrap();
        assert!(a.set_node_network_unavailable, "on by default, as flanneld");
        assert!(!a.ip_blackhole_route && !a.ip_masq_fully_random_disable);
        let a = flanneld(
            &[
                "-kube-subnet-mgr",
                "-set-node-network-unavailable=false",
                "-ip-blackhole-route",
            ],
            &[("FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE", "true")],
        )
        .unwrap();
        assert!(!a.set_node_network_unavailable);
        assert!(a.ip_blackhole_route && a.ip_masq_fully_random_disable);
        let a = flanneld(
            &["--kube-subnet-mgr"],
            &[("FLANNELD_SET_NODE_NETWORK_UNAVAILABLE", "0")],
        )
        .unwrap();
        assert!(!a.set_node_network_unavailable);
        let Err(e) = flanneld(
            &["--kube-subnet-mgr", "--set-node-network-unavailable=maybe"],
            &[],
        ) else {
            panic!("accepted")
        };
        assert!(e.contains("\"maybe\""), "{e}");
    }

    #[test]
    fn flanneld_forward_rules_switches() {
        let a = flanneld(&["--kube-subnet-mgr"], &[]).unwrap();
        assert!(a.iptables_forward_rules, "on by default, as flanneld");
        assert_eq!(a.iptables_resync, 5);
        let a = flanneld(
            &["-kube-subnet-mgr", "-iptables-forward-rules=false"],
            &[("FLANNELD_IPTABLES_RESYNC", "2")],
        )
        .unwrap();
        assert!(!a.iptables_forward_rules);
        assert_eq!(a.iptables_resync, 2);
        let a = flanneld(&["-kube-subnet-mgr", "-iptables-resync", "7"], &[]).unwrap();
        assert_eq!(a.iptables_resync, 7);
        assert!(flanneld(&["--kube-subnet-mgr", "--iptables-resync=0"], &[]).is_err());
        // From the environment, with Go's booleans; the command line wins.
        let env = [
            ("FLANNELD_IPTABLES_FORWARD_RULES", "F"),
            ("FLANNELD_IPTABLES_RESYNC", "9"),
        ];
        let a = flanneld(&["--kube-subnet-mgr"], &env).unwrap();
        assert!(!a.iptables_forward_rules);
        assert_eq!(a.iptables_resync, 9);
        let a = flanneld(
            &[
                "--kube-subnet-mgr",
                "--iptables-forward-rules",
                "-iptables-resync=3",
            ],
            &env,
        )
        .unwrap();
        assert!(a.iptables_forward_rules);
        assert_eq!(a.iptables_resync, 3);
        for off in [
            "--iptables-forward-rules=false",
            "-iptables-forward-rules=0",
        ] {
            let a = flanneld(&["--kube-subnet-mgr", off], &[]).unwrap();
            assert!(!a.iptables_forward_rules, "{off}");
        }
        let Err(e) = flanneld(
            &["--kube-subnet-mgr"],
            &[("FLANNELD_IPTABLES_FORWARD_RULES", "no")],
        ) else {
            panic!("accepted")
        };
        assert!(e.contains("FLANNELD_IPTABLES_FORWARD_RULES"), "{e}");
        // A boolean takes no separate value.
        assert!(
            flanneld(
                &["--iptables-forward-rules", "false", "--kube-subnet-mgr"],
                &[]
            )
            .is_err()
        );
    }

    #[test]
    fn kube_flannel_yml_runs_unchanged() {
        // kube-flannel.yml's container: args and downward-API environment.
        let a = flanneld(
            &["--ip-masq", "--kube-subnet-mgr"],
            &[
                ("POD_NAME", "kube-flannel-ds-abcde"),
                ("POD_NAMESPACE", "kube-flannel"),
                ("EVENT_QUEUE_DEPTH", "5000"),
            ],
        )
        .unwrap();
        assert!(a.ip_masq && a.kube_subnet_mgr);
        assert_eq!(a.net_conf, PathBuf::from("/etc/kube-flannel/net-conf.json"));
        assert_eq!(a.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(a.healthz_port, 0);
        assert_eq!(a.v, 0);
        assert_eq!(
            a.kube_annotation_prefix.public_ip,
            "flannel.alpha.coreos.com/public-ip"
        );

        // Go's spellings of the same, and flanneld's other flags.
        let a = flanneld(
            &[
                "-ip-masq=true",
                "-kube-subnet-mgr",
                "-net-config-path",
                "/etc/n.json",
                "-kubeconfig-file=/k",
                "-kube-api-url",
                "https://10.0.0.1:6443",
                "-kube-annotation-prefix=example.com/team",
                "-iface-can-reach",
                "10.9.0.1",
                "-healthz-ip=127.0.0.1",
                "-healthz-port",
                "10256",
                "-subnet-lease-renew-margin=30",
                "-v=4",
            ],
            &[],
        )
        .unwrap();
        assert!(a.ip_masq && a.kube_subnet_mgr);
        assert_eq!(a.net_conf, PathBuf::from("/etc/n.json"));
        assert_eq!(a.kubeconfig, Some(PathBuf::from("/k")));
        assert_eq!(a.kube_api_url.as_deref(), Some("https://10.0.0.1:6443"));
        assert_eq!(
            a.kube_annotation_prefix.backend_type,
            "example.com/team-backend-type"
        );
        assert_eq!(a.iface_can_reach, Some(Ipv4Addr::new(10, 9, 0, 1)));
        assert_eq!(
            (a.healthz_ip, a.healthz_port),
            (IpAddr::from([127, 0, 0, 1]), 10256)
        );
        assert_eq!(a.subnet_lease_renew_margin, 30);
        assert_eq!(klog_level(a.v), "debug");
    }

    #[test]
    fn flanneld_environment_and_precedence() {
        let env = [
            ("FLANNELD_KUBE_SUBNET_MGR", "1"),
            ("FLANNELD_IP_MASQ", "t"),
            ("FLANNELD_IFACE", "eth1"),
            ("FLANNELD_PUBLIC_IP", "192.0.2.9"),
            ("FLANNELD_NET_CONFIG_PATH", "/env/net-conf.json"),
            ("FLANNELD_HEALTHZ_PORT", "10256"),
            ("FLANNELD_V", "5"),
        ];
        let a = flanneld(&[], &env).unwrap();
        assert!(a.kube_subnet_mgr && a.ip_masq);
        assert_eq!(a.iface, [IfaceSpec::Name("eth1".into())]);
        assert_eq!(a.public_ip, Some(Ipv4Addr::new(192, 0, 2, 9)));
        assert_eq!(a.net_conf, PathBuf::from("/env/net-conf.json"));
        assert_eq!(a.healthz_port, 10256);
        assert_eq!(klog_level(a.v), "trace");
        // The command line wins, booleans included.
        let a = flanneld(
            &[
                "--ip-masq=false",
                "--iface=eth0",
                "--public-ip",
                "192.0.2.1",
                "-v",
                "1",
            ],
            &env,
        )
        .unwrap();
        assert!(!a.ip_masq && a.kube_subnet_mgr);
        assert_eq!(a.iface, [IfaceSpec::Name("eth0".into())]);
        assert_eq!(a.public_ip, Some(Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(klog_level(a.v), "info");
        // klog's level is signed.
        let a = flanneld(&["--kube-subnet-mgr", "-v", "-1"], &[]).unwrap();
        assert_eq!((a.v, klog_level(a.v)), (-1, "info"));
        // Our own flags too, and etcd's password.
        let a = flanneld(
            &["--etcd-endpoints=http://e:2379", "--etcd-username", "u"],
            &[
                ("FLANNELD_ETCD_PASSWORD", "secret"),
                ("FLANNELD_BRIDGE", "br9"),
            ],
        )
        .unwrap();
        assert_eq!(a.etcd_password.as_deref(), Some("secret"));
        assert_eq!(a.bridge, "br9");
    }

    #[test]
    fn go_flag_semantics_and_refusals() {
        // The last occurrence wins, lists append.
        let a = flanneld(
            &[
                "--kube-subnet-mgr",
                "--public-ip=192.0.2.1",
                "-public-ip=192.0.2.2",
                "--iface=eth0",
                "-iface",
                "eth1",
                "--ip-masq",
                "--ip-masq=false",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(a.public_ip, Some(Ipv4Addr::new(192, 0, 2, 2)));
        assert_eq!(a.iface.len(), 2);
        assert!(!a.ip_masq);
        let e = |argv: &[&str], env: &[(&str, &str)]| flanneld(argv, env).err().expect("refused");
        let bad_bool = e(&["--kube-subnet-mgr", "--ip-masq=yes"], &[]);
        assert!(bad_bool.contains("\"yes\""), "{bad_bool}");
        let bad_env = e(&["--kube-subnet-mgr"], &[("FLANNELD_IP_MASQ", "on")]);
        assert!(bad_env.contains("FLANNELD_IP_MASQ"), "{bad_env}");
        // A boolean takes no separate value: the stray word is refused, where flanneld
        // would stop reading flags there.
        let stray = e(&["--ip-masq", "false", "--kube-subnet-mgr"], &[]);
        assert!(stray.contains("'false'"), "{stray}");
        let unknown = e(&["--kube-subnet-mgr", "-no-such-flag=5"], &[]);
        assert!(unknown.contains("--no-such-flag"), "{unknown}");
        let port = e(&["--kube-subnet-mgr", "--healthz-port=70000"], &[]);
        assert!(port.contains("70000"), "{port}");
        let prefix = e(
            &["--kube-subnet-mgr", "--kube-annotation-prefix=a/b/c"],
            &[],
        );
        assert!(prefix.contains("more than one"), "{prefix}");
        let url = flanneld(&["--nodes-file=n.json", "--kube-api-url=https://a"], &[]).unwrap();
        let url = format!("{:#}", check_kube_flags(&url).unwrap_err());
        assert!(url.contains("--kube-subnet-mgr"), "{url}");
    }

    /// GET `path` from `port` on the loopback: the status line.
    async fn get(port: u16, path: &str) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        c.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).await.unwrap();
        answer.lines().next().unwrap_or_default().to_owned()
    }

    #[tokio::test]
    async fn healthz_port_serves_the_probes_as_flanneld() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let status = Arc::new(Status::default());
        let port_flag = format!("-healthz-port={port}");
        let args = [
            "--kube-subnet-mgr",
            "--http-addr=off",
            "-healthz-ip",
            "127.0.0.1",
            &port_flag,
        ];
        let servers = start_servers(&flanneld(&args, &[]).unwrap(), &status)
            .await
            .unwrap();
        assert_eq!(servers.len(), 1);
        assert_eq!(get(port, "/healthz").await, "HTTP/1.1 200 OK");
        // Not ready before the datapath is, as flanneld before its subnet.env.
        assert_eq!(
            get(port, "/readyz").await,
            "HTTP/1.1 503 Service Unavailable"
        );
        for s in servers {
            s.abort();
        }
        // Port 0 (flanneld's default): only --http-addr.
        let off = flanneld(&["--kube-subnet-mgr", "--http-addr=off"], &[]).unwrap();
        assert!(start_servers(&off, &status).await.unwrap().is_empty());
        // A port in use is a startup error naming the flag.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port_flag = format!("--healthz-port={}", taken.local_addr().unwrap().port());
        let args = [
            "--kube-subnet-mgr",
            "--http-addr=off",
            "--healthz-ip=127.0.0.1",
            &port_flag,
        ];
        let e = start_servers(&flanneld(&args, &[]).unwrap(), &status)
            .await
            .expect_err("refused");
        assert!(format!("{e:#}").contains("--healthz-port"), "{e:#}");
    }

    #[tokio::test]
    async fn public_ipv6_is_refused() {
        let a = flanneld(&["--kube-subnet-mgr", "--public-ipv6=fd00::1"], &[]).unwrap();
        let e = format!("{:#}", run(a).await.expect_err("refused"));
        assert!(e.contains("IPv4 only") && e.contains("fd00::1"), "{e}");
    }

    #[test]
    fn exactly_one_node_source() {
        // None given: etcd at flanneld's default endpoints, as flanneld.
        let default = parse(&[]).unwrap();
        assert_eq!(
            default.etcd_endpoints,
            ["http://127.0.0.1:4001", "http://127.0.0.1:2379"]
        );
        assert!(!default.kube_subnet_mgr && default.nodes_file.is_none());
        let e = error(&["--kubeconfig", "k"]);
        assert!(e.contains("--kube-subnet-mgr"), "{e}");
        let e = error(&["--kube-subnet-mgr", "--nodes-file", "n.json"]);
        assert!(e.contains("cannot be used with"), "{e}");
        let e = error(&["--nodes-file", "n.json", "--kubeconfig", "k"]);
        assert!(
            e.contains("--kubeconfig") && e.contains("--kube-subnet-mgr"),
            "{e}"
        );

        let e = error(&["--kube-subnet-mgr", "--etcd-endpoints", "http://e:2379"]);
        assert!(e.contains("cannot be used with"), "{e}");
        let e = error(&[
            "--etcd-endpoints",
            "http://e:2379",
            "--nodes-file",
            "n.json",
        ]);
        assert!(e.contains("cannot be used with"), "{e}");
        let e = error(&["--nodes-file", "n.json", "--etcd-cafile", "/ca"]);
        assert!(
            e.contains("--etcd-cafile") && e.contains("cannot be used with"),
            "{e}"
        );
        let e = error(&["--etcd-endpoints", "http://e:2379", "--etcd-password", "p"]);
        assert!(e.contains("--etcd-username"), "{e}");
        for bad in ["0", "1440"] {
            let e = error(&[
                "--etcd-endpoints",
                "http://e:2379",
                "--subnet-lease-renew-margin",
                bad,
            ]);
            assert!(e.contains(bad), "{e}");
        }

        let etcd = parse(&[
            "--etcd-endpoints",
            "https://a:2379,https://b:2379",
            "--etcd-cafile",
            "/ca",
        ])
        .unwrap();
        assert_eq!(etcd.etcd_endpoints, ["https://a:2379", "https://b:2379"]);
        assert_eq!(etcd.etcd_prefix, "/coreos.com/network");
        assert_eq!(etcd.subnet_lease_renew_margin, 60);
        assert!(!etcd.kube_subnet_mgr && etcd.nodes_file.is_none());

        let kube = parse(&["--kube-subnet-mgr", "--kubeconfig-file", "/k"]).unwrap();
        assert!(kube.kube_subnet_mgr && kube.nodes_file.is_none());
        assert_eq!(kube.kubeconfig, Some(PathBuf::from("/k")));
        assert!(
            parse(&["--nodes-file", "n.json"])
                .unwrap()
                .nodes_file
                .is_some()
        );
    }

    #[test]
    fn address_flags() {
        let a = parse(&[
            "--kube-subnet-mgr",
            "--iface",
            "eth1",
            "--iface",
            "192.168.3.5",
            "--iface-regex",
            "^ens",
            "--public-ip",
            "203.0.113.9",
        ])
        .unwrap();
        assert_eq!(
            a.iface,
            [
                IfaceSpec::Name("eth1".into()),
                IfaceSpec::Address(Ipv4Addr::new(192, 168, 3, 5))
            ]
        );
        assert_eq!(a.iface_regex[0].as_str(), "^ens");
        assert_eq!(a.public_ip, Some(Ipv4Addr::new(203, 0, 113, 9)));
        assert!(parse(&["--kube-subnet-mgr"]).unwrap().iface.is_empty());

        for (flag, bad) in [
            ("--iface-regex", "(unclosed"),
            ("--public-ip", "not-an-ip"),
            ("--iface", "a/b"),
        ] {
            let e = error(&["--kube-subnet-mgr", flag, bad]);
            assert!(e.contains(bad), "{e}");
        }
    }
}
