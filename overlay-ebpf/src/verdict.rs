//! What a program decides for a packet: an outcome (`Reason`, the counter it lands in)
//! and the TC action that realises it.

use aya_ebpf::bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC};
use overlay_common::Reason;

/// An outcome and the TC action that realises it.
pub(crate) type Verdict = (Reason, i32);

/// Leave the packet to the kernel. TC_ACT_UNSPEC (TCX_NEXT) rather than TC_ACT_OK:
/// the filters and TCX programs after ours on the same hook (someone's monitoring,
/// shaping or firewall) still see it; TC_ACT_OK would end the hook's chain here.
#[inline(always)]
pub(crate) fn pass(reason: Reason) -> Verdict {
    (reason, TC_ACT_UNSPEC)
}

#[inline(always)]
pub(crate) fn drop(reason: Reason) -> Verdict {
    (reason, TC_ACT_SHOT)
}

/// A verdict in one register, as a BPF subprogram returns it: the reason above, the
/// action below. Only [`pack`] makes one (the field is private), so [`unpack`] never
/// sees a number that is not a `Reason`'s.
#[repr(transparent)]
pub(crate) struct Packed(u64);

#[inline(always)]
pub(crate) fn pack((reason, action): Verdict) -> Packed {
    Packed((u64::from(reason as u32) << 32) | u64::from(action as u32))
}

#[inline(always)]
pub(crate) fn unpack(Packed(packed): Packed) -> Verdict {
    // SAFETY: a `Packed` comes from `pack`, whose upper half is a Reason's
    // discriminant (`Reason` is `repr(u32)`).
    let reason = unsafe { core::mem::transmute::<u32, Reason>((packed >> 32) as u32) };
    (reason, packed as u32 as i32)
}
