//! The controllers: one reconcile pass over every app, run when anything changes and every
//! second. A pass is level-triggered (it looks at what is, not at what happened), so a
//! restarted coordinator picks up where the last one stopped — a rollout mid-batch included.
//!
//! - **Lost nodes**: a node NotReady for `pod_eviction_secs` loses its assignments; the
//!   replicas are placed elsewhere, and the node's agent removes the pods when it comes back.
//! - **Rollouts**: prefetch on every node that runs the app, then batches of `maxUnavailable`
//!   (in place: the pod's containers are replaced in its sandbox; recreate: new pods), each
//!   waiting for readiness; a batch that fails or misses `progressDeadlineSeconds` rolls the
//!   app back to the previous revision.
//! - **Replicas**: missing ones are placed together (their nodes start fetching at once),
//!   extra ones removed (not-ready, out-of-date and crowded ones first).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use kite_protocol::cluster::{coordinator_message, CoordinatorMessage, PrefetchOrder};
use rand::Rng;

use crate::app::{self, Strategy};
use crate::cluster::{
    now_ms, AppRecord, Cluster, ClusterError, Inner, NodeState, Op, PodRecord, RolloutState,
};
use crate::metrics::Metrics;
use crate::placement::{self, NodeView, PodRequest, Resources, Weights};

/// Runs the controllers until `stop` turns true.
pub async fn run(cluster: std::sync::Arc<Cluster>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = cluster.changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        // Changes come in bursts (a node's reports, a commit's own poke): one pass for them.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = Instant::now();
        // A pass holds the state's lock across store commits (fsync): off the async threads,
        // where node links and API calls wait for that lock.
        let c = cluster.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || reconcile(&c)).await {
            tracing::error!(error = %e, "reconcile pass");
        }
        cluster
            .metrics
            .observe_reconcile(started.elapsed().as_secs_f64());
    }
}

/// One pass over every node and app.
pub fn reconcile(cluster: &Cluster) {
    // A leader whose lease ran out (paused, cut off) acts no more, even before it hears so.
    if !cluster.leadership.is_leading() {
        return;
    }
    let mut inner = cluster.lock();
    if let Err(e) = evict_lost_nodes(cluster, &mut inner) {
        tracing::warn!(error = %e, "evict the pods of lost nodes");
    }
    let apps: Vec<String> = inner.apps.keys().cloned().collect();
    for key in apps {
        if let Err(e) = reconcile_app(cluster, &mut inner, &key) {
            tracing::warn!(app = %key, error = %kite_protocol::errors::error_chain(&e), "reconcile");
        }
    }
    let mut states: BTreeMap<&'static str, i64> = BTreeMap::new();
    for e in inner.nodes.values() {
        *states
            .entry(cluster.node_state(&e.live).name())
            .or_default() += 1;
    }
    for s in ["Ready", "NotReady", "Unknown"] {
        cluster
            .metrics
            .nodes
            .get_or_create(&vec![("state".into(), s.into())])
            .set(states.get(s).copied().unwrap_or(0));
    }
    cluster
        .metrics
        .pods
        .set(i64::try_from(inner.pods.len()).unwrap_or(i64::MAX));
    cluster
        .metrics
        .apps
        .set(i64::try_from(inner.apps.len()).unwrap_or(i64::MAX));
}

/// Above this share of nodes not ready, nothing is evicted: when most nodes fall silent at
/// once the likelier cause is the coordinator's side (its restart, its network), and moving
/// every pod would do more harm than waiting (Kubernetes' node controller stops evicting in a
/// zone past 55% unhealthy, for the same reason).
const MAX_UNREADY_SHARE: f64 = 0.55;

fn evict_lost_nodes(cluster: &Cluster, inner: &mut Inner) -> Result<(), ClusterError> {
    let grace = Duration::from_secs(cluster.config.pod_eviction_secs);
    let total = inner.nodes.len();
    let unready = inner
        .nodes
        .values()
        .filter(|e| cluster.node_state(&e.live) != NodeState::Ready)
        .count();
    if unready == 0 {
        return Ok(());
    }
    #[allow(clippy::cast_precision_loss)]
    if unready == total || unready as f64 / total as f64 > MAX_UNREADY_SHARE {
        tracing::debug!(unready, total, "most nodes are not ready: no evictions");
        return Ok(());
    }
    let mut ops = Vec::new();
    for (name, entry) in &inner.nodes {
        if cluster.node_state(&entry.live) == NodeState::Ready
            || cluster.unready_since(&entry.live).elapsed() < grace
        {
            continue;
        }
        let pods = inner.by_node.get(name).cloned().unwrap_or_default();
        if !pods.is_empty() {
            tracing::warn!(node = %name, pods = pods.len(), "node lost: its pods go elsewhere");
        }
        ops.extend(pods.into_iter().map(Op::DeletePod));
    }
    cluster.commit(inner, ops).map(|_| ())
}

fn reconcile_app(cluster: &Cluster, inner: &mut Inner, key: &str) -> Result<(), ClusterError> {
    let Some(app) = inner.apps.get(key).map(|s| s.value.clone()) else {
        return Ok(());
    };
    if let Some(r) = &app.rollout {
        if !r.state.finished() && !app.paused {
            step_rollout(cluster, inner, app.clone())?;
        }
    }
    let Some(app) = inner.apps.get(key).map(|s| s.value.clone()) else {
        return Ok(());
    };
    let pods = pods_of(inner, key);
    let want = app.replicas as usize;
    if pods.len() < want {
        let (ops, unschedulable) =
            place_new(cluster, inner, &app, app.revision, want - pods.len(), &[]);
        let mut app_after = app.clone();
        match unschedulable {
            Some(message) => {
                app_after.set_condition("Available", false, "Unschedulable", message);
            }
            None => app_after.conditions.retain(|c| c.reason != "Unschedulable"),
        }
        let mut ops = ops;
        if conditions_changed(&app, &app_after) {
            ops.push(Op::PutApp(app_after));
        }
        cluster.commit(inner, ops)?;
    } else if pods.len() > want {
        let mut extra = pods.clone();
        // Not ready first, then out of date, then on the most crowded node, then the newest.
        let mut per_node: HashMap<&str, usize> = HashMap::new();
        for p in &pods {
            *per_node.entry(p.node.as_str()).or_default() += 1;
        }
        extra.sort_by_key(|p| {
            (
                Cluster::pod_ready(inner, p),
                p.revision == app.revision,
                std::cmp::Reverse(per_node[p.node.as_str()]),
                std::cmp::Reverse(p.created_ms),
            )
        });
        let ops = extra
            .into_iter()
            .take(pods.len() - want)
            .map(|p| Op::DeletePod(p.key()))
            .collect();
        cluster.commit(inner, ops)?;
    }
    Ok(())
}

fn conditions_changed(a: &AppRecord, b: &AppRecord) -> bool {
    let view = |r: &AppRecord| {
        r.conditions
            .iter()
            .map(|c| {
                (
                    c.kind.clone(),
                    c.status,
                    c.reason.clone(),
                    c.message.clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    view(a) != view(b)
}

pub fn pods_of(inner: &Inner, app: &str) -> Vec<PodRecord> {
    inner
        .by_app
        .get(app)
        .into_iter()
        .flatten()
        .filter_map(|k| inner.pods.get(k).map(|s| s.value.clone()))
        .collect()
}

/// The nodes as placement sees them, with the pods `leaving` (about to be replaced) not
/// counted.
fn node_views(cluster: &Cluster, inner: &Inner, leaving: &[String]) -> Vec<NodeView> {
    let mut templates: HashMap<(String, u64), (Resources, Vec<String>)> = HashMap::new();
    let mut views = Vec::with_capacity(inner.nodes.len());
    for (name, entry) in &inner.nodes {
        let live = &entry.live;
        let status = &live.status;
        let mut view = NodeView {
            name: name.clone(),
            ready: cluster.node_state(live) == NodeState::Ready,
            cordoned: entry.record.value.cordoned,
            allocatable: Resources {
                cpu_millis: status.allocatable_cpu_millis,
                memory_bytes: status.allocatable_memory_bytes,
            },
            runtime_classes: status.runtime_classes.iter().cloned().collect(),
            layers: status.layers.iter().cloned().collect(),
            fetching: status.fetching.iter().cloned().collect(),
            java_archives: status.java_archives.iter().cloned().collect(),
            ..Default::default()
        };
        for key in inner.by_node.get(name).into_iter().flatten() {
            if leaving.contains(key) {
                continue;
            }
            let Some(pod) = inner.pods.get(key) else {
                continue;
            };
            let pod = &pod.value;
            // What the pod's template asks for, and its images (which the node runs, or is
            // fetching, whatever its last status said).
            let (r, images) = templates
                .entry((pod.app.clone(), pod.revision))
                .or_insert_with(|| {
                    inner
                        .apps
                        .get(&pod.app)
                        .and_then(|a| a.value.template(pod.revision))
                        .map(|t| {
                            let (r, _, images) = app::requests_of(t);
                            (r, images)
                        })
                        .unwrap_or_default()
                });
            view.requested.cpu_millis += r.cpu_millis;
            view.requested.memory_bytes += r.memory_bytes;
            *view.replicas.entry(pod.app.clone()).or_default() += 1;
            for image in images.iter() {
                if !view.layers.contains(image) {
                    view.fetching.insert(image.clone());
                }
            }
        }
        views.push(view);
    }
    views
}

fn new_pod_name(inner: &Inner, namespace: &str, app: &str) -> String {
    const CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    loop {
        let suffix: String = (0..5)
            .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
            .collect();
        let name = format!("{app}-{suffix}");
        if !inner.pods.contains_key(&format!("{namespace}/{name}")) {
            return name;
        }
    }
}

/// Places `count` new pods of `app` at `revision`, together: the pod records to put, and why
/// some found no node.
fn place_new(
    cluster: &Cluster,
    inner: &Inner,
    app: &AppRecord,
    revision: u64,
    count: usize,
    leaving: &[String],
) -> (Vec<Op>, Option<String>) {
    let Some(template) = app.template(revision) else {
        return (
            Vec::new(),
            Some(format!("revision {revision} is not in the history")),
        );
    };
    let (requests, runtime_class, images) = app::requests_of(template);
    let request = PodRequest {
        app: app.key(),
        requests,
        runtime_class,
        layers: images.into_iter().map(|i| (i, 1)).collect(),
        java_key: None,
    };
    let mut views = node_views(cluster, inner, leaving);
    let decisions = placement::place_all(&mut views, &vec![request; count], &Weights::default());
    let mut ops = Vec::new();
    let mut failure = None;
    let mut names = BTreeSet::new();
    for d in decisions {
        match d {
            Ok(d) => {
                let mut name = new_pod_name(inner, &app.namespace, &app.name);
                while !names.insert(name.clone()) {
                    name = new_pod_name(inner, &app.namespace, &app.name);
                }
                Metrics::count(&cluster.metrics.placements, "result", "placed");
                ops.push(Op::PutPod(PodRecord {
                    namespace: app.namespace.clone(),
                    name,
                    app: app.key(),
                    node: views[d.node].name.clone(),
                    revision,
                    created_ms: now_ms(),
                }));
            }
            Err(u) => {
                Metrics::count(&cluster.metrics.placements, "result", "unschedulable");
                failure = Some(u.to_string());
            }
        }
    }
    (ops, failure)
}

/// Moves `pods` to `revision`: in place (the same pods, a new revision to run) or by new pods;
/// or why it cannot (no node for a new pod: nothing is removed then).
fn move_pods(
    cluster: &Cluster,
    inner: &Inner,
    app: &AppRecord,
    strategy: Strategy,
    pods: &[PodRecord],
    revision: u64,
) -> Result<Vec<Op>, String> {
    match strategy {
        Strategy::InPlace => Ok(pods
            .iter()
            .map(|p| {
                Op::PutPod(PodRecord {
                    revision,
                    ..p.clone()
                })
            })
            .collect()),
        Strategy::Recreate => {
            let leaving: Vec<String> = pods.iter().map(PodRecord::key).collect();
            let (mut ops, unschedulable) =
                place_new(cluster, inner, app, revision, pods.len(), &leaving);
            if let Some(why) = unschedulable {
                return Err(format!("no node for revision {revision}'s pods: {why}"));
            }
            ops.extend(leaving.into_iter().map(Op::DeletePod));
            Ok(ops)
        }
    }
}

/// Why a pod at its assigned revision failed, if it did.
fn pod_failure(inner: &Inner, pod: &PodRecord) -> Option<String> {
    let report = Cluster::report_of(inner, pod)?;
    if !report.update_error.is_empty() {
        return Some(format!("pod {}: {}", pod.name, report.update_error));
    }
    if report.phase == "Failed" {
        return Some(format!("pod {} failed: {}", pod.name, report.message));
    }
    None
}

fn step_rollout(
    cluster: &Cluster,
    inner: &mut Inner,
    mut app: AppRecord,
) -> Result<(), ClusterError> {
    let mut r = app.rollout.clone().expect("a rollout");
    let now = now_ms();
    let deadline_ms =
        i64::try_from(app.progress_deadline_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let pods = pods_of(inner, &app.key());
    match r.state {
        RolloutState::Prefetching => {
            let images: Vec<String> = app
                .template(r.to)
                .map(|t| app::images_of(t).into_values().collect())
                .unwrap_or_default();
            if r.batch_started_ms == 0 {
                let nodes: BTreeSet<String> = pods.iter().map(|p| p.node.clone()).collect();
                for node in &nodes {
                    Cluster::send(
                        inner,
                        node,
                        CoordinatorMessage {
                            msg: Some(coordinator_message::Msg::Prefetch(PrefetchOrder {
                                images: images.clone(),
                            })),
                        },
                    );
                }
                r.prefetch_nodes = nodes.into_iter().collect();
                r.batch_started_ms = now;
                r.message = format!(
                    "{} node(s) prefetch {}",
                    r.prefetch_nodes.len(),
                    images.join(", ")
                );
            } else {
                let done = r.prefetch_nodes.iter().all(|n| {
                    inner.nodes.get(n).is_none_or(|e| {
                        e.live.tx.is_none()
                            || images.iter().all(|i| {
                                matches!(
                                    e.live.prefetch.get(i).map(String::as_str),
                                    Some("done" | "failed")
                                )
                            })
                    })
                });
                let timeout =
                    i64::try_from(cluster.config.prefetch_timeout_secs * 1000).unwrap_or(i64::MAX);
                if !done && now - r.batch_started_ms < timeout {
                    return Ok(());
                }
                r.state = RolloutState::Updating;
                r.batch = 0;
                r.batch_started_ms = 0;
                r.message = "prefetched; updating".into();
            }
            app.rollout = Some(r);
            cluster.commit(inner, vec![Op::PutApp(app)]).map(|_| ())
        }
        RolloutState::Updating => {
            let in_flight: Vec<&PodRecord> = pods
                .iter()
                .filter(|p| p.revision == r.to && !Cluster::pod_ready(inner, p))
                .collect();
            if r.batch > 0 && !in_flight.is_empty() {
                let failure = in_flight.iter().find_map(|p| pod_failure(inner, p));
                let late = now - r.batch_started_ms > deadline_ms;
                if failure.is_none() && !late {
                    return Ok(());
                }
                let reason = if failure.is_some() {
                    "UpdateFailed"
                } else {
                    "ProgressDeadlineExceeded"
                };
                let why = failure.unwrap_or_else(|| {
                    format!(
                        "batch {} not ready within progressDeadlineSeconds ({} s): {}",
                        r.batch,
                        app.progress_deadline_secs,
                        in_flight
                            .iter()
                            .map(|p| p.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                });
                tracing::warn!(app = %app.key(), from = r.to, to = r.from, reason = %why, "rollout failed: rolling back");
                r.state = RolloutState::RollingBack;
                r.message = format!("rolling back to revision {}: {why}", r.from);
                r.batch_started_ms = now;
                app.revision = r.from;
                app.set_condition("Progressing", false, reason, why);
                app.rollout = Some(r);
                return cluster.commit(inner, vec![Op::PutApp(app)]).map(|_| ());
            }
            let mut remaining: Vec<PodRecord> = pods
                .iter()
                .filter(|p| p.revision != r.to)
                .cloned()
                .collect();
            if remaining.is_empty() {
                if !in_flight.is_empty() {
                    return Ok(());
                }
                r.state = RolloutState::Complete;
                r.finished_ms = now;
                r.message = format!("{} pod(s) at revision {}", pods.len(), r.to);
                app.set_condition("Progressing", true, "RolloutComplete", r.message.clone());
                Metrics::count(&cluster.metrics.rollouts, "result", "complete");
                app.rollout = Some(r);
                return cluster.commit(inner, vec![Op::PutApp(app)]).map(|_| ());
            }
            // Not-ready pods go first (they serve nothing now), then by name.
            remaining.sort_by_key(|p| (Cluster::pod_ready(inner, p), p.name.clone()));
            let n = app::batch_size(&app.max_unavailable, app.replicas).unwrap_or(1) as usize;
            let batch: Vec<PodRecord> = remaining.into_iter().take(n).collect();
            let mut ops = match move_pods(cluster, inner, &app, r.strategy, &batch, r.to) {
                Ok(ops) => ops,
                Err(why) => {
                    tracing::warn!(app = %app.key(), reason = %why, "rollout failed: rolling back");
                    r.state = RolloutState::RollingBack;
                    r.message = format!("rolling back to revision {}: {why}", r.from);
                    r.batch_started_ms = now;
                    app.revision = r.from;
                    app.set_condition("Progressing", false, "Unschedulable", why);
                    app.rollout = Some(r);
                    return cluster.commit(inner, vec![Op::PutApp(app)]).map(|_| ());
                }
            };
            r.batch += 1;
            r.batch_started_ms = now;
            r.message = format!(
                "batch {}: {}",
                r.batch,
                batch
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            app.rollout = Some(r);
            ops.push(Op::PutApp(app));
            cluster.commit(inner, ops).map(|_| ())
        }
        RolloutState::RollingBack => {
            let stale: Vec<PodRecord> = pods
                .iter()
                .filter(|p| p.revision != r.from)
                .cloned()
                .collect();
            if !stale.is_empty() {
                return match move_pods(cluster, inner, &app, r.strategy, &stale, r.from) {
                    Ok(ops) => cluster.commit(inner, ops).map(|_| ()),
                    // The old revision's pods fit where they were; try again next pass.
                    Err(why) => {
                        tracing::warn!(app = %app.key(), reason = %why, "roll back");
                        Ok(())
                    }
                };
            }
            let settled = pods.iter().all(|p| Cluster::pod_ready(inner, p));
            if !settled && now - r.batch_started_ms < deadline_ms {
                return Ok(());
            }
            r.state = RolloutState::RolledBack;
            r.finished_ms = now;
            Metrics::count(&cluster.metrics.rollouts, "result", "rolled_back");
            app.rollout = Some(r);
            cluster.commit(inner, vec![Op::PutApp(app)]).map(|_| ())
        }
        RolloutState::Complete | RolloutState::RolledBack => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kite_protocol::cluster::{NodeHello, NodeStatus, PodReport, PodReports};
    use tokio::sync::mpsc;

    use super::*;
    use crate::cluster::NodeRecord;
    use crate::config::CoordinatorConfig;
    use crate::store::EmbeddedStore;

    /// A coordinator's state over a real store, with `nodes` nodes linked (their messages
    /// dropped): the controllers' logic without the network.
    fn cluster(
        nodes: &[&str],
        config: CoordinatorConfig,
    ) -> (
        tempfile::TempDir,
        Cluster,
        Vec<mpsc::Receiver<CoordinatorMessage>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
        let c = Cluster::load(config, store, Arc::new(Metrics::new()), String::new()).unwrap();
        let mut links = Vec::new();
        for n in nodes {
            let mut inner = c.lock();
            c.commit(
                &mut inner,
                vec![Op::PutNode(NodeRecord {
                    name: (*n).into(),
                    joined_ms: 0,
                    cordoned: false,
                })],
            )
            .unwrap();
            drop(inner);
            let (tx, rx) = mpsc::channel(1024);
            links.push(rx);
            let hello = NodeHello {
                name: (*n).into(),
                status: Some(NodeStatus {
                    allocatable_cpu_millis: 4000,
                    allocatable_memory_bytes: 8 << 30,
                    runtime_classes: vec!["runc".into(), "kite".into()],
                    ..Default::default()
                }),
                pods: None,
            };
            c.attach(n, tx, hello).unwrap();
        }
        (dir, c, links)
    }

    fn deployment(image: &str, replicas: u32) -> String {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec:\n  replicas: {replicas}\n  \
             strategy: {{rollingUpdate: {{maxUnavailable: 1}}}}\n  selector: {{matchLabels: {{app: web}}}}\n  \
             template:\n    metadata: {{labels: {{app: web}}}}\n    spec:\n      runtimeClassName: runc\n      \
             containers: [{{name: web, image: {image}, resources: {{requests: {{cpu: 100m}}}}}}]\n"
        )
    }

    /// Every pod of the app reports itself ready at its assigned revision (or `error`).
    fn report_all(c: &Cluster, error: Option<&str>) {
        let pods = pods_of(&c.lock(), "default/web");
        for p in pods {
            let report = PodReport {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                revision: if error.is_some() { 0 } else { p.revision },
                phase: "Running".into(),
                ready: true,
                update_error: error.unwrap_or("").into(),
                ..Default::default()
            };
            c.report_pods(
                &p.node,
                None,
                PodReports {
                    full: false,
                    pods: vec![report],
                },
            );
        }
    }

    fn per_node(c: &Cluster) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for p in pods_of(&c.lock(), "default/web") {
            *m.entry(p.node).or_default() += 1;
        }
        m
    }

    #[test]
    fn replicas_spread_and_scale_in_takes_the_crowded_node_first() {
        let (_d, c, _links) = cluster(&["a", "b"], CoordinatorConfig::default());
        crate::ops::apply(&c, &deployment("web:v1", 4)).unwrap();
        reconcile(&c);
        assert_eq!(
            per_node(&c),
            BTreeMap::from([("a".into(), 2), ("b".into(), 2)])
        );
        report_all(&c, None);
        crate::ops::scale(&c, "default", "web", 3).unwrap();
        reconcile(&c);
        assert_eq!(pods_of(&c.lock(), "default/web").len(), 3);
        crate::ops::scale(&c, "default", "web", 0).unwrap();
        reconcile(&c);
        assert!(pods_of(&c.lock(), "default/web").is_empty());
    }

    #[test]
    fn an_in_place_rollout_goes_batch_by_batch_and_a_failed_batch_rolls_back() {
        let config = CoordinatorConfig {
            prefetch_timeout_secs: 0,
            ..Default::default()
        };
        let (_d, c, _links) = cluster(&["a", "b"], config);
        crate::ops::apply(&c, &deployment("web:v1", 3)).unwrap();
        reconcile(&c);
        report_all(&c, None);
        crate::ops::apply(&c, &deployment("web:v2", 3)).unwrap();
        let rollout = |c: &Cluster| c.lock().apps["default/web"].value.rollout.clone().unwrap();
        assert_eq!(rollout(&c).strategy, Strategy::InPlace);
        reconcile(&c); // prefetch orders out
        reconcile(&c); // prefetch timed out (0 s): updating
        reconcile(&c); // batch 1
        let r = rollout(&c);
        assert_eq!((r.state, r.batch), (RolloutState::Updating, 1));
        let at_v2 = |c: &Cluster| {
            pods_of(&c.lock(), "default/web")
                .iter()
                .filter(|p| p.revision == 2)
                .count()
        };
        assert_eq!(at_v2(&c), 1, "one pod per batch (maxUnavailable 1)");
        reconcile(&c);
        assert_eq!(at_v2(&c), 1, "the batch waits for readiness");
        report_all(&c, None);
        reconcile(&c);
        assert_eq!(at_v2(&c), 2);
        // The second batch's update fails on its node: back to revision 1, every pod.
        report_all(&c, Some("container web: not ready"));
        reconcile(&c);
        let r = rollout(&c);
        assert_eq!(r.state, RolloutState::RollingBack);
        assert!(r.message.contains("not ready"), "{}", r.message);
        assert_eq!(c.lock().apps["default/web"].value.revision, 1);
        reconcile(&c);
        assert_eq!(at_v2(&c), 0);
        report_all(&c, None);
        reconcile(&c);
        assert_eq!(rollout(&c).state, RolloutState::RolledBack);
    }

    #[test]
    fn a_recreate_rollout_that_fits_nowhere_rolls_back_and_removes_nothing() {
        let config = CoordinatorConfig {
            prefetch_timeout_secs: 0,
            ..Default::default()
        };
        let (_d, c, _links) = cluster(&["a", "b"], config);
        crate::ops::apply(&c, &deployment("web:v1", 2)).unwrap();
        reconcile(&c);
        report_all(&c, None);
        let before: Vec<String> = pods_of(&c.lock(), "default/web")
            .iter()
            .map(|p| p.name.clone())
            .collect();
        // More cpu than any node has: a new sandbox each, and none fits.
        let huge = deployment("web:v1", 2).replace("cpu: 100m", "cpu: 64");
        crate::ops::apply(&c, &huge).unwrap();
        for _ in 0..4 {
            reconcile(&c);
        }
        let app = c.lock().apps["default/web"].value.clone();
        let r = app.rollout.unwrap();
        assert_eq!(r.strategy, Strategy::Recreate);
        assert!(
            matches!(
                r.state,
                RolloutState::RollingBack | RolloutState::RolledBack
            ),
            "{r:?}"
        );
        assert_eq!(app.revision, 1);
        let after: Vec<String> = pods_of(&c.lock(), "default/web")
            .iter()
            .map(|p| p.name.clone())
            .collect();
        assert_eq!(after, before, "no pod was removed");
    }

    #[test]
    fn the_history_keeps_the_revisions_pods_still_run() {
        let (_d, c, _links) = cluster(&["a"], CoordinatorConfig::default());
        let v = |image: &str| {
            deployment(image, 2)
                .replace("replicas: 2\n", "replicas: 2\n  revisionHistoryLimit: 0\n")
        };
        crate::ops::apply(&c, &v("web:v1")).unwrap();
        reconcile(&c);
        // Two changes before any batch: the pods still run revision 1.
        crate::ops::apply(&c, &v("web:v2")).unwrap();
        crate::ops::apply(&c, &v("web:v3")).unwrap();
        let inner = c.lock();
        let app = &inner.apps["default/web"].value;
        assert!(
            app.template(1).is_some(),
            "revision 1 is gone while pods run it"
        );
        assert_eq!(Cluster::assignments_of(&inner, "a").len(), 2);
    }

    #[test]
    fn a_lost_node_loses_its_pods_unless_most_nodes_are_lost() {
        let config = CoordinatorConfig {
            node_timeout_secs: 0,
            pod_eviction_secs: 0,
            ..Default::default()
        };
        let (_d, c, _links) = cluster(&["a", "b", "c"], config);
        let beat = |c: &Cluster, nodes: &[&str], at: Instant| {
            let mut inner = c.lock();
            for n in nodes {
                inner.nodes.get_mut(*n).unwrap().live.last_heartbeat = Some(at);
            }
        };
        let (future, past) = (
            Instant::now() + Duration::from_secs(60),
            Instant::now() - Duration::from_secs(1),
        );
        beat(&c, &["a", "b", "c"], future);
        crate::ops::apply(&c, &deployment("web:v1", 3)).unwrap();
        reconcile(&c);
        assert_eq!(per_node(&c).len(), 3);
        // Every node silent: a coordinator-side outage; nothing moves.
        beat(&c, &["a", "b", "c"], past);
        reconcile(&c);
        assert_eq!(per_node(&c).len(), 3);
        // Two nodes speak again: the third's pod goes to them.
        beat(&c, &["a", "b"], future);
        reconcile(&c);
        let nodes = per_node(&c);
        assert!(!nodes.contains_key("c"), "{nodes:?}");
        assert_eq!(nodes.values().sum::<usize>(), 3, "{nodes:?}");
    }
}
