//! The whole lab, end to end, as `cargo xtask lab --controls --restart` runs it: the
//! matrix, the wire proof, the full masquerade proof (outside host, rules 6 and 1,
//! masquerade off, thousands of connections, equivalence with flanneld's iptables
//! rules), the Kubernetes section (every kube-proxy mode this kernel has, against
//! kernel forwarding), restarts and upgrades, and the negative controls. Needs root
//! (namespaces, BPF), like the lab itself.

use std::{path::Path, process::Command};

use super::*;

#[test]
fn lab_passes_masquerade_holds_controls_fail_and_nothing_remains() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: the lab needs root");
        return;
    }
    interrupt::install().unwrap();
    let report = full_run(
        CreateArgs {
            release: false,
            no_masq: false,
            no_fast_path: false,
            etcd: false,
        },
        Checks {
            controls: true,
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
    assert_eq!(
        report.controls,
        Some(true),
        "the negative controls did not come out as expected"
    );
    assert_eq!(
        report.restart,
        Some(vec![]),
        "traffic was lost across restarts or upgrades"
    );

    // Checked from the outside, not through the teardown's own bookkeeping.
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
}
