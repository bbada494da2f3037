//! Types shared by the eBPF datapath and the userspace agent.
//!
//! Everything here crosses the kernel boundary through BPF maps, so every type is
//! `#[repr(C)]` with explicit padding and no implicit holes: both sides must agree
//! byte for byte. IPv4 addresses are stored as `[u8; 4]` in network byte order, exactly
//! as they appear on the wire, so the datapath never converts them.
#![no_std]

// The userspace side (agent, lab) has std; the datapath's build does not.
#[cfg(feature = "user")]
extern crate std;

pub mod config;
pub mod conntrack;
pub mod counters;
pub mod flows;
pub mod ip;
#[cfg(feature = "user")]
pub mod kernel;
pub mod maps;
#[cfg(feature = "user")]
pub mod subnet_env;

pub use config::DatapathConfig;
pub use counters::{Counter, Hook, Reason};
pub use maps::{PeerStats, Route};
