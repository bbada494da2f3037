//! The tables the legacy iptables backend (x_tables) holds in this network namespace,
//! from `/proc/net/ip_tables_names`: that backend tells nobody of its changes, so the
//! fast path stays off while it holds tables, and flanneld's rules are looked for in
//! it only when it holds them.

use std::{io, path::Path};

use anyhow::{Context as _, Result};

/// The legacy backend's tables in use in this network namespace.
pub const LEGACY_TABLES: &str = "/proc/net/ip_tables_names";

/// The tables the legacy iptables backend holds in this network namespace (the file
/// is absent on kernels built without it).
pub fn legacy_tables(path: &Path) -> Result<Vec<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.lines().map(str::to_owned).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_tables_are_the_lines_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ip_tables_names");
        assert!(legacy_tables(&file).unwrap().is_empty(), "absent");
        std::fs::write(&file, "").unwrap();
        assert!(legacy_tables(&file).unwrap().is_empty());
        std::fs::write(&file, "nat\nfilter\n").unwrap();
        assert_eq!(legacy_tables(&file).unwrap(), ["nat", "filter"]);
    }
}
