//! The host cgroup a VM's processes run in: for a pod, the cgroup of its sandbox container,
//! under the pod's cgroup, whose limits the kubelet sets (so they bound the VM) and whose stats
//! the CRI reports.

use std::path::{Path, PathBuf};
use std::time::Duration;

use libcgroups::common::{AnyCgroupManager, CgroupManager};
use tracing::warn;

/// The file in the VM's directory that names the host cgroup it was placed in.
const CGROUP_FILE: &str = "cgroup";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("record it in {path}")]
    Record {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("open it")]
    Open(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("add pid {pid}")]
    AddTask {
        pid: u32,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn manager(path: &str) -> Result<AnyCgroupManager, CgroupError> {
    libcgroups::common::create_cgroup_manager(libcgroups::common::CgroupConfig {
        cgroup_path: PathBuf::from(path),
        systemd_cgroup: false,
        container_name: String::new(),
    })
    .map_err(|e| CgroupError::Open(Box::new(e)))
}

/// The host cgroup an OCI spec names (`linux.cgroupsPath`), when it is a plain path. A
/// systemd-style path (`slice:prefix:name`) is not handled: no systemd manages cgroups here.
pub fn cgroup_path_of(spec: &oci_spec::runtime::Spec) -> Option<String> {
    let path = spec.linux().as_ref()?.cgroups_path().as_ref()?;
    let path = path.display().to_string();
    if path.is_empty() || path.contains(':') {
        return None;
    }
    Some(path)
}

/// Moves `pids` into the cgroup at `path` (made if missing; its limits are the kubelet's to
/// set). The path is recorded in `vm_dir` first, so [`remove`] finds it after a crash.
pub fn place(vm_dir: &Path, path: &str, pids: &[u32]) -> Result<(), CgroupError> {
    let record = vm_dir.join(CGROUP_FILE);
    std::fs::write(&record, path).map_err(|source| CgroupError::Record {
        path: record.clone(),
        source,
    })?;
    join(path, pids)
}

/// Moves `pids` into the cgroup at `path` (made if missing) without recording it anywhere: a
/// cgroup many VMs share (the warm pool's), which no VM's release removes.
pub fn join(path: &str, pids: &[u32]) -> Result<(), CgroupError> {
    let manager = manager(path)?;
    for pid in pids {
        let raw = i32::try_from(*pid).unwrap_or(i32::MAX);
        manager
            .add_task(nix::unistd::Pid::from_raw(raw))
            .map_err(|e| CgroupError::AddTask {
                pid: *pid,
                source: Box::new(e),
            })?;
    }
    Ok(())
}

/// Removes the cgroup [`place`] recorded in `vm_dir`, once its processes are gone.
pub fn remove(vm_dir: &Path) {
    let Ok(path) = std::fs::read_to_string(vm_dir.join(CGROUP_FILE)) else {
        return;
    };
    remove_path(&path);
}

/// Removes the cgroup `path` (one [`join`]ed, e.g. the warm pool's, once its VMs are gone);
/// a cgroup that does not exist is fine.
pub fn remove_path(path: &str) {
    // A killed process leaves its cgroup only when its exit completes: retry for a while.
    let mut last = None;
    for _ in 0..150 {
        let removed =
            manager(path).and_then(|m| m.remove().map_err(|e| CgroupError::Open(Box::new(e))));
        match removed {
            Ok(()) => return,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(e) = last {
        warn!(cgroup = %path, error = %kite_protocol::errors::error_chain(&e), "remove host cgroup");
    }
}
