//! One pod's worker: the only task that makes CRI calls for its pod, so starts, restarts,
//! probes, updates and the deletion never race. It runs the start path (in parallel or in a
//! kubelet's order), then supervises (states from the CRI, restart policy with back-off,
//! probes), and takes commands (update, delete) between its steps.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kite_cri::api::{ContainerState, PodSandboxConfig};
use kite_cri::CriClient;
use kite_protocol::node::ContainerStatus;
use tokio::sync::{mpsc, oneshot};

use crate::config::{AgentConfig, StartOrder};
use crate::cri_config;
use crate::javacache::jvmlog::{self, ArchiveVerdict};
use crate::javacache::training::{self, TrainingError, TrainingRequest};
use crate::javacache::{self, AfterRejection, AppKey, JavaCache, Method, Plan};
use crate::manifest::{self, ContainerPlan, PodPlan};
use crate::metrics::Metrics;
use crate::probe::{self, ProbeState};
use crate::status::{now_ms, EventType, PodShared};

/// What every pod worker shares: the configuration, the CRI and the metrics.
pub struct NodeContext {
    pub config: AgentConfig,
    /// The Java start-up cache (None when `[agent.java_cache] enabled = false`).
    pub java_cache: Option<Arc<JavaCache>>,
    pub cri: CriClient,
    pub metrics: Arc<Metrics>,
}

pub enum PodCommand {
    /// Replace a container in place (new image and/or env values), rolling back on failure.
    Update {
        container: String,
        image: String,
        env: BTreeMap<String, String>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Stop and remove everything of the pod (grace period override), then end.
    Delete {
        grace: Option<Duration>,
        reply: oneshot::Sender<()>,
    },
}

/// How a worker begins.
pub enum Begin {
    /// A new pod: run the start path from `bind`.
    Start { bind: Instant },
    /// A running pod a restarted agent adopts: its sandbox and, per container name, the CRI
    /// container and attempt.
    Adopt {
        sandbox_id: String,
        containers: BTreeMap<String, (String, u32)>,
    },
    /// A pod that had ended (failed to start, or its containers finished) before the agent
    /// restarted: it waits for its deletion.
    Ended,
}

/// A container's run: its CRI container and what the supervision knows about it.
struct ContainerRun {
    id: Option<String>,
    attempt: u32,
    restarts: u32,
    started: Option<Instant>,
    /// The last back-off delay, and when the next start is due.
    backoff: Option<Duration>,
    restart_at: Option<Instant>,
    readiness: Option<ProbeState>,
    liveness: Option<ProbeState>,
    ready: bool,
    /// Ended and not to be started again (its exit code).
    finished: Option<i32>,
    image_id: String,
    /// The Java cache's part in this instance, when the pod asked for it.
    java: Option<JavaRun>,
}

/// What the Java cache did for a container instance, until the JVM's log has been read.
struct JavaRun {
    key: AppKey,
    /// The container as it was started (the plan a training copies).
    container: ContainerPlan,
    /// This instance's JVM logs on the host.
    log_dir: std::path::PathBuf,
    /// The archive it was given (None: it runs without, and tells its JDK).
    attached: Option<javacache::Archive>,
    started: Instant,
    settled: bool,
}

impl ContainerRun {
    fn new() -> ContainerRun {
        ContainerRun {
            id: None,
            attempt: 0,
            restarts: 0,
            started: None,
            backoff: None,
            restart_at: None,
            readiness: None,
            liveness: None,
            ready: false,
            finished: None,
            image_id: String::new(),
            java: None,
        }
    }
}

/// Why the start path stopped early.
enum Interrupted {
    Delete(Option<Duration>, oneshot::Sender<()>),
    Failed(String),
}

pub struct PodWorker {
    ctx: Arc<NodeContext>,
    cri: CriClient,
    plan: PodPlan,
    order: StartOrder,
    shared: Arc<PodShared>,
    commands: mpsc::Receiver<PodCommand>,
    sandbox_id: Option<String>,
    sandbox_config: PodSandboxConfig,
    ip: String,
    runs: Vec<ContainerRun>,
    ever_ready: bool,
    containers_started: Option<Instant>,
    bind: Instant,
    failed: bool,
    updating: bool,
    last_reconcile: Instant,
    /// The start's prefetch, while it runs (aborted when the pod goes).
    prefetch_task: Option<tokio::task::JoinHandle<()>>,
    /// The sandbox died: the start path runs again.
    restart_pending: bool,
}

/// How often a worker looks for sandboxes of its pod that are not its own.
const RECONCILE_EVERY: Duration = Duration::from_secs(3);

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl PodWorker {
    pub fn new(
        ctx: Arc<NodeContext>,
        plan: PodPlan,
        order: StartOrder,
        shared: Arc<PodShared>,
        commands: mpsc::Receiver<PodCommand>,
    ) -> PodWorker {
        let attempt = shared.snapshot().sandbox_attempt;
        let sandbox_config =
            cri_config::sandbox_config(&plan, attempt, &ctx.config.agent_id, &ctx.config.log_dir);
        let runs = plan
            .containers
            .iter()
            .map(|_| ContainerRun::new())
            .collect();
        PodWorker {
            cri: ctx.cri.clone(),
            ctx,
            plan,
            order,
            shared,
            commands,
            sandbox_id: None,
            sandbox_config,
            ip: String::new(),
            runs,
            ever_ready: false,
            containers_started: None,
            bind: Instant::now(),
            failed: false,
            updating: false,
            last_reconcile: Instant::now(),
            prefetch_task: None,
            restart_pending: false,
        }
    }

    fn event(&self, kind: EventType, reason: &str, container: &str, message: impl Into<String>) {
        self.shared.event(kind, reason, container, message);
    }

    /// Records a stage that ends now.
    fn stage(&self, name: &str, origin: Instant, started: Instant, detail: String) {
        self.stage_until(name, origin, started, Instant::now(), detail);
    }

    /// Records a stage (in the status and the histograms).
    fn stage_until(
        &self,
        name: &str,
        origin: Instant,
        started: Instant,
        ended: Instant,
        detail: String,
    ) {
        self.shared.stage(name, origin, started, ended, detail);
        let kind = name.split('/').next().unwrap_or(name);
        self.ctx.metrics.observe_stage(
            kind,
            &self.plan.runtime_class,
            self.order.name(),
            secs(ended - started),
        );
    }

    /// Runs the pod until it is deleted.
    pub async fn run(mut self, begin: Begin) {
        match begin {
            Begin::Start { bind } => {
                if !self.start_from(bind).await {
                    return;
                }
            }
            Begin::Adopt {
                sandbox_id,
                containers,
            } => self.adopt(sandbox_id, containers).await,
            Begin::Ended => self.failed = true,
        }
        loop {
            let interval = if self.starting() {
                self.ctx.config.ready_poll()
            } else {
                self.ctx.config.sync_interval()
            };
            let tick = tokio::time::sleep(interval);
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(PodCommand::Delete { grace, reply }) => {
                        self.delete(grace).await;
                        let _ = reply.send(());
                        return;
                    }
                    Some(PodCommand::Update { container, image, env, reply }) => {
                        let result = if self.failed {
                            Err("the pod has ended; delete it and run it again".to_string())
                        } else {
                            self.update(&container, &image, &env).await
                        };
                        let _ = reply.send(result);
                    }
                    // The agent is going away; the pod keeps running.
                    None => return,
                },
                _ = tick, if !self.failed => {
                    self.sync().await;
                    if std::mem::take(&mut self.restart_pending) && !self.start_from(Instant::now()).await {
                        return;
                    }
                }
            }
        }
    }

    /// Runs the start path from `bind`; false when the pod was deleted meanwhile (the worker
    /// ends).
    async fn start_from(&mut self, bind: Instant) -> bool {
        self.bind = bind;
        match self.start().await {
            Ok(()) => true,
            Err(Interrupted::Delete(grace, reply)) => {
                self.delete(grace).await;
                let _ = reply.send(());
                false
            }
            Err(Interrupted::Failed(message)) => {
                self.fail(message).await;
                true
            }
        }
    }

    /// Whether a container runs that has not been ready yet (it is watched closely).
    fn starting(&self) -> bool {
        self.runs.iter().any(|r| {
            r.id.is_some()
                && !r.ready
                && r.finished.is_none()
                && r.restart_at.is_none()
                && r.readiness.as_ref().is_none_or(|p| !p.ever_ready())
        })
    }

    /// A delete (or refuses an update) that arrived during the start path.
    fn interrupted(&mut self) -> Result<(), Interrupted> {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                PodCommand::Delete { grace, reply } => {
                    return Err(Interrupted::Delete(grace, reply));
                }
                PodCommand::Update { reply, .. } => {
                    let _ = reply.send(Err("the pod is still starting".into()));
                }
            }
        }
        Ok(())
    }

    async fn fail(&mut self, message: String) {
        self.failed = true;
        self.ctx.metrics.pod_start_failures.inc();
        self.event(EventType::Warning, "Failed", "", message.clone());
        // What the pod took goes back now; its record stays until it is deleted.
        if let Some(prefetch) = self.prefetch_task.take() {
            prefetch.abort();
        }
        self.release().await;
        self.shared.update(|p| {
            p.phase = "Failed".into();
            p.ready = false;
            p.message = message;
        });
    }

    /// Prefetches the pod's images through the snapshotter (a failure is a warning: the pull
    /// still fetches them); what it did, in a line.
    async fn prefetch(&self, images: &[String]) -> String {
        prefetch_images(&self.ctx.config.prefetch_socket, images, &self.shared).await
    }

    /// The prefetch as a task of its own, recorded as the stage `prefetch` when it ends: the
    /// start does not wait for it (what the container reads first is fetched on demand if the
    /// prefetch has not got it yet).
    fn spawn_prefetch(&mut self, images: Vec<String>, origin: Instant) {
        let socket = self.ctx.config.prefetch_socket.clone();
        if socket.as_os_str().is_empty() {
            return;
        }
        let shared = self.shared.clone();
        let metrics = self.ctx.metrics.clone();
        let (class, order) = (self.plan.runtime_class.clone(), self.order.name());
        self.prefetch_task = Some(tokio::spawn(async move {
            let t = Instant::now();
            let detail = prefetch_images(&socket, &images, &shared).await;
            let end = Instant::now();
            shared.stage("prefetch", origin, t, end, detail);
            metrics.observe_stage("prefetch", &class, order, secs(end - t));
        }));
    }

    /// Pulls each image through the CRI; gives the image ids by image, or the first error.
    async fn pull(&self, images: &[String]) -> Result<BTreeMap<String, String>, String> {
        for image in images {
            self.event(
                EventType::Normal,
                "Pulling",
                "",
                format!("pulling image {image}"),
            );
        }
        let results = futures::future::join_all(images.iter().map(|image| {
            let mut cri = self.cri.clone();
            async move { (image.clone(), cri.pull_image(image).await) }
        }))
        .await;
        let mut ids = BTreeMap::new();
        for (image, result) in results {
            match result {
                Ok(id) => {
                    self.event(
                        EventType::Normal,
                        "Pulled",
                        "",
                        format!("image {image} is {id}"),
                    );
                    ids.insert(image, id);
                }
                Err(e) => return Err(format!("{e}")),
            }
        }
        Ok(ids)
    }

    async fn run_sandbox(&self) -> Result<String, String> {
        let mut cri = self.cri.clone();
        cri.run_pod_sandbox(&self.sandbox_config, &self.plan.runtime_class)
            .await
            .map_err(|e| e.to_string())
    }

    /// The pod's images, each once.
    fn images(&self) -> Vec<String> {
        let mut images: Vec<String> = Vec::new();
        for c in &self.plan.containers {
            if !images.contains(&c.image) {
                images.push(c.image.clone());
            }
        }
        images
    }

    /// The shim's breakdown of the VM's boot (its start record for the sandbox).
    fn boot_detail(&self, sandbox_id: &str) -> String {
        let file = &self.ctx.config.shim_timings_file;
        if self.plan.runtime_class != "kite" || file.as_os_str().is_empty() {
            return String::new();
        }
        // The file grows with every start on the node: its tail holds this sandbox's record.
        let Some(text) = read_tail(file, 256 << 10) else {
            return String::new();
        };
        let needle = format!("\"sandbox\":\"{sandbox_id}\"");
        let Some(record) = text
            .lines()
            .rev()
            .filter(|l| l.contains(&needle))
            .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r["booted"].as_bool() == Some(true))
        else {
            return String::new();
        };
        let f = |k: &str| record[k].as_f64().unwrap_or(0.0).round();
        format!(
            "VM boot {} ms (guest kernel {} ms, guest agent {} ms), virtiofsd {} ms, network {} ms",
            f("vm_boot_ms"),
            f("guest_kernel_ms"),
            f("guest_agent_ms"),
            f("virtiofsd_ms"),
            f("network_attach_ms") + f("network_guest_ms"),
        )
    }

    async fn sandbox_ready(&mut self, sandbox_id: String) {
        let ip = match self.cri.pod_sandbox_status(&sandbox_id).await {
            Ok(s) => s.network.map(|n| n.ip).unwrap_or_default(),
            Err(e) => {
                tracing::warn!(pod = %self.plan.name, error = %e, "read the sandbox's IP");
                String::new()
            }
        };
        self.ip = ip.clone();
        self.write_hosts();
        self.sandbox_id = Some(sandbox_id.clone());
        self.shared.update(|p| {
            p.sandbox_id = sandbox_id;
            p.ip = ip;
        });
    }

    /// The pod's /etc/hosts, for its current IP.
    fn write_hosts(&self) {
        let state = &self.ctx.config.state_dir;
        let hostname = &self.sandbox_config.hostname;
        if let Err(e) = cri_config::write_hosts(state, &self.plan.uid, &self.ip, hostname) {
            tracing::warn!(pod = %self.plan.name, error = %e, "write the pod's hosts file");
        }
    }

    async fn start(&mut self) -> Result<(), Interrupted> {
        let bind = self.bind;
        self.event(
            EventType::Normal,
            "Scheduled",
            "",
            format!(
                "bound to this node; {} pod, {} start",
                self.plan.runtime_class,
                self.order.name()
            ),
        );
        for dir in self.plan.volumes.iter() {
            let path = cri_config::volume_dir(&self.ctx.config.state_dir, &self.plan.uid, dir);
            std::fs::create_dir_all(&path).map_err(|e| {
                Interrupted::Failed(format!("create emptyDir {}: {e}", path.display()))
            })?;
        }
        let log_dir = cri_config::pod_log_dir(&self.ctx.config.log_dir, &self.plan);
        std::fs::create_dir_all(&log_dir).map_err(|e| {
            Interrupted::Failed(format!("create log dir {}: {e}", log_dir.display()))
        })?;
        let images = self.images();
        let image_ids = match self.order {
            StartOrder::Parallel => {
                // The fetch and the sandbox (the VM boot) at once.
                let t0 = Instant::now();
                self.spawn_prefetch(images.clone(), bind);
                let pull = async {
                    let r = self.pull(&images).await;
                    (Instant::now(), r)
                };
                let sandbox = async {
                    let r = self.run_sandbox().await;
                    (Instant::now(), r)
                };
                let ((pull_end, pulled), (sandbox_end, sandbox)) = tokio::join!(pull, sandbox);
                let stage = |name: &str, end: Instant, detail: String| {
                    self.stage_until(name, bind, t0, end, detail)
                };
                stage("pull", pull_end, String::new());
                let sandbox_detail = sandbox
                    .as_ref()
                    .map(|id| self.boot_detail(id))
                    .unwrap_or_default();
                stage("sandbox", sandbox_end, sandbox_detail);
                if let Ok(id) = sandbox {
                    self.sandbox_ready(id).await;
                } else if let Err(e) = sandbox {
                    return Err(Interrupted::Failed(e));
                }
                self.interrupted()?;
                pulled.map_err(Interrupted::Failed)?
            }
            StartOrder::Kubelet => {
                let t = Instant::now();
                let sandbox = self.run_sandbox().await.map_err(Interrupted::Failed)?;
                let detail = self.boot_detail(&sandbox);
                self.stage("sandbox", bind, t, detail);
                self.sandbox_ready(sandbox).await;
                self.interrupted()?;
                let t = Instant::now();
                let ids = self.pull(&images).await.map_err(Interrupted::Failed)?;
                self.stage("pull", bind, t, String::new());
                ids
            }
        };
        for (i, c) in self.plan.containers.iter().enumerate() {
            self.runs[i].image_id = image_ids.get(&c.image).cloned().unwrap_or_default();
        }
        self.interrupted()?;
        for i in 0..self.plan.containers.len() {
            if let Err(e) = self.start_container(i, Some(bind)).await {
                // A container that cannot start is retried with back-off, like one that crashed.
                self.container_failed(i, e);
            }
            self.interrupted()?;
        }
        self.containers_started = Some(Instant::now());
        self.publish_containers();
        Ok(())
    }

    /// Creates and starts instance `attempt + 1` of container `i` (its previous instance, if
    /// any, removed). Stages are recorded when `origin` is given.
    async fn start_container(&mut self, i: usize, origin: Option<Instant>) -> Result<(), String> {
        let c = self.plan.containers[i].clone();
        self.start_container_as(i, &c, origin, "").await
    }

    async fn start_container_as(
        &mut self,
        i: usize,
        c: &ContainerPlan,
        origin: Option<Instant>,
        stage_prefix: &str,
    ) -> Result<(), String> {
        let sandbox_id = self.sandbox_id.clone().ok_or("the pod has no sandbox")?;
        if let Some(old) = self.runs[i].id.take() {
            if let Err(e) = self.cri.remove_container(&old).await {
                tracing::warn!(pod = %self.plan.name, container = %c.name, error = %e, "remove the old instance");
            }
        }
        let attempt = if self.runs[i].started.is_some() || self.runs[i].attempt > 0 {
            self.runs[i].attempt + 1
        } else {
            0
        };
        self.runs[i].attempt = attempt;
        if !cri_config::hosts_path(&self.ctx.config.state_dir, &self.plan.uid).exists() {
            // An adopted pod of an agent that wrote none.
            self.write_hosts();
        }
        let mut config = cri_config::container_config(
            &self.plan,
            c,
            attempt,
            &self.ctx.config.agent_id,
            &self.ctx.config.state_dir,
        );
        self.runs[i].java = self.java_for(i, c, attempt, &mut config).await;
        let t = Instant::now();
        let id = self
            .cri
            .create_container(&sandbox_id, &config, &self.sandbox_config)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(origin) = origin {
            self.stage(
                &format!("{stage_prefix}create/{}", c.name),
                origin,
                t,
                String::new(),
            );
        }
        let t = Instant::now();
        if let Err(e) = self.cri.start_container(&id).await {
            let _ = self.cri.remove_container(&id).await;
            return Err(e.to_string());
        }
        if let Some(origin) = origin {
            self.stage(
                &format!("{stage_prefix}start/{}", c.name),
                origin,
                t,
                String::new(),
            );
        }
        let now = Instant::now();
        let run = &mut self.runs[i];
        run.id = Some(id.clone());
        run.started = Some(now);
        run.finished = None;
        run.restart_at = None;
        run.ready = false;
        let fast = self.ctx.config.ready_poll();
        run.readiness = c
            .readiness
            .as_ref()
            .map(|p| ProbeState::new(p, now).until_ready_every(fast));
        run.liveness = c.liveness.as_ref().map(|p| ProbeState::new(p, now));
        self.event(
            EventType::Normal,
            "Started",
            &c.name,
            format!(
                "started container {} ({}, attempt {attempt})",
                c.name, c.image
            ),
        );
        Ok(())
    }

    /// The Java cache's part in starting instance `attempt` of container `c` (`i`): the archive
    /// (sha256-checked first) or, without one, the log that tells the JDK; mounts and
    /// `JAVA_TOOL_OPTIONS` (the user's kept, after kite's) go into `config`.
    async fn java_for(
        &mut self,
        i: usize,
        c: &ContainerPlan,
        attempt: u32,
        config: &mut kite_cri::api::ContainerConfig,
    ) -> Option<JavaRun> {
        if !self.plan.java_cache {
            return None;
        }
        let Some(cache) = self.ctx.java_cache.clone() else {
            if attempt == 0 {
                self.event(
                    EventType::Warning,
                    "JavaCacheSkipped",
                    &c.name,
                    "the node's Java cache is disabled ([agent.java_cache] enabled = false)",
                );
            }
            return None;
        };
        let key = javacache::app_key(&self.plan.runtime_class, &self.runs[i].image_id, c);
        let starts = &self.ctx.metrics.java_starts;
        let mut attached = None;
        match cache.plan(&key) {
            Plan::Skip(why) => {
                starts.get_or_create(&result_label("skipped")).inc();
                if attempt == 0 {
                    self.event(
                        EventType::Normal,
                        "JavaCacheSkipped",
                        &c.name,
                        format!("{} is not cached: {why}", c.name),
                    );
                }
                return None;
            }
            Plan::Attach { dir, archive } => {
                let verified = {
                    let (cache, key, a) = (cache.clone(), key.clone(), archive.clone());
                    tokio::task::spawn_blocking(move || cache.verify(&key, &a))
                        .await
                        .unwrap_or_else(|e| Err(format!("verify task: {e}")))
                };
                match verified {
                    Ok(()) => {
                        config.mounts.push(kite_cri::api::Mount {
                            container_path: javacache::GUEST_ARCHIVE_DIR.into(),
                            host_path: dir.display().to_string(),
                            readonly: true,
                            ..Default::default()
                        });
                        attached = Some(archive);
                    }
                    Err(why) => {
                        starts.get_or_create(&result_label("corrupted")).inc();
                        self.ctx.metrics.set_java_cache_bytes(cache.bytes());
                        self.event(
                            EventType::Warning,
                            "JavaCacheCorrupted",
                            &c.name,
                            format!("{why}; evicted, {} starts without it", c.name),
                        );
                    }
                }
            }
            Plan::Observe => {}
        }
        let log_dir = self
            .ctx
            .config
            .state_dir
            .join("java")
            .join(&self.plan.uid)
            .join(format!("{}-{attempt}", c.name));
        let made = std::fs::create_dir_all(&log_dir).and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            // The JVM may run as any user of the image.
            std::fs::set_permissions(&log_dir, std::fs::Permissions::from_mode(0o777))
        });
        if let Err(e) = made {
            tracing::warn!(pod = %self.plan.name, dir = %log_dir.display(), error = %e, "java cache: make the log directory");
            config
                .mounts
                .retain(|m| m.container_path != javacache::GUEST_ARCHIVE_DIR);
            return None;
        }
        config.mounts.push(kite_cri::api::Mount {
            container_path: javacache::GUEST_LOG_DIR.into(),
            host_path: log_dir.display().to_string(),
            readonly: false,
            ..Default::default()
        });
        let ours = match &attached {
            Some(a) => a.method.use_options(),
            None => javacache::observe_options(),
        };
        let options = javacache::merged_tool_options(&ours, &c.env);
        config.envs.retain(|kv| kv.key != "JAVA_TOOL_OPTIONS");
        config.envs.push(kite_cri::api::KeyValue {
            key: "JAVA_TOOL_OPTIONS".into(),
            value: options,
        });
        if attached.is_none() {
            starts.get_or_create(&result_label("observed")).inc();
        }
        Some(JavaRun {
            key,
            container: c.clone(),
            log_dir,
            attached,
            started: Instant::now(),
            settled: false,
        })
    }

    /// Reads what the JVM of container `i` logged, once it is ready (or has had its time):
    /// whether it mapped the archive it was given, or its JDK, which starts the training.
    fn check_java(&mut self, i: usize) {
        let ready = self.runs[i].ready;
        let Some(run) = self.runs[i].java.as_mut() else {
            return;
        };
        let Some(cache) = self.ctx.java_cache.clone() else {
            return;
        };
        if run.settled {
            return;
        }
        let timeout = Duration::from_secs(cache.config().observe_timeout_secs);
        let timed_out = run.started.elapsed() >= timeout;
        if !ready && !timed_out {
            return;
        }
        let guest_archive = run.attached.as_ref().map(|a| a.method.guest_archive());
        let logs = jvmlog::read_dir(
            &run.log_dir,
            javacache::LOG_PREFIX,
            guest_archive.as_deref(),
        );
        if logs.is_empty() && !timed_out {
            // Ready before its JVM logged (another process answers the probe): wait.
            return;
        }
        run.settled = true;
        let (key, container, attached) =
            (run.key.clone(), run.container.clone(), run.attached.clone());
        let name = container.name.clone();
        let starts = &self.ctx.metrics.java_starts;
        let feature = logs.iter().find_map(|l| l.feature);
        if let Some(archive) = attached {
            let verdict = match jvmlog::combined(&logs) {
                ArchiveVerdict::NotMentioned if logs.is_empty() => {
                    ArchiveVerdict::Rejected(format!(
                        "no JVM in {name} logged within {} s of its start",
                        timeout.as_secs()
                    ))
                }
                ArchiveVerdict::NotMentioned => ArchiveVerdict::Rejected(
                    "the JVM did not open the archive (an option of the container's overrides it?)"
                        .into(),
                ),
                v => v,
            };
            match verdict {
                ArchiveVerdict::Mapped => {
                    starts.get_or_create(&result_label("mapped")).inc();
                    self.event(
                        EventType::Normal,
                        "JavaCacheMapped",
                        &name,
                        format!(
                            "the JVM of {name} mapped its {} archive ({:.1} MB, recorded by JDK {})",
                            archive.method.name(),
                            archive.bytes as f64 / 1e6,
                            archive.jdk
                        ),
                    );
                }
                ArchiveVerdict::Rejected(why) => {
                    starts.get_or_create(&result_label("rejected")).inc();
                    match cache.reject(&key, &why) {
                        AfterRejection::Retrain => {
                            self.event(
                                EventType::Warning,
                                "JavaCacheRejected",
                                &name,
                                format!("the JVM of {name} rejected its archive ({why}); it is no longer given, and is recorded once more"),
                            );
                            if let Some(method) = feature.and_then(Method::for_feature) {
                                self.spawn_training(i, key, container, method);
                            }
                        }
                        AfterRejection::Unusable(reason) => {
                            self.event(
                                EventType::Warning,
                                "JavaCacheRejected",
                                &name,
                                format!("{name} is no longer cached: {reason}"),
                            );
                        }
                    }
                    self.ctx.metrics.set_java_cache_bytes(cache.bytes());
                }
                ArchiveVerdict::NotMentioned => unreachable!("mapped to a rejection above"),
            }
            return;
        }
        let unusable = match (feature, logs.is_empty()) {
            (_, true) => Some(format!(
                "no JVM in {name} read JAVA_TOOL_OPTIONS within {} s of its start",
                timeout.as_secs()
            )),
            (None, false) => Some("the JVM's log tells no version (JDK 9 or later needed)".into()),
            (Some(f), false) => match Method::for_feature(f) {
                None => Some(format!(
                    "JDK {f} has no dynamic class archive (13 or later needed)"
                )),
                Some(_) => javacache::key::undumpable_class_path(&container),
            },
        };
        if let Some(why) = unusable {
            if cache.entry(&key).is_none_or(|e| e.unusable.is_none()) {
                cache.mark_unusable(&key, &why);
                self.event(
                    EventType::Normal,
                    "JavaCacheSkipped",
                    &name,
                    format!("{name} is not cached: {why}"),
                );
            }
            return;
        }
        if let Some(method) = feature.and_then(Method::for_feature) {
            self.spawn_training(i, key, container, method);
        }
    }

    /// Records the archive of container `i` in a training run of its own, in the background.
    fn spawn_training(&self, i: usize, key: AppKey, container: ContainerPlan, method: Method) {
        let Some(cache) = self.ctx.java_cache.clone() else {
            return;
        };
        let app = format!(
            "{}/{} {} {}",
            self.plan.namespace, self.plan.name, container.name, container.image
        );
        if !cache.begin_training(&key, &app) {
            if cache.entry(&key).is_some_and(|e| e.training) {
                self.event(
                    EventType::Normal,
                    "JavaCacheTraining",
                    &container.name,
                    "another start of this app is recording its archive; a later start maps it",
                );
            }
            return;
        }
        let name = container.name.clone();
        let mut plan = self.plan.clone();
        plan.containers[i] = container;
        let req = TrainingRequest {
            key: key.clone(),
            plan,
            container: i,
            method,
            agent_id: self.ctx.config.agent_id.clone(),
        };
        let (shared, metrics, mut cri) = (
            self.shared.clone(),
            self.ctx.metrics.clone(),
            self.cri.clone(),
        );
        tokio::spawn(async move {
            let _slot = cache.training_slots.acquire().await;
            shared.event(
                EventType::Normal,
                "JavaCacheTraining",
                &name,
                format!(
                    "recording the {} of {name} in a training run of its own",
                    method.name()
                ),
            );
            let t = Instant::now();
            let result = training::train(&cache, &mut cri, &req).await;
            let (result_name, kind, reason, message) = match result {
                Ok(a) => (
                    "published",
                    EventType::Normal,
                    "JavaCacheTrained",
                    format!(
                        "{} of {name} recorded by JDK {} in {:.1} s ({:.1} MB); the next start maps it",
                        method.name(),
                        a.jdk,
                        t.elapsed().as_secs_f64(),
                        a.bytes as f64 / 1e6
                    ),
                ),
                Err(TrainingError::Unusable(why)) => {
                    cache.mark_unusable(&key, &why);
                    (
                        "unusable",
                        EventType::Warning,
                        "JavaCacheUnusable",
                        format!("{name} is not cached: {why}"),
                    )
                }
                Err(TrainingError::Transient(why)) => {
                    cache.training_aborted(&key);
                    (
                        "failed",
                        EventType::Warning,
                        "JavaCacheTrainingFailed",
                        format!("the training run of {name} failed ({why}); a later start tries again"),
                    )
                }
            };
            metrics
                .java_trainings
                .get_or_create(&result_label(result_name))
                .inc();
            metrics.set_java_cache_bytes(cache.bytes());
            tracing::info!(key = %key, result = result_name, "java cache: {message}");
            shared.event(kind, reason, &name, message);
        });
    }

    /// Container `i` ended (or could not start): restart it after its back-off, or leave it
    /// ended, as the restart policy says.
    fn container_failed(&mut self, i: usize, reason: String) {
        self.container_ended(i, -1, "StartError", reason);
    }

    fn container_ended(&mut self, i: usize, exit_code: i32, reason: &str, message: String) {
        let name = self.plan.containers[i].name.clone();
        let config = &self.ctx.config;
        let run = &mut self.runs[i];
        run.ready = false;
        let ran = run.started.map(|s| s.elapsed()).unwrap_or_default();
        // During an update an end is the update's failure: no back-off, the update rolls back.
        if self.updating || !self.plan.restart_policy.restarts(exit_code) {
            run.finished = Some(exit_code);
            let kind = if exit_code == 0 {
                EventType::Normal
            } else {
                EventType::Warning
            };
            self.event(kind, reason, &name, message);
            return;
        }
        let initial = Duration::from_millis(config.backoff_initial_ms);
        let max = Duration::from_millis(config.backoff_max_ms);
        let delay = match run.backoff {
            Some(last) if ran < Duration::from_secs(config.backoff_reset_secs) => {
                (last * 2).min(max)
            }
            _ => initial,
        };
        run.backoff = Some(delay);
        run.restart_at = Some(Instant::now() + delay);
        self.event(EventType::Warning, reason, &name, message);
        self.event(
            EventType::Warning,
            "BackOff",
            &name,
            format!("back-off {delay:?} restarting failed container {name}"),
        );
    }

    /// Publishes the containers' statuses (and the pod's phase and readiness).
    fn publish_containers(&mut self) {
        let statuses: Vec<ContainerStatus> = self
            .plan
            .containers
            .iter()
            .zip(&self.runs)
            .map(|(c, r)| {
                let (state, reason) = match (&r.id, r.finished, r.restart_at) {
                    (_, Some(0), _) => ("terminated", "Completed"),
                    (_, Some(_), _) => ("terminated", "Error"),
                    (_, _, Some(_)) => ("waiting", "CrashLoopBackOff"),
                    (Some(_), _, _) => ("running", ""),
                    (None, _, _) => ("waiting", "ContainerCreating"),
                };
                ContainerStatus {
                    name: c.name.clone(),
                    image: c.image.clone(),
                    image_id: r.image_id.clone(),
                    container_id: r.id.clone().unwrap_or_default(),
                    state: state.into(),
                    reason: reason.into(),
                    ready: r.ready,
                    restart_count: r.restarts,
                    exit_code: r.finished.unwrap_or(0),
                    started_unix_ms: r
                        .started
                        .map(|s| now_ms() - i64::try_from(s.elapsed().as_millis()).unwrap_or(0))
                        .unwrap_or(0),
                    attempt: r.attempt,
                    env: c.env.iter().cloned().collect(),
                }
            })
            .collect();
        let all_ready = !self.runs.is_empty() && self.runs.iter().all(|r| r.ready);
        let all_finished = self.runs.iter().all(|r| r.finished.is_some());
        let phase = if all_finished {
            if self.runs.iter().all(|r| r.finished == Some(0)) {
                "Succeeded"
            } else {
                "Failed"
            }
        } else if self.runs.iter().any(|r| r.id.is_some()) {
            "Running"
        } else {
            "Pending"
        };
        // The first readiness: its stage and event go out before the flag, so whoever stops
        // watching at Ready has them.
        if all_ready && !self.ever_ready {
            self.ever_ready = true;
            let now = Instant::now();
            if let Some(started) = self.containers_started {
                self.shared
                    .stage("ready", self.bind, started, now, String::new());
                let total = secs(now - self.bind);
                let m = &self.ctx.metrics;
                let (class, order) = (&self.plan.runtime_class, self.order.name());
                m.observe_stage("ready", class, order, secs(now - started));
                m.observe_stage("bind_to_ready", class, order, total);
                m.pods_started.inc();
                self.event(
                    EventType::Normal,
                    "Ready",
                    "",
                    format!("ready {} ms after the bind", (now - self.bind).as_millis()),
                );
            }
        }
        self.shared.update_if_changed(|p| {
            let changed = p.containers != statuses || p.ready != all_ready || p.phase != phase;
            if changed {
                p.containers = statuses;
                p.ready = all_ready;
                p.phase = phase.into();
            }
            changed
        });
    }

    /// Reads container `i`'s state and runs its due probes; ends it (by the restart policy)
    /// when it exited. Gives whether it runs.
    async fn observe(&mut self, i: usize) -> bool {
        let Some(id) = self.runs[i].id.clone() else {
            return false;
        };
        if self.runs[i].finished.is_some() || self.runs[i].restart_at.is_some() {
            return false;
        }
        let name = self.plan.containers[i].name.clone();
        let status = match self.cri.container_status(&id).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(pod = %self.plan.name, container = %name, error = %e, "container status");
                return false;
            }
        };
        if status.state != ContainerState::ContainerRunning as i32 {
            if status.state == ContainerState::ContainerExited as i32 {
                let reason = if status.exit_code == 0 {
                    "Completed"
                } else {
                    "Error"
                };
                let message = format!(
                    "container {name} exited with code {}{}",
                    status.exit_code,
                    if status.message.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", status.message)
                    }
                );
                self.container_ended(i, status.exit_code, reason, message);
            }
            return false;
        }
        let c = self.plan.containers[i].clone();
        let now = Instant::now();
        if let (Some(plan), Some(state)) = (&c.liveness, self.runs[i].liveness.clone()) {
            if state.due(now) {
                let result =
                    probe::run_once(&plan.action, plan.timeout, &self.ip, &id, &mut self.cri).await;
                let mut state = state;
                let flipped = state.record(plan, result.is_ok(), Instant::now());
                self.runs[i].liveness = Some(state);
                if let Err(e) = &result {
                    self.event(
                        EventType::Warning,
                        "Unhealthy",
                        &name,
                        format!("liveness probe failed: {e}"),
                    );
                }
                if flipped == Some(false) {
                    self.event(
                        EventType::Normal,
                        "Killing",
                        &name,
                        format!("container {name} failed its liveness probe, will be restarted"),
                    );
                    let grace = self.plan.grace_period;
                    if let Err(e) = self.cri.stop_container(&id, grace).await {
                        tracing::warn!(pod = %self.plan.name, container = %name, error = %e, "stop");
                    }
                    // The next look sees it exited: the restart policy and back-off apply.
                    return false;
                }
            }
        }
        match (&c.readiness, self.runs[i].readiness.clone()) {
            (Some(plan), Some(mut state)) => {
                if state.due(now) {
                    let result =
                        probe::run_once(&plan.action, plan.timeout, &self.ip, &id, &mut self.cri)
                            .await;
                    if let Err(e) = &result {
                        if self.runs[i].ready || state.outcome.is_none() {
                            tracing::debug!(pod = %self.plan.name, container = %name, "readiness probe: {e}");
                        }
                    }
                    match state.record(plan, result.is_ok(), Instant::now()) {
                        Some(true) => self.runs[i].ready = true,
                        Some(false) if self.runs[i].ready => {
                            self.runs[i].ready = false;
                            self.event(
                                EventType::Warning,
                                "Unhealthy",
                                &name,
                                format!(
                                    "readiness probe failed: {}",
                                    result.err().unwrap_or_default()
                                ),
                            );
                        }
                        // Not yet ready once: a container still starting, not an unhealthy one.
                        Some(false) | None => {}
                    }
                    self.runs[i].readiness = Some(state);
                }
            }
            _ => self.runs[i].ready = true,
        }
        true
    }

    /// One round of supervision: states, probes, restarts that are due.
    async fn sync(&mut self) {
        for i in 0..self.runs.len() {
            if let Some(at) = self.runs[i].restart_at {
                if Instant::now() >= at {
                    self.runs[i].restart_at = None;
                    if self.runs[i].started.is_some() {
                        self.runs[i].restarts += 1;
                        self.ctx.metrics.container_restarts.inc();
                    }
                    if let Err(e) = self.start_container(i, None).await {
                        self.container_failed(i, e);
                    }
                }
                continue;
            }
            self.observe(i).await;
            self.check_java(i);
        }
        self.publish_containers();
        if self.last_reconcile.elapsed() >= RECONCILE_EVERY {
            self.last_reconcile = Instant::now();
            self.remove_strays().await;
            self.check_sandbox().await;
        }
    }

    /// A sandbox that is no longer ready (its VM ended) cannot run containers again: like a
    /// kubelet, the pod starts again in a new sandbox (the next attempt).
    async fn check_sandbox(&mut self) {
        let Some(id) = self.sandbox_id.clone() else {
            return;
        };
        let ready = match self.cri.pod_sandbox_status(&id).await {
            Ok(s) => s.state == kite_cri::api::PodSandboxState::SandboxReady as i32,
            Err(e) if e.code() == Some(tonic::Code::NotFound) => false,
            // The CRI did not answer: nothing is known, nothing is done.
            Err(_) => return,
        };
        if ready {
            return;
        }
        self.event(
            EventType::Warning,
            "SandboxChanged",
            "",
            format!("pod sandbox {id} is not ready any more (its VM ended?); the pod starts again in a new one"),
        );
        self.release().await;
        let attempt = self.shared.snapshot().sandbox_attempt + 1;
        self.shared.update(|p| {
            p.sandbox_attempt = attempt;
            p.sandbox_id.clear();
            p.ip.clear();
            p.ready = false;
            p.stages.clear();
        });
        self.sandbox_config = cri_config::sandbox_config(
            &self.plan,
            attempt,
            &self.ctx.config.agent_id,
            &self.ctx.config.log_dir,
        );
        for run in &mut self.runs {
            run.finished = None;
            run.restart_at = None;
            run.backoff = None;
        }
        self.ever_ready = false;
        self.containers_started = None;
        self.restart_pending = true;
    }

    /// Removes sandboxes of this pod other than its own: a RunPodSandbox that was in flight
    /// when an agent died completes after the next agent started the pod again (the CRI lists a
    /// sandbox only once it runs).
    async fn remove_strays(&mut self) {
        let Some(own) = self.sandbox_id.clone() else {
            return;
        };
        let labels = [
            (cri_config::LABEL_AGENT, self.ctx.config.agent_id.as_str()),
            (cri_config::LABEL_POD_UID, self.plan.uid.as_str()),
        ];
        let Ok(found) = self.cri.list_pod_sandboxes(&labels).await else {
            return;
        };
        for stray in found.into_iter().filter(|s| s.id != own) {
            let stop = self.cri.stop_pod_sandbox(&stray.id).await;
            let result = stop.and(self.cri.remove_pod_sandbox(&stray.id).await);
            let message = match result {
                Ok(()) => format!(
                    "removed sandbox {} of this pod, which is not the one it runs in",
                    stray.id
                ),
                Err(e) => format!("remove stray sandbox {}: {e}", stray.id),
            };
            self.event(EventType::Warning, "StraySandbox", "", message);
        }
    }

    async fn adopt(&mut self, sandbox_id: String, containers: BTreeMap<String, (String, u32)>) {
        let recorded = self.shared.snapshot();
        self.sandbox_ready(sandbox_id).await;
        let now = Instant::now();
        let ready_poll = self.ctx.config.ready_poll();
        for (i, c) in self.plan.containers.iter().enumerate() {
            let run = &mut self.runs[i];
            let before = recorded.containers.iter().find(|s| s.name == c.name);
            if let Some((id, attempt)) = containers.get(&c.name) {
                run.id = Some(id.clone());
                run.attempt = *attempt;
                run.started = Some(now);
                // Keeps what it was until its probes say otherwise.
                run.ready = before.is_some_and(|s| s.ready);
                let was_ready = run.ready;
                run.readiness = c.readiness.as_ref().map(|p| {
                    let s = ProbeState::new(p, now);
                    if was_ready {
                        s.assume_ready()
                    } else {
                        s.until_ready_every(ready_poll)
                    }
                });
                run.liveness = c.liveness.as_ref().map(|p| ProbeState::new(p, now));
            }
            if let Some(s) = before {
                run.restarts = s.restart_count;
                run.image_id = s.image_id.clone();
            }
        }
        self.ever_ready = recorded.ready || recorded.stages.iter().any(|s| s.name == "ready");
        if !self.ever_ready {
            self.containers_started = Some(now);
        }
        self.event(
            EventType::Normal,
            "Adopted",
            "",
            "a restarted agent took the running pod over".to_string(),
        );
        // Containers the previous agent had not started yet: their images, then a start.
        let missing: Vec<usize> = (0..self.runs.len())
            .filter(|i| self.runs[*i].id.is_none())
            .collect();
        if !missing.is_empty() {
            let images: Vec<String> = missing
                .iter()
                .map(|i| self.plan.containers[*i].image.clone())
                .collect();
            if let Err(e) = self.pull(&images).await {
                self.event(EventType::Warning, "Failed", "", e);
            }
            for i in missing {
                self.runs[i].restart_at = Some(Instant::now());
            }
        }
        self.publish_containers();
    }

    /// Stops and removes the pod's containers and sandbox (and any other sandbox of this pod
    /// the agent made), its volumes and logs; forgets its record.
    async fn delete(&mut self, grace: Option<Duration>) {
        let grace = grace.unwrap_or(self.plan.grace_period);
        self.shared.update(|p| {
            p.phase = "Terminating".into();
            p.ready = false;
        });
        self.event(
            EventType::Normal,
            "Killing",
            "",
            format!("stopping the pod (grace period {}s)", grace.as_secs()),
        );
        if let Some(prefetch) = self.prefetch_task.take() {
            prefetch.abort();
        }
        // Every container of the pod gets its grace period at once (a kubelet's), also those a
        // previous agent started (found in the pod's sandboxes).
        let mut ids: Vec<String> = self.runs.iter_mut().filter_map(|r| r.id.take()).collect();
        for sandbox in self.pod_sandboxes().await {
            if let Ok(containers) = self.cri.list_containers(&sandbox).await {
                ids.extend(containers.into_iter().map(|c| c.id));
            }
        }
        ids.sort();
        ids.dedup();
        let stops = ids.iter().map(|id| {
            let mut cri = self.cri.clone();
            async move { (id, cri.stop_container(id, grace).await) }
        });
        for (id, result) in futures::future::join_all(stops).await {
            if let Err(e) = result {
                tracing::warn!(pod = %self.plan.name, error = %e, "stop container {id}");
            }
        }
        let mut released = self.release().await;
        for _ in 0..2 {
            if released {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            released = self.release().await;
        }
        if !released {
            // The record stays (Terminating): a restarted agent finishes the deletion.
            self.shared.update(|p| p.message = "its sandbox could not be removed (see the events); a restarted agent tries again".into());
            return;
        }
        let volumes = cri_config::volume_root(&self.ctx.config.state_dir, &self.plan.uid);
        let logs = cri_config::pod_log_dir(&self.ctx.config.log_dir, &self.plan);
        let java_logs = self.ctx.config.state_dir.join("java").join(&self.plan.uid);
        let hosts = cri_config::hosts_path(&self.ctx.config.state_dir, &self.plan.uid);
        let _ = std::fs::remove_file(&hosts);
        for dir in [volumes, logs, java_logs] {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(pod = %self.plan.name, error = %e, "remove {}", dir.display());
                }
            }
        }
        self.shared.forget();
        tracing::info!(namespace = %self.plan.namespace, pod = %self.plan.name, "deleted");
    }

    /// The ids of the pod's sandboxes in the CRI (by its labels).
    async fn pod_sandboxes(&mut self) -> Vec<String> {
        let labels = [
            (cri_config::LABEL_AGENT, self.ctx.config.agent_id.as_str()),
            (cri_config::LABEL_POD_UID, self.plan.uid.as_str()),
        ];
        match self.cri.list_pod_sandboxes(&labels).await {
            Ok(found) => found.into_iter().map(|s| s.id).collect(),
            Err(e) => {
                tracing::warn!(pod = %self.plan.name, error = %e, "list the pod's sandboxes");
                Vec::new()
            }
        }
    }

    /// Removes the pod's sandboxes (with their containers), found by the pod's label too: a
    /// sandbox whose RunPodSandbox answer was lost is found that way. Whether all went.
    async fn release(&mut self) -> bool {
        let mut ids: Vec<String> = self.sandbox_id.take().into_iter().collect();
        ids.extend(self.pod_sandboxes().await);
        ids.sort();
        ids.dedup();
        let mut all = true;
        for id in ids {
            let stop = self.cri.stop_pod_sandbox(&id).await;
            let remove = self.cri.remove_pod_sandbox(&id).await;
            if let Err(e) = stop.and(remove) {
                all = false;
                self.event(
                    EventType::Warning,
                    "FailedKillPod",
                    "",
                    format!("remove sandbox {id}: {e}"),
                );
            }
        }
        for run in &mut self.runs {
            run.id = None;
            run.ready = false;
        }
        all
    }

    /// Waits until container `i` is ready (Ok) or fails: exits, or is not ready within
    /// `limit`.
    async fn wait_ready(&mut self, i: usize, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let name = self.plan.containers[i].name.clone();
        loop {
            let running = self.observe(i).await;
            self.publish_containers();
            if self.runs[i].ready {
                return Ok(());
            }
            if !running && self.runs[i].finished.is_some() {
                let code = self.runs[i].finished.unwrap_or_default();
                return Err(format!("container {name} exited with code {code}"));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "container {name} not ready within {}s",
                    limit.as_secs()
                ));
            }
            tokio::time::sleep(self.ctx.config.ready_poll()).await;
        }
    }

    /// The in-place update: fetch the new image while the old container serves, stop it,
    /// start the new one in the same sandbox, wait for readiness; roll back on failure.
    async fn update(
        &mut self,
        container: &str,
        image: &str,
        env: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        self.updating = true;
        let result = self.update_inner(container, image, env).await;
        self.updating = false;
        // If the container (the rolled-back one too) ended during the update, it is the
        // restart policy's again.
        if let Some(i) = self
            .plan
            .containers
            .iter()
            .position(|c| c.name == container)
        {
            if let Some(code) = self.runs[i].finished.take() {
                let reason = if code == 0 { "Completed" } else { "Error" };
                self.container_ended(
                    i,
                    code,
                    reason,
                    format!("container {container} exited with code {code}"),
                );
                self.publish_containers();
            }
        }
        result
    }

    async fn update_inner(
        &mut self,
        container: &str,
        image: &str,
        env: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        let origin = Instant::now();
        let new_plan =
            manifest::with_update(&self.plan, container, image, env).map_err(|e| e.to_string())?;
        let i = self
            .plan
            .containers
            .iter()
            .position(|c| c.name == container)
            .ok_or_else(|| format!("{container:?} is not a container of the pod"))?;
        let old = self.plan.containers[i].clone();
        let new = new_plan.containers[i].clone();
        self.event(
            EventType::Normal,
            "Updating",
            container,
            format!(
                "updating container {container}: {} -> {}",
                old.image, new.image
            ),
        );
        // 1. The new image, while the old container still serves.
        let t = Instant::now();
        let images = vec![new.image.clone()];
        let (_, pulled) = tokio::join!(self.prefetch(&images), self.pull(&images));
        let new_image_id = match pulled {
            Ok(ids) => ids.get(&new.image).cloned().unwrap_or_default(),
            Err(e) => {
                self.ctx
                    .metrics
                    .updates
                    .get_or_create(&result_label("failed"))
                    .inc();
                let message =
                    format!("update of {container} not started, the old one serves on: {e}");
                self.event(
                    EventType::Warning,
                    "UpdateFailed",
                    container,
                    message.clone(),
                );
                return Err(message);
            }
        };
        self.stage("update/pull", origin, t, new.image.clone());
        // 2. Not ready; the old container stops within its grace period.
        let t = Instant::now();
        self.runs[i].ready = false;
        self.publish_containers();
        if let Some(id) = self.runs[i].id.clone() {
            if let Err(e) = self.cri.stop_container(&id, self.plan.grace_period).await {
                tracing::warn!(pod = %self.plan.name, error = %e, "stop {id}");
            }
        }
        self.stage("update/stop", origin, t, String::new());
        // 3. The new one, in the same sandbox.
        let previous_image_id = std::mem::replace(&mut self.runs[i].image_id, new_image_id);
        let outcome = match self
            .start_container_as(i, &new, Some(origin), "update/")
            .await
        {
            Ok(()) => {
                let t = Instant::now();
                let limit = Duration::from_secs(self.ctx.config.update_timeout_secs);
                let plan_before = std::mem::replace(&mut self.plan, new_plan.clone());
                let r = self.wait_ready(i, limit).await;
                self.plan = plan_before;
                if r.is_ok() {
                    self.stage("update/ready", origin, t, String::new());
                }
                r
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {
                self.plan = new_plan;
                let manifest_json = self.plan.manifest_json();
                self.shared.update(|p| p.manifest_json = manifest_json);
                self.runs[i].backoff = None;
                self.publish_containers();
                self.ctx
                    .metrics
                    .updates
                    .get_or_create(&result_label("updated"))
                    .inc();
                self.ctx.metrics.observe_stage(
                    "update",
                    &self.plan.runtime_class,
                    self.order.name(),
                    secs(origin.elapsed()),
                );
                self.event(
                    EventType::Normal,
                    "Updated",
                    container,
                    format!(
                        "container {container} runs {} and is ready, {} ms after the request",
                        new.image,
                        origin.elapsed().as_millis()
                    ),
                );
                Ok(())
            }
            Err(reason) => {
                // 4. Back to what served before (its image is still cached).
                self.runs[i].image_id = previous_image_id;
                self.runs[i].restart_at = None;
                self.runs[i].finished = None;
                if let Some(id) = self.runs[i].id.clone() {
                    let _ = self.cri.stop_container(&id, Duration::from_secs(1)).await;
                }
                let rollback = match self.start_container_as(i, &old, None, "").await {
                    Ok(()) => {
                        let limit = Duration::from_secs(self.ctx.config.update_timeout_secs);
                        self.wait_ready(i, limit).await
                    }
                    Err(e) => Err(e),
                };
                self.publish_containers();
                self.ctx
                    .metrics
                    .updates
                    .get_or_create(&result_label("rolled_back"))
                    .inc();
                let message = match &rollback {
                    Ok(()) => format!(
                        "update of {container} to {} failed ({reason}); rolled back to {}, which serves again",
                        new.image, old.image
                    ),
                    Err(e) => format!(
                        "update of {container} to {} failed ({reason}); rolled back to {}, which is not ready: {e}",
                        new.image, old.image
                    ),
                };
                self.event(EventType::Warning, "RolledBack", container, message.clone());
                Err(message)
            }
        }
    }
}

/// The last `max` bytes of a file, from its first whole line.
pub(crate) fn read_tail(path: &std::path::Path, max: u64) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let from = len.saturating_sub(max);
    file.seek(SeekFrom::Start(from)).ok()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    Some(match (from, text.find('\n')) {
        (0, _) | (_, None) => text,
        (_, Some(cut)) => text[cut + 1..].to_string(),
    })
}

/// Prefetches `images` through the prefetch API on `socket`, reporting failures as the pod's
/// events; a summary line of what was prefetched.
async fn prefetch_images(
    socket: &std::path::Path,
    images: &[String],
    shared: &PodShared,
) -> String {
    if socket.as_os_str().is_empty() {
        return "no prefetch API configured".into();
    }
    let results = futures::future::join_all(images.iter().map(|image| async move {
        (
            image,
            kite_protocol::prefetch_client::prefetch(socket, image, |_| {}).await,
        )
    }))
    .await;
    let mut detail = Vec::new();
    for (image, result) in results {
        match result {
            Ok(p) if p.error.is_empty() => detail.push(format!(
                "{image}: {} of {} layers lazy, {} KiB prefetched",
                p.lazy_layers,
                p.layers,
                p.prefetched_bytes / 1024
            )),
            Ok(p) => shared.event(
                EventType::Warning,
                "PrefetchFailed",
                "",
                format!("prefetch {image}: {}", p.error),
            ),
            Err(e) => shared.event(
                EventType::Warning,
                "PrefetchFailed",
                "",
                kite_protocol::errors::error_chain(&e),
            ),
        }
    }
    detail.join("; ")
}

fn result_label(result: &str) -> crate::metrics::ResultLabels {
    crate::metrics::ResultLabels {
        result: result.into(),
    }
}
