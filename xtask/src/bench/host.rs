//! What the machine says about itself: CPU time spent (for CPU per unit of work), its
//! processor and kernel, and offloads on the lab's links.

use std::{process::Command, time::Instant};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::lab::machinery::{netns, state::LabState};

/// The machine's (the VM's) CPU time spent busy so far, from /proc/stat: user, nice,
/// system, irq, softirq and steal, of all CPUs together and of each. Both ends of every
/// benchmark run on this machine, so the total is the cost of one exchange end to end,
/// softirq (where the datapath runs) included; the busiest CPU tells a figure that one
/// CPU bounds (a stream's sender, which carries the path its sends raise) from one that
/// the machine's CPUs together bound.
pub(super) struct CpuTimes {
    total: f64,
    per_cpu: Vec<f64>,
    at: Instant,
}

/// What the machine spent between two [`CpuTimes`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Busy {
    /// CPU seconds, all CPUs together.
    pub seconds: f64,
    /// The busiest CPU's busy time over the wall time between the two readings (0–1).
    pub busiest: f64,
}

impl CpuTimes {
    pub(super) fn read() -> Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let (total, per_cpu) = parse_stat(&stat, hz)?;
        Ok(Self {
            total,
            per_cpu,
            at: Instant::now(),
        })
    }

    /// What was spent since `before`.
    pub(super) fn since(&self, before: &CpuTimes) -> Busy {
        let wall = self.at.duration_since(before.at).as_secs_f64();
        let busiest = self
            .per_cpu
            .iter()
            .zip(&before.per_cpu)
            .map(|(now, then)| now - then)
            .fold(0.0, f64::max);
        Busy {
            seconds: self.total - before.total,
            // Ticks are counted at the clock's granularity: a CPU busy throughout may
            // show a tick more than the wall time.
            busiest: if wall > 0.0 {
                (busiest / wall).min(1.0)
            } else {
                0.0
            },
        }
    }
}

/// Busy seconds of all CPUs (the `cpu` line) and of each (`cpuN`), from /proc/stat's
/// text, whose counts are in ticks of `hz`.
fn parse_stat(stat: &str, hz: f64) -> Result<(f64, Vec<f64>)> {
    let busy = |line: &str| -> Result<f64> {
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().with_context(|| format!("/proc/stat: {line}")))
            .collect::<Result<_>>()?;
        anyhow::ensure!(f.len() >= 7, "/proc/stat: too few fields in {line}");
        // user nice system idle iowait irq softirq steal
        let ticks = f[0] + f[1] + f[2] + f[5] + f[6] + f.get(7).copied().unwrap_or(0);
        Ok(ticks as f64 / hz)
    };
    let mut total = None;
    let mut per_cpu = Vec::new();
    for line in stat.lines() {
        match line.split_whitespace().next() {
            Some("cpu") => total = Some(busy(line)?),
            Some(name) if name.starts_with("cpu") => per_cpu.push(busy(line)?),
            _ => {}
        }
    }
    Ok((total.context("/proc/stat has no cpu line")?, per_cpu))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub kernel: String,
    pub kernel_version: String,
    /// The kernel's TCP congestion control where nothing sets one.
    pub congestion_default: String,
}

impl Machine {
    pub(super) fn here() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_else(|| "unknown".into());
        let uname = |flag: &str| {
            crate::deps::output(Command::new("uname").arg(flag))
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        Self {
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: uname("-r"),
            kernel_version: uname("-v"),
            congestion_default: std::fs::read_to_string(CONGESTION)
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into()),
        }
    }
}

/// The TCP congestion control of sockets that set none; new namespaces take the
/// initial one's.
const CONGESTION: &str = "/proc/sys/net/ipv4/tcp_congestion_control";

/// Turns GSO, GRO and TSO off on every link of the lab's namespaces (veths, bridges,
/// tunnel devices): every packet then crosses every hop on its own.
pub(super) fn offloads_off(lab: &LabState) -> Result<()> {
    for ns in netns::list(&lab.netns(""))? {
        let links = netns::ip_json(&ns, &["link", "show"])?;
        for link in links.as_array().into_iter().flatten() {
            let Some(name) = link["ifname"].as_str() else {
                continue;
            };
            if name == "lo" {
                continue;
            }
            // Some devices fix some of these features; what can change, changes.
            let _ = netns::run(
                netns::command(&ns, "ethtool")
                    .args(["-K", name, "gso", "off", "gro", "off", "tso", "off"]),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  300 10 200 5000 7 3 40 2 0 0
cpu0 250 10 150 2000 3 2 35 1 0 0
cpu1 50 0 50 3000 4 1 5 1 0 0
intr 12345 0 0
ctxt 999
";

    #[test]
    fn busy_time_counts_user_system_interrupts_and_steal_not_idle() {
        let (total, per_cpu) = parse_stat(STAT, 100.0).expect("parses");
        // 300 + 10 + 200 + 3 + 40 + 2 ticks: idle (5000) and iowait (7) left out.
        assert_eq!(total, 5.55);
        assert_eq!(per_cpu, [4.48, 1.07]);
    }

    #[test]
    fn the_busiest_cpu_is_its_busy_time_over_the_wall_time() {
        let at = Instant::now();
        let before = CpuTimes {
            total: 10.0,
            per_cpu: vec![4.0, 6.0],
            at,
        };
        // The first CPU shows a tick more than the two seconds: busy throughout.
        let after = CpuTimes {
            total: 13.5,
            per_cpu: vec![6.01, 7.49],
            at: at + std::time::Duration::from_secs(2),
        };
        let busy = after.since(&before);
        assert_eq!(busy.seconds, 3.5);
        assert_eq!(busy.busiest, 1.0);
        let half = CpuTimes {
            total: 11.0,
            per_cpu: vec![4.5, 6.5],
            at: at + std::time::Duration::from_secs(1),
        };
        assert_eq!(half.since(&before).busiest, 0.5);
    }

    #[test]
    fn a_stat_line_that_is_not_numbers_is_an_error() {
        assert!(parse_stat("cpu 1 2 x 4 5 6 7\n", 100.0).is_err());
        assert!(parse_stat("intr 1\n", 100.0).is_err());
    }
}
