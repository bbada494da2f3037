//! The agent's admission pass against the kernel's own connection tracking: entries
//! made with the `conntrack` tool (conntrack-tools) in the test's namespace stand for
//! flows the host tracks, and the pass reads and changes them through ctnetlink.

use std::{process::Command, time::Duration};

use overlay_agent::{
    datapath::conntrack::monotonic_ns,
    fast_path::{Ctnetlink, Driver, FastPath, Mode, Timeouts, netfilter::Event},
};
use overlay_common::flows::{ADMIT_AFTER_PACKETS, FlowKey, FlowState, REFUSED};

use super::{
    fixture::{GENERATION, Node, monotonic_ns_after, with_node},
    topology::{POD, W2, W3},
};

const TCP: u8 = 6;
const UDP: u8 = 17;
const SEC: u64 = 1_000_000_000;

fn key(proto: u8, sport: u16) -> FlowKey {
    FlowKey {
        src: POD.octets(),
        dst: W2.pod.octets(),
        sport: sport.to_be_bytes(),
        dport: 8080u16.to_be_bytes(),
        proto,
        _pad: [0; 3],
    }
}

/// `conntrack` with `args` in this thread's namespace; its output.
fn conntrack(args: &[&str]) -> String {
    let out = Command::new("conntrack")
        .args(args)
        .output()
        .expect("running conntrack (conntrack-tools)");
    assert!(
        out.status.success(),
        "conntrack {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// The tuple arguments of `key` for the `conntrack` tool.
fn tuple(key: &FlowKey) -> Vec<String> {
    let proto = if key.proto == TCP { "tcp" } else { "udp" };
    [
        "-p",
        proto,
        "-s",
        &POD.to_string(),
        "-d",
        &W2.pod.to_string(),
        "--sport",
        &u16::from_be_bytes(key.sport).to_string(),
        "--dport",
        &u16::from_be_bytes(key.dport).to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Creates the host's entry for `key`'s flow, established and assured, with `extra`
/// arguments (a NAT, another state).
fn track(key: &FlowKey, extra: &[&str]) {
    let mut args: Vec<String> = vec!["-I".into()];
    args.extend(tuple(key));
    args.extend(["--timeout", "100", "--status", "ASSURED,SEEN_REPLY"].map(str::to_owned));
    if key.proto == TCP && !extra.contains(&"--state") {
        args.extend(["--state", "ESTABLISHED"].map(str::to_owned));
    }
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    conntrack(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

/// The `conntrack -G` line of `key`'s flow.
fn tracked(key: &FlowKey) -> String {
    let mut args = vec!["-G".to_owned()];
    args.extend(tuple(key));
    conntrack(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// A direction the host forwarded often enough to be asked about.
fn busy(node: &mut Node, key: FlowKey) {
    node.set_flow(
        key,
        FlowState {
            seen_gen: GENERATION,
            host_packets: ADMIT_AFTER_PACKETS,
            ..FlowState::default()
        },
    );
}

fn pass(node: &mut Node) -> overlay_agent::fast_path::Pass {
    let mut tracker = Ctnetlink::open().expect("a ctnetlink socket");
    FastPath::new(Mode::Established)
        .pass(
            &mut node.dp.flows,
            &mut tracker,
            Timeouts {
                tcp: 3000,
                udp: 120,
            },
            monotonic_ns(),
        )
        .expect("an admission pass")
}

#[test]
fn established_untranslated_flows_are_admitted_and_made_liberal() {
    with_node(|node| {
        let (tcp, udp) = (key(TCP, 40000), key(UDP, 40001));
        for k in [tcp, udp] {
            track(&k, &[]);
            busy(node, k);
            // Its other direction too, as `bridge_egress` records it.
            busy(node, k.reversed());
        }
        let done = pass(node);
        assert_eq!(done.admitted, 4, "{done:?}");
        for k in [tcp, udp, tcp.reversed(), udp.reversed()] {
            let state = node.flow(&k).unwrap();
            assert_eq!(state.admitted, 1, "{k:?}");
            assert!(!state.stale(monotonic_ns()), "admitted just now");
            assert!(node.in_filter(&k), "the programs look {k:?} up");
        }
        let entry = Ctnetlink::open().unwrap().get(&tcp).unwrap().unwrap();
        assert!(entry.liberal, "the host no longer checks the TCP windows");
        assert!(entry.admissible());
    });
}

#[test]
fn an_admission_sets_the_filter_bit_before_the_entry() {
    // Not at the end of the pass: the admitted flow's next packet already skips the host.
    with_node(|node| {
        let k = key(TCP, 40005);
        busy(node, k);
        let state = node.flow(&k).unwrap();
        let admitted = FlowState {
            admitted: 1,
            refreshed_ns: monotonic_ns(),
            ..state
        };
        assert!(!node.in_filter(&k));
        assert!(
            node.dp
                .flows
                .update_if_unchanged(&k, &state, admitted)
                .unwrap()
        );
        assert!(node.in_filter(&k));
    });
}

#[test]
fn translated_and_unestablished_flows_are_not_admitted() {
    with_node(|node| {
        // kube-proxy's DNAT: the reply comes from another address.
        let nat = key(TCP, 40010);
        track(&nat, &["--dst-nat", &W2.node.to_string()]);
        // A handshake in progress, and a flow nobody tracks.
        let syn = key(TCP, 40011);
        track(&syn, &["--state", "SYN_SENT"]);
        let untracked = key(UDP, 40012);
        for k in [nat, syn, untracked] {
            busy(node, k);
        }
        // Too few packets to ask about.
        let quiet = key(TCP, 40013);
        track(&quiet, &[]);
        node.set_flow(quiet, FlowState::default());
        let done = pass(node);
        assert_eq!(
            (done.admitted, done.refused, done.forgotten),
            (0, 1, 1),
            "{done:?}"
        );
        assert_eq!(node.flow(&nat).unwrap().flags & REFUSED, REFUSED);
        let waiting = node.flow(&syn).unwrap();
        assert_eq!(
            (waiting.admitted, waiting.flags),
            (0, 0),
            "asked again later"
        );
        assert_eq!(node.flow(&untracked), None, "the host tracks nothing of it");
        assert_eq!(node.flow(&quiet).unwrap().admitted, 0);
        for k in [nat, syn, untracked, quiet] {
            assert!(!node.in_filter(&k), "{k:?} in the filter");
        }
    });
}

#[test]
fn flows_in_use_keep_their_conntrack_entry_and_gone_ones_leave() {
    with_node(|node| {
        let now = monotonic_ns_after(20 * SEC);
        let kept = key(UDP, 40020);
        // Between other pods: the filter has a bit per address pair.
        let gone = FlowKey {
            dst: W3.pod.octets(),
            ..key(TCP, 40021)
        };
        track(&kept, &[]);
        let in_use = FlowState {
            seen_gen: GENERATION,
            host_packets: 100,
            last_fast_ns: now - SEC,
            refreshed_ns: now - 20 * SEC,
            admitted: 1,
            ..FlowState::default()
        };
        node.set_flow(kept, in_use);
        node.set_flow(gone, in_use);
        node.set_flow(gone.reversed(), in_use);
        let done = pass(node);
        assert_eq!((done.refreshed, done.forgotten), (1, 2), "{done:?}");
        // The timeout the pass gave it (UDP's stream timeout here), not the 100 s it had.
        let line = tracked(&kept);
        let timeout: u32 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
        assert!(timeout > 100, "{line}");
        assert!(node.flow(&kept).unwrap().refreshed_ns >= now);
        assert_eq!(node.flow(&gone), None);
        assert_eq!(node.flow(&gone.reversed()), None, "both directions");
        // The filter follows: what the flow that left needed goes, the kept one stays.
        assert!(node.in_filter(&kept));
        assert!(!node.in_filter(&gone) && !node.in_filter(&gone.reversed()));
    });
}

#[test]
fn a_destroyed_entry_and_a_ruleset_commit_reach_the_agent() {
    with_node(|node| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        // Subscribed before the entry exists: the kernel attaches event reporting to an
        // entry when it is created. (Its socket registers with the runtime.)
        let _context = runtime.enter();
        let mut driver = Driver::start(Mode::Established);
        assert!(driver.state().on(), "{:?}", driver.state().blocked());
        let k = key(TCP, 40030);
        track(&k, &[]);
        busy(node, k);
        busy(node, k.reversed());
        let done = driver.pass(&mut node.dp.flows, monotonic_ns()).unwrap();
        assert_eq!(done.admitted, 2);
        let next = |driver: &mut Driver| {
            runtime
                .block_on(tokio::time::timeout(
                    Duration::from_secs(2),
                    driver.next_event(),
                ))
                .expect("a notification in time")
                .expect("the notifications work")
        };
        let mut delete = vec!["-D".to_owned()];
        delete.extend(tuple(&k));
        conntrack(&delete.iter().map(String::as_str).collect::<Vec<_>>());
        let event = next(&mut driver);
        assert_eq!(event, Event::Destroyed(vec![k]));
        assert!(
            !driver.handle(Ok(event), &mut node.dp.flows),
            "no new generation"
        );
        assert_eq!((node.flow(&k), node.flow(&k.reversed())), (None, None));
        // Any commit, here a table of nobody's.
        let generation = driver.state().generation();
        let nft = Command::new("nft")
            .args(["add", "table", "ip", "olab-commit"])
            .status()
            .expect("running nft");
        assert!(nft.success());
        let event = next(&mut driver);
        assert_eq!(event, Event::Committed);
        assert!(driver.handle(Ok(event), &mut node.dp.flows));
        assert_ne!(driver.state().generation(), generation);
    });
}
