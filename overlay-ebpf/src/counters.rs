//! Outcome accounting: every program run ends in exactly one `account`, and drops are
//! logged (aya-log) when the agent turned program logging up to debug; per-peer and
//! masquerade event counts.

use aya_ebpf::programs::TcContext;
use aya_log_ebpf::{
    debug,
    macro_support::{Level, level_enabled},
};
use overlay_common::{
    Hook, PeerStats, Reason,
    counters::{Kind, NatEvent, index},
};

use crate::{
    maps::{COUNTERS, NAT_EVENTS},
    parse::{ETH_LEN, load_exact},
    verdict::Verdict,
};

const ETH_P_IP: u16 = 0x0800;
// Offsets in an Ethernet + IPv4 frame.
const IP_PROTO: usize = ETH_LEN + 9;
const IP_SRC: usize = ETH_LEN + 12;
const IP_DST: usize = ETH_LEN + 16;

/// Records the verdict of one packet of `bytes` bytes and returns its action.
#[inline(always)]
pub(crate) fn account(hook: Hook, bytes: u32, (reason, action): Verdict) -> i32 {
    if let Some(c) = COUNTERS.get_ptr_mut(index(hook, reason)) {
        // SAFETY: this CPU's value of a per-CPU array, valid and aligned while the
        // program runs; no other writer can race with this update.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(bytes);
        }
    }
    action
}

/// Runs `f` and accounts its verdict against the packet's length on entry.
#[inline(always)]
pub(crate) fn run(ctx: &TcContext, hook: Hook, f: impl FnOnce(&TcContext) -> Verdict) -> i32 {
    let bytes = ctx.len();
    let verdict = f(ctx);
    // The level is a read-only global the agent sets at load (AYA_LOG_LEVEL, frozen),
    // so with logging off the verifier sees a constant and prunes the whole branch.
    // The macro makes the same check, but only around its own formatting: the header
    // read below must not run either when logging is off.
    if level_enabled(Level::Debug) && verdict.0.kind() == Kind::Drop {
        log_drop(ctx, hook, verdict.0);
    }
    account(hook, bytes, verdict)
}

/// Logs a dropped packet with the addresses of its IPv4 header as the program left it
/// (the outer header for tunnelled packets). A copy, not `parse::frame`: logging must
/// not reshape the packet (pull data) on its way out. Not inlined: the record is built
/// on this function's own stack frame, not on the programs' (512 bytes in all). Kernels
/// before 6.4 count each frame of the deepest call chain rounded up to 32 bytes, at
/// least 32: the program's frame + this one + the memcpy it calls must stay within
/// 512 there (hence the subprograms of `icmp`, `nat::outbound` and `uplink_egress`), and only
/// the bytes logged are copied, the EtherType read from the context.
#[inline(never)]
fn log_drop(ctx: &TcContext, hook: Hook, reason: Reason) {
    // The EtherType from the context (no copy on the stack): `protocol` is in network
    // byte order.
    // SAFETY: `ctx.skb.skb` is the `__sk_buff` the kernel passed this run, readable
    // while it lasts.
    let ipv4 = unsafe { (*ctx.skb.skb).protocol } == u32::from(ETH_P_IP.to_be());
    // Protocol, checksum, source, destination.
    let mut ip = [0u8; IP_DST + 4 - IP_PROTO];
    if ipv4 && load_exact(ctx, IP_PROTO, &mut ip) {
        let addr = |at: usize| {
            let at = at - IP_PROTO;
            [ip[at], ip[at + 1], ip[at + 2], ip[at + 3]]
        };
        let (src, dst) = (addr(IP_SRC), addr(IP_DST));
        debug!(
            ctx,
            "{} dropped {}: {:i} -> {:i} proto {}",
            hook.name(),
            reason.name(),
            src,
            dst,
            ip[0]
        );
    } else {
        debug!(
            ctx,
            "{} dropped {}: no IPv4 header",
            hook.name(),
            reason.name()
        );
    }
}

/// Records a masquerade event.
#[inline(always)]
pub(crate) fn nat_event(event: NatEvent) {
    if let Some(c) = NAT_EVENTS.get_ptr_mut(event as u32) {
        // SAFETY: as in `account`: this CPU's value of a per-CPU array.
        unsafe { *c += 1 };
    }
}

/// Counts a packet of `bytes` bytes received from a peer node.
#[inline(always)]
pub(crate) fn peer_received(peer: *mut PeerStats, bytes: u32) {
    // SAFETY: `peer` points to this CPU's value of a per-CPU map, valid while the
    // program runs, and no other writer can race with this update.
    unsafe {
        (*peer).rx_packets += 1;
        (*peer).rx_bytes += u64::from(bytes);
    }
}
