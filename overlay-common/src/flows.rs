//! The fast path's flow table (`FLOWS`): which flows may skip the host stack.
//!
//! A packet our programs forward in place of the host must end where, and as, the
//! host would have delivered it. The programs know that only of a flow the host has
//! been seen to forward unchanged under its current netfilter ruleset, and that the
//! agent admitted after reading the flow's entry in the host's connection tracking.
//! Everything else goes through the host. One entry per direction of a flow:
//!
//! - the programs that see what the host forwarded (`uplink_egress` for a local pod's
//!   packets to the overlay or the outside, `bridge_egress` for packets to local pods)
//!   record the direction's tuple with the ruleset generation of that moment
//!   ([`FlowState::seen_gen`]): a packet leaves the host with the tuple it came in
//!   with only when the host translated nothing, since connection tracking never lets
//!   a translated flow take another flow's tuple;
//! - the agent admits ([`FlowState::admitted`]) an established, untranslated flow the
//!   host tracks, after marking its conntrack entry liberal: the packets the host still
//!   sees later (a SYN, FIN or RST, everything after a ruleset change) are then not out
//!   of a window it stopped following;
//! - the fast path takes a packet only of an admitted direction seen under the current
//!   generation, and never a SYN, FIN or RST, which the host must see; a FIN or RST
//!   sends the rest of the flow through the host ([`CLOSING`]).

/// Key of `FLOWS`: one direction of a TCP or UDP flow, as its packets carry it (wire
/// order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    /// The other direction of the same flow.
    pub const fn reversed(&self) -> FlowKey {
        FlowKey {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    /// The bit of `FLOW_FILTER` of this direction's address pair: see [`filter_bit`].
    pub const fn filter_bit(&self) -> (u32, u64) {
        filter_bit(self.src, self.dst)
    }
}

/// The bit of `FLOW_FILTER` of the directions from `src` to `dst`, as its word and the
/// mask within: a multiplicative hash of the two addresses, the same for the programs
/// and the agent (read little-endian on either side). By addresses, not ports: the
/// programs test it before they read a packet's transport header.
pub const fn filter_bit(src: [u8; 4], dst: [u8; 4]) -> (u32, u64) {
    const K: u32 = 0x9e37_79b1;
    let h = (u32::from_le_bytes(src).wrapping_mul(K) ^ u32::from_le_bytes(dst)).wrapping_mul(K);
    let slot = h >> (32 - FILTER_BITS_LOG2);
    (slot >> 6, 1 << (slot & 63))
}

/// `FLOW_FILTER` holds 2^this bits.
pub const FILTER_BITS_LOG2: u32 = 20;
/// Capacity of `FLOW_FILTER`, in 64-bit words (128 KiB): even with a full table of
/// [`FLOW_ENTRIES`] admitted directions, each between other addresses, one bit in 16
/// is set, so that a packet of a pair of addresses with no admitted direction is looked
/// up in `FLOWS` about once in 16.
pub const FILTER_WORDS: u32 = 1 << (FILTER_BITS_LOG2 - 6);

/// [`FlowState::flags`]: a FIN or RST went by; the rest of the flow goes through the
/// host, whose connection tracking must see it close.
pub const CLOSING: u8 = 1 << 0;
/// [`FlowState::flags`], set by the agent: the host translates the flow (or a conntrack
/// helper follows it), so it never takes the fast path and the agent asks no more. A
/// new connection on the tuple starts a fresh entry.
pub const REFUSED: u8 = 1 << 1;

/// Value of `FLOWS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// The ruleset generation (`DatapathConfig::ruleset_gen`) under which the host last
    /// forwarded a packet of this direction unchanged.
    pub seen_gen: u32,
    /// Packets of this direction the host forwarded (saturating): the agent looks only
    /// at flows that carried a few, not at every short exchange.
    pub host_packets: u32,
    /// When the fast path last took a packet of this direction (CLOCK_MONOTONIC ns,
    /// updated at most once a second): the agent keeps the host's conntrack entry of a
    /// flow in use from timing out.
    pub last_fast_ns: u64,
    /// When the agent admitted the flow or last refreshed its conntrack entry
    /// (CLOCK_MONOTONIC ns). Older than [`FAST_FOR_NS`], the fast path no longer takes
    /// it: an idle flow, or one whose agent is gone, meets the host again before the
    /// host's entry could time out unseen.
    pub refreshed_ns: u64,
    /// Non-zero once the agent admitted the flow (see the module documentation).
    pub admitted: u8,
    /// [`CLOSING`], [`REFUSED`].
    pub flags: u8,
    pub _pad: [u8; 6],
}

impl FlowState {
    /// Whether the fast path may take a packet of this direction at `now_ns` under
    /// ruleset generation `generation`, given its TCP flags (0 for UDP).
    pub const fn fast(&self, generation: u32, tcp_flags: u8, now_ns: u64) -> bool {
        self.admitted != 0
            && self.flags & CLOSING == 0
            && self.seen_gen == generation
            && tcp_flags & TCP_CONTROL == 0
            && !self.stale(now_ns)
    }

    /// Whether the admission is too old to act on (see [`FlowState::refreshed_ns`]).
    /// The agent's clock may be a tick ahead of the programs' coarse one: a time
    /// "after now" is fresh.
    pub const fn stale(&self, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.refreshed_ns) >= FAST_FOR_NS
    }
}

/// TCP flags the host's connection tracking must see: SYN, FIN, RST.
pub const TCP_CONTROL: u8 = 0x01 | 0x02 | 0x04;
/// TCP flags that end a flow: FIN, RST.
pub const TCP_CLOSE: u8 = 0x01 | 0x04;

/// Host packets a direction must have carried before the agent looks at it.
pub const ADMIT_AFTER_PACKETS: u32 = 8;

/// How long an admission or refresh lets the fast path take a flow: well under the
/// shortest timeout of an established flow in the host's conntrack (UDP's 120 s), and
/// several times the agent's refresh period.
pub const FAST_FOR_NS: u64 = 60 * 1_000_000_000;

/// Capacity of `FLOWS` (directions of flows; least recently used entries go first).
pub const FLOW_ENTRIES: u32 = 65_536;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `#[repr(C)]` of integers and byte arrays with explicit padding fields (its
    // size is pinned by a test), so every byte is initialised and any bit pattern is valid.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: `#[repr(C)]` of integers and byte arrays with explicit padding fields (its
    // size is pinned by a test), so every byte is initialised and any bit pattern is valid.
    unsafe impl aya::Pod for super::FlowState {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_fixed() {
        assert_eq!(size_of::<FlowKey>(), 16);
        assert_eq!(size_of::<FlowState>(), 32);
    }

    #[test]
    fn only_admitted_directions_seen_under_this_ruleset_and_no_control_packets() {
        let now = 1_000 * 1_000_000_000;
        let admitted = FlowState {
            seen_gen: 7,
            admitted: 1,
            refreshed_ns: now - 1_000_000_000,
            ..FlowState::default()
        };
        assert!(admitted.fast(7, 0x10, now));
        assert!(!admitted.fast(8, 0x10, now), "seen under another ruleset");
        for control in [0x02, 0x12, 0x11, 0x04, 0x14] {
            assert!(!admitted.fast(7, control, now), "flags {control:#x}");
        }
        let closing = FlowState {
            flags: CLOSING,
            ..admitted
        };
        assert!(!closing.fast(7, 0x10, now));
        let unadmitted = FlowState {
            admitted: 0,
            ..admitted
        };
        assert!(!unadmitted.fast(7, 0x10, now));
        assert!(
            !admitted.fast(7, 0x10, now + FAST_FOR_NS),
            "not refreshed for too long"
        );
        assert!(
            admitted.fast(7, 0x10, now - 2_000_000_000),
            "refreshed by a clock a tick ahead"
        );
    }

    #[test]
    fn filter_bits_spread_over_the_filter() {
        // 65,536 pairs of pods on two nodes with a /16 each.
        let mut words = [0u64; FILTER_WORDS as usize];
        for (a, b) in (0..=u16::MAX).map(|i| (i as u8, (i >> 8) as u8)) {
            let (word, mask) = filter_bit([10, 244, 1, a], [10, 245, b, 7]);
            assert_eq!(mask.count_ones(), 1);
            words[word as usize] |= mask;
        }
        let set: u32 = words.iter().map(|w| w.count_ones()).sum();
        // Random slots would leave 65,536 × (1 − e^(−1/16)) ≈ 63,500 bits set.
        assert!(set > 60_000, "{set} bits set: the hash clusters");
    }

    #[test]
    fn reversed_swaps_ends() {
        let k = FlowKey {
            src: [10, 244, 1, 2],
            dst: [10, 244, 2, 2],
            sport: [0x9c, 0x40],
            dport: [0, 80],
            proto: 6,
            _pad: [0; 3],
        };
        let r = k.reversed();
        assert_eq!(
            (r.src, r.dst, r.sport, r.dport),
            (k.dst, k.src, k.dport, k.sport)
        );
        assert_eq!(r.reversed(), k);
    }
}
