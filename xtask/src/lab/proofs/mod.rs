//! What the lab proves, one module per subject, each on a running lab built by the
//! machinery (`lab::machinery`): matrix (pod connectivity), capture (cross-node traffic
//! is IPIP on the wire), controls (without the overlay the same paths fail),
//! forward_policy (`--iptables-forward-rules` under a FORWARD policy of DROP),
//! public_ip (a node reached at a public IP that is not its own), masquerade (pods
//! reach the outside behind their node's address, rule by rule, under load, and exactly
//! where flanneld's own iptables rules let them), restart (restarts and upgrades lose
//! nothing), migrate (`--migrate`: from flanneld to the agent and back under numbered
//! traffic) and kubernetes (Services, cluster DNS, hostPort and NetworkPolicy under
//! kube-proxy's rules, against kernel forwarding).

pub(crate) mod capture;
pub(crate) mod controls;
pub(crate) mod forward_policy;
pub(crate) mod kubernetes;
pub(crate) mod masquerade;
pub(crate) mod matrix;
pub(crate) mod migrate;
pub(crate) mod public_ip;
pub(crate) mod restart;
