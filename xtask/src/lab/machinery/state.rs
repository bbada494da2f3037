//! A lab on disk: its id, its files and what it runs (`guard` claims one and removes
//! it).
//!
//! Everything a lab creates is named after its id: namespaces `olab-<id>-*`, the
//! directory `/run/overlay-lab/<id>` (files, and the bpffs mounted at `bpffs/`),
//! agents whose `--bpffs` lies in that mount, and an etcd whose data lies in that
//! directory. The state file written when the id is claimed, before anything else
//! exists, is therefore enough to remove all of it, even after a crash of the process
//! that created it.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use super::topology::{Node, Topology};

pub(crate) const ROOT: &str = "/run/overlay-lab";
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

    pub(crate) fn netns_prefix(&self) -> String {
        format!("olab-{}-", self.id)
    }

    pub(crate) fn node_dir(&self, node: &str) -> PathBuf {
        self.dir().join(node)
    }

    /// The subnet.env the agent (or flanneld) of `node` writes.
    pub(crate) fn subnet_file(&self, node: &Node) -> PathBuf {
        self.node_dir(&node.name).join("subnet.env")
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
}

/// Labs saved before the setting ran their agents with the fast path (the agent's
/// default).
fn fast_path_default() -> bool {
    true
}
