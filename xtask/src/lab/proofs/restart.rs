//! Restarts and upgrades lose nothing: numbered datagrams flow through one node while
//! its agent is killed and restarted, stopped and restarted, replaced by another build,
//! and replaced by a build with another map layout; receivers count what arrived. On
//! etcd (`lab --etcd`), also while etcd is killed, left down until every agent has
//! failed to follow it and failed again on retrying, and restarted on its data: the
//! datapath keeps its peers meanwhile, and the agents follow etcd again afterwards.
//!
//! The streams cross the node every way its datapath touches them: encapsulated by
//! `bridge_ingress`, decapsulated by `uplink_ingress` (through the router), and
//! masqueraded on `uplink_egress` to the outside host.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail, ensure};
use ipnet::Ipv4Net;
use nix::sys::{
    signal::Signal,
    socket::{setsockopt, sockopt::RcvBufForce},
};
use socket2::{Domain, Protocol, Socket, Type};

use crate::lab::machinery::{
    agents, etcd,
    interrupt::{self, Wait},
    kernel_drops::KernelDrops,
    netns,
    state::LabState,
    text_table::Table,
    topology::Node,
};

/// Datagrams per second on each stream: dense enough that a gap of a millisecond
/// shows, light enough for two cores.
const RATE: u32 = 2000;
/// Traffic before and after each event, so that both edges are covered.
const MARGIN: Duration = Duration::from_millis(500);
/// Once its sender stopped, how long a receiver still waiting for datagrams waits after
/// the last one arrived (times the lab's slowdown: an emulated machine stands still for
/// seconds), before it counts the rest lost.
const DRAIN: Duration = Duration::from_millis(300);
/// How far behind its schedule a sender may fall and still catch up (see `pace`).
const CATCH_UP: Duration = Duration::from_millis(10);
const PORT: u16 = 7700;
const RECEIVE_BUFFER: usize = 16 << 20;
const PAYLOAD: usize = 64;

/// The node whose agent is disturbed.
const NODE: &str = "w1";

/// etcd stays down at least this long, and until every agent has counted its watch's
/// failure and a failed retry (its backoff starts at 0.8 s).
const ETCD_DOWN: Duration = Duration::from_secs(5);
/// How long the agents may take to fail on etcd, and to follow it again once it is
/// back: by then their backoff (doubling, with jitter) has grown to several seconds.
const ETCD_TIMEOUT: Duration = Duration::from_secs(30);
/// The tunnel address of the peer put into etcd after its restart: no host's.
const PROBE_PEER: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 250);

/// One numbered stream between two hosts of the lab.
pub(crate) struct Stream {
    name: String,
    started: SystemTime,
    stop: Arc<AtomicBool>,
    /// How many datagrams the sender sent, once it stopped (`u64::MAX` before).
    sent: Arc<AtomicU64>,
    /// When the sender sent each datagram, in order.
    sender: JoinHandle<Result<SendTimes>>,
    receiver: JoinHandle<Result<Received>>,
}

#[derive(Default)]
struct Received {
    seen: HashSet<u64>,
    duplicates: u64,
    /// Longest time between two datagrams.
    longest_gap: Duration,
}

/// What one stream saw across one event.
pub(crate) struct Count {
    pub stream: String,
    pub sent: u64,
    pub received: u64,
    pub duplicates: u64,
    pub longest_gap: Duration,
    /// The sequence numbers that never arrived, as inclusive ranges.
    missing: Vec<(u64, u64)>,
    /// When the stream started, and when each datagram was sent.
    started: SystemTime,
    sent_at: SendTimes,
}

/// When each datagram of a stream was sent, in milliseconds after the stream started:
/// a sender starved of CPU falls behind its schedule, so the schedule would not say.
type SendTimes = Vec<u32>;

impl Count {
    pub(crate) fn lost(&self) -> u64 {
        self.sent - self.received
    }

    /// What went wrong for this stream in `event`, if anything: how many datagrams were
    /// lost or duplicated, and which were lost, with when they were sent after the
    /// stream started and at what time of day (UTC, as the agents' logs say it): a loss
    /// at the event, or at the end, tells its cause apart.
    pub(crate) fn failure(&self, event: &str) -> Option<String> {
        if self.lost() == 0 && self.duplicates == 0 {
            return None;
        }
        let at = |seq: u64| {
            let ms = usize::try_from(seq)
                .ok()
                .and_then(|i| self.sent_at.get(i))
                .copied()
                .unwrap_or_default();
            Duration::from_millis(ms.into())
        };
        let mut ranges: Vec<String> = self
            .missing
            .iter()
            .take(MISSING_SHOWN)
            .map(|&(first, last)| {
                format!(
                    "{first}–{last} (sent {:.2}–{:.2}s, {})",
                    at(first).as_secs_f64(),
                    at(last).as_secs_f64(),
                    time_of_day(self.started + at(first)),
                )
            })
            .collect();
        if self.missing.len() > MISSING_SHOWN {
            ranges.push(format!(
                "and {} more ranges",
                self.missing.len() - MISSING_SHOWN
            ));
        }
        let missing = if ranges.is_empty() {
            String::new()
        } else {
            format!("; missing {}", ranges.join(", "))
        };
        Some(format!(
            "{event}: {} lost {} and duplicated {} of {} (sent over {:.2}s){missing}",
            self.stream,
            self.lost(),
            self.duplicates,
            self.sent,
            at(self.sent.saturating_sub(1)).as_secs_f64(),
        ))
    }
}

/// `t` as hours, minutes, seconds and milliseconds of its day, in UTC.
fn time_of_day(t: SystemTime) -> String {
    let ms = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03} UTC",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// How many ranges of missing datagrams a failure names.
const MISSING_SHOWN: usize = 5;

/// The inclusive ranges of `0..sent` that `seen` lacks.
fn missing_ranges(seen: &HashSet<u64>, sent: u64) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for seq in (0..sent).filter(|seq| !seen.contains(seq)) {
        match ranges.last_mut() {
            Some((_, last)) if *last + 1 == seq => *last = seq,
            _ => ranges.push((seq, seq)),
        }
    }
    ranges
}

impl Stream {
    /// Starts sending from `from`'s namespace to `to` (an address in `to_ns`),
    /// `rate` datagrams a second.
    pub(crate) fn start(
        lab: &LabState,
        from: &str,
        to: &str,
        to_addr: Ipv4Addr,
        port: u16,
        rate: u32,
    ) -> Result<Self> {
        let target = SocketAddrV4::new(to_addr, port);
        let rx = netns::enter(&lab.netns(to), || {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            // Room for seconds of traffic: a receiver thread starved of CPU must not
            // turn into losses blamed on the datapath.
            setsockopt(&s, RcvBufForce, &RECEIVE_BUFFER)?;
            s.bind(&target.into())?;
            Ok(UdpSocket::from(s))
        })
        .with_context(|| format!("listening on {target} in {to}"))?;
        let tx = netns::enter(&lab.netns(from), || {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(target)?;
            Ok(s)
        })?;
        rx.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(u64::MAX));
        let receiver = {
            let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
            std::thread::spawn(move || receive(&rx, &stop, &sent))
        };
        let started = SystemTime::now();
        let sender = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || send(&tx, &stop, rate))
        };
        Ok(Self {
            name: format!("{from} → {to}"),
            started,
            stop,
            sent,
            sender,
            receiver,
        })
    }

    pub(crate) fn finish(self) -> Result<Count> {
        self.stop.store(true, Ordering::Relaxed);
        let sent_at = self.sender.join().expect("sender thread")?;
        let sent = sent_at.len() as u64;
        self.sent.store(sent, Ordering::Relaxed);
        let received = self.receiver.join().expect("receiver thread")?;
        Ok(Count {
            stream: self.name,
            sent,
            received: received.seen.len() as u64,
            duplicates: received.duplicates,
            longest_gap: received.longest_gap,
            missing: missing_ranges(&received.seen, sent),
            started: self.started,
            sent_at,
        })
    }
}

/// Sends numbered datagrams at `rate` a second until stopped; returns when each went
/// out.
fn send(socket: &UdpSocket, stop: &AtomicBool, rate: u32) -> Result<SendTimes> {
    let interval = Duration::from_secs(1) / rate;
    let started = Instant::now();
    let mut next = started;
    let mut sent_at = SendTimes::new();
    let mut payload = [0u8; PAYLOAD];
    while !stop.load(Ordering::Relaxed) {
        let seq = sent_at.len() as u64;
        payload[..8].copy_from_slice(&seq.to_be_bytes());
        let now = Instant::now();
        socket.send(&payload).context("sending")?;
        sent_at.push(u32::try_from((now - started).as_millis()).unwrap_or(u32::MAX));
        next = pace(next, interval, Instant::now());
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    Ok(sent_at)
}

/// When to send after a datagram due at `due`: a late wake-up is made up for by
/// sending the next ones at once, but at most `CATCH_UP`'s worth. A sender stalled
/// for seconds (a starved VM) that made up all of it would send thousands of
/// datagrams in one burst and overflow the kernel's input queues, a loss of the
/// test's own making, not the node's.
fn pace(due: Instant, interval: Duration, now: Instant) -> Instant {
    (due + interval).max(now.checked_sub(CATCH_UP).unwrap_or(now))
}

/// Collects sequence numbers until its sender stopped and either everything it sent
/// arrived or nothing more did for `DRAIN` (scaled).
fn receive(socket: &UdpSocket, stop: &AtomicBool, sent: &AtomicU64) -> Result<Received> {
    let drain = interrupt::scaled(DRAIN);
    let mut got = Received::default();
    let mut last: Option<Instant> = None;
    let mut stopped_at: Option<Instant> = None;
    let mut buf = [0u8; PAYLOAD];
    loop {
        if stopped_at.is_none() && stop.load(Ordering::Relaxed) {
            stopped_at = Some(Instant::now());
        }
        if let Some(stopped) = stopped_at {
            let all = got.seen.len() as u64 >= sent.load(Ordering::Relaxed);
            let quiet_since = last.map_or(stopped, |l| l.max(stopped));
            if all || quiet_since.elapsed() > drain {
                return Ok(got);
            }
        }
        match socket.recv(&mut buf) {
            Ok(n) if n >= 8 => {
                let now = Instant::now();
                if let Some(prev) = last {
                    got.longest_gap = got.longest_gap.max(now - prev);
                }
                last = Some(now);
                let seq = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
                if !got.seen.insert(seq) {
                    got.duplicates += 1;
                }
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("receiving"),
        }
    }
}

/// What happens to the node's agent, or with etcd to etcd.
#[derive(Clone, Copy)]
enum Event {
    Kill,
    Restart,
    Upgrade,
    LayoutUpgrade,
    EtcdKill,
}

impl Event {
    /// Every event the lab's node source allows: etcd's only with etcd.
    fn all(lab: &LabState) -> impl Iterator<Item = Event> {
        [
            Event::Kill,
            Event::Restart,
            Event::Upgrade,
            Event::LayoutUpgrade,
        ]
        .into_iter()
        .chain(lab.topology.etcd.is_some().then_some(Event::EtcdKill))
    }

    fn describe(self) -> String {
        match self {
            Event::Kill => "SIGKILL, then the same build".to_owned(),
            Event::Restart => "SIGTERM, then the same build".to_owned(),
            Event::Upgrade => "SIGTERM, then another build".to_owned(),
            Event::LayoutUpgrade => "another build, other map layout".to_owned(),
            Event::EtcdKill => format!(
                "etcd SIGKILLed for {}s, then restarted",
                ETCD_DOWN.as_secs()
            ),
        }
    }
}

pub(crate) struct Proof {
    pub rows: Vec<(String, Duration, Count)>,
    /// Per event: packets the node's datapath dropped meanwhile (every hook, every
    /// drop reason) and what the kernel dropped in the lab, so that a loss can be
    /// placed.
    pub drops: Vec<(String, u64, KernelDrops)>,
    /// Per event: what else it found, if anything.
    pub notes: Vec<(String, String)>,
    pub failures: Vec<String>,
}

impl Proof {
    /// The events, in the order they ran.
    pub(crate) fn events(&self) -> Vec<String> {
        self.drops.iter().map(|(event, ..)| event.clone()).collect()
    }
}

/// Runs every event on `NODE`, with `other_build` as the upgrade, and puts the lab's
/// own build back at the end.
pub(crate) fn run(lab: &LabState, other_build: &Path) -> Result<Proof> {
    let node = lab.topology.node(NODE)?.clone();
    let mut proof = Proof {
        rows: Vec::new(),
        drops: Vec::new(),
        notes: Vec::new(),
        failures: Vec::new(),
    };
    for event in Event::all(lab) {
        let drops_before = agents::datapath_drops(lab, &node)?;
        let kernel_before = KernelDrops::read(lab)?;
        let streams = start_streams(lab, &node)?;
        std::thread::sleep(MARGIN);
        let disturbed = disturb(lab, &node, event, other_build)?;
        std::thread::sleep(MARGIN);
        for stream in streams {
            let count = stream.finish()?;
            proof.failures.extend(count.failure(&event.describe()));
            proof.rows.push((event.describe(), disturbed.took, count));
        }
        let kernel = KernelDrops::read(lab)?.since(&kernel_before);
        // Pinned counters survive every event but the layout change, whose datapath
        // starts from zero: then the replaced one's count is added.
        let drops = (agents::datapath_drops(lab, &node)?
            + disturbed.replaced_drops.unwrap_or(drops_before))
        .saturating_sub(drops_before);
        proof.drops.push((event.describe(), drops, kernel));
        proof
            .notes
            .extend(disturbed.note.map(|note| (event.describe(), note)));
    }
    // Leave the lab with its own build again.
    agents::stop_node(lab, &node, Signal::SIGTERM)?;
    agents::start(lab, &node, lab.masquerade)?;
    agents::wait_ready(lab, true)?;
    Ok(proof)
}

fn start_streams(lab: &LabState, node: &Node) -> Result<Vec<Stream>> {
    let pods = lab.topology.pods_of(node);
    let pod = |node: &str, i: usize| -> Result<(String, Ipv4Addr)> {
        let p = lab.topology.pods_of(lab.topology.node(node)?).remove(i);
        Ok((p.name, p.address))
    };
    let (w2_pod, w2_addr) = pod("w2", 0)?;
    let (w3_pod, _) = pod("w3", 0)?;
    let outside = &lab.topology.outside;
    Ok(vec![
        // Encapsulated on the node.
        Stream::start(lab, &pods[0].name, &w2_pod, w2_addr, PORT, RATE)?,
        // Decapsulated on the node, arriving through the router.
        Stream::start(lab, &w3_pod, &pods[1].name, pods[1].address, PORT + 1, RATE)?,
        // Masqueraded on the node: the connection table must survive too.
        Stream::start(
            lab,
            &pods[1].name,
            &outside.name,
            outside.address,
            PORT + 2,
            RATE,
        )?,
    ])
}

struct Disturbed {
    /// How long the node ran without a ready agent; for etcd, until every agent
    /// followed it again.
    took: Duration,
    /// The drops of a datapath whose counters the event replaced, read last after its
    /// agent stopped.
    replaced_drops: Option<u64>,
    note: Option<String>,
}

/// Does `event` to the node's agent (or etcd) and waits until the agents are ready.
fn disturb(lab: &LabState, node: &Node, event: Event, other_build: &Path) -> Result<Disturbed> {
    let started = Instant::now();
    let mut replaced = None;
    let mut note = None;
    match event {
        Event::Kill => {
            agents::stop_node(lab, node, Signal::SIGKILL)?;
            agents::start(lab, node, lab.masquerade)?;
        }
        Event::Restart => {
            agents::stop_node(lab, node, Signal::SIGTERM)?;
            agents::start(lab, node, lab.masquerade)?;
        }
        Event::Upgrade => {
            agents::stop_node(lab, node, Signal::SIGTERM)?;
            agents::start_build(lab, node, lab.masquerade, other_build)?;
        }
        Event::LayoutUpgrade => {
            agents::stop_node(lab, node, Signal::SIGTERM)?;
            let drops = agents::datapath_drops(lab, node)?;
            // What a build with another layout finds: the running datapath's pins in
            // a directory of another version.
            let pins = agents::pin_dir(lab, node)?;
            let older = pins.with_file_name("v0");
            std::fs::rename(&pins, &older)
                .with_context(|| format!("moving {} aside", pins.display()))?;
            agents::start(lab, node, lab.masquerade)?;
            replaced = Some((drops, pins, older));
        }
        Event::EtcdKill => note = Some(etcd_outage(lab)?),
    }
    agents::wait_ready(lab, true)?;
    let took = started.elapsed();
    if let Some((_, pins, older)) = &replaced
        && (older.exists() || !pins.exists())
    {
        bail!(
            "the agent did not take over from the other layout's pins ({} is still there)",
            older.display()
        );
    }
    Ok(Disturbed {
        took,
        replaced_drops: replaced.map(|(drops, ..)| drops),
        note,
    })
}

/// Kills etcd and keeps it down for `ETCD_DOWN` and until every agent has failed twice
/// on it (its watch, then a retry), checks that every node kept its peers and stayed
/// ready meanwhile, restarts etcd on its data, and waits until every agent follows it
/// again: a peer put after the restart reaches every agent's maps, its deletion too,
/// and no agent counts an error after. Returns what it saw.
fn etcd_outage(lab: &LabState) -> Result<String> {
    let nodes = &lab.topology.nodes;
    let errors = || -> Result<Vec<u64>> {
        nodes
            .iter()
            .map(|n| agents::source_errors(lab, n))
            .collect()
    };
    let before = errors()?;
    etcd::kill(lab)?;
    let killed = Instant::now();
    let failed = interrupt::wait_until(
        "every agent to fail on etcd twice",
        interrupt::scaled(ETCD_TIMEOUT),
        || {
            let now = errors()?;
            let short: Vec<String> = nodes
                .iter()
                .zip(before.iter().zip(&now))
                .filter(|(_, (before, now))| **now < **before + 2)
                .map(|(n, (before, now))| {
                    format!("{} counted {}", n.name, now.saturating_sub(*before))
                })
                .collect();
            Ok(if short.is_empty() && killed.elapsed() >= ETCD_DOWN {
                Wait::Done(now)
            } else {
                Wait::Pending(format!("{short:?} after {:?}", killed.elapsed()))
            })
        },
    )?;
    // The agents keep their last node set: the datapath keeps every peer, and they
    // stay ready, saying why they are degraded.
    for node in nodes {
        let missing = agents::missing(lab, node, true);
        ensure!(
            missing.is_empty(),
            "with etcd down, {} lacks {}",
            node.name,
            missing.join(", ")
        );
        let (code, body) = agents::readyz(lab, node)?;
        ensure!(
            code == 200 && body.starts_with(DEGRADED),
            "with etcd down, {}'s agent answers {code} {body:?} on /readyz, not ready and degraded",
            node.name
        );
    }
    let down = killed.elapsed();
    etcd::restart(lab)?;
    let restarted = Instant::now();
    let probe = unheld_subnet(lab)?;
    etcd::put_peer(lab, probe, PROBE_PEER)?;
    interrupt::wait_until(
        &format!("every agent to learn {probe}, put into etcd after its restart"),
        interrupt::scaled(ETCD_TIMEOUT),
        || {
            let mut lacking = Vec::new();
            for node in nodes {
                if !agents::remote_subnets(lab, node)?.contains(&probe) {
                    lacking.push(node.name.as_str());
                }
            }
            Ok(if lacking.is_empty() {
                Wait::Done(())
            } else {
                Wait::Pending(format!("{} lack it", lacking.join(", ")))
            })
        },
    )?;
    let followed = restarted.elapsed();
    let synced = errors()?;
    etcd::delete_peer(lab, probe)?;
    // Ready again only with exactly the lab's peers: the deletion reached every agent.
    agents::wait_ready(lab, true).with_context(|| {
        format!("every agent to drop {probe}, deleted from etcd after its restart")
    })?;
    let after = errors()?;
    ensure!(
        after == synced,
        "errors counted after the agents followed etcd again: {synced:?}, then {after:?}"
    );
    for node in nodes {
        let (_, body) = agents::readyz(lab, node)?;
        ensure!(
            !body.starts_with(DEGRADED),
            "{}'s agent follows etcd again but still says {body:?} on /readyz",
            node.name
        );
    }
    let counted: Vec<String> = nodes
        .iter()
        .zip(before.iter().zip(&failed))
        .map(|(n, (before, failed))| format!("{} {}", n.name, failed - before))
        .collect();
    Ok(format!(
        "etcd down {:.1}s, errors counted meanwhile: {}; every node kept its peers and stayed ready, saying it was degraded; a peer put after the restart reached every agent in {:.1}s, its deletion too",
        down.as_secs_f64(),
        counted.join(", "),
        followed.as_secs_f64()
    ))
}

/// How an agent's /readyz begins while its node source fails (`overlay-agent`'s
/// `http.rs`).
const DEGRADED: &str = "ready, degraded: the node source is failing";

/// A /24 of the pod network that no node holds: the last one.
fn unheld_subnet(lab: &LabState) -> Result<Ipv4Net> {
    let last = lab
        .topology
        .pod_network
        .subnets(24)
        .context("the pod network is narrower than a /24")?
        .last()
        .context("the pod network has no /24")?;
    ensure!(
        lab.topology.nodes.iter().all(|n| n.pod_cidr != last),
        "a node holds {last}"
    );
    Ok(last)
}

pub(crate) fn render(proof: &Proof) -> String {
    let mut out = table(["EVENT ON w1", "RECOVERED"], &proof.rows);
    for (event, drops, kernel) in &proof.drops {
        out.push_str(&format!(
            "  {event}: w1's datapath dropped {drops} packets meanwhile; the kernel dropped {kernel}\n"
        ));
    }
    for (event, note) in &proof.notes {
        out.push_str(&format!("  {event}: {note}\n"));
    }
    out.push_str(&if proof.failures.is_empty() {
        format!("  ✓ no datagram lost across any event ({RATE}/s per stream; RECOVERED: until w1's agent was ready again, or every agent followed etcd again)\n")
    } else {
        format!("  ✗ {}\n", proof.failures.join("\n  ✗ "))
    });
    out
}

/// What each stream saw across each event (`event`, `took`: the first two columns'
/// names), one row per stream.
pub(crate) fn table(first: [&str; 2], rows: &[(String, Duration, Count)]) -> String {
    let [event, took] = first;
    let mut table = Table::new([
        event,
        took,
        "STREAM",
        "SENT",
        "RECEIVED",
        "LOST",
        "DUPLICATED",
        "LONGEST GAP",
    ])
    .align_right([1, 3, 4, 5, 6, 7]);
    for (event, took, c) in rows {
        table.row([
            event.clone(),
            format!("{:.2}s", took.as_secs_f64()),
            c.stream.clone(),
            c.sent.to_string(),
            c.received.to_string(),
            c.lost().to_string(),
            c.duplicates.to_string(),
            format!("{:.1}ms", c.longest_gap.as_secs_f64() * 1e3),
        ]);
    }
    table.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_catches_up_a_short_delay_but_not_a_stall() {
        let interval = Duration::from_millis(1);
        let t0 = Instant::now();
        // On time, or a little late: the schedule holds, the missed datagrams go at once.
        assert_eq!(pace(t0, interval, t0), t0 + interval);
        assert_eq!(pace(t0, interval, t0 + CATCH_UP), t0 + interval);
        // Stalled for two seconds: at most CATCH_UP's worth is sent at once.
        let late = t0 + Duration::from_secs(2);
        assert_eq!(pace(t0, interval, late), late - CATCH_UP);
        let burst = (1..)
            .scan(t0, |due, _| {
                *due = pace(*due, interval, late);
                Some(*due)
            })
            .take_while(|due| *due <= late)
            .count();
        assert_eq!(burst as u128, CATCH_UP.as_millis() + 1);
    }

    #[test]
    fn a_failure_names_the_missing_ranges_and_when_they_were_sent() {
        let seen: HashSet<u64> = (0..1000)
            .filter(|s| !(100..=149).contains(s) && *s != 998)
            .collect();
        assert_eq!(missing_ranges(&seen, 1000), [(100, 149), (998, 998)]);
        assert_eq!(
            missing_ranges(&seen, 1002),
            [(100, 149), (998, 998), (1000, 1001)]
        );
        // Sent every 2 ms, but for a stall of a second before datagram 120; the stream
        // started at 10:00:00 on some day.
        let sent_at: SendTimes = (0..1000)
            .map(|i| i * 2 + if i >= 120 { 1000 } else { 0 })
            .collect();
        let count = Count {
            stream: "w1 → w2".into(),
            sent: 1000,
            received: seen.len() as u64,
            duplicates: 0,
            longest_gap: Duration::ZERO,
            missing: missing_ranges(&seen, 1000),
            started: UNIX_EPOCH + Duration::from_secs(20_000 * 86_400 + 10 * 3600),
            sent_at,
        };
        assert_eq!(
            count.failure("w1: flanneld → agent").as_deref(),
            Some(
                "w1: flanneld → agent: w1 → w2 lost 51 and duplicated 0 of 1000 (sent over \
                 3.00s); missing 100–149 (sent 0.20–1.30s, 10:00:00.200 UTC), 998–998 (sent \
                 3.00–3.00s, 10:00:02.996 UTC)"
            )
        );
        let whole = Count {
            received: 1000,
            missing: Vec::new(),
            ..count
        };
        assert_eq!(whole.failure("event"), None);
    }
}
