//! One connectivity probe: an ICMP echo, or a TCP connection that carries bytes both
//! ways. Sockets are opened inside the source namespace and then used from here.

use std::{
    fmt,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU16, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::Result;
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use super::{netns, state::LabState, topology::Pod};

/// Bytes sent each way per TCP probe: enough for full-size segments and several
/// round trips of the window, so a wrong MTU or a broken checksum shows.
pub const TCP_BYTES: usize = 64 * 1024;
const ICMP_TIMEOUT: Duration = Duration::from_secs(1);
const TCP_TIMEOUT: Duration = Duration::from_secs(2);
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_UNREACHABLE: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;

/// Why a probe failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Timeout,
    /// An ICMP error came back, or the local stack had no route.
    Unreachable(String),
    Refused,
    /// The exchange completed but not as sent (corruption, address translation).
    Mismatch(String),
    Other(String),
}

impl Failure {
    fn from_io(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Failure::Timeout,
            io::ErrorKind::ConnectionRefused => Failure::Refused,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                Failure::Unreachable(e.to_string())
            }
            _ => Failure::Other(e.to_string()),
        }
    }

    /// A word for a table cell.
    pub fn short(&self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Unreachable(_) => "unreach",
            Failure::Refused => "refused",
            Failure::Mismatch(_) => "mismatch",
            Failure::Other(_) => "error",
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Timeout => f.write_str("timed out"),
            Failure::Refused => f.write_str("connection refused"),
            Failure::Unreachable(why) | Failure::Mismatch(why) | Failure::Other(why) => {
                f.write_str(why)
            }
        }
    }
}

/// The time a successful probe took, or why it failed.
pub type Outcome = Result<Duration, Failure>;

/// A table cell: milliseconds, or a cross and the reason.
pub fn cell(outcome: &Outcome) -> String {
    match outcome {
        Ok(d) => millis(*d),
        Err(f) => format!("✗ {}", f.short()),
    }
}

pub fn millis(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn socket_in(ns: &str, ty: Type, protocol: Protocol) -> Result<Socket, Failure> {
    netns::enter(ns, || Ok(Socket::new(Domain::IPV4, ty, Some(protocol))?))
        .map_err(|e| Failure::Other(format!("{e:#}")))
}

/// One ICMP echo from namespace `from` to `to`: the round trip, or the ICMP error that
/// came back instead.
pub fn ping(from: &str, to: Ipv4Addr) -> Outcome {
    // Raw sockets see every ICMP message of the namespace (other probes run in
    // parallel): answers are matched on the identifier.
    static NEXT_ID: AtomicU16 = AtomicU16::new(0);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed) ^ (std::process::id() as u16);
    let socket = socket_in(from, Type::RAW, Protocol::ICMPV4)?;
    let started = Instant::now();
    socket
        .send_to(&echo_request(id), &SocketAddrV4::new(to, 0).into())
        .map_err(Failure::from_io)?;
    let mut buf = [0u8; 1500];
    loop {
        let left = ICMP_TIMEOUT.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(Failure::Timeout);
        }
        socket
            .set_read_timeout(Some(left))
            .map_err(Failure::from_io)?;
        let n = (&socket).read(&mut buf).map_err(Failure::from_io)?;
        match answer(&buf[..n], to, id) {
            Some(Ok(())) => return Ok(started.elapsed()),
            Some(Err(why)) => return Err(Failure::Unreachable(why)),
            None => {}
        }
    }
}

fn echo_request(id: u16) -> Vec<u8> {
    let mut packet = vec![ICMP_ECHO_REQUEST, 0, 0, 0];
    packet.extend(id.to_be_bytes());
    packet.extend(1u16.to_be_bytes());
    packet.extend((0..56u8).map(|i| i.wrapping_mul(7)));
    let sum = checksum(&packet);
    packet[2..4].copy_from_slice(&sum.to_be_bytes());
    packet
}

/// The Internet checksum (RFC 1071).
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// What an IPv4 packet received on a raw ICMP socket says about our echo `id` to
/// `target`: `Some(Ok)` for the reply, `Some(Err)` for an ICMP error about it, `None`
/// for anything else.
fn answer(packet: &[u8], target: Ipv4Addr, id: u16) -> Option<Result<(), String>> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    let source = Ipv4Addr::from(<[u8; 4]>::try_from(packet.get(12..16)?).ok()?);
    let icmp = packet.get(ihl..)?;
    let id_at = |b: &[u8], at: usize| b.get(at..at + 2).map(|v| u16::from_be_bytes([v[0], v[1]]));
    match *icmp.first()? {
        ICMP_ECHO_REPLY if source == target && id_at(icmp, 4)? == id => Some(Ok(())),
        kind @ (ICMP_UNREACHABLE | ICMP_TIME_EXCEEDED) => {
            // The error quotes our request: its IPv4 header, then the ICMP header.
            let quoted = icmp.get(8..)?;
            let quoted_ihl = usize::from(quoted.first()? & 0x0f) * 4;
            let quoted_dst = Ipv4Addr::from(<[u8; 4]>::try_from(quoted.get(16..20)?).ok()?);
            if quoted_dst != target || id_at(quoted, quoted_ihl + 4)? != id {
                return None;
            }
            let what = match (kind, icmp[1]) {
                (ICMP_TIME_EXCEEDED, _) => "TTL exceeded".to_owned(),
                (_, 0) => "network unreachable".to_owned(),
                (_, 1) => "host unreachable".to_owned(),
                (_, 4) => "fragmentation needed".to_owned(),
                (_, code) => format!("destination unreachable (code {code})"),
            };
            Some(Err(format!("{what} (from {source})")))
        }
        _ => None,
    }
}

/// Connects from namespace `from` to an echo server at `to`, sends [`TCP_BYTES`], and
/// checks that they come back intact and that the server saw our own address (no
/// translation on the way). The time covers the handshake and both transfers.
pub fn tcp(from: &str, to: SocketAddrV4) -> Outcome {
    let socket = socket_in(from, Type::STREAM, Protocol::TCP)?;
    let started = Instant::now();
    socket
        .connect_timeout(&to.into(), TCP_TIMEOUT)
        .map_err(Failure::from_io)?;
    let mut stream = TcpStream::from(socket);
    stream
        .set_read_timeout(Some(TCP_TIMEOUT))
        .map_err(Failure::from_io)?;
    stream
        .set_write_timeout(Some(TCP_TIMEOUT))
        .map_err(Failure::from_io)?;
    let local = stream.local_addr().map_err(Failure::from_io)?.ip();
    let payload: Vec<u8> = (0..TCP_BYTES).map(|i| (i % 251) as u8).collect();
    stream.write_all(&payload).map_err(Failure::from_io)?;
    stream.shutdown(Shutdown::Write).map_err(Failure::from_io)?;
    let mut answer = Vec::with_capacity(TCP_BYTES + 16);
    stream.read_to_end(&mut answer).map_err(Failure::from_io)?;
    let elapsed = started.elapsed();
    let Some(newline) = answer.iter().position(|&b| b == b'\n') else {
        return Err(Failure::Mismatch(format!(
            "the server sent {} bytes and no peer address",
            answer.len()
        )));
    };
    let seen = String::from_utf8_lossy(&answer[..newline]);
    if seen != local.to_string() {
        return Err(Failure::Mismatch(format!(
            "the server saw {seen}, the client is {local}"
        )));
    }
    if answer[newline + 1..] != payload[..] {
        return Err(Failure::Mismatch(format!(
            "{} bytes echoed, not the {TCP_BYTES} sent",
            answer.len() - newline - 1
        )));
    }
    Ok(elapsed)
}

/// TCP echo servers, one per pod, each listening on its pod's address. Each answers
/// with the peer address it saw, a newline, and what it received.
pub struct EchoServers {
    listeners: Vec<(Ipv4Addr, TcpListener)>,
    acceptors: Vec<JoinHandle<()>>,
    stopping: Arc<AtomicBool>,
}

impl EchoServers {
    /// Starts the servers; dropping the result stops them.
    pub fn start(lab: &LabState, pods: &[Pod]) -> Result<Self> {
        let mut servers = Self {
            listeners: Vec::new(),
            acceptors: Vec::new(),
            stopping: Arc::default(),
        };
        for pod in pods {
            // Port 0: the kernel picks a free port, so concurrent checks never collide.
            let listener = netns::enter(&lab.netns(&pod.name), || {
                Ok(TcpListener::bind(SocketAddrV4::new(pod.address, 0))?)
            })?;
            let accepting = listener.try_clone()?;
            let stopping = servers.stopping.clone();
            servers.acceptors.push(thread::spawn(move || {
                for conn in accepting.incoming() {
                    match conn {
                        // Each connection ends by itself: the client closes, or the timeouts.
                        Ok(conn) => drop(thread::spawn(move || echo(conn))),
                        Err(_) if stopping.load(Ordering::SeqCst) => break,
                        Err(_) => {}
                    }
                }
            }));
            servers.listeners.push((pod.address, listener));
        }
        Ok(servers)
    }

    pub fn address(&self, pod: &Pod) -> Option<SocketAddrV4> {
        let (_, listener) = self.listeners.iter().find(|(a, _)| *a == pod.address)?;
        match listener.local_addr().ok()? {
            std::net::SocketAddr::V4(a) => Some(a),
            std::net::SocketAddr::V6(_) => None,
        }
    }
}

impl Drop for EchoServers {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Shutting a listening socket down wakes the thread blocked in accept().
        for (_, listener) in &self.listeners {
            let _ = SockRef::from(listener).shutdown(Shutdown::Both);
        }
        for acceptor in self.acceptors.drain(..) {
            let _ = acceptor.join();
        }
    }
}

fn echo(conn: TcpStream) {
    let serve = || -> io::Result<()> {
        conn.set_read_timeout(Some(TCP_TIMEOUT))?;
        conn.set_write_timeout(Some(TCP_TIMEOUT))?;
        let peer = match conn.peer_addr()?.ip() {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => a.to_string(),
        };
        let mut data = Vec::with_capacity(TCP_BYTES);
        (&conn).read_to_end(&mut data)?;
        (&conn).write_all(format!("{peer}\n").as_bytes())?;
        (&conn).write_all(&data)
    };
    // A failed exchange is the client's to report.
    let _ = serve();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0];
        p.extend(src);
        p.extend(dst);
        p.extend(payload);
        p
    }

    #[test]
    fn echo_request_checksums_to_zero() {
        let req = echo_request(0x1234);
        assert_eq!(checksum(&req), 0);
        assert_eq!(&req[4..6], &[0x12, 0x34]);
    }

    #[test]
    fn answers_are_matched_on_source_and_id() {
        let target = Ipv4Addr::new(10, 244, 3, 2);
        let mut reply = echo_request(7);
        reply[0] = ICMP_ECHO_REPLY;
        assert_eq!(
            answer(&ipv4(target.octets(), [10, 244, 0, 2], &reply), target, 7),
            Some(Ok(()))
        );
        assert_eq!(
            answer(&ipv4(target.octets(), [10, 244, 0, 2], &reply), target, 8),
            None
        );
        assert_eq!(
            answer(&ipv4([10, 244, 3, 3], [10, 244, 0, 2], &reply), target, 7),
            None
        );
        // Someone else's request arriving at this namespace is not an answer.
        assert_eq!(
            answer(
                &ipv4(target.octets(), [10, 244, 0, 2], &echo_request(7)),
                target,
                7
            ),
            None
        );

        let quoted = ipv4([10, 244, 0, 2], target.octets(), &echo_request(7)[..8]);
        let mut error = vec![ICMP_UNREACHABLE, 0, 0, 0, 0, 0, 0, 0];
        error.extend(&quoted);
        let got = answer(&ipv4([172, 18, 0, 1], [10, 244, 0, 2], &error), target, 7);
        assert_eq!(
            got,
            Some(Err("network unreachable (from 172.18.0.1)".into()))
        );
        assert_eq!(
            answer(&ipv4([172, 18, 0, 1], [10, 244, 0, 2], &error), target, 9),
            None
        );
        assert_eq!(
            answer(&[0x45, 0, 0], target, 7),
            None,
            "truncated packets are ignored"
        );
    }
}
