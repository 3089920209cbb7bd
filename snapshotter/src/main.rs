//! kite-snapshotter: see the kite_snapshotter library.

use std::path::PathBuf;

use anyhow::Context;
use kite_snapshotter::config::SnapshotterConfig;
use kite_snapshotter::overlay::OverlaySnapshotter;
use tracing::info;

const HELP: &str = "\
kite-snapshotter — kite's containerd proxy snapshotter

Serves containerd's snapshots API on a unix socket; containerd uses it as the proxy plugin
`kite` (hack/setup.sh registers it):

    [proxy_plugins.kite]
      type = \"snapshot\"
      address = \"/run/kite/snapshotter.sock\"

    ctr images pull --snapshotter kite IMAGE;  ctr run --snapshotter kite IMAGE ID CMD...

Snapshots behave as with containerd's overlayfs snapshotter and survive restarts. Lazy
eStargz layers and the prefetch API are the next step.

Usage: kite-snapshotter [--config FILE]
Configuration: the [snapshotter] section of /etc/kite/kite.toml (or FILE, or KITE_CONFIG):
root, socket, metrics_address (Prometheus, GET /metrics), log_level. SIGTERM or SIGINT stops it
gracefully (in-flight calls finish; the socket is removed).";

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

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    info!("stopping");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config_path = args()?;
    let config = SnapshotterConfig::load(config_path.as_deref())?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&config.log_level)
                .context("log_level is not a tracing filter")?,
        )
        .with_ansi(false)
        .init();
    let sn = OverlaySnapshotter::open(&config.root)
        .with_context(|| format!("open the snapshotter state in {}", config.root.display()))?;
    sn.cleanup().await?;

    if let Some(dir) = config.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&config.socket);
    let listener = tokio::net::UnixListener::bind(&config.socket)
        .with_context(|| format!("listen on {}", config.socket.display()))?;
    let metrics = tokio::net::TcpListener::bind(&config.metrics_address)
        .await
        .with_context(|| format!("metrics on {}", config.metrics_address))?;
    tokio::spawn(kite_snapshotter::metrics::serve(metrics, sn.clone()));
    info!(socket = %config.socket.display(), root = %config.root.display(),
          metrics = %config.metrics_address, "serving");

    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let served = containerd_snapshots::tonic::transport::Server::builder()
        .add_service(containerd_snapshots::server(sn))
        .serve_with_incoming_shutdown(incoming, shutdown())
        .await;
    let _ = std::fs::remove_file(&config.socket);
    served.context("serve the snapshots API")
}
