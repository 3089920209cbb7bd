//! A CRI client: drives containerd's CRI plugin over its unix socket the way a kubelet does
//! (pods, containers, images, exec, stats). The node agent, the end-to-end tests and the
//! benchmarks all use this one. The CRI's own types are re-exported as [`api`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

use api::*;
pub use k8s_cri::v1 as api;

/// containerd's socket, which serves the CRI.
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// The RuntimeClass handler of kite, and containerd's default one.
pub const KITE: &str = "kite";
pub const RUNC: &str = "runc";

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("connect to the CRI on {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    /// The CRI answered a call about `what` with an error status.
    #[error("{what}: {:?}: {}", status.code(), status.message())]
    Call { what: String, status: tonic::Status },
    #[error("{what}: the CRI's answer has no {field}")]
    Incomplete { what: String, field: &'static str },
}

impl CriError {
    /// The CRI's status, when it answered with one.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            CriError::Call { status, .. } => Some(status),
            _ => None,
        }
    }

    pub fn code(&self) -> Option<tonic::Code> {
        self.status().map(tonic::Status::code)
    }
}

fn call(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> CriError {
    let what = what.into();
    move |status| CriError::Call { what, status }
}

/// A connection to containerd's CRI.
#[derive(Clone)]
pub struct CriClient {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

impl CriClient {
    /// Connects to the CRI on `socket` (containerd's: [`CONTAINERD_SOCKET`]).
    pub async fn connect(socket: &Path) -> Result<CriClient, CriError> {
        let channel = kite_protocol::unix_channel(socket)
            .await
            .map_err(|source| CriError::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        Ok(CriClient {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    /// PullImage: the image's reference as the runtime keeps it.
    pub async fn pull_image(&mut self, image: &str) -> Result<String, CriError> {
        let request = PullImageRequest {
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let answer = self
            .images
            .pull_image(request)
            .await
            .map_err(call(format!("pull image {image}")))?;
        Ok(answer.into_inner().image_ref)
    }

    /// ListImages: the references (tags and digests) of every image the runtime holds, with
    /// its size.
    pub async fn list_images(&mut self) -> Result<Vec<(Vec<String>, u64)>, CriError> {
        let answer = self
            .images
            .list_images(ListImagesRequest::default())
            .await
            .map_err(call("list images".to_string()))?;
        Ok(answer
            .into_inner()
            .images
            .into_iter()
            .map(|i| {
                let mut refs = i.repo_tags;
                refs.extend(i.repo_digests);
                (refs, i.size)
            })
            .collect())
    }

    /// RemoveImage (containerd deletes it at once: its snapshots go unless in use).
    pub async fn remove_image(&mut self, image: &str) -> Result<(), CriError> {
        let request = RemoveImageRequest {
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
        };
        self.images
            .remove_image(request)
            .await
            .map_err(call(format!("remove image {image}")))?;
        Ok(())
    }

    /// RunPodSandbox with the runtime `handler` ("kite", "runc"): the pod's id.
    pub async fn run_pod_sandbox(
        &mut self,
        config: &PodSandboxConfig,
        handler: &str,
    ) -> Result<String, CriError> {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let request = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        };
        let answer = self
            .runtime
            .run_pod_sandbox(request)
            .await
            .map_err(call(format!("run pod {name}")))?;
        Ok(answer.into_inner().pod_sandbox_id)
    }

    /// StopPodSandbox: its containers are stopped and its network torn down.
    pub async fn stop_pod_sandbox(&mut self, pod_id: &str) -> Result<(), CriError> {
        let request = StopPodSandboxRequest {
            pod_sandbox_id: pod_id.into(),
        };
        self.runtime
            .stop_pod_sandbox(request)
            .await
            .map_err(call(format!("stop pod {pod_id}")))?;
        Ok(())
    }

    pub async fn remove_pod_sandbox(&mut self, pod_id: &str) -> Result<(), CriError> {
        let request = RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.into(),
        };
        self.runtime
            .remove_pod_sandbox(request)
            .await
            .map_err(call(format!("remove pod {pod_id}")))?;
        Ok(())
    }

    /// CreateContainer in pod `pod_id` (run with `sandbox_config`): the container's id.
    pub async fn create_container(
        &mut self,
        pod_id: &str,
        config: &ContainerConfig,
        sandbox_config: &PodSandboxConfig,
    ) -> Result<String, CriError> {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let request = CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(config.clone()),
            sandbox_config: Some(sandbox_config.clone()),
        };
        let answer = self
            .runtime
            .create_container(request)
            .await
            .map_err(call(format!("create container {name} in pod {pod_id}")))?;
        Ok(answer.into_inner().container_id)
    }

    pub async fn start_container(&mut self, container_id: &str) -> Result<(), CriError> {
        let request = StartContainerRequest {
            container_id: container_id.into(),
        };
        self.runtime
            .start_container(request)
            .await
            .map_err(call(format!("start container {container_id}")))?;
        Ok(())
    }

    /// StopContainer: SIGTERM, then SIGKILL after `grace`.
    pub async fn stop_container(
        &mut self,
        container_id: &str,
        grace: Duration,
    ) -> Result<(), CriError> {
        let request = StopContainerRequest {
            container_id: container_id.into(),
            timeout: i64::try_from(grace.as_secs()).unwrap_or(i64::MAX),
        };
        self.runtime
            .stop_container(request)
            .await
            .map_err(call(format!("stop container {container_id}")))?;
        Ok(())
    }

    pub async fn remove_container(&mut self, container_id: &str) -> Result<(), CriError> {
        let request = RemoveContainerRequest {
            container_id: container_id.into(),
        };
        self.runtime
            .remove_container(request)
            .await
            .map_err(call(format!("remove container {container_id}")))?;
        Ok(())
    }

    pub async fn container_status(
        &mut self,
        container_id: &str,
    ) -> Result<ContainerStatus, CriError> {
        let what = format!("status of container {container_id}");
        let request = ContainerStatusRequest {
            container_id: container_id.into(),
            verbose: false,
        };
        self.runtime
            .container_status(request)
            .await
            .map_err(call(what.clone()))?
            .into_inner()
            .status
            .ok_or(CriError::Incomplete {
                what,
                field: "status",
            })
    }

    pub async fn pod_sandbox_status(&mut self, pod_id: &str) -> Result<PodSandboxStatus, CriError> {
        let what = format!("status of pod {pod_id}");
        let request = PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.into(),
            verbose: false,
        };
        self.runtime
            .pod_sandbox_status(request)
            .await
            .map_err(call(what.clone()))?
            .into_inner()
            .status
            .ok_or(CriError::Incomplete {
                what,
                field: "status",
            })
    }

    /// ExecSync: runs `command` in the container; (exit code, stdout, stderr).
    pub async fn exec_sync(
        &mut self,
        container_id: &str,
        command: &[&str],
        timeout: Duration,
    ) -> Result<(i32, String, String), CriError> {
        let request = ExecSyncRequest {
            container_id: container_id.into(),
            cmd: command.iter().map(|s| s.to_string()).collect(),
            timeout: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        };
        let answer = self
            .runtime
            .exec_sync(request)
            .await
            .map_err(call(format!("exec in container {container_id}")))?
            .into_inner();
        Ok((
            answer.exit_code,
            String::from_utf8_lossy(&answer.stdout).into_owned(),
            String::from_utf8_lossy(&answer.stderr).into_owned(),
        ))
    }

    /// Status, verbose: the runtime's conditions and, in `info`, containerd's loaded CRI
    /// configuration as JSON under `"config"` (what `crictl info` prints).
    pub async fn status(&mut self) -> Result<StatusResponse, CriError> {
        Ok(self
            .runtime
            .status(StatusRequest { verbose: true })
            .await
            .map_err(call("runtime status"))?
            .into_inner())
    }

    /// The pod sandboxes that carry every label of `labels` (all of them when empty).
    pub async fn list_pod_sandboxes(
        &mut self,
        labels: &[(&str, &str)],
    ) -> Result<Vec<PodSandbox>, CriError> {
        let request = ListPodSandboxRequest {
            filter: Some(PodSandboxFilter {
                label_selector: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            }),
        };
        Ok(self
            .runtime
            .list_pod_sandbox(request)
            .await
            .map_err(call("list pod sandboxes"))?
            .into_inner()
            .items)
    }

    /// The containers of pod `pod_id` (all of them when empty).
    pub async fn list_containers(&mut self, pod_id: &str) -> Result<Vec<Container>, CriError> {
        let request = ListContainersRequest {
            filter: Some(ContainerFilter {
                pod_sandbox_id: pod_id.into(),
                ..Default::default()
            }),
        };
        Ok(self
            .runtime
            .list_containers(request)
            .await
            .map_err(call(format!("list the containers of pod {pod_id}")))?
            .into_inner()
            .containers)
    }

    pub async fn container_stats(
        &mut self,
        container_id: &str,
    ) -> Result<ContainerStats, CriError> {
        let what = format!("stats of container {container_id}");
        let request = ContainerStatsRequest {
            container_id: container_id.into(),
        };
        self.runtime
            .container_stats(request)
            .await
            .map_err(call(what.clone()))?
            .into_inner()
            .stats
            .ok_or(CriError::Incomplete {
                what,
                field: "stats",
            })
    }

    pub async fn pod_sandbox_stats(&mut self, pod_id: &str) -> Result<PodSandboxStats, CriError> {
        let request = PodSandboxStatsRequest {
            pod_sandbox_id: pod_id.into(),
        };
        Ok(self
            .runtime
            .pod_sandbox_stats(request)
            .await
            .map_err(call(format!("stats of pod {pod_id}")))?
            .into_inner()
            .stats
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_call_names_its_object_and_keeps_the_status() {
        let e = call("run pod web")(tonic::Status::unavailable("no runtime for \"kata\""));
        assert_eq!(
            e.to_string(),
            "run pod web: Unavailable: no runtime for \"kata\""
        );
        assert_eq!(e.code(), Some(tonic::Code::Unavailable));
    }

    #[tokio::test]
    async fn a_missing_socket_is_named() {
        let e = CriClient::connect(Path::new("/nonexistent/containerd.sock"))
            .await
            .err()
            .expect("no CRI there");
        assert!(
            e.to_string().contains("/nonexistent/containerd.sock"),
            "{e}"
        );
    }
}
