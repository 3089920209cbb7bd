//! `kite-agent`: kite's node agent. See the library's documentation; this is its process.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use kite_agent::config::AgentConfig;
use kite_agent::metrics::Metrics;
use kite_agent::node::{Capacity, Node};
use kite_agent::pod::NodeContext;
use kite_agent::server::NodeApi;
use kite_agent::store::Store;
use kite_config::daemon;
use kite_protocol::node::node_agent_server::NodeAgentServer;

/// kite's node agent: runs pods from Kubernetes v1/Pod manifests through containerd's CRI
/// (kite microVMs or runc), starts the image fetch the moment a pod is bound, supervises pods
/// like a kubelet, and updates containers in place. kitectl talks to it on its API socket.
///
/// Its state survives it: stopping, restarting or killing the agent leaves pods running, and
/// the next agent adopts them.
#[derive(Parser)]
#[command(name = "kite-agent", version)]
struct Args {
    /// kite.toml to read the [agent] section of (default: $KITE_CONFIG, else
    /// /etc/kite/kite.toml; a missing default file means the defaults).
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let path = kite_config::config_path(args.config.as_deref());
    let config = AgentConfig::load(&path, args.config.is_none())
        .map_err(|e| anyhow::anyhow!(kite_protocol::errors::error_chain(&e)))?;
    daemon::init_logging(&config.log_level).context("log_level in [agent]")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the runtime")?;
    let result = runtime.block_on(run(config));
    // Work left on blocking threads (a CRI call, a checksum) does not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

/// containerd may still be starting (the agent starts beside it).
async fn connect_cri(config: &AgentConfig) -> anyhow::Result<kite_cri::CriClient> {
    let start = Instant::now();
    loop {
        match kite_cri::CriClient::connect(&config.cri_socket).await {
            Ok(mut cri) => {
                // Connected is not serving: a first call says the CRI answers.
                match cri.list_pod_sandboxes(&[]).await {
                    Ok(_) => return Ok(cri),
                    Err(e) if start.elapsed() > Duration::from_secs(60) => return Err(e.into()),
                    Err(_) => {}
                }
            }
            Err(e) if start.elapsed() > Duration::from_secs(60) => return Err(e.into()),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let cri = connect_cri(&config).await?;
    let store = Store::open(&config.state_dir)?;
    let metrics = Arc::new(Metrics::new());
    let api_socket = config.api_socket.clone();
    let metrics_addr = config.metrics_addr.clone();
    let java_cache = if config.java_cache.enabled {
        let cache = kite_agent::javacache::JavaCache::open(config.java_cache.clone())
            .context("open the Java cache ([agent.java_cache] dir)")?;
        metrics.set_java_cache_bytes(cache.bytes());
        Some(Arc::new(cache))
    } else {
        None
    };
    let ctx = Arc::new(NodeContext {
        java_cache,
        config,
        cri,
        metrics: metrics.clone(),
    });
    let link_config = ctx.config.coordinator.clone();
    let state_dir = ctx.config.state_dir.clone();
    let node = Arc::new(Node::new(ctx, store, Capacity::of_this_node()));
    node.recover()
        .await
        .context("list the sandboxes this agent made, to adopt its pods")?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if !link_config.address.is_empty() {
        tokio::spawn(kite_agent::link::run(
            node.clone(),
            link_config,
            state_dir,
            stop_rx.clone(),
        ));
    }
    let stopped = move |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let metrics_server = tokio::spawn({
        let stop = stopped(stop_rx.clone());
        async move {
            if let Err(e) = kite_agent::metrics::serve(&metrics_addr, metrics, stop).await {
                tracing::error!(address = %metrics_addr, error = %e, "metrics endpoint");
            }
        }
    });
    let listener = daemon::listen_unix(&api_socket)
        .with_context(|| format!("listen on {}", api_socket.display()))?;
    // Anything that can run pods is root's only.
    std::fs::set_permissions(
        &api_socket,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .with_context(|| format!("chmod {}", api_socket.display()))?;
    let inode = daemon::socket_inode(&api_socket);
    tracing::info!(socket = %api_socket.display(), "serving the node API");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let stop = stopped(stop_rx.clone());
    tokio::spawn(async move {
        daemon::stop_requested().await;
        let _ = stop_tx.send(true);
    });
    let serve = tonic::transport::Server::builder()
        .add_service(NodeAgentServer::new(NodeApi::new(node)))
        .serve_with_incoming_shutdown(incoming, stop);
    // A graceful stop waits for open streams (`logs -f`, `events -w`), which end only with
    // their pod: they get a few seconds, then the agent goes anyway.
    let stopped_for_a_while = async move {
        stopped(stop_rx).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    tokio::select! {
        served = serve => served.context("serve the node API")?,
        _ = stopped_for_a_while => tracing::info!("streams still open after 5 s; stopping anyway"),
    }
    daemon::remove_socket(&api_socket, inode);
    let _ = metrics_server.await;
    // The pods keep running; the next agent adopts them.
    tracing::info!("stopped; pods keep running");
    Ok(())
}
