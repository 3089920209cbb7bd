//! How big a pod's VM is: the configured base plus the pod's limits, or the size the pod
//! names; capped by the configured maximum.

use kite_vmm::VmSize;

use crate::config::ShimConfig;

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
pub fn size_for(config: &ShimConfig, spec: Option<&oci_spec::runtime::Spec>) -> VmSize {
    let annotation = |key: &str| -> Option<i64> {
        spec.and_then(|s| s.annotations().as_ref())
            .and_then(|a| a.get(key))
            .and_then(|v| v.trim().parse().ok())
    };
    // Only positive numbers size anything; anything else counts as absent.
    let positive = |v: i64| u64::try_from(v).ok().filter(|v| *v > 0);
    let resources = spec
        .and_then(|s| s.linux().as_ref())
        .and_then(|l| l.resources().as_ref());
    let cpu = resources.and_then(|r| r.cpu().as_ref());
    let quota = annotation(SANDBOX_CPU_QUOTA)
        .or_else(|| cpu.and_then(|c| c.quota()))
        .and_then(positive);
    let period = annotation(SANDBOX_CPU_PERIOD)
        .and_then(positive)
        .or_else(|| cpu.and_then(|c| c.period()))
        .filter(|p| *p > 0);
    let extra_vcpus = match (quota, period) {
        (Some(quota), Some(period)) => u32::try_from(quota.div_ceil(period)).unwrap_or(u32::MAX),
        _ => 0,
    };
    let extra_mib = annotation(SANDBOX_MEMORY)
        .or_else(|| {
            resources
                .and_then(|r| r.memory().as_ref())
                .and_then(|m| m.limit())
        })
        .and_then(positive)
        .map(|l| l.div_ceil(1 << 20))
        .unwrap_or(0);
    let vcpus = annotation(KITE_VCPUS)
        .and_then(positive)
        .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
        .unwrap_or(config.default_vcpus.saturating_add(extra_vcpus));
    let memory = annotation(KITE_MEMORY_MIB)
        .and_then(positive)
        .unwrap_or(config.default_memory_mib.saturating_add(extra_mib));
    VmSize {
        vcpus: vcpus.min(config.max_vcpus),
        memory_mib: memory.min(config.max_memory_mib),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{
        LinuxBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxResourcesBuilder, SpecBuilder,
    };

    fn size(vcpus: u32, memory_mib: u64) -> VmSize {
        VmSize { vcpus, memory_mib }
    }

    #[test]
    fn vm_is_sized_from_the_oci_limits() {
        let config = ShimConfig::default();
        assert_eq!(size_for(&config, None), size(1, 256));
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
        assert_eq!(size_for(&config, Some(&oci)), size(3, 256 + 101));
        let small = ShimConfig {
            max_vcpus: 2,
            max_memory_mib: 300,
            ..ShimConfig::default()
        };
        assert_eq!(size_for(&small, Some(&oci)), size(2, 300));
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
        assert_eq!(size_for(&config, Some(&cri)), size(4, 256 + 128));
        let named = spec(&[
            (KITE_VCPUS, "2"),
            (KITE_MEMORY_MIB, "1024"),
            (SANDBOX_MEMORY, "1"),
        ]);
        assert_eq!(size_for(&config, Some(&named)), size(2, 1024));
        let bad = spec(&[(KITE_VCPUS, "x"), (SANDBOX_MEMORY, "-1")]);
        assert_eq!(size_for(&config, Some(&bad)), size(1, 256));
    }
}
