//! Numbers of IPv4 that the datapath, the agent and the tests all use.

pub const IPPROTO_ICMP: u8 = 1;
/// IPv4 in IPv4 (RFC 2003): the tunnel's outer protocol.
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// An IPv4 header without options: the outer header the tunnel adds to each packet.
pub const IPV4_HEADER_LEN: usize = 20;

/// The ECN field of the TOS byte (RFC 3168) and the codepoints the tunnel handles.
pub const ECN_MASK: u8 = 0x03;
pub const ECN_ECT0: u8 = 0x02;
/// Congestion experienced.
pub const ECN_CE: u8 = 0x03;
