//! The containerd Task API (shim v2) over ttrpc: each call is translated to the state
//! machine's ([`TaskState`]) and its error to a ttrpc status ([`TaskError`]'s one mapping).

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::api;
use containerd_shim::protos::cgroups::metrics::{
    CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::ttrpc::r#async::TtrpcContext;
use containerd_shim::TtrpcResult;
use tracing::{error, info};

use super::error::TaskError;
use super::guest::ContainerStats;
use super::state::{CreateRequest, TaskState};
use crate::io::StdioPaths;

/// The shim's task service: the containers of one sandbox (one VM).
pub struct KiteTask {
    state: Arc<TaskState>,
    exit: Arc<ExitSignal>,
}

impl KiteTask {
    pub fn new(state: Arc<TaskState>, exit: Arc<ExitSignal>) -> Self {
        Self { state, exit }
    }
}

/// containerd-shim-protos 0.10 carries the v1 metrics message only; containerd and the CRI
/// read it on any host.
fn metrics(s: &ContainerStats) -> Metrics {
    Metrics {
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
        let request = CreateRequest {
            container_id: req.id.clone(),
            bundle: req.bundle.clone().into(),
            rootfs: req.rootfs.clone(),
            stdio: StdioPaths::new(&req.stdin, &req.stdout, &req.stderr, req.terminal),
            checkpoint: req.checkpoint.clone(),
            config_path: req
                .options
                .as_ref()
                .and_then(|o| crate::config::runtime_options_config_path(&o.type_url, &o.value)),
        };
        let pid = self.state.create(request).await.inspect_err(|e| {
            error!(container = %req.id, error = %kite_protocol::errors::error_chain(e), "create");
        })?;
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
        let pid = self.state.start(&req.id, &req.exec_id).await?;
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
        let info = self.state.state(&req.id, &req.exec_id).await?;
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: info.bundle,
            pid: info.status.pid,
            status: info.status.status.into(),
            stdin: info.stdio.stdin,
            stdout: info.stdio.stdout,
            stderr: info.stdio.stderr,
            terminal: info.stdio.terminal,
            exit_status: info.status.exit_status,
            exited_at: info.status.exited_at.into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let st = self.state.wait(&req.id, &req.exec_id).await?;
        Ok(api::WaitResponse {
            exit_status: st.exit_status,
            exited_at: st.exited_at.into(),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        self.state
            .kill(&req.id, &req.exec_id, req.signal, req.all)
            .await?;
        Ok(api::Empty::new())
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let st = self.state.delete(&req.id, &req.exec_id).await?;
        Ok(api::DeleteResponse {
            pid: st.pid,
            exit_status: st.exit_status,
            exited_at: st.exited_at.into(),
            ..Default::default()
        })
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        let stdio = StdioPaths::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        self.state.exec(&req.id, &req.exec_id, spec, stdio).await?;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        self.state
            .resize_pty(&req.id, &req.exec_id, req.width, req.height)
            .await?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        if req.stdin {
            self.state.close_stdin(&req.id, &req.exec_id).await?;
        }
        Ok(api::Empty::new())
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let pids = self.state.pids(&req.id).await?;
        Ok(api::PidsResponse {
            processes: pids
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
        let stats = self.state.stats(&req.id).await?;
        let value = metrics(&stats)
            .write_to_bytes()
            .map_err(|e| TaskError::Internal {
                what: format!("container {}: encode its stats", req.id),
                source: Box::new(e),
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
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        self.state.update(&req.id, resources).await?;
        Ok(api::Empty::new())
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.state.task_pid(&req.id).await,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        if self.state.shutdown().await {
            self.exit.signal();
        }
        Ok(api::Empty::new())
    }

    async fn pause(&self, _ctx: &TtrpcContext, _req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        Err(TaskError::Unimplemented("pause").into())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(TaskError::Unimplemented("resume").into())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(TaskError::Unimplemented("checkpoint").into())
    }
}
