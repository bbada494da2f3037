//! A node reached at a public IP that is not its own: the node beyond the router is
//! published at an address of TEST-NET-3 that exists on no host, and the router
//! translates it, one to one, as a cloud's NAT gateway does (DNAT of the public address
//! to the node's, SNAT of the node's to the public one towards the other nodes).
//!
//! That is what flannel documents for `--public-ip` and the `public-ip` /
//! `public-ip-overwrite` annotations (flannel-io/flannel v0.28.9,
//! `Documentation/configuration.md`; `pkg/backend/ipip/ipip.go` publishes `ExtAddr`
//! and keeps the tunnel's `Local` at the interface's address): peers send to the
//! published address, the node's own tunnel keeps its interface's. Here the node list
//! gives the node the public address as its `public-ip` annotation, the way an agent
//! on the Kubernetes API publishes it; every agent re-reads the list.
//!
//! The proof: pods of the nodes on the switch exchange ICMP and TCP with a pod of the
//! translated node, both ways, while the router's two legs are captured. Towards the switch every
//! tunnel packet of the node carries the public address, behind the router only its
//! own; the exchanges complete. Then the list and the router are put back.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::Ipv4Addr,
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::lab::machinery::{
    agents,
    cluster::{self, ROUTER},
    interrupt::{self, Wait},
    netns,
    servers::Servers,
    state::LabState,
    text_table::Table,
    topology::{Host, Node, Pod},
};

use super::{
    capture::{Capture, Flow, Frame, classify, protocol_name},
    matrix::{Masquerade, PathKind, Probe, expected_source},
};

/// The translated node's published address (TEST-NET-3, on no host of the lab).
const PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 3);
/// The annotation the node list carries it in (flannel's default prefix).
const PUBLIC_IP_ANNOTATION: &str = "flannel.alpha.coreos.com/public-ip";
/// The list is polled every 500 ms; agents converge well within this.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct NatProof {
    node: String,
    address: Ipv4Addr,
    /// Router leg → tunnel flows seen there.
    seen: BTreeMap<String, BTreeMap<Flow, usize>>,
    exchanges: Vec<Probe>,
    failures: Vec<String>,
}

/// The node beyond the router and the pairs that talk to its first pod: the first
/// pod of each node on another segment, and its pod to the first of those.
fn plan(lab: &LabState) -> Result<(&Node, Vec<(Pod, Pod)>)> {
    let topology = &lab.topology;
    let first = topology.nodes.first().context("a lab without nodes")?;
    let natted = topology
        .nodes
        .iter()
        .find(|n| n.segment != first.segment)
        .context("the proof needs a node beyond the router")?;
    let first_pod = |n: &Node| {
        topology
            .pods_of(n)
            .into_iter()
            .next()
            .context("a node without pods")
    };
    let target = first_pod(natted)?;
    let mut pairs = Vec::new();
    for node in topology
        .nodes
        .iter()
        .filter(|n| n.segment != natted.segment)
    {
        pairs.push((first_pod(node)?, target.clone()));
    }
    // And one the translated node's pod opens.
    let back = pairs
        .first()
        .map(|(from, _)| (target.clone(), from.clone()));
    pairs.extend(back);
    Ok((natted, pairs))
}

/// The router's 1:1 NAT for `node`, in an nftables table of its own: removed, and the
/// router's conntrack emptied (no flow keeps a translation), when dropped.
struct Nat<'a> {
    lab: &'a LabState,
}

/// The router's table.
const NAT_TABLE: &str = "lab-public-ip";

impl<'a> Nat<'a> {
    fn install(lab: &'a LabState, node: &Node) -> Result<Self> {
        let router = lab.netns(ROUTER);
        // Tunnel flows tracked before the NAT would keep their untranslated entries.
        flush_conntrack(&router)?;
        let rules = format!(
            "table ip {NAT_TABLE} {{\n\
             chain prerouting {{ type nat hook prerouting priority dstnat; ip daddr {PUBLIC} dnat to {private}; }}\n\
             chain postrouting {{ type nat hook postrouting priority srcnat; ip saddr {private} oifname != \"eth-{segment}\" snat to {PUBLIC}; }}\n\
             }}\n",
            private = node.address,
            segment = node.segment,
        );
        netns::run_with_input(netns::command(&router, "nft").arg("-f").arg("-"), &rules)
            .context("installing the router's NAT")?;
        Ok(Nat { lab })
    }
}

impl Drop for Nat<'_> {
    fn drop(&mut self) {
        let router = self.lab.netns(ROUTER);
        let removed =
            netns::run(netns::command(&router, "nft").args(["delete", "table", "ip", NAT_TABLE]))
                .and_then(|_| flush_conntrack(&router));
        if let Err(e) = removed {
            eprintln!("removing the router's NAT: {e:#}");
        }
    }
}

fn flush_conntrack(ns: &str) -> Result<()> {
    netns::run(netns::command(ns, "conntrack").arg("-F")).map(drop)
}

/// The node list with `node` published at `address` (None: as the lab made it).
fn publish(lab: &LabState, node: &Node, address: Option<Ipv4Addr>) -> Result<()> {
    let mut list = lab.topology.node_list();
    if let Some(address) = address {
        let items = list["items"]
            .as_array_mut()
            .context("a node list without items")?;
        let item = items
            .iter_mut()
            .find(|i| i["metadata"]["name"] == node.name.as_str())
            .with_context(|| format!("{} is not in the node list", node.name))?;
        item["metadata"]["annotations"] =
            serde_json::json!({ PUBLIC_IP_ANNOTATION: address.to_string() });
    }
    cluster::write_json(lab.nodes_file(), &list)
}

/// Waits until every other agent sends `node`'s subnet to `address`.
fn converged(lab: &LabState, node: &Node, address: Ipv4Addr) -> Result<()> {
    let others: Vec<&Node> = lab
        .topology
        .nodes
        .iter()
        .filter(|n| n.name != node.name)
        .collect();
    interrupt::wait_until(
        &format!("every agent to reach {} at {address}", node.name),
        interrupt::scaled(CONVERGE_TIMEOUT),
        || {
            for other in &others {
                let view = agents::inspect_json(lab, other, "nodes")?;
                let sent_to = view["remote_subnets"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|r| r["subnet"] == node.pod_cidr.to_string())
                    .and_then(|r| r["node"].as_str().map(str::to_owned));
                if sent_to.as_deref() != Some(address.to_string().as_str()) {
                    return Ok(Wait::Pending(format!(
                        "{} sends to {sent_to:?}",
                        other.name
                    )));
                }
            }
            Ok(Wait::Done(()))
        },
    )
}

/// Runs the proof, leaving the lab as it found it.
pub(crate) fn run(lab: &LabState) -> Result<NatProof> {
    let (node, pairs) = plan(lab)?;
    let nat = Nat::install(lab, node)?;
    let proof = publish(lab, node, Some(PUBLIC))
        .and_then(|()| converged(lab, node, PUBLIC))
        .and_then(|()| exchange(lab, node, &pairs));
    // Back as before even when the proof failed half-way.
    drop(nat);
    let restored = publish(lab, node, None).and_then(|()| converged(lab, node, node.address));
    let mut proof = proof?;
    if let Err(e) = restored {
        proof
            .failures
            .push(format!("restoring the node list: {e:#}"));
    }
    Ok(proof)
}

/// The exchanges, captured on the router's legs.
fn exchange(lab: &LabState, node: &Node, pairs: &[(Pod, Pod)]) -> Result<NatProof> {
    let topology = &lab.topology;
    let router = lab.netns(ROUTER);
    let masquerade = Masquerade::in_lab(lab, lab.masquerade);
    let targets: Vec<Host> = pairs.iter().map(|(_, to)| to.clone().into()).collect();
    let servers = Servers::start(lab, &targets)?;
    // The router's legs towards the node and towards the pods that talk to it.
    let mut segments = vec![node.segment.clone()];
    for (from, _) in pairs {
        let segment = &topology.node(&from.node)?.segment;
        if !segments.contains(segment) {
            segments.push(segment.clone());
        }
    }
    let legs: Vec<String> = segments.iter().map(|s| format!("eth-{s}")).collect();
    let captures = legs
        .iter()
        .map(|leg| Capture::start(&router, leg))
        .collect::<Result<Vec<_>>>()?;
    let exchanges: Vec<Probe> = pairs
        .iter()
        .map(|(from, to)| {
            let (from, to) = (Host::from(from.clone()), Host::from(to.clone()));
            let expected = expected_source(topology, &from, &to, masquerade);
            Probe::run(lab, &servers, &from, &to, PathKind::Routed, expected)
        })
        .collect();
    let mut proof = NatProof {
        node: node.name.clone(),
        address: node.address,
        seen: BTreeMap::new(),
        exchanges,
        failures: Vec::new(),
    };
    for (leg, capture) in legs.iter().zip(&captures) {
        let (frames, dropped) = capture.drain()?;
        if dropped > 0 {
            proof
                .failures
                .push(format!("{leg}: the capture dropped {dropped} frames"));
        }
        let seen = proof.seen.entry(leg.clone()).or_default();
        for frame in &frames {
            if let Frame::Tunnelled(flow) = classify(frame, topology.pod_network) {
                *seen.entry(flow).or_default() += 1;
            }
        }
    }
    proof.judge(&format!("eth-{}", node.segment));
    Ok(proof)
}

impl NatProof {
    /// Towards the node: its own address only; elsewhere the public one only; and
    /// both directions of every exchange on both sides.
    fn judge(&mut self, node_leg: &str) {
        for e in &self.exchanges {
            for (proto, outcome) in [("ICMP", &e.icmp), ("TCP", &e.tcp)] {
                if let Err(f) = outcome {
                    self.failures
                        .push(format!("{} → {} {proto} failed: {f}", e.from, e.to.name));
                }
            }
        }
        for (leg, flows) in &self.seen {
            let (wanted, unwanted) = if leg == node_leg {
                (self.address, PUBLIC)
            } else {
                (PUBLIC, self.address)
            };
            let outers: BTreeSet<(Ipv4Addr, Ipv4Addr)> = flows.keys().map(|f| f.outer).collect();
            let with = |a: Ipv4Addr| outers.iter().filter(move |(s, d)| *s == a || *d == a);
            for (src, dst) in with(unwanted) {
                self.failures.push(format!(
                    "{leg}: tunnel packets {src} → {dst} carry {unwanted}"
                ));
            }
            for outgoing in [true, false] {
                let found = with(wanted).any(|(src, _)| (*src == wanted) == outgoing);
                if !found && !flows.is_empty() {
                    self.failures.push(format!(
                        "{leg}: no tunnel packet {} {wanted}",
                        if outgoing { "from" } else { "to" }
                    ));
                }
            }
            if flows.is_empty() {
                self.failures
                    .push(format!("{leg}: no tunnel packet at all"));
            }
        }
    }

    pub(crate) fn failures(&self) -> &[String] {
        &self.failures
    }

    pub(crate) fn render(&self) -> String {
        let mut out = format!(
            "{} published at {PUBLIC}, which the router translates to {} and back\n",
            self.node, self.address
        );
        let mut table = Table::new([
            "router leg",
            "outer source → destination",
            "inner",
            "",
            "packets",
        ])
        .align_right([4]);
        for (leg, flows) in &self.seen {
            for (flow, count) in flows {
                table.row([
                    leg.clone(),
                    format!("{} → {}", flow.outer.0, flow.outer.1),
                    format!("{} → {}", flow.inner.0, flow.inner.1),
                    protocol_name(flow.protocol),
                    count.to_string(),
                ]);
            }
        }
        out.push_str(&table.to_string());
        for e in &self.exchanges {
            let ok = |r: bool| if r { "ok" } else { "failed" };
            let _ = writeln!(
                out,
                "{} → {}: ICMP {}, TCP {}",
                e.from,
                e.to.name,
                ok(e.icmp.is_ok()),
                ok(e.tcp.is_ok())
            );
        }
        for f in &self.failures {
            let _ = writeln!(out, "  ✗ {f}");
        }
        out
    }
}
