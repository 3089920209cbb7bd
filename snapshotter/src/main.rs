//! kite-snapshotter: see the kite_snapshotter library.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use kite_snapshotter::config::SnapshotterConfig;
use kite_snapshotter::convert::{convert_image, ConvertOptions};
use kite_snapshotter::lazy::remote::LazyBackend;
use kite_snapshotter::lazy::rpc::{Launch, LazyFsClient};
use kite_snapshotter::record::RecordOptions;
use kite_snapshotter::registry::{ImageRef, RegistryClient};
use kite_snapshotter::snapshots::service::OverlaySnapshotter;
use tracing::{error, info};

/// How often the snapshotter checks that kite-lazyfs serves every lazy layer (it mounts them
/// again after kite-lazyfs died).
const LAZY_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

const HELP: &str = "\
kite-snapshotter — kite's containerd proxy snapshotter, with lazily pulled eStargz layers

Serves containerd's snapshots API on a unix socket; containerd uses it as the proxy plugin
`kite` (hack/setup.sh registers it, and the CRI uses it with snapshot annotations on):

    [proxy_plugins.kite]
      type = \"snapshot\"
      address = \"/run/kite/snapshotter.sock\"

Ordinary layers behave as with containerd's overlayfs snapshotter. An eStargz layer (its
manifest entry carries containerd.io/snapshot/stargz/toc.digest) pulled through the CRI is
not downloaded: it is mounted at once as a read-only FUSE filesystem whose reads fetch the
chunks they need with HTTP range requests, verify them against the TOC and keep them in an
on-disk cache (bounded, least recently used out first). The layer's prioritized files are
fetched first, the rest in the background. Lazy layers are served by kite-lazyfs, which this
daemon starts when it is not running and which outlives it: restarting kite-snapshotter
leaves running containers' layers served. Snapshots survive restarts.

Usage:
    kite-snapshotter [--config FILE]
        Run the daemon.
    kite-snapshotter prefetch [--config FILE] IMAGE
        Ask the running daemon (prefetch_socket) to fetch IMAGE's manifest, eStargz TOCs and
        prioritized files now, ahead of the pull; prints progress as JSON lines. Requests for
        an image already being prefetched join that prefetch. (The node agent calls the same
        API when a pod is bound to the node.)
    kite-snapshotter convert [--config FILE] [--chunk-size BYTES] [--prioritize PATH]...
                             [--record [--record-command CMD] [--record-secs N]] SRC DST
        Convert image SRC to eStargz and push it as DST (both registry references). The
        result is still a valid gzip'd-tar image. --prioritize puts the files an application
        reads at start first (the lazy pull fetches them in one request). --record runs the
        image's command (or --record-command CMD: words, or a JSON array) for up to
        --record-secs (10) in namespaces of its own on an unpacked copy, records the files it
        opens (fanotify) and puts those first. The command runs as root: record images you
        would run.

Configuration: the [snapshotter] section of /etc/kite/kite.toml (or FILE, or KITE_CONFIG):
root, socket, metrics_address (Prometheus, GET /metrics), log_level, lazy, cache_max_bytes,
background_fetch, background_fetch_bytes_per_sec, insecure_registries, credentials.\"host\" = { username,
password }, ca_files, fetch_attempts, fetch_first_backoff_ms. SIGTERM or SIGINT stops the
daemon gracefully (in-flight calls finish; the socket is removed).";

enum Command {
    Serve,
    Prefetch {
        image: String,
    },
    Convert {
        src: String,
        dst: String,
        options: ConvertOptions,
        record: Option<RecordOptions>,
    },
}

fn args() -> anyhow::Result<(Option<PathBuf>, Command)> {
    let mut config = None;
    let mut positional = Vec::new();
    let mut options = ConvertOptions::default();
    let mut record: Option<RecordOptions> = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--help" | "-h" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            "--config" => config = Some(PathBuf::from(it.next().context("--config needs a file")?)),
            "--chunk-size" => {
                options.chunk_size = it
                    .next()
                    .context("--chunk-size needs a number of bytes")?
                    .parse()
                    .context("--chunk-size needs a number of bytes")?
            }
            "--prioritize" => options
                .prioritized
                .push(it.next().context("--prioritize needs a path")?),
            "--record" => {
                record.get_or_insert_with(RecordOptions::default);
            }
            "--record-command" => {
                let c = it.next().context("--record-command needs a command")?;
                // A JSON array for arguments with spaces, else words.
                let words: Vec<String> = if c.trim_start().starts_with('[') {
                    serde_json::from_str(&c).context("--record-command: a JSON array of strings")?
                } else {
                    c.split_whitespace().map(str::to_string).collect()
                };
                record.get_or_insert_with(RecordOptions::default).command = Some(words);
            }
            "--record-secs" => {
                let secs: u64 = it
                    .next()
                    .context("--record-secs needs seconds")?
                    .parse()
                    .context("--record-secs needs seconds")?;
                record.get_or_insert_with(RecordOptions::default).duration =
                    std::time::Duration::from_secs(secs);
            }
            other if other.starts_with('-') => {
                anyhow::bail!("unknown option {other:?} (see --help)")
            }
            other => positional.push(other.to_string()),
        }
    }
    let max = kite_estargz::MAX_CHUNK_SIZE;
    if options.chunk_size == 0 || options.chunk_size > max {
        anyhow::bail!("--chunk-size must be 1..={max} bytes (lazy reads verify a chunk in memory)");
    }
    let command = match positional.first().map(String::as_str) {
        None => Command::Serve,
        Some("prefetch") => match &positional[1..] {
            [image] => Command::Prefetch {
                image: image.clone(),
            },
            _ => anyhow::bail!("prefetch needs one IMAGE (see --help)"),
        },
        Some("convert") => match &positional[1..] {
            [src, dst] => Command::Convert {
                src: src.clone(),
                dst: dst.clone(),
                options,
                record,
            },
            _ => anyhow::bail!("convert needs SRC and DST (see --help)"),
        },
        Some(other) => anyhow::bail!("unknown command {other:?} (see --help)"),
    };
    Ok((config, command))
}

async fn convert(
    config: &SnapshotterConfig,
    src: &str,
    dst: &str,
    mut options: ConvertOptions,
    record: Option<RecordOptions>,
) -> anyhow::Result<()> {
    let registry = RegistryClient::new(config.registry_options()?)?;
    let (src, dst) = (ImageRef::parse(src)?, ImageRef::parse(dst)?);
    if let Some(r) = record {
        let opened = kite_snapshotter::record::record(&registry, &src, &r).await?;
        eprintln!("recorded {} files opened at start", opened.len());
        for f in opened {
            if !options.prioritized.contains(&f) {
                options.prioritized.push(f);
            }
        }
    }
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] {pos}/{len} layers, {elapsed}",
        )
        .expect("a progress template"),
    );
    bar.set_message(format!("{src} → {dst}"));
    let progress = |done: usize, total: usize, _read: u64| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let converted = convert_image(&registry, &src, &dst, &options, &progress).await?;
    bar.finish();
    println!("{dst}@{}", converted.manifest_digest);
    for l in &converted.layers {
        println!(
            "  {} {} bytes, TOC {}",
            l.digest,
            l.size,
            l.annotations
                .get(kite_estargz::TOC_DIGEST_ANNOTATION)
                .map_or("-", String::as_str)
        );
    }
    Ok(())
}

async fn serve(config: SnapshotterConfig, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let lazy: Option<Arc<dyn LazyBackend>> = if config.lazy {
        let program = if config.lazyfs_path.as_os_str().is_empty() {
            std::env::current_exe()
                .context("find kite-snapshotter's own path")?
                .with_file_name("kite-lazyfs")
        } else {
            config.lazyfs_path.clone()
        };
        let client = LazyFsClient::new(
            &config.lazyfs_socket,
            Some(Launch {
                program,
                config: config_path,
            }),
        );
        if let Err(e) = client.ensure_running().await {
            // Not fatal: ordinary layers work, and each lazy Prepare tries to start it again.
            error!(error = %kite_protocol::errors::error_chain(&e),
                   "kite-lazyfs is not running; eStargz layers will be unpacked");
        }
        Some(Arc::new(client))
    } else {
        None
    };
    let sn = OverlaySnapshotter::open_with(&config.root, lazy)
        .with_context(|| format!("open the snapshotter state in {}", config.root.display()))?;
    sn.cleanup().await?;
    sn.remount_lazy().await;

    let metrics = tokio::net::TcpListener::bind(&config.metrics_address)
        .await
        .with_context(|| format!("metrics on {}", config.metrics_address))?;
    // Last: the socket appears when the service is about to serve (readiness is "connects").
    let listener = kite_snapshotter::daemon::listen_unix(&config.socket)
        .with_context(|| format!("listen on {}", config.socket.display()))?;
    let socket_inode = kite_snapshotter::daemon::socket_inode(&config.socket);
    tokio::spawn(kite_snapshotter::metrics::serve(metrics, sn.clone()));
    if sn.lazy().is_some() {
        tokio::spawn(sn.clone().keep_lazy_layers_served(LAZY_CHECK_INTERVAL));
    }
    info!(socket = %config.socket.display(), root = %config.root.display(),
          metrics = %config.metrics_address, lazy = config.lazy, "serving");

    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let served = containerd_snapshots::tonic::transport::Server::builder()
        .add_service(containerd_snapshots::server(sn))
        .serve_with_incoming_shutdown(incoming, kite_snapshotter::daemon::stop_requested())
        .await;
    kite_snapshotter::daemon::remove_socket(&config.socket, socket_inode);
    served.context("serve the snapshots API")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (config_path, command) = args()?;
    let config = SnapshotterConfig::load(config_path.as_deref())?;
    kite_snapshotter::daemon::init_logging(&config.log_level)
        .context("log_level is not a tracing filter")?;
    match command {
        Command::Serve => serve(config, config_path).await,
        Command::Convert {
            src,
            dst,
            options,
            record,
        } => convert(&config, &src, &dst, options, record).await,
        Command::Prefetch { image } => {
            // One JSON line per progress message, for people and scripts.
            let print = |p: &kite_protocol::prefetch::PrefetchProgress| {
                let line = serde_json::json!({
                    "image": p.image,
                    "state": kite_protocol::prefetch_client::state_name(p),
                    "joined": p.joined,
                    "layers": p.layers,
                    "lazy_layers": p.lazy_layers,
                    "layers_done": p.layers_done,
                    "prefetched_bytes": p.prefetched_bytes,
                    "error": p.error,
                });
                println!("{line}");
            };
            let last =
                kite_protocol::prefetch_client::prefetch(&config.prefetch_socket, &image, print)
                    .await
                    .context("is kite-lazyfs running (the snapshotter with lazy = true)?")?;
            if kite_protocol::prefetch_client::state_name(&last) != "done" {
                anyhow::bail!("prefetch {image}: {}", last.error);
            }
            Ok(())
        }
    }
}
