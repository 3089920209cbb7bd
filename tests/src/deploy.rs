//! The installer's end-to-end helpers: a containerd "node" that never had kite
//! (hack/deploy-target.sh), the kite-deploy image (hack/build-deploy-image.sh), and the
//! DaemonSet's pod run through the machine's own containerd the way a kubelet runs it:
//! privileged, in the host's PID and network namespaces, the host's `/` at `/host`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kite_cri::api::*;

use crate::cri::Cri;

/// The target node's containerd.
pub const TARGET_CONFIG: &str = "/etc/kite-deploy-e2e/containerd/config.toml";
pub const TARGET_SOCKET: &str = "/run/kite-deploy-e2e/containerd.sock";
/// The first directory of the target containerd's PATH.
pub const TARGET_BIN: &str = "/var/lib/kite-deploy-e2e/bin";
/// Where the tests install kite on the host (beside the set-up's own kite).
pub const PREFIX: &str = "/opt/kite-e2e";
pub const CONFIG_DIR: &str = "/etc/kite-e2e";
pub const RUN_DIR: &str = "/run/kite-e2e";
pub const STATE_DIR: &str = "/var/lib/kite-e2e";
pub const LOG_DIR: &str = "/var/log/kite-e2e";

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn script(name: &str, args: &[&str]) -> String {
    let out = Command::new(repo().join("hack").join(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run hack/{name}: {e}"));
    assert!(
        out.status.success(),
        "hack/{name} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Builds and pushes the kite-deploy image of `version`: its reference.
pub fn build_image(version: &str) -> String {
    script("build-deploy-image.sh", &[version])
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

/// A fresh target node (anything left from an earlier run removed first).
pub fn target_up() {
    target_down();
    script("deploy-target.sh", &["up"]);
}

/// Stops the target node and removes whatever an earlier run's install left (a run that
/// failed half-way): its processes, mounts and directories.
pub fn target_down() {
    script("deploy-target.sh", &["down"]);
    for (pid, _) in processes_under(PREFIX) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // An install's warm pool (left by a failed run): its own kite-pool releases the VMs, their
    // namespace and cgroup; what it cannot is killed (the VMs' command lines name RUN_DIR).
    let pool = Path::new(PREFIX).join("current/bin/kite-pool");
    let config = Path::new(CONFIG_DIR).join("kite.toml");
    if pool.exists() && config.exists() {
        let _ = std::process::Command::new(&pool)
            .arg("--config")
            .arg(&config)
            .arg("drain")
            .output();
    }
    for pid in crate::pids_mentioning(&format!("{RUN_DIR}/")) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let mut mounts = mounts_under(&[RUN_DIR, STATE_DIR]);
    mounts.sort();
    for m in mounts.iter().rev() {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
    for dir in [PREFIX, CONFIG_DIR, RUN_DIR, STATE_DIR, LOG_DIR] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Builds kite's Debian package of `version`: its path.
pub fn build_deb(version: &str) -> PathBuf {
    PathBuf::from(
        script("build-deb.sh", &[version])
            .lines()
            .last()
            .unwrap_or_default(),
    )
}

/// The environment the DaemonSet gives the installer, pointed at the target node and at the
/// tests' own install directories.
pub fn installer_env() -> Vec<(String, String)> {
    let restart = format!("{} restart", repo().join("hack/deploy-target.sh").display());
    [
        ("KITE_PREFIX", PREFIX.to_string()),
        ("KITE_CONFIG_DIR", CONFIG_DIR.into()),
        ("KITE_RUN_DIR", RUN_DIR.into()),
        ("KITE_STATE_DIR", STATE_DIR.into()),
        ("KITE_LOG_DIR", LOG_DIR.into()),
        ("KITE_CONTAINERD_CONFIG", TARGET_CONFIG.into()),
        // The target's containerd finds shims on its PATH, whose first directory stands for
        // the node's /usr/local/bin (the machine's own holds the set-up's kite).
        ("KITE_SHIM_LINK_DIR", TARGET_BIN.into()),
        ("KITE_CONTAINERD_RESTART", restart),
        // The set-up's own agent, snapshotter and warm pool hold the default metrics ports
        // (and the pool its cgroup); the install's pool keeps one VM.
        (
            "KITE_CONFIG_OVERLAY",
            "[agent]\nmetrics_addr = \"127.0.0.1:9711\"\n\
             [snapshotter]\nmetrics_address = \"127.0.0.1:9712\"\n\
             [shim.pool]\nmetrics_addr = \"127.0.0.1:9713\"\ncount = 1\ncgroup = \"/kite-pool-deploy\"\n"
                .into(),
        ),
        ("NODE_NAME", "deploy-e2e".into()),
        // This machine hides its PID 1 from root (even /proc/1/ns): host commands join the
        // test's own namespaces and cgroups, which are the host's.
        ("KITE_HOST_PID", std::process::id().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The DaemonSet's pod on the machine's containerd.
pub struct DeployPod {
    pub pod_id: String,
    pub container_id: String,
}

impl DeployPod {
    /// Runs `image` as the DaemonSet does; `command` replaces the entrypoint when given.
    pub async fn start(
        cri: &mut Cri,
        name: &str,
        image: &str,
        command: Option<&[&str]>,
        extra_env: &[(&str, &str)],
    ) -> DeployPod {
        cri.pull(image)
            .await
            .unwrap_or_else(|e| panic!("pull {image}: {e}"));
        // A pod of that name left by an earlier run that failed half-way.
        for old in cri.client.list_pod_sandboxes(&[]).await.unwrap_or_default() {
            if old.metadata.as_ref().is_some_and(|m| m.name == name) {
                let _ = cri.remove_pod(&old.id).await;
            }
        }
        let log_dir = std::env::temp_dir().join("kite-deploy-e2e-logs").join(name);
        let _ = std::fs::remove_dir_all(&log_dir);
        std::fs::create_dir_all(&log_dir).unwrap();
        let host = || NamespaceMode::Node as i32;
        let sandbox = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "kube-system".into(),
                attempt: 0,
            }),
            log_directory: log_dir.display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: host(),
                        pid: host(),
                        ipc: host(),
                        ..Default::default()
                    }),
                    privileged: true,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let pod_id = cri
            .client
            .run_pod_sandbox(&sandbox, "runc")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut envs: Vec<KeyValue> = installer_env()
            .into_iter()
            .map(|(key, value)| KeyValue { key, value })
            .collect();
        envs.extend(extra_env.iter().map(|(k, v)| KeyValue {
            key: k.to_string(),
            value: v.to_string(),
        }));
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "install".into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            command: command
                .map(|c| c.iter().map(|s| s.to_string()).collect())
                .unwrap_or_default(),
            envs,
            mounts: vec![Mount {
                container_path: "/host".into(),
                host_path: "/".into(),
                // A hostPath without mountPropagation, as the DaemonSet has it.
                propagation: MountPropagation::PropagationPrivate as i32,
                ..Default::default()
            }],
            log_path: "install/0.log".into(),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    privileged: true,
                    namespace_options: Some(NamespaceOption {
                        network: host(),
                        pid: host(),
                        ipc: host(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let container_id = cri
            .client
            .create_container(&pod_id, &config, &sandbox)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        cri.start(&container_id)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        DeployPod {
            pod_id,
            container_id,
        }
    }

    /// `kite-deploy ARGS` in the pod (how a kubelet runs the preStop hook and exec probes).
    pub async fn kite_deploy(&self, cri: &mut Cri, args: &[&str]) -> (i32, String, String) {
        let mut cmd = vec!["/usr/local/bin/kite-deploy"];
        cmd.extend_from_slice(args);
        cri.exec_sync(&self.container_id, &cmd, Duration::from_secs(300))
            .await
            .unwrap_or_else(|e| panic!("exec {cmd:?}: {e}"))
    }

    /// Waits until `kite-deploy status` says healthy at `version` (an upgrade's pod answers
    /// for the old version until its install is done); panics with its last answer otherwise.
    pub async fn wait_healthy(&self, cri: &mut Cri, version: &str, limit: Duration) -> String {
        let start = std::time::Instant::now();
        let mut last = (0, String::new(), String::new());
        while start.elapsed() < limit {
            last = self.kite_deploy(cri, &["status"]).await;
            if last.0 == 0 && last.1.contains(&format!("version: {version}\n")) {
                return last.1;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        panic!(
            "kite-deploy status not healthy after {limit:?}: {last:?}; installer log: {}",
            self.log()
        );
    }

    /// The container's log (the installer's output).
    pub fn log(&self) -> String {
        let dir = std::env::temp_dir().join("kite-deploy-e2e-logs");
        std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("install/0.log")).ok())
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    /// Deletes the pod as a kubelet does (after the preStop hook, which callers run).
    pub async fn remove(self, cri: &mut Cri) {
        cri.remove_pod(&self.pod_id)
            .await
            .unwrap_or_else(|e| panic!("remove deploy pod: {e}"));
    }
}

/// Host processes whose executable is under `dir` (pid, executable).
pub fn processes_under(dir: &str) -> Vec<(i32, PathBuf)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let exe = std::fs::read_link(e.path().join("exe")).ok()?;
            exe.starts_with(dir).then_some((pid, exe))
        })
        .collect()
}

/// Mount points under any of `dirs`.
pub fn mounts_under(dirs: &[&str]) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| dirs.iter().any(|d| m.starts_with(d)))
        .collect()
}
