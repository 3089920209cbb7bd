//! The cluster's state: what is desired (apps, their pods' assignments, nodes, tokens) in the
//! [`Store`], with a cache of it in memory, and what the nodes report (status, heartbeats,
//! their pods) in memory only — a restarted coordinator hears it again when they reconnect.
//!
//! Every change goes through [`Cluster::commit`]: a transaction guarded by the revisions the
//! cache holds (a second writer's change is a conflict, never lost), then the cache, then the
//! nodes whose assignments changed are woken (their link sends the difference).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kite_protocol::cluster::{self as api, CoordinatorMessage};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, watch, Notify};

use crate::app::{self, Strategy};
use crate::config::CoordinatorConfig;
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::store::{Commit, Guard, Store, StoreError, Txn};

pub const APPS: &str = "/apps/";
pub const PODS: &str = "/pods/";
pub const NODES: &str = "/nodes/";
pub const TOKENS: &str = "/tokens/";

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{key} changed under this coordinator (now at revision {revision}); try again")]
    Conflict { key: String, revision: u64 },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("record {key} in the store is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("this coordinator does not lead (any more); nothing was written")]
    NotLeader,
}

impl ClusterError {
    /// The write was refused because another coordinator leads (or may lead) now.
    pub fn is_not_leader(&self) -> bool {
        matches!(
            self,
            ClusterError::NotLeader | ClusterError::Store(StoreError::NotLeader { .. })
        )
    }
}

/// A revision of an app's pod template.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RevisionRecord {
    pub number: u64,
    pub template: Value,
    #[serde(default)]
    pub change_cause: String,
    pub created_ms: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutState {
    /// The nodes that run the app fetch the new images first.
    Prefetching,
    Updating,
    /// A batch failed: every pod goes back to the previous revision.
    RollingBack,
    Complete,
    RolledBack,
}

impl RolloutState {
    pub fn name(self) -> &'static str {
        match self {
            RolloutState::Prefetching => "Prefetching",
            RolloutState::Updating => "Updating",
            RolloutState::RollingBack => "RollingBack",
            RolloutState::Complete => "Complete",
            RolloutState::RolledBack => "RolledBack",
        }
    }

    pub fn finished(self) -> bool {
        matches!(self, RolloutState::Complete | RolloutState::RolledBack)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub from: u64,
    pub to: u64,
    pub strategy: Strategy,
    pub state: RolloutState,
    pub batch: u32,
    pub batch_started_ms: i64,
    pub started_ms: i64,
    #[serde(default)]
    pub finished_ms: i64,
    #[serde(default)]
    pub message: String,
    /// Nodes asked to prefetch, and when.
    #[serde(default)]
    pub prefetch_nodes: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConditionRecord {
    pub kind: String,
    pub status: bool,
    pub reason: String,
    pub message: String,
    pub unix_ms: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppRecord {
    pub namespace: String,
    pub name: String,
    pub created_ms: i64,
    /// The Deployment as last applied.
    pub manifest: Value,
    pub replicas: u32,
    pub prefer_recreate: bool,
    pub max_unavailable: Value,
    pub progress_deadline_secs: u64,
    pub revision_history_limit: usize,
    /// The revision the app's pods are to run.
    pub revision: u64,
    pub revisions: Vec<RevisionRecord>,
    #[serde(default)]
    pub paused: bool,
    #[serde(default)]
    pub rollout: Option<RolloutRecord>,
    #[serde(default)]
    pub conditions: Vec<ConditionRecord>,
}

impl AppRecord {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn template(&self, revision: u64) -> Option<&Value> {
        self.revisions
            .iter()
            .find(|r| r.number == revision)
            .map(|r| &r.template)
    }

    pub fn set_condition(&mut self, kind: &str, status: bool, reason: &str, message: String) {
        self.conditions.retain(|c| c.kind != kind);
        self.conditions.push(ConditionRecord {
            kind: kind.into(),
            status,
            reason: reason.into(),
            message,
            unix_ms: now_ms(),
        });
    }
}

/// A pod's assignment: which node runs it, at which revision of its app.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    /// `namespace/name` of the app.
    pub app: String,
    pub node: String,
    pub revision: u64,
    pub created_ms: i64,
}

impl PodRecord {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRecord {
    pub name: String,
    pub joined_ms: i64,
    #[serde(default)]
    pub cordoned: bool,
}

/// A value and the store revision of its last change.
#[derive(Clone, Debug)]
pub struct Stored<T> {
    pub value: T,
    pub rev: u64,
}

/// What a node's agent reports, and its link.
#[derive(Debug, Default)]
pub struct NodeLive {
    /// The link's id (a new connection replaces an old one).
    pub link: u64,
    pub tx: Option<mpsc::Sender<CoordinatorMessage>>,
    pub status: api::NodeStatus,
    pub last_heartbeat: Option<Instant>,
    pub last_heartbeat_ms: i64,
    pub reports: HashMap<String, api::PodReport>,
    /// image → fetching, done or failed.
    pub prefetch: HashMap<String, String>,
}

pub struct NodeEntry {
    pub record: Stored<NodeRecord>,
    pub live: NodeLive,
    /// Bumped when the node's assignments change: its link sends the difference.
    pub assigned: watch::Sender<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    Ready,
    NotReady,
    /// Not heard of since the coordinator started.
    Unknown,
}

impl NodeState {
    pub fn name(self) -> &'static str {
        match self {
            NodeState::Ready => "Ready",
            NodeState::NotReady => "NotReady",
            NodeState::Unknown => "Unknown",
        }
    }
}

#[derive(Default)]
pub struct Inner {
    pub apps: BTreeMap<String, Stored<AppRecord>>,
    pub pods: BTreeMap<String, Stored<PodRecord>>,
    pub nodes: BTreeMap<String, NodeEntry>,
    /// node → its pods' keys.
    pub by_node: BTreeMap<String, BTreeSet<String>>,
    /// app → its pods' keys.
    pub by_app: BTreeMap<String, BTreeSet<String>>,
    /// When each pod was bound (for the assignment latency), until its node reports it.
    pub bound_at: HashMap<String, Instant>,
    next_link: u64,
}

impl Inner {
    /// The desired state as the store holds it (nodes as never heard of).
    fn read(store: &dyn Store) -> Result<Inner, ClusterError> {
        let mut inner = Inner::default();
        for kv in store.list(NODES)? {
            let record: NodeRecord = decode(&kv.key, &kv.value)?;
            inner.nodes.insert(
                record.name.clone(),
                NodeEntry {
                    record: Stored {
                        value: record,
                        rev: kv.mod_revision,
                    },
                    live: NodeLive::default(),
                    assigned: watch::channel(0).0,
                },
            );
        }
        for kv in store.list(APPS)? {
            let record: AppRecord = decode(&kv.key, &kv.value)?;
            inner.apps.insert(
                record.key(),
                Stored {
                    value: record,
                    rev: kv.mod_revision,
                },
            );
        }
        for kv in store.list(PODS)? {
            let record: PodRecord = decode(&kv.key, &kv.value)?;
            let key = record.key();
            inner
                .by_node
                .entry(record.node.clone())
                .or_default()
                .insert(key.clone());
            inner
                .by_app
                .entry(record.app.clone())
                .or_default()
                .insert(key.clone());
            inner.pods.insert(
                key,
                Stored {
                    value: record,
                    rev: kv.mod_revision,
                },
            );
        }
        Ok(inner)
    }
}

/// One change of a transaction.
pub enum Op {
    PutApp(AppRecord),
    DeleteApp(String),
    PutPod(PodRecord),
    DeletePod(String),
    PutNode(NodeRecord),
    PutToken(String, Vec<u8>, Option<u64>),
}

pub struct Cluster {
    pub config: CoordinatorConfig,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub ca_pem: String,
    /// Whether this coordinator may act (always, with the embedded store).
    pub leadership: Arc<Leadership>,
    inner: Mutex<Inner>,
    /// Wakes the controllers.
    pub changed: Notify,
    /// Bumped on every change a watcher may show (apps, pods, reports).
    pub generation: watch::Sender<u64>,
    /// Since when this coordinator holds the state (its start, or its election): nodes not
    /// heard of since then get their timeouts from here.
    since: Mutex<Instant>,
    /// Calls relayed to nodes (logs, exec), by id: the node that must answer, and the caller.
    calls: Mutex<HashMap<u64, (String, tokio::sync::oneshot::Sender<api::CallResult>)>>,
    next_call: std::sync::atomic::AtomicU64,
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, ClusterError> {
    serde_json::from_slice(bytes).map_err(|e| ClusterError::Corrupt {
        key: key.into(),
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

impl Cluster {
    /// Loads the state from the store.
    pub fn load(
        config: CoordinatorConfig,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        ca_pem: String,
    ) -> Result<Cluster, ClusterError> {
        let inner = Inner::read(store.as_ref())?;
        let leadership = Leadership::solo(config.address());
        Ok(Cluster {
            config,
            store,
            metrics,
            ca_pem,
            leadership,
            inner: Mutex::new(inner),
            changed: Notify::new(),
            generation: watch::channel(0).0,
            since: Mutex::new(Instant::now()),
            calls: Mutex::new(HashMap::new()),
            next_call: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// A coordinator of a highly available set: it acts only while `leadership` says so, and
    /// holds no state until it wins ([`Cluster::reload`]).
    pub fn standby(
        config: CoordinatorConfig,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        ca_pem: String,
        leadership: Arc<Leadership>,
    ) -> Cluster {
        Cluster {
            config,
            store,
            metrics,
            ca_pem,
            leadership,
            inner: Mutex::new(Inner::default()),
            changed: Notify::new(),
            generation: watch::channel(0).0,
            since: Mutex::new(Instant::now()),
            calls: Mutex::new(HashMap::new()),
            next_call: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// Reads the state again (a won election: the last leader's writes are all in the store,
    /// and nothing else writes while this one leads). Node links of an earlier term are cut.
    pub fn reload(&self) -> Result<(), ClusterError> {
        let fresh = Inner::read(self.store.as_ref())?;
        self.replace(fresh);
        Ok(())
    }

    /// Drops the state (leadership lost): node links end (agents look for the new leader),
    /// relayed calls fail.
    pub fn forget(&self) {
        self.replace(Inner::default());
    }

    fn replace(&self, mut fresh: Inner) {
        {
            let mut inner = self.lock();
            // Link ids stay unique across terms: a link of an earlier term that detaches late
            // must not detach a new one.
            fresh.next_link = inner.next_link;
            *inner = fresh;
        }
        *self.since.lock().expect("since lock") = Instant::now();
        self.calls.lock().expect("calls lock").clear();
        self.poke();
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.try_lock() {
            Ok(g) => return g,
            Err(std::sync::TryLockError::Poisoned(e)) => panic!("cluster lock: {e}"),
            Err(std::sync::TryLockError::WouldBlock) => {}
        }
        // Held, perhaps by a commit waiting for the store (seconds, when etcd is slow). On an
        // async worker, the runtime hands the worker's other tasks (node links, their pings)
        // to another thread while this one waits.
        let flavor = tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor());
        if matches!(flavor, Ok(tokio::runtime::RuntimeFlavor::MultiThread)) {
            tokio::task::block_in_place(|| self.inner.lock().expect("cluster lock"))
        } else {
            self.inner.lock().expect("cluster lock")
        }
    }

    /// The state, for a change asked through the API: only while this coordinator leads
    /// (checked under the lock: the state is dropped under it when the leadership goes).
    pub fn lock_leading(&self) -> Result<MutexGuard<'_, Inner>, ClusterError> {
        let inner = self.lock();
        if self.leadership.is_leading() {
            Ok(inner)
        } else {
            Err(ClusterError::NotLeader)
        }
    }

    /// Wakes the controllers and the watchers.
    pub fn poke(&self) {
        self.changed.notify_one();
        self.generation.send_modify(|g| *g += 1);
    }

    /// Commits `ops` in one transaction guarded by the cached revisions, then applies them to
    /// the cache and wakes the nodes whose assignments changed.
    pub fn commit(&self, inner: &mut Inner, ops: Vec<Op>) -> Result<u64, ClusterError> {
        if ops.is_empty() {
            return Ok(0);
        }
        if !self.leadership.is_leading() {
            return Err(ClusterError::NotLeader);
        }
        let max = self.store.max_changes().max(1);
        if ops.len() <= max {
            return self.commit_one(inner, ops);
        }
        // Pods' assignments are independent of one another: a change larger than the store
        // takes at once (a scale-out by hundreds, on etcd) goes in several transactions, each
        // guarded as usual, the rest (an app's record) with the last. A failure part way leaves
        // a consistent state the next pass continues from.
        let (pods, mut rest): (Vec<Op>, Vec<Op>) = ops
            .into_iter()
            .partition(|o| matches!(o, Op::PutPod(_) | Op::DeletePod(_)));
        // A node's record (a drain's cordon) goes first: no replacement may land on it.
        if rest.iter().any(|o| matches!(o, Op::PutNode(_))) {
            let mut rev = self.commit_one(inner, std::mem::take(&mut rest))?;
            let mut pods = pods.into_iter().peekable();
            while pods.peek().is_some() {
                rev = self.commit_one(inner, pods.by_ref().take(max).collect())?;
            }
            return Ok(rev);
        }
        let mut pods = pods.into_iter().peekable();
        let mut rev = 0;
        while pods.peek().is_some() {
            let room = max.saturating_sub(rest.len());
            let mut chunk: Vec<Op> = pods.by_ref().take(max).collect();
            if pods.peek().is_none() && chunk.len() <= room {
                chunk.append(&mut rest);
            }
            rev = self.commit_one(inner, chunk)?;
        }
        if !rest.is_empty() {
            rev = self.commit_one(inner, rest)?;
        }
        Ok(rev)
    }

    fn commit_one(&self, inner: &mut Inner, ops: Vec<Op>) -> Result<u64, ClusterError> {
        let mut txn = Txn::default();
        let guard = |key: &str, rev: Option<u64>| match rev {
            Some(r) => Guard::Revision(key.into(), r),
            None => Guard::Absent(key.into()),
        };
        for op in &ops {
            match op {
                Op::PutApp(a) => {
                    let k = a.key();
                    txn = txn
                        .guard(guard(
                            &format!("{APPS}{k}"),
                            inner.apps.get(&k).map(|s| s.rev),
                        ))
                        .put(format!("{APPS}{k}"), encode(a));
                }
                Op::DeleteApp(k) => {
                    if let Some(s) = inner.apps.get(k) {
                        txn = txn
                            .guard(Guard::Revision(format!("{APPS}{k}"), s.rev))
                            .delete(format!("{APPS}{k}"));
                    }
                }
                Op::PutPod(p) => {
                    let k = p.key();
                    txn = txn
                        .guard(guard(
                            &format!("{PODS}{k}"),
                            inner.pods.get(&k).map(|s| s.rev),
                        ))
                        .put(format!("{PODS}{k}"), encode(p));
                }
                Op::DeletePod(k) => {
                    if let Some(s) = inner.pods.get(k) {
                        txn = txn
                            .guard(Guard::Revision(format!("{PODS}{k}"), s.rev))
                            .delete(format!("{PODS}{k}"));
                    }
                }
                Op::PutNode(n) => {
                    let rev = inner.nodes.get(&n.name).map(|e| e.record.rev);
                    txn = txn
                        .guard(guard(&format!("{NODES}{}", n.name), rev))
                        .put(format!("{NODES}{}", n.name), encode(n));
                }
                Op::PutToken(id, bytes, rev) => {
                    txn = txn
                        .guard(guard(&format!("{TOKENS}{id}"), *rev))
                        .put(format!("{TOKENS}{id}"), bytes.clone());
                }
            }
        }
        let rev = match self.store.commit(txn) {
            Ok(Commit::Done(rev)) => rev,
            Ok(Commit::Conflict { key, revision }) => {
                self.resync(inner);
                return Err(ClusterError::Conflict { key, revision });
            }
            Err(StoreError::NotLeader { key }) => {
                return Err(StoreError::NotLeader { key }.into());
            }
            Err(e) => {
                // The write may or may not have been applied (an answer lost on the way).
                self.resync(inner);
                return Err(e.into());
            }
        };
        let mut woken = BTreeSet::new();
        for op in ops {
            match op {
                Op::PutApp(a) => {
                    inner.apps.insert(a.key(), Stored { value: a, rev });
                }
                Op::DeleteApp(k) => {
                    inner.apps.remove(&k);
                }
                Op::PutPod(p) => {
                    let k = p.key();
                    if let Some(old) = inner.pods.get(&k) {
                        if old.value.node != p.node {
                            if let Some(s) = inner.by_node.get_mut(&old.value.node) {
                                s.remove(&k);
                            }
                            woken.insert(old.value.node.clone());
                        }
                    } else {
                        inner.bound_at.insert(k.clone(), Instant::now());
                    }
                    inner
                        .by_node
                        .entry(p.node.clone())
                        .or_default()
                        .insert(k.clone());
                    inner
                        .by_app
                        .entry(p.app.clone())
                        .or_default()
                        .insert(k.clone());
                    woken.insert(p.node.clone());
                    inner.pods.insert(k, Stored { value: p, rev });
                }
                Op::DeletePod(k) => {
                    if let Some(old) = inner.pods.remove(&k) {
                        if let Some(s) = inner.by_node.get_mut(&old.value.node) {
                            s.remove(&k);
                        }
                        if let Some(s) = inner.by_app.get_mut(&old.value.app) {
                            s.remove(&k);
                            if s.is_empty() {
                                inner.by_app.remove(&old.value.app);
                            }
                        }
                        inner.bound_at.remove(&k);
                        woken.insert(old.value.node);
                    }
                }
                Op::PutNode(n) => match inner.nodes.get_mut(&n.name) {
                    Some(e) => e.record = Stored { value: n, rev },
                    None => {
                        inner.nodes.insert(
                            n.name.clone(),
                            NodeEntry {
                                record: Stored { value: n, rev },
                                live: NodeLive::default(),
                                assigned: watch::channel(0).0,
                            },
                        );
                    }
                },
                Op::PutToken(..) => {}
            }
        }
        for node in woken {
            if let Some(e) = inner.nodes.get(&node) {
                e.assigned.send_modify(|g| *g += 1);
            }
        }
        self.poke();
        Ok(rev)
    }

    /// Reads the desired state again when the cache's revisions may no longer be the store's
    /// (a conflict, a write whose outcome is unknown), keeping what the nodes reported and
    /// their links; every node's link then sends what changed.
    fn resync(&self, inner: &mut Inner) {
        let mut fresh = match Inner::read(self.store.as_ref()) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %kite_protocol::errors::error_chain(&e), "read the state again after a failed write");
                return;
            }
        };
        for (name, entry) in fresh.nodes.iter_mut() {
            if let Some(old) = inner.nodes.remove(name) {
                entry.live = old.live;
                entry.assigned = old.assigned;
            }
        }
        fresh.bound_at = std::mem::take(&mut inner.bound_at);
        fresh.next_link = inner.next_link;
        *inner = fresh;
        for e in inner.nodes.values() {
            e.assigned.send_modify(|g| *g += 1);
        }
        self.poke();
    }

    /// A node's state now.
    pub fn node_state(&self, live: &NodeLive) -> NodeState {
        match live.last_heartbeat {
            None => NodeState::Unknown,
            Some(t) if t.elapsed() <= Duration::from_secs(self.config.node_timeout_secs) => {
                if live.tx.is_some() {
                    NodeState::Ready
                } else {
                    NodeState::NotReady
                }
            }
            Some(_) => NodeState::NotReady,
        }
    }

    /// Since when this coordinator holds the state.
    pub fn since(&self) -> Instant {
        *self.since.lock().expect("since lock")
    }

    /// Since when a node has not been ready (the coordinator's start for one never heard of).
    pub fn unready_since(&self, live: &NodeLive) -> Instant {
        let timeout = Duration::from_secs(self.config.node_timeout_secs);
        match live.last_heartbeat {
            Some(t) => (t + timeout).max(self.since()),
            None => self.since(),
        }
    }

    /// The node's assignments, as its link sends them.
    pub fn assignments_of(inner: &Inner, node: &str) -> BTreeMap<String, api::Assignment> {
        let mut out = BTreeMap::new();
        for key in inner.by_node.get(node).into_iter().flatten() {
            let Some(pod) = inner.pods.get(key) else {
                continue;
            };
            let pod = &pod.value;
            let Some(app) = inner.apps.get(&pod.app) else {
                continue;
            };
            let Some(template) = app.value.template(pod.revision) else {
                continue;
            };
            let manifest = app::pod_manifest(template, &pod.namespace, &app.value.name, &pod.name);
            out.insert(
                key.clone(),
                api::Assignment {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    app: pod.app.clone(),
                    revision: pod.revision,
                    manifest_json: manifest.to_string(),
                },
            );
        }
        out
    }

    /// Registers a node's new link (replacing an older one): its id, and the receiver of the
    /// node's assignment changes.
    pub fn attach(
        &self,
        node: &str,
        tx: mpsc::Sender<CoordinatorMessage>,
        hello: api::NodeHello,
    ) -> Option<(u64, watch::Receiver<u64>)> {
        let mut inner = self.lock();
        inner.next_link += 1;
        let link = inner.next_link;
        let entry = inner.nodes.get_mut(node)?;
        entry.live.link = link;
        entry.live.tx = Some(tx);
        entry.live.status = hello.status.unwrap_or_default();
        entry.live.last_heartbeat = Some(Instant::now());
        entry.live.last_heartbeat_ms = now_ms();
        let rx = entry.assigned.subscribe();
        drop(inner);
        if let Some(pods) = hello.pods {
            self.report_pods(node, Some(link), pods);
        }
        self.poke();
        Some((link, rx))
    }

    pub fn detach(&self, node: &str, link: u64) {
        let mut inner = self.lock();
        if let Some(e) = inner.nodes.get_mut(node) {
            if e.live.link == link {
                e.live.tx = None;
            }
        }
        drop(inner);
        self.poke();
    }

    /// The node's entry, if `link` (when given) is still its link: what an old link (of an
    /// earlier term, or replaced by a reconnection) still says is dropped.
    fn linked<'a>(
        inner: &'a mut Inner,
        node: &str,
        link: Option<u64>,
    ) -> Option<&'a mut NodeEntry> {
        inner
            .nodes
            .get_mut(node)
            .filter(|e| link.is_none_or(|l| e.live.link == l))
    }

    pub fn heartbeat(&self, node: &str, link: u64) {
        let mut inner = self.lock();
        if let Some(e) = Self::linked(&mut inner, node, Some(link)) {
            e.live.last_heartbeat = Some(Instant::now());
            e.live.last_heartbeat_ms = now_ms();
        }
    }

    pub fn report_status(&self, node: &str, link: u64, status: api::NodeStatus) {
        let mut inner = self.lock();
        if let Some(e) = Self::linked(&mut inner, node, Some(link)) {
            e.live.status = status;
        }
    }

    /// A node's pods as it sees them. Only the node's own assignments count: a report of a
    /// pod assigned elsewhere is ignored.
    pub fn report_pods(&self, node: &str, link: Option<u64>, pods: api::PodReports) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(entry) = inner
            .nodes
            .get_mut(node)
            .filter(|e| link.is_none_or(|l| e.live.link == l))
        else {
            return;
        };
        if pods.full {
            entry.live.reports.clear();
        }
        let mine = inner.by_node.get(node);
        for report in pods.pods {
            let key = format!("{}/{}", report.namespace, report.name);
            if !mine.is_some_and(|m| m.contains(&key)) {
                continue;
            }
            if let Some(t) = inner.bound_at.remove(&key) {
                self.metrics.observe_assignment(t.elapsed().as_secs_f64());
            }
            if report.phase == "Gone" {
                entry.live.reports.remove(&key);
            } else {
                entry.live.reports.insert(key, report);
            }
        }
        self.poke();
    }

    pub fn report_prefetch(&self, node: &str, link: u64, report: api::PrefetchReport) {
        let mut inner = self.lock();
        if let Some(e) = Self::linked(&mut inner, node, Some(link)) {
            e.live.prefetch.insert(report.image, report.state);
        }
        drop(inner);
        self.poke();
    }

    /// Relays `call` (logs or exec) on pod `namespace/name` to its node and waits for the
    /// answer (up to `timeout`).
    pub async fn call_pod(
        &self,
        kind: &str,
        call: api::PodCall,
        timeout: Duration,
    ) -> Result<api::CallResult, ClusterError> {
        let key = format!("{}/{}", call.namespace, call.name);
        let id = self
            .next_call
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let node = {
            let inner = self.lock();
            let pod = inner
                .pods
                .get(&key)
                .ok_or_else(|| ClusterError::NotFound(format!("pod {key}")))?;
            let node = pod.value.node.clone();
            self.calls
                .lock()
                .expect("calls lock")
                .insert(id, (node.clone(), tx));
            let message = CoordinatorMessage {
                msg: Some(api::coordinator_message::Msg::Call(api::NodeCall {
                    id,
                    kind: kind.into(),
                    call: Some(call),
                })),
            };
            if !Self::send(&inner, &node, message) {
                self.calls.lock().expect("calls lock").remove(&id);
                return Err(ClusterError::Invalid(format!(
                    "pod {key}'s node {node} is not connected"
                )));
            }
            node
        };
        let answer = tokio::time::timeout(timeout, rx).await;
        self.calls.lock().expect("calls lock").remove(&id);
        match answer {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(_)) | Err(_) => Err(ClusterError::Invalid(format!(
                "node {node} did not answer the {kind} of pod {key} within {timeout:?}"
            ))),
        }
    }

    /// A node's answer to a relayed call: only the node the call went to may answer it.
    pub fn call_result(&self, node: &str, result: api::CallResult) {
        let mut calls = self.calls.lock().expect("calls lock");
        if calls.get(&result.id).is_some_and(|(n, _)| n == node) {
            if let Some((_, tx)) = calls.remove(&result.id) {
                let _ = tx.send(result);
            }
        }
    }

    /// Sends a message to a node over its link, if it has one.
    pub fn send(inner: &Inner, node: &str, msg: CoordinatorMessage) -> bool {
        inner
            .nodes
            .get(node)
            .and_then(|e| e.live.tx.as_ref())
            .is_some_and(|tx| tx.try_send(msg).is_ok())
    }

    /// The node's report of a pod, if it runs the pod's assigned revision.
    pub fn report_of<'a>(inner: &'a Inner, pod: &PodRecord) -> Option<&'a api::PodReport> {
        inner.nodes.get(&pod.node)?.live.reports.get(&pod.key())
    }

    /// Whether a pod runs its assigned revision and is ready.
    pub fn pod_ready(inner: &Inner, pod: &PodRecord) -> bool {
        Self::report_of(inner, pod).is_some_and(|r| r.ready && r.revision == pod.revision)
    }
}
