//! flanneld on the etcd subnet manager with the ipip backend, for a node of the lab
//! that runs no agent of ours (the interoperability test's flannel node): it leases its
//! subnet in etcd exactly as flanneld writes a lease, writes its subnet.env from the
//! lease, and routes to the nodes whose leases it finds there, so the agents learn it
//! from its lease alone and it learns them from theirs.
//!
//! After flannel-io/flannel v0.28.9 (commit 5cd0d52):
//! - `pkg/subnet/etcd/local_manager.go`: `AcquireLease` reads the network
//!   configuration (`<prefix>/config`) and tries up to 10 times (`raceRetries`);
//!   `tryAcquireLease` takes, for a node without a lease, a random one of the first 100
//!   free subnets from SubnetMin to SubnetMax (`allocateSubnet`, `rand.go`), for 24 h
//!   (`subnetTTL`); `HandleSubnetFile` writes subnet.env once.
//! - `pkg/subnet/config.go`: SubnetLen 24 for a network of /22 or wider, else its
//!   prefix + 2 (none smaller than /28); SubnetMin the network's second subnet,
//!   SubnetMax its last. `pkg/subnet/subnet.go`: the key `<ip>-<len>`
//!   (`MakeSubnetKey`) and subnet.env (`WriteSubnetFile`: the subnet's first address).
//! - `pkg/subnet/etcd/registry.go`: `createSubnet` grants an etcd lease of the TTL and
//!   puts `json.Marshal(LeaseAttrs)` under `<prefix>/subnets/<key>` with it, in a
//!   transaction on the key's version being 0 (nobody took it meanwhile); on failure
//!   it revokes the lease and the caller tries again.
//! - `pkg/lease/lease.go`: `LeaseAttrs` is PublicIP, PublicIPv6 (a pointer without
//!   `omitempty`: `null` when unset), then BackendType, BackendData and BackendV6Data
//!   (`omitempty`); Go writes the fields in that order, without spaces.
//! - `pkg/backend/ipip/ipip.go`: the attributes are PublicIP and BackendType "ipip",
//!   no BackendData; per lease a route `<subnet> via <PublicIP> dev flannel.ipip
//!   onlink` (the device is `machinery::flannel`'s).
//! - `pkg/backend/route_network.go`, `pkg/subnet/subnet.go` (`WatchLeases`): routes for
//!   the leases of its own backend type, other types ignored, its own lease left out.
//!
//! etcdctl stands in for flanneld's etcd client: in the node's namespace, so it reaches
//! etcd across the underlay, with the client certificate the agents use. Unlike
//! flanneld, which watches, this takes the leases once: the lab starts the agents first
//! and waits for their subnet.env (their lease) before it sets up the other nodes.

use std::{
    ffi::{OsStr, OsString},
    io::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    process::Stdio,
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use base64::Engine as _;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::{Files, PREFIX, etcdctl_env, host, quote};
use crate::lab::machinery::{
    agents::SubnetEnv,
    flannel::{Backend, Peer},
    netns,
    state::LabState,
    topology::Node,
};

/// flanneld's `raceRetries`.
const RACE_RETRIES: usize = 10;
/// flanneld's `subnetTTL`, in seconds: 24 hours.
const SUBNET_TTL: u32 = 24 * 60 * 60;
/// `allocateSubnet` picks among at most this many free subnets.
const CANDIDATES: usize = 100;
/// The ipip backend's `backendType`.
const BACKEND_TYPE: &str = "ipip";

/// flannel's `LeaseAttrs`, as `json.Marshal` writes it for the ipip backend:
/// BackendData and BackendV6Data are `omitempty` and ipip sets neither.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    public_ip: Ipv4Addr,
    #[serde(rename = "PublicIPv6")]
    public_ipv6: Option<Ipv6Addr>,
    #[serde(rename = "BackendType", default)]
    backend_type: String,
}

impl LeaseAttrs {
    fn ipip(public_ip: Ipv4Addr) -> Self {
        Self {
            public_ip,
            public_ipv6: None,
            backend_type: BACKEND_TYPE.into(),
        }
    }
}

/// A subnet's lease, as listed under `<prefix>/subnets/`.
#[derive(Debug, PartialEq, Eq)]
struct Lease {
    subnet: Ipv4Net,
    attrs: LeaseAttrs,
}

/// The part of flannel's network configuration (`<prefix>/config`) that leasing uses.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Config {
    network: Ipv4Net,
    subnet_len: Option<u8>,
    subnet_min: Option<Ipv4Addr>,
    subnet_max: Option<Ipv4Addr>,
    backend: Option<BackendConfig>,
}

#[derive(Debug, Deserialize)]
struct BackendConfig {
    #[serde(rename = "Type")]
    kind: String,
}

impl Config {
    fn parse(text: &str) -> Result<Self> {
        let config: Self = serde_json::from_str(text.trim())
            .with_context(|| format!("flannel's network configuration {text:?}"))?;
        // Without a Backend, flanneld runs "udp".
        let backend = config.backend.as_ref().map_or("udp", |b| b.kind.as_str());
        ensure!(
            backend == BACKEND_TYPE,
            "the network configuration names the {backend} backend: flanneld would not run ipip"
        );
        Ok(config)
    }

    fn subnet_len(&self) -> Result<u8> {
        let prefix = self.network.prefix_len();
        Ok(match self.subnet_len {
            Some(len) if len > 30 => bail!("SubnetLen must be less than /31"),
            Some(len) if len < prefix + 2 => {
                bail!("network must be able to accommodate at least four subnets")
            }
            Some(len) => len,
            None if prefix > 28 => bail!("{}: the network is too small", self.network),
            None if prefix <= 22 => 24,
            None => prefix + 2,
        })
    }

    /// The first and the last subnet leases may take.
    fn range(&self) -> Result<(Ipv4Net, Ipv4Net)> {
        let len = self.subnet_len()?;
        let size = 1u32 << (32 - u32::from(len));
        let first = u32::from(self.network.network());
        let min = (self.subnet_min).unwrap_or(Ipv4Addr::from(first.wrapping_add(size)));
        let max = self.subnet_max.unwrap_or(Ipv4Addr::from(
            u32::from(self.network.broadcast())
                .wrapping_add(1)
                .wrapping_sub(size),
        ));
        let (min, max) = (Ipv4Net::new(min, len)?, Ipv4Net::new(max, len)?);
        ensure!(
            min.addr() == min.network() && max.addr() == max.network(),
            "SubnetMin {} or SubnetMax {} is not on a /{len} boundary",
            min.addr(),
            max.addr()
        );
        Ok((min, max))
    }
}

/// A free subnet for a new lease: `pick(n)` chooses one of the first `n` free ones.
fn allocate(
    config: &Config,
    leased: &[Ipv4Net],
    pick: impl FnOnce(usize) -> usize,
) -> Result<Ipv4Net> {
    let (min, max) = config.range()?;
    let size = 1u32 << (32 - u32::from(min.prefix_len()));
    let mut free = Vec::new();
    let mut at = Some(u32::from(min.network()));
    while let Some(ip) = at.filter(|&ip| ip <= u32::from(max.network()))
        && free.len() < CANDIDATES
    {
        let subnet = Ipv4Net::new(ip.into(), min.prefix_len())?;
        if !leased
            .iter()
            .any(|l| l.contains(&subnet) || subnet.contains(l))
        {
            free.push(subnet);
        }
        at = ip.checked_add(size);
    }
    ensure!(!free.is_empty(), "out of subnets in {}", config.network);
    Ok(free[pick(free.len())])
}

/// `MakeSubnetKey`: 10.244.1.0/24 is `10.244.1.0-24`.
fn subnet_key(subnet: Ipv4Net) -> String {
    format!(
        "{PREFIX}/subnets/{}-{}",
        subnet.network(),
        subnet.prefix_len()
    )
}

/// `etcdctl get -w json`'s answer: keys and values in base64.
#[derive(Deserialize)]
struct Listing {
    #[serde(default)]
    kvs: Vec<KeyValue>,
}

#[derive(Deserialize)]
struct KeyValue {
    key: String,
    value: String,
}

/// The leases in `etcdctl get --prefix -w json <prefix>/subnets/`.
fn parse_leases(listing: &str) -> Result<Vec<Lease>> {
    let listing: Listing =
        serde_json::from_str(listing).with_context(|| format!("etcdctl listed {listing:?}"))?;
    let text = |b64: &str| -> Result<String> {
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64)?;
        Ok(String::from_utf8(bytes)?)
    };
    listing
        .kvs
        .iter()
        .map(|kv| {
            let (key, value) = (text(&kv.key)?, text(&kv.value)?);
            let subnet = key
                .strip_prefix(&format!("{PREFIX}/subnets/"))
                .and_then(|k| k.split_once('-'))
                .and_then(|(ip, len)| Ipv4Net::new(ip.parse().ok()?, len.parse().ok()?).ok())
                .with_context(|| format!("{key} is no subnet's key"))?;
            let attrs = serde_json::from_str(&value)
                .with_context(|| format!("the lease {key} holds {value}"))?;
            Ok(Lease { subnet, attrs })
        })
        .collect()
}

/// The lease's ID in `etcdctl lease grant`'s answer (`lease <hex> granted with …`).
fn granted_id(answer: &str) -> Result<String> {
    match answer.split_whitespace().collect::<Vec<_>>()[..] {
        ["lease", id, "granted", ..] if u64::from_str_radix(id, 16).is_ok() => Ok(id.to_owned()),
        _ => bail!("etcdctl lease grant answered {answer:?}"),
    }
}

/// etcdctl as `node`'s flanneld uses etcd: from its namespace, with the client
/// certificate; each command printed as run.
struct Etcdctl<'a> {
    lab: &'a LabState,
    node: &'a Node,
    env: [(&'static str, OsString); 4],
}

impl Etcdctl<'_> {
    /// Runs `etcdctl <args>`, with `input` on its standard input (for `txn`).
    fn run(&self, args: &[&str], input: Option<&str>) -> Result<String> {
        let words: Vec<String> = args.iter().map(|a| quote(OsStr::new(a))).collect();
        println!("[{}]$ etcdctl {}", self.node.name, words.join(" "));
        let mut cmd = netns::command(&self.lab.netns(&self.node.name), "etcdctl");
        cmd.envs(self.env.clone()).args(args);
        let Some(input) = input else {
            return netns::run(&mut cmd);
        };
        for line in input.lines() {
            println!("  > {line}");
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting etcdctl")?;
        child
            .stdin
            .take()
            .context("etcdctl's standard input")?
            .write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "etcdctl {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn leases(&self) -> Result<Vec<Lease>> {
        let prefix = format!("{PREFIX}/subnets/");
        parse_leases(&self.run(&["get", "--prefix", "-w", "json", &prefix], None)?)
    }

    /// `createSubnet`: the lease, if nobody took the subnet meanwhile.
    fn create(&self, subnet: Ipv4Net, attrs: &LeaseAttrs) -> Result<bool> {
        let ttl = SUBNET_TTL.to_string();
        let id = granted_id(&self.run(&["lease", "grant", &ttl], None)?)?;
        let (key, value) = (subnet_key(subnet), serde_json::to_string(attrs)?);
        let txn = format!("version(\"{key}\") = \"0\"\n\nput --lease={id} {key} {value}\n\n\n");
        let answer = self.run(&["txn"], Some(&txn))?;
        match answer.lines().next() {
            Some("SUCCESS") => Ok(true),
            Some("FAILURE") => {
                self.run(&["lease", "revoke", &id], None)?;
                Ok(false)
            }
            _ => bail!("etcdctl txn answered {answer:?}"),
        }
    }
}

/// Sets `node` up as flanneld with the etcd subnet manager and the ipip backend does,
/// and returns the subnet.env it wrote.
pub(crate) fn configure(lab: &LabState, node: &Node) -> Result<SubnetEnv> {
    let etcd = host(lab)?;
    let etcdctl = Etcdctl {
        lab,
        node,
        env: etcdctl_env(etcd, &Files::of(lab)),
    };
    let config = Config::parse(&etcdctl.run(
        &["get", "--print-value-only", &format!("{PREFIX}/config")],
        None,
    )?)?;
    let attrs = LeaseAttrs::ipip(node.address);
    let subnet = acquire(&etcdctl, &config, &attrs)?;
    let mut peers = Vec::new();
    for lease in etcdctl.leases()? {
        if lease.subnet == subnet {
            continue;
        }
        if lease.attrs.backend_type != BACKEND_TYPE {
            println!(
                "  (flanneld: Ignoring non-{BACKEND_TYPE} subnet: type={})",
                lease.attrs.backend_type
            );
            continue;
        }
        println!(
            "  (flanneld: Subnet added: {} via {})",
            lease.subnet, lease.attrs.public_ip
        );
        peers.push(Peer {
            subnet: lease.subnet,
            address: lease.attrs.public_ip,
        });
    }
    let env = SubnetEnv {
        network: config.network,
        ..Backend::Ipip.configure_with(lab, node, subnet, &peers)?
    };
    let path = lab.subnet_file(node);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, env.to_string())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(env)
}

/// `AcquireLease` for a node that holds none yet.
fn acquire(etcdctl: &Etcdctl, config: &Config, attrs: &LeaseAttrs) -> Result<Ipv4Net> {
    for _ in 0..RACE_RETRIES {
        let leases = etcdctl.leases()?;
        // flanneld would renew it; a fresh lab's etcd holds none.
        if let Some(held) = leases.iter().find(|l| l.attrs.public_ip == attrs.public_ip) {
            bail!(
                "etcd already leases {} to {}: this imitation of flanneld takes new leases only",
                held.subnet,
                attrs.public_ip
            );
        }
        let leased: Vec<Ipv4Net> = leases.iter().map(|l| l.subnet).collect();
        let subnet = allocate(config, &leased, random_below)?;
        if etcdctl.create(subnet, attrs)? {
            return Ok(subnet);
        }
    }
    Err(anyhow!(
        "max retries reached trying to acquire a subnet (as flanneld says)"
    ))
}

/// A random index below `n` (flanneld's `randInt(0, n)`).
fn random_below(n: usize) -> usize {
    // Unpredictable enough for picking a subnet; the clock is flanneld's own seed.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    nanos as usize % n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text).unwrap()
    }

    #[test]
    fn the_lease_is_what_flanneld_puts() {
        let attrs = LeaseAttrs::ipip([172, 18, 0, 4].into());
        assert_eq!(
            serde_json::to_string(&attrs).unwrap(),
            r#"{"PublicIP":"172.18.0.4","PublicIPv6":null,"BackendType":"ipip"}"#
        );
        assert_eq!(
            subnet_key("10.244.57.0/24".parse().unwrap()),
            "/coreos.com/network/subnets/10.244.57.0-24"
        );
    }

    /// `etcdctl get -w json` of `(key, value)` pairs, as etcd 3.4 answers.
    fn listing(kvs: &[(&str, &str)]) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let kvs: Vec<_> = kvs
            .iter()
            .map(|(k, v)| {
                serde_json::json!({"key": b64(k), "create_revision": 2, "mod_revision": 2,
                    "version": 1, "value": b64(v), "lease": 7587899399187215879u64})
            })
            .collect();
        serde_json::json!({"header": {"revision": 3}, "kvs": kvs, "count": kvs.len()}).to_string()
    }

    #[test]
    fn leases_are_read_as_etcdctl_lists_them() {
        let leases = parse_leases(&listing(&[
            (
                "/coreos.com/network/subnets/10.244.1.0-24",
                r#"{"PublicIP":"172.18.0.3","PublicIPv6":null,"BackendType":"ipip"}"#,
            ),
            (
                "/coreos.com/network/subnets/10.244.9.0-24",
                r#"{"PublicIP":"172.18.0.5","BackendType":"vxlan","BackendData":{"VNI":1}}"#,
            ),
        ]))
        .unwrap();
        assert_eq!(
            leases[0],
            Lease {
                subnet: "10.244.1.0/24".parse().unwrap(),
                attrs: LeaseAttrs::ipip([172, 18, 0, 3].into()),
            }
        );
        assert_eq!(leases[1].attrs.backend_type, "vxlan");
        // No key at all: etcd leaves out `kvs`.
        assert!(
            parse_leases(r#"{"header":{"revision":1},"count":0}"#)
                .unwrap()
                .is_empty()
        );
        for key in [
            "/coreos.com/network/subnets/10.244.1.0",
            "/other/subnets/10.244.1.0-24",
        ] {
            let e = parse_leases(&listing(&[(key, "{}")])).unwrap_err();
            assert!(e.to_string().contains("no subnet's key"), "{e}");
        }
        let e = parse_leases(&listing(&[(
            "/coreos.com/network/subnets/10.244.1.0-24",
            "{}",
        )]))
        .unwrap_err();
        assert!(e.to_string().contains("holds {}"), "{e}");
        assert!(parse_leases("OK").is_err());
    }

    #[test]
    fn subnets_are_allocated_as_flanneld_allocates_them() {
        let lab = config(r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"ipip"}}"#);
        // Never the network's first subnet; leased ones skipped.
        let first = |leased: &[Ipv4Net]| allocate(&lab, leased, |_| 0).unwrap().to_string();
        assert_eq!(first(&[]), "10.244.1.0/24");
        assert_eq!(
            first(&[
                "10.244.1.0/24".parse().unwrap(),
                "10.244.2.0/23".parse().unwrap()
            ]),
            "10.244.4.0/24"
        );
        // A random one of the first 100 free ones.
        let mut offered = 0;
        allocate(&lab, &[], |n| {
            offered = n;
            n - 1
        })
        .unwrap();
        assert_eq!(offered, 100);
        assert_eq!(
            allocate(&lab, &[], |n| n - 1).unwrap().to_string(),
            "10.244.100.0/24"
        );
        // SubnetLen's default, and a network with no room left.
        let small = config(r#"{"Network":"10.0.0.0/26","Backend":{"Type":"ipip"}}"#);
        assert_eq!(small.subnet_len().unwrap(), 28);
        let all: Vec<Ipv4Net> = vec![
            "10.0.0.16/28".parse().unwrap(),
            "10.0.0.32/27".parse().unwrap(),
        ];
        let e = allocate(&small, &all, |_| 0).unwrap_err();
        assert!(e.to_string().contains("out of subnets"), "{e}");
        assert_eq!(
            config(r#"{"Network":"10.0.0.0/8","Backend":{"Type":"ipip"}}"#)
                .subnet_len()
                .unwrap(),
            24
        );
        for len in [15, 31] {
            let bad = format!(
                r#"{{"Network":"10.0.0.0/16","SubnetLen":{len},"Backend":{{"Type":"ipip"}}}}"#
            );
            assert!(config(&bad).subnet_len().is_err(), "SubnetLen {len}");
        }
    }

    #[test]
    fn only_an_ipip_configuration_runs() {
        let e = Config::parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap_err();
        assert!(e.to_string().contains("udp backend"), "{e}");
        let e =
            Config::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap_err();
        assert!(e.to_string().contains("vxlan backend"), "{e}");
        assert!(Config::parse("").is_err());
    }

    #[test]
    fn etcdctl_answers_are_read() {
        assert_eq!(
            granted_id("lease 694da24d17f43607 granted with TTL(86400s)\n").unwrap(),
            "694da24d17f43607"
        );
        assert!(granted_id("Error: etcdserver: requested lease not found").is_err());
    }
}
