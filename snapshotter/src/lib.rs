//! `kite-snapshotter`: the lazy-pull containerd proxy snapshotter (eStargz over FUSE, verified
//! chunk cache, prefetch at scheduling time). This crate holds what exists so far: the
//! `[snapshotter]` section of /etc/kite/kite.toml. The daemon (`kite-snapshotter` binary)
//! arrives with the lazy-pull work; nothing here serves containerd yet.

pub mod config;
