//! kite's daemons (kite-snapshotter, kite-agent, kite-pool) and containerd's restart, through the host's
//! service manager: systemd when the host runs it, otherwise pid files and a command the
//! operator names for containerd.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::host::{Host, HostError};
use crate::kite_config::Layout;

/// kite's daemons, in start order (the snapshotter before containerd dials it; the warm pool
/// last, stopped first).
pub const DAEMONS: [&str; 3] = ["kite-snapshotter", "kite-agent", POOL_DAEMON];

/// The warm pool's holder: it only makes pods start sooner, so a node's health does not need it
/// (and it exits once it has drained when the operator turns the pool off).
pub const POOL_DAEMON: &str = "kite-pool";

const SNAPSHOTTER_UNIT: &str = include_str!("../../deploy/systemd/kite-snapshotter.service");
const AGENT_UNIT: &str = include_str!("../../deploy/systemd/kite-agent.service");
const POOL_UNIT: &str = include_str!("../../deploy/systemd/kite-pool.service");

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(
        "the host has no systemd: name the command that restarts containerd \
         (--containerd-restart / KITE_CONTAINERD_RESTART)"
    )]
    NoRestartCommand,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceManager {
    Systemd { containerd_unit: String },
    Command { containerd_restart: Option<String> },
}

impl ServiceManager {
    /// `choice`: `auto` (systemd when the host booted with it), `systemd` or `command`.
    pub fn choose(
        host: &Host,
        choice: &str,
        containerd_unit: &str,
        containerd_restart: Option<String>,
    ) -> ServiceManager {
        // sd_booted(3): systemd is PID 1 when /run/systemd/system exists.
        let systemd = match choice {
            "systemd" => true,
            "command" => false,
            _ => host.exists(Path::new("/run/systemd/system")),
        };
        if systemd {
            ServiceManager::Systemd {
                containerd_unit: containerd_unit.to_string(),
            }
        } else {
            ServiceManager::Command { containerd_restart }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            ServiceManager::Systemd { .. } => "systemd",
            ServiceManager::Command { .. } => "command",
        }
    }

    /// Fails before anything changes when containerd could not be restarted.
    pub fn check(&self) -> Result<(), ServiceError> {
        match self {
            ServiceManager::Command {
                containerd_restart: None,
            } => Err(ServiceError::NoRestartCommand),
            _ => Ok(()),
        }
    }

    pub fn restart_containerd(&self, host: &Host) -> Result<(), ServiceError> {
        match self {
            ServiceManager::Systemd { containerd_unit } => {
                host.run(&["systemctl", "restart", containerd_unit])?;
            }
            ServiceManager::Command { containerd_restart } => {
                let cmd = containerd_restart
                    .as_deref()
                    .ok_or(ServiceError::NoRestartCommand)?;
                host.run(&["/bin/sh", "-c", cmd])?;
            }
        }
        Ok(())
    }

    /// The unit files kite installs under systemd (host path, text).
    pub fn units(layout: &Layout) -> Vec<(PathBuf, String)> {
        let fill = |t: &str| {
            t.replace("@BIN@", &layout.current().join("bin").display().to_string())
                .replace("@CONFIG@", &layout.kite_config().display().to_string())
        };
        vec![
            (
                PathBuf::from("/etc/systemd/system/kite-snapshotter.service"),
                fill(SNAPSHOTTER_UNIT),
            ),
            (
                PathBuf::from("/etc/systemd/system/kite-agent.service"),
                fill(AGENT_UNIT),
            ),
            (
                PathBuf::from("/etc/systemd/system/kite-pool.service"),
                fill(POOL_UNIT),
            ),
        ]
    }

    /// Makes the service manager read the unit files again (systemd).
    pub fn reload(&self, host: &Host) -> Result<(), ServiceError> {
        if let ServiceManager::Systemd { .. } = self {
            host.run(&["systemctl", "daemon-reload"])?;
        }
        Ok(())
    }

    /// Starts kite's daemon `d`, or restarts it onto the `current` binaries when it runs.
    pub fn restart_daemon(
        &self,
        host: &Host,
        layout: &Layout,
        d: &str,
    ) -> Result<(), ServiceError> {
        match self {
            ServiceManager::Systemd { .. } => {
                host.run(&["systemctl", "enable", &format!("{d}.service")])?;
                host.run(&["systemctl", "restart", &format!("{d}.service")])?;
            }
            ServiceManager::Command { .. } => {
                stop_pidfile_daemon(host, layout, d);
                host.remove_file(&layout.pidfile(d))?;
                let argv: Vec<OsString> = vec![
                    layout.current_bin(d).into(),
                    "--config".into(),
                    layout.kite_config().into(),
                ];
                host.spawn_daemon(&argv, &layout.daemon_log(d), &layout.pidfile(d))?;
            }
        }
        Ok(())
    }

    /// Stops kite's daemons (agent first) and, under systemd, disables them.
    pub fn stop_daemons(&self, host: &Host, layout: &Layout) -> Result<(), ServiceError> {
        for d in DAEMONS.iter().rev() {
            match self {
                ServiceManager::Systemd { .. } => {
                    let unit = format!("{d}.service");
                    if let Err(e) = host.run(&["systemctl", "disable", "--now", &unit]) {
                        // A unit never installed is fine; one still running is not.
                        let active = host.run(&["systemctl", "is-active", "--quiet", &unit]);
                        if active.is_ok() {
                            return Err(e.into());
                        }
                    }
                }
                ServiceManager::Command { .. } => {
                    stop_pidfile_daemon(host, layout, d);
                    host.remove_file(&layout.pidfile(d))?;
                }
            }
        }
        Ok(())
    }

    /// The daemons' pids (by pid file or systemd), for `status`.
    pub fn daemon_pids(&self, host: &Host, layout: &Layout) -> Vec<(String, Option<i32>)> {
        DAEMONS
            .iter()
            .map(|d| {
                let pid = match self {
                    ServiceManager::Systemd { .. } => host
                        .run(&["systemctl", "show", "-p", "MainPID", "--value", d])
                        .ok()
                        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
                        .filter(|p| *p > 0),
                    ServiceManager::Command { .. } => pidfile_daemon(host, layout, d),
                };
                (d.to_string(), pid)
            })
            .collect()
    }
}

/// The pid in `daemon`'s pid file when that process lives and runs one of the install's
/// binaries (a stale pid file naming a reused pid is not trusted).
fn pidfile_daemon(host: &Host, layout: &Layout, daemon: &str) -> Option<i32> {
    let text = host.read(&layout.pidfile(daemon)).ok()??;
    let pid: i32 = String::from_utf8_lossy(&text).trim().parse().ok()?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    // An upgraded package's old binary reads as "<path> (deleted)".
    let exe = exe.to_string_lossy();
    let exe = Path::new(exe.strip_suffix(" (deleted)").unwrap_or(&exe));
    (exe.starts_with(&layout.prefix) && exe.file_name()? == daemon).then_some(pid)
}

fn stop_pidfile_daemon(host: &Host, layout: &Layout, daemon: &str) {
    if let Some(pid) = pidfile_daemon(host, layout, daemon) {
        terminate(daemon, pid, Duration::from_secs(30));
    }
}

/// SIGTERM, up to `grace` for the process to go, then SIGKILL (logged) and a wait for it.
pub fn terminate(what: &str, pid: i32, grace: Duration) {
    let p = Pid::from_raw(pid);
    if kill(p, Signal::SIGTERM).is_err() {
        return;
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !alive(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::warn!(
        what,
        pid,
        "did not stop within {} s of SIGTERM; killed",
        grace.as_secs()
    );
    let _ = kill(p, Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Alive and not a zombie.
pub fn alive(pid: i32) -> bool {
    procfs::process::Process::new(pid)
        .and_then(|p| p.stat())
        .is_ok_and(|s| s.state != 'Z' && s.state != 'X')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_run_the_current_binaries_with_the_install_config() {
        let layout = Layout {
            prefix: "/opt/kite".into(),
            config_dir: "/etc/kite".into(),
            run_dir: "/run/kite".into(),
            state_dir: "/var/lib/kite".into(),
            log_dir: "/var/log/kite".into(),
        };
        let units = ServiceManager::units(&layout);
        assert_eq!(units.len(), 3);
        for (path, text) in &units {
            assert!(path.starts_with("/etc/systemd/system"));
            assert!(!text.contains('@'), "{text}");
            assert!(text.contains("ExecStart=/opt/kite/current/bin/kite-"));
            assert!(text.contains("--config /etc/kite/kite.toml"));
            assert!(text.contains("KillMode=process"));
        }
    }

    #[test]
    fn choosing_without_systemd_needs_a_restart_command() {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::new(dir.path());
        let m = ServiceManager::choose(&host, "auto", "containerd", None);
        assert_eq!(m.name(), "command");
        assert!(m
            .check()
            .unwrap_err()
            .to_string()
            .contains("KITE_CONTAINERD_RESTART"));
        std::fs::create_dir_all(dir.path().join("run/systemd/system")).unwrap();
        let m = ServiceManager::choose(&host, "auto", "containerd", None);
        assert_eq!(m.name(), "systemd");
        assert!(m.check().is_ok());
    }
}
