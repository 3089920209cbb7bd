//! The containers and processes of one sandbox, and what each Task API call does to them:
//! the shim's state machine, free of ttrpc (see [`super::service`]) and of QEMU (it reaches
//! the VM through [`PodSandbox`] and [`super::guest::GuestAgent`], which unit tests fake).
//!
//! A process goes CREATED → RUNNING → STOPPED; its exit is reported once (TaskExit), by the
//! task that waits for it in the guest, or by the VM's death (status 137). A pod's sandbox
//! container has no process in the guest: its pid is QEMU's, a signal ends it, and the VM's
//! death ends it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_shim::protos::api::{Mount, Status};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use tokio::sync::{watch, Mutex};
use tracing::{error, info, warn};

use super::error::TaskError;
use super::events::{now, timestamp, EventSink, TaskEvent};
use super::guest::{ContainerStats, GuestError, NewContainer, PodSandbox, SandboxBooter};
use super::timings::{StartTimings, TimingsLog};
use crate::config::ShimConfig;
use crate::io::{Relays, StdioPaths};
use crate::rootfs;

const SIGKILL: u32 = nix::sys::signal::Signal::SIGKILL as u32;

/// How long output may keep flowing after a process exited (a child that inherited stdout).
const DRAIN: Duration = Duration::from_secs(2);
/// How long a process may take to exit after a SIGKILL before its VM is stopped.
/// (Generous: a process in uninterruptible sleep on the share under TCG takes its time.)
pub(super) const SIGKILL_EXIT_WITHIN: Duration = Duration::from_secs(30);
/// How long an orphaned container's process may take to end after SIGKILL or its VM's end.
const ABANDON_WAIT: Duration = Duration::from_secs(10);
/// The exit status reported when the VM died under a process.
pub const VM_GONE_STATUS: u32 = 137;

/// A process's state as containerd sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessStatus {
    pub status: Status,
    pub pid: u32,
    pub exit_status: u32,
    pub exited_at: Option<Timestamp>,
}

/// A process of a container: its init or an exec.
struct Process {
    container_id: String,
    exec_id: String,
    stdio: StdioPaths,
    /// The OCI process of an exec (JSON), kept until Start.
    exec_spec: Option<Vec<u8>>,
    state: std::sync::Mutex<ProcessStatus>,
    exited: watch::Sender<bool>,
    relays: Mutex<Option<Relays>>,
    /// False for a pod's sandbox container, which has no process in the guest.
    in_guest: bool,
}

impl Process {
    fn new(
        container_id: &str,
        exec_id: &str,
        stdio: StdioPaths,
        exec_spec: Option<Vec<u8>>,
        in_guest: bool,
    ) -> Self {
        Self {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            stdio,
            exec_spec,
            in_guest,
            state: std::sync::Mutex::new(ProcessStatus {
                status: Status::CREATED,
                pid: 0,
                exit_status: 0,
                exited_at: None,
            }),
            exited: watch::channel(false).0,
            relays: Mutex::new(None),
        }
    }

    fn status(&self) -> ProcessStatus {
        self.state.lock().expect("process state lock").clone()
    }

    fn update(&self, f: impl FnOnce(&mut ProcessStatus)) {
        f(&mut self.state.lock().expect("process state lock"));
    }

    async fn wait(&self) -> ProcessStatus {
        let mut rx = self.exited.subscribe();
        let _ = rx.wait_for(|e| *e).await;
        self.status()
    }

    fn name(&self) -> String {
        if self.exec_id.is_empty() {
            format!("container {}", self.container_id)
        } else {
            format!("container {} exec {}", self.container_id, self.exec_id)
        }
    }

    /// Records the exit and reports it (TaskExit), once.
    async fn finish(&self, events: &dyn EventSink, exit_status: u32, at: Timestamp) {
        let pid = {
            let mut st = self.state.lock().expect("process state lock");
            if st.status == Status::STOPPED {
                return;
            }
            st.status = Status::STOPPED;
            st.exit_status = exit_status;
            st.exited_at = Some(at.clone());
            st.pid
        };
        info!(exit_status, "{} exited", self.name());
        let id = if self.exec_id.is_empty() {
            self.container_id.clone()
        } else {
            self.exec_id.clone()
        };
        events
            .publish(TaskEvent::Exit(TaskExit {
                container_id: self.container_id.clone(),
                id,
                pid,
                exit_status,
                exited_at: MessageField::some(at),
                ..Default::default()
            }))
            .await;
        // send_replace: the value must stick even when nobody waits yet (send would drop it).
        self.exited.send_replace(true);
    }
}

struct Container {
    id: String,
    bundle: String,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    timings: StartTimings,
}

/// What containerd's Create names.
#[derive(Clone, Debug, Default)]
pub struct CreateRequest {
    pub container_id: String,
    pub bundle: PathBuf,
    pub rootfs: Vec<Mount>,
    pub stdio: StdioPaths,
    pub checkpoint: String,
    /// A kite.toml of this container's own (the runtime's `ConfigPath` option).
    pub config_path: Option<PathBuf>,
}

/// What State answers.
#[derive(Clone, Debug)]
pub struct ProcessInfo {
    pub bundle: String,
    pub stdio: StdioPaths,
    pub status: ProcessStatus,
}

/// The containers of one sandbox (one VM).
pub struct TaskState {
    config: ShimConfig,
    booter: Arc<dyn SandboxBooter>,
    events: Arc<dyn EventSink>,
    timings: TimingsLog,
    sandbox: Mutex<Option<Arc<dyn PodSandbox>>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

impl TaskState {
    pub fn new(
        config: ShimConfig,
        booter: Arc<dyn SandboxBooter>,
        events: Arc<dyn EventSink>,
    ) -> Self {
        let timings = TimingsLog::new(config.timings_file.clone());
        Self {
            config,
            booter,
            events,
            timings,
            sandbox: Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
        }
    }

    async fn container(&self, id: &str) -> Result<Arc<Container>, TaskError> {
        self.containers
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| TaskError::NotFound {
                what: format!("container {id}"),
            })
    }

    async fn sandbox(&self) -> Result<Arc<dyn PodSandbox>, TaskError> {
        self.sandbox
            .lock()
            .await
            .clone()
            .ok_or(TaskError::NoSandbox)
    }

    async fn process(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<(Arc<Container>, Arc<Process>), TaskError> {
        let c = self.container(id).await?;
        if exec_id.is_empty() {
            let init = c.init.clone();
            return Ok((c, init));
        }
        let p = c
            .execs
            .lock()
            .await
            .get(exec_id)
            .cloned()
            .ok_or_else(|| TaskError::NotFound {
                what: format!("container {id}: exec {exec_id}"),
            })?;
        Ok((c, p))
    }

    /// Boots the sandbox for the first container; later containers (of a pod) join it.
    async fn ensure_sandbox(
        &self,
        config: &ShimConfig,
        sandbox_id: &str,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<(Arc<dyn PodSandbox>, bool), TaskError> {
        let mut guard = self.sandbox.lock().await;
        if let Some(sandbox) = guard.as_ref() {
            if sandbox.is_running() {
                return Ok((sandbox.clone(), false));
            }
            return Err(TaskError::VmGone {
                sandbox: sandbox.id().to_string(),
            });
        }
        let sandbox = self.booter.boot(config, sandbox_id, spec).await?;
        tokio::spawn(report_ooms(sandbox.clone(), self.events.clone()));
        *guard = Some(sandbox.clone());
        Ok((sandbox, true))
    }

    async fn stop_sandbox(&self) {
        let sandbox = self.sandbox.lock().await.take();
        if let Some(sandbox) = sandbox {
            sandbox.shutdown().await;
        }
    }

    /// Runs `process` to its exit in the background: waits in the guest (or, for a pod's
    /// sandbox container, for the VM to go), drains the output, and reports the exit.
    fn watch_exit(&self, sandbox: Arc<dyn PodSandbox>, process: Arc<Process>) {
        let events = self.events.clone();
        tokio::spawn(async move {
            if !process.in_guest {
                sandbox.exited().await;
                error!(sandbox = %sandbox.id(), "the VM exited");
                process.finish(&*events, VM_GONE_STATUS, now()).await;
                return;
            }
            let (status, at) = tokio::select! {
                r = sandbox.agent().wait_process(&process.container_id, &process.exec_id) => match r {
                    Ok(exit) => (exit.status, timestamp(Duration::from_nanos(exit.at_ns))),
                    Err(e) => {
                        error!(error = %kite_protocol::errors::error_chain(&e), "{}: wait", process.name());
                        (VM_GONE_STATUS, now())
                    }
                },
                _ = sandbox.exited() => {
                    error!(sandbox = %sandbox.id(), "{}: the VM exited under it", process.name());
                    (VM_GONE_STATUS, now())
                }
            };
            if let Some(relays) = process.relays.lock().await.as_mut() {
                relays.drain(DRAIN).await;
            }
            process.finish(&*events, status, at).await;
        });
    }

    /// Create: boots the sandbox if this is its first container, then creates the container
    /// in the guest (a pod's sandbox container: nothing in the guest). Returns its pid.
    pub async fn create(&self, request: CreateRequest) -> Result<u32, TaskError> {
        let id = request.container_id.clone();
        if self.containers.lock().await.contains_key(&id) {
            return Err(TaskError::AlreadyExists {
                what: format!("container {id}"),
            });
        }
        let received = std::time::SystemTime::now();
        let started = Instant::now();
        let spec_path = request.bundle.join("config.json");
        let text = std::fs::read(&spec_path).map_err(|source| TaskError::ReadSpec {
            container: id.clone(),
            path: spec_path.clone(),
            source,
        })?;
        let mut spec: oci_spec::runtime::Spec =
            serde_json::from_slice(&text).map_err(|source| TaskError::ParseSpec {
                container: id.clone(),
                path: spec_path.clone(),
                source,
            })?;
        if spec.process().is_none() {
            return Err(TaskError::InvalidArgument {
                what: format!("container {id}: OCI spec {}", spec_path.display()),
                why: "it has no process".into(),
            });
        }
        let sandbox_id = rootfs::sandbox_id(&id, &spec);
        let config = match &request.config_path {
            Some(path) => {
                let mut loaded =
                    ShimConfig::load_from(path).map_err(|source| TaskError::Config {
                        container: id.clone(),
                        source,
                    })?;
                // The warm pool is the one that configuration's kite-pool keeps.
                loaded.pool.dir = loaded.pool_dir();
                ShimConfig {
                    // State must stay where `shim delete` looks for it after a crash.
                    state_dir: self.config.state_dir.clone(),
                    ..loaded
                }
            }
            None => self.config.clone(),
        };
        let (sandbox, booted_here) = self.ensure_sandbox(&config, &sandbox_id, &spec).await?;
        let boot = booted_here.then(|| sandbox.timing());
        let boot_time = started.elapsed();
        let in_guest = !rootfs::is_pod_sandbox(&spec);
        let created = if in_guest {
            let created = self.create_in_guest(&sandbox, &request, &mut spec).await;
            if created.is_err() {
                sandbox.release_container_files(&id);
                if booted_here {
                    self.stop_sandbox().await;
                }
            }
            created?
        } else {
            // A pod's sandbox container: the VM is its whole being; its pid is QEMU's.
            let init = Arc::new(Process::new(&id, "", request.stdio.clone(), None, false));
            let pid = sandbox.pid();
            init.update(|s| s.pid = pid);
            (init, Duration::ZERO)
        };
        let (init, guest_create) = created;
        let pid = init.status().pid;
        let timings = StartTimings {
            container: id.clone(),
            sandbox: sandbox_id,
            create_received: received,
            boot,
            // The shim's work for this container: a boot this create did is reported as stages
            // of its own (`boot`), waiting for another's boot counts.
            create: if boot.is_some() {
                started.elapsed().saturating_sub(boot_time)
            } else {
                started.elapsed()
            },
            guest_create,
            ..StartTimings::default()
        };
        self.containers.lock().await.insert(
            id.clone(),
            Arc::new(Container {
                id: id.clone(),
                bundle: request.bundle.display().to_string(),
                init,
                execs: Mutex::new(HashMap::new()),
                timings,
            }),
        );
        self.events
            .publish(TaskEvent::Create(TaskCreate {
                container_id: id,
                bundle: request.bundle.display().to_string(),
                rootfs: request.rootfs,
                io: MessageField::some(TaskIO {
                    stdin: request.stdio.stdin.clone(),
                    stdout: request.stdio.stdout.clone(),
                    stderr: request.stdio.stderr.clone(),
                    terminal: request.stdio.terminal,
                    ..Default::default()
                }),
                checkpoint: request.checkpoint,
                pid,
                ..Default::default()
            }))
            .await;
        Ok(pid)
    }

    /// The container's files into the share, the container in the guest, its stdio relays.
    async fn create_in_guest(
        &self,
        sandbox: &Arc<dyn PodSandbox>,
        request: &CreateRequest,
        spec: &mut oci_spec::runtime::Spec,
    ) -> Result<(Arc<Process>, Duration), TaskError> {
        let id = &request.container_id;
        let rootfs = sandbox.prepare_container_files(id, &request.bundle, &request.rootfs, spec)?;
        let oci_spec = serde_json::to_vec(&spec).map_err(|e| TaskError::Internal {
            what: format!("container {id}: encode its spec"),
            source: Box::new(e),
        })?;
        let agent_started = Instant::now();
        let pid = sandbox
            .agent()
            .create_container(NewContainer {
                container_id: id.clone(),
                oci_spec,
                rootfs,
                terminal: request.stdio.terminal,
                stdin: !request.stdio.stdin.is_empty(),
            })
            .await
            .map_err(TaskError::guest(format!("container {id}: create")))?;
        let guest_create = agent_started.elapsed();
        let init = Arc::new(Process::new(id, "", request.stdio.clone(), None, true));
        init.update(|s| s.pid = pid);
        match sandbox.agent().relay_stdio(id, "", &request.stdio).await {
            Ok(relays) => *init.relays.lock().await = Some(relays),
            Err(source) => {
                if let Err(e) = sandbox.agent().remove_container(id).await {
                    warn!(container = %id, error = %kite_protocol::errors::error_chain(&e), "remove in the guest");
                }
                return Err(TaskError::Stdio {
                    what: format!("container {id}"),
                    source,
                });
            }
        }
        Ok((init, guest_create))
    }

    /// Start: the container's init or an exec. Returns its pid.
    pub async fn start(&self, id: &str, exec_id: &str) -> Result<u32, TaskError> {
        let started = Instant::now();
        let (c, p) = self.process(id, exec_id).await?;
        let sandbox = self.sandbox().await?;
        if p.status().status != Status::CREATED {
            return Err(TaskError::FailedPrecondition {
                what: p.name(),
                why: "not in the created state",
            });
        }
        let agent_started = Instant::now();
        let pid = if !p.in_guest {
            p.status().pid
        } else if exec_id.is_empty() {
            sandbox
                .agent()
                .start_container(&c.id)
                .await
                .map_err(TaskError::guest(format!("container {}: start", c.id)))?
        } else {
            let spec = p.exec_spec.clone().unwrap_or_default();
            let pid = sandbox
                .agent()
                .exec_process(&c.id, exec_id, spec, &p.stdio)
                .await
                .map_err(TaskError::guest(p.name()))?;
            let relays = sandbox
                .agent()
                .relay_stdio(&c.id, exec_id, &p.stdio)
                .await
                .map_err(|source| TaskError::Stdio {
                    what: p.name(),
                    source,
                })?;
            *p.relays.lock().await = Some(relays);
            pid
        };
        let guest_start = agent_started.elapsed();
        p.update(|s| {
            s.status = Status::RUNNING;
            s.pid = pid;
        });
        self.watch_exit(sandbox, p.clone());
        let event = if exec_id.is_empty() {
            TaskEvent::Start(TaskStart {
                container_id: c.id.clone(),
                pid,
                ..Default::default()
            })
        } else {
            TaskEvent::ExecStarted(TaskExecStarted {
                container_id: c.id.clone(),
                exec_id: exec_id.to_string(),
                pid,
                ..Default::default()
            })
        };
        self.events.publish(event).await;
        info!(pid, "{} started", p.name());
        if exec_id.is_empty() {
            let timings = StartTimings {
                start: started.elapsed(),
                guest_start,
                ..c.timings.clone()
            };
            self.timings.record(&timings);
        }
        Ok(pid)
    }

    pub async fn state(&self, id: &str, exec_id: &str) -> Result<ProcessInfo, TaskError> {
        let (c, p) = self.process(id, exec_id).await?;
        Ok(ProcessInfo {
            bundle: c.bundle.clone(),
            stdio: p.stdio.clone(),
            status: p.status(),
        })
    }

    /// Resolves when the process has exited.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<ProcessStatus, TaskError> {
        let (_, p) = self.process(id, exec_id).await?;
        Ok(p.wait().await)
    }

    pub async fn kill(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), TaskError> {
        let (c, p) = self.process(id, exec_id).await?;
        let status = p.status().status;
        if status == Status::STOPPED {
            return Err(TaskError::NotFound {
                what: format!("{}: a running process", p.name()),
            });
        }
        if status == Status::CREATED && !exec_id.is_empty() {
            return Err(TaskError::FailedPrecondition {
                what: p.name(),
                why: "not started",
            });
        }
        if !p.in_guest {
            // Like pause, the sandbox container ends on a signal; the VM goes with its delete.
            if signal != 0 {
                p.finish(&*self.events, 128 + signal, now()).await;
            }
            return Ok(());
        }
        let sandbox = self.sandbox().await?;
        let answer = sandbox
            .agent()
            .signal_process(&c.id, exec_id, signal, all)
            .await;
        if signal == SIGKILL && status == Status::CREATED {
            // A created init, never started, has no exit watch: whatever the guest did, it is
            // killed now (containerd's clean-up of a failed start waits for this exit).
            p.finish(&*self.events, 128 + SIGKILL, now()).await;
        } else if signal == SIGKILL {
            // Whatever the guest answered (done, an error, a lie), the exit must follow.
            enforce_sigkill(sandbox.clone(), p.clone());
        }
        match answer {
            Ok(()) => Ok(()),
            // The guest did not carry out a SIGKILL: no answer within the deadline, a broken
            // channel, an impossible answer. It is lost (or hostile), and only the VM's end
            // kills the process for sure: every process of the pod then exits as with any
            // death of the VM, and the pod can be removed.
            Err(e) if signal == SIGKILL && !matches!(e, GuestError::Status { .. }) => {
                error!(sandbox = %sandbox.id(), error = %kite_protocol::errors::error_chain(&e),
                       "{}: the guest did not carry out SIGKILL; stopping the VM", p.name());
                sandbox.shutdown().await;
                Ok(())
            }
            Err(e) => Err(TaskError::guest(format!("{}: kill", p.name()))(e)),
        }
    }

    /// Delete: an exec, or a container (the last one, or the pod's sandbox container, takes
    /// the sandbox with it).
    pub async fn delete(&self, id: &str, exec_id: &str) -> Result<ProcessStatus, TaskError> {
        let (c, p) = self.process(id, exec_id).await?;
        let st = p.status();
        if st.status == Status::RUNNING {
            return Err(TaskError::FailedPrecondition {
                what: p.name(),
                why: "still running",
            });
        }
        if !exec_id.is_empty() {
            c.execs.lock().await.remove(exec_id);
            if let Ok(sandbox) = self.sandbox().await {
                if let Err(e) = sandbox.agent().remove_process(&c.id, exec_id).await {
                    warn!(container = %c.id, exec = %exec_id, error = %kite_protocol::errors::error_chain(&e), "remove in the guest");
                }
            }
            return Ok(st);
        }
        // The pod's sandbox container may have been deleted first (its VM with it): then
        // there is nothing left in the guest or the share to release for this one.
        let sandbox = self.sandbox().await.ok();
        if let Some(sandbox) = sandbox.as_ref().filter(|s| s.is_running() && p.in_guest) {
            if let Err(e) = sandbox.agent().remove_container(&c.id).await {
                warn!(container = %c.id, error = %kite_protocol::errors::error_chain(&e), "remove in the guest");
            }
        }
        p.relays.lock().await.take();
        if let Some(sandbox) = &sandbox {
            sandbox.release_container_files(&c.id);
        }
        let remaining = {
            let mut map = self.containers.lock().await;
            map.remove(&c.id);
            map.len()
        };
        if remaining == 0 || sandbox.as_ref().is_some_and(|s| s.id() == c.id) {
            self.stop_sandbox().await;
        }
        let (exit_status, exited_at) = match st.exited_at {
            Some(at) => (st.exit_status, at),
            None => (VM_GONE_STATUS, now()),
        };
        self.events
            .publish(TaskEvent::Delete(TaskDelete {
                container_id: c.id.clone(),
                pid: st.pid,
                exit_status,
                exited_at: MessageField::some(exited_at.clone()),
                id: c.id.clone(),
                ..Default::default()
            }))
            .await;
        info!(container = %c.id, "deleted");
        Ok(ProcessStatus {
            status: Status::STOPPED,
            pid: st.pid,
            exit_status,
            exited_at: Some(exited_at),
        })
    }

    /// Exec: registers a process (the OCI process `spec`, JSON) to start later.
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        spec: Vec<u8>,
        stdio: StdioPaths,
    ) -> Result<(), TaskError> {
        let c = self.container(id).await?;
        if !c.init.in_guest {
            return Err(TaskError::FailedPrecondition {
                what: format!("container {id}"),
                why: "a pod's sandbox container runs no process under kite",
            });
        }
        if c.init.status().status != Status::RUNNING {
            return Err(TaskError::FailedPrecondition {
                what: format!("container {id}"),
                why: "not running",
            });
        }
        serde_json::from_slice::<oci_spec::runtime::Process>(&spec).map_err(|e| {
            TaskError::InvalidArgument {
                what: format!("container {id} exec {exec_id}: OCI process"),
                why: e.to_string(),
            }
        })?;
        {
            let mut execs = c.execs.lock().await;
            if execs.contains_key(exec_id) {
                return Err(TaskError::AlreadyExists {
                    what: format!("container {id}: exec {exec_id}"),
                });
            }
            execs.insert(
                exec_id.to_string(),
                Arc::new(Process::new(id, exec_id, stdio, Some(spec), true)),
            );
        }
        self.events
            .publish(TaskEvent::ExecAdded(TaskExecAdded {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                ..Default::default()
            }))
            .await;
        Ok(())
    }

    pub async fn resize_pty(
        &self,
        id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), TaskError> {
        let (c, p) = self.process(id, exec_id).await?;
        self.sandbox()
            .await?
            .agent()
            .resize_tty(&c.id, exec_id, width, height)
            .await
            .map_err(TaskError::guest(format!("{}: resize", p.name())))
    }

    /// CloseIO: the process's stdin ends once what was written is delivered.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), TaskError> {
        let (_, p) = self.process(id, exec_id).await?;
        if let Some(relays) = p.relays.lock().await.as_mut() {
            relays.close_stdin();
        }
        Ok(())
    }

    pub async fn pids(&self, id: &str) -> Result<Vec<u32>, TaskError> {
        let c = self.container(id).await?;
        if !c.init.in_guest {
            return Ok(Vec::new());
        }
        self.sandbox()
            .await?
            .agent()
            .list_pids(&c.id)
            .await
            .map_err(TaskError::guest(format!("container {}: pids", c.id)))
    }

    /// A container's resource use; for a pod's sandbox container, the whole pod's.
    pub async fn stats(&self, id: &str) -> Result<ContainerStats, TaskError> {
        let c = self.container(id).await?;
        let whole_pod = String::new();
        let of = if c.init.in_guest { &c.id } else { &whole_pod };
        self.sandbox()
            .await?
            .agent()
            .container_stats(of)
            .await
            .map_err(TaskError::guest(format!("container {}: stats", c.id)))
    }

    /// Update: new resources (OCI `LinuxResources`, JSON) for the container's guest cgroup.
    pub async fn update(&self, id: &str, resources: Vec<u8>) -> Result<(), TaskError> {
        let c = self.container(id).await?;
        serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources).map_err(|e| {
            TaskError::InvalidArgument {
                what: format!("container {}: resources", c.id),
                why: e.to_string(),
            }
        })?;
        self.sandbox()
            .await?
            .agent()
            .update_container(&c.id, resources)
            .await
            .map_err(TaskError::guest(format!("container {}: update", c.id)))
    }

    /// The pid of a container's init (0 if there is no such container).
    pub async fn task_pid(&self, id: &str) -> u32 {
        match self.container(id).await {
            Ok(c) => c.init.status().pid,
            Err(_) => 0,
        }
    }

    /// The containers this shim serves.
    pub async fn container_ids(&self) -> Vec<String> {
        self.containers.lock().await.keys().cloned().collect()
    }

    /// Ends container `id`, whose record containerd has lost: its task is orphaned, and nobody
    /// will ever kill or delete it (see [`crate::orphans`]). The pod's sandbox container, or a
    /// shim's last container, takes the VM and every container with it; another container is
    /// killed and removed while its pod lives on. Returns whether the shim may exit.
    pub async fn abandon(&self, id: &str) -> bool {
        let Ok(c) = self.container(id).await else {
            return self.containers.lock().await.is_empty();
        };
        let owns_vm = self
            .sandbox
            .lock()
            .await
            .as_ref()
            .is_some_and(|s| s.id() == id);
        let alone = self.containers.lock().await.len() == 1;
        let doomed = if owns_vm || alone {
            // Every process of the pod ends with its VM (and is reported so).
            self.stop_sandbox().await;
            self.container_ids().await
        } else {
            if c.init.status().status == Status::RUNNING {
                if let Err(e) = self.kill(id, "", SIGKILL, true).await {
                    warn!(container = %id, error = %kite_protocol::errors::error_chain(&e), "kill an orphaned container");
                }
            }
            vec![id.to_string()]
        };
        for id in doomed {
            let Ok(c) = self.container(&id).await else {
                continue;
            };
            // A process that never started has no exit to wait for.
            if c.init.status().status == Status::RUNNING {
                let _ = tokio::time::timeout(ABANDON_WAIT, c.init.wait()).await;
            }
            if let Err(e) = self.delete(&id, "").await {
                error!(container = %id, error = %kite_protocol::errors::error_chain(&e), "delete an orphaned container");
            }
        }
        self.containers.lock().await.is_empty()
    }

    /// Shutdown: when no container is left, the sandbox stops; returns whether the shim may
    /// exit.
    pub async fn shutdown(&self) -> bool {
        if !self.containers.lock().await.is_empty() {
            return false;
        }
        self.stop_sandbox().await;
        true
    }
}

/// Ends the VM if `process`, sent SIGKILL, has not exited within [`SIGKILL_EXIT_WITHIN`]: a guest
/// that answers a SIGKILL with an error, or answers and never reports the exit, cannot keep a
/// process (and its pod) from being killed.
fn enforce_sigkill(sandbox: Arc<dyn PodSandbox>, process: Arc<Process>) {
    tokio::spawn(async move {
        let exited = tokio::time::timeout(SIGKILL_EXIT_WITHIN, process.wait()).await;
        if exited.is_err() && sandbox.is_running() {
            error!(sandbox = %sandbox.id(),
                   "{}: still running {} s after SIGKILL; stopping the VM",
                   process.name(), SIGKILL_EXIT_WITHIN.as_secs());
            sandbox.shutdown().await;
        }
    });
}

/// The guest is asked for OOM kills at most this often: one that answers at once (lying, or
/// shutting down) costs the host little.
pub(super) const OOM_MIN_INTERVAL: Duration = Duration::from_millis(100);
/// And after an answer without an event, or an impossible one, this long.
pub(super) const OOM_IDLE_WAIT: Duration = Duration::from_secs(1);

/// Reports the guest's OOM kills (TaskOOM) until the agent goes.
pub(super) async fn report_ooms(sandbox: Arc<dyn PodSandbox>, events: Arc<dyn EventSink>) {
    loop {
        let asked = tokio::time::Instant::now();
        match sandbox.agent().wait_oom().await {
            Ok(Some(container_id)) => {
                events
                    .publish(TaskEvent::Oom(TaskOOM {
                        container_id,
                        ..Default::default()
                    }))
                    .await;
            }
            Ok(None) => tokio::time::sleep(OOM_IDLE_WAIT).await,
            Err(e @ GuestError::BadAnswer(_)) => {
                warn!(sandbox = %sandbox.id(), "OOM events: {e}");
                tokio::time::sleep(OOM_IDLE_WAIT).await;
            }
            Err(_) => return,
        }
        tokio::time::sleep_until(asked + OOM_MIN_INTERVAL).await;
    }
}
