//! A training run: the pod's container, alone in a sandbox of its own (same runtime class and
//! resources, so the JVM's ergonomics are the pod's), started with its JDK's recording options,
//! kept running until ready plus a warm-up, then stopped with a grace period long enough for
//! the JVM to write the archive at exit. The pod itself never waits for it.

use std::path::Path;
use std::time::{Duration, Instant};

use kite_cri::api::{ContainerState, Mount};
use kite_cri::CriClient;

use super::{jvmlog, merged_tool_options, AppKey, Archive, JavaCache, Method, GUEST_OUT_DIR};
use crate::cri_config;
use crate::manifest::PodPlan;
use crate::probe;

/// Sandboxes of training runs carry the key here (a restarted agent removes what it finds:
/// their uid is in no pod record).
pub const LABEL_TRAINING: &str = "kite.io/java-training";

/// What to train.
pub struct TrainingRequest {
    pub key: AppKey,
    /// The pod whose container is trained (its runtime class, resources, volumes).
    pub plan: PodPlan,
    pub container: usize,
    pub method: Method,
    pub agent_id: String,
}

/// Why a training run made no archive.
#[derive(Debug)]
pub enum TrainingError {
    /// The app cannot be archived this way (remembered for the key).
    Unusable(String),
    /// Something else failed (the node, the runtime); a later start may train again.
    Transient(String),
}

impl std::fmt::Display for TrainingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrainingError::Unusable(s) | TrainingError::Transient(s) => f.write_str(s),
        }
    }
}

fn transient(what: &str) -> impl FnOnce(kite_cri::CriError) -> TrainingError + '_ {
    move |e| TrainingError::Transient(format!("{what}: {e}"))
}

/// Runs the training of `req` and publishes its archive.
pub async fn train(
    cache: &JavaCache,
    cri: &mut CriClient,
    req: &TrainingRequest,
) -> Result<Archive, TrainingError> {
    let out = cache
        .training_dir(&req.key)
        .map_err(|e| TrainingError::Transient(e.to_string()))?;
    let mut sandbox_id = None;
    let result = run(cache, cri, req, &out, &mut sandbox_id).await;
    if let Some(id) = sandbox_id {
        let stop = cri.stop_pod_sandbox(&id).await;
        if let Err(e) = stop.and(cri.remove_pod_sandbox(&id).await) {
            tracing::warn!(sandbox = %id, error = %e, "java cache: remove the training sandbox");
        }
    }
    if let Err(e) = std::fs::remove_dir_all(&out) {
        tracing::warn!(dir = %out.display(), error = %e, "java cache: remove a training's files");
    }
    result
}

async fn run(
    cache: &JavaCache,
    cri: &mut CriClient,
    req: &TrainingRequest,
    out: &Path,
    sandbox_id: &mut Option<String>,
) -> Result<Archive, TrainingError> {
    let config = cache.config();
    let source = &req.plan.containers[req.container];
    let mut plan = req.plan.clone();
    plan.uid = format!("java-training-{}", uuid::Uuid::new_v4().simple());
    plan.name = format!("java-training-{}", req.key.short());
    plan.labels = [(LABEL_TRAINING.to_string(), req.key.to_string())].into();
    plan.annotations.clear();
    let mut c = source.clone();
    let ours = req.method.record_options();
    let options = merged_tool_options(&ours, &c.env);
    c.env.retain(|(k, _)| k != "JAVA_TOOL_OPTIONS");
    c.env.push(("JAVA_TOOL_OPTIONS".into(), options));
    plan.containers = vec![c.clone()];
    // The training's own emptyDirs and logs, under its output directory.
    for v in &plan.volumes {
        let dir = cri_config::volume_dir(out, &plan.uid, v);
        std::fs::create_dir_all(&dir)
            .map_err(|e| TrainingError::Transient(format!("create {}: {e}", dir.display())))?;
    }
    let sandbox = cri_config::sandbox_config(&plan, 0, &req.agent_id, out);
    let log_dir = cri_config::pod_log_dir(out, &plan);
    // What the training container printed (its CRI log), for the reasons of a failure.
    let output = log_dir.join(cri_config::container_log_path(&c.name, 0));
    std::fs::create_dir_all(&log_dir)
        .map_err(|e| TrainingError::Transient(format!("create {}: {e}", log_dir.display())))?;
    let mut container = cri_config::container_config(&plan, &c, 0, &req.agent_id, out);
    container
        .labels
        .insert(LABEL_TRAINING.into(), req.key.to_string());
    container.mounts.push(Mount {
        container_path: GUEST_OUT_DIR.into(),
        host_path: out.display().to_string(),
        readonly: false,
        ..Default::default()
    });

    let id = cri
        .run_pod_sandbox(&sandbox, &plan.runtime_class)
        .await
        .map_err(transient("run the training sandbox"))?;
    *sandbox_id = Some(id.clone());
    let ip = cri
        .pod_sandbox_status(&id)
        .await
        .map_err(transient("read the training sandbox"))?
        .network
        .map(|n| n.ip)
        .unwrap_or_default();
    cri_config::write_hosts(out, &plan.uid, &ip, &sandbox.hostname)
        .map_err(|e| TrainingError::Transient(format!("write the hosts file: {e}")))?;
    let cid = cri
        .create_container(&id, &container, &sandbox)
        .await
        .map_err(transient("create the training container"))?;
    cri.start_container(&cid)
        .await
        .map_err(transient("start the training container"))?;
    let started = Instant::now();

    // Ready (its readiness probe, or running), or given up.
    let deadline = started + Duration::from_secs(config.ready_timeout_secs);
    loop {
        let status = cri
            .container_status(&cid)
            .await
            .map_err(transient("read the training container"))?;
        if status.state != ContainerState::ContainerRunning as i32 {
            if status.state == ContainerState::ContainerExited as i32 {
                return Err(TrainingError::Unusable(format!(
                    "the training run exited with code {} before it was ready{}{}",
                    status.exit_code,
                    errors_of(out),
                    output_of(&output)
                )));
            }
        } else {
            match &source.readiness {
                Some(p) => {
                    if probe::run_once(&p.action, p.timeout, &ip, &cid, cri)
                        .await
                        .is_ok()
                    {
                        break;
                    }
                }
                // No probe: running is ready; the warm-up gives the app its time.
                None => break,
            }
        }
        if Instant::now() >= deadline {
            return Err(TrainingError::Unusable(format!(
                "the training run was not ready within {} s",
                config.ready_timeout_secs
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(config.warmup_secs)).await;

    // The JVM writes the archive at exit.
    let grace = Duration::from_secs(config.dump_grace_secs);
    let stopped = Instant::now();
    cri.stop_container(&cid, grace)
        .await
        .map_err(transient("stop the training container"))?;
    let status = cri
        .container_status(&cid)
        .await
        .map_err(transient("read the training container"))?;
    tracing::info!(key = %req.key, exit_code = status.exit_code, dump_ms = stopped.elapsed().as_millis() as u64, "java cache: training run stopped");
    let _ = cri.remove_container(&cid).await;
    // SIGKILL after the grace period: whatever was written is not trusted.
    if status.exit_code == 137 {
        return Err(TrainingError::Unusable(format!(
            "the training run did not end within its {} s grace period (killed): the JVM must stop on SIGTERM to write its archive",
            config.dump_grace_secs
        )));
    }
    let produced = out.join(req.method.file_name());
    let logs = jvmlog::read_dir(out, super::LOG_PREFIX, None);
    let errors: Vec<&String> = logs.iter().flat_map(|l| &l.errors).collect();
    let size = std::fs::metadata(&produced).map(|m| m.len()).unwrap_or(0);
    if size == 0 || !errors.is_empty() {
        return Err(TrainingError::Unusable(format!(
            "the JVM wrote no usable {} at exit (exit code {}){}{}",
            req.method.name(),
            status.exit_code,
            errors_of(out),
            output_of(&output)
        )));
    }
    let jdk = logs
        .iter()
        .find_map(|l| l.version.clone())
        .unwrap_or_default();
    cache
        .publish(&req.key, &produced, req.method, &jdk)
        .map_err(|e| match e {
            super::JavaCacheError::TooLarge { .. } => TrainingError::Unusable(e.to_string()),
            e => TrainingError::Transient(kite_protocol::errors::error_chain(&e)),
        })
}

/// The last lines the training container printed (a JVM that crashed says why there), as a
/// suffix of a message. CRI log lines are `<time> <stream> <tag> <text>`.
fn output_of(log: &Path) -> String {
    let Some(text) = crate::pod::read_tail(log, 4096) else {
        return String::new();
    };
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail = &lines[lines.len().saturating_sub(3)..];
    format!("; its last output: {}", tail.join(" | "))
}

/// The JVMs' error lines in a training's output, as a suffix of a message.
fn errors_of(out: &Path) -> String {
    let logs = jvmlog::read_dir(out, super::LOG_PREFIX, None);
    let errors: Vec<String> = logs.into_iter().flat_map(|l| l.errors).take(3).collect();
    if errors.is_empty() {
        String::new()
    } else {
        format!(": {}", errors.join("; "))
    }
}
