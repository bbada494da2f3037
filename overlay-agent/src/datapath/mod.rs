//! The eBPF side as seen from userspace: the embedded object, its programs and maps.

mod attach;
pub mod batch;
pub mod conntrack;
pub mod layout;
pub mod maps;

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader,
    programs::{ProgramError, SchedClassifier},
};
use overlay_common::{
    Hook,
    maps::{CONNTRACK_ENTRIES, names},
};
use tracing::warn;

pub use attach::{Attachment, NL_PRIORITY, detach_filters, link_pin};
pub use conntrack::Conntrack;
pub use maps::{Config, Counters, Flows, NatEvents, Peers, PodPorts, Routes};

use crate::bpf_log::{BpfLogLevel, ProgramLog};

/// The compiled datapath, built by this crate's build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/overlay-ebpf"));

/// Loaded programs and the maps that drive them.
pub struct Datapath {
    ebpf: Ebpf,
    pub routes: Routes,
    pub peers: Peers,
    pub config: Config,
    pub counters: Counters,
    pub conntrack: Conntrack,
    pub nat_events: NatEvents,
    pub pod_ports: PodPorts,
    pub flows: Flows,
    attachments: Vec<Attachment>,
    pin_dir: Option<PathBuf>,
    /// The programs' log buffer while nobody has taken it (logging on only).
    log: Option<ProgramLog>,
}

/// Names of all maps, in the order they are pinned and checked.
pub const MAP_NAMES: [&str; 8] = [
    names::ROUTES,
    names::PEERS,
    names::CONFIG,
    names::COUNTERS,
    names::CONNTRACK,
    names::NAT_EVENTS,
    names::FLOWS,
    names::FLOW_FILTER,
];

/// How to load the datapath.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Pin maps and links here (a layout version's directory on a bpffs): maps are
    /// reused if already pinned (after checking their layout), links are taken over, and
    /// both outlive the agent, so a restart or an upgrade does not interrupt traffic.
    pub pin_dir: Option<PathBuf>,
    /// Capacity of the masquerade connection table (two entries per flow).
    pub conntrack_entries: u32,
    /// What the programs log (fixed for the life of the loaded programs).
    pub log_level: BpfLogLevel,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            pin_dir: None,
            conntrack_entries: CONNTRACK_ENTRIES,
            log_level: BpfLogLevel::Off,
        }
    }
}

/// How many times a program's load is tried while the kernel answers EAGAIN: the
/// verifier gives up on a program when a signal is pending for the loading thread, as
/// libbpf knows (`PROG_LOAD_ATTEMPTS` in its `bpf.c`, which retries the same way). A
/// signal arriving meanwhile says nothing about the program.
const LOAD_ATTEMPTS: u32 = 5;

/// `load` until it succeeds, fails otherwise, or has met EAGAIN `LOAD_ATTEMPTS` times.
fn retrying_eagain(mut load: impl FnMut() -> Result<(), ProgramError>) -> Result<(), ProgramError> {
    let mut attempt = 1;
    loop {
        match load() {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < LOAD_ATTEMPTS =>
            {
                attempt += 1;
            }
            done => return done,
        }
    }
}

impl Datapath {
    /// Loads the programs into the kernel.
    pub fn load(options: &LoadOptions) -> Result<Self> {
        let pins: Vec<(&str, PathBuf)> = match &options.pin_dir {
            Some(dir) => MAP_NAMES.iter().map(|n| (*n, dir.join(n))).collect(),
            None => Vec::new(),
        };
        if let Some(dir) = &options.pin_dir {
            layout::check_pinned(dir, &layout::expected(options.conntrack_entries))?;
        }
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(names::CONNTRACK, options.conntrack_entries);
        let log_level = options.log_level.global_value();
        loader.override_global(aya_log::LEVEL, &log_level, true);
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).context("loading the eBPF object")?;
        for hook in Hook::ALL {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(hook.program())
                .with_context(|| format!("program {} missing from the object", hook.program()))?
                .try_into()?;
            retrying_eagain(|| prog.load())
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
        let conntrack = Conntrack::new(take(names::CONNTRACK)?)?;
        let nat_events = NatEvents::new(take(names::NAT_EVENTS)?)?;
        // Not pinned: filled again from the bridge as the agent starts.
        let pod_ports = PodPorts::new(take(names::POD_PORTS)?)?;
        let flows = Flows::new(take(names::FLOWS)?, take(names::FLOW_FILTER)?)?;
        let log = match options.log_level {
            BpfLogLevel::Off => None,
            _ => Some(ProgramLog::new(&mut ebpf)?),
        };
        Ok(Self {
            ebpf,
            routes,
            peers,
            config,
            counters,
            conntrack,
            nat_events,
            pod_ports,
            flows,
            attachments: Vec::new(),
            pin_dir: options.pin_dir.clone(),
            log,
        })
    }

    /// The reader of the programs' log records, once: None when logging is off or the
    /// reader was taken already.
    pub fn take_log(&mut self) -> Option<ProgramLog> {
        self.log.take()
    }

    /// The loaded program for `hook` (for attaching, or running it with test data).
    pub fn program(&self, hook: Hook) -> &SchedClassifier {
        self.ebpf
            .program(hook.program())
            .and_then(|p| p.try_into().ok())
            .expect("programs are checked at load")
    }

    /// The loaded program for `hook`, to attach it (`pod_ingress` on the pods' veths,
    /// by `pods::veths`).
    pub fn program_mut(&mut self, hook: Hook) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(hook.program())
            .and_then(|p| p.try_into().ok())
            .expect("programs are checked at load")
    }

    /// Attaches `hook`'s program to `iface`, replacing an earlier attachment of it
    /// (this agent's, or a pinned one an earlier run left).
    pub fn attach(&mut self, hook: Hook, iface: &str) -> Result<()> {
        self.detach(hook);
        let pin_dir = self.pin_dir.clone();
        let attachment = Attachment::new(self.program_mut(hook), hook, iface, pin_dir.as_deref())?;
        self.attachments.push(attachment);
        Ok(())
    }

    /// Detaches `hook`'s program if attached. A device that vanished took the
    /// attachment with it, so failures here are only logged.
    pub fn detach(&mut self, hook: Hook) {
        if let Some(pos) = self.attachments.iter().position(|a| a.hook == hook) {
            let attachment = self.attachments.swap_remove(pos);
            let iface = attachment.iface.clone();
            if let Err(e) = attachment.detach(self.program_mut(hook)) {
                warn!(iface, program = hook.program(), error = %e, "detach failed (device gone?)");
            }
        }
    }

    /// The interface `hook` is attached to, with its ifindex at attach time.
    pub fn attachment(&self, hook: Hook) -> Option<&Attachment> {
        self.attachments.iter().find(|a| a.hook == hook)
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use aya::programs::ProgramError;
    use aya_obj::VerifierLog;

    use super::{LOAD_ATTEMPTS, retrying_eagain};

    fn refused(errno: i32) -> ProgramError {
        ProgramError::LoadError {
            io_error: io::Error::from_raw_os_error(errno),
            verifier_log: VerifierLog::new(String::new()),
        }
    }

    /// Loads answering each errno of `answers` in turn, then succeeding; returns the
    /// outcome's errno (0 for success) and how many loads were tried.
    fn load_through(answers: &[i32]) -> (i32, usize) {
        let mut calls = 0;
        let outcome = retrying_eagain(|| {
            calls += 1;
            answers.get(calls - 1).map_or(Ok(()), |&e| Err(refused(e)))
        });
        let errno = match outcome {
            Ok(()) => 0,
            Err(ProgramError::LoadError { io_error, .. }) => io_error.raw_os_error().unwrap_or(-1),
            Err(other) => panic!("unexpected {other}"),
        };
        (errno, calls)
    }

    #[test]
    fn a_load_interrupted_by_a_signal_is_tried_again_a_few_times() {
        let eagain = libc::EAGAIN;
        assert_eq!(load_through(&[]), (0, 1));
        assert_eq!(load_through(&[eagain, eagain]), (0, 3));
        let always = vec![eagain; LOAD_ATTEMPTS as usize];
        assert_eq!(load_through(&always), (eagain, LOAD_ATTEMPTS as usize));
        // The verifier's own refusals are final.
        assert_eq!(load_through(&[libc::EACCES, eagain]), (libc::EACCES, 1));
        assert_eq!(load_through(&[eagain, libc::EINVAL]), (libc::EINVAL, 2));
    }
}
