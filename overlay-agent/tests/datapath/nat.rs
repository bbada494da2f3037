//! Masquerade with flanneld's `--ip-masq` semantics, rule by rule: what is translated on
//! the uplink's egress, translated back on its ingress, and what is left alone.
//!
//! Expected frames are the connection's packets built again with the translated
//! address and port (etherparse computes every checksum from scratch); the port is the
//! one the connection table names, and must lie in the configured range.

use std::{collections::BTreeMap, net::Ipv4Addr};

use etherparse::{IpEcn, IpNumber};
use overlay_agent::datapath::LoadOptions;
use overlay_common::{
    DatapathConfig,
    Hook::{UplinkEgress, UplinkIngress},
    Reason,
    config::KUBE_PROXY_MASQ_MARK,
    conntrack::{CtEntry, CtKey, DIR_ORIGINAL, DIR_REPLY, Rule, flags::SEEN_REPLY},
    counters::NatEvent,
};

use super::{
    expect::{assert_checksums, decapsulated, encapsulated, towards},
    fixture::{
        Act, Node, Outcome, SkBuff, assert_bytes_eq, check_verdict, masquerade,
        with_masquerading_node, with_node, with_node_setup,
    },
    malformed::malformed,
    packet::{
        ACK, Conn, HeaderChange, PSH, Proto, SYN, Transport, add_router_alert, datagram,
        first_fragment, from_host, from_peer, from_underlay, ipv4, last_fragment,
    },
    topology::{
        GATEWAY, NODE_IP, NODE_OTHER_IP, OUTSIDE, OUTSIDE_2, POD, POD_UNRESOLVED, REMOTES, Remote,
        W2, W3,
    },
};

/// Payload bytes of the connections' packets.
pub(super) const PAYLOAD: usize = 37;

/// The test's connection of `proto` from a client at `src` to a server at `dst`; each
/// protocol has a client port of its own, so that the connections of [`Proto::ALL`]
/// between the same hosts are distinct flows.
pub(super) fn client(proto: Proto, src: Ipv4Addr, dst: Ipv4Addr) -> Conn {
    match proto {
        Proto::Echo => Conn::new(proto, (src, 0x77), (dst, 0)),
        Proto::Tcp => Conn::new(proto, (src, 40000), (dst, 443)),
        Proto::Udp => Conn::new(proto, (src, 40001), (dst, 443)),
        Proto::UdpNoChecksum => Conn::new(proto, (src, 40002), (dst, 443)),
    }
}

/// The remote node whose subnet holds `addr`, if any.
fn remote_of(addr: Ipv4Addr) -> Option<Remote> {
    REMOTES.iter().copied().find(|r| r.subnet.contains(&addr))
}

/// The frame a packet of `conn` is, leaving the uplink (as the host stack hands it to the
/// egress hook).
pub(super) fn outgoing(conn: &Conn, flags: u8) -> Vec<u8> {
    outgoing_with(conn, flags, |_| {})
}

/// [`outgoing`] with `change` made to the IPv4 header.
fn outgoing_with(conn: &Conn, flags: u8, change: HeaderChange) -> Vec<u8> {
    from_host(&conn.datagram_with(flags, PAYLOAD, change))
}

/// The frame a packet of `conn` is, arriving on the uplink: straight from the underlay,
/// or through the tunnel from the node of a remote pod.
pub(super) fn incoming(conn: &Conn, flags: u8) -> Vec<u8> {
    incoming_with(conn, flags, |_| {})
}

/// [`incoming`] with `change` made to the (inner) IPv4 header.
fn incoming_with(conn: &Conn, flags: u8, change: HeaderChange) -> Vec<u8> {
    let datagram = conn.datagram_with(flags, PAYLOAD, change);
    match remote_of(conn.src.0) {
        Some(remote) => from_peer(remote.node, IpEcn::NotEct, &datagram),
        None => from_underlay(&datagram),
    }
}

/// The translated source of `conn` as the connection table lists it.
pub(super) fn translation(node: &Node, conn: &Conn) -> Option<(Ipv4Addr, u16)> {
    let flows = node.dp.conntrack.flows().expect("listing flows");
    let flow = flows
        .iter()
        .find(|f| f.proto == conn.proto.number() && f.src == conn.src && f.dst == conn.dst)?;
    flow.translated
}

/// Sends a packet of `conn` out of the uplink and checks that it leaves translated as
/// the table says: from `nat_ip` and a port of the configured range, otherwise exactly
/// as sent (and encapsulated if it is for a remote pod). Returns the translated
/// connection and the masquerade events of the run.
pub(super) fn translate_out(
    node: &Node,
    conn: Conn,
    flags: u8,
    nat_ip: Ipv4Addr,
) -> (Conn, BTreeMap<NatEvent, u64>) {
    translate_out_with(node, conn, flags, nat_ip, |_| {})
}

/// [`translate_out`] for packets with `change` made to their IPv4 header.
fn translate_out_with(
    node: &Node,
    conn: Conn,
    flags: u8,
    nat_ip: Ipv4Addr,
    change: HeaderChange,
) -> (Conn, BTreeMap<NatEvent, u64>) {
    let frame = outgoing_with(&conn, flags, change);
    let out = node.run(UplinkEgress, &frame);
    let (addr, port) = translation(node, &conn)
        .unwrap_or_else(|| panic!("{conn:?} is not translated in the table"));
    assert_eq!(addr, nat_ip, "translated address of {conn:?}");
    assert!(
        (node.config.nat_port_min..=node.config.nat_port_max).contains(&port),
        "port {port} outside the configured range"
    );
    let translated = conn.with_src((addr, port));
    let sent = outgoing_with(&translated, flags, change);
    let (reason, expected) = match remote_of(conn.dst.0) {
        Some(remote) => {
            assert!(
                remote.next_hop_mac.is_some(),
                "tests send rule 6 traffic to resolved peers only"
            );
            (
                Reason::Encapsulated,
                encapsulated(&sent, &remote, 0, towards(&remote)),
            )
        }
        None => (Reason::Masqueraded, sent),
    };
    check_verdict(UplinkEgress, &frame, &out, Act::Next, reason);
    assert_bytes_eq(&out.data, &expected, "masqueraded packet");
    assert_checksums(&out.data);
    (translated, out.events)
}

/// [`translate_out`] for the first packet of a connection: exactly one flow created
/// (after any number of port collisions: the first candidate port is random).
pub(super) fn open(node: &Node, conn: Conn, flags: u8, nat_ip: Ipv4Addr) -> Conn {
    let (translated, mut events) = translate_out(node, conn, flags, nat_ip);
    events.remove(&NatEvent::PortCollision);
    assert_eq!(
        events,
        BTreeMap::from([(NatEvent::FlowCreated, 1)]),
        "events opening {conn:?}"
    );
    translated
}

/// A masquerade port next to `port`, inside the node's range.
pub(super) fn next_port(node: &Node, port: u16) -> u16 {
    if port == node.config.nat_port_max {
        port - 1
    } else {
        port + 1
    }
}

/// How a reply (or an error about a flow) translated back leaves the uplink's ingress
/// when its flow is not on the fast path, and the frame it leaves as, given `back`: the
/// frame translated back, as the host stack receives it to forward or deliver.
pub(super) fn reply_outcome(back: Vec<u8>) -> (Act, Reason, Vec<u8>) {
    (Act::Next, Reason::Unmasqueraded, back)
}

/// Sends the reply to `translated` (the translation of `conn`) in through the uplink
/// and checks that it reaches the stack addressed to `conn`'s source, exactly as the
/// other end sent it otherwise. Returns the masquerade events of the run.
pub(super) fn translate_back(
    node: &Node,
    conn: Conn,
    translated: Conn,
    flags: u8,
) -> BTreeMap<NatEvent, u64> {
    translate_back_with(node, conn, translated, flags, |_| {})
}

/// [`translate_back`] for replies with `change` made to their IPv4 header.
fn translate_back_with(
    node: &Node,
    conn: Conn,
    translated: Conn,
    flags: u8,
    change: HeaderChange,
) -> BTreeMap<NatEvent, u64> {
    let frame = incoming_with(&translated.reversed(), flags, change);
    // Decapsulated if it came through the tunnel: the frame as the underlay brought it.
    let back = from_underlay(&conn.reversed().datagram_with(flags, PAYLOAD, change));
    let (act, reason, expected) = reply_outcome(back);
    let out = node.expect_outcome(UplinkIngress, &frame, act, reason);
    assert_bytes_eq(&out.data, &expected, "reply translated back");
    assert_checksums(&out.data);
    out.events
}

/// What the connection table should hold for one connection.
#[derive(Clone, Copy, Debug)]
pub(super) struct Tracked {
    pub conn: Conn,
    /// The connection as translated, or None for a flow tracked untranslated (rule 4).
    pub translated: Option<Conn>,
    pub rule: Rule,
    /// State bits of the ORIGINAL entry.
    pub flags: u8,
}

impl Tracked {
    pub(super) fn translated(conn: Conn, translated: Conn, rule: Rule, flags: u8) -> Tracked {
        Tracked {
            conn,
            translated: Some(translated),
            rule,
            flags,
        }
    }

    pub(super) fn untranslated(conn: Conn, flags: u8) -> Tracked {
        Tracked {
            conn,
            translated: None,
            rule: Rule::Untranslated,
            flags,
        }
    }
}

/// The table key of `conn` in direction `dir`.
pub(super) fn ct_key(conn: &Conn, dir: u8) -> CtKey {
    CtKey {
        src: conn.src.0.octets(),
        dst: conn.dst.0.octets(),
        sport: conn.src.1.to_be_bytes(),
        dport: conn.dst.1.to_be_bytes(),
        proto: conn.proto.number(),
        dir,
        _pad: [0; 2],
    }
}

/// The fields of an entry that do not depend on the clock.
fn timeless(e: &CtEntry) -> ([u8; 4], [u8; 2], u8, u8) {
    (e.addr, e.port, e.rule, e.flags)
}

/// Asserts that CONNTRACK holds exactly the entries of `flows`: for each an ORIGINAL
/// entry keyed by the connection and holding its translated source (its own source if
/// untranslated), and for translated ones a REPLY entry keyed by the tuple replies carry
/// and holding the original source. Live ORIGINAL entries expire in the future.
pub(super) fn assert_table(node: &Node, flows: &[Tracked]) {
    let mut want = BTreeMap::new();
    for t in flows {
        let source = t.translated.unwrap_or(t.conn).src;
        let original = (
            source.0.octets(),
            source.1.to_be_bytes(),
            t.rule as u8,
            t.flags,
        );
        want.insert(ct_key(&t.conn, DIR_ORIGINAL), original);
        if let Some(translated) = t.translated {
            let reply = (
                t.conn.src.0.octets(),
                t.conn.src.1.to_be_bytes(),
                t.rule as u8,
                0,
            );
            want.insert(ct_key(&translated.reversed(), DIR_REPLY), reply);
        }
    }
    let table = node.conntrack_entries();
    let got: BTreeMap<CtKey, _> = table.iter().map(|(k, v)| (*k, timeless(v))).collect();
    assert_eq!(got, want, "connection table");
    let now = overlay_agent::datapath::conntrack::monotonic_ns();
    for (k, v) in &table {
        assert!(v.created_ns <= now, "{k:?} created in the future");
        if k.dir == DIR_ORIGINAL {
            assert!(v.expires_ns > now, "{k:?} already expired");
        }
    }
}

/// A frame leaving the uplink for a pod of w2 must be encapsulated as it is: nothing to
/// translate.
fn assert_encapsulated_as_is(node: &Node, frame: &[u8]) {
    let expected = encapsulated(frame, &W2, 0, towards(&W2));
    node.expect_frame(
        UplinkEgress,
        frame,
        Act::Next,
        Reason::Encapsulated,
        &expected,
    );
}

/// A frame leaving the uplink must pass untouched, translating nothing and opening no
/// flow.
fn assert_left_alone(node: &Node, frame: &[u8], reason: Reason) {
    let out = node.run(UplinkEgress, frame);
    check_verdict(UplinkEgress, frame, &out, Act::Next, reason);
    assert_bytes_eq(&out.data, frame, "untranslated");
    assert_eq!(out.events, BTreeMap::new(), "masquerade events");
}

/// Opens a connection of every protocol from `src` to `dst`, checking that it is
/// translated to `nat_ip` under `rule`, that later packets keep the translation and
/// open nothing, and that replies are translated back; then checks the table.
fn round_trip_every_protocol(
    node: &Node,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    nat_ip: Ipv4Addr,
    rule: Rule,
) {
    let mut tracked = Vec::new();
    for proto in Proto::ALL {
        eprintln!("case: {proto:?}");
        let conn = client(proto, src, dst);
        let translated = open(node, conn, SYN, nat_ip);
        let (again, events) = translate_out(node, conn, ACK | PSH, nat_ip);
        assert_eq!(
            (again, events),
            (translated, BTreeMap::new()),
            "a later packet"
        );
        assert_eq!(
            translate_back(node, conn, translated, SYN | ACK),
            BTreeMap::new(),
            "events of a reply"
        );
        tracked.push(Tracked::translated(conn, translated, rule, SEEN_REPLY));
    }
    assert_table(node, &tracked);
}

#[test]
fn pods_talking_to_the_outside_are_masqueraded_both_ways() {
    // Rule 5: TCP, UDP, UDP without a checksum (which must stay zero: the expected frame
    // has none) and ICMP echo, whose identifier is translated as a port.
    with_masquerading_node(|node| {
        round_trip_every_protocol(node, POD, OUTSIDE, NODE_IP, Rule::PodToOutside)
    });
}

#[test]
fn host_traffic_to_remote_pods_comes_from_the_gateway() {
    // Rule 6: translated to this node's pod gateway, encapsulated; the reply comes back
    // through the tunnel to the gateway and is decapsulated and translated back.
    with_masquerading_node(|node| {
        round_trip_every_protocol(
            node,
            NODE_OTHER_IP,
            W2.pod,
            GATEWAY,
            Rule::OutsideToRemotePod,
        )
    });
}

#[test]
fn what_leaves_from_the_uplinks_own_address_is_the_hosts() {
    // A socket bound to it, or the host's own masquerade (kube-proxy's, whose mark is
    // cleared by then): no second translation, and no flow opened.
    with_masquerading_node(|node| {
        for proto in [Proto::Tcp, Proto::Udp, Proto::Echo] {
            assert_encapsulated_as_is(node, &outgoing(&client(proto, NODE_IP, W2.pod), SYN));
        }
        assert_table(node, &[]);
    });
}

#[test]
fn transport_headers_are_found_after_ip_options() {
    // Rules 5 and 6, both ways, with a router alert option in every header.
    with_masquerading_node(|node| {
        for (src, dst, nat_ip) in [(POD, OUTSIDE, NODE_IP), (NODE_OTHER_IP, W2.pod, GATEWAY)] {
            for proto in Proto::ALL {
                eprintln!("case: {proto:?} {src} -> {dst}");
                let conn = client(proto, src, dst);
                let (translated, _) = translate_out_with(node, conn, SYN, nat_ip, add_router_alert);
                translate_back_with(node, conn, translated, SYN | ACK, add_router_alert);
            }
        }
    });
}

#[test]
fn the_source_becomes_the_masquerade_address() {
    // masq_ip, not the tunnel address: here they differ.
    const MASQ_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 30);
    let setup = |c: &mut DatapathConfig| {
        masquerade(c);
        c.masq_ip = MASQ_IP.octets();
    };
    with_node_setup(LoadOptions::default(), setup, |node| {
        let conn = client(Proto::Udp, POD, OUTSIDE);
        let translated = open(node, conn, 0, MASQ_IP);
        translate_back(node, conn, translated, 0);
        // The same port on the tunnel address is nothing of ours.
        let stray = incoming(
            &translated.with_src((NODE_IP, translated.src.1)).reversed(),
            0,
        );
        node.expect_untouched(UplinkIngress, &stray, Reason::PassNotTunnel);
    });
}

#[test]
fn pods_of_other_nodes_are_masqueraded_too() {
    // flanneld's rule 5 matches the whole cluster network as source, not just this node.
    with_masquerading_node(|node| {
        let conn = client(Proto::Tcp, W3.pod, OUTSIDE);
        let translated = open(node, conn, SYN, NODE_IP);
        translate_back(node, conn, translated, SYN | ACK);
        assert_table(
            node,
            &[Tracked::translated(
                conn,
                translated,
                Rule::PodToOutside,
                SEEN_REPLY,
            )],
        );
    });
}

#[test]
fn outside_clients_of_remote_pods_round_trip() {
    // Rule 6 for a client outside the cluster: its packet passes the uplink's ingress
    // (nothing to track: no local pod), the host forwards it to the remote pod, and the
    // reply, translated back to the client, is forwarded out again without being
    // masqueraded by rule 5 (it is the reply of a flow, not a pod's new flow).
    with_masquerading_node(|node| {
        let conn = client(Proto::Tcp, OUTSIDE, W2.pod);
        node.expect_untouched(UplinkIngress, &incoming(&conn, SYN), Reason::PassNotTunnel);
        assert_table(node, &[]);
        let translated = open(node, conn, SYN, GATEWAY);
        translate_back(node, conn, translated, SYN | ACK);
        assert_left_alone(
            node,
            &outgoing(&conn.reversed(), SYN | ACK),
            Reason::PassNotOverlay,
        );
        assert_table(
            node,
            &[Tracked::translated(
                conn,
                translated,
                Rule::OutsideToRemotePod,
                SEEN_REPLY,
            )],
        );
    });
}

/// `uplink_egress` on `frame` carrying the packet mark `mark`, passed on for `reason`.
fn egress_marked(node: &Node, frame: &[u8], mark: u32, reason: Reason) -> Outcome {
    let ctx = SkBuff {
        ifindex: node.eth0,
        mark,
        ..Default::default()
    };
    let out = node.run_with(UplinkEgress, frame, ctx);
    check_verdict(UplinkEgress, frame, &out, Act::Next, reason);
    out
}

#[test]
fn kube_proxy_marked_packets_are_left_to_kube_proxy() {
    // Rule 1: the 0x4000 bit, whatever else the mark holds.
    with_masquerading_node(|node| {
        let to_outside = outgoing(&client(Proto::Tcp, POD, OUTSIDE), SYN);
        let to_remote_pod = outgoing(&client(Proto::Tcp, NODE_OTHER_IP, W2.pod), SYN);
        for mark in [
            KUBE_PROXY_MASQ_MARK,
            KUBE_PROXY_MASQ_MARK | 0x8001,
            u32::MAX,
        ] {
            eprintln!("case: mark {mark:#x}");
            let out = egress_marked(node, &to_outside, mark, Reason::PassNotOverlay);
            assert_bytes_eq(&out.data, &to_outside, "marked packet to the outside");
            // Still encapsulated, with its own source.
            let out = egress_marked(node, &to_remote_pod, mark, Reason::Encapsulated);
            assert_bytes_eq(
                &out.data,
                &encapsulated(&to_remote_pod, &W2, 0, towards(&W2)),
                "marked rule 6",
            );
        }
        assert_table(node, &[]);
        // Other bits do not count.
        let conn = client(Proto::Tcp, POD, OUTSIDE);
        egress_marked(
            node,
            &to_outside,
            !KUBE_PROXY_MASQ_MARK,
            Reason::Masqueraded,
        );
        assert!(
            translation(node, &conn).is_some(),
            "a packet without the bit is masqueraded"
        );
    });
}

#[test]
fn pod_to_pod_traffic_is_not_translated() {
    // Rule 2: a local pod to a remote pod (the slow path hands it to the uplink's egress),
    // and so the host with its pod gateway address as source; rule 3: a remote pod to a
    // local pod, through the tunnel. Multicast from a pod is no traffic to the outside
    // either.
    with_masquerading_node(|node| {
        for src in [POD, GATEWAY] {
            assert_encapsulated_as_is(node, &outgoing(&client(Proto::Udp, src, W2.pod), 0));
        }
        let from_remote = incoming(&client(Proto::Udp, W2.pod, POD), 0);
        node.expect_frame(
            UplinkIngress,
            &from_remote,
            Act::Next,
            Reason::DecapsulatedToHost,
            &decapsulated(&from_remote, 0, super::expect::L2::Kept),
        );
        let mdns = outgoing(
            &Conn::new(
                Proto::Udp,
                (POD, 5353),
                (Ipv4Addr::new(224, 0, 0, 251), 5353),
            ),
            0,
        );
        assert_left_alone(node, &mdns, Reason::PassNotOverlay);
        assert_table(node, &[]);
    });
}

#[test]
fn outside_clients_of_local_pods_are_not_translated_nor_their_replies() {
    // Rule 4: the client's packet is tracked, untranslated, so that the pod's reply,
    // which rule 5 would otherwise masquerade, leaves with the pod's address.
    with_masquerading_node(|node| {
        let mut tracked = Vec::new();
        for proto in Proto::ALL {
            eprintln!("case: {proto:?}");
            let conn = client(proto, OUTSIDE, POD);
            let out = node.expect_outcome(
                UplinkIngress,
                &incoming(&conn, SYN),
                Act::Next,
                Reason::PassNotTunnel,
            );
            assert_bytes_eq(&out.data, &incoming(&conn, SYN), "client's packet");
            assert_eq!(out.events, BTreeMap::new(), "no flow is created");
            assert_left_alone(
                node,
                &outgoing(&conn.reversed(), SYN | ACK),
                Reason::PassNotOverlay,
            );
            tracked.push(Tracked::untranslated(conn, SEEN_REPLY));
        }
        assert_table(node, &tracked);
        let listed = node.dp.conntrack.flows().expect("flows");
        assert!(
            listed
                .iter()
                .all(|f| f.translated.is_none() && f.rule == Some(Rule::Untranslated)),
            "{listed:?}"
        );
    });
}

#[test]
fn nothing_is_translated_with_masquerade_off() {
    with_node(|node| {
        let conn = client(Proto::Tcp, POD, OUTSIDE);
        node.expect_untouched(UplinkEgress, &outgoing(&conn, SYN), Reason::PassNotOverlay);
        let host = outgoing(&client(Proto::Tcp, NODE_IP, W2.pod), SYN);
        assert_encapsulated_as_is(node, &host);
        let reply = incoming(
            &conn
                .with_src((NODE_IP, node.config.nat_port_min))
                .reversed(),
            SYN | ACK,
        );
        node.expect_untouched(UplinkIngress, &reply, Reason::PassNotTunnel);
        let client_of_pod = incoming(&client(Proto::Tcp, OUTSIDE, POD), SYN);
        node.expect_untouched(UplinkIngress, &client_of_pod, Reason::PassNotTunnel);
        assert_table(node, &[]);
        assert!(node.nat_events().values().all(|n| *n == 0));
    });
}

#[test]
fn unrelated_traffic_is_untouched_and_untracked() {
    with_masquerading_node(|node| {
        // The host's own traffic: to the outside, to another node.
        for dst in [OUTSIDE, W2.node] {
            assert_left_alone(
                node,
                &outgoing(&client(Proto::Tcp, NODE_IP, dst), SYN),
                Reason::PassNotOverlay,
            );
        }
        // To the host, also on a port of the masquerade range that no flow holds.
        for port in [22, node.config.nat_port_min, node.config.nat_port_max] {
            let frame = incoming(
                &Conn::new(Proto::Tcp, (OUTSIDE, 50000), (NODE_IP, port)),
                SYN,
            );
            node.expect_untouched(UplinkIngress, &frame, Reason::PassNotTunnel);
            let echo_reply = incoming(
                &Conn::new(Proto::Echo, (NODE_IP, port), (OUTSIDE, 0)).reversed(),
                0,
            );
            node.expect_untouched(UplinkIngress, &echo_reply, Reason::PassNotTunnel);
        }
        // Overlay traffic and the tunnel itself.
        let tunnelled = incoming(&client(Proto::Tcp, W2.pod, POD_UNRESOLVED), SYN);
        node.expect_frame(
            UplinkIngress,
            &tunnelled,
            Act::Next,
            Reason::DecapsulatedToHost,
            &decapsulated(&tunnelled, 0, super::expect::L2::Kept),
        );
        assert_table(node, &[]);
        assert!(node.nat_events().values().all(|n| *n == 0));
    });
}

#[test]
fn fragments_of_flows_to_translate_are_dropped() {
    // Without reassembly a fragment's ports are unknown (or absent).
    with_masquerading_node(|node| {
        for change in [first_fragment, last_fragment] {
            for (src, dst) in [(POD, OUTSIDE), (NODE_OTHER_IP, W2.pod)] {
                let mut ip = ipv4(src, dst);
                change(&mut ip);
                let frame = from_host(&datagram(ip, Transport::Udp, 100));
                node.expect(UplinkEgress, &frame, Act::Shot, Reason::DropNatFragment);
            }
            // Fragments that need no translation go on.
            let mut ip = ipv4(POD, W2.pod);
            change(&mut ip);
            let frame = from_host(&datagram(ip, Transport::Udp, 100));
            assert_encapsulated_as_is(node, &frame);
        }
        assert_table(node, &[]);
    });
}

#[test]
fn protocols_masquerade_cannot_translate_are_dropped() {
    with_masquerading_node(|node| {
        let timestamp =
            etherparse::Icmpv4Type::TimestampRequest(etherparse::icmpv4::TimestampMessage {
                id: 1,
                seq: 2,
                originate_timestamp: 3,
                receive_timestamp: 0,
                transmit_timestamp: 0,
            });
        let cases = [
            (
                "sctp",
                datagram(ipv4(POD, OUTSIDE), Transport::Raw(IpNumber::SCTP), 40),
            ),
            (
                "gre",
                datagram(
                    ipv4(NODE_OTHER_IP, W2.pod),
                    Transport::Raw(IpNumber::GRE),
                    40,
                ),
            ),
            (
                "icmp timestamp",
                super::packet::icmp_message(POD, OUTSIDE, timestamp, &[]),
            ),
        ];
        for (what, d) in cases {
            eprintln!("case: {what}");
            node.expect(
                UplinkEgress,
                &from_host(&d),
                Act::Shot,
                Reason::DropNatUnsupported,
            );
        }
        // The same protocols between pods need no translation.
        let gre = from_host(&datagram(
            ipv4(POD, W2.pod),
            Transport::Raw(IpNumber::GRE),
            40,
        ));
        assert_encapsulated_as_is(node, &gre);
        assert_table(node, &[]);
    });
}

#[test]
fn broken_packets_to_translate_are_dropped() {
    with_masquerading_node(|node| {
        let good = outgoing(&client(Proto::Udp, POD, OUTSIDE), 0);
        let (eth, ip) = good.split_at(super::packet::ETH_LEN);
        let cases = malformed(ip)
            .into_iter()
            .map(|(what, d)| (what, [eth, &d].concat()));
        node.expect_each(UplinkEgress, cases, Act::Shot, Reason::DropMalformed);
        assert_table(node, &[]);
    });
}

#[test]
fn replies_to_ports_no_flow_holds_are_untouched() {
    with_masquerading_node(|node| {
        let conn = client(Proto::Udp, POD, OUTSIDE);
        let translated = open(node, conn, 0, NODE_IP);
        let port = translated.src.1;
        let other_port = next_port(node, port);
        let strays = [
            // Another port, another protocol, another server, another server port.
            translated.with_src((NODE_IP, other_port)),
            Conn {
                proto: Proto::Tcp,
                ..translated
            },
            translated.with_dst((OUTSIDE_2, 443)),
            translated.with_dst((OUTSIDE, 444)),
        ];
        for stray in strays {
            eprintln!("case: reply to {stray:?}");
            node.expect_untouched(
                UplinkIngress,
                &incoming(&stray.reversed(), 0),
                Reason::PassNotTunnel,
            );
        }
        assert_table(
            node,
            &[Tracked::translated(conn, translated, Rule::PodToOutside, 0)],
        );
    });
}
