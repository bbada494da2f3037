use anyhow::Result;

pub fn ensure() -> Result<()> {
    Ok(())
}
