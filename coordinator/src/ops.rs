//! What the API does to the state: apply, scale, undo, pause, delete, cordon and drain, tokens
//! and joins — each one revision-guarded transaction — and the API's views of apps, pods and
//! nodes.

use kite_protocol::cluster as api;

use crate::app::{self, AppSpec, Strategy};
use crate::cluster::{
    now_ms, AppRecord, Cluster, ClusterError, Inner, NodeRecord, Op, RevisionRecord, RolloutRecord,
    RolloutState, TOKENS,
};
use crate::controller::pods_of;
use crate::pki::{ClusterCa, Identity};
use crate::token::{BootstrapToken, TokenError, TokenRecord};

/// Starts a rollout of `app` from its revision to a new one made of `template`.
/// `in_use`: the revisions the app's pods run now, which the history must keep (a pod whose
/// revision is gone would lose its assignment).
fn new_revision(
    app: &mut AppRecord,
    template: serde_json::Value,
    change_cause: String,
    in_use: &std::collections::BTreeSet<u64>,
) {
    let from = app.revision;
    let number = app.revisions.iter().map(|r| r.number).max().unwrap_or(0) + 1;
    let strategy = match app.template(from) {
        Some(old) if !app.prefer_recreate && app::in_place_possible(old, &template) => {
            Strategy::InPlace
        }
        _ => Strategy::Recreate,
    };
    app.revisions.push(RevisionRecord {
        number,
        template,
        change_cause,
        created_ms: now_ms(),
    });
    // The history keeps `revisionHistoryLimit` old revisions besides the new one.
    let keep = app.revision_history_limit + 1;
    while app.revisions.len() > keep.max(2) {
        let oldest = app
            .revisions
            .iter()
            .map(|r| r.number)
            .filter(|n| *n != from && *n != number && !in_use.contains(n))
            .min();
        match oldest {
            Some(n) => app.revisions.retain(|r| r.number != n),
            None => break,
        }
    }
    app.revision = number;
    app.rollout = Some(RolloutRecord {
        from,
        to: number,
        strategy,
        state: RolloutState::Prefetching,
        batch: 0,
        batch_started_ms: 0,
        started_ms: now_ms(),
        finished_ms: 0,
        message: String::new(),
        prefetch_nodes: Vec::new(),
    });
}

fn revisions_in_use(inner: &Inner, app: &str) -> std::collections::BTreeSet<u64> {
    pods_of(inner, app).iter().map(|p| p.revision).collect()
}

pub fn apply(cluster: &Cluster, manifest: &str) -> Result<api::App, ClusterError> {
    let spec: AppSpec = app::parse(manifest)
        .map_err(|e| ClusterError::Invalid(kite_protocol::errors::error_chain(&e)))?;
    let mut inner = cluster.lock_leading()?;
    let key = spec.key();
    let record = match inner.apps.get(&key).map(|s| s.value.clone()) {
        None => AppRecord {
            namespace: spec.namespace.clone(),
            name: spec.name.clone(),
            created_ms: now_ms(),
            manifest: spec.manifest.clone(),
            replicas: spec.replicas,
            prefer_recreate: spec.prefer_recreate,
            max_unavailable: spec.max_unavailable.clone(),
            progress_deadline_secs: spec.progress_deadline_secs,
            revision_history_limit: spec.revision_history_limit,
            revision: 1,
            revisions: vec![RevisionRecord {
                number: 1,
                template: spec.template.clone(),
                change_cause: spec.change_cause.clone(),
                created_ms: now_ms(),
            }],
            paused: false,
            rollout: None,
            conditions: Vec::new(),
        },
        Some(mut app) => {
            app.manifest = spec.manifest.clone();
            app.replicas = spec.replicas;
            app.prefer_recreate = spec.prefer_recreate;
            app.max_unavailable = spec.max_unavailable.clone();
            app.progress_deadline_secs = spec.progress_deadline_secs;
            app.revision_history_limit = spec.revision_history_limit;
            if app.template(app.revision) != Some(&spec.template) {
                let in_use = revisions_in_use(&inner, &app.key());
                new_revision(
                    &mut app,
                    spec.template.clone(),
                    spec.change_cause.clone(),
                    &in_use,
                );
            }
            app
        }
    };
    cluster.commit(&mut inner, vec![Op::PutApp(record)])?;
    Ok(app_view(cluster, &inner, &key).expect("just committed"))
}

fn app_of(inner: &Inner, namespace: &str, name: &str) -> Result<AppRecord, ClusterError> {
    let ns = if namespace.is_empty() {
        "default"
    } else {
        namespace
    };
    inner
        .apps
        .get(&format!("{ns}/{name}"))
        .map(|s| s.value.clone())
        .ok_or_else(|| ClusterError::NotFound(format!("app {ns}/{name}")))
}

pub fn scale(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
    replicas: u32,
) -> Result<api::App, ClusterError> {
    let mut inner = cluster.lock_leading()?;
    let mut app = app_of(&inner, namespace, name)?;
    let key = app.key();
    app.replicas = replicas;
    if let Some(spec) = app.manifest.pointer_mut("/spec/replicas") {
        *spec = replicas.into();
    }
    cluster.commit(&mut inner, vec![Op::PutApp(app)])?;
    Ok(app_view(cluster, &inner, &key).expect("just committed"))
}

pub fn undo(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
    to: u64,
) -> Result<api::App, ClusterError> {
    let mut inner = cluster.lock_leading()?;
    let mut app = app_of(&inner, namespace, name)?;
    let key = app.key();
    let target = if to == 0 {
        app.revisions
            .iter()
            .map(|r| r.number)
            .filter(|n| *n < app.revision)
            .max()
            .ok_or_else(|| {
                ClusterError::Invalid(format!("app {key} has no revision before {}", app.revision))
            })?
    } else {
        to
    };
    let old = app
        .revisions
        .iter()
        .find(|r| r.number == target)
        .cloned()
        .ok_or_else(|| ClusterError::NotFound(format!("revision {target} of app {key}")))?;
    if target == app.revision {
        return Err(ClusterError::Invalid(format!(
            "app {key} runs revision {target} already"
        )));
    }
    // Like Kubernetes: the old template comes back as the newest revision.
    let in_use = revisions_in_use(&inner, &key);
    new_revision(
        &mut app,
        old.template,
        format!("undo to revision {target}"),
        &in_use,
    );
    // Kubernetes' way: the old revision becomes the newest (kept while pods still run it).
    if !in_use.contains(&target) {
        app.revisions.retain(|r| r.number != target);
    }
    cluster.commit(&mut inner, vec![Op::PutApp(app)])?;
    Ok(app_view(cluster, &inner, &key).expect("just committed"))
}

pub fn set_paused(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
    paused: bool,
) -> Result<api::App, ClusterError> {
    let mut inner = cluster.lock_leading()?;
    let mut app = app_of(&inner, namespace, name)?;
    let key = app.key();
    if app.paused && !paused {
        // The time paused does not count against the batch's deadline.
        if let Some(r) = app.rollout.as_mut() {
            if r.batch_started_ms != 0 {
                r.batch_started_ms = now_ms();
            }
        }
    }
    app.paused = paused;
    cluster.commit(&mut inner, vec![Op::PutApp(app)])?;
    Ok(app_view(cluster, &inner, &key).expect("just committed"))
}

pub fn delete_app(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
) -> Result<api::App, ClusterError> {
    let mut inner = cluster.lock_leading()?;
    let app = app_of(&inner, namespace, name)?;
    let key = app.key();
    let view = app_view(cluster, &inner, &key).expect("exists");
    let mut ops: Vec<Op> = pods_of(&inner, &key)
        .iter()
        .map(|p| Op::DeletePod(p.key()))
        .collect();
    ops.push(Op::DeleteApp(key));
    cluster.commit(&mut inner, ops)?;
    Ok(view)
}

pub fn set_schedulable(
    cluster: &Cluster,
    node: &str,
    cordon: bool,
    drain: bool,
) -> Result<api::NodeInfo, ClusterError> {
    let mut inner = cluster.lock_leading()?;
    let mut record = inner
        .nodes
        .get(node)
        .map(|e| e.record.value.clone())
        .ok_or_else(|| ClusterError::NotFound(format!("node {node}")))?;
    record.cordoned = cordon || drain;
    let mut ops = vec![Op::PutNode(record)];
    if drain {
        // Its pods go; the controllers place their replicas on the other nodes.
        ops.extend(
            inner
                .by_node
                .get(node)
                .into_iter()
                .flatten()
                .cloned()
                .map(Op::DeletePod),
        );
    }
    cluster.commit(&mut inner, ops)?;
    Ok(node_view(cluster, &inner, node).expect("exists"))
}

pub fn create_token(
    cluster: &Cluster,
    ttl_secs: u64,
    description: &str,
) -> Result<(String, i64), ClusterError> {
    let token = BootstrapToken::generate();
    let ttl = if ttl_secs == 0 { 24 * 3600 } else { ttl_secs };
    let record = TokenRecord::new(
        &token,
        now_ms() / 1000,
        i64::try_from(ttl).unwrap_or(i64::MAX),
        description,
    );
    let mut inner = cluster.lock_leading()?;
    cluster.commit(
        &mut inner,
        vec![Op::PutToken(
            token.id.clone(),
            serde_json::to_vec(&record).expect("records serialize"),
            None,
        )],
    )?;
    Ok((token.to_string(), record.expires_unix))
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("node {0} has joined already (a node's name is its identity: pick another, or remove the node first)")]
    NameTaken(String),
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// A node joins: the token is checked and consumed, and the node recorded, in one guarded
/// transaction; the CSR's key is signed for the node's name.
pub fn join(
    cluster: &Cluster,
    ca: &ClusterCa,
    token: &str,
    node: &str,
    csr_pem: &str,
) -> Result<String, JoinError> {
    crate::pki::check_name(node)?;
    let token = BootstrapToken::parse(token)?;
    let key = format!("{TOKENS}{}", token.id);
    let kv = cluster
        .store
        .get(&key)
        .map_err(ClusterError::from)?
        .ok_or_else(|| TokenError::Unknown(token.id.clone()))?;
    let mut record: TokenRecord =
        serde_json::from_slice(&kv.value).map_err(|e| ClusterError::Corrupt {
            key: key.clone(),
            reason: e.to_string(),
        })?;
    record.check(&token, now_ms() / 1000)?;
    let mut inner = cluster.lock_leading()?;
    if inner.nodes.contains_key(node) {
        return Err(JoinError::NameTaken(node.into()));
    }
    let cred = ca.sign_csr(csr_pem, &Identity::Node(node.into()), 365)?;
    record.used_by = Some(node.into());
    let ops = vec![
        Op::PutToken(
            token.id.clone(),
            serde_json::to_vec(&record).expect("records serialize"),
            Some(kv.mod_revision),
        ),
        Op::PutNode(NodeRecord {
            name: node.into(),
            joined_ms: now_ms(),
            cordoned: false,
        }),
    ];
    // A racing join with the same token loses on the token's revision.
    cluster.commit(&mut inner, ops).map_err(|e| match e {
        ClusterError::Conflict { .. } => JoinError::Token(TokenError::Used {
            id: token.id.clone(),
            by: "another node, just now".into(),
        }),
        e => e.into(),
    })?;
    Ok(cred.cert_pem)
}

// ---- views

pub fn app_view(cluster: &Cluster, inner: &Inner, key: &str) -> Option<api::App> {
    let app = &inner.apps.get(key)?.value;
    let pods = pods_of(inner, key);
    let ready = pods
        .iter()
        .filter(|p| Cluster::report_of(inner, p).is_some_and(|r| r.ready))
        .count();
    let updated = pods.iter().filter(|p| p.revision == app.revision).count();
    let available = pods
        .iter()
        .filter(|p| Cluster::pod_ready(inner, p) && p.revision == app.revision)
        .count();
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let _ = cluster;
    Some(api::App {
        namespace: app.namespace.clone(),
        name: app.name.clone(),
        replicas: app.replicas,
        ready_replicas: count(ready),
        updated_replicas: count(updated),
        available_replicas: count(available),
        revision: app.revision,
        history: app
            .revisions
            .iter()
            .map(|r| api::Revision {
                number: r.number,
                images: app::images_of(&r.template).into_iter().collect(),
                change_cause: r.change_cause.clone(),
                created_unix_ms: r.created_ms,
            })
            .collect(),
        rollout: app.rollout.as_ref().map(|r| api::Rollout {
            from_revision: r.from,
            to_revision: r.to,
            strategy: r.strategy.name().into(),
            state: if app.paused && !r.state.finished() {
                "Paused".into()
            } else {
                r.state.name().into()
            },
            batch: r.batch,
            updated: count(
                pods.iter()
                    .filter(|p| p.revision == r.to && Cluster::pod_ready(inner, p))
                    .count(),
            ),
            total: count(pods.len()),
            message: r.message.clone(),
            started_unix_ms: r.started_ms,
            finished_unix_ms: r.finished_ms,
        }),
        paused: app.paused,
        manifest_json: app.manifest.to_string(),
        conditions: app
            .conditions
            .iter()
            .map(|c| api::AppCondition {
                r#type: c.kind.clone(),
                status: if c.status { "True" } else { "False" }.into(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                unix_ms: c.unix_ms,
            })
            .collect(),
        created_unix_ms: app.created_ms,
        strategy: if app.prefer_recreate {
            "Recreate"
        } else {
            "InPlace"
        }
        .into(),
    })
}

pub fn pod_views(inner: &Inner, namespace: &str, app: &str) -> Vec<api::PodInfo> {
    inner
        .pods
        .values()
        .map(|s| &s.value)
        .filter(|p| namespace.is_empty() || p.namespace == namespace)
        .filter(|p| app.is_empty() || p.app == app || p.app == format!("{}/{app}", p.namespace))
        .map(|p| {
            let report = Cluster::report_of(inner, p);
            api::PodInfo {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                app: p.app.clone(),
                node: p.node.clone(),
                revision: p.revision,
                running_revision: report.map(|r| r.revision).unwrap_or(0),
                phase: report
                    .map(|r| r.phase.clone())
                    .unwrap_or_else(|| "Pending".into()),
                ready: report.is_some_and(|r| r.ready),
                ip: report.map(|r| r.ip.clone()).unwrap_or_default(),
                message: report
                    .map(|r| {
                        if r.update_error.is_empty() {
                            r.message.clone()
                        } else {
                            r.update_error.clone()
                        }
                    })
                    .unwrap_or_default(),
                created_unix_ms: p.created_ms,
                ready_ms: report.map(|r| r.ready_ms).unwrap_or(0),
                stages: report.map(|r| r.stages.clone()).unwrap_or_default(),
                events: report.map(|r| r.events.clone()).unwrap_or_default(),
            }
        })
        .collect()
}

pub fn node_view(cluster: &Cluster, inner: &Inner, name: &str) -> Option<api::NodeInfo> {
    let e = inner.nodes.get(name)?;
    Some(api::NodeInfo {
        name: name.into(),
        state: cluster.node_state(&e.live).name().into(),
        cordoned: e.record.value.cordoned,
        status: Some(e.live.status.clone()),
        pods: u32::try_from(inner.by_node.get(name).map_or(0, |s| s.len())).unwrap_or(u32::MAX),
        joined_unix_ms: e.record.value.joined_ms,
        last_heartbeat_unix_ms: e.live.last_heartbeat_ms,
    })
}
