//! What the kernel itself dropped in the lab, so that a loss a check sees can be
//! placed: a full per-CPU input queue (the backlog, which fills when softirq work is
//! starved of CPU), the ARP table's (packets queued for an unresolved neighbour beyond
//! its queue, or an address whose resolution failed, as when probes go unanswered on a
//! starved machine), a namespace's IP and UDP error counters, reverse path filter and
//! connection-tracking drops, an interface's drops and errors (a tunnel device counts its failures as
//! errors). Our own datapath counts its drops apart (`overlay-agent counters`).

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};

use super::{cluster, netns, state::LabState};

/// Drop counters of the whole lab at one moment, by place ("w1 eth0 rx dropped", "w2-pod1
/// Udp RcvbufErrors", "backlog").
#[derive(Clone, Default)]
pub(crate) struct KernelDrops(BTreeMap<String, u64>);

impl KernelDrops {
    pub(crate) fn read(lab: &LabState) -> Result<Self> {
        let mut drops = BTreeMap::new();
        drops.insert("backlog".to_owned(), backlog()?);
        // The ARP table is the machine's: its statistics exist in the first namespace only.
        let arp = read_proc("/proc/net/stat/arp_cache")?;
        for column in ["res_failed", "unresolved_discards", "table_fulls"] {
            drops.insert(format!("arp {column}"), stat_column(&arp, column)?);
        }
        let mut hosts: Vec<String> = lab.topology.hosts().into_iter().map(|h| h.name).collect();
        hosts.extend([cluster::ROUTER.to_owned(), cluster::SWITCH.to_owned()]);
        for host in hosts {
            let ns = lab.netns(&host);
            let places = (interface_drops(&ns)?.into_iter())
                .chain(stack_drops(&ns)?)
                .chain(conntrack_drops(&ns)?);
            for (place, n) in places {
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
    parse_backlog(&read_proc("/proc/net/softnet_stat")?)
}

fn read_proc(path: &str) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {path}"))
}

/// One column of a /proc/net/stat table (a line of names, then one line of hex
/// counters per CPU), summed over the CPUs.
fn stat_column(text: &str, column: &str) -> Result<u64> {
    let mut lines = text.lines();
    let names = lines.next().unwrap_or_default();
    let at = (names.split_whitespace().position(|n| n == column))
        .with_context(|| format!("no column {column} in {names:?}"))?;
    lines
        .map(|line| {
            let value = line.split_whitespace().nth(at).unwrap_or_default();
            u64::from_str_radix(value, 16).with_context(|| format!("no {column} count in {line:?}"))
        })
        .sum()
}

/// Packets connection tracking dropped in `ns`: a full table, or an entry it could
/// not insert. Without the module loaded the namespace has no such table: none.
fn conntrack_drops(ns: &str) -> Result<Vec<(String, u64)>> {
    let Ok(text) = netns::run(netns::command(ns, "cat").arg("/proc/net/stat/nf_conntrack")) else {
        return Ok(Vec::new());
    };
    ["drop", "early_drop", "insert_failed"]
        .into_iter()
        .map(|column| Ok((format!("conntrack {column}"), stat_column(&text, column)?)))
        .collect()
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

/// Every interface's receive and transmit drops and errors in `ns`, as "eth0 rx
/// dropped".
fn interface_drops(ns: &str) -> Result<Vec<(String, u64)>> {
    let links = netns::ip_json(ns, &["-stats", "link", "show"])?;
    let mut drops = Vec::new();
    for link in links.as_array().into_iter().flatten() {
        let name = link["ifname"].as_str().unwrap_or("?");
        for dir in ["rx", "tx"] {
            for what in ["dropped", "errors"] {
                if let Some(n) = link["stats64"][dir][what].as_u64() {
                    drops.push((format!("{name} {dir} {what}"), n));
                }
            }
        }
    }
    Ok(drops)
}

/// The IP and UDP counters of `ns` that count a packet lost (`Ip InDiscards`,
/// `Udp RcvbufErrors`, …), read from the namespace's /proc/net/snmp, and the reverse
/// path filter's drops (`TcpExt IPReversePathFilter`, for every protocol despite its
/// name), from /proc/net/netstat: a route changed under a flow can fail that check.
fn stack_drops(ns: &str) -> Result<Vec<(String, u64)>> {
    let text = netns::run(netns::command(ns, "cat").args(["/proc/net/snmp", "/proc/net/netstat"]))?;
    Ok(parse_snmp(&text)
        .into_iter()
        .filter(|(name, _)| {
            (name.starts_with("Ip ") || name.starts_with("Udp "))
                && ["Errors", "Discards", "NoRoutes"]
                    .iter()
                    .any(|s| name.ends_with(s))
                || name == "TcpExt IPReversePathFilter"
        })
        .collect())
}

/// /proc/net/snmp's (and netstat's) pairs of lines (names, then values) as
/// "Udp RcvbufErrors" → n.
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
    fn a_stat_column_is_summed_over_cpus_in_hex() {
        let text = "entries  res_failed unresolved_discards\n00000002 00000001 0000000a\n00000002 00000000 00000010\n";
        assert_eq!(stat_column(text, "unresolved_discards").unwrap(), 0x1a);
        assert_eq!(stat_column(text, "res_failed").unwrap(), 1);
        assert!(stat_column(text, "table_fulls").is_err());
        assert!(stat_column("res_failed\nzz\n", "res_failed").is_err());
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
