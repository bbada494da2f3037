//! Human-readable views of the pinned maps, for operators and the lab.

use std::{fmt::Write as _, net::Ipv4Addr, path::Path};

use anyhow::Result;
use ipnet::Ipv4Net;
use overlay_common::maps::names;

use crate::{
    conntrack::Conntrack,
    datapath::{Config, Counters, NatEvents, Peers, Routes, maps::open_pinned},
};

/// The counters table; zero rows are left out unless `all`.
pub fn counters(pin_dir: &Path, all: bool) -> Result<String> {
    let counters = Counters::new(open_pinned(pin_dir, names::COUNTERS)?)?;
    let mut out = format!(
        "{:<16} {:<28} {:>12} {:>14}\n",
        "HOOK", "REASON", "PACKETS", "BYTES"
    );
    for (hook, reason, c) in counters.all()? {
        if all || c.packets != 0 {
            writeln!(
                out,
                "{:<16} {:<28} {:>12} {:>14}",
                hook.name(),
                reason.name(),
                c.packets,
                c.bytes
            )?;
        }
    }
    Ok(out)
}

/// This node's configuration, the remote subnets, and the traffic each peer sent.
pub fn nodes(pin_dir: &Path) -> Result<String> {
    let config = Config::new(open_pinned(pin_dir, names::CONFIG)?)?.get()?;
    let routes = Routes::new(open_pinned(pin_dir, names::ROUTES)?)?.entries()?;
    let peers = Peers::new(open_pinned(pin_dir, names::PEERS)?)?.stats()?;
    let mut out = String::new();
    if config.node_ip == [0; 4] {
        writeln!(out, "this node: not configured yet")?;
    } else {
        let subnet = Ipv4Net::new(config.pod_subnet.into(), config.pod_prefix_len)?;
        writeln!(
            out,
            "this node: tunnel address {}, pod subnet {subnet}",
            Ipv4Addr::from(config.node_ip)
        )?;
    }
    writeln!(
        out,
        "{:<20} {:<16} {:>12} {:>14}",
        "REMOTE SUBNET", "NODE", "RX PACKETS", "RX BYTES"
    )?;
    for (subnet, node) in &routes {
        let rx = peers.get(node).copied().unwrap_or_default();
        writeln!(
            out,
            "{:<20} {:<16} {:>12} {:>14}",
            subnet.to_string(),
            node.to_string(),
            rx.rx_packets,
            rx.rx_bytes
        )?;
    }
    Ok(out)
}

fn proto_name(proto: u8) -> String {
    match proto {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        p => p.to_string(),
    }
}

/// The masquerade connection table, one flow per line, then the event counts.
pub fn nat(pin_dir: &Path) -> Result<String> {
    let flows = Conntrack::new(open_pinned(pin_dir, names::CONNTRACK)?)?.flows()?;
    let events = NatEvents::new(open_pinned(pin_dir, names::NAT_EVENTS)?)?.all()?;
    let mut out = format!(
        "{:<5} {:<22} {:<22} {:<22} {:<5} {:<12} {:>8} {:>8}\n",
        "PROTO", "SOURCE", "DESTINATION", "TRANSLATED TO", "RULE", "STATE", "AGE", "EXPIRES"
    );
    for f in &flows {
        let translated = f
            .translated
            .map_or("-".to_owned(), |(a, p)| format!("{a}:{p}"));
        let rule = f.rule.map_or("?".to_owned(), |r| (r as u8).to_string());
        writeln!(
            out,
            "{:<5} {:<22} {:<22} {:<22} {:<5} {:<12} {:>7}s {:>7}s",
            proto_name(f.proto),
            format!("{}:{}", f.src.0, f.src.1),
            format!("{}:{}", f.dst.0, f.dst.1),
            translated,
            rule,
            f.state(),
            f.age.as_secs(),
            f.expires_in.as_secs()
        )?;
    }
    writeln!(out, "{} flows", flows.len())?;
    for (event, n) in events {
        writeln!(out, "{:<24} {n:>12}", event.name())?;
    }
    Ok(out)
}
