//! flanneld's `net-conf.json`, read the way flanneld reads it.

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use ipnet::Ipv4Net;
use serde::Deserialize;

/// The parts of `net-conf.json` this dataplane uses. Other flannel keys (SubnetLen,
/// SubnetMin, ...) are accepted and ignored: node subnets come from `spec.podCIDR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConf {
    /// The cluster's pod network (`Network`).
    pub network: Ipv4Net,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Raw {
    network: Option<String>,
    backend: Option<RawBackend>,
}

#[derive(Deserialize)]
struct RawBackend {
    #[serde(rename = "Type")]
    kind: Option<String>,
}

impl NetConf {
    pub fn parse(text: &str) -> Result<Self> {
        let raw: Raw = serde_json::from_str(text).context("net-conf.json is not valid JSON")?;
        let network = raw.network.context("net-conf.json has no \"Network\"")?;
        let network: Ipv4Net = network
            .parse()
            .with_context(|| format!("\"Network\" is not an IPv4 CIDR: {network:?}"))?;
        // flanneld's default backend is udp; this dataplane implements ipip only.
        let kind = raw
            .backend
            .and_then(|b| b.kind)
            .unwrap_or_else(|| "udp".into());
        if !kind.eq_ignore_ascii_case("ipip") {
            bail!(
                "\"Backend.Type\" is {kind:?}: this dataplane implements the \"ipip\" backend only"
            );
        }
        Ok(Self {
            network: network.trunc(),
        })
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }
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
    fn ignores_other_flannel_keys() {
        let c = NetConf::parse(
            r#"{"Network":"10.1.0.0/16","SubnetLen":24,"Backend":{"Type":"IPIP","DirectRouting":false}}"#,
        );
        assert!(c.is_ok());
    }

    fn err(text: &str) -> String {
        format!("{:#}", NetConf::parse(text).unwrap_err())
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
    }
}
