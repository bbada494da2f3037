//! TC programs of the IPIP overlay.
//!
//! Packet path (see README):
//! - `bridge_ingress` (pod bridge, ingress): a local pod's packet for a remote pod
//!   subnet is encapsulated and sent straight out of the uplink.
//! - `pod_ingress` (each local pod's veth, ingress): the same, before the bridge; the
//!   agent attaches it to the veths nobody else filters.
//! - `uplink_egress` (uplink, egress): what the host stack itself routes to a remote pod
//!   subnet (host -> pod, slow-path packets, service traffic) is encapsulated on its way out.
//! - `uplink_ingress` (uplink, ingress): IPIP from a known node for a local pod is
//!   decapsulated and sent straight to the pod.
//! - Masquerade (`nat`) translates on the uplink's egress and back on its ingress.
#![no_std]
#![no_main]

mod checksum;
mod conntrack;
mod counters;
mod decap;
mod encap;
mod fib;
mod icmp;
mod ipv4;
mod maps;
mod nat;
mod parse;

use aya_ebpf::{macros::classifier, programs::TcContext};

#[classifier]
pub fn bridge_ingress(ctx: TcContext) -> i32 {
    encap::from_bridge(&ctx)
}

#[classifier]
pub fn pod_ingress(ctx: TcContext) -> i32 {
    encap::from_pod(&ctx)
}

#[classifier]
pub fn uplink_egress(ctx: TcContext) -> i32 {
    encap::from_host(&ctx)
}

#[classifier]
pub fn uplink_ingress(ctx: TcContext) -> i32 {
    decap::from_uplink(&ctx)
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
