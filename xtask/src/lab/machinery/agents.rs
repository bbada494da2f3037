//! The overlay agents: building the binary, one detached agent per node namespace,
//! readiness, inspection, and stopping them (found by their command line and stopped
//! through `processes`).

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsStr,
    fs::OpenOptions,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{SchedClassifier, tc::TcAttachType};
use ipnet::Ipv4Net;
use nix::sys::signal::Signal;

use overlay_common::kernel::has_tcx;
pub(crate) use overlay_common::subnet_env::SubnetEnv;

use super::{
    etcd,
    interrupt::{self, Wait},
    netns,
    processes::{processes, stop_processes},
    state::LabState,
    topology::{Node, Topology},
};

/// The node's uplink, as in a kind node.
pub(crate) const UPLINK: &str = "eth0";
/// The pod bridge the CNI bridge plugin creates.
pub(crate) const BRIDGE: &str = "cni0";
/// flanneld's flag, which the agent shares.
const IP_MASQ: &str = "--ip-masq";
/// The agent's route protocol (`proto 191`).
const ROUTE_PROTO: &str = "191";
/// The programs a working node has attached: (interface, direction, program name).
const HOOKS: [(&str, TcAttachType, &str); 3] = [
    (UPLINK, TcAttachType::Ingress, "uplink_ingress"),
    (UPLINK, TcAttachType::Egress, "uplink_egress"),
    (BRIDGE, TcAttachType::Ingress, "bridge_ingress"),
];
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// The agent looks at the bridge every second; its full pass comes every 30.
const GATEWAY_TIMEOUT: Duration = Duration::from_secs(5);

/// Names an agent binary built beforehand, to use instead of building one.
pub(crate) const PREBUILT_AGENT: &str = "OVERLAY_LAB_AGENT";

/// Builds the agent (its build script builds and embeds the eBPF object) and returns
/// the binary's path in the workspace's target directory.
pub(crate) fn build(release: bool) -> Result<PathBuf> {
    // Inside the kernel matrix's VM the workspace is read-only: the host built the agent.
    if let Some(agent) = std::env::var_os(PREBUILT_AGENT) {
        return Ok(PathBuf::from(agent));
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?;
    let mut build = Command::new(&cargo);
    build
        .current_dir(workspace)
        .args(["build", "--package", "overlay-agent"]);
    if release {
        build.arg("--release");
    }
    let status = build.status().context("starting cargo build")?;
    if !status.success() {
        bail!("building overlay-agent failed ({status})");
    }
    // cargo metadata honours CARGO_TARGET_DIR and the workspace's configuration.
    let meta = netns::run(Command::new(&cargo).current_dir(workspace).args([
        "metadata",
        "--format-version",
        "1",
        "--no-deps",
    ]))?;
    let meta: serde_json::Value = serde_json::from_str(&meta).context("parsing cargo metadata")?;
    let target = meta["target_directory"]
        .as_str()
        .context("cargo metadata has no target_directory")?;
    let binary = Path::new(target)
        .join(if release { "release" } else { "debug" })
        .join("overlay-agent");
    if !binary.exists() {
        bail!(
            "cargo built overlay-agent, but {} does not exist",
            binary.display()
        );
    }
    Ok(binary)
}

/// Starts `node`'s agent inside the node's namespace, detached: in its own process
/// group, so that Ctrl-C reaches only us and we stop the agents in order, and left
/// unwaited, so that it outlives `lab up`. With `masquerade`, it runs with `--ip-masq`,
/// as flannel's DaemonSet runs flanneld.
pub(crate) fn start(lab: &LabState, node: &Node, masquerade: bool) -> Result<()> {
    start_build(lab, node, masquerade, &lab.agent)
}

/// The command line of `node`'s agent, run in the node's namespace: its node source
/// is the lab's node list, or with etcd the etcd subnet manager (then flannel's
/// network configuration is in etcd too).
pub(crate) fn command(lab: &LabState, node: &Node, masquerade: bool, agent: &Path) -> Command {
    let mut cmd = netns::command(&lab.netns(&node.name), agent);
    cmd.args(["run", "--node-name", &node.name]);
    if let Some(etcd) = &lab.topology.etcd {
        cmd.args(etcd::agent_args(lab, etcd));
    } else {
        cmd.arg("--nodes-file")
            .arg(lab.nodes_file())
            .arg("--net-conf")
            .arg(lab.net_conf_file());
    }
    cmd.args(["--iface", UPLINK, "--bridge", BRIDGE])
        .arg("--subnet-file")
        .arg(lab.subnet_file(node))
        .arg("--bpffs")
        .arg(node_bpffs(lab, node))
        .args(masquerade.then_some(IP_MASQ))
        .args(if lab.fast_path {
            &[][..]
        } else {
            &["--fast-path", "off"]
        });
    cmd
}

/// [`start`] with another build of the agent (an upgrade).
pub(crate) fn start_build(
    lab: &LabState,
    node: &Node,
    masquerade: bool,
    agent: &Path,
) -> Result<()> {
    start_with(lab, node, masquerade, agent, &[])
}

/// [`start_build`] with `extra` flags after the lab's own.
pub(crate) fn start_with(
    lab: &LabState,
    node: &Node,
    masquerade: bool,
    agent: &Path,
    extra: &[&str],
) -> Result<()> {
    let dir = lab.node_dir(&node.name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file(lab, node))?;
    let mut child = command(lab, node, masquerade, agent)
        .args(extra)
        // The log is a file: no terminal colours in it.
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting the agent of {}", node.name))?;
    // Until `ip netns exec` has exec'd the agent, `running` cannot see it (the wrapper
    // does not count, and the command line reads empty during the exec): wait for it,
    // so that what follows never mistakes it for dead. Not interruptible: this also
    // runs when restoring the lab after Ctrl-C, and a child we gave up on must not stay
    // behind.
    let pid = child.id();
    let started = interrupt::wait_briefly(
        &format!("the agent of {} to start", node.name),
        interrupt::scaled(START_TIMEOUT),
        || {
            if agent_of(lab, pid).is_some() {
                return Ok(Wait::Done(()));
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "the agent of {} exited at once ({status}); see {}",
                    node.name,
                    log_file(lab, node).display()
                );
            }
            Ok(Wait::Pending(
                "its command line is not the agent's yet".into(),
            ))
        },
    );
    if started.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    started
}

pub(crate) fn log_file(lab: &LabState, node: &Node) -> PathBuf {
    lab.node_dir(&node.name).join("agent.log")
}

fn node_bpffs(lab: &LabState, node: &Node) -> PathBuf {
    lab.bpffs().join(&node.name)
}

/// The directory of `node`'s pinned maps and links: the one layout version its agent
/// pinned (`<bpffs>/overlay-ipip/v<N>`).
pub(crate) fn pin_dir(lab: &LabState, node: &Node) -> Result<PathBuf> {
    let base = node_bpffs(lab, node).join("overlay-ipip");
    let mut versions = std::fs::read_dir(&base)
        .with_context(|| format!("listing {}", base.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()?;
    match versions.len() {
        1 => Ok(versions.remove(0)),
        n => bail!("{} holds {n} layout versions, expected one", base.display()),
    }
}

/// A running agent of the lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Agent {
    pub pid: u32,
    pub node: String,
    /// Whether it runs with `--ip-masq`.
    pub masquerade: bool,
}

/// The lab's agents, found by their command line: the processes whose `--bpffs` lies in
/// the lab's mount. Unlike recorded pids, this cannot miss an agent started just before
/// a crash, nor hit an unrelated process that reused a pid.
pub(crate) fn running(lab: &LabState) -> Result<Vec<Agent>> {
    let mut agents: Vec<Agent> = processes()?
        .into_iter()
        .filter_map(|(pid, cmdline)| agent_in(&lab.bpffs(), pid, &cmdline))
        .collect();
    agents.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(agents)
}

/// The agent `pid` is, if it is one of the lab's.
fn agent_of(lab: &LabState, pid: u32) -> Option<Agent> {
    // Unreadable: the process is gone (or a zombie, whose cmdline is empty).
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    agent_in(&lab.bpffs(), pid, &cmdline)
}

/// The agent whose command line (`/proc/<pid>/cmdline`) is `cmdline`, if it keeps its
/// pins under `bpffs`.
fn agent_in(bpffs: &Path, pid: u32, cmdline: &[u8]) -> Option<Agent> {
    let args: Vec<&Path> = cmdline
        .split(|&b| b == 0)
        .map(|a| Path::new(OsStr::from_bytes(a)))
        .collect();
    // `ip netns exec` holds the agent's arguments too until it execs the agent; only
    // the agent itself (its subcommand right after the program) counts, or a check
    // could pass on the wrapper and fail in the instant of the exec.
    if args.get(1) != Some(&Path::new("run")) {
        return None;
    }
    let at = args.iter().position(|a| *a == Path::new("--bpffs"))?;
    let pins = args.get(at + 1)?;
    if pins.parent()? != bpffs {
        return None;
    }
    Some(Agent {
        pid,
        node: pins.file_name()?.to_str()?.to_owned(),
        masquerade: args.contains(&Path::new(IP_MASQ)),
    })
}

/// Restarts every agent with or without `--ip-masq` and waits until the overlay is
/// ready again; returns false, doing nothing, when all already run that way.
pub(crate) fn restart(lab: &LabState, masquerade: bool) -> Result<bool> {
    let running = running(lab)?;
    if running.len() == lab.topology.nodes.len()
        && running.iter().all(|a| a.masquerade == masquerade)
    {
        return Ok(false);
    }
    stop_all(lab)?;
    for node in &lab.topology.nodes {
        start(lab, node, masquerade)?;
    }
    wait_ready(lab, true)?;
    Ok(true)
}

/// Stops the lab's agents with SIGTERM, waiting for each to exit, and SIGKILL for any
/// that does not in time. Returns how many ran. Their datapath stays in place (so that
/// a restart loses nothing); [`cleanup`] removes it.
pub(crate) fn stop_all(lab: &LabState) -> Result<usize> {
    let agents = running(lab)?;
    stop(lab, &agents, Signal::SIGTERM)?;
    Ok(agents.len())
}

/// Stops `node`'s agent with `signal` (SIGTERM, or SIGKILL to see it die) and waits
/// until it is gone.
pub(crate) fn stop_node(lab: &LabState, node: &Node, signal: Signal) -> Result<()> {
    let agents: Vec<Agent> = running(lab)?
        .into_iter()
        .filter(|a| a.node == node.name)
        .collect();
    if agents.is_empty() {
        bail!("the agent of {} is not running", node.name);
    }
    stop(lab, &agents, signal)
}

fn stop(lab: &LabState, agents: &[Agent], signal: Signal) -> Result<()> {
    let named: Vec<(u32, String)> = agents
        .iter()
        .map(|a| (a.pid, format!("the agent of {}", a.node)))
        .collect();
    stop_processes(&named, |pid| agent_of(lab, pid).is_some(), signal)
}

/// Waits for the agent to write `node`'s subnet.env, as the flannel CNI plugin does
/// before it can configure a pod.
pub(crate) fn wait_subnet_env(lab: &LabState, node: &Node) -> Result<SubnetEnv> {
    let path = lab.subnet_file(node);
    interrupt::wait_until(
        &format!("{}'s subnet.env", node.name),
        interrupt::scaled(READY_TIMEOUT),
        || {
            ensure_running(lab, node)?;
            match std::fs::read_to_string(&path) {
                Ok(text) => Ok(Wait::Done(
                    SubnetEnv::parse(&text)
                        .map_err(anyhow::Error::msg)
                        .with_context(|| format!("in {}", path.display()))?,
                )),
                Err(e) => Ok(Wait::Pending(e.to_string())),
            }
        },
    )
}

/// Waits until every node's agent has its programs attached (the bridge's too when
/// `bridge`), all remote subnets in its maps and a route for each.
pub(crate) fn wait_ready(lab: &LabState, bridge: bool) -> Result<()> {
    let nodes: Vec<&Node> = lab.topology.nodes.iter().collect();
    wait_ready_on(lab, &nodes, bridge)
}

/// [`wait_ready`] for the agents of `nodes` only.
pub(crate) fn wait_ready_on(lab: &LabState, nodes: &[&Node], bridge: bool) -> Result<()> {
    interrupt::wait_until(
        "the agents to be ready",
        interrupt::scaled(READY_TIMEOUT),
        || {
            let mut pending = Vec::new();
            for node in nodes {
                ensure_running(lab, node)?;
                let missing = missing(lab, node, bridge);
                if !missing.is_empty() {
                    pending.push(format!("{}: {}", node.name, missing.join(", ")));
                }
            }
            Ok(if pending.is_empty() {
                Wait::Done(())
            } else {
                Wait::Pending(pending.join("; "))
            })
        },
    )
}

/// Fails, with the end of its log, if `node`'s agent is not running.
fn ensure_running(lab: &LabState, node: &Node) -> Result<()> {
    if running(lab)?.iter().any(|a| a.node == node.name) {
        return Ok(());
    }
    bail!(
        "the agent of {} is not running; the end of its log:\n{}",
        node.name,
        log_tail(lab, node, 15)
    )
}

/// The last `lines` lines of `node`'s agent's log.
pub(crate) fn log_tail(lab: &LabState, node: &Node, lines: usize) -> String {
    let log = std::fs::read_to_string(log_file(lab, node)).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(lines).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    tail.join("\n")
}

/// Waits until `program` is attached to `iface`'s `direction` hook in `ns`.
pub(crate) fn wait_attached(
    ns: &str,
    iface: &str,
    direction: TcAttachType,
    program: &str,
) -> Result<()> {
    interrupt::wait_until(
        &format!("{program} on {iface} in {ns}"),
        interrupt::scaled(READY_TIMEOUT),
        || {
            Ok(
                if attached(ns, iface, direction)?.iter().any(|n| n == program) {
                    Wait::Done(())
                } else {
                    Wait::Pending(format!("{program} not attached"))
                },
            )
        },
    )
}

/// Whether every tunnelled route of the agent's sends the host's own packets from the
/// pod gateway, as they leave from flanneld's tunnel address; with DirectRouting, the
/// routes to the nodes of `node`'s segment name no source, as host-gw's.
fn from_gateway(
    topology: &Topology,
    node: &Node,
    routes: &BTreeMap<Ipv4Net, Option<Ipv4Addr>>,
) -> bool {
    let direct = topology.direct_subnets(node);
    routes
        .iter()
        .all(|(subnet, src)| *src == (!direct.contains(subnet)).then(|| node.gateway()))
}

/// Waits, briefly, until `node`'s agent sources its routes from the gateway that the
/// bridge has just been given: well before its periodic full pass would.
pub(crate) fn wait_gateway_source(lab: &LabState, node: &Node) -> Result<()> {
    let ns = lab.netns(&node.name);
    interrupt::wait_until(
        &format!(
            "the agent of {} to route from {}",
            node.name,
            node.gateway()
        ),
        interrupt::scaled(GATEWAY_TIMEOUT),
        || {
            let routes = overlay_route_sources(&ns)?;
            Ok(if from_gateway(&lab.topology, node, &routes) {
                Wait::Done(())
            } else {
                Wait::Pending(format!("routes: {routes:?}"))
            })
        },
    )
}

/// What `node` lacks to carry overlay traffic: empty when it is ready.
pub(crate) fn missing(lab: &LabState, node: &Node, bridge: bool) -> Vec<String> {
    let ns = lab.netns(&node.name);
    let remote: BTreeSet<Ipv4Net> = lab
        .topology
        .nodes
        .iter()
        .filter(|n| n.name != node.name)
        .map(|n| n.pod_cidr)
        .collect();
    let mut missing = Vec::new();
    // The agent's own word first: the datapath outlives an agent, so after a restart
    // the maps, routes and attachments below are there before the new agent has
    // converged (say, on a masquerade setting that changed).
    if !answers_ready(&ns) {
        missing.push("/readyz".to_owned());
    }
    if !lab.subnet_file(node).exists() {
        missing.push("subnet.env".to_owned());
    }
    match remote_subnets(lab, node) {
        Ok(subnets) if subnets == remote => {}
        Ok(_) => missing.push("remote subnets in its maps".to_owned()),
        Err(_) => missing.push("pinned maps".to_owned()),
    }
    match overlay_route_sources(&ns) {
        Ok(routes) if routes.keys().eq(remote.iter()) => {
            if bridge && !from_gateway(&lab.topology, node, &routes) {
                missing.push(format!("routes with source {}", node.gateway()));
            }
        }
        _ => missing.push("routes".to_owned()),
    }
    for (iface, direction, program) in HOOKS
        .iter()
        .filter(|(iface, ..)| bridge || *iface != BRIDGE)
    {
        if !attached(&ns, iface, *direction).is_ok_and(|names| names.iter().any(|n| n == program)) {
            missing.push(format!("{program} on {iface}"));
        }
    }
    missing
}

/// The remote subnets in `node`'s maps (`overlay-agent nodes`).
pub(crate) fn remote_subnets(lab: &LabState, node: &Node) -> Result<BTreeSet<Ipv4Net>> {
    Ok(subnets(&inspect(lab, node, "nodes")?))
}

/// The subnets in the table of `overlay-agent nodes`.
fn subnets(nodes_output: &str) -> BTreeSet<Ipv4Net> {
    nodes_output
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Where the agent serves /readyz in its node's namespace (its default --http-addr).
const AGENT_HTTP: &str = "127.0.0.1:9101";

/// Whether the agent in `ns` answers 200 on /readyz.
fn answers_ready(ns: &str) -> bool {
    get(ns, "/readyz").is_ok_and(|(code, _)| code == 200)
}

/// What `node`'s agent answers on /readyz: the status code and the body.
pub(crate) fn readyz(lab: &LabState, node: &Node) -> Result<(u16, String)> {
    get(&lab.netns(&node.name), "/readyz")
        .with_context(|| format!("asking the agent of {} whether it is ready", node.name))
}

/// How often `node`'s agent failed to follow its node source
/// (`overlay_node_source_errors_total` in its /metrics).
pub(crate) fn source_errors(lab: &LabState, node: &Node) -> Result<u64> {
    const NAME: &str = "overlay_node_source_errors_total";
    let (code, body) = get(&lab.netns(&node.name), "/metrics")
        .with_context(|| format!("scraping the agent of {}", node.name))?;
    if code != 200 {
        bail!(
            "the agent of {} answered {code} on /metrics: {body}",
            node.name
        );
    }
    metric(&body, NAME)
        .with_context(|| format!("the /metrics of {}'s agent have no {NAME}", node.name))
}

/// The value of the series `name` without labels in an OpenMetrics text.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `GET <path>` from the agent's HTTP server in `ns`: the status code and the body.
fn get(ns: &str, path: &str) -> Result<(u16, String)> {
    let answer = netns::enter(ns, || {
        // A scrape reads the pinned maps: more than /readyz's instant.
        let timeout = Duration::from_secs(2);
        let mut conn = TcpStream::connect_timeout(&AGENT_HTTP.parse()?, timeout)?;
        conn.set_read_timeout(Some(timeout))?;
        conn.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
        let mut answer = String::new();
        conn.read_to_string(&mut answer)?;
        Ok(answer)
    })?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("GET {path} in {ns} answered no status: {head}"))?;
    Ok((code, body.to_owned()))
}

/// `overlay-agent cleanup EXTRA` in `node`'s namespace: programs, pins, routes (and
/// with `--forward-rules` flanneld's forward rules); subnet.env stays, as it does for
/// flanneld.
pub(crate) fn cleanup(lab: &LabState, node: &Node, extra: &[&str]) -> Result<String> {
    netns::run(
        netns::command(&lab.netns(&node.name), &lab.agent)
            .arg("cleanup")
            .arg("--bpffs")
            .arg(node_bpffs(lab, node))
            .args(extra),
    )
}

/// `overlay-agent <what> --bpffs ...` run in `node`'s namespace (`counters`, `nodes`).
pub(crate) fn inspect(lab: &LabState, node: &Node, what: &str) -> Result<String> {
    netns::run(
        netns::command(&lab.netns(&node.name), &lab.agent)
            .arg(what)
            .arg("--bpffs")
            .arg(node_bpffs(lab, node)),
    )
}

/// Packets `node`'s datapath dropped so far, over every hook and drop reason.
pub(crate) fn datapath_drops(lab: &LabState, node: &Node) -> Result<u64> {
    let counters = inspect(lab, node, "counters")?;
    Ok(counters
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.get(1)?.starts_with("drop_")).then(|| cols.get(2)?.parse::<u64>().ok())?
        })
        .sum())
}

/// [`inspect`] with `--json`, parsed.
pub(crate) fn inspect_json(lab: &LabState, node: &Node, what: &str) -> Result<serde_json::Value> {
    let out = netns::run(
        netns::command(&lab.netns(&node.name), &lab.agent)
            .arg(what)
            .arg("--json")
            .arg("--bpffs")
            .arg(node_bpffs(lab, node)),
    )?;
    serde_json::from_str(&out).with_context(|| format!("parsing `overlay-agent {what} --json`"))
}

/// Destinations of the agent's routes (`proto 191`) in `ns`.
pub(crate) fn overlay_routes(ns: &str) -> Result<BTreeSet<Ipv4Net>> {
    Ok(overlay_route_sources(ns)?.into_keys().collect())
}

/// The agent's routes (`proto 191`) in `ns`: destination and preferred source.
fn overlay_route_sources(ns: &str) -> Result<BTreeMap<Ipv4Net, Option<Ipv4Addr>>> {
    let routes = netns::ip_json(ns, &["route", "show", "proto", ROUTE_PROTO])?;
    let routes = routes
        .as_array()
        .context("ip -json route printed no list")?;
    routes
        .iter()
        .map(|r| {
            let dst = r["dst"].as_str().context("a route without dst")?.parse()?;
            let src = r["prefsrc"].as_str().map(str::parse).transpose()?;
            Ok((dst, src))
        })
        .collect()
}

/// Names of the programs attached to `iface` in `ns`: TCX programs, or cls_bpf filters
/// on kernels without TCX (before 6.6), where the agent attaches those.
pub(crate) fn attached(ns: &str, iface: &str, direction: TcAttachType) -> Result<Vec<String>> {
    if !has_tcx() {
        return filters(ns, iface, direction);
    }
    netns::enter(ns, || {
        let (_, programs) = SchedClassifier::query_tcx(iface, direction)?;
        Ok(programs
            .iter()
            .map(|p| p.name_as_str().unwrap_or("?").to_owned())
            .collect())
    })
}

/// The programs of the cls_bpf filters on `iface`'s clsact hook, from `tc -json`.
fn filters(ns: &str, iface: &str, direction: TcAttachType) -> Result<Vec<String>> {
    let hook = match direction {
        TcAttachType::Egress => "egress",
        _ => "ingress",
    };
    let out = netns::run(
        Command::new("tc").args(["-n", ns, "-json", "filter", "show", "dev", iface, hook]),
    )?;
    if out.trim().is_empty() {
        return Ok(Vec::new());
    }
    let filters: serde_json::Value =
        serde_json::from_str(&out).context("parsing `tc -json filter show`")?;
    Ok(filters
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["options"]["bpf_name"].as_str())
        .map(|name| name.to_owned())
        .collect())
}

/// Every program attached to the node's hooks, as "program on iface".
pub(crate) fn all_attached(lab: &LabState, node: &Node) -> Result<Vec<String>> {
    let ns = lab.netns(&node.name);
    let mut found = Vec::new();
    for (iface, direction, _) in &HOOKS {
        found.extend(
            attached(&ns, iface, *direction)?
                .into_iter()
                .map(|p| format!("{p} on {iface}")),
        );
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_is_seen_once_exec_d_not_in_its_netns_wrapper() {
        let bpffs = Path::new("/run/overlay-lab/ab12/bpffs");
        let agent = "/x/overlay-agent\0run\0--node-name\0w1\0--bpffs\0/run/overlay-lab/ab12/bpffs/w1\0--ip-masq\0";
        let wrapper = format!("ip\0netns\0exec\0olab-ab12-w1\0{agent}");
        assert_eq!(
            agent_in(bpffs, 7, agent.as_bytes()),
            Some(Agent {
                pid: 7,
                node: "w1".into(),
                masquerade: true
            })
        );
        assert_eq!(agent_in(bpffs, 7, wrapper.as_bytes()), None);
        // In the instant of the exec.
        assert_eq!(agent_in(bpffs, 7, b""), None);
        assert_eq!(
            agent_in(
                Path::new("/run/overlay-lab/cd34/bpffs"),
                7,
                agent.as_bytes()
            ),
            None
        );
    }

    #[test]
    fn a_counter_from_the_metrics() {
        let text = "# TYPE overlay_node_source_errors counter\n# HELP overlay_node_source_errors Errors\noverlay_node_source_errors_total 3\noverlay_node_source_errors_total_x 9\noverlay_datapath_packets_total{hook=\"x\"} 5\n# EOF\n";
        assert_eq!(metric(text, "overlay_node_source_errors_total"), Some(3));
        assert_eq!(metric(text, "overlay_datapath_packets_total"), None);
        assert_eq!(metric(text, "overlay_ready"), None);
    }

    #[test]
    fn tunnelled_routes_leave_from_the_gateway_direct_ones_from_the_uplink() {
        let topology = Topology::kind();
        let cp = topology.node("cp").unwrap();
        let gateway = Some(cp.gateway());
        let routes = |w1, w3| {
            BTreeMap::from([
                ("10.244.1.0/24".parse().unwrap(), w1),
                ("10.244.3.0/24".parse().unwrap(), w3),
            ])
        };
        assert!(from_gateway(&topology, cp, &routes(gateway, gateway)));
        assert!(!from_gateway(&topology, cp, &routes(None, gateway)));
        let direct = topology.clone().with_direct_routing();
        assert!(from_gateway(&direct, cp, &routes(None, gateway)));
        assert!(!from_gateway(&direct, cp, &routes(gateway, gateway)));
        assert!(!from_gateway(&direct, cp, &routes(None, None)));
    }

    #[test]
    fn remote_subnets_from_the_nodes_table() {
        let text = "this node: tunnel address 172.18.0.2, pod subnet 10.244.0.0/24\nREMOTE SUBNET        NODE                 RX PACKETS       RX BYTES\n10.244.1.0/24        172.18.0.3                    0              0\n10.244.3.0/24        172.19.0.2                    4            480\n";
        let want: BTreeSet<Ipv4Net> = [
            "10.244.1.0/24".parse().unwrap(),
            "10.244.3.0/24".parse().unwrap(),
        ]
        .into();
        assert_eq!(subnets(text), want);
    }
}
