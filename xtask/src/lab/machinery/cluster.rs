//! Builds a lab from its topology: the switch and router, the nodes with their agents
//! and the outside host (and with etcd, etcd's host and etcd: `etcd`), then the pods,
//! the way kubelet, containerd and the flannel CNI plugin would (`cni`), in the
//! subnets the agents wrote into subnet.env.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf, time::Instant};

use anyhow::{Context as _, Result, ensure};
use aya::programs::tc::TcAttachType;
use ipnet::Ipv4Net;
use nix::mount::{MsFlags, mount};

use super::{
    agents::{self, BRIDGE, SubnetEnv, UPLINK},
    cni, etcd,
    guard::LabGuard,
    interrupt,
    netns::{self, Script, docker_mac},
    state::LabState,
    topology::{Node, Segment, Topology},
};

/// Host names of the underlay's own namespaces.
pub(crate) const SWITCH: &str = "switch";
pub(crate) const ROUTER: &str = "router";

/// How the nodes of a lab carry pod traffic between them: our agents everywhere (the
/// lab), or some nodes configured by other means (the benchmark's baselines, the
/// interoperability test's flannel node).
pub(crate) trait Dataplane {
    /// Whether `node` runs the overlay agent.
    fn runs_agent(&self, node: &Node) -> bool;
    /// Sets up a node that runs no agent (its underlay is up, its pods are not) and
    /// returns the subnet.env its network plugin would have written.
    fn configure(&self, lab: &LabState, node: &Node) -> Result<SubnetEnv>;
    /// Whether the agents run with the fast path (their default) rather than
    /// `--fast-path off`.
    fn fast_path(&self) -> bool {
        true
    }
}

/// The lab's dataplane: an agent on every node.
struct Agents {
    fast_path: bool,
}

impl Dataplane for Agents {
    fn runs_agent(&self, _: &Node) -> bool {
        true
    }

    fn configure(&self, _: &LabState, node: &Node) -> Result<SubnetEnv> {
        anyhow::bail!("{} runs an agent", node.name)
    }

    fn fast_path(&self) -> bool {
        self.fast_path
    }
}

/// Creates the lab and waits until the overlay is ready. On any failure (Ctrl-C
/// included) the returned error comes after the guard removed everything.
pub(crate) fn create(
    topology: Topology,
    agent: PathBuf,
    masquerade: bool,
    fast_path: bool,
) -> Result<LabGuard> {
    create_with(topology, agent, masquerade, &Agents { fast_path })
}

/// [`create`] with the nodes set up by `dataplane`.
pub(crate) fn create_with(
    topology: Topology,
    agent: PathBuf,
    masquerade: bool,
    dataplane: &dyn Dataplane,
) -> Result<LabGuard> {
    topology.validate()?;
    let started = Instant::now();
    let mut lab = LabGuard::create(topology, agent, masquerade, dataplane.fast_path())?;
    println!("Creating lab {} in {}", lab.id, lab.dir().display());

    // The agents run in mount namespaces of their own (`ip netns exec`), where a bpffs
    // they mounted would be invisible to us: we mount it, they inherit it.
    std::fs::create_dir_all(lab.bpffs())?;
    mount(
        Some("bpf"),
        &lab.bpffs(),
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting a bpffs at {}", lab.bpffs().display()))?;
    // With etcd, the network configuration and the subnets are etcd's: no node list.
    if lab.topology.etcd.is_none() {
        write_json(lab.nodes_file(), &lab.topology.node_list())?;
        write_json(lab.net_conf_file(), &lab.topology.net_conf())?;
    }

    underlay(&lab)?;
    if lab.topology.etcd.is_some() {
        etcd::start(&lab)?;
    }
    for node in &lab.topology.nodes {
        interrupt::check()?;
        if dataplane.runs_agent(node) {
            if lab.topology.etcd.is_some() {
                // The agent's command line as the lab runs it, after etcd's.
                etcd::show(
                    &node.name,
                    &agents::command(&lab, node, lab.masquerade, &lab.agent),
                );
            }
            agents::start(&lab, node, lab.masquerade)?;
        }
    }
    let mut envs = Vec::new();
    for node in &lab.topology.nodes {
        envs.push(if dataplane.runs_agent(node) {
            agents::wait_subnet_env(&lab, node)?
        } else {
            dataplane
                .configure(&lab, node)
                .with_context(|| format!("setting up {}", node.name))?
        });
    }
    // The subnets the pods and every check build on: those the agents took.
    let written: BTreeMap<String, Ipv4Net> = lab
        .topology
        .nodes
        .iter()
        .zip(&envs)
        .map(|(node, env)| (node.name.clone(), env.subnet))
        .collect();
    if lab.topology.etcd.is_some() {
        etcd::check_leases(&lab, &written)?;
    }
    lab.topology.adopt_subnets(&written)?;
    lab.save()?;
    for (node, env) in lab.topology.nodes.iter().zip(&envs) {
        pods(&lab, node, env, dataplane.runs_agent(node))?;
    }
    let with_agent: Vec<&Node> = (lab.topology.nodes.iter())
        .filter(|n| dataplane.runs_agent(n))
        .collect();
    agents::wait_ready_on(&lab, &with_agent, true)?;
    let hosts = lab.topology.hosts().into_iter().map(|h| h.name);
    for host in hosts.chain([ROUTER.to_owned()]) {
        netns::patient_neighbour_probes(&lab.netns(&host))?;
    }
    println!(
        "Lab {} ready in {:.1}s",
        lab.id,
        started.elapsed().as_secs_f64()
    );
    Ok(lab)
}

/// Writes `value` as kubectl prints JSON, replacing `path` at once: an agent polling
/// the file never reads half of it.
pub(crate) fn write_json(path: PathBuf, value: &serde_json::Value) -> Result<()> {
    // kubectl indents with four spaces.
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(
        &mut out,
        serde_json::ser::PrettyFormatter::with_indent(b"    "),
    );
    serde::Serialize::serialize(value, &mut ser)?;
    out.push(b'\n');
    let partial = path.with_extension("partial");
    std::fs::write(&partial, out).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &path).with_context(|| format!("writing {}", path.display()))
}

fn bridge_name(segment: &Segment) -> String {
    format!("br-{}", segment.name)
}

/// The switch (one bridge per segment), the router (a leg on each, and no route to any
/// pod subnet), and the uplink of each node and of the outside host.
fn underlay(lab: &LabState) -> Result<()> {
    let topology = &lab.topology;
    let switch = lab.netns(SWITCH);
    netns::add(&switch)?;
    let mut bridges = Script::new(&switch);
    for segment in &topology.segments {
        bridges.bridge(&bridge_name(segment), None)?;
    }
    bridges.apply()?;
    // Ports facing the switch carry the lab id, so that they read unambiguously in
    // `ip link` and captures next to another lab's.
    let mut ports = Script::new(&switch);

    let router = lab.netns(ROUTER);
    netns::add(&router)?;
    let mut legs = Script::new(&router);
    for segment in &topology.segments {
        let (leg, port) = (
            format!("eth-{}", segment.name),
            format!("{}-r-{}", lab.id, segment.name),
        );
        legs.veth(
            &leg,
            Some(docker_mac(segment.gateway.addr())),
            &port,
            &switch,
            None,
        )?
        .address(segment.gateway, &leg)
        .up(&leg);
        ports.attach(&port, &bridge_name(segment));
    }
    legs.apply()?;
    netns::enable_forwarding(&router)?;
    // The router answers packets for pod subnets it has no route to with ICMP network
    // unreachable, rate limited per destination: without the limit, probes from the
    // outside to pods fail at once instead of waiting out their timeouts. (A second,
    // global limit, net.ipv4.route.error_cost, is not per namespace: some still wait.)
    netns::sysctl(&router, "net/ipv4/icmp_ratelimit", "0")?;

    for node in &topology.nodes {
        interrupt::check()?;
        let ns = lab.netns(&node.name);
        uplink(lab, &mut ports, &node.name, &node.segment, node.address)?;
        // Kubernetes nodes forward (kube-proxy, the CNI plugin): needed here when the
        // host-gw control runs without agents, which otherwise turn it on.
        netns::enable_forwarding(&ns)?;
    }
    let outside = &topology.outside;
    uplink(
        lab,
        &mut ports,
        &outside.name,
        &outside.segment,
        outside.address,
    )?;
    if let Some(etcd) = &topology.etcd {
        uplink(lab, &mut ports, &etcd.name, &etcd.segment, etcd.address)?;
    }
    ports.apply()
}

/// A host's namespace with its uplink on `segment`: the address, and the default route
/// via the router. The switch's end of the link joins `ports`.
fn uplink(
    lab: &LabState,
    ports: &mut Script,
    host: &str,
    segment: &str,
    address: Ipv4Addr,
) -> Result<()> {
    let ns = lab.netns(host);
    let port = format!("{}-{host}", lab.id);
    let seg = lab.topology.segment(segment)?;
    netns::add(&ns)?;
    Script::new(&ns)
        .veth(
            UPLINK,
            Some(docker_mac(address)),
            &port,
            &lab.netns(SWITCH),
            None,
        )?
        .address(lab.topology.address_on(segment, address)?, UPLINK)
        .up(UPLINK)
        .default_route(seg.gateway.addr())
        .apply()?;
    ports.attach(&port, &bridge_name(seg));
    Ok(())
}

/// The pods of `node`, started as kubelet has containerd start them: each pod's
/// namespace, then CNI ADD with flannel's conflist and the delegate flannel's CNI
/// plugin builds from the node's subnet.env (`cni`). The first ADD creates `cni0` with
/// its gateway address and the first veth at once; with an `agent`, the lab waits
/// after it until the agent has attached to the bridge, and after the last until the
/// agent sources its routes from the gateway and has put `pod_ingress` on every pod's
/// veth. host-local must hand out the addresses the topology gives the pods.
fn pods(lab: &LabState, node: &Node, env: &SubnetEnv, agent: bool) -> Result<()> {
    let ns = lab.netns(&node.name);
    let mut host_veths = Vec::new();
    for pod in lab.topology.pods_of(node) {
        interrupt::check()?;
        netns::add(&lab.netns(&pod.name))?;
        let attached = cni::add(lab, node, &pod, env)?;
        let expected = Ipv4Net::new(pod.address, env.subnet.prefix_len())?;
        ensure!(
            attached.address == expected,
            "host-local gave {} the address {}, but the lab's topology has {expected} \
             (its pods take .2, .3, ... in order)",
            pod.name,
            attached.address
        );
        if agent && host_veths.is_empty() {
            agents::wait_attached(&ns, BRIDGE, TcAttachType::Ingress, "bridge_ingress")?;
        }
        host_veths.push(attached.host_veth);
    }
    if agent {
        agents::wait_gateway_source(lab, node)?;
        // Every pod's packets leave through `pod_ingress` on its veth (nothing else
        // filters them here), as on a node with no traffic shaping.
        for host_veth in &host_veths {
            agents::wait_attached(&ns, host_veth, TcAttachType::Ingress, "pod_ingress")?;
        }
    }
    Ok(())
}
