//! The microVM: choosing the accelerator, QEMU's command line, and the QEMU and virtiofsd
//! processes of a sandbox.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::{Child, Command};
use tracing::warn;

use crate::config::{AcceleratorChoice, ChannelChoice, MachineType, ShimConfig};
use crate::network::{self, AttachedNic, Attachment};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accelerator {
    Kvm,
    Tcg,
}

impl Accelerator {
    pub fn name(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("accelerator kvm was configured but {0}")]
    NoKvm(String),
    #[error("agent_channel vsock was configured but /dev/vhost-vsock does not exist")]
    NoVsock,
    #[error("sandbox {sandbox}: {what} {path} is missing (run hack/setup.sh)")]
    Missing {
        sandbox: String,
        what: &'static str,
        path: PathBuf,
    },
    #[error("sandbox {sandbox}: start {what}: {source}")]
    Spawn {
        sandbox: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("sandbox {sandbox}: {what} did not come up: {reason}")]
    NotReady {
        sandbox: String,
        what: &'static str,
        reason: String,
    },
}

/// Whether KVM can run a stock guest here: /dev/kvm opens and the CPU exposes vmx or svm.
/// (Some hosts have a /dev/kvm that only runs PVM guests; their CPUs show neither flag.)
pub fn kvm_usable(cpuinfo: &str) -> Result<(), String> {
    let has_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !has_virt {
        return Err("the CPU exposes neither vmx nor svm".into());
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("/dev/kvm does not open: {e}"))
}

/// The host's TSC frequency in kHz, from /proc/cpuinfo's "cpu MHz" (the kernel reports the
/// TSC rate there on hosts without frequency scaling, which is where TCG guests run).
pub fn host_tsc_khz(cpuinfo: &str) -> Option<u64> {
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

pub fn choose_accelerator(choice: AcceleratorChoice) -> Result<Accelerator, VmError> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    match (choice, kvm_usable(&cpuinfo)) {
        (AcceleratorChoice::Tcg, _) => Ok(Accelerator::Tcg),
        (_, Ok(())) => Ok(Accelerator::Kvm),
        (AcceleratorChoice::Kvm, Err(why)) => Err(VmError::NoKvm(why)),
        (AcceleratorChoice::Auto, Err(why)) => {
            warn!("KVM is not usable ({why}): using TCG software emulation, expect slow VMs");
            Ok(Accelerator::Tcg)
        }
    }
}

/// The agent channel between shim and guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentChannel {
    /// A virtio-serial port; QEMU connects to the shim's unix socket at this path.
    Serial(PathBuf),
    /// vhost-vsock with this guest CID.
    Vsock(u32),
}

/// Picks the agent channel: vsock when configured or (auto) when the host has vhost-vsock,
/// virtio-serial otherwise. A vsock guest's CID is derived from the shim's pid, which no other
/// live shim has.
pub fn choose_channel(choice: ChannelChoice, shim_pid: u32) -> Result<AgentChannel, VmError> {
    channel_for(choice, Path::new("/dev/vhost-vsock").exists(), shim_pid)
}

fn channel_for(
    choice: ChannelChoice,
    has_vsock: bool,
    shim_pid: u32,
) -> Result<AgentChannel, VmError> {
    let cid = 1000 + shim_pid;
    match choice {
        ChannelChoice::Serial => Ok(AgentChannel::Serial(PathBuf::new())),
        ChannelChoice::Auto if !has_vsock => Ok(AgentChannel::Serial(PathBuf::new())),
        ChannelChoice::Vsock if !has_vsock => Err(VmError::NoVsock),
        ChannelChoice::Auto | ChannelChoice::Vsock => Ok(AgentChannel::Vsock(cid)),
    }
}

/// Everything that decides a VM's QEMU command line.
#[derive(Clone, Debug)]
pub struct VmSpec {
    pub sandbox_id: String,
    pub accelerator: Accelerator,
    pub machine: MachineType,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_params: String,
    /// The host's TSC frequency, handed to a TCG guest so it need not calibrate.
    pub tsc_khz: Option<u64>,
    pub qemu_sandbox: bool,
    pub channel: AgentChannel,
    pub virtiofs_socket: PathBuf,
    pub qmp_socket: PathBuf,
    pub console_log: PathBuf,
    pub guest_log: PathBuf,
    pub pid_file: PathBuf,
    /// A virtio-balloon that reports the guest's free pages, so QEMU gives them back.
    pub free_page_reporting: bool,
    /// The pod's NICs, and the tap descriptors QEMU inherits (in the order of the tap NICs).
    pub nics: Vec<AttachedNic>,
    pub tap_fds: Vec<RawFd>,
}

impl VmSpec {
    fn has_virtio_net(&self) -> bool {
        self.nics.iter().any(|n| {
            matches!(
                n.attachment,
                Attachment::Tap { .. } | Attachment::Macvtap { .. }
            )
        })
    }

    fn has_vfio(&self) -> bool {
        self.nics
            .iter()
            .any(|n| matches!(n.attachment, Attachment::Vfio { .. }))
    }
}

/// The CRI puts the pod's total limits on its sandbox container as these annotations
/// (containerd ≥ 1.6 with a kubelet that sends pod resources).
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
/// Pod annotations that set the VM's size outright (`io.kite.*` reach the shim).
pub const KITE_VCPUS: &str = "io.kite.vcpus";
pub const KITE_MEMORY_MIB: &str = "io.kite.memory_mib";

/// Sizes the VM: the configured base plus the pod's limits — the CRI's sandbox annotations
/// when present, the container's OCI limits otherwise (CPU quota rounded up to whole vCPUs,
/// memory in MiB rounded up) — unless the pod names a size (`io.kite.vcpus`,
/// `io.kite.memory_mib`); capped by the configured maximum.
pub fn size_for(config: &ShimConfig, spec: Option<&oci_spec::runtime::Spec>) -> (u32, u64) {
    let annotation = |key: &str| -> Option<i64> {
        spec.and_then(|s| s.annotations().as_ref())
            .and_then(|a| a.get(key))
            .and_then(|v| v.trim().parse().ok())
    };
    let resources = spec
        .and_then(|s| s.linux().as_ref())
        .and_then(|l| l.resources().as_ref());
    let cpu = resources.and_then(|r| r.cpu().as_ref());
    let quota = annotation(SANDBOX_CPU_QUOTA).or_else(|| cpu.and_then(|c| c.quota()));
    let period = annotation(SANDBOX_CPU_PERIOD)
        .map(|p| p as u64)
        .or_else(|| cpu.and_then(|c| c.period()));
    let extra_vcpus = match (quota, period) {
        (Some(quota), Some(period)) if quota > 0 && period > 0 => {
            (quota as u64).div_ceil(period) as u32
        }
        _ => 0,
    };
    let extra_mib = annotation(SANDBOX_MEMORY)
        .or_else(|| {
            resources
                .and_then(|r| r.memory().as_ref())
                .and_then(|m| m.limit())
        })
        .filter(|l| *l > 0)
        .map(|l| (l as u64).div_ceil(1 << 20))
        .unwrap_or(0);
    let vcpus = annotation(KITE_VCPUS)
        .filter(|v| *v > 0)
        .map(|v| v as u32)
        .unwrap_or(config.default_vcpus + extra_vcpus);
    let memory = annotation(KITE_MEMORY_MIB)
        .filter(|v| *v > 0)
        .map(|v| v as u64)
        .unwrap_or(config.default_memory_mib + extra_mib);
    (
        vcpus.min(config.max_vcpus),
        memory.min(config.max_memory_mib),
    )
}

/// The guest kernel command line.
pub fn kernel_cmdline(spec: &VmSpec) -> String {
    let mut words = vec![
        "console=ttyS0",
        "quiet",
        "panic=-1",
        "rdinit=/init",
        // Nothing in the guest needs the PC's legacy probes.
        "i8042.noaux",
        "i8042.nomux",
        "i8042.nopnp",
        "i8042.dumbkbd",
        "cryptomgr.notests",
    ];
    let tsc;
    if spec.accelerator == Accelerator::Tcg {
        // Under TCG the guest's TSC calibration against the PIT fails now and then (TCG runs
        // the PIT unevenly); microvm has no HPET or PM timer to fall back on, so the kernel
        // marks the TSC unstable and hangs calibrating the APIC timer (about one boot in three).
        // A TCG guest's TSC is the host's, so its frequency is known: handing it over skips
        // the calibration. lpj skips the delay-loop calibration for the same reason.
        words.extend(["tsc=reliable", "no_timer_check", "lpj=4000000"]);
        if let Some(khz) = spec.tsc_khz {
            tsc = format!("tsc_early_khz={khz}");
            words.push(&tsc);
        }
    }
    // The module groups of the guest initrd this VM needs (hack/build-guest.sh).
    let mut groups = vec![
        "core",
        match spec.machine {
            MachineType::Microvm => "mmio",
            MachineType::Pc => "pci",
        },
        "console",
        "fs",
    ];
    if matches!(spec.channel, AgentChannel::Vsock(_)) {
        words.push("kite.channel=vsock");
        groups.push("vsock");
    }
    if spec.has_virtio_net() {
        groups.push("net");
    }
    if spec.free_page_reporting {
        groups.push("balloon");
    }
    if spec.has_vfio() {
        groups.push("vf");
    }
    let modules = format!("kite.modules={}", groups.join(","));
    words.push(&modules);
    let mut line = words.join(" ");
    if !spec.kernel_params.trim().is_empty() {
        line.push(' ');
        line.push_str(spec.kernel_params.trim());
    }
    line
}

/// QEMU's arguments for a VM.
pub fn qemu_args(spec: &VmSpec) -> Vec<String> {
    let p = |path: &Path| path.display().to_string();
    let (machine, bus_suffix) = match spec.machine {
        MachineType::Microvm => ("microvm", "device"),
        MachineType::Pc => ("pc", "pci"),
    };
    let mut args: Vec<String> = vec![
        "-name".into(),
        format!("kite-{}", spec.sandbox_id),
        "-machine".into(),
        format!(
            "{machine},accel={},memory-backend=mem{}",
            spec.accelerator.name(),
            // A passed-through PCI function needs a PCI bus, which microvm has only on request.
            if spec.has_vfio() && spec.machine == MachineType::Microvm {
                ",pcie=on"
            } else {
                ""
            }
        ),
        "-cpu".into(),
        match spec.accelerator {
            Accelerator::Kvm => "host".into(),
            Accelerator::Tcg => "max".into(),
        },
        "-smp".into(),
        spec.vcpus.to_string(),
        "-m".into(),
        format!("{}M", spec.memory_mib),
        // virtio-fs (vhost-user) needs guest memory that virtiofsd can map.
        "-object".into(),
        format!(
            "memory-backend-memfd,id=mem,size={}M,share=on",
            spec.memory_mib
        ),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-no-reboot".into(),
        "-serial".into(),
        format!("file:{}", p(&spec.console_log)),
        "-kernel".into(),
        p(&spec.kernel),
        "-initrd".into(),
        p(&spec.initrd),
        "-append".into(),
        kernel_cmdline(spec),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", p(&spec.qmp_socket)),
        "-pidfile".into(),
        p(&spec.pid_file),
        "-device".into(),
        format!("virtio-serial-{bus_suffix},max_ports=4"),
        "-chardev".into(),
        format!("file,id=log,path={}", p(&spec.guest_log)),
        "-device".into(),
        "virtserialport,chardev=log,name=kite.log".into(),
        "-chardev".into(),
        format!("socket,id=vfs,path={}", p(&spec.virtiofs_socket)),
        "-device".into(),
        format!(
            "vhost-user-fs-{bus_suffix},chardev=vfs,tag={}",
            kite_protocol::SHARE_TAG
        ),
    ];
    match &spec.channel {
        AgentChannel::Serial(socket) => args.extend([
            "-chardev".into(),
            format!("socket,id=agent,path={}", p(socket)),
            "-device".into(),
            format!(
                "virtserialport,chardev=agent,name={}",
                kite_protocol::SERIAL_PORT_NAME
            ),
        ]),
        AgentChannel::Vsock(cid) => args.extend([
            "-device".into(),
            format!("vhost-vsock-{bus_suffix},guest-cid={cid}"),
        ]),
    }
    if spec.free_page_reporting {
        // Memory the guest frees (the unpacked initrd, boot-time allocations) goes back to the
        // host instead of staying in the VM's footprint.
        args.extend([
            "-device".into(),
            format!("virtio-balloon-{bus_suffix},free-page-reporting=on"),
        ]);
    }
    args.extend(network::qemu_nic_args(
        &spec.nics,
        &spec.tap_fds,
        spec.machine == MachineType::Pc,
    ));
    if spec.qemu_sandbox {
        args.extend([
            "-sandbox".into(),
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
        ]);
    }
    args
}

/// Makes a child die with the shim: if the shim is killed, its VM and virtiofsd go too.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Lets the child inherit `fds` (the shim opens every descriptor close-on-exec, so no other
/// child holds a tap open).
fn inherit_fds(cmd: &mut Command, fds: Vec<RawFd>) {
    if fds.is_empty() {
        return;
    }
    // SAFETY: the closure runs between fork and exec and only calls fcntl(2), which is
    // async-signal-safe, on descriptors the parent keeps open until the spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &fds {
                if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

pub fn spawn_virtiofsd(
    config: &ShimConfig,
    sandbox: &str,
    socket: &Path,
    shared_dir: &Path,
    log: &Path,
) -> Result<Child, VmError> {
    if !config.virtiofsd_path.exists() {
        return Err(VmError::Missing {
            sandbox: sandbox.into(),
            what: "virtiofsd",
            path: config.virtiofsd_path.clone(),
        });
    }
    let log_file = std::fs::File::create(log).map_err(|source| VmError::Spawn {
        sandbox: sandbox.into(),
        what: "virtiofsd (log file)",
        source,
    })?;
    let mut cmd = Command::new(&config.virtiofsd_path);
    cmd.arg(format!("--socket-path={}", socket.display()))
        .arg(format!("--shared-dir={}", shared_dir.display()))
        .args([
            "--cache=auto",
            "--sandbox=namespace",
            "--announce-submounts",
        ])
        .arg("--xattr")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .kill_on_drop(true);
    die_with_parent(&mut cmd);
    cmd.spawn().map_err(|source| VmError::Spawn {
        sandbox: sandbox.into(),
        what: "virtiofsd",
        source,
    })
}

pub fn spawn_qemu(config: &ShimConfig, spec: &VmSpec) -> Result<Child, VmError> {
    for (what, path) in [
        ("QEMU", &config.qemu_path),
        ("guest kernel", &spec.kernel),
        ("guest initrd", &spec.initrd),
    ] {
        if !path.exists() {
            return Err(VmError::Missing {
                sandbox: spec.sandbox_id.clone(),
                what,
                path: path.clone(),
            });
        }
    }
    let mut cmd = Command::new(&config.qemu_path);
    cmd.args(qemu_args(spec))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    die_with_parent(&mut cmd);
    inherit_fds(&mut cmd, spec.tap_fds.clone());
    cmd.spawn().map_err(|source| VmError::Spawn {
        sandbox: spec.sandbox_id.clone(),
        what: "QEMU",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{
        LinuxBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxResourcesBuilder, SpecBuilder,
    };

    fn spec(accel: Accelerator, machine: MachineType, channel: AgentChannel) -> VmSpec {
        VmSpec {
            sandbox_id: "sb1".into(),
            accelerator: accel,
            machine,
            vcpus: 2,
            memory_mib: 384,
            kernel: "/k".into(),
            initrd: "/i".into(),
            kernel_params: " debug ".into(),
            tsc_khz: Some(2_445_406),
            qemu_sandbox: true,
            channel,
            virtiofs_socket: "/s/vfs.sock".into(),
            qmp_socket: "/s/qmp.sock".into(),
            console_log: "/s/console.log".into(),
            guest_log: "/s/guest.log".into(),
            pid_file: "/s/qemu.pid".into(),
            free_page_reporting: true,
            nics: Vec::new(),
            tap_fds: Vec::new(),
        }
    }

    #[test]
    fn vsock_is_used_where_the_host_has_it() {
        let serial = AgentChannel::Serial(PathBuf::new());
        assert_eq!(channel_for(ChannelChoice::Auto, false, 7).unwrap(), serial);
        assert_eq!(
            channel_for(ChannelChoice::Auto, true, 7).unwrap(),
            AgentChannel::Vsock(1007)
        );
        assert_eq!(channel_for(ChannelChoice::Serial, true, 7).unwrap(), serial);
        assert!(matches!(
            channel_for(ChannelChoice::Vsock, false, 7),
            Err(VmError::NoVsock)
        ));
    }

    #[test]
    fn tsc_frequency_comes_from_cpuinfo() {
        let cpuinfo = "processor\t: 0\ncpu MHz\t\t: 2445.406\nflags\t: fpu\n";
        assert_eq!(host_tsc_khz(cpuinfo), Some(2_445_406));
        assert_eq!(host_tsc_khz("processor : 0\n"), None);
    }

    #[test]
    fn kvm_needs_vmx_or_svm() {
        let err = kvm_usable("flags\t: fpu vme sse2 hypervisor\n").unwrap_err();
        assert!(err.contains("vmx"), "{err}");
    }

    #[test]
    fn tcg_uses_no_host_cpu_and_skips_calibration() {
        let s = spec(
            Accelerator::Tcg,
            MachineType::Microvm,
            AgentChannel::Serial("/s/agent.sock".into()),
        );
        let args = qemu_args(&s);
        let joined = args.join(" ");
        assert!(!joined.contains("-cpu host"));
        assert!(joined.contains("-cpu max"));
        assert!(joined.contains("microvm,accel=tcg,memory-backend=mem"));
        assert!(joined.contains("memory-backend-memfd,id=mem,size=384M,share=on"));
        assert!(joined.contains("vhost-user-fs-device,chardev=vfs,tag=kiteshare"));
        assert!(joined.contains("virtserialport,chardev=agent,name=kite.agent"));
        assert!(joined.contains("-sandbox on"));
        let cmdline = kernel_cmdline(&s);
        assert!(cmdline.contains("lpj=") && cmdline.contains("tsc=reliable"));
        assert!(cmdline.contains("tsc_early_khz=2445406"));
        assert!(cmdline.contains("kite.modules=core,mmio,console,fs,balloon "));
        assert!(joined.contains("virtio-balloon-device,free-page-reporting=on"));
        assert!(cmdline.ends_with(" debug"));
    }

    #[test]
    fn kvm_on_pc_uses_the_host_cpu_and_pci_devices() {
        let s = spec(Accelerator::Kvm, MachineType::Pc, AgentChannel::Vsock(77));
        let joined = qemu_args(&s).join(" ");
        assert!(joined.contains("-cpu host"));
        assert!(joined.contains("pc,accel=kvm"));
        assert!(joined.contains("vhost-user-fs-pci"));
        assert!(joined.contains("vhost-vsock-pci,guest-cid=77"));
        assert!(!joined.contains("name=kite.agent"));
        let cmdline = kernel_cmdline(&s);
        assert!(!cmdline.contains("lpj=") && !cmdline.contains("tsc_early_khz"));
        assert!(cmdline.contains("kite.channel=vsock"));
        assert!(cmdline.contains("kite.modules=core,pci,console,fs,vsock,balloon"));
    }

    #[test]
    fn vm_is_sized_from_the_oci_limits() {
        let config = ShimConfig::default();
        assert_eq!(size_for(&config, None), (1, 256));
        let oci = SpecBuilder::default()
            .linux(
                LinuxBuilder::default()
                    .resources(
                        LinuxResourcesBuilder::default()
                            .cpu(
                                LinuxCpuBuilder::default()
                                    .quota(150_000i64)
                                    .period(100_000u64)
                                    .build()
                                    .unwrap(),
                            )
                            .memory(
                                LinuxMemoryBuilder::default()
                                    .limit(100 * 1024 * 1024 + 1)
                                    .build()
                                    .unwrap(),
                            )
                            .build()
                            .unwrap(),
                    )
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        assert_eq!(size_for(&config, Some(&oci)), (3, 256 + 101));
        let small = ShimConfig {
            max_vcpus: 2,
            max_memory_mib: 300,
            ..ShimConfig::default()
        };
        assert_eq!(size_for(&small, Some(&oci)), (2, 300));
    }

    #[test]
    fn pod_annotations_size_the_vm() {
        let config = ShimConfig::default();
        let spec = |pairs: &[(&str, &str)]| {
            let a: std::collections::HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            SpecBuilder::default().annotations(a).build().unwrap()
        };
        let cri = spec(&[
            (SANDBOX_CPU_QUOTA, "250000"),
            (SANDBOX_CPU_PERIOD, "100000"),
            (SANDBOX_MEMORY, "134217728"),
        ]);
        assert_eq!(size_for(&config, Some(&cri)), (4, 256 + 128));
        let named = spec(&[
            (KITE_VCPUS, "2"),
            (KITE_MEMORY_MIB, "1024"),
            (SANDBOX_MEMORY, "1"),
        ]);
        assert_eq!(size_for(&config, Some(&named)), (2, 1024));
        let bad = spec(&[(KITE_VCPUS, "x"), (SANDBOX_MEMORY, "-1")]);
        assert_eq!(size_for(&config, Some(&bad)), (1, 256));
    }
}
