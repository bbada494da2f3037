//! NetworkPolicy, as each netfilter engine enforces it on the target's node: the
//! endpoint pod admits new connections on its port only from one pod of another node.
//! For each engine: who can connect (directly and through the ClusterIP), and what
//! becomes of two connections opened before the policy, one from the pod it admits and
//! one from a pod it does not. Each connection first carries messages long enough for
//! our agents to admit it to the fast path; whether they did is part of the finding.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use ipnet::Ipv4Net;

use super::workload::{ECHO, SERVICE_PORT, endpoint, first_pod};
use crate::lab::{
    machinery::{
        agents,
        cni::CONTAINER_PORT,
        parallel,
        probe::{self, Client, Session},
        state::LabState,
        topology::{Node, Pod},
    },
    proofs::kubernetes::{
        kube_proxy::Mode,
        policy::{self, Engine, Policy, Protocol},
    },
};

/// How long a connection opened before the policy carries messages first, and how
/// often: well past the agents' admission pass (every 500 ms, after a few packets).
const WARM: Duration = Duration::from_millis(2500);
const EVERY: Duration = Duration::from_millis(20);
/// Messages a connection must carry after the policy to count as kept.
const AFTER: usize = 5;

/// What one check found, in words that compare across runs.
pub(super) type Finding = Result<String, String>;

/// One line of the policy table.
#[derive(Debug, Clone)]
pub(super) struct Row {
    pub engine: Engine,
    pub what: String,
    /// The client is behind the router: kernel forwarding (the reference) cannot
    /// carry its traffic, so only our run has it.
    pub ours_only: bool,
    pub expected: Finding,
    pub found: Finding,
    /// For the connections opened before the policy: where it was on the target's node
    /// when the policy came.
    pub fast: FastPath,
}

/// Whether a connection opened before the policy was on the fast path when it came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FastPath {
    /// Not such a connection, or no agent ran (the kernel's run).
    Unasked,
    Taken,
    NotTaken,
    /// Between nodes DirectRouting connects: nothing of it is ever decapsulated, so
    /// the fast path never takes it and the host carries every packet.
    Direct,
}

impl FastPath {
    pub(super) fn show(self) -> &'static str {
        match self {
            Self::Unasked => "",
            Self::Taken => "taken",
            Self::NotTaken => "✗ not taken",
            Self::Direct => "routed directly",
        }
    }
}

impl Row {
    /// Why this row does not hold (None when it does).
    pub(super) fn failure(&self) -> Option<String> {
        if self.found != self.expected {
            return Some(format!(
                "{} / {}: found {}, expected {}",
                self.engine.describe(),
                self.what,
                show(&self.found),
                show(&self.expected)
            ));
        }
        if self.fast == FastPath::NotTaken {
            return Some(format!(
                "{} / {}: the connection was not on the fast path when the policy came, so this proves nothing about it",
                self.engine.describe(),
                self.what
            ));
        }
        None
    }
}

pub(super) fn show(finding: &Finding) -> String {
    match finding {
        Ok(s) | Err(s) => s.clone(),
    }
}

/// Everyone the checks involve.
struct Cast {
    /// The endpoint pod, on `target_node`.
    target: Pod,
    target_node: Node,
    /// A pod of another node on the switch: the policy admits it.
    admitted: Pod,
    /// Pods the policy does not admit: on the target's node, on another node on the
    /// switch, behind the router.
    others: Vec<(Pod, bool)>,
}

fn cast(lab: &LabState) -> Result<Cast> {
    let t = &lab.topology;
    let target = endpoint(lab)?;
    let target_node = t.node(&target.node)?.clone();
    let mut admitted = None;
    let mut others = Vec::new();
    for node in &t.nodes {
        let pods = t.pods_of(node);
        let behind = node.segment != target_node.segment;
        if node.name == target_node.name {
            // Its second pod: the first is the target.
            if let Some(pod) = pods.get(1) {
                others.push((pod.clone(), false));
            }
        } else if admitted.is_none() && !behind {
            admitted = Some(first_pod(lab, node)?);
        } else {
            others.push((first_pod(lab, node)?, behind));
        }
    }
    Ok(Cast {
        target,
        target_node,
        admitted: admitted.context("no second node on the switch")?,
        others,
    })
}

fn the_policy(cast: &Cast) -> Policy {
    Policy {
        name: "echo-from-one-pod".into(),
        target: cast.target.address,
        target_node: cast.target_node.name.clone(),
        from: vec![Ipv4Net::from(cast.admitted.address)],
        ports: vec![
            (Protocol::Tcp, CONTAINER_PORT),
            (Protocol::Udp, CONTAINER_PORT),
        ],
    }
}

fn connected(seen: Ipv4Addr) -> Finding {
    Ok(format!("connects, seen from {seen}"))
}

fn refused() -> Finding {
    Err("no connection".into())
}

/// A connection opened before the policy and what its later messages find.
fn kept() -> Finding {
    Ok("kept".into())
}

fn cut() -> Finding {
    Err("cut".into())
}

/// Runs the policy checks of every engine under kube-proxy's `mode`; `agents_run` says
/// whether our agents carry the traffic (so that the fast path's part is checked).
pub(super) fn run(lab: &LabState, mode: Mode, agents_run: bool) -> Result<Vec<Row>> {
    let cast = cast(lab)?;
    let policy = the_policy(&cast);
    let mut rows = Vec::new();
    for engine in Engine::ALL {
        let result = with_engine(lab, &cast, &policy, (mode, engine), agents_run, &mut rows);
        // Whatever happened, the next engine (and the next run) starts clean.
        for node in &lab.topology.nodes {
            policy::remove(&lab.netns(&node.name), engine)?;
        }
        result?;
    }
    Ok(rows)
}

fn with_engine(
    lab: &LabState,
    cast: &Cast,
    policy: &Policy,
    (mode, engine): (Mode, Engine),
    agents_run: bool,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let to = SocketAddrV4::new(cast.target.address, CONTAINER_PORT);
    let client = |pod: &Pod| Client::new(lab.netns(&pod.name));
    // Opened before the policy: from the pod it admits, and from one of the same node
    // as the admitted one's, which it does not (kernel forwarding carries both).
    let denied = cast
        .others
        .iter()
        .find(|(p, behind)| !behind && p.node != cast.target.node)
        .map(|(p, _)| p.clone())
        .context("no pod of another node on the switch besides the admitted one")?;
    let mut sessions = Vec::new();
    for (pod, admitted) in [(&cast.admitted, true), (&denied, false)] {
        let session = Session::open(&client(pod), to).map_err(|f| {
            anyhow::anyhow!("{} cannot reach {to} before any policy: {f}", pod.name)
        })?;
        anyhow::ensure!(
            session.seen == pod.address,
            "{} reached {to} seen from {}, not its own address",
            pod.name,
            session.seen
        );
        sessions.push((pod.clone(), admitted, session));
    }
    let warmed = Instant::now();
    while warmed.elapsed() < WARM {
        for (pod, _, session) in &mut sessions {
            session
                .exchange()
                .map_err(|f| anyhow::anyhow!("{}'s connection before any policy: {f}", pod.name))?;
        }
        std::thread::sleep(EVERY);
    }
    let direct = lab.topology.direct_subnets(&cast.target_node);
    let fast: Vec<FastPath> = sessions
        .iter()
        .map(|(pod, _, session)| {
            if !agents_run {
                return Ok(FastPath::Unasked);
            }
            if direct.contains(&lab.topology.node(&pod.node)?.pod_cidr) {
                return Ok(FastPath::Direct);
            }
            let taken = on_fast_path(lab, &cast.target_node, session, to).unwrap_or_else(|e| {
                println!(
                    "  reading {}'s flow table for {}: {e:#}",
                    cast.target_node.name, pod.name
                );
                false
            });
            Ok(if taken {
                FastPath::Taken
            } else {
                FastPath::NotTaken
            })
        })
        .collect::<Result<_>>()?;

    for node in &lab.topology.nodes {
        let pods: Vec<Ipv4Addr> = lab
            .topology
            .pods_of(node)
            .iter()
            .map(|p| p.address)
            .collect();
        policy::install(
            &lab.netns(&node.name),
            engine,
            &node.name,
            &pods,
            std::slice::from_ref(policy),
        )?;
    }

    // Open before the policy: the engines accept established flows (kube-network-policies
    // in strict mode only those it still admits); a host firewall's stateless rule
    // accepts none it does not admit.
    for ((pod, admitted, mut session), fast) in sessions.into_iter().zip(fast) {
        let found = (0..AFTER)
            .try_for_each(|_| session.exchange())
            .map_or_else(|_| cut(), |()| kept());
        let expected = if admitted || engine == Engine::KubeRouter {
            kept()
        } else {
            cut()
        };
        rows.push(Row {
            engine,
            what: format!(
                "{} → {}, opened before the policy ({})",
                pod.name,
                cast.target.name,
                if admitted { "admitted" } else { "not admitted" }
            ),
            ours_only: false,
            expected,
            found,
            fast,
        });
    }

    // New connections, straight to the pod and through the ClusterIP.
    let mut news = vec![(cast.admitted.clone(), false, true)];
    news.extend(
        cast.others
            .iter()
            .map(|(p, behind)| (p.clone(), *behind, false)),
    );
    let targets = [
        (to, "the pod"),
        (SocketAddrV4::new(ECHO, SERVICE_PORT), "the ClusterIP"),
    ];
    let probes: Vec<_> = news
        .iter()
        .flat_map(|n| targets.iter().map(move |t| (n.clone(), *t)))
        .collect();
    let found = parallel::map(&probes, probes.len(), |((pod, _, _), (addr, _))| {
        probe::tcp(&client(pod), *addr)
    })?;
    for (((pod, behind, admitted), (addr, via)), found) in probes.into_iter().zip(found) {
        let unseen = *addr.ip() == ECHO && !forward_sees_service(mode, engine, &pod, cast);
        rows.push(Row {
            engine,
            what: format!("{} → {} via {via}, new", pod.name, cast.target.name),
            ours_only: behind,
            expected: if admitted || unseen {
                connected(pod.address)
            } else {
                refused()
            },
            // Engines refuse with a reset, an ICMP error or silence: which one is not
            // what the checks compare.
            found: match found {
                Ok(e) => e
                    .seen
                    .map_or_else(|| Err("no source recorded".into()), connected),
                Err(_) => refused(),
            },
            fast: FastPath::Unasked,
        });
    }
    Ok(())
}

/// Whether `engine` sees a new connection from `pod` through the ClusterIP. In IPVS
/// mode a pod's connection to a Service is taken at the input hook of the pod's own
/// node and leaves it through the output hook (`pkg/proxy/ipvs/proxier.go` binds
/// the ClusterIPs to the node's `kube-ipvs0` device): when the endpoint is on that
/// same node the packet is never forwarded, so a rule in FORWARD alone (the host
/// firewall) never meets it. kube-router hooks INPUT and OUTPUT too for this reason,
/// and kube-network-policies' postrouting hook sees locally sent packets.
fn forward_sees_service(mode: Mode, engine: Engine, pod: &Pod, cast: &Cast) -> bool {
    !(mode == Mode::Ipvs && engine == Engine::HostFirewall && pod.node == cast.target.node)
}

/// Whether the target's node had `session` on the fast path: its direction towards the
/// target admitted and seen under the current ruleset.
fn on_fast_path(lab: &LabState, node: &Node, session: &Session, to: SocketAddrV4) -> Result<bool> {
    let flows = agents::inspect_json(lab, node, "flows")?;
    Ok(flows["flows"].as_array().into_iter().flatten().any(|f| {
        f["src"]["ip"] == session.local.ip().to_string()
            && f["src"]["port"] == session.local.port()
            && f["dst"]["ip"] == to.ip().to_string()
            && f["dst"]["port"] == to.port()
            && f["proto"] == "tcp"
            && f["state"] == "fast"
    }))
}
