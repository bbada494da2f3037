//! A lab on disk, and its removal.
//!
//! Everything a lab creates is named after its id: namespaces `olab-<id>-*`, the
//! directory `/run/overlay-lab/<id>` (files, and the bpffs mounted at `bpffs/`),
//! agents whose `--bpffs` lies in that mount, and an etcd whose data lies in that
//! directory. The state file written when the id is claimed, before anything else
//! exists, is therefore enough to remove all of it, even after a crash of the process
//! that created it.

use std::{
    fmt,
    io::Read as _,
    ops::{Deref, DerefMut},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use nix::mount::{MntFlags, umount2};
use serde::{Deserialize, Serialize};

use super::{agents, cni, etcd, netns, topology::Topology};

const ROOT: &str = "/run/overlay-lab";
const STATE_FILE: &str = "state.json";

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct LabState {
    pub id: String,
    /// The agent binary the lab runs (`check --controls` restarts agents with it).
    pub agent: PathBuf,
    /// Whether the agents run with `--ip-masq` (checks that switch it put it back).
    pub masquerade: bool,
    /// Whether the agents may take flows past the host stack (`--fast-path
    /// established`, their default) or send every packet through it (`off`).
    #[serde(default = "fast_path_default")]
    pub fast_path: bool,
    pub topology: Topology,
}

impl LabState {
    pub(crate) fn dir(&self) -> PathBuf {
        Path::new(ROOT).join(&self.id)
    }

    /// The namespace of a host (`switch`, `router`, a node or a pod).
    pub(crate) fn netns(&self, host: &str) -> String {
        format!("{}{host}", self.netns_prefix())
    }

    fn netns_prefix(&self) -> String {
        format!("olab-{}-", self.id)
    }

    pub(crate) fn node_dir(&self, node: &str) -> PathBuf {
        self.dir().join(node)
    }

    pub(crate) fn bpffs(&self) -> PathBuf {
        self.dir().join("bpffs")
    }

    pub(crate) fn nodes_file(&self) -> PathBuf {
        self.dir().join("nodes.json")
    }

    pub(crate) fn net_conf_file(&self) -> PathBuf {
        self.dir().join("net-conf.json")
    }

    /// Claims a fresh id and records the lab before anything of it exists.
    pub(crate) fn create(
        topology: Topology,
        agent: PathBuf,
        masquerade: bool,
        fast_path: bool,
    ) -> Result<LabGuard> {
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

    pub(crate) fn save(&self) -> Result<()> {
        let path = self.dir().join(STATE_FILE);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    /// The running lab `id`, or the only running lab.
    pub(crate) fn load(id: Option<&str>) -> Result<Self> {
        let running = Self::running()?;
        let id = match (id, running.as_slice()) {
            (Some(id), _) => id,
            (None, [one]) => one,
            (None, []) => bail!("no lab is running (start one with `cargo xtask lab up`)"),
            (None, many) => bail!(
                "several labs are running ({}): choose one with --id",
                many.join(", ")
            ),
        };
        let path = Path::new(ROOT).join(id).join(STATE_FILE);
        let text = std::fs::read(&path)
            .with_context(|| format!("no lab {id} ({} is missing)", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("reading {}", path.display()))
    }

    /// Ids of the labs that have a state file.
    pub(crate) fn running() -> Result<Vec<String>> {
        let mut ids = Vec::new();
        let entries = match std::fs::read_dir(ROOT) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ids),
            Err(e) => return Err(e).context(format!("listing {ROOT}")),
        };
        for entry in entries {
            let entry = entry?;
            if entry.path().join(STATE_FILE).exists() {
                ids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        ids.sort();
        Ok(ids)
    }

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

/// Labs saved before the setting ran their agents with the fast path (the agent's
/// default).
fn fast_path_default() -> bool {
    true
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
