//! The overlay agent: loads the datapath, learns the nodes, and keeps the maps and the
//! host's routes in step with them.

pub mod agent;
pub mod bpf_log;
pub mod bpffs;
pub mod cleanup;
pub mod datapath;
pub mod fast_path;
pub mod flanneld_args;
pub mod host;
pub mod http;
pub mod inspect;
pub mod masq;
pub mod metrics;
pub mod net_conf;
pub mod nodes;
pub mod pods;
pub mod reconcile;
pub mod status;
pub mod subnet_env;
