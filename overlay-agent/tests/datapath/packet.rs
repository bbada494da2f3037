//! Test frames, built with etherparse: an independent implementation of the headers and
//! checksums the datapath writes.
//!
//! Datagrams are well formed (correct lengths and checksums) unless a test mangles them
//! on purpose with the helpers at the end.

use std::net::Ipv4Addr;

use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, Ethernet2Header, IcmpEchoHeader,
    Icmpv4Header, Icmpv4Type, IpDscp, IpEcn, IpFragOffset, IpNumber, Ipv4Header, PacketBuilder,
    TcpHeader, TcpOptionElement, UdpHeader, VlanId, checksum::Sum16BitWords,
};

use overlay_common::Hook;

use super::topology::{CNI0_MAC, ETH0_MAC, Mac, NODE_IP, POD, POD_MAC, W2_MAC};

pub(super) const ETH_LEN: usize = Ethernet2Header::LEN;
pub(super) const IPV4_LEN: usize = Ipv4Header::MIN_LEN;

/// What follows the IPv4 header of a test datagram.
#[derive(Clone, Copy, Debug)]
pub(super) enum Transport {
    /// A TCP header without options (data offset 5).
    Tcp,
    /// A TCP header with NOP, NOP, timestamps (data offset 8): the size of the TCP
    /// header matters when the datapath sizes GSO segments.
    TcpTimestamps,
    Udp,
    /// An ICMP echo request.
    Icmp,
    /// Only payload, under this protocol number.
    Raw(IpNumber),
}

impl Transport {
    /// Bytes of transport header [`datagram`] writes.
    pub(super) fn header_len(self) -> usize {
        match self {
            Transport::Tcp => 20,
            Transport::TcpTimestamps => 32,
            Transport::Udp | Transport::Icmp => 8,
            Transport::Raw(_) => 0,
        }
    }
}

/// Payload length that makes a datagram with `transport`, once encapsulated, exactly
/// `mtu` bytes long.
pub(super) fn filling(mtu: u16, transport: Transport) -> usize {
    usize::from(mtu) - 2 * IPV4_LEN - transport.header_len()
}

/// DSCP of test datagrams: not zero, so that tests see it kept inside and cleared outside.
pub(super) const DSCP: u8 = 10; // AF11
/// Identification of test datagrams: not zero, so that tests see it copied outside.
pub(super) const ID: u16 = 0x4a5b;
pub(super) const TTL: u8 = 64;
/// The IP option pods actually send (IGMP): router alert (RFC 2113).
pub(super) const ROUTER_ALERT: [u8; 4] = [0x94, 0x04, 0x00, 0x00];

/// The header of a test datagram from `src` to `dst`: DF set, the fixed DSCP, ID and
/// TTL, ECN not-ECT. Lengths, protocol and checksum are filled in by [`datagram`].
pub(super) fn ipv4(src: Ipv4Addr, dst: Ipv4Addr) -> Ipv4Header {
    Ipv4Header {
        dscp: IpDscp::try_new(DSCP).expect("DSCP fits 6 bits"),
        ecn: IpEcn::ZERO,
        identification: ID,
        dont_fragment: true,
        time_to_live: TTL,
        source: src.octets(),
        destination: dst.octets(),
        ..Default::default()
    }
}

/// A change a test makes to an IPv4 header.
pub(super) type HeaderChange = fn(&mut Ipv4Header);

/// Puts a datagram in an Ethernet frame.
pub(super) type Framing = fn(&[u8]) -> Vec<u8>;

// Header changes that take a datagram off the fast path.

/// Adds a router alert option (IHL 6).
pub(super) fn add_router_alert(ip: &mut Ipv4Header) {
    ip.options = ROUTER_ALERT.into();
}

/// Makes the datagram the first fragment of a bigger one (MF, offset 0).
pub(super) fn first_fragment(ip: &mut Ipv4Header) {
    ip.dont_fragment = false;
    ip.more_fragments = true;
}

/// Makes the datagram the last fragment of a bigger one (offset 1480, no MF).
pub(super) fn last_fragment(ip: &mut Ipv4Header) {
    ip.dont_fragment = false;
    ip.fragment_offset = IpFragOffset::try_new(185).expect("13 bits");
}

/// `ip` followed by `transport` and `payload_len` bytes of payload, with total length,
/// protocol and every checksum set.
pub(super) fn datagram(ip: Ipv4Header, transport: Transport, payload_len: usize) -> Vec<u8> {
    let l4 = match transport {
        Transport::Tcp | Transport::TcpTimestamps => {
            let mut tcp = tcp_header(40000, 80, ACK | PSH);
            if let Transport::TcpTimestamps = transport {
                tcp.set_options(&[
                    TcpOptionElement::Noop,
                    TcpOptionElement::Noop,
                    TcpOptionElement::Timestamp(1, 2),
                ])
                .expect("12 bytes of options fit");
            }
            L4::Tcp(tcp)
        }
        Transport::Udp => L4::Udp {
            sport: 5353,
            dport: 8472,
            checksum: true,
        },
        Transport::Icmp => L4::Icmp(Icmpv4Type::EchoRequest(IcmpEchoHeader { id: 0x77, seq: 3 })),
        Transport::Raw(protocol) => L4::Raw(protocol),
    };
    assemble(ip, l4, &pattern(payload_len))
}

/// TCP flags of [`tcp_header`] (the bits of the header's flags byte).
pub(super) const FIN: u8 = 0x01;
pub(super) const SYN: u8 = 0x02;
pub(super) const RST: u8 = 0x04;
pub(super) const PSH: u8 = 0x08;
pub(super) const ACK: u8 = 0x10;

/// Sequence number of test segments, unless a test sets another.
const TCP_SEQ: u32 = 0x0102_0304;

/// The TCP header of test segments (fixed sequence numbers and window) with `flags`.
fn tcp_header(sport: u16, dport: u16, flags: u8) -> TcpHeader {
    let mut tcp = TcpHeader::new(sport, dport, TCP_SEQ, 64240);
    tcp.fin = flags & FIN != 0;
    tcp.syn = flags & SYN != 0;
    tcp.rst = flags & RST != 0;
    tcp.psh = flags & PSH != 0;
    tcp.ack = flags & ACK != 0;
    tcp.acknowledgment_number = if tcp.ack { 0x0a0b_0c0d } else { 0 };
    tcp
}

/// A transport header for [`assemble`], checksum still to compute.
enum L4 {
    Tcp(TcpHeader),
    /// With `checksum` false the checksum is zero ("none", RFC 768).
    Udp {
        sport: u16,
        dport: u16,
        checksum: bool,
    },
    Icmp(Icmpv4Type),
    Raw(IpNumber),
}

/// `ip` followed by `l4` and `payload`, with total length, protocol and every checksum
/// set.
fn assemble(mut ip: Ipv4Header, l4: L4, payload: &[u8]) -> Vec<u8> {
    let (protocol, l4) = match l4 {
        L4::Tcp(mut tcp) => {
            ip.protocol = IpNumber::TCP;
            tcp.checksum = tcp
                .calc_checksum_ipv4(&ip, payload)
                .expect("TCP length fits");
            (IpNumber::TCP, tcp.to_bytes().to_vec())
        }
        L4::Udp {
            sport,
            dport,
            checksum,
        } => {
            let len = UdpHeader::LEN + payload.len();
            let mut udp = UdpHeader {
                source_port: sport,
                destination_port: dport,
                length: len as u16,
                checksum: 0,
            };
            ip.protocol = IpNumber::UDP;
            if checksum {
                udp.checksum = udp
                    .calc_checksum_ipv4(&ip, payload)
                    .expect("UDP length fits");
            }
            (IpNumber::UDP, udp.to_bytes().to_vec())
        }
        L4::Icmp(icmp_type) => (
            IpNumber::ICMP,
            Icmpv4Header::with_checksum(icmp_type, payload)
                .to_bytes()
                .to_vec(),
        ),
        L4::Raw(protocol) => (protocol, Vec::new()),
    };
    ip.protocol = protocol;
    ip.set_payload_len(l4.len() + payload.len())
        .expect("datagram fits 64 KiB");
    ip.header_checksum = ip.calc_header_checksum();
    [ip.to_bytes().as_slice(), &l4, payload].concat()
}

/// The protocol of a [`Conn`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Proto {
    Tcp,
    Udp,
    /// UDP with a zero checksum ("none").
    UdpNoChecksum,
    /// ICMP echo: the requester's identifier is its "port", the other end's is 0.
    Echo,
}

impl Proto {
    pub(super) const ALL: [Proto; 4] = [Proto::Tcp, Proto::Udp, Proto::UdpNoChecksum, Proto::Echo];

    pub(super) fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp | Proto::UdpNoChecksum => 17,
            Proto::Echo => 1,
        }
    }
}

/// One direction of a connection, as masquerade sees it: protocol, source and
/// destination address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Conn {
    pub proto: Proto,
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    /// The answering direction (for ICMP echo: replies, identifier in `dst`).
    pub answer: bool,
    /// TCP: the sequence number of its segments, and the TSval of a timestamp option
    /// they carry (SYNs with the options of a Linux SYN, others NOP, NOP, timestamp).
    pub seq: u32,
    pub tsval: Option<u32>,
}

impl Conn {
    /// A connection from `src` to `dst` (for ICMP echo, `src`'s port is the identifier
    /// and `dst`'s must be 0).
    pub(super) fn new(proto: Proto, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Conn {
        assert!(
            proto != Proto::Echo || dst.1 == 0,
            "echo requests have no destination port"
        );
        Conn {
            proto,
            src,
            dst,
            answer: false,
            seq: TCP_SEQ,
            tsval: None,
        }
    }

    /// The other direction: what the destination sends back.
    pub(super) fn reversed(self) -> Conn {
        Conn {
            src: self.dst,
            dst: self.src,
            answer: !self.answer,
            ..self
        }
    }

    pub(super) fn with_src(self, src: (Ipv4Addr, u16)) -> Conn {
        Conn { src, ..self }
    }

    pub(super) fn with_dst(self, dst: (Ipv4Addr, u16)) -> Conn {
        Conn { dst, ..self }
    }

    /// TCP segments with sequence number `seq` and a timestamp option `tsval`.
    pub(super) fn with_marks(self, seq: u32, tsval: Option<u32>) -> Conn {
        Conn { seq, tsval, ..self }
    }

    /// A datagram of this direction with `payload_len` bytes of payload and, for TCP,
    /// `flags`.
    pub(super) fn datagram(&self, flags: u8, payload_len: usize) -> Vec<u8> {
        self.datagram_with(flags, payload_len, |_| {})
    }

    /// [`Conn::datagram`] with `change` made to its IPv4 header (fields the builder
    /// fills in are overwritten).
    pub(super) fn datagram_with(
        &self,
        flags: u8,
        payload_len: usize,
        change: impl FnOnce(&mut Ipv4Header),
    ) -> Vec<u8> {
        let (sport, dport) = (self.src.1, self.dst.1);
        let l4 = match self.proto {
            Proto::Tcp => {
                let mut tcp = tcp_header(sport, dport, flags);
                tcp.sequence_number = self.seq;
                if let Some(tsval) = self.tsval {
                    let options: &[TcpOptionElement] = if tcp.syn {
                        &[
                            TcpOptionElement::MaximumSegmentSize(1460),
                            TcpOptionElement::SelectiveAcknowledgementPermitted,
                            TcpOptionElement::Timestamp(tsval, 0),
                            TcpOptionElement::Noop,
                            TcpOptionElement::WindowScale(7),
                        ]
                    } else {
                        &[
                            TcpOptionElement::Noop,
                            TcpOptionElement::Noop,
                            TcpOptionElement::Timestamp(tsval, 1),
                        ]
                    };
                    tcp.set_options(options).expect("options fit");
                }
                L4::Tcp(tcp)
            }
            Proto::Udp => L4::Udp {
                sport,
                dport,
                checksum: true,
            },
            Proto::UdpNoChecksum => L4::Udp {
                sport,
                dport,
                checksum: false,
            },
            Proto::Echo if self.answer => {
                L4::Icmp(Icmpv4Type::EchoReply(IcmpEchoHeader { id: dport, seq: 3 }))
            }
            Proto::Echo => L4::Icmp(Icmpv4Type::EchoRequest(IcmpEchoHeader {
                id: sport,
                seq: 3,
            })),
        };
        let mut ip = ipv4(self.src.0, self.dst.0);
        change(&mut ip);
        assemble(ip, l4, &pattern(payload_len))
    }
}

/// An ICMP message of `icmp_type` from `src` to `dst` with `payload` (for an error: the
/// start of the offending datagram it quotes).
pub(super) fn icmp_message(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    icmp_type: Icmpv4Type,
    payload: &[u8],
) -> Vec<u8> {
    assemble(ipv4(src, dst), L4::Icmp(icmp_type), payload)
}

/// Payload bytes that differ from their neighbours, so that a shifted or truncated copy
/// never looks right.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(7))
        .collect()
}

/// An Ethernet II frame.
pub(super) fn ethernet(dst: Mac, src: Mac, ether_type: EtherType, payload: &[u8]) -> Vec<u8> {
    let eth = Ethernet2Header {
        destination: dst.0,
        source: src.0,
        ether_type,
    };
    [eth.to_bytes().as_slice(), payload].concat()
}

/// `datagram` as a local pod sends it to its gateway on cni0.
pub(super) fn from_pod(datagram: &[u8]) -> Vec<u8> {
    ethernet(CNI0_MAC, POD_MAC, EtherType::IPV4, datagram)
}

/// `datagram` as the host stack sends it out of the uplink (to whatever next hop its
/// route named; the datapath rewrites both addresses).
pub(super) fn from_host(datagram: &[u8]) -> Vec<u8> {
    ethernet(W2_MAC, ETH0_MAC, EtherType::IPV4, datagram)
}

/// `datagram` as it arrives from the underlay on the uplink.
pub(super) fn from_underlay(datagram: &[u8]) -> Vec<u8> {
    ethernet(ETH0_MAC, W2_MAC, EtherType::IPV4, datagram)
}

/// A datagram to `dst` as an encapsulating hook gets it: from a local pod on the
/// bridge, or from the host itself on the uplink's egress. `change` adjusts its header
/// (fields [`datagram`] fills in are overwritten).
pub(super) fn outbound(
    hook: Hook,
    dst: Ipv4Addr,
    transport: Transport,
    payload_len: usize,
    change: impl FnOnce(&mut Ipv4Header),
) -> Vec<u8> {
    let (src, frame) = match hook {
        Hook::BridgeIngress | Hook::PodIngress => (POD, from_pod as Framing),
        Hook::UplinkEgress => (NODE_IP, from_host as Framing),
        Hook::UplinkIngress | Hook::BridgeEgress => {
            panic!("{} encapsulates nothing", hook.name())
        }
    };
    let mut ip = ipv4(src, dst);
    change(&mut ip);
    frame(&datagram(ip, transport, payload_len))
}

/// `outer` carrying `inner` as IPIP, with total length, protocol and checksum set.
pub(super) fn nest(mut outer: Ipv4Header, inner: &[u8]) -> Vec<u8> {
    outer.protocol = IpNumber::IPV4;
    outer.set_payload_len(inner.len()).expect("fits");
    outer.header_checksum = outer.calc_header_checksum();
    [outer.to_bytes().as_slice(), inner].concat()
}

/// The outer header a peer node `src` puts around what it sends this node: what the
/// kernel's ipip device would build (DSCP 0, DF, one hop less than our pods' TTL).
pub(super) fn tunnel_header(src: Ipv4Addr, ecn: IpEcn) -> Ipv4Header {
    Ipv4Header {
        dscp: IpDscp::ZERO,
        ecn,
        time_to_live: TTL - 1,
        identification: 0x1111,
        ..ipv4(src, NODE_IP)
    }
}

/// The IPIP datagram peer `src` sends this node around `inner`.
pub(super) fn ipip(src: Ipv4Addr, ecn: IpEcn, inner: &[u8]) -> Vec<u8> {
    nest(tunnel_header(src, ecn), inner)
}

/// A frame from the underlay: peer `peer` tunnels `inner` to this node.
pub(super) fn from_peer(peer: Ipv4Addr, ecn: IpEcn, inner: &[u8]) -> Vec<u8> {
    from_underlay(&ipip(peer, ecn, inner))
}

/// A frame from the underlay: peer `src` tunnels a TCP datagram from a pod of its
/// (`inner_src`) to `inner_dst` on this node.
pub(super) fn tunnelled_tcp(
    src: Ipv4Addr,
    inner_src: Ipv4Addr,
    inner_dst: Ipv4Addr,
    payload_len: usize,
) -> Vec<u8> {
    from_peer(
        src,
        IpEcn::NotEct,
        &datagram(ipv4(inner_src, inner_dst), Transport::Tcp, payload_len),
    )
}

/// An ARP request from a pod for its gateway.
pub(super) fn arp() -> Vec<u8> {
    let request = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REQUEST,
        &POD_MAC.0,
        &POD.octets(),
        &[0; 6],
        &super::topology::GATEWAY.octets(),
    )
    .expect("valid ARP sizes");
    let mut out = Vec::new();
    PacketBuilder::ethernet2(POD_MAC.0, [0xff; 6])
        .arp(request)
        .write(&mut out)
        .expect("writing ARP");
    out
}

/// An IPv6 UDP datagram.
pub(super) fn ipv6_udp() -> Vec<u8> {
    let src = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let dst = [0xfd, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 7];
    let mut out = Vec::new();
    PacketBuilder::ethernet2(POD_MAC.0, CNI0_MAC.0)
        .ipv6(src, dst, 64)
        .udp(5353, 53)
        .write(&mut out, &pattern(40))
        .expect("writing IPv6");
    out
}

/// An 802.1Q-tagged frame around `datagram` (which would be overlay traffic untagged).
pub(super) fn vlan_tagged(datagram: &[u8]) -> Vec<u8> {
    let tag = etherparse::SingleVlanHeader {
        vlan_id: VlanId::try_new(100).expect("valid VLAN id"),
        ether_type: EtherType::IPV4,
        ..Default::default()
    };
    let inner = [tag.to_bytes().as_slice(), datagram].concat();
    ethernet(CNI0_MAC, POD_MAC, EtherType::VLAN_TAGGED_FRAME, &inner)
}

/// Changes the IPv4 header at the start of `datagram` with `change`, then makes the
/// checksum of its first 20 bytes correct again, so that only the change is wrong with
/// it.
pub(super) fn mangle(datagram: &mut [u8], change: impl FnOnce(&mut [u8])) {
    change(datagram);
    let hdr = &mut datagram[..IPV4_LEN];
    hdr[10..12].fill(0);
    let check = Sum16BitWords::new()
        .add_slice(hdr)
        .ones_complement()
        .to_be_bytes();
    hdr[10..12].copy_from_slice(&check);
}

/// Sets the total length field of the IPv4 header at `hdr`.
pub(super) fn set_tot_len(hdr: &mut [u8], len: u16) {
    hdr[2..4].copy_from_slice(&len.to_be_bytes());
}
