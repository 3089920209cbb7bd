//! The snapshots API containerd calls, and the metadata it keeps across restarts.

pub mod service;
pub mod store;
