//! Outcome accounting: every program run ends in exactly one `count`.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use overlay_common::{
    Hook, Reason,
    counters::{NatEvent, index},
};

use crate::maps::{COUNTERS, NAT_EVENTS};

/// An outcome and the TC action that realises it.
pub type Verdict = (Reason, i32);

/// Leave the packet to the kernel, unchanged.
#[inline(always)]
pub fn pass(reason: Reason) -> Verdict {
    (reason, TC_ACT_OK as i32)
}

#[inline(always)]
pub fn drop(reason: Reason) -> Verdict {
    (reason, TC_ACT_SHOT as i32)
}

/// Records the verdict of one packet of `bytes` bytes and returns its action.
#[inline(always)]
pub fn account(hook: Hook, bytes: u32, (reason, action): Verdict) -> i32 {
    if let Some(c) = COUNTERS.get_ptr_mut(index(hook, reason)) {
        // Per-CPU slot: no other writer can race with this update.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(bytes);
        }
    }
    action
}

/// Runs `f` and accounts its verdict against the packet's length on entry.
#[inline(always)]
pub fn run(ctx: &TcContext, hook: Hook, f: impl FnOnce(&TcContext) -> Verdict) -> i32 {
    let bytes = ctx.len();
    account(hook, bytes, f(ctx))
}

/// Records a masquerade event.
#[inline(always)]
pub fn nat_event(event: NatEvent) {
    if let Some(c) = NAT_EVENTS.get_ptr_mut(event as u32) {
        unsafe { *c += 1 };
    }
}
