//! The node API (`kite.node.v1.NodeAgent`) over gRPC: what kitectl calls.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use kite_protocol::node::node_agent_server::NodeAgent;
use kite_protocol::node::*;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::cri_config;
use crate::node::{AgentError, Node};
use crate::status::PodShared;

type Answer<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        let message = kite_protocol::errors::error_chain(&e);
        match e {
            AgentError::Manifest(_) => Status::invalid_argument(message),
            AgentError::NotFound(_) => Status::not_found(message),
            AgentError::AlreadyExists(_) => Status::already_exists(message),
            AgentError::DoesNotFit { .. } => Status::resource_exhausted(message),
            AgentError::Refused { .. } | AgentError::Terminating(_) => {
                Status::failed_precondition(message)
            }
        }
    }
}

pub struct NodeApi {
    node: Arc<Node>,
}

impl NodeApi {
    pub fn new(node: Arc<Node>) -> NodeApi {
        NodeApi { node }
    }
}

fn pod_ref(r: Option<PodRef>) -> Result<(String, String), Status> {
    let r = r.ok_or_else(|| Status::invalid_argument("no pod named"))?;
    let namespace = if r.namespace.is_empty() {
        "default".to_string()
    } else {
        r.namespace
    };
    Ok((namespace, r.name))
}

/// Whether a start has come to an end: ready, failed, ended, or backing off.
fn start_settled(update: &PodUpdate) -> bool {
    let pod_done = update.pod.as_ref().is_some_and(|p| {
        p.ready || matches!(p.phase.as_str(), "Failed" | "Succeeded" | "Terminating")
    });
    let gave_up = update.event.as_ref().is_some_and(|e| {
        e.r#type == "Warning" && matches!(e.reason.as_str(), "BackOff" | "Failed")
    });
    pod_done || gave_up
}

/// Streams the pod's updates until `settled` says so, the update's `outcome` arrives, or the
/// pod is deleted. The task holds no reference to the pod: a deleted pod's stream ends.
fn stream_updates(
    shared: Arc<PodShared>,
    mut updates: broadcast::Receiver<PodUpdate>,
    watch: bool,
    settled: impl Fn(&PodUpdate) -> bool + Send + 'static,
    outcome: Option<tokio::sync::oneshot::Receiver<Result<(), String>>>,
) -> Answer<PodUpdate> {
    let (tx, rx) = mpsc::channel(64);
    let first = PodUpdate {
        pod: Some(shared.snapshot()),
        event: None,
        last: !watch,
    };
    let shared = Arc::downgrade(&shared);
    tokio::spawn(async move {
        if tx.send(Ok(first.clone())).await.is_err() || !watch {
            return;
        }
        if outcome.is_none() && settled(&first) {
            let _ = tx
                .send(Ok(PodUpdate {
                    last: true,
                    ..first
                }))
                .await;
            return;
        }
        let mut outcome = outcome;
        loop {
            let next = tokio::select! {
                biased;
                u = updates.recv() => u,
                result = async { outcome.as_mut().expect("guarded").await }, if outcome.is_some() => {
                    // What was broadcast before the outcome goes first.
                    while let Ok(u) = updates.try_recv() {
                        if tx.send(Ok(PodUpdate { last: false, ..u })).await.is_err() {
                            return;
                        }
                    }
                    let status = match (result, shared.upgrade()) {
                        (Ok(Ok(())), Some(pod)) => Ok(PodUpdate { pod: Some(pod.snapshot()), event: None, last: true }),
                        (Ok(Err(e)), _) => Err(Status::aborted(e)),
                        _ => Err(Status::aborted("the pod went away before the update ran")),
                    };
                    let _ = tx.send(status).await;
                    return;
                }
            };
            match next {
                Ok(update) => {
                    let deleted = update.last;
                    let done = deleted || (outcome.is_none() && settled(&update));
                    let update = PodUpdate {
                        last: done,
                        ..update
                    };
                    if tx.send(Ok(update)).await.is_err() || done {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

/// The CRI log format: `<time> <stream> <P|F> <text>`; P (partial) lines have no newline.
fn cri_log_text(raw: &str) -> String {
    let mut out = String::new();
    for line in raw.lines() {
        let mut parts = line.splitn(4, ' ');
        let (_time, _stream, tag) = (parts.next(), parts.next(), parts.next());
        out.push_str(parts.next().unwrap_or(""));
        if tag != Some("P") {
            out.push('\n');
        }
    }
    out
}

#[tonic::async_trait]
impl NodeAgent for NodeApi {
    type RunPodStream = Answer<PodUpdate>;
    type UpdateContainerStream = Answer<PodUpdate>;
    type LogsStream = Answer<LogChunk>;
    type PrefetchStream = Answer<PrefetchUpdate>;
    type WatchEventsStream = Answer<Event>;

    async fn run_pod(
        &self,
        request: Request<RunPodRequest>,
    ) -> Result<Response<Self::RunPodStream>, Status> {
        let request = request.into_inner();
        let (shared, updates) = self.node.run_pod(&request.manifest)?;
        Ok(Response::new(stream_updates(
            shared,
            updates,
            request.watch,
            start_settled,
            None,
        )))
    }

    async fn get_pod(&self, request: Request<PodRef>) -> Result<Response<Pod>, Status> {
        let (namespace, name) = pod_ref(Some(request.into_inner()))?;
        Ok(Response::new(self.node.get(&namespace, &name)?.snapshot()))
    }

    async fn list_pods(
        &self,
        request: Request<ListPodsRequest>,
    ) -> Result<Response<ListPodsResponse>, Status> {
        Ok(Response::new(ListPodsResponse {
            pods: self.node.list(&request.into_inner().namespace),
        }))
    }

    async fn delete_pod(
        &self,
        request: Request<DeletePodRequest>,
    ) -> Result<Response<Pod>, Status> {
        let request = request.into_inner();
        let (namespace, name) = pod_ref(request.pod)?;
        let grace = request
            .grace_period_secs
            .map(|s| Duration::from_secs(s.into()));
        Ok(Response::new(
            self.node.delete(&namespace, &name, grace).await?,
        ))
    }

    async fn update_container(
        &self,
        request: Request<UpdateContainerRequest>,
    ) -> Result<Response<Self::UpdateContainerStream>, Status> {
        let request = request.into_inner();
        let (namespace, name) = pod_ref(request.pod)?;
        let env: BTreeMap<String, String> = request.env.into_iter().collect();
        let shared = self.node.get(&namespace, &name)?;
        let updates = shared.subscribe();
        let (shared, outcome) = self
            .node
            .update(&namespace, &name, &request.container, &request.image, env)
            .await?;
        Ok(Response::new(stream_updates(
            shared,
            updates,
            true,
            |_| false,
            Some(outcome),
        )))
    }

    async fn logs(
        &self,
        request: Request<LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let request = request.into_inner();
        let (namespace, name) = pod_ref(request.pod)?;
        let shared = self.node.get(&namespace, &name)?;
        let pod = shared.snapshot();
        let container = match (request.container.as_str(), pod.containers.as_slice()) {
            ("", [only]) => only.clone(),
            ("", _) => {
                return Err(Status::invalid_argument(format!(
                    "pod {namespace}/{name} has {} containers: name one",
                    pod.containers.len()
                )))
            }
            (c, all) => all.iter().find(|s| s.name == c).cloned().ok_or_else(|| {
                Status::not_found(format!("pod {namespace}/{name} has no container {c:?}"))
            })?,
        };
        let container_name = container.name.clone();
        let pod_dir = self
            .node
            .context()
            .config
            .log_dir
            .join(format!("{namespace}_{name}_{}", pod.uid));
        let log_path = move |attempt: u32| {
            pod_dir.join(cri_config::container_log_path(&container.name, attempt))
        };
        let attempt = if request.previous {
            (0..container.attempt)
                .rev()
                .find(|a| log_path(*a).exists())
                .ok_or_else(|| {
                    Status::not_found(format!(
                        "container {container_name} of pod {namespace}/{name} has no previous instance"
                    ))
                })?
        } else {
            container.attempt
        };
        if !request.follow && !log_path(attempt).exists() {
            return Err(Status::not_found(format!(
                "container {container_name} of pod {namespace}/{name} has no log yet ({})",
                log_path(attempt).display()
            )));
        }
        let node = self.node.clone();
        let (tx, rx) = mpsc::channel(16);
        let follow = request.follow && !request.previous;
        drop(shared);
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncSeekExt};
            let mut attempt = attempt;
            let mut offset = 0u64;
            let mut pending = String::new();
            loop {
                let path: PathBuf = log_path(attempt);
                // What was added since the last read.
                let mut fresh = Vec::new();
                if let Ok(mut file) = tokio::fs::File::open(&path).await {
                    if file.seek(std::io::SeekFrom::Start(offset)).await.is_ok() {
                        let _ = file.read_to_end(&mut fresh).await;
                    }
                }
                if !fresh.is_empty() {
                    offset += fresh.len() as u64;
                    pending.push_str(&String::from_utf8_lossy(&fresh));
                    // Whole lines only; a line still being written waits for its end.
                    if let Some(cut) = pending.rfind('\n') {
                        let lines: String = pending.drain(..=cut).collect();
                        let chunk = LogChunk {
                            data: cri_log_text(&lines).into_bytes(),
                        };
                        if tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                }
                if !follow {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    // The client went away.
                    _ = tx.closed() => return,
                }
                let Ok(shared) = node.get(&namespace, &name) else {
                    return;
                };
                let current = shared
                    .snapshot()
                    .containers
                    .iter()
                    .find(|c| c.name == container_name)
                    .map(|c| c.attempt);
                // A restart begins a new file: follow it once the old one is read.
                if let Some(now) = current {
                    let size = tokio::fs::metadata(&path)
                        .await
                        .map(|m| m.len())
                        .unwrap_or(0);
                    if now != attempt && size <= offset {
                        attempt = now;
                        offset = 0;
                        pending.clear();
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn exec(&self, request: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
        let request = request.into_inner();
        let (namespace, name) = pod_ref(request.pod)?;
        let pod = self.node.get(&namespace, &name)?.snapshot();
        let container = match (request.container.as_str(), pod.containers.as_slice()) {
            ("", [only]) => only,
            (c, all) => all.iter().find(|s| s.name == c).ok_or_else(|| {
                Status::not_found(format!(
                    "pod {namespace}/{name} has no container {c:?} (name one of its containers)"
                ))
            })?,
        };
        if container.container_id.is_empty() || container.state != "running" {
            return Err(Status::failed_precondition(format!(
                "container {} of pod {namespace}/{name} is not running",
                container.name
            )));
        }
        if request.command.is_empty() {
            return Err(Status::invalid_argument("exec needs a command"));
        }
        let timeout = Duration::from_secs(if request.timeout_secs == 0 {
            60
        } else {
            request.timeout_secs.into()
        });
        let command: Vec<&str> = request.command.iter().map(String::as_str).collect();
        let mut cri = self.node.context().cri.clone();
        let (exit_code, stdout, stderr) = cri
            .exec_sync(&container.container_id, &command, timeout)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(ExecResponse {
            exit_code,
            stdout: stdout.into_bytes(),
            stderr: stderr.into_bytes(),
        }))
    }

    async fn prefetch(
        &self,
        request: Request<PrefetchRequest>,
    ) -> Result<Response<Self::PrefetchStream>, Status> {
        let image = request.into_inner().image;
        let socket = self.node.context().config.prefetch_socket.clone();
        if socket.as_os_str().is_empty() {
            return Err(Status::failed_precondition(
                "this agent has no prefetch API (prefetch_socket)",
            ));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let convert = |p: &kite_protocol::prefetch::PrefetchProgress| PrefetchUpdate {
            image: p.image.clone(),
            state: kite_protocol::prefetch_client::state_name(p).into(),
            layers: p.layers,
            lazy_layers: p.lazy_layers,
            layers_done: p.layers_done,
            prefetched_bytes: p.prefetched_bytes,
            error: p.error.clone(),
        };
        tokio::spawn(async move {
            let each_tx = tx.clone();
            let result = kite_protocol::prefetch_client::prefetch(&socket, &image, |p| {
                let _ = each_tx.send(Ok(convert(p)));
            })
            .await;
            if let Err(e) = result {
                let _ = tx.send(Err(Status::unavailable(
                    kite_protocol::errors::error_chain(&e),
                )));
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        )))
    }

    async fn watch_events(
        &self,
        request: Request<PodRef>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let (namespace, name) = pod_ref(Some(request.into_inner()))?;
        let shared = self.node.get(&namespace, &name)?;
        let mut updates = shared.subscribe();
        let past = shared.snapshot().events;
        drop(shared);
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            for e in past {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            loop {
                match updates.recv().await {
                    // The pod was deleted.
                    Ok(PodUpdate { last: true, .. }) => return,
                    Ok(PodUpdate { event: Some(e), .. }) => {
                        if tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines_become_text() {
        let raw = "2026-11-30T10:00:00.1Z stdout F hello\n2026-11-30T10:00:00.2Z stderr P par\n2026-11-30T10:00:00.3Z stderr F tial\n";
        assert_eq!(cri_log_text(raw), "hello\npartial\n");
    }
}
