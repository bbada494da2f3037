//! TC programs of the IPIP overlay, one file per attach point in `hooks/`, each opening
//! with where it attaches, what it does and what it leaves to the host stack:
//!
//! - `bridge_ingress` (pod bridge, ingress): a local pod's packet of an admitted flow
//!   to a remote pod subnet is encapsulated and sent straight out of the uplink.
//! - `pod_ingress` (each local pod's veth, ingress): the same, before the bridge.
//! - `uplink_egress` (uplink, egress): what the host stack routes to a remote pod
//!   subnet is masqueraded if a rule says so, and encapsulated on its way out.
//! - `uplink_ingress` (uplink, ingress): IPIP from a known node for a local pod is
//!   decapsulated, and sent straight to the pod when its flow is admitted, else handed
//!   to the host stack; replies of masqueraded flows are translated back.
//! - `bridge_egress` (pod bridge, egress): what the host stack forwards to local pods
//!   is recorded for the fast path.
//!
//! The hooks skip the host stack only for flows the fast path admits (`flows`): the
//! host decides everything else, as it would without us. The other modules are the
//! mechanics the hooks share: headers (`parse`, `ipv4`, `checksum`), the tunnel
//! (`encap`, `decap`), routing (`fib`), masquerade (`nat`, `conntrack`), ICMP errors
//! (`icmp`), outcomes (`verdict`, `counters`) and the maps (`maps`).
#![no_std]
#![no_main]

mod checksum;
mod conntrack;
mod counters;
mod decap;
mod encap;
mod fib;
mod flows;
mod icmp;
mod ipv4;
mod maps;
mod nat;
mod parse;
mod verdict;

/// The programs, by attach point.
mod hooks {
    mod bridge_egress;
    mod bridge_ingress;
    mod pod_ingress;
    mod uplink_egress;
    mod uplink_ingress;
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL: bpf_redirect_neigh and the FIB helpers are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
