//! The accelerator a VM runs on: KVM where it can run a stock guest, TCG (software emulation)
//! otherwise.

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::config::AcceleratorChoice;
use crate::VmError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
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

/// Why KVM cannot run a stock guest here.
#[derive(Debug, thiserror::Error)]
pub enum KvmUnusable {
    #[error("the CPU exposes neither vmx nor svm")]
    NoVirtualization,
    #[error("/dev/kvm does not open")]
    NoDevice(#[source] std::io::Error),
}

/// Whether KVM can run a stock guest here: /dev/kvm opens and the CPU exposes vmx or svm.
/// (Some hosts have a /dev/kvm that only runs PVM guests; their CPUs show neither flag.)
pub fn kvm_usable(cpuinfo: &str) -> Result<(), KvmUnusable> {
    let has_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !has_virt {
        return Err(KvmUnusable::NoVirtualization);
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(KvmUnusable::NoDevice)
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
    // A frequency in kHz is far below 2^53: the float holds it exactly, and the guard keeps
    // the sign.
    #[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation)]
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

pub fn choose_accelerator(choice: AcceleratorChoice) -> Result<Accelerator, VmError> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    match (choice, kvm_usable(&cpuinfo)) {
        (AcceleratorChoice::Tcg, _) => Ok(Accelerator::Tcg),
        (_, Ok(())) => Ok(Accelerator::Kvm),
        (AcceleratorChoice::Kvm, Err(why)) => Err(VmError::NoKvm(why)),
        (AcceleratorChoice::Auto, Err(why)) => {
            warn!(
                reason = %kite_protocol::errors::error_chain(&why),
                "KVM is not usable: using TCG software emulation, expect slow VMs"
            );
            Ok(Accelerator::Tcg)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_frequency_comes_from_cpuinfo() {
        let cpuinfo = "processor\t: 0\ncpu MHz\t\t: 2445.406\nflags\t: fpu\n";
        assert_eq!(host_tsc_khz(cpuinfo), Some(2_445_406));
        assert_eq!(host_tsc_khz("processor : 0\n"), None);
    }

    #[test]
    fn kvm_needs_vmx_or_svm() {
        let err = kvm_usable("flags\t: fpu vme sse2 hypervisor\n").unwrap_err();
        assert!(matches!(err, KvmUnusable::NoVirtualization), "{err}");
    }
}
