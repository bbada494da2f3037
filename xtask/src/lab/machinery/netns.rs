//! Network namespaces and the links inside them (through iproute2), and entering a
//! namespace from a thread to open sockets or write its sysctls there.
//!
//! Every link is created directly inside a lab namespace (veth peers go straight to
//! their namespace with `peer ... netns`), so nothing ever appears in the machine's own
//! namespace, even for an instant.

use std::{
    fs::File,
    io::Write as _,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};
use ipnet::Ipv4Net;
use nix::sched::{CloneFlags, setns};

use super::interrupt;

/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/run/netns";
/// The kernel's limit on interface names (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

fn path(ns: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(ns)
}

/// Runs `cmd`; a failure carries the command and its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn add(ns: &str) -> Result<()> {
    run(Command::new("ip").args(["netns", "add", ns])).map(drop)
}

/// Deletes `ns` if it exists; its links go with it (and their veth peers with them).
pub(crate) fn delete(ns: &str) -> Result<()> {
    if !path(ns).exists() {
        return Ok(());
    }
    run(Command::new("ip").args(["netns", "del", ns])).map(drop)
}

/// Namespaces whose name starts with `prefix`.
pub(crate) fn list(prefix: &str) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        // No namespace was ever added on this machine (a freshly booted VM).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
        Err(e) => return Err(e).context(format!("listing {NETNS_DIR}")),
    };
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// `program` run inside `ns`, through `ip netns exec` (which also gives it the
/// namespace's view of /sys).
pub(crate) fn command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

/// `ip -json <args>` in `ns`, parsed.
pub(crate) fn ip_json(ns: &str, args: &[&str]) -> Result<serde_json::Value> {
    let out = run(Command::new("ip").args(["-n", ns, "-json"]).args(args))?;
    // iproute2 prints nothing at all (not `[]`) for some empty dumps.
    if out.trim().is_empty() {
        return Ok(serde_json::Value::Array(vec![]));
    }
    serde_json::from_str(&out)
        .with_context(|| format!("parsing `ip -json {}` in {ns}", args.join(" ")))
}

/// Runs `f` on a thread that has entered `ns`. Sockets opened there stay in `ns` when
/// used from any other thread; the thread ends with `f`, so nothing lingers inside.
pub(crate) fn enter<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = path(ns);
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {ns}"))?;
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Writes a sysctl of `ns` (under /proc/sys/net, they belong to the namespace of the
/// thread that opens them), e.g. `sysctl(ns, "net/ipv4/ip_forward", "1")`.
pub(crate) fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    enter(ns, || {
        std::fs::write(format!("/proc/sys/{key}"), value)
            .with_context(|| format!("setting {key} to {value} in {ns}"))
    })
}

/// The kernel's time between two neighbour probes (`retrans_time_ms`'s default).
const NEIGHBOUR_PROBE_INTERVAL_MS: u32 = 1000;

/// Under emulation (an [`interrupt::slowdown`] above 1), gives every device of `ns`
/// that resolves neighbours that many times the kernel's second between probes. The
/// emulated machine stands still for seconds at a time: a neighbour's three probes, a
/// second apart, then go unanswered, its entry fails and the packets queued behind it
/// are discarded (`res_failed` and `unresolved_discards` in /proc/net/stat/arp_cache),
/// which no real node's stalls cause. A namespace has no `default` entry to set:
/// device by device, once they exist.
pub(crate) fn patient_neighbour_probes(ns: &str) -> Result<()> {
    let factor = interrupt::slowdown();
    if factor == 1 {
        return Ok(());
    }
    let interval = (NEIGHBOUR_PROBE_INTERVAL_MS * factor).to_string();
    enter(ns, || {
        for entry in std::fs::read_dir("/proc/sys/net/ipv4/neigh")? {
            let dir = entry?.path();
            if dir.ends_with("lo") {
                continue;
            }
            let file = dir.join("retrans_time_ms");
            std::fs::write(&file, &interval)
                .with_context(|| format!("setting {} in {ns}", file.display()))?;
        }
        Ok(())
    })
}

/// Turns on IPv4 forwarding in `ns`.
pub(crate) fn enable_forwarding(ns: &str) -> Result<()> {
    sysctl(ns, "net/ipv4/ip_forward", "1")
}

/// Link and address changes in one namespace, applied by a single `ip -batch`.
pub(crate) struct Script {
    ns: String,
    lines: Vec<String>,
}

impl Script {
    pub(crate) fn new(ns: &str) -> Self {
        Self {
            ns: ns.to_owned(),
            lines: vec!["link set lo up".into()],
        }
    }

    fn line(&mut self, line: String) -> &mut Self {
        self.lines.push(line);
        self
    }

    /// A veth pair: `name` here, `peer` created directly in `peer_ns`. Both ends get
    /// `mtu`; `mac` is this end's address (kernel-chosen when None).
    pub(crate) fn veth(
        &mut self,
        name: &str,
        mac: Option<[u8; 6]>,
        peer: &str,
        peer_ns: &str,
        mtu: Option<u32>,
    ) -> Result<&mut Self> {
        check_ifname(name)?;
        check_ifname(peer)?;
        let mtu = mtu.map(|m| format!(" mtu {m}")).unwrap_or_default();
        let mac = mac
            .map(|m| format!(" address {}", format_mac(m)))
            .unwrap_or_default();
        Ok(self.line(format!(
            "link add {name}{mac}{mtu} type veth peer name {peer}{mtu} netns {peer_ns}"
        )))
    }

    pub(crate) fn bridge(&mut self, name: &str, mtu: Option<u32>) -> Result<&mut Self> {
        check_ifname(name)?;
        let mtu = mtu.map(|m| format!(" mtu {m}")).unwrap_or_default();
        Ok(self
            .line(format!("link add {name}{mtu} type bridge"))
            .up(name))
    }

    /// Brings up `port`, enslaved to `bridge`.
    pub(crate) fn attach(&mut self, port: &str, bridge: &str) -> &mut Self {
        self.line(format!("link set {port} master {bridge} up"))
    }

    pub(crate) fn up(&mut self, dev: &str) -> &mut Self {
        self.line(format!("link set {dev} up"))
    }

    pub(crate) fn address(&mut self, address: Ipv4Net, dev: &str) -> &mut Self {
        self.line(format!("address add {address} dev {dev}"))
    }

    /// `to` on the link of `dev` (no gateway).
    pub(crate) fn route(&mut self, to: Ipv4Net, dev: &str) -> &mut Self {
        self.line(format!("route add {to} dev {dev}"))
    }

    pub(crate) fn default_route(&mut self, via: Ipv4Addr) -> &mut Self {
        self.line(format!("route add default via {via}"))
    }

    pub(crate) fn apply(&self) -> Result<()> {
        let script = self.lines.join("\n") + "\n";
        run_with_input(
            Command::new("ip").args(["-n", &self.ns, "-batch", "-"]),
            &script,
        )
        .map(drop)
    }
}

/// Runs `cmd` with `input` on its standard input (a script for `ip -batch`, `nft -f -`,
/// `iptables-restore`, `ipset restore`); a failure carries the tool's message and the
/// input line it names.
pub(crate) fn run_with_input(cmd: &mut Command, input: &str) -> Result<String> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    let mut stdin = child.stdin.take().context("stdin is piped")?;
    // A tool that fails early closes its input: its stderr says why, not the pipe.
    let written = stdin.write_all(input.as_bytes());
    drop(stdin);
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        let line = failing_line(&stderr)
            .and_then(|n| input.lines().nth(n - 1))
            .map(|l| format!("\nthat line: {l}"))
            .unwrap_or_default();
        bail!("{shown} failed ({}): {stderr}{line}", out.status);
    }
    written.with_context(|| format!("writing to {shown}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The input line a tool's error names: iptables-restore says "line 12 failed", nft
/// "/dev/stdin:12:1-5: Error", ip -batch "Command failed -:12".
fn failing_line(stderr: &str) -> Option<usize> {
    let digits = |s: &str| -> Option<usize> {
        let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        s[..end].parse().ok().filter(|&n| n > 0)
    };
    if let Some(at) = stderr.find("line ") {
        return digits(&stderr[at + 5..]);
    }
    [("/dev/stdin:", 11), ("failed -:", 9)]
        .iter()
        .find_map(|(marker, len)| {
            stderr
                .find(marker)
                .and_then(|at| digits(&stderr[at + len..]))
        })
}

fn check_ifname(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty() && name.len() <= IFNAME_MAX,
        "interface name {name:?} is longer than {IFNAME_MAX} characters"
    );
    Ok(())
}

fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// The MAC address docker gives a container with `address` (02:42 + the IPv4
/// address): captures then read like the walkthrough's.
pub(crate) fn docker_mac(address: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = address.octets();
    [0x02, 0x42, a, b, c, d]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_errors_name_the_failing_line() {
        assert_eq!(failing_line("iptables-restore: line 12 failed"), Some(12));
        assert_eq!(
            failing_line("/dev/stdin:7:1-3: Error: syntax error"),
            Some(7)
        );
        assert_eq!(
            failing_line("ipset v7.17: Error in line 3: Set cannot be created"),
            Some(3)
        );
        assert_eq!(
            failing_line("RTNETLINK answers: File exists\nCommand failed -:4"),
            Some(4)
        );
        assert_eq!(failing_line("permission denied"), None);
    }

    #[test]
    fn a_failing_tool_names_the_line_it_failed_on() {
        let e = run_with_input(
            Command::new("sh").args(["-c", "cat >/dev/null; echo 'line 2 failed' >&2; exit 1"]),
            "first\nsecond\n",
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("that line: second"), "{e:#}");
        let out = run_with_input(&mut Command::new("cat"), "echoed").unwrap();
        assert_eq!(out, "echoed");
    }
}
