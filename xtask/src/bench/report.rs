//! docs/BENCHMARKS.md: the command writes the block between the markers; everything
//! outside it (the investigation notes) is kept as it is.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::lab::machinery::flannel::Backend;

use super::{
    host::Machine,
    node::{self, NodeRules},
    results::{Cost, Measure, Results, Summary, median},
    setup::{KernelBackend, Setup, on_off},
};

pub(super) const BEGIN: &str =
    "<!-- bench:begin: written by `cargo xtask bench`; edit outside this block -->";
pub(super) const END: &str = "<!-- bench:end -->";

const TUNL0: Setup = Setup::Kernel(KernelBackend::Ipip);
const HOST_GW: Setup = Setup::Kernel(KernelBackend::HostGw);
const EQUAL_MTU: Setup = Setup::HostGwAtIpipMtu;
const NO_FAST_PATH: Setup = Setup::OursFastPathOff;

/// The microbenchmark's cases whose difference is what the fast path's check adds to
/// a packet it does not take, and the most it may add.
const CHECK: &str = "check";
const CHECK_OFF: &str = "check-off";
const CHECK_BOUND_NS: f64 = 30.0;

/// The dataplanes measured on one kernel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Leg {
    /// Where: "a VM booted with ..." or "this machine".
    pub place: String,
    pub results: Results,
    /// The microbenchmark on that kernel.
    pub costs: Vec<Cost>,
}

/// Everything one run of the command produced: kept beside the report as JSON, from
/// which `--redraw` writes the report and the plot again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Report {
    pub command: String,
    pub date: String,
    pub minutes: f64,
    /// The machine the command ran on.
    pub host: Machine,
    pub legs: Vec<Leg>,
    /// The plot's file name, beside the report.
    pub plot: String,
}

/// What a target's figures are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Figure {
    /// Ours over a baseline.
    Ratio,
    /// Nanoseconds per packet, from the microbenchmark.
    Nanoseconds,
}

/// One performance target (of the datapath or of the fast path) and how this run fared.
pub(super) struct Target {
    pub what: String,
    /// Ours' median over the baseline's; for the fast path's check, its cost.
    pub measured: Option<f64>,
    /// Ours over the baseline within each run (the two measured minutes apart, so
    /// that the machine's slower and faster spells fall on both alike); for the
    /// check, each round's difference, rounds paired in order.
    pub each_run: Vec<f64>,
    pub bound: f64,
    /// The measured figure must be at least the bound (else at most).
    pub at_least: bool,
    pub figure: Figure,
    /// What the table says when nothing was measured.
    pub missing: &'static str,
}

impl Target {
    fn meets(&self, ratio: f64) -> bool {
        if self.at_least {
            ratio >= self.bound
        } else {
            ratio <= self.bound
        }
    }

    pub(super) fn met(&self) -> Option<bool> {
        self.measured.map(|m| self.meets(m))
    }

    /// A ratio to two decimals (nanoseconds to one), or as many more (up to four) as
    /// it takes not to round it onto the bound and hide which side it is on (1.197× is
    /// not 1.20×).
    fn shown(&self, r: f64) -> String {
        let (mut decimals, unit) = match self.figure {
            Figure::Ratio => (2, "×"),
            Figure::Nanoseconds => (1, " ns"),
        };
        while decimals < 4
            && r != self.bound
            && format!("{r:.decimals$}") == format!("{:.decimals$}", self.bound)
        {
            decimals += 1;
        }
        format!("{r:.decimals$}{unit}")
    }

    /// The runs' ratios, lowest to highest, and how many runs meet the target.
    fn runs(&self) -> String {
        let Some(low) = self.each_run.iter().copied().reduce(f64::min) else {
            return "—".into();
        };
        let high = self.each_run.iter().copied().fold(low, f64::max);
        let meeting = self.each_run.iter().filter(|r| self.meets(**r)).count();
        format!(
            "{}–{} ({meeting} of {})",
            self.shown(low),
            self.shown(high),
            self.each_run.len()
        )
    }
}

pub(super) fn targets(results: &Results) -> Vec<Target> {
    let mut out = Vec::new();
    for offloads in [true, false] {
        let when = if offloads {
            "offloads on"
        } else {
            "offloads off"
        };
        let mut target = |what: &str, (ours, base): (Setup, Setup), m, bound, at_least| {
            out.push(Target {
                what: format!("{what} ({when})"),
                measured: results.ratio(ours, base, m, offloads),
                each_run: results.run_ratios(ours, base, m, offloads),
                bound,
                at_least,
                figure: Figure::Ratio,
                missing: "— (no baseline on this kernel)",
            })
        };
        let (tunl0, host_gw) = ((Setup::Ours, TUNL0), (Setup::Ours, HOST_GW));
        let stream = Measure::TcpStream;
        target(
            "single-stream TCP ≥ 1.10× kernel tunl0",
            tunl0,
            stream,
            1.10,
            true,
        );
        target(
            "single-stream TCP ≥ 0.95× host-gw",
            host_gw,
            stream,
            0.95,
            true,
        );
        target(
            "request/response latency p50 ≤ 0.85× kernel tunl0",
            tunl0,
            Measure::RrP50,
            0.85,
            false,
        );
        target(
            "SNAT connection rate ≥ 1.2× iptables MASQUERADE",
            (Setup::SnatOurs, Setup::SnatIptables),
            Measure::SnatConnRate,
            1.2,
            true,
        );
    }
    out
}

/// What the fast path's check adds to each packet it does not take: the
/// microbenchmark's `check` (a pod's segment of a flow the host decides: its key read
/// and looked up, not found) less `check-off` (the same segment, the fast path off).
pub(super) fn check_target(costs: &[Cost]) -> Target {
    let case = |name: &str| costs.iter().find(|c| c.case == name);
    let both = case(CHECK).zip(case(CHECK_OFF));
    Target {
        what: format!(
            "what the fast path's check adds to a packet ≤ {CHECK_BOUND_NS:.0} ns \
             ({CHECK} − {CHECK_OFF})"
        ),
        measured: both.map(|(on, off)| on.ns - off.ns),
        each_run: both.map_or_else(Vec::new, |(on, off)| {
            on.rounds
                .iter()
                .zip(&off.rounds)
                .map(|(on, off)| on - off)
                .collect()
        }),
        bound: CHECK_BOUND_NS,
        at_least: false,
        figure: Figure::Nanoseconds,
        missing: "— (no such cases in this run's microbenchmark)",
    }
}

impl Leg {
    fn markdown(&self, md: &mut String) {
        let r = &self.results;
        // Runs saved before the busiest CPU was measured have no brackets, and no word of
        // them.
        let busiest_measured = r.samples.iter().any(|s| s.busiest_cpu.is_some());
        let installed = r.node_rules.as_ref().map_or(String::new(), |n| {
            let s = &n.install_seconds;
            let low = s.iter().copied().fold(f64::INFINITY, f64::min);
            let high = s.iter().copied().fold(0.0, f64::max);
            format!(
                " The nodes' netfilter rules took {}–{} s to install per node, the nodes of \
                 a cluster at once (median {} s).",
                num(low),
                num(high),
                num(median(s.clone()))
            )
        });
        let _ = writeln!(
            md,
            "### On {}: kernel {}\n\n{} CPUs; kernel {} ({}). TCP congestion control: {} \
             on every connection, both ends (this kernel's default: {}).{installed}\n",
            self.place,
            r.machine.kernel,
            r.machine.cpus,
            r.machine.kernel,
            r.machine.kernel_version,
            r.congestion,
            r.machine.congestion_default
        );
        let mut targets = targets(r);
        targets.push(check_target(&self.costs));
        if targets.iter().any(|t| t.measured.is_some()) {
            let _ = writeln!(
                md,
                "Targets (ratios, ours ÷ baseline: of the medians over runs; in each run, \
                 the two measured minutes apart. The fast path's check, ns per packet: of \
                 the microbenchmark's medians; in each round, rounds paired in order. And \
                 how many runs or rounds meet the target):\n\n\
                 | target | measured | in each run | met |\n|---|---|---|---|"
            );
            for t in targets {
                let met = match t.met() {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => t.missing,
                };
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {met} |",
                    t.what,
                    t.measured.map_or("—".into(), |m| t.shown(m)),
                    t.runs()
                );
            }
        }
        let _ = writeln!(
            md,
            "\nPer-packet program cost (`BPF_PROG_TEST_RUN`, ns per packet; check: a pod's \
             64-byte TCP segment to a remote pod of a flow the host decides, the fast path \
             on, no flow between the two pods admitted (the filter answers from the \
             addresses); check-lookup: the same with another flow between them admitted \
             (the filter lets the lookup in the flow table run, which finds nothing); \
             check-off: the same segment with the fast path off, so that check − check-off \
             is what the fast path's check adds to a packet it does not take, and \
             check-lookup − check-off what it adds beside an admitted flow; encap: that segment \
             of a flow the fast path admitted, encapsulated; decap: the reverse; snat: an \
             established flow to the outside, translated on the uplink; snat-bridge: the \
             same, as the pod sends it, translated on the bridge; snat-reply: its reply; \
             tunnelled: an encap result met again by the uplink's egress hook, as without \
             TCX; pass: underlay traffic that is not ours, the floor of entry, parsing, \
             counters and the kernel's clock reads):\n\n| case | program | ns (median of rounds) | rounds |\n|---|---|---|---|"
        );
        for c in &self.costs {
            let rounds: Vec<String> = c.rounds.iter().map(|v| num(*v)).collect();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                c.case,
                c.program,
                num(c.ns),
                rounds.join(", ")
            );
        }
        let planes: Vec<Setup> = Setup::PLANES
            .into_iter()
            .chain(Setup::REFERENCES)
            .filter(|s| r.samples.iter().any(|x| x.setup == *s))
            .collect();
        for offloads in [true, false] {
            let _ = writeln!(
                md,
                "\nPod to pod, offloads {}:\n",
                if offloads {
                    "on (GSO/GRO/TSO as the kernel sets them)"
                } else {
                    "off (GSO, GRO and TSO off on every link)"
                }
            );
            let mut header = String::from("| measure | unit |");
            for s in &planes {
                let _ = write!(header, " {} |", s.name());
            }
            let _ = write!(
                header,
                " ours ÷ tunl0 | ours ÷ host-gw | ours ÷ {} | ours ÷ fast path off |",
                EQUAL_MTU.name()
            );
            let _ = writeln!(md, "{header}\n|---|---|{}", "---|".repeat(planes.len() + 4));
            for m in Measure::PLANES {
                let _ = write!(md, "| {} | {} |", m.name(), m.unit());
                for s in &planes {
                    let _ = write!(md, " {} |", cell(r.summary(*s, m, offloads)));
                }
                let _ = writeln!(
                    md,
                    " {} | {} | {} | {} |",
                    ratio(r.ratio(Setup::Ours, TUNL0, m, offloads)),
                    ratio(r.ratio(Setup::Ours, HOST_GW, m, offloads)),
                    ratio(r.ratio(Setup::Ours, EQUAL_MTU, m, offloads)),
                    ratio(r.ratio(Setup::Ours, NO_FAST_PATH, m, offloads))
                );
            }
            let busiest = if busiest_measured {
                "; in brackets, how busy the busiest CPU was (median): near 100 %, one CPU \
                 bounds the figure, whatever the others have to spare"
            } else {
                ""
            };
            let _ = writeln!(
                md,
                "\nCPU per unit of work (median), offloads {}{busiest}:\n",
                on_off(offloads)
            );
            let mut header = String::from("| measure | unit |");
            for s in &planes {
                let _ = write!(header, " {} |", s.name());
            }
            let _ = writeln!(md, "{header}\n|---|---|{}", "---|".repeat(planes.len()));
            for m in [
                Measure::TcpStream,
                Measure::TcpMulti,
                Measure::RrRate,
                Measure::ConnRate,
                Measure::UdpRate,
                Measure::SvcRrRate,
                Measure::SvcConnRate,
            ] {
                let _ = write!(md, "| {} | {} |", m.name(), m.cpu_unit());
                for s in &planes {
                    let _ = write!(md, " {} |", cpu_cell(r.summary(*s, m, offloads)));
                }
                md.push('\n');
            }
        }
        let _ = writeln!(
            md,
            "\nMasquerade, connections from a pod to the outside host one after another \
             (connect, one byte each way, close): ours (`--ip-masq`) against a flannel \
             node's masquerade (flanneld's iptables rules: MASQUERADE --random-fully, the \
             kernel's connection tracking; no BPF on those nodes), and the same \
             connections with no translation at all (our agent without `--ip-masq`, the \
             router routing the pod subnets back to their nodes), which shows the part \
             of each connection's time that translation can take{}:\n",
            if busiest_measured {
                "; in brackets beside the CPU, how busy the busiest CPU was (median)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            md,
            "| offloads | ours --ip-masq (conn/s) | iptables MASQUERADE (conn/s) | routed, no NAT (conn/s) | ours ÷ iptables | routed ÷ iptables | CPU ours (µs/conn) | CPU iptables (µs/conn) | CPU routed (µs/conn) |\n|---|---|---|---|---|---|---|---|---|"
        );
        let m = Measure::SnatConnRate;
        for offloads in [true, false] {
            let summary = |s| r.summary(s, m, offloads);
            let cpu = |s| cpu_cell(summary(s));
            let vs_iptables = |s| ratio(r.ratio(s, Setup::SnatIptables, m, offloads));
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                on_off(offloads),
                cell(summary(Setup::SnatOurs)),
                cell(summary(Setup::SnatIptables)),
                cell(summary(Setup::SnatRouted)),
                vs_iptables(Setup::SnatOurs),
                vs_iptables(Setup::SnatRouted),
                cpu(Setup::SnatOurs),
                cpu(Setup::SnatIptables),
                cpu(Setup::SnatRouted),
            );
        }
        above_floor(r, &planes, md);
        let _ = writeln!(md, "\n{}\n", failures(r));
    }
}

/// The measures whose time per unit of work is set against the floor's (those through
/// a ClusterIP against the floor's between the pods).
const OVER_THE_FLOOR: [Measure; 8] = [
    Measure::TcpStream,
    Measure::RrP50,
    Measure::RrRate,
    Measure::ConnRate,
    Measure::UdpRate,
    Measure::SvcRrP50,
    Measure::SvcRrRate,
    Measure::SvcConnRate,
];

/// What each dataplane adds to the floor's time per unit of work, and ours' addition
/// against the kernel's: the part of each figure a dataplane can change at all.
fn above_floor(r: &Results, planes: &[Setup], md: &mut String) {
    if !planes.contains(&Setup::Floor) {
        return;
    }
    let planes: Vec<Setup> = planes
        .iter()
        .copied()
        .filter(|s| *s != Setup::Floor)
        .collect();
    let _ = writeln!(
        md,
        "\nWhat each dataplane adds to the floor (no dataplane: the two pods joined by one \
         veth, nothing between them): time per unit of work over the floor's (from the \
         medians, so a small addition carries the noise of both), and ours' addition \
         against the kernel's. Where the floor is most of a figure, no dataplane can move \
         that figure much:\n"
    );
    let mut header = String::from("| measure | unit | offloads | floor |");
    for s in &planes {
        let _ = write!(header, " {} |", s.name());
    }
    header.push_str(" ours' ÷ tunl0's | ours' ÷ host-gw's |");
    let _ = writeln!(
        md,
        "{header}\n|---|---|---|---|{}",
        "---|".repeat(planes.len() + 2)
    );
    for m in OVER_THE_FLOOR {
        for offloads in [true, false] {
            let Some(floor) = r.summary(Setup::Floor, m.on_the_floor(), offloads) else {
                continue;
            };
            // No row for what only the floor's stand-in has (nothing went through a
            // ClusterIP).
            if m.on_the_floor() != m && !planes.iter().any(|s| r.summary(*s, m, offloads).is_some())
            {
                continue;
            }
            let _ = write!(
                md,
                "| {} | {} | {} | {} |",
                m.name(),
                m.cpu_unit(),
                on_off(offloads),
                num(m.time_per_unit(floor.median))
            );
            for s in &planes {
                let _ = write!(md, " {} |", added(r.above_floor(*s, m, offloads)));
            }
            let _ = writeln!(
                md,
                " {} | {} |",
                ratio(added_ratio(r, Setup::Ours, TUNL0, m, offloads)),
                ratio(added_ratio(r, Setup::Ours, HOST_GW, m, offloads))
            );
        }
    }
    let m = Measure::SnatConnRate;
    let _ = writeln!(
        md,
        "\nThe same for the masquerade's connections to the outside (µs per connection \
         over the floor's connections between the pods):\n\n\
         | offloads | ours --ip-masq | iptables MASQUERADE | routed, no NAT | ours' ÷ iptables' |\n\
         |---|---|---|---|---|"
    );
    for offloads in [true, false] {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            on_off(offloads),
            added(r.above_floor(Setup::SnatOurs, m, offloads)),
            added(r.above_floor(Setup::SnatIptables, m, offloads)),
            added(r.above_floor(Setup::SnatRouted, m, offloads)),
            ratio(added_ratio(
                r,
                Setup::SnatOurs,
                Setup::SnatIptables,
                m,
                offloads
            ))
        );
    }
}

/// The heading's word on what the nodes carried besides the dataplane.
fn nodes(rules: Option<&NodeRules>) -> String {
    let Some(n) = rules else {
        return "- Nodes: no kube-proxy or NetworkPolicy rules on them.".into();
    };
    format!(
        "- **Every dataplane pays the same netfilter**: both nodes of every cluster (the \
         floor has none) carry a Kubernetes node's rules: kube-proxy's in iptables mode for \
         {} Services ({} of {} endpoints each that nothing reaches, {} of them with a \
         NodePort, and the bench's own), and kube-router's NetworkPolicy chains with one \
         policy that isolates the server pod and admits the client pod on the servers' \
         ports; masquerade as flannel's DaemonSet runs flanneld (`--ip-masq`): flanneld's \
         iptables rules on the kernel's backends, in BPF with ours. Every new connection \
         passes kube-proxy's nat rules, and every packet to the server the pod's chain: \
         with the kernel's backends every packet of every flow; with ours, what its fast \
         path does not take (established, untranslated flows the host forwarded skip the \
         host stack once admitted), and with the fast path off (\"{}\") everything. \
         \"Via a ClusterIP\": the client pod to the bench's Service ({}), DNATed by \
         kube-proxy's rules on the client's node to the server pod on the other node.",
        n.services,
        n.services.saturating_sub(1),
        n.endpoints_per_service,
        n.node_ports,
        NO_FAST_PATH.name(),
        node::SERVICE
    )
}

/// `setup`'s addition to the floor over `baseline`'s, when both add something.
fn added_ratio(
    r: &Results,
    setup: Setup,
    baseline: Setup,
    m: Measure,
    offloads: bool,
) -> Option<f64> {
    let ours = r.above_floor(setup, m, offloads)?;
    let theirs = r.above_floor(baseline, m, offloads)?;
    (ours > 0.0 && theirs > 0.0).then_some(ours / theirs)
}

/// An addition to the floor, signed: below the floor is noise showing.
fn added(v: Option<f64>) -> String {
    match v {
        Some(v) if v < 0.0 => format!("−{}", num(-v)),
        Some(v) => format!("+{}", num(v)),
        None => "—".into(),
    }
}

/// The connections that failed in the leg's runs, where and when: each is counted
/// apart from the rate and its time stays in its run (the bench's log has the first
/// error of each run and our agents' counters).
fn failures(r: &Results) -> String {
    let failed: Vec<String> = r
        .samples
        .iter()
        .filter(|s| s.failed > 0)
        .map(|s| {
            format!(
                "{} {} with offloads {}, run {}: {}",
                s.setup.name(),
                s.measure.name(),
                on_off(s.offloads),
                s.run + 1,
                s.failed
            )
        })
        .collect();
    if failed.is_empty() {
        "Failed connections: none.".into()
    } else {
        format!(
            "Failed connections (not in the rates; their time is): {}.",
            failed.join("; ")
        )
    }
}

/// CPU per unit of work, with how busy the busiest CPU was where the runs measured it.
fn cpu_cell(s: Option<Summary>) -> String {
    s.map_or("—".into(), |s| match s.busiest_cpu {
        Some(b) => format!("{} ({:.0} %)", num(s.cpu), b * 100.0),
        None => num(s.cpu),
    })
}

fn cell(s: Option<Summary>) -> String {
    match s {
        Some(s) => format!("{} ({}–{})", num(s.median), num(s.min), num(s.max)),
        None => "—".into(),
    }
}

/// Three significant digits, no exponent.
fn num(v: f64) -> String {
    let digits = if v.abs() >= 100.0 {
        0
    } else if v.abs() >= 10.0 {
        1
    } else if v.abs() >= 1.0 {
        2
    } else {
        3
    };
    format!("{v:.digits$}")
}

fn ratio(r: Option<f64>) -> String {
    r.map_or("—".into(), |r| format!("{r:.2}×"))
}

impl Report {
    pub(super) fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "{BEGIN}");
        let _ = writeln!(md, "## Latest run\n");
        let quick = self.legs.iter().any(|l| l.results.quick);
        let _ = writeln!(
            md,
            "- Command: `{}`, {} (took {:.0} min){}.",
            self.command,
            self.date,
            self.minutes,
            if quick {
                "; **--quick: too few and too short runs to publish**"
            } else {
                ""
            }
        );
        let _ = writeln!(
            md,
            "- Machine: {} ({} CPUs), kernel {}.",
            self.host.cpu, self.host.cpus, self.host.kernel
        );
        if let Some(r) = self.legs.first().map(|l| &l.results) {
            let _ = writeln!(
                md,
                "- Each figure: the median of {} runs of {} s, with the lowest and highest in \
                 brackets; the runs go round the dataplanes in turn, each run starting one \
                 dataplane further on. CPU: busy CPU time of the \
                 whole machine the dataplanes ran on (both pods, both nodes, softirq included) \
                 per unit of work, median over runs.",
                r.runs, r.seconds
            );
        }
        let rules = self.legs.iter().find_map(|l| l.results.node_rules.as_ref());
        let _ = writeln!(md, "{}", nodes(rules));
        let _ = writeln!(
            md,
            "- **Caveats**: under emulation (QEMU TCG, no KVM) absolute numbers mean nothing \
             about real hardware; only ratios between dataplanes measured in the same run \
             are the result. The machine has two cores, shared by both pods, both nodes and \
             (in the VM) the emulator; other work on the machine during the run adds noise, \
             which the interleaved runs spread over all dataplanes alike. Pods have the MTU \
             flannel gives them: {} behind IPIP (ours and tunl0), {} behind VXLAN, {} behind \
             host-gw; at a smaller MTU a stream takes more packets per byte (with offloads \
             on, mostly at the end of each write, whose tail Nagle's algorithm may split), \
             which is the encapsulation's cost, not the datapath's (docs/BENCHMARKS.md, \
             \"one stream at IPIP's MTU\"). {} is host-gw with its pods at IPIP's MTU: ours \
             against it is the datapath without that cost.\n",
            Backend::Ipip.mtu(),
            Backend::Vxlan.mtu(),
            Backend::HostGw.mtu(),
            EQUAL_MTU.name(),
        );
        for leg in &self.legs {
            leg.markdown(&mut md);
        }
        let _ = writeln!(
            md,
            "![every dataplane relative to host-gw]({})\n",
            self.plot
        );
        let _ = writeln!(md, "{END}");
        md
    }

    /// Writes the block into `path`, keeping what lies outside it.
    pub(super) fn write(&self, path: &Path) -> Result<()> {
        let block = self.markdown();
        let old = std::fs::read_to_string(path).unwrap_or_default();
        let new = match (old.find(BEGIN), old.find(END)) {
            (Some(b), Some(e)) if b < e => {
                format!("{}{}{}", &old[..b], block.trim_end(), &old[e + END.len()..])
            }
            _ if old.is_empty() => format!("# Benchmarks\n\n{block}"),
            _ => format!("{}\n\n{block}", old.trim_end()),
        };
        std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{
        results::Sample,
        setup::{Congestion, Plan},
    };

    fn results() -> Results {
        let plan = Plan {
            runs: 5,
            seconds: 2,
            streams: 4,
            congestion: Congestion::Cubic,
        };
        Results::new(Machine::here(), plan, true)
    }

    fn sample(setup: Setup, measure: Measure, offloads: bool, run: usize, value: f64) -> Sample {
        Sample {
            setup,
            offloads,
            run,
            measure,
            value,
            cpu_us_per_unit: 2000.0,
            busiest_cpu: None,
            failed: 0,
        }
    }

    #[test]
    fn failed_connections_are_reported_where_and_when() {
        let mut r = results();
        let failing = |setup, offloads, run, failed| Sample {
            failed,
            ..sample(setup, Measure::SnatConnRate, offloads, run, 400.0)
        };
        r.samples.push(failing(Setup::SnatOurs, true, 0, 0));
        assert_eq!(failures(&r), "Failed connections: none.");
        r.samples.push(failing(Setup::SnatIptables, false, 2, 3));
        r.samples.push(failing(Setup::SnatOurs, true, 4, 1));
        assert_eq!(
            failures(&r),
            format!(
                "Failed connections (not in the rates; their time is): {} {} with offloads \
                 off, run 3: 3; {} {} with offloads on, run 5: 1.",
                Setup::SnatIptables.name(),
                Measure::SnatConnRate.name(),
                Setup::SnatOurs.name(),
                Measure::SnatConnRate.name(),
            )
        );
    }

    /// Asserts that `md` holds `part`, showing all of `md` when it does not.
    #[track_caller]
    fn assert_shows(md: &str, part: &str) {
        assert!(md.contains(part), "{md}");
    }

    /// A report of one leg on this machine.
    fn report(results: Results) -> Report {
        Report {
            command: "cargo xtask bench".into(),
            date: "2026-11-22 15:00 UTC".into(),
            minutes: 21.0,
            host: Machine::here(),
            legs: vec![Leg {
                place: "this machine".into(),
                results,
                costs: crate::bench::results::parse_costs(
                    "PROG_COST {\"case\":\"encap\",\"program\":\"bridge_ingress\",\"ns\":597.0,\"rounds\":[589.0,597.0]}",
                ),
            }],
            plot: "benchmarks.png".into(),
        }
    }

    #[test]
    fn a_saved_run_gives_the_same_report_again() {
        let mut r = results();
        r.samples
            .push(sample(Setup::Ours, Measure::RrP50, true, 0, 80.0));
        r.samples
            .push(sample(TUNL0, Measure::RrP50, true, 0, 100.0));
        let report = report(r);
        let saved = serde_json::to_string(&report).unwrap();
        let again: Report = serde_json::from_str(&saved).unwrap();
        assert_eq!(again.markdown(), report.markdown());
        assert!(
            report
                .markdown()
                .contains("| 0.80× | 0.80×–0.80× (1 of 1) | yes |")
        );
    }

    #[test]
    fn each_runs_ratio_pairs_the_two_measured_in_that_run() {
        let mut r = results();
        let p50 = Measure::RrP50;
        // Runs 0–2 of ours and tunl0 with offloads on; tunl0 missed run 3; a run with
        // offloads off must not mix in.
        for (run, ours, tunl0) in [(0, 80.0, 100.0), (1, 90.0, 100.0), (2, 40.0, 50.0)] {
            r.samples.push(sample(Setup::Ours, p50, true, run, ours));
            r.samples.push(sample(TUNL0, p50, true, run, tunl0));
        }
        r.samples.push(sample(Setup::Ours, p50, true, 3, 10.0));
        r.samples.push(sample(TUNL0, p50, false, 3, 1000.0));
        assert_eq!(r.run_ratios(Setup::Ours, TUNL0, p50, true), [0.8, 0.9, 0.8]);
        let target = targets(&r)
            .into_iter()
            .find(|t| {
                t.what.starts_with("request/response latency p50")
                    && t.what.ends_with("(offloads on)")
            })
            .unwrap();
        // Medians over all runs: ours' of 10, 40, 80, 90 over tunl0's of 50, 100, 100.
        assert_eq!(target.measured, Some(60.0 / 100.0));
        assert_eq!(target.met(), Some(true));
        // At most 0.85: two of the three runs meet it.
        assert_eq!(target.runs(), "0.80×–0.90× (2 of 3)");
        // Near the bound, the side it is on shows.
        assert_eq!(target.shown(0.8504), "0.8504×");
        assert_eq!(target.shown(0.8496), "0.8496×");
        assert_eq!(target.shown(0.847), "0.847×");
        assert_eq!(target.shown(0.85), "0.85×");
        assert_eq!(target.shown(0.8449), "0.84×");
    }

    #[test]
    fn ours_is_set_against_host_gw_at_its_own_mtu_too() {
        let mut r = results();
        let stream = Measure::TcpStream;
        for (setup, gbits) in [(Setup::Ours, 0.9), (HOST_GW, 1.0), (EQUAL_MTU, 0.9)] {
            r.samples.push(sample(setup, stream, true, 0, gbits));
        }
        // The column is named after the MTU the setup gives its pods.
        assert!(
            EQUAL_MTU
                .name()
                .ends_with(&format!("MTU {}", Backend::Ipip.mtu()))
        );
        let md = report(r).markdown();
        assert_shows(
            &md,
            &format!(
                "| host-gw | {} | ours ÷ tunl0 | ours ÷ host-gw | ours ÷ {} |",
                EQUAL_MTU.name(),
                EQUAL_MTU.name()
            ),
        );
        assert_shows(
            &md,
            "| TCP, 1 stream | Gbit/s | 0.900 (0.900–0.900) | 1.00 (1.00–1.00) | 0.900 (0.900–0.900) | — | 0.90× | 1.00× |",
        );
    }

    #[test]
    fn the_cpu_table_shows_how_busy_the_busiest_cpu_was_where_it_was_measured() {
        let mut r = results();
        let stream = Measure::TcpStream;
        // A run saved before the busiest CPU was measured: no brackets, no word of them.
        r.samples.push(sample(HOST_GW, stream, true, 0, 22.0));
        let before = report(r.clone()).markdown();
        assert!(!before.contains("busiest"), "{before}");
        for (run, busiest) in [(0, 0.98), (1, 1.0), (2, 0.5)] {
            r.samples.push(Sample {
                busiest_cpu: Some(busiest),
                ..sample(Setup::Ours, stream, true, run, 20.0)
            });
        }
        let snat = Measure::SnatConnRate;
        r.samples.push(Sample {
            busiest_cpu: Some(0.61),
            ..sample(Setup::SnatOurs, snat, true, 0, 400.0)
        });
        r.samples
            .push(sample(Setup::SnatIptables, snat, true, 0, 300.0));
        let md = report(r).markdown();
        assert_shows(&md, "in brackets, how busy the busiest CPU was");
        assert_shows(
            &md,
            "| on | 400 (400–400) | 300 (300–300) | — | 1.33× | — | 2000 (61 %) | 2000 | — |",
        );
        assert_shows(&md, "| TCP, 1 stream | µs/MB | 2000 (98 %) | 2000 |");
    }

    #[test]
    fn the_fast_path_s_check_is_its_cost_over_the_same_packet_without_it() {
        let costs = crate::bench::results::parse_costs(
            "PROG_COST {\"case\":\"check\",\"program\":\"bridge_ingress\",\"ns\":52.0,\"rounds\":[50.0,52.0,61.0]}\n\
             PROG_COST {\"case\":\"encap\",\"program\":\"bridge_ingress\",\"ns\":190.0,\"rounds\":[190.0]}\n\
             PROG_COST {\"case\":\"check-off\",\"program\":\"bridge_ingress\",\"ns\":30.0,\"rounds\":[29.0,30.0,30.0]}",
        );
        let target = check_target(&costs);
        assert_eq!(target.measured, Some(22.0));
        assert_eq!(target.met(), Some(true));
        assert_eq!(target.runs(), "21.0 ns–31.0 ns (2 of 3)");
        assert_eq!(target.shown(29.96), "29.96 ns");
        let mut r = report(results());
        r.legs[0].costs = costs.clone();
        let md = r.markdown();
        assert_shows(
            &md,
            "| what the fast path's check adds to a packet ≤ 30 ns (check − check-off) | 22.0 ns | \
             21.0 ns–31.0 ns (2 of 3) | yes |",
        );
        assert_shows(&md, "check-off: the same segment with the fast path off");
        // Without one of the two cases, no figure, and the table says why.
        let without = check_target(&costs[..2]);
        assert_eq!((without.measured, without.each_run.len()), (None, 0));
        let mut r = results();
        r.samples
            .push(sample(Setup::Ours, Measure::RrP50, true, 0, 80.0));
        r.samples
            .push(sample(TUNL0, Measure::RrP50, true, 0, 100.0));
        assert_shows(
            &report(r).markdown(),
            "(check − check-off) | — | — | — (no such cases in this run's microbenchmark) |",
        );
    }

    #[test]
    fn the_service_measures_and_the_fast_path_off_have_their_rows_and_column() {
        let mut r = results();
        let (rate, p50) = (Measure::SvcRrRate, Measure::SvcRrP50);
        for (setup, tx, us) in [
            (Setup::Ours, 9000.0, 100.0),
            (TUNL0, 6000.0, 150.0),
            (HOST_GW, 10000.0, 90.0),
            (NO_FAST_PATH, 7500.0, 120.0),
        ] {
            r.samples.push(sample(setup, rate, true, 0, tx));
            r.samples.push(sample(setup, p50, true, 0, us));
        }
        r.samples
            .push(sample(Setup::Floor, Measure::RrP50, true, 0, 60.0));
        r.samples
            .push(sample(Setup::Floor, Measure::ConnRate, true, 0, 400.0));
        let md = report(r).markdown();
        assert_shows(
            &md,
            &format!(
                "| ours (BPF IPIP) | kernel ipip (tunl0) | host-gw | {} | {} | ours ÷ tunl0 | \
                 ours ÷ host-gw | ours ÷ {} | ours ÷ fast path off |",
                NO_FAST_PATH.name(),
                Setup::Floor.name(),
                EQUAL_MTU.name()
            ),
        );
        assert_shows(
            &md,
            "| request/response rate via a ClusterIP | trans/s | 9000 (9000–9000) | \
             6000 (6000–6000) | 10000 (10000–10000) | 7500 (7500–7500) | — | 1.50× | 0.90× | — | \
             1.20× |",
        );
        assert_shows(
            &md,
            "| request/response latency p50 via a ClusterIP | µs | 100 (100–100) |",
        );
        assert_shows(
            &md,
            "| request/response rate via a ClusterIP | µs/trans | 2000 |",
        );
        // Through the Service, set against the floor's between the pods.
        assert_shows(
            &md,
            "| request/response latency p50 via a ClusterIP | µs/trans | on | 60.0 | +40.0 | \
             +90.0 | +30.0 | +60.0 | 0.44× | 1.33× |",
        );
        // No floor rows for what nothing measured through the Service.
        assert!(
            !md.contains("| connection rate via a ClusterIP | µs/conn | on |"),
            "{md}"
        );
    }

    #[test]
    fn the_heading_says_what_the_nodes_carried() {
        let mut r = results();
        let plain = report(r.clone()).markdown();
        assert_shows(
            &plain,
            "- Nodes: no kube-proxy or NetworkPolicy rules on them.",
        );
        r.node_rules = Some(NodeRules {
            install_seconds: vec![2.0, 21.5, 3.0],
            ..NodeRules::new()
        });
        let md = report(r).markdown();
        assert_shows(
            &md,
            "- **Every dataplane pays the same netfilter**: both nodes of every cluster (the \
             floor has none) carry a Kubernetes node's rules: kube-proxy's in iptables mode \
             for 1001 Services (1000 of 2 endpoints each that nothing reaches, 250 of them \
             with a NodePort, and the bench's own)",
        );
        assert_shows(&md, "to the bench's Service (10.96.0.200)");
        assert_shows(
            &md,
            "The nodes' netfilter rules took 2.00–21.5 s to install per node, the nodes of a \
             cluster at once (median 3.00 s).",
        );
    }

    #[test]
    fn the_published_run_still_reads() {
        let saved = crate::vm::workspace()
            .join("docs")
            .join(crate::bench::RESULTS);
        let report: Report =
            serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
        let md = report.markdown();
        assert!(
            md.starts_with(BEGIN) && md.trim_end().ends_with(END),
            "{md}"
        );
    }

    #[test]
    fn each_dataplane_is_set_against_the_floor() {
        let mut r = results();
        let put = |r: &mut Results, setup, m, value| {
            for offloads in [true, false] {
                r.samples.push(sample(setup, m, offloads, 0, value));
            }
        };
        // Latencies add as they are; rates as time per unit (1e6 / rate).
        put(&mut r, Setup::Floor, Measure::RrP50, 500.0);
        put(&mut r, Setup::Ours, Measure::RrP50, 540.0);
        put(&mut r, TUNL0, Measure::RrP50, 640.0);
        put(&mut r, HOST_GW, Measure::RrP50, 480.0);
        put(&mut r, Setup::Floor, Measure::ConnRate, 400.0);
        put(&mut r, Setup::SnatOurs, Measure::SnatConnRate, 250.0);
        put(&mut r, Setup::SnatIptables, Measure::SnatConnRate, 200.0);
        assert_eq!(r.above_floor(Setup::Ours, Measure::RrP50, true), Some(40.0));
        let conn = |s| r.above_floor(s, Measure::SnatConnRate, false);
        assert_eq!(conn(Setup::SnatOurs), Some(1500.0));
        assert_eq!(conn(Setup::SnatIptables), Some(2500.0));
        assert_eq!(conn(Setup::SnatRouted), None);
        let planes = [Setup::Ours, TUNL0, HOST_GW, Setup::Floor];
        let mut md = String::new();
        above_floor(&r, &planes, &mut md);
        // Host-gw below the floor shows as such, and gives no ratio.
        assert_shows(
            &md,
            "| request/response latency p50 | µs/trans | on | 500 | +40.0 | +140 | −20.0 | 0.29× | — |",
        );
        assert_shows(&md, "| off | +1500 | +2500 | — | 0.60× |");
        // Without the floor there is nothing to set against.
        let mut none = String::new();
        above_floor(&r, &planes[..3], &mut none);
        assert!(none.is_empty());
    }
}
