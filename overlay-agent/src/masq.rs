//! Masquerade settings (flanneld's `--ip-masq`, plus what a BPF implementation needs:
//! the translated port range, the table size, idle timeouts).

use std::{ops::RangeInclusive, str::FromStr};

use anyhow::{Context as _, Result, bail};
use overlay_common::{
    config::{NAT_PORT_MAX, NAT_PORT_MIN},
    conntrack::CtTimeouts,
};

/// What `--ip-masq-fully-random-disable` does: nothing, and why. flanneld (flannel-io/
/// flannel v0.28.9 `pkg/trafficmngr/iptables/iptables.go` `masqRules`) then writes its
/// two MASQUERADE rules without `--random-fully`, so that the kernel keeps a pod's
/// source port when the translated tuple is free and picks another port only on a
/// clash. The BPF masquerade (`overlay-ebpf/src/conntrack.rs` `create`) has no such
/// mode to switch to: pods' source ports lie in the kernel's ephemeral range, which
/// --nat-ports must avoid (the host's own connections use it), so a port is never
/// kept; every flow gets a free port of --nat-ports from a random start, claimed
/// atomically in the connection table, as `--random-fully` does.
pub const FULLY_RANDOM_DISABLE_IGNORED: &str = "--ip-masq-fully-random-disable changes nothing: the BPF masquerade never keeps a pod's source port (its --nat-ports lie outside the ephemeral range pods' ports come from); it always picks a free port from a random start, as MASQUERADE --random-fully does";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub enabled: bool,
    pub ports: RangeInclusive<u16>,
    pub timeouts: CtTimeouts,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            enabled: false,
            ports: NAT_PORT_MIN..=NAT_PORT_MAX,
            timeouts: CtTimeouts::DEFAULT,
        }
    }
}

/// A port range as `MIN-MAX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRange(pub RangeInclusive<u16>);

impl FromStr for PortRange {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (lo, hi) = s
            .split_once('-')
            .context("expected MIN-MAX, e.g. 61000-65535")?;
        let lo: u16 = lo
            .trim()
            .parse()
            .with_context(|| format!("bad port {lo:?}"))?;
        let hi: u16 = hi
            .trim()
            .parse()
            .with_context(|| format!("bad port {hi:?}"))?;
        if lo == 0 || lo > hi {
            bail!("port range {s} is empty or starts at 0");
        }
        Ok(Self(lo..=hi))
    }
}

/// One `NAME=SECONDS` override of a conntrack timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeoutOverride(pub String, pub u32);

impl FromStr for TimeoutOverride {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (name, secs) = s
            .split_once('=')
            .context("expected NAME=SECONDS, e.g. tcp_established=3600")?;
        let secs: u32 = secs
            .parse()
            .with_context(|| format!("bad number of seconds {secs:?}"))?;
        if secs == 0 {
            bail!("timeout {name} must be at least one second");
        }
        Ok(Self(name.to_owned(), secs))
    }
}

/// Applies overrides to the default timeouts.
pub fn timeouts(overrides: &[TimeoutOverride]) -> Result<CtTimeouts> {
    let mut t = CtTimeouts::DEFAULT;
    for TimeoutOverride(name, secs) in overrides {
        let slot = match name.as_str() {
            "tcp_syn" => &mut t.tcp_syn,
            "tcp_established" => &mut t.tcp_established,
            "tcp_fin" => &mut t.tcp_fin,
            "tcp_closed" => &mut t.tcp_closed,
            "tcp_time_wait" => &mut t.tcp_time_wait,
            "udp" => &mut t.udp,
            "udp_assured" => &mut t.udp_assured,
            "icmp" => &mut t.icmp,
            other => bail!(
                "unknown timeout {other:?}: use tcp_syn, tcp_established, tcp_fin, tcp_closed, tcp_time_wait, udp, udp_assured or icmp"
            ),
        };
        *slot = *secs;
    }
    Ok(t)
}

/// Refuses a translated port range that overlaps the kernel's ephemeral port range:
/// the node's own connections would then compete for the same ports.
pub fn check_against_ephemeral(ports: &RangeInclusive<u16>, ephemeral: &str) -> Result<()> {
    let mut parts = ephemeral.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(lo)), Some(Ok(hi))) = (parts.next(), parts.next()) else {
        bail!("cannot read ip_local_port_range {ephemeral:?}");
    };
    if *ports.start() <= hi && lo <= *ports.end() {
        bail!(
            "masquerade ports {}-{} overlap the node's ephemeral ports {lo}-{hi} (net.ipv4.ip_local_port_range): choose --nat-ports outside it",
            ports.start(),
            ports.end()
        );
    }
    Ok(())
}

pub fn ephemeral_range() -> Result<String> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .context("reading ip_local_port_range")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_overrides() {
        assert_eq!("61000-65535".parse::<PortRange>().unwrap().0, 61000..=65535);
        assert!("100-10".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("61000".parse::<PortRange>().is_err());
        let t = timeouts(&[
            "udp=5".parse().unwrap(),
            "tcp_established=60".parse().unwrap(),
        ])
        .unwrap();
        assert_eq!(
            (t.udp, t.tcp_established, t.icmp),
            (5, 60, CtTimeouts::DEFAULT.icmp)
        );
        assert!(timeouts(&["bogus=5".parse().unwrap()]).is_err());
        assert!("udp=0".parse::<TimeoutOverride>().is_err());
    }

    #[test]
    fn ephemeral_overlap_is_refused() {
        assert!(check_against_ephemeral(&(61000..=65535), "32768\t60999\n").is_ok());
        let err = check_against_ephemeral(&(60000..=65535), "32768\t60999\n").unwrap_err();
        assert!(err.to_string().contains("overlap"));
        assert!(check_against_ephemeral(&(1000..=2000), "garbage").is_err());
    }
}
