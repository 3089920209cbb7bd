//! The phases of a VM: [`PreparedVm`] (directory, share, virtiofsd), then [`RunningVm`] (QEMU
//! up and its guest agent answering). Each phase owns its directory through a guard: a phase
//! dropped on an error path releases everything started so far (processes, cgroup, pod network,
//! mounts, the directory), and [`RunningVm::stop`] does so on purpose.

use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
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
}

impl VmState {
    pub const FILE: &'static str = "vm.json";

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
    guard: DirGuard,
}

impl PreparedVm {
    /// Makes `dir` (with `share/`, a shared mount so that what is mounted into it later reaches
    /// virtiofsd's own mount namespace) and starts virtiofsd on the share.
    pub async fn prepare(config: &VmConfig, id: &str, dir: &Path) -> Result<PreparedVm, VmError> {
        let fs_err = |op, path: &Path| VmError::fs(id, op, path);
        let accelerator = accel::choose_accelerator(config.accelerator)?;
        let share = dir.join("share");
        std::fs::create_dir_all(&share).map_err(fs_err("create", &share))?;
        let guard = DirGuard::new(dir);
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
        let child = virtiofsd::spawn(config, id, &socket, &share, &log)?;
        // Only a child that was waited for has no pid.
        let virtiofsd_pid = child.id().expect("a child just spawned has a pid");
        std::fs::write(dir.join("virtiofsd.pid"), virtiofsd_pid.to_string())
            .map_err(fs_err("record the pid in", &dir.join("virtiofsd.pid")))?;
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
    /// and macvtap entries), its processes placed in the host cgroup `cgroup`, up to the guest
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
        let channel = qemu::choose_channel(self.config.agent_channel, std::process::id())?;
        let agent_socket = dir.join("agent.sock");
        let (channel, listener) = match channel {
            AgentChannel::Serial(_) => {
                let listener = tokio::net::UnixListener::bind(&agent_socket)
                    .map_err(VmError::fs(&id, "listen on", &agent_socket))?;
                (AgentChannel::Serial(agent_socket), Some(listener))
            }
            vsock => (vsock, None),
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
            virtiofs_socket: dir.join("virtiofsd.sock"),
            qmp_socket: dir.join("qmp.sock"),
            console_log: dir.join("console.log"),
            guest_log: dir.join("guest.log"),
            pid_file: dir.join("qemu.pid"),
            free_page_reporting: self.config.free_page_reporting,
            nics: nics.clone(),
            tap_fds: tap_fds.iter().map(AsRawFd::as_raw_fd).collect(),
        };
        let started = Instant::now();
        let mut child = qemu::spawn(&self.config, &spec)?;
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
            cgroup::place(&dir, path, &[qemu_pid, self.virtiofsd_pid]).map_err(|source| {
                VmError::Cgroup {
                    vm: id.clone(),
                    path: path.to_string(),
                    source,
                }
            })?;
        }
        let connected = connect_agent(
            listener,
            &channel,
            vm_exited.clone(),
            self.config.boot_timeout,
            &stderr,
        )
        .await;
        let (agent, ping) = connected.map_err(|cause| VmError::Boot {
            vm: id.clone(),
            console: format!(
                "{}{}",
                tail(&dir.join("console.log"), 800),
                tail(&dir.join("guest.log"), 800)
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
        };
        let state_path = dir.join(VmState::FILE);
        let bytes = serde_json::to_vec(&state).expect("the VM state serializes");
        std::fs::write(&state_path, bytes).map_err(VmError::fs(
            &id,
            "record the VM state in",
            &state_path,
        ))?;
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
        Ok(RunningVm {
            state,
            dir,
            share: self.share,
            timing,
            agent,
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
        for pid in [self.state.qemu_pid, self.state.virtiofsd_pid] {
            kill_if_ours(&self.dir, pid);
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

/// The mark of a VM's processes: their command lines name files in its directory.
fn marker(dir: &Path) -> String {
    format!("{}/", dir.display())
}

/// SIGKILLs `pid` if it is still one of this VM's processes (a pid may have been reused
/// since); whether it was.
fn kill_if_ours(dir: &Path, pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if raw == 0 || !process_mentions(raw, &marker(dir)) {
        return false;
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(raw),
        nix::sys::signal::Signal::SIGKILL,
    );
    true
}

/// SIGKILLs those of `pids` that are still this VM's processes and waits up to 2 s for each
/// to go (blocking: not for async code).
fn kill_vm_processes(dir: &Path, pids: &[u32]) {
    for pid in pids {
        if !kill_if_ours(dir, *pid) {
            continue;
        }
        for _ in 0..200 {
            if !process_mentions(i32::try_from(*pid).unwrap_or(0), &marker(dir)) {
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

/// Waits for QEMU to connect to the agent socket and for the agent's first answer.
/// The guest reads the request once its agent opens the port, so one request with the boot
/// deadline is the whole handshake.
async fn connect_agent(
    listener: Option<tokio::net::UnixListener>,
    channel: &AgentChannel,
    mut exited: watch::Receiver<bool>,
    timeout: Duration,
    qemu_stderr: &Mutex<String>,
) -> Result<(AgentClient, PingResponse), BootFailure> {
    let qemu_exited = || BootFailure::QemuExited {
        stderr: stderr_text(qemu_stderr),
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let client = match (listener, channel) {
        (Some(listener), _) => {
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
        (None, AgentChannel::Vsock(cid)) => {
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
                            cid: *cid,
                            timeout,
                            source,
                        })
                    }
                    Err(_) if *exited.borrow() => return Err(qemu_exited()),
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }
        (None, AgentChannel::Serial(_)) => return Err(BootFailure::NeverConnected),
    };
    let agent = AgentClient::new(client);
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    let ping = PingRequest::new();
    let answer = tokio::select! {
        r = agent.ping(rpc_context(Some(remaining)), &ping) => r,
        _ = exited.wait_for(|e| *e) => return Err(qemu_exited()),
    };
    match answer {
        Ok(info) => Ok((agent, info)),
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

/// Releases everything a VM left in `dir`: kills its QEMU and virtiofsd (found by pid file and
/// checked by command line), removes its host cgroup, releases its pod network
/// (`network.json`), unmounts the share and removes the directory. Safe to call on a directory
/// that is already gone, and after a crash of the process that started the VM.
pub fn cleanup_vm_dir(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let pids: Vec<u32> = ["qemu.pid", "virtiofsd.pid"]
        .iter()
        .filter_map(|file| pid_from(&dir.join(file)))
        .filter_map(|pid| u32::try_from(pid).ok())
        .collect();
    kill_vm_processes(dir, &pids);
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
        };
        std::fs::write(
            dir.path().join(VmState::FILE),
            serde_json::to_vec(&state).unwrap(),
        )
        .unwrap();
        assert_eq!(VmState::load(dir.path()).unwrap(), state);
    }
}
