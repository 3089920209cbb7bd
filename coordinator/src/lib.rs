//! `kite-coordinator`: kite's thin cluster control plane over the node agents (placement by
//! image locality, scale-out, in-place rollouts). What has landed so far is its foundation:
//!
//! - [`store`]: the state as a versioned key-value store (revision-guarded transactions), kept
//!   in one redb file; an etcd store implements the same trait later;
//! - [`pki`]: the cluster's CA and identities (coordinator, nodes, admins) in certificates;
//! - [`token`]: bootstrap tokens by which nodes join;
//! - [`placement`]: filter and score nodes for a replica (image locality, spread, room, the
//!   Java archive), all of an app's new replicas at once;
//! - [`config`]: the `[coordinator]` section of kite.toml.

pub mod app;
pub mod cluster;
pub mod config;
pub mod controller;
pub mod leader;
pub mod metrics;
pub mod ops;
pub mod pki;
pub mod placement;
pub mod server;
pub mod store;
pub mod token;
