//! A sandbox: a pod's VM (see `kite_vmm`) with the pod's identity given to it — its network
//! namespace's interfaces attached and configured in the guest, its hostname. A pod's
//! containers all run in its sandbox; a plain container (`ctr run`) is a sandbox of its own.
//!
//! State lives in `<state_dir>/<sandbox id>/`: the VM's (sockets, pid files, logs, `vm.json`),
//! the pod network's record (`network.json`) and `share/` (what virtio-fs exports: one
//! sub-directory per container with its rootfs and bind mounts). [`Sandbox::shutdown`] releases
//! all of it, and so does `kite_vmm::cleanup_vm_dir` after a crash.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kite_protocol::agent::HostnameRequest;
use kite_protocol::agent_ttrpc::AgentClient;
use kite_vmm::net::{self, NetworkError};
use kite_vmm::{cgroup, passthrough, rpc_context, PreparedVm, RunningVm, VmError, VmTiming};

use crate::config::ShimConfig;
use crate::sizing;

/// How long configuring the pod's identity in the guest may take.
const CONFIGURE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("sandbox {sandbox}: the VM did not boot: {what}")]
    Guest {
        sandbox: String,
        what: &'static str,
        #[source]
        source: ttrpc::Error,
    },
}

/// How long each stage of a sandbox's start took.
#[derive(Clone, Copy, Debug, Default)]
pub struct BootTiming {
    pub vm: VmTiming,
    /// The pod's network: attaching it on the host, and configuring it in the guest.
    pub network_attach: Duration,
    pub network_guest: Duration,
}

pub struct Sandbox {
    vm: RunningVm,
    timing: BootTiming,
}

impl Sandbox {
    pub fn dir_for(config: &ShimConfig, id: &str) -> PathBuf {
        config.state_dir.join(id)
    }

    /// Boots the sandbox's VM with the interfaces of `netns` (the pod's network namespace),
    /// sized and placed in the host cgroup as `oci` (the sandbox container's spec) says, and
    /// gives the guest the pod's network configuration and hostname. On any failure everything
    /// started so far is released before the error is returned.
    pub async fn boot(
        config: &ShimConfig,
        id: &str,
        oci: Option<&oci_spec::runtime::Spec>,
        netns: Option<&Path>,
    ) -> Result<Sandbox, SandboxError> {
        let dir = Self::dir_for(config, id);
        let prepared = PreparedVm::prepare(&config.vm_config(), id, &dir).await?;

        let attach_started = Instant::now();
        let network = match netns {
            Some(ns) => {
                let (id, ns, dir) = (id.to_string(), ns.to_path_buf(), dir.clone());
                let (mode, vfio) = (config.network_mode, config.vfio_passthrough);
                let sysfs = Path::new(passthrough::SYSFS);
                let attached = tokio::task::spawn_blocking(move || {
                    net::attach(&id, &ns, &dir, mode, vfio, sysfs)
                })
                .await
                .expect("the network attach thread does not panic")?;
                Some(attached)
            }
            None => None,
        };
        let network_attach = attach_started.elapsed();
        let (nics, tap_fds, guest_network) = match network {
            Some(n) => (n.nics, n.tap_fds, Some(n.guest)),
            None => (Vec::new(), Vec::new(), None),
        };

        let size = sizing::size_for(config, oci);
        let host_cgroup = oci.and_then(cgroup::cgroup_path_of);
        let vm = prepared
            .start(size, nics, tap_fds, host_cgroup.as_deref())
            .await?;

        let configure_started = Instant::now();
        let guest_err = |what| {
            let sandbox = id.to_string();
            move |source| SandboxError::Guest {
                sandbox,
                what,
                source,
            }
        };
        if let Some(network) = guest_network {
            vm.agent()
                .configure_network(rpc_context(Some(CONFIGURE_TIMEOUT)), &network)
                .await
                .map_err(guest_err("configure the pod network in the guest"))?;
        }
        // The guest's hostname is the pod's (its containers share the guest's UTS namespace).
        let hostname = oci
            .and_then(|s| s.hostname().clone())
            .filter(|h| !h.is_empty());
        if let Some(hostname) = hostname {
            let request = HostnameRequest {
                hostname,
                ..Default::default()
            };
            vm.agent()
                .set_hostname(rpc_context(Some(CONFIGURE_TIMEOUT)), &request)
                .await
                .map_err(guest_err("set the guest's hostname"))?;
        }
        let timing = BootTiming {
            vm: vm.timing(),
            network_attach,
            network_guest: configure_started.elapsed(),
        };
        Ok(Sandbox { vm, timing })
    }

    pub fn id(&self) -> &str {
        self.vm.id()
    }

    pub fn timing(&self) -> BootTiming {
        self.timing
    }

    /// QEMU's pid: the process that holds the pod.
    pub fn pid(&self) -> u32 {
        self.vm.pid()
    }

    pub fn agent(&self) -> &AgentClient {
        self.vm.agent()
    }

    /// Resolves when the VM has exited.
    pub async fn vm_exited(&self) {
        self.vm.exited().await;
    }

    pub fn is_running(&self) -> bool {
        self.vm.is_running()
    }

    /// Stops the VM and releases everything the sandbox holds.
    pub async fn shutdown(&self) {
        self.vm.stop().await;
    }

    /// The directory of container `container_id` in the share (the guest sees it under
    /// [`kite_protocol::GUEST_SHARE_DIR`]).
    pub fn container_dir(&self, container_id: &str) -> PathBuf {
        self.vm.share().join(container_id)
    }
}
