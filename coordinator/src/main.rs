//! `kite-coordinator`: kite's cluster coordinator. See the library's documentation.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::sync::Arc;

use kite_config::daemon;
use kite_coordinator::cluster::Cluster;
use kite_coordinator::config::{CoordinatorConfig, StoreKind};
use kite_coordinator::controller;
use kite_coordinator::leader::{Elector, LeaderGate, Leadership};
use kite_coordinator::metrics::Metrics;
use kite_coordinator::pki::{write_file, ClusterCa, Identity};
use kite_coordinator::server::{ClusterService, CoordinatorsService, NodeLinkService};
use kite_coordinator::store::{EmbeddedStore, EtcdStore, Guard, Store, Txn};
use kite_protocol::cluster::cluster_server::ClusterServer;
use kite_protocol::cluster::coordinators_server::CoordinatorsServer;
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
    /// (for `listen`, `address`, `advertise`, localhost and 127.0.0.1) and the first admin
    /// credential for kitectl (pki_dir/admin.{crt,key}), and the empty embedded store.
    /// Refuses to overwrite a CA. For a further coordinator of a highly available set, copy
    /// the first one's ca.crt and ca.key into its pki_dir first: `init` then issues its serving
    /// certificate only.
    Init,
    /// Copies the embedded store (state_dir/state.redb) into etcd (`[coordinator.etcd]`), to
    /// move a cluster to `store = "etcd"`. Stop the coordinator first; refuses when etcd
    /// already holds keys under the prefix.
    MigrateToEtcd,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let path = kite_config::config_path(args.config.as_deref());
    let config = CoordinatorConfig::load(&path, args.config.is_none())
        .map_err(|e| anyhow::anyhow!(kite_protocol::errors::error_chain(&e)))?;
    match args.command.unwrap_or(Command::Serve) {
        Command::Init => init(&config),
        Command::MigrateToEtcd => migrate_to_etcd(&config),
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
    let metrics = Arc::new(Metrics::new());
    let listen: std::net::SocketAddr = config
        .listen
        .parse()
        .with_context(|| format!("listen {:?} in [coordinator]", config.listen))?;
    let metrics_addr = config.metrics_addr.clone();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    tokio::spawn(async move {
        daemon::stop_requested().await;
        let _ = stop_tx.send(true);
    });
    let ca_pem = ca.cert_pem().to_string();
    // What acts: the controllers of the one coordinator, or the election loop of one of a set.
    let (cluster, acting) = match config.store {
        StoreKind::Embedded => {
            std::fs::create_dir_all(&config.state_dir)
                .with_context(|| format!("create {}", config.state_dir.display()))?;
            let store = Arc::new(EmbeddedStore::open(&config.state_dir.join("state.redb"))?);
            let cluster = Arc::new(
                Cluster::load(config, store, metrics.clone(), ca_pem).context("load the state")?,
            );
            metrics.leader.set(1);
            let acting = tokio::spawn(controller::run(cluster.clone(), stop_rx.clone()));
            (cluster, acting)
        }
        StoreKind::Etcd => {
            if config.address.is_empty() && listen.ip().is_unspecified() {
                bail!(
                    "listen {listen} is every address: set `address` in [coordinator] to the host:port the other coordinators send clients to"
                );
            }
            let options = config.etcd.options();
            let endpoints = options.endpoints_text();
            let store = {
                let options = options.clone();
                tokio::task::spawn_blocking(move || EtcdStore::connect(options))
                    .await
                    .context("connect to etcd")?
                    .map_err(|e| anyhow::anyhow!(kite_protocol::errors::error_chain(&e)))?
            };
            let store = Arc::new(store);
            let leadership = Leadership::candidate(config.address());
            let elector = Arc::new(Elector::new(options, config.etcd.lease_ttl_secs));
            tracing::info!(etcd = %endpoints, address = %leadership.me, "standing for election");
            let cluster = Arc::new(Cluster::standby(
                config,
                store.clone(),
                metrics.clone(),
                ca_pem,
                leadership.clone(),
            ));
            tokio::spawn({
                let elector = elector.clone();
                let leadership = leadership.clone();
                let stop = stop_rx.clone();
                async move { elector.observe(leadership, stop).await }
            });
            let acting = tokio::spawn(lead(elector, store, cluster.clone(), stop_rx.clone()));
            (cluster, acting)
        }
    };
    let leadership = cluster.leadership.clone();
    let metrics_server = tokio::spawn({
        let stop = stopped(stop_rx.clone());
        async move {
            let render = move || metrics.render();
            if let Err(e) = kite_config::daemon::serve_metrics(&metrics_addr, render, stop).await {
                tracing::error!(address = %metrics_addr, error = %e, "metrics endpoint");
            }
        }
    });
    let tls = ServerTlsConfig::new()
        .identity(TlsIdentity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(ca.cert_pem()))
        // Join is the one call without a certificate; every other checks the caller's.
        .client_auth_optional(true);
    tracing::info!(address = %listen, "serving the node link and the cluster API (TLS)");
    let stop = stopped(stop_rx.clone());
    let gate = LeaderGate(leadership.clone());
    let serve = tonic::transport::Server::builder()
        .tls_config(tls)
        .context("TLS configuration")?
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        // A node's messages carry relayed output (capped at 1 MiB per stream by the agent).
        .add_service(tonic::service::interceptor::InterceptedService::new(
            NodeLinkServer::new(NodeLinkService::new(cluster.clone(), ca))
                .max_decoding_message_size(8 << 20),
            gate.clone(),
        ))
        .add_service(ClusterServer::with_interceptor(
            ClusterService::new(cluster),
            gate,
        ))
        .add_service(CoordinatorsServer::new(CoordinatorsService::new(
            leadership,
        )))
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
    let _ = acting.await;
    let _ = metrics_server.await;
    tracing::info!("stopped");
    Ok(())
}

/// One coordinator of a highly available set: campaigns, and while it leads loads the state,
/// runs the controllers and writes behind its fence; when the lease is lost it stops acting,
/// forgets the state and campaigns again. A stop while leading resigns, so another leads at
/// once.
async fn lead(
    elector: Arc<Elector>,
    store: Arc<EtcdStore>,
    cluster: Arc<Cluster>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let leadership = cluster.leadership.clone();
    let metrics = cluster.metrics.clone();
    let pause = |stop: tokio::sync::watch::Receiver<bool>| async move {
        let mut stop = stop;
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => false,
            _ = stop.wait_for(|s| *s) => true,
        }
    };
    loop {
        let term = tokio::select! {
            t = elector.campaign(&leadership) => t,
            _ = stop.wait_for(|s| *s) => return,
        };
        let term = match term {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %kite_protocol::errors::error_chain(&e), "campaign; trying again");
                if pause(stop.clone()).await {
                    return;
                }
                continue;
            }
        };
        store.set_fence(Some(term.fence.clone()));
        let c = cluster.clone();
        let loaded = tokio::task::spawn_blocking(move || c.reload()).await;
        if let Err(e) = loaded
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| kite_protocol::errors::error_chain(&e)))
        {
            tracing::error!(error = %e, "won the election but could not load the state; resigning");
            store.set_fence(None);
            term.resign().await;
            if pause(stop.clone()).await {
                return;
            }
            continue;
        }
        leadership.lead(term.number);
        metrics.leader.set(1);
        Metrics::count(&metrics.terms, "event", "won");
        tracing::info!(term = term.number, "leading");
        let (term_stop_tx, term_stop_rx) = tokio::sync::watch::channel(false);
        let controllers = tokio::spawn(controller::run(cluster.clone(), term_stop_rx));
        let mut lost = term.lost.clone();
        let stopping = tokio::select! {
            _ = lost.wait_for(|l| *l) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        // Acting stops first (the gate closes, commits are refused), then the state goes.
        leadership.step_down();
        metrics.leader.set(0);
        let _ = term_stop_tx.send(true);
        let _ = controllers.await;
        cluster.forget();
        store.set_fence(None);
        let number = term.number;
        term.resign().await;
        if stopping {
            Metrics::count(&metrics.terms, "event", "resigned");
            tracing::info!(term = number, "stopping: resigned the leadership");
            return;
        }
        Metrics::count(&metrics.terms, "event", "lost");
        tracing::warn!(term = number, "lost the leadership; standing by");
    }
}

/// Copies every key of the embedded store into etcd, under the prefix, each guarded as absent.
fn migrate_to_etcd(config: &CoordinatorConfig) -> anyhow::Result<()> {
    let path = config.state_dir.join("state.redb");
    if !path.exists() {
        bail!("{} does not exist: nothing to migrate", path.display());
    }
    let from = EmbeddedStore::open(&path)?;
    let to = EtcdStore::connect(config.etcd.options())
        .map_err(|e| anyhow::anyhow!(kite_protocol::errors::error_chain(&e)))?;
    let there = to.list("/")?;
    if !there.is_empty() {
        bail!(
            "etcd at {} already holds {} keys under {:?}: refusing to mix two clusters' state",
            to.options().endpoints_text(),
            there.len(),
            to.options().prefix
        );
    }
    let keys = from.list("/")?;
    for chunk in keys.chunks(to.max_changes()) {
        let mut txn = Txn::default();
        for kv in chunk {
            txn = txn
                .guard(Guard::Absent(kv.key.clone()))
                .put(kv.key.clone(), kv.value.clone());
        }
        match to.commit(txn)? {
            kite_coordinator::store::Commit::Done(_) => {}
            kite_coordinator::store::Commit::Conflict { key, .. } => {
                bail!(
                    "{key} appeared in etcd during the migration (is a coordinator running on it?)"
                )
            }
        }
    }
    println!(
        "copied {} keys from {} into etcd at {} under {:?}; set store = \"etcd\" in [coordinator]",
        keys.len(),
        path.display(),
        to.options().endpoints_text(),
        to.options().prefix
    );
    Ok(())
}

fn init(config: &CoordinatorConfig) -> anyhow::Result<()> {
    let pki = &config.pki_dir;
    // A CA without a serving certificate: a further coordinator of the same cluster.
    let joining = pki.join("ca.key").exists() && !pki.join("coordinator.crt").exists();
    if pki.join("ca.key").exists() && !joining {
        bail!(
            "{} already holds a CA: the cluster exists (remove the directory to make a new one, which cuts every node off)",
            pki.display()
        );
    }
    let ca = if joining {
        ClusterCa::load(pki).context("load the cluster's CA")?
    } else {
        let ca = ClusterCa::create(&config.cluster_name).context("make the cluster's CA")?;
        ca.save(pki).context("write the CA")?;
        ca
    };
    let address = config.address();
    let address_host = address
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']))
        .unwrap_or_default()
        .to_string();
    let mut dns = vec!["localhost".to_string()];
    let mut ips: Vec<IpAddr> = vec!["127.0.0.1".parse()?];
    let listen_host = config
        .listen
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']))
        .unwrap_or_default();
    for name in [listen_host, address_host.as_str()]
        .into_iter()
        .chain(config.advertise.iter().map(String::as_str))
    {
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
    let mut creds = vec![("coordinator", server)];
    if !joining {
        let admin = ca
            .issue(&Identity::Admin("admin".into()), 365)
            .context("issue the admin credential")?;
        creds.push(("admin", admin));
    }
    for (name, cred) in &creds {
        write_file(&pki.join(format!("{name}.crt")), &cred.cert_pem, 0o644)?;
        if let Some(key) = &cred.key_pem {
            write_file(&pki.join(format!("{name}.key")), key, 0o600)?;
        }
    }
    if joining {
        println!(
            "coordinator certificate for {address} issued by the cluster's CA in {}",
            pki.display()
        );
        return Ok(());
    }
    if config.store == StoreKind::Etcd {
        println!(
            "cluster {:?}: CA and certificates in {}; the state lives in etcd at {}",
            config.cluster_name,
            pki.display(),
            config.etcd.endpoints.join(",")
        );
        println!(
            "kitectl's admin credential: {}/admin.{{crt,key}}",
            pki.display()
        );
        return Ok(());
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
