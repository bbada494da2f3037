//! kube-proxy's IPVS mode (`pkg/proxy/ipvs/proxier.go`): an IPVS virtual service per
//! ClusterIP and per NodePort on every local address, NAT (masquerading) real servers
//! with weight 1 and the `rr` scheduler; every ClusterIP on the `kube-ipvs0` dummy
//! device (left down, as kube-proxy leaves it: its /32 local routes exist anyway);
//! the ipsets that the iptables rules match (`ipset.go`); and those iptables rules
//! (`writeIptablesRules`). The kernel needs `ip_vs`, which not every kernel has: there
//! this mode runs in the 6.1 VM.

use std::{fmt::Write as _, net::Ipv4Addr, path::Path, process::Command};

use anyhow::{Context as _, Result};

use super::{
    iptables::{self, Chains, Jump},
    services::{Ep, NodeView, Protocol, SvcPort, local_addresses, pipe},
};
use crate::lab::machinery::netns;

/// What `NewProxier` sets: IPVS connections tracked by conntrack (for the iptables
/// masquerade), connections to removed real servers expired, and forwarding.
/// (`conn_reuse_mode` is left as is from kernel 5.9 on; arp_ignore/arp_announce are
/// for strictARP, off.)
pub(super) const SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv4/vs/conntrack", "1"),
    ("net/ipv4/vs/expire_nodest_conn", "1"),
    ("net/ipv4/vs/expire_quiescent_template", "1"),
    ("net/ipv4/ip_forward", "1"),
];

const DUMMY: &str = "kube-ipvs0";

const LOOP_BACK: &str = "KUBE-LOOP-BACK";
const CLUSTER_IP: &str = "KUBE-CLUSTER-IP";
const EXTERNAL_IP: &str = "KUBE-EXTERNAL-IP";
const EXTERNAL_IP_LOCAL: &str = "KUBE-EXTERNAL-IP-LOCAL";
const LOAD_BALANCER: &str = "KUBE-LOAD-BALANCER";
const NODE_PORT_TCP: &str = "KUBE-NODE-PORT-TCP";
const NODE_PORT_LOCAL_TCP: &str = "KUBE-NODE-PORT-LOCAL-TCP";
const NODE_PORT_UDP: &str = "KUBE-NODE-PORT-UDP";
const NODE_PORT_LOCAL_UDP: &str = "KUBE-NODE-PORT-LOCAL-UDP";
const HEALTH_CHECK_NODE_PORT: &str = "KUBE-HEALTH-CHECK-NODE-PORT";
const IPVS_IPS: &str = "KUBE-IPVS-IPS";

/// `ipsetInfo`: every set kube-proxy creates, with its type.
const SETS: &[(&str, &str)] = &[
    (LOOP_BACK, "hash:ip,port,ip"),
    (CLUSTER_IP, "hash:ip,port"),
    (EXTERNAL_IP, "hash:ip,port"),
    (EXTERNAL_IP_LOCAL, "hash:ip,port"),
    (LOAD_BALANCER, "hash:ip,port"),
    ("KUBE-LOAD-BALANCER-FW", "hash:ip,port"),
    ("KUBE-LOAD-BALANCER-LOCAL", "hash:ip,port"),
    ("KUBE-LOAD-BALANCER-SOURCE-IP", "hash:ip,port,ip"),
    ("KUBE-LOAD-BALANCER-SOURCE-CIDR", "hash:ip,port,net"),
    (NODE_PORT_TCP, "bitmap:port"),
    (NODE_PORT_LOCAL_TCP, "bitmap:port"),
    (NODE_PORT_UDP, "bitmap:port"),
    (NODE_PORT_LOCAL_UDP, "bitmap:port"),
    ("KUBE-NODE-PORT-SCTP-HASH", "hash:ip,port"),
    ("KUBE-NODE-PORT-LOCAL-SCTP-HASH", "hash:ip,port"),
    (HEALTH_CHECK_NODE_PORT, "bitmap:port"),
    (IPVS_IPS, "hash:ip"),
];

/// `ipsetWithIptablesChain` for the sets the model can fill, in its order (the LOCAL
/// NodePort sets before the others): (set, chain, target, match, protocol, comment).
const SET_RULES: &[(&str, &str, &str, &str, &str, &str)] = &[
    (
        LOOP_BACK,
        "KUBE-POSTROUTING",
        "MASQUERADE",
        "dst,dst,src",
        "",
        "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose",
    ),
    (
        NODE_PORT_LOCAL_TCP,
        "KUBE-NODE-PORT",
        "RETURN",
        "dst",
        "tcp",
        "Kubernetes nodeport TCP port with externalTrafficPolicy=local",
    ),
    (
        NODE_PORT_TCP,
        "KUBE-NODE-PORT",
        "KUBE-MARK-MASQ",
        "dst",
        "tcp",
        "Kubernetes nodeport TCP port for masquerade purpose",
    ),
    (
        NODE_PORT_LOCAL_UDP,
        "KUBE-NODE-PORT",
        "RETURN",
        "dst",
        "udp",
        "Kubernetes nodeport UDP port with externalTrafficPolicy=local",
    ),
    (
        NODE_PORT_UDP,
        "KUBE-NODE-PORT",
        "KUBE-MARK-MASQ",
        "dst",
        "udp",
        "Kubernetes nodeport UDP port for masquerade purpose",
    ),
];

/// The iptables chains of IPVS mode.
const CHAINS: &Chains = &Chains {
    names: &[
        "KUBE-SERVICES",
        "KUBE-POSTROUTING",
        "KUBE-NODE-PORT",
        "KUBE-LOAD-BALANCER",
        "KUBE-MARK-MASQ",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
        "KUBE-SOURCE-RANGES-FIREWALL",
        "KUBE-IPVS-FILTER",
        "KUBE-IPVS-OUT-FILTER",
    ],
    prefixes: &[],
};

/// `iptablesJumpChain`'s jumps in the filter table (the nat table's are the iptables
/// mode's).
const FILTER_JUMPS: &[Jump] = &[
    ("FORWARD", "", "kubernetes forwarding rules", "KUBE-FORWARD"),
    (
        "INPUT",
        "",
        "kubernetes health check rules",
        "KUBE-NODE-PORT",
    ),
    (
        "INPUT",
        "",
        "kube-proxy firewall rules",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "FORWARD",
        "",
        "kube-proxy firewall rules",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "INPUT",
        "",
        "kubernetes ipvs access filter",
        "KUBE-IPVS-FILTER",
    ),
    (
        "OUTPUT",
        "",
        "kubernetes ipvs access filter",
        "KUBE-IPVS-OUT-FILTER",
    ),
];

/// What IPVS mode installs on a node.
#[derive(Debug)]
pub(crate) struct Rules {
    /// `ipset restore` input: every set, and the entries.
    pub ipset: String,
    /// The addresses bound to kube-ipvs0: the ClusterIPs.
    pub bound: Vec<Ipv4Addr>,
    /// `iptables-restore --noflush` input.
    pub iptables: String,
    services: Vec<VirtualServer>,
}

#[derive(Debug)]
struct VirtualServer {
    /// None: a NodePort, on each of the node's addresses.
    address: Option<Ipv4Addr>,
    protocol: Protocol,
    port: u16,
    /// `ip:port` of each real server.
    reals: Vec<String>,
}

pub(super) fn render(node: &NodeView, ports: &[SvcPort]) -> Rules {
    let mut entries: Vec<(&str, String)> = Vec::new();
    let mut bound: Vec<Ipv4Addr> = Vec::new();
    let mut services = Vec::new();
    for p in ports {
        let proto = p.protocol();
        let cluster_ip = p.service.cluster_ip;
        let port = p.port.port;
        // Hairpin: a local endpoint reaching itself through the Service is masqueraded.
        for ep in p.local_endpoints() {
            entries.push((
                LOOP_BACK,
                format!("{},{proto}:{},{}", ep.ip, p.port.target_port, ep.ip),
            ));
        }
        entries.push((CLUSTER_IP, format!("{cluster_ip},{proto}:{port}")));
        if !bound.contains(&cluster_ip) {
            bound.push(cluster_ip);
        }
        let all: Vec<&Ep> = p.endpoints.iter().collect();
        services.push(VirtualServer {
            address: Some(cluster_ip),
            protocol: p.port.protocol,
            port,
            reals: reals(&all),
        });
        if let Some(node_port) = p.port.node_port {
            let (set, local_set) = match p.port.protocol {
                Protocol::Tcp => (NODE_PORT_TCP, NODE_PORT_LOCAL_TCP),
                Protocol::Udp => (NODE_PORT_UDP, NODE_PORT_LOCAL_UDP),
            };
            entries.push((set, node_port.to_string()));
            // With Local policy, this node's endpoints, or every endpoint when it has
            // none (kubernetes#97081: pods may still reach the NodePort).
            let local: Vec<&Ep> = p.local_endpoints().collect();
            let endpoints = if p.external_local {
                entries.push((local_set, node_port.to_string()));
                if local.is_empty() { &all } else { &local }
            } else {
                &all
            };
            services.push(VirtualServer {
                address: None,
                protocol: p.port.protocol,
                port: node_port,
                reals: reals(endpoints),
            });
        }
    }
    for ip in &bound {
        entries.push((IPVS_IPS, ip.to_string()));
    }

    let mut ipset = String::new();
    for (name, kind) in SETS {
        let options = if kind.starts_with("bitmap") {
            "range 0-65535"
        } else {
            "family inet hashsize 1024 maxelem 65536"
        };
        writeln!(ipset, "create {name} {kind} {options}").unwrap();
    }
    for (set, entry) in &entries {
        writeln!(ipset, "add {set} {entry}").unwrap();
    }
    let filled = |set: &str| entries.iter().any(|(s, _)| *s == set);
    Rules {
        ipset,
        bound,
        iptables: iptables_rules(node, filled),
        services,
    }
}

fn reals(endpoints: &[&Ep]) -> Vec<String> {
    endpoints.iter().map(|e| e.text.clone()).collect()
}

/// `writeIptablesRules` (with `createAndLinkKubeChain`): rules on a set appear only
/// while the set has entries.
fn iptables_rules(node: &NodeView, filled: impl Fn(&str) -> bool) -> String {
    let mut nat = String::from("*nat\n");
    for chain in [
        "KUBE-SERVICES",
        "KUBE-POSTROUTING",
        "KUBE-NODE-PORT",
        "KUBE-LOAD-BALANCER",
        "KUBE-MARK-MASQ",
    ] {
        writeln!(nat, ":{chain} - [0:0]").unwrap();
    }
    iptables::jumps(&mut nat, iptables::NAT_JUMPS);
    nat.push_str("-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN\n");
    for (set, chain, target, matches, protocol, comment) in SET_RULES {
        if filled(set) {
            let protocol = if protocol.is_empty() {
                String::new()
            } else {
                format!(" -p {protocol}")
            };
            writeln!(
                nat,
                "-A {chain}{protocol} -m comment --comment \"{comment}\" -m set --match-set {set} {matches} -j {target}"
            )
            .unwrap();
        }
    }
    if filled(CLUSTER_IP) {
        writeln!(
            nat,
            "-A KUBE-SERVICES -m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\" \
             -m set --match-set {CLUSTER_IP} dst,dst ! -s {} -j KUBE-MARK-MASQ",
            node.cluster_cidr
        )
        .unwrap();
    }
    nat.push_str("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT\n");
    nat.push_str("-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ\n");
    // Accept what IPVS takes, lest later rules reject it (acceptIPVSTraffic).
    if filled(CLUSTER_IP) {
        writeln!(
            nat,
            "-A KUBE-SERVICES -m set --match-set {CLUSTER_IP} dst,dst -j ACCEPT"
        )
        .unwrap();
    }
    iptables::masquerading(&mut nat);
    nat.push_str("COMMIT\n");

    let mut filter = String::from("*filter\n");
    for chain in [
        "KUBE-FORWARD",
        "KUBE-NODE-PORT",
        "KUBE-PROXY-FIREWALL",
        "KUBE-SOURCE-RANGES-FIREWALL",
        "KUBE-IPVS-FILTER",
        "KUBE-IPVS-OUT-FILTER",
    ] {
        writeln!(filter, ":{chain} - [0:0]").unwrap();
    }
    iptables::jumps(&mut filter, FILTER_JUMPS);
    filter.push_str("-A KUBE-SOURCE-RANGES-FIREWALL -j DROP\n");
    iptables::forwarding(&mut filter);
    writeln!(
        filter,
        "-A KUBE-NODE-PORT -m comment --comment \"Kubernetes health check node port\" \
         -m set --match-set {HEALTH_CHECK_NODE_PORT} dst -j ACCEPT"
    )
    .unwrap();
    // Connections to the host's own ports through a ClusterIP are rejected
    // (kubernetes#72236); Service ports return before that.
    for (set, matches) in [
        (LOAD_BALANCER, "dst,dst"),
        (CLUSTER_IP, "dst,dst"),
        (EXTERNAL_IP, "dst,dst"),
        (EXTERNAL_IP_LOCAL, "dst,dst"),
        (HEALTH_CHECK_NODE_PORT, "dst"),
    ] {
        writeln!(
            filter,
            "-A KUBE-IPVS-FILTER -m set --match-set {set} {matches} -j RETURN"
        )
        .unwrap();
    }
    writeln!(
        filter,
        "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set {IPVS_IPS} dst -j REJECT"
    )
    .unwrap();
    filter.push_str("COMMIT\n");
    nat + &filter
}

impl Rules {
    /// `ipvsadm -R` input: the virtual services, NodePorts on each of `node_addresses`.
    pub(crate) fn ipvsadm(&self, node_addresses: &[Ipv4Addr]) -> String {
        let mut out = String::new();
        for vs in &self.services {
            let flag = match vs.protocol {
                Protocol::Tcp => "-t",
                Protocol::Udp => "-u",
            };
            let addresses = match vs.address {
                Some(address) => vec![address],
                None => node_addresses.to_vec(),
            };
            for address in addresses {
                writeln!(out, "-A {flag} {address}:{} -s rr", vs.port).unwrap();
                for real in &vs.reals {
                    writeln!(out, "-a {flag} {address}:{} -r {real} -m -w 1", vs.port).unwrap();
                }
            }
        }
        out
    }

    /// Installs into `ns`: the dummy device and its addresses, the ipsets, the
    /// iptables rules (which refer to the sets), then the IPVS services.
    pub(super) fn install(&self, ns: &str) -> Result<()> {
        let mut ip = format!("link add {DUMMY} type dummy\n");
        for address in &self.bound {
            writeln!(ip, "address add {address}/32 dev {DUMMY}").unwrap();
        }
        pipe(Command::new("ip").args(["-n", ns, "-batch", "-"]), &ip)?;
        self.install_sets_and_rules(ns)?;
        load_ipvs()?;
        // NodePorts on every local address but loopback's (no --nodeport-addresses).
        let addresses: Vec<Ipv4Addr> = local_addresses(ns)?
            .into_iter()
            .filter(|ip| !ip.is_loopback() && !self.bound.contains(ip))
            .collect();
        pipe(
            netns::command(ns, "ipvsadm").arg("-R"),
            &self.ipvsadm(&addresses),
        )
    }

    fn install_sets_and_rules(&self, ns: &str) -> Result<()> {
        pipe(
            netns::command(ns, "ipset").args(["restore", "-exist"]),
            &self.ipset,
        )?;
        iptables::restore(ns, &self.iptables)
    }
}

/// `ip_vs` built in or loaded.
fn ipvs_loaded() -> bool {
    Path::new("/sys/module/ip_vs").exists()
}

/// Loads `ip_vs` if it is a module not loaded yet (in the VM): its sysctls appear
/// with it.
fn load_ipvs() -> Result<()> {
    if !ipvs_loaded() {
        netns::run(Command::new("modprobe").arg("ip_vs")).context("loading ip_vs")?;
    }
    Ok(())
}

/// Whether this kernel has IPVS, built in or as a module.
pub(super) fn kernel_has_ipvs() -> Result<(), String> {
    if ipvs_loaded() {
        return Ok(());
    }
    let module = Command::new("modinfo")
        .args(["-F", "filename", "ip_vs"])
        .output();
    match module {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "this kernel has no IPVS: ip_vs is neither built in (/sys/module/ip_vs) nor a module ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!(
            "this kernel has no ip_vs loaded, and modinfo (Debian package kmod) cannot tell whether it has the module: {e}"
        )),
    }
}

/// Removes the IPVS services, the iptables rules, then the sets they referred to, and
/// the dummy device.
pub(super) fn remove(ns: &str) -> Result<()> {
    // Without ip_vs in the kernel there can be no IPVS service, and ipvsadm would fail.
    if ipvs_loaded() {
        netns::run(netns::command(ns, "ipvsadm").arg("-C"))?;
    }
    iptables::remove(ns, CHAINS)?;
    let existing = netns::run(netns::command(ns, "ipset").args(["list", "-n"]))?;
    let destroy: String = existing
        .lines()
        .filter(|set| SETS.iter().any(|(name, _)| name == set))
        .map(|set| format!("destroy {set}\n"))
        .collect();
    if !destroy.is_empty() {
        pipe(netns::command(ns, "ipset").arg("restore"), &destroy)?;
    }
    let dummy = netns::ip_json(ns, &["link", "show"])?;
    let has_dummy = dummy
        .as_array()
        .into_iter()
        .flatten()
        .any(|l| l["ifname"] == DUMMY);
    if has_dummy {
        netns::run(Command::new("ip").args(["-n", ns, "link", "del", DUMMY]))?;
    }
    Ok(())
}

/// Installs the sets and the iptables rules of IPVS mode, which any kernel with
/// ipsets can hold, even without IPVS or dummy devices.
#[cfg(test)]
pub(super) fn install_sets_and_rules(rules: &Rules, ns: &str) -> Result<()> {
    rules.install_sets_and_rules(ns)
}

#[cfg(test)]
mod tests {
    use super::{super::fixture::*, *};

    fn rules(services: &[Service]) -> Rules {
        render(&node(), &resolved(services))
    }

    /// The targets of `chain`'s rules, with the set each matches ("" for none).
    fn chain<'a>(text: &'a str, chain: &str) -> Vec<(&'a str, &'a str)> {
        let prefix = format!("-A {chain} ");
        text.lines()
            .filter(|l| l.starts_with(&prefix))
            .map(|l| {
                let set = l
                    .split("--match-set ")
                    .nth(1)
                    .map_or("", |s| s.split(' ').next().unwrap());
                (l.rsplit(' ').next().unwrap(), set)
            })
            .collect()
    }

    /// TestOnlyLocalNodePorts (pkg/proxy/ipvs/proxier_test.go): a NodePort Service
    /// with Local policy, one endpoint here and one on another node, NodePorts on
    /// 100.101.102.103.
    #[test]
    fn local_nodeports_go_to_this_nodes_endpoint_as_kube_proxys_test_expects() {
        let rules = rules(&only_local_node_ports());
        let ipvsadm = rules.ipvsadm(&["100.101.102.103".parse().unwrap()]);
        let node_port: Vec<&str> = ipvsadm
            .lines()
            .filter(|l| l.contains("100.101.102.103:3001"))
            .collect();
        assert_eq!(
            node_port,
            [
                "-A -t 100.101.102.103:3001 -s rr",
                "-a -t 100.101.102.103:3001 -r 10.180.0.1:80 -m -w 1"
            ]
        );
        // Two virtual services: the ClusterIP's (with both endpoints) and the NodePort.
        assert_eq!(ipvsadm.lines().filter(|l| l.starts_with("-A ")).count(), 2);
        assert!(ipvsadm.contains("-a -t 10.20.30.41:80 -r 10.180.1.1:80 -m -w 1\n"));
        assert!(rules.ipset.contains("add KUBE-NODE-PORT-TCP 3001\n"));
        assert!(rules.ipset.contains("add KUBE-NODE-PORT-LOCAL-TCP 3001\n"));
        assert!(
            rules
                .ipset
                .contains("add KUBE-LOOP-BACK 10.180.0.1,tcp:80,10.180.0.1\n")
        );
        assert_eq!(
            chain(&rules.iptables, "KUBE-SERVICES"),
            [
                ("RETURN", ""),
                ("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP"),
                ("KUBE-NODE-PORT", ""),
                ("ACCEPT", "KUBE-CLUSTER-IP")
            ]
        );
        assert_eq!(
            chain(&rules.iptables, "KUBE-NODE-PORT"),
            [
                ("RETURN", "KUBE-NODE-PORT-LOCAL-TCP"),
                ("KUBE-MARK-MASQ", "KUBE-NODE-PORT-TCP"),
                ("ACCEPT", "KUBE-HEALTH-CHECK-NODE-PORT")
            ]
        );
    }

    #[test]
    fn every_cluster_ip_is_bound_once_and_every_set_is_created_as_kube_proxy_creates_it() {
        let rules = rules(&overall());
        let bound: Vec<String> = rules.bound.iter().map(ToString::to_string).collect();
        assert_eq!(
            bound,
            [
                "172.30.0.41",
                "172.30.0.42",
                "172.30.0.43",
                "172.30.0.44",
                "172.30.0.46"
            ]
        );
        assert!(rules.ipset.contains(
            "create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536\n"
        ));
        assert!(
            rules
                .ipset
                .contains("create KUBE-NODE-PORT-TCP bitmap:port range 0-65535\n")
        );
        assert!(rules.ipset.contains("add KUBE-IPVS-IPS 172.30.0.46\n"));
        assert_eq!(
            rules
                .ipset
                .lines()
                .filter(|l| l.starts_with("create "))
                .count(),
            17
        );
        // A Service without endpoints still has its virtual service, with no real server.
        let ipvsadm = rules.ipvsadm(&[]);
        assert!(ipvsadm.contains("-A -t 172.30.0.46:80 -s rr\n"));
        assert!(!ipvsadm.contains("-t 172.30.0.46:80 -r"));
    }

    #[test]
    fn udp_services_and_nodeports_use_the_udp_sets() {
        let rules = rules(&[dns()]);
        assert!(rules.ipvsadm(&[]).contains(
            "-A -u 172.30.0.47:53 -s rr\n-a -u 172.30.0.47:53 -r 10.180.0.7:53 -m -w 1\n"
        ));
        assert!(
            rules
                .ipset
                .contains("add KUBE-CLUSTER-IP 172.30.0.47,udp:53\n")
        );
    }
}
