//! Warming up a VM before a pod adopts it (`WarmUp`).
//!
//! A pooled VM's first container set-up runs code nothing in the VM has run since boot: the
//! runtime helper's libcontainer paths and the kernel's namespace, mount, cgroup and exec
//! paths. Under TCG each first run is translated (most of a container's ~300 ms set-up); under
//! KVM it is paged in and cached. The warm-up runs one throwaway container through the whole
//! path — the same helper, a spec with a typical pod's namespaces, mounts and cgroup limits —
//! and removes everything it made, so a pod adopting the VM finds it as it was after boot,
//! with that code already warm.
//!
//! The container's rootfs is a directory on the guest's root filesystem holding a hard link to
//! the agent's own static binary (no copy in guest RAM); its process is that binary asked to
//! exit at once ([`EXIT_ARG`]).

use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResourcesBuilder, ProcessBuilder,
    Spec,
};

use crate::runtime;

/// The throwaway container's id (not a containerd id: those are 64 hex digits).
pub const ID: &str = "kite-warm-up";
/// Its rootfs: on the root filesystem, beside the agent's binary, so the binary is a link.
pub const ROOT: &str = "/.kite-warm-up";
/// The argument that makes `kite-guest` exit at once: the warm-up container's command.
pub const EXIT_ARG: &str = "warm-up-exit";
/// How long the guest gives a warm-up, its clean-up included.
pub const WITHIN: std::time::Duration = kite_protocol::GUEST_WARM_UP_WITHIN;
/// Where the agent's binary is (the guest's `/init`).
const AGENT_BINARY: &str = "/init";
/// The container's cgroup: beside `/kite`, not in it, since a pod's stats are `/kite`'s and a
/// removed cgroup's CPU time stays counted in its parent.
const CGROUP: &str = "/kite-warm-up";
fn cgroup_dir() -> PathBuf {
    Path::new("/sys/fs/cgroup").join(CGROUP.trim_start_matches('/'))
}

#[derive(Debug, thiserror::Error)]
pub enum WarmUpError {
    #[error("warm-up: {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("warm-up: {0}")]
    Runtime(#[from] runtime::RuntimeError),
    #[error("warm-up: {what} {path} is still there after the clean-up")]
    Left { what: &'static str, path: PathBuf },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> WarmUpError {
    let path = path.to_path_buf();
    move |source| WarmUpError::Io { op, path, source }
}

/// Makes the rootfs: `ROOT/init`, a hard link to the agent's binary. Returns the rootfs.
pub fn prepare_root() -> Result<PathBuf, WarmUpError> {
    let root = Path::new(ROOT);
    std::fs::create_dir_all(root).map_err(io("create", root))?;
    let binary = root.join("init");
    match std::fs::hard_link(AGENT_BINARY, &binary) {
        Ok(()) => Ok(root.to_path_buf()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(root.to_path_buf()),
        Err(e) => Err(io("link the agent's binary to", &binary)(e)),
    }
}

/// The warm-up container's spec: the OCI default (pid, ipc, uts, mount and cgroup namespaces,
/// /proc, /dev, /dev/pts, /dev/shm, /dev/mqueue, /sys, masked and read-only paths,
/// capabilities, a read-only rootfs) with memory, CPU and pids limits as a pod's container has,
/// adapted to the guest like any container's, in a cgroup of its own beside the pods'.
pub fn spec(rootfs: &Path) -> Result<Spec, WarmUpError> {
    let mut spec = Spec::default();
    let process = ProcessBuilder::default()
        .args(vec!["/init".to_string(), EXIT_ARG.to_string()])
        .cwd("/")
        .env(vec!["PATH=/".to_string()])
        .no_new_privileges(true)
        .terminal(false)
        .build()
        .expect("a constant process builds");
    spec.set_process(Some(process));
    let resources = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(64 * 1024 * 1024)
                .build()
                .expect("a constant limit builds"),
        )
        .cpu(
            LinuxCpuBuilder::default()
                .shares(2u64)
                .build()
                .expect("a constant share builds"),
        )
        .pids(
            LinuxPidsBuilder::default()
                .limit(16)
                .build()
                .expect("a constant limit builds"),
        )
        .build()
        .expect("constant resources build");
    if let Some(linux) = spec.linux_mut() {
        linux.set_resources(Some(resources));
    }
    runtime::adapt_spec(ID, &mut spec, rootfs)?;
    if let Some(linux) = spec.linux_mut() {
        linux.set_cgroups_path(Some(PathBuf::from(CGROUP)));
    }
    Ok(spec)
}

/// Removes whatever a warm-up left, finished or not: the container's processes (the cgroup's
/// `cgroup.kill`) and cgroup, libcontainer's state, the bundle and the rootfs; then checks
/// that each is gone.
pub fn remove_leftovers() -> Result<(), WarmUpError> {
    let cgroup = cgroup_dir();
    if cgroup.exists() {
        // cgroup.kill (5.14+) kills every process in the cgroup; the reaper collects them.
        let _ = std::fs::write(cgroup.join("cgroup.kill"), "1");
    }
    let deleted = runtime::delete(ID);
    // libcontainer removes the cgroup on delete; once more in case the state was never
    // written. A killed process leaves its cgroup within a moment.
    for _ in 0..50 {
        match std::fs::remove_dir(&cgroup) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            _ => break,
        }
    }
    let _ = std::fs::remove_dir_all(ROOT);
    // The runtime's directories, if the warm-up made them (a pod's containers make them again).
    for dir in [runtime::STATE_ROOT, runtime::BUNDLES] {
        let _ = std::fs::remove_dir(dir);
    }
    deleted?;
    let left = [
        ("cgroup", cgroup),
        ("state", Path::new(runtime::STATE_ROOT).join(ID)),
        ("bundle", runtime::bundle_dir(ID)),
        ("rootfs", PathBuf::from(ROOT)),
    ];
    for (what, path) in left {
        if path.exists() {
            return Err(WarmUpError::Left { what, path });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::LinuxNamespaceType;

    #[test]
    fn the_spec_runs_the_agent_binary_in_its_own_namespaces_with_limits() {
        let spec = spec(Path::new(ROOT)).unwrap();
        assert_eq!(spec.root().as_ref().unwrap().path(), Path::new(ROOT));
        let process = spec.process().as_ref().unwrap();
        assert_eq!(
            process.args().as_deref(),
            Some(&["/init".to_string(), EXIT_ARG.to_string()][..])
        );
        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/kite-warm-up"))
        );
        let kinds = runtime::namespace_kinds(&spec);
        assert!(kinds.contains(&LinuxNamespaceType::Pid), "{kinds:?}");
        assert!(kinds.contains(&LinuxNamespaceType::Mount), "{kinds:?}");
        assert!(!kinds.contains(&LinuxNamespaceType::Network), "{kinds:?}");
        let resources = linux.resources().as_ref().unwrap();
        assert_eq!(
            resources.memory().as_ref().unwrap().limit(),
            Some(64 * 1024 * 1024)
        );
        assert!(!spec.mounts().as_ref().unwrap().is_empty());
    }

    #[test]
    fn the_id_is_no_containerd_id() {
        // containerd's ids are 64 hex digits: a pod's container never has this one.
        assert!(!ID.chars().all(|c| c.is_ascii_hexdigit()));
        crate::request::check_id("container", ID).unwrap();
    }
}
