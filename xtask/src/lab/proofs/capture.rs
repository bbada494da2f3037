//! Wire proof: while a node's pods talk to pods on two other nodes (one on the same
//! switch, one behind the router), every frame on the node's uplink is captured and
//! checked. Each direction of each exchange must appear as IPv4 protocol 4 between the
//! two node addresses around the two pod addresses (the sender's node address in place
//! of the sending pod's where the bridge plugin masquerades), and no pod address may
//! appear outside a tunnel.
//!
//! With `Backend.DirectRouting` (`lab --direct-routing`) the node talks to every other
//! node of its switch: those exchanges must cross as plain IPv4 between the pod
//! addresses, never as IPIP between the node addresses, while the node behind the
//! router is still reached through the tunnel (flannel-io/flannel v0.28.9
//! `pkg/backend/ipip/ipip.go`: a direct route only where `ip.DirectRouting` finds no
//! gateway).

use std::{
    collections::BTreeMap,
    io::{self, Read as _},
    mem,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
};

use anyhow::{Context as _, Result, bail};
use etherparse::{IpNumber, Ipv4HeaderSlice};
use ipnet::Ipv4Net;
use nix::sys::socket::{setsockopt, sockopt::RcvBufForce};
use socket2::{Domain, Protocol, Socket, Type};

use crate::lab::machinery::{
    agents::UPLINK,
    netns, probe,
    servers::Servers,
    state::LabState,
    text_table::Table,
    topology::{Host, Pod, Topology},
};

use super::matrix::{Masquerade, PathKind, Probe, expected_source};

/// Bytes kept of each frame: the Ethernet header and two IPv4 headers fit.
const SNAPLEN: usize = 128;
/// Room for every frame of the exchanges, so that none is dropped before we read it.
const CAPTURE_BUFFER: usize = 32 << 20;
const ETHERTYPE_IPV4: u16 = 0x0800;
const PACKET_STATISTICS: libc::c_int = 6;

/// `struct tpacket_stats` (linux/if_packet.h).
#[repr(C)]
#[derive(Default)]
struct TpacketStats {
    packets: u32,
    drops: u32,
}

/// One IPIP packet: outer and inner addresses, and the inner protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Flow {
    pub outer: (Ipv4Addr, Ipv4Addr),
    pub inner: (Ipv4Addr, Ipv4Addr),
    pub protocol: u8,
}

/// What a captured frame is, for the proof.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Frame {
    Tunnelled(Flow),
    /// An IPv4 packet with a pod address, not encapsulated.
    Clear {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        protocol: u8,
    },
    Other,
}

pub(super) fn classify(frame: &[u8], pod_network: Ipv4Net) -> Frame {
    let Some(ethertype) = frame.get(12..14) else {
        return Frame::Other;
    };
    if u16::from_be_bytes([ethertype[0], ethertype[1]]) != ETHERTYPE_IPV4 {
        return Frame::Other;
    }
    let Ok(outer) = Ipv4HeaderSlice::from_slice(&frame[14..]) else {
        return Frame::Other;
    };
    if outer.protocol() == IpNumber::IPV4 {
        let inner_at = 14 + outer.slice().len();
        if let Ok(inner) = Ipv4HeaderSlice::from_slice(&frame[inner_at..]) {
            return Frame::Tunnelled(Flow {
                outer: (outer.source_addr(), outer.destination_addr()),
                inner: (inner.source_addr(), inner.destination_addr()),
                protocol: inner.protocol().0,
            });
        }
    }
    let (src, dst) = (outer.source_addr(), outer.destination_addr());
    if pod_network.contains(&src) || pod_network.contains(&dst) {
        return Frame::Clear {
            src,
            dst,
            protocol: outer.protocol().0,
        };
    }
    Frame::Other
}

pub(super) fn protocol_name(protocol: u8) -> String {
    match IpNumber(protocol) {
        IpNumber::ICMP => "icmp".into(),
        IpNumber::TCP => "tcp".into(),
        IpNumber::UDP => "udp".into(),
        IpNumber(n) => n.to_string(),
    }
}

/// A packet socket on one interface of a namespace, buffering everything it sees
/// (both directions) until drained.
pub(super) struct Capture(Socket);

impl Capture {
    pub(super) fn start(ns: &str, iface: &str) -> Result<Self> {
        netns::enter(ns, || {
            let protocol = (libc::ETH_P_ALL as u16).to_be();
            let socket = Socket::new(
                Domain::PACKET,
                Type::RAW,
                Some(Protocol::from(i32::from(protocol))),
            )?;
            // SAFETY: sockaddr_ll is plain old data; zero is a valid starting value.
            let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = protocol;
            addr.sll_ifindex = nix::net::if_::if_nametoindex(iface)
                .with_context(|| format!("no {iface} in {ns}"))?
                as i32;
            // SAFETY: a valid socket and a sockaddr_ll of the size given.
            let rc = unsafe {
                libc::bind(
                    socket.as_raw_fd(),
                    (&raw const addr).cast(),
                    size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error())
                    .context(format!("binding a packet socket to {iface}"));
            }
            setsockopt(&socket, RcvBufForce, &CAPTURE_BUFFER)?;
            socket.set_nonblocking(true)?;
            Ok(Capture(socket))
        })
    }

    /// The frames received so far (truncated to [`SNAPLEN`]), and how many the kernel
    /// dropped for lack of room.
    pub(super) fn drain(&self) -> Result<(Vec<Vec<u8>>, u32)> {
        let mut frames = Vec::new();
        let mut buf = [0u8; SNAPLEN];
        loop {
            match (&self.0).read(&mut buf) {
                Ok(n) => frames.push(buf[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e).context("reading the capture"),
            }
        }
        let mut stats = TpacketStats::default();
        let mut len = size_of::<TpacketStats>() as libc::socklen_t;
        // SAFETY: a valid socket, and a tpacket_stats buffer of the length given.
        let rc = unsafe {
            libc::getsockopt(
                self.0.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_STATISTICS,
                (&raw mut stats).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("reading the capture's statistics");
        }
        Ok((frames, stats.drops))
    }
}

pub(crate) struct WireProof {
    /// The node whose uplink was captured.
    node: String,
    /// The pod-to-pod exchanges run during the capture.
    exchanges: Vec<Probe>,
    frames: usize,
    dropped: u32,
    tunnelled: BTreeMap<Flow, usize>,
    clear: BTreeMap<Clear, usize>,
    other: usize,
    /// The flows the exchanges must have produced, from the topology.
    expected: Vec<Flow>,
    /// The plain packets they must have produced (DirectRouting), and the node pairs
    /// between which no IPIP may pass.
    expected_clear: Vec<Clear>,
    direct: Vec<(Ipv4Addr, Ipv4Addr)>,
}

/// A plain IPv4 packet with a pod address: source, destination, protocol.
type Clear = (Ipv4Addr, Ipv4Addr, u8);

/// The captured node, and the pod pairs that talk during the capture.
struct Plan {
    node: String,
    pairs: Vec<(Pod, Pod, PathKind)>,
}

/// Chooses the captured node and its peers: the first node that has another node on
/// its segment and one beyond the router; with DirectRouting every node of its
/// segment, each reached without the tunnel.
fn plan(topology: &Topology) -> Result<Plan> {
    for a in &topology.nodes {
        let mut same = topology
            .nodes
            .iter()
            .filter(|b| b.name != a.name && b.segment == a.segment);
        let routed = topology.nodes.iter().find(|b| b.segment != a.segment);
        let first_same = same.next();
        if let (Some(first_same), Some(routed)) = (first_same, routed) {
            let first_pod = |n| {
                topology
                    .pods_of(n)
                    .into_iter()
                    .next()
                    .context("a node without pods")
            };
            let from = first_pod(a)?;
            let mut peers = vec![first_same];
            if topology.direct_routing {
                peers.extend(same);
            }
            let mut pairs = Vec::new();
            for peer in peers {
                pairs.push((from.clone(), first_pod(peer)?, PathKind::SameSwitch));
            }
            pairs.push((from, first_pod(routed)?, PathKind::Routed));
            return Ok(Plan {
                node: a.name.clone(),
                pairs,
            });
        }
    }
    bail!("the wire proof needs a node with a peer on its segment and another beyond the router")
}

/// Captures on the chosen node's uplink during one ICMP and one TCP exchange per peer.
pub(crate) fn prove(lab: &LabState) -> Result<WireProof> {
    let topology = &lab.topology;
    let Plan { node, pairs } = plan(topology)?;
    let address = |pod: &Pod| topology.node(&pod.node).map(|n| n.address);
    let masquerade = Masquerade::in_lab(lab, lab.masquerade);
    let seen_as = |from: &Pod, to: &Pod| {
        expected_source(
            topology,
            &from.clone().into(),
            &to.clone().into(),
            masquerade,
        )
    };
    let (mut expected, mut expected_clear, mut direct) = (Vec::new(), Vec::new(), Vec::new());
    for (from, to, _) in &pairs {
        let (a, b) = (address(from)?, address(to)?);
        // Masqueraded by the bridge plugin, the exchange is between the node's address
        // and the pod: tunnelled (or routed directly) both ways all the same.
        let source = seen_as(from, to).unwrap_or(from.address);
        let plain = topology.routes_directly(topology.node(&from.node)?, topology.node(&to.node)?);
        if plain {
            direct.extend([(a, b), (b, a)]);
        }
        for protocol in [IpNumber::ICMP.0, IpNumber::TCP.0] {
            if plain {
                expected_clear.push((source, to.address, protocol));
                expected_clear.push((to.address, source, protocol));
                continue;
            }
            expected.push(Flow {
                outer: (a, b),
                inner: (source, to.address),
                protocol,
            });
            expected.push(Flow {
                outer: (b, a),
                inner: (to.address, source),
                protocol,
            });
        }
    }

    let targets: Vec<Host> = pairs.iter().map(|(_, to, _)| to.clone().into()).collect();
    let servers = Servers::start(lab, &targets)?;
    let capture = Capture::start(&lab.netns(&node), UPLINK)?;
    let exchanges: Vec<Probe> = pairs
        .iter()
        .map(|(from, to, kind)| {
            let expected = seen_as(from, to);
            let (from, to) = (Host::from(from.clone()), Host::from(to.clone()));
            Probe::run(lab, &servers, &from, &to, *kind, expected)
        })
        .collect();
    // The kernel hands the capture socket each frame as it crosses the interface, so
    // every frame the exchanges needed to complete is queued by now: no waiting.
    let (frames, dropped) = capture.drain()?;

    let mut proof = WireProof {
        node,
        exchanges,
        frames: frames.len(),
        dropped,
        tunnelled: BTreeMap::new(),
        clear: BTreeMap::new(),
        other: 0,
        expected,
        expected_clear,
        direct,
    };
    for frame in &frames {
        match classify(frame, topology.pod_network) {
            Frame::Tunnelled(flow) => *proof.tunnelled.entry(flow).or_default() += 1,
            Frame::Clear { src, dst, protocol } => {
                *proof.clear.entry((src, dst, protocol)).or_default() += 1
            }
            Frame::Other => proof.other += 1,
        }
    }
    Ok(proof)
}

impl WireProof {
    /// Expected flows that never crossed the interface.
    fn missing(&self) -> impl Iterator<Item = &Flow> {
        self.expected
            .iter()
            .filter(|f| !self.tunnelled.contains_key(f))
    }

    /// Why the proof fails; empty when it holds.
    pub(crate) fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        for e in &self.exchanges {
            for (proto, outcome) in [("ICMP", &e.icmp), ("TCP", &e.tcp)] {
                if let Err(f) = outcome {
                    failures.push(format!("{} → {} {proto} failed: {f}", e.from, e.to.name));
                }
            }
        }
        for flow in self.missing() {
            failures.push(format!(
                "no IPIP packet {} → {} around {} {} → {}",
                flow.outer.0,
                flow.outer.1,
                protocol_name(flow.protocol),
                flow.inner.0,
                flow.inner.1
            ));
        }
        for (src, dst, protocol) in self.missing_clear() {
            failures.push(format!(
                "no plain {} packet {src} → {dst} (DirectRouting)",
                protocol_name(*protocol)
            ));
        }
        for (src, dst, protocol) in self.clear.keys() {
            if !self.expected_clear.contains(&(*src, *dst, *protocol)) {
                failures.push(format!(
                    "{} {src} → {dst} crossed {UPLINK} unencapsulated",
                    protocol_name(*protocol)
                ));
            }
        }
        for flow in self.tunnelled.keys() {
            if self.direct.contains(&flow.outer) {
                failures.push(format!(
                    "IPIP {} → {} between nodes routed directly (DirectRouting)",
                    flow.outer.0, flow.outer.1
                ));
            }
        }
        failures
    }

    /// Expected plain packets that never crossed the interface.
    fn missing_clear(&self) -> impl Iterator<Item = &Clear> {
        self.expected_clear
            .iter()
            .filter(|c| !self.clear.contains_key(c))
    }

    pub(crate) fn render(&self) -> String {
        let peers: Vec<String> = self
            .exchanges
            .iter()
            .map(|e| format!("{} → {} ({})", e.from, e.to.name, e.kind.describe()))
            .collect();
        let mut exchanges = Table::new(["EXCHANGE", "ICMP ms", "TCP ms"]).align_right([1, 2]);
        for e in &self.exchanges {
            exchanges.row([
                format!("{} → {}", e.from, e.to.name),
                probe::cell(&e.icmp),
                probe::cell(&e.tcp),
            ]);
        }
        let mut flows = Table::new([
            "OUTER (IPv4 proto 4)",
            "INNER",
            "PROTO",
            "FRAMES",
            "EXPECTED",
        ])
        .align_right([3]);
        let mut flow_row = |flow: &Flow, count: usize, mark: &str| {
            flows.row([
                format!("{} → {}", flow.outer.0, flow.outer.1),
                format!("{} → {}", flow.inner.0, flow.inner.1),
                protocol_name(flow.protocol),
                count.to_string(),
                mark.to_owned(),
            ])
        };
        for (flow, count) in &self.tunnelled {
            flow_row(
                flow,
                *count,
                if self.expected.contains(flow) {
                    "✓"
                } else {
                    ""
                },
            );
        }
        for flow in self.missing() {
            flow_row(flow, 0, "✗ missing");
        }
        let mut plain =
            Table::new(["PLAIN (no tunnel)", "PROTO", "FRAMES", "EXPECTED"]).align_right([2]);
        let mut plain_row = |(src, dst, protocol): &Clear, count: usize, mark: &str| {
            plain.row([
                format!("{src} → {dst}"),
                protocol_name(*protocol),
                count.to_string(),
                mark.to_owned(),
            ])
        };
        for (clear, count) in &self.clear {
            let expected = self.expected_clear.contains(clear);
            plain_row(clear, *count, if expected { "✓" } else { "✗" });
        }
        for clear in self.missing_clear() {
            plain_row(clear, 0, "✗ missing");
        }
        // Shown when there is something to show: a plain packet is a failure unless
        // DirectRouting expects it.
        let plain = if self.expected_clear.is_empty() && self.clear.is_empty() {
            String::new()
        } else {
            format!("{plain}\n")
        };
        let failures = self.failures();
        let verdict = if failures.is_empty() && self.direct.is_empty() {
            format!(
                "✓ every direction of every exchange crossed {UPLINK} as IPIP between the node addresses; no pod address appeared outside a tunnel"
            )
        } else if failures.is_empty() {
            format!(
                "✓ DirectRouting: every exchange with a node of this switch crossed {UPLINK} as plain IPv4 between the pods, none as IPIP; the node behind the router was reached through the tunnel; no other pod address appeared outside a tunnel"
            )
        } else {
            format!("✗ the wire proof fails:\n    {}", failures.join("\n    "))
        };
        format!(
            "Capture on {}'s {UPLINK} (AF_PACKET) during {}\n{exchanges}\n{flows}\n{plain}  {} frames: {} IPIP, {} with a pod address outside a tunnel, {} other (ARP, underlay); {} dropped by the capture\n  {verdict}\n",
            self.node,
            peers.join(" and "),
            self.frames,
            self.tunnelled.values().sum::<usize>(),
            self.clear.values().sum::<usize>(),
            self.other,
            self.dropped,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    const MACS: ([u8; 6], [u8; 6]) = ([2, 0x42, 172, 18, 0, 2], [2, 0x42, 172, 18, 0, 1]);

    fn icmp(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4(src, dst, 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut out, &[0; 8])
            .unwrap();
        out
    }

    fn frame(src: [u8; 4], dst: [u8; 4], protocol: IpNumber, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(MACS.0, MACS.1)
            .ipv4(src, dst, 64)
            .write(&mut out, protocol, payload)
            .unwrap();
        out
    }

    #[test]
    fn classifies_tunnelled_clear_and_other_frames() {
        let net: Ipv4Net = "10.244.0.0/16".parse().unwrap();
        let inner = icmp([10, 244, 0, 2], [10, 244, 3, 2]);
        let tunnelled = frame([172, 18, 0, 2], [172, 19, 0, 2], IpNumber::IPV4, &inner);
        assert_eq!(
            classify(&tunnelled, net),
            Frame::Tunnelled(Flow {
                outer: ([172, 18, 0, 2].into(), [172, 19, 0, 2].into()),
                inner: ([10, 244, 0, 2].into(), [10, 244, 3, 2].into()),
                protocol: 1,
            })
        );
        // Truncated to the capture's snap length, as the proof reads frames.
        assert!(matches!(
            classify(&tunnelled[..SNAPLEN.min(tunnelled.len())], net),
            Frame::Tunnelled(_)
        ));

        let mut clear = vec![0; 14];
        clear[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        clear.extend(icmp([10, 244, 0, 2], [10, 244, 3, 2]));
        assert_eq!(
            classify(&clear, net),
            Frame::Clear {
                src: [10, 244, 0, 2].into(),
                dst: [10, 244, 3, 2].into(),
                protocol: 1
            }
        );
        let underlay = frame([172, 18, 0, 2], [172, 19, 0, 2], IpNumber::UDP, &[0; 8]);
        assert_eq!(classify(&underlay, net), Frame::Other);
        let arp = [&[0u8; 12][..], &[0x08, 0x06], &[0; 28]].concat();
        assert_eq!(classify(&arp, net), Frame::Other);
    }

    #[test]
    fn with_direct_routing_plans_every_node_of_the_switch() {
        let Plan { node, pairs } = plan(&Topology::kind().with_direct_routing()).unwrap();
        assert_eq!(node, "cp");
        let peers: Vec<_> = pairs
            .iter()
            .map(|(_, t, k)| (t.name.as_str(), *k))
            .collect();
        assert_eq!(
            peers,
            [
                ("w1-pod1", PathKind::SameSwitch),
                ("w2-pod1", PathKind::SameSwitch),
                ("w3-pod1", PathKind::Routed)
            ]
        );
    }

    /// A proof with DirectRouting between cp and w1: what it calls a failure.
    #[test]
    fn direct_routing_fails_on_a_tunnel_or_a_missing_plain_packet() {
        let (cp, w1) = (Ipv4Addr::new(172, 18, 0, 2), Ipv4Addr::new(172, 18, 0, 3));
        let (pod_cp, pod_w1) = (Ipv4Addr::new(10, 244, 0, 2), Ipv4Addr::new(10, 244, 1, 2));
        let plain = |src, dst| (src, dst, IpNumber::ICMP.0);
        let proof = |clear: &[Clear], tunnelled: &[Flow]| WireProof {
            node: "cp".into(),
            exchanges: Vec::new(),
            frames: 0,
            dropped: 0,
            tunnelled: tunnelled.iter().map(|f| (*f, 1)).collect(),
            clear: clear.iter().map(|c| (*c, 1)).collect(),
            other: 0,
            expected: Vec::new(),
            expected_clear: vec![plain(pod_cp, pod_w1), plain(pod_w1, pod_cp)],
            direct: vec![(cp, w1), (w1, cp)],
        };
        let both = [plain(pod_cp, pod_w1), plain(pod_w1, pod_cp)];
        assert_eq!(proof(&both, &[]).failures(), Vec::<String>::new());
        assert!(proof(&both, &[]).render().contains("✓ DirectRouting"));
        assert_eq!(
            proof(&both[..1], &[]).failures(),
            ["no plain icmp packet 10.244.1.2 → 10.244.0.2 (DirectRouting)"]
        );
        let tunnel = Flow {
            outer: (cp, w1),
            inner: (pod_cp, pod_w1),
            protocol: IpNumber::ICMP.0,
        };
        assert_eq!(
            proof(&both, &[tunnel]).failures(),
            ["IPIP 172.18.0.2 → 172.18.0.3 between nodes routed directly (DirectRouting)"]
        );
        let stray = plain(pod_cp, Ipv4Addr::new(10, 244, 3, 2));
        assert_eq!(
            proof(&[both[0], both[1], stray], &[]).failures(),
            ["icmp 10.244.0.2 → 10.244.3.2 crossed eth0 unencapsulated"]
        );
    }

    #[test]
    fn plans_a_same_switch_and_a_routed_peer() {
        let Plan { node, pairs } = plan(&Topology::kind()).unwrap();
        assert_eq!(node, "cp");
        let peers: Vec<_> = pairs
            .iter()
            .map(|(f, t, k)| (f.name.as_str(), t.name.as_str(), *k))
            .collect();
        assert_eq!(
            peers,
            [
                ("cp-pod1", "w1-pod1", PathKind::SameSwitch),
                ("cp-pod1", "w3-pod1", PathKind::Routed)
            ]
        );
    }
}
