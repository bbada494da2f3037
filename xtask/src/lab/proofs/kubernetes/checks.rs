//! The Service checks: every client placement against every Service kind, over TCP and
//! UDP, by name through the cluster DNS, and the hostPort; each with the source address
//! the endpoint saw.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::Result;

use super::workload::{
    CLUSTER_NODE_PORT, ECHO, ENDPOINT_NODE, LOCAL_NODE_PORT, SERVICE_PORT, SPREAD,
};
use crate::lab::{
    machinery::{
        cni::HOST_PORT,
        dns, parallel,
        probe::{self, Client, Failure, Proto},
        state::LabState,
        topology::{Host, Kind},
    },
    proofs::kubernetes::kube_proxy::Mode,
};

/// Exchanges in flight: the expected failures wait for their timeouts.
const IN_FLIGHT: usize = 8;
/// Probes of a Service with endpoints on two nodes: kube-proxy picks one at random for
/// each, so that both are met (one is missed by all with 2^-16). Where a node's own
/// traffic meets its own pod, its masquerade picks another address than for the other
/// node's: both sides must find both.
const SPREAD_TRIES: usize = 16;

/// Where a client stands, seen from the endpoint's node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Placement {
    /// A pod on the endpoint's node.
    SameNode,
    /// A pod on another node on the switch.
    OtherNode,
    /// A pod on the node behind the router, which kernel forwarding cannot reach.
    BehindRouter,
    /// A node's own network namespace (hostNetwork).
    HostNetwork,
    /// The host beyond the router, outside the cluster.
    Outside,
}

impl Placement {
    pub(super) fn describe(self) -> &'static str {
        match self {
            Placement::SameNode => "pod, same node",
            Placement::OtherNode => "pod, other node",
            Placement::BehindRouter => "pod, node behind the router",
            Placement::HostNetwork => "host network",
            Placement::Outside => "outside host",
        }
    }
}

/// A client of the checks.
#[derive(Debug, Clone)]
pub(super) struct Caller {
    pub host: Host,
    pub placement: Placement,
    client: Client,
}

impl Caller {
    /// Whether kernel forwarding, the reference, can carry its traffic at all (host-gw
    /// routes only join the nodes on the switch).
    pub(super) fn in_reference(&self, lab: &LabState) -> bool {
        self.host.node.as_deref().is_none_or(|n| {
            lab.topology
                .node(n)
                .is_ok_and(|node| node.segment == lab.topology.nodes[0].segment)
        })
    }
}

/// How a check's client reaches the Service.
#[derive(Debug, Clone)]
pub(super) enum Target {
    /// An address and port: a ClusterIP, or a node's NodePort or hostPort.
    Address(SocketAddrV4),
    /// A Service name the client's resolver resolves (the pod's resolv.conf, which
    /// points at the kube-dns ClusterIP), then its port.
    Name(&'static str, Ipv4Addr, u16),
}

/// What a check must find with our datapath, whatever the reference finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expect {
    /// Reaches the endpoint, seen from the client's own address.
    Own,
    /// Reaches it masqueraded by a node: seen from that node's address on the way to
    /// the endpoint (its uplink's for an endpoint elsewhere, its pod gateway for one of
    /// its own pods).
    MasqueradedBy(Ipv4Addr, Ipv4Addr),
    /// Does not reach it.
    Blocked,
    /// Nothing beyond what kernel forwarding finds.
    AsReference,
}

#[derive(Debug, Clone)]
pub(super) struct Check {
    /// The Service kind, as the table groups checks.
    pub kind: String,
    pub caller: usize,
    pub target: Target,
    pub proto: Proto,
    tries: usize,
    pub expect: Expect,
}

/// What a check found: the addresses the endpoint saw (one per endpoint met, in
/// order), or why it failed.
pub(super) type Found = Result<Vec<Ipv4Addr>, Failure>;

pub(super) struct Plan {
    pub callers: Vec<Caller>,
    pub checks: Vec<Check>,
}

/// The callers and checks of the lab's topology under kube-proxy's `mode`.
pub(super) fn plan(lab: &LabState, mode: Mode) -> Result<Plan> {
    let topology = &lab.topology;
    let endpoint_node = topology.node(ENDPOINT_NODE)?;
    let mut callers = Vec::new();
    let mut caller = |host: Host, placement| {
        callers.push(Caller {
            client: Client::new(lab.netns(&host.name)),
            host,
            placement,
        });
    };
    for node in &topology.nodes {
        let same = node.name == endpoint_node.name;
        let placement = if same {
            Placement::SameNode
        } else if node.segment == endpoint_node.segment {
            Placement::OtherNode
        } else {
            Placement::BehindRouter
        };
        // A node's second pod: its first may be an endpoint (which reaching itself
        // through its Service is masqueraded, a hairpin).
        if let Some(pod) = topology.pods_of(node).get(1) {
            caller(Host::from(pod.clone()), placement);
        }
        caller(Host::from(node), Placement::HostNetwork);
    }
    caller(Host::from(&topology.outside), Placement::Outside);

    let mut checks = Vec::new();
    let other_node = topology
        .nodes
        .iter()
        .find(|n| n.name != endpoint_node.name && n.segment == endpoint_node.segment)
        .ok_or_else(|| anyhow::anyhow!("no second node on the switch"))?;
    for (i, c) in callers.iter().enumerate() {
        let own_node = c.host.node.as_deref().and_then(|n| topology.node(n).ok());
        let is_pod = c.host.kind == Kind::Pod;
        let mut check = |kind: String, target, proto, tries, expect| {
            checks.push(Check {
                kind,
                caller: i,
                target,
                proto,
                tries,
                expect,
            });
        };
        // ClusterIPs: not reachable from outside the cluster.
        if c.placement != Placement::Outside {
            // kube-proxy masquerades traffic to a ClusterIP from outside the cluster
            // CIDR: a node's own.
            let cluster_ip = match (is_pod, own_node) {
                (true, _) => Expect::Own,
                (false, Some(node)) => Expect::MasqueradedBy(node.address, node.gateway()),
                (false, None) => Expect::AsReference,
            };
            for proto in [Proto::Tcp, Proto::Udp] {
                check(
                    "ClusterIP".into(),
                    Target::Address(SocketAddrV4::new(ECHO, SERVICE_PORT)),
                    proto,
                    1,
                    cluster_ip,
                );
            }
            check(
                "ClusterIP, endpoints on two nodes".into(),
                Target::Address(SocketAddrV4::new(SPREAD, SERVICE_PORT)),
                Proto::Tcp,
                SPREAD_TRIES,
                cluster_ip,
            );
        }
        if is_pod {
            check(
                "by name (cluster DNS), then TCP".into(),
                Target::Name("echo", ECHO, SERVICE_PORT),
                Proto::Tcp,
                1,
                Expect::Own,
            );
        }
        // NodePorts, through the endpoint's node and through a node without one.
        for via in [endpoint_node, other_node] {
            for proto in [Proto::Tcp, Proto::Udp] {
                check(
                    format!("NodePort, Cluster policy, via {}", via.name),
                    Target::Address(SocketAddrV4::new(via.address, CLUSTER_NODE_PORT)),
                    proto,
                    1,
                    // Masqueraded by the node it came in through.
                    Expect::MasqueradedBy(via.address, via.gateway()),
                );
            }
            let local = match (c.placement, via.name == endpoint_node.name) {
                // The client's own address is kept; a node without an endpoint drops,
                // except in IPVS mode, which gives such a node's NodePort every
                // endpoint (`syncEndpoint` in `pkg/proxy/ipvs/proxier.go`, so that pods
                // reach it: kubernetes#97081), and cannot tell an outside client there.
                (Placement::Outside, true) => Expect::Own,
                (Placement::Outside, false) if mode != Mode::Ipvs => Expect::Blocked,
                _ => Expect::AsReference,
            };
            check(
                format!("NodePort, Local policy, via {}", via.name),
                Target::Address(SocketAddrV4::new(via.address, LOCAL_NODE_PORT)),
                Proto::Tcp,
                1,
                local,
            );
        }
        for proto in [Proto::Tcp, Proto::Udp] {
            check(
                format!("hostPort on {}", endpoint_node.name),
                Target::Address(SocketAddrV4::new(endpoint_node.address, HOST_PORT)),
                proto,
                1,
                if c.placement == Placement::Outside {
                    Expect::Own
                } else {
                    Expect::AsReference
                },
            );
        }
    }
    Ok(Plan { callers, checks })
}

/// Runs the checks of `plan` that `only` keeps (None for the others).
pub(super) fn run(plan: &Plan, only: impl Fn(&Check) -> bool + Sync) -> Result<Vec<Option<Found>>> {
    parallel::map(&plan.checks, IN_FLIGHT, |check| {
        only(check).then(|| probe_check(&plan.callers[check.caller], check))
    })
}

fn probe_check(caller: &Caller, check: &Check) -> Found {
    let address = match &check.target {
        Target::Address(a) => *a,
        Target::Name(name, want, port) => {
            let resolved = dns::resolve(&caller.client.ns, name)
                .map_err(|e| Failure::Other(format!("{name} does not resolve: {e:#}")))?;
            if resolved != [*want] {
                return Err(Failure::Mismatch(format!(
                    "{name} resolved to {resolved:?}, not {want}"
                )));
            }
            SocketAddrV4::new(*want, *port)
        }
    };
    let mut seen = Vec::new();
    for _ in 0..check.tries {
        let exchange = match check.proto {
            Proto::Tcp => probe::tcp(&caller.client, address),
            Proto::Udp => probe::udp(&caller.client, address),
            Proto::Icmp => unreachable!("the Service checks speak TCP and UDP"),
        }?;
        let now = exchange
            .seen
            .ok_or_else(|| Failure::Other("the endpoint recorded no source".into()))?;
        if !seen.contains(&now) {
            seen.push(now);
        }
    }
    seen.sort();
    Ok(seen)
}

impl Expect {
    /// Why `found` (by `caller`) is not what this expects; None when it is.
    pub(super) fn judge(self, caller: &Caller, found: &Found) -> Option<String> {
        match found {
            Ok(seen) => seen.iter().find_map(|s| self.judge_one(caller, &Ok(*s))),
            Err(f) => self.judge_one(caller, &Err(f.clone())),
        }
    }

    fn judge_one(self, caller: &Caller, found: &Result<Ipv4Addr, Failure>) -> Option<String> {
        match (self, found) {
            (Expect::AsReference, _) => None,
            (Expect::Blocked, Err(_)) => None,
            (Expect::Blocked, Ok(seen)) => {
                Some(format!("reached it (seen from {seen}), expected no answer"))
            }
            (_, Err(f)) => Some(format!("failed: {f}")),
            (Expect::Own, Ok(seen)) if *seen == caller.host.address => None,
            (Expect::MasqueradedBy(address, gateway), Ok(seen))
                if *seen == address || *seen == gateway =>
            {
                None
            }
            (Expect::Own, Ok(seen)) => Some(format!(
                "seen from {seen}, expected the client's own {}",
                caller.host.address
            )),
            (Expect::MasqueradedBy(address, gateway), Ok(seen)) => Some(format!(
                "seen from {seen}, expected masqueraded to {address} or {gateway}"
            )),
        }
    }

    pub(super) fn describe(self) -> String {
        match self {
            Expect::Own => "own address".into(),
            Expect::MasqueradedBy(address, _) => format!("masqueraded by {address}"),
            Expect::Blocked => "no answer".into(),
            Expect::AsReference => "as kernel forwarding".into(),
        }
    }
}

/// A table cell for what a check found.
pub(super) fn cell(found: &Found) -> String {
    match found {
        Ok(seen) => format!(
            "✓ {}",
            seen.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" / ")
        ),
        Err(f) => format!("✗ {}", f.short()),
    }
}

/// Whether two runs found the same: both failed, or both passed seen from the same
/// addresses.
pub(super) fn same(a: &Found, b: &Found) -> bool {
    match (a, b) {
        (Ok(a), Ok(b)) => a == b,
        (Err(_), Err(_)) => true,
        _ => false,
    }
}
