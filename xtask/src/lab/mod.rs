//! `cargo xtask lab`: a four-node cluster made of network namespaces, like the kind
//! cluster of the flannel ipip walkthrough plus a node behind a router and an outside
//! host beyond it, running one overlay agent per node (with `--ip-masq`, as flannel's
//! DaemonSet runs flanneld). It proves pod connectivity (a matrix of ICMP and TCP
//! probes), that cross-node traffic is IPIP on the wire, masquerade (pods reach the
//! outside behind their node's address, rule by rule, under load, and exactly where
//! flanneld's own iptables rules let them), and, with `--controls`, that without the
//! overlay the same paths fail.
//!
//! Layout: two halves. `machinery` builds and runs a lab: the cluster as data, its
//! namespaces, nodes, pods, agents and servers, and the probes that talk across it.
//! `proofs` holds what the lab proves with it, one module per subject. This module is
//! the `cargo xtask lab` command on top of both; `tests` runs the whole of it as tests.

pub(crate) mod machinery;
pub(crate) mod proofs;

#[cfg(test)]
mod tests;

use std::{os::unix::process::CommandExt as _, path::PathBuf, time::Instant};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;

use self::{
    machinery::{
        agents, cluster, etcd,
        guard::LabGuard,
        interrupt::{self, Interrupted},
        netns,
        state::LabState,
        text_table::{Table, heading},
        topology::Topology,
    },
    proofs::{
        capture, controls, forward_policy,
        kubernetes::{self, kube_proxy},
        masquerade, matrix, migrate, public_ip, restart,
    },
};

/// Probes of the connectivity matrix in flight at once. Few, so that the timings are
/// the path's and not the machine's contention (one at a time takes about as long
/// when all pass), but more than one, so that the timeouts of a broken path overlap.
const PROBES_IN_FLIGHT: usize = 2;

/// Without a subcommand: build, create the lab, check it, remove it.
#[derive(clap::Args)]
pub(crate) struct LabArgs {
    #[command(subcommand)]
    command: Option<LabCommand>,
    #[command(flatten)]
    create: CreateArgs,
    #[command(flatten)]
    checks: Checks,
    /// Instead of the checks: a lab whose nodes start as flanneld's ipip backend leaves
    /// them moves to the agent node by node and back to flanneld, under numbered
    /// traffic (needs the kernel's ipip module: run it in a VM otherwise).
    #[arg(long, conflicts_with_all = ["etcd", "controls", "masquerade", "restart", "kubernetes", "no_masq"])]
    migrate: bool,
}

#[derive(clap::Args, Clone, Copy)]
struct CreateArgs {
    /// Build and run the agent with the release profile.
    #[arg(long)]
    release: bool,
    /// Run the agents without `--ip-masq` (pods then cannot reach the outside host).
    #[arg(long)]
    no_masq: bool,
    /// Run the agents with `--fast-path off`: every packet goes through the host stack.
    #[arg(long)]
    no_fast_path: bool,
    /// Run the agents on flannel's etcd subnet manager (etcd with TLS on a host of its
    /// own) instead of a node list: each leases its subnet, and the lab builds its pods
    /// and checks on the leases.
    #[arg(long)]
    etcd: bool,
    /// Run the network with flannel's `Backend.DirectRouting`: cp, w1 and w2 (one
    /// switch) talk unencapsulated, w3 (behind the router) through the tunnel.
    #[arg(long)]
    direct_routing: bool,
}

impl CreateArgs {
    /// The lab these arguments ask for, created and ready.
    fn lab(self, agent: PathBuf) -> Result<LabGuard> {
        cluster::create(self.topology(), agent, !self.no_masq, !self.no_fast_path)
    }

    fn topology(self) -> Topology {
        let topology = if self.etcd {
            Topology::kind().with_etcd()
        } else {
            Topology::kind()
        };
        if self.direct_routing {
            topology.with_direct_routing()
        } else {
            topology
        }
    }
}

#[derive(clap::Args, Clone, Copy)]
struct Checks {
    /// Also run the negative controls: agents stopped, then host-gw routes.
    #[arg(long)]
    controls: bool,
    /// Run only the masquerade proof (the outside host, rules 6 and 1, masquerade off,
    /// thousands of connections, equivalence with flanneld's iptables rules), not the
    /// matrix and the wire proof. Without this flag it runs too, after them.
    #[arg(long)]
    masquerade: bool,
    /// Also prove that restarts and upgrades lose nothing: numbered traffic through w1
    /// while its agent is killed, restarted and replaced by another build (the other
    /// build profile, built first) and by a build with another map layout; with
    /// `--etcd`, also while etcd is killed and restarted.
    #[arg(long)]
    restart: bool,
    /// Run only the Kubernetes section (kube-proxy's rules in each mode, Services,
    /// cluster DNS, hostPort and NetworkPolicy, each against kernel forwarding). Without
    /// this flag it runs too, after the masquerade proof.
    #[arg(long, conflicts_with = "masquerade")]
    kubernetes: bool,
}

#[derive(clap::Args)]
struct Select {
    /// The lab to act on; needed only when several are running.
    #[arg(long)]
    id: Option<String>,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Create the lab and leave it running.
    Up(CreateArgs),
    /// Run the connectivity matrix, the wire proof and the masquerade checks against
    /// the running lab.
    Check {
        #[command(flatten)]
        select: Select,
        #[command(flatten)]
        checks: Checks,
    },
    /// Run a command in a host's namespace: a node (`w1`), a pod (`w1-pod1`),
    /// `outside`, `router` or `switch`. Without a command, a shell.
    Exec {
        #[command(flatten)]
        select: Select,
        host: String,
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Show the running lab: hosts, addresses, agents.
    Status {
        #[command(flatten)]
        select: Select,
    },
    /// Remove the running lab (also after a crash).
    Down {
        #[command(flatten)]
        select: Select,
    },
}

pub(crate) fn run(args: LabArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the lab needs root: it creates network namespaces and loads BPF programs");
    }
    interrupt::install()?;
    let result = match args.command {
        None if args.migrate => migration(args.create),
        None => full_run(args.create, args.checks).and_then(|report| report.verdict()),
        Some(LabCommand::Up(create)) => up(create),
        Some(LabCommand::Check { select, checks }) => {
            check(&LabState::load(select.id.as_deref())?, checks)
                .and_then(|report| report.verdict())
        }
        Some(LabCommand::Exec {
            select,
            host,
            command,
        }) => exec(&LabState::load(select.id.as_deref())?, &host, &command),
        Some(LabCommand::Status { select }) => status(&LabState::load(select.id.as_deref())?),
        Some(LabCommand::Down { select }) => down(select.id.as_deref()),
    };
    if let Err(e) = &result
        && (e.is::<Interrupted>() || interrupt::requested())
    {
        // The guards have already removed what this run created.
        if e.is::<Interrupted>() {
            eprintln!("interrupted");
        } else {
            eprintln!("interrupted ({e:#})");
        }
        std::process::exit(130);
    }
    result
}

/// What a check found.
#[derive(Debug)]
struct Report {
    id: String,
    /// Probes that did not pass.
    matrix: Vec<String>,
    /// Why the wire proof fails.
    wire: Vec<String>,
    /// What the FORWARD-policy proof found wrong.
    forward: Vec<String>,
    /// The masquerade proof's steps and what they found wrong.
    masquerade: masquerade::Proof,
    /// None when the controls did not run.
    controls: Option<bool>,
    /// The restart proof's events and what it found lost; None when it did not run.
    restart: Option<(Vec<String>, Vec<String>)>,
    /// The Kubernetes section's kube-proxy modes and what it found wrong; None when it
    /// did not run.
    kubernetes: Option<(Vec<kube_proxy::Mode>, Vec<String>)>,
}

impl Report {
    fn passed(&self) -> bool {
        self.matrix.is_empty()
            && self.wire.is_empty()
            && self.forward.is_empty()
            && self.masquerade.failures.is_empty()
            && self.controls != Some(false)
            && self.restart.as_ref().is_none_or(|(_, r)| r.is_empty())
            && self.kubernetes.as_ref().is_none_or(|(_, f)| f.is_empty())
    }

    fn verdict(self) -> Result<()> {
        if self.passed() {
            println!("\nPASS");
            return Ok(());
        }
        let mut failed = Vec::new();
        if !self.matrix.is_empty() {
            failed.push(format!("{} connectivity probes", self.matrix.len()));
        }
        if !self.wire.is_empty() {
            failed.push("the wire proof".to_owned());
        }
        if !self.forward.is_empty() {
            failed.push("the FORWARD policy proof".to_owned());
        }
        if !self.masquerade.failures.is_empty() {
            failed.push(format!(
                "{} masquerade checks",
                self.masquerade.failures.len()
            ));
        }
        if self.controls == Some(false) {
            failed.push("the negative controls".to_owned());
        }
        if self.restart.as_ref().is_some_and(|(_, r)| !r.is_empty()) {
            failed.push("the restart proof".to_owned());
        }
        if let Some((_, k)) = self.kubernetes.as_ref().filter(|(_, k)| !k.is_empty()) {
            failed.push(format!("{} Kubernetes checks", k.len()));
        }
        bail!("FAIL: {}", failed.join(", "))
    }
}

fn build(create: CreateArgs) -> Result<PathBuf> {
    if std::env::var_os(agents::PREBUILT_AGENT).is_none() {
        crate::deps::ensure()?;
    }
    let started = Instant::now();
    let profile = if create.release { "release" } else { "debug" };
    println!("Building overlay-agent ({profile})");
    let agent = agents::build(create.release)?;
    println!(
        "Built {} in {:.1}s",
        agent.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(agent)
}

/// `cargo xtask lab`: everything, then the lab is removed whatever happened.
fn full_run(create: CreateArgs, checks: Checks) -> Result<Report> {
    let started = Instant::now();
    let agent = build(create)?;
    let lab = create.lab(agent)?;
    let report = check(&lab, checks)?;
    heading("Teardown");
    let teardown = Instant::now();
    let removed = lab.teardown()?;
    println!(
        "Lab {} removed in {:.1}s: {removed}",
        report.id,
        teardown.elapsed().as_secs_f64()
    );
    println!("Total {:.1}s", started.elapsed().as_secs_f64());
    Ok(report)
}

/// `cargo xtask lab --migrate`.
fn migration(create: CreateArgs) -> Result<()> {
    let agent = build(create)?;
    heading("From flanneld to the agent and back");
    let proof = migrate::run(agent)?;
    print!("{}", migrate::render(&proof));
    if !proof.failures.is_empty() {
        bail!("FAIL: the migration proof");
    }
    println!("\nPASS");
    Ok(())
}

fn up(create: CreateArgs) -> Result<()> {
    let agent = build(create)?;
    let lab = create.lab(agent)?.keep();
    status(&lab)?;
    let pod = |node: usize| lab.topology.pods_of(&lab.topology.nodes[node]).remove(0);
    let (local, remote) = (pod(0), pod(lab.topology.nodes.len() - 1));
    let node = &lab.topology.nodes[0].name;
    println!(
        "\nExplore:\n  cargo xtask lab exec {} -- ping -c 3 {}\n  cargo xtask lab exec {} -- ping -c 3 {}   (the outside host, masqueraded)\n  cargo xtask lab exec {node} -- tcpdump -ni eth0 ip proto 4\n  cargo xtask lab exec {node} -- ip route\n  cargo xtask lab exec {node} -- {agent} counters --bpffs {pins}\n  cargo xtask lab exec {node} -- {agent} nat --bpffs {pins}\n  cargo xtask lab check [--controls] [--masquerade]\n  cargo xtask lab status\n  cargo xtask lab down\nAgent logs: {}/<node>/agent.log",
        local.name,
        remote.address,
        local.name,
        lab.topology.outside.address,
        lab.dir().display(),
        agent = lab.agent.display(),
        pins = lab.bpffs().join(node).display(),
    );
    Ok(())
}

/// The matrix, the wire proof, the counters and the masquerade proof (and the controls
/// if asked) against a running lab.
fn check(lab: &LabState, checks: Checks) -> Result<Report> {
    let (mut matrix, mut wire, mut forward) = (Vec::new(), Vec::new(), Vec::new());
    if !(checks.masquerade || checks.kubernetes) {
        heading("Connectivity");
        let masquerade = matrix::Masquerade::in_lab(lab, lab.masquerade);
        let found = matrix::run(lab, PROBES_IN_FLIGHT, masquerade)?;
        print!("{}", found.render());
        matrix = found.surprises(|kind| kind.expected(masquerade));
        for s in &matrix {
            println!("  ✗ {s}");
        }

        heading("Wire proof");
        let proof = capture::prove(lab)?;
        print!("{}", proof.render());
        wire = proof.failures();

        heading("FORWARD policy DROP");
        let proof = forward_policy::run(lab)?;
        print!("{}", proof.render());
        forward = proof.failures;

        heading("Public IP behind a NAT");
        if lab.topology.etcd.is_some() {
            // A lease's PublicIP is the agent's to write: changing it is a restart with
            // another --public-ip, and another lease.
            println!("  (on the node list only)");
        } else {
            let proof = public_ip::run(lab)?;
            print!("{}", proof.render());
            wire.extend(
                proof
                    .failures()
                    .iter()
                    .map(|f| format!("public IP behind a NAT: {f}")),
            );
        }

        heading("Counters");
        for node in &lab.topology.nodes {
            let counters = agents::inspect(lab, node, "counters")?;
            println!("{}:", node.name);
            for line in counters.lines() {
                println!("  {line}");
            }
        }
    }

    let masquerade = if checks.kubernetes {
        masquerade::Proof::default()
    } else {
        let proof = masquerade::run(lab)?;
        if !proof.failures.is_empty() {
            println!("\n{}", masquerade::section::verdict("", &proof.failures));
        }
        proof
    };

    let kubernetes = if checks.masquerade {
        None
    } else {
        heading(kubernetes::SECTION);
        let proof = kubernetes::run(lab)?;
        print!("{}", proof.render());
        let failures = proof.failures();
        for f in &failures {
            println!("  ✗ {f}");
        }
        Some((proof.modes(), failures))
    };

    let restart = if checks.restart {
        heading("Restarts and upgrades");
        // The upgrade is to the other build profile: a different binary of this code.
        let release = lab.agent.components().any(|c| c.as_os_str() == "release");
        let other = agents::build(!release)?;
        let proof = restart::run(lab, &other)?;
        print!("{}", restart::render(&proof));
        Some((proof.events(), proof.failures))
    } else {
        None
    };

    let controls = if checks.controls {
        heading("Negative controls");
        let report = controls::run(lab)?;
        print!("{}", report.render());
        Some(report.ok())
    } else {
        None
    };
    Ok(Report {
        id: lab.id.clone(),
        matrix,
        wire,
        forward,
        masquerade,
        controls,
        restart,
        kubernetes,
    })
}

/// Every host of the lab, as `exec` and `status` name them.
fn hosts(topology: &Topology) -> Vec<String> {
    let mut hosts = vec![cluster::SWITCH.to_owned(), cluster::ROUTER.to_owned()];
    for node in &topology.nodes {
        hosts.push(node.name.clone());
        hosts.extend(topology.pods_of(node).into_iter().map(|p| p.name));
    }
    hosts.push(topology.outside.name.clone());
    hosts.extend(topology.etcd.iter().map(|e| e.name.clone()));
    hosts
}

fn exec(lab: &LabState, host: &str, command: &[String]) -> Result<()> {
    let hosts = hosts(&lab.topology);
    if !hosts.iter().any(|h| h == host) {
        bail!(
            "no host {host} in lab {} (hosts: {})",
            lab.id,
            hosts.join(", ")
        );
    }
    let shell = std::env::var("SHELL").unwrap_or_else(|_| "/bin/sh".into());
    let (program, args) = command.split_first().unwrap_or((&shell, &[]));
    let error = netns::command(&lab.netns(host), program).args(args).exec();
    Err(error).context("running ip netns exec")
}

fn status(lab: &LabState) -> Result<()> {
    println!(
        "Lab {} in {}, agent {}",
        lab.id,
        lab.dir().display(),
        lab.agent.display()
    );
    let running = agents::running(lab)?;
    let mut table = Table::new(["HOST", "NAMESPACE", "ADDRESSES", "AGENT"]);
    for host in hosts(&lab.topology) {
        let ns = lab.netns(&host);
        // The switch has no addresses, only its bridges.
        let links = if host == cluster::SWITCH {
            netns::ip_json(&ns, &["link", "show", "type", "bridge"])
        } else {
            netns::ip_json(&ns, &["-4", "address", "show"])
        };
        let addresses = match links {
            Ok(links) => addresses(&links),
            Err(_) => "✗ namespace missing".to_owned(),
        };
        let agent = match lab.topology.node(&host) {
            Err(_) if lab.topology.etcd.as_ref().is_some_and(|e| e.name == host) => {
                match etcd::running(lab)?.first() {
                    Some(pid) => format!("etcd pid {pid}"),
                    None => "✗ etcd not running".to_owned(),
                }
            }
            Err(_) => String::new(),
            Ok(node) => match running.iter().find(|a| a.node == host) {
                None => "✗ not running".to_owned(),
                Some(a) => {
                    let masq = if a.masquerade { ", --ip-masq" } else { "" };
                    match agents::missing(lab, node, true) {
                        missing if missing.is_empty() => format!("pid {}{masq}, ready", a.pid),
                        missing => format!("pid {}{masq}, lacks {}", a.pid, missing.join(", ")),
                    }
                }
            },
        };
        table.row([host, ns, addresses, agent]);
    }
    print!("{table}");
    Ok(())
}

/// "eth0 172.18.0.2/16, cni0 10.244.0.1/24" from `ip -json address show`; bare names
/// for links without addresses (`ip -json link show`).
fn addresses(links: &serde_json::Value) -> String {
    let mut out = Vec::new();
    for link in links.as_array().into_iter().flatten() {
        let name = link["ifname"].as_str().unwrap_or("?");
        if name == "lo" {
            continue;
        }
        let Some(addrs) = link["addr_info"].as_array() else {
            out.push(name.to_owned());
            continue;
        };
        for addr in addrs {
            if let (Some(local), Some(len)) = (addr["local"].as_str(), addr["prefixlen"].as_u64()) {
                out.push(format!("{name} {local}/{len}"));
            }
        }
    }
    out.join(", ")
}

fn down(id: Option<&str>) -> Result<()> {
    let lab = LabState::load(id)?;
    let removed = lab.teardown()?;
    println!("Lab {} removed: {removed}", lab.id);
    Ok(())
}
