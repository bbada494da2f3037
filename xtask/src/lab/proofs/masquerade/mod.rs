//! The masquerade proof on a running lab:
//!
//! 1. with the agents masquerading (`--ip-masq`), every pod reaches the outside host over
//!    TCP, UDP and ICMP, seen from its node's address (rule 5; `outside`);
//! 2. rules 6 and 1 one by one (`rules`);
//! 3. thousands of connections held open at once (`load`);
//! 4. with the agents restarted without `--ip-masq`, and return routes on the router,
//!    the outside sees the pods' own addresses;
//! 5. for every pair of the lab, the same outcome as flanneld's iptables rules
//!    (`equivalence`, `iptables`).
//!
//! All of it takes seconds, so `cargo xtask lab` runs all of it.
//!
//! The lab is left as it was found (agents as the lab runs them, no route to a pod
//! subnet on the router, no iptables rules), also when a step fails or on Ctrl-C; the
//! last section checks that it is.

mod equivalence;
pub(crate) mod iptables;
mod load;
mod nat_table;
mod outside;
mod rules;
pub(crate) mod section;

use std::time::Instant;

use anyhow::Result;

use crate::lab::machinery::{
    agents,
    router::{self, RouterRoutes},
    servers::Servers,
    state::LabState,
    text_table::{Table, heading},
};

use self::{
    equivalence::Comparison,
    iptables::{FlannelRules, Variant},
    load::Load,
    section::Section,
};

/// What the proof did and found.
#[derive(Debug, Default)]
pub(crate) struct Proof {
    /// The steps that ran to their end, in order.
    pub steps: Vec<&'static str>,
    /// What did not hold, each line prefixed with its step.
    pub failures: Vec<String>,
}

impl Proof {
    /// Runs one step under its heading, prints what it found, and keeps its failures.
    fn step<T: Section>(
        &mut self,
        title: &'static str,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        heading(title);
        let started = Instant::now();
        let found = f()?;
        print!("{}", found.render());
        println!("  ({:.1}s)", started.elapsed().as_secs_f64());
        self.failures.extend(
            found
                .failures()
                .into_iter()
                .map(|f| format!("{title}: {f}")),
        );
        self.steps.push(title);
        Ok(found)
    }
}

pub(crate) const OUTSIDE: &str = "Masquerade: pods to the outside";
pub(crate) const RULES: &str = "Masquerade: rule 6";
pub(crate) const LOAD: &str = "Masquerade under load";
pub(crate) const OFF: &str = "Masquerade off";
pub(crate) const EQUIVALENCE: &str = "Masquerade: equivalence with flanneld's iptables rules";
pub(crate) const AS_FOUND: &str = "Masquerade: the lab as found";

/// Runs the proof. The lab is put back whatever happens. A lab made without
/// `--ip-masq` has pods whose bridge plugin masquerades what they send off their node
/// (flannel's CNI plugin asks it to): the proof, about `--ip-masq`, has nothing to
/// prove there, and says so.
pub(crate) fn run(lab: &LabState) -> Result<Proof> {
    let mut done = Proof::default();
    if !lab.masquerade {
        heading("Masquerade");
        println!(
            "not proven: the lab's agents run without --ip-masq, so its pods were made with \
             the bridge plugin's own masquerade (FLANNEL_IPMASQ=false)"
        );
        return Ok(done);
    }
    let result = proof(lab, &mut done);
    let restored = restore(lab);
    result?;
    restored?;
    done.step(AS_FOUND, || Cleanup::check(lab))?;
    Ok(done)
}

fn proof(lab: &LabState, done: &mut Proof) -> Result<()> {
    let topology = &lab.topology;
    let servers = Servers::start(lab, &topology.hosts())?;
    restart(lab, true)?;

    let reached = done.step(OUTSIDE, || outside::run(lab, &servers, true))?;
    done.step(RULES, || rules::run(lab, &servers))?;
    // Thousands of connections on a path that does not carry one would only wait out
    // their timeouts.
    if reached.failures().is_empty() {
        done.step(LOAD, || load::run(lab, &servers, Load::default()))?;
    } else {
        done.failures.push(format!(
            "{LOAD}: not run, since pods cannot reach the outside"
        ));
    }
    let plan = equivalence::plan(lab)?;
    let compare = |run: usize, what: &str, name: &str| {
        let started = Instant::now();
        let result = equivalence::run(lab, &servers, &plan, name)?;
        println!(
            "Equivalence, run {run} of 3: every pair with {what} ({:.1}s)",
            started.elapsed().as_secs_f64()
        );
        Ok::<_, anyhow::Error>(result)
    };
    let ours = compare(1, "the BPF masquerade", "BPF")?;

    restart(lab, false)?;
    done.step(OFF, || {
        let routes = RouterRoutes::to_pods(lab)?;
        println!(
            "Router, for this check only: {} (so that replies find the pods)",
            routes.describe()
        );
        outside::run(lab, &servers, false)
    })?;

    let under = |variant: Variant, run| {
        let _rules = FlannelRules::install(lab, variant)?;
        compare(run, variant.describe(), variant.short())
    };
    let theirs = under(Variant::Flanneld, 2)?;
    let verbatim = under(Variant::Verbatim, 3)?;
    done.step(EQUIVALENCE, || {
        Ok(Comparison::new(topology, &plan, ours, theirs, verbatim))
    })?;
    Ok(())
}

/// [`agents::restart`], saying so.
fn restart(lab: &LabState, masquerade: bool) -> Result<()> {
    let started = Instant::now();
    if agents::restart(lab, masquerade)? {
        let flag = if masquerade { "with" } else { "without" };
        println!(
            "\nAgents restarted {flag} --ip-masq ({:.1}s)",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Puts the lab back as found: no routes to pods on the router, no iptables rules, the
/// agents running as the lab runs them.
pub(crate) fn restore(lab: &LabState) -> Result<()> {
    router::flush(lab)?;
    iptables::remove_all(lab)?;
    agents::restart(lab, lab.masquerade).map(drop)
}

/// What the proof may have changed, checked from the outside after it.
struct Cleanup {
    rows: Vec<(String, String, bool)>,
}

impl Cleanup {
    fn check(lab: &LabState) -> Result<Self> {
        let routes = router::pod_routes(lab)?;
        let nat_tables = iptables::leftovers(lab);
        let agents = agents::running(lab)?;
        let as_lab = agents
            .iter()
            .filter(|a| a.masquerade == lab.masquerade)
            .count();
        let flag = if lab.masquerade { "with" } else { "without" };
        let rows = vec![
            (
                "router: routes into the pod network".to_owned(),
                if routes.is_empty() {
                    "none".to_owned()
                } else {
                    routes
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                routes.is_empty(),
            ),
            (
                "nodes: flanneld's iptables rules".to_owned(),
                if nat_tables.is_empty() {
                    "none".to_owned()
                } else {
                    nat_tables.join(", ")
                },
                nat_tables.is_empty(),
            ),
            (
                format!("agents {flag} --ip-masq, as the lab runs them"),
                format!("{as_lab} of {} nodes", lab.topology.nodes.len()),
                as_lab == lab.topology.nodes.len(),
            ),
        ];
        Ok(Self { rows })
    }
}

impl Section for Cleanup {
    fn render(&self) -> String {
        let mut table = Table::new(["WHAT", "FOUND", ""]);
        for (what, found, ok) in &self.rows {
            table.row([what.as_str(), found.as_str(), if *ok { "✓" } else { "✗" }]);
        }
        table.to_string()
    }

    fn failures(&self) -> Vec<String> {
        self.rows
            .iter()
            .filter(|(_, _, ok)| !ok)
            .map(|(what, found, _)| format!("{what}: {found}"))
            .collect()
    }
}
