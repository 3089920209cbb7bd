//! The host kite is installed on, seen from the installer: its files through a mount of its `/`
//! (`/host` in the DaemonSet's pod, `/` for the Debian package), its commands run in its own
//! namespaces and cgroups.
//!
//! A command for the host is run as `kite-deploy host-exec -- CMD…`: the child enters host PID
//! 1's mount, network, IPC, UTS and cgroup namespaces before it is executed (the pod shares the
//! host's PID namespace), then joins PID 1's cgroups and executes CMD. (`--host-pid` names
//! another host process for hosts that hide PID 1 from root, as some sandboxes do.) Joining the cgroups is
//! what lets a daemon it starts (kite-agent, a restarted containerd) outlive the installer's
//! pod: the runtime kills everything in a pod's cgroup when the pod goes.

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use nix::sched::CloneFlags;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("host file {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("host command `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("host command `{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("enter the host's namespaces (is the pod privileged, with hostPID?): {0}")]
    Namespaces(String),
}

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> HostError + '_ {
    move |source| HostError::File {
        path: path.to_path_buf(),
        source,
    }
}

/// The host, through its root mount.
#[derive(Debug, Clone)]
pub struct Host {
    root: PathBuf,
    /// The host process whose namespaces and cgroups host commands join: PID 1, unless the
    /// host hides its PID 1 (some sandboxes do) and names another.
    pid: i32,
}

impl Host {
    pub fn new(root: impl Into<PathBuf>) -> Host {
        Host::with_pid(root, 1)
    }

    pub fn with_pid(root: impl Into<PathBuf>, pid: i32) -> Host {
        Host {
            root: root.into(),
            pid,
        }
    }

    /// The host's mount table (its PID 1's; this process's own when running on the host).
    pub fn mountinfo(&self) -> Result<procfs::process::MountInfos, HostError> {
        let p = if self.is_direct() {
            procfs::process::Process::myself()
        } else {
            procfs::process::Process::new(self.pid)
        };
        p.and_then(|p| p.mountinfo())
            .map_err(|e| HostError::Namespaces(format!("the host's mount table: {e}")))
    }

    /// Re-runs this program on the host itself, in the host's namespaces and cgroups, with
    /// `--host-root /` and `args`: for work that must outlive the pod it was started from.
    pub fn rerun_on_host(&self, args: &[OsString]) -> Result<std::process::ExitStatus, HostError> {
        let exe = PathBuf::from(format!("/proc/{}/exe", std::process::id()));
        let mut argv: Vec<OsString> = vec![exe.into(), "--host-root".into(), "/".into()];
        argv.extend_from_slice(args);
        let command = display(&argv);
        self.command(&argv)?
            .status()
            .map_err(|source| HostError::Spawn { command, source })
    }

    /// True when the installer runs on the host itself (no namespaces to enter).
    pub fn is_direct(&self) -> bool {
        self.root == Path::new("/")
    }

    /// `path` (a host path) as the installer reaches it.
    pub fn path(&self, path: &Path) -> PathBuf {
        match path.strip_prefix("/") {
            Ok(rel) => self.root.join(rel),
            Err(_) => self.root.join(path),
        }
    }

    pub fn exists(&self, path: &Path) -> bool {
        self.path(path).symlink_metadata().is_ok()
    }

    pub fn read(&self, path: &Path) -> Result<Option<Vec<u8>>, HostError> {
        let p = self.resolve_links(&self.path(path));
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(file_error(&p)(e)),
        }
    }

    /// Writes `bytes` to `path` whole: a temporary file beside it, synced, renamed over it. An
    /// existing file keeps its mode (an operator's 0600 config stays 0600); `mode` is for a new
    /// one.
    pub fn write(&self, path: &Path, bytes: &[u8], mode: u32) -> Result<(), HostError> {
        let p = self.resolve_links(&self.path(path));
        let mode = std::fs::metadata(&p)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(mode);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(file_error(dir))?;
        }
        let tmp = p.with_file_name(format!(
            ".{}.kite-deploy-tmp",
            p.file_name().unwrap_or_default().to_string_lossy()
        ));
        let mut f = std::fs::File::create(&tmp).map_err(file_error(&tmp))?;
        f.write_all(bytes).map_err(file_error(&tmp))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(file_error(&tmp))?;
        f.sync_all().map_err(file_error(&tmp))?;
        std::fs::rename(&tmp, &p).map_err(file_error(&p))?;
        Ok(())
    }

    /// `p` (a path under the root mount) with its symbolic links followed, each target read as
    /// the host reads it: an operator's config.toml that links elsewhere stays a link, and its
    /// target gets the new text.
    fn resolve_links(&self, p: &Path) -> PathBuf {
        let mut p = p.to_path_buf();
        for _ in 0..8 {
            let Ok(target) = std::fs::read_link(&p) else {
                break;
            };
            p = if target.is_absolute() {
                self.path(&target)
            } else {
                p.parent().unwrap_or(Path::new("/")).join(target)
            };
        }
        p
    }

    /// Puts the host file back as `previous` says: its bytes, or no file.
    pub fn restore(&self, path: &Path, previous: Option<&[u8]>) -> Result<(), HostError> {
        match previous {
            Some(bytes) => self.write(path, bytes, 0o644),
            None => self.remove_file(path),
        }
    }

    pub fn remove_file(&self, path: &Path) -> Result<(), HostError> {
        let p = self.path(path);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(file_error(&p)(e)),
        }
    }

    pub fn remove_tree(&self, path: &Path) -> Result<(), HostError> {
        let p = self.path(path);
        match std::fs::remove_dir_all(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(file_error(&p)(e)),
        }
    }

    /// Removes the directory when it is empty; leaves it (and says nothing) otherwise.
    pub fn remove_dir_if_empty(&self, path: &Path) {
        let _ = std::fs::remove_dir(self.path(path));
    }

    pub fn create_dir(&self, path: &Path) -> Result<(), HostError> {
        let p = self.path(path);
        std::fs::create_dir_all(&p).map_err(file_error(&p))
    }

    /// A command to run on the host, in its namespaces and PID 1's cgroups.
    pub fn command(&self, argv: &[OsString]) -> Result<Command, HostError> {
        self.helper(&[], argv)
    }

    /// Runs `argv` on the host to completion; a failure says what it printed on stderr.
    pub fn run(&self, argv: &[&str]) -> Result<Output, HostError> {
        let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
        let command = display(&argv);
        checked(command, self.command(&argv)?.stdin(Stdio::null()).output())
    }

    /// Starts `argv` on the host as a daemon: its own session, output appended to `log`, its
    /// pid in `pidfile` (host paths).
    pub fn spawn_daemon(
        &self,
        argv: &[OsString],
        log: &Path,
        pidfile: &Path,
    ) -> Result<(), HostError> {
        let flags: Vec<OsString> = vec![
            "--log".into(),
            log.into(),
            "--pidfile".into(),
            pidfile.into(),
        ];
        let command = display(argv);
        // The helper forks the daemon off (re-parented at once, never a zombie of ours) and
        // exits; the daemon writes its pid file before it executes.
        self.remove_file(pidfile)?;
        checked(
            command.clone(),
            self.helper(&flags, argv)?.stdin(Stdio::null()).output(),
        )?;
        let pf = self.path(pidfile);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if std::fs::read_to_string(&pf).is_ok_and(|s| s.trim().parse::<u32>().is_ok()) {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Err(HostError::Failed {
            command,
            status: format!("no pid file {} after 10 s", pidfile.display()),
            stderr: String::new(),
        })
    }

    fn helper(&self, flags: &[OsString], argv: &[OsString]) -> Result<Command, HostError> {
        let mut c = Command::new("/proc/self/exe");
        c.arg("host-exec");
        if !self.is_direct() {
            c.arg("--cgroups-of").arg(self.pid.to_string());
        }
        c.args(flags).arg("--").args(argv);
        if !self.is_direct() {
            let namespaces = host_namespaces(self.pid)?;
            // SAFETY: the closure runs in the forked child before exec and calls only setns(2),
            // which is async-signal-safe; the descriptors were opened before the fork and are
            // owned by the closure.
            unsafe {
                c.pre_exec(move || {
                    for (fd, flag) in &namespaces {
                        nix::sched::setns(fd, *flag).map_err(std::io::Error::from)?;
                    }
                    Ok(())
                });
            }
        }
        Ok(c)
    }
}

/// Host process `pid`'s namespaces, mount last (entering it changes what paths mean).
fn host_namespaces(pid: i32) -> Result<Vec<(OwnedFd, CloneFlags)>, HostError> {
    let mut out = Vec::new();
    for (name, flag) in [
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ] {
        let path = format!("/proc/{pid}/ns/{name}");
        let f = std::fs::File::open(&path)
            .map_err(|e| HostError::Namespaces(format!("open {path}: {e}")))?;
        out.push((OwnedFd::from(f), flag));
    }
    Ok(out)
}

/// A finished command's output, or what failed: it could not start, or it exited with an
/// error (with what it printed on stderr).
fn checked(command: String, output: std::io::Result<Output>) -> Result<Output, HostError> {
    let output = output.map_err(|source| HostError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !output.status.success() {
        return Err(HostError::Failed {
            command,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(output)
}

fn display(argv: &[OsString]) -> String {
    argv.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `host-exec` helper, running in the host's namespaces: joins the cgroups of host process
/// `cgroups_of` (when given), becomes a daemon (when given a log), and executes `argv`. Returns
/// only on failure.
pub fn host_exec(
    cgroups_of: Option<i32>,
    log: Option<&Path>,
    pidfile: Option<&Path>,
    argv: &[OsString],
) -> anyhow::Error {
    use anyhow::Context;
    let run = || -> anyhow::Result<std::convert::Infallible> {
        std::env::set_current_dir("/").context("chdir / on the host")?;
        let mut c = Command::new(argv.first().context("host-exec: no command")?);
        c.args(&argv[1..]);
        if let Some(pid) = cgroups_of {
            join_cgroups_of(pid).with_context(|| format!("join host process {pid}'s cgroups"))?;
            // The image's PATH means nothing on the host: the usual one there.
            c.env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            );
        }
        if let Some(log) = log {
            // SAFETY: the helper is single-threaded (it runs before any runtime or thread is
            // started), so the child may go on with anything after fork(2).
            match unsafe { nix::unistd::fork() }.context("fork the daemon")? {
                nix::unistd::ForkResult::Parent { .. } => std::process::exit(0),
                nix::unistd::ForkResult::Child => {}
            }
            nix::unistd::setsid().context("setsid")?;
            if let Some(dir) = log.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("create {}", dir.display()))?;
            }
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .with_context(|| format!("open log {}", log.display()))?;
            c.stdout(f.try_clone()?).stderr(f).stdin(Stdio::null());
        }
        if let Some(pidfile) = pidfile {
            if let Some(dir) = pidfile.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("create {}", dir.display()))?;
            }
            std::fs::write(pidfile, format!("{}\n", std::process::id()))
                .with_context(|| format!("write {}", pidfile.display()))?;
        }
        let err = c.exec();
        Err(anyhow::Error::from(err).context(format!("execute {}", display(argv))))
    };
    match run() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// Moves this process into every cgroup host process `pid` is in (v1 hierarchies and v2).
fn join_cgroups_of(pid: i32) -> anyhow::Result<()> {
    use anyhow::Context;
    let init = procfs::process::Process::new(pid).with_context(|| format!("host process {pid}"))?;
    let cgroups = init
        .cgroups()
        .with_context(|| format!("/proc/{pid}/cgroup"))?;
    let me = procfs::process::Process::myself().context("/proc/self")?;
    let mounts = me.mountinfo().context("/proc/self/mountinfo")?;
    let pid = std::process::id().to_string();
    for cg in cgroups {
        let mount = mounts.0.iter().find(|m| {
            if cg.hierarchy == 0 {
                m.fs_type == "cgroup2"
            } else {
                m.fs_type == "cgroup"
                    && cg
                        .controllers
                        .iter()
                        .all(|c| m.super_options.contains_key(c.as_str()) || name_matches(m, c))
            }
        });
        let Some(mount) = mount else { continue };
        let dir = mount.mount_point.join(cg.pathname.trim_start_matches('/'));
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, &pid).with_context(|| format!("write {}", procs.display()))?;
    }
    Ok(())
}

/// A named v1 hierarchy (`name=systemd`) is mounted with the option `name=systemd`.
fn name_matches(m: &procfs::process::MountInfo, controller: &str) -> bool {
    controller
        .strip_prefix("name=")
        .is_some_and(|n| m.super_options.get("name").and_then(|v| v.as_deref()) == Some(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_are_under_the_root_mount() {
        let h = Host::new("/host");
        assert!(!h.is_direct());
        assert_eq!(
            h.path(Path::new("/etc/containerd/config.toml")),
            PathBuf::from("/host/etc/containerd/config.toml")
        );
        assert!(Host::new("/").is_direct());
        assert_eq!(
            Host::new("/").path(Path::new("/etc/x")),
            PathBuf::from("/etc/x")
        );
    }

    #[test]
    fn a_linked_file_stays_a_link_and_its_target_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let h = Host::new(dir.path());
        std::fs::create_dir_all(dir.path().join("etc/containerd")).unwrap();
        std::fs::write(dir.path().join("etc/containerd/real.toml"), "old").unwrap();
        let link = dir.path().join("etc/containerd/config.toml");
        // An absolute target, which means the host's path, not the installer's.
        std::os::unix::fs::symlink("/etc/containerd/real.toml", &link).unwrap();
        h.write(Path::new("/etc/containerd/config.toml"), b"new", 0o644)
            .unwrap();
        assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
        assert_eq!(
            std::fs::read(dir.path().join("etc/containerd/real.toml")).unwrap(),
            b"new"
        );
        assert_eq!(
            h.read(Path::new("/etc/containerd/config.toml"))
                .unwrap()
                .unwrap(),
            b"new"
        );
    }

    #[test]
    fn write_replaces_whole_and_restore_puts_back() {
        let dir = tempfile::tempdir().unwrap();
        let h = Host::new(dir.path());
        let p = Path::new("/etc/a/b.toml");
        h.write(p, b"one", 0o644).unwrap();
        assert_eq!(h.read(p).unwrap().unwrap(), b"one");
        h.restore(p, Some(b"two")).unwrap();
        assert_eq!(h.read(p).unwrap().unwrap(), b"two");
        h.restore(p, None).unwrap();
        assert!(h.read(p).unwrap().is_none());
        assert_eq!(
            std::fs::read_dir(dir.path().join("etc/a")).unwrap().count(),
            0
        );
    }
}
