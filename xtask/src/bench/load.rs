//! Load generators where no packaged tool fits (netperf is not packaged): request /
//! response latency and rate over one TCP connection (netperf's TCP_RR), connection
//! rate (TCP_CRR: connect, one byte each way, close), and small-packet UDP rate. Each
//! side runs on a thread that entered its namespace (`netns::enter`), so the whole
//! exchange is between two pods of the lab; a server lives as long as its handle.
//! Every TCP socket, both ends, runs the congestion control it is given (a namespace's
//! default cannot be set to one outside the machine's allowed list).

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::sys::socket::{setsockopt, sockopt::RcvBufForce};

use crate::lab::netns;

/// How often a server's blocking calls wake up to look at the stop flag.
const TICK: Duration = Duration::from_millis(100);
/// The small UDP datagram: 64 bytes of payload.
pub const UDP_PAYLOAD: usize = 64;
/// Room in the receive buffer for bursts (root may exceed rmem_max).
const UDP_BUFFER: usize = 8 << 20;

/// The servers of one pod: request/response, connect/request/response/close, and a UDP
/// sink. Stopped (and their sockets closed) when dropped.
pub struct Servers {
    pub rr: SocketAddrV4,
    pub crr: SocketAddrV4,
    pub udp: SocketAddrV4,
    /// Datagrams the UDP sink received so far.
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    /// Servers on `address` in `ns`, whose connections run `congestion` (the
    /// listeners pass it on to what they accept).
    pub fn start(ns: &str, address: Ipv4Addr, congestion: &str) -> Result<Self> {
        let (rr, crr, udp) = netns::enter(ns, || {
            let any = SocketAddrV4::new(address, 0);
            let udp = UdpSocket::bind(any)?;
            setsockopt(&udp, RcvBufForce, &UDP_BUFFER)?;
            Ok((TcpListener::bind(any)?, TcpListener::bind(any)?, udp))
        })
        .with_context(|| format!("opening the benchmark's servers in {ns}"))?;
        let addr = |a: std::io::Result<std::net::SocketAddr>| -> Result<SocketAddrV4> {
            match a? {
                std::net::SocketAddr::V4(a) => Ok(a),
                other => bail!("not IPv4: {other}"),
            }
        };
        let mut servers = Self {
            rr: addr(rr.local_addr())?,
            crr: addr(crr.local_addr())?,
            udp: addr(udp.local_addr())?,
            received: Arc::default(),
            stop: Arc::default(),
            threads: Vec::new(),
        };
        for listener in [&rr, &crr] {
            let socket = socket2::SockRef::from(listener);
            // accept() honours the receive timeout: the loops can see the stop flag.
            socket.set_read_timeout(Some(TICK))?;
            socket
                .set_tcp_congestion(congestion.as_bytes())
                .with_context(|| format!("TCP congestion control {congestion}"))?;
        }
        udp.set_read_timeout(Some(TICK))?;
        let stop = servers.stop.clone();
        servers
            .threads
            .push(std::thread::spawn(move || serve_rr(rr, stop)));
        let stop = servers.stop.clone();
        servers
            .threads
            .push(std::thread::spawn(move || serve_crr(crr, stop)));
        let (stop, received) = (servers.stop.clone(), servers.received.clone());
        servers
            .threads
            .push(std::thread::spawn(move || sink(udp, stop, received)));
        Ok(servers)
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A connection to `server` that runs `congestion`, connected within `timeout`.
fn connect(server: SocketAddrV4, congestion: &str, timeout: Duration) -> Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket
        .set_tcp_congestion(congestion.as_bytes())
        .with_context(|| format!("TCP congestion control {congestion}"))?;
    socket.connect_timeout(&server.into(), timeout)?;
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(stream)
}

fn would_block(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Each connection: echo every byte until the client closes.
fn serve_rr(listener: TcpListener, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut conn, _)) => {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let _ = conn.set_nodelay(true);
                    let _ = conn.set_read_timeout(Some(TICK));
                    let mut byte = [0u8; 1];
                    while !stop.load(Ordering::Relaxed) {
                        match conn.read(&mut byte) {
                            Ok(0) => return,
                            Ok(_) => {
                                if conn.write_all(&byte).is_err() {
                                    return;
                                }
                            }
                            Err(e) if would_block(&e) => {}
                            Err(_) => return,
                        }
                    }
                });
            }
            Err(e) if would_block(&e) => {}
            Err(_) => std::thread::sleep(TICK),
        }
    }
}

/// Each connection: one byte in, one byte out, then the server closes first (so the
/// TIME_WAIT state is the server's, and the client's ports are free at once).
fn serve_crr(listener: TcpListener, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut conn, _)) => {
                let _ = conn.set_nodelay(true);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut byte = [0u8; 1];
                if conn.read_exact(&mut byte).is_ok() {
                    let _ = conn.write_all(&byte);
                }
            }
            Err(e) if would_block(&e) => {}
            Err(_) => std::thread::sleep(TICK),
        }
    }
}

fn sink(socket: UdpSocket, stop: Arc<AtomicBool>, received: Arc<AtomicU64>) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv(&mut buf) {
            Ok(_) => {
                received.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if would_block(&e) => {}
            Err(_) => std::thread::sleep(TICK),
        }
    }
}

/// Request/response over one connection for `duration`.
#[derive(Debug, Clone, Copy)]
pub struct RrResult {
    pub transactions: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub elapsed: Duration,
}

pub fn rr(
    ns: &str,
    server: SocketAddrV4,
    congestion: &str,
    duration: Duration,
) -> Result<RrResult> {
    netns::enter(ns, || {
        let mut conn = connect(server, congestion, Duration::from_secs(5))?;
        let mut latencies = Vec::with_capacity(1 << 16);
        let mut byte = [1u8; 1];
        let started = Instant::now();
        while started.elapsed() < duration {
            let sent = Instant::now();
            conn.write_all(&byte)?;
            conn.read_exact(&mut byte)?;
            latencies.push(sent.elapsed().as_nanos() as u64);
        }
        let elapsed = started.elapsed();
        if latencies.is_empty() {
            bail!("no transaction completed in {duration:?}");
        }
        latencies.sort_unstable();
        let at =
            |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize] as f64 / 1e3;
        Ok(RrResult {
            transactions: latencies.len() as u64,
            p50_us: at(0.50),
            p99_us: at(0.99),
            elapsed,
        })
    })
}

/// Connections completed (connect, one byte each way, close) in `duration`, one after
/// another.
pub fn crr(
    ns: &str,
    server: SocketAddrV4,
    congestion: &str,
    duration: Duration,
) -> Result<(u64, Duration)> {
    netns::enter(ns, || {
        let mut done = 0u64;
        let started = Instant::now();
        while started.elapsed() < duration {
            let mut conn = connect(server, congestion, Duration::from_secs(5))
                .with_context(|| format!("connection {} to {server}", done + 1))?;
            conn.write_all(&[1])?;
            let mut byte = [0u8; 1];
            conn.read_exact(&mut byte)?;
            // Wait for the server's close.
            let _ = conn.read(&mut byte);
            done += 1;
        }
        Ok((done, started.elapsed()))
    })
}

/// Sends [`UDP_PAYLOAD`]-byte datagrams to `server` as fast as one thread can for
/// `duration`; returns how many were sent and the time it took.
pub fn udp_blast(ns: &str, server: SocketAddrV4, duration: Duration) -> Result<(u64, Duration)> {
    netns::enter(ns, || {
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        socket.connect(server)?;
        let payload = [0x5a; UDP_PAYLOAD];
        let mut sent = 0u64;
        let started = Instant::now();
        while started.elapsed() < duration {
            for _ in 0..64 {
                match socket.send(&payload) {
                    Ok(_) => sent += 1,
                    // A full queue (ENOBUFS) is the sender outrunning the path.
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                    // An ICMP error from an earlier datagram; go on.
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok((sent, started.elapsed()))
    })
}
