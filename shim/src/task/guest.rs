//! What the task service needs of a sandbox and its guest agent, as traits: the real ones are
//! [`crate::sandbox::Sandbox`] and [`GuestAgentClient`] (ttrpc to `kite-guest`); the state
//! machine's unit tests use fakes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kite_protocol::agent as proto;
use kite_protocol::agent_ttrpc::AgentClient;
use kite_vmm::rpc_context;

use crate::io::{OpenError, Relays, StdioPaths};
use crate::rootfs::{self, RootfsError};
use crate::sandbox::{BootTiming, Sandbox, SandboxError};

use super::answers;

/// How long an agent call that should be quick may take.
const CALL: Duration = Duration::from_secs(30);

/// A failed call to the guest agent: the agent's own status (its code is passed on to
/// containerd), or the channel to it broke (UNAVAILABLE).
pub use kite_protocol::errors::RpcError as GuestError;

/// A container to create in the guest.
#[derive(Clone, Debug)]
pub struct NewContainer {
    pub container_id: String,
    /// The OCI spec (JSON), its paths rewritten to the guest's view of the share.
    pub oci_spec: Vec<u8>,
    /// The rootfs, relative to the share.
    pub rootfs: String,
    pub terminal: bool,
    pub stdin: bool,
}

/// A process's exit as the guest saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    pub status: u32,
    pub at_ns: u64,
}

/// A container's (or, for the empty id, the whole pod's) resource use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerStats {
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub memory_usage_bytes: u64,
    pub memory_limit_bytes: u64,
    pub pids_current: u64,
    pub pids_limit: u64,
}

/// The guest agent's calls the task service makes. `exec_id` is empty for a container's init.
#[async_trait]
pub trait GuestAgent: Send + Sync {
    async fn create_container(&self, container: NewContainer) -> Result<u32, GuestError>;
    async fn start_container(&self, container_id: &str) -> Result<u32, GuestError>;
    async fn exec_process(
        &self,
        container_id: &str,
        exec_id: &str,
        process: Vec<u8>,
        stdio: &StdioPaths,
    ) -> Result<u32, GuestError>;
    async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), GuestError>;
    /// Resolves when the process has exited (no deadline).
    async fn wait_process(&self, container_id: &str, exec_id: &str) -> Result<Exit, GuestError>;
    async fn remove_process(&self, container_id: &str, exec_id: &str) -> Result<(), GuestError>;
    async fn remove_container(&self, container_id: &str) -> Result<(), GuestError>;
    async fn resize_tty(
        &self,
        container_id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), GuestError>;
    async fn list_pids(&self, container_id: &str) -> Result<Vec<u32>, GuestError>;
    async fn container_stats(&self, container_id: &str) -> Result<ContainerStats, GuestError>;
    async fn update_container(
        &self,
        container_id: &str,
        resources: Vec<u8>,
    ) -> Result<(), GuestError>;
    /// Resolves with the next container that had an OOM kill (empty: none named).
    /// An OOM kill in the guest: the container's id, `None` for an answer without one.
    async fn wait_oom(&self) -> Result<Option<String>, GuestError>;
    /// Opens containerd's end of a process's stdio and relays it to and from the guest.
    async fn relay_stdio(
        &self,
        container_id: &str,
        exec_id: &str,
        stdio: &StdioPaths,
    ) -> Result<Relays, OpenError>;
}

/// A sandbox as the task service uses it: its VM, its guest agent and its share.
#[async_trait]
pub trait PodSandbox: Send + Sync {
    fn id(&self) -> &str;
    /// The pid that stands for the pod (QEMU's).
    fn pid(&self) -> u32;
    fn timing(&self) -> BootTiming;
    fn is_running(&self) -> bool;
    /// Resolves when the VM has exited.
    async fn exited(&self);
    async fn shutdown(&self);
    fn agent(&self) -> &dyn GuestAgent;
    /// Mounts a container's rootfs and bind-mount sources into the share (see
    /// [`rootfs::prepare`]) and rewrites `spec` to the guest's view; returns the rootfs path
    /// relative to the share.
    fn prepare_container_files(
        &self,
        container_id: &str,
        bundle: &Path,
        rootfs_mounts: &[containerd_shim::protos::api::Mount],
        spec: &mut oci_spec::runtime::Spec,
    ) -> Result<String, RootfsError>;
    /// Unmounts and removes a container's files in the share.
    fn release_container_files(&self, container_id: &str);
}

/// Boots a sandbox (a seam: unit tests boot fakes).
#[async_trait]
pub trait SandboxBooter: Send + Sync {
    async fn boot(
        &self,
        config: &crate::config::ShimConfig,
        sandbox_id: &str,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<Arc<dyn PodSandbox>, SandboxError>;
}

/// Boots real sandboxes: a QEMU VM with the pod's network.
pub struct VmBooter;

#[async_trait]
impl SandboxBooter for VmBooter {
    async fn boot(
        &self,
        config: &crate::config::ShimConfig,
        sandbox_id: &str,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<Arc<dyn PodSandbox>, SandboxError> {
        let netns = kite_vmm::net::netns_path(spec);
        let sandbox = Sandbox::start(config, sandbox_id, Some(spec), netns.as_deref()).await?;
        let agent = GuestAgentClient(sandbox.agent().clone());
        Ok(Arc::new(BootedSandbox { sandbox, agent }))
    }
}

/// A booted [`Sandbox`] with its agent client.
struct BootedSandbox {
    sandbox: Sandbox,
    agent: GuestAgentClient,
}

#[async_trait]
impl PodSandbox for BootedSandbox {
    fn id(&self) -> &str {
        self.sandbox.id()
    }

    fn pid(&self) -> u32 {
        self.sandbox.pid()
    }

    fn timing(&self) -> BootTiming {
        self.sandbox.timing()
    }

    fn is_running(&self) -> bool {
        self.sandbox.is_running()
    }

    async fn exited(&self) {
        self.sandbox.vm_exited().await;
    }

    async fn shutdown(&self) {
        self.sandbox.shutdown().await;
    }

    fn agent(&self) -> &dyn GuestAgent {
        &self.agent
    }

    fn prepare_container_files(
        &self,
        container_id: &str,
        bundle: &Path,
        rootfs_mounts: &[containerd_shim::protos::api::Mount],
        spec: &mut oci_spec::runtime::Spec,
    ) -> Result<String, RootfsError> {
        let dir = self.sandbox.container_dir(container_id);
        rootfs::prepare(container_id, &dir, bundle, rootfs_mounts, spec)?;
        Ok(PathBuf::from(container_id)
            .join(rootfs::ROOTFS)
            .display()
            .to_string())
    }

    fn release_container_files(&self, container_id: &str) {
        rootfs::release(&self.sandbox.container_dir(container_id));
    }
}

/// [`GuestAgent`] over ttrpc to `kite-guest`, with a deadline on every call that should be
/// quick.
#[derive(Clone)]
pub struct GuestAgentClient(pub AgentClient);

fn quick() -> ttrpc::context::Context {
    rpc_context(Some(CALL))
}

fn container_request(container_id: &str) -> proto::ContainerRequest {
    proto::ContainerRequest {
        container_id: container_id.to_string(),
        ..Default::default()
    }
}

fn process_request(container_id: &str, exec_id: &str) -> proto::ProcessRequest {
    proto::ProcessRequest {
        container_id: container_id.to_string(),
        exec_id: exec_id.to_string(),
        ..Default::default()
    }
}

#[async_trait]
impl GuestAgent for GuestAgentClient {
    async fn create_container(&self, container: NewContainer) -> Result<u32, GuestError> {
        let request = proto::CreateContainerRequest {
            container_id: container.container_id,
            oci_spec: container.oci_spec,
            rootfs: container.rootfs,
            terminal: container.terminal,
            stdin: container.stdin,
            ..Default::default()
        };
        // Creating runs libcontainer in the guest, which gives up after its own timeout: wait
        // a little longer, so its reason arrives rather than a bare channel timeout.
        let limit = kite_protocol::GUEST_HELPER_TIMEOUT + Duration::from_secs(15);
        let created = self
            .0
            .create_container(rpc_context(Some(limit)), &request)
            .await?;
        answers::pid(
            &format!("container {}: create", request.container_id),
            created.pid,
        )
    }

    async fn start_container(&self, container_id: &str) -> Result<u32, GuestError> {
        let started = self
            .0
            .start_container(quick(), &container_request(container_id))
            .await?;
        answers::pid(&format!("container {container_id}: start"), started.pid)
    }

    async fn exec_process(
        &self,
        container_id: &str,
        exec_id: &str,
        process: Vec<u8>,
        stdio: &StdioPaths,
    ) -> Result<u32, GuestError> {
        let request = proto::ExecProcessRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            process,
            terminal: stdio.terminal,
            stdin: !stdio.stdin.is_empty(),
            ..Default::default()
        };
        let started = self.0.exec_process(quick(), &request).await?;
        answers::pid(
            &format!("container {container_id}: exec {exec_id}"),
            started.pid,
        )
    }

    async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), GuestError> {
        let request = proto::SignalRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            signal,
            all,
            ..Default::default()
        };
        self.0.signal_process(quick(), &request).await?;
        Ok(())
    }

    async fn wait_process(&self, container_id: &str, exec_id: &str) -> Result<Exit, GuestError> {
        let waited = self
            .0
            .wait_process(rpc_context(None), &process_request(container_id, exec_id))
            .await?;
        Ok(answers::exit(&waited, std::time::SystemTime::now()))
    }

    async fn remove_process(&self, container_id: &str, exec_id: &str) -> Result<(), GuestError> {
        self.0
            .remove_process(quick(), &process_request(container_id, exec_id))
            .await?;
        Ok(())
    }

    async fn remove_container(&self, container_id: &str) -> Result<(), GuestError> {
        self.0
            .remove_container(quick(), &container_request(container_id))
            .await?;
        Ok(())
    }

    async fn resize_tty(
        &self,
        container_id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), GuestError> {
        let request = proto::ResizeTtyRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            width,
            height,
            ..Default::default()
        };
        self.0.resize_tty(quick(), &request).await?;
        Ok(())
    }

    async fn list_pids(&self, container_id: &str) -> Result<Vec<u32>, GuestError> {
        let pids = self
            .0
            .list_pids(quick(), &container_request(container_id))
            .await?;
        answers::pids(container_id, pids)
    }

    async fn container_stats(&self, container_id: &str) -> Result<ContainerStats, GuestError> {
        let s = self
            .0
            .container_stats(quick(), &container_request(container_id))
            .await?;
        Ok(answers::stats(&s))
    }

    async fn update_container(
        &self,
        container_id: &str,
        resources: Vec<u8>,
    ) -> Result<(), GuestError> {
        let request = proto::UpdateContainerRequest {
            container_id: container_id.to_string(),
            resources,
            ..Default::default()
        };
        self.0.update_container(quick(), &request).await?;
        Ok(())
    }

    async fn wait_oom(&self) -> Result<Option<String>, GuestError> {
        let event = self
            .0
            .wait_oom(rpc_context(None), &proto::Empty::new())
            .await?;
        answers::oom_container(event)
    }

    async fn relay_stdio(
        &self,
        container_id: &str,
        exec_id: &str,
        stdio: &StdioPaths,
    ) -> Result<Relays, OpenError> {
        Relays::start(&self.0, container_id, exec_id, stdio).await
    }
}
