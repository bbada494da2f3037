//! The Kubernetes API node source against a fake of the API server's HTTP API, the
//! whole agent against it (needs root), and a benchmark of that (ignored: prints
//! figures).

#[path = "support/agent.rs"]
mod agent;

mod kube_api {
    // Support.
    mod fake;
    mod harness;
    mod nodes;

    // Tests.
    mod annotations;
    mod bench;
    mod condition;
    mod flanneld;
    mod source;
    mod whole_agent;
}
