//! QEMU: the agent channel, the guest kernel command line, QEMU's arguments, and its process.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

use crate::accel::Accelerator;
use crate::config::{ChannelChoice, MachineType, VmConfig};
use crate::net::{self, AttachedNic, Attachment};
use crate::VmError;

/// The agent channel between shim and guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    pub vm_id: String,
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
    /// QEMU listens on the agent socket (a pooled VM: whoever adopts it connects), instead of
    /// dialling the shim's.
    pub agent_listens: bool,
    pub virtiofs_socket: PathBuf,
    pub qmp_socket: PathBuf,
    pub console_log: PathBuf,
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
        // No tracefs: the kernel would create a file per trace event at boot (about 7000
        // inodes and dentries on Debian's 6.1 kernel), 9 MiB of the guest's RAM for the VM's
        // life, and nothing in the guest traces.
        "initcall_blacklist=tracer_init_tracefs",
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

/// The CPU a TCG guest is given: every feature TCG emulates, except ERMS ("enhanced REP
/// MOVSB/STOSB"). A guest kernel told of ERMS clears and copies pages with `rep stosb` and
/// `rep movsb`, which TCG runs one byte per iteration; without it, eight bytes at a time
/// (`rep stosq`). Measured here (QEMU 7.2, a busybox `exec` in a container): ~100 ms with
/// ERMS, ~45 ms without, the whole of a container's set-up in the guest ~25% faster. Under
/// KVM the guest has the host's CPU and string instructions run natively.
pub const TCG_CPU: &str = "max,erms=off";

/// QEMU's arguments for a VM.
pub fn qemu_args(spec: &VmSpec) -> Vec<String> {
    let p = |path: &Path| path.display().to_string();
    let (machine, bus_suffix) = match spec.machine {
        MachineType::Microvm => ("microvm", "device"),
        MachineType::Pc => ("pc", "pci"),
    };
    let mut args: Vec<String> = vec![
        "-name".into(),
        format!("kite-{}", spec.vm_id),
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
            Accelerator::Tcg => TCG_CPU.into(),
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
        // One port (the agent's): the guest fills each port's receive queue with a page per
        // descriptor (4 MiB on virtio-mmio), so the agent logs to the console instead.
        format!("virtio-serial-{bus_suffix},max_ports=2"),
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
            format!(
                "socket,id=agent,path={}{}",
                p(socket),
                if spec.agent_listens {
                    ",server=on,wait=off"
                } else {
                    ""
                }
            ),
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
    args.extend(net::qemu_nic_args(
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

/// Ties a VM process's life to the calling process, or cuts it loose. An `owned` child (a cold
/// boot's) dies with the shim: killed when its handle drops or the shim dies (PDEATHSIG). A
/// pooled one outlives its parent and runs in a session of its own, so a signal to the
/// parent's process group or terminal (Ctrl-C on a foreground kite-pool) does not reach it.
pub(crate) fn set_lifetime(cmd: &mut Command, owned: bool) {
    cmd.kill_on_drop(owned);
    let hook = move || {
        if owned {
            nix::sys::prctl::set_pdeathsig(Some(nix::sys::signal::Signal::SIGKILL))
        } else {
            nix::unistd::setsid().map(drop)
        }
        .map_err(std::io::Error::from)
    };
    // SAFETY: the hook runs between fork and exec and only calls prctl(2) or setsid(2), both
    // async-signal-safe, and allocates nothing.
    unsafe { cmd.pre_exec(hook) };
}

/// Lets the child inherit `fds` (the shim opens every descriptor close-on-exec, so no other
/// child holds a tap open).
fn inherit_fds(cmd: &mut Command, fds: Vec<RawFd>) {
    if fds.is_empty() {
        return;
    }
    let hook = move || {
        for fd in &fds {
            nix::fcntl::fcntl(
                *fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )
            .map_err(std::io::Error::from)?;
        }
        Ok(())
    };
    // SAFETY: the hook runs between fork and exec and only calls fcntl(2), which is
    // async-signal-safe, on descriptors the parent keeps open until the spawn returns.
    unsafe { cmd.pre_exec(hook) };
}

/// Starts QEMU for `spec` (stderr piped: it says why QEMU exits at boot). An `owned` QEMU dies
/// with the calling process; a pooled one outlives it (the pool's holder may restart).
pub fn spawn(config: &VmConfig, spec: &VmSpec, owned: bool) -> Result<Child, VmError> {
    for (what, path) in [
        ("QEMU", &config.qemu_path),
        ("guest kernel", &spec.kernel),
        ("guest initrd", &spec.initrd),
    ] {
        if !path.exists() {
            return Err(VmError::Missing {
                vm: spec.vm_id.clone(),
                what,
                path: path.clone(),
            });
        }
    }
    let mut cmd = Command::new(&config.qemu_path);
    cmd.args(qemu_args(spec))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(if owned {
            Stdio::piped()
        } else {
            // Nobody may be left to read a pipe once the holder restarts: a pooled QEMU's
            // messages go to a file in its directory.
            Stdio::from(stderr_file(spec)?)
        });
    set_lifetime(&mut cmd, owned);
    inherit_fds(&mut cmd, spec.tap_fds.clone());
    cmd.spawn().map_err(|source| VmError::Spawn {
        vm: spec.vm_id.clone(),
        what: "QEMU",
        source,
    })
}

/// The file a pooled QEMU's stderr goes to, beside its console log.
fn stderr_file(spec: &VmSpec) -> Result<std::fs::File, VmError> {
    let path = spec.console_log.with_file_name("qemu.log");
    std::fs::File::create(&path).map_err(VmError::fs(&spec.vm_id, "create", &path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(accel: Accelerator, machine: MachineType, channel: AgentChannel) -> VmSpec {
        VmSpec {
            vm_id: "sb1".into(),
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
            agent_listens: false,
            virtiofs_socket: "/s/vfs.sock".into(),
            qmp_socket: "/s/qmp.sock".into(),
            console_log: "/s/console.log".into(),
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
    fn tcg_uses_no_host_cpu_and_skips_calibration() {
        let s = spec(
            Accelerator::Tcg,
            MachineType::Microvm,
            AgentChannel::Serial("/s/agent.sock".into()),
        );
        let args = qemu_args(&s);
        let joined = args.join(" ");
        assert!(!joined.contains("-cpu host"));
        assert!(joined.contains("-cpu max,erms=off"));
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
}
