//! The Kubernetes API node source against a fake of the API server's HTTP API, and a
//! benchmark of the whole agent against it (ignored: needs root, prints figures).

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
}
