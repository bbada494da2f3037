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
    net::Ipv4Addr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use etcd_client::{Client, PutOptions};
use futures::future::join_all;
use ipnet::Ipv4Net;
use overlay_agent::nodes::etcd::{EtcdSource, LEASE_TTL, LeaseAttrs};

use super::{
    server::Etcd,
    source::{Node, PREFIX, address, configure, key},
};
use crate::agent::{AGENT, Agent, ip, overlay_routes, proc_kib};

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
    let mut agent = spawn(dir.path(), "empty", EMPTY_PREFIX);
    agent.wait_for("subnet.env", |l| l.message() == "subnet.env written");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_empty = rss_kib(&agent);
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
    let mut agent = spawn(dir.path(), "full", PREFIX);
    let spawned = Instant::now();
    let loaded = agent.wait_for("the datapath", |l| l.message() == "datapath loaded");
    let converged = agent.wait_for("every peer", |l| l.converged() == Some(LEASES.into()));
    let rss_full = rss_kib(&agent);
    let routes = overlay_routes();
    assert_eq!(routes, LEASES as usize, "overlay routes installed");
    let inspected = inspect_nodes(&agent, dir.path());
    assert_eq!(inspected, LEASES as usize, "ROUTES entries");
    let (mut agent_puts, mut passes) = (Vec::new(), Vec::new());
    for (n, i) in (LEASES..LEASES + PUTS).enumerate() {
        let put = put_lease(client.clone(), i).await;
        let seen = agent.wait_for("the new lease", |l| {
            l.converged() == Some(u64::from(LEASES) + 1 + n as u64)
        });
        agent_puts.push(seen.at - put);
        passes.push(Duration::from_millis(
            seen.json["fields"]["took_ms"].as_u64().unwrap(),
        ));
    }
    let rss_after = rss_kib(&agent);
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

/// The agent of node `name` (its bpffs and subnet.env under `dir/name`) on `prefix`.
fn spawn(dir: &Path, name: &str, prefix: &str) -> Agent {
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
        .arg(own.join("bpffs"));
    Agent::spawn(command)
}

/// VmRSS, in KiB.
fn rss_kib(agent: &Agent) -> u64 {
    proc_kib(&format!("/proc/{}/status", agent.pid()), "VmRSS:")
}

/// The remote entries `overlay-agent nodes` reads from the pinned maps.
fn inspect_nodes(agent: &Agent, dir: &Path) -> usize {
    let out = Command::new("nsenter")
        .args(["--target", &agent.pid().to_string(), "--mount", "--"])
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
