//! The masquerade connection table: port allocation (collisions, exhaustion, never a
//! port in use), a full table, TCP state and timeouts, expiry, and the agent's
//! collection of expired entries.
//!
//! Collisions are forced by claiming REPLY keys from userspace, as a flow of another
//! pod would hold them. Timeouts are seconds: the tests that wait for an expiry use
//! one-second timeouts and poll the table just past them.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use overlay_agent::datapath::{
    LoadOptions, batch,
    conntrack::{Collected, monotonic_ns},
};
use overlay_common::{
    DatapathConfig,
    Hook::{UplinkEgress, UplinkIngress},
    Reason,
    config::{NAT_PORT_MAX, NAT_PORT_MIN},
    conntrack::{
        CtEntry, CtKey, CtTimeouts, DIR_ORIGINAL, DIR_REPLY, Rule,
        flags::{
            FIN_ORIGINAL, FIN_REPLY, FIN_TIMESTAMP, REPLY_CLOSED_FIRST, RST as RST_SEEN, SEEN_REPLY,
        },
    },
    counters::NatEvent,
};

use super::{
    fixture::{
        Act, Node, assert_bytes_eq, check_verdict, masquerade, monotonic_ns_after, with_node_setup,
    },
    nat::{
        PAYLOAD, Tracked, assert_table, client, ct_key, incoming, open, outgoing, translate_back,
        translate_out, translation,
    },
    packet::{ACK, Conn, FIN, Proto, RST, SYN},
    topology::{NODE_IP, OUTSIDE, OUTSIDE_2, POD, POD_UNRESOLVED},
};

/// Masquerade on, translated ports `ports`, and timeouts `timeouts`.
fn setup(
    ports: (u16, u16),
    timeouts: CtTimeouts,
) -> impl FnOnce(&mut DatapathConfig) + Send + 'static {
    move |c| {
        masquerade(c);
        (c.nat_port_min, c.nat_port_max) = ports;
        c.ct_timeouts = timeouts;
    }
}

/// A small range of translated ports, and the default one.
const TWO_PORTS: (u16, u16) = (62000, 62001);
const ALL_PORTS: (u16, u16) = (NAT_PORT_MIN, NAT_PORT_MAX);

/// A pod's UDP connection from port `sport` to `server`.
fn udp(sport: u16, server: (Ipv4Addr, u16)) -> Conn {
    Conn::new(Proto::Udp, (POD, sport), server)
}

/// Claims translated port `port` towards `server` for UDP, as another pod's flow would:
/// the REPLY key replies from `server` to that port carry. Returns the key.
fn claim(node: &Node, server: (Ipv4Addr, u16), port: u16, created_ns: u64) -> CtKey {
    let key = ct_key(&Conn::new(Proto::Udp, server, (NODE_IP, port)), DIR_REPLY);
    let value = CtEntry {
        expires_ns: 0,
        created_ns,
        addr: POD_UNRESOLVED.octets(),
        port: 5000u16.to_be_bytes(),
        rule: Rule::PodToOutside as u8,
        ..CtEntry::default()
    };
    node.conntrack_map()
        .insert(key, value, 0)
        .expect("claiming a port");
    key
}

/// Sends the first packet of `conn` out and checks that masquerade drops it for
/// `reason`, adding nothing to the table. Returns the events of the run.
fn refused(node: &Node, conn: &Conn, reason: Reason) -> BTreeMap<NatEvent, u64> {
    let before = node.conntrack_entries();
    let out = node.expect_outcome(UplinkEgress, &outgoing(conn, 0), Act::Shot, reason);
    assert_eq!(
        node.conntrack_entries(),
        before,
        "the table after a refused flow"
    );
    out.events
}

#[test]
fn a_taken_port_is_retried() {
    // Of two ports, the first is taken towards each of 32 servers: every flow must get
    // the second. Each flow's first candidate is random, so about half of them collide;
    // none colliding at all would happen once in 2^32 runs.
    with_node_setup(
        LoadOptions::default(),
        setup(TWO_PORTS, CtTimeouts::DEFAULT),
        |node| {
            let mut collisions = 0;
            for i in 0..32 {
                let server = (OUTSIDE, 1000 + i);
                // Claimed now: a claim without its flow is an orphan, which masquerade
                // reclaims once it is two seconds old (32 rounds take longer than that
                // under emulation).
                claim(node, server, TWO_PORTS.0, monotonic_ns());
                let (translated, mut events) = translate_out(node, udp(40000, server), 0, NODE_IP);
                assert_eq!(translated.src.1, TWO_PORTS.1, "the free port");
                assert_eq!(events.remove(&NatEvent::FlowCreated), Some(1));
                collisions += events.remove(&NatEvent::PortCollision).unwrap_or(0);
                assert_eq!(events, BTreeMap::new());
            }
            assert!((1..=32).contains(&collisions), "{collisions} collisions");
        },
    );
}

#[test]
fn a_closed_tcp_connection_gives_its_port_at_once() {
    // One port: a second connection to the same server needs the first one's.
    const ONE_PORT: (u16, u16) = (62000, 62000);
    with_node_setup(
        LoadOptions::default(),
        setup(ONE_PORT, CtTimeouts::DEFAULT),
        |node| {
            let server = (OUTSIDE, 443);
            let first = Conn::new(Proto::Tcp, (POD, 40020), server);
            let second = Conn::new(Proto::Tcp, (POD, 40021), server);
            let nat = open(node, first, SYN, NODE_IP);
            translate_back(node, first, nat, SYN | ACK);
            // While the first is open, the port is not given.
            refused(node, &second, Reason::DropNatPortsExhausted);
            // Closed in both directions, the pod first (so the TIME_WAIT is the pod's,
            // the outside holds none): the port is the second connection's at once.
            translate_out(node, first, FIN | ACK, NODE_IP);
            translate_back(node, first, nat, FIN | ACK);
            let reused = open(node, second, SYN, NODE_IP);
            assert_eq!(reused.src.1, ONE_PORT.0);
            // The first connection's entries went with it: a late packet of it is a new
            // flow, which finds no port.
            assert!(!listed(node, &first), "the closed flow is still listed");
            refused(node, &first, Reason::DropNatPortsExhausted);
        },
    );
}

/// Marks of the first connection in the TIME_WAIT tests: its FIN's sequence number
/// and timestamp. The outside's TIME_WAIT expects a sequence number past the FIN.
const FIN_SEQ: u32 = 0x8000_0000;
const FIN_TSVAL: u32 = 0x7000_0000;
const FIN_SEQ_END: u32 = FIN_SEQ + PAYLOAD as u32 + 1;

/// One port, held by a connection the outside closed first (`fin_tsval`: whether the
/// pod's FIN carried a timestamp), then a second connection's SYN with `syn`'s sequence
/// number and timestamp: whether it got the port.
fn after_outside_closed(fin_tsval: Option<u32>, syn: (u32, Option<u32>)) -> bool {
    const ONE_PORT: (u16, u16) = (62000, 62000);
    let given = Arc::new(AtomicBool::new(false));
    let result = given.clone();
    with_node_setup(
        LoadOptions::default(),
        setup(ONE_PORT, STATEFUL),
        move |node| {
            let server = (OUTSIDE, 80);
            let first = Conn::new(Proto::Tcp, (POD, 40030), server).with_marks(FIN_SEQ, fin_tsval);
            let second = Conn::new(Proto::Tcp, (POD, 40031), server).with_marks(syn.0, syn.1);
            let nat = open(node, first, SYN, NODE_IP);
            translate_back(node, first, nat, SYN | ACK);
            translate_back(node, first, nat, FIN | ACK);
            translate_out(node, first, ACK, NODE_IP);
            assert_state(
                node,
                &first,
                SEEN_REPLY | FIN_REPLY | REPLY_CLOSED_FIRST,
                "closing",
                STATEFUL.tcp_fin,
            );
            translate_out(node, first, FIN | ACK, NODE_IP);
            let marked = fin_tsval.map_or(0, |_| FIN_TIMESTAMP);
            let closed = SEEN_REPLY | FIN_REPLY | REPLY_CLOSED_FIRST | FIN_ORIGINAL | marked;
            assert_state(node, &first, closed, "time-wait", STATEFUL.tcp_time_wait);
            let key = ct_key(&first, DIR_ORIGINAL);
            let entry = node
                .conntrack_map()
                .get(&key, 0)
                .expect("the closed flow's entry");
            assert_eq!(
                (entry.fin_seq_end, entry.fin_tsval),
                (FIN_SEQ_END, fin_tsval.unwrap_or(0)),
                "marks of the pod's FIN"
            );
            let frame = outgoing(&second, SYN);
            let out = node.run(UplinkEgress, &frame);
            match translation(node, &second) {
                Some(translated) => {
                    // Given: the SYN leaves on the port, the first flow's entries are gone.
                    assert_eq!(translated, (NODE_IP, ONE_PORT.0));
                    check_verdict(UplinkEgress, &frame, &out, Act::Next, Reason::Masqueraded);
                    let expected = outgoing(&second.with_src(translated), SYN);
                    assert_bytes_eq(&out.data, &expected, "the SYN on the handed-on port");
                    assert!(!listed(node, &first), "the closed flow is still listed");
                    result.store(true, Ordering::Relaxed);
                }
                None => {
                    let dropped = Reason::DropNatPortsExhausted;
                    check_verdict(UplinkEgress, &frame, &out, Act::Shot, dropped);
                    assert!(
                        listed(node, &first),
                        "a refused SYN took the closed flow away"
                    );
                }
            }
        },
    );
    given.load(Ordering::Relaxed)
}

#[test]
fn a_port_the_outside_holds_in_time_wait_goes_only_to_a_syn_it_accepts() {
    let ts = Some(FIN_TSVAL);
    let cases = [
        // With timestamps: a newer TSval is accepted whatever the sequence number (a
        // wrapped one included), an older or equal one refused whatever it (PAWS).
        ("newer timestamp", ts, (0, Some(FIN_TSVAL + 1)), true),
        (
            "newer timestamp, across the wrap",
            Some(u32::MAX - 5),
            (0, Some(10)),
            true,
        ),
        (
            "same timestamp",
            ts,
            (FIN_SEQ_END + 1000, Some(FIN_TSVAL)),
            false,
        ),
        (
            "older timestamp",
            ts,
            (FIN_SEQ_END + 1000, Some(FIN_TSVAL - 1)),
            false,
        ),
        // A SYN without timestamps, or a flow that had none: the sequence number must
        // lie past the FIN.
        (
            "no timestamp, sequence past the FIN",
            ts,
            (FIN_SEQ_END + 1, None),
            true,
        ),
        (
            "no timestamp, sequence at the FIN's end",
            ts,
            (FIN_SEQ_END, None),
            false,
        ),
        (
            "old flow without timestamps, later sequence",
            None,
            (FIN_SEQ_END + 1, Some(1)),
            true,
        ),
        (
            "old flow without timestamps, earlier sequence",
            None,
            (FIN_SEQ - 1, Some(u32::MAX / 2)),
            false,
        ),
    ];
    for (case, fin_tsval, syn, accepted) in cases {
        eprintln!("case: {case}");
        assert_eq!(after_outside_closed(fin_tsval, syn), accepted, "{case}");
    }
}

#[test]
fn a_syn_on_a_closed_flow_reopens_it() {
    // The pod reuses its port: the flow starts over with its translation.
    with_node_setup(LoadOptions::default(), setup(ALL_PORTS, STATEFUL), |node| {
        let conn = client(Proto::Tcp, POD, OUTSIDE);
        let nat = open(node, conn, SYN, NODE_IP);
        translate_back(node, conn, nat, SYN | ACK);
        translate_back(node, conn, nat, FIN | ACK);
        translate_out(node, conn, FIN | ACK, NODE_IP);
        assert_eq!(translation(node, &conn), Some(nat.src));
        let (again, events) = translate_out(node, conn, SYN, NODE_IP);
        assert_eq!(
            (again, events),
            (nat, BTreeMap::new()),
            "same translation, no new flow"
        );
        assert_state(node, &conn, 0, "unreplied", STATEFUL.tcp_syn);
        // An ACK does not reopen a closed flow.
        translate_back(node, conn, nat, FIN | ACK);
        translate_out(node, conn, FIN | ACK, NODE_IP);
        translate_out(node, conn, ACK, NODE_IP);
        assert_state(
            node,
            &conn,
            SEEN_REPLY | FIN_REPLY | REPLY_CLOSED_FIRST | FIN_ORIGINAL,
            "time-wait",
            STATEFUL.tcp_time_wait,
        );
    });
}

#[test]
fn no_port_is_given_twice() {
    with_node_setup(
        LoadOptions::default(),
        setup(TWO_PORTS, CtTimeouts::DEFAULT),
        |node| {
            let server = (OUTSIDE, 443);
            let a = open(node, udp(40000, server), 0, NODE_IP);
            let b = open(node, udp(40001, server), 0, NODE_IP);
            assert_ne!(a.src.1, b.src.1, "two flows to one server share a port");
            // Both ports taken: the third flow to that server has none...
            let events = refused(node, &udp(40002, server), Reason::DropNatPortsExhausted);
            let collisions = events.get(&NatEvent::PortCollision).copied().unwrap_or(0);
            assert!(
                collisions >= 2,
                "every port must have been tried: {collisions} collisions"
            );
            assert_eq!(events.get(&NatEvent::FlowCreated), None);
            // ...but to another server the same ports are free (as Linux's masquerade: the
            // mapping depends on the destination).
            let c = open(node, udp(40002, (OUTSIDE_2, 443)), 0, NODE_IP);
            // Each flow still gets its own replies.
            for (sport, translated) in [(40000, a), (40001, b), (40002, c)] {
                translate_back(node, udp(sport, translated.dst), translated, 0);
            }
        },
    );
}

#[test]
fn ports_taken_by_others_are_never_given() {
    // Ranges of one and of two ports, all taken from userspace.
    for ports in [(62000, 62000), TWO_PORTS] {
        with_node_setup(
            LoadOptions::default(),
            setup(ports, CtTimeouts::DEFAULT),
            move |node| {
                let server = (OUTSIDE, 443);
                let now = monotonic_ns();
                let claimed: Vec<CtKey> = (ports.0..=ports.1)
                    .map(|p| claim(node, server, p, now))
                    .collect();
                let events = refused(node, &udp(40000, server), Reason::DropNatPortsExhausted);
                assert!(
                    events[&NatEvent::PortCollision] >= claimed.len() as u64,
                    "{events:?}"
                );
                // A port given back is the one the next flow gets.
                node.conntrack_map()
                    .remove(&claimed[0])
                    .expect("releasing a port");
                let translated = open(node, udp(40000, server), 0, NODE_IP);
                assert_eq!(translated.src.1, ports.0);
            },
        );
    }
}

#[test]
fn ports_are_found_in_ranges_of_any_size() {
    // 7919 ports (a multiple of any fixed stride the search might use), only every
    // fourth one free: each new flow must find a free port near its random start.
    const PORTS: (u16, u16) = (50000, 50000 + 7918);
    with_node_setup(
        LoadOptions::default(),
        setup(PORTS, CtTimeouts::DEFAULT),
        |node| {
            let server = (OUTSIDE, 443);
            let now = monotonic_ns();
            let mut map = node.conntrack_map();
            for port in (PORTS.0..=PORTS.1).filter(|p| !(p - PORTS.0).is_multiple_of(4)) {
                let key = ct_key(&Conn::new(Proto::Udp, server, (NODE_IP, port)), DIR_REPLY);
                let value = CtEntry {
                    created_ns: now,
                    addr: POD_UNRESOLVED.octets(),
                    ..CtEntry::default()
                };
                map.insert(key, value, 0).expect("claiming a port");
            }
            for sport in 40000..40006 {
                let translated = open(node, udp(sport, server), 0, NODE_IP);
                assert!(
                    (translated.src.1 - PORTS.0).is_multiple_of(4),
                    "port {} was taken",
                    translated.src.1
                );
            }
        },
    );
}

#[test]
fn a_full_table_refuses_new_flows_only() {
    // Room for two flows (two entries each); with five entries the third flow's REPLY
    // entry fits but its ORIGINAL entry does not, and must not be left behind.
    for entries in [4, 5] {
        let options = LoadOptions {
            conntrack_entries: entries,
            ..LoadOptions::default()
        };
        with_node_setup(
            options,
            setup(TWO_PORTS, CtTimeouts::DEFAULT),
            move |node| {
                let a = udp(40000, (OUTSIDE, 443));
                let b = udp(40001, (OUTSIDE, 443));
                let (ta, tb) = (open(node, a, 0, NODE_IP), open(node, b, 0, NODE_IP));
                let events = refused(
                    node,
                    &udp(40002, (OUTSIDE_2, 443)),
                    Reason::DropNatTableFull,
                );
                assert_eq!(events, BTreeMap::new());
                // Known flows go on both ways.
                assert_eq!(translate_out(node, a, 0, NODE_IP), (ta, BTreeMap::new()));
                translate_back(node, b, tb, 0);
                let mut tracked = vec![
                    Tracked::translated(a, ta, Rule::PodToOutside, 0),
                    Tracked::translated(b, tb, Rule::PodToOutside, SEEN_REPLY),
                ];
                assert_table(node, &tracked);
                // Clients of a local pod pass all the same; they are tracked (rule 4) while
                // there is room: the fifth entry, given back by the refused flow.
                for (i, sport) in [50000, 50001].into_iter().enumerate() {
                    let inbound = Conn::new(Proto::Udp, (OUTSIDE, sport), (POD, 53));
                    node.expect_untouched(
                        UplinkIngress,
                        &incoming(&inbound, 0),
                        Reason::PassNotTunnel,
                    );
                    if 4 + i < entries as usize {
                        tracked.push(Tracked::untranslated(inbound, 0));
                    }
                }
                assert_table(node, &tracked);
            },
        );
    }
}

/// Distinct timeouts, so that each state is recognised by its deadline.
const STATEFUL: CtTimeouts = CtTimeouts {
    tcp_syn: 100,
    tcp_established: 1000,
    tcp_fin: 300,
    tcp_closed: 30,
    tcp_time_wait: 200,
    udp: 50,
    udp_assured: 500,
    icmp: 70,
};

/// Checks that `conn`'s flow is listed in `state` with `flags`, expiring in `secs`
/// seconds (less the time the test took since).
#[track_caller]
fn assert_state(node: &Node, conn: &Conn, flags: u8, state: &str, secs: u32) {
    let flows = node.dp.conntrack.flows().expect("listing flows");
    let flow = flows
        .iter()
        .find(|f| f.proto == conn.proto.number() && f.src == conn.src && f.dst == conn.dst)
        .unwrap_or_else(|| panic!("{conn:?} not listed"));
    assert_eq!((flow.flags, flow.state()), (flags, state), "{conn:?}");
    let full = Duration::from_secs(secs.into());
    assert!(
        flow.expires_in <= full && flow.expires_in > full - Duration::from_secs(2),
        "{conn:?} expires in {:?}, want {full:?}",
        flow.expires_in
    );
}

#[test]
fn tcp_state_drives_timeouts() {
    with_node_setup(LoadOptions::default(), setup(ALL_PORTS, STATEFUL), |node| {
        let t = STATEFUL;
        // Opened, answered, closed from the inside first, then from the outside.
        let conn = client(Proto::Tcp, POD, OUTSIDE);
        let nat = open(node, conn, SYN, NODE_IP);
        assert_state(node, &conn, 0, "unreplied", t.tcp_syn);
        translate_back(node, conn, nat, SYN | ACK);
        assert_state(node, &conn, SEEN_REPLY, "established", t.tcp_established);
        translate_out(node, conn, FIN | ACK, NODE_IP);
        assert_state(node, &conn, SEEN_REPLY | FIN_ORIGINAL, "closing", t.tcp_fin);
        translate_back(node, conn, nat, FIN | ACK);
        assert_state(
            node,
            &conn,
            SEEN_REPLY | FIN_ORIGINAL | FIN_REPLY,
            "closed",
            t.tcp_closed,
        );
        // Later packets of a closed connection do not revive it.
        translate_out(node, conn, ACK, NODE_IP);
        assert_state(
            node,
            &conn,
            SEEN_REPLY | FIN_ORIGINAL | FIN_REPLY,
            "closed",
            t.tcp_closed,
        );

        // Reset by the outside, and by the pod.
        for (sport, reset_by_pod) in [(40010, false), (40011, true)] {
            let conn = Conn::new(Proto::Tcp, (POD, sport), (OUTSIDE, 443));
            let nat = open(node, conn, SYN, NODE_IP);
            translate_back(node, conn, nat, SYN | ACK);
            if reset_by_pod {
                translate_out(node, conn, RST, NODE_IP);
            } else {
                translate_back(node, conn, nat, RST | ACK);
            }
            assert_state(node, &conn, SEEN_REPLY | RST_SEEN, "reset", t.tcp_closed);
        }

        // A client of a local pod (rule 4): tracked with the same states.
        let inbound = Conn::new(Proto::Tcp, (OUTSIDE, 50000), (POD, 80));
        node.expect_untouched(
            UplinkIngress,
            &incoming(&inbound, SYN),
            Reason::PassNotTunnel,
        );
        assert_state(node, &inbound, 0, "unreplied", t.tcp_syn);
        node.expect_untouched(
            UplinkEgress,
            &outgoing(&inbound.reversed(), SYN | ACK),
            Reason::PassNotOverlay,
        );
        assert_state(node, &inbound, SEEN_REPLY, "established", t.tcp_established);
        node.expect_untouched(
            UplinkEgress,
            &outgoing(&inbound.reversed(), FIN | ACK),
            Reason::PassNotOverlay,
        );
        assert_state(node, &inbound, SEEN_REPLY | FIN_REPLY, "closing", t.tcp_fin);
    });
}

#[test]
fn udp_and_icmp_timeouts() {
    with_node_setup(LoadOptions::default(), setup(ALL_PORTS, STATEFUL), |node| {
        let t = STATEFUL;
        for (proto, unreplied, replied) in [
            (Proto::Udp, t.udp, t.udp_assured),
            (Proto::Echo, t.icmp, t.icmp),
        ] {
            let conn = client(proto, POD, OUTSIDE);
            let nat = open(node, conn, 0, NODE_IP);
            assert_state(node, &conn, 0, "unreplied", unreplied);
            translate_back(node, conn, nat, 0);
            assert_state(node, &conn, SEEN_REPLY, "established", replied);
        }
    });
}

/// One-second timeouts for UDP, the protocol of the expiry tests.
const SHORT_UDP: CtTimeouts = CtTimeouts {
    udp: 1,
    udp_assured: 1,
    ..CtTimeouts::DEFAULT
};

/// Waits until none of `conns` is listed live any more (the agent and the datapath read
/// the same clock).
fn wait_for_expiry(node: &Node, conns: &[Conn]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while conns
        .iter()
        .any(|c| translation(node, c).is_some() || listed(node, c))
    {
        assert!(Instant::now() < deadline, "flows did not expire");
        thread::sleep(Duration::from_millis(50));
    }
}

fn listed(node: &Node, conn: &Conn) -> bool {
    let flows = node.dp.conntrack.flows().expect("listing flows");
    flows
        .iter()
        .any(|f| f.proto == conn.proto.number() && f.src == conn.src && f.dst == conn.dst)
}

#[test]
fn expired_flows_are_ignored_and_replaced() {
    with_node_setup(
        LoadOptions::default(),
        setup(TWO_PORTS, SHORT_UDP),
        |node| {
            let conn = udp(40000, (OUTSIDE, 443));
            let old = open(node, conn, 0, NODE_IP);
            let inbound = client(Proto::Udp, OUTSIDE_2, POD);
            node.expect_untouched(UplinkIngress, &incoming(&inbound, 0), Reason::PassNotTunnel);
            wait_for_expiry(node, &[conn, inbound]);

            // A reply to the expired flow is not translated.
            node.expect_untouched(
                UplinkIngress,
                &incoming(&old.reversed(), 0),
                Reason::PassNotTunnel,
            );
            // The connection starts over, on either port: an expired flow holds none (its
            // port is taken over before the agent collects it).
            let new = open(node, conn, 0, NODE_IP);
            if new.src.1 != old.src.1 {
                // Replies to the old port are still not translated.
                node.expect_untouched(
                    UplinkIngress,
                    &incoming(&old.reversed(), 0),
                    Reason::PassNotTunnel,
                );
            }
            translate_back(node, conn, new, 0);
            // The pod's reply to an expired inbound flow is a new flow of the pod.
            let reply = inbound.reversed();
            let out = node.expect_outcome(
                UplinkEgress,
                &outgoing(&reply, 0),
                Act::Next,
                Reason::Masqueraded,
            );
            assert_eq!(out.events[&NatEvent::FlowCreated], 1);
            assert!(translation(node, &reply).is_some());
        },
    );
}

#[test]
fn collection_removes_expired_flows_and_orphans() {
    with_node_setup(
        LoadOptions::default(),
        setup(TWO_PORTS, SHORT_UDP),
        |node| {
            let expiring = udp(40000, (OUTSIDE, 443));
            open(node, expiring, 0, NODE_IP);
            let inbound = client(Proto::Udp, OUTSIDE_2, POD);
            node.expect_untouched(UplinkIngress, &incoming(&inbound, 0), Reason::PassNotTunnel);
            let lasting = client(Proto::Tcp, POD, OUTSIDE);
            let lasting_nat = open(node, lasting, SYN, NODE_IP);
            // REPLY entries without a flow: one older than the agent's grace period, one
            // just claimed (its flow may be on its way).
            let long_ago = past_the_grace_period();
            let now = monotonic_ns();
            let old_orphan = claim(node, (OUTSIDE_2, 53), TWO_PORTS.0, long_ago);
            let new_orphan = claim(node, (OUTSIDE_2, 53), TWO_PORTS.1, now);
            // The live flow's own REPLY entry, made old: still owned, so kept. And an old
            // REPLY entry leading to the live flow from a port it no longer holds: an orphan.
            let mut map = node.conntrack_map();
            let own_reply = ct_key(&lasting_nat.reversed(), DIR_REPLY);
            let mut value = map.get(&own_reply, 0).expect("the live flow's REPLY entry");
            value.created_ns = long_ago;
            map.insert(own_reply, value, 0)
                .expect("aging the REPLY entry");
            let other_port = if lasting_nat.src.1 == NAT_PORT_MAX {
                NAT_PORT_MIN
            } else {
                lasting_nat.src.1 + 1
            };
            let stale = ct_key(
                &lasting_nat.with_src((NODE_IP, other_port)).reversed(),
                DIR_REPLY,
            );
            map.insert(stale, value, 0).expect("a stale REPLY entry");
            assert!(node.conntrack_entries().contains_key(&old_orphan));
            wait_for_expiry(node, &[expiring, inbound]);
            // Expired entries stay in the map until collected.
            assert_eq!(node.conntrack_entries().len(), 8);

            let collected = node.dp.conntrack.collect().expect("collecting");
            assert_eq!(
                collected,
                Collected {
                    expired: 2,
                    orphans: 2,
                    remaining: 3
                }
            );
            let keys: Vec<CtKey> = node.conntrack_entries().into_keys().collect();
            let mut want = vec![ct_key(&lasting, DIR_ORIGINAL), own_reply, new_orphan];
            want.sort();
            assert_eq!(keys, want);
            // Nothing more to do.
            let again = node.dp.conntrack.collect().expect("collecting");
            assert_eq!(
                again,
                Collected {
                    expired: 0,
                    orphans: 0,
                    remaining: 3
                }
            );
        },
    );
}

/// A time further back than the agent's grace period for orphans (10 s).
fn past_the_grace_period() -> u64 {
    monotonic_ns_after(11_000_000_000) - 11_000_000_000
}

/// How a port was left free for the datapath to give to a new flow.
#[derive(Debug, Clone, Copy)]
enum Freed {
    /// Its flow expired (not collected yet).
    Expired,
    /// Its REPLY entry lost its flow long ago.
    Orphaned,
}

#[test]
fn a_port_taken_over_during_a_collection_stays_with_its_new_flow() {
    // The collector decides from a snapshot of the table; the datapath goes on
    // meanwhile. A port the snapshot shows free may belong to a new flow by the time
    // the collector removes its REPLY entry: that entry must stay, or the new flow's
    // replies go untranslated and its connection times out.
    for freed in [Freed::Expired, Freed::Orphaned] {
        eprintln!("case: {freed:?}");
        with_node_setup(
            LoadOptions::default(),
            setup(TWO_PORTS, SHORT_UDP),
            move |node| {
                let server = (OUTSIDE, 443);
                // Another pod's live flow holds the second port of the range.
                let (free, held) = TWO_PORTS;
                let other = Conn::new(Proto::Udp, (POD_UNRESOLVED, 5000), server);
                let live = CtEntry {
                    expires_ns: u64::MAX,
                    created_ns: monotonic_ns(),
                    addr: NODE_IP.octets(),
                    port: held.to_be_bytes(),
                    rule: Rule::PodToOutside as u8,
                    ..CtEntry::default()
                };
                let mut map = node.conntrack_map();
                map.insert(ct_key(&other, DIR_ORIGINAL), live, 0)
                    .expect("another pod's flow");
                claim(node, server, held, live.created_ns);
                let expired = match freed {
                    Freed::Expired => {
                        let old = udp(40000, server);
                        assert_eq!(open(node, old, 0, NODE_IP).src.1, free);
                        wait_for_expiry(node, &[old]);
                        1
                    }
                    Freed::Orphaned => {
                        claim(node, server, free, past_the_grace_period());
                        0
                    }
                };
                let snapshot = node.dp.conntrack.snapshot().expect("a snapshot");
                let conn = udp(40001, server);
                let new = open(node, conn, 0, NODE_IP);
                assert_eq!(new.src.1, free, "the new flow takes the freed port");
                let collected = node.dp.conntrack.sweep(snapshot).expect("collecting");
                assert_eq!(
                    (collected.expired, collected.orphans),
                    (expired, 0),
                    "removed from the snapshot"
                );
                translate_back(node, conn, new, 0);
            },
        );
    }
}

#[test]
fn a_syn_sent_again_restores_its_flows_reply_entry() {
    // What the collector can still do in the instant between reading an entry and
    // removing it (see above): a flow loses its REPLY entry. Its next SYN puts it back.
    with_node_setup(
        LoadOptions::default(),
        setup(ALL_PORTS, CtTimeouts::DEFAULT),
        |node| {
            let conn = client(Proto::Tcp, POD, OUTSIDE);
            let (translated, lost) = open_and_lose_reply_entry(node, conn, SYN, SYN | ACK);
            let (again, _) = translate_out(node, conn, SYN, NODE_IP);
            assert_eq!(again, translated, "the SYN again, on the same translation");
            assert_restored(node, translated, lost);
            translate_back(node, conn, translated, SYN | ACK);
        },
    );
}

#[test]
fn a_datagram_flow_gets_its_reply_entry_back_when_its_deadline_moves() {
    // The same loss on a flow without SYNs: its packets put the entry back when they
    // refresh the flow's deadline, which they do at most about once a second.
    with_node_setup(
        LoadOptions::default(),
        setup(ALL_PORTS, CtTimeouts::DEFAULT),
        |node| {
            let conn = udp(40002, (OUTSIDE, 53));
            let (translated, lost) = open_and_lose_reply_entry(node, conn, 0, 0);
            thread::sleep(Duration::from_millis(1100));
            let (again, _) = translate_out(node, conn, 0, NODE_IP);
            assert_eq!(again, translated, "the same translation, a second later");
            assert_restored(node, translated, lost);
            translate_back(node, conn, translated, 0);
        },
    );
}

/// Opens `conn` with a packet of TCP flags `flags`, then removes its REPLY entry as the
/// collector can: an answer with flags `answer` then finds no flow and is left to the
/// host. Returns the translated tuple and the entry removed.
fn open_and_lose_reply_entry(node: &Node, conn: Conn, flags: u8, answer: u8) -> (Conn, CtEntry) {
    let translated = open(node, conn, flags, NODE_IP);
    let key = ct_key(&translated.reversed(), DIR_REPLY);
    let mut map = node.conntrack_map();
    let lost = map.get(&key, 0).expect("the REPLY entry creation made");
    map.remove(&key).expect("removing the REPLY entry");
    node.expect_untouched(
        UplinkIngress,
        &incoming(&translated.reversed(), answer),
        Reason::PassNotTunnel,
    );
    (translated, lost)
}

/// The REPLY entry of `translated` is back as creation made it (`lost`): born with its
/// flow, so that the collector removes it with the flow.
fn assert_restored(node: &Node, translated: Conn, lost: CtEntry) {
    let key = ct_key(&translated.reversed(), DIR_REPLY);
    assert_eq!(node.conntrack_map().get(&key, 0).ok(), Some(lost));
}

#[test]
fn the_agent_reads_the_whole_table_in_batches() {
    with_node_setup(
        LoadOptions::default(),
        setup(ALL_PORTS, CtTimeouts::DEFAULT),
        |node| {
            // More entries than one call returns, spread over two servers.
            let mut map = node.conntrack_map();
            for i in 0..10_000u32 {
                let server = if i % 2 == 0 {
                    (OUTSIDE, 443)
                } else {
                    (OUTSIDE_2, 53)
                };
                let port = 10_000 + (i / 2) as u16;
                let key = ct_key(&Conn::new(Proto::Udp, server, (NODE_IP, port)), DIR_REPLY);
                let value = CtEntry {
                    created_ns: u64::from(i),
                    port: port.to_be_bytes(),
                    ..CtEntry::default()
                };
                map.insert(key, value, 0).expect("filling the table");
            }
            let walked = node.conntrack_entries();
            assert_eq!(walked.len(), 10_000);
            // Asking for one entry at a time also meets buckets of more than one (ENOSPC),
            // and must grow its request rather than fail or skip them.
            for first_request in [batch::BATCH, 1] {
                let read: BTreeMap<CtKey, CtEntry> = batch::entries_asking(&map, first_request)
                    .expect("reading in batches")
                    .into_iter()
                    .collect();
                assert!(
                    read == walked,
                    "batches of {first_request} read what a walk reads"
                );
            }
        },
    );
}
