//! `kite-deploy`: the node installer's command line (install, uninstall, status).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kite_deploy::install::{self, Options, Uninstalled};
use kite_deploy::kite_config::Layout;

/// Installs kite on a containerd host, or takes it away again.
///
/// Run from kite's DaemonSet (privileged, hostPID, the host's / mounted at /host) or on the host
/// itself with --host-root /. Every option can also be given by its environment variable, which
/// is how the DaemonSet's manifest sets them.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Where the host's / is mounted ("/" when running on the host).
    #[arg(long, env = "KITE_HOST_ROOT", default_value = "/host", global = true)]
    host_root: PathBuf,
    /// The host process whose namespaces and cgroups host commands join (PID 1; another when
    /// the host hides its PID 1 from root).
    #[arg(long, env = "KITE_HOST_PID", default_value_t = 1, global = true)]
    host_pid: i32,
    /// The files to install: VERSION, bin/, share/guest/ (the image's own copy by default).
    #[arg(
        long,
        env = "KITE_SOURCE",
        default_value = "/opt/kite-artifacts",
        global = true
    )]
    source: PathBuf,
    /// Host directory of the versioned binaries (<prefix>/<version>, <prefix>/current).
    #[arg(long, env = "KITE_PREFIX", default_value = "/opt/kite", global = true)]
    prefix: PathBuf,
    /// Host directory of kite.toml and kite's containerd drop-in (containerd.d/).
    #[arg(
        long,
        env = "KITE_CONFIG_DIR",
        default_value = "/etc/kite",
        global = true
    )]
    config_dir: PathBuf,
    /// Host directory of kite's sockets and runtime state.
    #[arg(long, env = "KITE_RUN_DIR", default_value = "/run/kite", global = true)]
    run_dir: PathBuf,
    /// Host directory of kite's state (snapshots, chunk cache, agent state).
    #[arg(
        long,
        env = "KITE_STATE_DIR",
        default_value = "/var/lib/kite",
        global = true
    )]
    state_dir: PathBuf,
    /// Host directory of kite's logs.
    #[arg(
        long,
        env = "KITE_LOG_DIR",
        default_value = "/var/log/kite",
        global = true
    )]
    log_dir: PathBuf,
    /// containerd's main config on the host (it gains one `imports` entry).
    #[arg(
        long,
        env = "KITE_CONTAINERD_CONFIG",
        default_value = "/etc/containerd/config.toml",
        global = true
    )]
    containerd_config: PathBuf,
    /// A directory on containerd's PATH for a link to kite's shim (containerd 1.6.20 finds shims
    /// by name, ignoring a runtime's runtime_path).
    #[arg(
        long,
        env = "KITE_SHIM_LINK_DIR",
        default_value = "/usr/local/bin",
        global = true
    )]
    shim_link_dir: PathBuf,
    /// auto (systemd when the host runs it), systemd, or command.
    #[arg(
        long,
        env = "KITE_SERVICE_MANAGER",
        default_value = "auto",
        global = true
    )]
    service_manager: String,
    /// containerd's systemd unit.
    #[arg(
        long,
        env = "KITE_CONTAINERD_UNIT",
        default_value = "containerd",
        global = true
    )]
    containerd_unit: String,
    /// Without systemd: the host command (run with /bin/sh -c) that restarts containerd.
    #[arg(long, env = "KITE_CONTAINERD_RESTART", global = true)]
    containerd_restart: Option<String>,
    /// "kite" makes kite-snapshotter the CRI's snapshotter (lazy pulls; for every pod on
    /// containerd 1.x, which has no per-runtime snapshotter); "keep" leaves the operator's.
    #[arg(
        long,
        env = "KITE_CRI_SNAPSHOTTER",
        default_value = "keep",
        global = true
    )]
    cri_snapshotter: String,
    /// TOML merged over the kite.toml the install writes (e.g. from a ConfigMap).
    #[arg(long, env = "KITE_CONFIG_OVERLAY", global = true)]
    config_overlay: Option<String>,
    /// TOML merged over kite's containerd drop-in.
    #[arg(long, env = "KITE_CONTAINERD_EXTRA", global = true)]
    containerd_extra: Option<String>,
    /// The node to label (the DaemonSet passes spec.nodeName).
    #[arg(long, env = "NODE_NAME", global = true)]
    node_name: Option<String>,
    /// The label the RuntimeClass `kite` schedules on.
    #[arg(long, env = "KITE_NODE_LABEL", default_value = kite_deploy::node_label::DEFAULT_NODE_LABEL, global = true)]
    node_label: String,
    /// How long containerd may take to come back after a restart.
    #[arg(long, env = "KITE_TIMEOUT_SECS", default_value_t = 120, global = true)]
    timeout_secs: u64,
    /// (internal) Leave the node's label alone (the pod's side sets and removes it).
    #[arg(long, hide = true, global = true)]
    no_node_label: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install kite (or upgrade it to this version); idempotent.
    Install {
        /// Stay running after the install until SIGTERM (the DaemonSet's container).
        #[arg(long)]
        wait: bool,
    },
    /// Remove everything the install added and restart containerd; refuses while kite pods run.
    Uninstall,
    /// What is installed and whether containerd runs it; exits 1 when not healthy.
    Status,
    /// (internal) Runs a command in the host's namespaces.
    #[command(hide = true)]
    HostExec {
        #[arg(long)]
        cgroups_of: Option<i32>,
        #[arg(long)]
        log: Option<PathBuf>,
        #[arg(long)]
        pidfile: Option<PathBuf>,
        #[arg(last = true, required = true)]
        argv: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::HostExec {
        cgroups_of,
        log,
        pidfile,
        argv,
    } = &cli.command
    {
        let err =
            kite_deploy::host::host_exec(*cgroups_of, log.as_deref(), pidfile.as_deref(), argv);
        eprintln!("kite-deploy host-exec: {err:#}");
        return ExitCode::from(127);
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kite-deploy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let opts = Options {
        host_root: cli.host_root,
        host_pid: cli.host_pid,
        source: cli.source,
        layout: Layout {
            prefix: cli.prefix,
            config_dir: cli.config_dir,
            run_dir: cli.run_dir,
            state_dir: cli.state_dir,
            log_dir: cli.log_dir,
        },
        containerd_config: cli.containerd_config,
        shim_link_dir: cli.shim_link_dir,
        service_manager: cli.service_manager,
        containerd_unit: cli.containerd_unit,
        containerd_restart: cli.containerd_restart.filter(|c| !c.is_empty()),
        cri_snapshotter: match cli.cri_snapshotter.as_str() {
            "kite" => true,
            "keep" => false,
            other => anyhow::bail!("--cri-snapshotter {other:?}: kite or keep"),
        },
        config_overlay: cli.config_overlay.filter(|c| !c.is_empty()),
        containerd_extra: cli.containerd_extra.filter(|c| !c.is_empty()),
        node_name: cli.node_name.filter(|c| !c.is_empty()),
        node_label: cli.node_label,
        label_node: !cli.no_node_label,
        timeout: Duration::from_secs(cli.timeout_secs),
    };
    match cli.command {
        Command::Install { wait } => {
            let started = std::time::Instant::now();
            let done = install::install(&opts).context("install kite")?;
            let secs = started.elapsed().as_secs_f64();
            match &done.previous {
                Some(p) if *p != done.version => {
                    println!(
                        "kite {} installed in {secs:.1} s (upgraded from {p})",
                        done.version
                    )
                }
                Some(_) => println!(
                    "kite {} installed in {secs:.1} s (already was; refreshed)",
                    done.version
                ),
                None => println!("kite {} installed in {secs:.1} s", done.version),
            }
            for v in &done.removed_versions {
                println!("removed version {v} (nothing runs from it any more)");
            }
            for n in &done.notes {
                println!("note: {n}");
            }
            if wait {
                wait_for_sigterm()?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Uninstall if opts.host_root != std::path::Path::new("/") => {
            // From a pod, the uninstall runs on the host itself: it restarts containerd, which
            // may be the one running this pod's exec (the preStop hook), and a pod's processes
            // die with its container. The host's process goes on; the label is the pod's part
            // (the service account is there).
            let host = kite_deploy::host::Host::with_pid(&opts.host_root, opts.host_pid);
            let mut args: Vec<OsString> = Vec::new();
            let mut skip = false;
            for a in std::env::args_os().skip(1) {
                if skip {
                    skip = false;
                    continue;
                }
                if a == "--host-root" {
                    skip = true;
                    continue;
                }
                if a.to_string_lossy().starts_with("--host-root=") {
                    continue;
                }
                args.push(a);
            }
            args.push("--no-node-label".into());
            let status = host
                .rerun_on_host(&args)
                .context("run the uninstall on the host")?;
            if !status.success() {
                return Ok(ExitCode::FAILURE);
            }
            if let Some(note) = install::label(&opts, false) {
                println!("note: {note}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Uninstall => {
            let started = std::time::Instant::now();
            match install::uninstall(&opts).context("uninstall kite")? {
                Uninstalled::NotInstalled => println!("kite is not installed here"),
                Uninstalled::Removed { version, notes } => {
                    let secs = started.elapsed().as_secs_f64();
                    println!("kite {version} uninstalled in {secs:.1} s");
                    for n in notes {
                        println!("note: {n}");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status => {
            let s = install::status(&opts).context("kite's status")?;
            println!(
                "version: {}{}",
                s.version.as_deref().unwrap_or("(not installed)"),
                if s.installing { " (installing)" } else { "" }
            );
            for (d, pid) in &s.daemons {
                match pid {
                    Some(p) => println!("{d}: running (pid {p})"),
                    None => println!("{d}: not running"),
                }
            }
            match &s.containerd_runs_kite {
                Ok(()) => println!("containerd: runtime kite loaded"),
                Err(e) => println!("containerd: {e}"),
            }
            println!("kite shims running: {}", s.kite_shims);
            Ok(if s.healthy() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::HostExec { .. } => unreachable!("handled before logging starts"),
    }
}

fn wait_for_sigterm() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        anyhow::Ok(())
    })?;
    println!("kite-deploy: stopping (uninstall runs from the pod's preStop hook)");
    Ok(())
}
