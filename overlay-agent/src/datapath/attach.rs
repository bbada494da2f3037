//! Attaching programs to interfaces.
//!
//! With TCX (kernel 6.6+) an attachment is a BPF link. When the agent pins its maps it
//! pins the links too: a program then stays attached when the agent exits or dies,
//! and the next agent (the same build or another) swaps its program into that same
//! link with `bpf_link_update`, atomically, so that no packet meets an empty hook.
//! Without TCX (kernels before 6.6, such as Debian 12's 6.1) the program is a cls_bpf
//! filter on a clsact qdisc, at a fixed priority and handle: a later agent finds its
//! predecessor's filter there and replaces the program in it (a netlink change of the
//! filter, atomic for packets), rather than adding a second filter beside it. With
//! pins (the agent) the filter stays when the agent exits, as a pinned TCX link does;
//! `overlay-agent cleanup` removes it by name.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use aya::programs::{
    SchedClassifier, TcAttachType,
    links::{FdLink, Link as _, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcHandle},
};
use overlay_common::{Hook, kernel::has_tcx};
use tracing::{debug, info};

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
    /// A cls_bpf filter left in place when the agent exits (no TCX), found again at
    /// [`NL_PRIORITY`] and [`NL_HANDLE`].
    Filter,
}

/// Where our cls_bpf filters sit on kernels without TCX. Priority 1 runs before any
/// filter added with the kernel's default priority (49152 and down).
pub const NL_PRIORITY: u16 = 1;
const NL_HANDLE: TcHandle = TcHandle::new(0, 1);

fn attach_type(hook: Hook) -> TcAttachType {
    match hook {
        Hook::BridgeIngress | Hook::UplinkIngress | Hook::PodIngress => TcAttachType::Ingress,
        Hook::UplinkEgress | Hook::BridgeEgress => TcAttachType::Egress,
    }
}

/// Where `hook`'s link is pinned under a layout version's directory.
pub fn link_pin(version_dir: &Path, hook: Hook) -> PathBuf {
    version_dir.join("links").join(hook.program())
}

impl Attachment {
    /// Attaches `prog` at `hook` on `iface`, taking over the link an earlier run left
    /// there if any. With `pin_dir` (and TCX) the link is pinned under it.
    pub fn new(
        prog: &mut SchedClassifier,
        hook: Hook,
        iface: &str,
        pin_dir: Option<&Path>,
    ) -> Result<Self> {
        let Some(ifindex) = ifindex_by_name(iface) else {
            bail!("interface {iface} does not exist in this network namespace");
        };
        if !has_tcx() {
            return Self::new_filter(prog, hook, iface, ifindex, pin_dir.is_some());
        }
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
            None => prog
                .attach(iface, attach_type(hook))
                .with_context(|| format!("attaching {} to {iface}", hook.program()))?,
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

    /// The cls_bpf way (no TCX): replaces the program of the filter an earlier run left
    /// at our priority and handle, or adds the filter. With `outlive`, the filter is
    /// handed over to the kernel: it stays when the agent exits.
    fn new_filter(
        prog: &mut SchedClassifier,
        hook: Hook,
        iface: &str,
        ifindex: u32,
        outlive: bool,
    ) -> Result<Self> {
        // The qdisc may exist already (an earlier run, or another program's).
        if let Err(e) = tc::qdisc_add_clsact(iface) {
            debug!(iface, error = %e, "clsact qdisc not added (may exist)");
        }
        let direction = attach_type(hook);
        let earlier =
            SchedClassifierLink::attached(iface, direction, NL_PRIORITY, NL_HANDLE, None)?;
        // Without NLM_F_CREATE the kernel changes an existing filter and refuses
        // (ENOENT) to make a new one: success means we replaced a predecessor.
        let (link_id, replaced) = match prog.attach_to_link(earlier) {
            Ok(id) => (id, true),
            Err(_) => {
                let options = TcAttachOptions::Netlink(NlOptions {
                    priority: NL_PRIORITY,
                    handle: NL_HANDLE,
                    ..NlOptions::default()
                });
                let id = prog
                    .attach_with_options(iface, direction, options)
                    .with_context(|| format!("attaching {} to {iface}", hook.program()))?;
                (id, false)
            }
        };
        let handle = if outlive {
            // aya detaches a link it owns when the link is dropped: taking it out of the
            // program and forgetting it leaves the filter to the kernel.
            std::mem::forget(prog.take_link(link_id)?);
            Handle::Filter
        } else {
            Handle::Owned(link_id)
        };
        info!(
            iface,
            program = hook.program(),
            replaced,
            "attached (cls_bpf)"
        );
        Ok(Self {
            hook,
            iface: iface.to_owned(),
            ifindex,
            handle,
        })
    }

    /// Detaches the program. A device that vanished took the attachment with it, so
    /// callers only log failures.
    pub fn detach(self, prog: &mut SchedClassifier) -> Result<()> {
        match self.handle {
            Handle::Owned(id) => prog.detach(id).map_err(anyhow::Error::from),
            Handle::Pinned(path) => std::fs::remove_file(&path).map_err(anyhow::Error::from),
            Handle::Filter => SchedClassifierLink::attached(
                &self.iface,
                attach_type(self.hook),
                NL_PRIORITY,
                NL_HANDLE,
                None,
            )
            .map_err(anyhow::Error::from)
            .and_then(|link| link.detach().map_err(anyhow::Error::from)),
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

/// Removes our cls_bpf filters (kernels without TCX, where nothing is pinned) from every
/// interface of this network namespace: `overlay-agent cleanup` knows no interface
/// names. Returns "program on iface" for each one removed.
pub fn detach_filters() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    if has_tcx() {
        return Ok(removed);
    }
    for entry in std::fs::read_dir("/sys/class/net").context("listing /sys/class/net")? {
        let iface = entry?.file_name().to_string_lossy().into_owned();
        for hook in Hook::ALL {
            match tc::qdisc_detach_program(&iface, attach_type(hook), hook.program()) {
                Ok(()) => removed.push(format!("{} on {iface}", hook.program())),
                // No such filter, or no clsact qdisc at all.
                Err(e) => debug!(iface, program = hook.program(), error = %e, "no filter removed"),
            }
        }
    }
    Ok(removed)
}
