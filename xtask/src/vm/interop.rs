//! Interoperability with flannel's kernel IPIP: one node runs our agent, the other the
//! kernel's ipip device as flanneld's ipip backend configures it (`lab::machinery::flannel`), and
//! pod traffic must flow both ways: TCP, UDP and ICMP with 100- and 2000-byte payloads
//! (the sizes of the kernel's test_tc_tunnel selftest), and from each node to the
//! other's pod. This is what lets a cluster move from flanneld to the agent node by
//! node. It needs a kernel with the ipip module: it runs in the kernel matrix's VM, and
//! says it skipped where the kernel has none.
//!
//! It runs twice: with the nodes learning each other from the lab's node list, and on
//! flannel's etcd subnet manager (`lab::machinery::etcd`), where the flannel node is flanneld on
//! etcd (`lab::machinery::etcd::flanneld`): it leases its subnet as flanneld writes a lease, and
//! routes to our node because it finds our lease there, while our agent learns it from
//! its lease alone.
//!
//! What the 2000-byte case does: both sides give pods an MTU of 1480 (the uplink's
//! 1500 less the outer header; flanneld and the agent write the same FLANNEL_MTU).
//! - TCP never sends more than the MSS the MTU implies (1440): the 2000 bytes go as
//!   two segments (or one GSO packet that the tunnel carries as such), no fragment.
//! - A 2000-byte UDP datagram or ICMP echo is larger than the pod's MTU, and the pod's
//!   stack fragments it (the DF bit is clear on locally fragmented datagrams) into
//!   1480 + 548-byte fragments. Each fragment fits the tunnel (1480 + 20 = 1500). Our
//!   `bridge_ingress` leaves fragments to the host stack (pass: fragment), which routes
//!   them to the uplink, where `uplink_egress` encapsulates them; the kernel's device
//!   encapsulates each fragment as it comes. The receiving side decapsulates each
//!   fragment on its own and the destination pod reassembles the datagram. No PMTU
//!   discovery is involved: nothing on the path is smaller than what the pods send.

use anyhow::{Context as _, Result};

use crate::lab::machinery::{
    agents::{self, SubnetEnv},
    cluster::{self, Dataplane},
    etcd::flanneld,
    flannel::Backend,
    probe::{self, Client},
    servers::Servers,
    state::LabState,
    text_table::Table,
    topology::{Host, Node, Topology},
};

/// The node that runs our agent; the other one runs flannel's kernel ipip.
const OURS: &str = "w1";
const SIZES: [usize; 2] = [100, 2000];
/// The ICMP echo header and our token before the padding.
const ECHO_HEADER: usize = 24;

/// Where the nodes learn each other's subnets and addresses.
#[derive(Debug, Clone, Copy)]
pub(super) enum Source {
    /// The lab's node list; the flannel node is set up from the lab's topology.
    NodeList,
    /// Leases in etcd; the flannel node is flanneld on etcd.
    Etcd,
}

impl Source {
    fn topology(self) -> Topology {
        match self {
            Source::NodeList => Topology::pair(),
            Source::Etcd => Topology::pair().with_etcd(),
        }
    }
}

/// Our agent on [`OURS`], flannel's kernel ipip on the other node.
struct Mixed(Source);

impl Dataplane for Mixed {
    fn runs_agent(&self, node: &Node) -> bool {
        node.name == OURS
    }

    fn configure(&self, lab: &LabState, node: &Node) -> Result<SubnetEnv> {
        match self.0 {
            Source::NodeList => Backend::Ipip.configure(lab, node),
            Source::Etcd => flanneld::configure(lab, node),
        }
    }
}

/// What the test found: a table, and the exchanges that failed.
pub(super) struct Report {
    pub table: String,
    pub failures: Vec<String>,
    /// The agent's counters after the traffic.
    pub counters: String,
}

/// Builds the mixed cluster on `source`, sends the traffic, removes the cluster.
pub(super) fn run(agent: std::path::PathBuf, source: Source) -> Result<Report> {
    // Our agent masquerades as flanneld runs in kube-flannel.yml (--ip-masq), as the
    // flannel node's subnet.env says it does: with FLANNEL_IPMASQ=false the bridge
    // plugin would masquerade the pods' traffic to the other node's pods, as it does
    // on flanneld's nodes without --ip-masq, and the host decides every flow.
    let lab = cluster::create_with(source.topology(), agent, true, &Mixed(source))?;
    let ours = lab.topology.node(OURS)?.clone();
    let theirs = lab
        .topology
        .nodes
        .iter()
        .find(|n| n.name != OURS)
        .context("a second node")?
        .clone();
    let pod = |node: &Node| Host::from(lab.topology.pods_of(node).remove(0));
    let (our_pod, their_pod) = (pod(&ours), pod(&theirs));
    let servers = Servers::start(&lab, &[our_pod.clone(), their_pod.clone()])?;
    let pairs = [
        (our_pod.clone(), their_pod.clone()),
        (their_pod.clone(), our_pod.clone()),
        (Host::from(&ours), their_pod.clone()),
        (Host::from(&theirs), our_pod.clone()),
    ];
    let mut table = Table::new(["FROM", "TO", "PROTO", "BYTES", "RESULT (ms)"]);
    let mut failures = Vec::new();
    for (from, to) in &pairs {
        let client = Client::new(lab.netns(&from.name));
        for size in SIZES {
            for (proto, outcome) in exchanges(&servers, &client, to, size) {
                let label = |h: &Host| {
                    let side = if h.node.as_deref() == Some(OURS) {
                        "ours"
                    } else {
                        "flannel ipip"
                    };
                    format!("{} ({side})", h.name)
                };
                if let Err(e) = &outcome {
                    failures.push(format!(
                        "{} -> {} {proto} {size} bytes: {e}",
                        from.name, to.name
                    ));
                }
                table.row([
                    label(from),
                    label(to),
                    proto.to_owned(),
                    size.to_string(),
                    probe::cell(&outcome),
                ]);
            }
        }
    }
    let counters = agents::inspect(&lab, &ours, "counters")?;
    drop(servers);
    lab.teardown()?;
    Ok(Report {
        table: table.to_string(),
        failures,
        counters,
    })
}

/// A TCP, a UDP and an ICMP exchange of `size` payload bytes; each must arrive intact
/// and be seen from the client's own address (no translation between pods).
fn exchanges(
    servers: &Servers,
    client: &Client,
    to: &Host,
    size: usize,
) -> Vec<(&'static str, probe::Outcome)> {
    let tcp = servers
        .tcp(&to.name)
        .and_then(|addr| probe::tcp_sized(client, addr, size))
        .and_then(|e| e.seen_as(None));
    let udp = servers
        .udp(&to.name)
        .and_then(|addr| probe::udp_sized(client, addr, size))
        .and_then(|e| e.seen_as(None));
    let icmp = probe::ping_sized(
        client,
        to.address,
        probe::token(),
        size.saturating_sub(ECHO_HEADER),
    )
    .map(|e| e.time);
    vec![("TCP", tcp), ("UDP", udp), ("ICMP", icmp)]
}

/// Whether this kernel can run the test.
pub(super) fn available() -> bool {
    super::has_ipip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_node_and_a_flannel_ipip_node_carry_pod_traffic_both_ways() {
        carry_pod_traffic_both_ways(Source::NodeList);
    }

    #[test]
    fn our_node_and_flanneld_on_etcd_carry_pod_traffic_both_ways() {
        carry_pod_traffic_both_ways(Source::Etcd);
    }

    fn carry_pod_traffic_both_ways(source: Source) {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        if !available() {
            eprintln!(
                "skipped: this kernel has no ipip module (the kernel matrix runs this in a VM)"
            );
            return;
        }
        crate::lab::machinery::interrupt::install().unwrap();
        let agent = agents::build(false).expect("building the agent");
        let report = run(agent, source).expect("the interoperability test runs to its end");
        print!(
            "{}\nour node's counters:\n{}",
            report.table, report.counters
        );
        assert!(
            report.failures.is_empty(),
            "exchanges that failed: {:#?}",
            report.failures
        );
    }
}
