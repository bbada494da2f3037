//! The eBPF side as seen from userspace: the embedded object, its programs and maps.

mod attach;
pub mod maps;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use aya::{Ebpf, EbpfLoader, programs::SchedClassifier};
use overlay_common::{Hook, maps::names};

pub use attach::Attachment;
pub use maps::{Config, Counters, Peers, Routes};

/// The compiled datapath, built by this crate's build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/overlay-ebpf"));

/// Loaded programs and the maps that drive them.
pub struct Datapath {
    ebpf: Ebpf,
    pub routes: Routes,
    pub peers: Peers,
    pub config: Config,
    pub counters: Counters,
    attachments: Vec<Attachment>,
}

/// Names of all maps, in the order they are pinned and checked.
pub const MAP_NAMES: [&str; 4] = [names::ROUTES, names::PEERS, names::CONFIG, names::COUNTERS];

impl Datapath {
    /// Loads the programs into the kernel. With `pin_dir`, maps are pinned there (and
    /// reused if already pinned), so that other processes can inspect them.
    pub fn load(pin_dir: Option<&Path>) -> Result<Self> {
        let pins: Vec<(&str, PathBuf)> = match pin_dir {
            Some(dir) => MAP_NAMES.iter().map(|n| (*n, dir.join(n))).collect(),
            None => Vec::new(),
        };
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).context("loading the eBPF object")?;
        for hook in Hook::ALL {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(hook.program())
                .with_context(|| format!("program {} missing from the object", hook.program()))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("the verifier rejected {}", hook.program()))?;
        }
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the object"))
        };
        let routes = Routes::new(take(names::ROUTES)?)?;
        let peers = Peers::new(take(names::PEERS)?)?;
        let config = Config::new(take(names::CONFIG)?)?;
        let counters = Counters::new(take(names::COUNTERS)?)?;
        Ok(Self { ebpf, routes, peers, config, counters, attachments: Vec::new() })
    }

    /// The loaded program for `hook` (for attaching, or running it with test data).
    pub fn program(&self, hook: Hook) -> &SchedClassifier {
        self.ebpf
            .program(hook.program())
            .and_then(|p| p.try_into().ok())
            .expect("programs are checked at load")
    }

    fn program_mut(&mut self, hook: Hook) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(hook.program())
            .and_then(|p| p.try_into().ok())
            .expect("programs are checked at load")
    }

    /// Attaches `hook`'s program to `iface`, replacing an earlier attachment of it.
    pub fn attach(&mut self, hook: Hook, iface: &str) -> Result<()> {
        self.detach(hook);
        let attachment = Attachment::new(self.program_mut(hook), hook, iface)?;
        self.attachments.push(attachment);
        Ok(())
    }

    /// Detaches `hook`'s program if attached. A device that vanished took the
    /// attachment with it, so failures here are only logged.
    pub fn detach(&mut self, hook: Hook) {
        if let Some(pos) = self.attachments.iter().position(|a| a.hook == hook) {
            let attachment = self.attachments.swap_remove(pos);
            attachment.detach(self.program_mut(hook));
        }
    }

    /// The interface `hook` is attached to, with its ifindex at attach time.
    pub fn attachment(&self, hook: Hook) -> Option<&Attachment> {
        self.attachments.iter().find(|a| a.hook == hook)
    }

    pub fn detach_all(&mut self) {
        for hook in Hook::ALL {
            self.detach(hook);
        }
    }
}
