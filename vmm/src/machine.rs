//! The phases of a VM: [`PreparedVm`] (directory, share, virtiofsd), then [`RunningVm`] (QEMU
//! up and its guest agent answering). Each phase owns its directory through a guard: a phase
//! dropped on an error path releases everything started so far (processes, cgroup, pod network,
//! mounts, the directory), and [`RunningVm::stop`] does so on purpose.

use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kite_protocol::agent::{PingRequest, PingResponse};
use kite_protocol::agent_ttrpc::AgentClient;
use nix::mount::{mount, MsFlags};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::accel::{self, Accelerator};
use crate::config::{MachineType, VmConfig, VmSize};
use crate::net::{self, AttachedNic};
use crate::qemu::{self, AgentChannel, VmSpec};
use crate::{cgroup, mounts, passthrough, qmp, rpc_context, virtiofsd, BootFailure, VmError};

/// How long each stage of a VM's start took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmTiming {
    /// virtiofsd's start, up to its socket.
    pub virtiofsd: Duration,
    /// From QEMU's spawn to the agent's first answer.
    pub vm_to_agent: Duration,
    /// Guest-side: kernel start to agent start, and agent start to serving.
    pub guest_kernel: Duration,
    pub guest_agent: Duration,
}

/// Who a VM belongs to while it runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Lifetime {
    /// The process that starts it (a pod's shim): QEMU and virtiofsd die with it, and QEMU
    /// dials the agent socket it listens on.
    #[default]
    Owned,
    /// A warm pool's VM: it outlives the process that started it (the pool's holder may
    /// restart), and QEMU listens on the agent socket for whoever adopts the VM.
    Pooled,
}

/// What a running VM is, recorded in its directory (`vm.json`) for a later owner: the shim
/// after a restart, or the pod that adopts a pooled VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    pub id: String,
    pub accelerator: Accelerator,
    pub machine: MachineType,
    pub size: VmSize,
    pub channel: AgentChannel,
    pub qemu_pid: u32,
    pub virtiofsd_pid: u32,
    pub nics: Vec<AttachedNic>,
    pub kernel_release: String,
    /// The directory the VM was started in, when it has moved since (a pooled VM adopted by
    /// its pod): its processes' command lines name this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<PathBuf>,
}

impl VmState {
    pub const FILE: &'static str = "vm.json";

    fn save(&self, dir: &Path) -> Result<(), VmError> {
        let path = dir.join(Self::FILE);
        let temporary = dir.join(".vm.json.tmp");
        let bytes = serde_json::to_vec(self).expect("the VM state serializes");
        std::fs::write(&temporary, bytes)
            .and_then(|()| std::fs::rename(&temporary, &path))
            .map_err(VmError::fs(&self.id, "record the VM state in", &path))
    }

    /// Reads the state a running VM recorded in `dir`.
    pub fn load(dir: &Path) -> Result<VmState, std::io::Error> {
        let bytes = std::fs::read(dir.join(Self::FILE))?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }
}

/// Releases a VM's directory (and all it records) when dropped, unless disarmed.
struct DirGuard {
    dir: PathBuf,
    armed: AtomicBool,
}

impl DirGuard {
    fn new(dir: &Path) -> Self {
        DirGuard {
            dir: dir.to_path_buf(),
            armed: AtomicBool::new(true),
        }
    }

    fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if self.armed.load(Ordering::SeqCst) {
            cleanup_vm_dir(&self.dir);
        }
    }
}

/// Phase one: the VM's directory, its share and virtiofsd serving it.
pub struct PreparedVm {
    id: String,
    dir: PathBuf,
    share: PathBuf,
    config: VmConfig,
    accelerator: Accelerator,
    virtiofsd_pid: u32,
    virtiofsd_time: Duration,
    /// Turns true when virtiofsd has exited.
    virtiofsd_exited: watch::Receiver<bool>,
    lifetime: Lifetime,
    guard: DirGuard,
}

impl PreparedVm {
    /// Makes `dir` (with `share/`, a shared mount so that what is mounted into it later reaches
    /// virtiofsd's own mount namespace) and starts virtiofsd on the share.
    pub async fn prepare(
        config: &VmConfig,
        id: &str,
        dir: &Path,
        lifetime: Lifetime,
    ) -> Result<PreparedVm, VmError> {
        let fs_err = |op, path: &Path| VmError::fs(id, op, path);
        let accelerator = accel::choose_accelerator(config.accelerator)?;
        let share = dir.join("share");
        // Guarded before it is made: a full disk can make `dir` and then refuse `share`. (A
        // `dir` that was there already goes too on a failure, as on any later one.)
        let guard = DirGuard::new(dir);
        std::fs::create_dir_all(&share).map_err(fs_err("create", &share))?;
        mount(
            Some(&share),
            &share,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| fs_err("bind-mount", &share)(e.into()))?;
        mount(
            None::<&str>,
            &share,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .map_err(|e| fs_err("make shared", &share)(e.into()))?;

        let started = Instant::now();
        let socket = dir.join("virtiofsd.sock");
        let log = dir.join("virtiofsd.log");
        let owned = lifetime == Lifetime::Owned;
        let mut child = virtiofsd::spawn(config, id, &socket, &share, &log, owned)?;
        // Only a child that was waited for has no pid.
        let virtiofsd_pid = child.id().expect("a child just spawned has a pid");
        let pid_file = dir.join("virtiofsd.pid");
        if let Err(e) = std::fs::write(&pid_file, virtiofsd_pid.to_string()) {
            // Unrecorded, the guard's clean-up could not find it (a pooled VM's virtiofsd is
            // not killed when its handle drops): it goes now.
            let _ = child.start_kill();
            return Err(fs_err("record the pid in", &pid_file)(e));
        }
        let (exited_tx, mut exited) = watch::channel(false);
        spawn_reaper(child, exited_tx);
        while !socket.exists() {
            if *exited.borrow() || started.elapsed() > Duration::from_secs(10) {
                return Err(VmError::NotReady {
                    vm: id.into(),
                    what: "virtiofsd",
                    detail: format!("no socket{}", tail(&log, 600)),
                });
            }
            let _ = tokio::time::timeout(Duration::from_millis(2), exited.changed()).await;
        }
        Ok(PreparedVm {
            id: id.to_string(),
            dir: dir.to_path_buf(),
            share,
            config: config.clone(),
            accelerator,
            virtiofsd_pid,
            virtiofsd_time: started.elapsed(),
            virtiofsd_exited: exited,
            lifetime,
            guard,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The VM's state directory (where [`net::attach`] records the pod network).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Phase two: QEMU with `nics` (the tap descriptors in `tap_fds`, in the order of the tap
    /// and macvtap entries), its processes placed in the host cgroup `cgroup` (a pooled VM's:
    /// the pool's, joined but not recorded as the VM's), up to the guest
    /// agent's first answer within the boot timeout. On failure everything is released.
    pub async fn start(
        self,
        size: VmSize,
        nics: Vec<AttachedNic>,
        tap_fds: Vec<OwnedFd>,
        cgroup: Option<&str>,
    ) -> Result<RunningVm, VmError> {
        let id = self.id.clone();
        let dir = self.dir.clone();
        let pooled = self.lifetime == Lifetime::Pooled;
        // A vsock CID must be unique on the host: a shim's pid is, while the shim lives; a
        // pooled VM outlives the holder's pid, so it draws one from a range of its own.
        let cid_base = if pooled {
            POOLED_CID_BASE + random_u32() % POOLED_CID_RANGE
        } else {
            std::process::id()
        };
        let channel = qemu::choose_channel(self.config.agent_channel, cid_base)?;
        let agent_socket = dir.join("agent.sock");
        let (channel, endpoint) = match channel {
            AgentChannel::Serial(_) if pooled => (
                AgentChannel::Serial(agent_socket.clone()),
                AgentEndpoint::Dial(agent_socket),
            ),
            AgentChannel::Serial(_) => {
                let listener = tokio::net::UnixListener::bind(&agent_socket)
                    .map_err(VmError::fs(&id, "listen on", &agent_socket))?;
                (
                    AgentChannel::Serial(agent_socket),
                    AgentEndpoint::Accept(listener),
                )
            }
            AgentChannel::Vsock(cid) => (AgentChannel::Vsock(cid), AgentEndpoint::Vsock(cid)),
        };
        let spec = VmSpec {
            vm_id: id.clone(),
            accelerator: self.accelerator,
            machine: self.config.machine,
            vcpus: size.vcpus,
            memory_mib: size.memory_mib,
            kernel: self.config.kernel_path.clone(),
            initrd: self.config.initrd_path.clone(),
            kernel_params: self.config.kernel_params.clone(),
            tsc_khz: accel::host_tsc_khz(
                &std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
            ),
            qemu_sandbox: self.config.qemu_sandbox,
            channel: channel.clone(),
            agent_listens: pooled,
            virtiofs_socket: dir.join("virtiofsd.sock"),
            qmp_socket: dir.join("qmp.sock"),
            console_log: dir.join("console.log"),
            pid_file: dir.join("qemu.pid"),
            free_page_reporting: self.config.free_page_reporting,
            nics: nics.clone(),
            tap_fds: tap_fds.iter().map(AsRawFd::as_raw_fd).collect(),
        };
        let started = Instant::now();
        let mut child = qemu::spawn(&self.config, &spec, !pooled)?;
        // QEMU holds the taps now; they go when it goes.
        drop(tap_fds);
        let qemu_pid = child.id().expect("a child just spawned has a pid");
        // QEMU writes its pid file itself, but only once it runs: until then a failure (the
        // cgroup below) must still find the pid to kill.
        let pid_file = dir.join("qemu.pid");
        if let Err(e) = std::fs::write(&pid_file, qemu_pid.to_string()) {
            kill_vm_processes(&dir, &[qemu_pid]);
            return Err(VmError::fs(&id, "record the pid in", &pid_file)(e));
        }
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(pipe) = child.stderr.take() {
            tokio::spawn(keep_stderr_tail(pipe, stderr.clone(), id.clone()));
        }
        let (exited_tx, vm_exited) = watch::channel(false);
        spawn_reaper(child, exited_tx);
        if let Some(path) = cgroup {
            let pids = [qemu_pid, self.virtiofsd_pid];
            // A pooled VM's cgroup is the pool's, shared by its VMs: joined, not recorded (its
            // release must not remove it). What the VM touches until a pod adopts it is
            // charged there (see `RunningVm::place`).
            let placed = if pooled {
                cgroup::join(path, &pids)
            } else {
                cgroup::place(&dir, path, &pids)
            };
            placed.map_err(|source| VmError::Cgroup {
                vm: id.clone(),
                path: path.to_string(),
                source,
            })?;
        }
        let connected = connect_agent(
            endpoint,
            vm_exited.clone(),
            self.config.boot_timeout,
            &stderr,
        )
        .await;
        let (agent, ping, connection) = connected.map_err(|cause| VmError::Boot {
            vm: id.clone(),
            // A pooled QEMU's stderr goes to qemu.log (no pipe outlives the holder).
            console: format!(
                "{}{}",
                tail(&dir.join("console.log"), 1200),
                tail(&dir.join("qemu.log"), 800)
            ),
            cause: Box::new(cause),
        })?;
        let timing = VmTiming {
            virtiofsd: self.virtiofsd_time,
            vm_to_agent: started.elapsed(),
            guest_kernel: Duration::from_nanos(ping.agent_started_ns),
            guest_agent: Duration::from_nanos(
                ping.agent_ready_ns.saturating_sub(ping.agent_started_ns),
            ),
        };
        let state = VmState {
            id: id.clone(),
            accelerator: self.accelerator,
            machine: self.config.machine,
            size,
            channel,
            qemu_pid,
            virtiofsd_pid: self.virtiofsd_pid,
            nics,
            kernel_release: ping.kernel_release.clone(),
            // A pooled VM's directory moves when a pod claims it; its processes keep naming
            // this one.
            origin: pooled.then(|| dir.clone()),
        };
        state.save(&dir)?;
        info!(
            sandbox = %id,
            accel = self.accelerator.name(),
            vcpus = size.vcpus,
            memory_mib = size.memory_mib,
            kernel = %ping.kernel_release,
            virtiofsd_ms = millis(timing.virtiofsd),
            vm_to_agent_ms = millis(timing.vm_to_agent),
            "VM booted"
        );
        end_vm_with_virtiofsd(
            id.clone(),
            dir.clone(),
            qemu_pid,
            self.virtiofsd_exited,
            vm_exited.clone(),
        );
        Ok(RunningVm {
            state,
            dir,
            share: self.share,
            timing,
            agent,
            connection,
            vm_exited,
            guard: self.guard,
        })
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Phase three: a VM whose guest agent answers.
pub struct RunningVm {
    state: VmState,
    dir: PathBuf,
    share: PathBuf,
    timing: VmTiming,
    agent: AgentClient,
    /// The agent connection's socket, when this process dialled it (a pooled VM).
    connection: Option<OwnedFd>,
    vm_exited: watch::Receiver<bool>,
    guard: DirGuard,
}

impl RunningVm {
    pub fn id(&self) -> &str {
        &self.state.id
    }

    pub fn state(&self) -> &VmState {
        &self.state
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What virtio-fs exports to the guest (as [`kite_protocol::SHARE_TAG`]).
    pub fn share(&self) -> &Path {
        &self.share
    }

    pub fn timing(&self) -> VmTiming {
        self.timing
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.state.qemu_pid
    }

    /// Adopts the pooled VM that was moved to `dir` (its state, `vm.json`, says where it was
    /// started): checks that its QEMU and virtiofsd still run, watches QEMU's exit, connects to
    /// its agent and takes its first answer within `timeout`, and records the VM as `id`'s.
    /// On failure everything in `dir` is released.
    pub async fn adopt(id: &str, dir: &Path, timeout: Duration) -> Result<RunningVm, VmError> {
        let started = Instant::now();
        let guard = DirGuard::new(dir);
        let mut state = VmState::load(dir).map_err(VmError::fs(id, "read the VM state in", dir))?;
        let origin = trusted_origin(state.origin.clone(), dir);
        let gone = |what: &'static str, detail: String| VmError::NotReady {
            vm: id.to_string(),
            what,
            detail,
        };
        // Both pidfds first, then the command lines: a pidfd names one process for good, so
        // once the check passes the watch is of the VM's processes, even if a pid is reused.
        let vm_exited = watch_exit(state.qemu_pid).map_err(|e| {
            gone(
                "the pooled VM",
                format!("QEMU (pid {}): {e}", state.qemu_pid),
            )
        })?;
        let virtiofsd_exited = watch_exit(state.virtiofsd_pid).map_err(|e| {
            gone(
                "the pooled VM",
                format!("virtiofsd (pid {}): {e}", state.virtiofsd_pid),
            )
        })?;
        for (what, pid) in [("QEMU", state.qemu_pid), ("virtiofsd", state.virtiofsd_pid)] {
            let raw = i32::try_from(pid).unwrap_or(0);
            if !process_mentions(raw, &marker(&origin)) {
                return Err(gone("the pooled VM", format!("{what} (pid {pid}) is gone")));
            }
        }
        end_vm_with_virtiofsd(
            id.to_string(),
            origin.clone(),
            state.qemu_pid,
            virtiofsd_exited,
            vm_exited.clone(),
        );
        let endpoint = match &state.channel {
            AgentChannel::Serial(_) => AgentEndpoint::Dial(dir.join("agent.sock")),
            AgentChannel::Vsock(cid) => AgentEndpoint::Vsock(*cid),
        };
        let none = Mutex::new(String::new());
        let (agent, ping, connection) = connect_agent(endpoint, vm_exited.clone(), timeout, &none)
            .await
            .map_err(|cause| VmError::Boot {
                vm: id.to_string(),
                console: tail(&dir.join("console.log"), 1200),
                cause: Box::new(cause),
            })?;
        if let AgentChannel::Serial(path) = &mut state.channel {
            *path = dir.join("agent.sock");
        }
        state.id = id.to_string();
        state.origin = Some(origin);
        state.kernel_release = ping.kernel_release;
        state.save(dir)?;
        let timing = VmTiming {
            vm_to_agent: started.elapsed(),
            ..VmTiming::default()
        };
        info!(sandbox = %id, adopt_ms = millis(timing.vm_to_agent), "pooled VM adopted");
        Ok(RunningVm {
            state,
            dir: dir.to_path_buf(),
            share: dir.join("share"),
            timing,
            agent,
            connection,
            vm_exited,
            guard,
        })
    }

    /// Hands a VM booted with [`Lifetime::Pooled`] over to the pool: its agent connection
    /// closes (QEMU listens again for the adopter) and nothing is released when it goes;
    /// returns its directory.
    pub fn into_pool(self) -> PathBuf {
        self.guard.disarm();
        // The ttrpc client's tasks may hold the socket a while after the client is dropped;
        // QEMU serves one connection at a time, so the adopter would wait for that.
        if let Some(fd) = &self.connection {
            let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        self.dir.clone()
    }

    /// Moves the VM's processes into the host cgroup `path` (recorded in its directory): an
    /// adopted VM into its pod's. What the VM allocates from then on is charged there; the
    /// memory it touched before stays charged to the cgroup it was touched in (the pool's):
    /// cgroup v2 never moves charges, and v1's `memory.move_charge_at_immigrate` is gone from
    /// current kernels (6.18 refuses it).
    pub fn place(&self, path: &str) -> Result<(), VmError> {
        cgroup::place(
            &self.dir,
            path,
            &[self.state.qemu_pid, self.state.virtiofsd_pid],
        )
        .map_err(|source| VmError::Cgroup {
            vm: self.state.id.clone(),
            path: path.to_string(),
            source,
        })
    }

    /// Records the NICs the VM's pod attached (after an adoption).
    pub fn record_nics(&mut self, nics: Vec<AttachedNic>) -> Result<(), VmError> {
        self.state.nics = nics;
        self.state.save(&self.dir)
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// Resolves when QEMU has exited.
    pub async fn exited(&self) {
        let mut rx = self.vm_exited.clone();
        let _ = rx.wait_for(|e| *e).await;
    }

    pub fn is_running(&self) -> bool {
        !*self.vm_exited.borrow()
    }

    /// Stops the VM (QMP quit, then SIGKILL) and virtiofsd, and releases everything its
    /// directory records (cgroup, pod network, mounts) and the directory.
    pub async fn stop(&self) {
        if self.is_running() {
            let socket = self.dir.join("qmp.sock");
            if let Err(e) = qmp::execute(&socket, "quit", Duration::from_secs(2)).await {
                warn!(sandbox = %self.id(), error = %kite_protocol::errors::error_chain(&e), "QMP quit");
            }
        }
        let mut exited = self.vm_exited.clone();
        if tokio::time::timeout(Duration::from_secs(3), exited.wait_for(|e| *e))
            .await
            .is_err()
        {
            warn!(sandbox = %self.id(), "QEMU did not quit: killing it");
        }
        let origin = self.state.origin.as_deref().unwrap_or(&self.dir);
        for pid in [self.state.qemu_pid, self.state.virtiofsd_pid] {
            kill_if_ours(origin, pid);
        }
        let _ = tokio::time::timeout(Duration::from_secs(3), exited.wait_for(|e| *e)).await;
        // The blocking clean-up runs to its end even if this call is cancelled: the guard's
        // second one is not needed.
        self.guard.disarm();
        let dir = self.dir.clone();
        let _ = tokio::task::spawn_blocking(move || cleanup_vm_dir(&dir)).await;
        info!(sandbox = %self.id(), "VM stopped");
    }
}

/// The mark of a VM's processes: their command lines name files in the directory it was
/// started in.
fn marker(origin: &Path) -> String {
    format!("{}/", origin.display())
}

/// Where the VM in `dir` was started (see [`VmState::origin`]).
fn origin_of(dir: &Path) -> PathBuf {
    trusted_origin(VmState::load(dir).ok().and_then(|s| s.origin), dir)
}

/// A recorded origin if it has the shape of a pool's VM directory (`<dir>/.<pool>/<vm>`),
/// else `dir`: the origin names the processes to kill, so a short or odd path (`/`, which
/// every command line mentions) must never become the marker.
fn trusted_origin(origin: Option<PathBuf>, dir: &Path) -> PathBuf {
    origin
        .filter(|o| {
            let pool = o.parent().and_then(Path::file_name);
            o.is_absolute()
                && o.file_name().is_some_and(|n| !n.is_empty())
                && pool.is_some_and(|p| p.to_string_lossy().starts_with('.'))
                && o.components().count() >= 4
        })
        .unwrap_or_else(|| dir.to_path_buf())
}

/// SIGKILLs `pid` if it is still one of the processes of the VM started in `origin` (a pid may
/// have been reused since); whether it was.
fn kill_if_ours(origin: &Path, pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if raw == 0 || !process_mentions(raw, &marker(origin)) {
        return false;
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(raw),
        nix::sys::signal::Signal::SIGKILL,
    );
    true
}

/// SIGKILLs those of `pids` that are still processes of the VM started in `origin` and waits
/// up to 2 s for each to go (blocking: not for async code).
fn kill_vm_processes(origin: &Path, pids: &[u32]) {
    for pid in pids {
        if !kill_if_ours(origin, *pid) {
            continue;
        }
        for _ in 0..200 {
            if !process_mentions(i32::try_from(*pid).unwrap_or(0), &marker(origin)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The last `max` bytes of a log file, as `; PATH: …TEXT` (empty when there is nothing).
fn tail(path: &Path, max: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let text = text.trim();
    if text.is_empty() {
        return String::new();
    }
    let start = text.len().saturating_sub(max);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    format!("; {}: …{}", path.display(), &text[start..])
}

/// Logs QEMU's stderr and keeps its last 4 KiB (the reason when it exits at boot).
async fn keep_stderr_tail(
    mut pipe: tokio::process::ChildStderr,
    sink: Arc<Mutex<String>>,
    vm: String,
) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = pipe.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        warn!(sandbox = %vm, "qemu: {}", text.trim_end());
        let mut kept = sink.lock().expect("qemu stderr lock");
        kept.push_str(&text);
        let excess = kept.len().saturating_sub(4096);
        if excess > 0 {
            let cut = (excess..kept.len())
                .find(|i| kept.is_char_boundary(*i))
                .unwrap_or(0);
            kept.drain(..cut);
        }
    }
}

fn stderr_text(buf: &Mutex<String>) -> String {
    let text = buf.lock().map(|s| s.trim().to_string()).unwrap_or_default();
    if text.is_empty() {
        "(no message)".into()
    } else {
        text
    }
}

/// How the agent channel is reached.
enum AgentEndpoint {
    /// QEMU dials this listener (a VM its starter owns).
    Accept(tokio::net::UnixListener),
    /// QEMU listens on this socket (a pooled VM).
    Dial(PathBuf),
    Vsock(u32),
}

/// Connects the agent channel and waits for the agent's first answer. The guest reads the
/// request once its agent opens the port, so one request with the boot deadline is the whole
/// handshake.
async fn connect_agent(
    endpoint: AgentEndpoint,
    mut exited: watch::Receiver<bool>,
    timeout: Duration,
    qemu_stderr: &Mutex<String>,
) -> Result<(AgentClient, PingResponse, Option<OwnedFd>), BootFailure> {
    let qemu_exited = || BootFailure::QemuExited {
        stderr: stderr_text(qemu_stderr),
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut connection = None;
    let client = match endpoint {
        AgentEndpoint::Accept(listener) => {
            let stream = tokio::select! {
                accepted = listener.accept() => accepted.map(|(s, _)| s).map_err(BootFailure::Socket)?,
                _ = exited.wait_for(|e| *e) => return Err(qemu_exited()),
                _ = tokio::time::sleep_until(deadline) => return Err(BootFailure::NeverConnected),
            };
            let fd = stream
                .into_std()
                .map_err(BootFailure::Socket)?
                .into_raw_fd();
            ttrpc::r#async::Client::new(fd)
        }
        AgentEndpoint::Dial(path) => {
            // QEMU makes the socket once it runs; until then, and while someone else is
            // connected (QEMU serves one at a time), connecting is retried.
            let stream: tokio::net::UnixStream = loop {
                match tokio::net::UnixStream::connect(&path).await {
                    Ok(stream) => break stream,
                    Err(_) if *exited.borrow() => return Err(qemu_exited()),
                    Err(_) if tokio::time::Instant::now() >= deadline => {
                        return Err(BootFailure::NeverConnected)
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            };
            let stream = stream.into_std().map_err(BootFailure::Socket)?;
            // Kept to end the connection on purpose (see `RunningVm::into_pool`).
            connection = Some(
                stream
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(BootFailure::Socket)?,
            );
            ttrpc::r#async::Client::new(stream.into_raw_fd())
        }
        AgentEndpoint::Vsock(cid) => {
            // The guest listens once its agent runs: retry until then.
            let addr = format!("vsock://{cid}:{}", kite_protocol::VSOCK_PORT);
            loop {
                let attempt = addr.clone();
                let connected =
                    tokio::task::spawn_blocking(move || ttrpc::r#async::Client::connect(&attempt))
                        .await
                        .map_err(|e| BootFailure::Socket(std::io::Error::other(e)))?;
                match connected {
                    Ok(client) => break client,
                    Err(source) if tokio::time::Instant::now() >= deadline => {
                        return Err(BootFailure::NoVsockAgent {
                            cid,
                            timeout,
                            source,
                        })
                    }
                    Err(_) if *exited.borrow() => return Err(qemu_exited()),
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }
    };
    let agent = AgentClient::new(client);
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    let ping = PingRequest::new();
    let answer = tokio::select! {
        r = agent.ping(rpc_context(Some(remaining)), &ping) => r,
        _ = exited.wait_for(|e| *e) => return Err(qemu_exited()),
    };
    match answer {
        Ok(info) => Ok((agent, info, connection)),
        Err(e) => {
            // A connection that breaks usually means QEMU is going: say why it went.
            let gone = tokio::time::timeout(Duration::from_secs(1), exited.wait_for(|e| *e)).await;
            if gone.is_ok() {
                Err(qemu_exited())
            } else if tokio::time::Instant::now() >= deadline {
                Err(BootFailure::NoAnswer(timeout))
            } else {
                Err(BootFailure::Agent(e))
            }
        }
    }
}

/// Waits for a child and reports its exit on the channel.
fn spawn_reaper(mut child: tokio::process::Child, tx: watch::Sender<bool>) {
    tokio::spawn(async move {
        let _ = child.wait().await;
        tx.send_replace(true);
    });
}

/// Watches `pid` (not a child of this process: a pooled VM's QEMU) through a pidfd: the
/// channel turns true when it exits.
fn watch_exit(pid: u32) -> std::io::Result<watch::Receiver<bool>> {
    let raw = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: pidfd_open(2) takes a pid and flags, touches no memory of ours, and returns a new
    // descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: `fd` was just returned by pidfd_open and nothing else owns it.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: the AsyncFd takes the OwnedFd over; nothing else holds or closes the descriptor
    // while it is registered.
    let fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        // A pidfd turns readable when its process exits.
        let _ = fd.readable().await;
        tx.send_replace(true);
    });
    Ok(rx)
}

/// virtiofsd serves the VM's filesystems: when it ends while QEMU runs, every file access of
/// the guest hangs for good (its containers cannot even be killed), so the VM ends with it and
/// its owner sees QEMU's exit, as for any death of the VM. (When the VM is being stopped,
/// virtiofsd ends as QEMU lets go of it, a moment before QEMU: hence the grace.)
fn end_vm_with_virtiofsd(
    id: String,
    origin: PathBuf,
    qemu_pid: u32,
    mut virtiofsd_exited: watch::Receiver<bool>,
    mut vm_exited: watch::Receiver<bool>,
) {
    const GRACE: Duration = Duration::from_secs(3);
    tokio::spawn(async move {
        let ended = tokio::select! {
            _ = vm_exited.wait_for(|e| *e) => return,
            ended = virtiofsd_exited.wait_for(|e| *e) => ended.is_ok(),
        };
        if !ended {
            return;
        }
        if tokio::time::timeout(GRACE, vm_exited.wait_for(|e| *e))
            .await
            .is_err()
        {
            warn!(sandbox = %id, "virtiofsd exited: the VM lost its filesystems; ending it");
            kill_if_ours(&origin, qemu_pid);
        }
    });
}

/// CIDs of pooled VMs (on hosts with vhost-vsock): above any `1000 + pid`.
const POOLED_CID_BASE: u32 = 0x4000_0000;
const POOLED_CID_RANGE: u32 = 0x3000_0000;

/// A random number from the kernel (for names, MACs and CIDs, not for keys).
pub(crate) fn random_u32() -> u32 {
    use std::io::Read;
    let mut bytes = [0u8; 4];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        // Not reached on a Linux host; the time still differs between calls.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return now.subsec_nanos() ^ std::process::id();
    }
    u32::from_ne_bytes(bytes)
}

fn pid_from(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether `pid` is a process whose command line mentions `marker` (so a recycled pid is never
/// killed by mistake).
fn process_mentions(pid: i32, marker: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(marker))
        .unwrap_or(false)
}

/// Whether the QEMU and virtiofsd of the VM in `dir` both still run (by pid file, checked by
/// command line).
pub fn processes_alive(dir: &Path) -> bool {
    let origin = origin_of(dir);
    ["qemu.pid", "virtiofsd.pid"].iter().all(|file| {
        pid_from(&dir.join(file)).is_some_and(|pid| process_mentions(pid, &marker(&origin)))
    })
}

/// Releases everything a VM left in `dir`: kills its QEMU and virtiofsd (found by pid file and
/// checked by command line), removes its host cgroup, releases its pod network
/// (`network.json`), unmounts the share and removes the directory. Safe to call on a directory
/// that is already gone, and after a crash of the process that started the VM.
pub fn cleanup_vm_dir(dir: &Path) {
    cleanup_moved_vm_dir(dir, &origin_of(dir));
}

/// [`cleanup_vm_dir`] for a VM whose processes were started in `origin`, when its directory
/// has moved since and its state may not say so (a pooled VM retired before it had finished
/// booting: no `vm.json` yet).
pub fn cleanup_moved_vm_dir(dir: &Path, origin: &Path) {
    if !dir.exists() {
        return;
    }
    let pids: Vec<u32> = ["qemu.pid", "virtiofsd.pid"]
        .iter()
        .filter_map(|file| pid_from(&dir.join(file)))
        .filter_map(|pid| u32::try_from(pid).ok())
        .collect();
    kill_vm_processes(origin, &pids);
    cgroup::remove(dir);
    // With QEMU gone its taps are gone; what it leaves in the pod's namespace goes now.
    net::release(dir, Path::new(passthrough::SYSFS));
    mounts::unmount_under(&dir.join("share"));
    if let Err(e) = std::fs::remove_dir_all(dir) {
        warn!(dir = %dir.display(), error = %e, "remove the VM's state");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("console.log");
        std::fs::write(&f, "a".repeat(100) + "END").unwrap();
        let t = tail(&f, 10);
        assert!(t.ends_with("aaaaaaaEND"), "{t}");
        assert_eq!(tail(&dir.path().join("none"), 10), "");
    }

    #[test]
    fn a_guard_releases_its_directory_unless_disarmed() {
        let root = tempfile::tempdir().unwrap();
        let kept = root.path().join("kept");
        let released = root.path().join("released");
        for d in [&kept, &released] {
            std::fs::create_dir_all(d.join("share")).unwrap();
        }
        let guard = DirGuard::new(&kept);
        guard.disarm();
        drop(guard);
        drop(DirGuard::new(&released));
        assert!(kept.exists());
        assert!(!released.exists());
    }

    #[tokio::test]
    async fn a_vm_directory_made_before_a_failure_is_removed() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("vm1");
        // `share` cannot be made (a file is in its way), as on a full disk after `dir` was.
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("share"), "").unwrap();
        let config = VmConfig {
            qemu_path: "/nonexistent/qemu".into(),
            virtiofsd_path: "/nonexistent/virtiofsd".into(),
            kernel_path: "/nonexistent/vmlinuz".into(),
            initrd_path: "/nonexistent/initrd".into(),
            accelerator: crate::config::AcceleratorChoice::Tcg,
            machine: MachineType::Microvm,
            agent_channel: Default::default(),
            kernel_params: String::new(),
            qemu_sandbox: false,
            free_page_reporting: false,
            boot_timeout: Duration::from_secs(1),
        };
        let Err(e) = PreparedVm::prepare(&config, "vm1", &dir, Lifetime::Owned).await else {
            panic!("prepare should fail")
        };
        assert!(e.to_string().contains("vm1"), "{e}");
        assert!(!dir.exists(), "the VM's directory is left behind");
    }

    #[test]
    fn the_state_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let state = VmState {
            id: "vm1".into(),
            accelerator: Accelerator::Tcg,
            machine: MachineType::Microvm,
            size: VmSize {
                vcpus: 1,
                memory_mib: 256,
            },
            channel: AgentChannel::Serial(dir.path().join("agent.sock")),
            qemu_pid: 10,
            virtiofsd_pid: 11,
            nics: Vec::new(),
            kernel_release: "6.1.0".into(),
            origin: Some("/run/kite/sandboxes/.pool/ab12".into()),
        };
        std::fs::write(
            dir.path().join(VmState::FILE),
            serde_json::to_vec(&state).unwrap(),
        )
        .unwrap();
        assert_eq!(VmState::load(dir.path()).unwrap(), state);
        assert_eq!(
            origin_of(dir.path()),
            Path::new("/run/kite/sandboxes/.pool/ab12")
        );
    }

    #[test]
    fn only_a_pool_shaped_origin_is_trusted() {
        let dir = Path::new("/run/kite/sandboxes/sb1");
        for odd in [
            "/",
            "/run",
            "relative/.pool/ab12",
            "/run/.pool/..",
            "/run/kite/pool/ab12",
        ] {
            assert_eq!(trusted_origin(Some(odd.into()), dir), dir, "{odd}");
        }
        assert_eq!(trusted_origin(None, dir), dir);
        let pooled = Path::new("/run/kite/sandboxes/.pool/ab12");
        assert_eq!(trusted_origin(Some(pooled.into()), dir), pooled);
    }
}
