//! What a benchmark run found, as it travels from the VM to the report (JSON), and its
//! summaries: medians and spreads over runs, ratios between dataplanes.

use serde::{Deserialize, Serialize};

use super::{
    host::Machine,
    node::NodeRules,
    setup::{Plan, Setup},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Measure {
    TcpStream,
    TcpMulti,
    RrRate,
    RrP50,
    RrP99,
    ConnRate,
    UdpRate,
    SnatConnRate,
    /// Request/response to the server pod through the bench's ClusterIP Service.
    SvcRrRate,
    SvcRrP50,
    SvcRrP99,
    /// Connections to the server pod through the bench's ClusterIP Service.
    SvcConnRate,
}

impl Measure {
    pub(super) const PLANES: [Measure; 11] = [
        Measure::TcpStream,
        Measure::TcpMulti,
        Measure::RrP50,
        Measure::RrP99,
        Measure::RrRate,
        Measure::ConnRate,
        Measure::UdpRate,
        Measure::SvcRrP50,
        Measure::SvcRrP99,
        Measure::SvcRrRate,
        Measure::SvcConnRate,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Measure::TcpStream => "TCP, 1 stream",
            Measure::TcpMulti => "TCP, 4 streams",
            Measure::RrRate => "request/response rate",
            Measure::RrP50 => "request/response latency p50",
            Measure::RrP99 => "request/response latency p99",
            Measure::ConnRate => "connection rate",
            Measure::UdpRate => "UDP 64-byte datagrams",
            Measure::SnatConnRate => "connection rate to the outside",
            Measure::SvcRrRate => "request/response rate via a ClusterIP",
            Measure::SvcRrP50 => "request/response latency p50 via a ClusterIP",
            Measure::SvcRrP99 => "request/response latency p99 via a ClusterIP",
            Measure::SvcConnRate => "connection rate via a ClusterIP",
        }
    }

    pub(super) fn unit(self) -> &'static str {
        match self {
            Measure::TcpStream | Measure::TcpMulti => "Gbit/s",
            Measure::RrRate | Measure::SvcRrRate => "trans/s",
            Measure::RrP50 | Measure::RrP99 | Measure::SvcRrP50 | Measure::SvcRrP99 => "µs",
            Measure::ConnRate | Measure::SnatConnRate | Measure::SvcConnRate => "conn/s",
            Measure::UdpRate => "pkt/s",
        }
    }

    /// What the CPU figure is per.
    pub(super) fn cpu_unit(self) -> &'static str {
        match self {
            Measure::TcpStream | Measure::TcpMulti => "µs/MB",
            Measure::RrRate
            | Measure::RrP50
            | Measure::RrP99
            | Measure::SvcRrRate
            | Measure::SvcRrP50
            | Measure::SvcRrP99 => "µs/trans",
            Measure::ConnRate | Measure::SnatConnRate | Measure::SvcConnRate => "µs/conn",
            Measure::UdpRate => "µs/pkt",
        }
    }

    /// The time one unit of work took (µs per megabyte, transaction, connection or
    /// datagram: the CPU figure's unit), from a figure of this measure: a latency is
    /// one already, a rate is inverted.
    pub(super) fn time_per_unit(self, value: f64) -> f64 {
        match self {
            m if m.lower_is_better() => value,
            // 8e6 bits at `value` Gbit/s.
            Measure::TcpStream | Measure::TcpMulti => 8e3 / value,
            _ => 1e6 / value,
        }
    }

    /// Latencies: smaller is better.
    pub(super) fn lower_is_better(self) -> bool {
        matches!(
            self,
            Measure::RrP50 | Measure::RrP99 | Measure::SvcRrP50 | Measure::SvcRrP99
        )
    }

    /// The floor's measure this one is set against: the floor has no outside host
    /// and no Service, so a masquerade's connections and those through a ClusterIP
    /// are set against its connections between the pods.
    pub(super) fn on_the_floor(self) -> Measure {
        match self {
            Measure::SnatConnRate | Measure::SvcConnRate => Measure::ConnRate,
            Measure::SvcRrRate => Measure::RrRate,
            Measure::SvcRrP50 => Measure::RrP50,
            Measure::SvcRrP99 => Measure::RrP99,
            m => m,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Sample {
    pub setup: Setup,
    pub offloads: bool,
    pub run: usize,
    pub measure: Measure,
    pub value: f64,
    pub cpu_us_per_unit: f64,
    /// The busiest CPU's busy share of the measurement (0–1); absent from runs saved
    /// before it was measured.
    #[serde(default)]
    pub busiest_cpu: Option<f64>,
    /// Units of work that failed and are not in `value` (connections, for the
    /// connection rates).
    #[serde(default)]
    pub failed: u64,
}

impl Sample {
    pub(super) fn describe(&self) -> String {
        let failed = match self.failed {
            0 => String::new(),
            n => format!(", {n} failed"),
        };
        let busiest = self.busiest_cpu.map_or(String::new(), |b| {
            format!(", busiest CPU {:.0} %", b * 100.0)
        });
        format!(
            "{:32} {:>12.3} {:8} (CPU {:.1} {}{busiest}{failed})",
            self.measure.name(),
            self.value,
            self.measure.unit(),
            self.cpu_us_per_unit,
            self.measure.cpu_unit()
        )
    }
}

/// One case of the program-cost microbenchmark.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Cost {
    pub case: String,
    pub program: String,
    /// Median over rounds of the mean ns per run.
    pub ns: f64,
    pub rounds: Vec<f64>,
}

/// Parses the `PROG_COST {...}` lines of the microbenchmark.
pub(super) fn parse_costs(output: &str) -> Vec<Cost> {
    output
        .lines()
        // libtest may print the test's name on the same line, before the first one.
        .filter_map(|l| l.split_once("PROG_COST ").map(|(_, json)| json))
        .filter_map(|json| serde_json::from_str(json).ok())
        .collect()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Results {
    /// Where the dataplanes ran.
    pub machine: Machine,
    pub runs: usize,
    pub seconds: u64,
    pub streams: usize,
    /// The TCP congestion control every connection ran.
    pub congestion: String,
    pub quick: bool,
    /// The netfilter rules every node carried; absent from runs saved before the nodes
    /// carried any, and from runs of the floor alone.
    #[serde(default)]
    pub node_rules: Option<NodeRules>,
    pub samples: Vec<Sample>,
}

impl Results {
    pub(super) fn new(machine: Machine, plan: Plan, quick: bool) -> Self {
        Self {
            machine,
            runs: plan.runs,
            seconds: plan.seconds,
            streams: plan.streams,
            congestion: plan.congestion.name().to_owned(),
            quick,
            node_rules: None,
            samples: Vec::new(),
        }
    }

    /// The values of one cell over its runs.
    fn values(&self, setup: Setup, measure: Measure, offloads: bool) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| s.setup == setup && s.measure == measure && s.offloads == offloads)
            .collect()
    }

    pub(super) fn summary(
        &self,
        setup: Setup,
        measure: Measure,
        offloads: bool,
    ) -> Option<Summary> {
        let samples = self.values(setup, measure, offloads);
        Summary::of(
            samples.iter().map(|s| s.value).collect(),
            samples.iter().map(|s| s.cpu_us_per_unit).collect(),
            samples.iter().filter_map(|s| s.busiest_cpu).collect(),
        )
    }

    /// `setup`'s median over `baseline`'s.
    pub(super) fn ratio(
        &self,
        setup: Setup,
        baseline: Setup,
        measure: Measure,
        offloads: bool,
    ) -> Option<f64> {
        let ours = self.summary(setup, measure, offloads)?.median;
        let theirs = self.summary(baseline, measure, offloads)?.median;
        (theirs > 0.0 && ours > 0.0).then_some(ours / theirs)
    }

    /// What `setup` adds to the floor's time per unit of work (of the medians): the
    /// dataplane's own part of the figure ([`Measure::on_the_floor`]).
    pub(super) fn above_floor(
        &self,
        setup: Setup,
        measure: Measure,
        offloads: bool,
    ) -> Option<f64> {
        let floor_measure = measure.on_the_floor();
        let time = |s: Setup, m: Measure| {
            let median = self.summary(s, m, offloads)?.median;
            (median > 0.0).then(|| m.time_per_unit(median))
        };
        Some(time(setup, measure)? - time(Setup::Floor, floor_measure)?)
    }

    /// `setup`'s value over `baseline`'s in each run that measured both, in the order
    /// of the runs.
    pub(super) fn run_ratios(
        &self,
        setup: Setup,
        baseline: Setup,
        measure: Measure,
        offloads: bool,
    ) -> Vec<f64> {
        let theirs = self.values(baseline, measure, offloads);
        self.values(setup, measure, offloads)
            .into_iter()
            .filter_map(|ours| {
                let base = theirs.iter().find(|t| t.run == ours.run)?;
                (base.value > 0.0 && ours.value > 0.0).then_some(ours.value / base.value)
            })
            .collect()
    }
}

/// Median and spread (min, max) of a cell, the median CPU per unit, and the median
/// busy share of the busiest CPU (where the runs measured it).
#[derive(Debug, Clone, Copy)]
pub(super) struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub cpu: f64,
    pub busiest_cpu: Option<f64>,
}

impl Summary {
    fn of(values: Vec<f64>, cpu: Vec<f64>, busiest: Vec<f64>) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Self {
            median: median(values.clone()),
            min,
            max,
            cpu: median(cpu),
            busiest_cpu: (!busiest.is_empty()).then(|| median(busiest)),
        })
    }
}

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_cost_lines() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        let costs = parse_costs(
            "noise\ntest datapath::cost::cost_per_packet ... PROG_COST {\"case\":\"encap\",\"program\":\"bridge_ingress\",\"ns\":188.5,\"rounds\":[188.5, 190.0]}\n",
        );
        assert_eq!(costs.len(), 1);
        assert_eq!(costs[0].case, "encap");
        assert_eq!(costs[0].ns, 188.5);
    }
}
