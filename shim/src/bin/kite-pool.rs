//! kite-pool: keeps kite's warm pool of pre-booted VMs (see kite_shim::pool).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kite_shim::config::ShimConfig;
use kite_shim::pool::holder::Holder;
use kite_shim::pool::metrics::PoolMetrics;

/// kite-pool — keeps VMs booted so that kite pods start without waiting for a VM's boot.
///
/// Reads the [shim] section of /etc/kite/kite.toml (or --config, or KITE_CONFIG), the same
/// configuration the shims read; [shim.pool] says how many VMs of which sizes to keep ready.
/// A pod adopts a VM of its own size made from the same configuration and guest; any other pod
/// boots its own VM as without a pool.
///
/// Stopping kite-pool (SIGTERM) leaves the ready VMs for pods and for the next kite-pool;
/// `kite-pool drain` releases them (uninstalling, turning the pool off). Metrics:
/// GET http://<[shim.pool] metrics_addr>/metrics.
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// The kite.toml to read (default: KITE_CONFIG or /etc/kite/kite.toml).
    #[arg(long, env = "KITE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Keep the pool filled until SIGTERM (the default).
    Run,
    /// Release every pooled VM and the pool's namespace (refused while kite-pool runs).
    Drain,
    /// List the pooled VMs.
    Status,
}

fn load(path: &Option<PathBuf>) -> anyhow::Result<ShimConfig> {
    match path {
        Some(p) => ShimConfig::load_from(p),
        None => ShimConfig::load(),
    }
    .context("read the configuration")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = load(&cli.config)?;
    kite_config::daemon::init_logging(&config.pool.log_level)
        .with_context(|| format!("log_level {:?}", config.pool.log_level))?;
    let metrics = Arc::new(PoolMetrics::new());
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(config, metrics).await,
        Command::Drain => {
            let holder = Holder::new(config, metrics);
            let released = holder
                .drain()
                .with_context(|| format!("drain the pool {}", holder.pool_dir().display()))?;
            println!("released {released} pooled VMs");
            Ok(())
        }
        Command::Status => {
            status(&config);
            Ok(())
        }
    }
}

async fn run(config: ShimConfig, metrics: Arc<PoolMetrics>) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        kite_config::daemon::stop_requested().await;
        stop_tx.send_replace(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let addr = config.pool.metrics_addr.clone();
    if config.pool.enabled && !addr.is_empty() {
        let (m, stop) = (metrics.clone(), stopped(stop_rx.clone()));
        let listener = tokio::spawn(async move {
            kite_config::daemon::serve_metrics(&addr, move || m.render(), stop).await
        });
        tokio::spawn(async move {
            if let Ok(Err(e)) = listener.await {
                tracing::error!(error = %e, "serve the metrics");
            }
        });
    }
    let holder = Holder::new(config, metrics);
    let pool_dir = holder.pool_dir().to_path_buf();
    holder
        .run(stopped(stop_rx))
        .await
        .with_context(|| format!("keep the pool {}", pool_dir.display()))
}

fn status(config: &ShimConfig) {
    let entries = kite_vmm::pool::entries(&config.pool_dir());
    println!("{:<10} {:<8} {:<10} {:>8}", "NAME", "SIZE", "STATUS", "AGE");
    for e in entries {
        let (size, status, age) = match &e.meta {
            Some(m) => (
                format!("{}x{}", m.size.vcpus, m.size.memory_mib),
                if kite_vmm::processes_alive(&e.dir) {
                    "Ready"
                } else {
                    "Dead"
                },
                format!("{}s", m.age().as_secs()),
            ),
            None => ("-".into(), "Booting", "-".into()),
        };
        println!("{:<10} {:<8} {:<10} {:>8}", e.name, size, status, age);
    }
}
