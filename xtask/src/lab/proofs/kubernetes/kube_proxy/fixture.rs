//! Services shaped like those of kube-proxy's own tests (their addresses, node and
//! cluster CIDR), so that the renderings can be compared with what those tests expect.

pub(super) use super::services::{
    Endpoint, NodeView, Protocol, Service, ServicePort, SvcPort, TrafficPolicy, resolve,
};

/// The service ports kube-proxy on the fixture's node resolves `services` to.
pub(super) fn resolved(services: &[Service]) -> Vec<SvcPort<'_>> {
    resolve(&node(), services).expect("the fixture resolves")
}

/// NewFakeProxier's node.
pub(super) fn node() -> NodeView {
    NodeView {
        name: "test-node".into(),
        node_ip: "192.168.0.2".parse().unwrap(),
        cluster_cidr: "10.0.0.0/8".parse().unwrap(),
    }
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
    let endpoints: Vec<(&str, &str)> = ips.iter().map(|ip| (ip.as_str(), "other-node")).collect();
    service(
        "ns8/svc8",
        "172.30.0.48",
        p80(None),
        TrafficPolicy::Cluster,
        &endpoints,
    )
}
