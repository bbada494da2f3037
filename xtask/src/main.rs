//! Developer commands: `cargo xtask lab`, `cargo xtask test`.

mod deps;
mod lab;
mod test;

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
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Lab(args) => lab::run(args),
        Command::Test(args) => test::run(args),
    }
}
