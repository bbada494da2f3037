//! `overlay-agent cleanup`: removes everything the agent installs and leaves behind on
//! exit (so that restarts lose nothing): attached programs, pinned maps of every
//! layout version, the routes it owns, and when asked flanneld's forward rules
//! (`--iptables-forward-rules`, in either frontend; kept by default, as they are
//! flanneld's and a flanneld after a rollback relies on them).
//!
//! It runs in a rollback, once flanneld runs on the node again (deploy/README.md), so
//! the programs go first: from then on every packet takes flanneld's path (its device
//! and routes are in place by then), and only then do the agent's routes go, which
//! flanneld's routes have replaced anyway where they lead to the same subnets.
//! `subnet.env` stays: flanneld writes the same file with the same content, so the
//! agent cannot tell its own from flanneld's, and the flannel CNI plugin needs it for
//! every pod that starts.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use overlay_common::Hook;

use crate::{
    bpffs,
    datapath::{detach_filters, link_pin},
    host::{Host, forward_rules},
};

/// Removes it all (the forward rules too with `forward_rules`); returns what was
/// removed, one line per item. Run it with the agent stopped, or it puts back what it
/// needs at its next pass.
pub async fn run(bpffs_root: &Path, forward_rules: bool) -> Result<String> {
    let mut report = String::new();
    let version_dir = bpffs::pin_dir(bpffs_root);
    for dir in bpffs::version_dirs(&version_dir)? {
        // Removing a link's only pin detaches its program.
        for hook in Hook::ALL {
            let pin = link_pin(&dir, hook);
            if pin.exists() {
                std::fs::remove_file(&pin)
                    .with_context(|| format!("removing {}", pin.display()))?;
                writeln!(
                    report,
                    "detached {} (pin {})",
                    hook.program(),
                    pin.display()
                )?;
            }
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
            writeln!(report, "removed pinned maps {}", dir.display())?;
        }
    }
    // Kernels without TCX: the filters the agent left (not pinned).
    for filter in detach_filters()? {
        writeln!(report, "detached {filter} (cls_bpf)")?;
    }
    if let Some(base) = version_dir.parent()
        && base.exists()
    {
        std::fs::remove_dir(base).with_context(|| format!("removing {}", base.display()))?;
    }
    let routes = Host::connect()?.remove_overlay_routes().await?;
    writeln!(
        report,
        "removed {routes} routes (proto {})",
        crate::host::RTPROT_OVERLAY
    )?;
    if forward_rules {
        report.push_str(&forward_rules::remove()?);
    }
    Ok(report)
}
