//! A guest agent that misbehaves on purpose, to test that the host does not trust the guest
//! (built only with the `misbehave` feature, into an initrd of its own: never the one kite
//! ships). After a container runs as root in the VM, the guest kernel and agent may be
//! hostile; the shim must bound what it takes from them and lose only the misbehaving pod.
//!
//! The mode comes from the kernel command line, `kite.misbehave=MODE` (the shim's
//! `kernel_params`):
//! - `huge`: output chunks of 3 MiB whatever the shim asked for, 200,000 pids for a container;
//! - `stall`: every call after the container started never answers (signals, execs, waits,
//!   output, stats);
//! - `garbage`: after each answer, the channel to the host carries random bytes
//!   ([`garbage_after_first_answer`], used by the serial port's pump);
//! - `lie`: impossible exit statuses and times, pid 0 for an exec, pids out of range, a flood
//!   of OOM events naming containers that do not exist (the container itself starts honestly,
//!   so that the lies after it are heard).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kite_protocol::agent::*;
use kite_protocol::agent_ttrpc::Agent;
use ttrpc::r#async::TtrpcContext;

use crate::service::AgentService;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Huge,
    Stall,
    Garbage,
    Lie,
}

/// The mode the kernel command line asks for, if any.
pub fn mode(cmdline: &str) -> Option<Mode> {
    let word = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("kite.misbehave="))?;
    match word {
        "huge" => Some(Mode::Huge),
        "stall" => Some(Mode::Stall),
        "garbage" => Some(Mode::Garbage),
        "lie" => Some(Mode::Lie),
        _ => None,
    }
}

/// Whether the serial port's pump sends garbage after the agent's first answer.
pub fn garbage_after_first_answer(cmdline: &str) -> bool {
    mode(cmdline) == Some(Mode::Garbage)
}

/// Random-looking bytes (a ttrpc frame header among them claims a huge message).
pub fn garbage(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 10);
    // A frame header: length 0x7fff_ffff, stream 1, type response.
    out.extend_from_slice(&[0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 1, 2, 0]);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(x as u8);
    }
    out
}

/// The agent service with `mode`'s misbehaviour in front of it.
pub struct MisbehavingAgent {
    inner: Arc<AgentService>,
    mode: Mode,
}

impl MisbehavingAgent {
    pub fn new(inner: Arc<AgentService>, mode: Mode) -> Arc<Self> {
        tracing::warn!(?mode, "this agent misbehaves on purpose (a test build)");
        Arc::new(MisbehavingAgent { inner, mode })
    }

    async fn stall<T>(&self) -> ttrpc::Result<T> {
        futures::future::pending::<()>().await;
        unreachable!("a pending future never resolves")
    }

    fn stalls(&self) -> bool {
        self.mode == Mode::Stall
    }

    /// Output: never (`stall`), 3 MiB of `fill` whatever was asked (`huge`), or the real one.
    async fn read_stream(
        &self,
        fill: u8,
        honest: impl std::future::Future<Output = ttrpc::Result<ReadStreamResponse>>,
    ) -> ttrpc::Result<ReadStreamResponse> {
        match self.mode {
            Mode::Stall => self.stall().await,
            Mode::Huge => Ok(ReadStreamResponse {
                data: vec![fill; HUGE_CHUNK],
                ..Default::default()
            }),
            _ => honest.await,
        }
    }
}

const HUGE_CHUNK: usize = 3 << 20;

/// In `stall` mode the call never answers; otherwise the real agent answers it.
macro_rules! honest_unless_stalling {
    ($self:ident, $call:expr) => {{
        if $self.stalls() {
            return $self.stall().await;
        }
        $call.await
    }};
}

#[async_trait]
impl Agent for MisbehavingAgent {
    async fn ping(&self, ctx: &TtrpcContext, req: PingRequest) -> ttrpc::Result<PingResponse> {
        self.inner.ping(ctx, req).await
    }

    async fn create_container(
        &self,
        ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        self.inner.create_container(ctx, req).await
    }

    async fn start_container(
        &self,
        ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StartResponse> {
        self.inner.start_container(ctx, req).await
    }

    async fn remove_container(
        &self,
        ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        honest_unless_stalling!(self, self.inner.remove_container(ctx, req))
    }

    async fn exec_process(
        &self,
        ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        if self.stalls() {
            return self.stall().await;
        }
        let mut answer = self.inner.exec_process(ctx, req).await?;
        if self.mode == Mode::Lie {
            answer.pid = 0;
        }
        Ok(answer)
    }

    async fn remove_process(
        &self,
        ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<Empty> {
        honest_unless_stalling!(self, self.inner.remove_process(ctx, req))
    }

    async fn signal_process(&self, ctx: &TtrpcContext, req: SignalRequest) -> ttrpc::Result<Empty> {
        honest_unless_stalling!(self, self.inner.signal_process(ctx, req))
    }

    async fn wait_process(
        &self,
        ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<WaitResponse> {
        if self.stalls() {
            return self.stall().await;
        }
        let mut answer = self.inner.wait_process(ctx, req).await?;
        if self.mode == Mode::Lie {
            answer.exit_status = 70_000;
            answer.exited_at_ns = u64::MAX;
        }
        Ok(answer)
    }

    async fn read_stdout(
        &self,
        ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        self.read_stream(b'x', self.inner.read_stdout(ctx, req))
            .await
    }

    async fn read_stderr(
        &self,
        ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        self.read_stream(b'y', self.inner.read_stderr(ctx, req))
            .await
    }

    async fn write_stdin(
        &self,
        ctx: &TtrpcContext,
        req: WriteStreamRequest,
    ) -> ttrpc::Result<WriteStreamResponse> {
        honest_unless_stalling!(self, self.inner.write_stdin(ctx, req))
    }

    async fn close_stdin(&self, ctx: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<Empty> {
        honest_unless_stalling!(self, self.inner.close_stdin(ctx, req))
    }

    async fn resize_tty(&self, ctx: &TtrpcContext, req: ResizeTtyRequest) -> ttrpc::Result<Empty> {
        honest_unless_stalling!(self, self.inner.resize_tty(ctx, req))
    }

    async fn list_pids(
        &self,
        ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<PidsResponse> {
        match self.mode {
            Mode::Stall => self.stall().await,
            Mode::Huge => Ok(PidsResponse {
                pids: (1..=200_000).collect(),
                ..Default::default()
            }),
            Mode::Lie => Ok(PidsResponse {
                pids: vec![0, u32::MAX, 1 << 31],
                ..Default::default()
            }),
            Mode::Garbage => self.inner.list_pids(ctx, req).await,
        }
    }

    async fn container_stats(
        &self,
        ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StatsResponse> {
        honest_unless_stalling!(self, self.inner.container_stats(ctx, req))
    }

    async fn update_container(
        &self,
        ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        honest_unless_stalling!(self, self.inner.update_container(ctx, req))
    }

    async fn wait_oom(&self, ctx: &TtrpcContext, req: Empty) -> ttrpc::Result<OomEvent> {
        match self.mode {
            Mode::Stall => self.stall().await,
            // At once, every time, naming what does not exist.
            Mode::Lie => {
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok(OomEvent {
                    container_id: "../../etc".into(),
                    ..Default::default()
                })
            }
            _ => self.inner.wait_oom(ctx, req).await,
        }
    }

    async fn configure_network(
        &self,
        ctx: &TtrpcContext,
        req: NetworkConfig,
    ) -> ttrpc::Result<Empty> {
        self.inner.configure_network(ctx, req).await
    }

    async fn set_hostname(&self, ctx: &TtrpcContext, req: HostnameRequest) -> ttrpc::Result<Empty> {
        self.inner.set_hostname(ctx, req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mode_is_read_from_the_kernel_command_line() {
        assert_eq!(
            mode("console=hvc0 kite.misbehave=huge quiet"),
            Some(Mode::Huge)
        );
        assert_eq!(mode("kite.misbehave=stall"), Some(Mode::Stall));
        assert_eq!(mode("kite.misbehave=nonsense"), None);
        assert_eq!(mode("console=hvc0"), None);
        assert!(garbage_after_first_answer("kite.misbehave=garbage"));
        assert!(!garbage_after_first_answer("kite.misbehave=lie"));
        assert!(garbage(4096).len() >= 4096);
    }
}
