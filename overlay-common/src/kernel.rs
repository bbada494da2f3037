//! What the running kernel offers the datapath, decided once for the agent and the
//! lab alike.

use aya::util::KernelVersion;

/// Whether programs attach through TCX links (6.6+) rather than cls_bpf filters.
pub fn has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}
