//! Figures, not a timed test: the real agent binary against the fake API serving
//! 5,000 kind-sized Nodes (6 KB of JSON each), in a network namespace of its own.
//! Prints the time from the node source's start to maps and routes converged, the
//! agent's RSS, and its CPU use while idle. Needs root; run with
//!
//!     CARGO_TARGET_DIR=/work/target-kube cargo test --release -p overlay-agent \
//!         --test kube_api -- --ignored --nocapture bench
//!
//! `OVERLAY_BENCH_NODES` (default 5000) and `OVERLAY_BENCH_IDLE_SECONDS` (30) change
//! the size and the idle window; `OVERLAY_BENCH_LOG=1` shows the agent's log.
//!
//! The namespace is anonymous (`unshare(CLONE_NEWNET)` on the bench's own thread, which
//! the fake server's threads and the agent inherit): it has only loopback and one veth
//! pair, and disappears with the thread. The agent also gets a mount namespace of its
//! own, so its bpffs mount never shows outside.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use super::{fake::FakeApi, nodes};
use crate::agent::{AGENT, Agent, ip, overlay_routes, proc_kib};

pub(super) const UPLINK: &str = "ovb0";
const SELF_ADDRESS: u32 = u32::from_be_bytes([172, 20, 0, 1]);

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
#[ignore = "benchmark: needs root, takes a minute, prints figures"]
fn bench_5000_nodes() {
    let nodes = env_or("OVERLAY_BENCH_NODES", 5000) as u32;
    let idle = Duration::from_secs(env_or("OVERLAY_BENCH_IDLE_SECONDS", 30));
    std::thread::spawn(move || {
        // SAFETY: unshare(2) takes no pointer; CLONE_NEWNET moves only this thread.
        let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(unshared, 0, "unshare(CLONE_NEWNET) needs root");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run(nodes, idle));
    })
    .join()
    .unwrap();
}

pub(super) fn address(i: u32) -> String {
    std::net::Ipv4Addr::from(SELF_ADDRESS + i).to_string()
}

pub(super) fn name(i: u32) -> String {
    format!("node-{i:05}")
}

/// The agent as node 0, with `extra` arguments.
pub(super) fn spawn_agent(dir: &Path, url: &str, extra: &[&str]) -> Agent {
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\nusers:\n- name: agent\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: agent\ncurrent-context: fake\n"
        ),
    )
    .unwrap();
    let net_conf = dir.join("net-conf.json");
    std::fs::write(
        &net_conf,
        r#"{"Network": "10.0.0.0/8", "Backend": {"Type": "ipip"}}"#,
    )
    .unwrap();
    let mut command = Command::new(AGENT);
    command
        .args(["--log-format", "json", "run", "--kube-subnet-mgr"])
        .args([
            "--node-name",
            &name(0),
            "--iface",
            UPLINK,
            "--bridge",
            "ovbr0",
        ])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--net-conf")
        .arg(&net_conf)
        .arg("--subnet-file")
        .arg(dir.join("subnet.env"))
        .arg("--bpffs")
        .arg(dir.join("bpffs"))
        .args(extra);
    Agent::spawn(command)
}

/// The agent's memory, in KiB.
struct Memory {
    rss: u64,
    peak: u64,
    /// Heap and other anonymous memory; the rest of RSS is mapped files (the binary).
    anonymous: u64,
}

fn memory(pid: u32) -> Memory {
    let status = format!("/proc/{pid}/status");
    Memory {
        rss: proc_kib(&status, "VmRSS:"),
        peak: proc_kib(&status, "VmHWM:"),
        anonymous: proc_kib(&format!("/proc/{pid}/smaps_rollup"), "Anonymous:"),
    }
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>8.1} MiB (anonymous {:.1}, files {:.1}; peak {:.1})",
            mib(self.rss),
            mib(self.anonymous),
            mib(self.rss - self.anonymous),
            mib(self.peak)
        )
    }
}

/// User plus system CPU time of the process, all threads.
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<u64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    let ticks = fields[11] + fields[12];
    // SAFETY: sysconf(3) takes no pointer and only reads a system setting.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_secs_f64(ticks as f64 / hz as f64)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// This thread's namespace as node 0's: loopback, and the uplink with its address.
pub(super) fn plumb() {
    ip("link set lo up");
    ip(&format!("link add {UPLINK} type veth peer name ovb1"));
    ip(&format!("addr add {}/16 dev {UPLINK}", address(0)));
    ip(&format!("link set {UPLINK} up"));
    ip("link set ovb1 up");
}

async fn run(count: u32, idle: Duration) {
    plumb();

    let api = FakeApi::start().await;
    let mut bytes = 0;
    for i in 0..count {
        let cidr = format!("10.{}.{}.0/24", i >> 8, i & 0xff);
        let node = if i == 0 {
            // Ours, not annotated yet: the agent publishes it.
            nodes::bare_node(&name(i), &cidr, &address(i))
        } else {
            nodes::flannel_node(&name(i), &cidr, &address(i), &address(i))
        };
        bytes += node.to_string().len();
        api.apply(node);
    }
    println!(
        "fake API: {count} Nodes, {:.1} MiB of JSON ({} bytes a node)",
        bytes as f64 / 1048576.0,
        bytes / count as usize
    );

    let dir = tempfile::tempdir().unwrap();
    let spawned = Instant::now();
    let mut agent = spawn_agent(dir.path(), &api.url(), &[]);
    let source = agent.wait_for("the source to start", |l| {
        l.message().starts_with("watching Nodes")
    });
    let listed = agent.wait_for("the node list", |l| l.message() == "node list complete");
    let remote = u64::from(count - 1);
    let converged = agent.wait_for("convergence", |l| l.converged() == Some(remote));
    let pass_ms = converged.json["fields"]["took_ms"].as_u64().unwrap();
    let converged_memory = memory(agent.pid());

    // Check, not trust: the kernel routes, and the maps through the agent's own
    // inspection command inside its mount namespace.
    let routes = overlay_routes();
    assert_eq!(routes as u64, remote, "overlay routes installed");
    let inspect = Command::new("nsenter")
        .args([
            "--target",
            &agent.pid().to_string(),
            "--mount",
            "--",
            AGENT,
            "nodes",
        ])
        .arg("--bpffs")
        .arg(dir.path().join("bpffs"))
        .output()
        .unwrap();
    let inspect = String::from_utf8(inspect.stdout).unwrap();
    assert!(
        inspect.starts_with(&format!("this node: tunnel address {}", address(0))),
        "{inspect}"
    );
    assert_eq!(inspect.lines().count() as u64 - 2, remote, "ROUTES entries");
    // The annotations' merge patches (the NetworkUnavailable condition's is a
    // strategic merge patch).
    let patches = api
        .patches()
        .iter()
        .filter(|p| p.content_type.as_deref() == Some("application/merge-patch+json"))
        .count();

    let cpu_before = cpu(agent.pid());
    tokio::time::sleep(idle).await;
    let cpu_idle = cpu(agent.pid()) - cpu_before;
    let idle_memory = memory(agent.pid());
    drop(agent);
    // The datapath outlives the agent; `cleanup` is what removes it.
    assert_eq!(
        overlay_routes() as u64,
        remote,
        "the routes stay when the agent stops"
    );
    let cleaned = Command::new(AGENT)
        .arg("cleanup")
        .arg("--bpffs")
        .arg(dir.path().join("bpffs"))
        .status()
        .unwrap();
    assert!(cleaned.success(), "overlay-agent cleanup");
    assert_eq!(overlay_routes(), 0, "cleanup removes every route");

    let from_source = converged.at - source.at;
    println!("nodes                                   {count}");
    println!(
        "agent start -> source start             {:>8.0} ms  (datapath load, attach)",
        (source.at - spawned).as_secs_f64() * 1e3
    );
    println!(
        "source start -> node list complete      {:>8.0} ms",
        (listed.at - source.at).as_secs_f64() * 1e3
    );
    println!(
        "source start -> maps and routes converged {:>6.0} ms  (the pass itself: {pass_ms} ms)",
        from_source.as_secs_f64() * 1e3
    );
    println!(
        "routes / ROUTES entries                 {routes} / {remote}, annotation patches {patches}"
    );
    println!("RSS converged                           {converged_memory}");
    println!(
        "RSS after {:>3} s idle                    {idle_memory}",
        idle.as_secs()
    );
    println!(
        "CPU while idle                          {:>8.2} %  ({:.0} ms in {} s)",
        cpu_idle.as_secs_f64() / idle.as_secs_f64() * 100.0,
        cpu_idle.as_secs_f64() * 1e3,
        idle.as_secs()
    );
}
