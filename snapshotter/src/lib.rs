//! `kite-snapshotter`: kite's containerd proxy snapshotter, and `kite-lazyfs`, which serves its
//! lazy layers. Modules by concern:
//!
//! - [`snapshots`]: the snapshots API containerd calls ([`snapshots::service`]: snapshots as
//!   containerd's overlayfs snapshotter makes them, and the remote-snapshot Prepare that mounts
//!   an eStargz layer lazily) and its metadata ([`snapshots::store`]);
//! - [`lazy`]: lazy layers: [`lazy::layer`] (a layer's chunks: fetch, verify, cache,
//!   prefetch, background), [`lazy::fs`] (the layer as a FUSE filesystem), [`lazy::cache`]
//!   (verified chunks on disk, bounded, LRU), [`lazy::remote`] (TOCs and mounts, the
//!   `LazyBackend` seam), [`lazy::rpc`] (kite-snapshotter ↔ kite-lazyfs), [`lazy::prefetch`]
//!   (the prefetch API);
//! - [`registry`]: the Registry v2 client (auth, ranged reads, uploads);
//! - [`convert`]: an image to eStargz, registry to registry; [`record`]: the files an image's
//!   command opens at start (`convert --record`). The format itself is the `kite-estargz`
//!   crate;
//! - [`config`] (the `[snapshotter]` section), [`daemon`] (logging, sockets, graceful stop),
//!   [`metrics`] (the Prometheus endpoint).

pub mod config;
pub mod convert;
pub mod daemon;
pub mod lazy;
pub mod metrics;
pub mod record;
pub mod registry;
pub mod snapshots;
