//! Outcome counters: one slot per (hook, reason), per CPU.
//!
//! Every packet a program sees ends in exactly one reason, so the sum over reasons of a
//! hook is the number of packets that hook saw. Names are stable: they become metric
//! labels and appear in the inspection commands.

/// Where a program runs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// Ingress of the pod bridge (`cni0`): packets from local pods to the host.
    BridgeIngress = 0,
    /// Ingress of the uplink (`eth0`): packets from the underlay.
    UplinkIngress = 1,
    /// Egress of the uplink: packets the host stack routes out.
    UplinkEgress = 2,
    /// Ingress of a local pod's veth (its host end, a port of the bridge): the work of
    /// `BridgeIngress`, done before the bridge sees the frame.
    PodIngress = 3,
    /// Egress of the pod bridge: what the host stack forwarded to local pods, recorded
    /// for the fast path.
    BridgeEgress = 4,
}

impl Hook {
    pub const ALL: [Hook; 5] = [
        Hook::BridgeIngress,
        Hook::UplinkIngress,
        Hook::UplinkEgress,
        Hook::PodIngress,
        Hook::BridgeEgress,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Hook::BridgeIngress => "bridge_ingress",
            Hook::UplinkIngress => "uplink_ingress",
            Hook::UplinkEgress => "uplink_egress",
            Hook::PodIngress => "pod_ingress",
            Hook::BridgeEgress => "bridge_egress",
        }
    }

    /// Name of the program attached at this hook, as in the object file: each program
    /// is named after its hook (`overlay-ebpf/src/hooks/<name>.rs`).
    pub const fn program(self) -> &'static str {
        self.name()
    }
}

/// Declares an enum whose numbers are an ABI: they index pinned counter slots, which
/// an upgrade keeps, so a variant's number must never change. Each variant stands on
/// one line with its number, its stable name (a metric label) and, for reasons, its
/// kind; `ALL`, `COUNT`, `name`, `from_u32` (and `kind`) follow from that line alone.
macro_rules! numbered {
    (
        $(#[$meta:meta])*
        pub enum $ty:ident {
            $($(#[$doc:meta])* $variant:ident = $n:literal => $name:literal, $kind:ident;)*
        }
    ) => {
        numbered! {
            $(#[$meta])*
            pub enum $ty { $($(#[$doc])* $variant = $n => $name;)* }
        }

        impl $ty {
            pub const fn kind(self) -> Kind {
                match self {
                    $($ty::$variant => Kind::$kind,)*
                }
            }
        }
    };
    (
        $(#[$meta:meta])*
        pub enum $ty:ident {
            $($(#[$doc:meta])* $variant:ident = $n:literal => $name:literal;)*
        }
    ) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $ty {
            $($(#[$doc])* $variant = $n,)*
        }

        impl $ty {
            pub const COUNT: u32 = [$($n),*].len() as u32;
            /// In number order (a test checks that the numbers are dense).
            pub const ALL: [$ty; Self::COUNT as usize] = [$($ty::$variant),*];

            pub const fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name,)*
                }
            }

            /// The variant numbered `n`.
            pub const fn from_u32(n: u32) -> Option<Self> {
                match n {
                    $($n => Some($ty::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

/// How a reason reads for an operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Forward,
    Pass,
    Drop,
}

impl Kind {
    /// Its stable name: a metric label, and a field of the inspection commands' JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Forward => "forward",
            Kind::Pass => "pass",
            Kind::Drop => "drop",
        }
    }
}

numbered! {
    /// What happened to a packet. New reasons take the next number.
    pub enum Reason {
    /// Encapsulated and sent to the peer with a resolved next hop.
    Encapsulated = 0 => "encapsulated", Forward;
    /// Encapsulated; the next hop's neighbour entry was missing, so the kernel resolves
    /// it (`bpf_redirect_neigh`).
    EncapsulatedNeighResolve = 1 => "encapsulated_neigh_resolve", Forward;
    /// Decapsulated and sent straight to the pod (into its namespace, past the bridge).
    Decapsulated = 2 => "decapsulated", Forward;
    /// Decapsulated and handed to the host stack (local destination, TTL about to
    /// expire, or no resolved path to the pod).
    DecapsulatedToStack = 3 => "decapsulated_to_stack", Forward;
    /// Too big for the uplink after encapsulation with DF set: answered with ICMP
    /// fragmentation-needed.
    FragNeededSent = 4 => "frag_needed_sent", Forward;
    /// Source translated (masquerade) and sent on unencapsulated.
    Masqueraded = 5 => "masqueraded", Forward;
    /// A reply translated back to the flow's original source, handed to the stack.
    Unmasqueraded = 6 => "unmasqueraded", Forward;
    /// A reply translated back to a pod of this node and sent straight to it.
    UnmasqueradedToPod = 7 => "unmasqueraded_to_pod", Forward;
    /// Not IPv4 (ARP, IPv6, VLAN, ...): not ours.
    PassNotIpv4 = 8 => "pass_not_ipv4", Pass;
    /// IPv4 whose destination is no remote pod subnet.
    PassNotOverlay = 9 => "pass_not_overlay", Pass;
    /// On the uplink: not IPIP addressed to this node.
    PassNotTunnel = 10 => "pass_not_tunnel", Pass;
    /// On the uplink egress: already IPIP (our own encapsulated packets leaving).
    PassTunnelled = 11 => "pass_tunnelled", Pass;
    /// Carries IP options: left to the host stack, whose route sends it through the
    /// uplink egress program.
    PassIpOptions = 12 => "pass_ip_options", Pass;
    /// An IP fragment: left to the host stack (same path as options).
    PassFragment = 13 => "pass_fragment", Pass;
    /// TTL would expire here: the host stack sends time-exceeded.
    PassTtlExpired = 14 => "pass_ttl_expired", Pass;
    /// Too big for the uplink after encapsulation, DF clear: the host stack fragments.
    PassFragmentationNeeded = 15 => "pass_fragmentation_needed", Pass;
    /// The agent has not configured this node yet.
    PassNotConfigured = 16 => "pass_not_configured", Pass;
    /// From the pod bridge with a source outside this node's pod subnet: left to the
    /// host stack (and its reverse-path filter) rather than tunnelled blindly.
    PassForeignSource = 17 => "pass_foreign_source", Pass;
    /// Truncated or inconsistent headers, or a bad outer header checksum.
    DropMalformed = 18 => "drop_malformed", Drop;
    /// IPIP from an address that is not a known node (spoofing; flannel issue #961).
    DropUnknownPeer = 19 => "drop_unknown_peer", Drop;
    /// IPIP whose inner destination is neither in this node's pod subnet nor this
    /// node's own address.
    DropNotForThisNode = 20 => "drop_not_for_this_node", Drop;
    /// IPIP inside IPIP.
    DropNestedTunnel = 21 => "drop_nested_tunnel", Drop;
    /// Fragmented IPIP: cannot be decapsulated without reassembly.
    DropOuterFragment = 22 => "drop_outer_fragment", Drop;
    /// IPIP with outer IP options: our peers never send them.
    DropOuterOptions = 23 => "drop_outer_options", Drop;
    /// Outer header marked CE around a packet that is not ECN-capable (RFC 6040).
    DropCeOnNotEct = 24 => "drop_ce_on_not_ect", Drop;
    /// Would leave the uplink oversized where no ICMP or fragmentation is possible.
    DropTooBig = 25 => "drop_too_big", Drop;
    /// The FIB has no usable route to the peer node.
    DropNoRouteToPeer = 26 => "drop_no_route_to_peer", Drop;
    /// A kernel helper failed while rewriting the packet.
    DropHelperError = 27 => "drop_helper_error", Drop;
    /// Masquerade needed a new flow but the connection table is full.
    DropNatTableFull = 28 => "drop_nat_table_full", Drop;
    /// Masquerade found no free port in the configured range.
    DropNatPortsExhausted = 29 => "drop_nat_ports_exhausted", Drop;
    /// A fragment of a flow to masquerade: without reassembly its ports are unknown.
    DropNatFragment = 30 => "drop_nat_fragment", Drop;
    /// A protocol (or ICMP type) masquerade cannot translate.
    DropNatUnsupported = 31 => "drop_nat_unsupported", Drop;
    /// A local pod's packet of a masqueraded flow, translated on the bridge and sent
    /// straight out of the uplink.
    MasqueradedToUplink = 32 => "masqueraded_to_uplink", Forward;
    /// On a pod's veth: a frame not addressed to the bridge (for another pod of this
    /// node), or the agent has not told the programs the bridge's address yet; the
    /// bridge delivers it as it would without us.
    PassNotForGateway = 33 => "pass_not_for_gateway", Pass;
    /// Decapsulated and handed to the pod bridge, which delivers it: the agent does not
    /// know the pod's port on the bridge yet (a pod that has just started), or the
    /// route's device is not the bridge the pod hangs on.
    DecapsulatedToBridge = 34 => "decapsulated_to_bridge", Forward;
    /// A reply translated back to a pod of this node, handed to the pod bridge (as
    /// `DecapsulatedToBridge`).
    UnmasqueradedToBridge = 35 => "unmasqueraded_to_bridge", Forward;
    /// From a local pod to a remote pod or the outside, of a flow not on the fast path:
    /// the host stack routes it (its netfilter and connection tracking decide), and
    /// `uplink_egress` then encapsulates or masquerades it.
    PassToHost = 36 => "pass_to_host", Pass;
    /// Decapsulated and handed to the host stack, which forwards it to the pod: its
    /// flow is not on the fast path.
    DecapsulatedToHost = 37 => "decapsulated_to_host", Forward;
    /// On the pod bridge's egress: a packet the host forwarded to a local pod, recorded
    /// in the fast path's flow table.
    PassFlowRecorded = 38 => "pass_flow_recorded", Pass;
    /// On the pod bridge's egress: nothing recorded, the fast path is off.
    PassFastPathOff = 39 => "pass_fast_path_off", Pass;
    /// Decapsulated and handed to the host stack: a remote pod's packet for this node's
    /// own address (a reply to a flow the host masqueraded to it), which the host's
    /// connection tracking translates back.
    DecapsulatedToNode = 40 => "decapsulated_to_node", Forward;
    /// For a remote pod subnet whose node is reached directly (`Backend.DirectRouting`,
    /// `ROUTE_DIRECT`), or for that node's own address: not encapsulated; the host
    /// routes it to that node as it is. On the pod bridge's egress, from such a
    /// subnet: not recorded, since the fast path never takes what arrives plain.
    PassDirectRoute = 41 => "pass_direct_route", Pass;
    }
}

numbered! {
    /// Masquerade events that are not packet outcomes (a packet can cause several).
    pub enum NatEvent {
        /// A translated flow was created.
        FlowCreated = 0 => "flow_created";
        /// A candidate port was taken; another one was tried.
        PortCollision = 1 => "port_collision";
        /// An ICMP error about a translated flow was translated (RFC 5508).
        IcmpErrorTranslated = 2 => "icmp_error_translated";
    }
}

/// Slots per hook in the `COUNTERS` map: room for reasons to come, so that adding one
/// does not change the map's layout (and an upgrade keeps the pinned maps).
pub const REASON_SLOTS: u32 = 64;
const _: () = assert!(Reason::COUNT <= REASON_SLOTS);

/// Number of slots in the `COUNTERS` map.
pub const COUNTER_SLOTS: u32 = Hook::ALL.len() as u32 * REASON_SLOTS;

/// Slots in the `NAT_EVENTS` map, likewise with room to grow.
pub const NAT_EVENT_SLOTS: u32 = 16;
const _: () = assert!(NatEvent::COUNT <= NAT_EVENT_SLOTS);

/// Slot of (hook, reason) in the `COUNTERS` map.
pub const fn index(hook: Hook, reason: Reason) -> u32 {
    hook as u32 * REASON_SLOTS + reason as u32
}

/// Value of a `COUNTERS` slot (per CPU; the agent sums).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]` of two `u64`s: no padding, and any bit pattern is valid.
unsafe impl aya::Pod for Counter {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers as released: a pinned counter slot means the same reason after an
    /// upgrade. Append; never edit a line.
    const RELEASED_REASONS: [&str; 42] = [
        "0 encapsulated",
        "1 encapsulated_neigh_resolve",
        "2 decapsulated",
        "3 decapsulated_to_stack",
        "4 frag_needed_sent",
        "5 masqueraded",
        "6 unmasqueraded",
        "7 unmasqueraded_to_pod",
        "8 pass_not_ipv4",
        "9 pass_not_overlay",
        "10 pass_not_tunnel",
        "11 pass_tunnelled",
        "12 pass_ip_options",
        "13 pass_fragment",
        "14 pass_ttl_expired",
        "15 pass_fragmentation_needed",
        "16 pass_not_configured",
        "17 pass_foreign_source",
        "18 drop_malformed",
        "19 drop_unknown_peer",
        "20 drop_not_for_this_node",
        "21 drop_nested_tunnel",
        "22 drop_outer_fragment",
        "23 drop_outer_options",
        "24 drop_ce_on_not_ect",
        "25 drop_too_big",
        "26 drop_no_route_to_peer",
        "27 drop_helper_error",
        "28 drop_nat_table_full",
        "29 drop_nat_ports_exhausted",
        "30 drop_nat_fragment",
        "31 drop_nat_unsupported",
        "32 masqueraded_to_uplink",
        "33 pass_not_for_gateway",
        "34 decapsulated_to_bridge",
        "35 unmasqueraded_to_bridge",
        "36 pass_to_host",
        "37 decapsulated_to_host",
        "38 pass_flow_recorded",
        "39 pass_fast_path_off",
        "40 decapsulated_to_node",
        "41 pass_direct_route",
    ];
    const RELEASED_NAT_EVENTS: [&str; 3] = [
        "0 flow_created",
        "1 port_collision",
        "2 icmp_error_translated",
    ];

    #[test]
    fn released_numbers_keep_their_meaning() {
        for released in RELEASED_REASONS {
            let (n, name) = released.split_once(' ').unwrap();
            let r = Reason::from_u32(n.parse().unwrap()).expect(released);
            assert_eq!(r.name(), name, "reason {n} changed its meaning");
        }
        for released in RELEASED_NAT_EVENTS {
            let (n, name) = released.split_once(' ').unwrap();
            let e = NatEvent::from_u32(n.parse().unwrap()).expect(released);
            assert_eq!(e.name(), name, "NAT event {n} changed its meaning");
        }
    }

    #[test]
    fn reasons_are_dense_and_named_once() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?} out of order");
            assert_eq!(Reason::from_u32(i as u32), Some(*r));
        }
        assert_eq!(Reason::from_u32(Reason::COUNT), None);
        for (i, e) in NatEvent::ALL.iter().enumerate() {
            assert_eq!(*e as usize, i, "{e:?} out of order");
        }
        for (i, a) in Reason::ALL.iter().enumerate() {
            for b in &Reason::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }

    #[test]
    fn kinds_follow_name_prefixes() {
        for r in Reason::ALL {
            let expected = if r.name().starts_with("drop_") {
                Kind::Drop
            } else if r.name().starts_with("pass_") {
                Kind::Pass
            } else {
                Kind::Forward
            };
            assert_eq!(r.kind(), expected, "{r:?}");
        }
    }

    #[test]
    fn slots_do_not_overlap() {
        let mut seen = [false; COUNTER_SLOTS as usize];
        for h in Hook::ALL {
            for r in Reason::ALL {
                let i = index(h, r) as usize;
                assert!(!seen[i]);
                seen[i] = true;
            }
        }
        assert_eq!(
            seen.iter().filter(|s| **s).count(),
            Hook::ALL.len() * Reason::ALL.len()
        );
    }
}
