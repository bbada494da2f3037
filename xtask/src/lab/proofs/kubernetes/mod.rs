//! The lab's Kubernetes section: the plumbing of a real node around our datapath, and
//! proof that Services, cluster DNS, hostPorts and NetworkPolicy work across nodes
//! exactly as they do with kernel forwarding.
//!
//! For each kube-proxy mode this kernel can run (iptables and nftables; IPVS where the
//! kernel has `ip_vs`, in the 6.1 VM), with the pods the real CNI plugins made:
//! kube-proxy's rules on every node (`kube_proxy`), the endpoints' servers, a real DNS
//! server behind the kube-dns ClusterIP and every pod's resolver pointing at it
//! (`workload`); then every client placement against every Service kind, over TCP and
//! UDP, by name, and the hostPort (`checks`), and NetworkPolicy as three netfilter
//! engines enforce it (`policies`). Each is run twice: with our agents, then with
//! kernel forwarding (`reference`). What each found (whether it passed, and the source
//! address the endpoint saw) must be the same for every client kernel forwarding
//! reaches, and what Kubernetes promises must hold in both (a ClusterIP from a pod keeps
//! the pod's address; NodePort with the Cluster policy is masqueraded; with Local the
//! client's address is kept).

mod checks;
pub(crate) mod kube_proxy;
mod policies;
pub(crate) mod policy;
mod reference;
mod workload;

use std::time::Instant;

use anyhow::Result;

use self::{
    checks::{Found, Plan, cell, same},
    kube_proxy::Mode,
    policies::Row,
    reference::KernelForwarding,
    workload::Workload,
};
use crate::lab::machinery::{state::LabState, text_table::Table};

pub(crate) const SECTION: &str = "Kubernetes: Services, cluster DNS, hostPort and NetworkPolicy";

/// What the section found, per kube-proxy mode.
pub(crate) struct Proof {
    runs: Vec<ModeRun>,
    /// Modes this kernel cannot run, and why.
    skipped: Vec<(Mode, String)>,
}

struct ModeRun {
    mode: Mode,
    /// Whether what Kubernetes promises is judged besides the comparison: only with
    /// `--ip-masq`, as kube-flannel.yml runs flanneld. Without it the bridge plugin
    /// masquerades what pods send off their node, so no pod is seen from its own
    /// address there, with kernel forwarding alike.
    promised: bool,
    plan: Plan,
    ours: Vec<Option<Found>>,
    kernel: Vec<Option<Found>>,
    policies_ours: Vec<Row>,
    policies_kernel: Vec<Row>,
}

/// Runs the section against a running lab, which it leaves as it found it.
pub(crate) fn run(lab: &LabState) -> Result<Proof> {
    let mut proof = Proof {
        runs: Vec::new(),
        skipped: Vec::new(),
    };
    for mode in [Mode::Iptables, Mode::Nftables, Mode::Ipvs] {
        if let Err(why) = kube_proxy::available(mode) {
            println!("kube-proxy's {mode:?} mode: not on this kernel ({why})");
            proof.skipped.push((mode, why));
            continue;
        }
        let started = Instant::now();
        let run = mode_run(lab, mode)?;
        println!(
            "kube-proxy's {mode:?} mode: {} checks and {} policy checks, ours and kernel forwarding ({:.1}s)",
            run.ours.iter().flatten().count(),
            run.policies_ours.len(),
            started.elapsed().as_secs_f64()
        );
        proof.runs.push(run);
    }
    Ok(proof)
}

fn mode_run(lab: &LabState, mode: Mode) -> Result<ModeRun> {
    let plan = checks::plan(lab, mode)?;
    let _workload = Workload::install(lab, mode)?;
    // Without --ip-masq the bridge plugin masquerades what pods send off their node: a
    // policy naming a pod of another node never sees its address, with kernel
    // forwarding alike. The policy checks need the lab as kube-flannel.yml runs it.
    let with_policies = lab.masquerade;
    let ours = checks::run(&plan, |_| true)?;
    let policies_ours = if with_policies {
        policies::run(lab, mode, true)?
    } else {
        Vec::new()
    };
    let _kernel = KernelForwarding::switch(lab)?;
    let kernel = checks::run(&plan, |c| plan.callers[c.caller].in_reference(lab))?;
    let policies_kernel = if with_policies {
        policies::run(lab, mode, false)?
    } else {
        Vec::new()
    };
    Ok(ModeRun {
        mode,
        promised: lab.masquerade,
        plan,
        ours,
        kernel,
        policies_ours,
        policies_kernel,
    })
}

impl ModeRun {
    fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, check) in self.plan.checks.iter().enumerate() {
            let caller = &self.plan.callers[check.caller];
            let what = || {
                format!(
                    "{:?} mode, {} from {} over {}",
                    self.mode,
                    check.kind,
                    caller.host.name,
                    check.proto.name()
                )
            };
            let Some(ours) = &self.ours[i] else { continue };
            let judge = |found| {
                self.promised
                    .then(|| check.expect.judge(caller, found))
                    .flatten()
            };
            if let Some(why) = judge(ours) {
                out.push(format!("{}: ours {why}", what()));
            }
            if let Some(kernel) = &self.kernel[i] {
                if let Some(why) = judge(kernel) {
                    out.push(format!("{}: kernel forwarding {why}", what()));
                }
                if !same(ours, kernel) {
                    out.push(format!(
                        "{}: ours {}, kernel forwarding {}",
                        what(),
                        cell(ours),
                        cell(kernel)
                    ));
                }
            }
        }
        for row in &self.policies_ours {
            if let Some(why) = row.failure() {
                out.push(format!("{:?} mode: ours: {why}", self.mode));
            }
        }
        for (ours, kernel) in self.policies_ours.iter().zip(&self.policies_kernel) {
            if ours.ours_only {
                continue;
            }
            if let Some(why) = kernel.failure() {
                out.push(format!("{:?} mode: kernel forwarding: {why}", self.mode));
            }
            if ours.found != kernel.found {
                out.push(format!(
                    "{:?} mode: {} / {}: ours {}, kernel forwarding {}",
                    self.mode,
                    ours.engine.describe(),
                    ours.what,
                    policies::show(&ours.found),
                    policies::show(&kernel.found)
                ));
            }
        }
        out
    }

    fn render(&self) -> String {
        let mut out = format!("kube-proxy in {:?} mode\n", self.mode);
        let mut table = Table::new([
            "SERVICE",
            "CLIENT",
            "PLACEMENT",
            "PROTO",
            "EXPECTED",
            "OURS",
            "KERNEL",
            "",
        ]);
        for (i, check) in self.plan.checks.iter().enumerate() {
            let caller = &self.plan.callers[check.caller];
            let Some(ours) = &self.ours[i] else { continue };
            let kernel = self.kernel[i].as_ref();
            let judged = |found| !self.promised || check.expect.judge(caller, found).is_none();
            let ok = judged(ours) && kernel.is_none_or(|k| same(ours, k) && judged(k));
            table.row([
                check.kind.clone(),
                caller.host.name.clone(),
                caller.placement.describe().to_owned(),
                check.proto.name().to_owned(),
                if self.promised {
                    check.expect.describe()
                } else {
                    "as kernel forwarding".to_owned()
                },
                cell(ours),
                kernel.map_or("(not reached)".to_owned(), cell),
                if ok { "✓" } else { "✗" }.to_owned(),
            ]);
        }
        out.push_str(&table.to_string());
        let mut table = Table::new([
            "ENGINE",
            "CHECK",
            "EXPECTED",
            "OURS",
            "FAST PATH",
            "KERNEL",
            "",
        ]);
        for (ours, kernel) in self.policies_ours.iter().zip(&self.policies_kernel) {
            let ok = ours.failure().is_none()
                && (ours.ours_only || (kernel.found == ours.found && kernel.failure().is_none()));
            table.row([
                format!("{:?}", ours.engine),
                ours.what.clone(),
                policies::show(&ours.expected),
                policies::show(&ours.found),
                ours.fast.show().to_owned(),
                if ours.ours_only {
                    "(not reached)".into()
                } else {
                    policies::show(&kernel.found)
                },
                if ok { "✓" } else { "✗" }.into(),
            ]);
        }
        out.push_str(&table.to_string());
        out
    }
}

impl Proof {
    pub(crate) fn failures(&self) -> Vec<String> {
        self.runs.iter().flat_map(ModeRun::failures).collect()
    }

    pub(crate) fn modes(&self) -> Vec<Mode> {
        self.runs.iter().map(|r| r.mode).collect()
    }

    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        for run in &self.runs {
            out.push_str(&run.render());
            out.push('\n');
        }
        for (mode, why) in &self.skipped {
            out.push_str(&format!(
                "kube-proxy in {mode:?} mode: not run here ({why})\n"
            ));
        }
        out
    }
}
