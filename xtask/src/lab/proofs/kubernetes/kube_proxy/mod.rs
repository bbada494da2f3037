//! kube-proxy's rules on a lab node: for a small description of Services and their
//! ready endpoints, the rules kube-proxy would write on one node, in its three Linux
//! modes (iptables, nftables, IPVS), rendered as the text its tools take and
//! installed inside the node's network namespace. The lab's Kubernetes matrix drives
//! Service traffic through them, so that our datapath is proven under the rules a real
//! node carries, without running kube-proxy (no API server here).
//!
//! The rules imitate kubernetes/kubernetes v1.34 (the first release whose nftables
//! base chains are those of PR #132456), read from:
//! - `pkg/proxy/iptables/proxier.go` (`syncProxyRules`, `writeServiceToEndpointRules`,
//!   `iptablesJumpChains`, `iptablesKubeletJumpChains`, `portProtoHash`,
//!   `servicePortEndpointChainName`) and its `proxier_test.go`
//!   (`TestOverallIPTablesRules`, `TestExternalTrafficPolicyLocal`);
//! - `pkg/proxy/nftables/proxier.go` (`setupNFTables`, `syncProxyRules`,
//!   `hashAndTruncate`, `servicePortChainNameBase`, `servicePortEndpointChainNameBase`)
//!   and its `proxier_test.go` (`baseRules`, `TestOverallNFTablesRules`);
//! - `pkg/proxy/ipvs/proxier.go` (`NewProxier`'s sysctls, `syncProxyRules`,
//!   `writeIptablesRules`, `acceptIPVSTraffic`, `iptablesJumpChain`, `ipsetInfo`,
//!   `ipsetWithIptablesChain`), `pkg/proxy/ipvs/ipset.go` (set names and comments),
//!   `pkg/proxy/ipvs/ipset/ipset.go` (`createSet`, `Entry.String`) and
//!   `proxier_test.go` (`TestOnlyLocalNodePorts`);
//! - `pkg/proxy/endpointslicecache.go` (endpoints sorted by `ip:port` text) and
//!   `cmd/kube-proxy/app/server_linux.go` (the conntrack sysctls).
//!
//! The repository is too large to fetch whole: the files were read as the code index
//! holds them, one revision each rather than a tagged checkout (the iptables and IPVS
//! proxiers after the v1.33 PreferSameNode change #130844, the nftables expectations
//! after #132456). Where an older revision was read the rules it writes did not change
//! since; where a newer test disagrees with an older proxier (the nftables ClusterIP
//! masquerade rule no longer matches `tcp dport`), the test is followed.
//!
//! kube-proxy's flags are the lab's: `--hostname-override=<node>`, the node IP,
//! `--cluster-cidr=<pod network>` with `--detect-local-mode=ClusterCIDR`, masquerade
//! bit 14 (mark 0x4000), `--masquerade-all=false`, no `--nodeport-addresses` (NodePorts
//! on every local address), `iptables.localhostNodePorts` and the conntrack timeouts
//! at their defaults (established 24 h, close-wait 1 h), IPVS scheduler `rr`,
//! `strictARP` off. Each install is a full sync, one input per tool, after removing
//! what an earlier install left.
//!
//! What kube-proxy would do differently, and why:
//! - its nfacct packet counters (`-m nfacct` on the INVALID drop, and a duplicate
//!   localhost NodePort rule) are written only when it could create the counters; the
//!   rules here are those of a node where it could not (the other rules match the same
//!   packets, so only a metric is lost);
//! - nftables' "drop traffic to unallocated ClusterIPs" rule needs the cluster's
//!   ServiceCIDR objects, which the model does not have: it is left out, as kube-proxy
//!   leaves it out until it has seen them;
//! - the model has no ExternalIPs, LoadBalancers, session affinity, topology or
//!   internalTrafficPolicy, so the rules for those never appear (health check node
//!   ports belong to LoadBalancers only);
//! - kube-proxy walks its services in Go map order; here they come in the order
//!   given, which only orders the rules of different services.
//!
//! `iptables.rs`, `nftables.rs` and `ipvs.rs` hold each mode; `services.rs` the model,
//! the validation, the chain-name hashing and the plumbing the modes share; this file
//! picks a mode, installs and removes its rules; `fixture.rs` holds the Services of
//! kube-proxy's own tests, and `namespace_tests.rs` installs each mode for real and
//! sends traffic through it.

#[cfg(test)]
mod fixture;
mod iptables;
mod ipvs;
mod nftables;
mod services;

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, ensure};

pub(crate) use services::{Endpoint, NodeView, Protocol, Service, ServicePort, TrafficPolicy};
use services::{local_addresses, pipe, resolve};

use crate::lab::machinery::netns;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Iptables,
    Nftables,
    Ipvs,
}

/// What each mode feeds its tools.
#[derive(Debug)]
pub(crate) enum Rendered {
    /// `iptables-restore --noflush` input: the filter, nat and mangle tables.
    Iptables(String),
    /// `nft -f` input: the whole `ip kube-proxy` table.
    Nftables(String),
    Ipvs(ipvs::Rules),
}

/// The rules kube-proxy in `mode` writes on `node` for `services`.
pub(crate) fn render(mode: Mode, node: &NodeView, services: &[Service]) -> Result<Rendered> {
    let ports = resolve(node, services)?;
    Ok(match mode {
        Mode::Iptables => Rendered::Iptables(iptables::render(node, &ports)),
        Mode::Nftables => Rendered::Nftables(nftables::render(node, &ports)),
        Mode::Ipvs => Rendered::Ipvs(ipvs::render(node, &ports)),
    })
}

/// Replaces whatever an earlier install of `mode` left in `ns` with the rules for
/// `services`, and sets the namespaced sysctls kube-proxy sets in that mode.
pub(crate) fn install(ns: &str, mode: Mode, node: &NodeView, services: &[Service]) -> Result<()> {
    let rendered = render(mode, node, services)?;
    // The node IP itself only matters to kube-proxy for LoadBalancer source ranges,
    // which the model has none of; a node view meant for another node would be.
    ensure!(
        local_addresses(ns)?.contains(&node.node_ip),
        "node {}'s IP {} is not an address of {ns}",
        node.name,
        node.node_ip
    );
    remove(ns, mode)?;
    let sysctls = match &rendered {
        Rendered::Iptables(restore) => {
            iptables::restore(ns, restore)?;
            iptables::SYSCTLS
        }
        Rendered::Nftables(script) => {
            pipe(netns::command(ns, "nft").args(["-f", "-"]), script)?;
            nftables::SYSCTLS
        }
        Rendered::Ipvs(rules) => {
            rules.install(ns)?;
            ipvs::SYSCTLS
        }
    };
    // After the rules: the conntrack sysctls exist once a rule has loaded conntrack.
    for (key, value) in sysctls.iter().chain(CONNTRACK_SYSCTLS) {
        netns::sysctl(ns, key, value)?;
    }
    Ok(())
}

/// Removes every chain, table, set, IPVS service and device an install of `mode`
/// creates in `ns` (the sysctls stay, as kube-proxy leaves them).
pub(crate) fn remove(ns: &str, mode: Mode) -> Result<()> {
    match mode {
        Mode::Iptables => iptables::remove(ns, iptables::CHAINS),
        Mode::Nftables => nftables::remove(ns),
        Mode::Ipvs => ipvs::remove(ns),
    }
    .with_context(|| format!("removing kube-proxy's {mode:?} rules from {ns}"))
}

/// Whether `mode` can run on this machine; if not, why.
pub(crate) fn available(mode: Mode) -> Result<(), String> {
    if mode == Mode::Ipvs {
        ipvs::kernel_has_ipvs()?;
    }
    let tools: &[(&str, &str)] = match mode {
        Mode::Iptables => &[
            ("iptables-restore", "iptables"),
            ("iptables-save", "iptables"),
        ],
        Mode::Nftables => &[("nft", "nftables")],
        Mode::Ipvs => &[
            ("ipvsadm", "ipvsadm"),
            ("ipset", "ipset"),
            ("iptables-restore", "iptables"),
            ("iptables-save", "iptables"),
        ],
    };
    for (tool, package) in tools {
        let runs = Command::new(tool)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|out| out.status.success());
        if !runs {
            return Err(format!(
                "{tool} is missing (Debian package {package}), which kube-proxy's {mode:?} mode needs"
            ));
        }
    }
    Ok(())
}

/// The conntrack timeouts kube-proxy sets in every mode (`conntrack.tcpEstablishedTimeout`
/// and `tcpCloseWaitTimeout` at their defaults); both are per namespace. Its
/// `nf_conntrack_max` is not: it belongs to the machine and is left alone.
const CONNTRACK_SYSCTLS: &[(&str, &str)] = &[
    (
        "net/netfilter/nf_conntrack_tcp_timeout_established",
        "86400",
    ),
    ("net/netfilter/nf_conntrack_tcp_timeout_close_wait", "3600"),
];

#[cfg(test)]
mod tests {
    use super::{fixture::*, services::hash};

    #[test]
    fn chain_names_hash_as_kube_proxys() {
        // pkg/proxy/iptables/proxier_test.go and pkg/proxy/nftables/proxier_test.go.
        assert_eq!(hash("ns1/svc1:p80tcp", 16), "XPGD46QRK7WJZT7O");
        assert_eq!(hash("ns1/svc1:p80tcp10.180.0.1:80", 16), "SXIVWICOYRO3J4NJ");
        assert_eq!(hash("ns1/svc1/tcp/p80", 8), "ULMVA6XW");
        assert_eq!(hash("ns1/svc1/tcp/p80__10.180.0.1/80", 8), "5OJB2KTY");
    }

    #[test]
    fn endpoints_come_in_kube_proxys_order_with_their_locality() {
        let mut svc = spread(3);
        svc.endpoints.reverse();
        svc.endpoints[0].node = "test-node".into();
        let ports = resolve(&node(), std::slice::from_ref(&svc)).unwrap();
        let order: Vec<(&str, bool)> = ports[0]
            .endpoints
            .iter()
            .map(|e| (e.text.as_str(), e.local))
            .collect();
        assert_eq!(
            order,
            [
                ("10.181.0.1:80", false),
                ("10.181.0.2:80", false),
                ("10.181.0.3:80", true)
            ]
        );
        // By text, not by address: '0' sorts before ':'.
        let ten = [spread(10)];
        let ports = resolve(&node(), &ten).unwrap();
        let first: Vec<&str> = ports[0].endpoints[..3]
            .iter()
            .map(|e| e.text.as_str())
            .collect();
        assert_eq!(first, ["10.181.0.10:80", "10.181.0.1:80", "10.181.0.2:80"]);
        assert_eq!(ports[0].name, "ns8/svc8:p80");
    }

    #[test]
    fn what_the_api_server_would_refuse_is_refused_with_the_reason() {
        let refused = |services: Vec<Service>| -> String {
            format!("{:#}", resolve(&node(), &services).err().expect("refused"))
        };
        let mut bad_name = dns();
        bad_name.name = "Svc_7".into();
        assert!(refused(vec![bad_name]).contains("name \"Svc_7\" is not a DNS label"));
        let mut twice = overall();
        twice[1].cluster_ip = twice[0].cluster_ip;
        assert!(refused(twice).contains("ClusterIP 172.30.0.41 is taken"));
        let mut half = dns();
        half.ports[0].node_port = Some(30053);
        assert!(refused(vec![half]).contains("node port on every port"));
        let mut local = dns();
        local.external_traffic_policy = TrafficPolicy::Local;
        assert!(refused(vec![local]).contains("Local needs a NodePort"));
        let mut clash = overall();
        clash[2].ports[0].node_port = Some(3001);
        assert!(refused(clash).contains("tcp node port 3001 is taken"));
        let mut unnamed = dns();
        unnamed.ports[1].name.clear();
        assert!(refused(vec![unnamed]).contains("port name \"\" is not a DNS label"));
        let mut duplicate = spread(2);
        duplicate.endpoints[1].ip = duplicate.endpoints[0].ip;
        assert!(refused(vec![duplicate]).contains("lists an endpoint twice"));
        // A single unnamed port is fine: its name is the Service's.
        let mut single = spread(1);
        single.ports[0].name.clear();
        assert_eq!(resolve(&node(), &[single]).unwrap()[0].name, "ns8/svc8");
    }
}

#[cfg(test)]
mod namespace_tests;
