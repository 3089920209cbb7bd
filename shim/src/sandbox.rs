//! A sandbox: a pod's VM (see `kite_vmm`) with the pod's identity given to it — its network
//! namespace's interfaces attached and configured in the guest, its hostname. A pod's
//! containers all run in its sandbox; a plain container (`ctr run`) is a sandbox of its own.
//!
//! State lives in `<state_dir>/<sandbox id>/`: the VM's (sockets, pid files, logs, `vm.json`),
//! the pod network's record (`network.json`) and `share/` (what virtio-fs exports: one
//! sub-directory per container with its rootfs and bind mounts). [`Sandbox::shutdown`] releases
//! all of it, and so does `kite_vmm::cleanup_vm_dir` after a crash.
//!
//! [`Sandbox::start`] first tries the warm pool (`[shim.pool]`, see [`crate::pool`]): a VM
//! booted before the pod, of the pod's size and made from the same configuration, is claimed
//! (its directory renamed to the sandbox's), moved into the pod's cgroup and given the pod's
//! network, hostname and MAC — from then on it is the same as a VM booted for the pod. A pod
//! the pool cannot serve boots its own VM ([`Sandbox::boot`]); the pool never fails a pod.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kite_protocol::agent::HostnameRequest;
use kite_protocol::agent_ttrpc::AgentClient;
use kite_vmm::net::{self, NetworkError};
use kite_vmm::{
    cgroup, passthrough, pool, rpc_context, Lifetime, PreparedVm, RunningVm, VmError, VmTiming,
};
use tracing::{info, warn};

use crate::config::ShimConfig;
use crate::{pool as warm_pool, sizing};

/// A pod annotation: `"false"` boots the pod's own VM even when the warm pool has one for it
/// (benchmarks of the cold start; a pod that wants a VM nobody booted before it).
pub const WARM_POOL_ANNOTATION: &str = "io.kite.warm-pool";

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

/// What the warm pool did for a sandbox's start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PoolUse {
    /// No pool configured.
    #[default]
    Off,
    /// The sandbox adopted a pooled VM.
    Hit,
    /// It booted its own VM, for this reason (a word: empty, size, config, no-netns, …).
    Miss(&'static str),
}

impl std::fmt::Display for PoolUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolUse::Off => f.write_str("off"),
            PoolUse::Hit => f.write_str("hit"),
            PoolUse::Miss(reason) => write!(f, "miss:{reason}"),
        }
    }
}

/// How long each stage of a sandbox's start took.
#[derive(Clone, Copy, Debug, Default)]
pub struct BootTiming {
    /// The VM's boot; for an adopted VM, `vm_to_agent` is the adoption (claim to first answer).
    pub vm: VmTiming,
    /// The pod's network: attaching it on the host, and configuring it in the guest.
    pub network_attach: Duration,
    pub network_guest: Duration,
    pub pool: PoolUse,
}

pub struct Sandbox {
    vm: RunningVm,
    timing: BootTiming,
}

impl Sandbox {
    pub fn dir_for(config: &ShimConfig, id: &str) -> PathBuf {
        config.state_dir.join(id)
    }

    /// Starts the sandbox: adopts a pooled VM when the pool has one that fits, boots one
    /// otherwise ([`Sandbox::boot`]).
    pub async fn start(
        config: &ShimConfig,
        id: &str,
        oci: Option<&oci_spec::runtime::Spec>,
        netns: Option<&Path>,
    ) -> Result<Sandbox, SandboxError> {
        let declined = oci
            .and_then(|s| s.annotations().as_ref())
            .and_then(|a| a.get(WARM_POOL_ANNOTATION))
            .is_some_and(|v| v == "false");
        let pool = if !config.pool.enabled {
            PoolUse::Off
        } else if declined {
            PoolUse::Miss("declined")
        } else if let Some(ns) = netns {
            match Self::adopt(config, id, oci, ns).await {
                Ok(Ok(sandbox)) => return Ok(sandbox),
                Ok(Err(reason)) => PoolUse::Miss(reason),
                Err(e) => {
                    warn!(sandbox = %id, error = %kite_protocol::errors::error_chain(&e), "adopt a pooled VM; booting one instead");
                    PoolUse::Miss("failed")
                }
            }
        } else {
            // A pooled VM has a NIC; a sandbox without a network namespace has none.
            PoolUse::Miss("no-netns")
        };
        if let PoolUse::Miss(reason) = pool {
            warm_pool::record_miss(&config.pool_dir(), reason);
        }
        let mut sandbox = Self::boot(config, id, oci, netns).await?;
        sandbox.timing.pool = pool;
        Ok(sandbox)
    }

    /// Adopts a VM from the warm pool for the pod, if one fits: `Ok(Err(reason))` when none
    /// does (nothing was changed). Once a VM is claimed, a failure releases it and is returned.
    async fn adopt(
        config: &ShimConfig,
        id: &str,
        oci: Option<&oci_spec::runtime::Spec>,
        netns: &Path,
    ) -> Result<Result<Sandbox, &'static str>, SandboxError> {
        let pod = {
            let (id, ns) = (id.to_string(), netns.to_path_buf());
            tokio::task::spawn_blocking(move || net::read_pod(&id, &ns))
                .await
                .expect("the network read thread does not panic")?
        };
        if let Some(reason) = pod.unfit_for_pool(config.network_mode, config.vfio_passthrough) {
            return Ok(Err(reason));
        }
        let size = sizing::size_for(config, oci);
        let fingerprint = warm_pool::fingerprint(config, size);
        let pool_dir = config.pool_dir();
        let dir = Self::dir_for(config, id);
        let claimed = pool::claim(&pool_dir, &fingerprint, size, &dir).map_err(VmError::fs(
            id,
            "claim a pooled VM as",
            &dir,
        ))?;
        let meta = match claimed {
            Ok(meta) => meta,
            Err(miss) => return Ok(Err(miss.as_str())),
        };
        let timeout = Duration::from_millis(config.pool.adopt_timeout_ms);
        let mut vm = RunningVm::adopt(id, &dir, timeout).await?;
        if let Some(path) = oci.and_then(cgroup::cgroup_path_of) {
            vm.place(&path)?;
        }
        // The host side (the tap moved into the pod, the redirect) and the guest side (the pod's
        // MAC, addresses, routes, hostname) are independent: both at once.
        let guest_network = pod.pooled_guest_config(&meta.mac);
        let attach = async {
            let attach_started = Instant::now();
            let (id, dir) = (id.to_string(), dir.clone());
            let holding = pool_dir.join(warm_pool::NETNS_FILE);
            let attached = tokio::task::spawn_blocking(move || {
                net::attach_pooled(&id, pod, &dir, &holding, &meta.tap, &meta.mac)
            })
            .await
            .expect("the network attach thread does not panic");
            (attached, attach_started.elapsed())
        };
        let ((attached, network_attach), configured) =
            tokio::join!(attach, configure_guest(&vm, id, Some(guest_network), oci));
        let network = attached?;
        vm.record_nics(network.nics)?;
        let network_guest = configured?;
        let timing = BootTiming {
            vm: vm.timing(),
            network_attach,
            network_guest,
            pool: PoolUse::Hit,
        };
        info!(sandbox = %id, adopt_ms = timing.vm.vm_to_agent.as_millis() as u64, "sandbox started in a pooled VM");
        Ok(Ok(Sandbox { vm, timing }))
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
        let prepared = PreparedVm::prepare(&config.vm_config(), id, &dir, Lifetime::Owned).await?;

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

        let network_guest = configure_guest(&vm, id, guest_network, oci).await?;
        let timing = BootTiming {
            vm: vm.timing(),
            network_attach,
            network_guest,
            pool: PoolUse::Off,
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

/// Gives the guest the pod's identity: its network configuration and its hostname (the
/// guest's; its containers share the guest's UTS namespace). Returns how long it took.
async fn configure_guest(
    vm: &RunningVm,
    id: &str,
    network: Option<kite_protocol::agent::NetworkConfig>,
    oci: Option<&oci_spec::runtime::Spec>,
) -> Result<Duration, SandboxError> {
    let started = Instant::now();
    let guest_err = |what| {
        let sandbox = id.to_string();
        move |source| SandboxError::Guest {
            sandbox,
            what,
            source,
        }
    };
    if let Some(network) = network {
        vm.agent()
            .configure_network(rpc_context(Some(CONFIGURE_TIMEOUT)), &network)
            .await
            .map_err(guest_err("configure the pod network in the guest"))?;
    }
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
    Ok(started.elapsed())
}
