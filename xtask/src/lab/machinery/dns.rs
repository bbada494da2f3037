//! Cluster DNS for the lab's pods: a real DNS server, dnsmasq (Debian's
//! `dnsmasq-base`), in a pod's namespace, answering for `cluster.local` as CoreDNS's
//! kubernetes plugin does, and every pod's resolver pointed at it as kubelet points it.
//!
//! The server holds an A record per Service (`<svc>.<ns>.svc.cluster.local` → its
//! ClusterIP) and is authoritative for the zone (dnsmasq's `--auth-zone`): names it
//! does not hold are NXDOMAIN with the zone's SOA and the AA bit, and answers live 5
//! seconds, as the kubernetes plugin's (coredns/coredns plugin/kubernetes/README.md:
//! `ttl` defaults to 5); anything outside the zone is REFUSED, since queries reaching
//! an `--auth-server` address are never recursed. It reads nothing of the machine's:
//! no configuration file (`--conf-file=/dev/null`), no /etc/resolv.conf (`--no-resolv`),
//! no /etc/hosts (`--no-hosts`); serves no DHCP (no range); keeps its pid file and
//! lease file in a directory of ours and logs there instead of to syslog; listens on
//! the pod's address only, port 53, UDP and TCP.
//!
//! The resolver: kubelet gives a pod with `dnsPolicy: ClusterFirst` the cluster DNS
//! Service's ClusterIP as its only nameserver, the search list `<ns>.svc.<domain>
//! svc.<domain> <domain>` (then the node's own search domains: our nodes have none,
//! the machine's are never read) and `options ndots:5` (kubernetes/kubernetes
//! pkg/kubelet/network/dns/dns.go, commit 04791b49, `GetPodDNS`); the runtime writes
//! them as search, nameserver, options lines (containerd's CRI, `parseDNSOptions`).
//! `ip netns exec` bind-mounts the files of /etc/netns/<ns>/ over /etc/, so a pod's
//! resolv.conf goes to /etc/netns/<ns>/resolv.conf and anything run in the pod through
//! `ip netns exec` (as [`resolve`] runs `getent`) resolves like a pod: a short name
//! through the search list. The machine's own /etc/resolv.conf is never touched.

use std::{
    fs::{self, File},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::netns;

/// The cluster's DNS domain (kubelet's `--cluster-domain`).
pub(crate) const ZONE: &str = "cluster.local";
/// The namespace of the lab's pods, the first of their search domains.
const POD_NAMESPACE: &str = "default";
/// The name the zone's SOA and NS records give the server, as CoreDNS's.
const SERVER_NAME: &str = "ns.dns.cluster.local";
/// Seconds an answer lives (the kubernetes plugin's default `ttl`).
const TTL: &str = "5";
/// Where `ip netns exec` finds per-namespace files.
const ETC_NETNS: &str = "/etc/netns";
const DNS_PORT: u16 = 53;
/// How long dnsmasq may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// How long dnsmasq may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(20);

/// dnsmasq serving the cluster's zone in a pod's namespace; killed and reaped when
/// dropped.
pub(crate) struct ClusterDns {
    child: Child,
}

impl ClusterDns {
    /// Starts dnsmasq in `ns` on `listen`:53 with an A record per `(name, address)` of
    /// `records` (full names inside [`ZONE`]; a name given twice has both addresses),
    /// its pid file, lease file and log in `dir` (created if missing); returns once it
    /// answers on TCP.
    pub(crate) fn start(
        ns: &str,
        listen: Ipv4Addr,
        records: &[(String, Ipv4Addr)],
        dir: &Path,
    ) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let args = arguments(listen, records, dir)?;
        let log_path = dir.join("dnsmasq.log");
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let child = netns::command(ns, "dnsmasq")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting dnsmasq")?;
        // Dropped on any failure below: the process goes with it.
        let mut dns = Self { child };
        let started = Instant::now();
        loop {
            if let Some(status) = dns.child.try_wait()? {
                bail!(
                    "dnsmasq in {ns} exited ({status}): {}",
                    fs::read_to_string(&log_path).unwrap_or_default().trim()
                );
            }
            let address = SocketAddrV4::new(listen, DNS_PORT);
            if netns::enter(ns, || {
                Ok(TcpStream::connect_timeout(&address.into(), POLL)?)
            })
            .is_ok()
            {
                return Ok(dns);
            }
            if started.elapsed() > START_TIMEOUT {
                bail!(
                    "dnsmasq in {ns} does not listen on {address} after {START_TIMEOUT:?}: {}",
                    fs::read_to_string(&log_path).unwrap_or_default().trim()
                );
            }
            thread::sleep(POLL);
        }
    }
}

impl Drop for ClusterDns {
    fn drop(&mut self) {
        // `ip netns exec` execs dnsmasq: the child is dnsmasq itself.
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let started = Instant::now();
        while started.elapsed() < STOP_TIMEOUT {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            thread::sleep(POLL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// dnsmasq's command line (see the module's documentation).
fn arguments(listen: Ipv4Addr, records: &[(String, Ipv4Addr)], dir: &Path) -> Result<Vec<String>> {
    let mut args: Vec<String> = [
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--log-facility=-",
        "--log-queries",
        "--bind-interfaces",
    ]
    .map(str::to_owned)
    .into();
    args.extend([
        format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
        format!("--dhcp-leasefile={}", dir.join("dnsmasq.leases").display()),
        format!("--listen-address={listen}"),
        format!("--port={DNS_PORT}"),
        format!("--auth-server={SERVER_NAME},{listen}"),
        format!("--auth-zone={ZONE}"),
        format!("--auth-ttl={TTL}"),
    ]);
    for (name, address) in records {
        check_name(name)?;
        ensure!(
            name.ends_with(&format!(".{ZONE}")),
            "{name:?} is not inside {ZONE}, the zone the cluster DNS serves"
        );
        args.push(format!("--host-record={name},{address}"));
    }
    Ok(args)
}

/// A DNS name of lowercase letters, digits and '-', in dot-separated labels of at
/// most 63 characters.
fn check_name(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            }),
        "{name:?} is not a DNS name (lowercase letters, digits and '-' in dot-separated labels)"
    );
    Ok(())
}

/// A pod's resolv.conf, as kubelet and the runtime write it.
fn resolv_conf(nameserver: Ipv4Addr) -> String {
    format!(
        "search {POD_NAMESPACE}.svc.{ZONE} svc.{ZONE} {ZONE}\n\
         nameserver {nameserver}\n\
         options ndots:5\n"
    )
}

fn netns_dir(ns: &str) -> Result<PathBuf> {
    ensure!(
        !ns.is_empty() && ns != "." && ns != ".." && !ns.contains('/'),
        "{ns:?} is not a namespace name"
    );
    Ok(Path::new(ETC_NETNS).join(ns))
}

/// Points the resolver of everything run in `ns` through `ip netns exec` at
/// `nameserver` (the kube-dns ClusterIP), with kubelet's search list and options.
pub(crate) fn write_resolv_conf(ns: &str, nameserver: Ipv4Addr) -> Result<()> {
    let dir = netns_dir(ns)?;
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("resolv.conf");
    fs::write(&path, resolv_conf(nameserver)).with_context(|| format!("writing {}", path.display()))
}

/// Removes /etc/netns/<ns> of every namespace whose name starts with `ns_prefix` (one
/// lab's), then /etc/netns itself if that leaves it empty.
pub(crate) fn remove_resolv_confs(ns_prefix: &str) -> Result<()> {
    ensure!(
        !ns_prefix.is_empty() && !ns_prefix.contains('/'),
        "{ns_prefix:?} is not a namespace prefix"
    );
    let entries = match fs::read_dir(ETC_NETNS) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).context(format!("listing {ETC_NETNS}")),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {ETC_NETNS}"))?;
        if entry.file_name().to_string_lossy().starts_with(ns_prefix) {
            fs::remove_dir_all(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    match fs::remove_dir(ETC_NETNS) {
        Err(e) if e.kind() != std::io::ErrorKind::DirectoryNotEmpty => {
            Err(e).context(format!("removing {ETC_NETNS}"))
        }
        _ => Ok(()),
    }
}

/// The IPv4 addresses `name` resolves to in `ns`, through the system resolver as a
/// program in the pod would resolve it (`getent ahostsv4`: nsswitch, then resolv.conf
/// with its search list).
pub(crate) fn resolve(ns: &str, name: &str) -> Result<Vec<Ipv4Addr>> {
    check_name(name)?;
    let out = netns::command(ns, "getent")
        .args(["ahostsv4", name])
        .stdin(Stdio::null())
        .output()
        .context("starting getent")?;
    // getent's exit status 2: the key was not found.
    if out.status.code() == Some(2) {
        bail!("{name} does not resolve in {ns}");
    }
    if !out.status.success() {
        bail!(
            "resolving {name} in {ns} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut addresses = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let first = line.split_whitespace().next().unwrap_or_default();
        let address: Ipv4Addr = first
            .parse()
            .with_context(|| format!("getent ahostsv4 printed {line:?}"))?;
        if !addresses.contains(&address) {
            addresses.push(address);
        }
    }
    Ok(addresses)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::machinery::scratch::Scratch;

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 20);
    const ECHO: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
    const KUBE_DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

    fn records() -> Vec<(String, Ipv4Addr)> {
        vec![
            ("echo.default.svc.cluster.local".into(), ECHO),
            ("kube-dns.kube-system.svc.cluster.local".into(), KUBE_DNS),
        ]
    }

    #[test]
    fn resolv_conf_is_kubelet_s() {
        assert_eq!(
            resolv_conf(KUBE_DNS),
            "search default.svc.cluster.local svc.cluster.local cluster.local\n\
             nameserver 10.96.0.10\n\
             options ndots:5\n"
        );
    }

    #[test]
    fn dnsmasq_reads_nothing_of_the_machine_and_serves_the_zone() {
        let args = arguments(SERVER, &records(), Path::new("/run/x")).unwrap();
        for expected in [
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--log-facility=-",
            "--pid-file=/run/x/dnsmasq.pid",
            "--dhcp-leasefile=/run/x/dnsmasq.leases",
            "--listen-address=10.244.1.10",
            "--bind-interfaces",
            "--auth-server=ns.dns.cluster.local,10.244.1.10",
            "--auth-zone=cluster.local",
            "--auth-ttl=5",
            "--host-record=echo.default.svc.cluster.local,10.96.0.20",
            "--host-record=kube-dns.kube-system.svc.cluster.local,10.96.0.10",
        ] {
            assert!(
                args.iter().any(|a| a == expected),
                "{expected} missing: {args:?}"
            );
        }
        assert!(!args.iter().any(|a| a.starts_with("--dhcp-range")));
        let outside = [("echo.example.com".to_owned(), ECHO)];
        assert!(arguments(SERVER, &outside, Path::new("/run/x")).is_err());
        let bad = [("Echo.default.svc.cluster.local".to_owned(), ECHO)];
        assert!(arguments(SERVER, &bad, Path::new("/run/x")).is_err());
    }

    #[test]
    fn bad_names_and_prefixes_are_refused() {
        assert!(check_name("echo").is_ok());
        for bad in ["", "a..b", "a b", "-x;rm", &"a".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(write_resolv_conf("../etc", KUBE_DNS).is_err());
        assert!(remove_resolv_confs("").is_err());
    }

    /// Removes the scratch namespaces' resolv.conf files should the test fail midway.
    struct ResolvConfs<'a>(&'a str);

    impl Drop for ResolvConfs<'_> {
        fn drop(&mut self) {
            if let Err(e) = remove_resolv_confs(self.0) {
                eprintln!("{e:#}");
            }
        }
    }

    #[test]
    fn a_pod_resolves_services_through_dnsmasq_and_nothing_stays_in_etc_netns() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (namespaces, /etc/netns)");
            return;
        }
        let machine_resolv_conf = fs::read("/etc/resolv.conf").unwrap();
        let etc_netns_existed = Path::new(ETC_NETNS).exists();
        let scratch = Scratch::new(&["dns", "pod"]).unwrap();
        let (server_ns, pod_ns) = (scratch.ns("dns"), scratch.ns("pod"));
        netns::Script::new(&server_ns)
            .veth("eth0", None, "eth0", &pod_ns, None)
            .unwrap()
            .address(ipnet::Ipv4Net::new(SERVER, 24).unwrap(), "eth0")
            .up("eth0")
            .apply()
            .unwrap();
        netns::Script::new(&pod_ns)
            .address(ipnet::Ipv4Net::new(CLIENT, 24).unwrap(), "eth0")
            .up("eth0")
            .apply()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let resolv_confs = ResolvConfs(scratch.prefix());
        let dns = ClusterDns::start(&server_ns, SERVER, &records(), dir.path()).unwrap();
        // No kube-proxy here: the pod asks the server's own address.
        write_resolv_conf(&pod_ns, SERVER).unwrap();

        assert_eq!(
            resolve(&pod_ns, "echo").unwrap(),
            [ECHO],
            "through the search list"
        );
        assert_eq!(resolve(&pod_ns, "echo.default").unwrap(), [ECHO]);
        assert_eq!(
            resolve(&pod_ns, "kube-dns.kube-system.svc.cluster.local").unwrap(),
            [KUBE_DNS]
        );
        let unknown = resolve(&pod_ns, "nope").unwrap_err().to_string();
        assert!(unknown.contains("nope does not resolve"), "{unknown}");
        assert!(
            resolve(&pod_ns, "example.org").is_err(),
            "recursion is refused"
        );

        let pid = dns.child.id();
        drop(dns);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "dnsmasq ({pid}) still runs or was not reaped"
        );
        drop(resolv_confs);
        assert!(!Path::new(ETC_NETNS).join(&pod_ns).exists());
        if !etc_netns_existed {
            assert!(!Path::new(ETC_NETNS).exists(), "{ETC_NETNS} left behind");
        }
        assert_eq!(fs::read("/etc/resolv.conf").unwrap(), machine_resolv_conf);
    }
}
