//! Negative controls: proof that the overlay, and nothing else in the lab, carries the
//! cross-node traffic.
//!
//! (a) Without agents (programs detached, routes removed) no cross-node pair works,
//!     and pods no longer reach the outside host: nothing masquerades them, and the
//!     router has no route back to a pod.
//! (b) With flannel host-gw routes instead (`podCIDR via nodeIP`), the nodes on one
//!     switch reach each other, but nothing reaches across the router: w3's address is
//!     not on-link, so its routes are refused and the router knows no pod subnet.
//! (c) With the agents back, the whole matrix passes again.
//!
//! Throughout, nodes reach the outside host (plain routing) and the outside host
//! reaches no pod.

use std::process::Command;

use anyhow::Result;

use crate::lab::machinery::{
    agents::{self, UPLINK},
    netns,
    state::LabState,
    text_table::Table,
};

use super::matrix::{self, Expect, Masquerade, Matrix, PathKind};

/// The controls' matrices are mostly failures, each waiting for its timeout (the router
/// has no route back to the pods to report the error): many in flight at once. Their
/// timings are not shown.
const PROBES_IN_FLIGHT: usize = 32;
/// The host-gw routes' protocol, to remove exactly them.
const HOST_GW_PROTO: &str = "static";

struct Row {
    step: &'static str,
    what: String,
    expected: String,
    observed: String,
    /// None: informational.
    ok: Option<bool>,
}

pub(crate) struct Controls {
    rows: Vec<Row>,
    surprises: Vec<String>,
}

/// Runs the three controls and leaves the lab as it found it (agents running), also
/// when a control cannot run to its end.
pub(crate) fn run(lab: &LabState) -> Result<Controls> {
    let result = controls(lab);
    if result.is_err() {
        // Best effort on the way out; the error that got us here is the one to report.
        match restore(lab) {
            Ok(()) => eprintln!(
                "lab {} restored: host-gw routes removed, every agent running",
                lab.id
            ),
            Err(e) => eprintln!("restoring lab {} after the controls: {e:#}", lab.id),
        }
    }
    result
}

fn controls(lab: &LabState) -> Result<Controls> {
    let mut report = Controls {
        rows: Vec::new(),
        surprises: Vec::new(),
    };

    println!("(a) stopping every agent and removing what it installed");
    agents::stop_all(lab)?;
    for node in &lab.topology.nodes {
        agents::cleanup(lab, node, &[])?;
    }
    let mut leftovers = Vec::new();
    for node in &lab.topology.nodes {
        let routes = agents::overlay_routes(&lab.netns(&node.name))?;
        leftovers.extend(routes.iter().map(|r| format!("{}: route {r}", node.name)));
        leftovers.extend(
            agents::all_attached(lab, node)?
                .into_iter()
                .map(|p| format!("{}: {p}", node.name)),
        );
    }
    report.rows.push(Row {
        step: "(a) agents stopped",
        what: "agent programs and routes".into(),
        expected: "gone".into(),
        observed: if leftovers.is_empty() {
            "gone on every node".into()
        } else {
            leftovers.join(", ")
        },
        ok: Some(leftovers.is_empty()),
    });
    // Without agents nothing of ours masquerades: a pod's packets reach the outside host
    // under its own address, and no reply finds its way back; unless the lab was made
    // without --ip-masq, where the bridge plugin masquerades them itself.
    let bridge_only = Masquerade::in_lab(lab, false);
    let to_outside = if bridge_only.bridge {
        Expect::Pass
    } else {
        Expect::Fail
    };
    report.matrix(
        "(a) agents stopped",
        &matrix::run(lab, PROBES_IN_FLIGHT, bridge_only)?,
        |kind| match kind {
            PathKind::SameNode | PathKind::NodeToOutside => Expect::Pass,
            PathKind::PodToOutside => to_outside,
            PathKind::SameSwitch | PathKind::Routed | PathKind::OutsideToPod => Expect::Fail,
        },
    );

    println!("(b) installing host-gw routes instead");
    let (installed, refused) = install_host_gw(lab, false)?;
    report.rows.push(Row {
        step: "(b) host-gw routes",
        what: "podCIDR via nodeIP".into(),
        expected: "where on-link".into(),
        observed: format!(
            "{installed} installed, {} refused{}",
            refused.len(),
            refused
                .first()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        ),
        ok: None,
    });
    let host_gw = matrix::run(lab, PROBES_IN_FLIGHT, bridge_only)?;
    remove_host_gw(lab)?;
    report.matrix("(b) host-gw routes", &host_gw, |kind| match kind {
        PathKind::SameNode | PathKind::NodeToOutside => Expect::Pass,
        PathKind::SameSwitch => Expect::Either,
        PathKind::PodToOutside => to_outside,
        PathKind::Routed | PathKind::OutsideToPod => Expect::Fail,
    });

    println!("(c) starting the agents again");
    for node in &lab.topology.nodes {
        agents::start(lab, node, lab.masquerade)?;
    }
    agents::wait_ready(lab, true)?;
    let as_lab = Masquerade::in_lab(lab, lab.masquerade);
    report.matrix(
        "(c) agents restarted",
        &matrix::run(lab, PROBES_IN_FLIGHT, as_lab)?,
        |kind| kind.expected(as_lab),
    );
    Ok(report)
}

/// flannel host-gw: on every node, a route to every other node's pod subnet via that
/// node's address; with `from_gateway`, leaving from the node's pod gateway as the
/// agent's routes do (the source a masquerade of the host's picks). Returns how many
/// the kernel took, and its errors for the others.
pub(crate) fn install_host_gw(lab: &LabState, from_gateway: bool) -> Result<(usize, Vec<String>)> {
    let mut installed = 0;
    let mut refused = Vec::new();
    for node in &lab.topology.nodes {
        let gateway = node.gateway().to_string();
        for peer in lab.topology.nodes.iter().filter(|p| p.name != node.name) {
            let mut route = vec![
                peer.pod_cidr.to_string(),
                "via".into(),
                peer.address.to_string(),
                "dev".into(),
                UPLINK.into(),
                "proto".into(),
                HOST_GW_PROTO.into(),
            ];
            if from_gateway {
                route.extend(["src".into(), gateway.clone()]);
            }
            match netns::run(
                Command::new("ip")
                    .args(["-n", &lab.netns(&node.name), "route", "add"])
                    .args(route),
            ) {
                Ok(_) => installed += 1,
                Err(e) => {
                    // Only the kernel's reason, not the whole command line.
                    let e = e.to_string();
                    refused.push(
                        e.rsplit(": ")
                            .next()
                            .unwrap_or(&e)
                            .trim_end_matches('.')
                            .to_owned(),
                    );
                }
            }
        }
    }
    Ok((installed, refused))
}

pub(crate) fn remove_host_gw(lab: &LabState) -> Result<()> {
    for node in &lab.topology.nodes {
        netns::run(Command::new("ip").args([
            "-n",
            &lab.netns(&node.name),
            "route",
            "flush",
            "proto",
            HOST_GW_PROTO,
        ]))?;
    }
    Ok(())
}

/// Puts the lab back as `lab up` left it: no host-gw routes, every agent running.
fn restore(lab: &LabState) -> Result<()> {
    remove_host_gw(lab)?;
    let running = agents::running(lab)?;
    for node in lab
        .topology
        .nodes
        .iter()
        .filter(|n| !running.iter().any(|a| a.node == n.name))
    {
        agents::start(lab, node, lab.masquerade)?;
    }
    Ok(())
}

impl Controls {
    fn matrix(&mut self, step: &'static str, matrix: &Matrix, expect: impl Fn(PathKind) -> Expect) {
        for kind in PathKind::ALL {
            let t = matrix.tally(kind);
            let e = expect(kind);
            let held = match e {
                Expect::Pass => t.icmp.passed == t.paths && t.tcp.passed == t.paths,
                // Every probe fails, not merely some.
                Expect::Fail => t.icmp.passed == 0 && t.tcp.passed == 0,
                Expect::Either => true,
            };
            self.rows.push(Row {
                step,
                what: kind.describe().to_owned(),
                expected: e.describe().into(),
                observed: format!(
                    "ICMP {}, TCP {}",
                    t.icmp.describe(t.paths),
                    t.tcp.describe(t.paths)
                ),
                ok: (e != Expect::Either).then_some(held),
            });
        }
        self.surprises.extend(
            matrix
                .surprises(expect)
                .into_iter()
                .map(|s| format!("{step}: {s}")),
        );
    }

    pub(crate) fn ok(&self) -> bool {
        self.rows.iter().all(|r| r.ok != Some(false))
    }

    pub(crate) fn render(&self) -> String {
        let mut table = Table::new([
            "STEP",
            "PATHS",
            "EXPECTED",
            "OBSERVED (passed/paths)",
            "VERDICT",
        ]);
        let mut last_step = "";
        for row in &self.rows {
            let step = if row.step == last_step { "" } else { row.step };
            last_step = row.step;
            let verdict = match row.ok {
                Some(true) => "ok",
                Some(false) => "✗ FAILED",
                None => "(info)",
            };
            table.row([step, &row.what, &row.expected, &row.observed, verdict]);
        }
        let mut out = table.to_string();
        for s in &self.surprises {
            out.push_str(&format!("  ✗ {s}\n"));
        }
        out
    }
}
