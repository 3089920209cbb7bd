//! A pod plan in the CRI's terms: the sandbox and container configs a kubelet would send, with
//! the labels by which a restarted agent finds what it made.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kite_cri::api::*;

use crate::manifest::{ContainerPlan, PodPlan};

/// CRI labels the agent puts on sandboxes and containers.
pub const LABEL_AGENT: &str = "kite.io/agent";
pub const LABEL_POD_UID: &str = "kite.io/pod-uid";
pub const LABEL_POD_NAME: &str = "kite.io/pod-name";
pub const LABEL_POD_NAMESPACE: &str = "kite.io/pod-namespace";
pub const LABEL_CONTAINER: &str = "kite.io/container";

/// The CFS period the CPU limits are expressed in (a kubelet's).
const CPU_PERIOD: i64 = 100_000;

/// The pod's log directory (a kubelet's layout: `<namespace>_<name>_<uid>`).
pub fn pod_log_dir(log_root: &Path, plan: &PodPlan) -> PathBuf {
    log_root.join(format!("{}_{}_{}", plan.namespace, plan.name, plan.uid))
}

/// A container's log, relative to the pod's log directory.
pub fn container_log_path(container: &str, attempt: u32) -> String {
    format!("{container}/{attempt}.log")
}

/// Where the pod's emptyDir volume `name` lives on the host.
pub fn volume_dir(state_dir: &Path, uid: &str, name: &str) -> PathBuf {
    volume_root(state_dir, uid).join(name)
}

pub fn volume_root(state_dir: &Path, uid: &str) -> PathBuf {
    state_dir.join("volumes").join(uid)
}

/// The pod's `/etc/hosts` on the host (a kubelet manages one per pod too: without it a
/// container's own hostname does not resolve, and a JVM's `InetAddress.getLocalHost()` waits
/// for DNS to time out).
pub fn hosts_path(state_dir: &Path, uid: &str) -> PathBuf {
    state_dir.join("hosts").join(uid)
}

/// Writes the pod's hosts file: localhost and the pod's IP under its hostname.
pub fn write_hosts(state_dir: &Path, uid: &str, ip: &str, hostname: &str) -> std::io::Result<()> {
    let path = hosts_path(state_dir, uid);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut text = String::from(
        "# kite-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    if !ip.is_empty() {
        text.push_str(&format!("{ip}\t{hostname}\n"));
    }
    kite_config::files::write_atomic(&path, text.as_bytes(), 0o644)
}

fn linux_resources(
    limits_cpu: Option<u64>,
    requests_cpu: Option<u64>,
    memory: Option<u64>,
) -> LinuxContainerResources {
    let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    LinuxContainerResources {
        cpu_period: if limits_cpu.is_some() { CPU_PERIOD } else { 0 },
        cpu_quota: limits_cpu
            .map(|m| to_i64(m).saturating_mul(CPU_PERIOD) / 1000)
            .unwrap_or(0),
        // cgroup v1 shares as a kubelet computes them (1024 per CPU, at least 2).
        cpu_shares: requests_cpu
            .or(limits_cpu)
            .map(|m| (to_i64(m) * 1024 / 1000).max(2))
            .unwrap_or(0),
        memory_limit_in_bytes: memory.map(to_i64).unwrap_or(0),
        ..Default::default()
    }
}

/// RunPodSandbox's config for the pod.
pub fn sandbox_config(
    plan: &PodPlan,
    attempt: u32,
    agent_id: &str,
    log_root: &Path,
) -> PodSandboxConfig {
    let mut labels: HashMap<String, String> = plan.labels.clone().into_iter().collect();
    labels.insert(LABEL_AGENT.into(), agent_id.into());
    labels.insert(LABEL_POD_UID.into(), plan.uid.clone());
    labels.insert(LABEL_POD_NAME.into(), plan.name.clone());
    labels.insert(LABEL_POD_NAMESPACE.into(), plan.namespace.clone());
    // The pod's total limits: containerd passes them to the runtime (kite sizes the VM by them).
    let sum = |f: &dyn Fn(&ContainerPlan) -> Option<u64>| {
        plan.containers.iter().filter_map(f).reduce(|a, b| a + b)
    };
    let resources = linux_resources(
        sum(&|c| c.limits.cpu_millis),
        sum(&|c| c.requests.cpu_millis),
        sum(&|c| c.limits.memory_bytes),
    );
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: plan.name.clone(),
            uid: plan.uid.clone(),
            namespace: plan.namespace.clone(),
            attempt,
        }),
        hostname: plan.name.clone(),
        log_directory: pod_log_dir(log_root, plan).display().to_string(),
        labels,
        annotations: plan.annotations.clone().into_iter().collect(),
        linux: Some(LinuxPodSandboxConfig {
            resources: Some(resources),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Pod as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// CreateContainer's config for `container` of the pod, instance `attempt`.
pub fn container_config(
    plan: &PodPlan,
    container: &ContainerPlan,
    attempt: u32,
    agent_id: &str,
    state_dir: &Path,
) -> ContainerConfig {
    let labels = HashMap::from([
        (LABEL_AGENT.to_string(), agent_id.to_string()),
        (LABEL_POD_UID.to_string(), plan.uid.clone()),
        (LABEL_CONTAINER.to_string(), container.name.clone()),
    ]);
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: container.name.clone(),
            attempt,
        }),
        image: Some(ImageSpec {
            image: container.image.clone(),
            ..Default::default()
        }),
        command: container.command.clone(),
        args: container.args.clone(),
        working_dir: container.working_dir.clone(),
        envs: container
            .env
            .iter()
            .map(|(key, value)| KeyValue {
                key: key.clone(),
                value: value.clone(),
            })
            .collect(),
        mounts: container
            .mounts
            .iter()
            .map(|(volume, path, readonly)| Mount {
                container_path: path.clone(),
                host_path: volume_dir(state_dir, &plan.uid, volume)
                    .display()
                    .to_string(),
                readonly: *readonly,
                ..Default::default()
            })
            .chain(std::iter::once(Mount {
                container_path: "/etc/hosts".into(),
                host_path: hosts_path(state_dir, &plan.uid).display().to_string(),
                ..Default::default()
            }))
            .collect(),
        labels,
        log_path: container_log_path(&container.name, attempt),
        linux: Some(LinuxContainerConfig {
            resources: Some(linux_resources(
                container.limits.cpu_millis,
                container.requests.cpu_millis,
                container.limits.memory_bytes,
            )),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_carry_identity_limits_and_volumes() {
        let plan = crate::manifest::parse(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  volumes: [{name: data, emptyDir: {}}]
  containers:
  - name: c
    image: busybox
    resources: {limits: {cpu: 500m, memory: 64Mi}}
    volumeMounts: [{name: data, mountPath: /data}]
"#,
            "kite",
        )
        .unwrap();
        let sb = sandbox_config(&plan, 1, "a1", Path::new("/logs"));
        assert_eq!(sb.metadata.as_ref().unwrap().attempt, 1);
        assert_eq!(sb.labels[LABEL_POD_UID], plan.uid);
        assert_eq!(sb.labels["app"], "web");
        assert_eq!(sb.log_directory, format!("/logs/shop_web_{}", plan.uid));
        let r = sb.linux.unwrap().resources.unwrap();
        assert_eq!(
            (r.cpu_quota, r.cpu_period, r.memory_limit_in_bytes),
            (50_000, 100_000, 64 << 20)
        );
        assert_eq!(r.cpu_shares, 512);
        let c = container_config(&plan, &plan.containers[0], 3, "a1", Path::new("/state"));
        assert_eq!(c.log_path, "c/3.log");
        assert_eq!(
            c.mounts[0].host_path,
            format!("/state/volumes/{}/data", plan.uid)
        );
        assert_eq!(c.labels[LABEL_CONTAINER], "c");
        assert_eq!(c.mounts[1].container_path, "/etc/hosts");
        let dir = tempfile::tempdir().unwrap();
        write_hosts(dir.path(), &plan.uid, "10.88.0.7", "web").unwrap();
        let text = std::fs::read_to_string(hosts_path(dir.path(), &plan.uid)).unwrap();
        assert!(text.contains("127.0.0.1\tlocalhost\n") && text.ends_with("10.88.0.7\tweb\n"));
    }
}
