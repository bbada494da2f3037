//! The measurements: every dataplane gets a cluster of its own (two nodes, one pod
//! each, the outside host beyond the router), all built before the first run, and the
//! runs go round the dataplanes in turn, so that a drift of the machine (emulation
//! makes it drift) spreads over all of them alike. Each run starts one dataplane
//! further on, so no dataplane is always measured first (the first measurement after
//! the clusters are built comes out low). Offloads on (the kernel's defaults) first,
//! then off on every link of every cluster.
//!
//! Every cluster with nodes (all but the floor's) is a realistic Kubernetes node
//! under its dataplane: on both nodes, kube-proxy's rules in iptables mode for a
//! thousand Services and the bench's own, and kube-router's NetworkPolicy chains with
//! a policy that isolates the server pod (`node`), installed after the cluster is
//! built and before its warm-up. Every dataplane pays the same netfilter: the kernel's
//! backends on every packet, ours on what its fast path does not take (all of it with
//! the fast path off). The bench's Service also gives the measures through a
//! ClusterIP: the client pod to the Service, DNATed on its node to the server pod on
//! the other node. Masquerade is on as flannel's DaemonSet has it (`--ip-masq`): our
//! agents do it in BPF, the kernel's backends carry flanneld's iptables rules.

use std::{net::SocketAddrV4, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use ipnet::Ipv4Net;

use super::{
    host::{self, Busy, CpuTimes, Machine},
    load::{self, Servers},
    node::{self, NodeRules},
    results::{Measure, Results, Sample},
    setup::{Congestion, Group, KernelBackend, Only, Plan, Setup, Test},
};
use crate::lab::{
    machinery::{
        agents,
        cluster::{self, Dataplane},
        flannel::Backend,
        guard::LabGuard,
        netns,
        router::RouterRoutes,
        topology::{Host, Topology},
    },
    proofs::masquerade::iptables::{FlannelRules, Variant},
};

/// How long [`Cluster::warm_up`] lasts: well past our agents' read of a new pod's port
/// (100 ms after the bridge learns its MAC), and past a full look at the node (at most
/// a second after a change).
const WARM_UP: Duration = Duration::from_secs(2);
/// And through the Service.
const SERVICE_WARM_UP: Duration = Duration::from_millis(500);

/// One cluster and its endpoints.
struct Cluster {
    setup: Setup,
    lab: LabGuard,
    client: Host,
    /// What the client's traffic goes to: the outside host's servers for the
    /// masquerades, the other pod's otherwise.
    servers: Servers,
    /// How long each node took to install its netfilter rules (none on the floor).
    rules_seconds: Vec<f64>,
}

impl Cluster {
    fn create(setup: Setup, agent: PathBuf, congestion: Congestion) -> Result<Self> {
        println!("setting up {}", setup.name());
        let (lab, rules_seconds) = match setup {
            Setup::Floor => (floor(agent)?, Vec::new()),
            _ => {
                let lab =
                    cluster::create_with(Topology::pair(), agent, setup.masquerade(), &setup)?;
                let seconds = node::install(&lab)
                    .with_context(|| format!("the nodes' netfilter for {}", setup.name()))?;
                (lab, seconds)
            }
        };
        let (client, server) = node::client_and_server(&lab.topology)?;
        let (server, address) = if Setup::SNAT.contains(&setup) {
            let outside = &lab.topology.outside;
            (outside.name.clone(), outside.address)
        } else {
            (server.name, server.address)
        };
        let servers = Servers::start(&lab.netns(&server), address, congestion.name())?;
        Ok(Self {
            setup,
            lab,
            client: Host::from(client),
            servers,
            rules_seconds,
        })
    }

    /// Our agents' counters, for the report of a failed measurement (nothing for
    /// the kernel's dataplanes).
    fn counters(&self) -> String {
        let topology = &self.lab.topology;
        topology
            .nodes
            .iter()
            .filter(|n| self.setup.runs_agent(n))
            .map(|n| match agents::inspect(&self.lab, n, "counters") {
                Ok(text) => format!("\n{}'s counters:\n{text}", n.name),
                Err(e) => format!("\n{}'s counters: {e:#}", n.name),
            })
            .collect()
    }

    fn client_ns(&self) -> String {
        self.lab.netns(&self.client.name)
    }

    /// Traffic before the first run, not counted, so that no measurement times a
    /// cluster's start: our agents learn a pod's port on the bridge from the bridge's
    /// forwarding table, after the pod's first frame, and until then decapsulated
    /// packets for it go through the bridge (`decapsulated_to_bridge`).
    ///
    /// Then a moment through the Service, where it is measured, so that a path that
    /// fails there fails before the first run.
    fn warm_up(&self, congestion: Congestion) -> Result<()> {
        let cc = congestion.name();
        load::rr(&self.client_ns(), self.servers.rr, cc, WARM_UP)
            .with_context(|| format!("warming up {}{}", self.setup.name(), self.counters()))?;
        if self.setup.through_the_service() {
            load::rr(&self.client_ns(), node::service_rr(), cc, SERVICE_WARM_UP).with_context(
                || {
                    format!(
                        "warming up {} through the Service {}{}",
                        self.setup.name(),
                        node::service_rr(),
                        self.counters()
                    )
                },
            )?;
        }
        Ok(())
    }
}

/// The floor's cluster: a lab of its own (so that it is removed like any lab, also by
/// `lab down` after a crash) holding only the pair topology's two pods, joined by one
/// veth at the MTU of host-gw's pods: no node, bridge, router or program between them.
fn floor(agent: PathBuf) -> Result<LabGuard> {
    let lab = LabGuard::create(Topology::pair(), agent, false, true)?;
    let pods = lab.topology.pods();
    let [a, b] = pods.as_slice() else {
        bail!("the pair topology has {} pods, not two", pods.len());
    };
    let (ns_a, ns_b) = (lab.netns(&a.name), lab.netns(&b.name));
    netns::add(&ns_a)?;
    netns::add(&ns_b)?;
    netns::Script::new(&ns_a)
        .veth("eth0", None, "eth0", &ns_b, Some(Backend::HostGw.mtu()))?
        .apply()?;
    for (ns, me, peer) in [(&ns_a, a, b), (&ns_b, b, a)] {
        netns::Script::new(ns)
            .address(Ipv4Net::from(me.address), "eth0")
            .up("eth0")
            .route(Ipv4Net::from(peer.address), "eth0")
            .apply()?;
    }
    Ok(lab)
}

/// The setups this kernel can run (all of them, less the kernel's ipip when it has no
/// such module), of the groups in `only` (all when empty).
pub(super) fn available(only: &[Group]) -> Vec<Setup> {
    let ipip = crate::vm::has_ipip();
    Setup::PLANES
        .into_iter()
        .chain(Setup::REFERENCES)
        .chain(Setup::SNAT)
        .filter(|s| ipip || *s != Setup::Kernel(KernelBackend::Ipip))
        .filter(|s| only.is_empty() || only.iter().any(|g| g.includes(*s)))
        .collect()
}

/// Builds a cluster for each setup this kernel can run (of the groups in `only`), runs
/// the plan, removes the clusters.
pub(super) fn run(agent: PathBuf, plan: Plan, quick: bool, only: &Only) -> Result<Results> {
    let mut results = Results::new(Machine::here(), plan, quick);
    let mut clusters = Vec::new();
    let mut rules = NodeRules::new();
    for setup in available(&only.groups) {
        let cluster = Cluster::create(setup, agent.clone(), plan.congestion)?;
        rules
            .install_seconds
            .extend_from_slice(&cluster.rules_seconds);
        clusters.push(cluster);
    }
    results.node_rules = (!rules.install_seconds.is_empty()).then_some(rules);
    let _rules = clusters
        .iter()
        .filter(|c| c.setup.flanneld_rules())
        .map(|c| FlannelRules::install(&c.lab, Variant::Flanneld))
        .collect::<Result<Vec<_>>>()?;
    let _routes = match clusters.iter().find(|c| c.setup == Setup::SnatRouted) {
        Some(c) => Some(RouterRoutes::to_pods(&c.lab)?),
        None => None,
    };
    for c in &clusters {
        c.warm_up(plan.congestion)?;
    }
    for offloads in [true, false] {
        if !offloads {
            for c in &clusters {
                host::offloads_off(&c.lab)?;
            }
        }
        for run in 0..plan.runs {
            println!(
                "offloads {}, run {} of {}",
                super::setup::on_off(offloads),
                run + 1,
                plan.runs
            );
            for c in rotated(&clusters, run) {
                crate::lab::machinery::interrupt::check()?;
                let samples = measure(c, plan, offloads, run, only)
                    .with_context(|| format!("measuring {}{}", c.setup.name(), c.counters()))?;
                for sample in samples {
                    println!("  {:24} {}", c.setup.name(), sample.describe());
                    results.samples.push(sample);
                }
            }
        }
    }
    drop((_rules, _routes));
    for c in clusters {
        let Cluster { lab, servers, .. } = c;
        drop(servers);
        lab.teardown()?;
    }
    Ok(results)
}

/// `items` in order, starting at the `run`-th (wrapping round): over as many runs as
/// items, each item takes each place once.
fn rotated<T>(items: &[T], run: usize) -> impl Iterator<Item = &T> {
    let start = run % items.len().max(1);
    items[start..].iter().chain(&items[..start])
}

/// Runs `f`, and returns what it returned with the CPU time the machine spent.
fn with_cpu<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Busy)> {
    let before = CpuTimes::read()?;
    let value = f()?;
    Ok((value, CpuTimes::read()?.since(&before)))
}

fn measure(
    c: &Cluster,
    plan: Plan,
    offloads: bool,
    run: usize,
    only: &Only,
) -> Result<Vec<Sample>> {
    let duration = Duration::from_secs(plan.seconds);
    let client = c.client_ns();
    let cc = plan.congestion.name();
    let sample = |measure: Measure, value: f64, cpu: Busy, units: f64| Sample {
        setup: c.setup,
        offloads,
        run,
        measure,
        value,
        // CPU microseconds per unit of work (a transaction, a connection, a packet, a
        // megabyte).
        cpu_us_per_unit: cpu.seconds * 1e6 / units.max(1.0),
        busiest_cpu: Some(cpu.busiest),
        failed: 0,
    };
    let conn_rate = |measure: Measure, server: SocketAddrV4| -> Result<Sample> {
        let (crr, cpu) = with_cpu(|| load::crr(&client, server, cc, duration))?;
        if let Some(first) = &crr.first_failure {
            eprintln!(
                "  {}: {} of {} connections failed; the first: {first}{}",
                c.setup.name(),
                crr.failed,
                crr.done + crr.failed,
                c.counters()
            );
        }
        let done = crr.done as f64;
        Ok(Sample {
            failed: crr.failed,
            ..sample(measure, done / crr.elapsed.as_secs_f64(), cpu, done)
        })
    };
    // Request/response's rate, p50 and p99, as the three measures given.
    let rr = |[rate, p50, p99]: [Measure; 3], server: SocketAddrV4| -> Result<[Sample; 3]> {
        let (rr, cpu) = with_cpu(|| load::rr(&client, server, cc, duration))?;
        let tx = rr.transactions as f64;
        Ok([
            sample(rate, tx / rr.elapsed.as_secs_f64(), cpu, tx),
            sample(p50, rr.p50_us, cpu, tx),
            sample(p99, rr.p99_us, cpu, tx),
        ])
    };
    if Setup::SNAT.contains(&c.setup) {
        return Ok(vec![conn_rate(Measure::SnatConnRate, c.servers.crr)?]);
    }
    let mut out = Vec::new();
    if only.runs(Test::Tcp) {
        for (measure, streams) in [(Measure::TcpStream, 1), (Measure::TcpMulti, plan.streams)] {
            let ((bytes, took), cpu) =
                with_cpu(|| load::stream(&client, &c.servers, streams, cc, duration))?;
            let bps = bytes as f64 * 8.0 / took.as_secs_f64();
            out.push(sample(measure, bps / 1e9, cpu, bytes as f64 / 1e6));
        }
    }
    if only.runs(Test::Rr) {
        let measures = [Measure::RrRate, Measure::RrP50, Measure::RrP99];
        out.extend(rr(measures, c.servers.rr)?);
    }
    if only.runs(Test::Crr) {
        out.push(conn_rate(Measure::ConnRate, c.servers.crr)?);
    }
    if only.runs(Test::Svc) && c.setup.through_the_service() {
        let measures = [Measure::SvcRrRate, Measure::SvcRrP50, Measure::SvcRrP99];
        out.extend(rr(measures, node::service_rr())?);
        out.push(conn_rate(Measure::SvcConnRate, node::service_crr())?);
    }
    if only.runs(Test::Udp) {
        let (received, cpu) = with_cpu(|| udp(&client, c, duration))?;
        out.push(sample(
            Measure::UdpRate,
            received as f64 / duration.as_secs_f64(),
            cpu,
            received as f64,
        ));
    }
    Ok(out)
}

/// Datagrams the server received from a blast of `duration`.
fn udp(client: &str, c: &Cluster, duration: Duration) -> Result<u64> {
    let before = c.servers.received();
    let target: SocketAddrV4 = c.servers.udp;
    load::udp_blast(client, target, duration)?;
    // Let the last datagrams in flight land.
    std::thread::sleep(Duration::from_millis(200));
    Ok(c.servers.received() - before)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        only: Only,
    }

    #[test]
    fn each_run_starts_one_setup_further_on() {
        let setups = ["ours", "ipip", "host-gw"];
        let order = |run| rotated(&setups, run).copied().collect::<Vec<_>>();
        assert_eq!(order(0), ["ours", "ipip", "host-gw"]);
        assert_eq!(order(1), ["ipip", "host-gw", "ours"]);
        assert_eq!(order(2), ["host-gw", "ours", "ipip"]);
        assert_eq!(order(3), order(0));
        assert_eq!(rotated(&[] as &[u8], 4).count(), 0);
    }

    #[test]
    fn partial_runs_pass_their_flags_on_to_the_vm() {
        let cli = Cli::parse_from(["bench", "--only", "ours,host-gw", "--tests", "rr"]);
        assert!(cli.only.partial());
        assert_eq!(cli.only.flags(), " --only ours,host-gw --tests rr");
        assert_eq!(
            available(&cli.only.groups),
            [Setup::Ours, Setup::Kernel(KernelBackend::HostGw)]
        );
        let svc = Cli::parse_from(["bench", "--only", "ours-fast-path-off", "--tests", "svc"]);
        assert_eq!(svc.only.flags(), " --only ours-fast-path-off --tests svc");
        assert_eq!(available(&svc.only.groups), [Setup::OursFastPathOff]);
        assert!(svc.only.runs(Test::Svc) && !svc.only.runs(Test::Rr));
        let full = Cli::parse_from(["bench"]);
        assert!(!full.only.partial());
        assert_eq!(full.only.flags(), "");
    }

    #[test]
    fn the_service_is_measured_on_the_pod_to_pod_dataplanes_and_ours_without_fast_path() {
        let through: Vec<Setup> = available(&[])
            .into_iter()
            .filter(|s| s.through_the_service())
            .collect();
        let mut expected = vec![Setup::Ours];
        if crate::vm::has_ipip() {
            expected.push(Setup::Kernel(KernelBackend::Ipip));
        }
        expected.extend([
            Setup::Kernel(KernelBackend::Vxlan),
            Setup::Kernel(KernelBackend::HostGw),
            Setup::OursFastPathOff,
        ]);
        assert_eq!(through, expected);
        // Only the setup without a fast path runs its agents with `--fast-path off`.
        let fast = |s: Setup| Dataplane::fast_path(&s);
        assert!(!fast(Setup::OursFastPathOff));
        assert!(fast(Setup::Ours) && fast(Setup::SnatOurs));
    }
}
