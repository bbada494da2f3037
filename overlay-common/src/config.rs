//! Per-node datapath configuration, written by the agent into the `CONFIG` array map.

/// The single entry of the `CONFIG` map.
///
/// A zero `node_ip` means "not configured yet": the programs then pass every packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// This node's tunnel address: outer source of what we encapsulate, outer
    /// destination of what we accept.
    pub node_ip: [u8; 4],
    /// This node's pod subnet (network address); decapsulated packets must target it.
    pub pod_subnet: [u8; 4],
    /// Prefix length of `pod_subnet`.
    pub pod_prefix_len: u8,
    pub _pad: [u8; 3],
}

impl DatapathConfig {
    /// Network-order mask of the pod subnet, as a host-order `u32` for comparisons.
    pub const fn pod_mask(&self) -> u32 {
        prefix_mask(self.pod_prefix_len)
    }

    /// Whether `addr` (wire order) lies in this node's pod subnet.
    pub fn in_pod_subnet(&self, addr: [u8; 4]) -> bool {
        let mask = self.pod_mask();
        u32::from_be_bytes(addr) & mask == u32::from_be_bytes(self.pod_subnet) & mask
    }

    /// The pod subnet's gateway (first address): the bridge address pods route through,
    /// and the source of the ICMP errors the datapath sends them.
    pub fn gateway(&self) -> [u8; 4] {
        (u32::from_be_bytes(self.pod_subnet) & self.pod_mask())
            .wrapping_add(1)
            .to_be_bytes()
    }
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
unsafe impl aya::Pod for DatapathConfig {}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(subnet: [u8; 4], len: u8) -> DatapathConfig {
        DatapathConfig { node_ip: [172, 18, 0, 3], pod_subnet: subnet, pod_prefix_len: len, _pad: [0; 3] }
    }

    #[test]
    fn layout_is_fixed() {
        assert_eq!(core::mem::size_of::<DatapathConfig>(), 12);
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

    #[test]
    fn masks() {
        assert_eq!(prefix_mask(0), 0);
        assert_eq!(prefix_mask(8), 0xff00_0000);
        assert_eq!(prefix_mask(32), u32::MAX);
        assert_eq!(prefix_mask(40), u32::MAX);
    }
}
