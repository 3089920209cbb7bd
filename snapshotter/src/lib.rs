//! `kite-snapshotter`: kite's containerd proxy snapshotter.
//!
//! - [`config`]: the `[snapshotter]` section of /etc/kite/kite.toml;
//! - [`store`]: snapshot metadata, kept across restarts;
//! - [`overlay`]: snapshots as containerd's overlayfs snapshotter makes them (ordinary layers);
//! - [`estargz`]: the eStargz footer and TOC, validated into a layer index (for lazy layers);
//!   [`estargz_writer`]: converting a layer tar to eStargz, reading a blob's TOC back;
//! - [`metrics`]: the Prometheus endpoint.
//!
//! Lazy eStargz layers (FUSE, range reads, verified chunk cache) and the prefetch API come next
//! (see the shared design); until then every layer is unpacked by containerd as usual.

pub mod chunk_cache;
pub mod config;
pub mod convert;
pub mod estargz;
pub mod estargz_writer;
pub mod lazy_fs;
pub mod lazy_layer;
pub mod metrics;
pub mod overlay;
pub mod registry;
pub mod remote;
pub mod store;
