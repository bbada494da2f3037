//! Masquerade under load: from every pod, hundreds of TCP connections to the outside
//! host, all held open at once, each carrying a payload of its own that must come back
//! byte for byte; then a burst of UDP exchanges. Reported: counts, the size of each
//! node's connection table while everything is open, the port collisions the datapath
//! met while allocating translated ports, and how long each phase took (reported only:
//! timing is the machine's business, not a verdict).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream, UdpSocket},
    task::JoinSet,
    time::timeout,
};

use crate::lab::machinery::{
    interrupt, netns, probe::Proto, servers::Servers, state::LabState, text_table::Table,
    topology::Pod,
};

use super::section::{Section, verdict};

use super::nat_table::NatTable;

#[derive(Debug, Clone, Copy)]
pub(super) struct Load {
    /// TCP connections each pod holds open at once.
    pub connections_per_pod: usize,
    /// UDP exchanges each pod starts at once.
    pub datagrams_per_pod: usize,
}

impl Default for Load {
    fn default() -> Self {
        Self {
            connections_per_pod: 500,
            datagrams_per_pod: 250,
        }
    }
}

/// Bytes each connection sends (and gets back).
const PAYLOAD: usize = 1024;
/// Generous (three SYN retransmissions): the point is that everything completes, not
/// how fast; but bounded, since all connections are attempted at once.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(60);
const UDP_WAIT: Duration = Duration::from_secs(1);
const UDP_TRIES: usize = 5;

/// What one node's connection table showed.
struct NodeLoad {
    node: String,
    pods: usize,
    /// The load's TCP connections of the node's pods listed while all were open.
    listed: usize,
    /// All flows in the table at that moment.
    table: usize,
    created: u64,
    collisions: u64,
}

pub(super) struct LoadReport {
    load: Load,
    pods: usize,
    established: usize,
    echoed: usize,
    udp_answered: usize,
    udp_resent: usize,
    failures: Vec<String>,
    nodes: Vec<NodeLoad>,
    connect_time: Duration,
    exchange_time: Duration,
    udp_time: Duration,
}

/// One connection's or datagram's identity and what must come back.
#[derive(Clone)]
struct Job {
    pod: String,
    node_address: Ipv4Addr,
    payload: Arc<Vec<u8>>,
}

impl Job {
    fn new(pod: &Pod, node_address: Ipv4Addr, kind: &str, i: usize, len: usize) -> Self {
        let mut payload = format!("olab {kind} {} {i} ", pod.name).into_bytes();
        // Bytes that differ per connection all the way, so that a mix-up shows anywhere.
        let mut x =
            (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(pod.address.to_bits());
        while payload.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            payload.push(x as u8);
        }
        Self {
            pod: pod.name.clone(),
            node_address,
            payload: Arc::new(payload),
        }
    }

    /// The server's answer must name the node's address and return the payload intact.
    fn check(&self, answer: &[u8]) -> Result<(), String> {
        let expected = format!("{}\n", self.node_address).into_bytes();
        if !answer.starts_with(&expected) {
            let seen = answer.split(|&b| b == b'\n').next().unwrap_or_default();
            return Err(format!(
                "{}: the outside saw {}, not {}",
                self.pod,
                String::from_utf8_lossy(seen),
                self.node_address
            ));
        }
        if answer[expected.len()..] != self.payload[..] {
            return Err(format!(
                "{}: {} bytes came back, not the {} sent",
                self.pod,
                answer.len() - expected.len(),
                self.payload.len()
            ));
        }
        Ok(())
    }
}

/// Runs the load against the outside host's servers (among `servers`); the agents must
/// be masquerading.
pub(super) fn run(lab: &LabState, servers: &Servers, load: Load) -> Result<LoadReport> {
    let topology = &lab.topology;
    let pods = topology.pods();
    let sockets = pods.len() * (load.connections_per_pod + load.datagrams_per_pod);
    // Ours, and the servers' ends of the connections.
    raise_open_files(2 * sockets as u64 + 1024)?;
    let outside = &topology.outside.name;
    let tcp_server = servers.tcp(outside).map_err(|f| anyhow::anyhow!("{f}"))?;
    let udp_server = servers.udp(outside).map_err(|f| anyhow::anyhow!("{f}"))?;
    let before: Vec<NatTable> = topology
        .nodes
        .iter()
        .map(|n| NatTable::read(lab, n))
        .collect::<Result<_>>()?;

    let mut tcp_jobs = Vec::new();
    let mut udp_jobs = Vec::new();
    for pod in &pods {
        interrupt::check()?;
        let node_address = topology.node(&pod.node)?.address;
        let (tcp, udp) = netns::enter(&lab.netns(&pod.name), || {
            let open = |ty, proto, n| -> Result<Vec<Socket>> {
                (0..n)
                    .map(|_| {
                        let s = Socket::new(Domain::IPV4, ty, Some(proto))?;
                        s.set_nonblocking(true)?;
                        Ok(s)
                    })
                    .collect()
            };
            Ok((
                open(Type::STREAM, Protocol::TCP, load.connections_per_pod)?,
                open(Type::DGRAM, Protocol::UDP, load.datagrams_per_pod)?,
            ))
        })
        .with_context(|| format!("opening sockets in {}", pod.name))?;
        for (i, s) in tcp.into_iter().enumerate() {
            tcp_jobs.push((Job::new(pod, node_address, "tcp", i, PAYLOAD), s));
        }
        for (i, s) in udp.into_iter().enumerate() {
            udp_jobs.push((Job::new(pod, node_address, "udp", i, 64), s));
        }
    }
    let mut failures = Vec::new();

    // Phase 1: every connection opened, and kept.
    let started = Instant::now();
    let connected = servers.block_on(connect_all(tcp_jobs, tcp_server));
    let connect_time = started.elapsed();
    let mut open = Vec::new();
    for result in connected {
        match result {
            Ok(conn) => open.push(conn),
            Err(why) => failures.push(why),
        }
    }
    let established = open.len();

    // While all are open: each node's table must list its pods' connections.
    interrupt::check()?;
    let mut nodes = Vec::new();
    for node in &topology.nodes {
        let table = NatTable::read(lab, node)?;
        let node_pods: Vec<Ipv4Addr> = topology.pods_of(node).iter().map(|p| p.address).collect();
        let locals: std::collections::HashSet<SocketAddrV4> = open
            .iter()
            .map(|(_, _, local)| *local)
            .filter(|l| node_pods.contains(l.ip()))
            .collect();
        let listed = table
            .flows
            .iter()
            .filter(|f| {
                f.is(Proto::Tcp)
                    && f.dst == tcp_server
                    && f.rule == Some(5)
                    && f.translated.map(|t| *t.ip()) == Some(node.address)
                    && locals.contains(&f.src)
            })
            .count();
        if listed != locals.len() {
            failures.push(format!(
                "{}: {} of its pods' {} open connections are listed as translated to {}",
                node.name,
                listed,
                locals.len(),
                node.address
            ));
        }
        nodes.push(NodeLoad {
            node: node.name.clone(),
            pods: node_pods.len(),
            listed,
            table: table.flows.len(),
            created: 0,
            collisions: 0,
        });
    }

    // Phase 2: every open connection exchanges its payload.
    let started = Instant::now();
    let exchanged = servers.block_on(exchange_all(open));
    let exchange_time = started.elapsed();
    let mut echoed = 0;
    for result in exchanged {
        match result {
            Ok(()) => echoed += 1,
            Err(why) => failures.push(why),
        }
    }

    // Phase 3: the UDP burst.
    interrupt::check()?;
    let started = Instant::now();
    let answered = servers.block_on(udp_all(udp_jobs, udp_server));
    let udp_time = started.elapsed();
    let (mut udp_answered, mut udp_resent) = (0, 0);
    for result in answered {
        match result {
            Ok(resent) => {
                udp_answered += 1;
                udp_resent += resent;
            }
            Err(why) => failures.push(why),
        }
    }

    for ((node, before), row) in topology.nodes.iter().zip(&before).zip(&mut nodes) {
        let after = NatTable::read(lab, node)?;
        row.created = after.event("flow_created") - before.event("flow_created");
        row.collisions = after.event("port_collision") - before.event("port_collision");
    }
    Ok(LoadReport {
        load,
        pods: pods.len(),
        established,
        echoed,
        udp_answered,
        udp_resent,
        failures,
        nodes,
        connect_time,
        exchange_time,
        udp_time,
    })
}

/// Thousands of sockets at once need more descriptors than the usual soft limit.
fn raise_open_files(needed: u64) -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the rlimit struct given, which lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("reading RLIMIT_NOFILE");
    }
    if limit.rlim_cur >= needed {
        return Ok(());
    }
    if limit.rlim_max < needed {
        // Root may raise the hard limit too.
        limit.rlim_max = needed;
    }
    limit.rlim_cur = needed;
    // SAFETY: setrlimit only reads the rlimit struct given, which lives across the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        bail!(
            "the load test needs {needed} open files: raising RLIMIT_NOFILE failed: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

type Open = (Job, TcpStream, SocketAddrV4);

async fn connect_all(jobs: Vec<(Job, Socket)>, server: SocketAddrV4) -> Vec<Result<Open, String>> {
    let mut set = JoinSet::new();
    for (job, socket) in jobs {
        set.spawn(async move {
            let socket = TcpSocket::from_std_stream(socket.into());
            let stream = match timeout(
                interrupt::scaled(CONNECT_TIMEOUT),
                socket.connect(server.into()),
            )
            .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Err(format!("{}: connecting: {e}", job.pod)),
                Err(_) => return Err(format!("{}: connecting timed out", job.pod)),
            };
            let local = match stream.local_addr() {
                Ok(std::net::SocketAddr::V4(a)) => a,
                other => return Err(format!("{}: local address {other:?}", job.pod)),
            };
            Ok((job, stream, local))
        });
    }
    set.join_all().await
}

async fn exchange_all(open: Vec<Open>) -> Vec<Result<(), String>> {
    let mut set = JoinSet::new();
    for (job, mut stream, _) in open {
        set.spawn(async move {
            let exchange = async {
                stream.write_all(&job.payload).await?;
                stream.shutdown().await?;
                let mut answer = Vec::with_capacity(PAYLOAD + 32);
                stream.read_to_end(&mut answer).await?;
                Ok::<_, std::io::Error>(answer)
            };
            match timeout(interrupt::scaled(EXCHANGE_TIMEOUT), exchange).await {
                Ok(Ok(answer)) => job.check(&answer),
                Ok(Err(e)) => Err(format!("{}: {e}", job.pod)),
                Err(_) => Err(format!("{}: the exchange timed out", job.pod)),
            }
        });
    }
    set.join_all().await
}

/// Each datagram is sent again after [`UDP_WAIT`] without an answer, up to
/// [`UDP_TRIES`] times; returns how many times it had to be resent.
async fn udp_all(jobs: Vec<(Job, Socket)>, server: SocketAddrV4) -> Vec<Result<usize, String>> {
    let mut set = JoinSet::new();
    for (job, socket) in jobs {
        set.spawn(async move {
            let socket = UdpSocket::from_std(socket.into()).map_err(|e| e.to_string())?;
            socket
                .connect(server)
                .await
                .map_err(|e| format!("{}: {e}", job.pod))?;
            let mut buf = vec![0u8; 2048];
            for attempt in 0..UDP_TRIES {
                socket
                    .send(&job.payload)
                    .await
                    .map_err(|e| format!("{}: {e}", job.pod))?;
                match timeout(interrupt::scaled(UDP_WAIT), socket.recv(&mut buf)).await {
                    Ok(Ok(n)) => return job.check(&buf[..n]).map(|()| attempt),
                    Ok(Err(e)) => return Err(format!("{}: {e}", job.pod)),
                    Err(_) => {}
                }
            }
            Err(format!(
                "{}: no UDP answer after {UDP_TRIES} tries",
                job.pod
            ))
        });
    }
    set.join_all().await
}

impl Section for LoadReport {
    fn failures(&self) -> Vec<String> {
        self.failures.clone()
    }

    fn render(&self) -> String {
        let tcp = self.pods * self.load.connections_per_pod;
        let udp = self.pods * self.load.datagrams_per_pod;
        let mut phases = Table::new(["PHASE", "COUNT", "OK", "TIME s"]).align_right([1, 2, 3]);
        let secs = |d: Duration| format!("{:.2}", d.as_secs_f64());
        phases.row([
            format!(
                "TCP connect, {} per pod × {} pods, all held open",
                self.load.connections_per_pod, self.pods
            ),
            tcp.to_string(),
            self.established.to_string(),
            secs(self.connect_time),
        ]);
        phases.row([
            format!("TCP exchange, {PAYLOAD} unique bytes each way, checked byte for byte"),
            self.established.to_string(),
            self.echoed.to_string(),
            secs(self.exchange_time),
        ]);
        phases.row([
            format!(
                "UDP burst, {} per pod ({} resent)",
                self.load.datagrams_per_pod, self.udp_resent
            ),
            udp.to_string(),
            self.udp_answered.to_string(),
            secs(self.udp_time),
        ]);
        let mut nodes = Table::new([
            "NODE",
            "PODS",
            "OPEN CONNECTIONS LISTED (rule 5)",
            "TABLE SIZE (flows)",
            "FLOWS CREATED",
            "PORT COLLISIONS",
        ])
        .align_right(1..6);
        for n in &self.nodes {
            nodes.row([
                n.node.clone(),
                n.pods.to_string(),
                n.listed.to_string(),
                n.table.to_string(),
                n.created.to_string(),
                n.collisions.to_string(),
            ]);
        }
        let verdict = verdict(
            "every connection and datagram came back intact, seen from its pod's node address",
            &self.failures,
        );
        format!(
            "{phases}\nWhile every connection was open (`overlay-agent nat` on each node); events over the whole test:\n{nodes}  {verdict}\n"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_differ_and_answers_are_checked_byte_for_byte() {
        let pod = Pod {
            name: "w1-pod1".into(),
            node: "w1".into(),
            address: [10, 244, 1, 2].into(),
        };
        let node: Ipv4Addr = [172, 18, 0, 3].into();
        let (a, b) = (
            Job::new(&pod, node, "tcp", 0, PAYLOAD),
            Job::new(&pod, node, "tcp", 1, PAYLOAD),
        );
        assert_eq!(a.payload.len(), PAYLOAD);
        assert_ne!(a.payload[40..], b.payload[40..]);
        let answer =
            |seen: &str, payload: &[u8]| [format!("{seen}\n").as_bytes(), payload].concat();
        assert_eq!(a.check(&answer("172.18.0.3", &a.payload)), Ok(()));
        assert!(
            a.check(&answer("10.244.1.2", &a.payload))
                .unwrap_err()
                .contains("saw 10.244.1.2")
        );
        assert!(a.check(&answer("172.18.0.3", &b.payload)).is_err());
        assert!(a.check(&answer("172.18.0.3", &a.payload[1..])).is_err());
    }
}
