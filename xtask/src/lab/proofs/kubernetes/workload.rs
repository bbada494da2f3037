//! What runs on the lab's Kubernetes nodes for the section: the Services (as the API
//! server would hold them), kube-proxy's rules for them on every node, their endpoints'
//! servers, the cluster DNS behind the kube-dns Service, and every pod's resolver
//! pointing at it. Removed again when dropped.

use std::{net::Ipv4Addr, path::Path, process::Command};

use anyhow::{Context as _, Result};

use crate::lab::{
    machinery::{
        cni::CONTAINER_PORT,
        dns::{self, ClusterDns, ZONE},
        netns,
        servers::Servers,
        state::LabState,
        topology::{Host, Node, Pod},
    },
    proofs::kubernetes::kube_proxy::{
        self, Endpoint, Mode, NodeView, Protocol, Service, ServicePort, TrafficPolicy,
    },
};

/// The Services' addresses, from kube-controller-manager's default
/// `--service-cluster-ip-range` (10.96.0.0/12): kube-dns takes the tenth, as kubeadm
/// gives it.
pub(super) const KUBE_DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub(super) const ECHO: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 100);
pub(super) const SPREAD: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 101);
pub(super) const NODEPORT_CLUSTER: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 102);
pub(super) const NODEPORT_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 103);
/// The Services' port, and their NodePorts (in the default 30000-32767).
pub(super) const SERVICE_PORT: u16 = 80;
pub(super) const CLUSTER_NODE_PORT: u16 = 30080;
pub(super) const LOCAL_NODE_PORT: u16 = 30081;
const DNS_PORT: u16 = 53;
/// The node whose first pod is the endpoint of most Services and serves DNS.
pub(super) const ENDPOINT_NODE: &str = "w2";
/// The nodes of `spread`'s endpoints (their first pods): several, all on the switch,
/// so that the kernel-forwarding reference reaches them too.
const SPREAD_NODES: [&str; 2] = ["cp", "w2"];

/// The endpoint of `echo`, the NodePort Services and kube-dns: `w2`'s first pod.
pub(super) fn endpoint(lab: &LabState) -> Result<Pod> {
    first_pod(lab, lab.topology.node(ENDPOINT_NODE)?)
}

/// A node's first pod: it declares the hostPort (`cni`) and serves on the container
/// port.
pub(super) fn first_pod(lab: &LabState, node: &Node) -> Result<Pod> {
    lab.topology
        .pods_of(node)
        .into_iter()
        .next()
        .with_context(|| format!("{} has no pod", node.name))
}

/// The Services, in the shape kube-proxy reads them.
pub(super) fn services(lab: &LabState) -> Result<Vec<Service>> {
    let at = |pod: &Pod| Endpoint {
        ip: pod.address,
        node: pod.node.clone(),
    };
    let w2 = at(&endpoint(lab)?);
    let port = |name: &str, protocol, port, node_port| ServicePort {
        name: name.into(),
        protocol,
        port,
        target_port: if port == DNS_PORT {
            DNS_PORT
        } else {
            CONTAINER_PORT
        },
        node_port,
    };
    let service = |namespace: &str, name: &str, ip, ports, policy, endpoints| Service {
        namespace: namespace.into(),
        name: name.into(),
        cluster_ip: ip,
        ports,
        external_traffic_policy: policy,
        endpoints,
    };
    let spread = SPREAD_NODES
        .iter()
        .map(|n| Ok(at(&first_pod(lab, lab.topology.node(n)?)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(vec![
        service(
            "kube-system",
            "kube-dns",
            KUBE_DNS,
            vec![
                port("dns", Protocol::Udp, DNS_PORT, None),
                port("dns-tcp", Protocol::Tcp, DNS_PORT, None),
            ],
            TrafficPolicy::Cluster,
            vec![w2.clone()],
        ),
        service(
            "default",
            "echo",
            ECHO,
            vec![
                port("tcp", Protocol::Tcp, SERVICE_PORT, None),
                port("udp", Protocol::Udp, SERVICE_PORT, None),
            ],
            TrafficPolicy::Cluster,
            vec![w2.clone()],
        ),
        service(
            "default",
            "spread",
            SPREAD,
            vec![port("tcp", Protocol::Tcp, SERVICE_PORT, None)],
            TrafficPolicy::Cluster,
            spread,
        ),
        service(
            "default",
            "nodeport-cluster",
            NODEPORT_CLUSTER,
            vec![
                port("tcp", Protocol::Tcp, SERVICE_PORT, Some(CLUSTER_NODE_PORT)),
                port("udp", Protocol::Udp, SERVICE_PORT, Some(CLUSTER_NODE_PORT)),
            ],
            TrafficPolicy::Cluster,
            vec![w2.clone()],
        ),
        service(
            "default",
            "nodeport-local",
            NODEPORT_LOCAL,
            vec![port(
                "tcp",
                Protocol::Tcp,
                SERVICE_PORT,
                Some(LOCAL_NODE_PORT),
            )],
            TrafficPolicy::Local,
            vec![w2],
        ),
    ])
}

/// The kube-dns records the cluster DNS serves: every Service by its full name.
fn records(services: &[Service]) -> Vec<(String, Ipv4Addr)> {
    services
        .iter()
        .map(|s| {
            (
                format!("{}.{}.svc.{ZONE}", s.name, s.namespace),
                s.cluster_ip,
            )
        })
        .collect()
}

/// Everything of the section on the nodes and pods, for one kube-proxy mode; removed
/// when dropped (the servers close, dnsmasq stops, then the rules and resolvers go:
/// fields drop in this order). The checks talk to the servers through the network.
pub(super) struct Workload<'a> {
    _servers: Servers,
    _dns: ClusterDns,
    _installed: Installed<'a>,
}

impl<'a> Workload<'a> {
    pub(super) fn install(lab: &'a LabState, mode: Mode) -> Result<Self> {
        let services = services(lab)?;
        let pods: Vec<Host> = lab
            .topology
            .nodes
            .iter()
            .map(|n| first_pod(lab, n).map(Host::from))
            .collect::<Result<_>>()?;
        // From here on, dropping `installed` undoes what was done.
        let installed = Installed { lab, mode };
        for node in &lab.topology.nodes {
            bridge_netfilter(&lab.netns(&node.name))?;
            let view = NodeView {
                name: node.name.clone(),
                node_ip: node.address,
                cluster_cidr: lab.topology.pod_network,
            };
            kube_proxy::install(&lab.netns(&node.name), mode, &view, &services)
                .with_context(|| format!("kube-proxy's rules on {}", node.name))?;
        }
        for pod in lab.topology.pods() {
            dns::write_resolv_conf(&lab.netns(&pod.name), KUBE_DNS)?;
        }
        let server = endpoint(lab)?;
        let dns = ClusterDns::start(
            &lab.netns(&server.name),
            server.address,
            &records(&services),
            &lab.dir().join("dns"),
        )?;
        let servers = Servers::start_on(lab, &pods, CONTAINER_PORT)?;
        Ok(Self {
            _servers: servers,
            _dns: dns,
            _installed: installed,
        })
    }
}

/// What a Kubernetes node has before kube-proxy starts: `br_netfilter`, with
/// `bridge-nf-call-iptables` on, so that a reply bridged from an endpoint to a client
/// pod of the same node meets the conntrack entry that undoes kube-proxy's DNAT.
/// Kubernetes' container-runtime prerequisites load it; kube-proxy's iptables and IPVS
/// proxiers read the sysctl (`sysctlBridgeCallIPTables` in `pkg/proxy/iptables/` and
/// `pkg/proxy/ipvs/proxier.go`) and warn that Services may not work without it. This
/// machine's kernel has it built in; Debian's 6.1 has it as a module, which nothing
/// else loads before the policy engines' rules happen to.
fn bridge_netfilter(ns: &str) -> Result<()> {
    const KEY: &str = "net/bridge/bridge-nf-call-iptables";
    let present = netns::enter(ns, || Ok(Path::new("/proc/sys").join(KEY).exists()))?;
    if !present {
        netns::run(Command::new("modprobe").arg("br_netfilter")).context("loading br_netfilter")?;
    }
    netns::sysctl(ns, KEY, "1")
}

/// The rules and resolvers of one mode, removed when dropped.
struct Installed<'a> {
    lab: &'a LabState,
    mode: Mode,
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        for node in &self.lab.topology.nodes {
            if let Err(e) = kube_proxy::remove(&self.lab.netns(&node.name), self.mode) {
                eprintln!("{e:#}");
            }
        }
        if let Err(e) = dns::remove_resolv_confs(&self.lab.netns("")) {
            eprintln!("removing the pods' resolv.conf: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_has_its_dns_name() {
        let svc = |namespace: &str, name: &str, ip| Service {
            namespace: namespace.into(),
            name: name.into(),
            cluster_ip: ip,
            ports: vec![],
            external_traffic_policy: TrafficPolicy::Cluster,
            endpoints: vec![],
        };
        assert_eq!(
            records(&[
                svc("kube-system", "kube-dns", KUBE_DNS),
                svc("default", "echo", ECHO)
            ]),
            [
                (
                    "kube-dns.kube-system.svc.cluster.local".to_owned(),
                    KUBE_DNS
                ),
                ("echo.default.svc.cluster.local".to_owned(), ECHO)
            ]
        );
    }
}
