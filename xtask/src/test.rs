//! `cargo xtask test`: everything, from a fresh machine; `--kernel 6.1` runs the
//! kernel-dependent suites (packet tests, the lab, interoperability with the kernel's
//! ipip, on the lab's node list and on etcd, and the migration from flanneld and back)
//! inside a VM with that kernel instead. `cargo xtask kernels` runs those suites on
//! this machine's kernel and then on every kernel of the matrix, and prints the
//! matrix.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    deps,
    lab::machinery::{agents::PREBUILT_AGENT, text_table::Table},
    pins,
    vm::{self, kernel::KERNELS},
};

#[derive(clap::Args)]
pub(crate) struct TestArgs {
    /// Run the kernel-dependent suites (packet tests, lab, interoperability, migration)
    /// inside a VM with this kernel (`cargo xtask kernels --list`) instead of every
    /// test here.
    #[arg(long)]
    kernel: Option<String>,
    /// Extra arguments for `cargo test` (e.g. a test name filter), after `--`.
    #[arg(last = true)]
    cargo_args: Vec<String>,
}

#[derive(clap::Args)]
pub(crate) struct KernelsArgs {
    /// List the kernels of the matrix and exit.
    #[arg(long)]
    list: bool,
    /// Only the VM kernels, not this machine's.
    #[arg(long)]
    skip_host: bool,
}

/// One VM run may take this long. Under emulation on two CPUs the packet tests take
/// some 25 minutes, the lab some 10 before its Kubernetes section, and that section
/// some 9 for each of kube-proxy's three modes; the migration some 15.
const VM_TIMEOUT: Duration = Duration::from_secs(120 * 60);

pub(crate) fn run(args: TestArgs) -> Result<()> {
    deps::ensure()?;
    // Packet tests load BPF programs and the lab builds namespaces: both need root.
    if !deps::is_root() {
        bail!(
            "the tests load BPF programs and create network namespaces: run `cargo xtask test` as root"
        );
    }
    if let Some(kernel) = args.kernel {
        let suites = Suites::build()?;
        let outcome = suites.in_vm(&kernel)?;
        print!("{}", Matrix(vec![outcome.clone()]));
        return outcome.verdict();
    }
    // The gates first, cheapest first: formatting (every member), then clippy on the
    // default members, then on the eBPF crate, which builds only for the BPF target with
    // its pinned nightly (overlay-agent's build script builds it so): every warning an
    // error.
    if args.cargo_args.is_empty() {
        deps::run(Command::new(env!("CARGO")).args(["fmt", "--all", "--check"]))?;
        deps::run(Command::new(env!("CARGO")).args([
            "clippy",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
        // rustup's `cargo`, which takes the toolchain; without this cargo's RUSTC, as
        // aya-build's call does.
        deps::run(
            Command::new("cargo")
                .arg(format!("+{}", pins::nightly()))
                .args([
                    "clippy",
                    "-p",
                    "overlay-ebpf",
                    "--target",
                    "bpfel-unknown-none",
                ])
                .args(["-Z", "build-std=core", "--", "-D", "warnings"])
                .env_remove("RUSTC")
                .env_remove("RUSTC_WORKSPACE_WRAPPER"),
        )?;
    }
    deps::run(
        Command::new(env!("CARGO"))
            .arg("test")
            .args(&args.cargo_args),
    )?;
    eprintln!("all tests passed");
    Ok(())
}

pub(crate) fn kernels(args: KernelsArgs) -> Result<()> {
    if args.list {
        for k in KERNELS {
            println!(
                "{:6} {} (pinned {}, else {})",
                k.name, k.why, k.pinned, k.meta
            );
        }
        return Ok(());
    }
    deps::ensure()?;
    if !deps::is_root() {
        bail!("the kernel matrix loads BPF programs and creates namespaces: run it as root");
    }
    let suites = Suites::build()?;
    let mut matrix = Matrix(Vec::new());
    if !args.skip_host {
        matrix.0.push(suites.here()?);
    }
    for kernel in KERNELS {
        matrix.0.push(suites.in_vm(kernel.name)?);
    }
    print!("\n{matrix}");
    let failed: Vec<&str> = matrix
        .0
        .iter()
        .filter(|o| !o.passed())
        .map(|o| o.kernel.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("the kernel matrix is red on: {}", failed.join(", "));
    }
    println!("the kernel matrix is green");
    Ok(())
}

/// The kernel-dependent suites, built here as executables that run unchanged in a VM
/// (whose view of the workspace is read-only).
struct Suites {
    agent: PathBuf,
    /// The packet tests (`overlay-agent/tests/datapath`).
    packet: PathBuf,
    /// xtask's own tests: the lab tests and the interoperability test.
    xtask: PathBuf,
}

/// The suites in the order they run.
const SUITES: [&str; 4] = ["packet tests", "lab", "interop", "migration"];
/// The status recorded for a suite this kernel cannot run.
const SKIPPED: i32 = -1;

/// What a kernel has that some suites need.
#[derive(Debug, Clone, Copy)]
struct Features {
    /// The ipip module: the kernel's own tunnel, as flanneld's ipip backend uses it.
    ipip: bool,
    /// TCX links (6.6 and later).
    tcx: bool,
}

impl Features {
    fn of(release: &str, ipip: bool) -> Self {
        Self {
            ipip,
            tcx: overlay_common::kernel::release_has_tcx(release),
        }
    }

    /// Why a kernel with these features cannot run `suite`, if it cannot. The
    /// migration needs flanneld's ipip device, and TCX: without it the agent's first
    /// attachment adds a clsact qdisc, whose graft loses what the device sends
    /// meanwhile (docs/KERNELS.md), so the proof that nothing is lost cannot hold.
    fn lacks(self, suite: &str) -> Option<&'static str> {
        match suite {
            "interop" | "migration" if !self.ipip => Some("no ipip module"),
            "migration" if !self.tcx => Some("no TCX: the clsact graft loses packets"),
            _ => None,
        }
    }
}

impl Suites {
    fn build() -> Result<Self> {
        let agent = crate::lab::machinery::agents::build(false)?;
        let packet = test_executable(&["-p", "overlay-agent", "--test", "datapath"])?;
        let xtask = test_executable(&["-p", "xtask", "--bin", "xtask"])?;
        Ok(Self {
            agent,
            packet,
            xtask,
        })
    }

    /// A shell script that runs every suite, records `name|status|seconds` for each
    /// in `$RESULTS`, and always runs to its end. A suite the kernel's `features` do
    /// not allow is recorded as skipped, with the reason.
    fn script(&self, features: Features) -> String {
        let commands = [
            format!("{}", self.packet.display()),
            // The lab test builds a cluster of its own: one at a time. The lab on etcd
            // changes only where the subnets come from, nothing the kernel decides: it
            // runs on this machine's kernel, which keeps the emulated run within its
            // time limit.
            format!(
                "env {PREBUILT_AGENT}={} {} lab::tests::lab_passes --test-threads 1 --nocapture",
                self.agent.display(),
                self.xtask.display()
            ),
            format!(
                "env {PREBUILT_AGENT}={} {} vm::interop --test-threads 1 --nocapture",
                self.agent.display(),
                self.xtask.display()
            ),
            format!(
                "env {PREBUILT_AGENT}={} {} lab::tests::migration --test-threads 1 --nocapture",
                self.agent.display(),
                self.xtask.display()
            ),
        ];
        let mut script = String::from(
            "step() { name=\"$1\"; shift; start=$(date +%s); echo \"━━ $name: $*\"; \"$@\"; rc=$?; \
             echo \"$name|$rc|$(( $(date +%s) - start ))\" >> \"$RESULTS\"; }\n\
             export RUST_BACKTRACE=0\n",
        );
        for (name, command) in SUITES.iter().zip(commands) {
            if let Some(why) = features.lacks(name) {
                let _ = writeln!(script, "echo '{name}|{SKIPPED}|0|{why}' >> \"$RESULTS\"");
                continue;
            }
            let _ = writeln!(script, "step '{name}' {command}");
        }
        script.push_str("true\n");
        script
    }

    /// The suites on this machine's kernel.
    fn here(&self) -> Result<Outcome> {
        println!("━━ kernel matrix: this machine's kernel");
        let results = tempfile_path("results")?;
        let _ = std::fs::remove_file(&results);
        let release = deps::output(Command::new("uname").arg("-r"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        let started = Instant::now();
        deps::run(
            Command::new("sh")
                .arg("-c")
                .arg(self.script(Features::of(&release, vm::has_ipip())))
                .env("RESULTS", &results),
        )?;
        let outcome = Outcome::read(format!("host {release}"), &results, started.elapsed());
        let _ = std::fs::remove_file(&results);
        outcome
    }

    /// The suites inside a VM booted with `kernel`.
    fn in_vm(&self, kernel: &str) -> Result<Outcome> {
        println!("━━ kernel matrix: {kernel} in a VM");
        let vm = vm::Vm::prepare(kernel)?;
        // Every kernel of the matrix has the ipip module (see vm::kernel::KERNELS).
        let features = Features::of(&vm.kernel.release, true);
        let script = format!("RESULTS=$VM_SHARED/results\n{}", self.script(features));
        let done = vm.run(&script, VM_TIMEOUT)?;
        let outcome = Outcome::read(
            format!("{} (VM)", vm.kernel.release),
            &done.shared.join("results"),
            done.elapsed,
        )?;
        done.remove()?;
        Ok(outcome)
    }
}

/// The executable `cargo test --no-run <args>` builds.
pub(crate) fn test_executable(args: &[&str]) -> Result<PathBuf> {
    let out = crate::lab::machinery::netns::run(
        Command::new(env!("CARGO"))
            .current_dir(vm::workspace())
            .args(["test", "--no-run", "--message-format=json"])
            .args(args),
    )?;
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["profile"]["test"] == true
            && let Some(exe) = msg["executable"].as_str()
        {
            return Ok(PathBuf::from(exe));
        }
    }
    bail!(
        "cargo test --no-run {} built no test executable",
        args.join(" ")
    )
}

fn tempfile_path(name: &str) -> Result<PathBuf> {
    let dir = deps::cache_dir()?.join("matrix");
    std::fs::create_dir_all(&dir)?;
    Ok(dir.join(format!("{name}-{}", std::process::id())))
}

/// What the suites did on one kernel.
#[derive(Debug, Clone)]
struct Outcome {
    kernel: String,
    /// (suite, exit status, seconds, why it was skipped); a suite that did not report
    /// is missing.
    suites: Vec<(String, i32, u64, String)>,
    elapsed: Duration,
}

impl Outcome {
    fn read(kernel: String, results: &Path, elapsed: Duration) -> Result<Self> {
        let text = std::fs::read_to_string(results)
            .with_context(|| format!("no results in {}", results.display()))?;
        let suites = text
            .lines()
            .filter_map(|l| {
                let mut f = l.split('|');
                Some((
                    f.next()?.to_owned(),
                    f.next()?.parse().ok()?,
                    f.next()?.parse().ok()?,
                    f.next().unwrap_or_default().to_owned(),
                ))
            })
            .collect();
        Ok(Self {
            kernel,
            suites,
            elapsed,
        })
    }

    fn passed(&self) -> bool {
        SUITES.iter().all(|s| {
            self.suites
                .iter()
                .any(|(n, rc, ..)| n == s && (*rc == 0 || *rc == SKIPPED))
        })
    }

    fn verdict(&self) -> Result<()> {
        if self.passed() {
            println!("all suites passed on {}", self.kernel);
            return Ok(());
        }
        bail!("suites failed on {}", self.kernel)
    }
}

struct Matrix(Vec<Outcome>);

impl std::fmt::Display for Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut header = vec!["KERNEL".to_owned()];
        header.extend(SUITES.iter().map(|s| s.to_uppercase()));
        header.push("TOTAL".to_owned());
        let mut table = Table::new(header);
        for o in &self.0 {
            let mut row = vec![o.kernel.clone()];
            for suite in SUITES {
                row.push(match o.suites.iter().find(|(n, ..)| n == suite) {
                    Some((_, 0, secs, _)) => format!("pass ({secs} s)"),
                    Some((_, SKIPPED, _, why)) => format!("skipped ({why})"),
                    Some((_, rc, secs, _)) => format!("✗ FAIL, status {rc} ({secs} s)"),
                    None => "✗ did not run".to_owned(),
                });
            }
            row.push(format!("{:.0} s", o.elapsed.as_secs_f64()));
            table.row(row);
        }
        write!(f, "{table}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_suite_is_skipped_where_the_kernel_lacks_what_it_needs() {
        let lacks = |release, ipip| SUITES.map(|s| Features::of(release, ipip).lacks(s));
        let no_tcx = Some("no TCX: the clsact graft loses packets");
        let no_ipip = Some("no ipip module");
        assert_eq!(lacks("6.12.118+deb12-amd64", true), [None; 4]);
        assert_eq!(lacks("6.1.0-56-amd64", true), [None, None, None, no_tcx]);
        assert_eq!(lacks("6.18.1", false), [None, None, no_ipip, no_ipip]);
    }
}
