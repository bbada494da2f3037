//! `cargo xtask bench`: our dataplane side by side with flannel's kernel backends (ipip
//! as flanneld sets it up, VXLAN, host-gw) and, for masquerade, with flanneld's iptables
//! rules, on the same two-node cluster, one after another in one run; plus the
//! per-packet cost of each program from `BPF_PROG_TEST_RUN`. Writes the tables into
//! docs/BENCHMARKS.md, a plot into docs/benchmarks.png and every sample into
//! docs/benchmarks.json (`--redraw` writes the first two again from it).
//!
//! A kernel without the ipip module cannot give the tunl0 baseline:
//! then every dataplane runs inside a VM with Debian's kernel (`vm`), automatically,
//! and then again on this kernel, less tunl0 (the datapath on a current kernel); the
//! microbenchmark runs on both.
//!
//! Layout: measure (clusters and the run plan), node (the netfilter rules of a
//! Kubernetes node that every cluster's nodes carry: kube-proxy's and a NetworkPolicy
//! engine's), load (the generators: bulk streams, request/response, connections, UDP),
//! host (CPU time, machine, offloads), results (samples and summaries), report (the
//! markdown), plot (the image).

mod host;
mod load;
mod measure;
mod node;
mod plot;
mod report;
mod results;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use self::{
    report::Leg,
    results::{Cost, Results, parse_costs},
    setup::Plan,
};
use crate::{
    deps,
    lab::machinery::{agents::PREBUILT_AGENT, interrupt},
    vm::{self, Vm},
};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Place {
    /// In a VM when this machine's kernel has no ipip module, and here.
    Auto,
    /// Only on this machine's kernel (without tunl0 when it has no ipip module).
    Here,
    /// Only in a VM.
    Vm,
}

#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    /// Two short runs per measure: for development, not for publishing.
    #[arg(long)]
    quick: bool,
    /// Runs per measure (default 5; 2 with --quick).
    #[arg(long)]
    runs: Option<usize>,
    /// Seconds per run (default 2; 1 with --quick).
    #[arg(long)]
    seconds: Option<u64>,
    /// Where the dataplanes run.
    #[arg(long, value_enum, default_value = "auto")]
    on: Place,
    /// The VM's kernel (`cargo xtask kernels --list`).
    #[arg(long, default_value = "6.1")]
    kernel: String,
    /// TCP congestion control in every namespace of the clusters, on both kernels.
    #[arg(long = "tcp-cc", value_enum, default_value = "cubic")]
    congestion: setup::Congestion,
    #[command(flatten)]
    only: setup::Only,
    /// Print the report, but leave docs/ alone.
    #[arg(long)]
    no_write: bool,
    /// Measure nothing: write the report and the plot again from the last full run's
    /// results (docs/benchmarks.json), as the code now writes them.
    #[arg(long, conflicts_with_all = ["quick", "runs", "seconds", "no_write", "measure_into"])]
    redraw: bool,
    /// Run the measurements on this kernel and write the results (JSON) there: how
    /// the command runs itself inside the VM.
    #[arg(long, hide = true)]
    measure_into: Option<PathBuf>,
}

/// Parallel streams of the multi-stream throughput test.
const STREAMS: usize = 4;
/// The VM's share of a full run: its ten clusters (on the nine with nodes, each node's
/// netfilter rules take some 20 s to install under emulation) and some 14 minutes of
/// measurements (up to 11 measures × 7 setups, plus the masquerades, × runs × 2).
const VM_TIMEOUT: Duration = Duration::from_secs(90 * 60);
/// Runs per round of the microbenchmark, here and under emulation.
const COST_RUNS: u32 = 20_000;
const COST_RUNS_VM: u32 = 4_000;

pub(crate) fn run(args: BenchArgs) -> Result<()> {
    let docs = vm::workspace().join("docs");
    // Measures nothing: needs no privileges.
    if args.redraw {
        let saved = docs.join(RESULTS);
        let text = std::fs::read_to_string(&saved)
            .with_context(|| format!("reading {}", saved.display()))?;
        let report = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a saved run", saved.display()))?;
        return publish(&report, &docs);
    }
    if !deps::is_root() {
        bail!("the benchmark loads BPF programs and creates network namespaces: run it as root");
    }
    interrupt::install()?;
    let plan = Plan {
        runs: args.runs.unwrap_or(if args.quick { 2 } else { 5 }),
        seconds: args.seconds.unwrap_or(if args.quick { 1 } else { 2 }),
        streams: STREAMS,
        congestion: args.congestion,
    };
    if let Some(out) = &args.measure_into {
        let agent = crate::lab::machinery::agents::build(true)?;
        let results = measure::run(agent, plan, args.quick, &args.only)?;
        return std::fs::write(out, serde_json::to_vec_pretty(&results)?)
            .with_context(|| format!("writing {}", out.display()));
    }

    let started = Instant::now();
    deps::ensure()?;
    let in_vm = match args.on {
        Place::Auto => !vm::has_ipip(),
        Place::Vm => true,
        Place::Here => false,
    };
    let vm = if in_vm {
        println!("this kernel has no ipip module (or --on vm): the dataplanes run in a VM");
        Some(Vm::prepare(&args.kernel)?)
    } else {
        None
    };
    let staged = Staged::build()?;
    let mut legs = Vec::new();
    if let Some(vm) = &vm {
        let (results, costs) = in_the_vm(vm, &staged, &args, plan)?;
        legs.push(Leg {
            place: format!("a VM booted with {} under QEMU (TCG, no KVM)", vm.kernel),
            results,
            costs,
        });
    }
    // This kernel too, with what it can run (no tunl0 without the ipip module): the
    // datapath on a current kernel (TCX, the DECAP flags of bpf_skb_adjust_room).
    if !matches!(args.on, Place::Vm) {
        println!("━━ this machine's kernel");
        let costs_here = costs(&staged.run_costs(COST_RUNS))?;
        legs.push(Leg {
            place: "this machine".to_owned(),
            results: measure::run(staged.agent.clone(), plan, args.quick, &args.only)?,
            costs: costs_here,
        });
    }
    let report = report::Report {
        command: std::iter::once("cargo xtask bench".to_owned())
            .chain(std::env::args().skip(2))
            .collect::<Vec<_>>()
            .join(" "),
        date: deps::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
            .unwrap_or_default()
            .trim()
            .to_owned(),
        minutes: started.elapsed().as_secs_f64() / 60.0,
        host: host::Machine::here(),
        legs,
        plot: "benchmarks.png".to_owned(),
    };
    if args.no_write || args.only.partial() {
        println!("\n{}", report.markdown());
        return Ok(());
    }
    std::fs::create_dir_all(&docs)?;
    let saved = docs.join(RESULTS);
    std::fs::write(&saved, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", saved.display()))?;
    println!("wrote {}", saved.display());
    publish(&report, &docs)
}

/// The full run's results, beside its report.
const RESULTS: &str = "benchmarks.json";

/// Prints the report and writes it, with its plot, into `docs`.
fn publish(report: &report::Report, docs: &Path) -> Result<()> {
    println!("\n{}", report.markdown());
    let (md, plot) = (docs.join("BENCHMARKS.md"), docs.join(&report.plot));
    report.write(&md)?;
    plot::draw(&report.legs, &plot)?;
    println!("wrote {} and {}", md.display(), plot.display());
    Ok(())
}

/// The binaries the benchmark runs, copied out of the target directory: a build
/// started meanwhile cannot replace them under a running VM.
struct Staged {
    agent: PathBuf,
    /// The packet tests' executable, which holds the microbenchmark.
    packet_tests: PathBuf,
    xtask: PathBuf,
}

impl Staged {
    fn build() -> Result<Self> {
        let agent = crate::lab::machinery::agents::build(true)?;
        let packet_tests =
            crate::test::test_executable(&["-p", "overlay-agent", "--test", "datapath"])?;
        let xtask = std::env::current_exe().context("finding the xtask binary")?;
        let dir = deps::cache_dir()?
            .join("bench")
            .join(std::process::id().to_string());
        std::fs::create_dir_all(&dir)?;
        let stage = |from: &Path, name: &str| -> Result<PathBuf> {
            let to = dir.join(name);
            std::fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
            Ok(to)
        };
        Ok(Self {
            agent: stage(&agent, "overlay-agent")?,
            packet_tests: stage(&packet_tests, "packet-tests")?,
            xtask: stage(&xtask, "xtask")?,
        })
    }

    /// The shell command that runs the microbenchmark.
    fn run_costs(&self, runs: u32) -> String {
        format!(
            "PROG_COST_RUNS={runs} {} datapath::cost::cost_per_packet --exact --ignored --nocapture --test-threads 1",
            self.packet_tests.display()
        )
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(dir) = self.agent.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Runs the microbenchmark `command` here.
fn costs(command: &str) -> Result<Vec<Cost>> {
    let out = crate::lab::machinery::netns::run(Command::new("sh").arg("-c").arg(command))?;
    let costs = parse_costs(&out);
    if costs.is_empty() {
        bail!("the microbenchmark printed no PROG_COST line:\n{out}");
    }
    for c in &costs {
        println!("  {:12} {:16} {:8.1} ns", c.case, c.program, c.ns);
    }
    Ok(costs)
}

/// The microbenchmark and the measurements inside the VM.
fn in_the_vm(
    vm: &Vm,
    staged: &Staged,
    args: &BenchArgs,
    plan: Plan,
) -> Result<(Results, Vec<Cost>)> {
    let script = format!(
        "echo '━━ program cost on this kernel'\n\
         {costs} > $VM_SHARED/costs.txt 2>&1; grep PROG_COST $VM_SHARED/costs.txt\n\
         env {PREBUILT_AGENT}={agent} {xtask} bench --measure-into $VM_SHARED/results.json \
         --runs {runs} --seconds {seconds} --tcp-cc {cc}{quick}{only}\n",
        costs = staged.run_costs(COST_RUNS_VM),
        agent = staged.agent.display(),
        xtask = staged.xtask.display(),
        runs = plan.runs,
        seconds = plan.seconds,
        cc = plan.congestion.name(),
        quick = if args.quick { " --quick" } else { "" },
        only = args.only.flags(),
    );
    let done = vm.run(&script, VM_TIMEOUT)?;
    if done.status != 0 {
        bail!(
            "the benchmark failed in the VM (status {}); its files are in {}",
            done.status,
            done.shared.display()
        );
    }
    let results: Results = serde_json::from_slice(
        &std::fs::read(done.shared.join("results.json")).context("reading the VM's results")?,
    )?;
    let costs = parse_costs(&std::fs::read_to_string(done.shared.join("costs.txt"))?);
    done.remove()?;
    Ok((results, costs))
}
