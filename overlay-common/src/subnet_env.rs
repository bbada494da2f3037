//! The format of `/run/flannel/subnet.env`: the agent writes it (as flanneld's
//! `WriteSubnetFile`, flannel-io/flannel v0.28.9 `pkg/subnet/subnet.go`), the flannel
//! CNI plugin reads it (flannel-io/cni-plugin `flannel.go`, `loadFlannelSubnetEnv`),
//! and so does the lab, in place of that plugin.

use core::{fmt, net::Ipv4Addr};
use std::{borrow::ToOwned, format, string::String};

use ipnet::Ipv4Net;

/// The address of a subnet that its gateway holds: the first after the network
/// address (the pod bridge's address, flannel's `FLANNEL_SUBNET`).
pub fn gateway(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()).wrapping_add(1))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// FLANNEL_NETWORK: the cluster's pod network (the pods' route into it).
    pub network: Ipv4Net,
    /// FLANNEL_SUBNET: this node's gateway address with the subnet's prefix length.
    pub subnet: Ipv4Net,
    /// FLANNEL_MTU: the uplink's MTU less the IPIP header.
    pub mtu: u32,
    /// FLANNEL_IPMASQ: whether the node masquerades (`--ip-masq`); when it does not,
    /// the CNI plugin has the bridge plugin do it.
    pub ipmasq: bool,
}

impl SubnetEnv {
    /// The file of a node whose pod subnet is `pod_cidr`.
    pub fn new(network: Ipv4Net, pod_cidr: Ipv4Net, mtu: u32, ipmasq: bool) -> Self {
        let subnet = Ipv4Net::new(gateway(pod_cidr), pod_cidr.prefix_len())
            .expect("the prefix length of a valid subnet");
        Self {
            network,
            subnet,
            mtu,
            ipmasq,
        }
    }

    /// Reads the file as the CNI plugin does: every key it needs must be there;
    /// `FLANNEL_IPMASQ` is true only when it says `true`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let value = |key: &str| value(text, key).ok_or_else(|| format!("subnet.env has no {key}"));
        let parsed = |key: &str| -> Result<_, String> {
            let v = value(key)?;
            Ok((v.to_owned(), format!("{key}={v} is not valid")))
        };
        let (network, bad_network) = parsed("FLANNEL_NETWORK")?;
        let (subnet, bad_subnet) = parsed("FLANNEL_SUBNET")?;
        let (mtu, bad_mtu) = parsed("FLANNEL_MTU")?;
        Ok(Self {
            network: network.parse().map_err(|_| bad_network)?,
            subnet: subnet.parse().map_err(|_| bad_subnet)?,
            mtu: mtu.parse().map_err(|_| bad_mtu)?,
            ipmasq: value("FLANNEL_IPMASQ")? == "true",
        })
    }
}

/// The node's pod subnet in a file's text (`FLANNEL_SUBNET` without its host bits),
/// whatever else the file holds, as flanneld reads it back (`ReadCIDRFromSubnetFile`).
pub fn pod_cidr_of(text: &str) -> Option<Ipv4Net> {
    value(text, "FLANNEL_SUBNET")?
        .parse::<Ipv4Net>()
        .ok()
        .map(|n| n.trunc())
}

/// The value of `key` in a file's text.
fn value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .map(str::trim)
}

/// The file's text, as flanneld writes it.
impl fmt::Display for SubnetEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "FLANNEL_NETWORK={}", self.network)?;
        writeln!(f, "FLANNEL_SUBNET={}", self.subnet)?;
        writeln!(f, "FLANNEL_MTU={}", self.mtu)?;
        writeln!(f, "FLANNEL_IPMASQ={}", self.ipmasq)
    }
}

#[cfg(test)]
mod tests {
    use std::string::ToString;

    use super::*;

    const TEXT: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1480\nFLANNEL_IPMASQ=false\n";

    #[test]
    fn written_and_read_as_flannel_does() {
        let env = SubnetEnv::new(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
            1480,
            false,
        );
        assert_eq!(env.to_string(), TEXT);
        assert_eq!(SubnetEnv::parse(TEXT), Ok(env.clone()));
        // Read back from FLANNEL_SUBNET alone, as flanneld reads an earlier file.
        assert_eq!(
            pod_cidr_of("FLANNEL_SUBNET=10.244.7.1/24\n"),
            Some("10.244.7.0/24".parse().unwrap())
        );
        assert_eq!(pod_cidr_of("FLANNEL_SUBNET=x\n"), None);
        let masq = TEXT.replace("IPMASQ=false", "IPMASQ=true");
        assert!(SubnetEnv::parse(&masq).unwrap().ipmasq);
        assert!(
            !SubnetEnv::parse(&TEXT.replace("false", "yes"))
                .unwrap()
                .ipmasq
        );
    }

    #[test]
    fn missing_or_bad_keys_are_named() {
        // flannel's plugin refuses a file that lacks any of them.
        for key in [
            "FLANNEL_NETWORK",
            "FLANNEL_SUBNET",
            "FLANNEL_MTU",
            "FLANNEL_IPMASQ",
        ] {
            let text: String = TEXT
                .lines()
                .filter(|l| !l.starts_with(key))
                .map(|l| format!("{l}\n"))
                .collect();
            assert_eq!(
                SubnetEnv::parse(&text),
                Err(format!("subnet.env has no {key}"))
            );
        }
        let e = SubnetEnv::parse(&TEXT.replace("10.244.1.1/24", "x")).unwrap_err();
        assert_eq!(e, "FLANNEL_SUBNET=x is not valid");
    }
}
