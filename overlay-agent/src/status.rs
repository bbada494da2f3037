//! What the agent knows of its own health, shared between the run loop, the node
//! source and whoever reports it (logs, HTTP endpoints).

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// The node source's health.
#[derive(Debug, Clone, Default)]
pub struct SourceHealth {
    /// The source delivered a complete node set and is following changes.
    pub synced: bool,
    /// The last error, while the source is failing.
    pub error: Option<String>,
    pub errors_total: u64,
}

impl SourceHealth {
    fn succeeded(&mut self) {
        self.synced = true;
        self.error = None;
    }

    fn failed(&mut self, error: String) {
        self.error = Some(error);
        self.errors_total += 1;
    }
}

/// The last reconcile pass.
#[derive(Debug, Clone)]
pub struct Convergence {
    pub at: Instant,
    pub took: Duration,
    /// The pass succeeded: maps and routes match the node set it was given.
    pub ok: bool,
    pub nodes: usize,
    pub remote_subnets: usize,
}

#[derive(Debug, Default)]
pub struct Status {
    source: Mutex<SourceHealth>,
    convergence: Mutex<Option<Convergence>>,
    /// The flannel annotations on this node's Node (Kubernetes API source), which
    /// tell the other nodes this node's tunnel address; `synced`: last seen in place.
    annotations: Mutex<SourceHealth>,
}

impl Status {
    pub fn source_synced(&self) {
        self.source.lock().unwrap().succeeded();
    }

    pub fn source_failed(&self, error: String) {
        self.source.lock().unwrap().failed(error);
    }

    pub fn annotations_published(&self) {
        self.annotations.lock().unwrap().succeeded();
    }

    pub fn annotations_failed(&self, error: String) {
        self.annotations.lock().unwrap().failed(error);
    }

    pub fn annotations(&self) -> SourceHealth {
        self.annotations.lock().unwrap().clone()
    }

    pub fn converged(&self, c: Convergence) {
        *self.convergence.lock().unwrap() = Some(c);
    }

    pub fn source(&self) -> SourceHealth {
        self.source.lock().unwrap().clone()
    }

    pub fn convergence(&self) -> Option<Convergence> {
        self.convergence.lock().unwrap().clone()
    }

    /// Ready: the node set is known and the last pass made the datapath match it.
    pub fn ready(&self) -> Result<(), String> {
        let source = self.source();
        if !source.synced {
            return Err(source
                .error
                .unwrap_or_else(|| "the node set is not known yet".into()));
        }
        match self.convergence() {
            Some(c) if c.ok => Ok(()),
            Some(_) => Err("the last reconcile pass failed".into()),
            None => Err("not converged yet".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_a_synced_source_and_a_good_pass() {
        let s = Status::default();
        assert!(s.ready().is_err());
        s.source_synced();
        assert_eq!(s.ready().unwrap_err(), "not converged yet");
        let pass = |ok| Convergence {
            at: Instant::now(),
            took: Duration::ZERO,
            ok,
            nodes: 4,
            remote_subnets: 3,
        };
        s.converged(pass(false));
        assert!(s.ready().is_err());
        s.converged(pass(true));
        assert!(s.ready().is_ok());
        // A failing source keeps the dataplane but is no longer "synced" only once it
        // re-lists; until then its error is visible while readiness holds.
        s.source_failed("watch: connection refused".into());
        assert_eq!(s.source().errors_total, 1);
    }
}
