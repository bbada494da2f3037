//! The lab's machinery: what builds a lab, runs it and talks across it, with no
//! verdict of its own (the proofs, `lab::proofs`, give those).
//!
//! topology (the cluster as data), netns (namespaces and links), state (a lab on disk), guard
//! (claiming a lab and removing it), cluster (building it), cni (its pods, through the real CNI
//! plugins), agents (the overlay agents), processes (finding and stopping the
//! lab's processes), flannel (flannel's kernel backends),
//! servers, dns, etcd (with etcd_member, its TLS and command line) and router (the servers and routes a lab
//! runs), scratch
//! (namespaces for root tests), probe and
//! parallel (one probe, and many a few at a time), interrupt (Ctrl-C and waiting),
//! kernel_drops (what the kernel dropped, to place a loss) and text_table (aligned
//! plain-text tables).

pub(crate) mod agents;
pub(crate) mod cluster;
pub(crate) mod cni;
pub(crate) mod dns;
pub(crate) mod etcd;
pub(crate) mod etcd_member;
pub(crate) mod flannel;
pub(crate) mod guard;
pub(crate) mod interrupt;
pub(crate) mod kernel_drops;
pub(crate) mod netns;
pub(crate) mod parallel;
pub(crate) mod probe;
pub(crate) mod processes;
pub(crate) mod router;
#[cfg(test)]
pub(crate) mod scratch;
pub(crate) mod servers;
pub(crate) mod state;
pub(crate) mod text_table;
pub(crate) mod topology;
