//! `/metrics`: the datapath's counters and the agent's health in the OpenMetrics text
//! format (which Prometheus scrapes natively).
//!
//! Everything is read at scrape time. Series from BPF maps come from the pins, the way
//! the inspection commands read them: no lock is shared with the run loop, which owns
//! the loaded maps, so a scrape never waits for a reconcile pass nor delays one, and
//! it still answers while the loop is stuck (which `/healthz` then reports). The one
//! read that would cost a walk of a large map, the connection table's fill level,
//! comes from the run loop's last sweep instead.
//!
//! Label values are single words (`pod_veths`, not `pod veths`), which every query
//! language and text tool takes as they are. The per-peer series
//! (`peer_received_*{peer}`) are the one family whose size grows with the cluster:
//! two series per peer on every node, 2N(N-1) across N nodes, which is why
//! `--metrics-per-peer=auto` exports them only up to [`PER_PEER_AUTO_MAX`] peers
//! (see there), and `overlay_peer_metrics_exported` says whether they are.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, path::PathBuf, sync::Arc};

use anyhow::{Context as _, Result};
use aya::maps::MapInfo;
use overlay_common::{Counter, Hook, PeerStats, Reason, counters::NatEvent, maps::names};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, text},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge, info::Info},
    registry::{Registry, Unit},
};
use tracing::debug;

use crate::{
    datapath::{Counters, NatEvents, Peers, Routes, maps::open_pinned},
    status::Status,
};

/// Peers up to which `--metrics-per-peer=auto` exports the per-peer series. At 100
/// peers they are 200 series a node, fewer than the datapath's fixed outcome series
/// (5 hooks x ~50 reasons, packets and bytes: about 500), and about 20,000 across the
/// cluster; at 1,000 nodes they would be 2,000 a node and 2 million across the
/// cluster, beyond what one Prometheus server holds comfortably. Prometheus' own
/// guidance (prometheus.io/docs/practices/naming: "Do not use labels to store
/// dimensions with high cardinality (many different label values)";
/// /docs/practices/instrumentation, "Do not overuse labels": keep a metric's
/// cardinality low and limit the exceptions to a handful across the system) puts a
/// per-peer label among the exceptions to keep small: past this size, `peer` is as
/// unbounded as the cluster.
pub const PER_PEER_AUTO_MAX: usize = 100;

/// Whether the per-peer series are exported (`--metrics-per-peer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PerPeer {
    /// Up to [`PER_PEER_AUTO_MAX`] peers.
    #[default]
    Auto,
    On,
    Off,
}

impl PerPeer {
    /// Whether the series of `peers` peers are exported.
    pub fn exports(self, peers: usize) -> bool {
        match self {
            PerPeer::Auto => peers <= PER_PEER_AUTO_MAX,
            PerPeer::On => true,
            PerPeer::Off => false,
        }
    }
}

/// The agent's metrics: its health from `status`, the datapath from the maps pinned
/// in `pin_dir`.
/// `bridge` names the pod bridge for the `interface` label; the uplink's name comes
/// from `status` once the agent has selected it. `per_peer` decides on the per-peer
/// series.
pub fn registry(
    status: Arc<Status>,
    pin_dir: PathBuf,
    bridge: String,
    per_peer: PerPeer,
) -> Registry {
    let mut registry = Registry::with_prefix("overlay");
    registry.register(
        "build",
        "The agent's version",
        Info::new([("version", env!("CARGO_PKG_VERSION"))]),
    );
    registry.register_collector(Box::new(Exporter {
        status,
        pin_dir,
        bridge,
        per_peer,
    }));
    registry
}

/// One scrape.
pub fn encode(registry: &Registry) -> Result<String, fmt::Error> {
    let mut body = String::new();
    text::encode(&mut body, registry)?;
    Ok(body)
}

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A metric family as exported. The encoder adds the `overlay_` prefix, the unit and,
/// for counters, `_total`: `datapath_packets` is `overlay_datapath_packets_total`.
#[derive(Clone, Copy)]
struct Family {
    name: &'static str,
    help: &'static str,
    unit: Option<BaseUnit>,
    kind: MetricType,
}

/// The base units in use (prometheus-client's `Unit` cannot be built in a constant).
#[derive(Clone, Copy)]
enum BaseUnit {
    Seconds,
    Bytes,
}

impl Family {
    const fn new(kind: MetricType, name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            unit: None,
            kind,
        }
    }

    const fn counter(name: &'static str, help: &'static str) -> Self {
        Self::new(MetricType::Counter, name, help)
    }

    const fn gauge(name: &'static str, help: &'static str) -> Self {
        Self::new(MetricType::Gauge, name, help)
    }

    const fn in_(self, unit: BaseUnit) -> Self {
        Self {
            unit: Some(unit),
            ..self
        }
    }

    fn describe<'e>(
        &self,
        enc: &'e mut DescriptorEncoder,
    ) -> Result<MetricEncoder<'e>, fmt::Error> {
        static SECONDS: Unit = Unit::Seconds;
        static BYTES: Unit = Unit::Bytes;
        let unit = self.unit.map(|u| match u {
            BaseUnit::Seconds => &SECONDS,
            BaseUnit::Bytes => &BYTES,
        });
        enc.encode_descriptor(self.name, self.help, unit, self.kind)
    }

    /// The family with one series per row.
    fn rows<L: EncodeLabelSet, M: EncodeMetric>(
        &self,
        enc: &mut DescriptorEncoder,
        rows: impl IntoIterator<Item = (L, M)>,
    ) -> fmt::Result {
        let mut family = self.describe(enc)?;
        for (labels, metric) in rows {
            metric.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// The family as one series without labels.
    fn one(&self, enc: &mut DescriptorEncoder, metric: &impl EncodeMetric) -> fmt::Result {
        debug_assert_eq!(metric.metric_type().as_str(), self.kind.as_str());
        metric.encode(self.describe(enc)?)
    }

    fn counter_value(&self, enc: &mut DescriptorEncoder, value: u64) -> fmt::Result {
        self.one(enc, &ConstCounter::new(value))
    }

    fn gauge_value(&self, enc: &mut DescriptorEncoder, value: i64) -> fmt::Result {
        self.one(enc, &ConstGauge::new(value))
    }
}

// The agent.
const READY: Family = Family::gauge(
    "ready",
    "The node set is synced and the last reconcile pass made the datapath match it",
);
const SOURCE_SYNCED: Family = Family::gauge(
    "node_source_synced",
    "The node source delivered a complete node set",
);
const SOURCE_FAILING: Family = Family::gauge(
    "node_source_failing",
    "The node source's last attempt failed (the datapath keeps the last node set)",
);
const SOURCE_ERRORS: Family = Family::counter(
    "node_source_errors",
    "Errors of the node source (API or file errors)",
);
const LEASES_LOST: Family = Family::counter(
    "subnet_leases_lost",
    "Times this node's subnet lease was deleted or taken over and leased again (etcd)",
);
const SUBNET_CHANGES: Family = Family::counter(
    "subnet_changes",
    "Times leasing again gave this node another subnet (etcd): pods of the old one lost their routes",
);
const NODES: Family = Family::gauge("nodes", "Nodes in the node set of the last reconcile pass");
const REMOTE_SUBNETS: Family = Family::gauge(
    "remote_subnets",
    "Remote pod subnets of the last reconcile pass",
);
const FLANNELD_LEFTOVERS: Family = Family::counter(
    "flanneld_leftovers_removed",
    "What flanneld left on the node that the agent removed, by kind",
);
const RECONCILE_PASSES: Family = Family::counter("reconcile_passes", "Reconcile passes");
const RECONCILE_FAILURES: Family =
    Family::counter("reconcile_failures", "Reconcile passes that failed");
const RECONCILE_DURATION: Family = Family::new(
    MetricType::Histogram,
    "reconcile_duration",
    "Duration of reconcile passes",
)
.in_(BaseUnit::Seconds);
const CONNTRACK_SWEEPS: Family =
    Family::counter("conntrack_sweeps", "Sweeps of the connection table");
const CONNTRACK_REMOVED: Family = Family::counter(
    "conntrack_removed",
    "Connection-table entries removed by sweeps: expired flows, and reply entries that lost their flow",
);

const FORWARD_RULES_IN_PLACE: Family = Family::gauge(
    "forward_rules_in_place",
    "flanneld's FORWARD accept rules (--iptables-forward-rules) were in place at the last check",
);
const FORWARD_RULES_WRITTEN: Family = Family::counter(
    "forward_rules_written",
    "Checks of the forward rules that found some missing and wrote them again (the first included)",
);
const FORWARD_RULES_ERRORS: Family = Family::counter(
    "forward_rules_errors",
    "Checks of the forward rules that failed (iptables or nft missing or failing)",
);

const FAST_PATH_ON: Family = Family::gauge(
    "fast_path_on",
    "The programs may take admitted flows past the host stack (0: every packet goes through it)",
);
const RULESET_CHANGES: Family = Family::counter(
    "ruleset_changes",
    "Commits of the host's netfilter ruleset seen: each sends every flow through the host again",
);
const FAST_PATH_FLOWS: Family = Family::counter(
    "fast_path_flows",
    "Flow directions by what admission did: admitted, refused (translated by the host), refreshed (conntrack entry kept alive), forgotten (the host no longer tracks it)",
);

// The datapath.
const DATAPATH_UP: Family = Family::gauge(
    "datapath_up",
    "The datapath's pinned maps are readable (0 while it loads)",
);
const DATAPATH_PACKETS: Family = Family::counter(
    "datapath_packets",
    "Packets seen by a program, by outcome (exactly one per packet)",
);
const DATAPATH_BYTES: Family = Family::counter(
    "datapath",
    "Bytes of the packets seen by a program (as they arrived), by outcome",
)
.in_(BaseUnit::Bytes);
const NAT_EVENTS: Family = Family::counter("nat_events", "Masquerade events");
const MAP_ENTRIES: Family = Family::gauge(
    "map_entries",
    "Entries in a BPF map (conntrack: after the last sweep)",
);
const MAP_MAX_ENTRIES: Family = Family::gauge("map_max_entries", "Capacity of a BPF map");
const PEER_METRICS_EXPORTED: Family = Family::gauge(
    "peer_metrics_exported",
    "Whether the per-peer series (peer_received_*) are exported: --metrics-per-peer, by default up to 100 peers",
);
const PEER_PACKETS: Family = Family::counter(
    "peer_received_packets",
    "IPIP packets received from a known node",
);
const PEER_BYTES: Family = Family::counter(
    "peer_received",
    "Bytes of IPIP packets received from a known node (outer packets)",
)
.in_(BaseUnit::Bytes);

#[derive(Debug)]
struct Exporter {
    status: Arc<Status>,
    pin_dir: PathBuf,
    bridge: String,
    per_peer: PerPeer,
}

impl Collector for Exporter {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        self.encode_agent(&mut enc)?;
        match Maps::read(&self.pin_dir) {
            Ok(maps) => {
                DATAPATH_UP.gauge_value(&mut enc, 1)?;
                self.encode_datapath(&mut enc, &maps)
            }
            Err(e) => {
                // Expected while the datapath loads; the gauge says so.
                let error = format!("{e:#}");
                debug!(error, "metrics: datapath maps unreadable");
                DATAPATH_UP.gauge_value(&mut enc, 0)
            }
        }
    }
}

impl Exporter {
    fn encode_agent(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let s = &self.status;
        READY.gauge_value(enc, s.ready().is_ok().into())?;
        let source = s.source();
        SOURCE_SYNCED.gauge_value(enc, source.synced.into())?;
        SOURCE_FAILING.gauge_value(enc, source.error.is_some().into())?;
        SOURCE_ERRORS.counter_value(enc, source.errors_total)?;
        let leases = s.leases();
        LEASES_LOST.counter_value(enc, leases.lost)?;
        SUBNET_CHANGES.counter_value(enc, leases.subnet_changes)?;
        let left = s.flanneld_leftovers();
        let left = [
            ("device", left.devices),
            ("iptables_rule", left.iptables_rules),
            ("iptables_chain", left.iptables_chains),
            ("nftables_chain", left.nftables_chains),
        ];
        FLANNELD_LEFTOVERS.rows(
            enc,
            left.map(|(what, n)| ([("what", what)], ConstCounter::new(n))),
        )?;
        if let Some(c) = s.convergence() {
            NODES.gauge_value(enc, count(c.nodes))?;
            REMOTE_SUBNETS.gauge_value(enc, count(c.remote_subnets))?;
        }
        let totals = s.reconciles();
        RECONCILE_PASSES.counter_value(enc, totals.passes)?;
        RECONCILE_FAILURES.counter_value(enc, totals.failures)?;
        RECONCILE_DURATION.one(enc, s.reconcile_seconds())?;
        if let Some(f) = s.forward_rules() {
            FORWARD_RULES_IN_PLACE.gauge_value(enc, f.in_place.into())?;
            FORWARD_RULES_WRITTEN.counter_value(enc, f.written)?;
            FORWARD_RULES_ERRORS.counter_value(enc, f.errors_total)?;
        }
        let fast = s.fast_path();
        FAST_PATH_ON.gauge_value(enc, fast.on.into())?;
        RULESET_CHANGES.counter_value(enc, fast.ruleset_changes)?;
        let admission = [
            ("admitted", fast.admitted),
            ("refused", fast.refused),
            ("refreshed", fast.refreshed),
            ("forgotten", fast.forgotten),
        ];
        FAST_PATH_FLOWS.rows(
            enc,
            admission.map(|(what, n)| ([("action", what)], ConstCounter::new(n))),
        )?;
        let sweeps = s.sweeps();
        CONNTRACK_SWEEPS.counter_value(enc, sweeps.sweeps)?;
        let removed = [("expired", sweeps.expired), ("orphan", sweeps.orphans)];
        CONNTRACK_REMOVED.rows(
            enc,
            removed.map(|(cause, n)| ([("cause", cause)], ConstCounter::new(n))),
        )
    }

    fn encode_datapath(&self, enc: &mut DescriptorEncoder, maps: &Maps) -> fmt::Result {
        let uplink = self.status.uplink();
        let interface = |hook: Hook| match hook {
            Hook::BridgeIngress | Hook::BridgeEgress => self.bridge.as_str(),
            Hook::UplinkIngress | Hook::UplinkEgress => uplink.as_str(),
            Hook::PodIngress => "pod_veths",
        };
        let counters = |value: fn(&Counter) -> u64| {
            maps.counters.iter().map(move |(hook, reason, c)| {
                let labels = [
                    ("hook", hook.name()),
                    ("interface", interface(*hook)),
                    ("reason", reason.name()),
                    ("kind", reason.kind().name()),
                ];
                (labels, ConstCounter::new(value(c)))
            })
        };
        DATAPATH_PACKETS.rows(enc, counters(|c| c.packets))?;
        DATAPATH_BYTES.rows(enc, counters(|c| c.bytes))?;

        let events = maps.nat_events.iter();
        NAT_EVENTS.rows(
            enc,
            events.map(|(e, n)| ([("event", e.name())], ConstCounter::new(*n))),
        )?;

        let fill = [
            ("routes", Some(maps.routes), maps.capacity.routes),
            ("peers", Some(maps.peers.len()), maps.capacity.peers),
            (
                "conntrack",
                self.status.sweeps().entries,
                maps.capacity.conntrack,
            ),
        ];
        let entries = fill
            .iter()
            .filter_map(|(map, n, _)| Some(([("map", *map)], ConstGauge::new(count((*n)?)))));
        MAP_ENTRIES.rows(enc, entries)?;
        let capacity = fill
            .iter()
            .map(|(map, _, max)| ([("map", *map)], ConstGauge::new(i64::from(*max))));
        MAP_MAX_ENTRIES.rows(enc, capacity)?;

        let exported = self.per_peer.exports(maps.peers.len());
        PEER_METRICS_EXPORTED.gauge_value(enc, exported.into())?;
        if !exported {
            return Ok(());
        }
        let peers = |value: fn(&PeerStats) -> u64| {
            maps.peers
                .iter()
                .map(move |(ip, s)| ([("peer", ip.to_string())], ConstCounter::new(value(s))))
        };
        PEER_PACKETS.rows(enc, peers(|s| s.rx_packets))?;
        PEER_BYTES.rows(enc, peers(|s| s.rx_bytes))
    }
}

/// What one scrape reads from the pinned maps.
struct Maps {
    counters: Vec<(Hook, Reason, Counter)>,
    nat_events: Vec<(NatEvent, u64)>,
    routes: usize,
    peers: BTreeMap<Ipv4Addr, PeerStats>,
    capacity: Capacity,
}

struct Capacity {
    routes: u32,
    peers: u32,
    conntrack: u32,
}

impl Maps {
    fn read(pin_dir: &std::path::Path) -> Result<Self> {
        let max_entries = |name: &str| -> Result<u32> {
            let info = MapInfo::from_pin(pin_dir.join(name))
                .with_context(|| format!("map info of {name}"))?;
            Ok(info.max_entries())
        };
        Ok(Self {
            counters: Counters::new(open_pinned(pin_dir, names::COUNTERS)?)?.all()?,
            nat_events: NatEvents::new(open_pinned(pin_dir, names::NAT_EVENTS)?)?.all()?,
            routes: Routes::new(open_pinned(pin_dir, names::ROUTES)?)?
                .entries()?
                .len(),
            peers: Peers::new(open_pinned(pin_dir, names::PEERS)?)?.stats()?,
            capacity: Capacity {
                routes: max_entries(names::ROUTES)?,
                peers: max_entries(names::PEERS)?,
                conntrack: max_entries(names::CONNTRACK)?,
            },
        })
    }
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_pins_the_agent_still_reports() {
        let status = Arc::new(Status::default());
        status.set_uplink("eth0");
        let pins = PathBuf::from("/nonexistent/overlay-ipip");
        let body = encode(&registry(status, pins, "cni0".into(), PerPeer::Auto)).unwrap();
        for line in [
            "overlay_datapath_up 0",
            "overlay_ready 0",
            "overlay_node_source_synced 0",
            "overlay_reconcile_passes_total 0",
            "overlay_reconcile_duration_seconds_count 0",
            "overlay_conntrack_removed_total{cause=\"expired\"} 0",
        ] {
            assert!(body.lines().any(|l| l == line), "{line} missing in\n{body}");
        }
        // Nothing from the maps, and no fill level before the first sweep.
        assert!(!body.contains("overlay_datapath_packets_total"));
        assert!(!body.contains("overlay_map_entries{"));
        // No pass yet: no node counts to report.
        assert!(!body.contains("overlay_nodes "));
        assert!(body.ends_with("# EOF\n"));
    }

    #[test]
    fn per_peer_series_up_to_the_threshold_unless_told() {
        assert!(PerPeer::Auto.exports(0));
        assert!(PerPeer::Auto.exports(PER_PEER_AUTO_MAX));
        assert!(!PerPeer::Auto.exports(PER_PEER_AUTO_MAX + 1));
        assert!(PerPeer::On.exports(5000));
        assert!(!PerPeer::Off.exports(1));
    }
}
