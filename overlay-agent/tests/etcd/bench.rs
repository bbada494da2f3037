//! Figures, not a timed test: 1,000 leases in a real etcd, written as flanneld writes
//! them (each its own etcd lease of 24 h, flannel's LeaseAttrs JSON), read by the
//! etcd source alone and by the real agent binary run in the etcd's network namespace
//! with `--etcd-endpoints`. Prints
//!
//! - the time from the source's start to its first complete node set (in process),
//!   and from the agent's source start ("datapath loaded", just before the source
//!   runs) to maps and routes converged with all 1,000 peers;
//! - the agent's RSS with the 1,000 peers against its RSS with none (an empty prefix
//!   of the same etcd): the growth is what the leases cost;
//! - the time from the `put` of a new lease to its appearance, 100 times, median and
//!   p90: in the source's published node set (in process), and in the agent's maps
//!   and routes (its "converged" log line with one more remote subnet).
//!
//! Needs root; run with
//!
//!     CARGO_TARGET_DIR=target cargo test --release -p overlay-agent --test etcd \
//!         -- --ignored --nocapture bench
//!
//! `OVERLAY_BENCH_LOG=1` shows the agent's log.

use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use etcd_client::{Client, PutOptions};
use futures::future::join_all;
use ipnet::Ipv4Net;
use overlay_agent::nodes::etcd::{EtcdSource, LEASE_TTL, LeaseAttrs};
use serde_json::Value;

use super::{
    server::Etcd,
    source::{Node, PREFIX, address, configure, key},
};

const AGENT: &str = env!("CARGO_BIN_EXE_overlay-agent");
const LEASES: u32 = 1000;
const PUTS: u32 = 100;
/// The agent's address on its uplink; the peers' follow it.
const AGENT_ADDRESS: u32 = u32::from_be_bytes([172, 20, 0, 1]);
/// A prefix with the network configuration and no lease: the agent's baseline.
const EMPTY_PREFIX: &str = "/bench/empty";
const NETWORK: &str = r#"{"Network": "10.0.0.0/8", "Backend": {"Type": "ipip"}}"#;

#[test]
#[ignore = "benchmark: needs root, takes a minute, prints figures"]
fn bench_1000_leases() {
    let etcd = Etcd::start();
    etcd.run(|| run(&etcd));
}

/// Peer `i`'s subnet, from 10.1.0.0/24 on: clear of the 10.0.x.0/24 that the agent
/// and the in-process source pick among.
fn subnet(i: u32) -> Ipv4Net {
    Ipv4Net::new(
        Ipv4Addr::from(u32::from_be_bytes([10, 1, 0, 0]) + (i << 8)),
        24,
    )
    .unwrap()
}

/// Writes peer `i`'s lease as flanneld does: on an etcd lease of its own. Returns
/// when the put was sent (after the grant).
async fn put_lease(mut client: Client, i: u32) -> Instant {
    let attrs = LeaseAttrs::ipip(Ipv4Addr::from(AGENT_ADDRESS + 1 + i));
    let grant = client
        .lease_grant(LEASE_TTL.as_secs() as i64, None)
        .await
        .unwrap();
    let sent = Instant::now();
    client
        .put(
            key(subnet(i)),
            serde_json::to_string(&attrs).unwrap(),
            Some(PutOptions::new().with_lease(grant.id())),
        )
        .await
        .unwrap();
    sent
}

fn ip(args: &str) {
    let status = Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .unwrap();
    assert!(status.success(), "ip {args}");
}

/// Median and 90th percentile, in ms.
fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (ms(at(0.5)), ms(at(0.9)))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn run(etcd: &Etcd) {
    ip("link add ovb0 type veth peer name ovb1");
    ip(&format!(
        "addr add {}/16 dev ovb0",
        Ipv4Addr::from(AGENT_ADDRESS)
    ));
    ip("link set ovb0 up");
    ip("link set ovb1 up");
    let mut client = etcd.client().await;
    configure(&mut client, NETWORK).await;
    client
        .put(format!("{EMPTY_PREFIX}/config"), NETWORK, None)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();

    // The agent without peers.
    let mut agent = Agent::spawn(dir.path(), "empty", EMPTY_PREFIX);
    agent.wait_for("subnet.env", |l| l.message() == "subnet.env written");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_empty = agent.rss_kib();
    drop(agent);

    let written = Instant::now();
    for chunk in (0..LEASES).collect::<Vec<_>>().chunks(100) {
        join_all(chunk.iter().map(|&i| put_lease(client.clone(), i))).await;
    }
    println!("{LEASES} leases written in {:.0} ms", ms(written.elapsed()));

    // The source alone: start to its first complete set, then new leases.
    let opts = etcd.options();
    let started = Instant::now();
    let source = EtcdSource::open(&opts, "bench", address("172.20.200.1"))
        .await
        .unwrap();
    let node = Node::run(source, "bench");
    node.within(Duration::from_secs(60), "every lease", |n| {
        n.subnets().len() == LEASES as usize + 1
    })
    .await;
    let source_first = started.elapsed();
    let mut source_puts = Vec::new();
    let mut sets = node.rx.clone();
    for i in LEASES..LEASES + PUTS {
        let put = put_lease(client.clone(), i).await;
        // Woken by each publication, not polled: the time is the publication's.
        let published = async {
            while !sets
                .borrow_and_update()
                .as_ref()
                .is_some_and(|s| s.nodes.iter().any(|n| n.pod_cidr == subnet(i)))
            {
                sets.changed().await.unwrap();
            }
            Instant::now()
        };
        let seen = tokio::time::timeout(Duration::from_secs(10), published)
            .await
            .expect("the new lease published");
        source_puts.push(seen - put);
    }
    let own = node.subnet().unwrap();
    node.stop();
    for i in LEASES..LEASES + PUTS {
        client.delete(key(subnet(i)), None).await.unwrap();
    }
    client.delete(key(own), None).await.unwrap();

    // The agent: start to maps and routes with every peer, then new leases.
    let mut agent = Agent::spawn(dir.path(), "full", PREFIX);
    let spawned = Instant::now();
    let loaded = agent.wait_for("the datapath", |l| l.message() == "datapath loaded");
    let converged = agent.wait_for("every peer", |l| l.converged() == Some(LEASES));
    let rss_full = agent.rss_kib();
    let routes = overlay_routes();
    assert_eq!(routes, LEASES as usize, "overlay routes installed");
    let inspected = agent.inspect_nodes(dir.path());
    assert_eq!(inspected, LEASES as usize, "ROUTES entries");
    let (mut agent_puts, mut passes) = (Vec::new(), Vec::new());
    for (n, i) in (LEASES..LEASES + PUTS).enumerate() {
        let put = put_lease(client.clone(), i).await;
        let seen = agent.wait_for("the new lease", |l| {
            l.converged() == Some(LEASES + 1 + n as u32)
        });
        agent_puts.push(seen.at - put);
        passes.push(Duration::from_millis(
            seen.json["fields"]["took_ms"].as_u64().unwrap(),
        ));
    }
    let rss_after = agent.rss_kib();
    drop(agent);

    let (source_median, source_p90) = percentiles(source_puts);
    let (agent_median, agent_p90) = percentiles(agent_puts);
    let (pass_median, pass_p90) = percentiles(passes);
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!("leases in etcd                                {LEASES}");
    println!(
        "source start -> complete node set (in process) {:>7.0} ms",
        ms(source_first)
    );
    println!(
        "agent start -> datapath loaded                 {:>7.0} ms",
        ms(loaded.at - spawned)
    );
    println!(
        "agent source start -> maps and routes          {:>7.0} ms  ({routes} routes, {inspected} ROUTES entries)",
        ms(converged.at - loaded.at)
    );
    println!(
        "agent RSS: no peers {:.1} MiB, {LEASES} peers {:.1} MiB (growth {:.1} MiB), after {PUTS} more {:.1} MiB",
        mib(rss_empty),
        mib(rss_full),
        mib(rss_full) - mib(rss_empty),
        mib(rss_after)
    );
    println!(
        "put -> source's node set, {PUTS} puts            median {source_median:.1} ms, p90 {source_p90:.1} ms"
    );
    println!(
        "put -> agent's maps and routes, {PUTS} puts      median {agent_median:.1} ms, p90 {agent_p90:.1} ms"
    );
    println!(
        "  of which the reconcile pass                   median {pass_median:.1} ms, p90 {pass_p90:.1} ms"
    );
}

fn overlay_routes() -> usize {
    let out = Command::new("ip")
        .args(["route", "show", "proto", "191"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().lines().count()
}

/// One JSON log line of the agent, with when it arrived.
struct Line {
    at: Instant,
    json: Value,
}

impl Line {
    fn message(&self) -> &str {
        self.json["fields"]["message"].as_str().unwrap_or("")
    }

    /// The remote subnets of a "converged" line.
    fn converged(&self) -> Option<u32> {
        (self.message() == "converged")
            .then(|| self.json["fields"]["remote_subnets"].as_u64())
            .flatten()
            .map(|n| n as u32)
    }
}

/// The agent binary in this thread's network namespace and a mount namespace of its
/// own (its bpffs mount stays there); stopped on drop.
struct Agent {
    child: Child,
    lines: mpsc::Receiver<Line>,
}

impl Agent {
    /// Runs node `name` (its bpffs and subnet.env under `dir/name`) on `prefix`.
    fn spawn(dir: &Path, name: &str, prefix: &str) -> Self {
        let own = dir.join(name);
        std::fs::create_dir_all(&own).unwrap();
        let mut command = Command::new(AGENT);
        command
            .args(["--log-format", "json", "run", "--node-name", name])
            .args(["--etcd-endpoints", "http://127.0.0.1:2379"])
            .args(["--etcd-prefix", prefix])
            .args(["--iface", "ovb0", "--bridge", "ovbr0", "--http-addr", "off"])
            .arg("--subnet-file")
            .arg(own.join("subnet.env"))
            .arg("--bpffs")
            .arg(own.join("bpffs"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: async-signal-safe syscalls only, between fork and exec.
        unsafe {
            command.pre_exec(|| {
                if libc::unshare(libc::CLONE_NEWNS) != 0
                    || libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let echo = std::env::var_os("OVERLAY_BENCH_LOG").is_some();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if echo {
                    eprintln!("agent: {line}");
                }
                let at = Instant::now();
                let json = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if tx.send(Line { at, json }).is_err() {
                    return;
                }
            }
        });
        Self { child, lines }
    }

    fn wait_for(&mut self, what: &str, pred: impl Fn(&Line) -> bool) -> Line {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return line,
                Ok(line) if line.json["level"] == "ERROR" => panic!("agent: {}", line.json),
                Ok(_) => {}
                Err(e) => panic!("waiting for {what}: {e}"),
            }
        }
    }

    /// VmRSS, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// The remote entries `overlay-agent nodes` reads from the pinned maps.
    fn inspect_nodes(&self, dir: &Path) -> usize {
        let out = Command::new("nsenter")
            .args(["--target", &self.child.id().to_string(), "--mount", "--"])
            .args([AGENT, "nodes", "--bpffs"])
            .arg(dir.join("full").join("bpffs"))
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.starts_with("this node: tunnel address 172.20.0.1"),
            "{text}"
        );
        // A header line for this node and one for the table.
        text.lines().count() - 2
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}
