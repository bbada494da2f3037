//! What one packet costs each program: a microbenchmark, not a test (ignored by
//! default; `cargo xtask bench` runs it on this machine's kernel and in the VM's).
//! The kernel times each run of the program on a fresh copy of the frame
//! (`BPF_PROG_TEST_RUN`), helpers (FIB lookup, room adjustment, map lookups)
//! included; the redirect itself is not performed. One run per call: with a repeat
//! count the kernel would run the program again on the packet the previous run
//! changed (already encapsulated, decapsulated or translated), which measures another
//! path. The kernel's clock reads are in every figure alike (the `pass` case shows the
//! floor).
//!
//! Prints one line per case: `PROG_COST {"case":...,"ns":...,"rounds":[...]}`, `ns`
//! being the median over rounds of the mean per run. `PROG_COST_RUNS` sets the runs per
//! round (default 20000), `PROG_COST_ROUNDS` the rounds (default 5).
//!
//! The forwarding cases are of flows the fast path admitted. What its check costs each
//! packet is `check` less `check-off`: the same segment of a flow the host decides, with
//! the fast path on and off, their rounds taken in turn. With the fast path on, the
//! filter answers when no flow between the two pods is admitted (`check`); when one is,
//! the flow table is looked up too (`check-lookup`).

use std::net::Ipv4Addr;

use etherparse::IpEcn;
use overlay_agent::datapath::LoadOptions;
use overlay_common::{
    Hook::{self, BridgeIngress, UplinkEgress, UplinkIngress},
    config::FLAG_FAST_PATH,
    flows::FlowState,
};

use super::{
    fixture::{Act, Node, flow_key, masquerade, no_fast_path, with_node_setup},
    nat::{self, client, open, outgoing},
    packet::{
        ACK, Conn, Proto, SYN, Transport, datagram, from_host, from_peer, from_pod, from_underlay,
        ipv4, nest, outbound, tunnel_header,
    },
    topology::{NODE_IP, OUTSIDE, POD, W2},
};

/// Payload of the measured packets: a small TCP segment, where per-packet cost matters
/// most.
const PAYLOAD: usize = 64;

fn env_or(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The mean cost of one run of `hook` on `frame` over one round of runs.
fn round(node: &Node, case: &str, hook: Hook, frame: &[u8], act: Act) -> f64 {
    let runs = env_or("PROG_COST_RUNS", 20_000);
    let total: u128 = (0..runs)
        .map(|_| {
            let (took, rc) = node.cost(hook, frame, 1);
            assert_eq!(rc, act as u32, "{case}: the program's verdict");
            took.as_nanos()
        })
        .sum();
    total as f64 / f64::from(runs)
}

fn rounds() -> u32 {
    env_or("PROG_COST_ROUNDS", 5)
}

fn report(case: &str, hook: Hook, mut ns: Vec<f64>) {
    let rounds_json = format!("{ns:?}");
    ns.sort_by(f64::total_cmp);
    println!(
        "PROG_COST {{\"case\":\"{case}\",\"program\":\"{}\",\"ns\":{},\"rounds\":{rounds_json}}}",
        hook.program(),
        ns[ns.len() / 2]
    );
}

fn measure(node: &Node, case: &str, hook: Hook, frame: &[u8], act: Act) {
    let ns = (0..rounds())
        .map(|_| round(node, case, hook, frame, act))
        .collect();
    report(case, hook, ns);
}

/// The check's cases, their rounds taken in turn, so that the machine's drift between
/// rounds falls on all alike and their differences per round are the check's: `check`
/// (no direction between the two pods admitted: the filter answers), `check-lookup`
/// (another flow between them admitted: the filter lets the lookup run, which finds
/// nothing) and `check-off` (the fast path off).
fn measure_check(node: &mut Node, frame: &[u8], sibling: &[u8]) {
    let sibling = flow_key(sibling);
    node.set_flow(
        sibling,
        FlowState {
            admitted: 1,
            ..FlowState::default()
        },
    );
    let (mut alone, mut beside, mut off) = (Vec::new(), Vec::new(), Vec::new());
    let case = |node: &mut Node, filter: &[_], fast_path: bool, name, into: &mut Vec<f64>| {
        node.dp
            .flows
            .keep_filter_to(filter)
            .expect("writing the filter");
        node.reconfigure(|c| {
            if fast_path {
                c.flags |= FLAG_FAST_PATH;
            } else {
                no_fast_path(c);
            }
        });
        into.push(round(node, name, BridgeIngress, frame, Act::Next));
    };
    for _ in 0..rounds() {
        case(node, &[], true, "check", &mut alone);
        case(node, &[sibling], true, "check-lookup", &mut beside);
        case(node, &[], false, "check-off", &mut off);
    }
    node.reconfigure(|c| c.flags |= FLAG_FAST_PATH);
    node.dp.flows.remove(&sibling).expect("removing a flow");
    report("check", BridgeIngress, alone);
    report("check-lookup", BridgeIngress, beside);
    report("check-off", BridgeIngress, off);
}

#[test]
#[ignore = "a microbenchmark: cargo xtask bench runs it"]
fn cost_per_packet() {
    with_node_setup(LoadOptions::default(), masquerade, |node| {
        // A pod's segment to a remote pod: the host decides it (the fast path's check
        // finds nothing), then, admitted, encapsulated and redirected to the uplink.
        let to_remote = outbound(BridgeIngress, W2.pod, Transport::Tcp, PAYLOAD, |_| {});
        let sibling =
            from_pod(&Conn::new(Proto::Tcp, (POD, 40001), (W2.pod, 80)).datagram(ACK, PAYLOAD));
        measure_check(node, &to_remote, &sibling);
        node.admit(&to_remote);
        measure(node, "encap", BridgeIngress, &to_remote, Act::Redirect);
        // A remote pod's segment to ours: decapsulated, redirected to the pod.
        let from_remote = from_peer(
            W2.node,
            IpEcn::NotEct,
            &datagram(ipv4(W2.pod, POD), Transport::Tcp, PAYLOAD),
        );
        node.admit(&from_remote);
        measure(node, "decap", UplinkIngress, &from_remote, Act::Redirect);
        // A pod's segment of an established connection to the outside: masqueraded.
        let conn = client(Proto::Tcp, POD, OUTSIDE);
        let translated = open(node, conn, SYN, NODE_IP);
        measure(node, "snat", UplinkEgress, &outgoing(&conn, ACK), Act::Next);
        // The same segment as the pod sends it: translated on the bridge, to the uplink.
        let from_the_pod = from_pod(&conn.datagram(ACK, nat::PAYLOAD));
        node.admit(&from_the_pod);
        measure(
            node,
            "snat-bridge",
            BridgeIngress,
            &from_the_pod,
            Act::Redirect,
        );
        // Its reply: translated back and redirected to the pod.
        let reply = from_underlay(&translated.reversed().datagram(ACK, PAYLOAD));
        node.admit(&from_underlay(&conn.reversed().datagram(ACK, PAYLOAD)));
        measure(node, "snat-reply", UplinkIngress, &reply, Act::Redirect);
        // What `encap` made, as the uplink's egress hook sees it again where there is
        // no TCX (6.1's cls_bpf runs it on every packet we redirect there).
        let mut ours = tunnel_header(NODE_IP, IpEcn::NotEct);
        ours.destination = W2.node.octets();
        let tunnelled = from_host(&nest(
            ours,
            &datagram(ipv4(POD, W2.pod), Transport::Tcp, PAYLOAD),
        ));
        measure(node, "tunnelled", UplinkEgress, &tunnelled, Act::Next);
        // Underlay traffic that is none of ours: what every other packet pays.
        let other = from_underlay(&datagram(
            ipv4(Ipv4Addr::new(172, 18, 0, 9), NODE_IP),
            Transport::Tcp,
            PAYLOAD,
        ));
        measure(node, "pass", UplinkIngress, &other, Act::Next);
    });
}
