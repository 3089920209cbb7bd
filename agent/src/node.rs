//! The node's pods: admission (does the pod fit?), one worker per pod, and the recovery a new
//! agent does at start (adopt what runs, remove what was half made).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kite_cri::api::PodSandboxState;
use kite_protocol::node::{Pod, PodUpdate};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::config::StartOrder;
use crate::cri_config::{LABEL_AGENT, LABEL_CONTAINER, LABEL_POD_UID};
use crate::manifest::{self, ManifestError, PodPlan, Resources};
use crate::pod::{Begin, NodeContext, PodCommand, PodWorker};
use crate::quantity::format_bytes;
use crate::status::{now_ms, PodShared};
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("pod {0} not found")]
    NotFound(String),
    #[error("pod {0} already exists")]
    AlreadyExists(String),
    #[error("pod {pod} does not fit on this node: it requests {wanted}; {free} of {allocatable} allocatable is free")]
    DoesNotFit {
        pod: String,
        wanted: String,
        free: String,
        allocatable: String,
    },
    #[error("pod {pod}: {reason}")]
    Refused { pod: String, reason: String },
    #[error("pod {0} is being deleted")]
    Terminating(String),
}

/// Node capacity: cpu (millicores) and memory (bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

impl Capacity {
    fn text(self) -> String {
        format!(
            "cpu {}m, memory {}",
            self.cpu_millis,
            format_bytes(self.memory_bytes)
        )
    }

    /// This machine's CPUs and memory.
    pub fn of_this_node() -> Capacity {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let memory = nix::sys::sysinfo::sysinfo()
            .map(|s| s.ram_total())
            .unwrap_or(0);
        Capacity {
            cpu_millis: u64::try_from(cpus).unwrap_or(1) * 1000,
            memory_bytes: memory,
        }
    }
}

/// Whether `want` fits next to `used` in `allocatable`.
pub fn admit(
    pod: &str,
    want: Resources,
    used: Capacity,
    allocatable: Capacity,
) -> Result<(), AgentError> {
    let cpu = want.cpu_millis.unwrap_or(0);
    let mem = want.memory_bytes.unwrap_or(0);
    let free = Capacity {
        cpu_millis: allocatable.cpu_millis.saturating_sub(used.cpu_millis),
        memory_bytes: allocatable.memory_bytes.saturating_sub(used.memory_bytes),
    };
    if cpu > free.cpu_millis || mem > free.memory_bytes {
        return Err(AgentError::DoesNotFit {
            pod: pod.into(),
            wanted: Capacity {
                cpu_millis: cpu,
                memory_bytes: mem,
            }
            .text(),
            free: free.text(),
            allocatable: allocatable.text(),
        });
    }
    Ok(())
}

struct PodEntry {
    uid: String,
    shared: Arc<PodShared>,
    commands: mpsc::Sender<PodCommand>,
    requests: Resources,
    terminating: bool,
}

pub struct Node {
    ctx: Arc<NodeContext>,
    store: Store,
    allocatable: Capacity,
    pods: Mutex<BTreeMap<(String, String), PodEntry>>,
}

fn key_text(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl Node {
    pub fn new(ctx: Arc<NodeContext>, store: Store, capacity: Capacity) -> Node {
        let config = &ctx.config;
        let allocatable = Capacity {
            cpu_millis: capacity
                .cpu_millis
                .saturating_sub(config.reserved_cpu_millis),
            memory_bytes: capacity
                .memory_bytes
                .saturating_sub(config.reserved_memory_mib << 20),
        };
        Node {
            ctx,
            store,
            allocatable,
            pods: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn context(&self) -> &Arc<NodeContext> {
        &self.ctx
    }

    /// What pods may use of the node, and what their requests take of it now.
    pub fn capacity(&self) -> (Capacity, Capacity) {
        (
            self.allocatable,
            Self::used(&self.pods.lock().expect("pods lock")),
        )
    }

    fn used(pods: &BTreeMap<(String, String), PodEntry>) -> Capacity {
        let mut used = Capacity {
            cpu_millis: 0,
            memory_bytes: 0,
        };
        for p in pods.values() {
            used.cpu_millis += p.requests.cpu_millis.unwrap_or(0);
            used.memory_bytes += p.requests.memory_bytes.unwrap_or(0);
        }
        used
    }

    fn spawn(
        &self,
        plan: PodPlan,
        order: StartOrder,
        shared: Arc<PodShared>,
        begin: Begin,
    ) -> PodEntry {
        let (tx, rx) = mpsc::channel(16);
        let requests = plan.requests();
        let worker = PodWorker::new(self.ctx.clone(), plan, order, shared.clone(), rx);
        tokio::spawn(worker.run(begin));
        PodEntry {
            uid: shared.snapshot().uid,
            shared,
            commands: tx,
            requests,
            terminating: false,
        }
    }

    fn new_status(&self, plan: &PodPlan, order: StartOrder) -> Pod {
        Pod {
            namespace: plan.namespace.clone(),
            name: plan.name.clone(),
            uid: plan.uid.clone(),
            phase: "Pending".into(),
            runtime_class: plan.runtime_class.clone(),
            start_order: order.name().into(),
            manifest_json: plan.manifest_json(),
            created_unix_ms: now_ms(),
            ..Default::default()
        }
    }

    /// Admits a manifest and starts the pod: its status, to watch.
    pub fn run_pod(
        &self,
        manifest_text: &str,
    ) -> Result<(Arc<PodShared>, broadcast::Receiver<PodUpdate>), AgentError> {
        let bind = Instant::now();
        let plan = manifest::parse(manifest_text, &self.ctx.config.default_runtime_class)?;
        let key = (plan.namespace.clone(), plan.name.clone());
        let order = plan.start_order.unwrap_or(self.ctx.config.start_order);
        let mut pods = self.pods.lock().expect("pods lock");
        if pods.contains_key(&key) {
            return Err(AgentError::AlreadyExists(key_text(&key.0, &key.1)));
        }
        // The uid names the pod's record, volumes and CRI label: one pod each.
        if let Some(((ns, other), _)) = pods.iter().find(|(_, e)| e.uid == plan.uid) {
            return Err(AgentError::Refused {
                pod: key_text(&key.0, &key.1),
                reason: format!("metadata.uid {} is pod {ns}/{other}'s", plan.uid),
            });
        }
        admit(
            &key_text(&key.0, &key.1),
            plan.requests(),
            Self::used(&pods),
            self.allocatable,
        )?;
        let shared = Arc::new(PodShared::new(
            self.new_status(&plan, order),
            self.store.clone(),
        ));
        // The record exists before the first CRI call: a new agent finds what this one made.
        shared.update(|_| {});
        let updates = shared.subscribe();
        let entry = self.spawn(plan, order, shared.clone(), Begin::Start { bind });
        pods.insert(key, entry);
        self.ctx
            .metrics
            .pods
            .set(i64::try_from(pods.len()).unwrap_or(i64::MAX));
        Ok((shared, updates))
    }

    pub fn get(&self, namespace: &str, name: &str) -> Result<Arc<PodShared>, AgentError> {
        self.pods
            .lock()
            .expect("pods lock")
            .get(&(namespace.to_string(), name.to_string()))
            .map(|e| e.shared.clone())
            .ok_or_else(|| AgentError::NotFound(key_text(namespace, name)))
    }

    pub fn list(&self, namespace: &str) -> Vec<Pod> {
        self.pods
            .lock()
            .expect("pods lock")
            .iter()
            .filter(|((ns, _), _)| namespace.is_empty() || ns == namespace)
            .map(|(_, e)| e.shared.snapshot())
            .collect()
    }

    fn commands(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<mpsc::Sender<PodCommand>, AgentError> {
        let pods = self.pods.lock().expect("pods lock");
        let entry = pods
            .get(&(namespace.to_string(), name.to_string()))
            .ok_or_else(|| AgentError::NotFound(key_text(namespace, name)))?;
        if entry.terminating {
            return Err(AgentError::Terminating(key_text(namespace, name)));
        }
        Ok(entry.commands.clone())
    }

    /// Deletes a pod: returns once everything of it is gone (its last status). The deletion
    /// completes even if the caller goes away meanwhile.
    pub async fn delete(
        self: &Arc<Self>,
        namespace: &str,
        name: &str,
        grace: Option<Duration>,
    ) -> Result<Pod, AgentError> {
        let key = (namespace.to_string(), name.to_string());
        let (commands, shared) = {
            let mut pods = self.pods.lock().expect("pods lock");
            let entry = pods
                .get_mut(&key)
                .ok_or_else(|| AgentError::NotFound(key_text(namespace, name)))?;
            if entry.terminating {
                return Err(AgentError::Terminating(key_text(namespace, name)));
            }
            entry.terminating = true;
            (entry.commands.clone(), entry.shared.clone())
        };
        let node = self.clone();
        let finished = tokio::spawn(async move {
            let (reply, done) = oneshot::channel();
            if commands
                .send(PodCommand::Delete { grace, reply })
                .await
                .is_ok()
            {
                let _ = done.await;
            }
            let mut pods = node.pods.lock().expect("pods lock");
            // Only this pod's entry (a new pod of the same name may not exist yet, but be sure).
            if pods
                .get(&key)
                .is_some_and(|e| Arc::ptr_eq(&e.shared, &shared))
            {
                pods.remove(&key);
            }
            node.ctx
                .metrics
                .pods
                .set(i64::try_from(pods.len()).unwrap_or(i64::MAX));
            shared.snapshot()
        });
        finished.await.map_err(|e| AgentError::Refused {
            pod: key_text(namespace, name),
            reason: format!("the deletion's task failed: {e}"),
        })
    }

    /// Starts an in-place update; the pod's status shows its progress. Gives the status and
    /// the update's outcome to come.
    pub async fn update(
        &self,
        namespace: &str,
        name: &str,
        container: &str,
        image: &str,
        env: BTreeMap<String, String>,
    ) -> Result<(Arc<PodShared>, oneshot::Receiver<Result<(), String>>), AgentError> {
        let shared = self.get(namespace, name)?;
        let pod = shared.snapshot();
        // No name: the pod's only container.
        let container = match (container, pod.containers.as_slice()) {
            ("", [only]) => only.name.clone(),
            (c, _) => c.to_string(),
        };
        let container = container.as_str();
        if pod.containers.is_empty() {
            return Err(AgentError::Refused {
                pod: key_text(namespace, name),
                reason: "it is still starting".into(),
            });
        }
        if !pod.containers.iter().any(|c| c.name == container) {
            return Err(AgentError::Refused {
                pod: key_text(namespace, name),
                reason: format!("it has no container {container:?}"),
            });
        }
        if image.is_empty() && env.is_empty() {
            return Err(AgentError::Refused {
                pod: key_text(namespace, name),
                reason: "an update needs a new image or env values".into(),
            });
        }
        let commands = self.commands(namespace, name)?;
        let (reply, outcome) = oneshot::channel();
        commands
            .send(PodCommand::Update {
                container: container.into(),
                image: image.into(),
                env,
                reply,
            })
            .await
            .map_err(|_| AgentError::Terminating(key_text(namespace, name)))?;
        Ok((shared, outcome))
    }

    /// At start: takes over the pods the records name. A pod whose sandbox is ready is
    /// adopted as it runs (containers that run or ran are kept; missing ones are started); one
    /// without a ready sandbox was half made (or its VM died): what exists is removed and it
    /// starts again from its manifest; a pod that had ended stays as it was; a deletion under
    /// way is finished; a sandbox of this agent that no record names is removed.
    pub async fn recover(&self) -> Result<(), kite_cri::CriError> {
        let (records, errors) = self.store.load_all();
        for e in errors {
            tracing::warn!(error = %kite_protocol::errors::error_chain(&e), "skip a pod record");
        }
        let mut cri = self.ctx.cri.clone();
        let agent = self.ctx.config.agent_id.clone();
        let sandboxes = cri
            .list_pod_sandboxes(&[(LABEL_AGENT, agent.as_str())])
            .await?;
        let mut by_uid: HashMap<String, Vec<_>> = HashMap::new();
        for s in sandboxes {
            let uid = s.labels.get(LABEL_POD_UID).cloned().unwrap_or_default();
            by_uid.entry(uid).or_default().push(s);
        }
        for record in records {
            let mut mine = by_uid.remove(&record.uid).unwrap_or_default();
            // The newest first.
            mine.sort_by_key(|s| std::cmp::Reverse(s.created_at));
            let pod_name = key_text(&record.namespace, &record.name);
            let key = (record.namespace.clone(), record.name.clone());
            if self.pods.lock().expect("pods lock").contains_key(&key) {
                tracing::error!(pod = %pod_name, uid = %record.uid, "two records name this pod; this one is skipped");
                continue;
            }
            let plan = match manifest::parse(&record.manifest_json, &record.runtime_class) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(pod = %pod_name, error = %e, "the record's manifest no longer parses; removing the pod");
                    remove_sandboxes(&mut cri, &mine).await;
                    let _ = self.store.remove(&record.uid);
                    continue;
                }
            };
            let order =
                StartOrder::parse(&record.start_order).unwrap_or(self.ctx.config.start_order);
            let shared = Arc::new(PodShared::new(record.clone(), self.store.clone()));
            if record.phase == "Terminating" {
                // Its deletion was under way: finish it.
                let entry = self.spawn(plan, order, shared, Begin::Ended);
                let (reply, done) = oneshot::channel();
                let _ = entry
                    .commands
                    .send(PodCommand::Delete { grace: None, reply })
                    .await;
                let _ = done.await;
                tracing::info!(pod = %pod_name, "finished the deletion a previous agent began");
                continue;
            }
            let begin = if matches!(record.phase.as_str(), "Failed" | "Succeeded") {
                Begin::Ended
            } else {
                match adoptable(&mut cri, &mine).await {
                    Some((sandbox_id, containers)) => {
                        let extra: Vec<_> = mine
                            .iter()
                            .filter(|s| s.id != sandbox_id)
                            .cloned()
                            .collect();
                        remove_sandboxes(&mut cri, &extra).await;
                        tracing::info!(pod = %pod_name, sandbox = %sandbox_id, "adopting the running pod");
                        Begin::Adopt {
                            sandbox_id,
                            containers,
                        }
                    }
                    None => {
                        tracing::info!(pod = %pod_name, sandboxes = mine.len(), "the pod was half made: removing it and starting it again");
                        remove_sandboxes(&mut cri, &mine).await;
                        shared.update(|p| {
                            p.stages.clear();
                            p.containers.clear();
                            p.sandbox_id.clear();
                            p.ip.clear();
                            p.phase = "Pending".into();
                            p.ready = false;
                            // A sandbox being made when the agent died may still hold the name.
                            p.sandbox_attempt += 1;
                        });
                        Begin::Start {
                            bind: Instant::now(),
                        }
                    }
                }
            };
            let entry = self.spawn(plan, order, shared, begin);
            self.pods.lock().expect("pods lock").insert(key, entry);
        }
        // Sandboxes no record names: made by an agent that died before it recorded the pod,
        // or whose deletion it finished but for these.
        for (uid, rest) in by_uid {
            tracing::info!(pod_uid = %uid, sandboxes = rest.len(), "removing sandboxes no pod record names");
            remove_sandboxes(&mut cri, &rest).await;
        }
        let n = self.pods.lock().expect("pods lock").len();
        self.ctx
            .metrics
            .pods
            .set(i64::try_from(n).unwrap_or(i64::MAX));
        Ok(())
    }
}

/// The pod's ready sandbox (the newest), with the newest instance of each container that runs
/// or ran in it (by name: id, attempt). Instances that never started (the agent died between
/// create and start) are removed: the worker starts those containers again.
async fn adoptable(
    cri: &mut kite_cri::CriClient,
    sandboxes: &[kite_cri::api::PodSandbox],
) -> Option<(String, BTreeMap<String, (String, u32)>)> {
    use kite_cri::api::ContainerState;
    let sandbox = sandboxes
        .iter()
        .find(|s| s.state == PodSandboxState::SandboxReady as i32)?;
    let containers = cri.list_containers(&sandbox.id).await.ok()?;
    let mut found: BTreeMap<String, (String, u32)> = BTreeMap::new();
    for c in containers {
        let Some(name) = c.labels.get(LABEL_CONTAINER).cloned() else {
            continue;
        };
        let ran = c.state == ContainerState::ContainerRunning as i32
            || c.state == ContainerState::ContainerExited as i32;
        if !ran {
            if let Err(e) = cri.remove_container(&c.id).await {
                tracing::warn!(container = %c.id, error = %e, "remove a container that never started");
            }
            continue;
        }
        let attempt = c.metadata.as_ref().map(|m| m.attempt).unwrap_or(0);
        if found.get(&name).is_none_or(|(_, a)| attempt >= *a) {
            found.insert(name, (c.id.clone(), attempt));
        }
    }
    Some((sandbox.id.clone(), found))
}

async fn remove_sandboxes(cri: &mut kite_cri::CriClient, sandboxes: &[kite_cri::api::PodSandbox]) {
    for s in sandboxes {
        let stop = cri.stop_pod_sandbox(&s.id).await;
        if let Err(e) = stop.and(cri.remove_pod_sandbox(&s.id).await) {
            tracing::warn!(sandbox = %s.id, error = %e, "remove sandbox");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_says_what_was_wanted_and_what_is_free() {
        let alloc = Capacity {
            cpu_millis: 1800,
            memory_bytes: 4 << 30,
        };
        let used = Capacity {
            cpu_millis: 1000,
            memory_bytes: 1 << 30,
        };
        let fits = Resources {
            cpu_millis: Some(800),
            memory_bytes: Some(3 << 30),
        };
        assert!(admit("default/a", fits, used, alloc).is_ok());
        let too_big = Resources {
            cpu_millis: Some(900),
            memory_bytes: None,
        };
        let e = admit("default/b", too_big, used, alloc)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "pod default/b does not fit on this node: it requests cpu 900m, memory 0; \
             cpu 800m, memory 3Gi of cpu 1800m, memory 4Gi allocatable is free"
        );
    }
}
