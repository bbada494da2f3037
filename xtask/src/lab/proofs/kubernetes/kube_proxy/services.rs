//! What every mode's proxier reads: the Services and endpoints as the model has them,
//! the node's view of itself, and the service ports they resolve to, in kube-proxy's
//! order and validated as it validates them; with the helpers the modes share.

use std::{collections::HashSet, net::Ipv4Addr, process::Command};

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
    pub(super) fn lower(self) -> &'static str {
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

/// kube-proxy's mark for traffic to masquerade (`--masquerade-bit=14`).
pub(super) const MASQUERADE_MARK: &str = "0x4000";

/// The IPv4 addresses of `ns`'s devices.
pub(super) fn local_addresses(ns: &str) -> Result<Vec<Ipv4Addr>> {
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
pub(super) struct SvcPort<'a> {
    pub(super) service: &'a Service,
    pub(super) port: &'a ServicePort,
    /// `ServicePortName.String()`: `namespace/name:port`, or `namespace/name` for an
    /// unnamed port.
    pub(super) name: String,
    /// `ExternalPolicyLocal()`: externally reachable with `externalTrafficPolicy: Local`.
    pub(super) external_local: bool,
    pub(super) endpoints: Vec<Ep>,
}

pub(super) struct Ep {
    pub(super) ip: Ipv4Addr,
    /// `ip:port`, the endpoint's `String()`.
    pub(super) text: String,
    pub(super) local: bool,
}

impl SvcPort<'_> {
    pub(super) fn protocol(&self) -> &'static str {
        self.port.protocol.lower()
    }

    pub(super) fn has_endpoints(&self) -> bool {
        !self.endpoints.is_empty()
    }

    pub(super) fn local_endpoints(&self) -> impl Iterator<Item = &Ep> {
        self.endpoints.iter().filter(|e| e.local)
    }

    /// Endpoints that traffic from outside the cluster (a NodePort) may reach.
    pub(super) fn has_external_endpoints(&self) -> bool {
        if self.external_local {
            self.local_endpoints().next().is_some()
        } else {
            self.has_endpoints()
        }
    }
}

/// Checks `services` as the API server would have, and lays them out per port.
pub(super) fn resolve<'a>(node: &NodeView, services: &'a [Service]) -> Result<Vec<SvcPort<'a>>> {
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
pub(super) fn hash(input: &str, chars: usize) -> String {
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
pub(super) fn pipe(cmd: &mut Command, input: &str) -> Result<()> {
    netns::run_with_input(cmd, input).map(drop)
}
