//! flanneld's `net-conf.json`, read the way flanneld reads it, and the range of node
//! subnets an etcd-backed flannel network leases from (`SubnetLen`, `SubnetMin`,
//! `SubnetMax` with the defaults and checks of flannel's `CheckNetworkConfig`,
//! flannel-io/flannel `pkg/subnet/config.go`, v0.28 line at commit 0f89b8d).
//!
//! flanneld decodes the file with Go's `encoding/json` into its `Config` struct
//! (`ParseConfig`, v0.28.9 commit 5cd0d52), which matches keys to fields without
//! regard to case (`network`, `NETWORK`; Unicode's simple folding makes `ſ` an `s`
//! and the Kelvin sign a `k`), lets the last of several matching keys win, and
//! ignores unknown keys; so does [`NetConf::parse`]. The ipip backend carries IPv4
//! only (`pkg/backend/ipip/ipip.go` leases and routes IPv4; `kube.go`'s
//! `AcquireLease` turns IPv6 off for every backend but vxlan, host-gw and
//! wireguard), so `"EnableIPv6": true` and `"EnableIPv4": false` are refused rather
//! than half-honoured; the other IPv6 keys are inert without `EnableIPv6`, as in
//! flanneld.

use std::{net::Ipv4Addr, path::Path};

use anyhow::{Context as _, Result, bail};
use ipnet::Ipv4Net;
use serde::{
    Deserialize, Deserializer,
    de::{DeserializeOwned, MapAccess, Visitor},
};
use serde_json::Value;

/// The parts of `net-conf.json` this dataplane uses. Other flannel keys are accepted
/// and ignored. The subnet keys only matter to the etcd source ([`NetConf::subnets`]):
/// with the Kubernetes API node subnets come from `spec.podCIDR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConf {
    /// The cluster's pod network (`Network`).
    pub network: Ipv4Net,
    /// `SubnetLen`, when set and not 0.
    pub subnet_len: Option<u8>,
    /// `SubnetMin`, when set and not 0.0.0.0.
    pub subnet_min: Option<Ipv4Addr>,
    /// `SubnetMax`, when set and not 0.0.0.0.
    pub subnet_max: Option<Ipv4Addr>,
    /// `Backend.DirectRouting`: nodes reached without a gateway get their pods'
    /// packets unencapsulated, as flannel's ipip backend routes them.
    pub direct_routing: bool,
    /// `EnableNFTables`: flanneld's forward rules go through nftables, not iptables
    /// (`host::forward_rules`).
    pub enable_nftables: bool,
}

/// The node subnets an etcd-backed network hands out: `len`-long, from `min` to `max`
/// (both subnet addresses, inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetRange {
    pub len: u8,
    pub min: Ipv4Addr,
    pub max: Ipv4Addr,
}

impl SubnetRange {
    /// Whether `net` is one of the range's subnets (flannel's `isSubnetConfigCompat`).
    pub fn holds(&self, net: Ipv4Net) -> bool {
        net.prefix_len() == self.len && (self.min..=self.max).contains(&net.network())
    }

    /// The range's subnets in address order.
    pub fn iter(&self) -> impl Iterator<Item = Ipv4Net> + use<> {
        let (len, step) = (self.len, 1u64 << (32 - self.len));
        (u64::from(u32::from(self.min))..=u64::from(u32::from(self.max)))
            .step_by(step as usize)
            .map(move |a| Ipv4Net::new(Ipv4Addr::from(a as u32), len).expect("len <= 30"))
    }
}

/// A JSON object's members in document order.
struct Members(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Ordered;
        impl<'de> Visitor<'de> for Ordered {
            type Value = Members;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut all = Vec::new();
                while let Some(member) = map.next_entry()? {
                    all.push(member);
                }
                Ok(Members(all))
            }
        }
        d.deserialize_map(Ordered)
    }
}

/// Go's `encoding/json` case folding of a key: ASCII letters upper-cased, and the
/// two other runes whose fold set holds an ASCII letter (`ſ`, the Kelvin sign).
fn go_fold(c: char) -> char {
    match c {
        '\u{17f}' => 'S',
        '\u{212a}' => 'K',
        c => c.to_ascii_uppercase(),
    }
}

/// Whether Go's decoder puts the member `key` into the field `field`.
fn go_key_matches(key: &str, field: &str) -> bool {
    key.chars().map(go_fold).eq(field.chars().map(go_fold))
}

impl Members {
    /// The value of `field` as Go decodes it: the last matching member; null is unset.
    fn get<T: DeserializeOwned>(&self, field: &str) -> Result<Option<T>> {
        let Some((key, value)) = self.0.iter().rev().find(|(k, _)| go_key_matches(k, field)) else {
            return Ok(None);
        };
        if value.is_null() {
            return Ok(None);
        }
        T::deserialize(value)
            .map(Some)
            .with_context(|| format!("\"{key}\" has the wrong type: {value}"))
    }
}

impl NetConf {
    pub fn parse(text: &str) -> Result<Self> {
        let raw: Members = serde_json::from_str(text).context("net-conf.json is not valid JSON")?;
        if !raw.get::<bool>("EnableIPv4")?.unwrap_or(true) {
            bail!(
                "\"EnableIPv4\" is false: flannel's ipip backend carries IPv4 only, this dataplane needs it"
            );
        }
        if raw.get::<bool>("EnableIPv6")?.unwrap_or(false) {
            bail!(
                "\"EnableIPv6\" is true: flannel's ipip backend carries IPv4 only (flanneld leases ipip nodes no IPv6 subnet); remove it or set it to false"
            );
        }
        let network: String = raw
            .get("Network")?
            .context("net-conf.json has no \"Network\"")?;
        let network: Ipv4Net = network
            .parse()
            .with_context(|| format!("\"Network\" is not an IPv4 CIDR: {network:?}"))?;
        // flanneld's default backend is udp; this dataplane implements ipip only.
        // Inside Backend, Type and the ipip backend's DirectRouting are read, matched
        // as Go matches them.
        let (kind, backend) = match raw.get::<Value>("Backend")? {
            None => ("udp".to_owned(), Members(Vec::new())),
            Some(Value::Object(backend)) => {
                let backend = Members(backend.into_iter().collect());
                let kind = backend
                    .get::<Value>("Type")?
                    .map(|v| v.as_str().map(str::to_owned))
                    .unwrap_or(Some(String::new()))
                    .context("\"Backend.Type\" is not a string")?;
                (kind, backend)
            }
            Some(other) => bail!("\"Backend\" is not an object: {other}"),
        };
        if !kind.eq_ignore_ascii_case("ipip") {
            bail!(
                "\"Backend.Type\" is {kind:?}: this dataplane implements the \"ipip\" backend only"
            );
        }
        // flanneld decodes it into a bool (`pkg/backend/ipip/ipip.go` `RegisterNetwork`)
        // and refuses to start on another type.
        let direct_routing = backend
            .get::<bool>("DirectRouting")
            .context("in \"Backend\"")?
            .unwrap_or(false);
        let subnet_len = match raw.get::<u32>("SubnetLen")? {
            None | Some(0) => None,
            Some(len) => Some(
                u8::try_from(len)
                    .ok()
                    .filter(|l| *l <= 32)
                    .with_context(|| format!("\"SubnetLen\" {len} is not a prefix length"))?,
            ),
        };
        Ok(Self {
            network: network.trunc(),
            subnet_len,
            subnet_min: address(raw.get("SubnetMin")?, "SubnetMin")?,
            subnet_max: address(raw.get("SubnetMax")?, "SubnetMax")?,
            direct_routing,
            enable_nftables: raw.get("EnableNFTables")?.unwrap_or(false),
        })
    }

    /// The node subnets, with flannel's defaults and checks: `SubnetLen` 24, or the
    /// network's length plus 2 for networks smaller than a /22; `SubnetMin` the
    /// network's second subnet (the first holds the network address), `SubnetMax` its
    /// last; at least four subnets, each of at least four addresses.
    pub fn subnets(&self) -> Result<SubnetRange> {
        let network = self.network;
        let len = match self.subnet_len {
            Some(len) if len > 30 => bail!("\"SubnetLen\" must be less than /31"),
            Some(len) if len < network.prefix_len() + 2 => {
                bail!(
                    "\"Network\" {network} must hold at least four subnets of \"SubnetLen\" /{len}"
                )
            }
            Some(len) => len,
            None if network.prefix_len() > 28 => {
                bail!("\"Network\" {network} is too small: the smallest useful network is a /28")
            }
            None if network.prefix_len() <= 22 => 24,
            None => network.prefix_len() + 2,
        };
        let size = 1u32 << (32 - len);
        let first = u32::from(network.network());
        let within = |a: Option<Ipv4Addr>, key: &str, default: u32| -> Result<Ipv4Addr> {
            let Some(a) = a else {
                return Ok(Ipv4Addr::from(default));
            };
            if !network.contains(&a) {
                bail!("\"{key}\" {a} is not in the range of the \"Network\" {network}");
            }
            if u32::from(a) % size != 0 {
                bail!("\"{key}\" {a} is not on a \"SubnetLen\" /{len} boundary");
            }
            Ok(a)
        };
        Ok(SubnetRange {
            len,
            min: within(self.subnet_min, "SubnetMin", first + size)?,
            max: within(
                self.subnet_max,
                "SubnetMax",
                u32::from(network.broadcast()) + 1 - size,
            )?,
        })
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }
}

/// An optional address key; flannel reads 0.0.0.0 as unset.
fn address(value: Option<String>, key: &str) -> Result<Option<Ipv4Addr>> {
    let Some(value) = value else { return Ok(None) };
    let a: Ipv4Addr = value
        .parse()
        .with_context(|| format!("\"{key}\" is not an IPv4 address: {value:?}"))?;
    Ok((!a.is_unspecified()).then_some(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walkthrough_config() {
        let c = NetConf::parse(r#"{ "Network": "10.244.0.0/16", "Backend": { "Type": "ipip" } }"#)
            .unwrap();
        assert_eq!(c.network, "10.244.0.0/16".parse().unwrap());
    }

    #[test]
    fn direct_routing_as_flanneld_decodes_it() {
        let direct = |backend: &str| {
            NetConf::parse(&format!(
                r#"{{"Network":"10.1.0.0/16","Backend":{{"Type":"ipip"{backend}}}}}"#
            ))
            .map(|c| c.direct_routing)
        };
        assert!(!direct("").unwrap());
        assert!(!direct(r#","DirectRouting":null"#).unwrap());
        assert!(!direct(r#","DirectRouting":false"#).unwrap());
        assert!(direct(r#","DirectRouting":true"#).unwrap());
        assert!(direct(r#","directrouting":true"#).unwrap());
        assert!(direct(r#","DIRECTROUTING":true"#).unwrap());
        // Beside Backend it is some other key, which flanneld ignores.
        let c = NetConf::parse(
            r#"{"Network":"10.1.0.0/16","DirectRouting":true,"Backend":{"Type":"ipip"}}"#,
        )
        .unwrap();
        assert!(!c.direct_routing);
        let e = format!("{:#}", direct(r#","DirectRouting":"true""#).unwrap_err());
        assert!(
            e.contains("Backend") && e.contains("\"DirectRouting\" has the wrong type"),
            "{e}"
        );
    }

    #[test]
    fn ignores_other_flannel_keys() {
        let c = NetConf::parse(
            r#"{"Network":"10.1.0.0/16","SubnetLen":24,"Backend":{"Type":"IPIP","DirectRouting":false}}"#,
        );
        assert!(c.is_ok());
    }

    fn range(text: &str) -> Result<SubnetRange> {
        NetConf::parse(text).unwrap().subnets()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn subnet_defaults_as_flannel() {
        let r = range(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"ipip"}}"#).unwrap();
        assert_eq!(
            (r.len, r.min, r.max),
            (24, ip("10.244.1.0"), ip("10.244.255.0"))
        );
        // Smaller than a /22: four subnets at the least.
        let r = range(r#"{"Network":"10.0.0.0/26","Backend":{"Type":"ipip"}}"#).unwrap();
        assert_eq!(
            (r.len, r.min, r.max),
            (28, ip("10.0.0.16"), ip("10.0.0.48"))
        );
        let r = range(r#"{"Network":"10.0.0.0/22","Backend":{"Type":"ipip"}}"#).unwrap();
        assert_eq!(r.len, 24);
        let r = range(
            r#"{"Network":"10.1.0.0/16","SubnetLen":25,"SubnetMin":"10.1.4.0","SubnetMax":"10.1.4.128","Backend":{"Type":"ipip"}}"#,
        )
        .unwrap();
        assert_eq!(
            (r.len, r.min, r.max),
            (25, ip("10.1.4.0"), ip("10.1.4.128"))
        );
        assert_eq!(
            r.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            ["10.1.4.0/25", "10.1.4.128/25"]
        );
        assert!(r.holds("10.1.4.128/25".parse().unwrap()));
        assert!(!r.holds("10.1.5.0/25".parse().unwrap()));
        assert!(!r.holds("10.1.4.0/24".parse().unwrap()));
        // 0 and 0.0.0.0 are unset, as in flannel.
        let r = range(
            r#"{"Network":"10.244.0.0/16","SubnetLen":0,"SubnetMin":"0.0.0.0","Backend":{"Type":"ipip"}}"#,
        )
        .unwrap();
        assert_eq!((r.len, r.min), (24, ip("10.244.1.0")));
    }

    #[test]
    fn subnet_checks_as_flannel() {
        let e = |t: &str| format!("{:#}", range(t).unwrap_err());
        let with = |extra: &str| {
            format!(r#"{{"Network":"10.244.0.0/16",{extra}"Backend":{{"Type":"ipip"}}}}"#)
        };
        assert!(e(&with(r#""SubnetLen":31,"#)).contains("less than /31"));
        assert!(e(&with(r#""SubnetLen":17,"#)).contains("four subnets"));
        assert!(e(r#"{"Network":"10.0.0.0/29","Backend":{"Type":"ipip"}}"#).contains("too small"));
        assert!(
            e(&with(r#""SubnetMin":"10.245.0.0","#))
                .contains("\"SubnetMin\" 10.245.0.0 is not in the range")
        );
        assert!(e(&with(r#""SubnetMax":"10.244.3.7","#)).contains("boundary"));
        let bad = |extra: &str| format!("{:#}", NetConf::parse(&with(extra)).unwrap_err());
        assert!(bad(r#""SubnetMin":"x","#).contains("\"SubnetMin\" is not an IPv4 address"));
        assert!(bad(r#""SubnetLen":99,"#).contains("not a prefix length"));
    }

    fn err(text: &str) -> String {
        format!("{:#}", NetConf::parse(text).unwrap_err())
    }

    #[test]
    fn keys_match_as_go_decodes_them() {
        let c = NetConf::parse(
            r#"{"network":"10.1.0.0/16","SUBNETLEN":25,"subnetmin":"10.1.4.0","backend":{"type":"ipip"}}"#,
        )
        .unwrap();
        assert_eq!(c.network, "10.1.0.0/16".parse().unwrap());
        assert_eq!(c.subnet_len, Some(25));
        assert_eq!(c.subnet_min, Some("10.1.4.0".parse().unwrap()));
        // The last matching key wins, whatever its case.
        let c = NetConf::parse(
            r#"{"Network":"10.1.0.0/16","NETWORK":"10.2.0.0/16","Backend":{"Type":"ipip"}}"#,
        )
        .unwrap();
        assert_eq!(c.network, "10.2.0.0/16".parse().unwrap());
        // Unicode simple folding: the long s and the Kelvin sign.
        let c = NetConf::parse(
            "{\"Network\":\"10.1.0.0/16\",\"\u{17f}ubnetLen\":26,\"Bac\u{212a}end\":{\"Type\":\"ipip\"}}",
        )
        .unwrap();
        assert_eq!(c.subnet_len, Some(26));
        // Close is not equal.
        let e = err(r#"{"Net_work":"10.1.0.0/16","Backend":{"Type":"ipip"}}"#);
        assert!(e.contains("no \"Network\""), "{e}");
        // flanneld's other keys, and IPv6 ones without EnableIPv6, are inert;
        // EnableNFTables picks the forward rules' frontend.
        let c = NetConf::parse(
            r#"{"Network":"10.1.0.0/16","EnableIPv4":true,"EnableIPv6":false,"IPv6Network":"fd00::/48","enableNFTables":true,"Backend":{"Type":"ipip"}}"#,
        )
        .unwrap();
        assert!(c.enable_nftables);
        assert!(
            !NetConf::parse(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"ipip"}}"#)
                .unwrap()
                .enable_nftables
        );
        let e =
            err(r#"{"Network":"10.1.0.0/16","EnableNFTables":"yes","Backend":{"Type":"ipip"}}"#);
        assert!(e.contains("EnableNFTables"), "{e}");
    }

    #[test]
    fn ipv6_is_refused() {
        let e = err(
            r#"{"Network":"10.1.0.0/16","enableipv6":true,"IPv6Network":"fd00::/48","Backend":{"Type":"ipip"}}"#,
        );
        assert!(
            e.contains("\"EnableIPv6\" is true") && e.contains("IPv4 only"),
            "{e}"
        );
        let e = err(r#"{"EnableIPv4":false,"Network":"10.1.0.0/16","Backend":{"Type":"ipip"}}"#);
        assert!(e.contains("\"EnableIPv4\" is false"), "{e}");
        let e = err(r#"{"EnableIPv6":"yes","Network":"10.1.0.0/16","Backend":{"Type":"ipip"}}"#);
        assert!(e.contains("\"EnableIPv6\" has the wrong type"), "{e}");
    }

    #[test]
    fn clear_errors() {
        assert!(
            err(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).contains("\"vxlan\"")
        );
        assert!(err(r#"{"Network":"10.244.0.0/16"}"#).contains("\"udp\""));
        assert!(err(r#"{"Backend":{"Type":"ipip"}}"#).contains("no \"Network\""));
        assert!(
            err(r#"{"Network":"10.244.0.0/33","Backend":{"Type":"ipip"}}"#)
                .contains("not an IPv4 CIDR")
        );
        assert!(
            err(r#"{"Network":"fd00::/64","Backend":{"Type":"ipip"}}"#)
                .contains("not an IPv4 CIDR")
        );
        assert!(err("{").contains("not valid JSON"));
        assert!(err("[]").contains("not valid JSON"));
        assert!(err(r#"{"Network":"10.1.0.0/16","Backend":"ipip"}"#).contains("not an object"));
        assert!(
            err(r#"{"Network":"10.1.0.0/16","SubnetLen":"24","Backend":{"Type":"ipip"}}"#)
                .contains("\"SubnetLen\" has the wrong type")
        );
    }
}
