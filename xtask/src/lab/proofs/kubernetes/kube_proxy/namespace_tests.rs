//! The rules installed for real, in throwaway namespaces (`olab-t<random>-kp*`, removed
//! by a guard): a pod reaches a Service's endpoints through its ClusterIP and its
//! NodePort, the node reaches the ClusterIP, with the sources kube-proxy's
//! masquerading gives; removal leaves nothing; and 1,000 Services install in seconds.
//! Needs root, like the lab.
//!
//! ```text
//!  pod (…-kpc)          node (…-kp, the rules)                 endpoints (…-kpe)
//!  eth0 10.244.0.2 ──── c0 10.244.0.1   e0 10.244.1.1 ──────── eth0 10.244.1.2, .3
//!                       lo 172.31.0.1 (node IP: the default       :8080
//!                       route's source, outside the pod network)
//! ```

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::lab::machinery::interrupt::scaled;

use super::{fixture::*, *};

const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const NODE_POD_SIDE: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
const NODE_ENDPOINT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);
const ENDPOINTS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 1, 3)];
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const TARGET_PORT: u16 = 8080;
const NODE_PORT: u16 = 30080;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Namespaces deleted when dropped, whatever ends the test.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn create(suffixes: &[&str]) -> Self {
        let mut bytes = [0u8; 2];
        std::fs::File::open("/dev/urandom")
            .unwrap()
            .read_exact(&mut bytes)
            .unwrap();
        let prefix = format!("olab-t{:04x}-kp", u16::from_be_bytes(bytes));
        let namespaces = Self(suffixes.iter().map(|s| format!("{prefix}{s}")).collect());
        for ns in &namespaces.0 {
            netns::add(ns).unwrap();
        }
        namespaces
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            if let Err(e) = netns::delete(ns) {
                eprintln!("{e:#}");
            }
        }
    }
}

/// The three namespaces of the diagram, wired.
fn topology() -> Namespaces {
    let namespaces = Namespaces::create(&["", "c", "e"]);
    let [node, pod, endpoints] = [&namespaces.0[0], &namespaces.0[1], &namespaces.0[2]];
    let ip = |ns: &str, script: &str| {
        pipe(Command::new("ip").args(["-n", ns, "-batch", "-"]), script).unwrap()
    };
    ip(
        node,
        &format!(
            "link set lo up\n\
             link add c0 type veth peer name eth0 netns {pod}\n\
             link add e0 type veth peer name eth0 netns {endpoints}\n\
             address add {NODE_IP}/32 dev lo\n\
             address add {NODE_POD_SIDE}/24 dev c0\n\
             address add {NODE_ENDPOINT_SIDE}/24 dev e0\n\
             link set c0 up\nlink set e0 up\n\
             route add default dev c0 src {NODE_IP}\n"
        ),
    );
    ip(
        pod,
        &format!(
            "link set lo up\nlink set eth0 up\naddress add {POD}/24 dev eth0\nroute add default via {NODE_POD_SIDE}\n"
        ),
    );
    ip(
        endpoints,
        &format!(
            "link set lo up\nlink set eth0 up\naddress add {}/24 dev eth0\naddress add {}/24 dev eth0\n\
             route add default via {NODE_ENDPOINT_SIDE}\n",
            ENDPOINTS[0], ENDPOINTS[1]
        ),
    );
    netns::enable_forwarding(node).unwrap();
    namespaces
}

fn node_view() -> NodeView {
    NodeView {
        name: "w1".into(),
        node_ip: NODE_IP,
        cluster_cidr: "10.244.0.0/16".parse().unwrap(),
    }
}

/// default/web: ClusterIP port 80 and NodePort 30080 to :8080 on both endpoints,
/// which run on another node.
fn web() -> Vec<Service> {
    vec![service(
        "default/web",
        &CLUSTER_IP.to_string(),
        vec![port(
            "http",
            Protocol::Tcp,
            80,
            TARGET_PORT,
            Some(NODE_PORT),
        )],
        TrafficPolicy::Cluster,
        &[
            (&ENDPOINTS[0].to_string(), "w2"),
            (&ENDPOINTS[1].to_string(), "w2"),
        ],
    )]
}

/// Answers each connection with "<peer address> <local address>", in its namespace.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(ns: &str) -> Self {
        let listener =
            netns::enter(ns, || Ok(TcpListener::bind(("0.0.0.0", TARGET_PORT))?)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        let local = stream.local_addr().unwrap();
                        let _ = write!(stream, "{} {}", peer.ip(), local.ip());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Connects from `ns` to `to`: the source and the endpoint address the server saw.
fn ask(ns: &str, to: SocketAddr) -> Result<(Ipv4Addr, Ipv4Addr)> {
    let mut stream = netns::enter(ns, || {
        TcpStream::connect_timeout(&to, scaled(Duration::from_secs(2)))
            .with_context(|| format!("connecting to {to} from {ns}"))
    })?;
    stream.set_read_timeout(Some(scaled(Duration::from_secs(2))))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (peer, local) = answer
        .split_once(' ')
        .with_context(|| format!("answer {answer:?}"))?;
    Ok((peer.parse()?, local.parse()?))
}

fn output(ns: &str, program: &str, args: &[&str]) -> String {
    netns::run(netns::command(ns, program).args(args)).unwrap()
}

#[test]
fn every_mode_this_kernel_has_dnats_masquerades_and_leaves_nothing() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    let mut ran = 0;
    for mode in [Mode::Iptables, Mode::Nftables, Mode::Ipvs] {
        if let Err(why) = available(mode) {
            eprintln!("{mode:?} mode not run: {why}");
            continue;
        }
        ran += 1;
        let namespaces = topology();
        let [node, pod, endpoints] = [&namespaces.0[0], &namespaces.0[1], &namespaces.0[2]];
        let _server = Server::start(endpoints);
        install(node, mode, &node_view(), &web()).unwrap();
        // A second install replaces the first.
        install(node, mode, &node_view(), &web()).unwrap();

        let cluster_ip = SocketAddr::from((CLUSTER_IP, 80));
        let mut reached = Vec::new();
        for _ in 0..32 {
            let (peer, endpoint) =
                ask(pod, cluster_ip).unwrap_or_else(|e| panic!("{mode:?}: {e:#}"));
            assert_eq!(
                peer, POD,
                "{mode:?}: pod traffic to a ClusterIP keeps its source"
            );
            reached.push(endpoint);
        }
        for endpoint in ENDPOINTS {
            // Each is missed 32 times in a row with probability 2^-32.
            assert!(
                reached.contains(&endpoint),
                "{mode:?}: {endpoint} never chosen in {reached:?}"
            );
        }
        let (peer, _) = ask(pod, SocketAddr::from((NODE_IP, NODE_PORT))).unwrap();
        assert_eq!(
            peer, NODE_ENDPOINT_SIDE,
            "{mode:?}: NodePort traffic is masqueraded"
        );
        let (peer, _) = ask(node, cluster_ip).unwrap();
        assert_eq!(
            peer, NODE_ENDPOINT_SIDE,
            "{mode:?}: the node's traffic is masqueraded"
        );
        let localhost = ask(node, SocketAddr::from((Ipv4Addr::LOCALHOST, NODE_PORT)));
        match mode {
            // route_localnet and KUBE-NODEPORTS' match on any local address.
            Mode::Iptables => assert_eq!(localhost.unwrap().0, NODE_ENDPOINT_SIDE),
            _ => assert!(localhost.is_err(), "{mode:?} has no localhost NodePorts"),
        }
        let sysctl = |key: &str| {
            output(node, "cat", &[&format!("/proc/sys/{key}")])
                .trim()
                .to_owned()
        };
        assert_eq!(
            sysctl("net/netfilter/nf_conntrack_tcp_timeout_established"),
            "86400"
        );
        let expected_localnet = if mode == Mode::Iptables { "1" } else { "0" };
        assert_eq!(
            sysctl("net/ipv4/conf/all/route_localnet"),
            expected_localnet
        );

        let saved = output(node, "iptables-save", &[]);
        match mode {
            Mode::Nftables => {
                let table = output(node, "nft", &["list", "table", "ip", "kube-proxy"]);
                assert!(table.contains("map service-ips"), "{table}");
                assert!(
                    !saved.contains("KUBE-"),
                    "nftables mode wrote iptables rules:\n{saved}"
                );
            }
            _ => assert!(
                saved.contains("-j KUBE-SERVICES") && saved.contains("--random-fully"),
                "{saved}"
            ),
        }

        remove(node, mode).unwrap();
        let saved = output(node, "iptables-save", &[]);
        assert!(
            !saved.contains("KUBE-"),
            "{mode:?} left iptables rules:\n{saved}"
        );
        assert!(!output(node, "nft", &["list", "tables"]).contains("kube-proxy"));
        assert!(
            output(node, "ip", &["link", "show"])
                .lines()
                .all(|l| !l.contains("kube-ipvs0"))
        );
        if mode == Mode::Ipvs {
            assert_eq!(output(node, "ipvsadm", &["-S", "-n"]).trim(), "");
            assert_eq!(output(node, "ipset", &["list", "-n"]).trim(), "");
        }
        assert!(
            ask(pod, cluster_ip).is_err(),
            "{mode:?}: the ClusterIP still answers after removal"
        );
        eprintln!(
            "{mode:?} mode: pod, NodePort, node and localhost traffic as kube-proxy's; removed"
        );
    }
    assert!(ran > 0, "no kube-proxy mode can run here");
}

#[test]
fn ipvs_modes_sets_and_rules_install_and_leave_here_without_ipvs() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    if ipvs::kernel_has_ipvs().is_ok() {
        eprintln!("skipped: this kernel has IPVS, and the whole mode is tested with traffic");
        return;
    }
    if available(Mode::Iptables).is_err()
        || Command::new("ipset").arg("--version").output().is_err()
    {
        eprintln!("skipped: needs iptables and ipset (Debian packages iptables, ipset)");
        return;
    }
    let namespaces = Namespaces::create(&[""]);
    let node = &namespaces.0[0];
    let Rendered::Ipvs(rules) = render(Mode::Ipvs, &node_view(), &web()).unwrap() else {
        unreachable!("IPVS mode renders IPVS rules")
    };
    ipvs::install_sets_and_rules(&rules, node).unwrap();
    assert_eq!(output(node, "ipset", &["list", "-n"]).lines().count(), 17);
    let members = output(node, "ipset", &["list", "KUBE-CLUSTER-IP"]);
    assert!(members.contains("10.96.0.10,tcp:80"), "{members}");
    let saved = output(node, "iptables-save", &[]);
    assert!(
        saved.contains("--match-set KUBE-IPVS-IPS dst -j REJECT"),
        "{saved}"
    );

    remove(node, Mode::Ipvs).unwrap();
    assert_eq!(output(node, "ipset", &["list", "-n"]).trim(), "");
    assert!(!output(node, "iptables-save", &[]).contains("KUBE-"));
}

/// What the benchmark installs on every node: 1,000 Services with 2 endpoints each
/// (every fourth with a NodePort).
fn thousand() -> Vec<Service> {
    (0..1000u16)
        .map(|i| {
            let node_port = (i % 4 == 0).then_some(30000 + i);
            let [a, b] = [(i / 200) as u8, (i % 200) as u8 + 1];
            service(
                &format!("bench/svc-{i}"),
                &format!("10.96.{}.{}", i / 250, i % 250 + 1),
                vec![port("http", Protocol::Tcp, 80, TARGET_PORT, node_port)],
                TrafficPolicy::Cluster,
                &[
                    (&format!("10.244.{}.{}", a + 1, b), "w1"),
                    (&format!("10.244.{}.{}", a + 11, b), "w2"),
                ],
            )
        })
        .collect()
}

#[test]
fn a_thousand_services_install_in_seconds() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    let services = thousand();
    for mode in [Mode::Iptables, Mode::Nftables, Mode::Ipvs] {
        if let Err(why) = available(mode) {
            eprintln!("{mode:?} mode not run: {why}");
            continue;
        }
        let namespaces = Namespaces::create(&[""]);
        let node = &namespaces.0[0];
        pipe(
            Command::new("ip").args(["-n", node, "-batch", "-"]),
            &format!("link set lo up\naddress add {NODE_IP}/32 dev lo\n"),
        )
        .unwrap();
        let started = Instant::now();
        let rendered = render(mode, &node_view(), &services).unwrap();
        let rendering = started.elapsed();
        install(node, mode, &node_view(), &services).unwrap();
        let installing = started.elapsed();
        let reinstalling = Instant::now();
        install(node, mode, &node_view(), &services).unwrap();
        let reinstalling = reinstalling.elapsed();
        let removing = Instant::now();
        remove(node, mode).unwrap();
        let removing = removing.elapsed();
        let size = match &rendered {
            Rendered::Iptables(text) | Rendered::Nftables(text) => text.lines().count(),
            Rendered::Ipvs(rules) => rules.iptables.lines().count() + rules.ipset.lines().count(),
        };
        eprintln!(
            "{mode:?}: 1,000 Services, 2,000 endpoints, {size} lines: rendered in {:.3} s, \
             rendered and installed in {:.2} s, installed again (over the first) in {:.2} s, removed in {:.2} s",
            rendering.as_secs_f64(),
            installing.as_secs_f64(),
            reinstalling.as_secs_f64(),
            removing.as_secs_f64()
        );
        // Seconds, not minutes (natively under one; longer where the VM emulates).
        let bound = scaled(Duration::from_secs(20));
        assert!(installing < bound, "{mode:?} took {installing:?}");
        assert!(reinstalling < bound, "{mode:?} took {reinstalling:?}");
    }
}
