//! `kite-coordinator`: kite's cluster coordinator. See the library's documentation.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::sync::Arc;

use kite_config::daemon;
use kite_coordinator::cluster::Cluster;
use kite_coordinator::config::CoordinatorConfig;
use kite_coordinator::controller;
use kite_coordinator::metrics::Metrics;
use kite_coordinator::pki::{write_file, ClusterCa, Identity};
use kite_coordinator::server::{ClusterService, NodeLinkService};
use kite_coordinator::store::{EmbeddedStore, Store};
use kite_protocol::cluster::cluster_server::ClusterServer;
use kite_protocol::cluster::node_link_server::NodeLinkServer;
use tonic::transport::{Certificate, Identity as TlsIdentity, ServerTlsConfig};

/// kite's cluster coordinator: keeps the desired apps, places their replicas on nodes (by image
/// locality), and rolls them out in place. Nodes join with bootstrap tokens and talk to it over
/// mutual TLS only.
#[derive(Parser)]
#[command(name = "kite-coordinator", version)]
struct Args {
    /// kite.toml to read the [coordinator] section of (default: $KITE_CONFIG, else
    /// /etc/kite/kite.toml; a missing default file means the defaults).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serves the cluster (the default): the node link and the cluster API on `listen` (TLS;
    /// client certificates of the cluster's CA), the controllers, and metrics on
    /// `metrics_addr`. Needs `init` first.
    Serve,
    /// Makes the cluster: its CA (pki_dir/ca.{crt,key}), the coordinator's serving certificate
    /// (for `listen`, `advertise`, localhost and 127.0.0.1) and the first admin credential for
    /// kitectl (pki_dir/admin.{crt,key}), and the empty store. Refuses to overwrite a CA.
    Init,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let path = kite_config::config_path(args.config.as_deref());
    let config = CoordinatorConfig::load(&path, args.config.is_none())
        .map_err(|e| anyhow::anyhow!(kite_protocol::errors::error_chain(&e)))?;
    match args.command.unwrap_or(Command::Serve) {
        Command::Init => init(&config),
        Command::Serve => {
            daemon::init_logging(&config.log_level).context("log_level in [coordinator]")?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("start the runtime")?;
            let result = runtime.block_on(serve(config));
            // Work left on blocking threads (a CRI call, a checksum) does not hold the exit up.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            result
        }
    }
}

fn read(path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| {
        format!(
            "read {} (has `kite-coordinator init` made the cluster?)",
            path.display()
        )
    })
}

async fn serve(config: CoordinatorConfig) -> anyhow::Result<()> {
    let pki = config.pki_dir.clone();
    let ca = Arc::new(ClusterCa::load(&pki).context("load the cluster's CA")?);
    let cert = read(&pki.join("coordinator.crt"))?;
    let key = read(&pki.join("coordinator.key"))?;
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("create {}", config.state_dir.display()))?;
    let store = Arc::new(EmbeddedStore::open(&config.state_dir.join("state.redb"))?);
    let metrics = Arc::new(Metrics::new());
    let listen: std::net::SocketAddr = config
        .listen
        .parse()
        .with_context(|| format!("listen {:?} in [coordinator]", config.listen))?;
    let metrics_addr = config.metrics_addr.clone();
    let cluster = Arc::new(
        Cluster::load(config, store, metrics.clone(), ca.cert_pem().to_string())
            .context("load the state")?,
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let controllers = tokio::spawn(controller::run(cluster.clone(), stop_rx.clone()));
    let metrics_server = tokio::spawn({
        let stop = stopped(stop_rx.clone());
        async move {
            let render = move || metrics.render();
            if let Err(e) = kite_agent::metrics::serve_text(&metrics_addr, render, stop).await {
                tracing::error!(address = %metrics_addr, error = %e, "metrics endpoint");
            }
        }
    });
    tokio::spawn(async move {
        daemon::stop_requested().await;
        let _ = stop_tx.send(true);
    });
    let tls = ServerTlsConfig::new()
        .identity(TlsIdentity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(ca.cert_pem()))
        // Join is the one call without a certificate; every other checks the caller's.
        .client_auth_optional(true);
    tracing::info!(address = %listen, "serving the node link and the cluster API (TLS)");
    let stop = stopped(stop_rx.clone());
    let serve = tonic::transport::Server::builder()
        .tls_config(tls)
        .context("TLS configuration")?
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        // A node's messages carry relayed output (capped at 1 MiB per stream by the agent).
        .add_service(
            NodeLinkServer::new(NodeLinkService::new(cluster.clone(), ca))
                .max_decoding_message_size(8 << 20),
        )
        .add_service(ClusterServer::new(ClusterService::new(cluster)))
        .serve_with_shutdown(listen, stop);
    // Node links are endless streams: after the stop they get a moment, then the process goes.
    let grace = async move {
        stopped(stop_rx).await;
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    };
    tokio::select! {
        served = serve => served.with_context(|| format!("serve on {listen}"))?,
        _ = grace => tracing::info!("links still open after 2 s; stopping anyway"),
    }
    let _ = controllers.await;
    let _ = metrics_server.await;
    tracing::info!("stopped");
    Ok(())
}

fn init(config: &CoordinatorConfig) -> anyhow::Result<()> {
    let pki = &config.pki_dir;
    if pki.join("ca.key").exists() {
        bail!(
            "{} already holds a CA: the cluster exists (remove the directory to make a new one, which cuts every node off)",
            pki.display()
        );
    }
    let ca = ClusterCa::create(&config.cluster_name).context("make the cluster's CA")?;
    ca.save(pki).context("write the CA")?;
    let mut dns = vec!["localhost".to_string()];
    let mut ips: Vec<IpAddr> = vec!["127.0.0.1".parse()?];
    let listen_host = config
        .listen
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']))
        .unwrap_or_default();
    for name in std::iter::once(listen_host).chain(config.advertise.iter().map(String::as_str)) {
        match name.parse::<IpAddr>() {
            Ok(ip) if !ip.is_unspecified() && !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) if !name.is_empty() && !dns.iter().any(|d| d == name) => dns.push(name.into()),
            Err(_) => {}
        }
    }
    let server = ca
        .issue(
            &Identity::Coordinator {
                name: "coordinator".into(),
                dns,
                ips,
            },
            825,
        )
        .context("issue the coordinator's certificate")?;
    let admin = ca
        .issue(&Identity::Admin("admin".into()), 365)
        .context("issue the admin credential")?;
    for (name, cred) in [("coordinator", &server), ("admin", &admin)] {
        write_file(&pki.join(format!("{name}.crt")), &cred.cert_pem, 0o644)?;
        if let Some(key) = &cred.key_pem {
            write_file(&pki.join(format!("{name}.key")), key, 0o600)?;
        }
    }
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("create {}", config.state_dir.display()))?;
    let store = EmbeddedStore::open(&config.state_dir.join("state.redb"))?;
    println!(
        "cluster {:?}: CA and certificates in {}, store at revision {} in {}",
        config.cluster_name,
        pki.display(),
        store.revision()?,
        config.state_dir.display()
    );
    println!(
        "kitectl's admin credential: {}/admin.{{crt,key}}",
        pki.display()
    );
    Ok(())
}
