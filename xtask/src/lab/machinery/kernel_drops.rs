//! What the kernel itself dropped in the lab, so that a loss a check sees can be
//! placed: a full per-CPU input queue (the backlog, which fills when softirq work is
//! starved of CPU), a namespace's IP and UDP error counters, an interface's drops.
//! Our own datapath counts its drops apart (`overlay-agent counters`).

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};

use super::{cluster, netns, state::LabState};

/// Drop counters of the whole lab at one moment, by place ("w1 eth0 rx", "w2-pod1
/// Udp RcvbufErrors", "backlog").
#[derive(Clone, Default)]
pub(crate) struct KernelDrops(BTreeMap<String, u64>);

impl KernelDrops {
    pub(crate) fn read(lab: &LabState) -> Result<Self> {
        let mut drops = BTreeMap::new();
        drops.insert("backlog".to_owned(), backlog()?);
        let mut hosts: Vec<String> = lab.topology.hosts().into_iter().map(|h| h.name).collect();
        hosts.extend([cluster::ROUTER.to_owned(), cluster::SWITCH.to_owned()]);
        for host in hosts {
            let ns = lab.netns(&host);
            for (place, n) in interface_drops(&ns)?.into_iter().chain(stack_drops(&ns)?) {
                drops.insert(format!("{host} {place}"), n);
            }
        }
        Ok(Self(drops))
    }

    /// What grew since `before`, by place.
    pub(crate) fn since(&self, before: &Self) -> Self {
        Self(
            self.0
                .iter()
                .filter_map(|(place, &n)| {
                    let grew = n.saturating_sub(before.0.get(place).copied().unwrap_or(0));
                    (grew > 0).then(|| (place.clone(), grew))
                })
                .collect(),
        )
    }
}

impl std::fmt::Display for KernelDrops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let parts: Vec<String> = self.0.iter().map(|(p, n)| format!("{p} {n}")).collect();
        f.write_str(&parts.join(", "))
    }
}

/// Packets dropped because a CPU's input queue was full, over every CPU (the second
/// column of /proc/net/softnet_stat, in hex; the queues are the machine's, not a
/// namespace's).
fn backlog() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/net/softnet_stat")
        .context("reading /proc/net/softnet_stat")?;
    parse_backlog(&text)
}

fn parse_backlog(text: &str) -> Result<u64> {
    text.lines()
        .map(|line| {
            let dropped = line.split_whitespace().nth(1).unwrap_or_default();
            u64::from_str_radix(dropped, 16)
                .with_context(|| format!("a softnet_stat line without a drop count: {line:?}"))
        })
        .sum()
}

/// Every interface's receive and transmit drops in `ns`, as "eth0 rx".
fn interface_drops(ns: &str) -> Result<Vec<(String, u64)>> {
    let links = netns::ip_json(ns, &["-stats", "link", "show"])?;
    let mut drops = Vec::new();
    for link in links.as_array().into_iter().flatten() {
        let name = link["ifname"].as_str().unwrap_or("?");
        for dir in ["rx", "tx"] {
            if let Some(n) = link["stats64"][dir]["dropped"].as_u64() {
                drops.push((format!("{name} {dir}"), n));
            }
        }
    }
    Ok(drops)
}

/// The IP and UDP counters of `ns` that count a packet lost (`Ip InDiscards`,
/// `Udp RcvbufErrors`, …), read from the namespace's /proc/net/snmp.
fn stack_drops(ns: &str) -> Result<Vec<(String, u64)>> {
    let snmp = netns::run(netns::command(ns, "cat").arg("/proc/net/snmp"))?;
    Ok(parse_snmp(&snmp)
        .into_iter()
        .filter(|(name, _)| {
            (name.starts_with("Ip ") || name.starts_with("Udp "))
                && ["Errors", "Discards", "NoRoutes"]
                    .iter()
                    .any(|s| name.ends_with(s))
        })
        .collect())
}

/// /proc/net/snmp's pairs of lines (names, then values) as "Udp RcvbufErrors" → n.
fn parse_snmp(text: &str) -> Vec<(String, u64)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut counters = Vec::new();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let mut names = names.split_whitespace();
        let mut values = values.split_whitespace();
        let (Some(proto), Some(_)) = (names.next(), values.next()) else {
            continue;
        };
        let proto = proto.trim_end_matches(':');
        for (name, value) in names.zip(values) {
            if let Ok(n) = value.parse() {
                counters.push((format!("{proto} {name}"), n));
            }
        }
    }
    counters
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backlog_drops_are_summed_over_cpus_in_hex() {
        let text = "0000a000 00000c96 0000000f 00000000\n0000b000 00000010 00000019 00000000\n";
        assert_eq!(parse_backlog(text).unwrap(), 0xc96 + 0x10);
        assert!(parse_backlog("0000a000\n").is_err());
    }

    #[test]
    fn snmp_pairs_name_their_counters() {
        let text = "Ip: Forwarding InDiscards\nIp: 1 7\nUdp: InDatagrams RcvbufErrors\nUdp: 12 3\n";
        assert_eq!(
            parse_snmp(text),
            [
                ("Ip Forwarding".to_owned(), 1),
                ("Ip InDiscards".to_owned(), 7),
                ("Udp InDatagrams".to_owned(), 12),
                ("Udp RcvbufErrors".to_owned(), 3),
            ]
        );
    }

    #[test]
    fn only_growth_is_reported() {
        let before = KernelDrops(BTreeMap::from([("a".into(), 5), ("b".into(), 2)]));
        let after = KernelDrops(BTreeMap::from([
            ("a".into(), 5),
            ("b".into(), 9),
            ("c".into(), 1),
        ]));
        let grew = after.since(&before);
        assert_eq!(grew.to_string(), "b 7, c 1");
    }
}
