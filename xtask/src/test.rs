use anyhow::Result;

#[derive(clap::Args)]
pub struct TestArgs {}

pub fn run(_args: TestArgs) -> Result<()> {
    crate::deps::ensure()?;
    anyhow::bail!("test: not implemented yet")
}
