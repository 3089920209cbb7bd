//! kite-lazyfs: serves kite-snapshotter's lazy layers (see kite_snapshotter::lazy::rpc).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use kite_snapshotter::config::SnapshotterConfig;
use kite_snapshotter::lazy::cache::ChunkCache;
use kite_snapshotter::lazy::remote::LazyLayers;
use kite_snapshotter::registry::RegistryClient;
use tracing::info;

const HELP: &str = "\
kite-lazyfs — serves kite-snapshotter's lazily pulled eStargz layers

Each lazy layer is a read-only FUSE mount whose reads fetch chunks from the registry with range
requests, verified against the layer's TOC and kept in the chunk cache. This process also
serves the prefetch API (prefetch_socket) and owns the cache. kite-snapshotter starts it when
it is not running and tells it what to mount (lazyfs_socket); it is a process of its own so
that restarting kite-snapshotter leaves running containers' layers served. Stopping it ends
every lazy mount (kite-snapshotter mounts them again when it next starts).

Usage: kite-lazyfs [--config FILE]
Configuration: the [snapshotter] section of /etc/kite/kite.toml (or FILE, or KITE_CONFIG);
see kite-snapshotter --help. SIGTERM or SIGINT stops it.";

fn args() -> anyhow::Result<Option<PathBuf>> {
    let mut config = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--help" | "-h" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            "--config" => config = Some(PathBuf::from(it.next().context("--config needs a file")?)),
            other => anyhow::bail!("unknown argument {other:?} (see --help)"),
        }
    }
    Ok(config)
}

fn listen(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    kite_snapshotter::daemon::listen_unix(path)
        .with_context(|| format!("listen on {}", path.display()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config_path = args()?;
    let config = SnapshotterConfig::load(config_path.as_deref())?;
    kite_snapshotter::daemon::init_logging(&config.log_level)
        .context("log_level is not a tracing filter")?;
    let cache_dir = config.root.join("cache");
    let cache = ChunkCache::open(&cache_dir, config.cache_max_bytes)
        .with_context(|| format!("open the chunk cache in {}", cache_dir.display()))?;
    let registry = RegistryClient::new(config.registry_options()?)?;
    let lazy = Arc::new(LazyLayers::new(
        &config.root,
        Arc::new(cache),
        Arc::new(registry),
        config
            .background_fetch
            .then_some(config.background_fetch_bytes_per_sec),
    ));
    let prefetcher = kite_snapshotter::lazy::prefetch::Prefetcher::new(lazy.clone());
    let mut prefetch =
        kite_snapshotter::lazy::prefetch::serve(listen(&config.prefetch_socket)?, prefetcher)
            .await
            .context("serve the prefetch API")?;
    let mut calls = kite_snapshotter::lazy::rpc::serve(listen(&config.lazyfs_socket)?, lazy)
        .await
        .context("serve the snapshotter's calls")?;
    let inodes = [&config.lazyfs_socket, &config.prefetch_socket]
        .map(|p| kite_snapshotter::daemon::socket_inode(p));
    info!(socket = %config.lazyfs_socket.display(), prefetch = %config.prefetch_socket.display(),
          "serving lazy layers");
    kite_snapshotter::daemon::stop_requested().await;
    let _ = prefetch.shutdown().await;
    let _ = calls.shutdown().await;
    // Only our own sockets: a successor may have put its own in place already.
    kite_snapshotter::daemon::remove_socket(&config.lazyfs_socket, inodes[0]);
    kite_snapshotter::daemon::remove_socket(&config.prefetch_socket, inodes[1]);
    Ok(())
}
