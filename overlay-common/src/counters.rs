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

    /// Name of the program attached at this hook, as in the object file.
    pub const fn program(self) -> &'static str {
        match self {
            Hook::BridgeIngress => "bridge_ingress",
            Hook::UplinkIngress => "uplink_ingress",
            Hook::UplinkEgress => "uplink_egress",
            Hook::PodIngress => "pod_ingress",
            Hook::BridgeEgress => "bridge_egress",
        }
    }
}

/// What happened to a packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Encapsulated and sent to the peer with a resolved next hop.
    Encapsulated = 0,
    /// Encapsulated; the next hop's neighbour entry was missing, so the kernel resolves
    /// it (`bpf_redirect_neigh`).
    EncapsulatedNeighResolve,
    /// Decapsulated and sent straight to the pod (into its namespace, past the bridge).
    Decapsulated,
    /// Decapsulated and handed to the host stack (local destination, TTL about to
    /// expire, or no resolved path to the pod).
    DecapsulatedToStack,
    /// Too big for the uplink after encapsulation with DF set: answered with ICMP
    /// fragmentation-needed.
    FragNeededSent,
    /// Source translated (masquerade) and sent on unencapsulated.
    Masqueraded,
    /// A reply translated back to the flow's original source, handed to the stack.
    Unmasqueraded,
    /// A reply translated back to a pod of this node and sent straight to it.
    UnmasqueradedToPod,

    /// Not IPv4 (ARP, IPv6, VLAN, ...): not ours.
    PassNotIpv4,
    /// IPv4 whose destination is no remote pod subnet.
    PassNotOverlay,
    /// On the uplink: not IPIP addressed to this node.
    PassNotTunnel,
    /// On the uplink egress: already IPIP (our own encapsulated packets leaving).
    PassTunnelled,
    /// Carries IP options: left to the host stack, whose route sends it through the
    /// uplink egress program.
    PassIpOptions,
    /// An IP fragment: left to the host stack (same path as options).
    PassFragment,
    /// TTL would expire here: the host stack sends time-exceeded.
    PassTtlExpired,
    /// Too big for the uplink after encapsulation, DF clear: the host stack fragments.
    PassFragmentationNeeded,
    /// The agent has not configured this node yet.
    PassNotConfigured,
    /// From the pod bridge with a source outside this node's pod subnet: left to the
    /// host stack (and its reverse-path filter) rather than tunnelled blindly.
    PassForeignSource,

    /// Truncated or inconsistent headers, or a bad outer header checksum.
    DropMalformed,
    /// IPIP from an address that is not a known node (spoofing; flannel issue #961).
    DropUnknownPeer,
    /// IPIP whose inner destination is neither in this node's pod subnet nor this
    /// node's own address.
    DropNotForThisNode,
    /// IPIP inside IPIP.
    DropNestedTunnel,
    /// Fragmented IPIP: cannot be decapsulated without reassembly.
    DropOuterFragment,
    /// IPIP with outer IP options: our peers never send them.
    DropOuterOptions,
    /// Outer header marked CE around a packet that is not ECN-capable (RFC 6040).
    DropCeOnNotEct,
    /// Would leave the uplink oversized where no ICMP or fragmentation is possible.
    DropTooBig,
    /// The FIB has no usable route to the peer node.
    DropNoRouteToPeer,
    /// A kernel helper failed while rewriting the packet.
    DropHelperError,
    /// Masquerade needed a new flow but the connection table is full.
    DropNatTableFull,
    /// Masquerade found no free port in the configured range.
    DropNatPortsExhausted,
    /// A fragment of a flow to masquerade: without reassembly its ports are unknown.
    DropNatFragment,
    /// A protocol (or ICMP type) masquerade cannot translate.
    DropNatUnsupported,

    // Reasons added later go last, so that pinned counters keep their slots.
    /// A local pod's packet of a masqueraded flow, translated on the bridge and sent
    /// straight out of the uplink.
    MasqueradedToUplink,
    /// On a pod's veth: a frame not addressed to the bridge (for another pod of this
    /// node), or the agent has not told the programs the bridge's address yet; the
    /// bridge delivers it as it would without us.
    PassNotForGateway,
    /// Decapsulated and handed to the pod bridge, which delivers it: the agent does not
    /// know the pod's port on the bridge yet (a pod that has just started), or the
    /// route's device is not the bridge the pod hangs on.
    DecapsulatedToBridge,
    /// A reply translated back to a pod of this node, handed to the pod bridge (as
    /// `DecapsulatedToBridge`).
    UnmasqueradedToBridge,
    /// From a local pod to a remote pod or the outside, of a flow not on the fast path:
    /// the host stack routes it (its netfilter and connection tracking decide), and
    /// `uplink_egress` then encapsulates or masquerades it.
    PassToHost,
    /// Decapsulated and handed to the host stack, which forwards it to the pod: its
    /// flow is not on the fast path.
    DecapsulatedToHost,
    /// On the pod bridge's egress: a packet the host forwarded to a local pod, recorded
    /// in the fast path's flow table.
    PassFlowRecorded,
    /// On the pod bridge's egress: nothing recorded, the fast path is off.
    PassFastPathOff,
    /// Decapsulated and handed to the host stack: a remote pod's packet for this node's
    /// own address (a reply to a flow the host masqueraded to it), which the host's
    /// connection tracking translates back.
    DecapsulatedToNode,
    /// For a remote pod subnet whose node is reached directly (`Backend.DirectRouting`,
    /// `ROUTE_DIRECT`): not encapsulated; the host routes it to that node as it is.
    PassDirectRoute,
}

/// How a reason reads for an operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Forward,
    Pass,
    Drop,
}

impl Reason {
    pub const COUNT: u32 = Reason::PassDirectRoute as u32 + 1;

    pub const ALL: [Reason; Reason::COUNT as usize] = [
        Reason::Encapsulated,
        Reason::EncapsulatedNeighResolve,
        Reason::Decapsulated,
        Reason::DecapsulatedToStack,
        Reason::FragNeededSent,
        Reason::Masqueraded,
        Reason::Unmasqueraded,
        Reason::UnmasqueradedToPod,
        Reason::PassNotIpv4,
        Reason::PassNotOverlay,
        Reason::PassNotTunnel,
        Reason::PassTunnelled,
        Reason::PassIpOptions,
        Reason::PassFragment,
        Reason::PassTtlExpired,
        Reason::PassFragmentationNeeded,
        Reason::PassNotConfigured,
        Reason::PassForeignSource,
        Reason::DropMalformed,
        Reason::DropUnknownPeer,
        Reason::DropNotForThisNode,
        Reason::DropNestedTunnel,
        Reason::DropOuterFragment,
        Reason::DropOuterOptions,
        Reason::DropCeOnNotEct,
        Reason::DropTooBig,
        Reason::DropNoRouteToPeer,
        Reason::DropHelperError,
        Reason::DropNatTableFull,
        Reason::DropNatPortsExhausted,
        Reason::DropNatFragment,
        Reason::DropNatUnsupported,
        Reason::MasqueradedToUplink,
        Reason::PassNotForGateway,
        Reason::DecapsulatedToBridge,
        Reason::UnmasqueradedToBridge,
        Reason::PassToHost,
        Reason::DecapsulatedToHost,
        Reason::PassFlowRecorded,
        Reason::PassFastPathOff,
        Reason::DecapsulatedToNode,
        Reason::PassDirectRoute,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Reason::Encapsulated => "encapsulated",
            Reason::EncapsulatedNeighResolve => "encapsulated_neigh_resolve",
            Reason::Decapsulated => "decapsulated",
            Reason::DecapsulatedToStack => "decapsulated_to_stack",
            Reason::FragNeededSent => "frag_needed_sent",
            Reason::Masqueraded => "masqueraded",
            Reason::Unmasqueraded => "unmasqueraded",
            Reason::UnmasqueradedToPod => "unmasqueraded_to_pod",
            Reason::PassNotIpv4 => "pass_not_ipv4",
            Reason::PassNotOverlay => "pass_not_overlay",
            Reason::PassNotTunnel => "pass_not_tunnel",
            Reason::PassTunnelled => "pass_tunnelled",
            Reason::PassIpOptions => "pass_ip_options",
            Reason::PassFragment => "pass_fragment",
            Reason::PassTtlExpired => "pass_ttl_expired",
            Reason::PassFragmentationNeeded => "pass_fragmentation_needed",
            Reason::PassNotConfigured => "pass_not_configured",
            Reason::PassForeignSource => "pass_foreign_source",
            Reason::DropMalformed => "drop_malformed",
            Reason::DropUnknownPeer => "drop_unknown_peer",
            Reason::DropNotForThisNode => "drop_not_for_this_node",
            Reason::DropNestedTunnel => "drop_nested_tunnel",
            Reason::DropOuterFragment => "drop_outer_fragment",
            Reason::DropOuterOptions => "drop_outer_options",
            Reason::DropCeOnNotEct => "drop_ce_on_not_ect",
            Reason::DropTooBig => "drop_too_big",
            Reason::DropNoRouteToPeer => "drop_no_route_to_peer",
            Reason::DropHelperError => "drop_helper_error",
            Reason::DropNatTableFull => "drop_nat_table_full",
            Reason::DropNatPortsExhausted => "drop_nat_ports_exhausted",
            Reason::DropNatFragment => "drop_nat_fragment",
            Reason::DropNatUnsupported => "drop_nat_unsupported",
            Reason::MasqueradedToUplink => "masqueraded_to_uplink",
            Reason::PassNotForGateway => "pass_not_for_gateway",
            Reason::DecapsulatedToBridge => "decapsulated_to_bridge",
            Reason::UnmasqueradedToBridge => "unmasqueraded_to_bridge",
            Reason::PassToHost => "pass_to_host",
            Reason::DecapsulatedToHost => "decapsulated_to_host",
            Reason::PassFlowRecorded => "pass_flow_recorded",
            Reason::PassFastPathOff => "pass_fast_path_off",
            Reason::DecapsulatedToNode => "decapsulated_to_node",
            Reason::PassDirectRoute => "pass_direct_route",
        }
    }

    /// Every reason is listed (no wildcard): a new one must be classified here.
    pub const fn kind(self) -> Kind {
        match self {
            Reason::Encapsulated
            | Reason::EncapsulatedNeighResolve
            | Reason::Decapsulated
            | Reason::DecapsulatedToStack
            | Reason::FragNeededSent
            | Reason::Masqueraded
            | Reason::Unmasqueraded
            | Reason::UnmasqueradedToPod
            | Reason::MasqueradedToUplink
            | Reason::DecapsulatedToBridge
            | Reason::UnmasqueradedToBridge
            | Reason::DecapsulatedToHost
            | Reason::DecapsulatedToNode => Kind::Forward,
            Reason::PassNotIpv4
            | Reason::PassNotOverlay
            | Reason::PassNotTunnel
            | Reason::PassTunnelled
            | Reason::PassIpOptions
            | Reason::PassFragment
            | Reason::PassTtlExpired
            | Reason::PassFragmentationNeeded
            | Reason::PassNotConfigured
            | Reason::PassForeignSource
            | Reason::PassNotForGateway
            | Reason::PassToHost
            | Reason::PassFlowRecorded
            | Reason::PassFastPathOff
            | Reason::PassDirectRoute => Kind::Pass,
            Reason::DropMalformed
            | Reason::DropUnknownPeer
            | Reason::DropNotForThisNode
            | Reason::DropNestedTunnel
            | Reason::DropOuterFragment
            | Reason::DropOuterOptions
            | Reason::DropCeOnNotEct
            | Reason::DropTooBig
            | Reason::DropNoRouteToPeer
            | Reason::DropHelperError
            | Reason::DropNatTableFull
            | Reason::DropNatPortsExhausted
            | Reason::DropNatFragment
            | Reason::DropNatUnsupported => Kind::Drop,
        }
    }
}

/// Masquerade events that are not packet outcomes (a packet can cause several).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NatEvent {
    /// A translated flow was created.
    FlowCreated = 0,
    /// A candidate port was taken; another one was tried.
    PortCollision,
    /// An ICMP error about a translated flow was translated (RFC 5508).
    IcmpErrorTranslated,
}

impl NatEvent {
    pub const COUNT: u32 = NatEvent::IcmpErrorTranslated as u32 + 1;
    pub const ALL: [NatEvent; NatEvent::COUNT as usize] = [
        NatEvent::FlowCreated,
        NatEvent::PortCollision,
        NatEvent::IcmpErrorTranslated,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            NatEvent::FlowCreated => "flow_created",
            NatEvent::PortCollision => "port_collision",
            NatEvent::IcmpErrorTranslated => "icmp_error_translated",
        }
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
unsafe impl aya::Pod for Counter {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_dense_and_named_once() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?} out of order");
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
