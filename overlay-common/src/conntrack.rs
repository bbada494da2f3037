//! Connection tracking for masquerade: keys, entries, states and timeouts.
//!
//! A translated flow owns two entries in the `CONNTRACK` map: the ORIGINAL entry,
//! keyed by the tuple as the inside sender sent it and holding the translated source;
//! and the REPLY entry, keyed by the tuple replies carry and holding the original
//! source. The ORIGINAL entry carries the state and deadline of the flow; the REPLY
//! entry lives and dies with it. Claiming a REPLY key with "insert if absent" is what
//! makes a translated port exclusively ours.

/// Direction of a key.
pub const DIR_ORIGINAL: u8 = 0;
pub const DIR_REPLY: u8 = 1;

/// Key of the `CONNTRACK` map. Ports are in network order; for ICMP echo the
/// identifier stands in for the inside port (`sport` of ORIGINAL, `dport` of REPLY)
/// and the other port is zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub dir: u8,
    pub _pad: [u8; 2],
}

/// TCP state seen on a flow (bits of `CtEntry::flags`).
pub mod flags {
    /// A packet went back from the outside: the flow is two-way.
    pub const SEEN_REPLY: u8 = 1 << 0;
    pub const FIN_ORIGINAL: u8 = 1 << 1;
    pub const FIN_REPLY: u8 = 1 << 2;
    pub const RST: u8 = 1 << 3;
    /// A translated flow's outside end sent its FIN first: it holds the tuple in
    /// TIME_WAIT once both directions are closed.
    pub const REPLY_CLOSED_FIRST: u8 = 1 << 4;
    /// The inside's last FIN carried a TCP timestamp (`CtEntry::fin_tsval`).
    pub const FIN_TIMESTAMP: u8 = 1 << 5;

    /// Both directions sent a FIN.
    pub const fn fin_both(f: u8) -> bool {
        f & (FIN_ORIGINAL | FIN_REPLY) == FIN_ORIGINAL | FIN_REPLY
    }

    /// A TCP flow that is over: reset, or closed both ways.
    pub const fn closed(f: u8) -> bool {
        f & RST != 0 || fin_both(f)
    }

    /// Closed both ways, the outside first and without a reset: the outside holds the
    /// tuple in TIME_WAIT.
    pub const fn outside_time_wait(f: u8) -> bool {
        f & RST == 0 && fin_both(f) && f & REPLY_CLOSED_FIRST != 0
    }
}

/// Value of the `CONNTRACK` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// CLOCK_MONOTONIC nanoseconds after which the flow is dead (ORIGINAL entries).
    pub expires_ns: u64,
    /// When the flow was created (CLOCK_MONOTONIC ns; both entries of a flow alike):
    /// tells a flow's entries from those of a newer flow on the same port.
    pub created_ns: u64,
    /// ORIGINAL: the translated source address; REPLY: the original source address.
    pub addr: [u8; 4],
    /// ORIGINAL: the translated source port; REPLY: the original source port.
    pub port: [u8; 2],
    /// State bits from [`flags`] (ORIGINAL entries).
    pub flags: u8,
    /// The `--ip-masq` rule that translated the flow ([`Rule`] as u8).
    pub rule: u8,
    /// ORIGINAL entries of TCP flows: the sequence number just past the inside's last
    /// FIN, and that FIN's timestamp (TSval). A TIME_WAIT the outside holds accepts a
    /// new SYN on the tuple only if it is newer than these (see the datapath's
    /// `nat::timewait`).
    pub fin_seq_end: u32,
    pub fin_tsval: u32,
}

/// What a TIME_WAIT compares: a TCP segment's sequence numbers and timestamp.
#[derive(Clone, Copy, Debug)]
pub struct Marks {
    pub seq: u32,
    /// The sequence number just past the segment.
    pub seq_end: u32,
    pub tsval: Option<u32>,
}

impl CtEntry {
    /// Whether the outside's TIME_WAIT for this closed flow accepts `syn` for a new
    /// connection on the tuple: a newer timestamp when both carry one (PAWS, RFC 6191,
    /// Linux's `tcp_timewait_state_process`), else a sequence number beyond the old
    /// connection's (RFC 1122 4.2.2.13). Comparisons wrap, as TCP's do.
    #[inline(always)]
    pub fn time_wait_accepts(&self, syn: &Marks) -> bool {
        let newer = |new: u32, old: u32| (new.wrapping_sub(old) as i32) > 0;
        match syn.tsval {
            // Both with timestamps: an older TSval is refused whatever the sequence.
            Some(tsval) if self.flags & flags::FIN_TIMESTAMP != 0 => newer(tsval, self.fin_tsval),
            _ => newer(syn.seq, self.fin_seq_end),
        }
    }
}

/// Which of flanneld's `--ip-masq` rules decided a flow.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Rule 4: from the outside or the host to a local pod. Tracked, never translated,
    /// so that the pod's replies are not masqueraded either.
    Untranslated = 0,
    /// Rule 5: a pod talking to something outside the cluster network.
    PodToOutside = 5,
    /// Rule 6: the host or an outside client talking to a pod on another node.
    OutsideToRemotePod = 6,
}

/// Idle timeouts in seconds, per protocol and state (in `DatapathConfig`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtTimeouts {
    /// TCP before the first reply (SYN sent).
    pub tcp_syn: u32,
    /// Two-way TCP.
    pub tcp_established: u32,
    /// TCP after a FIN in either direction.
    pub tcp_fin: u32,
    /// TCP after a RST, or FINs in both directions with the inside's first.
    pub tcp_closed: u32,
    /// TCP closed by the outside first: it holds the tuple in TIME_WAIT (60 s on
    /// Linux, up to 240 s elsewhere), during which the port goes only to a SYN that
    /// TIME_WAIT accepts.
    pub tcp_time_wait: u32,
    /// UDP before the first reply.
    pub udp: u32,
    /// Two-way UDP.
    pub udp_assured: u32,
    /// ICMP echo.
    pub icmp: u32,
}

impl CtTimeouts {
    /// Defaults close to the kernel's conntrack, with established TCP shortened from
    /// five days to six hours, as Cilium does, so a full table drains in bounded time.
    pub const DEFAULT: CtTimeouts = CtTimeouts {
        tcp_syn: 60,
        tcp_established: 6 * 3600,
        tcp_fin: 120,
        tcp_closed: 10,
        tcp_time_wait: 120,
        udp: 30,
        udp_assured: 180,
        icmp: 30,
    };

    /// Timeout in seconds for a flow of `proto` in state `flags`.
    pub const fn for_state(&self, proto: u8, flags: u8) -> u32 {
        use flags::*;
        match proto {
            6 => {
                if outside_time_wait(flags) {
                    self.tcp_time_wait
                } else if closed(flags) {
                    self.tcp_closed
                } else if flags & (FIN_ORIGINAL | FIN_REPLY) != 0 {
                    self.tcp_fin
                } else if flags & SEEN_REPLY != 0 {
                    self.tcp_established
                } else {
                    self.tcp_syn
                }
            }
            17 => {
                if flags & SEEN_REPLY != 0 {
                    self.udp_assured
                } else {
                    self.udp
                }
            }
            _ => self.icmp,
        }
    }
}

impl Default for CtTimeouts {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl Rule {
    pub const fn from_u8(v: u8) -> Option<Rule> {
        match v {
            0 => Some(Rule::Untranslated),
            5 => Some(Rule::PodToOutside),
            6 => Some(Rule::OutsideToRemotePod),
            _ => None,
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `#[repr(C)]` of integers and byte arrays with explicit padding fields (its
    // size is pinned by a test), so every byte is initialised and any bit pattern is valid.
    unsafe impl aya::Pod for super::CtKey {}
    // SAFETY: `#[repr(C)]` of integers and byte arrays with explicit padding fields (its
    // size is pinned by a test), so every byte is initialised and any bit pattern is valid.
    unsafe impl aya::Pod for super::CtEntry {}
}

#[cfg(test)]
mod tests {
    use super::{flags::*, *};

    #[test]
    fn layouts_are_fixed() {
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtEntry>(), 32);
        assert_eq!(size_of::<CtTimeouts>(), 32);
    }

    #[test]
    fn tcp_state_drives_timeouts() {
        let t = CtTimeouts::DEFAULT;
        assert_eq!(t.for_state(6, 0), t.tcp_syn);
        assert_eq!(t.for_state(6, SEEN_REPLY), t.tcp_established);
        assert_eq!(t.for_state(6, SEEN_REPLY | FIN_REPLY), t.tcp_fin);
        assert_eq!(
            t.for_state(6, SEEN_REPLY | FIN_REPLY | FIN_ORIGINAL),
            t.tcp_closed
        );
        assert_eq!(
            t.for_state(
                6,
                SEEN_REPLY | FIN_REPLY | REPLY_CLOSED_FIRST | FIN_ORIGINAL
            ),
            t.tcp_time_wait
        );
        assert_eq!(t.for_state(6, SEEN_REPLY | RST), t.tcp_closed);
        assert_eq!(
            t.for_state(6, SEEN_REPLY | FIN_REPLY | REPLY_CLOSED_FIRST | RST),
            t.tcp_closed
        );
        assert_eq!(t.for_state(17, 0), t.udp);
        assert_eq!(t.for_state(17, SEEN_REPLY), t.udp_assured);
        assert_eq!(t.for_state(1, SEEN_REPLY), t.icmp);
    }

    #[test]
    fn time_wait_accepts_only_newer_syns() {
        let closed = |fin_seq_end, fin_tsval: Option<u32>| CtEntry {
            fin_seq_end,
            fin_tsval: fin_tsval.unwrap_or(0),
            flags: if fin_tsval.is_some() {
                FIN_TIMESTAMP
            } else {
                0
            },
            ..CtEntry::default()
        };
        let syn = |seq: u32, tsval| Marks {
            seq,
            seq_end: seq.wrapping_add(1),
            tsval,
        };
        let with_ts = closed(1000, Some(500));
        assert!(
            with_ts.time_wait_accepts(&syn(10, Some(501))),
            "newer TSval, lower seq"
        );
        assert!(
            !with_ts.time_wait_accepts(&syn(5000, Some(499))),
            "PAWS: older TSval"
        );
        assert!(
            !with_ts.time_wait_accepts(&syn(5000, Some(500))),
            "equal TSval"
        );
        assert!(
            closed(1000, Some(u32::MAX - 1)).time_wait_accepts(&syn(0, Some(3))),
            "TSval wraps"
        );
        // Without a timestamp on either side the sequence decides.
        let without = closed(1000, None);
        assert!(without.time_wait_accepts(&syn(1001, Some(1))));
        assert!(!without.time_wait_accepts(&syn(1000, None)));
        assert!(with_ts.time_wait_accepts(&syn(1001, None)));
        assert!(!with_ts.time_wait_accepts(&syn(999, None)));
        assert!(
            closed(u32::MAX, None).time_wait_accepts(&syn(5, None)),
            "seq wraps"
        );
    }
}
