//! Developer commands: `cargo xtask lab`, `cargo xtask test`, `cargo xtask run`.

mod bench;
mod deps;
mod lab;
mod pins;
mod run;
mod test;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, explore and test the overlay dataplane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A multi-node cluster made of network namespaces, running the dataplane.
    Lab(lab::LabArgs),
    /// Install what is missing, then run every test: unit, packet and namespace tests.
    Test(test::TestArgs),
    /// Build overlay-agent and run it here as root (through sudo when not root), e.g.
    /// on a kind node: `cargo xtask run -- run --kube-subnet-mgr --ip-masq`.
    Run(run::RunArgs),
    /// Run a command inside a VM booted with another kernel (Debian's, fetched and
    /// cached), on this machine's root filesystem.
    Vm(vm::VmArgs),
    /// The kernel matrix: the packet tests, the lab and the interoperability test on
    /// this machine's kernel, then inside a VM on each kernel of the matrix.
    Kernels(test::KernelsArgs),
    /// Our dataplane side by side with flannel's kernel backends (in a VM when this
    /// kernel has no ipip); writes docs/BENCHMARKS.md and docs/benchmarks.png.
    Bench(bench::BenchArgs),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Lab(args) => lab::run(args),
        Command::Test(args) => test::run(args),
        Command::Run(args) => run::run(args),
        Command::Vm(args) => vm::run(args),
        Command::Kernels(args) => test::kernels(args),
        Command::Bench(args) => bench::run(args),
    }
}
