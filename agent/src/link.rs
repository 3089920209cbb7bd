//! The agent's link to the coordinator (`[agent.coordinator]`): it joins the cluster once with
//! a bootstrap token (its key never leaves the node: the coordinator signs a CSR), then holds
//! one stream to the coordinator over mutual TLS — the node dials out, nothing listens.
//!
//! Over the stream the coordinator sends the node's assignments (all first, then changes) and
//! prefetch orders; the agent makes its pods match them — runs the new ones at once (the bind
//! starts the fetch), updates in place the ones whose images or env changed, removes those no
//! longer assigned (also after being cut off: the full set it gets on reconnecting is the
//! truth) — and sends its status, its pods and heartbeats.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kite_protocol::cluster::node_link_client::NodeLinkClient;
use kite_protocol::cluster::{
    coordinator_message, node_message, Assignment, Assignments, CallResult, Heartbeat, JoinRequest,
    NodeCall, NodeHello, NodeMessage, NodeStatus, PodReport, PodReports, PrefetchReport,
};
use kite_protocol::node::Pod;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::node::{AgentError, Node};
use crate::status::now_ms;

/// The annotation the coordinator puts on its pods (the app's `namespace/name`): a pod with it
/// is the coordinator's to remove.
pub const APP_ANNOTATION: &str = "kite.io/app";

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorLinkConfig {
    /// The coordinator's `host:port`, or every coordinator of a highly available set
    /// (comma-separated: the node links to whichever leads, and follows the leadership when it
    /// moves); "" runs the agent on its own (kitectl on the node only).
    pub address: String,
    /// The cluster's CA certificate: the only one the agent trusts for the coordinator.
    pub ca_file: PathBuf,
    /// A bootstrap token (`kitectl token create`), needed only until the node has joined; or
    /// a file holding it.
    pub token: String,
    pub token_file: PathBuf,
    /// The node's name in the cluster ("" → the machine's hostname).
    pub node_name: String,
    /// The node's key and certificate ("" → `<state_dir>/coordinator`).
    pub credentials_dir: PathBuf,
    pub heartbeat_secs: u64,
    /// How often the pods' states are compared and changes reported.
    pub report_ms: u64,
}

impl Default for CoordinatorLinkConfig {
    fn default() -> Self {
        Self {
            address: String::new(),
            ca_file: "/etc/kite/pki/ca.crt".into(),
            token: String::new(),
            token_file: PathBuf::new(),
            node_name: String::new(),
            credentials_dir: PathBuf::new(),
            heartbeat_secs: 2,
            report_ms: 250,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the node has not joined and [agent.coordinator] has no token (token or token_file)")]
    NoToken,
    #[error("make the node's key and certificate request: {0}")]
    Csr(String),
    #[error("find the leading coordinator")]
    NoLeader(#[source] kite_protocol::cluster::NoLeader),
    #[error("the coordinator at {address} refused {call}: {message}")]
    Refused {
        address: String,
        call: &'static str,
        message: String,
        code: tonic::Code,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> LinkError + 'a {
    move |source| LinkError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A key and a certificate request for it naming `name` (what a joining node sends; the key
/// stays on the node).
pub fn new_csr(name: &str) -> Result<(String, String), String> {
    let key = rcgen::KeyPair::generate().map_err(|e| format!("generate a key: {e}"))?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let csr = params
        .serialize_request(&key)
        .map_err(|e| format!("make a certificate signing request: {e}"))?;
    let pem = csr.pem().map_err(|e| format!("encode the request: {e}"))?;
    Ok((key.serialize_pem(), pem))
}

/// The node's credentials: key, certificate and the cluster's CA.
struct Credentials {
    key_pem: String,
    cert_pem: String,
    ca_pem: String,
}

fn node_name(config: &CoordinatorLinkConfig) -> String {
    if !config.node_name.is_empty() {
        return config.node_name.clone();
    }
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "node".into())
        .to_lowercase()
}

fn credentials_dir(config: &CoordinatorLinkConfig, state_dir: &Path) -> PathBuf {
    if config.credentials_dir.as_os_str().is_empty() {
        state_dir.join("coordinator")
    } else {
        config.credentials_dir.clone()
    }
}

/// The node's credentials, joining the cluster first if it has none.
async fn credentials(
    config: &CoordinatorLinkConfig,
    dir: &Path,
    name: &str,
) -> Result<Credentials, LinkError> {
    let (key_path, cert_path) = (dir.join("node.key"), dir.join("node.crt"));
    let ca_pem = std::fs::read_to_string(&config.ca_file).map_err(io("read", &config.ca_file))?;
    if cert_path.exists() {
        return Ok(Credentials {
            key_pem: std::fs::read_to_string(&key_path).map_err(io("read", &key_path))?,
            cert_pem: std::fs::read_to_string(&cert_path).map_err(io("read", &cert_path))?,
            ca_pem,
        });
    }
    let token = if !config.token.is_empty() {
        config.token.clone()
    } else if !config.token_file.as_os_str().is_empty() {
        std::fs::read_to_string(&config.token_file)
            .map_err(io("read", &config.token_file))?
            .trim()
            .to_string()
    } else {
        return Err(LinkError::NoToken);
    };
    let (key_pem, csr_pem) = new_csr(name).map_err(LinkError::Csr)?;
    let (channel, leader) = kite_protocol::cluster::connect_leader(
        &kite_protocol::cluster::addresses(&config.address),
        &ca_pem,
        None,
        LEADER_WAIT,
    )
    .await
    .map_err(LinkError::NoLeader)?;
    let answer = NodeLinkClient::new(channel)
        .join(JoinRequest {
            token,
            node_name: name.into(),
            csr_pem,
        })
        .await
        .map_err(|s| LinkError::Refused {
            address: leader.clone(),
            call: "the join",
            message: s.message().to_string(),
            code: s.code(),
        })?
        .into_inner();
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    kite_config::files::write_durable(&key_path, key_pem.as_bytes(), 0o600)
        .map_err(io("write", &key_path))?;
    kite_config::files::write_durable(&cert_path, answer.cert_pem.as_bytes(), 0o644)
        .map_err(io("write", &cert_path))?;
    tracing::info!(node = %name, cluster = %answer.cluster_name, "joined the cluster");
    Ok(Credentials {
        key_pem,
        cert_pem: answer.cert_pem,
        ca_pem,
    })
}

/// A pod's containers' images and env values (from a pod manifest or a pod template, JSON):
/// container → (image, env). What an in-place update changes, so what tells two revisions'
/// pods apart.
pub fn container_specs(pod: &Value) -> BTreeMap<String, (String, BTreeMap<String, String>)> {
    pod.pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| {
            let name = c.get("name")?.as_str()?.to_string();
            let image = c.get("image")?.as_str()?.to_string();
            let env = c
                .get("env")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|v| {
                    Some((
                        v.get("name")?.as_str()?.to_string(),
                        v.get("value")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    ))
                })
                .collect();
            Some((name, (image, env)))
        })
        .collect()
}

/// The changes (container, image, env) that make `running` run `wanted`'s images and env.
fn changes(running: &Value, wanted: &Value) -> Vec<(String, String, BTreeMap<String, String>)> {
    let now = container_specs(running);
    container_specs(wanted)
        .into_iter()
        .filter_map(|(name, (image, env))| {
            let (cur_image, cur_env) = now.get(&name)?;
            let image = if *cur_image == image {
                String::new()
            } else {
                image
            };
            let env: BTreeMap<String, String> = env
                .into_iter()
                .filter(|(k, v)| cur_env.get(k) != Some(v))
                .collect();
            (!image.is_empty() || !env.is_empty()).then_some((name, image, env))
        })
        .collect()
}

/// The agent's side of the assignments.
#[derive(Default)]
struct Assigned {
    pods: BTreeMap<String, Assignment>,
    /// A full set arrived: pods of the coordinator's outside it may go.
    complete: bool,
    /// Pods whose start was refused, by revision, and why.
    run_failed: HashMap<String, (u64, String)>,
    /// Pods whose update to a revision failed, and why.
    update_failed: HashMap<String, (u64, String)>,
    /// Pods being updated or removed now.
    busy: HashSet<String>,
}

fn pod_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// How long a connection attempt looks for the leading coordinator (an election takes up to the
/// leader's lease TTL): the node links as soon as one leads.
const LEADER_WAIT: Duration = Duration::from_secs(30);

/// Runs the link until `stop`: joins if needed, then connects, and reconnects when cut off.
pub async fn run(
    node: Arc<Node>,
    config: CoordinatorLinkConfig,
    state_dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) {
    let name = node_name(&config);
    let dir = credentials_dir(&config, &state_dir);
    let assigned = Arc::new(std::sync::Mutex::new(Assigned::default()));
    let mut delay = Duration::from_millis(500);
    loop {
        let attempt = async {
            let creds = credentials(&config, &dir, &name).await?;
            session(&node, &config, &name, &creds, &assigned).await
        };
        let result = tokio::select! {
            r = attempt => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        match result {
            Ok(()) => {
                tracing::info!(node = %name, "the coordinator closed the link; reconnecting");
                delay = Duration::from_millis(500);
            }
            Err(e) => {
                let message = kite_protocol::errors::error_chain(&e);
                // A refusal will not pass by itself; a coordinator that went away (restarted,
                // cut off) comes back, and the node reconnects at once.
                let refused = matches!(
                    &e,
                    LinkError::Refused { code, .. } if matches!(
                        code,
                        tonic::Code::PermissionDenied
                            | tonic::Code::Unauthenticated
                            | tonic::Code::AlreadyExists
                            | tonic::Code::InvalidArgument
                    )
                );
                if refused || matches!(e, LinkError::NoToken | LinkError::Io { .. }) {
                    tracing::error!(node = %name, error = %message, "coordinator link");
                    delay = Duration::from_secs(30);
                } else {
                    tracing::warn!(node = %name, error = %message, "coordinator link; retrying");
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

async fn node_status(node: &Node) -> NodeStatus {
    let (allocatable, used) = node.capacity();
    let mut layers = Vec::new();
    let mut cri = node.context().cri.clone();
    match cri.list_images().await {
        Ok(images) => {
            for (refs, _) in images {
                layers.extend(refs);
            }
        }
        Err(e) => tracing::warn!(error = %e, "list images for the coordinator"),
    }
    // Images being pulled for pods that are still starting.
    let fetching = node
        .list("")
        .into_iter()
        .filter(|p| p.phase == "Pending")
        .flat_map(|p| {
            container_specs(&serde_json::from_str(&p.manifest_json).unwrap_or(Value::Null))
        })
        .map(|(_, (image, _))| image)
        .filter(|i| !layers.contains(i))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    NodeStatus {
        allocatable_cpu_millis: allocatable.cpu_millis,
        allocatable_memory_bytes: allocatable.memory_bytes,
        used_cpu_millis: used.cpu_millis,
        used_memory_bytes: used.memory_bytes,
        runtime_classes: vec!["kite".into(), "runc".into()],
        layers,
        fetching,
        java_archives: Vec::new(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// The report of an assigned pod.
fn report(a: &Assignment, pod: Option<&Pod>, assigned: &Assigned) -> PodReport {
    let key = pod_key(&a.namespace, &a.name);
    let mut r = PodReport {
        namespace: a.namespace.clone(),
        name: a.name.clone(),
        phase: "Pending".into(),
        ..Default::default()
    };
    if let Some((rev, why)) = assigned.update_failed.get(&key) {
        if *rev == a.revision {
            r.update_error = why.clone();
        }
    }
    let Some(pod) = pod else {
        if let Some((rev, why)) = assigned.run_failed.get(&key) {
            if *rev == a.revision {
                r.phase = "Failed".into();
                r.message = why.clone();
            }
        }
        return r;
    };
    let wanted: Value = serde_json::from_str(&a.manifest_json).unwrap_or(Value::Null);
    let running: Value = serde_json::from_str(&pod.manifest_json).unwrap_or(Value::Null);
    r.revision = if changes(&running, &wanted).is_empty() {
        a.revision
    } else {
        0
    };
    r.phase = pod.phase.clone();
    r.ready = pod.ready;
    r.ip = pod.ip.clone();
    r.message = pod.message.clone();
    r.ready_ms = pod
        .stages
        .iter()
        .find(|s| s.name == "ready")
        .map(|s| s.start_ms + s.duration_ms)
        .unwrap_or(0);
    r.stages = pod.stages.clone();
    r.events = pod.events.iter().rev().take(10).rev().cloned().collect();
    r
}

/// The node's pods, by `namespace/name`: read once per round, for both the reconcile and the
/// reports.
fn node_pods(node: &Node) -> BTreeMap<String, Pod> {
    node.list("")
        .into_iter()
        .map(|p| (pod_key(&p.namespace, &p.name), p))
        .collect()
}

/// Makes the node's pods match the assignments (what is not under way already).
fn reconcile(
    node: &Arc<Node>,
    assigned: &Arc<std::sync::Mutex<Assigned>>,
    pods: &BTreeMap<String, Pod>,
) {
    let mut a = assigned.lock().expect("assigned lock");
    remove_unassigned(node, assigned, pods, &mut a);
    let wanted: Vec<Assignment> = a.pods.values().cloned().collect();
    for w in wanted {
        let key = pod_key(&w.namespace, &w.name);
        if a.busy.contains(&key) {
            continue;
        }
        match pods.get(&key) {
            None => {
                if a.run_failed
                    .get(&key)
                    .is_some_and(|(rev, _)| *rev == w.revision)
                {
                    continue;
                }
                match node.run_pod(&w.manifest_json) {
                    Ok(_) => {
                        tracing::info!(pod = %key, revision = w.revision, "assigned: starting");
                    }
                    Err(AgentError::AlreadyExists(_)) => {}
                    // Room may come (a pod being removed): tried again next round.
                    Err(e @ AgentError::DoesNotFit { .. }) => {
                        tracing::debug!(pod = %key, error = %e, "assigned pod waits for room");
                    }
                    Err(e) => {
                        let why = kite_protocol::errors::error_chain(&e);
                        tracing::warn!(pod = %key, error = %why, "assigned pod refused");
                        a.run_failed.insert(key, (w.revision, why));
                    }
                }
            }
            Some(pod) if pod.phase == "Terminating" || pod.containers.is_empty() => {}
            Some(pod) => {
                if a.update_failed
                    .get(&key)
                    .is_some_and(|(rev, _)| *rev == w.revision)
                {
                    continue;
                }
                let wanted: Value = serde_json::from_str(&w.manifest_json).unwrap_or(Value::Null);
                let running: Value =
                    serde_json::from_str(&pod.manifest_json).unwrap_or(Value::Null);
                let todo = changes(&running, &wanted);
                if todo.is_empty() {
                    continue;
                }
                a.busy.insert(key.clone());
                let (node, assigned) = (node.clone(), assigned.clone());
                let (ns, name, revision) = (w.namespace.clone(), w.name.clone(), w.revision);
                tokio::spawn(async move {
                    tracing::info!(pod = %key, revision, "assigned a new revision: updating in place");
                    let mut failure = None;
                    for (container, image, env) in todo {
                        let outcome = match node.update(&ns, &name, &container, &image, env).await {
                            Ok((_, outcome)) => outcome
                                .await
                                .unwrap_or_else(|_| Err("the update was cut short".into())),
                            Err(e) => Err(kite_protocol::errors::error_chain(&e)),
                        };
                        if let Err(why) = outcome {
                            failure = Some(format!("container {container}: {why}"));
                            break;
                        }
                    }
                    let mut a = assigned.lock().expect("assigned lock");
                    a.busy.remove(&key);
                    if let Some(why) = failure {
                        tracing::warn!(pod = %key, revision, error = %why, "in-place update failed");
                        a.update_failed.insert(key, (revision, why));
                    }
                });
            }
        }
    }
}

/// Removes the coordinator's pods that the assignments no longer name (once a full set
/// arrived), before new ones start: their room is what a recreated pod needs.
fn remove_unassigned(
    node: &Arc<Node>,
    assigned: &Arc<std::sync::Mutex<Assigned>>,
    pods: &BTreeMap<String, Pod>,
    a: &mut Assigned,
) {
    if !a.complete {
        return;
    }
    for (key, pod) in pods {
        let ours = serde_json::from_str::<Value>(&pod.manifest_json)
            .ok()
            .and_then(|m| {
                m.pointer("/metadata/annotations")
                    .and_then(|a| a.get(APP_ANNOTATION))
                    .map(|_| ())
            })
            .is_some();
        if !ours || a.pods.contains_key(key) || a.busy.contains(key) || pod.phase == "Terminating" {
            continue;
        }
        a.busy.insert(key.clone());
        let (node, assigned) = (node.clone(), assigned.clone());
        let (ns, name, key) = (pod.namespace.clone(), pod.name.clone(), key.clone());
        tokio::spawn(async move {
            tracing::info!(pod = %key, "no longer assigned to this node: removing");
            if let Err(e) = node.delete(&ns, &name, None).await {
                tracing::warn!(pod = %key, error = %e, "remove a pod no longer assigned");
            }
            assigned.lock().expect("assigned lock").busy.remove(&key);
        });
    }
}

fn apply_assignments(assigned: &mut Assigned, change: Assignments) {
    if change.full {
        assigned.pods.clear();
        assigned.complete = true;
    }
    for p in change.removed {
        let key = pod_key(&p.namespace, &p.name);
        assigned.pods.remove(&key);
        assigned.run_failed.remove(&key);
        assigned.update_failed.remove(&key);
    }
    for p in change.pods {
        assigned.pods.insert(pod_key(&p.namespace, &p.name), p);
    }
}

/// The reports of the assigned pods.
fn reports(pods: &BTreeMap<String, Pod>, assigned: &Assigned) -> BTreeMap<String, PodReport> {
    assigned
        .pods
        .iter()
        .map(|(k, a)| (k.clone(), report(a, pods.get(k), assigned)))
        .collect()
}

/// One connection: hello, then assignments in and reports out until the stream ends.
async fn session(
    node: &Arc<Node>,
    config: &CoordinatorLinkConfig,
    name: &str,
    creds: &Credentials,
    assigned: &Arc<std::sync::Mutex<Assigned>>,
) -> Result<(), LinkError> {
    let (channel, leader) = kite_protocol::cluster::connect_leader(
        &kite_protocol::cluster::addresses(&config.address),
        &creds.ca_pem,
        Some((&creds.cert_pem, &creds.key_pem)),
        LEADER_WAIT,
    )
    .await
    .map_err(LinkError::NoLeader)?;
    let refused = |call: &'static str| {
        let address = leader.clone();
        move |s: tonic::Status| LinkError::Refused {
            address,
            call,
            message: s.message().to_string(),
            code: s.code(),
        }
    };
    let (tx, rx) = mpsc::channel::<NodeMessage>(256);
    let mut sent = {
        let a = assigned.lock().expect("assigned lock");
        reports(&node_pods(node), &a)
    };
    let mut last_status = node_status(node).await;
    let mut last_status_sent = std::time::Instant::now();
    let hello = NodeHello {
        name: name.into(),
        status: Some(last_status.clone()),
        pods: Some(PodReports {
            full: true,
            pods: sent.values().cloned().collect(),
        }),
    };
    let send = |m: node_message::Msg| NodeMessage { msg: Some(m) };
    tx.send(send(node_message::Msg::Hello(hello)))
        .await
        .expect("the receiver is alive");
    let mut inbound = NodeLinkClient::new(channel)
        .link(ReceiverStream::new(rx))
        .await
        .map_err(refused("the node link"))?
        .into_inner();
    tracing::info!(node = %name, coordinator = %leader, "linked to the coordinator");
    let mut report_tick = tokio::time::interval(Duration::from_millis(config.report_ms.max(50)));
    let mut heartbeat = tokio::time::interval(Duration::from_secs(config.heartbeat_secs.max(1)));
    let mut status_tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            message = inbound.message() => {
                let Some(m) = message.map_err(refused("the node link"))? else { return Ok(()) };
                match m.msg {
                    Some(coordinator_message::Msg::Assignments(change)) => {
                        apply_assignments(&mut assigned.lock().expect("assigned lock"), change);
                        reconcile(node, assigned, &node_pods(node));
                    }
                    Some(coordinator_message::Msg::Prefetch(order)) => {
                        for image in order.images {
                            tokio::spawn(prefetch(node.clone(), image, tx.clone()));
                        }
                    }
                    Some(coordinator_message::Msg::Call(call)) => {
                        let assigned_here = call.call.as_ref().is_some_and(|c| {
                            assigned
                                .lock()
                                .expect("assigned lock")
                                .pods
                                .contains_key(&pod_key(&c.namespace, &c.name))
                        });
                        tokio::spawn(answer_call(node.clone(), call, assigned_here, tx.clone()));
                    }
                    None => {}
                }
            }
            _ = report_tick.tick() => {
                let pods = node_pods(node);
                reconcile(node, assigned, &pods);
                let now = reports(&pods, &assigned.lock().expect("assigned lock"));
                let mut changed: Vec<PodReport> = now
                    .iter()
                    .filter(|(k, r)| sent.get(*k) != Some(r))
                    .map(|(_, r)| r.clone())
                    .collect();
                changed.extend(sent.iter().filter(|(k, _)| !now.contains_key(*k)).map(|(_, r)| PodReport {
                    phase: "Gone".into(),
                    ..r.clone()
                }));
                if !changed.is_empty() {
                    let m = send(node_message::Msg::Pods(PodReports { full: false, pods: changed }));
                    if tx.send(m).await.is_err() {
                        return Ok(());
                    }
                }
                sent = now;
            }
            _ = heartbeat.tick() => {
                let m = send(node_message::Msg::Heartbeat(Heartbeat { unix_ms: now_ms() }));
                if tx.send(m).await.is_err() {
                    return Ok(());
                }
            }
            _ = status_tick.tick() => {
                // Sent when it changed (an image pulled, a pod's requests), at least every 30 s.
                let status = node_status(node).await;
                if status != last_status || last_status_sent.elapsed() >= Duration::from_secs(30) {
                    let m = send(node_message::Msg::Status(status.clone()));
                    if tx.send(m).await.is_err() {
                        return Ok(());
                    }
                    last_status = status;
                    last_status_sent = std::time::Instant::now();
                }
            }
        }
    }
}

/// The most of a relayed call's output (stdout and stderr each) sent back: the link's
/// messages stay well under gRPC's 4 MiB; the end of the output is what is kept.
const CALL_OUTPUT_MAX: usize = 1 << 20;

fn tail(mut bytes: Vec<u8>, max: usize) -> Vec<u8> {
    if bytes.len() > max {
        bytes.drain(..bytes.len() - max);
    }
    bytes
}

/// Answers a relayed call (logs or exec) on one of the node's assigned pods, through the node
/// API's own handlers.
async fn answer_call(
    node: Arc<Node>,
    call: NodeCall,
    assigned_here: bool,
    tx: mpsc::Sender<NodeMessage>,
) {
    use kite_protocol::node::node_agent_server::NodeAgent;
    use kite_protocol::node::{ExecRequest, LogsRequest, PodRef};
    let mut result = CallResult {
        id: call.id,
        ..Default::default()
    };
    let c = call.call.unwrap_or_default();
    let pod = Some(PodRef {
        namespace: c.namespace.clone(),
        name: c.name.clone(),
    });
    let api = crate::server::NodeApi::new(node);
    if !assigned_here {
        result.error = format!(
            "pod {}/{} is not assigned to this node",
            c.namespace, c.name
        );
    } else if call.kind == "exec" {
        let request = tonic::Request::new(ExecRequest {
            pod,
            container: c.container,
            command: c.command,
            timeout_secs: c.timeout_secs,
        });
        match api.exec(request).await {
            Ok(r) => {
                let r = r.into_inner();
                result.exit_code = r.exit_code;
                result.stdout = tail(r.stdout, CALL_OUTPUT_MAX);
                result.stderr = tail(r.stderr, CALL_OUTPUT_MAX);
            }
            Err(s) => result.error = s.message().to_string(),
        }
    } else if call.kind == "logs" {
        let request = tonic::Request::new(LogsRequest {
            pod,
            container: c.container,
            follow: false,
            previous: c.previous,
        });
        let limit = if c.limit_bytes == 0 {
            1 << 20
        } else {
            c.limit_bytes
        };
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        match api.logs(request).await {
            Ok(stream) => {
                use futures::StreamExt;
                let mut stream = stream.into_inner();
                while let Some(chunk) = stream.next().await {
                    match chunk {
                        Ok(c) => {
                            result.stdout.extend_from_slice(&c.data);
                            if result.stdout.len() > limit.saturating_mul(2) {
                                result.stdout.drain(..result.stdout.len() - limit);
                            }
                        }
                        Err(s) => {
                            result.error = s.message().to_string();
                            break;
                        }
                    }
                }
                if result.stdout.len() > limit {
                    result.stdout.drain(..result.stdout.len() - limit);
                }
            }
            Err(s) => result.error = s.message().to_string(),
        }
    } else {
        result.error = format!("unknown call {:?}", call.kind);
    }
    let _ = tx
        .send(NodeMessage {
            msg: Some(node_message::Msg::Result(result)),
        })
        .await;
}

/// Fetches an image ahead of an update: the snapshotter's prefetch (lazy layers), then the
/// pull, reporting the outcome.
async fn prefetch(node: Arc<Node>, image: String, tx: mpsc::Sender<NodeMessage>) {
    let report = |state: &str, error: String| NodeMessage {
        msg: Some(node_message::Msg::Prefetch(PrefetchReport {
            image: image.clone(),
            state: state.into(),
            error,
        })),
    };
    let _ = tx.send(report("fetching", String::new())).await;
    let ctx = node.context();
    let socket = ctx.config.prefetch_socket.clone();
    if !socket.as_os_str().is_empty() && socket.exists() {
        if let Err(e) = kite_protocol::prefetch_client::prefetch(&socket, &image, |_| {}).await {
            tracing::info!(image = %image, error = %e, "prefetch (the pull goes on)");
        }
    }
    let mut cri = ctx.cri.clone();
    let outcome = match cri.pull_image(&image).await {
        Ok(_) => report("done", String::new()),
        Err(e) => report("failed", kite_protocol::errors::error_chain(&e)),
    };
    let _ = tx.send(outcome).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(image: &str, env: &[(&str, &str)]) -> Value {
        let env: Vec<Value> = env
            .iter()
            .map(|(k, v)| json!({"name": k, "value": v}))
            .collect();
        json!({"spec": {"containers": [{"name": "web", "image": image, "env": env}]}})
    }

    #[test]
    fn changes_are_what_an_in_place_update_sets() {
        let running = pod("a:1", &[("COLOR", "blue"), ("X", "1")]);
        assert!(changes(&running, &pod("a:1", &[("COLOR", "blue")])).is_empty());
        let todo = changes(&running, &pod("a:2", &[("COLOR", "green"), ("X", "1")]));
        assert_eq!(todo.len(), 1);
        let (c, image, env) = &todo[0];
        assert_eq!((c.as_str(), image.as_str()), ("web", "a:2"));
        assert_eq!(env.len(), 1);
        assert_eq!(env["COLOR"], "green");
    }

    #[test]
    fn a_full_set_replaces_and_changes_add_or_remove() {
        let a = |name: &str, rev| Assignment {
            namespace: "default".into(),
            name: name.into(),
            app: "default/web".into(),
            revision: rev,
            manifest_json: "{}".into(),
        };
        let mut s = Assigned::default();
        apply_assignments(
            &mut s,
            Assignments {
                full: false,
                pods: vec![a("x", 1)],
                removed: vec![],
            },
        );
        assert!(!s.complete, "changes before a full set remove nothing");
        apply_assignments(
            &mut s,
            Assignments {
                full: true,
                pods: vec![a("y", 1)],
                removed: vec![],
            },
        );
        assert!(s.complete);
        assert_eq!(s.pods.keys().collect::<Vec<_>>(), vec!["default/y"]);
        s.update_failed.insert("default/y".into(), (1, "no".into()));
        apply_assignments(
            &mut s,
            Assignments {
                full: false,
                pods: vec![a("z", 2)],
                removed: vec![kite_protocol::cluster::PodKey {
                    namespace: "default".into(),
                    name: "y".into(),
                }],
            },
        );
        assert_eq!(s.pods.keys().collect::<Vec<_>>(), vec!["default/z"]);
        assert!(s.update_failed.is_empty());
    }

    #[test]
    fn a_joining_node_makes_its_own_key() {
        let (key, csr) = new_csr("node-1").unwrap();
        assert!(key.contains("PRIVATE KEY"));
        assert!(csr.contains("CERTIFICATE REQUEST"));
    }
}
