//! The reference the section compares with: the same nodes with kernel forwarding and no
//! agent, as the masquerade equivalence and the negative controls run it: flannel
//! host-gw routes between the nodes on the switch (the node behind the router is out of
//! their reach), and flanneld's own masquerade rules where the lab masquerades.
//!
//! One adaptation: the routes leave from the node's pod gateway, as the agent's do, so
//! that a node's own traffic to a remote pod has the same source on both sides.

use anyhow::Result;

use crate::lab::{
    machinery::{agents, state::LabState},
    proofs::{
        controls,
        masquerade::iptables::{FlannelRules, Variant},
    },
};

/// The lab under kernel forwarding for as long as this lives; dropping it puts the
/// agents back, as the lab runs them, and waits until they are ready.
pub(super) struct KernelForwarding<'a> {
    lab: &'a LabState,
    // Removed (by its own drop) before the agents return.
    rules: Option<FlannelRules<'a>>,
}

impl<'a> KernelForwarding<'a> {
    pub(super) fn switch(lab: &'a LabState) -> Result<Self> {
        // From here on, dropping `forwarding` restores the lab.
        let mut forwarding = Self { lab, rules: None };
        agents::stop_all(lab)?;
        for node in &lab.topology.nodes {
            agents::cleanup(lab, node, &[])?;
        }
        controls::install_host_gw(lab, true)?;
        if lab.masquerade {
            forwarding.rules = Some(FlannelRules::install(lab, Variant::Flanneld)?);
        }
        Ok(forwarding)
    }
}

impl Drop for KernelForwarding<'_> {
    fn drop(&mut self) {
        self.rules = None;
        let restored = controls::remove_host_gw(self.lab).and_then(|()| {
            for node in &self.lab.topology.nodes {
                agents::start(self.lab, node, self.lab.masquerade)?;
            }
            agents::wait_ready(self.lab, true)
        });
        if let Err(e) = restored {
            eprintln!("putting the agents back after kernel forwarding: {e:#}");
        }
    }
}
