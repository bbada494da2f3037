//! A lab's life: claimed under a fresh id before anything of it exists, and removed,
//! whatever ends the run (an error, a panic, Ctrl-C), by the guard that holds it, or
//! by `lab down` after a crash, from its state file alone (see `state`).

use std::{
    fmt,
    io::Read as _,
    ops::{Deref, DerefMut},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use nix::mount::{MntFlags, umount2};

use super::{
    agents, cni, etcd, netns,
    state::{LabState, ROOT},
    topology::Topology,
};

impl LabState {
    /// Deletes the pods' networks (CNI DEL, as the runtime tears a sandbox down; best
    /// effort: what fails is reported, and deleting the namespaces removes it anyway),
    /// stops the agents (they detach their programs and remove their routes) and etcd,
    /// deletes the namespaces, unmounts the bpffs and removes the directory, the nodes'
    /// CNI state (and etcd's data and certificates) with it. Goes on after a failure, so that one stuck piece does not keep the
    /// rest alive; the directory (and with it the state) is only removed when everything
    /// else is gone, so that `lab down` can try again.
    pub(crate) fn teardown(&self) -> Result<Removed> {
        let mut removed = Removed::default();
        let mut errors = Vec::new();
        let deleted = cni::del_all(self);
        removed.pods = deleted.pods;
        removed.cni_failures = deleted.failures;
        match agents::stop_all(self) {
            Ok(n) => removed.agents = n,
            Err(e) => errors.push(format!("stopping agents: {e:#}")),
        }
        // After the agents, which would otherwise retry it until they stop.
        match etcd::stop(self) {
            Ok(stopped) => removed.etcd = stopped,
            Err(e) => errors.push(format!("stopping etcd: {e:#}")),
        }
        match netns::list(&self.netns_prefix()) {
            Ok(names) => {
                for ns in names {
                    match netns::delete(&ns) {
                        Ok(()) => removed.namespaces += 1,
                        Err(e) => errors.push(format!("{e:#}")),
                    }
                }
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
        match is_mount_point(&self.bpffs()) {
            Ok(true) => match umount2(&self.bpffs(), MntFlags::empty()) {
                Ok(()) => removed.bpffs = true,
                Err(e) => errors.push(format!("unmounting {}: {e}", self.bpffs().display())),
            },
            Ok(false) => {}
            Err(e) => errors.push(format!("{e:#}")),
        }
        if !errors.is_empty() {
            bail!(
                "lab {} is not fully removed (retry with `cargo xtask lab down --id {}`):\n  {}",
                self.id,
                self.id,
                errors.join("\n  ")
            );
        }
        if self.dir().exists() {
            std::fs::remove_dir_all(self.dir())
                .with_context(|| format!("removing {}", self.dir().display()))?;
        }
        Ok(removed)
    }
}

/// What a teardown removed.
#[derive(Debug, Default)]
pub(crate) struct Removed {
    /// Pods whose networks CNI DEL removed.
    pub pods: usize,
    /// The pods whose CNI DEL failed, and why.
    pub cni_failures: Vec<String>,
    pub agents: usize,
    /// Whether an etcd ran and was stopped.
    pub etcd: bool,
    pub namespaces: usize,
    pub bpffs: bool,
}

impl fmt::Display for Removed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} pods deleted through CNI, {} agents stopped, ",
            self.pods, self.agents
        )?;
        if self.etcd {
            f.write_str("etcd stopped, ")?;
        }
        write!(f, "{} namespaces deleted", self.namespaces)?;
        if self.bpffs {
            f.write_str(", bpffs unmounted")?;
        }
        for failure in &self.cni_failures {
            write!(f, "\n  CNI DEL failed for {failure}")?;
        }
        Ok(())
    }
}

/// Removes the lab when dropped, unless [`LabGuard::keep`] hands it over: whatever ends
/// the run (an error, a panic, Ctrl-C), nothing is left behind.
pub(crate) struct LabGuard(Option<LabState>);

impl LabGuard {
    /// Claims a fresh id and records the lab before anything of it exists.
    pub(crate) fn create(
        topology: Topology,
        agent: PathBuf,
        masquerade: bool,
        fast_path: bool,
    ) -> Result<Self> {
        std::fs::create_dir_all(ROOT).with_context(|| format!("creating {ROOT}"))?;
        loop {
            let lab = LabState {
                id: random_id()?,
                agent: agent.clone(),
                masquerade,
                fast_path,
                topology: topology.clone(),
            };
            // Skip ids still used by namespaces of a lab whose directory is gone.
            if !netns::list(&lab.netns_prefix())?.is_empty() {
                continue;
            }
            // create_dir, not create_dir_all: it fails if another lab holds the id.
            match std::fs::create_dir(lab.dir()) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("creating {}", lab.dir().display()));
                }
            }
            let guard = LabGuard(Some(lab));
            guard.save()?;
            return Ok(guard);
        }
    }

    /// Leaves the lab running (`lab up`).
    pub(crate) fn keep(mut self) -> LabState {
        self.0
            .take()
            .expect("the guard holds the lab until consumed")
    }

    pub(crate) fn teardown(mut self) -> Result<Removed> {
        self.0
            .take()
            .expect("the guard holds the lab until consumed")
            .teardown()
    }
}

impl Deref for LabGuard {
    type Target = LabState;

    fn deref(&self) -> &LabState {
        self.0
            .as_ref()
            .expect("the guard holds the lab until consumed")
    }
}

impl DerefMut for LabGuard {
    fn deref_mut(&mut self) -> &mut LabState {
        self.0
            .as_mut()
            .expect("the guard holds the lab until consumed")
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Some(lab) = self.0.take() {
            match lab.teardown() {
                Ok(removed) => eprintln!("lab {} removed: {removed}", lab.id),
                Err(e) => eprintln!("{e:#}"),
            }
        }
    }
}

/// Four hex digits: short enough for interface names, enough for a few labs at once.
fn random_id() -> Result<String> {
    let mut bytes = [0u8; 2];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(format!("{:04x}", u16::from_be_bytes(bytes)))
}

/// Whether `path` is a mount point of our mount namespace.
pub(crate) fn is_mount_point(path: &Path) -> Result<bool> {
    let mounts =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    // Field 5 is the mount point (our paths contain no characters mountinfo escapes).
    Ok(mounts
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(&*path.to_string_lossy())))
}
