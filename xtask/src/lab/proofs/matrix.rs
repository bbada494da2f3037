//! The connectivity matrix: from every node, every pod and the outside host to every
//! pod and the outside host, one ICMP echo and one TCP exchange each, run in parallel.
//! Each exchange also checks the source address the destination saw: untranslated
//! inside the cluster, the node's address for a pod talking to the outside when the
//! agents masquerade (and, in a lab made without `--ip-masq`, for whatever a pod sends
//! outside its node's subnet: see [`Masquerade`]).

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, Result, bail};

use crate::lab::machinery::{
    netns, parallel,
    probe::{self, Client, Outcome, Proto},
    servers::Servers,
    state::LabState,
    text_table::Table,
    topology::{Host, Kind, Topology},
};

/// How a packet travels from source to destination, which decides what can carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathKind {
    /// Within one node: the bridge, or the node to its own pods.
    SameNode,
    /// Between nodes on one segment: any of overlay, host-gw routes, could carry it.
    SameSwitch,
    /// Between nodes on different segments: only the overlay can.
    Routed,
    /// A pod to the outside host: replies find their way back only when masqueraded
    /// (the router knows no pod subnet).
    PodToOutside,
    /// A node to the outside host: plain underlay routing.
    NodeToOutside,
    /// The outside host to a pod: the router knows no pod subnet.
    OutsideToPod,
}

impl PathKind {
    pub(crate) const ALL: [PathKind; 6] = [
        PathKind::SameNode,
        PathKind::SameSwitch,
        PathKind::Routed,
        PathKind::PodToOutside,
        PathKind::NodeToOutside,
        PathKind::OutsideToPod,
    ];

    pub(crate) fn describe(self) -> &'static str {
        match self {
            PathKind::SameNode => "same node",
            PathKind::SameSwitch => "other node, same switch",
            PathKind::Routed => "other node, via router",
            PathKind::PodToOutside => "pod to outside",
            PathKind::NodeToOutside => "node to outside",
            PathKind::OutsideToPod => "outside to pod",
        }
    }

    fn between(topology: &Topology, from: &Host, to: &Host) -> Result<Self> {
        Ok(match (from.kind, to.kind) {
            (Kind::Outside, _) => PathKind::OutsideToPod,
            (Kind::Pod, Kind::Outside) => PathKind::PodToOutside,
            (Kind::Node, Kind::Outside) => PathKind::NodeToOutside,
            _ => {
                let node = |h: &Host| {
                    topology
                        .node_of(h)
                        .with_context(|| format!("{} has no node", h.name))
                };
                let (a, b) = (node(from)?, node(to)?);
                if a.name == b.name {
                    PathKind::SameNode
                } else if a.segment == b.segment {
                    PathKind::SameSwitch
                } else {
                    PathKind::Routed
                }
            }
        })
    }

    /// What the lab predicts for these paths while the agents run, as `masquerade`
    /// says who masquerades.
    pub(crate) fn expected(self, masquerade: Masquerade) -> Expect {
        match self {
            PathKind::OutsideToPod => Expect::Fail,
            PathKind::PodToOutside if !(masquerade.agents || masquerade.bridge) => Expect::Fail,
            _ => Expect::Pass,
        }
    }
}

/// Who masquerades what pods send, in one run of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Masquerade {
    /// Our agents (`--ip-masq`): a pod's traffic to the outside (rule 5).
    pub agents: bool,
    /// The bridge plugin: flannel's CNI plugin asks it to (`ipMasq`) when the agent that
    /// wrote subnet.env ran without `--ip-masq` (FLANNEL_IPMASQ=false), and then
    /// everything a pod sends outside its node's subnet, other nodes' pods included,
    /// leaves from its node's address.
    pub bridge: bool,
}

impl Masquerade {
    /// In `lab` (whose pods the CNI plugins made as its agents' `--ip-masq` asked), with
    /// the agents masquerading or not now.
    pub(crate) fn in_lab(lab: &LabState, agents: bool) -> Self {
        Self {
            agents,
            bridge: !lab.masquerade,
        }
    }
}

/// The source address `to` sees from `from` in the lab: the node's address for a pod's
/// traffic a masquerade takes (see [`Masquerade`]), else the sender's own.
pub(crate) fn expected_source(
    topology: &Topology,
    from: &Host,
    to: &Host,
    masquerade: Masquerade,
) -> Option<Ipv4Addr> {
    let leaves_node = to.kind == Kind::Outside || to.node != from.node;
    let masqueraded = from.kind == Kind::Pod
        && (masquerade.agents && to.kind == Kind::Outside || masquerade.bridge && leaves_node);
    masqueraded
        .then(|| topology.node_of(from).map(|n| n.address))
        .flatten()
}

/// What a scenario predicts for the paths of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    Pass,
    Fail,
    /// Not part of what the scenario proves: reported as observed.
    Either,
}

impl Expect {
    pub(crate) fn admits(self, passed: bool) -> bool {
        match self {
            Expect::Pass => passed,
            Expect::Fail => !passed,
            Expect::Either => true,
        }
    }

    pub(crate) fn describe(self) -> &'static str {
        match self {
            Expect::Pass => "pass",
            Expect::Fail => "fail",
            Expect::Either => "may pass",
        }
    }
}

/// One source-destination pair and its two probes.
#[derive(Debug)]
pub(crate) struct Probe {
    /// A node, a pod or the outside host.
    pub from: String,
    pub to: Host,
    pub kind: PathKind,
    pub icmp: Outcome,
    pub tcp: Outcome,
}

impl Probe {
    /// Pings `to` from `from`, then exchanges bytes with its echo server; both must be
    /// seen from `expected` (the sender's own address when None).
    pub(crate) fn run(
        lab: &LabState,
        servers: &Servers,
        from: &Host,
        to: &Host,
        kind: PathKind,
        expected: Option<Ipv4Addr>,
    ) -> Self {
        let client = Client::new(lab.netns(&from.name));
        let outcome = |proto| {
            servers
                .exchange(&client, to, proto)
                .and_then(|e| e.seen_as(expected))
        };
        Probe {
            from: from.name.clone(),
            to: to.clone(),
            kind,
            icmp: outcome(Proto::Icmp),
            tcp: outcome(Proto::Tcp),
        }
    }
}

/// Outcomes of one protocol's probes over the paths of one kind.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProtoTally {
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
    pub(crate) fn describe(&self, paths: usize) -> String {
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
pub(crate) struct Tally {
    pub paths: usize,
    pub icmp: ProtoTally,
    pub tcp: ProtoTally,
}

pub(crate) struct Matrix {
    /// Row order: each node, then its pods, then the outside host.
    sources: Vec<String>,
    targets: Vec<Host>,
    probes: Vec<Probe>,
    /// TCP segments the hosts retransmitted while probing: a path that passes only
    /// thanks to retransmissions (lost first packets, a wrong MTU) shows here.
    retransmitted: u64,
}

/// Probes every pair, `parallel` pairs at a time, as `masquerade` says who masquerades;
/// fails only if the probing itself cannot run (or on Ctrl-C).
pub(crate) fn run(lab: &LabState, parallel: usize, masquerade: Masquerade) -> Result<Matrix> {
    let topology = &lab.topology;
    let hosts = topology.hosts();
    let targets: Vec<Host> = hosts
        .iter()
        .filter(|h| h.kind != Kind::Node)
        .cloned()
        .collect();
    let mut pairs = Vec::new();
    for from in &hosts {
        for to in targets.iter().filter(|t| t.name != from.name) {
            if from.kind == Kind::Outside && to.kind == Kind::Outside {
                continue;
            }
            let kind = PathKind::between(topology, from, to)?;
            let expected = expected_source(topology, from, to, masquerade);
            pairs.push((from, to, kind, expected));
        }
    }
    let sources: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
    // The outside host's connections all fail (its SYNs are retransmitted while they
    // wait): only the cluster's count.
    let senders: Vec<String> = hosts
        .iter()
        .filter(|h| h.kind != Kind::Outside)
        .map(|h| h.name.clone())
        .collect();
    let servers = Servers::start(lab, &targets)?;
    let retransmitted_before = retransmitted(lab, &senders)?;
    let probes = parallel::map(&pairs, parallel, |(from, to, kind, expected)| {
        Probe::run(lab, &servers, from, to, *kind, *expected)
    })?;
    let retransmitted = retransmitted(lab, &senders)? - retransmitted_before;
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
    pub(crate) fn tally(&self, kind: PathKind) -> Tally {
        let probes: Vec<&Probe> = self.probes.iter().filter(|p| p.kind == kind).collect();
        Tally {
            paths: probes.len(),
            icmp: ProtoTally::of(probes.iter().map(|p| &p.icmp)),
            tcp: ProtoTally::of(probes.iter().map(|p| &p.tcp)),
        }
    }

    /// The probes whose outcome `expect` does not admit, one line each.
    pub(crate) fn surprises(&self, expect: impl Fn(PathKind) -> Expect) -> Vec<String> {
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
    pub(crate) fn render(&self) -> String {
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
            "ICMP echo, round trip in ms\n{icmp}\nTCP connect + {} KiB each way + close, in ms\n{tcp}\n{summary}  TCP segments the nodes and pods retransmitted during the probes: {}\n",
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
