//! TC programs of the IPIP overlay.
//!
//! Packet path (see README):
//! - `bridge_ingress` (pod bridge, ingress): a local pod's packet of an admitted flow
//!   to a remote pod subnet is encapsulated and sent straight out of the uplink.
//! - `pod_ingress` (each local pod's veth, ingress): the same, before the bridge; the
//!   agent attaches it to the veths nobody else filters.
//! - `uplink_egress` (uplink, egress): what the host stack routes to a remote pod
//!   subnet (every flow the fast path does not take, host -> pod, service traffic) is
//!   encapsulated on its way out.
//! - `uplink_ingress` (uplink, ingress): IPIP from a known node for a local pod is
//!   decapsulated, and sent straight to the pod when its flow is admitted, else handed
//!   to the host stack.
//! - `bridge_egress` (pod bridge, egress): what the host stack forwards to local pods
//!   is recorded for the fast path.
//! - Masquerade (`nat`) translates on the uplink's egress and back on its ingress.
//!
//! The ingress programs skip the host stack only for flows the fast path admits
//! (`flows`): the host decides everything else, as it would without us.
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

#[classifier]
pub fn bridge_egress(ctx: TcContext) -> i32 {
    flows::to_local_pods(&ctx)
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
