//! `kite-snapshotter`: kite's containerd proxy snapshotter.
//!
//! - [`config`]: the `[snapshotter]` section of /etc/kite/kite.toml;
//! - [`store`]: snapshot metadata, kept across restarts;
//! - [`overlay`]: the snapshots API: snapshots as containerd's overlayfs snapshotter makes them,
//!   and the remote-snapshot Prepare that mounts an eStargz layer lazily;
//! - [`estargz`]: the eStargz footer and TOC, validated into a layer index;
//!   [`estargz_writer`]: converting a layer tar to eStargz, reading a blob's TOC back;
//!   [`convert`]: an image to eStargz, registry to registry; [`record`]: the files an
//!   image's command opens at start (`convert --record`);
//! - [`registry`]: the Registry v2 client (auth, ranged reads, uploads);
//! - [`chunk_cache`]: verified chunks on disk, bounded, LRU;
//! - [`lazy_layer`]: a lazy layer's chunks (fetch, verify, cache, prefetch, background);
//!   [`lazy_fs`]: the layer as a FUSE filesystem; [`remote`]: TOCs and mounts;
//!   [`lazyfs_rpc`]: the snapshots service ↔ `kite-lazyfs` (which serves them) channel;
//! - [`prefetch`]: the prefetch API (a local socket) and its client;
//! - [`metrics`]: the Prometheus endpoint.

pub mod chunk_cache;
pub mod config;
pub mod convert;
pub mod daemon;
pub mod estargz;
pub mod estargz_writer;
pub mod lazy_fs;
pub mod lazy_layer;
pub mod lazyfs_rpc;
pub mod metrics;
pub mod overlay;
pub mod prefetch;
pub mod record;
pub mod registry;
pub mod remote;
pub mod store;
