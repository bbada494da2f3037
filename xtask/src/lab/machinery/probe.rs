//! One probe: an ICMP echo, a TCP connection that carries bytes both ways, or a UDP
//! exchange, from a socket opened inside the source namespace and then used from here.
//! The servers answer with the source address they saw (see `servers`).

use std::{
    fmt,
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpStream},
    sync::atomic::{AtomicU16, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};

use super::{interrupt, netns};

/// Bytes sent each way per TCP probe: enough for full-size segments and several
/// round trips of the window, so a wrong MTU or a broken checksum shows.
pub(crate) const TCP_BYTES: usize = 64 * 1024;
const ICMP_TIMEOUT: Duration = Duration::from_secs(1);
const TCP_TIMEOUT: Duration = Duration::from_secs(2);
const UDP_TIMEOUT: Duration = Duration::from_millis(700);
const UDP_TRIES: usize = 2;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_UNREACHABLE: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;

/// Why a probe failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    Timeout,
    /// An ICMP error came back, or the local stack had no route.
    Unreachable(String),
    Refused,
    /// The exchange completed but not as sent (corruption, address translation).
    Mismatch(String),
    Other(String),
}

impl Failure {
    pub(crate) fn from_io(e: io::Error) -> Self {
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
    pub(crate) fn short(&self) -> &'static str {
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
pub(crate) type Outcome = Result<Duration, Failure>;

/// A table cell: milliseconds, or a cross and the reason.
pub(crate) fn cell(outcome: &Outcome) -> String {
    match outcome {
        Ok(d) => millis(*d),
        Err(f) => format!("✗ {}", f.short()),
    }
}

pub(crate) fn millis(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// Where a probe starts: a namespace and, for the masquerade checks, a source address
/// to bind (a node's own address: rule 6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Client {
    pub ns: String,
    pub bind: Option<Ipv4Addr>,
}

impl Client {
    pub(crate) fn new(ns: String) -> Self {
        Self { ns, bind: None }
    }

    pub(crate) fn bound(mut self, address: Ipv4Addr) -> Self {
        self.bind = Some(address);
        self
    }

    fn socket(&self, ty: Type, protocol: Protocol) -> Result<Socket, Failure> {
        let socket = netns::enter(&self.ns, || {
            Ok(Socket::new(Domain::IPV4, ty, Some(protocol))?)
        })
        .map_err(|e| Failure::Other(format!("{e:#}")))?;
        if let Some(address) = self.bind {
            socket
                .bind(&SocketAddrV4::new(address, 0).into())
                .map_err(Failure::from_io)?;
        }
        Ok(socket)
    }

    /// The source address the kernel picks for this client's packets to `to`: a UDP
    /// socket's, connected without sending anything (same route and bind).
    fn source_for(&self, to: Ipv4Addr) -> Result<Ipv4Addr, Failure> {
        let socket = self.socket(Type::DGRAM, Protocol::UDP)?;
        socket
            .connect(&SocketAddrV4::new(to, 9).into())
            .map_err(Failure::from_io)?;
        Ok(*local_address(&socket)?.ip())
    }
}

/// The protocols a probe speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Proto {
    Icmp,
    Tcp,
    Udp,
}

impl Proto {
    pub(crate) const ALL: [Proto; 3] = [Proto::Icmp, Proto::Tcp, Proto::Udp];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Proto::Icmp => "ICMP",
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }
}

/// A completed exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Exchange {
    pub time: Duration,
    /// The source address and port the client's socket used (for ICMP, the echo
    /// identifier, which masquerade translates like a port).
    pub local: SocketAddrV4,
    /// The destination (for ICMP, with port zero: how echo flows are keyed).
    pub remote: SocketAddrV4,
    /// The source address the destination saw (None: not recorded).
    pub seen: Option<Ipv4Addr>,
}

impl Exchange {
    /// The round trip, if the destination saw `expected` (the client's own address
    /// when None): anything else is a translation nobody asked for.
    pub(crate) fn seen_as(self, expected: Option<Ipv4Addr>) -> Outcome {
        let expected = expected.unwrap_or(*self.local.ip());
        match self.seen {
            Some(seen) if seen == expected => Ok(self.time),
            Some(seen) => Err(Failure::Mismatch(format!(
                "the destination saw {seen}, expected {expected}"
            ))),
            None => Err(Failure::Other(
                "the destination did not record the source".into(),
            )),
        }
    }
}

fn local_address(socket: &Socket) -> Result<SocketAddrV4, Failure> {
    match socket.local_addr().map_err(Failure::from_io)?.as_socket() {
        Some(std::net::SocketAddr::V4(a)) => Ok(a),
        other => Err(Failure::Other(format!("no IPv4 source address: {other:?}"))),
    }
}

/// A fresh number, unique in this process, to tell exchanges apart.
pub(crate) fn token() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// One ICMP echo from `client` to `to` carrying `token`: the round trip, or the ICMP
/// error that came back instead. What the destination saw is for its recorder to say.
pub(crate) fn ping(client: &Client, to: Ipv4Addr, token: u64) -> Result<Exchange, Failure> {
    ping_sized(client, to, token, ECHO_PADDING)
}

/// [`ping`] with `padding` bytes after the token (more than the path's MTU makes the
/// sender fragment the request).
pub(crate) fn ping_sized(
    client: &Client,
    to: Ipv4Addr,
    token: u64,
    padding: usize,
) -> Result<Exchange, Failure> {
    // Raw sockets see every ICMP message of the namespace (other probes run in
    // parallel): answers are matched on the identifier.
    static NEXT_ID: AtomicU16 = AtomicU16::new(0);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed) ^ (std::process::id() as u16);
    let local = SocketAddrV4::new(client.source_for(to)?, id);
    let socket = client.socket(Type::RAW, Protocol::ICMPV4)?;
    let started = Instant::now();
    socket
        .send_to(
            &echo_request(id, token, padding),
            &SocketAddrV4::new(to, 0).into(),
        )
        .map_err(Failure::from_io)?;
    // Room for a reassembled reply of any size.
    let mut buf = vec![0u8; 65536];
    loop {
        let left = interrupt::scaled(ICMP_TIMEOUT).saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(Failure::Timeout);
        }
        socket
            .set_read_timeout(Some(left))
            .map_err(Failure::from_io)?;
        let n = (&socket).read(&mut buf).map_err(Failure::from_io)?;
        match answer(&buf[..n], to, id) {
            Some(Ok(())) => {
                return Ok(Exchange {
                    time: started.elapsed(),
                    local,
                    remote: SocketAddrV4::new(to, 0),
                    seen: None,
                });
            }
            Some(Err(why)) => return Err(Failure::Unreachable(why)),
            None => {}
        }
    }
}

/// What an echo request of ours carries after the ICMP header: this marker, then the
/// token.
const ECHO_MARKER: &[u8; 8] = b"olab-tok";
const ECHO_PADDING: usize = 40;

fn echo_request(id: u16, token: u64, padding: usize) -> Vec<u8> {
    let mut packet = vec![ICMP_ECHO_REQUEST, 0, 0, 0];
    packet.extend(id.to_be_bytes());
    packet.extend(1u16.to_be_bytes());
    packet.extend(ECHO_MARKER);
    packet.extend(token.to_be_bytes());
    packet.extend((0..padding).map(|i| (i as u8).wrapping_mul(7)));
    let sum = checksum(&packet);
    packet[2..4].copy_from_slice(&sum.to_be_bytes());
    packet
}

/// The source and token of one of our echo requests (an IPv4 packet as a raw socket
/// reads it); None for anything else.
pub(crate) fn echo_request_token(packet: &[u8]) -> Option<(Ipv4Addr, u64)> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    let source = Ipv4Addr::from(<[u8; 4]>::try_from(packet.get(12..16)?).ok()?);
    let icmp = packet.get(ihl..)?;
    if *icmp.first()? != ICMP_ECHO_REQUEST || icmp.get(8..16)? != ECHO_MARKER {
        return None;
    }
    let token = u64::from_be_bytes(icmp.get(16..24)?.try_into().ok()?);
    Some((source, token))
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
                (_, 3) => "port unreachable".to_owned(),
                (_, 4) => "fragmentation needed".to_owned(),
                (_, code) => format!("destination unreachable (code {code})"),
            };
            Some(Err(format!("{what} (from {source})")))
        }
        _ => None,
    }
}

/// The server's answer to `sent`: the address it saw, a newline, and `sent` again.
fn read_answer(answer: &[u8], sent: &[u8]) -> Result<Ipv4Addr, Failure> {
    let Some(newline) = answer.iter().position(|&b| b == b'\n') else {
        return Err(Failure::Mismatch(format!(
            "the server sent {} bytes and no peer address",
            answer.len()
        )));
    };
    let seen = String::from_utf8_lossy(&answer[..newline]);
    let seen = seen
        .parse()
        .map_err(|_| Failure::Mismatch(format!("the server answered {seen:?}, not an address")))?;
    if answer[newline + 1..] != *sent {
        return Err(Failure::Mismatch(format!(
            "{} bytes echoed, not the {} sent",
            answer.len() - newline - 1,
            sent.len()
        )));
    }
    Ok(seen)
}

/// Connects from `client` to an echo server at `to`, sends [`TCP_BYTES`], and checks
/// that they come back intact. The time covers the handshake and both transfers.
pub(crate) fn tcp(client: &Client, to: SocketAddrV4) -> Result<Exchange, Failure> {
    tcp_sized(client, to, TCP_BYTES)
}

/// A connection from `client` to `to`, with the probes' timeouts, and its local end.
fn connect(client: &Client, to: SocketAddrV4) -> Result<(TcpStream, SocketAddrV4), Failure> {
    let socket = client.socket(Type::STREAM, Protocol::TCP)?;
    socket
        .connect_timeout(&to.into(), interrupt::scaled(TCP_TIMEOUT))
        .map_err(Failure::from_io)?;
    let local = local_address(&socket)?;
    let stream = TcpStream::from(socket);
    stream
        .set_read_timeout(Some(interrupt::scaled(TCP_TIMEOUT)))
        .map_err(Failure::from_io)?;
    stream
        .set_write_timeout(Some(interrupt::scaled(TCP_TIMEOUT)))
        .map_err(Failure::from_io)?;
    Ok((stream, local))
}

/// [`tcp`] with `len` bytes each way.
pub(crate) fn tcp_sized(
    client: &Client,
    to: SocketAddrV4,
    len: usize,
) -> Result<Exchange, Failure> {
    let started = Instant::now();
    let (mut stream, local) = connect(client, to)?;
    let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    stream.write_all(&payload).map_err(Failure::from_io)?;
    stream.shutdown(Shutdown::Write).map_err(Failure::from_io)?;
    let mut answer = Vec::with_capacity(len + 16);
    stream.read_to_end(&mut answer).map_err(Failure::from_io)?;
    let time = started.elapsed();
    let seen = read_answer(&answer, &payload)?;
    Ok(Exchange {
        time,
        local,
        remote: to,
        seen: Some(seen),
    })
}

/// A TCP connection held open to an echo server (which sends the address it saw, then
/// echoes what comes): messages go back and forth over time, as a long-lived flow's.
pub(crate) struct Session {
    stream: TcpStream,
    /// The connection's own end.
    pub local: SocketAddrV4,
    /// The source address the server saw.
    pub seen: Ipv4Addr,
    sent: u64,
}

impl Session {
    pub(crate) fn open(client: &Client, to: SocketAddrV4) -> Result<Self, Failure> {
        let (mut stream, local) = connect(client, to)?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            stream.read_exact(&mut byte).map_err(Failure::from_io)?;
            line.push(byte[0]);
        }
        let seen = read_answer(&line, &[])?;
        Ok(Self {
            stream,
            local,
            seen,
            sent: 0,
        })
    }

    /// One message there and back (each a new one, so that a stale echo shows).
    pub(crate) fn exchange(&mut self) -> Result<(), Failure> {
        self.sent += 1;
        let message = format!("olab message {:08}\n", self.sent).into_bytes();
        self.stream.write_all(&message).map_err(Failure::from_io)?;
        let mut back = vec![0u8; message.len()];
        self.stream
            .read_exact(&mut back)
            .map_err(Failure::from_io)?;
        if back != message {
            return Err(Failure::Mismatch(format!(
                "echoed {:?}, not {:?}",
                String::from_utf8_lossy(&back),
                String::from_utf8_lossy(&message)
            )));
        }
        Ok(())
    }
}

/// Sends one datagram with a unique payload from `client` to a UDP echo server at `to`
/// and waits for its answer, asking again after each [`UDP_TIMEOUT`] (a datagram may
/// be lost; a broken path stays broken).
pub(crate) fn udp(client: &Client, to: SocketAddrV4) -> Result<Exchange, Failure> {
    udp_sized(client, to, 0)
}

/// [`udp`] with a datagram of at least `len` bytes (more than the path's MTU makes the
/// sender fragment it).
pub(crate) fn udp_sized(
    client: &Client,
    to: SocketAddrV4,
    len: usize,
) -> Result<Exchange, Failure> {
    let socket = client.socket(Type::DGRAM, Protocol::UDP)?;
    // Connected: the kernel only hands us datagrams from `to`, and ICMP errors as errors.
    socket.connect(&to.into()).map_err(Failure::from_io)?;
    let local = local_address(&socket)?;
    let mut payload = format!("olab udp {}", token()).into_bytes();
    payload.extend((payload.len()..len).map(|i| (i % 251) as u8));
    socket
        .set_read_timeout(Some(interrupt::scaled(UDP_TIMEOUT)))
        .map_err(Failure::from_io)?;
    let started = Instant::now();
    let mut buf = vec![0u8; 65536];
    for _ in 0..UDP_TRIES {
        socket.send(&payload).map_err(Failure::from_io)?;
        match (&socket).read(&mut buf) {
            Ok(n) => {
                let seen = read_answer(&buf[..n], &payload)?;
                return Ok(Exchange {
                    time: started.elapsed(),
                    local,
                    remote: to,
                    seen: Some(seen),
                });
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(Failure::from_io(e)),
        }
    }
    Err(Failure::Timeout)
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
        let req = echo_request(0x1234, 99, ECHO_PADDING);
        assert_eq!(checksum(&req), 0);
        assert_eq!(&req[4..6], &[0x12, 0x34]);
    }

    #[test]
    fn recorders_read_the_token_of_our_requests_only() {
        let request = ipv4(
            [172, 18, 0, 3],
            [10, 244, 2, 2],
            &echo_request(5, 0xfeed, ECHO_PADDING),
        );
        assert_eq!(
            echo_request_token(&request),
            Some((Ipv4Addr::new(172, 18, 0, 3), 0xfeed))
        );
        let mut reply = echo_request(5, 0xfeed, ECHO_PADDING);
        reply[0] = ICMP_ECHO_REPLY;
        assert_eq!(echo_request_token(&ipv4([1; 4], [2; 4], &reply)), None);
        // Someone else's ping (no marker) is not ours.
        let mut foreign = echo_request(5, 0xfeed, ECHO_PADDING);
        foreign[8] ^= 0xff;
        assert_eq!(echo_request_token(&ipv4([1; 4], [2; 4], &foreign)), None);
        assert_eq!(echo_request_token(&request[..30]), None);
    }

    #[test]
    fn answers_carry_the_seen_address_and_the_bytes_sent() {
        assert_eq!(
            read_answer(b"172.18.0.3\nabc", b"abc"),
            Ok(Ipv4Addr::new(172, 18, 0, 3))
        );
        assert!(matches!(
            read_answer(b"172.18.0.3\nabd", b"abc"),
            Err(Failure::Mismatch(_))
        ));
        assert!(matches!(
            read_answer(b"abc", b"abc"),
            Err(Failure::Mismatch(_))
        ));
        assert!(matches!(
            read_answer(b"nonsense\nabc", b"abc"),
            Err(Failure::Mismatch(_))
        ));
    }

    #[test]
    fn exchanges_are_judged_on_the_seen_address() {
        let exchange = Exchange {
            time: Duration::from_millis(1),
            local: SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 2), 40000),
            remote: SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), 7),
            seen: Some(Ipv4Addr::new(172, 18, 0, 3)),
        };
        assert!(exchange.seen_as(Some(Ipv4Addr::new(172, 18, 0, 3))).is_ok());
        assert!(matches!(exchange.seen_as(None), Err(Failure::Mismatch(_))));
        let untranslated = Exchange {
            seen: Some(*exchange.local.ip()),
            ..exchange
        };
        assert!(untranslated.seen_as(None).is_ok());
        let unrecorded = Exchange {
            seen: None,
            ..exchange
        };
        assert!(unrecorded.seen_as(None).is_err());
    }

    #[test]
    fn answers_are_matched_on_source_and_id() {
        let target = Ipv4Addr::new(10, 244, 3, 2);
        let mut reply = echo_request(7, 1, ECHO_PADDING);
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
                &ipv4(
                    target.octets(),
                    [10, 244, 0, 2],
                    &echo_request(7, 1, ECHO_PADDING)
                ),
                target,
                7
            ),
            None
        );

        let quoted = ipv4(
            [10, 244, 0, 2],
            target.octets(),
            &echo_request(7, 1, ECHO_PADDING)[..8],
        );
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
