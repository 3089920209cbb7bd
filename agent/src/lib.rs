//! `kite-agent`: kite's node agent. It runs pods from Kubernetes `v1/Pod` manifests through
//! containerd's CRI, starts their images' fetch the moment a pod is bound (in parallel with the
//! VM boot), supervises them like a kubelet (restarts with back-off, probes, graceful stops),
//! replaces containers in place (same VM, IP and volumes) with rollback, and survives its own
//! restarts by adopting what runs. Java apps that opt in start from a class archive the node
//! recorded on their first start ([`javacache`]). kitectl talks to it over the node API (`kite.node.v1`).

pub mod config;
pub mod cri_config;
pub mod javacache;
pub mod link;
pub mod manifest;
pub mod metrics;
pub mod node;
pub mod pod;
pub mod probe;
pub mod quantity;
pub mod server;
pub mod status;
pub mod store;
