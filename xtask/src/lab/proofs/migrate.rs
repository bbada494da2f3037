//! `cargo xtask lab --migrate`: a cluster that flanneld's ipip backend runs moves to
//! the agent node by node, and back, under numbered traffic, losing nothing.
//!
//! The lab starts with every node as flanneld leaves it (`flannel`: the
//! `flannel.ipip` device and its routes; `iptables`: its masquerade chain, word for
//! word since here the tunnel device gives rule 6 its address), no agent anywhere.
//! Numbered datagrams (`restart::Stream`) then run in a ring through every node, pod
//! to pod, w3's behind the router, while one event at a time happens to one node:
//!
//! - **to the agent**, as the DaemonSet's rolling update does it: the agent starts on
//!   the node as flanneld left it, and must take it over (its own routes replace
//!   flanneld's) and remove the device and the masquerade chain, once its datapath
//!   carries the traffic. Meanwhile the cluster is mixed: kernel ipip nodes and agent
//!   nodes exchange the same packets.
//! - **back to flanneld**, as deploy/README.md's rollback does it: the agent stops
//!   (its datapath stays), flanneld starts and sets its device, routes and rules up
//!   over it, then `overlay-agent cleanup` removes the programs, pins and the agent's
//!   routes.
//!
//! After each event the node is checked (no `flannel.ipip` and no `FLANNEL-POSTRTG`
//! under the agent; flanneld's exact routes and rules, and none of the agent's
//! programs, after the rollback), and at the end every node must be as it was at the
//! start. It needs the kernel's ipip module: on a kernel without it the lab runs in
//! a VM (`cargo xtask vm -- ... lab --migrate`; the kernel matrix runs it as the test
//! `lab::tests::migration_from_flanneld_and_back_loses_nothing` on kernels with TCX).
//! Without TCX it cannot pass: the agent's first attachment on a device grafts a
//! clsact qdisc, which loses what the device sends meanwhile (docs/KERNELS.md).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use nix::sys::signal::Signal;

use crate::lab::{
    machinery::{
        agents::{self, SubnetEnv},
        cluster::{self, Dataplane},
        flannel::{Backend, IPIP_DEVICE},
        interrupt::{self, Wait},
        kernel_drops::KernelDrops,
        netns,
        state::LabState,
        topology::{Node, Topology},
    },
    proofs::masquerade::iptables::{self, Variant},
};

use super::restart::{self, Count, Stream};

/// Traffic before and after each event, so that both edges are covered.
const MARGIN: Duration = Duration::from_millis(500);
/// Datagrams per second on each of the four streams: a gap of a few milliseconds
/// shows, and under emulation (a VM, where this lab runs on kernels without the ipip
/// module) the agent starting meanwhile still gets the CPU to load its programs.
const RATE: u32 = 500;
/// How long an agent may take to load and attach its programs and converge: it
/// verifies its programs while the streams run.
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// The streams' first port.
const PORT: u16 = 7800;
/// How much of an agent's log a failed event shows.
const LOG_LINES: usize = 40;
/// How long after it is ready an agent may take to remove flanneld's leftovers.
const LEFTOVERS_TIMEOUT: Duration = Duration::from_secs(10);

/// Every node as flanneld's ipip backend with `--ip-masq` leaves it.
struct Flanneld;

impl Dataplane for Flanneld {
    fn runs_agent(&self, _: &Node) -> bool {
        false
    }

    fn configure(&self, lab: &LabState, node: &Node) -> Result<SubnetEnv> {
        flanneld_starts(lab, node)
    }
}

/// What flanneld does when it starts on `node`: its device and routes, its rules, and
/// subnet.env.
fn flanneld_starts(lab: &LabState, node: &Node) -> Result<SubnetEnv> {
    let env = Backend::Ipip.configure(lab, node)?;
    iptables::install_on(lab, node, Variant::Verbatim)?;
    let file = lab.subnet_file(node);
    std::fs::create_dir_all(lab.node_dir(&node.name))?;
    std::fs::write(&file, env.to_string())
        .with_context(|| format!("writing {}", file.display()))?;
    Ok(env)
}

/// What was found, event by event.
pub(crate) struct Proof {
    pub rows: Vec<(String, Duration, Count)>,
    /// Per event, what the agents' datapaths dropped (every node, hook and drop
    /// reason) and what the kernel dropped anywhere in the lab meanwhile: where a loss
    /// happened.
    pub drops: Vec<(String, u64, KernelDrops)>,
    /// For each event where a stream lost datagrams: the end of the swapped node's
    /// agent log, whose times of day the losses' can be set against.
    pub logs: Vec<(String, String)>,
    pub failures: Vec<String>,
}

/// Builds the lab as flanneld leaves it, migrates it and rolls it back, and removes it.
pub(crate) fn run(agent: PathBuf) -> Result<Proof> {
    let lab = cluster::create_with(Topology::kind(), agent, true, &Flanneld)?;
    let proof = migrate(&lab);
    let removed = lab.teardown()?;
    println!("Lab removed: {removed}");
    proof
}

fn migrate(lab: &LabState) -> Result<Proof> {
    let mut proof = Proof {
        rows: Vec::new(),
        drops: Vec::new(),
        logs: Vec::new(),
        failures: Vec::new(),
    };
    let nodes = lab.topology.nodes.clone();
    let before: Vec<String> = nodes
        .iter()
        .map(|n| flanneld_state(lab, n))
        .collect::<Result<_>>()?;
    for node in &nodes {
        let event = format!("{}: flanneld → agent", node.name);
        under_traffic(lab, node, &event, &mut proof, || to_agent(lab, node))?;
    }
    for node in &nodes {
        let event = format!("{}: agent → flanneld", node.name);
        under_traffic(lab, node, &event, &mut proof, || to_flanneld(lab, node))?;
        let programs = agents::all_attached(lab, node)?;
        if !programs.is_empty() {
            proof
                .failures
                .push(format!("{event}: programs still attached: {programs:?}"));
        }
    }
    for (node, before) in nodes.iter().zip(&before) {
        let after = flanneld_state(lab, node)?;
        if after != *before {
            proof.failures.push(format!(
                "{} differs from flanneld's state after the rollback:\nbefore:\n{before}\nafter:\n{after}",
                node.name
            ));
        }
    }
    Ok(proof)
}

/// Runs `event` on `node` with numbered traffic in a ring through every node before,
/// during and after it; records what each stream saw.
fn under_traffic(
    lab: &LabState,
    node: &Node,
    event: &str,
    proof: &mut Proof,
    action: impl FnOnce() -> Result<u64>,
) -> Result<()> {
    let datapath_before = datapath_drops(lab)?;
    let kernel_before = KernelDrops::read(lab)?;
    let streams = ring(lab)?;
    std::thread::sleep(MARGIN);
    let started = Instant::now();
    let done = action();
    let took = started.elapsed();
    std::thread::sleep(MARGIN);
    println!("  {event}: {:.1}s", took.as_secs_f64());
    let failed = proof.failures.len();
    for stream in streams {
        let count = stream.finish()?;
        proof.failures.extend(count.failure(event));
        proof.rows.push((event.to_owned(), took, count));
    }
    if proof.failures.len() > failed {
        let log = agents::log_tail(lab, node, LOG_LINES);
        proof.logs.push((
            format!("{event}: the end of {}'s agent log", node.name),
            log,
        ));
    }
    let kernel = KernelDrops::read(lab)?.since(&kernel_before);
    let removed = *done.as_ref().unwrap_or(&0);
    let datapath = (datapath_drops(lab)? + removed).saturating_sub(datapath_before);
    proof.drops.push((event.to_owned(), datapath, kernel));
    // The streams are stopped first, whatever happened.
    done.map(|_| ()).with_context(|| event.to_owned())
}

/// What every node's agent datapath dropped so far, where one is attached.
fn datapath_drops(lab: &LabState) -> Result<u64> {
    let mut drops = 0;
    for node in &lab.topology.nodes {
        if !agents::all_attached(lab, node)?.is_empty() {
            drops += agents::datapath_drops(lab, node)?;
        }
    }
    Ok(drops)
}

/// A stream from the first pod of each node to the first pod of the next: every node
/// sends and receives, w3's pods through the router.
fn ring(lab: &LabState) -> Result<Vec<Stream>> {
    let pods: Vec<_> = (lab.topology.nodes.iter())
        .map(|n| lab.topology.pods_of(n).remove(0))
        .collect();
    (0..pods.len())
        .map(|i| {
            let (from, to) = (&pods[i], &pods[(i + 1) % pods.len()]);
            Stream::start(lab, &from.name, &to.name, to.address, PORT + i as u16, RATE)
        })
        .collect()
}

/// The rolling update reaches `node`: flanneld goes, the agent starts on what it left.
/// Returns 0: no datapath is removed.
fn to_agent(lab: &LabState, node: &Node) -> Result<u64> {
    agents::start(lab, node, lab.masquerade)?;
    interrupt::wait_until(
        &format!("the agent of {} to answer ready", node.name),
        interrupt::scaled(LOAD_TIMEOUT),
        || {
            Ok(match agents::readyz(lab, node) {
                Ok((200, _)) => Wait::Done(()),
                answer => Wait::Pending(format!("{answer:?}")),
            })
        },
    )
    .and_then(|()| agents::wait_ready_on(lab, &[node], true))
    .with_context(|| format!("the end of its log:\n{}", agents::log_tail(lab, node, 20)))?;
    // The agent removes flanneld's leftovers right after its first full pass.
    interrupt::wait_until(
        &format!("the agent of {} to remove flanneld's leftovers", node.name),
        interrupt::scaled(LEFTOVERS_TIMEOUT),
        || {
            let left = leftovers(lab, node)?;
            Ok(if left.is_empty() {
                Wait::Done(())
            } else {
                Wait::Pending(format!("{} remain", left.join(" and ")))
            })
        },
    )?;
    Ok(0)
}

/// The rollback on `node`: flanneld's DaemonSet replaces the agent (whose datapath
/// stays), flanneld sets itself up over it, then the cleanup runs. Returns what the
/// removed datapath had dropped, read just before the cleanup removes its counters.
fn to_flanneld(lab: &LabState, node: &Node) -> Result<u64> {
    agents::stop_node(lab, node, Signal::SIGTERM)?;
    flanneld_starts(lab, node)?;
    let dropped = agents::datapath_drops(lab, node)?;
    let cleaned = agents::cleanup(lab, node, &[])?;
    ensure!(
        cleaned.contains("removed"),
        "overlay-agent cleanup removed nothing on {}: {cleaned}",
        node.name
    );
    Ok(dropped)
}

/// What of flanneld's is still on `node`.
fn leftovers(lab: &LabState, node: &Node) -> Result<Vec<String>> {
    let ns = lab.netns(&node.name);
    let mut left = Vec::new();
    if netns::run(netns::command(&ns, "ip").args(["link", "show", IPIP_DEVICE])).is_ok() {
        left.push(IPIP_DEVICE.to_owned());
    }
    let nat = netns::run(netns::command(&ns, "iptables-save").args(["-t", "nat"]))?;
    if nat.contains(iptables::CHAIN) {
        left.push(iptables::CHAIN.to_owned());
    }
    Ok(left)
}

/// `node`'s routes, nat rules and tunnel address as flanneld and the CNI plugins
/// leave them: what must be the same after a migration and a rollback as before.
/// Sorted: flanneld appends its rules and routes when it starts, after the CNI
/// plugins' where a pod started before.
fn flanneld_state(lab: &LabState, node: &Node) -> Result<String> {
    let ns = lab.netns(&node.name);
    let routes = netns::run(netns::command(&ns, "ip").args(["route", "show", "table", "main"]))?;
    let nat = netns::run(netns::command(&ns, "iptables-save").args(["-t", "nat"]))?;
    let device = netns::run(netns::command(&ns, "ip").args([
        "-o",
        "-4",
        "address",
        "show",
        "dev",
        IPIP_DEVICE,
    ]))
    .unwrap_or_else(|_| format!("no {IPIP_DEVICE}"));
    let mut lines: Vec<String> = routes
        .lines()
        .map(|l| format!("route {l}"))
        // Comments carry a timestamp, chain heads packet counts.
        .chain(
            nat.lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| format!("nat {}", l.split(" [").next().unwrap_or(l))),
        )
        // The device's index changes when flanneld makes it again.
        .chain(
            device
                .lines()
                .map(|l| format!("device {}", l.split_once(": ").map_or(l, |(_, rest)| rest))),
        )
        .collect();
    lines.sort();
    Ok(lines.join("\n"))
}

pub(crate) fn render(proof: &Proof) -> String {
    let mut out = restart::table(["EVENT", "TOOK"], &proof.rows);
    for (event, datapath, kernel) in &proof.drops {
        out.push_str(&format!(
            "  {event}: the agents' datapaths dropped {datapath} packets; the kernel dropped {kernel}\n"
        ));
    }
    for (what, log) in &proof.logs {
        out.push_str(&format!("  {what}:\n"));
        for line in log.lines() {
            out.push_str(&format!("    {line}\n"));
        }
    }
    out.push_str(&if proof.failures.is_empty() {
        format!("  ✓ no datagram lost across any migration or rollback ({RATE}/s per stream); no flannel.ipip or {} left under the agent; every node as flanneld left it at the end\n", iptables::CHAIN)
    } else {
        format!("  ✗ {}\n", proof.failures.join("\n  ✗ "))
    });
    out
}
