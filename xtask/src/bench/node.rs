//! A realistic node under every dataplane: what netfilter holds on a Kubernetes node
//! of a flannel cluster besides the dataplane, installed alike on both nodes of every
//! cluster that has nodes (all but the floor) before its warm-up, so that every
//! dataplane pays the same for it:
//!
//! - kube-proxy's rules in iptables mode (`lab::proofs::kubernetes::kube_proxy`) for [`SERVICES`]
//!   Services of two endpoints each, addresses in the nodes' pod subnets that no pod
//!   holds and nothing talks to (a cluster's worth of rules that every new connection
//!   passes in the nat table), every fourth with a NodePort, as kube-proxy's own
//!   1,000-Service test of the lab (`kube_proxy/namespace_tests.rs`) lays them out;
//!   plus the bench's own Service ([`SERVICE`]), whose endpoint is the server pod, for
//!   the measures through a ClusterIP;
//! - kube-router's NetworkPolicy chains (`lab::proofs::kubernetes::policy`, the engine k3s ships with
//!   flannel) on every node, with one policy that isolates the server pod and admits
//!   the client pod on the servers' ports: every packet to the server passes its
//!   pod's chain.
//!
//! Nothing here is removed: the rules live in the nodes' namespaces, which go with
//! the cluster.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Instant,
};

use anyhow::{Context as _, Result, ensure};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::load::{CRR_PORT, RR_PORT, STREAM_PORT, UDP_PORT};
use crate::lab::{
    machinery::{
        state::LabState,
        topology::{Node, Pod, Topology},
    },
    proofs::kubernetes::{
        kube_proxy::{
            self, Endpoint, Mode, NodeView, Protocol, Service, ServicePort, TrafficPolicy,
        },
        policy::{self, Engine, Policy},
    },
};

/// The Services no traffic reaches.
const SERVICES: usize = 1000;
/// Endpoints of each of them.
const ENDPOINTS: usize = 2;
/// Every this many of them has a NodePort.
const NODE_PORT_EVERY: usize = 4;
/// The first NodePort (kube-apiserver's default range starts there).
const FIRST_NODE_PORT: u16 = 30000;
/// Their ClusterIPs: 10.100.0.1 on, in the default service range 10.96.0.0/12 and
/// clear of the bench's Service.
const FIRST_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
/// Their endpoints take the hosts from here on of each node's pod subnet, above the
/// pods the lab starts (.2 on).
const FIRST_ENDPOINT_HOST: u32 = 10;
const ENDPOINT_HOSTS: u32 = 240;
/// Their port, and their endpoints'.
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;

/// The bench's Service: a ClusterIP whose endpoint is the server pod, its ports
/// mapped to the request/response and connection-rate servers.
pub(super) const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 200);
const SERVICE_RR_PORT: u16 = 80;
const SERVICE_CRR_PORT: u16 = 81;

/// Where the client reaches the request/response server through the Service.
pub(super) fn service_rr() -> SocketAddrV4 {
    SocketAddrV4::new(SERVICE, SERVICE_RR_PORT)
}

/// Where the client reaches the connection-rate server through the Service.
pub(super) fn service_crr() -> SocketAddrV4 {
    SocketAddrV4::new(SERVICE, SERVICE_CRR_PORT)
}

/// What the nodes carried, as the report tells it (a saved run has none when its
/// nodes carried nothing).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct NodeRules {
    /// kube-proxy's Services, the bench's included.
    pub services: usize,
    pub endpoints_per_service: usize,
    pub node_ports: usize,
    /// How long the rules took to install on each node of each cluster.
    pub install_seconds: Vec<f64>,
}

impl NodeRules {
    /// Before any is installed.
    pub(super) fn new() -> Self {
        Self {
            services: SERVICES + 1,
            endpoints_per_service: ENDPOINTS,
            node_ports: SERVICES.div_ceil(NODE_PORT_EVERY),
            install_seconds: Vec::new(),
        }
    }
}

/// The client pod (the first node's first) and the server pod (the second node's
/// first), as the bench's clusters have them.
pub(super) fn client_and_server(topology: &Topology) -> Result<(Pod, Pod)> {
    let first = |i: usize| -> Result<Pod> {
        let node = topology
            .nodes
            .get(i)
            .with_context(|| format!("the bench's topology has no node {}", i + 1))?;
        topology
            .pods_of(node)
            .into_iter()
            .next()
            .with_context(|| format!("{} has no pod", node.name))
    };
    Ok((first(0)?, first(1)?))
}

/// kube-proxy's Services: [`SERVICES`] that nothing reaches, then the bench's.
pub(super) fn services(topology: &Topology) -> Result<Vec<Service>> {
    let nodes = &topology.nodes;
    ensure!(!nodes.is_empty(), "the topology has no node");
    let mut services = Vec::with_capacity(SERVICES + 1);
    for i in 0..SERVICES {
        let endpoints = (0..ENDPOINTS)
            .map(|k| {
                // Endpoint by endpoint round the nodes, a host further on each round.
                let j = i * ENDPOINTS + k;
                let node = &nodes[j % nodes.len()];
                let host = FIRST_ENDPOINT_HOST + (j / nodes.len()) as u32 % ENDPOINT_HOSTS;
                let ip = Ipv4Addr::from(u32::from(node.pod_cidr.network()) + host);
                ensure!(
                    node.pod_cidr.contains(&ip),
                    "{}'s pod subnet {} is too small for the bench's endpoints",
                    node.name,
                    node.pod_cidr
                );
                Ok(Endpoint {
                    ip,
                    node: node.name.clone(),
                })
            })
            .collect::<Result<_>>()?;
        let node_port =
            (i % NODE_PORT_EVERY == 0).then(|| FIRST_NODE_PORT + (i / NODE_PORT_EVERY) as u16);
        services.push(Service {
            namespace: "bench".into(),
            name: format!("svc-{i}"),
            cluster_ip: Ipv4Addr::from(u32::from(FIRST_CLUSTER_IP) + i as u32),
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: SERVICE_PORT,
                target_port: TARGET_PORT,
                node_port,
            }],
            external_traffic_policy: TrafficPolicy::Cluster,
            endpoints,
        });
    }
    let (_, server) = client_and_server(topology)?;
    let port = |name: &str, port, target_port| ServicePort {
        name: name.into(),
        protocol: Protocol::Tcp,
        port,
        target_port,
        node_port: None,
    };
    services.push(Service {
        namespace: "bench".into(),
        name: "server".into(),
        cluster_ip: SERVICE,
        ports: vec![
            port("rr", SERVICE_RR_PORT, RR_PORT),
            port("crr", SERVICE_CRR_PORT, CRR_PORT),
        ],
        external_traffic_policy: TrafficPolicy::Cluster,
        endpoints: vec![Endpoint {
            ip: server.address,
            node: server.node,
        }],
    });
    Ok(services)
}

/// The policy that isolates the server pod: only the client pod may connect, on the
/// servers' ports.
pub(super) fn server_policy(topology: &Topology) -> Result<Policy> {
    let (client, server) = client_and_server(topology)?;
    Ok(Policy {
        name: "bench-server".into(),
        target: server.address,
        target_node: server.node,
        from: vec![Ipv4Net::from(client.address)],
        ports: vec![
            (policy::Protocol::Tcp, STREAM_PORT),
            (policy::Protocol::Tcp, RR_PORT),
            (policy::Protocol::Tcp, CRR_PORT),
            (policy::Protocol::Udp, UDP_PORT),
        ],
    })
}

/// Installs kube-proxy's rules and the policy engine's on every node of `lab`, the
/// nodes at once; returns each node's time, in the nodes' order, and prints them.
pub(super) fn install(lab: &LabState) -> Result<Vec<f64>> {
    let topology = &lab.topology;
    let services = services(topology)?;
    let policy = server_policy(topology)?;
    let started = Instant::now();
    let on = |node: &Node| -> Result<f64> {
        let began = Instant::now();
        let ns = lab.netns(&node.name);
        let view = NodeView {
            name: node.name.clone(),
            node_ip: node.address,
            cluster_cidr: topology.pod_network,
        };
        kube_proxy::install(&ns, Mode::Iptables, &view, &services)
            .with_context(|| format!("kube-proxy's rules on {}", node.name))?;
        let pods: Vec<Ipv4Addr> = topology.pods_of(node).iter().map(|p| p.address).collect();
        policy::install(
            &ns,
            Engine::KubeRouter,
            &node.name,
            &pods,
            std::slice::from_ref(&policy),
        )?;
        Ok(began.elapsed().as_secs_f64())
    };
    let seconds = std::thread::scope(|s| {
        let installs: Vec<_> = topology
            .nodes
            .iter()
            .map(|node| s.spawn(move || on(node)))
            .collect();
        installs
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect::<Result<Vec<f64>>>()
    })?;
    let each: Vec<String> = topology
        .nodes
        .iter()
        .zip(&seconds)
        .map(|(node, s)| format!("{} {s:.1} s", node.name))
        .collect();
    println!(
        "  kube-proxy's rules (iptables, {} Services) and kube-router's policy: {} \
         (the nodes at once: {:.1} s)",
        services.len(),
        each.join(", "),
        started.elapsed().as_secs_f64()
    );
    Ok(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_services_are_what_kube_proxy_renders_for_each_node() {
        let topology = Topology::pair();
        let services = services(&topology).unwrap();
        assert_eq!(services.len(), NodeRules::new().services);
        for node in &topology.nodes {
            let view = NodeView {
                name: node.name.clone(),
                node_ip: node.address,
                cluster_cidr: topology.pod_network,
            };
            let kube_proxy::Rendered::Iptables(rules) =
                kube_proxy::render(Mode::Iptables, &view, &services).unwrap()
            else {
                panic!("iptables mode renders iptables-restore input");
            };
            for to in [service_rr(), service_crr()] {
                let matched = format!("-d {} --dport {}", to.ip(), to.port());
                assert!(rules.contains(&matched), "{matched} in {rules}");
            }
        }
        let service_range: Ipv4Net = "10.96.0.0/12".parse().unwrap();
        let (_, server) = client_and_server(&topology).unwrap();
        let mut per_node = std::collections::BTreeMap::<&str, usize>::new();
        for s in &services[..SERVICES] {
            assert!(service_range.contains(&s.cluster_ip), "{}", s.cluster_ip);
            assert_ne!(s.cluster_ip, SERVICE);
            assert_eq!(s.endpoints.len(), ENDPOINTS);
            for e in &s.endpoints {
                let node = topology.node(&e.node).unwrap();
                assert!(node.pod_cidr.contains(&e.ip), "{} on {}", e.ip, e.node);
                assert!(e.ip != server.address && e.ip != node.gateway());
                *per_node.entry(&e.node).or_default() += 1;
            }
        }
        // Spread evenly over both nodes.
        assert_eq!(per_node.values().copied().collect::<Vec<_>>(), [1000, 1000]);
        let node_ports = services.iter().filter(|s| s.ports[0].node_port.is_some());
        assert_eq!(node_ports.count(), NodeRules::new().node_ports);
        let bench = &services[SERVICES];
        assert_eq!(bench.endpoints[0].ip, server.address);
        let mapped: Vec<(u16, u16)> = bench
            .ports
            .iter()
            .map(|p| (p.port, p.target_port))
            .collect();
        assert_eq!(
            mapped,
            [
                (service_rr().port(), RR_PORT),
                (service_crr().port(), CRR_PORT)
            ]
        );
    }

    #[test]
    fn the_policy_admits_the_client_alone_on_the_servers_ports() {
        let topology = Topology::pair();
        let (client, server) = client_and_server(&topology).unwrap();
        let p = server_policy(&topology).unwrap();
        assert_eq!((p.target, p.target_node.as_str()), (server.address, "w2"));
        assert_eq!(p.from, [Ipv4Net::new(client.address, 32).unwrap()]);
        assert_eq!(p.ports.len(), 4);
        assert!(p.ports.contains(&(policy::Protocol::Udp, UDP_PORT)));
    }

    #[test]
    fn a_topology_without_a_second_node_is_refused() {
        let mut topology = Topology::pair();
        topology.nodes.truncate(1);
        let err = services(&topology).unwrap_err();
        assert_eq!(format!("{err:#}"), "the bench's topology has no node 2");
    }
}
