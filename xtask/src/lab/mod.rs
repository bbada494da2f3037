//! Placeholder: replaced by the lab implementation.
use anyhow::Result;

#[derive(clap::Args)]
pub struct LabArgs {}

pub fn run(_args: LabArgs) -> Result<()> {
    anyhow::bail!("lab: not implemented yet")
}
