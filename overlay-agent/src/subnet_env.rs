//! `/run/flannel/subnet.env`, which the flannel CNI plugin reads on every pod start.
//! Written as flanneld's `WriteSubnetFile` writes it (flannel-io/flannel v0.28.9
//! `pkg/subnet/subnet.go`, `writefile_other.go`): its directory created with mode
//! 0755, the file replaced atomically (renameio) with mode 0644 whatever the umask.

use std::{
    fs::{DirBuilder, Permissions},
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::Path,
};

use anyhow::{Context as _, Result};
use ipnet::Ipv4Net;
pub use overlay_common::subnet_env::{SubnetEnv, gateway};

/// Writes `env` to `path` atomically: the CNI plugin must never read half of it.
pub fn write(env: &SubnetEnv, path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    // The temporary file is 0600; set (not masked) as flanneld's file is.
    tmp.as_file()
        .set_permissions(Permissions::from_mode(0o644))
        .with_context(|| format!("setting the mode of a file in {}", dir.display()))?;
    tmp.write_all(env.to_string().as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// The node subnet of the file at `path` (its `FLANNEL_SUBNET`), if there is a readable
/// one: flannel's etcd subnet manager leases it again when it is still free.
pub fn read_subnet(path: &Path) -> Option<Ipv4Net> {
    overlay_common::subnet_env::pod_cidr_of(&std::fs::read_to_string(path).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The process's umask, read without changing it (Linux 4.7+).
    fn umask() -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
        u32::from_str_radix(line["Umask:".len()..].trim(), 8).unwrap()
    }

    #[test]
    fn atomic_write_with_flanneld_s_modes() {
        let env = SubnetEnv::new(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
            1480,
            false,
        );
        let text = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1480\nFLANNEL_IPMASQ=false\n";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flannel/subnet.env");
        assert_eq!(read_subnet(&path), None);
        write(&env, &path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        assert_eq!(read_subnet(&path), Some("10.244.1.0/24".parse().unwrap()));
        // Readable by all, as flanneld leaves it: the CNI plugin need not run as root.
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&path), 0o644);
        assert_eq!(mode(path.parent().unwrap()), 0o755 & !umask());
        // Only the file itself remains: no temporary leftovers.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }
}
