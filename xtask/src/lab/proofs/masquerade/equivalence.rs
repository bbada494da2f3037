//! Equivalence with flanneld's iptables masquerade: the same exchanges (ICMP, TCP, UDP)
//! between every source and every destination of the lab, once with the BPF masquerade
//! and once with agents that run without `--ip-masq` under flanneld's rules in
//! iptables. For every pair and protocol, whether it passes and which source address the
//! destination saw must be the same.
//!
//! Sources: every node, every node with its socket bound to the node address (rule 6),
//! every pod, the outside host. Destinations: every node, pod, and the outside host.
//! During the runs the router routes each pod subnet into the cluster, half of them
//! through the node that owns it (rule 4) and half through another node (rule 6), so
//! that every pair is reachable: the BPF run must pass everywhere, or agreeing
//! failures could pass for equivalence.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use anyhow::{Context as _, Result};
use ipnet::Ipv4Net;

use super::iptables::Variant;

use crate::lab::machinery::{
    parallel,
    probe::{Client, Exchange, Failure, Proto},
    router::RouterRoutes,
    servers::Servers,
    state::LabState,
    text_table::Table,
    topology::{Host, Kind, Node, Topology},
};

use super::section::{Section, verdict};

/// Exchanges in flight: timings do not matter here, and failures wait for timeouts.
const IN_FLIGHT: usize = 8;

struct Source {
    label: String,
    host: Host,
    client: Client,
    bound: bool,
}

struct Pair {
    source: usize,
    target: usize,
    category: &'static str,
    /// The node the router sends the target's subnet to (outside → pod).
    entry: Option<String>,
}

/// Who talks to whom, and the router's routes during the runs.
pub(super) struct Plan {
    sources: Vec<Source>,
    targets: Vec<Host>,
    pairs: Vec<Pair>,
    routes: Vec<(Ipv4Net, Ipv4Addr)>,
}

/// One run of every pair: per pair, one outcome per protocol of [`Proto::ALL`].
pub(super) struct Run {
    name: String,
    outcomes: Vec<Vec<Result<Exchange, Failure>>>,
}

pub(super) fn plan(lab: &LabState) -> Result<Plan> {
    let topology = &lab.topology;
    let hosts = topology.hosts();
    let mut sources = Vec::new();
    for host in &hosts {
        let client = Client::new(lab.netns(&host.name));
        sources.push(Source {
            label: host.name.clone(),
            host: host.clone(),
            client: client.clone(),
            bound: false,
        });
        if host.kind == Kind::Node {
            sources.push(Source {
                label: format!("{} bound", host.name),
                host: host.clone(),
                client: client.bound(host.address),
                bound: true,
            });
        }
    }
    // Even nodes' subnets through their own node, odd ones' through the node before.
    let entries: BTreeMap<String, &Node> = topology
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.clone(), &topology.nodes[i - i % 2]))
        .collect();
    let routes = topology
        .nodes
        .iter()
        .map(|n| (n.pod_cidr, entries[&n.name].address))
        .collect();
    let mut pairs = Vec::new();
    for (s, source) in sources.iter().enumerate() {
        for (t, target) in hosts.iter().enumerate() {
            if target.name == source.host.name {
                continue;
            }
            let entry = match (source.host.kind, target.kind) {
                (Kind::Outside, Kind::Pod) => target.node.as_ref().map(|n| entries[n].name.clone()),
                _ => None,
            };
            pairs.push(Pair {
                source: s,
                target: t,
                category: category(source, target, entry.as_deref()),
                entry,
            });
        }
    }
    let plan = Plan {
        sources,
        targets: hosts,
        pairs,
        routes,
    };
    check_plan(&plan)?;
    Ok(plan)
}

/// Which of flanneld's rules a pair exercises.
fn category(source: &Source, target: &Host, entry: Option<&str>) -> &'static str {
    let same_node = source.host.node.is_some() && source.host.node == target.node;
    match (source.host.kind, source.bound, target.kind) {
        (Kind::Pod, _, Kind::Pod) if same_node => "pod → pod, same node (2, 3)",
        (Kind::Pod, _, Kind::Pod) => "pod → pod, other node (2, 3)",
        (Kind::Pod, _, Kind::Node) if same_node => "pod → its node (local)",
        (Kind::Pod, _, Kind::Node) => "pod → other node (5)",
        (Kind::Pod, _, Kind::Outside) => "pod → outside (5)",
        (Kind::Node, false, Kind::Pod) if same_node => "node → its pods (4)",
        (Kind::Node, false, Kind::Pod) => "node → remote pod, from gateway (2)",
        (Kind::Node, true, Kind::Pod) if same_node => "node bound → its pods (4)",
        (Kind::Node, true, Kind::Pod) => "node bound → remote pod (6)",
        (Kind::Node, _, Kind::Node) => "node → node",
        (Kind::Node, _, Kind::Outside) => "node → outside",
        (Kind::Outside, _, Kind::Node) => "outside → node",
        (Kind::Outside, _, Kind::Pod) if entry == target.node.as_deref() => {
            "outside → pod via its node (4)"
        }
        (Kind::Outside, _, Kind::Pod) => "outside → pod via other node (6)",
        (Kind::Outside, _, Kind::Outside) => "outside → outside",
    }
}

/// Every pair once, with the router's routes in place for the run.
pub(super) fn run(lab: &LabState, servers: &Servers, plan: &Plan, name: &str) -> Result<Run> {
    let _routes = RouterRoutes::install(lab, &plan.routes)?;
    let outcomes = parallel::map(&plan.pairs, IN_FLIGHT, |pair| {
        let source = &plan.sources[pair.source];
        let target = &plan.targets[pair.target];
        Proto::ALL
            .into_iter()
            .map(|proto| servers.exchange(&source.client, target, proto))
            .collect()
    })?;
    Ok(Run {
        name: name.to_owned(),
        outcomes,
    })
}

/// Whether two outcomes are the same: both failed, or both passed seen from the same
/// address.
fn same(a: &Result<Exchange, Failure>, b: &Result<Exchange, Failure>) -> bool {
    match (a, b) {
        (Ok(a), Ok(b)) => a.seen == b.seen,
        (Err(_), Err(_)) => true,
        _ => false,
    }
}

fn show(outcome: &Result<Exchange, Failure>) -> String {
    match outcome {
        Ok(e) => format!(
            "passed, seen from {}",
            e.seen.map_or("(not recorded)".into(), |s| s.to_string())
        ),
        Err(f) => format!("failed: {f}"),
    }
}

pub(super) struct Comparison<'a> {
    topology: &'a Topology,
    plan: &'a Plan,
    ours: Run,
    theirs: Run,
    /// flanneld's rules word for word: shown, not judged.
    verbatim: Run,
}

impl<'a> Comparison<'a> {
    pub(super) fn new(
        topology: &'a Topology,
        plan: &'a Plan,
        ours: Run,
        theirs: Run,
        verbatim: Run,
    ) -> Self {
        Self {
            topology,
            plan,
            ours,
            theirs,
            verbatim,
        }
    }

    /// (pair, protocol) where `run` differs from ours.
    fn differences<'r>(&'r self, run: &'r Run) -> impl Iterator<Item = (usize, Proto)> + 'r {
        self.plan.pairs.iter().enumerate().flat_map(move |(i, _)| {
            Proto::ALL
                .into_iter()
                .enumerate()
                .filter(move |(p, _)| !same(&self.ours.outcomes[i][*p], &run.outcomes[i][*p]))
                .map(move |(_, proto)| (i, proto))
        })
    }

    fn describe_pair(&self, i: usize) -> String {
        let pair = &self.plan.pairs[i];
        let via = pair
            .entry
            .as_ref()
            .map(|e| format!(" via {e}"))
            .unwrap_or_default();
        format!(
            "{} → {}{via}",
            self.plan.sources[pair.source].label, self.plan.targets[pair.target].name
        )
    }

    /// Per category, how many pairs differ from ours in `run`.
    fn differing_pairs(&self, run: &Run) -> BTreeMap<&'static str, usize> {
        let pairs: BTreeSet<usize> = self.differences(run).map(|(i, _)| i).collect();
        let mut per_category = BTreeMap::new();
        for i in pairs {
            *per_category.entry(self.plan.pairs[i].category).or_default() += 1;
        }
        per_category
    }

    fn difference_lines(&self, run: &Run) -> Vec<String> {
        self.differences(run)
            .map(|(i, proto)| {
                let p = Proto::ALL
                    .iter()
                    .position(|x| *x == proto)
                    .expect("a protocol");
                format!(
                    "{} {}: {} {}, {} {}",
                    self.describe_pair(i),
                    proto.name(),
                    self.ours.name,
                    show(&self.ours.outcomes[i][p]),
                    run.name,
                    show(&run.outcomes[i][p])
                )
            })
            .collect()
    }

    /// How the destination saw the source, relative to the source: "own address",
    /// "node address", "node gateway", "entry gateway" or the address itself.
    fn seen_as(&self, pair: &Pair, outcome: &Result<Exchange, Failure>) -> Option<String> {
        let e = outcome.as_ref().ok()?;
        let Some(seen) = e.seen else {
            return Some("unrecorded".into());
        };
        let source = &self.plan.sources[pair.source];
        let node = self.topology.node_of(&source.host);
        let entry = pair.entry.as_ref().and_then(|n| self.topology.node(n).ok());
        Some(
            if seen == *e.local.ip() {
                "own address"
            } else if node.is_some_and(|n| n.address == seen) {
                "node address"
            } else if node.is_some_and(|n| n.gateway() == seen) {
                "node gateway"
            } else if entry.is_some_and(|n| n.gateway() == seen) {
                "entry's gateway"
            } else if entry.is_some_and(|n| n.address == seen) {
                "entry's address"
            } else {
                return Some(seen.to_string());
            }
            .to_owned(),
        )
    }

    /// Per category: pairs, passes per protocol and how sources were seen, for `run`.
    fn tally(&self, run: &Run, category: &str) -> (usize, String, String) {
        let mut passed = [0usize; 3];
        let mut seen = BTreeSet::new();
        let mut pairs = 0;
        for (i, pair) in self.plan.pairs.iter().enumerate() {
            if pair.category != category {
                continue;
            }
            pairs += 1;
            for (p, outcome) in run.outcomes[i].iter().enumerate() {
                passed[p] += usize::from(outcome.is_ok());
                seen.extend(self.seen_as(pair, outcome));
            }
        }
        let passed = passed.map(|n| n.to_string()).join("/");
        let seen = if seen.is_empty() {
            "-".to_owned()
        } else {
            seen.into_iter().collect::<Vec<_>>().join(", ")
        };
        (pairs, passed, seen)
    }

    fn categories(&self) -> Vec<&'static str> {
        let mut seen = Vec::new();
        for pair in &self.plan.pairs {
            if !seen.contains(&pair.category) {
                seen.push(pair.category);
            }
        }
        seen
    }

    fn grid(&self) -> Table {
        let header = std::iter::once("FROM \\ TO".to_owned())
            .chain(self.plan.targets.iter().map(|t| t.name.clone()));
        let mut table = Table::new(header);
        for (s, source) in self.plan.sources.iter().enumerate() {
            let cells = (0..self.plan.targets.len()).map(|t| {
                let Some(i) = self
                    .plan
                    .pairs
                    .iter()
                    .position(|p| p.source == s && p.target == t)
                else {
                    return String::new();
                };
                (0..Proto::ALL.len())
                    .map(|p| {
                        let (a, b) = (&self.ours.outcomes[i][p], &self.theirs.outcomes[i][p]);
                        match (same(a, b), a.is_ok()) {
                            (false, _) => '✗',
                            (true, true) => '✓',
                            (true, false) => '·',
                        }
                    })
                    .collect()
            });
            table.row(std::iter::once(source.label.clone()).chain(cells));
        }
        table
    }

    fn render_verbatim(&self, verbatim: &Run) -> String {
        let mut table = Table::new([
            "PAIRS (flanneld rule)",
            "N",
            "VERBATIM I/T/U",
            "SOURCE SEEN AS (VERBATIM)",
            "VS BPF",
        ])
        .align_right([1, 2]);
        let differing = self.differing_pairs(verbatim);
        for category in self.categories() {
            let (n, passed, seen) = self.tally(verbatim, category);
            let differ = differing.get(category).copied().unwrap_or(0);
            if differ > 0 {
                table.row([
                    category.to_owned(),
                    n.to_string(),
                    passed,
                    seen,
                    format!("{differ} pairs differ"),
                ]);
            }
        }
        format!(
            "\nFor information, {}: where it differs from the BPF masquerade (not judged; see lab/proofs/masquerade/iptables.rs for why)\n{table}",
            Variant::Verbatim.describe()
        )
    }
}

impl Section for Comparison<'_> {
    /// Every difference from iptables, and every exchange the BPF run failed: with the
    /// router's routes in place every pair is reachable, so two runs that failed alike
    /// would prove nothing.
    fn failures(&self) -> Vec<String> {
        let mut failures = self.difference_lines(&self.theirs);
        for (i, outcomes) in self.ours.outcomes.iter().enumerate() {
            for (proto, outcome) in Proto::ALL.iter().zip(outcomes) {
                let why = match outcome {
                    Err(f) => f.to_string(),
                    Ok(e) if e.seen.is_none() => "the destination recorded no source".into(),
                    Ok(_) => continue,
                };
                failures.push(format!(
                    "{} {} with the BPF masquerade: {why}",
                    self.describe_pair(i),
                    proto.name()
                ));
            }
        }
        failures
    }

    fn render(&self) -> String {
        let mut summary = Table::new([
            "PAIRS (flanneld rule)",
            "N",
            "BPF I/T/U",
            "IPTABLES I/T/U",
            "SOURCE SEEN AS (BPF)",
            "SOURCE SEEN AS (IPTABLES)",
            "SAME",
        ])
        .align_right([1, 2, 3]);
        let differing = self.differing_pairs(&self.theirs);
        for category in self.categories() {
            let (n, ours, ours_seen) = self.tally(&self.ours, category);
            let (_, theirs, theirs_seen) = self.tally(&self.theirs, category);
            let differ = differing.get(category).copied().unwrap_or(0);
            summary.row([
                category.to_owned(),
                n.to_string(),
                ours,
                theirs,
                ours_seen,
                theirs_seen,
                if differ == 0 {
                    "✓".to_owned()
                } else {
                    format!("✗ {differ} pairs differ")
                },
            ]);
        }
        let mut out = format!(
            "BPF masquerade vs {}; router: {}\n{summary}",
            Variant::Flanneld.describe(),
            self.plan
                .routes
                .iter()
                .map(|(d, v)| format!("{d} via {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        out.push_str(&format!(
            "\nEvery pair, ICMP/TCP/UDP: ✓ both passed and the destination saw the same source, · both failed, ✗ different\n{}",
            self.grid()
        ));
        let pairs = self.plan.pairs.len();
        out.push_str(&format!(
            "  {}\n",
            verdict(
                &format!(
                    "all {pairs} pairs × 3 protocols passed under both, each seen from the same source address"
                ),
                &Section::failures(self),
            )
        ));
        out.push_str(&self.render_verbatim(&self.verbatim));
        out
    }
}

/// Checks the plan covers what the comparison is for: pairs of every rule.
fn check_plan(plan: &Plan) -> Result<()> {
    for needed in [
        "node bound → remote pod (6)",
        "outside → pod via other node (6)",
        "outside → pod via its node (4)",
        "pod → outside (5)",
    ] {
        plan.pairs
            .iter()
            .find(|p| p.category == needed)
            .with_context(|| format!("the comparison plan has no pair \"{needed}\""))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab() -> LabState {
        LabState {
            id: "test".into(),
            agent: "overlay-agent".into(),
            masquerade: true,
            fast_path: true,
            topology: Topology::kind(),
        }
    }

    #[test]
    fn every_pair_of_the_lab_once_with_its_rule() {
        let plan = plan(&lab()).unwrap();
        // 4 nodes, 4 bound nodes, 8 pods, the outside host; to all 13 hosts but itself.
        assert_eq!(plan.sources.len(), 17);
        assert_eq!(plan.targets.len(), 13);
        assert_eq!(plan.pairs.len(), 17 * 13 - 17);
        let count = |category: &str| plan.pairs.iter().filter(|p| p.category == category).count();
        assert_eq!(count("node bound → remote pod (6)"), 4 * 6);
        assert_eq!(count("pod → outside (5)"), 8);
        assert_eq!(count("pod → other node (5)"), 8 * 3);
        assert_eq!(count("outside → pod via other node (6)"), 4);
        assert_eq!(count("outside → pod via its node (4)"), 4);
        let routes: Vec<String> = plan
            .routes
            .iter()
            .map(|(d, v)| format!("{d} via {v}"))
            .collect();
        assert_eq!(
            routes,
            [
                "10.244.0.0/24 via 172.18.0.2",
                "10.244.1.0/24 via 172.18.0.2",
                "10.244.2.0/24 via 172.18.0.4",
                "10.244.3.0/24 via 172.18.0.4",
            ]
        );
        let via = plan
            .pairs
            .iter()
            .find(|p| {
                plan.targets[p.target].name == "w3-pod1"
                    && plan.sources[p.source].label == "outside"
            })
            .unwrap();
        assert_eq!(via.entry.as_deref(), Some("w2"));
    }

    #[test]
    fn outcomes_are_the_same_when_reachability_and_source_agree() {
        let exchange = |seen: [u8; 4]| -> Result<Exchange, Failure> {
            Ok(Exchange {
                time: std::time::Duration::ZERO,
                local: "10.244.1.2:1".parse().unwrap(),
                remote: "198.51.100.10:2".parse().unwrap(),
                seen: Some(seen.into()),
            })
        };
        let failed = || -> Result<Exchange, Failure> { Err(Failure::Timeout) };
        assert!(same(&exchange([172, 18, 0, 3]), &exchange([172, 18, 0, 3])));
        assert!(!same(
            &exchange([172, 18, 0, 3]),
            &exchange([10, 244, 1, 1])
        ));
        assert!(!same(&exchange([172, 18, 0, 3]), &failed()));
        assert!(same(&failed(), &Err(Failure::Refused)));
    }
}
