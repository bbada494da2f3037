//! The etcd subnet manager against a real etcd (Debian's etcd-server) in a network
//! namespace of each test's own. Needs root.

#[path = "support/agent.rs"]
mod agent;
/// The lab's etcd member (certificates, command line), shared as it is.
#[path = "../../xtask/src/lab/machinery/etcd_member.rs"]
mod etcd_member;

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
