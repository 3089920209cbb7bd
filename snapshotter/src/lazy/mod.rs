//! Lazy layers: eStargz layers mounted over FUSE and fetched as they are read, verified chunk
//! by chunk, cached on disk; served by `kite-lazyfs` so they outlive the snapshots service.

pub mod cache;
pub mod fs;
pub mod layer;
pub mod prefetch;
pub mod remote;
pub mod rpc;
