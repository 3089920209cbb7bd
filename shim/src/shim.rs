//! The shim process's life as containerd drives it: `start` (spawn or reuse the pod's shim),
//! serving the Task API, and `delete` (clean up after a shim that died).

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::api::DeleteResponse;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::{Config, Error, Flags, StartOpts};
use tracing::{info, warn};

use crate::config::ShimConfig;
use crate::rootfs;
use crate::sandbox::Sandbox;
use crate::task::events::ContainerdEvents;
use crate::task::guest::VmBooter;
use crate::task::state::TaskState;
use crate::task::KiteTask;

pub struct KiteShim {
    id: String,
    namespace: String,
    /// containerd's address (its shim sockets are named after it, the namespace and the id).
    containerd_address: String,
    exit: Arc<ExitSignal>,
    config: ShimConfig,
}

/// Logs go to containerd's `log` FIFO in the bundle when serving, to stderr otherwise.
fn init_logging(config: &ShimConfig, serving: bool, debug: bool) {
    let level = if debug {
        "debug"
    } else {
        config.log_level.as_str()
    };
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A log write that fails must not stop the shim (see kite_config::daemon::init_logging).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .log_internal_errors(false);
    let log_fifo = serving
        .then(|| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("log")
                .ok()
        })
        .flatten();
    let _ = match log_fifo {
        Some(file) => builder.with_writer(std::sync::Mutex::new(file)).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}

/// Kills the serving shim of container `id`, if one runs (never this process).
fn kill_serving_shim(id: &str) -> bool {
    let me = std::process::id().to_string();
    let mut killed = false;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    for entry in entries.flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if pid == me || pid.parse::<i32>().is_err() {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_shim = args
            .first()
            .is_some_and(|a| a.ends_with(b"containerd-shim-kite-v2"));
        let serves = args.iter().any(|a| *a == b"-socket");
        let for_id = args
            .windows(2)
            .any(|w| w[0] == b"-id" && w[1] == id.as_bytes());
        if is_shim && serves && for_id {
            warn!(container = %id, pid = %pid, "killing the shim containerd gave up on");
            if let Ok(pid) = pid.parse::<i32>() {
                killed |= nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .is_ok();
            }
        }
    }
    killed
}

/// Removes the socket at `address` (`unix:///run/containerd/s/…`) when it is a socket nobody
/// listens on: containerd-shim removes it only on a shim's orderly exit, so a killed shim left it
/// behind. A socket still served (connect succeeds) stays; with `going` (its shim was just
/// killed) that is retried for a second while the process goes.
fn remove_dead_shim_socket(address: &str, going: bool) {
    use std::os::unix::fs::FileTypeExt;
    let path = Path::new(address.trim().trim_start_matches("unix://"));
    for _ in 0..if going { 20 } else { 1 } {
        if !std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            return;
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                if let Err(e) = std::fs::remove_file(path) {
                    warn!(socket = %path.display(), error = %e, "cannot remove a dead shim's socket");
                }
                return;
            }
            Err(_) => return,
        }
    }
}

#[async_trait]
impl Shim for KiteShim {
    type T = KiteTask;

    async fn new(_runtime_id: &str, args: &Flags, config: &mut Config) -> Self {
        // The shim's children (QEMU, virtiofsd) are tokio's to reap; the crate's reaper would
        // steal their exit statuses.
        config.no_reaper = true;
        config.no_sub_reaper = true;
        config.no_setup_logger = true;
        let loaded = ShimConfig::load();
        let serving = args.action.is_empty();
        let shim_config = loaded.as_ref().cloned().unwrap_or_default();
        init_logging(&shim_config, serving, args.debug);
        if let Err(e) = &loaded {
            warn!(
                error = %kite_protocol::errors::error_chain(e),
                "bad configuration; using the defaults"
            );
        }
        KiteShim {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            containerd_address: args.address.clone(),
            exit: Arc::new(ExitSignal::default()),
            config: shim_config,
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        // One shim per sandbox: a pod's containers find its shim by the sandbox id.
        let grouping = std::fs::read("config.json")
            .ok()
            .and_then(|b| serde_json::from_slice::<oci_spec::runtime::Spec>(&b).ok())
            .map(|spec| rootfs::sandbox_id(&opts.id, &spec))
            .unwrap_or_else(|| opts.id.clone());
        let address = spawn(opts, &grouping, Vec::new()).await?;
        // containerd reads the bundle's `address` file to reconnect after it restarts; without
        // it a restarted containerd takes the shim for dead and deletes its task.
        containerd_shim::asynchronous::util::write_str_to_file("address", &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        // containerd calls this when it takes the shim for dead: release whatever it left,
        // the serving shim itself included if it still runs.
        let killed = kill_serving_shim(&self.id);
        let own = Sandbox::dir_for(&self.config, &self.id);
        if own.exists() {
            warn!(sandbox = %self.id, "cleaning up after a dead shim");
            kite_vmm::cleanup_vm_dir(&own);
        }
        if let Ok(entries) = std::fs::read_dir(&self.config.state_dir) {
            for entry in entries.flatten() {
                let cdir = entry.path().join("share").join(&self.id);
                if cdir.exists() {
                    rootfs::release(&cdir);
                }
            }
        }
        // The dead shim's socket (it removes it itself only when it ends by its own exit): only
        // this id's own. A pod's other containers name the pod's shim socket in their
        // `address`, and that shim may well serve on.
        let own_socket =
            containerd_shim::socket_address(&self.containerd_address, &self.namespace, &self.id);
        if std::fs::read_to_string("address").is_ok_and(|a| a.trim() == own_socket) {
            remove_dead_shim_socket(&own_socket, killed);
        }
        let _ = std::fs::remove_file(Path::new("address"));
        info!(container = %self.id, namespace = %self.namespace, "deleted");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(DeleteResponse {
            exit_status: 137,
            exited_at: MessageField::some(crate::task::events::timestamp(now)),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let events = ContainerdEvents::new(publisher, &self.namespace);
        let state = Arc::new(TaskState::new(
            self.config.clone(),
            Arc::new(VmBooter),
            Arc::new(events),
        ));
        tokio::spawn(crate::orphans::watch(
            state.clone(),
            self.id.clone(),
            self.containerd_address.clone(),
            self.namespace.clone(),
            self.exit.clone(),
        ));
        KiteTask::new(state, self.exit.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::remove_dead_shim_socket;

    #[test]
    fn only_a_socket_nobody_listens_on_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        // Served: it stays (a pod's shim serving its other containers).
        remove_dead_shim_socket(&format!("unix://{}", socket.display()), false);
        assert!(socket.exists(), "a served socket stays");
        drop(listener);
        remove_dead_shim_socket(&format!("unix://{}\n", socket.display()), false);
        assert!(!socket.exists(), "a dead socket is removed");
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        remove_dead_shim_socket(&format!("unix://{}", file.display()), true);
        assert!(file.exists(), "a file that is not a socket stays");
        remove_dead_shim_socket("unix:///no/such/socket", false);
    }
}
