//! A CRI client that drives containerd the way a kubelet does (k8s-cri over containerd's
//! socket): pods, containers, images, exec, stats. Used by the end-to-end tests and the pod
//! benchmark.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint, Uri};

pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// The RuntimeClass handler of kite, and containerd's default one.
pub const KITE: &str = "kite";
pub const RUNC: &str = "runc";

pub struct Cri {
    pub rt: RuntimeServiceClient<Channel>,
    pub img: ImageServiceClient<Channel>,
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

pub fn status_message(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

impl Cri {
    pub async fn connect() -> Cri {
        let channel = Endpoint::try_from("http://[::]:0")
            .expect("endpoint")
            .connect_with_connector(tower::service_fn(|_: Uri| async {
                let stream = tokio::net::UnixStream::connect(CONTAINERD_SOCKET).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }))
            .await
            .unwrap_or_else(|e| {
                panic!("connect to the CRI on {CONTAINERD_SOCKET}: {e} (run hack/setup.sh)")
            });
        Cri {
            rt: RuntimeServiceClient::new(channel.clone()),
            img: ImageServiceClient::new(channel),
        }
    }

    pub async fn pull(&mut self, image: &str) -> Result<String, tonic::Status> {
        let r = self
            .img
            .pull_image(PullImageRequest {
                image: Some(ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await?;
        Ok(r.into_inner().image_ref)
    }

    /// RemoveImage (containerd deletes it synchronously: its snapshots go unless in use).
    pub async fn remove_image(&mut self, image: &str) -> Result<(), tonic::Status> {
        self.img
            .remove_image(RemoveImageRequest {
                image: Some(ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
            })
            .await
            .map(|_| ())
    }

    /// Runs a pod named `name` with `handler` ("kite" or "runc").
    pub async fn run_pod(
        &mut self,
        name: &str,
        handler: &str,
        annotations: &[(&str, &str)],
    ) -> Result<Pod, tonic::Status> {
        self.run_pod_in(name, handler, annotations, "").await
    }

    /// Runs a pod whose cgroup parent is `cgroup_parent` (a kubelet's pod cgroup).
    pub async fn run_pod_in(
        &mut self,
        name: &str,
        handler: &str,
        annotations: &[(&str, &str)],
        cgroup_parent: &str,
    ) -> Result<Pod, tonic::Status> {
        let log_dir = std::env::temp_dir()
            .join("kite-cri-logs")
            .join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&log_dir).expect("create the pod log dir");
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
        let r = self
            .rt
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            })
            .await?;
        Ok(Pod {
            id: r.into_inner().pod_sandbox_id,
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
    ) -> Result<String, tonic::Status> {
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
        let r = self
            .rt
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.id.clone(),
                config: Some(config),
                sandbox_config: Some(pod.config.clone()),
            })
            .await?;
        Ok(r.into_inner().container_id)
    }

    pub async fn start(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.rt
            .start_container(StartContainerRequest {
                container_id: id.into(),
            })
            .await
            .map(|_| ())
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
            .unwrap_or_else(|e| panic!("create {name} in {}: {}", pod.id, status_message(&e)));
        self.start(&id)
            .await
            .unwrap_or_else(|e| panic!("start {name} in {}: {}", pod.id, status_message(&e)));
        id
    }

    pub async fn container_status(&mut self, id: &str) -> ContainerStatus {
        self.rt
            .container_status(ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .unwrap_or_else(|e| panic!("status of {id}: {}", status_message(&e)))
            .into_inner()
            .status
            .expect("container status")
    }

    pub async fn pod_status(&mut self, id: &str) -> PodSandboxStatus {
        self.rt
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: false,
            })
            .await
            .unwrap_or_else(|e| panic!("status of pod {id}: {}", status_message(&e)))
            .into_inner()
            .status
            .expect("pod status")
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
    ) -> Result<(i32, String, String), tonic::Status> {
        let r = self
            .rt
            .exec_sync(ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: timeout.as_secs() as i64,
            })
            .await?
            .into_inner();
        Ok((
            r.exit_code,
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        ))
    }

    pub async fn stop_container(&mut self, id: &str, timeout: i64) -> Result<(), tonic::Status> {
        self.rt
            .stop_container(StopContainerRequest {
                container_id: id.into(),
                timeout,
            })
            .await
            .map(|_| ())
    }

    pub async fn remove_container(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.rt
            .remove_container(RemoveContainerRequest {
                container_id: id.into(),
            })
            .await
            .map(|_| ())
    }

    /// StopPodSandbox then RemovePodSandbox, as a kubelet deletes a pod.
    pub async fn remove_pod(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.rt
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await?;
        self.rt
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await
            .map(|_| ())
    }

    pub async fn list_containers(&mut self, pod_id: &str) -> Vec<Container> {
        self.rt
            .list_containers(ListContainersRequest {
                filter: Some(ContainerFilter {
                    pod_sandbox_id: pod_id.into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap_or_else(|e| panic!("list containers of {pod_id}: {}", status_message(&e)))
            .into_inner()
            .containers
    }

    pub async fn container_stats(&mut self, id: &str) -> ContainerStats {
        self.rt
            .container_stats(ContainerStatsRequest {
                container_id: id.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("stats of {id}: {}", status_message(&e)))
            .into_inner()
            .stats
            .expect("container stats")
    }

    pub async fn pod_stats(&mut self, id: &str) -> Result<PodSandboxStats, tonic::Status> {
        let r = self
            .rt
            .pod_sandbox_stats(PodSandboxStatsRequest {
                pod_sandbox_id: id.into(),
            })
            .await?;
        Ok(r.into_inner().stats.unwrap_or_default())
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
        // A drop may run inside the test's runtime, which must not block: a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let mut c = Cri::connect().await;
                let _ = c.remove_pod(&id).await;
            });
        })
        .join();
    }
}

/// One HTTP GET over plain TCP (no client library needed for a test server), retried until it
/// answers or `limit` passes. Returns the body.
pub async fn http_get(addr: &str, path: &str, limit: Duration) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let start = std::time::Instant::now();
    let mut last = String::new();
    while start.elapsed() < limit {
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| e.to_string())?;
            s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&buf).into_owned();
            match text.split_once("\r\n\r\n") {
                Some((head, body)) if head.contains(" 200 ") => Ok(body.to_string()),
                _ => Err(format!("unexpected answer: {text:?}")),
            }
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(body)) => return Ok(body),
            Ok(Err(e)) => last = e,
            Err(_) => last = "timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!("GET http://{addr}{path}: {last}"))
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
