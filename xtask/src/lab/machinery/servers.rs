//! The servers probes talk to, in the namespaces of any hosts of the lab: a TCP and a
//! UDP echo server that answer with the source address they saw, and an ICMP recorder
//! that notes the source of every echo request a probe sends (the kernel answers the
//! echo itself). What a destination saw is what masquerade is about.
//!
//! They run on a small tokio runtime of their own, so that thousands of connections
//! can be held open at once (the load test) without a thread each; dropping the
//! servers drops the runtime, which closes every socket.

use std::{
    collections::HashMap,
    io::{self, Read as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use nix::sys::socket::{setsockopt, sockopt::RcvBufForce};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::AsyncWriteExt as _,
    io::{Interest, unix::AsyncFd},
    net::{TcpListener, TcpStream, UdpSocket},
    runtime::Runtime,
};

use super::{
    interrupt, netns,
    probe::{self, Client, Exchange, Failure, Proto},
    state::LabState,
    topology::Host,
};

/// Connections a listener queues before they are accepted: the load test opens
/// thousands at once.
const BACKLOG: i32 = 4096;
/// Room for a burst of datagrams from every pod at once (root may exceed rmem_max).
const UDP_BUFFER: usize = 16 << 20;
/// How long the recorder may lag behind the echo reply the kernel sent.
const RECORD_WAIT: Duration = Duration::from_millis(500);
const RUNTIME_THREADS: usize = 2;

/// Echo requests seen by the recorders: token -> source address.
type Recorded = Arc<Mutex<HashMap<u64, Ipv4Addr>>>;

struct Endpoint {
    host: String,
    tcp: SocketAddrV4,
    udp: SocketAddrV4,
}

pub(crate) struct Servers {
    /// Declared first: dropped (and with it every socket) before the rest.
    runtime: Runtime,
    endpoints: Vec<Endpoint>,
    recorded: Recorded,
}

impl Servers {
    /// Starts the servers on every host of `hosts`, each on the host's address with
    /// ports the kernel picks (concurrent checks never collide).
    pub(crate) fn start(lab: &LabState, hosts: &[Host]) -> Result<Self> {
        Self::start_on(lab, hosts, 0)
    }

    /// [`Servers::start`] on `port` (TCP and UDP; 0: the kernel picks): a Service's
    /// endpoints, whose target port the rules name.
    pub(crate) fn start_on(lab: &LabState, hosts: &[Host], port: u16) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RUNTIME_THREADS)
            .thread_name("lab-servers")
            .enable_all()
            .build()
            .context("starting the servers' runtime")?;
        let recorded = Recorded::default();
        let mut endpoints = Vec::new();
        for host in hosts {
            let (tcp, udp, icmp) = netns::enter(&lab.netns(&host.name), || {
                let tcp = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
                tcp.set_reuse_address(true)?;
                tcp.bind(&SocketAddrV4::new(host.address, port).into())?;
                tcp.listen(BACKLOG)?;
                let udp = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
                setsockopt(&udp, RcvBufForce, &UDP_BUFFER)?;
                udp.bind(&SocketAddrV4::new(host.address, port).into())?;
                let icmp = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
                for s in [&tcp, &udp, &icmp] {
                    s.set_nonblocking(true)?;
                }
                Ok((tcp, udp, icmp))
            })
            .with_context(|| format!("opening the servers of {}", host.name))?;
            endpoints.push(Endpoint {
                host: host.name.clone(),
                tcp: v4(tcp.local_addr()?.as_socket())?,
                udp: v4(udp.local_addr()?.as_socket())?,
            });
            // Registering with the reactor needs the runtime's context.
            let _context = runtime.enter();
            let tcp = TcpListener::from_std(tcp.into())?;
            let udp = UdpSocket::from_std(udp.into())?;
            // SAFETY: the AsyncFd owns the socket, so its descriptor stays open and the
            // same for as long as the AsyncFd lives.
            let icmp = unsafe { AsyncFd::register_with_interest(icmp, Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("registering an ICMP socket: {e}"))?;
            runtime.spawn(serve_tcp(tcp));
            runtime.spawn(serve_udp(udp));
            runtime.spawn(record_icmp(icmp, recorded.clone()));
        }
        Ok(Self {
            runtime,
            endpoints,
            recorded,
        })
    }

    fn endpoint(&self, host: &str) -> Result<&Endpoint, Failure> {
        self.endpoints
            .iter()
            .find(|e| e.host == host)
            .ok_or_else(|| Failure::Other(format!("no servers on {host}")))
    }

    pub(crate) fn tcp(&self, host: &str) -> Result<SocketAddrV4, Failure> {
        Ok(self.endpoint(host)?.tcp)
    }

    pub(crate) fn udp(&self, host: &str) -> Result<SocketAddrV4, Failure> {
        Ok(self.endpoint(host)?.udp)
    }

    /// One exchange of `proto` from `client` to `to`, with the source address `to` saw.
    pub(crate) fn exchange(
        &self,
        client: &Client,
        to: &Host,
        proto: Proto,
    ) -> Result<Exchange, Failure> {
        match proto {
            Proto::Tcp => probe::tcp(client, self.tcp(&to.name)?),
            Proto::Udp => probe::udp(client, self.udp(&to.name)?),
            Proto::Icmp => {
                let token = probe::token();
                let mut exchange = probe::ping(client, to.address, token)?;
                exchange.seen = self.icmp_source(token);
                Ok(exchange)
            }
        }
    }

    /// The source of the echo request that carried `token`, once its recorder saw it.
    fn icmp_source(&self, token: u64) -> Option<Ipv4Addr> {
        let deadline = Instant::now() + interrupt::scaled(RECORD_WAIT);
        loop {
            let seen = self
                .recorded
                .lock()
                .expect("no recorder panics")
                .get(&token)
                .copied();
            if seen.is_some() || Instant::now() >= deadline {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Runs `future` on the servers' runtime (the load test's clients share it).
    pub(crate) fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }
}

fn v4(addr: Option<SocketAddr>) -> Result<SocketAddrV4> {
    match addr {
        Some(SocketAddr::V4(a)) => Ok(a),
        other => anyhow::bail!("a server socket has no IPv4 address: {other:?}"),
    }
}

/// Each connection: the peer address it came from and a newline, then every byte the
/// client sends, sent back as it comes, until the client's end of stream. A probe sends
/// its bytes and reads the answer to the end; a connection held open (the policy
/// checks) exchanges messages over time.
async fn serve_tcp(listener: TcpListener) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            // A failed exchange is the client's to report.
            let _ = echo(stream, peer).await;
        });
    }
}

async fn echo(mut stream: TcpStream, peer: SocketAddr) -> io::Result<()> {
    stream
        .write_all(format!("{}\n", peer.ip()).as_bytes())
        .await?;
    let (mut reader, mut writer) = stream.split();
    tokio::io::copy(&mut reader, &mut writer).await?;
    writer.shutdown().await
}

/// Each datagram is answered with the peer address, a newline, and the datagram.
async fn serve_udp(socket: UdpSocket) {
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let mut answer = format!("{}\n", peer.ip()).into_bytes();
        answer.extend(&buf[..n]);
        let _ = socket.send_to(&answer, peer).await;
    }
}

/// Reads every ICMP packet the namespace receives and records the source of the echo
/// requests that carry a probe's token.
async fn record_icmp(socket: AsyncFd<Socket>, recorded: Recorded) {
    let mut buf = [0u8; 1500];
    loop {
        let Ok(mut ready) = socket.readable().await else {
            return;
        };
        let read = ready.try_io(|s| {
            let mut socket: &Socket = s.get_ref();
            socket.read(&mut buf)
        });
        // Err: not readable after all (readiness cleared, wait again); Ok(Err): a
        // failed read of one packet, which costs only that packet.
        if let Ok(Ok(n)) = read
            && let Some((source, token)) = probe::echo_request_token(&buf[..n])
        {
            recorded
                .lock()
                .expect("no recorder panics")
                .insert(token, source);
        }
    }
}
