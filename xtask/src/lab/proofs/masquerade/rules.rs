//! flanneld's masquerade rule 6 checked case by case, each by what the destination saw
//! and by what the translating node's connection table lists (`overlay-agent nat`):
//!
//! - 6a: every node's own socket bound to the node's address talks to a pod on another
//!   node: left alone, as everything that leaves from the uplink's own address (it is
//!   what the host's own masquerade gives too, and a second NAT flanneld's rules never
//!   add), so the pod sees the node's address and no flow is listed. (Unbound, the
//!   node's traffic leaves from the gateway: rule 2.)
//! - 6b: the outside host talks to a pod on node Y through node X, because a route on
//!   the router sends Y's pod subnet to X: the pod sees X's gateway, the replies find
//!   their way back through X, and X lists the flows under rule 6.
//!
//! Rule 1 (kube-proxy's mark) is left to the packet tests, which mark packets from any
//! source, and to the Kubernetes section, where kube-proxy marks and masquerades.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result};

use crate::lab::machinery::{
    probe::{Client, Exchange, Failure, Proto},
    router::RouterRoutes,
    servers::Servers,
    state::LabState,
    text_table::Table,
    topology::{Host, Node},
};

use super::section::{Section, verdict};

use super::nat_table::NatTable;

/// What an exchange must look like: the source its destination sees, and what the
/// translating node's table lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expected {
    /// Seen from this address, listed as a rule 6 flow translated to it.
    TranslatedTo(Ipv4Addr),
    /// Seen from this address (the sender's own), no translated flow listed.
    Untranslated(Ipv4Addr),
}

impl Expected {
    fn source(self) -> Ipv4Addr {
        match self {
            Expected::TranslatedTo(a) | Expected::Untranslated(a) => a,
        }
    }
}

struct Row {
    rule: &'static str,
    from: String,
    to: Host,
    proto: Proto,
    /// The node whose table is read.
    node: Node,
    expected: Expected,
    outcome: Result<Exchange, Failure>,
    /// What the table said about the flow, or why it does not hold.
    listed: Result<String, String>,
}

pub(super) struct RuleChecks {
    rows: Vec<Row>,
    /// The route 6b put on the router (removed since).
    router_route: String,
}

/// Runs the checks with masquerading agents; `servers` must serve every pod.
pub(super) fn run(lab: &LabState, servers: &Servers) -> Result<RuleChecks> {
    let topology = &lab.topology;
    let nodes = &topology.nodes;
    let first_pod = |node: &Node| -> Result<Host> {
        Ok(topology
            .pods_of(node)
            .into_iter()
            .next()
            .context("a node without pods")?
            .into())
    };
    let mut rows = Vec::new();
    // The node's table is read right after its exchanges: even closed TCP flows stay
    // listed for seconds (tcp_closed, 10 s), but not for a whole step under emulation.
    let mut check = |rule, from: String, client: Client, to: Host, node: &Node, expected| {
        let mut done: Vec<Row> = Proto::ALL
            .into_iter()
            .map(|proto| Row {
                rule,
                from: from.clone(),
                to: to.clone(),
                proto,
                node: node.clone(),
                expected,
                outcome: servers.exchange(&client, &to, proto),
                listed: Err("not read".into()),
            })
            .collect();
        let table = NatTable::read(lab, node)?;
        for row in &mut done {
            row.listed = row.check_table(&table);
        }
        rows.extend(done);
        anyhow::Ok(())
    };

    // 6a: each node to a pod of the next node.
    for (i, node) in nodes.iter().enumerate() {
        let to = first_pod(&nodes[(i + 1) % nodes.len()])?;
        let client = Client::new(lab.netns(&node.name)).bound(node.address);
        let from = format!("{} bound to {}", node.name, node.address);
        check(
            "6a",
            from,
            client,
            to,
            node,
            Expected::Untranslated(node.address),
        )?;
    }

    // 6b: the outside to a pod of the last node, entering through another node.
    let entry = &nodes[1 % nodes.len()];
    let target = nodes
        .iter()
        .rev()
        .find(|n| n.name != entry.name)
        .context("6b needs two nodes")?;
    let route = RouterRoutes::install(lab, &[(target.pod_cidr, entry.address)])?;
    let router_route = route.describe();
    let outside = &topology.outside;
    check(
        "6b",
        format!("{} via {}", outside.name, entry.name),
        Client::new(lab.netns(&outside.name)),
        first_pod(target)?,
        entry,
        Expected::TranslatedTo(entry.gateway()),
    )?;
    drop(route);

    Ok(RuleChecks { rows, router_route })
}

impl Row {
    fn check_table(&self, table: &NatTable) -> Result<String, String> {
        let Ok(exchange) = &self.outcome else {
            return Err("no exchange to look for".into());
        };
        let dst = exchange.remote;
        let flow = table.find(self.proto, exchange.local, dst);
        match (self.expected, flow) {
            (Expected::TranslatedTo(addr), Some(f))
                if f.rule == Some(6) && f.translated.map(|t| *t.ip()) == Some(addr) =>
            {
                Ok(f.describe())
            }
            (Expected::TranslatedTo(_), Some(f)) => Err(format!("listed as {}", f.describe())),
            (Expected::TranslatedTo(_), None) => Err(format!(
                "{} lists no flow {} → {dst}",
                self.node.name, exchange.local
            )),
            (Expected::Untranslated(_), None) => Ok("no flow: left alone".into()),
            (Expected::Untranslated(_), Some(f)) if f.translated.is_none() => {
                Ok(format!("tracked, untranslated: {}", f.describe()))
            }
            (Expected::Untranslated(_), Some(f)) => Err(format!("translated: {}", f.describe())),
        }
    }

    fn verdict(&self) -> Result<(), String> {
        let exchange = self.outcome.as_ref().map_err(|f| f.to_string())?;
        exchange
            .seen_as(Some(self.expected.source()))
            .map_err(|f| f.to_string())?;
        self.listed.as_ref().map(drop).map_err(Clone::clone)
    }
}

impl Section for RuleChecks {
    fn failures(&self) -> Vec<String> {
        self.rows
            .iter()
            .filter_map(|r| {
                r.verdict().err().map(|why| {
                    format!(
                        "rule {}: {} → {} {}: {why}",
                        r.rule,
                        r.from,
                        r.to.name,
                        r.proto.name()
                    )
                })
            })
            .collect()
    }

    fn render(&self) -> String {
        let mut table = Table::new([
            "RULE",
            "FROM",
            "TO",
            "PROTO",
            "EXPECTED",
            "SEEN",
            "NAT TABLE OF",
            "LISTS",
            "",
        ]);
        for r in &self.rows {
            let seen = match &r.outcome {
                Ok(e) => e.seen.map_or("not recorded".into(), |s| s.to_string()),
                Err(f) => format!("✗ {}", f.short()),
            };
            let listed = match &r.listed {
                Ok(what) | Err(what) => what.clone(),
            };
            table.row([
                r.rule.to_owned(),
                r.from.clone(),
                format!("{} {}", r.to.name, r.to.address),
                r.proto.name().to_owned(),
                r.expected.source().to_string(),
                seen,
                r.node.name.clone(),
                listed,
                if r.verdict().is_ok() { "✓" } else { "✗" }.to_owned(),
            ]);
        }
        let verdict = verdict(
            "rule 6 translates to the sender's pod gateway and is listed as such; marked packets are left alone",
            &self.failures(),
        );
        format!(
            "{table}  6b ran with a route on the router: {} (removed since)\n  {verdict}\n",
            self.router_route
        )
    }
}
