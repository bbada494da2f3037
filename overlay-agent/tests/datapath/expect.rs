//! What the datapath should make of a frame, built from the input with etherparse and
//! the spec alone (none of the datapath's own header or checksum code), and a check
//! that every checksum of a frame is right.

use etherparse::{
    EtherType, Ethernet2Header, Icmpv4Header, Icmpv4Type, IpDscp, IpEcn, IpFragOffset, IpNumber,
    Ipv4Header, TcpHeader, UdpHeader, icmpv4::DestUnreachableHeader,
};

use super::{
    packet::{ETH_LEN, IPV4_LEN},
    topology::{CNI0_MAC, ETH0_MAC, GATEWAY, Mac, NODE_IP, POD_MAC, Remote},
};

/// What happens to the Ethernet header of a forwarded frame.
#[derive(Clone, Copy, Debug)]
pub(super) enum L2 {
    /// Rewritten from the FIB: destination (next hop) and source (egress device).
    Rewritten { dst: Mac, src: Mac },
    /// Left as it came in (the kernel fills it in later, or the stack receives it).
    Kept,
}

/// The Ethernet header and IPv4 datagram of `frame`, parsed by etherparse.
fn split(frame: &[u8]) -> (Ethernet2Header, Ipv4Header, &[u8]) {
    let (eth, rest) = Ethernet2Header::from_slice(frame).expect("Ethernet header");
    assert_eq!(eth.ether_type, EtherType::IPV4, "not an IPv4 frame");
    let (ip, _) = Ipv4Header::from_slice(rest).expect("IPv4 header");
    let datagram = &rest[..usize::from(ip.total_len)];
    (eth, ip, datagram)
}

fn ethernet_for(l2: L2, input: &Ethernet2Header) -> Ethernet2Header {
    match l2 {
        L2::Rewritten { dst, src } => Ethernet2Header {
            destination: dst.0,
            source: src.0,
            ether_type: EtherType::IPV4,
        },
        L2::Kept => input.clone(),
    }
}

/// `ip` with TTL lowered by `ttl_decrement` and `ecn` (if given), checksum recomputed.
fn rewritten(ip: &Ipv4Header, ttl_decrement: u8, ecn: Option<IpEcn>) -> Ipv4Header {
    let mut ip = ip.clone();
    ip.time_to_live -= ttl_decrement;
    if let Some(ecn) = ecn {
        ip.ecn = ecn;
    }
    ip.header_checksum = ip.calc_header_checksum();
    ip
}

/// ECN of the outer header around an inner header with `inner`: copied, except that CE
/// becomes ECT(0) (a congestion mark is already recorded inside).
pub(super) fn outer_ecn(inner: IpEcn) -> IpEcn {
    match inner {
        IpEcn::CongestionExperienced => IpEcn::Ect0,
        other => other,
    }
}

/// The frame `input` (from a pod or the host) becomes when encapsulated towards
/// `remote`, with the inner TTL lowered by `ttl_decrement` (1 when forwarding a pod's
/// packet, 0 for what the host stack already routed).
pub(super) fn encapsulated(input: &[u8], remote: &Remote, ttl_decrement: u8, l2: L2) -> Vec<u8> {
    let (eth, inner, datagram) = split(input);
    let inner_out = rewritten(&inner, ttl_decrement, None);
    let mut outer = Ipv4Header {
        dscp: IpDscp::ZERO,
        ecn: outer_ecn(inner.ecn),
        identification: inner.identification,
        dont_fragment: inner.dont_fragment,
        more_fragments: false,
        fragment_offset: IpFragOffset::ZERO,
        time_to_live: inner_out.time_to_live,
        protocol: IpNumber::IPV4,
        source: NODE_IP.octets(),
        destination: remote.node.octets(),
        ..Default::default()
    };
    outer.set_payload_len(datagram.len()).expect("fits");
    outer.header_checksum = outer.calc_header_checksum();
    [
        ethernet_for(l2, &eth).to_bytes().as_slice(),
        &outer.to_bytes(),
        &inner_out.to_bytes(),
        &datagram[inner.header_len()..],
    ]
    .concat()
}

/// Where a forwarded (encapsulated) frame's Ethernet header comes from: the next hop's
/// MAC and the uplink's, or unchanged while the kernel resolves the next hop.
pub(super) fn towards(remote: &Remote) -> L2 {
    match remote.next_hop_mac {
        Some(dst) => L2::Rewritten { dst, src: ETH0_MAC },
        None => L2::Kept,
    }
}

/// The Ethernet header of a frame the datapath sends straight to the local pod: from the
/// bridge to the pod's MAC.
pub(super) const TO_POD: L2 = L2::Rewritten {
    dst: POD_MAC,
    src: CNI0_MAC,
};

/// The frame `input` (IPIP from the underlay) becomes when decapsulated: outer header
/// gone, outer CE carried into the inner ECN, inner TTL lowered by `ttl_decrement`.
pub(super) fn decapsulated(input: &[u8], ttl_decrement: u8, l2: L2) -> Vec<u8> {
    let (eth, outer, outer_datagram) = split(input);
    let inner_datagram = &outer_datagram[outer.header_len()..];
    let (inner, _) = Ipv4Header::from_slice(inner_datagram).expect("inner IPv4 header");
    let ce = (outer.ecn == IpEcn::CongestionExperienced).then_some(IpEcn::CongestionExperienced);
    let inner_out = rewritten(&inner, ttl_decrement, ce);
    [
        ethernet_for(l2, &eth).to_bytes().as_slice(),
        &inner_out.to_bytes(),
        &inner_datagram[inner.header_len()..],
    ]
    .concat()
}

/// The frame `input` (a datagram from the underlay for the local pod) becomes when sent
/// straight to the pod: to the pod's MAC from the bridge's, TTL lowered by one, and
/// whatever trails the datagram kept.
pub(super) fn to_pod(input: &[u8]) -> Vec<u8> {
    forwarded(input, TO_POD)
}

/// The frame `input` becomes when forwarded unencapsulated in place of the host's
/// router: Ethernet header as `l2` says, TTL lowered by one, whatever trails the
/// datagram kept.
pub(super) fn forwarded(input: &[u8], l2: L2) -> Vec<u8> {
    let (eth, ip, _) = split(input);
    [
        ethernet_for(l2, &eth).to_bytes().as_slice(),
        &rewritten(&ip, 1, None).to_bytes(),
        &input[ETH_LEN + ip.header_len()..],
    ]
    .concat()
}

/// Bytes of the offending datagram quoted after its IP header.
pub(super) const QUOTE_LEN: usize = 64;

/// The ICMP fragmentation-needed reply to `input` (a pod's frame), announcing
/// `next_hop_mtu`, as the pod's gateway sends it back to the pod.
pub(super) fn frag_needed(input: &[u8], next_hop_mtu: u16) -> Vec<u8> {
    let (eth, ip, _) = split(input);
    let quoted = &input[ETH_LEN..ETH_LEN + IPV4_LEN + QUOTE_LEN];
    let icmp = Icmpv4Header::with_checksum(
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu,
        }),
        quoted,
    );
    let mut reply = Ipv4Header {
        // IPTOS_PREC_INTERNETCONTROL (0xc0), as the kernel marks its ICMP errors.
        dscp: IpDscp::try_new(0xc0 >> 2).expect("fits"),
        ecn: IpEcn::NotEct,
        identification: 0,
        dont_fragment: false,
        time_to_live: 64,
        protocol: IpNumber::ICMP,
        source: GATEWAY.octets(),
        destination: ip.source,
        ..Default::default()
    };
    reply
        .set_payload_len(icmp.header_len() + quoted.len())
        .expect("fits");
    reply.header_checksum = reply.calc_header_checksum();
    let eth = Ethernet2Header {
        destination: eth.source,
        source: eth.destination,
        ether_type: EtherType::IPV4,
    };
    [
        eth.to_bytes().as_slice(),
        &reply.to_bytes(),
        &icmp.to_bytes(),
        quoted,
    ]
    .concat()
}

/// Checks every checksum in `frame` with etherparse: each IPv4 header (outer, inner,
/// and one quoted in an ICMP error), and the TCP, UDP or ICMP checksum of the innermost
/// datagram unless it is a fragment.
#[track_caller]
pub(super) fn assert_checksums(frame: &[u8]) {
    let (_, _, datagram) = split(frame);
    check_datagram(datagram, 0);
}

#[track_caller]
fn check_datagram(datagram: &[u8], depth: usize) {
    let (ip, _) = Ipv4Header::from_slice(datagram).expect("IPv4 header");
    assert_eq!(
        ip.header_checksum,
        ip.calc_header_checksum(),
        "IPv4 header checksum at depth {depth}"
    );
    assert_eq!(
        usize::from(ip.total_len),
        datagram.len(),
        "IPv4 total length at depth {depth}"
    );
    if ip.is_fragmenting_payload() {
        return;
    }
    let payload = &datagram[ip.header_len()..];
    match ip.protocol {
        IpNumber::IPV4 => check_datagram(payload, depth + 1),
        IpNumber::TCP => {
            let (tcp, data) = TcpHeader::from_slice(payload).expect("TCP header");
            assert_eq!(
                tcp.checksum,
                tcp.calc_checksum_ipv4(&ip, data).expect("fits"),
                "TCP checksum"
            );
        }
        IpNumber::UDP => {
            let (udp, data) = UdpHeader::from_slice(payload).expect("UDP header");
            // Zero is "no checksum" (RFC 768), and must stay so.
            if udp.checksum != 0 {
                assert_eq!(
                    udp.checksum,
                    udp.calc_checksum_ipv4(&ip, data).expect("fits"),
                    "UDP checksum"
                );
            }
        }
        IpNumber::ICMP => {
            let (icmp, data) = Icmpv4Header::from_slice(payload).expect("ICMP header");
            assert_eq!(
                icmp.checksum,
                icmp.icmp_type.calc_checksum(data),
                "ICMP checksum at depth {depth}"
            );
            if let Icmpv4Type::DestinationUnreachable(_)
            | Icmpv4Type::TimeExceeded(_)
            | Icmpv4Type::ParameterProblem(_) = icmp.icmp_type
            {
                let (quoted, _) = Ipv4Header::from_slice(data).expect("quoted IPv4 header");
                if usize::from(quoted.total_len) == data.len() {
                    // The whole datagram is quoted: every checksum in it must hold.
                    check_datagram(data, depth + 1);
                } else {
                    // The quote is cut short: only its header checksum can be checked.
                    assert_eq!(
                        quoted.header_checksum,
                        quoted.calc_header_checksum(),
                        "quoted IPv4 header checksum"
                    );
                }
            }
        }
        // No transport checksum the datapath could have touched.
        _ => {}
    }
}
