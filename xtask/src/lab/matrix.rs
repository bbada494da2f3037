//! The connectivity matrix: from every node and every pod to every pod, one ICMP echo
//! and one TCP exchange each, run in parallel.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use super::{
    interrupt, netns,
    probe::{self, EchoServers, Failure, Outcome},
    state::LabState,
    table::Table,
    topology::{Pod, Topology},
};

/// How a packet travels from source to destination, which decides what can carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// Within one node: the bridge, or the node to its own pods.
    SameNode,
    /// Between nodes on one segment: any of overlay, host-gw routes, could carry it.
    SameSwitch,
    /// Between nodes on different segments: only the overlay can.
    Routed,
}

impl PathKind {
    pub const ALL: [PathKind; 3] = [PathKind::SameNode, PathKind::SameSwitch, PathKind::Routed];

    pub fn describe(self) -> &'static str {
        match self {
            PathKind::SameNode => "same node",
            PathKind::SameSwitch => "other node, same switch",
            PathKind::Routed => "other node, via router",
        }
    }

    fn between(topology: &Topology, from_node: &str, to_node: &str) -> Result<Self> {
        if from_node == to_node {
            return Ok(PathKind::SameNode);
        }
        let (a, b) = (topology.node(from_node)?, topology.node(to_node)?);
        Ok(if a.segment == b.segment {
            PathKind::SameSwitch
        } else {
            PathKind::Routed
        })
    }
}

/// What a scenario predicts for the paths of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Pass,
    Fail,
    /// Not part of what the scenario proves: reported as observed.
    Either,
}

impl Expect {
    pub fn admits(self, passed: bool) -> bool {
        match self {
            Expect::Pass => passed,
            Expect::Fail => !passed,
            Expect::Either => true,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Expect::Pass => "pass",
            Expect::Fail => "fail",
            Expect::Either => "may pass",
        }
    }
}

/// One source-destination pair and its two probes.
#[derive(Debug)]
pub struct Probe {
    /// A node or a pod.
    pub from: String,
    pub to: Pod,
    pub kind: PathKind,
    pub icmp: Outcome,
    pub tcp: Outcome,
}

impl Probe {
    /// Pings `to` from host `from`, then exchanges bytes with its echo server.
    pub fn run(
        lab: &LabState,
        servers: &EchoServers,
        from: &str,
        to: &Pod,
        kind: PathKind,
    ) -> Self {
        let ns = lab.netns(from);
        let icmp = probe::ping(&ns, to.address);
        let tcp = match servers.address(to) {
            Some(server) => probe::tcp(&ns, server),
            None => Err(Failure::Other(format!("no echo server in {}", to.name))),
        };
        Probe {
            from: from.to_owned(),
            to: to.clone(),
            kind,
            icmp,
            tcp,
        }
    }
}

/// Outcomes of one protocol's probes over the paths of one kind.
#[derive(Debug, Clone, Default)]
pub struct ProtoTally {
    pub passed: usize,
    pub median: Option<Duration>,
    /// Failures by reason ("timeout", "unreach", ...).
    pub failures: BTreeMap<&'static str, usize>,
}

impl ProtoTally {
    fn of<'a>(outcomes: impl Iterator<Item = &'a Outcome>) -> Self {
        let mut tally = Self::default();
        let mut times = Vec::new();
        for outcome in outcomes {
            match outcome {
                Ok(d) => times.push(*d),
                Err(f) => *tally.failures.entry(f.short()).or_default() += 1,
            }
        }
        times.sort();
        tally.passed = times.len();
        tally.median = times.get(times.len() / 2).copied();
        tally
    }

    /// "0/36 (24 timeout, 12 unreach)": passed out of `paths`, and why the others failed.
    pub fn describe(&self, paths: usize) -> String {
        let mut text = format!("{}/{paths}", self.passed);
        if !self.failures.is_empty() {
            let reasons: Vec<String> = self
                .failures
                .iter()
                .map(|(why, n)| format!("{n} {why}"))
                .collect();
            text.push_str(&format!(" ({})", reasons.join(", ")));
        }
        text
    }
}

/// Outcomes over the paths of one kind.
#[derive(Debug, Clone)]
pub struct Tally {
    pub paths: usize,
    pub icmp: ProtoTally,
    pub tcp: ProtoTally,
}

pub struct Matrix {
    /// Row order: each node, then its pods.
    sources: Vec<String>,
    targets: Vec<Pod>,
    probes: Vec<Probe>,
    /// TCP segments the hosts retransmitted while probing: a path that passes only
    /// thanks to retransmissions (lost first packets, a wrong MTU) shows here.
    retransmitted: u64,
}

/// Probes every pair, `parallel` pairs at a time; fails only if the probing itself
/// cannot run (or on Ctrl-C).
pub fn run(lab: &LabState, parallel: usize) -> Result<Matrix> {
    let topology = &lab.topology;
    let targets = topology.pods();
    let mut sources = Vec::new();
    let mut pairs = Vec::new();
    for node in &topology.nodes {
        let hosts = std::iter::once(node.name.clone())
            .chain(topology.pods_of(node).into_iter().map(|p| p.name));
        for from in hosts {
            for to in targets.iter().filter(|t| t.name != from) {
                pairs.push((
                    from.clone(),
                    to.clone(),
                    PathKind::between(topology, &node.name, &to.node)?,
                ));
            }
            sources.push(from);
        }
    }
    let servers = EchoServers::start(lab, &targets)?;
    let retransmitted_before = retransmitted(lab, &sources)?;
    let next = AtomicUsize::new(0);
    let done = Mutex::new(Vec::with_capacity(pairs.len()));
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..parallel.max(1))
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    while let Some((from, to, kind)) =
                        pairs.get(next.fetch_add(1, Ordering::Relaxed))
                    {
                        interrupt::check()?;
                        let probe = Probe::run(lab, &servers, from, to, *kind);
                        done.lock()
                            .expect("no worker panics holding the lock")
                            .push(probe);
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        }
        Ok(())
    })?;
    let mut probes = done.into_inner().expect("workers are done");
    // Back in plan order: rows and columns as the topology lists them.
    let position = |p: &Probe| {
        pairs
            .iter()
            .position(|(f, t, _)| *f == p.from && t.name == p.to.name)
    };
    probes.sort_by_key(position);
    let retransmitted = retransmitted(lab, &sources)? - retransmitted_before;
    Ok(Matrix {
        sources,
        targets,
        probes,
        retransmitted,
    })
}

/// TCP segments retransmitted so far by `hosts`, from each namespace's /proc/net/snmp.
fn retransmitted(lab: &LabState, hosts: &[String]) -> Result<u64> {
    let mut total = 0;
    for host in hosts {
        // thread-self: /proc/self/net is the namespace of the process, not the thread's.
        let snmp = netns::enter(&lab.netns(host), || {
            Ok(std::fs::read_to_string("/proc/thread-self/net/snmp")?)
        })?;
        let mut tcp = snmp
            .lines()
            .filter(|l| l.starts_with("Tcp:"))
            .map(|l| l.split_whitespace());
        let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
            bail!("no Tcp counters in {host}'s snmp")
        };
        let value = names
            .zip(values)
            .find(|(name, _)| *name == "RetransSegs")
            .map(|(_, v)| v);
        total += value
            .with_context(|| format!("no RetransSegs in {host}'s snmp"))?
            .parse::<u64>()?;
    }
    Ok(total)
}

impl Matrix {
    pub fn tally(&self, kind: PathKind) -> Tally {
        let probes: Vec<&Probe> = self.probes.iter().filter(|p| p.kind == kind).collect();
        Tally {
            paths: probes.len(),
            icmp: ProtoTally::of(probes.iter().map(|p| &p.icmp)),
            tcp: ProtoTally::of(probes.iter().map(|p| &p.tcp)),
        }
    }

    /// The probes whose outcome `expect` does not admit, one line each.
    pub fn surprises(&self, expect: impl Fn(PathKind) -> Expect) -> Vec<String> {
        let mut lines = Vec::new();
        for p in &self.probes {
            let e = expect(p.kind);
            for (proto, outcome) in [("ICMP", &p.icmp), ("TCP", &p.tcp)] {
                if !e.admits(outcome.is_ok()) {
                    let what = match outcome {
                        Ok(d) => format!("passed in {} ms", probe::millis(*d)),
                        Err(f) => format!("failed: {f}"),
                    };
                    lines.push(format!(
                        "{} → {} ({}) {proto}: expected to {}, {what}",
                        p.from,
                        p.to.name,
                        p.kind.describe(),
                        e.describe()
                    ));
                }
            }
        }
        lines
    }

    /// Both grids (ICMP, TCP) and a summary by kind of path.
    pub fn render(&self) -> String {
        let icmp = self.grid(|p| &p.icmp);
        let tcp = self.grid(|p| &p.tcp);
        let mut summary = Table::new(["PATHS", "COUNT", "ICMP", "MEDIAN ms", "TCP", "MEDIAN ms"])
            .align_right(1..6);
        for kind in PathKind::ALL {
            let t = self.tally(kind);
            let median = |d: Option<Duration>| d.map_or("-".to_owned(), probe::millis);
            summary.row([
                kind.describe().to_owned(),
                t.paths.to_string(),
                format!("{}/{}", t.icmp.passed, t.paths),
                median(t.icmp.median),
                format!("{}/{}", t.tcp.passed, t.paths),
                median(t.tcp.median),
            ]);
        }
        format!(
            "ICMP echo, round trip in ms\n{icmp}\nTCP connect + {} KiB each way + close, in ms\n{tcp}\n{summary}  TCP segments retransmitted during the probes: {}\n",
            probe::TCP_BYTES / 1024,
            self.retransmitted
        )
    }

    fn grid(&self, outcome: fn(&Probe) -> &Outcome) -> Table {
        let header = std::iter::once("FROM \\ TO".to_owned())
            .chain(self.targets.iter().map(|t| t.name.clone()));
        let mut table = Table::new(header).align_right(1..=self.targets.len());
        for from in &self.sources {
            let cells = self.targets.iter().map(|to| {
                self.probes
                    .iter()
                    .find(|p| p.from == *from && p.to.name == to.name)
                    .map_or("·".to_owned(), |p| probe::cell(outcome(p)))
            });
            table.row(std::iter::once(from.clone()).chain(cells));
        }
        table
    }
}
