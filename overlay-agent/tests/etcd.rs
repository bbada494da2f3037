//! The etcd subnet manager against a real etcd (Debian's etcd-server) in a network
//! namespace of each test's own. Needs root.

#[path = "support/agent.rs"]
mod agent;
/// The lab's recipe for etcd's certificates, shared as it is.
#[path = "../../xtask/src/lab/machinery/etcd_certs.rs"]
mod etcd_certs;

mod etcd {
    // Support.
    mod server;
    mod source;

    // Tests.
    mod bench;
    mod compaction;
    mod faults;
    mod leases;
    mod migration;
    mod outage;
    mod peers;
    mod security;
}
