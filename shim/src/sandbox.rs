//! A sandbox: one microVM with its virtiofsd, its share and its agent connection. A pod's
//! containers all run in its sandbox; a plain container (`ctr run`) is a sandbox of its own.
//!
//! State lives in `<state_dir>/<sandbox id>/`: `share/` (what virtio-fs exports: one
//! sub-directory per container with its rootfs and bind mounts), the sockets, the pid files and
//! the logs. Everything there is released by [`Sandbox::shutdown`], or by
//! [`cleanup_sandbox_dir`] after a crash.

use std::os::fd::{AsRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kite_protocol::agent::PingRequest;
use kite_protocol::agent_ttrpc::AgentClient;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::ShimConfig;
use crate::network;
use crate::qmp;

/// Where sysfs is (PCI functions passed through are bound there).
const SYSFS: &str = "/sys";
use crate::vm::{self, Accelerator, AgentChannel, VmError, VmSpec};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    #[error("sandbox {sandbox}: {op} {path}: {source}")]
    Fs {
        sandbox: String,
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sandbox {sandbox}: host cgroup {path}: {reason}")]
    Cgroup {
        sandbox: String,
        path: String,
        reason: String,
    },
    #[error("sandbox {sandbox}: the VM did not boot: {reason}{console}")]
    Boot {
        sandbox: String,
        reason: String,
        console: String,
    },
}

/// How long each stage of a sandbox's start took.
#[derive(Clone, Copy, Debug, Default)]
pub struct BootTiming {
    pub virtiofsd: Duration,
    /// From QEMU's spawn to the agent's first answer.
    pub vm_to_agent: Duration,
    /// Guest-side: kernel start to agent start, and agent start to serving.
    pub guest_kernel: Duration,
    pub guest_agent: Duration,
    /// The pod's network: attaching it on the host, and configuring it in the guest.
    pub network_attach: Duration,
    pub network_guest: Duration,
}

pub struct Sandbox {
    pub id: String,
    pub dir: PathBuf,
    pub share: PathBuf,
    pub accelerator: Accelerator,
    pub kernel_release: String,
    pub timing: BootTiming,
    agent: AgentClient,
    qemu_pid: Option<u32>,
    virtiofsd_pid: Option<u32>,
    vm_exited: watch::Receiver<bool>,
}

/// A ttrpc context with a deadline (`None`: wait as long as it takes).
pub fn ctx(timeout: Option<Duration>) -> ttrpc::context::Context {
    match timeout {
        Some(t) => ttrpc::context::with_timeout(t.as_nanos() as i64),
        None => ttrpc::context::Context::default(),
    }
}

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

impl Sandbox {
    pub fn dir_for(config: &ShimConfig, id: &str) -> PathBuf {
        config.state_dir.join(id)
    }

    /// Starts virtiofsd and the VM and waits for the guest agent. On any failure everything
    /// started so far is released before the error is returned.
    /// `netns` is the pod's network namespace: its interfaces are attached to the VM.
    pub async fn boot(
        config: &ShimConfig,
        id: &str,
        oci: Option<&oci_spec::runtime::Spec>,
        netns: Option<&Path>,
    ) -> Result<Sandbox, SandboxError> {
        let dir = Self::dir_for(config, id);
        let result = Self::boot_in(config, id, &dir, oci, netns).await;
        if result.is_err() {
            cleanup_sandbox_dir(&dir);
        }
        result
    }

    async fn boot_in(
        config: &ShimConfig,
        id: &str,
        dir: &Path,
        oci: Option<&oci_spec::runtime::Spec>,
        netns: Option<&Path>,
    ) -> Result<Sandbox, SandboxError> {
        let fs_err = |op, path: &Path| {
            let sandbox = id.to_string();
            let path = path.to_path_buf();
            move |source| SandboxError::Fs {
                sandbox,
                op,
                path,
                source,
            }
        };
        let accelerator = vm::choose_accelerator(config.accelerator)?;
        let share = dir.join("share");
        std::fs::create_dir_all(&share).map_err(fs_err("create", &share))?;
        // The share is a shared mount so that container rootfs mounted into it later propagate
        // into virtiofsd's own mount namespace.
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
        let vfs_socket = dir.join("virtiofsd.sock");
        let virtiofsd =
            vm::spawn_virtiofsd(config, id, &vfs_socket, &share, &dir.join("virtiofsd.log"))?;
        let virtiofsd_pid = virtiofsd.id();
        if let Some(pid) = virtiofsd_pid {
            let _ = std::fs::write(dir.join("virtiofsd.pid"), pid.to_string());
        }
        let (vfs_tx, mut vfs_exited) = watch::channel(false);
        spawn_reaper(virtiofsd, vfs_tx);
        while !vfs_socket.exists() {
            if *vfs_exited.borrow() || started.elapsed() > Duration::from_secs(10) {
                return Err(VmError::NotReady {
                    sandbox: id.into(),
                    what: "virtiofsd",
                    reason: format!("no socket{}", tail(&dir.join("virtiofsd.log"), 600)),
                }
                .into());
            }
            let _ = tokio::time::timeout(Duration::from_millis(2), vfs_exited.changed()).await;
        }
        let virtiofsd_time = started.elapsed();

        let attach_started = Instant::now();
        let network = match netns {
            Some(ns) => {
                let (id, ns, dir) = (id.to_string(), ns.to_path_buf(), dir.to_path_buf());
                let (mode, passthrough) = (config.network_mode, config.vfio_passthrough);
                Some(
                    tokio::task::spawn_blocking(move || {
                        network::attach(&id, &ns, &dir, mode, passthrough, Path::new(SYSFS))
                    })
                    .await
                    .expect("network attach thread")?,
                )
            }
            None => None,
        };
        let network_attach = attach_started.elapsed();
        let (nics, tap_fds, guest_network) = match network {
            Some(n) => (n.nics, n.tap_fds, Some(n.guest)),
            None => (Vec::new(), Vec::new(), None),
        };

        let channel = vm::choose_channel(config.agent_channel, std::process::id())?;
        let agent_socket = dir.join("agent.sock");
        let listener = match &channel {
            AgentChannel::Serial(_) => Some(
                tokio::net::UnixListener::bind(&agent_socket)
                    .map_err(fs_err("listen on", &agent_socket))?,
            ),
            AgentChannel::Vsock(_) => None,
        };
        let channel = match channel {
            AgentChannel::Serial(_) => AgentChannel::Serial(agent_socket.clone()),
            vsock => vsock,
        };
        let (vcpus, memory_mib) = vm::size_for(config, oci);
        let spec = VmSpec {
            sandbox_id: id.to_string(),
            accelerator,
            machine: config.machine,
            vcpus,
            memory_mib,
            kernel: config.kernel_path.clone(),
            initrd: config.initrd_path.clone(),
            kernel_params: config.kernel_params.clone(),
            tsc_khz: vm::host_tsc_khz(
                &std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
            ),
            qemu_sandbox: config.qemu_sandbox,
            channel: channel.clone(),
            virtiofs_socket: vfs_socket,
            qmp_socket: dir.join("qmp.sock"),
            console_log: dir.join("console.log"),
            guest_log: dir.join("guest.log"),
            pid_file: dir.join("qemu.pid"),
            free_page_reporting: config.free_page_reporting,
            nics,
            tap_fds: tap_fds.iter().map(|f| f.as_raw_fd()).collect(),
        };
        let vm_started = Instant::now();
        let mut qemu = vm::spawn_qemu(config, &spec)?;
        // QEMU holds the taps now; they go when it goes.
        drop(tap_fds);
        let qemu_pid = qemu.id();
        let qemu_stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut stderr) = qemu.stderr.take() {
            let sink = qemu_stderr.clone();
            let sandbox = id.to_string();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stderr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    warn!(sandbox = %sandbox, "qemu: {}", text.trim_end());
                    let mut s = sink.lock().expect("qemu stderr lock");
                    s.push_str(&text);
                    let excess = s.len().saturating_sub(4096);
                    if excess > 0 {
                        let cut = (excess..s.len())
                            .find(|i| s.is_char_boundary(*i))
                            .unwrap_or(0);
                        s.drain(..cut);
                    }
                }
            });
        }
        let (vm_tx, vm_exited) = watch::channel(false);
        spawn_reaper(qemu, vm_tx);
        if let Some(path) = oci.and_then(host_cgroup_path) {
            let pids = [qemu_pid, virtiofsd_pid];
            if let Err(e) = place_in_cgroup(dir, &path, &pids) {
                kill_pids(&pids);
                return Err(SandboxError::Cgroup {
                    sandbox: id.to_string(),
                    path,
                    reason: e,
                });
            }
        }

        let kill_all = || kill_pids(&[qemu_pid, virtiofsd_pid]);
        let connected = connect_agent(
            listener,
            &channel,
            vm_exited.clone(),
            config.boot_timeout(),
            &qemu_stderr,
        )
        .await;
        let (agent, info) = match connected {
            Ok(v) => v,
            Err(reason) => {
                kill_all();
                return Err(SandboxError::Boot {
                    sandbox: id.to_string(),
                    reason,
                    console: format!(
                        "{}{}",
                        tail(&dir.join("console.log"), 800),
                        tail(&dir.join("guest.log"), 800)
                    ),
                });
            }
        };
        let vm_to_agent = vm_started.elapsed();
        // The guest's hostname is the pod's (its containers share the guest's UTS namespace).
        let hostname = oci
            .and_then(|s| s.hostname().clone())
            .filter(|h| !h.is_empty());
        let configured = async {
            if let Some(net) = guest_network {
                agent
                    .configure_network(ctx(Some(Duration::from_secs(30))), &net)
                    .await
                    .map_err(|e| format!("configure the pod network in the guest: {e}"))?;
            }
            if let Some(hostname) = hostname {
                let req = kite_protocol::agent::HostnameRequest {
                    hostname,
                    ..Default::default()
                };
                agent
                    .set_hostname(ctx(Some(Duration::from_secs(30))), &req)
                    .await
                    .map_err(|e| format!("set the guest's hostname: {e}"))?;
            }
            Ok::<(), String>(())
        };
        if let Err(reason) = configured.await {
            kill_all();
            return Err(SandboxError::Boot {
                sandbox: id.to_string(),
                reason,
                console: tail(&dir.join("guest.log"), 800),
            });
        }
        let timing = BootTiming {
            virtiofsd: virtiofsd_time,
            vm_to_agent,
            network_attach,
            network_guest: vm_started.elapsed() - vm_to_agent,
            guest_kernel: Duration::from_nanos(info.agent_started_ns),
            guest_agent: Duration::from_nanos(
                info.agent_ready_ns.saturating_sub(info.agent_started_ns),
            ),
        };
        info!(
            sandbox = %id,
            accel = accelerator.name(),
            vcpus,
            memory_mib,
            kernel = %info.kernel_release,
            virtiofsd_ms = virtiofsd_time.as_millis() as u64,
            vm_to_agent_ms = timing.vm_to_agent.as_millis() as u64,
            "sandbox booted"
        );
        Ok(Sandbox {
            id: id.to_string(),
            dir: dir.to_path_buf(),
            share,
            accelerator,
            kernel_release: info.kernel_release,
            timing,
            agent,
            qemu_pid,
            virtiofsd_pid,
            vm_exited,
        })
    }

    /// QEMU's pid: the process that holds the pod.
    pub fn pid(&self) -> u32 {
        self.qemu_pid.unwrap_or_default()
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// Resolves when the VM has exited.
    pub async fn vm_exited(&self) {
        let mut rx = self.vm_exited.clone();
        let _ = rx.wait_for(|e| *e).await;
    }

    pub fn is_running(&self) -> bool {
        !*self.vm_exited.borrow()
    }

    fn kill_processes(&self) {
        kill_pids(&[self.qemu_pid, self.virtiofsd_pid]);
    }

    /// Stops the VM (QMP quit, then SIGKILL), virtiofsd, and removes the share and state.
    pub async fn shutdown(&self) {
        if self.is_running() {
            if let Err(e) =
                qmp::execute(&self.dir.join("qmp.sock"), "quit", Duration::from_secs(2)).await
            {
                warn!(sandbox = %self.id, "QMP quit: {e}");
            }
        }
        let mut exited = self.vm_exited.clone();
        if tokio::time::timeout(Duration::from_secs(3), exited.wait_for(|e| *e))
            .await
            .is_err()
        {
            warn!(sandbox = %self.id, "QEMU did not quit: killing it");
        }
        self.kill_processes();
        let _ = tokio::time::timeout(Duration::from_secs(3), exited.wait_for(|e| *e)).await;
        let dir = self.dir.clone();
        let _ = tokio::task::spawn_blocking(move || cleanup_sandbox_dir(&dir)).await;
        info!(sandbox = %self.id, "sandbox stopped");
    }

    /// The directory of container `cid` in the share, on the host and in the guest.
    pub fn container_dir(&self, cid: &str) -> PathBuf {
        self.share.join(cid)
    }
}

fn kill_pids(pids: &[Option<u32>]) {
    for pid in pids.iter().flatten() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
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
) -> Result<(AgentClient, kite_protocol::agent::PingResponse), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let client = match (listener, channel) {
        (Some(listener), _) => {
            let stream = tokio::select! {
                accepted = listener.accept() => accepted.map(|(s, _)| s).map_err(|e| e.to_string())?,
                _ = exited.wait_for(|e| *e) => return Err(format!("QEMU exited: {}", stderr_text(qemu_stderr))),
                _ = tokio::time::sleep_until(deadline) => return Err("QEMU never connected to the agent socket".into()),
            };
            let fd = stream
                .into_std()
                .map_err(|e| format!("agent socket: {e}"))?
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
                        .map_err(|e| e.to_string())?;
                match connected {
                    Ok(client) => break client,
                    Err(e) if tokio::time::Instant::now() >= deadline => {
                        return Err(format!("no guest agent on {addr} within {timeout:?}: {e}"))
                    }
                    Err(_) if *exited.borrow() => {
                        return Err(format!("QEMU exited: {}", stderr_text(qemu_stderr)))
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }
        (None, AgentChannel::Serial(path)) => {
            return Err(format!(
                "no listener for the agent socket {}",
                path.display()
            ))
        }
    };
    let agent = AgentClient::new(client);
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    let ping = PingRequest::new();
    let info = tokio::select! {
        r = agent.ping(ctx(Some(remaining)), &ping) => r,
        _ = exited.wait_for(|e| *e) => return Err(format!("QEMU exited: {}", stderr_text(qemu_stderr))),
    };
    let info = match info {
        Ok(info) => info,
        Err(e) => {
            // A connection that breaks usually means QEMU is going: say why it went.
            let gone = tokio::time::timeout(Duration::from_secs(1), exited.wait_for(|e| *e)).await;
            if gone.is_ok() {
                return Err(format!("QEMU exited: {}", stderr_text(qemu_stderr)));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("no answer from the guest agent within {timeout:?}"));
            }
            return Err(format!("guest agent: {e}"));
        }
    };
    Ok((agent, info))
}

/// Waits for a child and reports its exit on the channel.
fn spawn_reaper(mut child: tokio::process::Child, tx: watch::Sender<bool>) {
    tokio::spawn(async move {
        let _ = child.wait().await;
        let _ = tx.send(true);
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

/// Releases everything a sandbox left in `dir`: kills its QEMU and virtiofsd (found by pid
/// file and checked by command line), releases its pod network (`network.json`), unmounts the
/// share and removes the directory. Safe to
/// call on a directory that is already gone.
pub fn cleanup_sandbox_dir(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let marker = dir.display().to_string();
    for file in ["qemu.pid", "virtiofsd.pid"] {
        if let Some(pid) = pid_from(&dir.join(file)) {
            if process_mentions(pid, &marker) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                for _ in 0..200 {
                    if !Path::new(&format!("/proc/{pid}")).exists()
                        || !process_mentions(pid, &marker)
                    {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
    remove_cgroup(dir);
    // With QEMU gone its taps are gone; what it leaves in the pod's namespace goes now.
    network::release(dir, Path::new(SYSFS));
    unmount_under(&dir.join("share"));
    if let Err(e) = std::fs::remove_dir_all(dir) {
        warn!("remove sandbox state {}: {e}", dir.display());
    }
}

/// The file in the sandbox dir that names the host cgroup the VM was placed in.
const CGROUP_FILE: &str = "cgroup";

/// The host cgroup of the container that boots the VM (its OCI `cgroupsPath`): for a pod's
/// sandbox container it lies under the pod's cgroup, whose limits the kubelet sets (the pod's
/// and the RuntimeClass overhead), so they bound the VM; and the CRI's pod stats count it.
/// A systemd-style path (`slice:prefix:name`) is not handled: no systemd manages cgroups here.
fn host_cgroup_path(spec: &oci_spec::runtime::Spec) -> Option<String> {
    let path = spec.linux().as_ref()?.cgroups_path().as_ref()?;
    let path = path.display().to_string();
    if path.is_empty() || path.contains(':') {
        return None;
    }
    Some(path)
}

fn cgroup_manager(path: &str) -> Result<libcgroups::common::AnyCgroupManager, String> {
    libcgroups::common::create_cgroup_manager(libcgroups::common::CgroupConfig {
        cgroup_path: PathBuf::from(path),
        systemd_cgroup: false,
        container_name: String::new(),
    })
    .map_err(|e| e.to_string())
}

/// Moves the VM's processes into the cgroup at `path` (made if missing; its limits are the
/// kubelet's to set, not the pause container's). The path is recorded for [`remove_cgroup`].
fn place_in_cgroup(dir: &Path, path: &str, pids: &[Option<u32>]) -> Result<(), String> {
    use libcgroups::common::CgroupManager;
    std::fs::write(dir.join(CGROUP_FILE), path).map_err(|e| e.to_string())?;
    let manager = cgroup_manager(path)?;
    for pid in pids.iter().flatten() {
        manager
            .add_task(nix::unistd::Pid::from_raw(*pid as i32))
            .map_err(|e| format!("add pid {pid}: {e}"))?;
    }
    Ok(())
}

/// Removes the cgroup [`place_in_cgroup`] recorded, once its processes are gone.
fn remove_cgroup(dir: &Path) {
    use libcgroups::common::CgroupManager;
    let Ok(path) = std::fs::read_to_string(dir.join(CGROUP_FILE)) else {
        return;
    };
    // A killed process leaves its cgroup only when its exit completes: retry for a while.
    let mut last = String::new();
    for _ in 0..150 {
        match cgroup_manager(&path).and_then(|m| m.remove().map_err(|e| e.to_string())) {
            Ok(()) => return,
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    warn!("remove host cgroup {path}: {last}");
}

/// Unmounts every mount at or below `path`, deepest first.
pub fn unmount_under(path: &Path) {
    let prefix = path.display().to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        if let Err(e) = umount2(Path::new(&p), MntFlags::MNT_DETACH) {
            if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
                warn!("unmount {p}: {e}");
            }
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?');
            out.push(v as char);
            i += 4;
        } else {
            out.push(bytes[i] as char);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mountinfo("/run/a\\040b"), "/run/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    #[test]
    fn tail_keeps_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("console.log");
        std::fs::write(&f, "a".repeat(100) + "END").unwrap();
        let t = tail(&f, 10);
        assert!(t.ends_with("aaaaaaaEND"), "{t}");
        assert_eq!(tail(&dir.path().join("none"), 10), "");
    }
}
