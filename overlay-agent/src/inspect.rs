//! Views of the pinned maps for operators (tables) and scripts (`--json`).
//!
//! They only open the pins, read-only in effect, so they work beside a running agent
//! (the maps are shared kernel objects; the agent keeps its own handles).

use std::{collections::BTreeMap, fmt, fmt::Write as _, net::Ipv4Addr, path::Path};

use anyhow::Result;
use ipnet::Ipv4Net;
use overlay_common::{flows::FILTER_WORDS, maps::names};
use serde::Serialize;

use crate::datapath::{
    Config, Counters, Flows, NatEvents, Peers, Routes,
    conntrack::{self, Conntrack, Flow},
    maps::open_pinned,
};

/// How a view is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    /// One JSON document.
    Json,
}

/// Something the inspection commands print.
pub trait View: Serialize {
    fn table(&self) -> Result<String>;

    fn render(&self, format: Format) -> Result<String> {
        match format {
            Format::Table => self.table(),
            Format::Json => Ok(serde_json::to_string_pretty(self)? + "\n"),
        }
    }
}

/// One outcome counter.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CounterRow {
    pub hook: &'static str,
    pub reason: &'static str,
    /// `forward`, `pass` or `drop`.
    pub kind: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

/// The outcome counters per hook and reason.
#[derive(Debug, Clone, Serialize)]
pub struct CountersView {
    pub counters: Vec<CounterRow>,
}

/// The counters; zero rows are left out unless `all`.
pub fn counters(pin_dir: &Path, all: bool) -> Result<CountersView> {
    let counters = Counters::new(open_pinned(pin_dir, names::COUNTERS)?)?
        .all()?
        .into_iter()
        .filter(|(_, _, c)| all || c.packets != 0)
        .map(|(hook, reason, c)| CounterRow {
            hook: hook.name(),
            reason: reason.name(),
            kind: reason.kind().name(),
            packets: c.packets,
            bytes: c.bytes,
        })
        .collect();
    Ok(CountersView { counters })
}

impl View for CountersView {
    fn table(&self) -> Result<String> {
        let mut out = format!(
            "{:<16} {:<28} {:>12} {:>14}\n",
            "HOOK", "REASON", "PACKETS", "BYTES"
        );
        for c in &self.counters {
            writeln!(
                out,
                "{:<16} {:<28} {:>12} {:>14}",
                c.hook, c.reason, c.packets, c.bytes
            )?;
        }
        Ok(out)
    }
}

/// This node as the datapath is configured.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ThisNode {
    pub tunnel_ip: Ipv4Addr,
    pub pod_subnet: Ipv4Net,
}

/// A remote pod subnet, its node, and what that node sent us.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RemoteRow {
    pub subnet: Ipv4Net,
    pub node: Ipv4Addr,
    /// `tunnel`, or `direct` for a node reached without encapsulation
    /// (`Backend.DirectRouting`).
    pub path: &'static str,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodesView {
    /// None until the agent configured the datapath.
    pub this_node: Option<ThisNode>,
    pub remote_subnets: Vec<RemoteRow>,
}

/// This node's configuration, the remote subnets, and the traffic each peer sent.
pub fn nodes(pin_dir: &Path) -> Result<NodesView> {
    let config = Config::new(open_pinned(pin_dir, names::CONFIG)?)?.get()?;
    let routes = Routes::new(open_pinned(pin_dir, names::ROUTES)?)?.entries()?;
    let peers = Peers::new(open_pinned(pin_dir, names::PEERS)?)?.stats()?;
    let this_node = if config.node_ip == [0; 4] {
        None
    } else {
        Some(ThisNode {
            tunnel_ip: config.node_ip.into(),
            pod_subnet: Ipv4Net::new(config.pod_subnet.into(), config.pod_prefix_len)?,
        })
    };
    let remote_subnets = routes
        .into_iter()
        // A direct node's own address is no subnet: its node's rows say `direct`.
        .filter(|(_, route)| !route.node_address())
        .map(|(subnet, route)| {
            let node = Ipv4Addr::from(route.node_ip);
            let rx = peers.get(&node).copied().unwrap_or_default();
            RemoteRow {
                subnet,
                node,
                path: if route.direct() { "direct" } else { "tunnel" },
                rx_packets: rx.rx_packets,
                rx_bytes: rx.rx_bytes,
            }
        })
        .collect();
    Ok(NodesView {
        this_node,
        remote_subnets,
    })
}

impl View for NodesView {
    fn table(&self) -> Result<String> {
        let mut out = String::new();
        match &self.this_node {
            None => writeln!(out, "this node: not configured yet")?,
            Some(n) => writeln!(
                out,
                "this node: tunnel address {}, pod subnet {}",
                n.tunnel_ip, n.pod_subnet
            )?,
        }
        writeln!(
            out,
            "{:<20} {:<16} {:<7} {:>12} {:>14}",
            "REMOTE SUBNET", "NODE", "PATH", "RX PACKETS", "RX BYTES"
        )?;
        for r in &self.remote_subnets {
            writeln!(
                out,
                "{:<20} {:<16} {:<7} {:>12} {:>14}",
                r.subnet.to_string(),
                r.node.to_string(),
                r.path,
                r.rx_packets,
                r.rx_bytes
            )?;
        }
        Ok(out)
    }
}

/// An address and port (or ICMP identifier).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
}

impl From<(Ipv4Addr, u16)> for Endpoint {
    fn from((ip, port): (Ipv4Addr, u16)) -> Self {
        Self { ip, port }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

/// One tracked flow.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FlowRow {
    /// `tcp`, `udp`, `icmp`, or the protocol number.
    pub proto: String,
    pub src: Endpoint,
    pub dst: Endpoint,
    /// The translated source, for translated flows.
    pub translated: Option<Endpoint>,
    /// The masquerade rule that matched, when known.
    pub rule: Option<u8>,
    pub state: &'static str,
    pub age_seconds: u64,
    pub expires_in_seconds: u64,
}

impl From<&Flow> for FlowRow {
    fn from(f: &Flow) -> Self {
        Self {
            proto: proto_name(f.proto),
            src: f.src.into(),
            dst: f.dst.into(),
            translated: f.translated.map(Endpoint::from),
            rule: f.rule.map(|r| r as u8),
            state: f.state(),
            age_seconds: f.age.as_secs(),
            expires_in_seconds: f.expires_in.as_secs(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct NatView {
    pub flows: Vec<FlowRow>,
    /// Masquerade event totals by name.
    pub events: BTreeMap<&'static str, u64>,
}

fn proto_name(proto: u8) -> String {
    match proto {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        p => p.to_string(),
    }
}

/// The masquerade connection table (a full walk: for operators, never for metrics)
/// and the event counts.
pub fn nat(pin_dir: &Path) -> Result<NatView> {
    let flows = Conntrack::new(open_pinned(pin_dir, names::CONNTRACK)?)?.flows()?;
    let events = NatEvents::new(open_pinned(pin_dir, names::NAT_EVENTS)?)?.all()?;
    Ok(NatView {
        flows: flows.iter().map(FlowRow::from).collect(),
        events: events.into_iter().map(|(e, n)| (e.name(), n)).collect(),
    })
}

impl View for NatView {
    fn table(&self) -> Result<String> {
        let mut out = format!(
            "{:<5} {:<22} {:<22} {:<22} {:<5} {:<12} {:>8} {:>8}\n",
            "PROTO", "SOURCE", "DESTINATION", "TRANSLATED TO", "RULE", "STATE", "AGE", "EXPIRES"
        );
        for f in &self.flows {
            let translated = f.translated.map_or("-".to_owned(), |t| t.to_string());
            let rule = f.rule.map_or("?".to_owned(), |r| r.to_string());
            writeln!(
                out,
                "{:<5} {:<22} {:<22} {:<22} {:<5} {:<12} {:>7}s {:>7}s",
                f.proto,
                f.src.to_string(),
                f.dst.to_string(),
                translated,
                rule,
                f.state,
                f.age_seconds,
                f.expires_in_seconds
            )?;
        }
        writeln!(out, "{} flows", self.flows.len())?;
        for (event, n) in &self.events {
            writeln!(out, "{event:<24} {n:>12}")?;
        }
        Ok(out)
    }
}

/// One direction of the fast path's flow table.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FastFlowRow {
    pub proto: String,
    pub src: Endpoint,
    pub dst: Endpoint,
    /// What the fast path makes of it: `fast` (admitted, seen under the current
    /// ruleset), `admitted-unseen` (admitted, to be seen again under the current
    /// ruleset), `unfiltered` (admitted, but its bit in the filter is clear, so the
    /// programs do not see it: the agent sets it at its next pass), `stale` (its
    /// admission ran out), `closing`, `refused` (the host translates it), `host` (not
    /// admitted yet).
    pub state: &'static str,
    pub host_packets: u32,
    /// Seconds since the fast path last carried it; None: never.
    pub fast_seconds_ago: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FastFlowsView {
    /// Whether the programs may take admitted flows at all.
    pub fast_path_on: bool,
    pub ruleset_generation: u32,
    /// Bits set in the filter the programs read before a lookup (of
    /// `overlay_common::flows::FILTER_WORDS` × 64).
    pub filter_bits_set: u32,
    pub flows: Vec<FastFlowRow>,
}

/// The fast path's flow table, busiest directions first.
pub fn flows(pin_dir: &Path) -> Result<FastFlowsView> {
    use overlay_common::flows::{CLOSING, REFUSED};

    let config = Config::new(open_pinned(pin_dir, names::CONFIG)?)?.get()?;
    let now = conntrack::monotonic_ns();
    let table = Flows::new(
        open_pinned(pin_dir, names::FLOWS)?,
        open_pinned(pin_dir, names::FLOW_FILTER)?,
    )?;
    let mut flows: Vec<FastFlowRow> = table
        .entries()?
        .into_iter()
        .map(|(k, s)| {
            let state = if s.flags & REFUSED != 0 {
                "refused"
            } else if s.flags & CLOSING != 0 {
                "closing"
            } else if s.admitted == 0 {
                "host"
            } else if s.stale(now) {
                "stale"
            } else if s.seen_gen != config.ruleset_gen {
                "admitted-unseen"
            } else if !table.in_filter(&k) {
                "unfiltered"
            } else {
                "fast"
            };
            FastFlowRow {
                proto: proto_name(k.proto),
                src: (Ipv4Addr::from(k.src), u16::from_be_bytes(k.sport)).into(),
                dst: (Ipv4Addr::from(k.dst), u16::from_be_bytes(k.dport)).into(),
                state,
                host_packets: s.host_packets,
                fast_seconds_ago: (s.last_fast_ns != 0)
                    .then(|| now.saturating_sub(s.last_fast_ns) / 1_000_000_000),
            }
        })
        .collect();
    flows.sort_by_key(|f| std::cmp::Reverse(f.host_packets));
    Ok(FastFlowsView {
        fast_path_on: config.fast_path(),
        ruleset_generation: config.ruleset_gen,
        filter_bits_set: table.filter_bits_set(),
        flows,
    })
}

impl View for FastFlowsView {
    fn table(&self) -> Result<String> {
        let mut out = format!(
            "fast path {}, ruleset generation {}, {} of {} filter bits set\n\
             {:<5} {:<22} {:<22} {:<16} {:>12} {:>10}\n",
            if self.fast_path_on { "on" } else { "off" },
            self.ruleset_generation,
            self.filter_bits_set,
            FILTER_WORDS * 64,
            "PROTO",
            "SOURCE",
            "DESTINATION",
            "STATE",
            "HOST PKTS",
            "FAST AGO"
        );
        for f in &self.flows {
            let ago = f
                .fast_seconds_ago
                .map_or("-".to_owned(), |s| format!("{s}s"));
            writeln!(
                out,
                "{:<5} {:<22} {:<22} {:<16} {:>12} {:>10}",
                f.proto,
                f.src.to_string(),
                f.dst.to_string(),
                f.state,
                f.host_packets,
                ago
            )?;
        }
        writeln!(out, "{} directions", self.flows.len())?;
        Ok(out)
    }
}
