//! What the running kernel offers the datapath, decided once for the agent and the
//! lab alike.

use aya::util::KernelVersion;

/// The first kernel (major, minor) with TCX links.
const TCX: (u8, u8) = (6, 6);

/// Whether programs attach through TCX links (6.6+) rather than cls_bpf filters.
pub fn has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(TCX.0, TCX.1, 0))
}

/// Whether the kernel `release` names (`uname -r`: `6.12.118+deb12-amd64`,
/// `6.1.0-56-amd64`) has TCX links: for a kernel other than the running one, such as
/// a VM's. False for a release that names no version.
pub fn release_has_tcx(release: &str) -> bool {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(str::parse::<u32>);
    match (numbers.next(), numbers.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= (TCX.0.into(), TCX.1.into()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcx_is_read_from_a_release() {
        for (release, tcx) in [
            ("6.1.0-56-amd64", false),
            ("6.5.13", false),
            ("6.6.0", true),
            ("6.12.118+deb12-amd64", true),
            ("6.18.1-cloud", true),
            ("7.0.0", true),
            ("5.15.0-91-generic", false),
            ("", false),
            ("linux", false),
        ] {
            assert_eq!(release_has_tcx(release), tcx, "{release}");
        }
    }
}
