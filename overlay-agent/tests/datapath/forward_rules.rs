//! `--iptables-forward-rules`: flanneld's FORWARD accept rules written through the real
//! `iptables` and `nft` in a namespace of the test's own: taken over from flanneld
//! without doubles, written again within the resync period after someone flushed
//! them, and removed by cleanup; through the legacy backend where the host's rules
//! are there, though `iptables` is iptables-nft (Debian's default).

use std::{
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use overlay_agent::{
    host::forward_rules::{self, Backend, Ensured, ForwardRules, Frontend},
    status::Status,
};

use super::fixture::in_new_netns;

const NETWORK: &str = "10.244.0.0/16";
const PERIOD: Duration = Duration::from_secs(1);

/// `PROGRAM ARGS` in this thread's namespace: its standard output; it must succeed.
fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The filter table's rules, as `iptables -S` prints them.
fn filter_rules() -> Vec<String> {
    rules_of("iptables")
}

/// The filter table's rules through `iptables` (a backend's binary).
fn rules_of(iptables: &str) -> Vec<String> {
    tool(iptables, &["-t", "filter", "-S"])
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The legacy backend's tables in this thread's namespace.
fn legacy_tables() -> String {
    std::fs::read_to_string("/proc/thread-self/net/ip_tables_names").unwrap_or_default()
}

/// What `iptables -S` shows with flanneld's rules in place (and FORWARD's policy DROP).
fn with_rules() -> Vec<String> {
    [
        "-P INPUT ACCEPT",
        "-P FORWARD DROP",
        "-P OUTPUT ACCEPT",
        "-N FLANNEL-FWD",
        "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD",
        "-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT",
        "-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// How long the keeper's first pass may take: it chooses the backend (a save through
/// each) and writes. A bound for a hung pass, not a figure: under emulation each
/// `iptables` call takes a second.
const FIRST_PASS_LIMIT: Duration = Duration::from_secs(60);

/// Waits until the filter table shows the rules again, with one more write counted
/// than `written`, failing after `within`; returns how long it took.
async fn restored(status: &Status, written: u64, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let report = status.forward_rules().unwrap_or_default();
        if report.written == written + 1 && filter_rules() == with_rules() {
            assert!(report.in_place && report.errors_total == 0, "{report:?}");
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "not restored within {within:?}: {:#?} {report:?}",
            filter_rules()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How soon a flushed rule must be back: the pass that may have read the table just
/// before the flush, the period, and the pass that writes, each pass as long as the
/// first one took here (the machine's own measure: milliseconds natively, seconds
/// under emulation), with half of it again to spare.
fn resync_bound(first_pass: Duration) -> Duration {
    (PERIOD + 2 * first_pass) * 3 / 2
}

#[test]
fn iptables_rules_are_taken_over_kept_and_cleaned_up() {
    in_new_netns(|| {
        // What flanneld left: its chain with a rule of an earlier network, and the jump.
        tool("iptables", &["-P", "FORWARD", "DROP"]);
        tool("iptables", &["-N", "FLANNEL-FWD"]);
        let comment = ["-m", "comment", "--comment", "flanneld forward"];
        let mut jump = vec!["-A", "FORWARD"];
        jump.extend(comment);
        jump.extend(["-j", "FLANNEL-FWD"]);
        tool("iptables", &jump);
        let mut stale = vec!["-A", "FLANNEL-FWD", "-s", "10.1.0.0/16"];
        stale.extend(comment);
        stale.extend(["-j", "ACCEPT"]);
        tool("iptables", &stale);

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let status = Arc::new(Status::default());
            let rules = ForwardRules::new(Frontend::Iptables, NETWORK.parse().unwrap());
            let recorded = Arc::clone(&status);
            let keeper = tokio::spawn(forward_rules::keep(rules, PERIOD, move |pass| {
                recorded.forward_rules_pass(pass)
            }));
            // Taken over: the stale rule gone, nothing doubled.
            let within = resync_bound(restored(&status, 0, FIRST_PASS_LIMIT).await);
            tool("iptables", &["-F", "FLANNEL-FWD"]);
            restored(&status, 1, within).await;
            // The jump flushed away with everything else in FORWARD.
            tool("iptables", &["-F", "FORWARD"]);
            restored(&status, 2, within).await;
            keeper.abort();
        });

        let report = forward_rules::remove().unwrap();
        assert_eq!(
            report,
            "removed iptables chain filter FLANNEL-FWD and its jump (iptables-nft)\n"
        );
        assert_eq!(
            filter_rules(),
            ["-P INPUT ACCEPT", "-P FORWARD DROP", "-P OUTPUT ACCEPT"]
        );
        assert_eq!(forward_rules::remove().unwrap(), "", "nothing left");
        // Choosing and cleaning up looked at the legacy backend without creating a
        // table there.
        assert_eq!(legacy_tables(), "");
    });
}

#[test]
fn iptables_rules_go_where_the_hosts_legacy_rules_are() {
    in_new_netns(|| {
        // A host whose firewall is legacy iptables: its rules and FORWARD policy there.
        tool("iptables-legacy", &["-P", "FORWARD", "DROP"]);
        tool(
            "iptables-legacy",
            &["-A", "INPUT", "-i", "lo", "-j", "ACCEPT"],
        );
        let mut rules = ForwardRules::new(Frontend::Iptables, NETWORK.parse().unwrap());
        assert_eq!(rules.ensure().unwrap(), Ensured::Written);
        assert_eq!(rules.backend().unwrap(), Backend::Legacy);
        let mut legacy = with_rules();
        legacy.insert(4, "-A INPUT -i lo -j ACCEPT".into());
        assert_eq!(rules_of("iptables-legacy"), legacy);
        // None through `iptables`, which is iptables-nft.
        assert!(
            !tool("iptables-nft-save", &[]).contains("FLANNEL"),
            "{}",
            tool("iptables-nft-save", &[])
        );
        assert_eq!(rules.ensure().unwrap(), Ensured::InPlace);

        let report = forward_rules::remove().unwrap();
        assert_eq!(
            report,
            "removed iptables chain filter FLANNEL-FWD and its jump (iptables-legacy)\n"
        );
        assert_eq!(
            rules_of("iptables-legacy"),
            [
                "-P INPUT ACCEPT",
                "-P FORWARD DROP",
                "-P OUTPUT ACCEPT",
                "-A INPUT -i lo -j ACCEPT"
            ]
        );
    });
}

#[test]
fn nftables_chain_is_written_rewritten_and_removed() {
    in_new_netns(|| {
        let network: Ipv4Net = NETWORK.parse().unwrap();
        let mut rules = ForwardRules::new(Frontend::Nftables, network);
        let listing = || tool("nft", &["list", "chain", "ip", "flannel-ipv4", "forward"]);
        assert_eq!(rules.ensure().unwrap(), Ensured::Written);
        assert!(
            forward_rules::nft_listing_complete(&listing(), network),
            "{}",
            listing()
        );
        assert_eq!(rules.ensure().unwrap(), Ensured::InPlace);
        tool("nft", &["flush", "chain", "ip", "flannel-ipv4", "forward"]);
        assert_eq!(rules.ensure().unwrap(), Ensured::Written);
        let text = listing();
        assert!(
            forward_rules::nft_listing_complete(&text, network),
            "{text}"
        );
        let accepts = text.lines().filter(|l| l.trim().starts_with("ip ")).count();
        assert_eq!(accepts, 2, "no doubles: {text}");
        assert_eq!(rules.ensure().unwrap(), Ensured::InPlace);

        let report = forward_rules::remove().unwrap();
        assert_eq!(report, "removed nftables table ip flannel-ipv4\n");
        assert!(!tool("nft", &["list", "tables"]).contains("flannel"));
    });
}
