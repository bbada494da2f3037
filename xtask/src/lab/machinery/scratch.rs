//! Network namespaces for root tests (`olab-t<random>-<host>`), removed when dropped.

use std::hash::{BuildHasher as _, Hasher as _};

use anyhow::Result;

use super::netns;

pub(crate) struct Scratch {
    prefix: String,
    created: Vec<String>,
}

impl Scratch {
    /// `olab-t<random>-<host>` for each of `hosts`.
    pub(crate) fn new(hosts: &[&str]) -> Result<Self> {
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let mut scratch = Self {
            prefix: format!("olab-t{:06x}-", random & 0xff_ffff),
            created: Vec::new(),
        };
        for host in hosts {
            let ns = scratch.ns(host);
            netns::add(&ns)?;
            scratch.created.push(ns);
        }
        Ok(scratch)
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(crate) fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.prefix)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for ns in &self.created {
            if let Err(e) = netns::delete(ns) {
                eprintln!("removing {ns}: {e:#}");
            }
        }
    }
}
