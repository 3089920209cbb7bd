//! The agent service: what the shim calls over the agent channel.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kite_protocol::agent::*;
use kite_protocol::agent_ttrpc;
use kite_protocol::errors::{rpc_status, rpc_status_text as status};
use libcgroups::common::{CgroupConfig, CgroupManager, ControllerOpt};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::Mutex;
use tracing::{debug, info, warn};
use ttrpc::r#async::TtrpcContext;

use crate::process::{Process, Stdio};
use crate::reaper::Reaper;
use crate::request;
use crate::runtime::{self, HelperReport, HelperResult};
use crate::warm_up;

/// How long container set-up (the runtime helper) may take.
const HELPER_TIMEOUT: Duration = kite_protocol::GUEST_HELPER_TIMEOUT;

struct Container {
    /// "" is the container's init process; other keys are exec ids.
    processes: Mutex<HashMap<String, Arc<Process>>>,
}

pub struct AgentService {
    reaper: Reaper,
    info: PingResponse,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    oom: Mutex<tokio::sync::mpsc::Receiver<String>>,
    /// Something gave the VM a pod's identity (a container, the network, a hostname): no
    /// warm-up from then on.
    served: AtomicBool,
    /// A warm-up began (there is at most one).
    warmed: AtomicBool,
    /// Held while the warm-up runs: a container's create waits for it.
    warming: Mutex<()>,
    /// Forks the runtime helpers (none: the agent executes itself for each).
    zygote: Option<Arc<crate::zygote::Zygote>>,
}

fn internal(message: impl std::fmt::Display) -> ttrpc::Error {
    status(ttrpc::Code::INTERNAL, message.to_string())
}

fn cgroup_path(id: &str) -> PathBuf {
    PathBuf::from(format!("/kite/{id}"))
}

fn cgroup_manager(id: &str) -> Result<libcgroups::common::AnyCgroupManager, ttrpc::Error> {
    libcgroups::common::create_cgroup_manager(CgroupConfig {
        cgroup_path: cgroup_path(id),
        systemd_cgroup: false,
        container_name: id.to_string(),
    })
    .map_err(|e| internal(format!("container {id}: cgroup: {e}")))
}

fn pipe() -> Result<(OwnedFd, OwnedFd), ttrpc::Error> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| internal(format!("pipe: {e}")))
}

impl AgentService {
    pub fn new(
        reaper: Reaper,
        info: PingResponse,
        zygote: Option<crate::zygote::Zygote>,
    ) -> Arc<Self> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let svc = Arc::new(Self {
            reaper,
            info,
            containers: Mutex::new(HashMap::new()),
            oom: Mutex::new(rx),
            served: AtomicBool::new(false),
            warmed: AtomicBool::new(false),
            warming: Mutex::new(()),
            zygote: zygote.map(Arc::new),
        });
        tokio::spawn(watch_oom(Arc::downgrade(&svc), tx));
        svc
    }

    async fn container(&self, id: &str) -> Result<Arc<Container>, ttrpc::Error> {
        self.containers
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| status(ttrpc::Code::NOT_FOUND, format!("container {id} not found")))
    }

    async fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>, ttrpc::Error> {
        let container = self.container(id).await?;
        let procs = container.processes.lock().await;
        procs.get(exec_id).cloned().ok_or_else(|| {
            status(
                ttrpc::Code::NOT_FOUND,
                format!("container {id}: process {exec_id:?} not found"),
            )
        })
    }

    /// Starts a runtime helper (`args`: `runtime …`) with `stdio`: forked by the zygote, or,
    /// without one (or when it forked nothing), the agent's own binary executed. Returns its
    /// pid and which way it started.
    async fn launch_helper(
        &self,
        id: &str,
        args: Vec<String>,
        stdio: [OwnedFd; 3],
    ) -> Result<(i32, &'static str), ttrpc::Error> {
        let (args, stdio) = match self.zygote.clone() {
            None => (args, stdio),
            Some(zygote) => {
                let launched = tokio::task::spawn_blocking(move || {
                    let forked = zygote.launch(&args, &stdio);
                    (forked, args, stdio)
                })
                .await
                .map_err(|e| internal(format!("container {id}: runtime zygote: {e}")))?;
                match launched {
                    (Ok(pid), ..) => return Ok((pid, "zygote")),
                    (Err(e), args, stdio) if e.nothing_forked() => {
                        warn!(container = %id, "{e}; executing the runtime helper");
                        (args, stdio)
                    }
                    // A helper may have started: another one could run the set-up twice.
                    (Err(e), ..) => return Err(internal(format!("container {id}: {e}"))),
                }
            }
        };
        let [stdin, stdout, stderr] = stdio;
        // In `/`, whatever the agent's working directory is at the moment (see `runtime::start`).
        let child = std::process::Command::new("/proc/self/exe")
            .current_dir("/")
            .args(&args)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| internal(format!("container {id}: run the runtime helper: {e}")))?;
        Ok((i32::try_from(child.id()).expect("pids fit an i32"), "exec"))
    }

    /// Runs the runtime helper with the process's stdio; returns the new process.
    async fn run_helper(
        &self,
        id: &str,
        exec_id: &str,
        args: Vec<String>,
        terminal: bool,
        want_stdin: bool,
    ) -> Result<Process, ttrpc::Error> {
        let dir = runtime::bundle_dir(id);
        let tag = if exec_id.is_empty() { "init" } else { exec_id };
        let result_path = dir.join(format!("result-{tag}.json"));
        let _ = std::fs::remove_file(&result_path);
        // The helper's command line, whether the zygote forks it or the agent executes itself.
        let mut helper_args: Vec<String> = vec!["runtime".into()];
        helper_args.extend(args);
        helper_args.extend([
            "--id".into(),
            id.to_string(),
            "--result".into(),
            result_path.display().to_string(),
        ]);

        let console = if terminal {
            let path = dir.join(format!("console-{tag}.sock"));
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path)
                .map_err(|e| internal(format!("container {id}: console socket: {e}")))?;
            helper_args.extend(["--console-socket".into(), path.display().to_string()]);
            Some((listener, path))
        } else {
            None
        };
        let null = || -> Result<OwnedFd, ttrpc::Error> {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map(OwnedFd::from)
                .map_err(|e| internal(format!("container {id}: open /dev/null: {e}")))
        };
        let mut ours = None;
        // The helper's stdin, stdout and stderr: the container's.
        let helper_stdio: [OwnedFd; 3] = if terminal {
            [null()?, null()?, null()?]
        } else {
            let (stdin_r, stdin_w) = if want_stdin {
                let (r, w) = pipe()?;
                (r, Some(w))
            } else {
                (null()?, None)
            };
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            ours = Some(Stdio::Pipes {
                stdin: stdin_w,
                stdout: out_r,
                stderr: err_r,
            });
            [stdin_r, out_w, err_w]
        };
        let spawned_ns = runtime::unix_ns();
        // The helper's ends of the pipes go to it; the agent keeps none, so the process's exit
        // closes its streams.
        let (helper_pid, via) = self.launch_helper(id, helper_args, helper_stdio).await?;
        let helper_exit = self.reaper.register(helper_pid);

        let master = if let Some((listener, path)) = console {
            let got = tokio::select! {
                accepted = listener.accept() => Some(accepted),
                _ = tokio::time::sleep(HELPER_TIMEOUT) => None,
            };
            let _ = std::fs::remove_file(&path);
            match got {
                Some(Ok((stream, _))) => Some(receive_fd(stream).await.map_err(|e| {
                    internal(format!("container {id}: receive the pty master: {e}"))
                })?),
                _ => None,
            }
        } else {
            None
        };

        let code = tokio::time::timeout(HELPER_TIMEOUT, helper_exit)
            .await
            .map_err(|_| internal(format!("container {id}: runtime helper timed out")))?
            .unwrap_or(255);
        let exited_ns = runtime::unix_ns();
        let result = std::fs::read_to_string(&result_path).unwrap_or_default();
        let _ = std::fs::remove_file(&result_path);
        let report = serde_json::from_str::<HelperReport>(&result);
        if let Ok(r) = &report {
            // Where a container's set-up goes: the helper's exec and loading, libcontainer's
            // work, the helper's exit until the reaper saw it.
            // (Execs, probes among them, only at debug: the console is a file on the host.)
            let ms = |from: u64, to: u64| to.saturating_sub(from) as f64 / 1e6;
            let (start_ms, work_ms, exit_ms) = (
                ms(spawned_ns, r.began_ns),
                ms(r.began_ns, r.ended_ns),
                ms(r.ended_ns, exited_ns),
            );
            if exec_id.is_empty() {
                info!(container = %id, via, start_ms, work_ms, exit_ms, "runtime helper");
            } else {
                debug!(container = %id, exec = exec_id, via, start_ms, work_ms, exit_ms, "runtime helper");
            }
        }
        let pid = match report.map(|r| r.result) {
            Ok(HelperResult::Pid(pid)) => pid,
            Ok(HelperResult::Error(message)) => {
                return Err(status(ttrpc::Code::FAILED_PRECONDITION, message))
            }
            Err(_) => {
                return Err(internal(format!(
                    "container {id}: runtime helper exited with {code} and no result"
                )))
            }
        };
        let stdio = match (ours, master) {
            (Some(pipes), _) => pipes,
            (None, Some(master)) => Stdio::Tty(master),
            (None, None) => {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                return Err(internal(format!("container {id}: no pty from the runtime")));
            }
        };
        Process::new(pid, stdio, self.reaper.register(pid))
            .map_err(|e| internal(format!("container {id}: stdio: {e}")))
    }
}

impl AgentService {
    /// Writes container `id`'s bundle (its adapted spec) and creates the container in it with
    /// the runtime helper: a pod's containers and the warm-up's alike.
    async fn create_from_spec(
        &self,
        id: &str,
        spec: &oci_spec::runtime::Spec,
        terminal: bool,
        stdin: bool,
    ) -> Result<Process, ttrpc::Error> {
        let dir = runtime::bundle_dir(id);
        std::fs::create_dir_all(&dir)
            .and_then(|_| {
                std::fs::write(
                    dir.join("config.json"),
                    serde_json::to_vec(spec).unwrap_or_default(),
                )
            })
            .map_err(|e| internal(format!("container {id}: write bundle: {e}")))?;
        let bundle = dir.to_string_lossy().into_owned();
        let args = vec!["create".into(), "--bundle".into(), bundle];
        self.run_helper(id, "", args, terminal, stdin).await
    }

    /// Marks the VM as serving a pod (no warm-up from now on), after any warm-up under way.
    async fn serve(&self) {
        let _after_the_warm_up = self.warming.lock().await;
        self.served.store(true, Ordering::SeqCst);
    }

    /// One throwaway container through create, start, exit and removal (see [`warm_up`]).
    async fn warm_up_once(&self) -> Result<WarmUpResponse, String> {
        let chain = |e: warm_up::WarmUpError| kite_protocol::errors::error_chain(&e);
        let rootfs = tokio::task::spawn_blocking(warm_up::prepare_root)
            .await
            .map_err(|e| format!("warm-up: prepare the rootfs: {e}"))?
            .map_err(chain)?;
        let spec = warm_up::spec(&rootfs).map_err(chain)?;
        let began = Instant::now();
        let process = self
            .create_from_spec(warm_up::ID, &spec, false, false)
            .await
            .map_err(|e| {
                let e = kite_protocol::errors::RpcError::from(e);
                format!("warm-up: create: {e}")
            })?;
        let created = began.elapsed();
        tokio::task::spawn_blocking(|| runtime::start(warm_up::ID))
            .await
            .map_err(|e| format!("warm-up: start: {e}"))?
            .map_err(|e| format!("warm-up: {}", kite_protocol::errors::error_chain(&e)))?;
        let started = began.elapsed();
        let exit = process.wait().await;
        if exit.status != 0 {
            return Err(format!(
                "warm-up: the container's process exited with {}",
                exit.status
            ));
        }
        let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        Ok(WarmUpResponse {
            create_ms: ms(created),
            start_ms: ms(started - created),
            run_ms: ms(began.elapsed() - started),
            ..Default::default()
        })
    }
}

#[derive(Clone, Copy, Debug)]
enum Stream {
    Stdout,
    Stderr,
}

impl AgentService {
    async fn read_stream(
        &self,
        req: ReadStreamRequest,
        stream: Stream,
    ) -> ttrpc::Result<ReadStreamResponse> {
        let process = self.process(&req.container_id, &req.exec_id).await?;
        let len = req.len as usize;
        let data = match stream {
            Stream::Stdout => process.read_stdout(len).await,
            Stream::Stderr => process.read_stderr(len).await,
        }
        .map_err(|e| internal(format!("container {}: {stream:?}: {e}", req.container_id)))?;
        Ok(ReadStreamResponse {
            data,
            ..Default::default()
        })
    }
}

/// Receives one file descriptor (SCM_RIGHTS) from a connected unix stream.
async fn receive_fd(stream: tokio::net::UnixStream) -> std::io::Result<OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let std_stream = stream.into_std()?;
    std_stream.set_nonblocking(false)?;
    tokio::task::spawn_blocking(move || {
        let mut buf = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = nix::sys::socket::recvmsg::<()>(
            std_stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        for cmsg in msg.cmsgs()? {
            if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = cmsg {
                if let Some(&fd) = fds.first() {
                    // SAFETY: the kernel just installed this descriptor in our table for us.
                    return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no descriptor in the console message",
        ))
    })
    .await?
}

/// Watches the containers' memory.events and reports OOM kills.
async fn watch_oom(svc: std::sync::Weak<AgentService>, tx: tokio::sync::mpsc::Sender<String>) {
    let mut seen: HashMap<String, u64> = HashMap::new();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Some(svc) = svc.upgrade() else { return };
        let ids: Vec<String> = svc.containers.lock().await.keys().cloned().collect();
        drop(svc);
        seen.retain(|id, _| ids.contains(id));
        for id in ids {
            let path = Path::new("/sys/fs/cgroup").join(format!("kite/{id}/memory.events"));
            let kills = std::fs::read_to_string(path)
                .ok()
                .and_then(|t| oom_kills(&t))
                .unwrap_or(0);
            let before = seen.insert(id.clone(), kills).unwrap_or(0);
            if kills > before {
                warn!(container = %id, "OOM kill");
                let _ = tx.send(id).await;
            }
        }
    }
}

/// The `oom_kill` counter of a cgroup v2 memory.events file.
pub fn oom_kills(memory_events: &str) -> Option<u64> {
    memory_events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

#[async_trait]
impl agent_ttrpc::Agent for AgentService {
    async fn ping(&self, _ctx: &TtrpcContext, _req: PingRequest) -> ttrpc::Result<PingResponse> {
        Ok(self.info.clone())
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        let id = req.container_id.clone();
        self.serve().await;
        if self.containers.lock().await.contains_key(&id) {
            return Err(status(
                ttrpc::Code::ALREADY_EXISTS,
                format!("container {id} exists"),
            ));
        }
        let plan = request::plan_create(Path::new(kite_protocol::GUEST_SHARE_DIR), &req)
            .map_err(|e| rpc_status(ttrpc::Code::INVALID_ARGUMENT, &e))?;
        let (rootfs, spec) = (plan.rootfs, plan.spec);
        if !rootfs.is_dir() {
            return Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!(
                    "container {id}: rootfs {} is not in the share",
                    rootfs.display()
                ),
            ));
        }
        let created = self
            .create_from_spec(&id, &spec, req.terminal, req.stdin)
            .await;
        let process = match created {
            Ok(p) => p,
            Err(e) => {
                let _ = tokio::task::spawn_blocking(move || runtime::delete(&id)).await;
                return Err(e);
            }
        };
        let pid = u32::try_from(process.pid).unwrap_or(0);
        info!(container = %id, pid, "created");
        let mut procs = HashMap::new();
        procs.insert(String::new(), Arc::new(process));
        self.containers.lock().await.insert(
            id,
            Arc::new(Container {
                processes: Mutex::new(procs),
            }),
        );
        Ok(CreateContainerResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StartResponse> {
        let process = self.process(&req.container_id, "").await?;
        let id = req.container_id.clone();
        tokio::task::spawn_blocking(move || runtime::start(&id))
            .await
            .map_err(internal)?
            .map_err(|e| rpc_status(ttrpc::Code::FAILED_PRECONDITION, &e))?;
        info!(container = %req.container_id, "started");
        Ok(StartResponse {
            pid: u32::try_from(process.pid).unwrap_or(0),
            ..Default::default()
        })
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let id = req.container_id.clone();
        // Removal cleans up after a failed create too, so the id may be unknown: it still
        // names the directories removed.
        request::check_id("container", &id)
            .map_err(|e| rpc_status(ttrpc::Code::INVALID_ARGUMENT, &e))?;
        let removed = self.containers.lock().await.remove(&id);
        tokio::task::spawn_blocking(move || runtime::delete(&id))
            .await
            .map_err(internal)?
            .map_err(|e| rpc_status(ttrpc::Code::INTERNAL, &e))?;
        if removed.is_none() {
            return Err(status(
                ttrpc::Code::NOT_FOUND,
                format!("container {} not found", req.container_id),
            ));
        }
        Ok(Empty::default())
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        let (id, exec_id) = (req.container_id.clone(), req.exec_id.clone());
        let container = self.container(&id).await?;
        if container.processes.lock().await.contains_key(&exec_id) {
            return Err(status(
                ttrpc::Code::ALREADY_EXISTS,
                format!("container {id}: exec {exec_id} exists"),
            ));
        }
        let process =
            request::plan_exec(&req).map_err(|e| rpc_status(ttrpc::Code::INVALID_ARGUMENT, &e))?;
        let file = runtime::bundle_dir(&id).join(format!("exec-{exec_id}.json"));
        std::fs::write(&file, serde_json::to_vec(&process).unwrap_or_default())
            .map_err(|e| internal(format!("container {id}: write exec {exec_id}: {e}")))?;
        let args = vec![
            "exec".into(),
            "--process".into(),
            file.to_string_lossy().into_owned(),
        ];
        let result = self
            .run_helper(&id, &exec_id, args, req.terminal, req.stdin)
            .await;
        let _ = std::fs::remove_file(&file);
        let process = result?;
        let pid = u32::try_from(process.pid).unwrap_or(0);
        container
            .processes
            .lock()
            .await
            .insert(exec_id, Arc::new(process));
        Ok(ExecProcessResponse {
            pid,
            ..Default::default()
        })
    }

    async fn remove_process(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<Empty> {
        let container = self.container(&req.container_id).await?;
        container.processes.lock().await.remove(&req.exec_id);
        Ok(Empty::default())
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalRequest,
    ) -> ttrpc::Result<Empty> {
        let signal = i32::try_from(req.signal)
            .ok()
            .and_then(|n| Signal::try_from(n).ok())
            .ok_or_else(|| {
                status(
                    ttrpc::Code::INVALID_ARGUMENT,
                    format!("signal {} is not valid", req.signal),
                )
            })?;
        let process = self.process(&req.container_id, &req.exec_id).await?;
        if req.all && req.exec_id.is_empty() {
            let id = req.container_id.clone();
            return tokio::task::spawn_blocking(move || runtime::kill_all(&id, signal))
                .await
                .map_err(internal)?
                .map(|_| Empty::default())
                .map_err(|e| rpc_status(ttrpc::Code::INTERNAL, &e));
        }
        if process.exit().is_some() {
            return Err(status(
                ttrpc::Code::NOT_FOUND,
                format!(
                    "container {}: process {:?} already finished",
                    req.container_id, req.exec_id
                ),
            ));
        }
        kill(Pid::from_raw(process.pid), signal)
            .map_err(|e| internal(format!("container {}: kill: {e}", req.container_id)))?;
        Ok(Empty::default())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<WaitResponse> {
        let process = self.process(&req.container_id, &req.exec_id).await?;
        let exit = process.wait().await;
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at_ns: exit.at_ns,
            ..Default::default()
        })
    }

    async fn read_stdout(
        &self,
        _ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        self.read_stream(req, Stream::Stdout).await
    }

    async fn read_stderr(
        &self,
        _ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        self.read_stream(req, Stream::Stderr).await
    }

    async fn write_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: WriteStreamRequest,
    ) -> ttrpc::Result<WriteStreamResponse> {
        let process = self.process(&req.container_id, &req.exec_id).await?;
        let len = process
            .write_stdin(&req.data)
            .await
            .map_err(|e| internal(format!("container {}: stdin: {e}", req.container_id)))?;
        Ok(WriteStreamResponse {
            len: len as u32,
            ..Default::default()
        })
    }

    async fn close_stdin(&self, _ctx: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<Empty> {
        self.process(&req.container_id, &req.exec_id)
            .await?
            .close_stdin()
            .await;
        Ok(Empty::default())
    }

    async fn resize_tty(&self, _ctx: &TtrpcContext, req: ResizeTtyRequest) -> ttrpc::Result<Empty> {
        let process = self.process(&req.container_id, &req.exec_id).await?;
        process
            .resize(req.width as u16, req.height as u16)
            .map_err(|e| internal(format!("container {}: resize: {e}", req.container_id)))?;
        Ok(Empty::default())
    }

    async fn list_pids(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<PidsResponse> {
        self.container(&req.container_id).await?;
        let manager = cgroup_manager(&req.container_id)?;
        let pids = manager
            .get_all_pids()
            .map_err(|e| internal(format!("container {}: pids: {e}", req.container_id)))?;
        Ok(PidsResponse {
            pids: pids
                .into_iter()
                .filter_map(|p| u32::try_from(p.as_raw()).ok())
                .collect(),
            ..Default::default()
        })
    }

    async fn container_stats(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StatsResponse> {
        // The empty id asks for the whole pod: the cgroup every container's lies under.
        if !req.container_id.is_empty() {
            self.container(&req.container_id).await?;
        }
        let manager = cgroup_manager(&req.container_id)?;
        let stats = manager
            .stats()
            .map_err(|e| internal(format!("container {}: stats: {e}", req.container_id)))?;
        Ok(StatsResponse {
            cpu_usage_usec: stats.cpu.usage.usage_total / 1000,
            cpu_user_usec: stats.cpu.usage.usage_user / 1000,
            cpu_system_usec: stats.cpu.usage.usage_kernel / 1000,
            memory_usage_bytes: stats.memory.memory.usage,
            memory_limit_bytes: stats.memory.memory.limit,
            pids_current: stats.pids.current,
            pids_limit: stats.pids.limit,
            ..Default::default()
        })
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.container(&req.container_id).await?;
        let resources: oci_spec::runtime::LinuxResources = serde_json::from_slice(&req.resources)
            .map_err(|e| {
            status(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("container {}: resources: {e}", req.container_id),
            )
        })?;
        let manager = cgroup_manager(&req.container_id)?;
        let opt = ControllerOpt {
            resources: &resources,
            freezer_state: None,
            oom_score_adj: None,
            disable_oom_killer: false,
        };
        manager
            .apply(&opt)
            .map_err(|e| internal(format!("container {}: update: {e}", req.container_id)))?;
        Ok(Empty::default())
    }

    async fn configure_network(
        &self,
        _ctx: &TtrpcContext,
        req: NetworkConfig,
    ) -> ttrpc::Result<Empty> {
        self.serve().await;
        let began = Instant::now();
        crate::network::configure(&req).await.map_err(|e| {
            let code = match e {
                crate::network::NetworkError::Invalid { .. } => ttrpc::Code::INVALID_ARGUMENT,
                _ => ttrpc::Code::INTERNAL,
            };
            status(code, format!("network: {e}"))
        })?;
        info!(
            interfaces = req.interfaces.len(),
            routes = req.routes.len(),
            ms = began.elapsed().as_secs_f64() * 1000.0,
            "network configured"
        );
        Ok(Empty::default())
    }

    async fn set_hostname(
        &self,
        _ctx: &TtrpcContext,
        req: HostnameRequest,
    ) -> ttrpc::Result<Empty> {
        self.serve().await;
        nix::unistd::sethostname(&req.hostname).map_err(|e| {
            status(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("hostname {:?}: {e}", req.hostname),
            )
        })?;
        Ok(Empty::default())
    }

    async fn warm_up(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<WarmUpResponse> {
        let _warming = self.warming.lock().await;
        if self.served.load(Ordering::SeqCst) {
            return Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                "warm-up: the VM serves a pod already",
            ));
        }
        if self.warmed.swap(true, Ordering::SeqCst) {
            return Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                "warm-up: done once already",
            ));
        }
        // The clean-up counts within the limit too: the answer says what the VM is left with.
        let ran = tokio::time::timeout(warm_up::WITHIN, self.warm_up_once()).await;
        let cleaned = tokio::task::spawn_blocking(warm_up::remove_leftovers)
            .await
            .map_err(internal)?;
        let answer = match (ran, cleaned) {
            (Ok(Ok(took)), Ok(())) => Ok(took),
            (Ok(Err(e)), _) => Err(e),
            (Err(_), _) => Err(format!("warm-up: not done within {:?}", warm_up::WITHIN)),
            (Ok(Ok(_)), Err(e)) => Err(kite_protocol::errors::error_chain(&e)),
        };
        match answer {
            Ok(took) => {
                info!(
                    create_ms = took.create_ms,
                    start_ms = took.start_ms,
                    run_ms = took.run_ms,
                    "warmed up"
                );
                Ok(took)
            }
            Err(e) => {
                warn!(error = %e, "warm-up failed");
                Err(internal(e))
            }
        }
    }

    async fn wait_oom(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<OomEvent> {
        let id = self.oom.lock().await.recv().await.unwrap_or_default();
        Ok(OomEvent {
            container_id: id,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kill_counter_is_read() {
        let text = "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(oom_kills(text), Some(2));
        assert_eq!(oom_kills("low 0\n"), None);
    }
}
