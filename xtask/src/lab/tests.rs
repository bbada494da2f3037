//! The whole lab, end to end, as `cargo xtask lab --controls --restart` runs it: the
//! matrix, the wire proof, the full masquerade proof (outside host, rules 6 and 1,
//! masquerade off, thousands of connections, equivalence with flanneld's iptables
//! rules), the Kubernetes section (every kube-proxy mode this kernel has, against
//! kernel forwarding), restarts and upgrades, and the negative controls; then, as
//! `cargo xtask lab --etcd --restart` runs it, all of it but the controls with every
//! agent on flannel's etcd subnet manager, etcd killed and restarted among the events;
//! the wire proof alone in a lab with flannel's `Backend.DirectRouting`; and the
//! migration from flanneld and back, where the kernel has the ipip module. Needs root
//! (namespaces, BPF), like the lab itself.

use std::{
    path::Path,
    process::Command,
    sync::{Mutex, PoisonError},
};

use super::*;

/// One lab at a time: each builds a cluster on the machine's few cores, and the restart
/// proof's timing must be the lab's own. `cargo xtask test` runs `cargo test` with as
/// many test threads as cores.
static ONE_LAB: Mutex<()> = Mutex::new(());

/// The events of the restart proof on the agent of w1.
const AGENT_EVENTS: usize = 4;

#[test]
fn lab_passes_masquerade_holds_controls_fail_and_nothing_remains() {
    let Some(report) = whole_lab(false, true) else {
        return;
    };
    assert_eq!(
        report.controls,
        Some(true),
        "the negative controls did not come out as expected"
    );
}

#[test]
fn lab_on_etcd_passes_survives_an_etcd_restart_and_nothing_remains() {
    whole_lab(true, false);
}

/// `lab --direct-routing`, focused: the wire proof alone (its exchanges are the
/// connectivity it needs) proves that cp's pods reach w1's and w2's as plain IPv4 on
/// the switch, never through the tunnel, and w3's, behind the router, through it;
/// twice: with `--ip-masq`, pod to pod, and without it, where the bridge plugin
/// masquerades the pods to cp's own address and the replies to that address must
/// leave w1 and w2 plain as well. The other sections do not depend on how a peer is
/// reached, and more full labs would cost minutes.
#[test]
fn lab_with_direct_routing_talks_plainly_on_the_switch_and_tunnels_past_the_router() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: the lab needs root");
        return;
    }
    let _one = ONE_LAB.lock().unwrap_or_else(PoisonError::into_inner);
    interrupt::install().unwrap();
    for no_masq in [false, true] {
        let create = CreateArgs {
            release: false,
            no_masq,
            no_fast_path: false,
            etcd: false,
            direct_routing: true,
        };
        let agent = build(create).expect("building the agent");
        let lab = create.lab(agent).expect("creating the lab");
        let proof = capture::prove(&lab).expect("the wire proof runs");
        print!("{}", proof.render());
        assert_eq!(
            proof.failures(),
            Vec::<String>::new(),
            "the wire proof fails (--ip-masq {})",
            !no_masq
        );
        lab.teardown().expect("removing the lab");
    }
}

/// `lab --migrate`: every node goes from flanneld's kernel ipip device to the agent
/// and back under numbered traffic, nothing lost, every node as flanneld left it at
/// the end. It starts from flanneld's device, so it needs the ipip module: on a kernel
/// without it (this machine's) it says it skipped, and the kernel matrix runs it where
/// the kernel has TCX (`cargo xtask test --kernel 6.12`).
#[test]
fn migration_from_flanneld_and_back_loses_nothing() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: the lab needs root");
        return;
    }
    if !crate::vm::has_ipip() {
        eprintln!(
            "skipped: the migration starts from flanneld's ipip device, and this kernel has no ipip module"
        );
        return;
    }
    let _one = ONE_LAB.lock().unwrap_or_else(PoisonError::into_inner);
    interrupt::install().unwrap();
    let agent = build(CreateArgs {
        release: false,
        no_masq: false,
        no_fast_path: false,
        etcd: false,
        direct_routing: false,
    })
    .expect("building the agent");
    let proof = migrate::run(agent).expect("the migration proof runs");
    print!("{}", migrate::render(&proof));
    assert_eq!(
        proof.failures,
        Vec::<String>::new(),
        "the migration proof fails"
    );
}

/// Runs the lab (on etcd with `etcd`, the controls with `controls`), one at a time,
/// checks every section and that nothing of it remains, and returns its report; None
/// without root.
fn whole_lab(etcd: bool, controls: bool) -> Option<Report> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: the lab needs root");
        return None;
    }
    // A lab test that failed holding the lock has torn its lab down.
    let _one = ONE_LAB.lock().unwrap_or_else(PoisonError::into_inner);
    interrupt::install().unwrap();
    let report = full_run(
        CreateArgs {
            release: false,
            no_masq: false,
            no_fast_path: false,
            etcd,
            direct_routing: false,
        },
        Checks {
            controls,
            masquerade: false,
            restart: true,
            kubernetes: false,
        },
    )
    .expect("the lab runs to its end");
    assert!(
        report.matrix.is_empty(),
        "probes that failed: {:#?}",
        report.matrix
    );
    assert!(
        report.wire.is_empty(),
        "the wire proof fails: {:#?}",
        report.wire
    );
    assert_eq!(
        report.masquerade.steps,
        [
            masquerade::OUTSIDE,
            masquerade::RULES,
            masquerade::LOAD,
            masquerade::OFF,
            masquerade::EQUIVALENCE,
            masquerade::AS_FOUND
        ],
        "the masquerade proof did not run every step"
    );
    assert!(
        report.masquerade.failures.is_empty(),
        "the masquerade proof does not hold: {:#?}",
        report.masquerade.failures
    );
    let (modes, kubernetes) = report
        .kubernetes
        .as_ref()
        .expect("the Kubernetes section ran");
    assert!(
        modes.contains(&kube_proxy::Mode::Iptables) && modes.contains(&kube_proxy::Mode::Nftables),
        "kube-proxy's iptables and nftables modes run on every kernel of the matrix: {modes:?}"
    );
    if kube_proxy::available(kube_proxy::Mode::Ipvs).is_ok() {
        assert!(
            modes.contains(&kube_proxy::Mode::Ipvs),
            "this kernel has IPVS"
        );
    }
    assert!(
        kubernetes.is_empty(),
        "the Kubernetes section does not hold: {kubernetes:#?}"
    );
    assert_eq!(report.controls.is_some(), controls);
    let (events, lost) = report.restart.as_ref().expect("the restart proof ran");
    assert!(
        lost.is_empty(),
        "traffic was lost across restarts or upgrades: {lost:#?}"
    );
    let etcd_events = events.iter().filter(|e| e.starts_with("etcd ")).count();
    assert_eq!(
        (events.len() - etcd_events, etcd_events),
        (AGENT_EVENTS, usize::from(etcd)),
        "the restart proof's events: {events:#?}"
    );

    // Checked from the outside, not through the teardown's own bookkeeping. etcd's host
    // is a namespace with the lab's prefix, and etcd's command line names its data
    // directory, which lies in the lab's.
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let prefix = format!("olab-{}-", report.id);
    let netns = String::from_utf8_lossy(&netns.stdout);
    assert!(!netns.contains(&prefix), "namespaces left behind:\n{netns}");
    let dir = format!("/run/overlay-lab/{}", report.id);
    assert!(!Path::new(&dir).exists(), "{dir} left behind");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&dir), "mounts left behind:\n{mounts}");
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            !cmdline.contains(&dir),
            "a process of the lab is still running: {cmdline}"
        );
    }
    Some(report)
}
