//! Attaching programs to interfaces.
//!
//! With TCX (kernel 6.6+) an attachment is a BPF link. When the agent pins its maps it
//! pins the links too: a program then stays attached when the agent exits or dies,
//! and the next agent (the same build or another) swaps its program into that same
//! link with `bpf_link_update`, atomically, so that no packet meets an empty hook.
//! Without TCX, aya falls back to a clsact qdisc with a cls_bpf filter.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use aya::{
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink, SchedClassifierLinkId},
    },
    util::KernelVersion,
};
use overlay_common::Hook;
use tracing::{debug, info, warn};

use crate::{bpffs, host::ifindex_by_name};

/// One program attached to one interface.
#[derive(Debug)]
pub struct Attachment {
    pub hook: Hook,
    pub iface: String,
    pub ifindex: u32,
    handle: Handle,
}

#[derive(Debug)]
enum Handle {
    /// Held by the loaded program: detached when the agent lets go of it.
    Owned(SchedClassifierLinkId),
    /// Pinned in bpffs: attached until the pin is removed.
    Pinned(PathBuf),
}

fn attach_type(hook: Hook) -> TcAttachType {
    match hook {
        Hook::BridgeIngress | Hook::UplinkIngress => TcAttachType::Ingress,
        Hook::UplinkEgress => TcAttachType::Egress,
    }
}

fn has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// Where `hook`'s link is pinned under a layout version's directory.
pub fn link_pin(version_dir: &Path, hook: Hook) -> PathBuf {
    version_dir.join("links").join(hook.program())
}

impl Attachment {
    /// Attaches `prog` at `hook` on `iface`, taking over the link an earlier run left
    /// there if any. With `pin_dir` (and TCX) the link is pinned under it.
    pub(super) fn new(
        prog: &mut SchedClassifier,
        hook: Hook,
        iface: &str,
        pin_dir: Option<&Path>,
    ) -> Result<Self> {
        let Some(ifindex) = ifindex_by_name(iface) else {
            bail!("interface {iface} does not exist in this network namespace");
        };
        let pin_dir = pin_dir.filter(|_| has_tcx());
        let adopted = match pin_dir {
            Some(dir) => adopt(dir, hook, iface)?,
            None => None,
        };
        let replaced = adopted.is_some();
        let link_id = match adopted {
            Some(link) => prog.attach_to_link(link).with_context(|| {
                format!(
                    "replacing the program of {}'s link on {iface}",
                    hook.program()
                )
            })?,
            None => {
                // Only the legacy (pre-TCX) path needs the qdisc; it may exist already.
                if !has_tcx()
                    && let Err(e) = tc::qdisc_add_clsact(iface)
                {
                    debug!(iface, error = %e, "clsact qdisc not added (may exist)");
                }
                prog.attach(iface, attach_type(hook))
                    .with_context(|| format!("attaching {} to {iface}", hook.program()))?
            }
        };
        let handle = match pin_dir {
            Some(dir) => {
                let path = link_pin(dir, hook);
                let link: FdLink = prog.take_link(link_id)?.try_into()?;
                std::fs::create_dir_all(path.parent().expect("link pins live in a directory"))?;
                // Dropping the pinned handle closes our descriptor; the pin keeps the link.
                link.pin(&path)
                    .with_context(|| format!("pinning the link at {}", path.display()))?;
                Handle::Pinned(path)
            }
            None => Handle::Owned(link_id),
        };
        info!(iface, program = hook.program(), replaced, "attached");
        Ok(Self {
            hook,
            iface: iface.to_owned(),
            ifindex,
            handle,
        })
    }

    /// Detaches the program. A device that vanished took the attachment with it, so
    /// failures are only logged.
    pub(super) fn detach(self, prog: &mut SchedClassifier) {
        let result = match self.handle {
            Handle::Owned(id) => prog.detach(id).map_err(anyhow::Error::from),
            Handle::Pinned(path) => std::fs::remove_file(&path).map_err(anyhow::Error::from),
        };
        if let Err(e) = result {
            warn!(iface = self.iface, program = self.hook.program(), error = %e, "detach failed (device gone?)");
        }
    }
}

/// The link an earlier run pinned for `hook` (under any layout version) that is still
/// attached to `iface`. Every such pin is removed: the adopted link lives on in the
/// returned descriptor until it is pinned again, and links attached elsewhere (the
/// interface was renamed, or recreated) are detached by losing their pin.
fn adopt(version_dir: &Path, hook: Hook, iface: &str) -> Result<Option<SchedClassifierLink>> {
    let attached: Vec<u32> = SchedClassifier::query_tcx(iface, attach_type(hook))
        .with_context(|| format!("listing the programs attached to {iface}"))?
        .1
        .iter()
        .map(|p| p.id())
        .collect();
    let mut adopted = None;
    for dir in bpffs::version_dirs(version_dir)? {
        let path = link_pin(&dir, hook);
        if !path.exists() {
            continue;
        }
        let link: FdLink = PinnedLink::from_pin(&path)
            .with_context(|| format!("opening the pinned link {}", path.display()))?
            .into();
        let program = link.info()?.program_id();
        std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
        if adopted.is_none() && attached.contains(&program) {
            adopted = Some(SchedClassifierLink::try_from(link)?);
        } else {
            debug!(pin = %path.display(), "dropped a stale link pin");
        }
    }
    Ok(adopted)
}
