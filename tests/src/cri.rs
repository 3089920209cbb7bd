//! The end-to-end tests' CRI helpers: pods and containers as the tests make them (a kubelet's
//! pod config, a log directory of their own), on top of [`kite_cri::CriClient`], the client the
//! node agent uses too.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kite_cri::api::*;
pub use kite_cri::{CriClient, CriError, CONTAINERD_SOCKET, KITE, RUNC};

pub struct Cri {
    pub client: CriClient,
}

/// A pod as the tests keep it: its id and the config it was run with (CreateContainer needs
/// it again, as with a kubelet).
#[derive(Clone)]
pub struct Pod {
    pub id: String,
    pub config: PodSandboxConfig,
    pub handler: String,
}

impl Pod {
    pub fn log_dir(&self) -> PathBuf {
        PathBuf::from(&self.config.log_directory)
    }
}

/// A CRI error as the tests print it (its object, code and message).
pub fn status_message(e: &CriError) -> String {
    e.to_string()
}

impl Cri {
    pub async fn connect() -> Cri {
        let client = CriClient::connect(Path::new(CONTAINERD_SOCKET))
            .await
            .unwrap_or_else(|e| panic!("{e} (run hack/setup.sh)"));
        Cri { client }
    }

    /// The CRI of another containerd (a node of the rig, the installer's target).
    pub async fn connect_to(socket: &Path) -> Cri {
        let client = CriClient::connect(socket)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        Cri { client }
    }

    pub async fn pull(&mut self, image: &str) -> Result<String, CriError> {
        self.client.pull_image(image).await
    }

    /// RemoveImage (containerd deletes it synchronously: its snapshots go unless in use).
    pub async fn remove_image(&mut self, image: &str) -> Result<(), CriError> {
        self.client.remove_image(image).await
    }

    /// Runs a pod named `name` with `handler` ("kite" or "runc").
    pub async fn run_pod(
        &mut self,
        name: &str,
        handler: &str,
        annotations: &[(&str, &str)],
    ) -> Result<Pod, CriError> {
        self.run_pod_in(name, handler, annotations, "").await
    }

    /// Runs a pod whose cgroup parent is `cgroup_parent` (a kubelet's pod cgroup).
    pub async fn run_pod_in(
        &mut self,
        name: &str,
        handler: &str,
        annotations: &[(&str, &str)],
        cgroup_parent: &str,
    ) -> Result<Pod, CriError> {
        let log_dir = std::env::temp_dir()
            .join("kite-cri-logs")
            .join(format!("{name}-{}", std::process::id()));
        // Not fatal here: a directory that cannot be made (a full disk, as the soak makes) shows
        // as the CRI's error when containerd writes a container's log.
        let _ = std::fs::create_dir_all(&log_dir);
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}-{}", std::process::id()),
                namespace: "kite-e2e".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            // As a kubelet sends a cluster's DNS (containerd writes it as the pod's resolv.conf).
            dns_config: Some(DnsConfig {
                servers: vec!["10.88.0.1".into()],
                searches: vec!["kite-e2e.svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            }),
            log_directory: log_dir.display().to_string(),
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: cgroup_parent.into(),
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
        };
        let id = self.client.run_pod_sandbox(&config, handler).await?;
        Ok(Pod {
            id,
            config,
            handler: handler.into(),
        })
    }

    /// Creates a container in `pod` running `command` (the image's entrypoint replaced), with its
    /// log at `<pod log dir>/<name>/<attempt>.log`.
    pub async fn create_container(
        &mut self,
        pod: &Pod,
        name: &str,
        attempt: u32,
        image: &str,
        command: &[&str],
    ) -> Result<String, CriError> {
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt,
            }),
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}/{attempt}.log"),
            linux: Some(LinuxContainerConfig::default()),
            ..Default::default()
        };
        self.client
            .create_container(&pod.id, &config, &pod.config)
            .await
    }

    pub async fn start(&mut self, id: &str) -> Result<(), CriError> {
        self.client.start_container(id).await
    }

    /// Creates and starts a container; panics with the CRI's message if either fails.
    pub async fn run_container(
        &mut self,
        pod: &Pod,
        name: &str,
        attempt: u32,
        image: &str,
        command: &[&str],
    ) -> String {
        let id = self
            .create_container(pod, name, attempt, image, command)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        self.start(&id).await.unwrap_or_else(|e| panic!("{e}"));
        id
    }

    pub async fn container_status(&mut self, id: &str) -> ContainerStatus {
        self.client
            .container_status(id)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn pod_status(&mut self, id: &str) -> PodSandboxStatus {
        self.client
            .pod_sandbox_status(id)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn pod_ip(&mut self, id: &str) -> String {
        self.pod_status(id)
            .await
            .network
            .map(|n| n.ip)
            .filter(|ip| !ip.is_empty())
            .unwrap_or_else(|| panic!("pod {id} has no IP"))
    }

    /// ExecSync: (exit code, stdout, stderr).
    pub async fn exec_sync(
        &mut self,
        id: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<(i32, String, String), CriError> {
        self.client.exec_sync(id, cmd, timeout).await
    }

    /// StopContainer with a grace period of `timeout` seconds.
    pub async fn stop_container(&mut self, id: &str, timeout: u64) -> Result<(), CriError> {
        self.client
            .stop_container(id, Duration::from_secs(timeout))
            .await
    }

    pub async fn remove_container(&mut self, id: &str) -> Result<(), CriError> {
        self.client.remove_container(id).await
    }

    /// StopPodSandbox then RemovePodSandbox, as a kubelet deletes a pod.
    pub async fn remove_pod(&mut self, id: &str) -> Result<(), CriError> {
        self.client.stop_pod_sandbox(id).await?;
        self.client.remove_pod_sandbox(id).await
    }

    pub async fn list_containers(&mut self, pod_id: &str) -> Vec<Container> {
        self.client
            .list_containers(pod_id)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn container_stats(&mut self, id: &str) -> ContainerStats {
        self.client
            .container_stats(id)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn pod_stats(&mut self, id: &str) -> Result<PodSandboxStats, CriError> {
        self.client.pod_sandbox_stats(id).await
    }

    /// Waits until the container runs (or fails with its status).
    pub async fn wait_running(&mut self, id: &str, limit: Duration) {
        let start = std::time::Instant::now();
        loop {
            let st = self.container_status(id).await;
            if st.state == ContainerState::ContainerRunning as i32 {
                return;
            }
            assert!(
                st.state != ContainerState::ContainerExited as i32,
                "container {id} exited ({}): {} {}",
                st.exit_code,
                st.reason,
                st.message
            );
            assert!(
                start.elapsed() < limit,
                "container {id} not running after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Removes a pod when dropped, so a failing test leaves no pod behind for the next run.
pub struct RemoveOnDrop(pub String);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let id = self.0.clone();
        crate::block_on_own_thread(move || async move {
            let mut c = Cri::connect().await;
            let _ = c.remove_pod(&id).await;
        });
    }
}

/// One HTTP GET over plain TCP (no client library needed for a test server), retried until it
/// answers or `limit` passes. Returns the body; the error says what the last attempt got.
pub async fn http_get(addr: &str, path: &str, limit: Duration) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let start = std::time::Instant::now();
    let mut last = std::io::Error::other("no attempt");
    while start.elapsed() < limit {
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
                .await?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await?;
            let text = String::from_utf8_lossy(&buf).into_owned();
            match text.split_once("\r\n\r\n") {
                Some((head, body)) if head.contains(" 200 ") => Ok(body.to_string()),
                _ => Err(std::io::Error::other(format!(
                    "unexpected answer: {text:?}"
                ))),
            }
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(body)) => return Ok(body),
            Ok(Err(e)) => last = e,
            Err(_) => last = std::io::Error::from(std::io::ErrorKind::TimedOut),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(std::io::Error::new(
        last.kind(),
        format!("GET http://{addr}{path}: {last}"),
    ))
}

/// The network namespace a kite pod's sandbox attached (from its `network.json`).
pub fn kite_pod_netns(pod_id: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string(
        Path::new(crate::STATE_DIR)
            .join(pod_id)
            .join("network.json"),
    )
    .ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("netns")?.as_str().map(PathBuf::from)
}

/// The CRI log file of a container, in the kubelet's format: `<time> <stream> <tag> <line>`.
pub fn log_lines(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(4, ' ');
            let _time = parts.next()?;
            let stream = parts.next()?.to_string();
            let _tag = parts.next()?;
            Some((stream, parts.next().unwrap_or("").to_string()))
        })
        .collect()
}
