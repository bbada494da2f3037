//! The BPF filesystem where maps are pinned, so that inspection commands (and later
//! agent runs) find them.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use overlay_common::maps::LAYOUT_VERSION;

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// The pin directory for this build's map layout under the bpffs at `root`.
pub fn pin_dir(root: &Path) -> PathBuf {
    root.join("overlay-ipip").join(format!("v{LAYOUT_VERSION}"))
}

/// Every layout version's directory next to `version_dir` (which comes first), so
/// that an upgrade finds what an earlier build pinned.
pub fn version_dirs(version_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs = vec![version_dir.to_path_buf()];
    let Some(parent) = version_dir.parent() else {
        return Ok(dirs);
    };
    let entries = match std::fs::read_dir(parent) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(dirs),
        Err(e) => return Err(e).with_context(|| format!("listing {}", parent.display())),
    };
    for entry in entries {
        let path = entry?.path();
        let is_version = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix('v'))
            .is_some_and(|v| v.parse::<u32>().is_ok());
        if is_version && path != version_dir {
            dirs.push(path);
        }
    }
    Ok(dirs)
}

/// Removes what builds with other layouts pinned: once this build's programs have
/// taken over the links, their maps serve nothing.
pub fn remove_other_versions(version_dir: &Path) -> Result<Vec<PathBuf>> {
    let others: Vec<PathBuf> = version_dirs(version_dir)?.into_iter().skip(1).collect();
    for dir in &others {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(others)
}

fn is_bpffs(path: &Path) -> Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: `statfs` is a plain C struct of integers, for which all zeroes is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` writable, both for the call's duration.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Makes sure `root` is (inside) a bpffs, mounting one there if it is not, and returns
/// the pin directory for this layout, created.
pub fn prepare(root: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    if !is_bpffs(root)? {
        let src = CString::new("bpf")?;
        let target = CString::new(root.as_os_str().as_bytes())?;
        // SAFETY: every pointer is a NUL-terminated string that outlives the call, or
        // null for no data.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| {
                format!("mounting bpffs at {} (needs CAP_SYS_ADMIN)", root.display())
            });
        }
        if !is_bpffs(root)? {
            bail!("{} is still not a bpffs after mounting one", root.display());
        }
    }
    let dir = pin_dir(root);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
