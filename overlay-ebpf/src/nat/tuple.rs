//! The transport view of a packet that masquerade needs: its flow tuple, where the
//! fields to rewrite are, and for ICMP errors where the quoted datagram starts.

use aya_ebpf::programs::TcContext;
use network_types::ip::Ipv4Hdr;
use overlay_common::Reason;

use crate::{
    conntrack::Tuple,
    parse::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPV4_LEN, ensure_linear, load_exact, ptr_at},
};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_SOURCE_QUENCH: u8 = 4;
const ICMP_REDIRECT: u8 = 5;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Tcp,
    Udp,
    EchoRequest,
    EchoReply,
    /// An ICMP error; the quoted datagram's IP header is at `l4 + 8`.
    IcmpError,
}

/// Where things are in the packet (offsets from the start of the frame).
#[derive(Clone, Copy)]
pub(crate) struct L4 {
    pub kind: Kind,
    pub off: usize,
    /// The flow tuple (for ICMP errors: of the error packet itself, unused).
    pub tuple: Tuple,
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
}

impl L4 {
    /// Offset of the transport checksum.
    pub(crate) fn csum_off(&self) -> usize {
        self.off
            + match self.kind {
                Kind::Tcp => 16,
                Kind::Udp => 6,
                _ => 2,
            }
    }

    /// Offset of the source "port" field: the port, or the ICMP echo identifier.
    pub(crate) fn sport_off(&self) -> usize {
        match self.kind {
            Kind::Tcp | Kind::Udp => self.off,
            _ => self.off + 4,
        }
    }

    /// Offset of the destination "port" field.
    pub(crate) fn dport_off(&self) -> usize {
        match self.kind {
            Kind::Tcp | Kind::Udp => self.off + 2,
            _ => self.off + 4,
        }
    }

    /// Whether a packet of this kind may open a new flow.
    pub(crate) fn opens_flow(&self) -> bool {
        !matches!(self.kind, Kind::EchoReply | Kind::IcmpError)
    }
}

/// Parses the transport header of the unfragmented IPv4 packet whose header `ip` is
/// at `l3` in the frame. A `quoted` datagram (inside an ICMP error) may be cut after
/// 8 bytes of transport header, so TCP flags are not read there.
#[inline(always)]
pub(crate) fn parse(ctx: &TcContext, ip: &Ipv4Hdr, l3: usize, quoted: bool) -> Result<L4, Reason> {
    let off = l3 + ip.ihl() as usize;
    // The transport header must lie inside the datagram, not in what trails it (an
    // Ethernet pad). A quote's length is bounded by its caller: it may be cut short.
    if !quoted {
        let needed = if ip.proto == IPPROTO_TCP { 20 } else { 8 };
        if usize::from(ip.tot_len()) < ip.ihl() as usize + needed {
            return Err(Reason::DropMalformed);
        }
    }
    // Read in place (a copy helper per field cost more): the ports or ICMP
    // identifier, and a TCP header's flags at byte 13.
    let flags_read = ip.proto == IPPROTO_TCP && !quoted;
    if !ensure_linear(ctx, off + if flags_read { 14 } else { 8 }) {
        return Err(Reason::DropMalformed);
    }
    let Some(head) = ptr_at::<[u8; 8]>(ctx, off) else {
        return Err(Reason::DropMalformed);
    };
    // SAFETY: `ptr_at` checked that the bytes lie within the linear data, which
    // `ensure_linear` made them; a byte array has alignment 1.
    let head = unsafe { *head };
    let kind = match (ip.proto, head[0]) {
        (IPPROTO_TCP, _) => Kind::Tcp,
        (IPPROTO_UDP, _) => Kind::Udp,
        (IPPROTO_ICMP, ICMP_ECHO_REQUEST) => Kind::EchoRequest,
        (IPPROTO_ICMP, ICMP_ECHO_REPLY) => Kind::EchoReply,
        (
            IPPROTO_ICMP,
            ICMP_DEST_UNREACH
            | ICMP_SOURCE_QUENCH
            | ICMP_REDIRECT
            | ICMP_TIME_EXCEEDED
            | ICMP_PARAMETER_PROBLEM,
        ) => Kind::IcmpError,
        _ => return Err(Reason::DropNatUnsupported),
    };
    let mut tuple = Tuple {
        src: ip.src_addr,
        dst: ip.dst_addr,
        sport: [0; 2],
        dport: [0; 2],
        proto: ip.proto,
    };
    match kind {
        Kind::Tcp | Kind::Udp => {
            tuple.sport = [head[0], head[1]];
            tuple.dport = [head[2], head[3]];
        }
        // The identifier stands for the requester's port.
        Kind::EchoRequest => tuple.sport = [head[4], head[5]],
        Kind::EchoReply => tuple.dport = [head[4], head[5]],
        Kind::IcmpError => {}
    }
    let mut tcp_flags = 0;
    if flags_read {
        let Some(flags) = ptr_at::<u8>(ctx, off + 13) else {
            return Err(Reason::DropMalformed);
        };
        // SAFETY: as above.
        tcp_flags = unsafe { *flags };
    }
    Ok(L4 {
        kind,
        off,
        tuple,
        tcp_flags,
    })
}

/// The IPv4 header quoted in an ICMP error, if it is complete and option-free.
#[inline(always)]
pub(crate) fn quoted_header(ctx: &TcContext, icmp: &L4) -> Option<Ipv4Hdr> {
    let mut raw = [0u8; IPV4_LEN];
    if !load_exact(ctx, icmp.off + 8, &mut raw) {
        return None;
    }
    // SAFETY: `Ipv4Hdr` is 20 bytes of byte fields and byte arrays: every bit pattern of
    // the array is a valid header.
    let ip: Ipv4Hdr = unsafe { core::mem::transmute(raw) };
    (ip.version() == 4 && ip.ihl() as usize == IPV4_LEN).then_some(ip)
}
