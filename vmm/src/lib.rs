//! kite's VM layer: one QEMU microVM with its virtiofsd, its share, its NICs and its guest agent
//! connection, independent of any pod. The shim boots a pod's VM through it; the warm pool will
//! boot VMs before their pods exist and hand them over.
//!
//! A VM goes through phases, each a type that owns what it started and releases it when
//! dropped unless it is handed on:
//!
//! 1. [`PreparedVm::prepare`]: the state directory, the share (a shared bind mount) and
//!    virtiofsd serving it;
//! 2. [`PreparedVm::start`]: QEMU with the NICs it is given (taps or VFIO functions attached by
//!    [`net`]), placed in a host cgroup, up to the guest agent's first answer;
//! 3. [`RunningVm`]: the agent client, the VM's exit, [`RunningVm::stop`].
//!
//! A VM started with [`Lifetime::Pooled`] has no pod yet: it outlives the process that booted it
//! and waits in the warm pool ([`pool`]) until a pod's shim claims its directory and
//! [`RunningVm::adopt`]s it, then attaches the pod's network ([`net::attach_pooled`]).
//!
//! Everything a VM holds is recorded in its directory (pid files, `vm.json`, `network.json`,
//! `cgroup`), so [`cleanup_vm_dir`] releases it after a crash, and a later owner can read
//! [`VmState`] to adopt a running VM.
//!
//! Modules: [`accel`] (KVM or TCG), [`qemu`] (command line, process), [`virtiofsd`], [`qmp`],
//! [`net`] (the pod's NICs: tap + tc, macvtap, VFIO), [`passthrough`] (VFIO binding), [`pool`],
//! [`cgroup`], [`mounts`], [`machine`] (the phases).

pub mod accel;
pub mod cgroup;
pub mod config;
pub mod machine;
pub mod mounts;
pub mod net;
pub mod passthrough;
pub mod pool;
pub mod qemu;
pub mod qmp;
pub mod virtiofsd;

use std::path::PathBuf;
use std::time::Duration;

pub use kite_protocol::rpc_context;

pub use accel::Accelerator;
pub use config::{AcceleratorChoice, ChannelChoice, MachineType, NetworkMode, VmConfig, VmSize};
pub use machine::{
    cleanup_vm_dir, processes_alive, Lifetime, PreparedVm, RunningVm, VmState, VmTiming,
};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("accelerator kvm was configured but KVM is not usable")]
    NoKvm(#[source] accel::KvmUnusable),
    #[error("agent_channel vsock was configured but /dev/vhost-vsock does not exist")]
    NoVsock,
    #[error("sandbox {vm}: {what} {path} is missing (run hack/setup.sh)")]
    Missing {
        vm: String,
        what: &'static str,
        path: PathBuf,
    },
    #[error("sandbox {vm}: start {what}")]
    Spawn {
        vm: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox {vm}: {what} did not come up: {detail}")]
    NotReady {
        vm: String,
        what: &'static str,
        detail: String,
    },
    #[error("sandbox {vm}: {op} {path}")]
    Fs {
        vm: String,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox {vm}: place the VM in host cgroup {path}")]
    Cgroup {
        vm: String,
        path: String,
        #[source]
        source: cgroup::CgroupError,
    },
    #[error("sandbox {vm}: the VM did not boot{console}")]
    Boot {
        vm: String,
        /// The tails of the console log (kernel and agent) and of qemu.log, when they say anything.
        console: String,
        #[source]
        cause: Box<BootFailure>,
    },
}

impl VmError {
    /// A file operation `op` on `path` for VM `vm` that failed.
    pub fn fs(
        vm: &str,
        op: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> VmError {
        let (vm, path) = (vm.to_string(), path.to_path_buf());
        move |source| VmError::Fs {
            vm,
            op,
            path,
            source,
        }
    }
}

/// Why a VM's guest agent never answered.
#[derive(Debug, thiserror::Error)]
pub enum BootFailure {
    #[error("QEMU exited: {stderr}")]
    QemuExited { stderr: String },
    #[error("QEMU never connected to the agent socket")]
    NeverConnected,
    #[error("no answer from the guest agent within {0:?}")]
    NoAnswer(Duration),
    #[error("no guest agent on vsock CID {cid} within {timeout:?}")]
    NoVsockAgent {
        cid: u32,
        timeout: Duration,
        #[source]
        source: ttrpc::Error,
    },
    #[error("agent socket")]
    Socket(#[source] std::io::Error),
    #[error("guest agent")]
    Agent(#[source] ttrpc::Error),
}
