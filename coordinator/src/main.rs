//! `kite-coordinator`: kite's cluster coordinator. See the library's documentation.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use kite_coordinator::config::CoordinatorConfig;
use kite_coordinator::pki::{write_file, ClusterCa, Identity};
use kite_coordinator::store::{EmbeddedStore, Store};

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
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    match args.command {
        Command::Init => init(&config),
    }
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
