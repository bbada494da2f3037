//! Every pod to the outside host over TCP, UDP and ICMP, and the source address the
//! outside saw: the pod's node's uplink address when the agents masquerade (rule 5),
//! the pod's own address when they do not.

use std::net::Ipv4Addr;

use anyhow::Result;

use crate::lab::machinery::{
    parallel,
    probe::{self, Client, Exchange, Failure, Proto},
    servers::Servers,
    state::LabState,
    text_table::Table,
    topology::{Host, Pod},
};

use super::section::{Section, verdict};

/// Exchanges in flight at once: a few, all short.
const IN_FLIGHT: usize = 4;

struct Row {
    pod: Pod,
    node_address: Ipv4Addr,
    expected: Ipv4Addr,
    /// One exchange per protocol, in [`Proto::ALL`] order.
    results: Vec<Result<Exchange, Failure>>,
}

pub(super) struct OutsideCheck {
    masquerade: bool,
    rows: Vec<Row>,
}

/// Runs the exchanges; the outside host must be among `servers`.
pub(super) fn run(lab: &LabState, servers: &Servers, masquerade: bool) -> Result<OutsideCheck> {
    let topology = &lab.topology;
    let outside = Host::from(&topology.outside);
    let pods = topology.pods();
    let items: Vec<(&Pod, Proto)> = pods
        .iter()
        .flat_map(|pod| Proto::ALL.map(|proto| (pod, proto)))
        .collect();
    let mut results = parallel::map(&items, IN_FLIGHT, |(pod, proto)| {
        servers.exchange(&Client::new(lab.netns(&pod.name)), &outside, *proto)
    })?
    .into_iter();
    let mut rows = Vec::new();
    for pod in pods {
        let node_address = topology.node(&pod.node)?.address;
        rows.push(Row {
            expected: if masquerade {
                node_address
            } else {
                pod.address
            },
            node_address,
            results: results.by_ref().take(Proto::ALL.len()).collect(),
            pod,
        });
    }
    Ok(OutsideCheck { masquerade, rows })
}

impl Row {
    fn judged(&self) -> impl Iterator<Item = (Proto, probe::Outcome)> + '_ {
        Proto::ALL.into_iter().zip(&self.results).map(|(proto, r)| {
            (
                proto,
                r.clone().and_then(|e| e.seen_as(Some(self.expected))),
            )
        })
    }
}

impl Section for OutsideCheck {
    fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        for row in &self.rows {
            for (proto, outcome) in row.judged() {
                if let Err(f) = outcome {
                    failures.push(format!("{} → outside {}: {f}", row.pod.name, proto.name()));
                }
            }
        }
        failures
    }

    fn render(&self) -> String {
        let header = ["POD", "NODE", "NODE ADDRESS", "EXPECTED SOURCE"]
            .into_iter()
            .map(str::to_owned)
            .chain(Proto::ALL.map(|p| format!("{} SEEN", p.name())));
        let mut table = Table::new(header);
        for row in &self.rows {
            let cells = Proto::ALL
                .into_iter()
                .zip(&row.results)
                .map(|(_, r)| match r {
                    Ok(e) => match e.seen {
                        Some(seen) if seen == row.expected => format!("✓ {seen}"),
                        Some(seen) => format!("✗ {seen}"),
                        None => "✗ not recorded".to_owned(),
                    },
                    Err(f) => format!("✗ {}", f.short()),
                });
            table.row(
                [
                    row.pod.name.clone(),
                    row.pod.node.clone(),
                    row.node_address.to_string(),
                    row.expected.to_string(),
                ]
                .into_iter()
                .chain(cells),
            );
        }
        let failures = self.failures();
        let what = if self.masquerade {
            "its node's address (masqueraded, rule 5)"
        } else {
            "the pod's own address (not masqueraded)"
        };
        let verdict = verdict(
            &format!("every pod reached the outside over TCP, UDP and ICMP, seen as {what}"),
            &failures,
        );
        format!("{table}  {verdict}\n")
    }
}
