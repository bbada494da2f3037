//! The benchmark's load generators: bulk TCP streams (iperf3's TCP test), request /
//! response latency and rate over one TCP connection (netperf's TCP_RR; netperf is not
//! packaged), connection rate (TCP_CRR: connect, one byte each way, close), and
//! small-packet UDP rate. Each side runs on a thread that entered its namespace
//! (`netns::enter`), so the whole exchange is between two pods of the lab; a server
//! lives as long as its handle.
//!
//! Every TCP socket, both ends, runs the congestion control it is given, chosen before
//! the connection exists: on the client before `connect`, on the listener for what it
//! accepts. A namespace's default cannot be set to one outside the machine's allowed
//! list, and choosing after the handshake (as iperf3 does, on both ends) is too late:
//! the kernel's default has been initialised by then, and a BBR default leaves TCP's
//! own pacing on under whatever comes after it.

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

use crate::lab::machinery::netns;

/// How often a server's blocking calls wake up to look at the stop flag.
const TICK: Duration = Duration::from_millis(100);
/// The small UDP datagram: 64 bytes of payload.
pub(super) const UDP_PAYLOAD: usize = 64;
/// Room in the receive buffer for bursts (root may exceed rmem_max).
const UDP_BUFFER: usize = 8 << 20;
/// What a bulk stream writes and reads per call (iperf3's default for TCP).
const STREAM_BLOCK: usize = 128 << 10;
/// How long a client waits for its connection to be accepted.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The servers' ports, the same in every cluster: the bench's Service and the
/// NetworkPolicy that admits the client name them before the servers start
/// (`node`), and every cluster's rules are then the same.
pub(super) const STREAM_PORT: u16 = 5201;
pub(super) const RR_PORT: u16 = 5202;
pub(super) const CRR_PORT: u16 = 5203;
pub(super) const UDP_PORT: u16 = 5204;

/// The servers of one pod: a sink for bulk streams, request/response,
/// connect/request/response/close, and a UDP sink, on their fixed ports. Stopped (and
/// their sockets closed) when dropped.
pub(super) struct Servers {
    pub stream: SocketAddrV4,
    pub rr: SocketAddrV4,
    pub crr: SocketAddrV4,
    pub udp: SocketAddrV4,
    /// Bytes the stream sink read so far, all connections together.
    streamed: Arc<AtomicU64>,
    /// Datagrams the UDP sink received so far.
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    /// Servers on `address` in `ns`, whose connections run `congestion` (the
    /// listeners pass it on to what they accept).
    pub(super) fn start(ns: &str, address: Ipv4Addr, congestion: &str) -> Result<Self> {
        let (stream, rr, crr, udp) = netns::enter(ns, || {
            let at = |port| SocketAddrV4::new(address, port);
            let udp = UdpSocket::bind(at(UDP_PORT))?;
            setsockopt(&udp, RcvBufForce, &UDP_BUFFER)?;
            let tcp = |port| TcpListener::bind(at(port));
            Ok((tcp(STREAM_PORT)?, tcp(RR_PORT)?, tcp(CRR_PORT)?, udp))
        })
        .with_context(|| format!("opening the benchmark's servers in {ns}"))?;
        let addr = |a: std::io::Result<std::net::SocketAddr>| -> Result<SocketAddrV4> {
            match a? {
                std::net::SocketAddr::V4(a) => Ok(a),
                other => bail!("not IPv4: {other}"),
            }
        };
        let mut servers = Self {
            stream: addr(stream.local_addr())?,
            rr: addr(rr.local_addr())?,
            crr: addr(crr.local_addr())?,
            udp: addr(udp.local_addr())?,
            streamed: Arc::default(),
            received: Arc::default(),
            stop: Arc::default(),
            threads: Vec::new(),
        };
        for listener in [&stream, &rr, &crr] {
            let socket = socket2::SockRef::from(listener);
            // accept() honours the receive timeout: the loops can see the stop flag.
            socket.set_read_timeout(Some(TICK))?;
            socket
                .set_tcp_congestion(congestion.as_bytes())
                .with_context(|| format!("TCP congestion control {congestion}"))?;
        }
        udp.set_read_timeout(Some(TICK))?;
        let (stop, streamed) = (servers.stop.clone(), servers.streamed.clone());
        servers.threads.push(std::thread::spawn(move || {
            serve_each(stream, stop, move |conn, stop| drain(conn, stop, &streamed))
        }));
        let stop = servers.stop.clone();
        servers
            .threads
            .push(std::thread::spawn(move || serve_each(rr, stop, echo)));
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

    pub(super) fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    pub(super) fn streamed(&self) -> u64 {
        self.streamed.load(Ordering::Relaxed)
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

/// A connection to `server` that runs `congestion`, connected within `timeout`, with
/// Nagle's algorithm off when `nodelay`.
fn connect(
    server: SocketAddrV4,
    congestion: &str,
    timeout: Duration,
    nodelay: bool,
) -> Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket
        .set_tcp_congestion(congestion.as_bytes())
        .with_context(|| format!("TCP congestion control {congestion}"))?;
    socket.connect_timeout(&server.into(), timeout)?;
    let stream: TcpStream = socket.into();
    stream.set_nodelay(nodelay)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(stream)
}

fn would_block(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Each connection on a thread of its own, running `serve` until the client closes or
/// the servers stop.
fn serve_each<F>(listener: TcpListener, stop: Arc<AtomicBool>, serve: F)
where
    F: Fn(TcpStream, &AtomicBool) + Clone + Send + 'static,
{
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) => {
                let (stop, serve) = (stop.clone(), serve.clone());
                std::thread::spawn(move || {
                    let _ = conn.set_nodelay(true);
                    if conn.set_read_timeout(Some(TICK)).is_ok() {
                        serve(conn, &stop);
                    }
                });
            }
            Err(e) if would_block(&e) => {}
            Err(_) => std::thread::sleep(TICK),
        }
    }
}

/// Echoes every byte.
fn echo(mut conn: TcpStream, stop: &AtomicBool) {
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
}

/// Reads and counts everything.
fn drain(mut conn: TcpStream, stop: &AtomicBool, streamed: &AtomicU64) {
    let mut block = vec![0u8; STREAM_BLOCK];
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut block) {
            Ok(0) => return,
            Ok(n) => {
                streamed.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if would_block(&e) => {}
            Err(_) => return,
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

/// Bulk TCP from `ns`: `streams` connections to `servers`' stream sink, each writing
/// as fast as it can. Returns the bytes the sink read in a window of `duration` that
/// opens once every connection is up, and the window's length.
pub(super) fn stream(
    ns: &str,
    servers: &Servers,
    streams: usize,
    congestion: &str,
    duration: Duration,
) -> Result<(u64, Duration)> {
    let conns = netns::enter(ns, || {
        (0..streams)
            // Nagle on, as in iperf3.
            .map(|_| connect(servers.stream, congestion, CONNECT_TIMEOUT, false))
            .collect::<Result<Vec<_>>>()
    })
    .with_context(|| format!("connecting to {}", servers.stream))?;
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let writers: Vec<_> = conns
            .into_iter()
            .map(|mut conn| {
                let stop = &stop;
                s.spawn(move || -> Result<()> {
                    // A path that stops moving fails the run instead of hanging it.
                    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
                    let block = vec![0x5a; STREAM_BLOCK];
                    while !stop.load(Ordering::Relaxed) {
                        conn.write_all(&block)?;
                    }
                    Ok(())
                })
            })
            .collect();
        let (before, started) = (servers.streamed(), Instant::now());
        std::thread::sleep(duration);
        let (after, window) = (servers.streamed(), started.elapsed());
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                .with_context(|| format!("streaming to {}", servers.stream))?;
        }
        Ok((after - before, window))
    })
}

/// Request/response over one connection for `duration`.
#[derive(Debug, Clone, Copy)]
pub(super) struct RrResult {
    pub transactions: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub elapsed: Duration,
}

pub(super) fn rr(
    ns: &str,
    server: SocketAddrV4,
    congestion: &str,
    duration: Duration,
) -> Result<RrResult> {
    netns::enter(ns, || {
        let mut conn = connect(server, congestion, CONNECT_TIMEOUT, true)?;
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

/// What a connection-rate run did.
#[derive(Debug)]
pub(super) struct Crr {
    /// Connections completed.
    pub done: u64,
    /// Connections that failed (not connected within [`CONNECT_TIMEOUT`], reset, or no
    /// answer within the read timeout): counted and gone past, their time included in
    /// the run's. One such connection is news about the path, not a reason to throw
    /// away the run (two full benchmarks were once lost that way).
    pub failed: u64,
    /// What went wrong with the first of them.
    pub first_failure: Option<String>,
    pub elapsed: Duration,
}

/// Connections (connect, one byte each way, close) one after another for `duration`.
/// Fails only when none completes.
pub(super) fn crr(
    ns: &str,
    server: SocketAddrV4,
    congestion: &str,
    duration: Duration,
) -> Result<Crr> {
    let one = || -> Result<()> {
        let mut conn = connect(server, congestion, CONNECT_TIMEOUT, true)?;
        conn.write_all(&[1])?;
        let mut byte = [0u8; 1];
        conn.read_exact(&mut byte)?;
        // Wait for the server's close.
        let _ = conn.read(&mut byte);
        Ok(())
    };
    netns::enter(ns, || {
        let mut run = Crr {
            done: 0,
            failed: 0,
            first_failure: None,
            elapsed: Duration::ZERO,
        };
        let started = Instant::now();
        while started.elapsed() < duration {
            match one() {
                Ok(()) => run.done += 1,
                Err(e) => {
                    run.failed += 1;
                    let n = run.done + run.failed;
                    run.first_failure
                        .get_or_insert_with(|| format!("connection {n} to {server}: {e:#}"));
                }
            }
        }
        run.elapsed = started.elapsed();
        if run.done == 0 {
            bail!(
                "no connection to {server} completed in {:?}; the first: {}",
                run.elapsed,
                run.first_failure.as_deref().unwrap_or("none tried")
            );
        }
        Ok(run)
    })
}

/// Sends [`UDP_PAYLOAD`]-byte datagrams to `server` as fast as one thread can for
/// `duration`; returns how many were sent and the time it took.
pub(super) fn udp_blast(
    ns: &str,
    server: SocketAddrV4,
    duration: Duration,
) -> Result<(u64, Duration)> {
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

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::lab::machinery::interrupt::{self, Wait};

    /// Two namespaces joined by a veth pair, 10.99.0.1 and .2, deleted when dropped.
    struct Pair([String; 2]);

    impl Pair {
        fn new(tag: &str) -> Result<Self> {
            let names = ["a", "b"].map(|end| format!("oxl-{}-{tag}-{end}", std::process::id()));
            let pair = Self(names);
            let [a, b] = &pair.0;
            netns::add(a)?;
            netns::add(b)?;
            netns::Script::new(a)
                .veth("v", None, "v", b, None)?
                .apply()?;
            for (ns, addr) in [(a, "10.99.0.1/24"), (b, "10.99.0.2/24")] {
                netns::Script::new(ns)
                    .address(addr.parse()?, "v")
                    .up("v")
                    .apply()?;
            }
            // The kernel's link watch activates a device's queue after it comes up,
            // asynchronously (up to a second later on a busy machine); until then
            // what is sent is dropped, and a lost SYN costs its connection a second.
            // The operational state turns UP in the same step.
            for ns in &pair.0 {
                interrupt::wait_until("the veth to be up", Duration::from_secs(5), || {
                    let link =
                        netns::run(Command::new("ip").args(["-n", ns, "-o", "link", "show", "v"]))?;
                    Ok(if link.contains(" state UP ") {
                        Wait::Done(())
                    } else {
                        Wait::Pending(link)
                    })
                })?;
            }
            Ok(pair)
        }
    }

    impl Drop for Pair {
        fn drop(&mut self) {
            for ns in &self.0 {
                let _ = netns::delete(ns);
            }
        }
    }

    /// A congestion control other than the one `ns` gives new connections, so that
    /// they must be told: reno, which every kernel has, or cubic where reno is the
    /// default.
    fn not_the_default(ns: &str) -> &'static str {
        let default = netns::enter(ns, || {
            Ok(std::fs::read_to_string(
                "/proc/sys/net/ipv4/tcp_congestion_control",
            )?)
        })
        .unwrap();
        if default.trim() == "reno" {
            "cubic"
        } else {
            "reno"
        }
    }

    #[test]
    fn streams_are_counted_at_the_sink_over_the_window() {
        let pair = Pair::new("stream").unwrap();
        let [client, server] = &pair.0;
        let cc = not_the_default(client);
        let servers = Servers::start(server, "10.99.0.2".parse().unwrap(), cc).unwrap();
        let window = Duration::from_millis(300);
        let (bytes, took) = stream(client, &servers, 2, cc, window).unwrap();
        assert!(took >= window, "{took:?}");
        // A veth pair moves far more than a megabyte in 300 ms.
        assert!(bytes > 1 << 20, "{bytes} bytes");
        // The window's bytes are part of what the sink read in all.
        std::thread::sleep(Duration::from_millis(100));
        assert!(servers.streamed() >= bytes);
    }

    /// A listener of the pair's server end, and its address.
    fn listen(server: &str) -> (TcpListener, SocketAddrV4) {
        let listener = netns::enter(server, || Ok(TcpListener::bind("10.99.0.2:0")?)).unwrap();
        match listener.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => (listener, a),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn a_failed_connection_is_counted_and_the_run_goes_on() {
        let pair = Pair::new("crr").unwrap();
        let [client, server] = &pair.0;
        let cc = not_the_default(client);
        let (listener, to) = listen(server);
        listener.set_nonblocking(true).unwrap();
        // Answers the odd connections; closes the even ones unanswered.
        let stop = Arc::new(AtomicBool::new(false));
        let server = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut accepted = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut conn, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    };
                    accepted += 1;
                    conn.set_nonblocking(false).unwrap();
                    let mut byte = [0u8; 1];
                    if accepted % 2 == 1 && conn.read_exact(&mut byte).is_ok() {
                        let _ = conn.write_all(&byte);
                    }
                }
            }
        });
        let run = crr(client, to, cc, Duration::from_millis(300)).unwrap();
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
        assert!(run.done > 0 && run.failed > 0, "{run:?}");
        assert!(run.done.abs_diff(run.failed) <= 1, "{run:?}");
        let first = run.first_failure.as_deref().unwrap();
        assert!(
            first.starts_with(&format!("connection 2 to {to}: ")),
            "{first}"
        );
    }

    #[test]
    fn a_connection_rate_run_with_no_connection_completed_fails() {
        let pair = Pair::new("crr0").unwrap();
        let client = &pair.0[0];
        // Nothing listens there: every connection is refused.
        let to = "10.99.0.2:9".parse().unwrap();
        let err = crr(client, to, "reno", Duration::from_millis(200)).unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.starts_with("no connection to 10.99.0.2:9 completed in "),
            "{err}"
        );
        assert!(
            err.contains("the first: connection 1 to 10.99.0.2:9: "),
            "{err}"
        );
    }

    #[test]
    fn both_ends_run_the_congestion_control_they_are_given() {
        let pair = Pair::new("cc").unwrap();
        let [client, server] = &pair.0;
        let cc = not_the_default(client);
        let (listener, to) = listen(server);
        socket2::SockRef::from(&listener)
            .set_tcp_congestion(cc.as_bytes())
            .unwrap();
        let conn = netns::enter(client, || connect(to, cc, Duration::from_secs(1), true)).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        for end in [&conn, &accepted] {
            let got = socket2::SockRef::from(end).tcp_congestion().unwrap();
            assert_eq!(String::from_utf8_lossy(&got).trim_end_matches('\0'), cc);
        }
    }
}
