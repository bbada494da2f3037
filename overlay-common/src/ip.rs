//! Numbers of IPv4 that the datapath, the agent and the tests all use.

pub const IPPROTO_ICMP: u8 = 1;
/// IPv4 in IPv4 (RFC 2003): the tunnel's outer protocol.
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// An IPv4 header without options: the outer header the tunnel adds to each packet.
pub const IPV4_HEADER_LEN: usize = 20;

/// The length in bytes of an IPv4 header, from its first byte (version and IHL).
#[inline(always)]
pub const fn header_len(vihl: u8) -> usize {
    (vihl & 0x0f) as usize * 4
}

/// Whether an IPv4 header's flags and fragment offset (wire order) mark a fragment:
/// more fragments follow, or this one starts past the datagram's beginning.
#[inline(always)]
pub const fn is_fragment(frags: [u8; 2]) -> bool {
    const MF_AND_OFFSET: u16 = 0x3fff;
    u16::from_be_bytes(frags) & MF_AND_OFFSET != 0
}

/// The ECN field of the TOS byte (RFC 3168) and the codepoints the tunnel handles.
pub const ECN_MASK: u8 = 0x03;
pub const ECN_ECT0: u8 = 0x02;
/// Congestion experienced.
pub const ECN_CE: u8 = 0x03;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_length_from_ihl() {
        assert_eq!(header_len(0x45), IPV4_HEADER_LEN);
        assert_eq!(header_len(0x46), 24, "one word of options");
        assert_eq!(header_len(0x4f), 60, "the longest header");
    }

    #[test]
    fn fragments_by_more_fragments_or_offset() {
        assert!(!is_fragment([0, 0]));
        assert!(
            !is_fragment([0x40, 0]),
            "don't fragment alone is a whole datagram"
        );
        assert!(is_fragment([0x20, 0]), "first fragment: more follow");
        assert!(is_fragment([0, 1]), "last fragment: an offset");
        assert!(is_fragment([0x1f, 0xff]), "the largest offset");
    }
}
