//! What the agent needs to know of a Kubernetes Node, and where Nodes come from.

pub mod address;
pub mod annotations;
pub mod condition;
pub mod etcd;
pub mod file;
pub mod kube;
pub mod node_set;
pub mod slim;

use std::{net::Ipv4Addr, path::PathBuf, sync::Arc};

use anyhow::{Context as _, Result, bail};
use tokio::sync::watch;

use crate::{net_conf::NetConf, status::Status};
use address::{Authority, OwnAddress};
use annotations::Names;
pub use node_set::{NodeError, NodeInfo, NodeSet};
pub use slim::SlimNode;

/// Where the agent learns the nodes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A file as `kubectl get nodes -o json` prints it, re-read on change; flannel's
    /// annotations named `annotations`.
    File { path: PathBuf, annotations: Names },
    /// The Kubernetes API (flanneld's `--kube-subnet-mgr`), in-cluster or through a
    /// kubeconfig, at `api_url` when given; flannel's annotations named `annotations`.
    Kube {
        kubeconfig: Option<PathBuf>,
        api_url: Option<String>,
        annotations: Names,
        /// Set the node's `NetworkUnavailable` condition to `False` once the network
        /// is up.
        network_condition: bool,
    },
    /// flannel's etcd subnet manager: leases this node's subnet and learns the others'.
    Etcd(Box<etcd::EtcdOptions>),
}

impl Source {
    /// Who has the last word on this node's tunnel address with this source.
    pub fn authority(&self) -> Authority {
        match self {
            Source::File { .. } => Authority::NodeList,
            Source::Kube { .. } | Source::Etcd(_) => Authority::Agent,
        }
    }

    /// Prepares the source and finds this node's name. Connection settings are
    /// checked here, so that a missing kubeconfig stops the agent before it touches
    /// the node. This node's address is decided next ([`Opening::stored_public_ip`]
    /// may take part), then [`Opening::finish`] makes the source ready.
    pub async fn open(self, node_name: &NodeName) -> Result<Opening> {
        Ok(match self {
            Source::File { path, annotations } => Opening {
                name: node_name.without_api()?,
                kind: OpeningKind::File { path, annotations },
            },
            Source::Kube {
                kubeconfig,
                api_url,
                annotations,
                network_condition,
            } => {
                let client = kube::client(kubeconfig.as_deref(), api_url.as_deref()).await?;
                let name = match node_name {
                    NodeName::OfPod { namespace, pod } => {
                        kube::pod_node_name(&client, namespace, pod).await?
                    }
                    other => other.without_api()?,
                };
                Opening {
                    name,
                    kind: OpeningKind::Kube {
                        client,
                        annotations,
                        network_condition,
                    },
                }
            }
            Source::Etcd(opts) => Opening {
                name: node_name.without_api()?,
                kind: OpeningKind::Etcd(opts),
            },
        })
    }
}

/// A source whose node name is known, waiting for this node's address.
pub struct Opening {
    pub name: String,
    kind: OpeningKind,
}

enum OpeningKind {
    File {
        path: PathBuf,
        annotations: Names,
    },
    Kube {
        client: ::kube::Client,
        annotations: Names,
        network_condition: bool,
    },
    Etcd(Box<etcd::EtcdOptions>),
}

impl Opening {
    /// The address an operator stored for this node in its `node-public-ip`
    /// annotation, read once at start: as flanneld (flannel-io/flannel v0.28.9
    /// `main.go`, `GetStoredPublicIP` in `pkg/subnet/kube/kube.go`) it takes the place
    /// of `--public-ip`. An unreadable Node or a bad value is logged and ignored, as
    /// flanneld ignores them. Only the Kubernetes source has one.
    pub async fn stored_public_ip(&self) -> Option<Ipv4Addr> {
        let OpeningKind::Kube {
            client,
            annotations,
            ..
        } = &self.kind
        else {
            return None;
        };
        kube::stored_public_ip(client, &self.name, &annotations.node_public_ip).await
    }

    /// Makes the source ready: etcd is connected to (waiting for it) and its network
    /// configuration read.
    pub async fn finish(self, own_address: OwnAddress) -> Result<OpenSource> {
        Ok(match self.kind {
            OpeningKind::File { path, annotations } => OpenSource::File { path, annotations },
            OpeningKind::Kube {
                client,
                annotations,
                network_condition,
            } => OpenSource::Kube(Box::new(
                kube::KubeSource::new(client, &self.name, own_address)
                    .with_annotations(annotations)
                    .with_network_condition(network_condition),
            )),
            OpeningKind::Etcd(opts) => OpenSource::Etcd(Box::new(
                etcd::EtcdSource::open(&opts, &self.name, own_address).await?,
            )),
        })
    }
}

/// Where this node's name comes from, in flanneld's order (flannel-io/flannel
/// v0.28.9 `pkg/subnet/kube/kube.go` `NewSubnetManager`): `NODE_NAME`, else the
/// `spec.nodeName` of the pod `POD_NAMESPACE`/`POD_NAME` read from the Kubernetes
/// API. `--node-name` comes first; where flanneld gives up (neither variable set)
/// the agent takes the hostname, as it does with the other sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeName {
    /// `--node-name` or `NODE_NAME`.
    Given(String),
    /// The node the pod runs on (the Kubernetes API source only).
    OfPod { namespace: String, pod: String },
    /// This host's name.
    Hostname,
}

impl NodeName {
    /// From `--node-name` and the environment (`env` gives a variable's value); empty
    /// values count as unset, as in flanneld. `api` says whether the source is the
    /// Kubernetes API, where the pod can be looked up.
    pub fn find(
        flag: Option<String>,
        api: bool,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        let var = |k: &str| env(k).filter(|v| !v.is_empty());
        if let Some(name) = flag.filter(|n| !n.is_empty()).or_else(|| var("NODE_NAME")) {
            return Ok(Self::Given(name));
        }
        if !api {
            return Ok(Self::Hostname);
        }
        match (var("POD_NAMESPACE"), var("POD_NAME")) {
            (Some(namespace), Some(pod)) => Ok(Self::OfPod { namespace, pod }),
            (None, None) => Ok(Self::Hostname),
            _ => bail!(
                "env variables POD_NAME and POD_NAMESPACE must be set (or NODE_NAME, or --node-name)"
            ),
        }
    }

    /// The name where no API lookup is needed.
    fn without_api(&self) -> Result<String> {
        match self {
            NodeName::Given(name) => Ok(name.clone()),
            NodeName::Hostname => {
                let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .context("reading the hostname")?;
                Ok(name.trim().to_owned())
            }
            NodeName::OfPod { namespace, pod } => bail!(
                "the node of pod {namespace}/{pod} can only be looked up with --kube-subnet-mgr"
            ),
        }
    }
}

/// A source ready to run.
pub enum OpenSource {
    File { path: PathBuf, annotations: Names },
    Kube(Box<kube::KubeSource>),
    Etcd(Box<etcd::EtcdSource>),
}

impl OpenSource {
    /// The network configuration: etcd's with the etcd source, else the file's.
    pub fn net_conf(&self, file: &std::path::Path) -> Result<NetConf> {
        match self {
            OpenSource::Etcd(source) => Ok(source.net_conf().clone()),
            OpenSource::File { .. } | OpenSource::Kube(_) => NetConf::load(file),
        }
    }

    /// Publishes complete node sets on `tx` until the receiver goes away, reporting
    /// the source's health in `status`.
    pub async fn run(self, tx: watch::Sender<Option<NodeSet>>, status: Arc<Status>) {
        match self {
            OpenSource::File { path, annotations } => {
                file::watch_file(path, annotations, tx, &status).await
            }
            OpenSource::Kube(source) => source.run(tx, status).await,
            OpenSource::Etcd(source) => source.run(tx, status).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_name_in_flanneld_order() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let pod = &[
            ("POD_NAME", "kube-flannel-ds-x"),
            ("POD_NAMESPACE", "kube-flannel"),
        ];
        let given = |n: &str| NodeName::Given(n.into());
        assert_eq!(
            NodeName::find(Some("a".into()), true, env(&[("NODE_NAME", "b")])).unwrap(),
            given("a")
        );
        assert_eq!(
            NodeName::find(None, true, env(&[("NODE_NAME", "b"), ("POD_NAME", "p")])).unwrap(),
            given("b")
        );
        assert_eq!(
            NodeName::find(None, true, env(pod)).unwrap(),
            NodeName::OfPod {
                namespace: "kube-flannel".into(),
                pod: "kube-flannel-ds-x".into()
            }
        );
        // Empty is unset, as in flanneld.
        let empty = &[
            ("NODE_NAME", ""),
            ("POD_NAME", "p"),
            ("POD_NAMESPACE", "ns"),
        ];
        assert!(matches!(
            NodeName::find(None, true, env(empty)).unwrap(),
            NodeName::OfPod { .. }
        ));
        // The pod is only looked up through the Kubernetes API.
        assert_eq!(
            NodeName::find(None, false, env(pod)).unwrap(),
            NodeName::Hostname
        );
        assert_eq!(
            NodeName::find(None, true, env(&[])).unwrap(),
            NodeName::Hostname
        );
        let e = NodeName::find(None, true, env(&[("POD_NAME", "p")])).unwrap_err();
        assert!(e.to_string().contains("POD_NAME and POD_NAMESPACE"), "{e}");
    }
}
