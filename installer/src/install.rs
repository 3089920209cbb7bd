//! `install`, `uninstall` and `status`: the steps, their order, and the way back when a step
//! fails.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use toml::Table;

use crate::containerd_config::{
    self, parse_extra, render_drop_in, DropInSpec, MainConfig, KITE_HANDLER, KITE_RUNTIME_TYPE,
};
use crate::host::{Host, HostError};
use crate::kite_config::{self, Layout};
use crate::node_label;
use crate::record::{sha256, Record};
use crate::services::{self, ServiceError, ServiceManager};

/// What the installer was told (flags or the DaemonSet's environment).
#[derive(Debug, Clone)]
pub struct Options {
    pub host_root: PathBuf,
    pub host_pid: i32,
    /// The artifacts to install: `VERSION`, `bin/…`, `share/guest/…`.
    pub source: PathBuf,
    pub layout: Layout,
    pub containerd_config: PathBuf,
    /// A directory on containerd's PATH, for the shim's link: containerd 1.6.20 (Debian 12's)
    /// drops a runtime's `runtime_path` on the way to its task service and finds shims by name.
    pub shim_link_dir: PathBuf,
    pub service_manager: String,
    pub containerd_unit: String,
    pub containerd_restart: Option<String>,
    pub cri_snapshotter: bool,
    pub config_overlay: Option<String>,
    pub containerd_extra: Option<String>,
    pub node_name: Option<String>,
    pub node_label: String,
    /// Set or remove the node's label (off where the pod's side does it).
    pub label_node: bool,
    pub timeout: Duration,
}

/// Installs and uninstalls on one host take turns: a lock beside the run directory.
fn lock(host: &Host, layout: &Layout) -> Result<nix::fcntl::Flock<std::fs::File>, InstallError> {
    let path = host.path(&lock_path(layout));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| HostError::File {
            path: dir.to_path_buf(),
            source: e,
        })?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| HostError::File {
            path: path.clone(),
            source: e,
        })?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| {
        InstallError::Host(HostError::File {
            path,
            source: e.into(),
        })
    })
}

fn lock_path(layout: &Layout) -> PathBuf {
    let name = layout
        .run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "kite".into());
    layout
        .run_dir
        .with_file_name(format!(".{name}-deploy.lock"))
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    ContainerdConfig(#[from] containerd_config::ContainerdConfigError),
    #[error("artifacts {path}: {what}")]
    Artifacts { path: PathBuf, what: String },
    #[error("kite's config overlay: {0}")]
    Overlay(String),
    #[error("install record {path}: {what}")]
    Record { path: PathBuf, what: String },
    #[error("the host lacks {what}")]
    Prerequisite { what: String },
    #[error("containerd did not accept kite: {0}")]
    NotAccepted(String),
    #[error("{failure}; the host was put back as it was before this install")]
    RolledBack { failure: Box<InstallError> },
    #[error("{failure}; putting the host back failed too: {rollback}")]
    RollbackFailed {
        failure: Box<InstallError>,
        rollback: Box<InstallError>,
    },
    #[error(
        "kite is still in use, so nothing was removed (end these first, then uninstall again):\n{0}"
    )]
    InUse(String),
}

/// The state before an install touched anything, to put back on failure.
struct Before {
    files: Vec<(PathBuf, Option<Vec<u8>>)>,
    current: Option<PathBuf>,
    record: Option<Record>,
}

fn read_record(host: &Host, layout: &Layout) -> Result<Option<Record>, InstallError> {
    let path = layout.record();
    match host.read(&path)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| InstallError::Record {
                path,
                what: e.to_string(),
            }),
    }
}

fn write_record(host: &Host, layout: &Layout, record: &Record) -> Result<(), InstallError> {
    let bytes = serde_json::to_vec_pretty(record).map_err(|e| InstallError::Record {
        path: layout.record(),
        what: e.to_string(),
    })?;
    // 0600: it holds containerd's config, which may hold registry credentials.
    host.write(&layout.record(), &bytes, 0o600)?;
    Ok(())
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread tokio runtime")
        .block_on(f)
}

/// The version of the artifacts in `source`.
pub fn source_version(source: &Path) -> Result<String, InstallError> {
    let path = source.join("VERSION");
    let v = std::fs::read_to_string(&path).map_err(|e| InstallError::Artifacts {
        path: path.clone(),
        what: e.to_string(),
    })?;
    let v = v.trim().to_string();
    if v.is_empty() || v.contains('/') || v.starts_with('.') || v == "current" {
        return Err(InstallError::Artifacts {
            path,
            what: format!("{v:?} is not a version"),
        });
    }
    Ok(v)
}

/// What an install did.
#[derive(Debug)]
pub struct Installed {
    pub version: String,
    pub previous: Option<String>,
    pub removed_versions: Vec<String>,
    pub notes: Vec<String>,
}

pub fn install(opts: &Options) -> Result<Installed, InstallError> {
    let host = Host::with_pid(&opts.host_root, opts.host_pid);
    let layout = &opts.layout;
    let _turn = lock(&host, layout)?;
    let version = source_version(&opts.source)?;
    let sm = ServiceManager::choose(
        &host,
        &opts.service_manager,
        &opts.containerd_unit,
        opts.containerd_restart.clone(),
    );
    sm.check()?;
    let overlay = opts
        .config_overlay
        .as_deref()
        .map(|t| toml::from_str::<Table>(t).map_err(|e| InstallError::Overlay(e.to_string())))
        .transpose()?;
    let extra = opts
        .containerd_extra
        .as_deref()
        .map(parse_extra)
        .transpose()?;
    let qemu = overlay
        .as_ref()
        .and_then(|o| o.get("shim")?.get("qemu_path")?.as_str().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/usr/bin/qemu-system-x86_64"));
    if !host.exists(&qemu) {
        return Err(InstallError::Prerequisite {
            what: format!(
                "QEMU at {} (kite boots each pod's VM with it; on Debian: apt install \
                 qemu-system-x86)",
                qemu.display()
            ),
        });
    }
    let record = read_record(&host, layout)?;
    let link = shim_link(opts);
    if let Ok(target) = std::fs::read_link(host.path(&link)) {
        if !target.starts_with(&layout.prefix) {
            return Err(InstallError::Prerequisite {
                what: format!(
                    "room for kite's shim: {} links to {} (not kite-deploy's); remove it or \
                     name another directory on containerd's PATH (KITE_SHIM_LINK_DIR)",
                    link.display(),
                    target.display()
                ),
            });
        }
    } else if host.exists(&link) {
        return Err(InstallError::Prerequisite {
            what: format!(
                "room for kite's shim: {} is a file kite-deploy did not make (another kite?); \
                 remove it or name another directory on containerd's PATH (KITE_SHIM_LINK_DIR)",
                link.display()
            ),
        });
    }
    let units = match sm {
        ServiceManager::Systemd { .. } => ServiceManager::units(layout),
        ServiceManager::Command { .. } => Vec::new(),
    };
    let mut watched = vec![
        opts.containerd_config.clone(),
        layout.drop_in(),
        layout.kite_config(),
    ];
    watched.extend(units.iter().map(|(p, _)| p.clone()));
    let before = Before {
        files: watched
            .iter()
            .map(|p| Ok((p.clone(), host.read(p)?)))
            .collect::<Result<_, HostError>>()?,
        current: std::fs::read_link(host.path(&layout.current())).ok(),
        record: record.clone(),
    };
    let previous = record.as_ref().map(|r| r.version.clone());
    let mut notes = Vec::new();
    let mut new_record = record.clone().unwrap_or_default();
    let steps = install_steps(
        opts,
        &host,
        &sm,
        &version,
        overlay,
        extra,
        &units,
        &mut new_record,
        &mut notes,
    );
    if let Err(failure) = steps {
        return Err(match rollback(opts, &host, &sm, &before, &new_record) {
            Ok(()) => InstallError::RolledBack {
                failure: Box::new(failure),
            },
            Err(rollback) => InstallError::RollbackFailed {
                failure: Box::new(failure),
                rollback: Box::new(rollback),
            },
        });
    }
    let removed_versions = remove_unused_versions(&host, layout, &new_record).unwrap_or_else(|e| {
        notes.push(format!("old versions not removed: {e}"));
        Vec::new()
    });
    new_record.complete = true;
    write_record(&host, layout, &new_record)?;
    if let Some(note) = label(opts, true) {
        notes.push(note);
    }
    Ok(Installed {
        version,
        previous,
        removed_versions,
        notes,
    })
}

/// The shim's link on containerd's PATH.
fn shim_link(opts: &Options) -> PathBuf {
    opts.shim_link_dir.join("containerd-shim-kite-v2")
}

/// Points `link` at `target` (replacing what is there) in one rename.
fn set_link(host: &Host, link: &Path, target: &Path) -> Result<(), InstallError> {
    let tmp = link.with_file_name(format!(
        ".{}.kite-deploy-tmp",
        link.file_name().unwrap_or_default().to_string_lossy()
    ));
    host.remove_file(&tmp)?;
    std::os::unix::fs::symlink(target, host.path(&tmp)).map_err(|e| HostError::File {
        path: host.path(&tmp),
        source: e,
    })?;
    std::fs::rename(host.path(&tmp), host.path(link)).map_err(|e| HostError::File {
        path: host.path(link),
        source: e,
    })?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn install_steps(
    opts: &Options,
    host: &Host,
    sm: &ServiceManager,
    version: &str,
    overlay: Option<Table>,
    extra: Option<Table>,
    units: &[(PathBuf, String)],
    record: &mut Record,
    notes: &mut Vec<String>,
) -> Result<(), InstallError> {
    let layout = &opts.layout;
    record.service_manager = sm.name().into();
    for dir in [
        &layout.prefix,
        &layout.config_dir,
        &layout.run_dir,
        &layout.state_dir,
        &layout.log_dir,
    ] {
        if !host.exists(dir) {
            host.create_dir(dir)?;
            record.created_dir(dir);
        }
    }
    if !host.exists(&layout.drop_in_dir()) {
        host.create_dir(&layout.drop_in_dir())?;
        record.created_dir(&layout.drop_in_dir());
    }
    // The record goes first: whatever happens next, uninstall knows what was made.
    record.complete = false;
    write_record(host, layout, record)?;

    // 1. The files: a version directory of their own, then `current` switched over at once.
    let dest = layout.prefix.join(version);
    copy_artifacts(host, &opts.source, &dest, version, record)?;
    for check in [
        vec![dest.join("bin/virtiofsd"), "--version".into()],
        vec![dest.join("bin/kite-agent"), "--help".into()],
        vec![dest.join("bin/kite-snapshotter"), "--help".into()],
        vec![dest.join("bin/kite-pool"), "--help".into()],
    ] {
        let argv: Vec<&str> = check.iter().filter_map(|p| p.to_str()).collect();
        host.run(&argv).map_err(|e| InstallError::Prerequisite {
            what: format!("what kite's binaries need to run: {e}"),
        })?;
    }
    set_link(host, &layout.current(), Path::new(version))?;
    record.version = version.to_string();
    if !host.exists(&opts.shim_link_dir) {
        host.create_dir(&opts.shim_link_dir)?;
        record.created_dir(&opts.shim_link_dir);
    }
    let link = shim_link(opts);
    set_link(host, &link, &layout.current_bin("containerd-shim-kite-v2"))?;
    record.shim_link = Some(link);

    // 2. kite.toml, unless the operator put one of their own there.
    let kite_toml = layout.kite_config();
    let main_before = host
        .read(&opts.containerd_config)?
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    let main = MainConfig::parse(&opts.containerd_config, main_before.clone())?;
    let cri_socket = main.grpc_address();
    let ours = record.wrote_file(&kite_toml).map(|f| f.sha256.clone());
    let now = host.read(&kite_toml)?.map(|b| sha256(&b));
    if now.is_some() && ours.is_none() {
        notes.push(format!(
            "kept the operator's {} (not written by kite-deploy)",
            kite_toml.display()
        ));
    } else if now.is_some() && now != ours {
        notes.push(format!(
            "kept {}: changed since kite-deploy wrote it",
            kite_toml.display()
        ));
    } else {
        let text = kite_config::render(layout, &cri_socket, overlay);
        host.write(&kite_toml, text.as_bytes(), 0o644)?;
        record.wrote(&kite_toml, text.as_bytes());
    }

    // 3. The drop-in: the CRI section containerd uses now, with kite's runtime.
    let glob = layout.import_glob();
    let base_cri = effective_cri(host, &main, &glob)?;
    let drop_in = render_drop_in(
        base_cri,
        &DropInSpec {
            runtime_path: layout.current_bin("containerd-shim-kite-v2"),
            kite_config: kite_toml.clone(),
            snapshotter_socket: layout.snapshotter_socket(),
            cri_snapshotter: opts.cri_snapshotter,
            extra,
        },
    )?;
    // 0600: the CRI section may hold registry credentials.
    host.write(&layout.drop_in(), drop_in.as_bytes(), 0o600)?;
    record.wrote(&layout.drop_in(), drop_in.as_bytes());

    // 4. The operator's file gains one import. What it held without kite is recorded first
    //    (a crash after the write still knows it): the file as it was, unless kite's import is
    //    in it already — then the file as kite left it holds the operator's text as of the
    //    last install, and a file changed since holds newer text: either way, without the
    //    import.
    let with_import = main.with_import(&glob)?;
    let unchanged_since_kite = main_before
        .as_deref()
        .is_some_and(|t| sha256(t.as_bytes()) == record.containerd_config_after_sha256);
    if !main.imports().contains(&glob) {
        record.containerd_config_before = main_before.clone();
    } else if !unchanged_since_kite {
        record.containerd_config_before = main.without_import(&glob)?;
    }
    record.containerd_config_after_sha256 = sha256(with_import.as_bytes());
    write_record(host, layout, record)?;
    if main_before.as_deref() != Some(with_import.as_str()) {
        host.write(&opts.containerd_config, with_import.as_bytes(), 0o644)?;
    }
    for (path, text) in units {
        host.write(path, text.as_bytes(), 0o644)?;
        record.wrote(path, text.as_bytes());
    }
    write_record(host, layout, record)?;

    // 5. containerd reads the files as they are now (before anything restarts).
    let config = opts.containerd_config.display().to_string();
    let dump = host
        .run(&["containerd", "--config", &config, "config", "dump"])
        .map_err(|e| InstallError::NotAccepted(e.to_string()))?;
    if !String::from_utf8_lossy(&dump.stdout).contains(KITE_RUNTIME_TYPE) {
        return Err(InstallError::NotAccepted(format!(
            "`containerd config dump` of {config} does not name {KITE_RUNTIME_TYPE}: is \
             {glob} imported?"
        )));
    }

    // 6. The snapshotter before containerd (which dials it), containerd, then the agent once
    //    the CRI answers with kite.
    sm.reload(host)?;
    sm.restart_daemon(host, layout, "kite-snapshotter")?;
    wait_socket(
        host,
        &layout.snapshotter_socket(),
        opts.timeout,
        "kite-snapshotter",
    )?;
    sm.restart_containerd(host)?;
    wait_cri(host, &cri_socket, opts.timeout, true)?;
    sm.restart_daemon(host, layout, "kite-agent")?;
    wait_socket(host, &layout.agent_socket(), opts.timeout, "kite-agent")?;
    // The warm pool: a new kite-pool takes the old one's ready VMs over (and replaces those
    // made from another version's guest).
    sm.restart_daemon(host, layout, services::POOL_DAEMON)?;
    Ok(())
}

/// Waits until `socket` (a daemon's) accepts a connection.
fn wait_socket(
    host: &Host,
    socket: &Path,
    timeout: Duration,
    daemon: &str,
) -> Result<(), InstallError> {
    let path = host.path(socket);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(InstallError::NotAccepted(format!(
        "{daemon} did not answer on {} within {} s (its log is in the install's log directory)",
        socket.display(),
        timeout.as_secs()
    )))
}

/// The CRI section containerd would use without kite: the last one among the main file and
/// the files it imports (kite's own glob left out), as containerd 1.x merges them.
fn effective_cri(
    host: &Host,
    main: &MainConfig,
    own_glob: &str,
) -> Result<Option<Table>, InstallError> {
    let mut cri = main.cri_section();
    for import in main.imports().iter().filter(|i| *i != own_glob) {
        // containerd 1.6.20 resolves a relative path against the main file's directory (and a
        // relative glob against its own working directory, a bug fixed in 1.6.29).
        let base = main.path().parent().unwrap_or(Path::new("/"));
        let import = base.join(import).display().to_string();
        let import = import.as_str();
        let files: Vec<PathBuf> = if import.contains('*') {
            // containerd globs (Go's filepath.Glob: sorted).
            let pattern = Path::new(import);
            let (dir, name) = (pattern.parent(), pattern.file_name());
            match (dir, name.and_then(|n| n.to_str())) {
                (Some(dir), Some(name)) => {
                    let mut found: Vec<PathBuf> = std::fs::read_dir(host.path(dir))
                        .into_iter()
                        .flatten()
                        .flatten()
                        .filter_map(|e| {
                            let n = e.file_name().to_string_lossy().into_owned();
                            glob_match(name, &n).then(|| dir.join(n))
                        })
                        .collect();
                    found.sort();
                    found
                }
                _ => Vec::new(),
            }
        } else {
            vec![PathBuf::from(import)]
        };
        for file in files {
            let Some(bytes) = host.read(&file)? else {
                continue;
            };
            let table: Table = toml::from_str(&String::from_utf8_lossy(&bytes)).map_err(|e| {
                containerd_config::ContainerdConfigError::Parse {
                    path: file.clone(),
                    source: Box::new(e),
                }
            })?;
            if let Some(c) = containerd_config::cri_section(&table) {
                cri = Some(c);
            }
        }
    }
    Ok(cri)
}

/// `*` matching any run of characters (what drop-in globs use).
fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, rest)) => name.strip_prefix(head).is_some_and(|tail| {
            tail.char_indices()
                .map(|(i, _)| i)
                .chain([tail.len()])
                .any(|i| glob_match(rest, &tail[i..]))
        }),
    }
}

fn copy_artifacts(
    host: &Host,
    source: &Path,
    dest: &Path,
    version: &str,
    record: &mut Record,
) -> Result<(), InstallError> {
    let target = host.path(dest);
    let same = |a: &Path, b: &Path| matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y);
    if same(source, &target) {
        // The Debian package put the files in place: they are dpkg's, not ours to remove.
        if !record.package_versions.iter().any(|v| v == version) {
            record.package_versions.push(version.to_string());
        }
        return Ok(());
    }
    if target.join(".complete").exists() {
        return Ok(());
    }
    let tmp = target.with_file_name(format!(".{version}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    copy_tree(source, &tmp).map_err(|e| InstallError::Artifacts {
        path: source.to_path_buf(),
        what: format!("copy to {}: {e}", tmp.display()),
    })?;
    std::fs::write(tmp.join(".complete"), version).map_err(|e| HostError::File {
        path: tmp.join(".complete"),
        source: e,
    })?;
    let _ = std::fs::remove_dir_all(&target);
    std::fs::rename(&tmp, &target).map_err(|e| HostError::File {
        path: target.clone(),
        source: e,
    })?;
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let dst = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &dst)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &dst)?;
        } else {
            std::fs::copy(entry.path(), &dst)?;
        }
    }
    Ok(())
}

/// Version directories other than `current` that nothing runs from any more.
fn remove_unused_versions(
    host: &Host,
    layout: &Layout,
    record: &Record,
) -> Result<Vec<String>, InstallError> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(host.path(&layout.prefix)) else {
        return Ok(removed);
    };
    let in_use = processes_under(&layout.prefix);
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let dir = layout.prefix.join(&name);
        if name == record.version
            || name == "current"
            || name.starts_with('.')
            || !entry.file_type().is_ok_and(|t| t.is_dir())
            || record.package_versions.contains(&name)
        {
            continue;
        }
        if in_use.iter().any(|(_, exe)| exe.starts_with(&dir)) {
            continue;
        }
        host.remove_tree(&dir)?;
        removed.push(name);
    }
    Ok(removed)
}

/// Host processes whose executable is under `prefix` (pid, executable).
pub fn processes_under(prefix: &Path) -> Vec<(i32, PathBuf)> {
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.flatten()
        .filter_map(|p| {
            let exe = p.exe().ok()?;
            // A binary deleted since it started (an old version's, replaced by a package
            // upgrade) reads as "<path> (deleted)".
            let exe = match exe.to_str().and_then(|e| e.strip_suffix(" (deleted)")) {
                Some(e) => PathBuf::from(e),
                None => exe,
            };
            exe.starts_with(prefix).then_some((p.pid, exe))
        })
        .collect()
}

/// Waits for containerd's CRI to answer; with `kite`, also for its loaded config to name
/// kite's runtime (the proof that containerd took the drop-in).
fn wait_cri(host: &Host, socket: &Path, timeout: Duration, kite: bool) -> Result<(), InstallError> {
    let path = host.path(socket);
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        match block_on(cri_runtimes(&path)) {
            Ok(runtimes) => {
                let has_kite = runtimes
                    .iter()
                    .any(|(h, t)| h == KITE_HANDLER && t == KITE_RUNTIME_TYPE);
                if has_kite == kite {
                    return Ok(());
                }
                last = format!("its CRI runs with runtimes {runtimes:?}");
            }
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Err(InstallError::NotAccepted(format!(
        "containerd on {} after {} s: {last}",
        socket.display(),
        timeout.as_secs()
    )))
}

/// The CRI's loaded runtimes (handler, runtime type).
async fn cri_runtimes(socket: &Path) -> Result<Vec<(String, String)>, String> {
    let mut cri = kite_cri::CriClient::connect(socket)
        .await
        .map_err(|e| format!("{e:#}"))?;
    let status = cri.status().await.map_err(|e| e.to_string())?;
    let config = status
        .info
        .get("config")
        .ok_or("the CRI status has no config")?;
    let config: serde_json::Value =
        serde_json::from_str(config).map_err(|e| format!("the CRI's config: {e}"))?;
    let runtimes = config["containerd"]["runtimes"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v["runtimeType"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(runtimes)
}

fn rollback(
    opts: &Options,
    host: &Host,
    sm: &ServiceManager,
    before: &Before,
    record: &Record,
) -> Result<(), InstallError> {
    let layout = &opts.layout;
    // A first install's daemons stop while their units are still there to stop them by.
    if before.record.is_none() {
        sm.stop_daemons(host, layout)?;
        stop_leftover_processes(layout);
    }
    for (path, bytes) in &before.files {
        host.restore(path, bytes.as_deref())?;
    }
    let current = host.path(&layout.current());
    match &before.current {
        Some(target) => {
            let _ = std::fs::remove_file(&current);
            std::os::unix::fs::symlink(target, &current).map_err(|e| HostError::File {
                path: current.clone(),
                source: e,
            })?;
        }
        None => {
            let _ = std::fs::remove_file(&current);
        }
    }
    match &before.record {
        Some(old) => {
            write_record(host, layout, old)?;
            // The old version's daemons again (a new one may have started).
            sm.reload(host)?;
            for d in services::DAEMONS {
                sm.restart_daemon(host, layout, d)?;
            }
        }
        None => {
            if let Some(link) = &record.shim_link {
                host.remove_file(link)?;
            }
            unmount_under(host, layout);
            remove_created(host, layout, record)?;
            if !record.version.is_empty() && !record.package_versions.contains(&record.version) {
                host.remove_tree(&layout.prefix.join(&record.version))?;
            }
            host.remove_file(&layout.record())?;
            sm.reload(host)?;
        }
    }
    let main = MainConfig::parse(
        &opts.containerd_config,
        host.read(&opts.containerd_config)?
            .map(|b| String::from_utf8_lossy(&b).into_owned()),
    );
    sm.restart_containerd(host)?;
    let socket = main
        .map(|m| m.grpc_address())
        .unwrap_or_else(|_| containerd_config::DEFAULT_GRPC_ADDRESS.into());
    wait_cri(host, &socket, opts.timeout, before.record.is_some())
}

/// Releases the warm pool's VMs with the install's own kite-pool (stopped before): a pooled
/// VM's QEMU runs from the host's QEMU, not from the install, and is not a pod.
fn drain_pool(host: &Host, layout: &Layout) -> Result<(), InstallError> {
    let pool = layout.current_bin(services::POOL_DAEMON);
    // An install of a version without a pool has nothing to drain.
    if !host.exists(&pool) || !host.exists(&layout.kite_config()) {
        return Ok(());
    }
    let (pool, config) = (
        pool.display().to_string(),
        layout.kite_config().display().to_string(),
    );
    host.run(&[pool.as_str(), "--config", config.as_str(), "drain"])?;
    Ok(())
}

/// Processes still running from the install (kite-lazyfs outlives the snapshotter): SIGTERM,
/// then SIGKILL.
fn stop_leftover_processes(layout: &Layout) {
    const LEFTOVERS: [&str; 5] = [
        "kite-lazyfs",
        "kite-snapshotter",
        "kite-agent",
        "kite-pool",
        "virtiofsd",
    ];
    for (pid, exe) in processes_under(&layout.prefix) {
        let name = exe
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if LEFTOVERS.contains(&name.as_str()) {
            services::terminate(&name, pid, Duration::from_secs(10));
        }
    }
}

/// Mounts under the install's run and state directories (lazy layers, shares), detached.
fn unmount_under(host: &Host, layout: &Layout) {
    let Ok(mounts) = host.mountinfo() else {
        return;
    };
    let mut points: Vec<PathBuf> = mounts
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(&layout.run_dir) || p.starts_with(&layout.state_dir))
        .collect();
    points.sort();
    for p in points.iter().rev() {
        let _ = host.run(&["umount", "-l", &p.display().to_string()]);
    }
}

/// What still uses kite on the host: kite shims (pods and containers) and container root
/// filesystems on kite's snapshots.
fn in_use(host: &Host, layout: &Layout, cri_socket: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let pods = block_on(async {
        let mut cri = kite_cri::CriClient::connect(&host.path(cri_socket))
            .await
            .ok()?;
        cri.list_pod_sandboxes(&[]).await.ok()
    })
    .unwrap_or_default();
    // Sandboxes of the runtime kite in any state: a stopped one still needs kite's shim to be
    // removed.
    for p in pods.iter().filter(|p| p.runtime_handler == KITE_HANDLER) {
        let name = p
            .metadata
            .as_ref()
            .map(|m| format!(" (pod {}/{})", m.namespace, m.name))
            .unwrap_or_default();
        found.push(format!("  kite sandbox {}{name}", p.id));
    }
    for (pid, exe) in processes_under(&layout.prefix) {
        if exe
            .file_name()
            .is_some_and(|n| n == "containerd-shim-kite-v2")
        {
            let id = procfs::process::Process::new(pid)
                .and_then(|p| p.cmdline())
                .ok()
                .and_then(|args| {
                    let i = args.iter().position(|a| a == "-id")?;
                    args.get(i + 1).cloned()
                })
                .unwrap_or_default();
            let pod = pods
                .iter()
                .find(|p| p.id == id)
                .and_then(|p| p.metadata.as_ref())
                .map(|m| format!(" (pod {}/{})", m.namespace, m.name))
                .unwrap_or_default();
            found.push(format!("  kite shim pid {pid}, sandbox {id}{pod}"));
        }
    }
    let snapshots = layout.snapshotter_root().display().to_string();
    match host.mountinfo() {
        Err(e) => found.push(format!("  (cannot tell what uses kite's snapshots: {e})")),
        Ok(mounts) => {
            for m in mounts {
                let ours = m.mount_point.starts_with(&layout.run_dir)
                    || m.mount_point.starts_with(&layout.state_dir);
                let on_kite = m.super_options.iter().any(|(k, v)| {
                    k.contains(&snapshots) || v.as_deref().is_some_and(|v| v.contains(&snapshots))
                });
                if !ours && on_kite {
                    found.push(format!(
                        "  a container's root filesystem on kite's snapshots: {}",
                        m.mount_point.display()
                    ));
                }
            }
        }
    }
    found
}

#[derive(Debug)]
pub enum Uninstalled {
    NotInstalled,
    Removed { version: String, notes: Vec<String> },
}

pub fn uninstall(opts: &Options) -> Result<Uninstalled, InstallError> {
    let host = Host::with_pid(&opts.host_root, opts.host_pid);
    let layout = &opts.layout;
    let _turn = lock(&host, layout)?;
    let Some(record) = read_record(&host, layout)? else {
        return Ok(Uninstalled::NotInstalled);
    };
    let sm = match record.service_manager.as_str() {
        "systemd" => ServiceManager::Systemd {
            containerd_unit: opts.containerd_unit.clone(),
        },
        _ => ServiceManager::Command {
            containerd_restart: opts.containerd_restart.clone(),
        },
    };
    sm.check()?;
    let main_text = host
        .read(&opts.containerd_config)?
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    let main = MainConfig::parse(&opts.containerd_config, main_text.clone())?;
    let cri_socket = main.grpc_address();
    let users = in_use(&host, layout, &cri_socket);
    if !users.is_empty() {
        return Err(InstallError::InUse(users.join("\n")));
    }
    let mut notes = Vec::new();

    // 1. containerd without kite: the operator's file as it was, the drop-in gone.
    let current_sha = main_text.as_deref().map(|t| sha256(t.as_bytes()));
    if main_text == record.containerd_config_before {
        // Put back already (an uninstall that stopped half-way).
    } else if current_sha.as_deref() == Some(record.containerd_config_after_sha256.as_str()) {
        host.restore(
            &opts.containerd_config,
            record
                .containerd_config_before
                .as_deref()
                .map(str::as_bytes),
        )?;
    } else if let Some(text) = main.without_import(&layout.import_glob())? {
        notes.push(format!(
            "{} changed since kite was installed: only kite's import was taken out of it",
            opts.containerd_config.display()
        ));
        host.write(&opts.containerd_config, text.as_bytes(), 0o644)?;
    }
    host.remove_file(&layout.drop_in())?;
    sm.restart_containerd(&host)?;
    wait_cri(&host, &cri_socket, opts.timeout, false)?;

    // 2. kite's daemons, the warm pool's VMs (they outlive kite-pool by design), and whatever
    //    still runs from kite's files.
    sm.stop_daemons(&host, layout)?;
    drain_pool(&host, layout)?;
    stop_leftover_processes(layout);
    unmount_under(&host, layout);

    // 3. The files: what kite wrote (unless changed since), then the directories it made.
    for file in &record.written_files {
        match host.read(&file.path)? {
            Some(bytes) if sha256(&bytes) != file.sha256 => notes.push(format!(
                "kept {}: changed since kite-deploy wrote it",
                file.path.display()
            )),
            _ => host.remove_file(&file.path)?,
        }
    }
    if sm.name() == "systemd" {
        let _ = host.run(&["systemctl", "daemon-reload"]);
    }
    remove_created(&host, layout, &record)?;
    if let Some(link) = &record.shim_link {
        if std::fs::read_link(host.path(link)).is_ok_and(|t| t.starts_with(&layout.prefix)) {
            host.remove_file(link)?;
        }
        if let Some(dir) = link.parent() {
            if record.created_dirs.iter().any(|d| d == dir) {
                host.remove_dir_if_empty(dir);
            }
        }
    }
    // Directories kite did not make hold only what kite put there.
    for p in [layout.record(), layout.current()] {
        host.remove_file(&p)?;
    }
    if !record.created_dirs.contains(&layout.prefix) {
        // Every version directory of the install (older ones kept for running pods too).
        for entry in std::fs::read_dir(host.path(&layout.prefix))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().is_ok_and(|t| t.is_dir())
                && !record.package_versions.contains(&name)
                && entry.path().join(".complete").exists()
            {
                host.remove_tree(&layout.prefix.join(&name))?;
            }
        }
    }
    host.remove_file(&lock_path(layout))?;
    if let Some(note) = label(opts, false) {
        notes.push(note);
    }
    Ok(Uninstalled::Removed {
        version: record.version,
        notes,
    })
}

/// Removes the directories an install made: whole, except the install prefix when a package
/// owns versions in it, the config directory (only when empty: the operator's files stay) and
/// a directory made for the shim's link (only when empty: it is on containerd's PATH).
fn remove_created(host: &Host, layout: &Layout, record: &Record) -> Result<(), InstallError> {
    let link_dir = record.shim_link.as_ref().and_then(|l| l.parent());
    for dir in record.created_dirs.iter().rev() {
        if Some(dir.as_path()) == link_dir {
            continue;
        }
        if *dir == layout.prefix && !record.package_versions.is_empty() {
            // The package's own version directories stay for dpkg to remove.
            for entry in std::fs::read_dir(host.path(dir))
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !record.package_versions.contains(&name) {
                    let p = dir.join(&name);
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        host.remove_tree(&p)?;
                    } else {
                        host.remove_file(&p)?;
                    }
                }
            }
            continue;
        }
        if *dir == layout.config_dir || *dir == layout.drop_in_dir() {
            host.remove_dir_if_empty(dir);
            continue;
        }
        host.remove_tree(dir)?;
    }
    Ok(())
}

/// Sets or removes the node's label when running in a cluster; a note for the report.
pub fn label(opts: &Options, set: bool) -> Option<String> {
    if !opts.label_node {
        return None;
    }
    let base = node_label::in_cluster()?;
    let Some(node) = &opts.node_name else {
        return Some("not labelling the node: NODE_NAME is not set".into());
    };
    let (key, value) = node_label::parse_label(&opts.node_label)?;
    match block_on(node_label::apply(&base, node, key, set.then_some(value))) {
        Ok(()) => Some(format!(
            "node {node}: label {key} {}",
            if set { "set" } else { "removed" }
        )),
        Err(e) => Some(format!("{e}")),
    }
}

/// What `status` found.
#[derive(Debug)]
pub struct Status {
    /// An install or upgrade is under way.
    pub installing: bool,
    pub version: Option<String>,
    pub daemons: Vec<(String, Option<i32>)>,
    pub containerd_runs_kite: Result<(), String>,
    pub kite_shims: usize,
}

impl Status {
    pub fn healthy(&self) -> bool {
        self.version.is_some()
            && !self.installing
            && self
                .daemons
                .iter()
                .filter(|(d, _)| d != services::POOL_DAEMON)
                .all(|(_, p)| p.is_some())
            && self.containerd_runs_kite.is_ok()
    }
}

pub fn status(opts: &Options) -> Result<Status, InstallError> {
    let host = Host::with_pid(&opts.host_root, opts.host_pid);
    let layout = &opts.layout;
    let record = read_record(&host, layout)?;
    let main = MainConfig::parse(
        &opts.containerd_config,
        host.read(&opts.containerd_config)?
            .map(|b| String::from_utf8_lossy(&b).into_owned()),
    )?;
    let sm = match record.as_ref().map(|r| r.service_manager.as_str()) {
        Some("systemd") => ServiceManager::Systemd {
            containerd_unit: opts.containerd_unit.clone(),
        },
        _ => ServiceManager::Command {
            containerd_restart: None,
        },
    };
    let containerd_runs_kite = match block_on(cri_runtimes(&host.path(&main.grpc_address()))) {
        Ok(r)
            if r.iter()
                .any(|(h, t)| h == KITE_HANDLER && t == KITE_RUNTIME_TYPE) =>
        {
            Ok(())
        }
        Ok(r) => Err(format!(
            "containerd's CRI runs without kite (runtimes {r:?})"
        )),
        Err(e) => Err(e),
    };
    let kite_shims = processes_under(&layout.prefix)
        .iter()
        .filter(|(_, e)| {
            e.file_name()
                .is_some_and(|n| n == "containerd-shim-kite-v2")
        })
        .count();
    Ok(Status {
        installing: record.as_ref().is_some_and(|r| !r.complete),
        version: record.map(|r| r.version),
        daemons: sm.daemon_pids(&host, layout),
        containerd_runs_kite,
        kite_shims,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_in_globs_match_like_containerds() {
        assert!(glob_match("*.toml", "kite.toml"));
        assert!(glob_match("*.toml", ".toml"));
        assert!(!glob_match("*.toml", "kite.toml.bak"));
        assert!(glob_match("10-*.toml", "10-kite.toml"));
        assert!(!glob_match("10-*.toml", "20-kite.toml"));
        assert!(glob_match("config", "config"));
    }

    #[test]
    fn the_effective_cri_section_is_the_last_imported_one() {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::new(dir.path());
        std::fs::create_dir_all(dir.path().join("etc/containerd/conf.d")).unwrap();
        std::fs::write(
            dir.path().join("etc/containerd/conf.d/50-mirrors.toml"),
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\nsandbox_image = \"b\"\n",
        )
        .unwrap();
        let main = MainConfig::parse(
            Path::new("/etc/containerd/config.toml"),
            Some(
                "version = 2\nimports = [\"/etc/containerd/conf.d/*.toml\", \"/etc/kite/containerd.d/*.toml\"]\n\
                 [plugins.\"io.containerd.grpc.v1.cri\"]\nsandbox_image = \"a\"\n"
                    .into(),
            ),
        )
        .unwrap();
        let cri = effective_cri(&host, &main, "/etc/kite/containerd.d/*.toml")
            .unwrap()
            .unwrap();
        assert_eq!(cri["sandbox_image"].as_str(), Some("b"));
    }

    #[test]
    fn versions_must_be_plain_names() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "../x", "current", ".hidden"] {
            std::fs::write(dir.path().join("VERSION"), bad).unwrap();
            assert!(source_version(dir.path()).is_err(), "{bad:?}");
        }
        std::fs::write(dir.path().join("VERSION"), "0.1.0-abc\n").unwrap();
        assert_eq!(source_version(dir.path()).unwrap(), "0.1.0-abc");
    }
}
