//! `cargo xtask test`: everything, from a fresh machine.

use std::process::Command;

use anyhow::{Result, bail};

use crate::deps;

#[derive(clap::Args)]
pub struct TestArgs {
    /// Extra arguments for `cargo test` (e.g. a test name filter), after `--`.
    #[arg(last = true)]
    cargo_args: Vec<String>,
}

pub fn run(args: TestArgs) -> Result<()> {
    deps::ensure()?;
    // Packet tests load BPF programs and the lab builds namespaces: both need root.
    if !deps::is_root() {
        bail!(
            "the tests load BPF programs and create network namespaces: run `cargo xtask test` as root"
        );
    }
    // The default members: the eBPF crate only builds for the BPF target, through
    // overlay-agent's build script.
    deps::run(
        Command::new(env!("CARGO"))
            .arg("test")
            .args(&args.cargo_args),
    )?;
    eprintln!("all tests passed");
    Ok(())
}
