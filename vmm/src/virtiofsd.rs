//! virtiofsd: the vhost-user process that serves a VM's share over virtio-fs.

use std::path::Path;
use std::process::Stdio;

use tokio::process::{Child, Command};

use crate::config::VmConfig;
use crate::qemu::set_lifetime;
use crate::VmError;

/// Starts virtiofsd on `shared_dir`, listening on `socket`, logging to `log`; an `owned` one
/// dies with the calling process, a pooled VM's outlives it.
pub fn spawn(
    config: &VmConfig,
    vm: &str,
    socket: &Path,
    shared_dir: &Path,
    log: &Path,
    owned: bool,
) -> Result<Child, VmError> {
    if !config.virtiofsd_path.exists() {
        return Err(VmError::Missing {
            vm: vm.into(),
            what: "virtiofsd",
            path: config.virtiofsd_path.clone(),
        });
    }
    let log_file = std::fs::File::create(log).map_err(|source| VmError::Spawn {
        vm: vm.into(),
        what: "virtiofsd (log file)",
        source,
    })?;
    let mut cmd = Command::new(&config.virtiofsd_path);
    cmd.arg(format!("--socket-path={}", socket.display()))
        .arg(format!("--shared-dir={}", shared_dir.display()))
        .args([
            "--cache=auto",
            "--sandbox=namespace",
            "--announce-submounts",
        ])
        .arg("--xattr")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
    set_lifetime(&mut cmd, owned);
    cmd.spawn().map_err(|source| VmError::Spawn {
        vm: vm.into(),
        what: "virtiofsd",
        source,
    })
}
