//! What a benchmark compares and how it is asked for: the setups (our dataplane and
//! flannel's kernel backends, with the baselines), the groups and tests `--only`
//! selects, the plan of runs and the congestion control.

use anyhow::Result;

use crate::lab::machinery::{
    agents::SubnetEnv, cluster::Dataplane, flannel::Backend, state::LabState, topology::Node,
};

/// How the pods of a cluster reach each other (and the outside).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) enum Setup {
    /// Our agent on both nodes, with `--ip-masq` as flannel's DaemonSet runs flanneld
    /// (kube-flannel.yml): without it, flannel's CNI configuration has the bridge
    /// plugin masquerade whatever a pod sends off its node, to the other node's pods
    /// too, and no such flow could take the fast path.
    Ours,
    /// Ours with `--fast-path off`: every packet through the host stack (its
    /// netfilter, conntrack and routing), as flanneld's kernel tunnel takes it.
    OursFastPathOff,
    /// flannel's kernel backends, with flanneld's masquerade rules (`--ip-masq`), whose
    /// part our agent plays in BPF.
    Kernel(KernelBackend),
    /// Masquerade to the outside: our agent with `--ip-masq`.
    SnatOurs,
    /// Masquerade to the outside as a flannel node does it: flanneld's iptables rules
    /// on nodes that run no BPF at all (host-gw routes between them; a pod's
    /// connection to the outside takes no tunnel in any flannel backend).
    SnatIptables,
    /// No translation: our agent without `--ip-masq`, and the router routes the pod
    /// subnets back to their nodes. What the same connections cost without any NAT,
    /// to tell the translation's share from the rest of the path.
    SnatRouted,
    /// host-gw with its pods at IPIP's MTU (1480), as if it paid a tunnel's 20 bytes a
    /// packet: ours against it is the datapath alone, without the encapsulation's smaller
    /// packets (docs/BENCHMARKS.md, "one stream at IPIP's MTU").
    HostGwAtIpipMtu,
    /// No dataplane: the two pods joined by one veth, no node between them. What the
    /// machine, the kernel's TCP and UDP and the load generators take on their own,
    /// to which every dataplane adds its part.
    Floor,
}

/// [`Backend`], serializable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) enum KernelBackend {
    Ipip,
    Vxlan,
    HostGw,
}

impl KernelBackend {
    fn backend(self) -> Backend {
        match self {
            KernelBackend::Ipip => Backend::Ipip,
            KernelBackend::Vxlan => Backend::Vxlan,
            KernelBackend::HostGw => Backend::HostGw,
        }
    }
}

impl Setup {
    /// The pod-to-pod dataplanes, ours first.
    pub(super) const PLANES: [Setup; 4] = [
        Setup::Ours,
        Setup::Kernel(KernelBackend::Ipip),
        Setup::Kernel(KernelBackend::Vxlan),
        Setup::Kernel(KernelBackend::HostGw),
    ];
    pub(super) const SNAT: [Setup; 3] = [Setup::SnatOurs, Setup::SnatIptables, Setup::SnatRouted];
    /// Pod to pod like the dataplanes, for what the dataplanes' figures are made of; a
    /// column of the tables, not of the plot.
    pub(super) const REFERENCES: [Setup; 3] =
        [Setup::OursFastPathOff, Setup::HostGwAtIpipMtu, Setup::Floor];

    pub(super) fn name(self) -> &'static str {
        match self {
            Setup::Ours => "ours (BPF IPIP)",
            Setup::OursFastPathOff => "ours, fast path off",
            Setup::Kernel(KernelBackend::Ipip) => "kernel ipip (tunl0)",
            Setup::Kernel(KernelBackend::Vxlan) => "kernel vxlan",
            Setup::Kernel(KernelBackend::HostGw) => "host-gw",
            Setup::SnatOurs => "ours --ip-masq",
            Setup::SnatIptables => "iptables MASQUERADE",
            Setup::SnatRouted => "routed, no NAT",
            Setup::HostGwAtIpipMtu => "host-gw at MTU 1480",
            Setup::Floor => "no dataplane (one veth)",
        }
    }

    /// Whether our agents run with `--ip-masq`.
    pub(super) fn masquerade(self) -> bool {
        matches!(self, Setup::Ours | Setup::OursFastPathOff | Setup::SnatOurs)
    }

    /// Whether the nodes carry flanneld's masquerade rules: the flannel nodes that run
    /// no agent (flanneld with `--ip-masq`).
    pub(super) fn flanneld_rules(self) -> bool {
        matches!(
            self,
            Setup::Kernel(_) | Setup::SnatIptables | Setup::HostGwAtIpipMtu
        )
    }

    /// Whether the Service measures run: on the pod-to-pod dataplanes, and ours with
    /// the fast path off.
    pub(super) fn through_the_service(self) -> bool {
        Setup::PLANES.contains(&self) || self == Setup::OursFastPathOff
    }
}

impl Dataplane for Setup {
    fn runs_agent(&self, _: &Node) -> bool {
        !matches!(
            self,
            Setup::Kernel(_) | Setup::SnatIptables | Setup::HostGwAtIpipMtu | Setup::Floor
        )
    }

    fn configure(&self, lab: &LabState, node: &Node) -> Result<SubnetEnv> {
        match self {
            Setup::Kernel(k) => k.backend().configure(lab, node),
            Setup::SnatIptables => Backend::HostGw.configure(lab, node),
            Setup::HostGwAtIpipMtu => Ok(SubnetEnv {
                mtu: Backend::Ipip.mtu(),
                ..Backend::HostGw.configure(lab, node)?
            }),
            _ => anyhow::bail!("{} runs our agent", node.name),
        }
    }

    fn fast_path(&self) -> bool {
        *self != Setup::OursFastPathOff
    }
}

/// A group of setups, to measure only some of them (`cargo xtask bench --only`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum Group {
    Ours,
    /// Our agents with `--fast-path off`.
    OursFastPathOff,
    Ipip,
    Vxlan,
    HostGw,
    /// Both masquerades, and the same connections routed without translation.
    Snat,
    /// host-gw with its pods at IPIP's MTU.
    HostGwAtIpipMtu,
    /// The two pods joined by one veth: no dataplane.
    Floor,
}

impl Group {
    pub(super) fn includes(self, setup: Setup) -> bool {
        match self {
            Group::Ours => setup == Setup::Ours,
            Group::OursFastPathOff => setup == Setup::OursFastPathOff,
            Group::Ipip => setup == Setup::Kernel(KernelBackend::Ipip),
            Group::Vxlan => setup == Setup::Kernel(KernelBackend::Vxlan),
            Group::HostGw => setup == Setup::Kernel(KernelBackend::HostGw),
            Group::Snat => Setup::SNAT.contains(&setup),
            Group::HostGwAtIpipMtu => setup == Setup::HostGwAtIpipMtu,
            Group::Floor => setup == Setup::Floor,
        }
    }
}

/// A test of the pod-to-pod dataplanes, to run only some of them (`--tests`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum Test {
    /// Single- and multi-stream throughput.
    Tcp,
    /// Request/response.
    Rr,
    /// Connection rate.
    Crr,
    /// Small UDP datagrams.
    Udp,
    /// Request/response and connection rate through a ClusterIP Service to the pod on
    /// the other node.
    Svc,
}

/// What to measure and how long.
#[derive(Debug, Clone, Copy)]
pub(super) struct Plan {
    pub runs: usize,
    pub seconds: u64,
    /// Parallel streams of the multi-stream test.
    pub streams: usize,
    pub congestion: Congestion,
}

/// The TCP congestion control of every connection the bench makes, both ends. Kernels
/// differ in their default (Linux's is cubic; a kernel may be built with bbr), and the
/// legs of one run must not: the bench sets it on each socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum Congestion {
    /// Linux's default, and what distributions' nodes run.
    Cubic,
    /// Paces every connection (TCP's own pacing timer without an fq qdisc).
    Bbr,
    Reno,
}

impl Congestion {
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Cubic => "cubic",
            Self::Bbr => "bbr",
            Self::Reno => "reno",
        }
    }
}

/// Which setups and tests to run (`cargo xtask bench --only … --tests …`): all when
/// empty. For development: a partial run prints its report but does not publish it.
#[derive(Debug, Clone, Default, clap::Args)]
pub(super) struct Only {
    /// Only these setups (comma-separated).
    #[arg(long = "only", value_enum, value_delimiter = ',')]
    pub groups: Vec<Group>,
    /// Only these tests of the pod-to-pod setups (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub tests: Vec<Test>,
}

impl Only {
    pub(super) fn runs(&self, test: Test) -> bool {
        self.tests.is_empty() || self.tests.contains(&test)
    }

    /// Whether only some setups or tests run.
    pub(super) fn partial(&self) -> bool {
        !self.groups.is_empty() || !self.tests.is_empty()
    }

    /// The flags as given, for the same run inside the VM.
    pub(super) fn flags(&self) -> String {
        fn list<T: clap::ValueEnum>(flag: &str, values: &[T]) -> String {
            if values.is_empty() {
                return String::new();
            }
            let names: Vec<_> = values
                .iter()
                .filter_map(|v| v.to_possible_value())
                .map(|v| v.get_name().to_owned())
                .collect();
            format!(" --{flag} {}", names.join(","))
        }
        list("only", &self.groups) + &list("tests", &self.tests)
    }
}

/// How a leg's offloads read in the report: `on` or `off`.
pub(super) fn on_off(offloads: bool) -> &'static str {
    if offloads { "on" } else { "off" }
}
