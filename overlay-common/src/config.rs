//! Per-node datapath configuration, written by the agent into the `CONFIG` array map.

use crate::{
    Reason,
    conntrack::{CtTimeouts, Rule},
    ip::{self, IPV4_HEADER_LEN},
};

/// kube-proxy's "masquerade me" mark (KUBE-MARK-MASQ): such packets are left to
/// kube-proxy's own rule, as flanneld's first masquerade rule does.
pub const KUBE_PROXY_MASQ_MARK: u32 = 0x4000;

/// `DatapathConfig::flags`: masquerade is on (flanneld `--ip-masq`).
pub const FLAG_MASQUERADE: u8 = 1 << 0;
/// `DatapathConfig::flags`: the fast path may take flows the agent admitted (see
/// [`crate::flows`]). Clear, every packet goes through the host stack.
pub const FLAG_FAST_PATH: u8 = 1 << 1;

/// Default range of translated source ports: above Linux's default ephemeral range
/// (32768-60999), so the node's own connections never pick them.
pub const NAT_PORT_MIN: u16 = 61000;
pub const NAT_PORT_MAX: u16 = 65535;

/// The single entry of the `CONFIG` map.
///
/// A zero `node_ip` means "not configured yet": the programs then pass every packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatapathConfig {
    /// This node's tunnel address: outer source of what we encapsulate, outer
    /// destination of what we accept.
    pub node_ip: [u8; 4],
    /// This node's pod subnet (network address); decapsulated packets must target it.
    pub pod_subnet: [u8; 4],
    /// The cluster's pod network (`Network` of net-conf.json).
    pub cluster_net: [u8; 4],
    /// Source address for pods talking to the outside (rule 5): the uplink's address.
    pub masq_ip: [u8; 4],
    /// Prefix length of `pod_subnet`.
    pub pod_prefix_len: u8,
    /// Prefix length of `cluster_net`.
    pub cluster_prefix_len: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    pub _pad: u8,
    /// Range of translated source ports (and ICMP identifiers), inclusive.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    pub ct_timeouts: CtTimeouts,
    /// The pod bridge's MAC address, the pods' gateway: `pod_ingress` takes only frames
    /// addressed to it. Zero while unknown.
    pub bridge_mac: [u8; 6],
    pub _pad2: [u8; 2],
    /// The host's netfilter ruleset generation as the agent last saw it: a flow is on
    /// the fast path only while the host forwarded it under this one.
    pub ruleset_gen: u32,
    pub _pad3: u32,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            node_ip: [0; 4],
            pod_subnet: [0; 4],
            cluster_net: [0; 4],
            masq_ip: [0; 4],
            pod_prefix_len: 0,
            cluster_prefix_len: 0,
            flags: 0,
            _pad: 0,
            nat_port_min: NAT_PORT_MIN,
            nat_port_max: NAT_PORT_MAX,
            ct_timeouts: CtTimeouts::DEFAULT,
            bridge_mac: [0; 6],
            _pad2: [0; 2],
            ruleset_gen: 0,
            _pad3: 0,
        }
    }
}

impl DatapathConfig {
    /// Network-order mask of the pod subnet, as a host-order `u32` for comparisons.
    pub const fn pod_mask(&self) -> u32 {
        prefix_mask(self.pod_prefix_len)
    }

    /// Whether `addr` (wire order) lies in this node's pod subnet.
    pub fn in_pod_subnet(&self, addr: [u8; 4]) -> bool {
        in_net(addr, self.pod_subnet, self.pod_prefix_len)
    }

    /// Whether `addr` lies in the cluster's pod network.
    pub fn in_cluster(&self, addr: [u8; 4]) -> bool {
        in_net(addr, self.cluster_net, self.cluster_prefix_len)
    }

    pub const fn masquerade(&self) -> bool {
        self.flags & FLAG_MASQUERADE != 0
    }

    pub const fn fast_path(&self) -> bool {
        self.flags & FLAG_FAST_PATH != 0
    }

    /// Which of flanneld's `--ip-masq` rules masquerades a packet from `src` to `dst`,
    /// and the source address it takes (rules as in `nat` of the eBPF crate: local
    /// pod to any pod, any pod to a local pod, anything to a local pod are kept; a pod
    /// to the outside takes the uplink's address; the host or the outside to a remote
    /// pod takes this node's pod gateway, or the uplink's address where `dst_direct`
    /// says `dst`'s node is routed directly, asked only then).
    ///
    /// flanneld's rule is a MASQUERADE, which takes the address of the device the
    /// packet leaves by: its tunnel device's for a tunnelled node, whose address is in
    /// this node's pod subnet (the gateway stands for it here), but the uplink's for a
    /// node DirectRouting reaches by a plain route.
    #[inline(always)]
    pub fn masquerade_rule(
        &self,
        src: [u8; 4],
        dst: [u8; 4],
        dst_direct: impl FnOnce() -> bool,
    ) -> Option<(Rule, [u8; 4])> {
        let src_pod = self.in_cluster(src);
        let dst_pod = self.in_cluster(dst);
        if self.in_pod_subnet(src) && dst_pod || self.in_pod_subnet(dst) {
            return None; // rules 2, 3 and 4
        }
        if src_pod && !is_multicast(dst) {
            return Some((Rule::PodToOutside, self.masq_ip));
        }
        // A packet from the uplink's own address is the host's: one of its sockets, or
        // its own masquerade (kube-proxy's, for NodePorts and the node's Service
        // traffic, which clears its mark before it masquerades, so only the address
        // tells). Translating it again would be a second NAT, where flanneld's rules
        // compose with the host's to one.
        if !src_pod && dst_pod && src != self.masq_ip {
            let source = if dst_direct() {
                self.masq_ip
            } else {
                self.gateway()
            };
            return Some((Rule::OutsideToRemotePod, source));
        }
        None
    }

    /// Whether a local pod's packet on the bridge may skip the host stack, judged from
    /// its IPv4 header's source, first byte (version and IHL), flags and fragment
    /// offset, and TTL; else the reason it may not. Only this node's pods (anything
    /// else meets the host's routing and reverse-path filter), and plain datagrams the
    /// fast path forwards as a router would: options, fragments and an expiring TTL
    /// are the host stack's, which routes the packet back to us through the uplink.
    #[inline(always)]
    pub fn fast_path_allows(
        &self,
        src: [u8; 4],
        vihl: u8,
        frags: [u8; 2],
        ttl: u8,
    ) -> Result<(), Reason> {
        if !self.in_pod_subnet(src) {
            return Err(Reason::PassForeignSource);
        }
        if ip::header_len(vihl) != IPV4_HEADER_LEN {
            return Err(Reason::PassIpOptions);
        }
        if ip::is_fragment(frags) {
            return Err(Reason::PassFragment);
        }
        if ttl <= 1 {
            return Err(Reason::PassTtlExpired);
        }
        Ok(())
    }

    /// Whether a packet from `src` to `dst` the host routed to the uplink belongs to a
    /// direction the fast path could take, and so is recorded (with the fast path on):
    /// a local pod's to a remote pod, or to the outside when masquerade is on. The
    /// gateway address is the host's own (its traffic to remote pods leaves from it),
    /// never a pod's.
    #[inline(always)]
    pub fn fast_path_outbound(&self, src: [u8; 4], dst: [u8; 4]) -> bool {
        self.in_pod_subnet(src)
            && src != self.gateway()
            && (self.in_cluster(dst) || self.masquerade())
    }

    /// Whether a packet from `src` to `dst` the host forwarded to a local pod came from
    /// elsewhere (a remote pod, or the outside for a masqueraded flow's reply), and so
    /// is recorded (with the fast path on): the fast path takes no flow between two
    /// local pods, which the bridge connects.
    #[inline(always)]
    pub fn fast_path_inbound(&self, src: [u8; 4], dst: [u8; 4]) -> bool {
        self.in_pod_subnet(dst) && !self.in_pod_subnet(src)
    }

    /// The pod subnet's gateway (first address): the bridge address pods route through,
    /// and the source of the ICMP errors the datapath sends them.
    pub fn gateway(&self) -> [u8; 4] {
        (u32::from_be_bytes(self.pod_subnet) & self.pod_mask())
            .wrapping_add(1)
            .to_be_bytes()
    }
}

/// Whether `addr` lies in `net/prefix_len` (all wire order).
pub fn in_net(addr: [u8; 4], net: [u8; 4], prefix_len: u8) -> bool {
    let mask = prefix_mask(prefix_len);
    u32::from_be_bytes(addr) & mask == u32::from_be_bytes(net) & mask
}

/// Whether `addr` is IPv4 multicast (224.0.0.0/4), which is never masqueraded.
pub fn is_multicast(addr: [u8; 4]) -> bool {
    addr[0] & 0xf0 == 0xe0
}

/// Host-order mask for a prefix length; lengths above 32 saturate.
pub const fn prefix_mask(prefix_len: u8) -> u32 {
    if prefix_len == 0 {
        0
    } else if prefix_len >= 32 {
        u32::MAX
    } else {
        u32::MAX << (32 - prefix_len)
    }
}

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]` of integers and byte arrays with explicit padding fields (its
// size is pinned by a test), so every byte is initialised and any bit pattern is valid.
unsafe impl aya::Pod for DatapathConfig {}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(subnet: [u8; 4], len: u8) -> DatapathConfig {
        DatapathConfig {
            node_ip: [172, 18, 0, 3],
            pod_subnet: subnet,
            pod_prefix_len: len,
            cluster_net: [10, 244, 0, 0],
            cluster_prefix_len: 16,
            ..DatapathConfig::default()
        }
    }

    #[test]
    fn layout_is_fixed() {
        assert_eq!(size_of::<DatapathConfig>(), 72);
    }

    #[test]
    fn cluster_membership_and_multicast() {
        let c = cfg([10, 244, 1, 0], 24);
        assert!(c.in_cluster([10, 244, 200, 1]));
        assert!(!c.in_cluster([10, 245, 0, 1]));
        assert!(is_multicast([224, 0, 0, 1]) && is_multicast([239, 255, 255, 250]));
        assert!(!is_multicast([223, 255, 255, 255]) && !is_multicast([240, 0, 0, 1]));
        assert!(!c.masquerade());
    }

    #[test]
    fn subnet_membership_and_gateway() {
        let c = cfg([10, 244, 1, 0], 24);
        assert!(c.in_pod_subnet([10, 244, 1, 7]));
        assert!(c.in_pod_subnet([10, 244, 1, 255]));
        assert!(!c.in_pod_subnet([10, 244, 2, 1]));
        assert_eq!(c.gateway(), [10, 244, 1, 1]);
        // A subnet written with host bits set still yields the right gateway.
        assert_eq!(cfg([10, 244, 1, 9], 24).gateway(), [10, 244, 1, 1]);
    }

    /// flanneld's `--ip-masq` rules, one case each, with this node's pod subnet
    /// 10.244.1.0/24 and uplink 172.18.0.3.
    #[test]
    fn masquerade_rules() {
        let c = DatapathConfig {
            masq_ip: [172, 18, 0, 3],
            ..cfg([10, 244, 1, 0], 24)
        };
        let (local, remote) = ([10, 244, 1, 5], [10, 244, 2, 5]);
        let (outside, host) = ([198, 51, 100, 10], [172, 18, 0, 3]);
        let cases = [
            ("2: local pod to a remote pod", local, remote, None),
            ("3: a remote pod to a local pod", remote, local, None),
            ("4: the outside to a local pod", outside, local, None),
            ("4: the host to a local pod", host, local, None),
            (
                "5: a local pod to the outside",
                local,
                outside,
                Some((Rule::PodToOutside, host)),
            ),
            (
                "5: a remote pod to the outside through this node",
                remote,
                outside,
                Some((Rule::PodToOutside, host)),
            ),
            ("5: not to multicast", local, [224, 0, 0, 251], None),
            (
                "6: the outside to a remote pod",
                outside,
                remote,
                Some((Rule::OutsideToRemotePod, [10, 244, 1, 1])),
            ),
            ("6: not the host's own address", host, remote, None),
            ("none: outside to outside", outside, [192, 0, 2, 1], None),
        ];
        for (case, src, dst, rule) in cases {
            assert_eq!(c.masquerade_rule(src, dst, || false), rule, "rule {case}");
        }
        // Rule 6 to a node DirectRouting reaches plainly: the uplink's address, as
        // MASQUERADE on the uplink gives it; the other rules do not ask.
        assert_eq!(
            c.masquerade_rule(outside, remote, || true),
            Some((Rule::OutsideToRemotePod, host))
        );
        for (src, dst) in [(local, remote), (local, outside), (host, remote)] {
            let unasked = || panic!("asked whether {dst:?} is direct");
            assert_eq!(
                c.masquerade_rule(src, dst, unasked),
                c.masquerade_rule(src, dst, || false)
            );
        }
    }

    /// The fast path's checks of a local pod's header, one failing at a time, in the
    /// order the reasons are counted.
    #[test]
    fn fast_path_takes_plain_datagrams_of_local_pods() {
        let c = cfg([10, 244, 1, 0], 24);
        let local = [10, 244, 1, 5];
        assert_eq!(c.fast_path_allows(local, 0x45, [0x40, 0], 64), Ok(()));
        assert_eq!(c.fast_path_allows(local, 0x45, [0, 0], 2), Ok(()));
        let refused = [
            ("remote pod", [10, 244, 2, 5], 0x45, [0, 0], 64),
            ("outside", [198, 51, 100, 10], 0x45, [0, 0], 64),
            ("the host first", [172, 18, 0, 3], 0x46, [0x20, 0], 1),
        ];
        for (case, src, vihl, frags, ttl) in refused {
            assert_eq!(
                c.fast_path_allows(src, vihl, frags, ttl),
                Err(Reason::PassForeignSource),
                "{case}"
            );
        }
        let checks = [
            ("options", 0x46, [0, 0], 64, Reason::PassIpOptions),
            (
                "options before fragments",
                0x4f,
                [0x20, 0],
                1,
                Reason::PassIpOptions,
            ),
            ("first fragment", 0x45, [0x20, 0], 64, Reason::PassFragment),
            ("later fragment", 0x45, [0, 1], 64, Reason::PassFragment),
            ("fragment before TTL", 0x45, [0, 1], 1, Reason::PassFragment),
            ("TTL 1", 0x45, [0, 0], 1, Reason::PassTtlExpired),
            ("TTL 0", 0x45, [0x40, 0], 0, Reason::PassTtlExpired),
        ];
        for (case, vihl, frags, ttl, reason) in checks {
            assert_eq!(
                c.fast_path_allows(local, vihl, frags, ttl),
                Err(reason),
                "{case}"
            );
        }
    }

    /// What the uplink's egress and the bridge's egress record of what the host
    /// forwarded, with this node's pod subnet 10.244.1.0/24 and uplink 172.18.0.3.
    #[test]
    fn fast_path_records_directions_between_a_local_pod_and_elsewhere() {
        let plain = cfg([10, 244, 1, 0], 24);
        let masq = DatapathConfig {
            flags: FLAG_MASQUERADE,
            ..plain
        };
        let (local, other_local, remote) = ([10, 244, 1, 5], [10, 244, 1, 6], [10, 244, 2, 5]);
        let (outside, gateway) = ([198, 51, 100, 10], [10, 244, 1, 1]);
        let outbound = [
            ("local pod to remote pod", local, remote, true, true),
            ("local pod to the outside", local, outside, false, true),
            (
                "the gateway (the host) to a remote pod",
                gateway,
                remote,
                false,
                false,
            ),
            (
                "a remote pod's, routed through",
                remote,
                outside,
                false,
                false,
            ),
            ("the outside's", outside, remote, false, false),
        ];
        for (case, src, dst, without, with) in outbound {
            assert_eq!(plain.fast_path_outbound(src, dst), without, "{case}");
            assert_eq!(
                masq.fast_path_outbound(src, dst),
                with,
                "{case}, masquerade"
            );
        }
        let inbound = [
            ("remote pod to local pod", remote, local, true),
            ("the outside to a local pod", outside, local, true),
            ("local pod to local pod", other_local, local, false),
            ("the gateway to a local pod", gateway, local, false),
            ("to a remote pod", outside, remote, false),
        ];
        for (case, src, dst, recorded) in inbound {
            assert_eq!(plain.fast_path_inbound(src, dst), recorded, "{case}");
        }
    }

    #[test]
    fn masks() {
        assert_eq!(prefix_mask(0), 0);
        assert_eq!(prefix_mask(8), 0xff00_0000);
        assert_eq!(prefix_mask(32), u32::MAX);
        assert_eq!(prefix_mask(40), u32::MAX);
    }
}
