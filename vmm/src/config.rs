//! What a VM is made of and how it is reached: the parts of the shim's `[shim]` section that
//! the VM layer reads (the shim deserializes them; the warm pool will too).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AcceleratorChoice {
    /// KVM when /dev/kvm opens and the CPU has vmx/svm, TCG otherwise.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ChannelChoice {
    /// vsock when the host has /dev/vhost-vsock, virtio-serial otherwise.
    #[default]
    Auto,
    Serial,
    Vsock,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum MachineType {
    /// QEMU's microvm machine (virtio-mmio): fewest devices, fastest boot.
    #[default]
    Microvm,
    /// The i440FX pc machine (virtio-pci).
    Pc,
}

/// How a pod's interfaces (other than PCI functions passed through) reach its VM.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// A tap per interface, tc redirect both ways (works on any interface).
    #[default]
    Tc,
    /// A passthru macvtap on each interface.
    Macvtap,
}

/// Everything the VM layer needs to launch a VM, independent of any pod.
#[derive(Clone, Debug, PartialEq)]
pub struct VmConfig {
    pub qemu_path: PathBuf,
    pub virtiofsd_path: PathBuf,
    pub kernel_path: PathBuf,
    pub initrd_path: PathBuf,
    pub accelerator: AcceleratorChoice,
    pub machine: MachineType,
    pub agent_channel: ChannelChoice,
    /// Extra words for the guest kernel command line.
    pub kernel_params: String,
    /// QEMU's seccomp sandbox (`-sandbox on,...`).
    pub qemu_sandbox: bool,
    /// A virtio-balloon with free page reporting: memory the guest frees returns to the host.
    pub free_page_reporting: bool,
    /// How long the guest agent may take to answer after QEMU starts.
    pub boot_timeout: Duration,
}

/// A VM's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u64,
}
