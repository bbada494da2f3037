//! What the machine says about itself: CPU time spent (for CPU per unit of work), its
//! processor and kernel, and offloads on the lab's links.

use std::process::Command;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::lab::{netns, state::LabState};

/// CPU time the whole machine (the VM) spent busy, in seconds, from /proc/stat: user,
/// nice, system, irq, softirq and steal of every CPU. Both ends of every benchmark run
/// on this machine, so this is the cost of one exchange end to end, softirq
/// (where the datapath runs) included.
pub fn busy_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no cpu line")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = f[0] + f[1] + f[2] + f[5] + f[6] + f.get(7).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(busy as f64 / hz)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub kernel: String,
    pub kernel_version: String,
    /// The kernel's TCP congestion control where nothing sets one.
    pub congestion_default: String,
}

impl Machine {
    pub fn here() -> Self {
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
pub fn offloads_off(lab: &LabState) -> Result<()> {
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
