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
//! `iptables.rs`, `nftables.rs` and `ipvs.rs` hold each mode; this file the model, the
//! validation, the chain-name hashing the modes share, and the tools' plumbing;
//! `namespace_tests.rs` installs each mode for real and sends traffic through it.

mod iptables;
mod ipvs;
mod nftables;

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};
use ipnet::Ipv4Net;

use crate::lab::machinery::netns;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// As kube-proxy writes it into rules and hashes it into chain names.
    fn lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// `spec.externalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TrafficPolicy {
    Cluster,
    Local,
}

#[derive(Debug, Clone)]
pub(crate) struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: u16,
    pub node_port: Option<u16>,
}

/// A ready endpoint and the node it runs on.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub ip: Ipv4Addr,
    pub node: String,
}

#[derive(Debug, Clone)]
pub(crate) struct Service {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    pub external_traffic_policy: TrafficPolicy,
    /// Ready endpoints only.
    pub endpoints: Vec<Endpoint>,
}

/// What kube-proxy on one node knows of that node (see the module documentation for
/// the flags this stands for).
#[derive(Debug, Clone)]
pub(crate) struct NodeView {
    /// `--hostname-override`: endpoints on this node are its local endpoints.
    pub name: String,
    pub node_ip: Ipv4Addr,
    /// `--cluster-cidr` with `--detect-local-mode=ClusterCIDR`.
    pub cluster_cidr: Ipv4Net,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Iptables,
    Nftables,
    Ipvs,
}

/// kube-proxy's mark for traffic to masquerade (`--masquerade-bit=14`).
const MASQUERADE_MARK: &str = "0x4000";

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

/// The IPv4 addresses of `ns`'s devices.
fn local_addresses(ns: &str) -> Result<Vec<Ipv4Addr>> {
    let links = netns::ip_json(ns, &["-4", "address", "show"])?;
    let mut addresses = Vec::new();
    for link in links.as_array().into_iter().flatten() {
        for addr in link["addr_info"].as_array().into_iter().flatten() {
            if let Some(local) = addr["local"].as_str() {
                addresses.push(
                    local.parse().with_context(|| {
                        format!("address {local} of {} in {ns}", link["ifname"])
                    })?,
                );
            }
        }
    }
    Ok(addresses)
}

/// A service port as kube-proxy's proxiers see it: validated, with its endpoints in
/// kube-proxy's order.
struct SvcPort<'a> {
    service: &'a Service,
    port: &'a ServicePort,
    /// `ServicePortName.String()`: `namespace/name:port`, or `namespace/name` for an
    /// unnamed port.
    name: String,
    /// `ExternalPolicyLocal()`: externally reachable with `externalTrafficPolicy: Local`.
    external_local: bool,
    endpoints: Vec<Ep>,
}

struct Ep {
    ip: Ipv4Addr,
    /// `ip:port`, the endpoint's `String()`.
    text: String,
    local: bool,
}

impl SvcPort<'_> {
    fn protocol(&self) -> &'static str {
        self.port.protocol.lower()
    }

    fn has_endpoints(&self) -> bool {
        !self.endpoints.is_empty()
    }

    fn local_endpoints(&self) -> impl Iterator<Item = &Ep> {
        self.endpoints.iter().filter(|e| e.local)
    }

    /// Endpoints that traffic from outside the cluster (a NodePort) may reach.
    fn has_external_endpoints(&self) -> bool {
        if self.external_local {
            self.local_endpoints().next().is_some()
        } else {
            self.has_endpoints()
        }
    }
}

/// Checks `services` as the API server would have, and lays them out per port.
fn resolve<'a>(node: &NodeView, services: &'a [Service]) -> Result<Vec<SvcPort<'a>>> {
    let mut names = HashSet::new();
    let mut cluster_ips = HashSet::new();
    let mut node_ports = HashSet::new();
    let mut ports = Vec::new();
    for service in services {
        let id = format!("{}/{}", service.namespace, service.name);
        check_label(&service.namespace, "namespace", &id)?;
        check_label(&service.name, "name", &id)?;
        ensure!(names.insert(id.clone()), "Service {id} is given twice");
        ensure!(
            cluster_ips.insert(service.cluster_ip),
            "Service {id}: ClusterIP {} is taken by another Service",
            service.cluster_ip
        );
        ensure!(!service.ports.is_empty(), "Service {id} has no ports");
        let with_node_ports = service.ports.iter().filter(|p| p.node_port.is_some());
        let node_port_service = match with_node_ports.count() {
            0 => false,
            n if n == service.ports.len() => true,
            _ => bail!("Service {id}: a NodePort Service has a node port on every port"),
        };
        ensure!(
            node_port_service || service.external_traffic_policy == TrafficPolicy::Cluster,
            "Service {id}: externalTrafficPolicy Local needs a NodePort Service"
        );
        let mut port_names = HashSet::new();
        let mut service_ports = HashSet::new();
        for port in &service.ports {
            if service.ports.len() > 1 || !port.name.is_empty() {
                check_label(&port.name, "port name", &id)?;
            }
            ensure!(
                port_names.insert(&port.name),
                "Service {id}: port name {:?} is used twice",
                port.name
            );
            ensure!(
                port.port != 0 && port.target_port != 0,
                "Service {id}: port {:?} has port or targetPort 0",
                port.name
            );
            ensure!(
                service_ports.insert((port.protocol, port.port)),
                "Service {id}: {} port {} is given twice",
                port.protocol.lower(),
                port.port
            );
            if let Some(node_port) = port.node_port {
                ensure!(node_port != 0, "Service {id}: node port 0");
                ensure!(
                    node_ports.insert((port.protocol, node_port)),
                    "Service {id}: {} node port {node_port} is taken by another port",
                    port.protocol.lower()
                );
            }
            let mut endpoints: Vec<Ep> = service
                .endpoints
                .iter()
                .map(|e| Ep {
                    ip: e.ip,
                    text: format!("{}:{}", e.ip, port.target_port),
                    local: e.node == node.name,
                })
                .collect();
            // EndpointSliceCache hands each port's endpoints over sorted by their text.
            endpoints.sort_by(|a, b| a.text.cmp(&b.text));
            ensure!(
                endpoints.windows(2).all(|w| w[0].ip != w[1].ip),
                "Service {id} lists an endpoint twice"
            );
            let name = if port.name.is_empty() {
                id.clone()
            } else {
                format!("{id}:{}", port.name)
            };
            ports.push(SvcPort {
                service,
                port,
                name,
                external_local: node_port_service
                    && service.external_traffic_policy == TrafficPolicy::Local,
                endpoints,
            });
        }
    }
    Ok(ports)
}

/// Namespaces, names and port names are DNS labels: they go verbatim into chain names
/// and comments.
fn check_label(value: &str, what: &str, service: &str) -> Result<()> {
    let valid = (1..=63).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    ensure!(
        valid,
        "Service {service}: {what} {value:?} is not a DNS label (a-z, 0-9 and '-', at most 63)"
    );
    Ok(())
}

/// The first `chars` characters of the base32 (RFC 4648 alphabet) encoding of the
/// SHA-256 of `input`: the hash part of kube-proxy's chain names.
fn hash(input: &str, chars: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = ring::digest::digest(&ring::digest::SHA256, input.as_bytes());
    let bytes = digest.as_ref();
    (0..chars)
        .map(|i| {
            // The 5 bits of character i, which may straddle two bytes.
            let bit = i * 5;
            let pair = u16::from(bytes[bit / 8]) << 8 | u16::from(bytes[bit / 8 + 1]);
            char::from(ALPHABET[usize::from(pair >> (11 - bit % 8)) & 31])
        })
        .collect()
}

/// Runs `cmd` with `input` on its standard input.
fn pipe(cmd: &mut Command, input: &str) -> Result<()> {
    netns::run_with_input(cmd, input).map(drop)
}

/// Services shaped like those of kube-proxy's own tests (their addresses, node and
/// cluster CIDR), so that the renderings can be compared with what those tests expect.
#[cfg(test)]
mod fixture {
    pub(super) use super::{
        Endpoint, Mode, NodeView, Protocol, Rendered, Service, ServicePort, TrafficPolicy, render,
    };

    /// NewFakeProxier's node.
    pub(super) fn node() -> NodeView {
        NodeView {
            name: "test-node".into(),
            node_ip: "192.168.0.2".parse().unwrap(),
            cluster_cidr: "10.0.0.0/8".parse().unwrap(),
        }
    }

    pub(super) fn render_for_test(mode: Mode, services: &[Service]) -> Rendered {
        render(mode, &node(), services).expect("the fixture renders")
    }

    pub(super) fn port(
        name: &str,
        protocol: Protocol,
        port: u16,
        target: u16,
        node_port: Option<u16>,
    ) -> ServicePort {
        ServicePort {
            name: name.into(),
            protocol,
            port,
            target_port: target,
            node_port,
        }
    }

    /// `endpoints`: (address, node).
    pub(super) fn service(
        id: &str,
        cluster_ip: &str,
        ports: Vec<ServicePort>,
        policy: TrafficPolicy,
        endpoints: &[(&str, &str)],
    ) -> Service {
        let (namespace, name) = id.split_once('/').unwrap();
        Service {
            namespace: namespace.into(),
            name: name.into(),
            cluster_ip: cluster_ip.parse().unwrap(),
            ports,
            external_traffic_policy: policy,
            endpoints: endpoints
                .iter()
                .map(|(ip, node)| Endpoint {
                    ip: ip.parse().unwrap(),
                    node: (*node).into(),
                })
                .collect(),
        }
    }

    fn p80(node_port: Option<u16>) -> Vec<ServicePort> {
        vec![port("p80", Protocol::Tcp, 80, 80, node_port)]
    }

    /// TestOverallIPTablesRules' and TestOverallNFTablesRules' services, as far as the
    /// model goes: a ClusterIP Service, a NodePort with Local policy and no endpoint
    /// here, a NodePort, a ClusterIP with endpoints on two nodes, one without endpoints.
    pub(super) fn overall() -> Vec<Service> {
        use TrafficPolicy::*;
        vec![
            service(
                "ns1/svc1",
                "172.30.0.41",
                p80(None),
                Cluster,
                &[("10.180.0.1", "other-node")],
            ),
            service(
                "ns2/svc2",
                "172.30.0.42",
                p80(Some(3001)),
                Local,
                &[("10.180.0.2", "other-node")],
            ),
            service(
                "ns3/svc3",
                "172.30.0.43",
                p80(Some(3003)),
                Cluster,
                &[("10.180.0.3", "other-node")],
            ),
            service(
                "ns4/svc4",
                "172.30.0.44",
                p80(None),
                Cluster,
                &[("10.180.0.4", "other-node"), ("10.180.0.5", "test-node")],
            ),
            service("ns6/svc6", "172.30.0.46", p80(None), Cluster, &[]),
        ]
    }

    /// TestExternalTrafficPolicyLocal's Service, as a NodePort: one endpoint here.
    pub(super) fn local_policy() -> Vec<Service> {
        vec![service(
            "ns1/svc1",
            "172.30.0.41",
            p80(Some(3001)),
            TrafficPolicy::Local,
            &[("10.180.0.1", "other-node"), ("10.180.2.1", "test-node")],
        )]
    }

    /// IPVS's TestOnlyLocalNodePorts' Service.
    pub(super) fn only_local_node_ports() -> Vec<Service> {
        vec![service(
            "ns1/svc1",
            "10.20.30.41",
            p80(Some(3001)),
            TrafficPolicy::Local,
            &[("10.180.0.1", "test-node"), ("10.180.1.1", "other-node")],
        )]
    }

    /// DNS over TCP (to 5353) and UDP on one ClusterIP.
    pub(super) fn dns() -> Service {
        service(
            "ns7/svc7",
            "172.30.0.47",
            vec![
                port("dns-tcp", Protocol::Tcp, 53, 5353, None),
                port("dns-udp", Protocol::Udp, 53, 53, None),
            ],
            TrafficPolicy::Cluster,
            &[("10.180.0.7", "other-node")],
        )
    }

    /// A ClusterIP Service with `n` endpoints elsewhere.
    pub(super) fn spread(n: u16) -> Service {
        let ips: Vec<String> = (0..n)
            .map(|i| format!("10.181.{}.{}", i / 250, i % 250 + 1))
            .collect();
        let endpoints: Vec<(&str, &str)> =
            ips.iter().map(|ip| (ip.as_str(), "other-node")).collect();
        service(
            "ns8/svc8",
            "172.30.0.48",
            p80(None),
            TrafficPolicy::Cluster,
            &endpoints,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{fixture::*, *};

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
