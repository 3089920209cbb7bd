//! Container set-up with youki's `libcontainer`.
//!
//! libcontainer forks the container's processes from the calling process. Forking a
//! multi-threaded process (the agent runs tokio) and then allocating in the child is unsafe, and
//! libcontainer also waits for its own intermediate process, which would race PID 1's reaper.
//! So create and exec run in a short-lived single-threaded helper: the agent executes itself as
//! `kite-guest runtime create|exec …` with the container's stdio as the helper's stdio; the
//! helper writes its result (pid or error) to a file and exits. The container's processes are
//! then re-parented to PID 1, which reaps them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::signal::Signal;
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use serde::{Deserialize, Serialize};

/// libcontainer's state root in the guest.
pub const STATE_ROOT: &str = "/run/kite/state";
/// Per-container directory in the guest: config.json, exec process files, results, sockets.
pub const BUNDLES: &str = "/run/kite/containers";

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("container {id}: invalid OCI spec: {reason}")]
    Spec { id: String, reason: String },
    #[error("container {id}: {op}")]
    Io {
        id: String,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("container {id}: {op}")]
    Container {
        id: String,
        op: &'static str,
        source: Box<libcontainer::error::LibcontainerError>,
    },
    #[error("container {id}: {message}")]
    Helper { id: String, message: String },
}

/// What the helper did: a pid or an error.
#[derive(Debug, Serialize, Deserialize)]
pub enum HelperResult {
    Pid(i32),
    Error(String),
}

/// What the helper writes to its result file: its result, and when its own code began and
/// ended (Unix ns), so the agent can tell the helper's start-up (exec, loading) and its exit
/// from libcontainer's work.
#[derive(Debug, Serialize, Deserialize)]
pub struct HelperReport {
    pub result: HelperResult,
    pub began_ns: u64,
    pub ended_ns: u64,
}

/// The time now, Unix ns.
pub fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

pub fn bundle_dir(id: &str) -> PathBuf {
    Path::new(BUNDLES).join(id)
}

/// Adapts a host OCI spec to the guest: the rootfs is the one shared into the VM, the cgroup is
/// the guest's, and what only makes sense on the host (namespace paths, the network namespace,
/// which is the VM's own, hooks, LSM labels) is dropped.
pub fn adapt_spec(id: &str, spec: &mut Spec, rootfs: &Path) -> Result<(), RuntimeError> {
    let invalid = |reason: &str| RuntimeError::Spec {
        id: id.to_string(),
        reason: reason.to_string(),
    };
    if spec.process().is_none() {
        return Err(invalid("no process"));
    }
    if spec
        .process()
        .as_ref()
        .is_some_and(|p| p.args().as_ref().is_none_or(|a| a.is_empty()))
    {
        return Err(invalid("process.args is empty"));
    }
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(rootfs.to_path_buf());
    spec.set_root(Some(root));
    spec.set_hooks(None);
    if let Some(process) = spec.process_mut() {
        process.set_apparmor_profile(None);
        process.set_selinux_label(None);
    }
    if let Some(linux) = spec.linux_mut() {
        linux.set_cgroups_path(Some(PathBuf::from(format!("/kite/{id}"))));
        linux.set_mount_label(None);
        if let Some(namespaces) = linux.namespaces_mut() {
            namespaces.retain(|ns| ns.path().is_none() && ns.typ() != LinuxNamespaceType::Network);
        }
    }
    Ok(())
}

fn container_error(id: &str, op: &'static str) -> impl FnOnce(LibcontainerError) -> RuntimeError {
    let id = id.to_string();
    move |source| RuntimeError::Container {
        id,
        op,
        source: Box::new(source),
    }
}

/// A builder for container `id` with the guest's state root, and the helper's own stdio as the
/// process's stdio unless a console socket gives it a pty.
fn builder(id: &str, console_socket: Option<&Path>) -> Result<ContainerBuilder, RuntimeError> {
    let builder = ContainerBuilder::new(id.to_string(), SyscallType::Linux)
        .with_root_path(STATE_ROOT)
        .map_err(container_error(id, "state root"))?
        .with_console_socket(console_socket);
    match console_socket {
        Some(_) => Ok(builder),
        None => with_inherited_stdio(builder, id),
    }
}

/// The helper side of `create`: builds the container (not yet started) and returns its pid.
pub fn helper_create(
    id: &str,
    bundle: &Path,
    console_socket: Option<&Path>,
) -> Result<i32, RuntimeError> {
    let container = builder(id, console_socket)?
        .as_init(bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()
        .map_err(container_error(id, "create"))?;
    container
        .pid()
        .map(|p| p.as_raw())
        .ok_or_else(|| RuntimeError::Helper {
            id: id.to_string(),
            message: "created container has no pid".into(),
        })
}

/// The helper side of `exec`: starts `process` (an OCI process file) in container `id`.
pub fn helper_exec(
    id: &str,
    process: &Path,
    console_socket: Option<&Path>,
) -> Result<i32, RuntimeError> {
    let pid = builder(id, console_socket)?
        .as_tenant()
        .with_process(Some(process))
        .with_detach(true)
        .build()
        .map_err(container_error(id, "exec"))?;
    Ok(pid.as_raw())
}

fn with_inherited_stdio(
    builder: ContainerBuilder,
    id: &str,
) -> Result<ContainerBuilder, RuntimeError> {
    let dup = |fd: std::os::fd::BorrowedFd<'_>| {
        fd.try_clone_to_owned().map_err(|source| RuntimeError::Io {
            id: id.to_string(),
            op: "duplicate stdio",
            source,
        })
    };
    Ok(builder
        .with_stdin(dup(std::io::stdin().as_fd())?)
        .with_stdout(dup(std::io::stdout().as_fd())?)
        .with_stderr(dup(std::io::stderr().as_fd())?))
}

use std::os::fd::AsFd;

fn load(id: &str) -> Result<Container, RuntimeError> {
    Container::load(Path::new(STATE_ROOT).join(id)).map_err(|source| RuntimeError::Container {
        id: id.to_string(),
        op: "load state",
        source: Box::new(source),
    })
}

/// One container start at a time: libcontainer 0.7 reaches a container's notify socket by
/// changing the process-wide working directory to the socket's directory and connecting to its
/// relative name (socket paths are limited to 108 bytes), then changing back. Two starts on two
/// threads at once could each connect to the other's socket, starting the wrong container
/// or failing. A start is a few milliseconds of work, so serializing costs nothing measurable.
/// libcontainer does not change back when the connection fails, so each start ends by changing
/// to `/` itself (the runtime helpers are spawned in `/` explicitly).
static START: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Lets the created container's process run its command.
pub fn start(id: &str) -> Result<(), RuntimeError> {
    // A poisoned lock means an earlier start panicked; each start changes to the directory it
    // needs itself and back to `/`, so going on is safe.
    let _one_at_a_time = START
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let started = load(id).and_then(|mut c| {
        c.start().map_err(|source| RuntimeError::Container {
            id: id.to_string(),
            op: "start",
            source: Box::new(source),
        })
    });
    // Never left in a container's state directory (gone once the container is removed).
    let _ = std::env::set_current_dir("/");
    started
}

/// Signals every process of the container.
pub fn kill_all(id: &str, signal: Signal) -> Result<(), RuntimeError> {
    load(id)?
        .kill(signal, true)
        .map_err(|source| RuntimeError::Container {
            id: id.to_string(),
            op: "kill all",
            source: Box::new(source),
        })
}

/// Kills what is left of the container and removes its state and cgroup.
pub fn delete(id: &str) -> Result<(), RuntimeError> {
    match load(id) {
        Ok(mut c) => c.delete(true).map_err(|source| RuntimeError::Container {
            id: id.to_string(),
            op: "delete",
            source: Box::new(source),
        })?,
        Err(_) if !Path::new(STATE_ROOT).join(id).exists() => {}
        Err(e) => return Err(e),
    }
    let _ = std::fs::remove_dir_all(bundle_dir(id));
    Ok(())
}

/// Entry point of `kite-guest runtime …` (the helper process). Returns the process exit code.
pub fn helper_main(args: &[String]) -> i32 {
    let began_ns = unix_ns();
    let mut opts: HashMap<&str, &str> = HashMap::new();
    let mut it = args.iter().skip(1);
    let op = it.next().map(String::as_str).unwrap_or_default();
    while let Some(key) = it.next() {
        if let Some(value) = it.next() {
            opts.insert(key.trim_start_matches('-'), value);
        }
    }
    let (Some(id), Some(result_path)) = (opts.get("id"), opts.get("result")) else {
        eprintln!("usage: kite-guest runtime create|exec --id ID --result FILE [--bundle DIR] [--process FILE] [--console-socket SOCK]");
        return 2;
    };
    let console = opts.get("console-socket").map(Path::new);
    let result = match op {
        "create" => helper_create(id, Path::new(opts.get("bundle").unwrap_or(&"")), console),
        "exec" => helper_exec(id, Path::new(opts.get("process").unwrap_or(&"")), console),
        other => Err(RuntimeError::Helper {
            id: id.to_string(),
            message: format!("unknown runtime operation {other:?}"),
        }),
    };
    let (code, out) = match result {
        Ok(pid) => (0, HelperResult::Pid(pid)),
        Err(e) => (
            1,
            HelperResult::Error(kite_protocol::errors::error_chain(&e)),
        ),
    };
    let report = HelperReport {
        result: out,
        began_ns,
        ended_ns: unix_ns(),
    };
    let text = serde_json::to_string(&report).unwrap_or_default();
    if std::fs::write(result_path, text).is_err() {
        return 3;
    }
    code
}

/// The kinds of namespace a spec asks for, in order (for tests).
#[cfg(test)]
pub(crate) fn namespace_kinds(spec: &Spec) -> Vec<LinuxNamespaceType> {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .map(|ns| ns.iter().map(|n| n.typ()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{LinuxBuilder, LinuxNamespaceBuilder, ProcessBuilder, SpecBuilder};

    fn spec_with(namespaces: Vec<oci_spec::runtime::LinuxNamespace>, args: Vec<String>) -> Spec {
        SpecBuilder::default()
            .process(ProcessBuilder::default().args(args).build().unwrap())
            .linux(
                LinuxBuilder::default()
                    .namespaces(namespaces)
                    .cgroups_path(PathBuf::from("/default/c1"))
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap()
    }

    #[test]
    fn spec_is_adapted_to_the_guest() {
        let ns = |t, path: Option<&str>| {
            let mut b = LinuxNamespaceBuilder::default().typ(t);
            if let Some(p) = path {
                b = b.path(PathBuf::from(p));
            }
            b.build().unwrap()
        };
        let mut spec = spec_with(
            vec![
                ns(LinuxNamespaceType::Pid, None),
                ns(LinuxNamespaceType::Network, None),
                ns(LinuxNamespaceType::Ipc, Some("/proc/77/ns/ipc")),
                ns(LinuxNamespaceType::Mount, None),
            ],
            vec!["sh".into()],
        );
        adapt_spec("c1", &mut spec, Path::new("/run/kite/share/c1/rootfs")).unwrap();
        assert_eq!(
            spec.root().as_ref().unwrap().path(),
            Path::new("/run/kite/share/c1/rootfs")
        );
        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(linux.cgroups_path().as_deref(), Some(Path::new("/kite/c1")));
        let kinds = namespace_kinds(&spec);
        assert_eq!(
            kinds,
            vec![LinuxNamespaceType::Pid, LinuxNamespaceType::Mount]
        );
    }

    #[test]
    fn a_spec_without_a_command_is_refused() {
        let mut spec = spec_with(vec![], vec![]);
        let err = adapt_spec("c2", &mut spec, Path::new("/x")).unwrap_err();
        assert!(err.to_string().contains("c2"), "{err}");
        assert!(err.to_string().contains("args"), "{err}");
    }
}
