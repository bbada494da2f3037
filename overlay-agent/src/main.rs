use std::{
    io::{IsTerminal as _, Write as _},
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::{ArgGroup, Parser, Subcommand, ValueEnum};
use overlay_agent::{
    agent,
    bpf_log::BpfLogLevel,
    bpffs, cleanup, fast_path, http,
    inspect::{self, Format, View},
    masq::{self, PortRange, TimeoutOverride},
    nodes::{
        Source,
        address::{IfaceSpec, Selection},
        etcd::EtcdOptions,
    },
    status::Status,
};
use regex::Regex;
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
    /// Print the fast path's flow table: which flows skip the host stack, and why the
    /// others do not.
    Flows {
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

/// The node sources other than etcd, which the etcd flags make no sense with.
const OTHER_SOURCES: [&str; 2] = ["kube_subnet_mgr", "nodes_file"];

#[derive(clap::Args)]
#[command(group(ArgGroup::new("source").required(true).args(["kube_subnet_mgr", "nodes_file", "etcd_endpoints"])))]
struct RunArgs {
    /// This node's name in the node list (the DaemonSet passes it via the downward API).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Learn the nodes from the Kubernetes API and publish this node's flannel
    /// annotations, as flanneld's --kube-subnet-mgr.
    #[arg(long)]
    kube_subnet_mgr: bool,
    /// kubeconfig for the Kubernetes API (default: KUBECONFIG, ~/.kube/config, else the
    /// pod's service account).
    #[arg(long, alias = "kubeconfig-file", conflicts_with_all = ["nodes_file", "etcd_endpoints"])]
    kubeconfig: Option<PathBuf>,
    /// File with the nodes as `kubectl get nodes -o json` prints them; re-read on change.
    #[arg(long)]
    nodes_file: Option<PathBuf>,
    /// Lease this node's subnet from flannel's etcd subnet manager and learn the others
    /// there, as flanneld without --kube-subnet-mgr: the etcd endpoints, comma-separated.
    #[arg(long, value_delimiter = ',')]
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
    #[arg(
        long,
        env = "FLANNELD_ETCD_PASSWORD",
        hide_env_values = true,
        requires = "etcd_username"
    )]
    etcd_password: Option<String>,
    /// Minutes before its end that the subnet lease (24 h) is renewed.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=1439))]
    subnet_lease_renew_margin: u64,
    /// flannel's network configuration (with etcd, `<etcd-prefix>/config` instead).
    #[arg(long, default_value = "/etc/kube-flannel/net-conf.json")]
    net_conf: PathBuf,
    /// Interface to carry the tunnel, by name or by one of its IPv4 addresses;
    /// repeatable, the first that exists wins (default: the default route's).
    #[arg(long)]
    iface: Vec<IfaceSpec>,
    /// Regular expression matched against interface addresses, then names, after
    /// every --iface; repeatable, the first match wins.
    #[arg(long)]
    iface_regex: Vec<Regex>,
    /// The address other nodes reach this node at (default: the interface's). The
    /// Node annotation flannel.alpha.coreos.com/public-ip-overwrite overrides it.
    #[arg(long)]
    public_ip: Option<Ipv4Addr>,
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
    /// tcp_closed, tcp_time_wait, udp, udp_assured, icmp); repeatable.
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
    /// Which flows may skip the host stack. `established`: established flows the host
    /// forwarded unchanged under its current netfilter ruleset (everything else, and
    /// every flow while the legacy iptables backend holds tables, goes through it).
    /// `off`: every packet goes through the host stack, as with flanneld's kernel
    /// tunnel; for hosts whose netfilter rules decide on more than a flow's first
    /// packets and its conntrack state (per-packet rate or size limits, ipset
    /// blocklists without a conntrack accept before them).
    #[arg(long, value_enum, default_value_t = fast_path::Mode::Established)]
    fast_path: fast_path::Mode,
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
/// doubled the resident heap for a 5,000-node cluster (26 MiB against 11 MiB).
/// Called before any thread exists, so that none gets an arena of its own.
fn single_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: sets a glibc tunable; no other thread runs yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

async fn async_main() {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run(args) => run(*args).await,
        Command::Counters { inspect, all } => {
            inspect.print(inspect::counters(&inspect.pin_dir(), all))
        }
        Command::Nodes { inspect } => inspect.print(inspect::nodes(&inspect.pin_dir())),
        Command::Nat { inspect } => inspect.print(inspect::nat(&inspect.pin_dir())),
        Command::Flows { inspect } => inspect.print(inspect::flows(&inspect.pin_dir())),
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
    // The group makes clap require exactly one of the three.
    let source = if let Some(path) = args.nodes_file {
        Source::File(path)
    } else if !args.etcd_endpoints.is_empty() {
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
        }
    };
    let status = Arc::new(Status::default());
    // Started before the agent so that probes answer while the datapath loads.
    let server = match args.http_addr.0 {
        Some(addr) => {
            let pin_dir = bpffs::pin_dir(&args.pins.bpffs);
            Some(http::start(addr, Arc::clone(&status), pin_dir, args.bridge.clone()).await?)
        }
        None => None,
    };
    let result = agent::run(
        agent::Options {
            node_name,
            source,
            net_conf: args.net_conf,
            interface: Selection {
                ifaces: args.iface,
                regexes: args.iface_regex,
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
        parse(args).err().expect("should be refused").to_string()
    }

    #[test]
    fn exactly_one_node_source() {
        let e = error(&[]);
        assert!(
            e.contains("--kube-subnet-mgr") && e.contains("--nodes-file"),
            "{e}"
        );
        let e = error(&["--kube-subnet-mgr", "--nodes-file", "n.json"]);
        assert!(e.contains("cannot be used with"), "{e}");
        let e = error(&["--nodes-file", "n.json", "--kubeconfig", "k"]);
        assert!(
            e.contains("--kubeconfig") && e.contains("cannot be used with"),
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
