//! The containerd Task API (shim v2) on top of a [`Sandbox`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::api;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::r#async::TtrpcContext;
use containerd_shim::TtrpcResult;
use kite_protocol::agent as proto;
use tokio::sync::{watch, Mutex};
use tracing::{error, info, warn};

use crate::config::ShimConfig;
use crate::io::{Relays, StdioPaths};
use crate::rootfs;
use crate::sandbox::{ctx, Sandbox};

/// How long an agent call that should be quick may take.
const CALL: Duration = Duration::from_secs(30);
/// How long output may keep flowing after a process exited (a child that inherited stdout).
const DRAIN: Duration = Duration::from_secs(2);
/// The exit status reported when the VM died under a process.
const VM_GONE_STATUS: u32 = 137;

type Status = containerd_shim::protos::api::Status;

fn err(code: ttrpc::Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn not_found(msg: impl Into<String>) -> ttrpc::Error {
    err(ttrpc::Code::NOT_FOUND, msg)
}

/// Passes the agent's status code through, with the object named.
fn agent_err(what: String, e: ttrpc::Error) -> ttrpc::Error {
    match e {
        ttrpc::Error::RpcStatus(s) => err(s.code(), format!("{what}: {}", s.message())),
        other => err(
            ttrpc::Code::UNAVAILABLE,
            format!("{what}: guest agent: {other}"),
        ),
    }
}

fn timestamp(ns: u64) -> Timestamp {
    Timestamp {
        seconds: (ns / 1_000_000_000) as i64,
        nanos: (ns % 1_000_000_000) as i32,
        ..Default::default()
    }
}

fn now() -> Timestamp {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    timestamp(ns)
}

#[derive(Clone, Debug)]
struct ProcState {
    status: Status,
    pid: u32,
    exit_status: u32,
    exited_at: Option<Timestamp>,
}

/// A process of a container: its init or an exec.
struct Proc {
    cid: String,
    eid: String,
    stdio: StdioPaths,
    /// The OCI process of an exec (JSON), kept until Start.
    exec_spec: Option<Vec<u8>>,
    state: std::sync::Mutex<ProcState>,
    exited: watch::Sender<bool>,
    relays: Mutex<Option<Relays>>,
    /// False for a pod's sandbox container, which has no process in the guest: it runs as
    /// long as the VM does, and a signal ends it.
    in_guest: bool,
}

impl Proc {
    fn new(cid: &str, eid: &str, stdio: StdioPaths, exec_spec: Option<Vec<u8>>) -> Self {
        Self {
            cid: cid.into(),
            eid: eid.into(),
            stdio,
            exec_spec,
            in_guest: true,
            state: std::sync::Mutex::new(ProcState {
                status: Status::CREATED,
                pid: 0,
                exit_status: 0,
                exited_at: None,
            }),
            exited: watch::channel(false).0,
            relays: Mutex::new(None),
        }
    }

    fn state(&self) -> ProcState {
        self.state.lock().expect("process state lock").clone()
    }

    fn set(&self, f: impl FnOnce(&mut ProcState)) {
        f(&mut self.state.lock().expect("process state lock"));
    }

    async fn wait(&self) -> ProcState {
        let mut rx = self.exited.subscribe();
        let _ = rx.wait_for(|e| *e).await;
        self.state()
    }

    fn name(&self) -> String {
        if self.eid.is_empty() {
            format!("container {}", self.cid)
        } else {
            format!("container {} exec {}", self.cid, self.eid)
        }
    }
}

struct Container {
    id: String,
    bundle: String,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    /// Create's time spent in the shim, and the sandbox's boot if this create booted it.
    create_time: Duration,
    /// Of `create_time`, what the guest agent took.
    guest_create: Duration,
    boot: Option<crate::sandbox::BootTiming>,
}

/// The shim's task service: the containers of one sandbox (one VM).
pub struct KiteTask {
    config: ShimConfig,
    namespace: String,
    publisher: Arc<RemotePublisher>,
    exit: Arc<ExitSignal>,
    sandbox: Mutex<Option<Arc<Sandbox>>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

impl KiteTask {
    pub fn new(
        config: ShimConfig,
        namespace: &str,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Self {
            config,
            namespace: namespace.to_string(),
            publisher: Arc::new(publisher),
            exit,
            sandbox: Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
        }
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        publish(&self.publisher, &self.namespace, topic, event).await;
    }

    async fn container(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        self.containers
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| not_found(format!("container {id} not found")))
    }

    async fn sandbox(&self) -> TtrpcResult<Arc<Sandbox>> {
        self.sandbox
            .lock()
            .await
            .clone()
            .ok_or_else(|| err(ttrpc::Code::FAILED_PRECONDITION, "no sandbox is running"))
    }

    async fn process(&self, id: &str, exec_id: &str) -> TtrpcResult<(Arc<Container>, Arc<Proc>)> {
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
            .ok_or_else(|| not_found(format!("container {id}: exec {exec_id} not found")))?;
        Ok((c, p))
    }

    /// Boots the sandbox for the first container; later containers (of a pod) join it.
    async fn ensure_sandbox(
        &self,
        config: &ShimConfig,
        sandbox_id: &str,
        spec: &oci_spec::runtime::Spec,
    ) -> TtrpcResult<(Arc<Sandbox>, bool)> {
        let mut guard = self.sandbox.lock().await;
        if let Some(sb) = guard.as_ref() {
            if sb.is_running() {
                return Ok((sb.clone(), false));
            }
            return Err(err(
                ttrpc::Code::UNAVAILABLE,
                format!("sandbox {}: the VM has exited", sb.id),
            ));
        }
        let netns = crate::network::netns_path(spec);
        let sb = Sandbox::boot(config, sandbox_id, Some(spec), netns.as_deref())
            .await
            .map_err(|e| err(ttrpc::Code::UNAVAILABLE, e.to_string()))?;
        let sb = Arc::new(sb);
        tokio::spawn(watch_oom(
            sb.clone(),
            self.publisher.clone(),
            self.namespace.clone(),
        ));
        *guard = Some(sb.clone());
        Ok((sb, true))
    }

    async fn stop_sandbox(&self) {
        if let Some(sb) = self.sandbox.lock().await.take() {
            sb.shutdown().await;
        }
    }

    /// Runs `proc` to its exit in the background: waits in the guest (or, for a pod's sandbox
    /// container, for the VM to go), drains the output, and reports the exit.
    fn watch_exit(&self, sandbox: Arc<Sandbox>, proc_: Arc<Proc>) {
        let publisher = self.publisher.clone();
        let namespace = self.namespace.clone();
        tokio::spawn(async move {
            if !proc_.in_guest {
                sandbox.vm_exited().await;
                error!(sandbox = %sandbox.id, "the VM exited");
                finish(&publisher, &namespace, &proc_, VM_GONE_STATUS, now()).await;
                return;
            }
            let req = proto::ProcessRequest {
                container_id: proc_.cid.clone(),
                exec_id: proc_.eid.clone(),
                ..Default::default()
            };
            let (status, at) = tokio::select! {
                r = sandbox.agent().wait_process(ctx(None), &req) => match r {
                    Ok(w) => (w.exit_status, timestamp(w.exited_at_ns)),
                    Err(e) => {
                        error!("{}: wait: {e}", proc_.name());
                        (VM_GONE_STATUS, now())
                    }
                },
                _ = sandbox.vm_exited() => {
                    error!(sandbox = %sandbox.id, "{}: the VM exited under it", proc_.name());
                    (VM_GONE_STATUS, now())
                }
            };
            if let Some(relays) = proc_.relays.lock().await.as_mut() {
                relays.drain(DRAIN).await;
            }
            finish(&publisher, &namespace, &proc_, status, at).await;
        });
    }

    async fn create_inner(&self, req: &api::CreateTaskRequest) -> TtrpcResult<u32> {
        let cid = req.id.clone();
        let bundle = PathBuf::from(&req.bundle);
        let config_path = bundle.join("config.json");
        let text = std::fs::read(&config_path).map_err(|e| {
            err(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("container {cid}: read {}: {e}", config_path.display()),
            )
        })?;
        let mut spec: oci_spec::runtime::Spec = serde_json::from_slice(&text).map_err(|e| {
            err(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("container {cid}: OCI spec {}: {e}", config_path.display()),
            )
        })?;
        if spec.process().is_none() {
            return Err(err(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("container {cid}: OCI spec has no process"),
            ));
        }
        let sandbox_id = rootfs::sandbox_id(&cid, &spec);
        // A container may name its own kite configuration (the runtime's ConfigPath option).
        let config_path = req
            .options
            .as_ref()
            .and_then(|o| crate::config::runtime_options_config_path(&o.type_url, &o.value));
        let config = match config_path {
            Some(path) => ShimConfig {
                // State must stay where `shim delete` looks for it after a crash.
                state_dir: self.config.state_dir.clone(),
                ..ShimConfig::load_from(&path).map_err(|e| {
                    err(
                        ttrpc::Code::INVALID_ARGUMENT,
                        format!("container {cid}: {e}"),
                    )
                })?
            },
            None => self.config.clone(),
        };
        let started = std::time::Instant::now();
        let (sandbox, booted_here) = self.ensure_sandbox(&config, &sandbox_id, &spec).await?;
        let boot = booted_here.then_some(sandbox.timing);
        let boot_time = started.elapsed();
        if rootfs::is_pod_sandbox(&spec) {
            return Ok(self
                .create_pod_sandbox(&sandbox, req, boot, boot_time)
                .await);
        }
        let result = self
            .create_in(&sandbox, req, &bundle, &mut spec, boot, boot_time)
            .await;
        if result.is_err() {
            rootfs::release(&sandbox.container_dir(&cid));
            if booted_here {
                self.stop_sandbox().await;
            }
        }
        result
    }

    /// A pod's sandbox container: the VM is its whole being (no rootfs, no process in the
    /// guest); its pid is QEMU's.
    async fn create_pod_sandbox(
        &self,
        sandbox: &Arc<Sandbox>,
        req: &api::CreateTaskRequest,
        boot: Option<crate::sandbox::BootTiming>,
        boot_time: Duration,
    ) -> u32 {
        let cid = req.id.clone();
        let stdio = StdioPaths::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        let mut init = Proc::new(&cid, "", stdio, None);
        init.in_guest = false;
        let pid = sandbox.pid();
        init.set(|s| s.pid = pid);
        self.containers.lock().await.insert(
            cid.clone(),
            Arc::new(Container {
                id: cid,
                bundle: req.bundle.clone(),
                init: Arc::new(init),
                execs: Mutex::new(HashMap::new()),
                create_time: boot_time,
                guest_create: Duration::ZERO,
                boot,
            }),
        );
        pid
    }

    async fn create_in(
        &self,
        sandbox: &Arc<Sandbox>,
        req: &api::CreateTaskRequest,
        bundle: &Path,
        spec: &mut oci_spec::runtime::Spec,
        boot: Option<crate::sandbox::BootTiming>,
        boot_time: Duration,
    ) -> TtrpcResult<u32> {
        let started = std::time::Instant::now();
        let cid = req.id.clone();
        let cdir = sandbox.container_dir(&cid);
        rootfs::prepare(&cid, &cdir, bundle, &req.rootfs, spec)
            .map_err(|e| err(ttrpc::Code::FAILED_PRECONDITION, e.to_string()))?;
        let stdio = StdioPaths::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        let spec_json = serde_json::to_vec(&spec).map_err(|e| {
            err(
                ttrpc::Code::INTERNAL,
                format!("container {cid}: encode spec: {e}"),
            )
        })?;
        let agent_started = std::time::Instant::now();
        let created = sandbox
            .agent()
            .create_container(
                ctx(Some(CALL * 2)),
                &proto::CreateContainerRequest {
                    container_id: cid.clone(),
                    oci_spec: spec_json,
                    rootfs: format!("{cid}/{}", rootfs::ROOTFS),
                    terminal: req.terminal,
                    stdin: !req.stdin.is_empty(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| agent_err(format!("container {cid}: create"), e))?;
        let guest_create = agent_started.elapsed();
        let init = Arc::new(Proc::new(&cid, "", stdio.clone(), None));
        init.set(|s| s.pid = created.pid);
        match Relays::start(sandbox.agent(), &cid, "", &stdio).await {
            Ok(r) => *init.relays.lock().await = Some(r),
            Err(e) => {
                let _ = sandbox
                    .agent()
                    .remove_container(
                        ctx(Some(CALL)),
                        &proto::ContainerRequest {
                            container_id: cid.clone(),
                            ..Default::default()
                        },
                    )
                    .await;
                return Err(err(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("container {cid}: {e}"),
                ));
            }
        }
        self.containers.lock().await.insert(
            cid.clone(),
            Arc::new(Container {
                id: cid.clone(),
                bundle: req.bundle.clone(),
                init,
                execs: Mutex::new(HashMap::new()),
                create_time: started.elapsed() + boot.map_or(boot_time, |_| Duration::ZERO),
                guest_create,
                boot,
            }),
        );
        Ok(created.pid)
    }
}

/// One line per container start with the stages it went through (read by hack/ scripts).
fn log_timings(c: &Container, start: Duration, guest_start: Duration) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let b = c.boot.unwrap_or_default();
    info!(
        container = %c.id,
        booted = c.boot.is_some(),
        virtiofsd_ms = ms(b.virtiofsd),
        vm_boot_ms = ms(b.vm_to_agent),
        network_attach_ms = ms(b.network_attach),
        network_guest_ms = ms(b.network_guest),
        guest_kernel_ms = ms(b.guest_kernel),
        guest_agent_ms = ms(b.guest_agent),
        create_ms = ms(c.create_time),
        guest_create_ms = ms(c.guest_create),
        start_ms = ms(start),
        guest_start_ms = ms(guest_start),
        // The shim's own time: create and start less what the guest agent took.
        shim_own_ms = ms((c.create_time + start).saturating_sub(c.guest_create + guest_start)),
        "kite-timings"
    );
}

/// Records a process's exit and reports it (TaskExit), once.
async fn finish(
    publisher: &RemotePublisher,
    namespace: &str,
    proc_: &Proc,
    status: u32,
    at: Timestamp,
) {
    let pid = {
        let mut st = proc_.state.lock().expect("process state lock");
        if st.status == Status::STOPPED {
            return;
        }
        st.status = Status::STOPPED;
        st.exit_status = status;
        st.exited_at = Some(at.clone());
        st.pid
    };
    info!(exit_status = status, "{} exited", proc_.name());
    let id = if proc_.eid.is_empty() {
        proc_.cid.clone()
    } else {
        proc_.eid.clone()
    };
    let event = TaskExit {
        container_id: proc_.cid.clone(),
        id,
        pid,
        exit_status: status,
        exited_at: MessageField::some(at),
        ..Default::default()
    };
    publish(
        publisher,
        namespace,
        topics::TASK_EXIT_EVENT_TOPIC,
        Box::new(event),
    )
    .await;
    let _ = proc_.exited.send(true);
}

async fn publish(
    publisher: &RemotePublisher,
    namespace: &str,
    topic: &str,
    event: Box<dyn MessageDyn>,
) {
    if let Err(e) = publisher
        .publish(ttrpc::context::Context::default(), topic, namespace, event)
        .await
    {
        warn!("publish {topic}: {e}");
    }
}

async fn watch_oom(sandbox: Arc<Sandbox>, publisher: Arc<RemotePublisher>, namespace: String) {
    loop {
        match sandbox
            .agent()
            .wait_oom(ctx(None), &proto::Empty::new())
            .await
        {
            Ok(ev) if !ev.container_id.is_empty() => {
                let event = TaskOOM {
                    container_id: ev.container_id,
                    ..Default::default()
                };
                publish(
                    &publisher,
                    &namespace,
                    topics::TASK_OOM_EVENT_TOPIC,
                    Box::new(event),
                )
                .await;
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

#[async_trait]
impl Task for KiteTask {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        info!(container = %req.id, bundle = %req.bundle, "create");
        if self.containers.lock().await.contains_key(&req.id) {
            return Err(err(
                ttrpc::Code::ALREADY_EXISTS,
                format!("container {} exists", req.id),
            ));
        }
        let pid = self.create_inner(&req).await.inspect_err(|e| {
            error!(container = %req.id, "create: {e}");
        })?;
        let event = TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            checkpoint: req.checkpoint.clone(),
            pid,
            ..Default::default()
        };
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(event))
            .await;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let start_time = std::time::Instant::now();
        let (c, p) = self.process(&req.id, &req.exec_id).await?;
        let sandbox = self.sandbox().await?;
        if p.state().status != Status::CREATED {
            return Err(err(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("{} is not in the created state", p.name()),
            ));
        }
        let agent_started = std::time::Instant::now();
        let pid = if !p.in_guest {
            p.state().pid
        } else if req.exec_id.is_empty() {
            sandbox
                .agent()
                .start_container(
                    ctx(Some(CALL)),
                    &proto::ContainerRequest {
                        container_id: c.id.clone(),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| agent_err(format!("container {}: start", c.id), e))?
                .pid
        } else {
            let started = sandbox
                .agent()
                .exec_process(
                    ctx(Some(CALL)),
                    &proto::ExecProcessRequest {
                        container_id: c.id.clone(),
                        exec_id: p.eid.clone(),
                        process: p.exec_spec.clone().unwrap_or_default(),
                        terminal: p.stdio.terminal,
                        stdin: !p.stdio.stdin.is_empty(),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| agent_err(p.name(), e))?;
            let relays = Relays::start(sandbox.agent(), &c.id, &p.eid, &p.stdio)
                .await
                .map_err(|e| {
                    err(
                        ttrpc::Code::FAILED_PRECONDITION,
                        format!("{}: {e}", p.name()),
                    )
                })?;
            *p.relays.lock().await = Some(relays);
            started.pid
        };
        let guest_start = agent_started.elapsed();
        p.set(|s| {
            s.status = Status::RUNNING;
            s.pid = pid;
        });
        self.watch_exit(sandbox, p.clone());
        if req.exec_id.is_empty() {
            let event = TaskStart {
                container_id: c.id.clone(),
                pid,
                ..Default::default()
            };
            self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(event))
                .await;
        } else {
            let event = TaskExecStarted {
                container_id: c.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            };
            self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(event))
                .await;
        }
        info!(pid, "{} started", p.name());
        if req.exec_id.is_empty() {
            log_timings(&c, start_time.elapsed(), guest_start);
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let (c, p) = self.process(&req.id, &req.exec_id).await?;
        let st = p.state();
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.clone(),
            pid: st.pid,
            status: st.status.into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: st.exit_status,
            exited_at: st.exited_at.into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let (_, p) = self.process(&req.id, &req.exec_id).await?;
        let st = p.wait().await;
        Ok(api::WaitResponse {
            exit_status: st.exit_status,
            exited_at: st.exited_at.into(),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let (c, p) = self.process(&req.id, &req.exec_id).await?;
        let st = p.state();
        if st.status == Status::STOPPED {
            return Err(not_found(format!("{}: process already finished", p.name())));
        }
        if st.status == Status::CREATED && !req.exec_id.is_empty() {
            return Err(err(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("{}: not started", p.name()),
            ));
        }
        if !p.in_guest {
            // Like pause, the sandbox container ends on a signal; the VM goes with its delete.
            if req.signal != 0 {
                finish(
                    &self.publisher,
                    &self.namespace,
                    &p,
                    128 + req.signal,
                    now(),
                )
                .await;
            }
            return Ok(api::Empty::new());
        }
        let sandbox = self.sandbox().await?;
        sandbox
            .agent()
            .signal_process(
                ctx(Some(CALL)),
                &proto::SignalRequest {
                    container_id: c.id.clone(),
                    exec_id: req.exec_id.clone(),
                    signal: req.signal,
                    all: req.all,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| agent_err(format!("{}: kill", p.name()), e))?;
        Ok(api::Empty::new())
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let (c, p) = self.process(&req.id, &req.exec_id).await?;
        let st = p.state();
        if !req.exec_id.is_empty() {
            if st.status == Status::RUNNING {
                return Err(err(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("{}: still running", p.name()),
                ));
            }
            c.execs.lock().await.remove(&req.exec_id);
            if let Ok(sb) = self.sandbox().await {
                let _ = sb
                    .agent()
                    .remove_process(
                        ctx(Some(CALL)),
                        &proto::ProcessRequest {
                            container_id: c.id.clone(),
                            exec_id: req.exec_id.clone(),
                            ..Default::default()
                        },
                    )
                    .await;
            }
            return Ok(api::DeleteResponse {
                pid: st.pid,
                exit_status: st.exit_status,
                exited_at: st.exited_at.into(),
                ..Default::default()
            });
        }
        if st.status == Status::RUNNING {
            return Err(err(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("{}: still running", p.name()),
            ));
        }
        // The pod's sandbox container may have been deleted first (its VM with it): then
        // there is nothing left in the guest or the share to release for this one.
        let sandbox = self.sandbox().await.ok();
        if let Some(sandbox) = sandbox.as_ref().filter(|s| s.is_running() && p.in_guest) {
            let removed = sandbox
                .agent()
                .remove_container(
                    ctx(Some(CALL)),
                    &proto::ContainerRequest {
                        container_id: c.id.clone(),
                        ..Default::default()
                    },
                )
                .await;
            if let Err(e) = removed {
                warn!(container = %c.id, "remove in the guest: {e}");
            }
        }
        p.relays.lock().await.take();
        if let Some(sandbox) = &sandbox {
            rootfs::release(&sandbox.container_dir(&c.id));
        }
        let remaining = {
            let mut map = self.containers.lock().await;
            map.remove(&c.id);
            map.len()
        };
        // The sandbox goes with its own container (a pod's sandbox container is deleted last)
        // or with the last container.
        if remaining == 0 || sandbox.as_ref().is_some_and(|s| s.id == c.id) {
            self.stop_sandbox().await;
        }
        let (exit_status, exited_at) = match st.exited_at {
            Some(at) => (st.exit_status, at),
            None => (VM_GONE_STATUS, now()),
        };
        let event = TaskDelete {
            container_id: c.id.clone(),
            pid: st.pid,
            exit_status,
            exited_at: MessageField::some(exited_at.clone()),
            id: c.id.clone(),
            ..Default::default()
        };
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(event))
            .await;
        info!(container = %c.id, "deleted");
        Ok(api::DeleteResponse {
            pid: st.pid,
            exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        })
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id).await?;
        if !c.init.in_guest {
            return Err(err(
                ttrpc::Code::FAILED_PRECONDITION,
                format!(
                    "container {}: a pod's sandbox container runs no process under kite",
                    req.id
                ),
            ));
        }
        if c.init.state().status != Status::RUNNING {
            return Err(err(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("container {}: not running", req.id),
            ));
        }
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        serde_json::from_slice::<oci_spec::runtime::Process>(&spec).map_err(|e| {
            err(
                ttrpc::Code::INVALID_ARGUMENT,
                format!(
                    "container {} exec {}: OCI process: {e}",
                    req.id, req.exec_id
                ),
            )
        })?;
        let mut execs = c.execs.lock().await;
        if execs.contains_key(&req.exec_id) {
            return Err(err(
                ttrpc::Code::ALREADY_EXISTS,
                format!("container {}: exec {} exists", req.id, req.exec_id),
            ));
        }
        let stdio = StdioPaths::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        execs.insert(
            req.exec_id.clone(),
            Arc::new(Proc::new(&req.id, &req.exec_id, stdio, Some(spec))),
        );
        drop(execs);
        let event = TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        self.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(event))
            .await;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let (c, p) = self.process(&req.id, &req.exec_id).await?;
        let sandbox = self.sandbox().await?;
        sandbox
            .agent()
            .resize_tty(
                ctx(Some(CALL)),
                &proto::ResizeTtyRequest {
                    container_id: c.id.clone(),
                    exec_id: req.exec_id.clone(),
                    width: req.width,
                    height: req.height,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| agent_err(format!("{}: resize", p.name()), e))?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let (_, p) = self.process(&req.id, &req.exec_id).await?;
        if req.stdin {
            if let Some(relays) = p.relays.lock().await.as_mut() {
                relays.close_stdin();
            }
        }
        Ok(api::Empty::new())
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let c = self.container(&req.id).await?;
        if !c.init.in_guest {
            return Ok(api::PidsResponse::default());
        }
        let sandbox = self.sandbox().await?;
        let pids = sandbox
            .agent()
            .list_pids(
                ctx(Some(CALL)),
                &proto::ContainerRequest {
                    container_id: c.id.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| agent_err(format!("container {}: pids", c.id), e))?;
        Ok(api::PidsResponse {
            processes: pids
                .pids
                .into_iter()
                .map(|pid| containerd_shim::protos::types::task::ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        // containerd-shim-protos 0.10 carries the v1 metrics message only; containerd and the
        // CRI read it on any host.
        use containerd_shim::protos::cgroups::metrics::{
            CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat,
        };
        use containerd_shim::protos::protobuf::Message;
        let c = self.container(&req.id).await?;
        let sandbox = self.sandbox().await?;
        let s = sandbox
            .agent()
            .container_stats(
                ctx(Some(CALL)),
                &proto::ContainerRequest {
                    // A pod's sandbox container: the whole pod (every container's cgroup).
                    container_id: if c.init.in_guest {
                        c.id.clone()
                    } else {
                        String::new()
                    },
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| agent_err(format!("container {}: stats", c.id), e))?;
        let metrics = Metrics {
            cpu: MessageField::some(CPUStat {
                usage: MessageField::some(CPUUsage {
                    total: s.cpu_usage_usec * 1000,
                    user: s.cpu_user_usec * 1000,
                    kernel: s.cpu_system_usec * 1000,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            memory: MessageField::some(MemoryStat {
                usage: MessageField::some(MemoryEntry {
                    usage: s.memory_usage_bytes,
                    limit: s.memory_limit_bytes,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            pids: MessageField::some(PidsStat {
                current: s.pids_current,
                limit: s.pids_limit,
                ..Default::default()
            }),
            ..Default::default()
        };
        let value = metrics.write_to_bytes().map_err(|e| {
            err(
                ttrpc::Code::INTERNAL,
                format!("container {}: stats: {e}", c.id),
            )
        })?;
        Ok(api::StatsResponse {
            stats: MessageField::some(Any {
                type_url: "io.containerd.cgroups.v1.Metrics".into(),
                value,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id).await?;
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources).map_err(|e| {
            err(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("container {}: resources: {e}", c.id),
            )
        })?;
        let sandbox = self.sandbox().await?;
        sandbox
            .agent()
            .update_container(
                ctx(Some(CALL)),
                &proto::UpdateContainerRequest {
                    container_id: c.id.clone(),
                    resources,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| agent_err(format!("container {}: update", c.id), e))?;
        Ok(api::Empty::new())
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = match self.container(&req.id).await {
            Ok(c) => c.init.state().pid,
            Err(_) => 0,
        };
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        if !self.containers.lock().await.is_empty() {
            return Ok(api::Empty::new());
        }
        self.stop_sandbox().await;
        self.exit.signal();
        Ok(api::Empty::new())
    }

    async fn pause(&self, _ctx: &TtrpcContext, _req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        Err(err(
            ttrpc::Code::UNIMPLEMENTED,
            "kite does not pause containers",
        ))
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(err(
            ttrpc::Code::UNIMPLEMENTED,
            "kite does not resume containers",
        ))
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(err(
            ttrpc::Code::UNIMPLEMENTED,
            "kite does not checkpoint containers",
        ))
    }
}
