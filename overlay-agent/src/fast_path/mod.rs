//! The fast path's agent side (the rule is in `overlay_common::flows`): whether it is
//! on, the ruleset generation the programs compare with, and admission.
//!
//! Admission: a pass over the flow table every [`PASS_EVERY`]. A direction the host
//! forwarded a few times ([`ADMIT_AFTER_PACKETS`]) is looked up in the host's
//! connection tracking; when the host confirmed and assured the flow, translates
//! nothing of it and (TCP) holds it established, the entry is made liberal and the
//! direction admitted. A translated or helped flow is marked refused and asked about no
//! more. An admitted flow the fast path carries keeps its conntrack entry from timing
//! out ([`Tracker::refresh`] every [`REFRESH_EVERY`], which also renews the admission
//! for `FAST_FOR_NS`); one the host no longer tracks leaves the table. An idle flow's
//! admission runs out, and its next packets meet the host (which demotes it, to be
//! asked about again). Each pass leaves in the programs' filter the bits of the
//! directions still admitted (a bit is set before its direction is admitted).

pub mod conntrack;
pub mod netfilter;
mod nfnetlink;

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Result;
use overlay_common::{
    flows::{ADMIT_AFTER_PACKETS, CLOSING, FlowKey, FlowState, REFUSED},
    ip::IPPROTO_TCP,
};
use tracing::{debug, info, warn};

pub use self::conntrack::{Ctnetlink, Entry, Updated};
use self::netfilter::{Event, NetfilterEvents};
use crate::{datapath::maps::Flows, host::legacy_tables};

/// How often the agent looks for flows to admit and refreshes those in use.
pub const PASS_EVERY: Duration = Duration::from_millis(500);
/// How often the host's conntrack entry of a flow the fast path carries is refreshed:
/// well within the shortest timeout of an established flow (UDP's 120 s, TCP's five
/// days).
pub const REFRESH_EVERY: Duration = Duration::from_secs(10);
/// A flow the fast path carried within this long is in use.
const IN_USE: Duration = Duration::from_secs(30);

/// `--fast-path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Every packet goes through the host stack, as with flanneld's kernel tunnel.
    Off,
    /// Established, untranslated flows the host forwarded skip it (see the README).
    Established,
}

/// What the programs' configuration says of the fast path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Switch {
    pub on: bool,
    /// The host's ruleset generation (`DatapathConfig::ruleset_gen`).
    pub generation: u32,
}

/// The host's connection tracking, as admission needs it.
pub trait Tracker {
    fn get(&mut self, key: &FlowKey) -> Result<Option<Entry>>;
    fn make_liberal(&mut self, key: &FlowKey) -> Result<Updated>;
    fn refresh(&mut self, key: &FlowKey, seconds: u32) -> Result<Updated>;
}

impl Tracker for Ctnetlink {
    fn get(&mut self, key: &FlowKey) -> Result<Option<Entry>> {
        Ctnetlink::get(self, key)
    }

    fn make_liberal(&mut self, key: &FlowKey) -> Result<Updated> {
        Ctnetlink::make_liberal(self, key)
    }

    fn refresh(&mut self, key: &FlowKey, seconds: u32) -> Result<Updated> {
        Ctnetlink::refresh(self, key, seconds)
    }
}

/// The host's conntrack timeouts of established flows (the namespace's sysctls), which
/// a refresh gives an entry again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp: u32,
    pub udp: u32,
}

impl Timeouts {
    /// The kernel's defaults, for a namespace that does not show its sysctls.
    const DEFAULT: Timeouts = Timeouts {
        tcp: 432_000,
        udp: 120,
    };

    /// From `/proc/sys/net/netfilter` (`dir`).
    pub fn read(dir: &Path) -> Timeouts {
        let read = |name: &str, default: u32| {
            std::fs::read_to_string(dir.join(name))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(default)
        };
        Timeouts {
            tcp: read("nf_conntrack_tcp_timeout_established", Self::DEFAULT.tcp),
            udp: read("nf_conntrack_udp_timeout_stream", Self::DEFAULT.udp),
        }
    }

    fn of(&self, proto: u8) -> u32 {
        if proto == IPPROTO_TCP {
            self.tcp
        } else {
            self.udp
        }
    }
}

/// What one admission pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub admitted: usize,
    pub refused: usize,
    pub refreshed: usize,
    pub forgotten: usize,
}

/// The fast path's state in the agent.
#[derive(Debug)]
pub struct FastPath {
    mode: Mode,
    /// What `DatapathConfig::ruleset_gen` says: moves at every ruleset change.
    generation: u32,
    /// Why the fast path is off although asked for.
    blocked: Option<String>,
    /// The flows admitted at the last pass, and since, one key per flow
    /// ([`canonical`]): those a conntrack destruction takes off the fast path.
    admitted: HashSet<FlowKey>,
}

impl FastPath {
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            generation: 1,
            blocked: None,
            admitted: HashSet::new(),
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether the programs may take admitted flows.
    pub fn on(&self) -> bool {
        self.mode == Mode::Established && self.blocked.is_none()
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Why the fast path is off although asked for.
    pub fn blocked(&self) -> Option<&str> {
        self.blocked.as_deref()
    }

    /// What the programs' configuration must say.
    pub fn switch(&self) -> Switch {
        Switch {
            on: self.on(),
            generation: self.generation,
        }
    }

    /// The host's ruleset changed: every flow meets it again on its next packet.
    pub fn ruleset_changed(&mut self) {
        // Never 0: a configuration without a generation matches no flow.
        self.generation = self.generation.wrapping_add(1).max(1);
    }

    /// Turns the fast path off for `reason` (None: on again, if asked for). Returns
    /// whether that changed anything.
    pub fn block(&mut self, reason: Option<String>) -> bool {
        if self.blocked == reason {
            return false;
        }
        self.blocked = reason;
        // Whatever was seen before counts for nothing once it is back.
        self.ruleset_changed();
        true
    }

    /// One admission pass over `flows` at `now_ns` (CLOCK_MONOTONIC, as the programs
    /// read it; see the module documentation).
    pub fn pass(
        &mut self,
        flows: &mut Flows,
        tracker: &mut impl Tracker,
        timeouts: Timeouts,
        now_ns: u64,
    ) -> Result<Pass> {
        let mut done = Pass::default();
        if !self.on() {
            return Ok(done);
        }
        let mut forgotten = HashSet::new();
        // Every direction admitted after this pass: the filter keeps their bits.
        let mut directions = Vec::new();
        self.admitted.clear();
        for (key, state) in flows.entries()? {
            if forgotten.contains(&key) {
                continue;
            }
            if state.admitted != 0 {
                self.admitted.insert(canonical(&key));
                directions.push(key);
            }
            let mut forget = |flows: &mut Flows, keys: &[FlowKey]| -> Result<()> {
                for key in keys {
                    if flows.remove(key)? {
                        done.forgotten += 1;
                    }
                    forgotten.insert(*key);
                }
                Ok(())
            };
            match decide(&state, now_ns) {
                Decision::Wait => {}
                Decision::Ask => match tracker.get(&key)? {
                    None => forget(flows, &[key])?,
                    Some(entry) if entry.admissible() => {
                        if key.proto == IPPROTO_TCP && tracker.make_liberal(&key)? == Updated::Gone
                        {
                            continue;
                        }
                        let admitted = FlowState {
                            admitted: 1,
                            refreshed_ns: now_ns,
                            ..state
                        };
                        if flows.update_if_unchanged(&key, &state, admitted)? {
                            debug!(
                                flow = conntrack::describe(&key),
                                "admitted to the fast path"
                            );
                            self.admitted.insert(canonical(&key));
                            directions.push(key);
                            done.admitted += 1;
                        }
                    }
                    // Not established yet: asked again next time. Translated for good:
                    // refused.
                    Some(entry) if entry.untranslated() && !entry.helper => {}
                    Some(_) => {
                        let refused = FlowState {
                            flags: state.flags | REFUSED,
                            ..state
                        };
                        if flows.update_if_unchanged(&key, &state, refused)? {
                            done.refused += 1;
                        }
                    }
                },
                Decision::Refresh => match tracker.refresh(&key, timeouts.of(key.proto))? {
                    Updated::Done => {
                        let refreshed = FlowState {
                            refreshed_ns: now_ns,
                            ..state
                        };
                        if flows.update_if_unchanged(&key, &state, refreshed)? {
                            done.refreshed += 1;
                        }
                    }
                    Updated::Gone => forget(flows, &[key, key.reversed()])?,
                },
            }
        }
        directions.retain(|key| !forgotten.contains(key));
        flows.keep_filter_to(&directions)?;
        Ok(done)
    }
}

/// The fast path in the run loop: its state, the netfilter notifications and the
/// connection tracking socket. What cannot be opened keeps the fast path off, and
/// says why.
pub struct Driver {
    state: FastPath,
    events: Option<NetfilterEvents>,
    tracker: Option<Ctnetlink>,
    /// The legacy iptables backend's tables file and the conntrack sysctls.
    legacy: PathBuf,
    sysctls: PathBuf,
}

impl Driver {
    /// Opens what `mode` needs in the agent's network namespace.
    pub fn start(mode: Mode) -> Self {
        let mut driver = Self {
            state: FastPath::new(mode),
            events: None,
            tracker: None,
            legacy: PathBuf::from(legacy_tables::LEGACY_TABLES),
            sysctls: PathBuf::from("/proc/sys/net/netfilter"),
        };
        if mode == Mode::Off {
            info!("fast path off: every packet goes through the host stack");
            return driver;
        }
        let opened = NetfilterEvents::subscribe()
            .map_err(|e| {
                format!("no netfilter notifications ({e:#}): ruleset changes cannot be seen")
            })
            .and_then(|events| {
                let tracker = Ctnetlink::open()
                    .map_err(|e| format!("no ctnetlink ({e:#}): flows cannot be admitted"))?;
                Ok((events, tracker))
            });
        match opened {
            Ok((events, tracker)) => {
                driver.events = Some(events);
                driver.tracker = Some(tracker);
                driver.check_legacy();
            }
            Err(why) => {
                driver.state.block(Some(why));
            }
        }
        driver.log();
        driver
    }

    pub fn state(&self) -> &FastPath {
        &self.state
    }

    /// Waits for the next netfilter notification; never, without them.
    pub async fn next_event(&mut self) -> Result<Event> {
        match &mut self.events {
            Some(events) => events.next().await,
            None => std::future::pending().await,
        }
    }

    /// Acts on a notification (`Err`: they failed, which turns the fast path off for
    /// good). Returns whether the programs' configuration must change.
    pub fn handle(&mut self, event: Result<Event>, flows: &mut Flows) -> bool {
        match event {
            Ok(Event::Committed) => {
                self.state.ruleset_changed();
                true
            }
            Ok(Event::Destroyed(keys)) => match self.state.destroyed(flows, &keys) {
                Ok(_) => false,
                Err(e) => {
                    // The flows stay in the table: a new generation sends them all to
                    // the host, which judges each anew.
                    warn!(
                        error = format!("{e:#}"),
                        "taking destroyed flows off the fast path; every flow meets the host again"
                    );
                    self.state.ruleset_changed();
                    true
                }
            },
            Err(e) => {
                self.events = None;
                self.state.block(Some(format!(
                    "netfilter notifications failed ({e:#}): ruleset changes cannot be seen"
                )));
                self.log();
                true
            }
        }
    }

    /// Turns the fast path off while the legacy iptables backend holds tables (on
    /// again when it no longer does). Returns whether that changed anything.
    pub fn check_legacy(&mut self) -> bool {
        if self.events.is_none() {
            return false;
        }
        let tables = match legacy_tables::legacy_tables(&self.legacy) {
            Ok(tables) => tables,
            Err(e) => vec![format!("unreadable: {e:#}")],
        };
        let why = (!tables.is_empty()).then(|| {
            format!(
                "the legacy iptables backend holds tables ({}), whose changes nobody is told of",
                tables.join(", ")
            )
        });
        let changed = self.state.block(why);
        if changed {
            self.log();
        }
        changed
    }

    /// One admission pass (see the module documentation).
    pub fn pass(&mut self, flows: &mut Flows, now_ns: u64) -> Result<Pass> {
        let Some(tracker) = &mut self.tracker else {
            return Ok(Pass::default());
        };
        let timeouts = Timeouts::read(&self.sysctls);
        self.state.pass(flows, tracker, timeouts, now_ns)
    }

    fn log(&self) {
        match self.state.blocked() {
            Some(why) => warn!(
                reason = why,
                "fast path off: every packet goes through the host stack"
            ),
            None if self.state.on() => {
                info!("fast path on for established flows the host forwarded unchanged")
            }
            None => {}
        }
    }
}

impl FastPath {
    /// Takes the admitted flows among `keys`, whose conntrack entries the host
    /// destroyed, off the fast path (both directions). Returns how many directions went.
    pub fn destroyed(&mut self, flows: &mut Flows, keys: &[FlowKey]) -> Result<usize> {
        let mut gone = 0;
        for key in keys {
            if self.admitted.remove(&canonical(key)) {
                for direction in [*key, key.reversed()] {
                    gone += usize::from(flows.remove(&direction)?);
                }
                debug!(
                    flow = conntrack::describe(key),
                    "conntrack entry destroyed: off the fast path"
                );
            }
        }
        Ok(gone)
    }
}

/// One key per flow, whichever direction names it.
fn canonical(key: &FlowKey) -> FlowKey {
    (*key).min(key.reversed())
}

/// What a pass does with one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    /// Nothing yet (too few packets, refused, closing, admitted and idle, or
    /// refreshed not long ago).
    Wait,
    /// Look it up in the host's connection tracking, to admit it.
    Ask,
    /// Admitted and in use: keep the host's entry from timing out.
    Refresh,
}

fn decide(state: &FlowState, now_ns: u64) -> Decision {
    if state.flags & (CLOSING | REFUSED) != 0 {
        return Decision::Wait;
    }
    if state.admitted == 0 {
        return if state.host_packets >= ADMIT_AFTER_PACKETS {
            Decision::Ask
        } else {
            Decision::Wait
        };
    }
    let since = |ns: u64| Duration::from_nanos(now_ns.saturating_sub(ns));
    if since(state.last_fast_ns) < IN_USE && since(state.refreshed_ns) >= REFRESH_EVERY {
        Decision::Refresh
    } else {
        Decision::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(admitted: u8, flags: u8, host_packets: u32, last_fast_ns: u64) -> FlowState {
        FlowState {
            seen_gen: 1,
            host_packets,
            last_fast_ns,
            refreshed_ns: 0,
            admitted,
            flags,
            _pad: [0; 6],
        }
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn a_pass_asks_about_busy_directions_and_refreshes_flows_in_use() {
        let now = 100 * SEC;
        assert_eq!(
            decide(&state(0, 0, 1, 0), now),
            Decision::Wait,
            "one packet"
        );
        assert_eq!(
            decide(&state(0, 0, ADMIT_AFTER_PACKETS, 0), now),
            Decision::Ask
        );
        assert_eq!(
            decide(&state(0, CLOSING, 100, 0), now),
            Decision::Wait,
            "closing: the host sees it to its end"
        );
        assert_eq!(decide(&state(0, REFUSED, 100, 0), now), Decision::Wait);
        assert_eq!(decide(&state(1, 0, 100, now - SEC), now), Decision::Refresh);
        let just_refreshed = FlowState {
            refreshed_ns: now - SEC,
            ..state(1, 0, 100, now - SEC)
        };
        assert_eq!(decide(&just_refreshed, now), Decision::Wait);
        assert_eq!(
            decide(&state(1, 0, 100, now - 60 * SEC), now),
            Decision::Wait,
            "idle: its conntrack entry ages as the host's own"
        );
    }

    #[test]
    fn generations_move_and_blocking_is_a_change() {
        let mut fp = FastPath::new(Mode::Established);
        assert!(fp.on());
        let g = fp.generation();
        fp.ruleset_changed();
        assert_ne!(fp.generation(), g);
        let g = fp.generation();
        assert!(fp.block(Some("legacy iptables".into())));
        assert!(!fp.on());
        assert_ne!(fp.generation(), g);
        assert!(!fp.block(Some("legacy iptables".into())), "no change");
        assert!(fp.block(None));
        assert!(fp.on());
        assert!(!FastPath::new(Mode::Off).on());
        let mut wrap = FastPath::new(Mode::Established);
        wrap.generation = u32::MAX;
        wrap.ruleset_changed();
        assert_eq!(wrap.generation(), 1, "0 is no generation");
    }

    #[test]
    fn timeouts_come_from_the_sysctls_or_the_kernel_defaults() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Timeouts::read(dir.path()), Timeouts::DEFAULT);
        std::fs::write(dir.path().join("nf_conntrack_udp_timeout_stream"), "180\n").unwrap();
        let t = Timeouts::read(dir.path());
        assert_eq!((t.tcp, t.udp), (432_000, 180));
        assert_eq!(t.of(IPPROTO_TCP), 432_000);
        assert_eq!(t.of(17), 180);
    }
}
