//! The coordinator's gRPC services over TLS: `NodeLink` (agents) and `Cluster` (kitectl).
//!
//! Who calls is what its client certificate says (verified against the cluster's CA by TLS,
//! read by [`identity_of`]): an admin for `Cluster`, a node for its own link and assignments.
//! `Join` is the only call that needs no certificate; it needs a bootstrap token instead.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use kite_protocol::cluster::cluster_server::Cluster as ClusterApi;
use kite_protocol::cluster::coordinators_server::Coordinators;
use kite_protocol::cluster::node_link_server::NodeLink;
use kite_protocol::cluster::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::cluster::{Cluster as State, ClusterError};
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::ops::{self, JoinError};
use crate::pki::{identity_of, ClusterCa, Identity};
use crate::store::StoreError;

type Answer<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl From<ClusterError> for Status {
    fn from(e: ClusterError) -> Status {
        let message = kite_protocol::errors::error_chain(&e);
        match e {
            ClusterError::NotFound(_) => Status::not_found(message),
            ClusterError::Invalid(_) => Status::invalid_argument(message),
            ClusterError::Conflict { .. } => Status::aborted(message),
            _ if e.is_not_leader() => Status::unavailable(message),
            ClusterError::Store(StoreError::Unavailable { .. }) => Status::unavailable(message),
            ClusterError::Store(_) | ClusterError::Corrupt { .. } | ClusterError::NotLeader => {
                Status::internal(message)
            }
        }
    }
}

/// `Coordinators`: who leads, answered by every coordinator of the set.
pub struct CoordinatorsService {
    leadership: Arc<Leadership>,
}

impl CoordinatorsService {
    pub fn new(leadership: Arc<Leadership>) -> CoordinatorsService {
        CoordinatorsService { leadership }
    }
}

#[tonic::async_trait]
impl Coordinators for CoordinatorsService {
    async fn leader(
        &self,
        _request: Request<LeaderRequest>,
    ) -> Result<Response<LeaderInfo>, Status> {
        let l = &self.leadership;
        let leading = l.is_leading();
        Ok(Response::new(LeaderInfo {
            leading,
            leader: l.leader().unwrap_or_default(),
            address: l.me.clone(),
            term: if leading { l.term() } else { 0 },
        }))
    }
}

/// The identity the caller's certificate carries.
fn caller<T>(request: &Request<T>) -> Result<Identity, Status> {
    let certs = request.peer_certs().ok_or_else(|| {
        Status::unauthenticated(
            "no client certificate: this call needs a certificate of the cluster's CA (an admin's for kitectl, a node's for agents)",
        )
    })?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("an empty client certificate chain"))?;
    identity_of(leaf.as_ref())
        .map_err(|e| Status::permission_denied(format!("client certificate: {e}")))
}

fn admin<T>(request: &Request<T>) -> Result<String, Status> {
    match caller(request)? {
        Identity::Admin(name) => Ok(name),
        other => Err(Status::permission_denied(format!(
            "{other:?} is not an admin: the cluster API needs an admin credential"
        ))),
    }
}

fn node<T>(request: &Request<T>) -> Result<String, Status> {
    match caller(request)? {
        Identity::Node(name) => Ok(name),
        other => Err(Status::permission_denied(format!(
            "{other:?} is not a node: only nodes hold a node link"
        ))),
    }
}

pub struct NodeLinkService {
    cluster: Arc<State>,
    ca: Arc<ClusterCa>,
}

impl NodeLinkService {
    pub fn new(cluster: Arc<State>, ca: Arc<ClusterCa>) -> NodeLinkService {
        NodeLinkService { cluster, ca }
    }
}

/// What changed between the assignments sent and the ones now.
fn difference(
    sent: &BTreeMap<String, Assignment>,
    now: &BTreeMap<String, Assignment>,
) -> Assignments {
    Assignments {
        full: false,
        pods: now
            .iter()
            .filter(|(k, a)| sent.get(*k) != Some(a))
            .map(|(_, a)| a.clone())
            .collect(),
        removed: sent
            .iter()
            .filter(|(k, _)| !now.contains_key(*k))
            .map(|(_, a)| PodKey {
                namespace: a.namespace.clone(),
                name: a.name.clone(),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl NodeLink for NodeLinkService {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let r = request.into_inner();
        let cluster = self.cluster.clone();
        let ca = self.ca.clone();
        let node = r.node_name.clone();
        // Signing and the store's fsync block: off the async threads.
        let result = tokio::task::spawn_blocking(move || {
            ops::join(&cluster, &ca, &r.token, &r.node_name, &r.csr_pem)
        })
        .await
        .map_err(|e| Status::internal(format!("join: {e}")))?;
        match result {
            Ok(cert_pem) => {
                Metrics::count(&self.cluster.metrics.joins, "result", "joined");
                tracing::info!(node = %node, "node joined");
                Ok(Response::new(JoinResponse {
                    cert_pem,
                    ca_pem: self.cluster.ca_pem.clone(),
                    cluster_name: self.cluster.config.cluster_name.clone(),
                }))
            }
            Err(e) => {
                Metrics::count(&self.cluster.metrics.joins, "result", "refused");
                let message = format!(
                    "node {node} may not join: {}",
                    kite_protocol::errors::error_chain(&e)
                );
                tracing::warn!(node = %node, reason = %message, "join refused");
                Err(match e {
                    JoinError::Token(_) => Status::permission_denied(message),
                    JoinError::NameTaken(_) => Status::already_exists(message),
                    JoinError::Pki(_) => Status::invalid_argument(message),
                    JoinError::Cluster(e) => e.into(),
                })
            }
        }
    }

    type LinkStream = Answer<CoordinatorMessage>;

    async fn link(
        &self,
        request: Request<Streaming<NodeMessage>>,
    ) -> Result<Response<Self::LinkStream>, Status> {
        let name = node(&request)?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(30), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 30 s"))??;
        let hello = match first.and_then(|m| m.msg) {
            Some(node_message::Msg::Hello(h)) => h,
            _ => return Err(Status::invalid_argument("a node link starts with a hello")),
        };
        if hello.name != name {
            return Err(Status::permission_denied(format!(
                "node {name} may not speak for node {:?}",
                hello.name
            )));
        }
        let (orders_tx, mut orders) = mpsc::channel(64);
        let (link, mut assigned) =
            self.cluster
                .attach(&name, orders_tx, hello)
                .ok_or_else(|| {
                    Status::permission_denied(format!("node {name} is not a member of the cluster"))
                })?;
        tracing::info!(node = %name, link, "node connected");
        let (out, out_rx) = mpsc::channel::<Result<CoordinatorMessage, Status>>(64);
        let cluster = self.cluster.clone();
        let node_name = name.clone();
        tokio::spawn(async move {
            let mut sent: Option<BTreeMap<String, Assignment>> = None;
            loop {
                assigned.borrow_and_update();
                let now = {
                    let inner = cluster.lock();
                    // The state this link was made for is gone (leadership lost, the node
                    // reconnected): never send a difference computed from another state (it
                    // would tell the node to remove every pod).
                    if inner
                        .nodes
                        .get(&node_name)
                        .is_none_or(|e| e.live.link != link)
                    {
                        break;
                    }
                    State::assignments_of(&inner, &node_name)
                };
                let message = match &sent {
                    None => Some(Assignments {
                        full: true,
                        pods: now.values().cloned().collect(),
                        removed: Vec::new(),
                    }),
                    Some(sent) => {
                        let d = difference(sent, &now);
                        (!d.pods.is_empty() || !d.removed.is_empty()).then_some(d)
                    }
                };
                if let Some(m) = message {
                    let m = CoordinatorMessage {
                        msg: Some(coordinator_message::Msg::Assignments(m)),
                    };
                    if out.send(Ok(m)).await.is_err() {
                        break;
                    }
                }
                sent = Some(now);
                tokio::select! {
                    changed = assigned.changed() => if changed.is_err() { break },
                    order = orders.recv() => match order {
                        Some(o) => if out.send(Ok(o)).await.is_err() { break },
                        None => break,
                    },
                    _ = out.closed() => break,
                }
            }
        });
        let cluster = self.cluster.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(m)) => match m.msg {
                        Some(node_message::Msg::Heartbeat(_)) => cluster.heartbeat(&name, link),
                        Some(node_message::Msg::Status(s)) => {
                            cluster.heartbeat(&name, link);
                            cluster.report_status(&name, link, s)
                        }
                        Some(node_message::Msg::Pods(p)) => {
                            cluster.report_pods(&name, Some(link), p)
                        }
                        Some(node_message::Msg::Prefetch(p)) => {
                            cluster.report_prefetch(&name, link, p)
                        }
                        Some(node_message::Msg::Result(r)) => cluster.call_result(&name, r),
                        Some(node_message::Msg::Hello(_)) | None => {}
                    },
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(node = %name, error = %e, "node link broke");
                        break;
                    }
                }
            }
            tracing::info!(node = %name, link, "node disconnected");
            cluster.detach(&name, link);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    async fn list_assignments(
        &self,
        request: Request<NodeRef>,
    ) -> Result<Response<Assignments>, Status> {
        let who = caller(&request)?;
        let asked = request.into_inner().name;
        match &who {
            Identity::Node(n) if *n == asked => {}
            Identity::Admin(_) => {}
            other => {
                return Err(Status::permission_denied(format!(
                    "{other:?} may not see node {asked}'s pods"
                )))
            }
        }
        let inner = leading(&self.cluster)?;
        if !inner.nodes.contains_key(&asked) {
            return Err(Status::not_found(format!("node {asked}")));
        }
        Ok(Response::new(Assignments {
            full: true,
            pods: State::assignments_of(&inner, &asked)
                .into_values()
                .collect(),
            removed: Vec::new(),
        }))
    }
}

pub struct ClusterService {
    cluster: Arc<State>,
}

impl ClusterService {
    pub fn new(cluster: Arc<State>) -> ClusterService {
        ClusterService { cluster }
    }

    /// Runs `f` off the async threads (a commit waits for the disk).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&State) -> Result<T, ClusterError> + Send + 'static,
    ) -> Result<Response<T>, Status> {
        let cluster = self.cluster.clone();
        let r = tokio::task::spawn_blocking(move || f(&cluster))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(r?))
    }
}

/// The state, if this coordinator still leads (a call let through the gate may find the
/// leadership gone, and the state with it).
fn leading(cluster: &State) -> Result<std::sync::MutexGuard<'_, crate::cluster::Inner>, Status> {
    Ok(cluster.lock_leading()?)
}

/// Whether a change may be made again after it failed this way: a conflict (the cache was
/// read again) or a store that did not answer in time (the write may or may not have been
/// applied; the cache was read again).
fn retryable(e: &ClusterError) -> bool {
    matches!(
        e,
        ClusterError::Conflict { .. }
            | ClusterError::Store(StoreError::Unavailable { .. } | StoreError::Etcd { .. })
    )
}

impl ClusterService {
    /// Runs an idempotent change (it sets a state: applying the same twice is applying it
    /// once) off the async threads, and makes it again for up to 12 s when it failed for a
    /// reason that may pass (an etcd election, a conflict with the controllers).
    async fn idempotent<T: Send + 'static>(
        &self,
        f: impl Fn(&State) -> Result<T, ClusterError> + Send + Sync + 'static,
    ) -> Result<Response<T>, Status> {
        let f = Arc::new(f);
        let started = std::time::Instant::now();
        loop {
            let (cluster, g) = (self.cluster.clone(), f.clone());
            if !cluster.leadership.is_leading() {
                return Err(ClusterError::NotLeader.into());
            }
            let r = tokio::task::spawn_blocking(move || g(&cluster))
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            match r {
                Err(e) if retryable(&e) && started.elapsed() < Duration::from_secs(12) => {
                    tracing::debug!(error = %kite_protocol::errors::error_chain(&e), "a change failed; making it again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                r => return Ok(Response::new(r?)),
            }
        }
    }

    async fn relay(
        &self,
        kind: &str,
        request: Request<PodCall>,
    ) -> Result<Response<CallResult>, Status> {
        let who = admin(&request)?;
        let mut call = request.into_inner();
        if call.namespace.is_empty() {
            call.namespace = "default".into();
        }
        let timeout = Duration::from_secs(u64::from(call.timeout_secs.max(60)) + 10);
        tracing::info!(admin = %who, pod = %format!("{}/{}", call.namespace, call.name), kind, "relayed to the pod's node");
        let result = self.cluster.call_pod(kind, call, timeout).await?;
        if !result.error.is_empty() {
            return Err(Status::failed_precondition(result.error));
        }
        Ok(Response::new(result))
    }
}

fn app_ref(r: Option<AppRef>) -> Result<(String, String), Status> {
    let r = r.ok_or_else(|| Status::invalid_argument("no app named"))?;
    let ns = if r.namespace.is_empty() {
        "default".into()
    } else {
        r.namespace
    };
    Ok((ns, r.name))
}

#[tonic::async_trait]
impl ClusterApi for ClusterService {
    async fn apply(&self, request: Request<ApplyRequest>) -> Result<Response<App>, Status> {
        let who = admin(&request)?;
        let manifest = request.into_inner().manifest;
        let r = self.idempotent(move |c| ops::apply(c, &manifest)).await;
        if let Ok(app) = &r {
            tracing::info!(admin = %who, app = %format!("{}/{}", app.get_ref().namespace, app.get_ref().name), revision = app.get_ref().revision, "applied");
        }
        r
    }

    async fn get_app(&self, request: Request<AppRef>) -> Result<Response<App>, Status> {
        admin(&request)?;
        let (ns, name) = app_ref(Some(request.into_inner()))?;
        let inner = leading(&self.cluster)?;
        ops::app_view(&self.cluster, &inner, &format!("{ns}/{name}"))
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("app {ns}/{name}")))
    }

    async fn list_apps(
        &self,
        request: Request<ListRequest>,
    ) -> Result<Response<ListAppsResponse>, Status> {
        admin(&request)?;
        let ns = request.into_inner().namespace;
        let inner = leading(&self.cluster)?;
        let apps = inner
            .apps
            .values()
            .filter(|a| ns.is_empty() || a.value.namespace == ns)
            .filter_map(|a| ops::app_view(&self.cluster, &inner, &a.value.key()))
            .collect();
        Ok(Response::new(ListAppsResponse { apps }))
    }

    async fn delete_app(&self, request: Request<AppRef>) -> Result<Response<App>, Status> {
        admin(&request)?;
        let (ns, name) = app_ref(Some(request.into_inner()))?;
        self.blocking(move |c| ops::delete_app(c, &ns, &name)).await
    }

    async fn scale(&self, request: Request<ScaleRequest>) -> Result<Response<App>, Status> {
        admin(&request)?;
        let r = request.into_inner();
        let (ns, name) = app_ref(r.app)?;
        self.idempotent(move |c| ops::scale(c, &ns, &name, r.replicas))
            .await
    }

    async fn undo(&self, request: Request<UndoRequest>) -> Result<Response<App>, Status> {
        admin(&request)?;
        let r = request.into_inner();
        let (ns, name) = app_ref(r.app)?;
        self.blocking(move |c| ops::undo(c, &ns, &name, r.to_revision))
            .await
    }

    async fn set_paused(&self, request: Request<PauseRequest>) -> Result<Response<App>, Status> {
        admin(&request)?;
        let r = request.into_inner();
        let (ns, name) = app_ref(r.app)?;
        self.idempotent(move |c| ops::set_paused(c, &ns, &name, r.paused))
            .await
    }

    type WatchAppStream = Answer<App>;

    async fn watch_app(
        &self,
        request: Request<AppRef>,
    ) -> Result<Response<Self::WatchAppStream>, Status> {
        admin(&request)?;
        let (ns, name) = app_ref(Some(request.into_inner()))?;
        let key = format!("{ns}/{name}");
        let cluster = self.cluster.clone();
        let mut generation = cluster.generation.subscribe();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut last: Option<App> = None;
            loop {
                generation.borrow_and_update();
                let view = ops::app_view(&cluster, &cluster.lock(), &key);
                let Some(view) = view else {
                    let _ = tx.send(Err(Status::not_found(format!("app {key}")))).await;
                    return;
                };
                if last.as_ref() != Some(&view) {
                    if tx.send(Ok(view.clone())).await.is_err() {
                        return;
                    }
                    last = Some(view);
                }
                tokio::select! {
                    c = generation.changed() => if c.is_err() { return },
                    // Node states change with time alone.
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_pods(
        &self,
        request: Request<ListRequest>,
    ) -> Result<Response<ListPodsResponse>, Status> {
        admin(&request)?;
        let r = request.into_inner();
        let inner = leading(&self.cluster)?;
        Ok(Response::new(ListPodsResponse {
            pods: ops::pod_views(&inner, &r.namespace, &r.app),
        }))
    }

    async fn list_nodes(
        &self,
        request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        admin(&request)?;
        let inner = leading(&self.cluster)?;
        let nodes = inner
            .nodes
            .keys()
            .filter_map(|n| ops::node_view(&self.cluster, &inner, n))
            .collect();
        Ok(Response::new(ListNodesResponse { nodes }))
    }

    async fn set_schedulable(
        &self,
        request: Request<SchedulableRequest>,
    ) -> Result<Response<NodeInfo>, Status> {
        admin(&request)?;
        let r = request.into_inner();
        self.idempotent(move |c| ops::set_schedulable(c, &r.node, r.cordon, r.drain))
            .await
    }

    async fn pod_logs(&self, request: Request<PodCall>) -> Result<Response<CallResult>, Status> {
        self.relay("logs", request).await
    }

    async fn pod_exec(&self, request: Request<PodCall>) -> Result<Response<CallResult>, Status> {
        self.relay("exec", request).await
    }

    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let who = admin(&request)?;
        let r = request.into_inner();
        let response = self
            .blocking(move |c| ops::create_token(c, r.ttl_secs, &r.description))
            .await?;
        let (token, expires_unix) = response.into_inner();
        tracing::info!(admin = %who, id = %token.split('.').next().unwrap_or(""), "bootstrap token created");
        Ok(Response::new(CreateTokenResponse {
            token,
            expires_unix,
        }))
    }
}
