//! `kite-agent`: the node agent (pods over the CRI, prefetch on bind, warm sandboxes, the App
//! CDS archive cache, in-place restarts). This crate holds what exists so far: the `[agent]`
//! section of /etc/kite/kite.toml. The daemon arrives with its issue; nothing here runs pods.

pub mod config;
