//! `lab --etcd`: the lab on flannel's etcd subnet manager instead of a node list.
//! Debian's etcd runs on a host of its own (see [`Topology::with_etcd`]) with TLS: a
//! CA, a server and a client certificate made per run with `openssl` in the lab's
//! directory, client certificates required. The steps are those of flannel's "Running
//! manually" (flannel-io/flannel `Documentation/running.md`, commit 0748386) with TLS,
//! printed as the commands they run, each after the host whose namespace runs it: the
//! network configuration put into etcd, the agents started with flanneld's `--etcd-*`
//! flags, the leases they took (`Documentation/reservations.md`, commit 067ed7f: one
//! key per subnet under `<prefix>/subnets/`, its value naming the node's PublicIP),
//! and each node's subnet.env. The lab checks that each node's subnet.env and its lease agree, then
//! adopts the leases as the nodes' subnets ([`Topology::adopt_subnets`]).
//!
//! etcd is found by its command line (its data directory lies in the lab's), so that
//! any teardown, also `lab down` after a crash, stops it; its data and certificates go
//! with the lab's directory, its namespace with the lab's others.
//!
//! [`Topology::with_etcd`]: super::topology::Topology::with_etcd

use std::{
    collections::BTreeMap,
    ffi::{OsStr, OsString},
    fs::OpenOptions,
    net::Ipv4Addr,
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use ipnet::Ipv4Net;
use nix::sys::signal::Signal;
use serde::Deserialize;

use super::{
    etcd_member,
    interrupt::{self, Wait},
    netns,
    processes::{processes, stop_processes},
    state::LabState,
    topology::{EtcdHost, Node},
};

/// flanneld's `--etcd-prefix` default.
const PREFIX: &str = "/coreos.com/network";
const CLIENT_PORT: u16 = 2379;
/// flannel's SubnetLen default for a network wider than /24: a /24 per node.
const SUBNET_LEN: u8 = 24;
/// `ip netns exec` execs etcd at once.
const EXEC_TIMEOUT: Duration = Duration::from_secs(5);
/// etcd answers within a second or two; under emulation (the kernel matrix) slower.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// etcd's files of a run, in `<lab>/etcd/`: certificates, data, log.
struct Files {
    dir: PathBuf,
}

impl Files {
    fn of(lab: &LabState) -> Self {
        Self {
            dir: lab.dir().join("etcd"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn data(&self) -> PathBuf {
        self.path("data")
    }

    /// `flag path` for each (flag, file name).
    fn flags<const N: usize>(&self, flags: [(&str, &str); N]) -> Vec<OsString> {
        flags
            .into_iter()
            .flat_map(|(flag, name)| [flag.into(), self.path(name).into_os_string()])
            .collect()
    }
}

fn host(lab: &LabState) -> Result<&EtcdHost> {
    lab.topology
        .etcd
        .as_ref()
        .context("the lab runs without etcd")
}

fn endpoint(etcd: &EtcdHost) -> String {
    format!("https://{}:{CLIENT_PORT}", etcd.address)
}

/// flanneld's flags for `etcd`, with the client certificate.
pub(crate) fn agent_args(lab: &LabState, etcd: &EtcdHost) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["--etcd-endpoints".into(), endpoint(etcd).into()];
    args.extend(Files::of(lab).flags([
        ("--etcd-cafile", etcd_member::CA),
        ("--etcd-certfile", etcd_member::CLIENT_CERT),
        ("--etcd-keyfile", etcd_member::CLIENT_KEY),
    ]));
    args
}

/// Makes the certificates, starts etcd and puts flannel's network configuration.
pub(crate) fn start(lab: &LabState) -> Result<()> {
    let etcd = host(lab)?;
    let files = Files::of(lab);
    std::fs::create_dir_all(&files.dir)
        .with_context(|| format!("creating {}", files.dir.display()))?;
    etcd_member::make(&files.dir, etcd.address, "olab-etcd")
        .context("making etcd's certificates")?;
    println!(
        "etcd on {} ({}), TLS with client certificates from a CA of this run in {}\n\
         (`[host]$` runs in that host's namespace: `cargo xtask lab exec <host> -- …`)",
        etcd.name,
        etcd.address,
        files.dir.display()
    );
    let cmd = command(lab)?;
    show(&etcd.name, &cmd);
    launch(lab, cmd)?;
    let vars: Vec<String> = etcdctl_env(etcd, &files)
        .iter()
        .map(|(k, v)| format!("{k}={}", quote(v)))
        .collect();
    println!("[{}]$ export {}", etcd.name, vars.join(" "));
    let mut conf = lab.topology.net_conf();
    conf["SubnetLen"] = SUBNET_LEN.into();
    let put = ["put", &format!("{PREFIX}/config"), &conf.to_string()];
    show_etcdctl(lab, &put)?;
    print_indented(&netns::run(&mut etcdctl(lab, &put)?)?);
    Ok(())
}

/// Starts the lab's etcd again after [`kill`], on the same data directory: as a
/// restarted member, it comes back with its keys and leases.
pub(crate) fn restart(lab: &LabState) -> Result<()> {
    launch(lab, command(lab)?)
}

/// etcd as the lab runs it: a single member in the etcd host's namespace, its data
/// in the lab's directory, clients over TLS with certificates.
fn command(lab: &LabState) -> Result<Command> {
    let etcd = host(lab)?;
    let files = Files::of(lab);
    let url = endpoint(etcd);
    let mut cmd = netns::command(&lab.netns(&etcd.name), "/usr/bin/etcd");
    cmd.args(etcd_member::single_member(
        &etcd.name,
        &files.data(),
        &url,
        Some(&files.dir),
    ));
    Ok(cmd)
}

/// Runs etcd's `cmd`, logging to `etcd.log`, and waits until it answers.
fn launch(lab: &LabState, mut cmd: Command) -> Result<()> {
    let files = Files::of(lab);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(files.path("etcd.log"))?;
    // Left unwaited, like the agents: it outlives `lab up`, and the teardown stops it.
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Ctrl-C reaches only us, and the teardown stops it in order.
        .process_group(0)
        .spawn()
        .context("starting etcd (apt-get install etcd-server)")?;
    // `ip netns exec` execs etcd: the child is etcd.
    let mut exited = || -> Result<()> {
        match child.try_wait()? {
            Some(status) => bail!(
                "etcd exited ({status}); the end of {}:\n{}",
                files.path("etcd.log").display(),
                tail(&files.path("etcd.log"))
            ),
            None => Ok(()),
        }
    };
    // Until the exec, the teardown could not find it by its command line: wait for it
    // (not interruptibly, like an agent's start), so that Ctrl-C never leaves it behind.
    interrupt::wait_briefly("etcd to start", interrupt::scaled(EXEC_TIMEOUT), || {
        exited()?;
        Ok(if running(lab)?.is_empty() {
            Wait::Pending("its command line is not etcd's yet".into())
        } else {
            Wait::Done(())
        })
    })?;
    interrupt::wait_until("etcd to answer", interrupt::scaled(START_TIMEOUT), || {
        exited()?;
        Ok(
            match netns::run(&mut etcdctl(lab, &["endpoint", "health"])?) {
                Ok(_) => Wait::Done(()),
                Err(e) => Wait::Pending(format!("{e:#}")),
            },
        )
    })
}

/// `etcdctl <args>` in the etcd host's namespace, with the client certificate.
fn etcdctl(lab: &LabState, args: &[&str]) -> Result<Command> {
    let etcd = host(lab)?;
    let files = Files::of(lab);
    let mut cmd = netns::command(&lab.netns(&etcd.name), "etcdctl");
    cmd.envs(etcdctl_env(etcd, &files)).args(args);
    Ok(cmd)
}

/// etcdctl's settings, as variables: the commands then read as in flannel's docs.
fn etcdctl_env(etcd: &EtcdHost, files: &Files) -> [(&'static str, OsString); 4] {
    [
        ("ETCDCTL_ENDPOINTS", endpoint(etcd).into()),
        ("ETCDCTL_CACERT", files.path(etcd_member::CA).into()),
        ("ETCDCTL_CERT", files.path(etcd_member::CLIENT_CERT).into()),
        ("ETCDCTL_KEY", files.path(etcd_member::CLIENT_KEY).into()),
    ]
}

/// Prints an etcdctl command as run.
fn show_etcdctl(lab: &LabState, args: &[&str]) -> Result<()> {
    let words: Vec<String> = args.iter().map(|a| quote(OsStr::new(a))).collect();
    println!("[{}]$ etcdctl {}", host(lab)?.name, words.join(" "));
    Ok(())
}

/// Prints `cat` of the node's subnet.env, and the file.
fn show_subnet_env(lab: &LabState, node: &Node) -> Result<()> {
    let path = lab.subnet_file(node);
    println!("[{}]$ cat {}", node.name, quote(path.as_os_str()));
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    print_indented(&text);
    Ok(())
}

/// Prints each node's subnet.env and the leases, and checks that each node's subnet,
/// as its subnet.env (`written`) has it, is leased to the node's address.
pub(crate) fn check_leases(lab: &LabState, written: &BTreeMap<String, Ipv4Net>) -> Result<()> {
    for node in &lab.topology.nodes {
        show_subnet_env(lab, node)?;
    }
    let get = ["get", "--prefix", &format!("{PREFIX}/subnets")];
    show_etcdctl(lab, &get)?;
    let listing = netns::run(&mut etcdctl(lab, &get)?)?;
    print_indented(&listing);
    let leases = leases(&listing)?;
    let mut found = Vec::new();
    for node in &lab.topology.nodes {
        let subnet = written
            .get(&node.name)
            .with_context(|| format!("no subnet.env of {}", node.name))?
            .trunc();
        match leases.get(&subnet) {
            Some(ip) if *ip == node.address => found.push(format!("{} {subnet}", node.name)),
            Some(ip) => bail!(
                "{} wrote {subnet} into its subnet.env, but etcd leases it to {ip}",
                node.name
            ),
            None => bail!(
                "{} wrote {subnet} into its subnet.env, but etcd has no lease of it",
                node.name
            ),
        }
    }
    println!("Node subnets, from the leases: {}", found.join(", "));
    Ok(())
}

/// A subnet's key (flannel's `MakeSubnetKey`: `<prefix>/subnets/10.244.1.0-24`).
fn subnet_key(subnet: Ipv4Net) -> String {
    format!(
        "{PREFIX}/subnets/{}-{}",
        subnet.network(),
        subnet.prefix_len()
    )
}

/// flannel's lease value for an ipip node at `public_ip`.
fn lease_value(public_ip: Ipv4Addr) -> String {
    serde_json::json!({"PublicIP": public_ip, "BackendType": "ipip"}).to_string()
}

/// Puts `subnet` for a node at `public_ip` as an operator's reservation (a key
/// without an etcd lease, `Documentation/reservations.md`): every agent takes it for
/// a peer.
pub(crate) fn put_peer(lab: &LabState, subnet: Ipv4Net, public_ip: Ipv4Addr) -> Result<()> {
    let put = ["put", &subnet_key(subnet), &lease_value(public_ip)];
    netns::run(&mut etcdctl(lab, &put)?).map(drop)
}

/// Deletes the key of `subnet` (what every agent sees of an expired lease too).
pub(crate) fn delete_peer(lab: &LabState, subnet: Ipv4Net) -> Result<()> {
    let deleted = netns::run(&mut etcdctl(lab, &["del", &subnet_key(subnet)])?)?;
    ensure!(
        deleted.trim() == "1",
        "etcdctl del {} deleted {} keys, not one",
        subnet_key(subnet),
        deleted.trim()
    );
    Ok(())
}

/// A lease's value (flannel's `LeaseAttrs`): only what the lab checks.
#[derive(Deserialize)]
struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    public_ip: Ipv4Addr,
}

/// Each leased subnet and its node's PublicIP, from `etcdctl get --prefix
/// <prefix>/subnets` (a line with the key, then one with the value, per key).
fn leases(listing: &str) -> Result<BTreeMap<Ipv4Net, Ipv4Addr>> {
    let lines: Vec<&str> = listing.lines().filter(|l| !l.is_empty()).collect();
    ensure!(
        lines.len().is_multiple_of(2),
        "etcdctl listed a key without a value:\n{listing}"
    );
    lines
        .chunks(2)
        .map(|pair| {
            let (key, value) = (pair[0], pair[1]);
            // flannel's key: the subnet with '-' for '/' (10.244.1.0-24).
            let subnet = key
                .rsplit('/')
                .next()
                .map(|s| s.replacen('-', "/", 1))
                .and_then(|s| s.parse::<Ipv4Net>().ok())
                .with_context(|| format!("{key} names no subnet"))?;
            let attrs: LeaseAttrs = serde_json::from_str(value)
                .with_context(|| format!("the lease {key} holds {value}"))?;
            Ok((subnet, attrs.public_ip))
        })
        .collect()
}

/// The lab's etcd processes: those whose data directory is the lab's.
pub(crate) fn running(lab: &LabState) -> Result<Vec<u32>> {
    let data = Files::of(lab).data();
    Ok(processes()?
        .into_iter()
        .filter(|(_, cmdline)| is_etcd_of(&data, cmdline))
        .map(|(pid, _)| pid)
        .collect())
}

/// Whether `cmdline` (`/proc/<pid>/cmdline`) is etcd itself (not the `ip netns exec`
/// that starts it) with the data directory `data`.
fn is_etcd_of(data: &Path, cmdline: &[u8]) -> bool {
    let args: Vec<&OsStr> = cmdline.split(|&b| b == 0).map(OsStr::from_bytes).collect();
    args.first()
        .is_some_and(|a| Path::new(a).file_name() == Some(OsStr::new("etcd")))
        && args
            .windows(2)
            .any(|w| w[0] == "--data-dir" && Path::new(w[1]) == data)
}

/// Stops the lab's etcd, if it runs; returns whether it did.
pub(crate) fn stop(lab: &LabState) -> Result<bool> {
    signal(lab, Signal::SIGTERM)
}

/// Kills the lab's etcd with SIGKILL, as a crash or the OOM killer would, and waits
/// until it is gone.
pub(crate) fn kill(lab: &LabState) -> Result<()> {
    ensure!(
        signal(lab, Signal::SIGKILL)?,
        "the lab's etcd is not running"
    );
    Ok(())
}

/// Sends `signal` to the lab's etcd and waits until it exits; returns whether it ran.
fn signal(lab: &LabState, signal: Signal) -> Result<bool> {
    let data = Files::of(lab).data();
    let pids: Vec<(u32, String)> = running(lab)?
        .into_iter()
        .map(|pid| (pid, "etcd".to_owned()))
        .collect();
    stop_processes(
        &pids,
        |pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| is_etcd_of(&data, &cmdline))
        },
        signal,
    )?;
    Ok(!pids.is_empty())
}

/// Prints `cmd` (an `ip netns exec <ns>` command) as run in `host`'s namespace.
pub(crate) fn show(host: &str, cmd: &Command) {
    // Past `ip netns exec <ns>`.
    let words: Vec<String> = cmd.get_args().skip(3).map(quote).collect();
    println!("[{host}]$ {}", words.join(" "));
}

/// `word` as a POSIX shell reads it back.
fn quote(word: &OsStr) -> String {
    let text = word.to_string_lossy();
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+".contains(c));
    if plain {
        text.into_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("  {line}");
    }
}

/// The last lines of a log, for an error.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// A node that runs flanneld on this etcd instead of our agent (the interoperability
/// test's).
#[cfg(test)]
pub(crate) mod flanneld;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_as_etcdctl_lists_them() {
        let listing = "/coreos.com/network/subnets/10.244.57.0-24\n\
            {\"PublicIP\":\"172.18.0.3\",\"PublicIPv6\":null,\"BackendType\":\"ipip\",\"BackendData\":null}\n\
            /coreos.com/network/subnets/10.244.9.0-24\n\
            {\"PublicIP\":\"172.19.0.2\",\"BackendType\":\"ipip\"}\n";
        assert_eq!(
            leases(listing).unwrap(),
            BTreeMap::from([
                ("10.244.9.0/24".parse().unwrap(), [172, 19, 0, 2].into()),
                ("10.244.57.0/24".parse().unwrap(), [172, 18, 0, 3].into()),
            ])
        );
        assert!(leases("").unwrap().is_empty());
        let e = leases("/coreos.com/network/subnets/10.244.1.0-24\n").unwrap_err();
        assert!(e.to_string().contains("without a value"), "{e}");
        let e = leases("/coreos.com/network/subnets/nonsense\n{}\n").unwrap_err();
        assert!(e.to_string().contains("names no subnet"), "{e}");
        let e = leases("/coreos.com/network/subnets/10.244.1.0-24\n{}\n").unwrap_err();
        assert!(format!("{e:#}").contains("holds {}"), "{e:#}");
    }

    #[test]
    fn a_peer_put_reads_back_as_a_lease() {
        let subnet: Ipv4Net = "10.244.255.0/24".parse().unwrap();
        let ip: Ipv4Addr = [172, 18, 0, 250].into();
        assert_eq!(
            subnet_key(subnet),
            "/coreos.com/network/subnets/10.244.255.0-24"
        );
        let listing = format!("{}\n{}\n", subnet_key(subnet), lease_value(ip));
        assert_eq!(leases(&listing).unwrap(), BTreeMap::from([(subnet, ip)]));
    }

    #[test]
    fn etcd_is_recognized_by_its_data_directory() {
        let data = Path::new("/run/overlay-lab/ab12/etcd/data");
        let etcd = b"/usr/bin/etcd\0--name\0etcd\0--data-dir\0/run/overlay-lab/ab12/etcd/data\0";
        assert!(is_etcd_of(data, etcd));
        assert!(!is_etcd_of(
            Path::new("/run/overlay-lab/cd34/etcd/data"),
            etcd
        ));
        let wrapper = [&b"ip\0netns\0exec\0olab-ab12-etcd\0"[..], etcd].concat();
        assert!(!is_etcd_of(data, &wrapper));
        assert!(!is_etcd_of(data, b""));
    }

    #[test]
    fn commands_print_as_a_shell_reads_them() {
        assert_eq!(quote(OsStr::new("--etcd-endpoints")), "--etcd-endpoints");
        assert_eq!(
            quote(OsStr::new(r#"{"Network":"10.244.0.0/16"}"#)),
            r#"'{"Network":"10.244.0.0/16"}'"#
        );
        assert_eq!(quote(OsStr::new("it's")), r"'it'\''s'");
        assert_eq!(quote(OsStr::new("")), "''");
    }
}
