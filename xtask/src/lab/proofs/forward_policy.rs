//! `--iptables-forward-rules` against a FORWARD policy of DROP, as Docker sets it: with
//! w2's FORWARD policy at DROP (iptables-nft, in w2's namespace), pods of w1 and w2
//! still reach each other with the agent's default, which writes flanneld's
//! FLANNEL-FWD rules (flannel-io/flannel v0.28.9, commit 5cd0d52,
//! `pkg/trafficmngr/iptables/iptables.go` `forwardRules`; the agent's
//! `overlay-agent/src/host/forward_rules.rs`); `overlay-agent cleanup` leaves them
//! (an agent with `--iptables-forward-rules=false` still passes), and after
//! `overlay-agent cleanup --forward-rules` removed them such an agent no longer does. Every
//! pod packet, decapsulated ones too, crosses the node's FORWARD hook.
//!
//! The lab is left as found: policy ACCEPT, w2's agent running with the defaults.

use std::time::Duration;

use anyhow::{Context as _, Result};
use ipnet::Ipv4Net;
use nix::sys::signal::Signal;

use crate::lab::machinery::{
    agents,
    interrupt::{self, Wait},
    netns,
    probe::{self, Client},
    state::LabState,
    text_table::Table,
    topology::{Node, Pod},
};

/// The node whose FORWARD policy drops, and its peer on the same switch.
const NODE: &str = "w2";
const PEER: &str = "w1";
/// How long the agent may take to write its rules: its first check runs at start, the
/// next 5 s later (--iptables-resync).
const RULES_TIMEOUT: Duration = Duration::from_secs(15);
const RULE_OFF: &str = "--iptables-forward-rules=false";

#[derive(Default)]
pub(crate) struct Proof {
    table: Option<Table>,
    pub failures: Vec<String>,
}

impl Proof {
    pub(crate) fn render(&self) -> String {
        self.table
            .as_ref()
            .map(Table::to_string)
            .unwrap_or_default()
    }
}

/// Runs the proof, and puts the policy and the agent back whatever happened.
pub(crate) fn run(lab: &LabState) -> Result<Proof> {
    let node = lab.topology.node(NODE)?;
    let ns = lab.netns(NODE);
    iptables(&ns, &["-P", "FORWARD", "DROP"])?;
    let mut proof = Proof::default();
    let result = steps(lab, node, &mut proof);
    let policy = iptables(&ns, &["-P", "FORWARD", "ACCEPT"]);
    let agent = restart(lab, node, &[]);
    // The steps' failures so far say more than the error that stopped them.
    result.with_context(|| format!("failed so far: {:?}", proof.failures))?;
    policy?;
    agent?;
    Ok(proof)
}

fn steps(lab: &LabState, node: &Node, proof: &mut Proof) -> Result<()> {
    let peer = lab.topology.node(PEER)?;
    let (here, there) = (first_pod(lab, node)?, first_pod(lab, peer)?);
    let ns = lab.netns(NODE);
    let mut table = Table::new([
        "AGENT ON w2 (FORWARD policy DROP)",
        "FLANNEL-FWD",
        "PODS w1 ⇄ w2",
        "EXPECTED",
        "VERDICT",
    ]);
    let failures = &mut proof.failures;
    let mut step = |what: &str, rules: bool, expect: bool| -> Result<()> {
        let passed = pings(lab, &here, &there);
        let ok = passed == expect && rules == expect;
        let word = |b: bool| if b { "pass" } else { "fail" };
        let observed = format!("{}, {}", word(passed), if rules { "rules" } else { "none" });
        table.row([
            what,
            if rules { "in place" } else { "absent" },
            word(passed),
            word(expect),
            if ok { "ok" } else { "✗ FAILED" },
        ]);
        if !ok {
            failures.push(format!("{what}: expected {}, saw {observed}", word(expect)));
        }
        Ok(())
    };
    let network = lab.topology.pod_network;
    let rules = wait_rules(&ns, network)?;
    step("default (--iptables-forward-rules)", rules, true)?;

    // flanneld leaves its rules when told not to write them, and so does cleanup
    // unless asked (a flanneld after a rollback relies on them).
    for (what, extra, kept) in [
        (
            "after cleanup, with --iptables-forward-rules=false",
            &[][..],
            true,
        ),
        (
            "after cleanup --forward-rules, with --iptables-forward-rules=false",
            &["--forward-rules"][..],
            false,
        ),
    ] {
        agents::stop_node(lab, node, Signal::SIGTERM)?;
        agents::cleanup(lab, node, extra)?;
        restart(lab, node, &[RULE_OFF])?;
        let rules = has_rules(&ns, network)?;
        step(what, rules, kept)?;
    }

    restart(lab, node, &[])?;
    let rules = wait_rules(&ns, network)?;
    step("default again", rules, true)?;
    proof.table = Some(table);
    Ok(())
}

fn first_pod(lab: &LabState, node: &Node) -> Result<Pod> {
    lab.topology
        .pods_of(node)
        .into_iter()
        .next()
        .with_context(|| format!("{} has no pod", node.name))
}

/// Whether pings pass both ways between the two pods.
fn pings(lab: &LabState, a: &Pod, b: &Pod) -> bool {
    [(a, b), (b, a)].iter().all(|(from, to)| {
        probe::ping(
            &Client::new(lab.netns(&from.name)),
            to.address,
            probe::token(),
        )
        .is_ok()
    })
}

/// Stops w2's agent if it runs and starts it with `extra` flags, ready.
fn restart(lab: &LabState, node: &Node, extra: &[&str]) -> Result<()> {
    if agents::running(lab)?.iter().any(|a| a.node == node.name) {
        agents::stop_node(lab, node, Signal::SIGTERM)?;
    }
    agents::start_with(lab, node, lab.masquerade, &lab.agent, extra)?;
    agents::wait_ready_on(lab, &[node], true)
}

fn iptables(ns: &str, args: &[&str]) -> Result<String> {
    netns::run(netns::command(ns, "iptables").arg("-w").args(args))
}

/// Whether FORWARD jumps to FLANNEL-FWD and that accepts `network` both ways, as
/// `iptables -S` prints flanneld's rules.
fn has_rules(ns: &str, network: Ipv4Net) -> Result<bool> {
    let rules = iptables(ns, &["-S"])?;
    let comment = "-m comment --comment \"flanneld forward\"";
    let wanted = [
        format!("-A FORWARD {comment} -j FLANNEL-FWD"),
        format!("-A FLANNEL-FWD -s {network} {comment} -j ACCEPT"),
        format!("-A FLANNEL-FWD -d {network} {comment} -j ACCEPT"),
    ];
    Ok(wanted.iter().all(|w| rules.lines().any(|l| l == w)))
}

/// Waits until the rules are in place; false if they do not come.
fn wait_rules(ns: &str, network: Ipv4Net) -> Result<bool> {
    let waited = interrupt::wait_until(
        "the forward rules",
        interrupt::scaled(RULES_TIMEOUT),
        || {
            Ok(if has_rules(ns, network)? {
                Wait::Done(())
            } else {
                Wait::Pending("FLANNEL-FWD not in place".into())
            })
        },
    );
    Ok(waited.is_ok())
}
