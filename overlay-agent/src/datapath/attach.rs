//! Attaching programs to interfaces: TCX where the kernel has it (6.6+), otherwise a
//! clsact qdisc with a cls_bpf filter (aya picks).

use anyhow::{Context as _, Result, bail};
use aya::programs::{
    SchedClassifier, TcAttachType,
    tc::{self, SchedClassifierLinkId},
};
use aya::util::KernelVersion;
use overlay_common::Hook;
use tracing::{debug, warn};

use crate::host::ifindex_by_name;

/// One program attached to one interface.
#[derive(Debug)]
pub struct Attachment {
    pub hook: Hook,
    pub iface: String,
    pub ifindex: u32,
    link: SchedClassifierLinkId,
}

fn attach_type(hook: Hook) -> TcAttachType {
    match hook {
        Hook::BridgeIngress | Hook::UplinkIngress => TcAttachType::Ingress,
        Hook::UplinkEgress => TcAttachType::Egress,
    }
}

impl Attachment {
    pub(super) fn new(prog: &mut SchedClassifier, hook: Hook, iface: &str) -> Result<Self> {
        let Some(ifindex) = ifindex_by_name(iface) else {
            bail!("interface {iface} does not exist in this network namespace");
        };
        // Only the legacy (pre-TCX) path needs the qdisc; it may exist already.
        if KernelVersion::current().is_ok_and(|v| v < KernelVersion::new(6, 6, 0))
            && let Err(e) = tc::qdisc_add_clsact(iface)
        {
            debug!(iface, error = %e, "clsact qdisc not added (may exist)");
        }
        let link = prog
            .attach(iface, attach_type(hook))
            .with_context(|| format!("attaching {} to {iface}", hook.program()))?;
        Ok(Self {
            hook,
            iface: iface.to_owned(),
            ifindex,
            link,
        })
    }

    pub(super) fn detach(self, prog: &mut SchedClassifier) {
        if let Err(e) = prog.detach(self.link) {
            warn!(iface = self.iface, program = self.hook.program(), error = %e, "detach failed (device gone?)");
        }
    }
}
