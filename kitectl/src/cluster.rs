//! kitectl against the coordinator (`--coordinator HOST:PORT`): apps from apps/v1 Deployment
//! manifests, their pods and the nodes, scale, rollouts, cordon and drain, bootstrap tokens.
//! Mutual TLS with an admin credential (`--credentials DIR`: admin.crt, admin.key, ca.crt).

use std::io::{IsTerminal, Write};
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use kite_protocol::cluster::cluster_client::ClusterClient;
use kite_protocol::cluster::*;
use serde_json::{json, Value};
use tonic::transport::Channel;

use crate::output::age;

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow!("{}", s.message())
}

pub struct ClusterCtl {
    client: ClusterClient<Channel>,
    pub namespace: String,
}

fn read(dir: &Path, file: &str) -> anyhow::Result<String> {
    let path = dir.join(file);
    std::fs::read_to_string(&path).with_context(|| {
        format!(
            "read {} (kitectl needs an admin credential: admin.crt, admin.key and ca.crt in --credentials)",
            path.display()
        )
    })
}

impl ClusterCtl {
    pub async fn connect(
        address: &str,
        credentials: &Path,
        namespace: String,
    ) -> anyhow::Result<ClusterCtl> {
        let (cert, key, ca) = (
            read(credentials, "admin.crt")?,
            read(credentials, "admin.key")?,
            read(credentials, "ca.crt")?,
        );
        // One address, or every coordinator of a highly available set: kitectl talks to the
        // one that leads (waiting out an election).
        let addresses = kite_protocol::cluster::addresses(address);
        // A set of coordinators may be electing a leader: wait for it. One coordinator is
        // up or not.
        let wait = if addresses.len() > 1 { 15 } else { 0 };
        let (channel, _leader) = kite_protocol::cluster::connect_leader(
            &addresses,
            &ca,
            Some((&cert, &key)),
            std::time::Duration::from_secs(wait),
        )
        .await
        .map_err(|e| {
            anyhow!(
                "connect to the coordinator: {}",
                kite_protocol::errors::error_chain(&e)
            )
        })?;
        Ok(ClusterCtl {
            client: ClusterClient::new(channel),
            namespace,
        })
    }

    fn app_ref(&self, name: &str) -> AppRef {
        AppRef {
            namespace: self.namespace.clone(),
            name: name.into(),
        }
    }

    pub async fn apply(&mut self, manifest: String, wait: bool) -> anyhow::Result<()> {
        let app = self
            .client
            .apply(ApplyRequest { manifest })
            .await
            .map_err(status_error)?
            .into_inner();
        let rolling = app
            .rollout
            .as_ref()
            .is_some_and(|r| r.to_revision == app.revision && r.finished_unix_ms == 0);
        println!(
            "deployment.apps/{} {}",
            app.name,
            if app.revision == 1 && !rolling {
                "created"
            } else if rolling {
                "configured (rolling out)"
            } else {
                "configured"
            }
        );
        if wait {
            self.wait(&app.name, rolling.then_some(app.revision))
                .await?;
        }
        Ok(())
    }

    pub async fn scale(&mut self, name: &str, replicas: u32, wait: bool) -> anyhow::Result<()> {
        let app = self
            .client
            .scale(ScaleRequest {
                app: Some(self.app_ref(name)),
                replicas,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        println!("deployment.apps/{} scaled to {}", app.name, app.replicas);
        if wait {
            self.wait(name, None).await?;
        }
        Ok(())
    }

    /// Watches the app until its replicas are ready and no rollout runs, drawing progress; an
    /// error if the rollout to `revision` rolled back.
    pub async fn wait(&mut self, name: &str, revision: Option<u64>) -> anyhow::Result<()> {
        let mut stream = self
            .client
            .watch_app(self.app_ref(name))
            .await
            .map_err(status_error)?
            .into_inner();
        let tty = std::io::stdout().is_terminal();
        let mut last_line = String::new();
        while let Some(app) = stream.next().await {
            let app = app.map_err(status_error)?;
            let line = progress_line(&app);
            if line != last_line {
                if tty {
                    print!("\r\x1b[2K{line}");
                } else {
                    println!("{line}");
                }
                std::io::stdout().flush()?;
                last_line = line;
            }
            let rollout = app.rollout.as_ref();
            let rolled_back =
                rollout.is_some_and(|r| r.state == "RolledBack" && Some(r.to_revision) == revision);
            if rolled_back && app.available_replicas == app.replicas {
                if tty {
                    println!();
                }
                bail!(
                    "deployment {:?} rolled back: {}",
                    app.name,
                    rollout.map(|r| r.message.as_str()).unwrap_or("")
                );
            }
            let rolling =
                rollout.is_some_and(|r| !matches!(r.state.as_str(), "Complete" | "RolledBack"));
            if !rolling
                && app.available_replicas == app.replicas
                && app.ready_replicas == app.replicas
            {
                if tty {
                    println!();
                }
                println!("deployment {:?} successfully rolled out", app.name);
                return Ok(());
            }
        }
        bail!("the coordinator ended the watch")
    }

    pub async fn rollout(
        &mut self,
        action: &str,
        name: &str,
        to_revision: u64,
    ) -> anyhow::Result<()> {
        match action {
            "status" => {
                let app = self.get_app(name).await?;
                let to = app.rollout.as_ref().map(|r| r.to_revision);
                self.wait(name, to).await
            }
            "history" => {
                let app = self.get_app(name).await?;
                println!("deployment.apps/{}", app.name);
                println!("{:<10} {:<40} CHANGE-CAUSE", "REVISION", "IMAGES");
                for r in &app.history {
                    let images: Vec<String> =
                        r.images.iter().map(|(c, i)| format!("{c}={i}")).collect();
                    let current = if r.number == app.revision {
                        " (current)"
                    } else {
                        ""
                    };
                    println!(
                        "{:<10} {:<40} {}{current}",
                        r.number,
                        images.join(","),
                        if r.change_cause.is_empty() {
                            "<none>"
                        } else {
                            &r.change_cause
                        }
                    );
                }
                Ok(())
            }
            "undo" => {
                let app = self
                    .client
                    .undo(UndoRequest {
                        app: Some(self.app_ref(name)),
                        to_revision,
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                println!(
                    "deployment.apps/{} rolled back (revision {})",
                    app.name, app.revision
                );
                Ok(())
            }
            "pause" | "resume" => {
                let app = self
                    .client
                    .set_paused(PauseRequest {
                        app: Some(self.app_ref(name)),
                        paused: action == "pause",
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                println!("deployment.apps/{} {}d", app.name, action);
                Ok(())
            }
            other => {
                bail!("rollout {other}: kitectl knows status, history, undo, pause and resume")
            }
        }
    }

    async fn get_app(&mut self, name: &str) -> anyhow::Result<App> {
        Ok(self
            .client
            .get_app(self.app_ref(name))
            .await
            .map_err(status_error)?
            .into_inner())
    }

    pub async fn get(
        &mut self,
        kind: &str,
        name: Option<&str>,
        output: Option<&str>,
        all: bool,
    ) -> anyhow::Result<()> {
        let namespace = if all {
            String::new()
        } else {
            self.namespace.clone()
        };
        let now = now_ms();
        let (table, objects): (String, Vec<Value>) = match kind_of(kind)? {
            Kind::App => {
                let apps = match name {
                    Some(n) => vec![self.get_app(n).await?],
                    None => {
                        self.client
                            .list_apps(ListRequest {
                                namespace,
                                app: String::new(),
                            })
                            .await
                            .map_err(status_error)?
                            .into_inner()
                            .apps
                    }
                };
                let mut t = format!(
                    "{:<24} {:<8} {:<11} {:<10} {:<9} {:<16} AGE\n",
                    "NAME", "READY", "UP-TO-DATE", "AVAILABLE", "REVISION", "ROLLOUT"
                );
                for a in &apps {
                    let rollout = a
                        .rollout
                        .as_ref()
                        .map(|r| r.state.clone())
                        .unwrap_or_else(|| "-".into());
                    t += &format!(
                        "{:<24} {:<8} {:<11} {:<10} {:<9} {:<16} {}\n",
                        a.name,
                        format!("{}/{}", a.ready_replicas, a.replicas),
                        a.updated_replicas,
                        a.available_replicas,
                        a.revision,
                        rollout,
                        age(a.created_unix_ms, now)
                    );
                }
                (t, apps.iter().map(app_object).collect())
            }
            Kind::Pod => {
                let mut pods = self
                    .client
                    .list_pods(ListRequest {
                        namespace,
                        app: String::new(),
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .pods;
                if let Some(n) = name {
                    pods.retain(|p| p.name == n);
                    if pods.is_empty() {
                        bail!("pod {}/{n} not found", self.namespace);
                    }
                }
                let mut t = format!(
                    "{:<28} {:<6} {:<12} {:<9} {:<16} {:<14} AGE\n",
                    "NAME", "READY", "STATUS", "REVISION", "IP", "NODE"
                );
                for p in &pods {
                    t += &format!(
                        "{:<28} {:<6} {:<12} {:<9} {:<16} {:<14} {}\n",
                        p.name,
                        if p.ready { "1/1" } else { "0/1" },
                        p.phase,
                        if p.running_revision == p.revision {
                            p.revision.to_string()
                        } else {
                            format!("{}→{}", p.running_revision, p.revision)
                        },
                        if p.ip.is_empty() { "<none>" } else { &p.ip },
                        p.node,
                        age(p.created_unix_ms, now)
                    );
                }
                (
                    t,
                    pods.iter()
                        .map(|p| serde_json::to_value(p).unwrap_or_default())
                        .collect(),
                )
            }
            Kind::Node => {
                let mut nodes = self
                    .client
                    .list_nodes(ListNodesRequest {})
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .nodes;
                if let Some(n) = name {
                    nodes.retain(|x| x.name == n);
                    if nodes.is_empty() {
                        bail!("node {n} not found");
                    }
                }
                let mut t = format!(
                    "{:<20} {:<28} {:<6} {:<10} {:<12} AGE\n",
                    "NAME", "STATUS", "PODS", "CPU", "MEMORY"
                );
                for n in &nodes {
                    let s = n.status.clone().unwrap_or_default();
                    let state = if n.cordoned {
                        format!("{},SchedulingDisabled", n.state)
                    } else {
                        n.state.clone()
                    };
                    t += &format!(
                        "{:<20} {:<28} {:<6} {:<10} {:<12} {}\n",
                        n.name,
                        state,
                        n.pods,
                        format!("{}/{}m", s.used_cpu_millis, s.allocatable_cpu_millis),
                        format!(
                            "{}/{}Mi",
                            s.used_memory_bytes >> 20,
                            s.allocatable_memory_bytes >> 20
                        ),
                        age(n.joined_unix_ms, now)
                    );
                }
                (
                    t,
                    nodes
                        .iter()
                        .map(|n| serde_json::to_value(n).unwrap_or_default())
                        .collect(),
                )
            }
        };
        match output {
            None | Some("wide") => print!("{table}"),
            Some("json") | Some("yaml") => {
                let value = match (name.is_some(), objects.len()) {
                    (true, 1) => objects.into_iter().next().unwrap_or_default(),
                    _ => json!({"apiVersion": "v1", "kind": "List", "items": objects}),
                };
                if output == Some("json") {
                    println!("{}", serde_json::to_string_pretty(&value)?);
                } else {
                    print!("{}", serde_yaml_ng::to_string(&value)?);
                }
            }
            Some(other) => bail!("-o {other}: kitectl prints wide, json or yaml"),
        }
        Ok(())
    }

    pub async fn describe(&mut self, kind: &str, name: &str) -> anyhow::Result<()> {
        match kind_of(kind)? {
            Kind::App => {
                let a = self.get_app(name).await?;
                println!("Name:        {}", a.name);
                println!("Namespace:   {}", a.namespace);
                println!(
                    "Replicas:    {} desired | {} updated | {} ready | {} available",
                    a.replicas, a.updated_replicas, a.ready_replicas, a.available_replicas
                );
                println!(
                    "Strategy:    {}{}",
                    a.strategy,
                    if a.paused { " (paused)" } else { "" }
                );
                println!("Revision:    {}", a.revision);
                if let Some(r) = &a.rollout {
                    println!(
                        "Rollout:     {} {} → {} ({}), batch {}, {}/{} updated",
                        r.state,
                        r.from_revision,
                        r.to_revision,
                        r.strategy,
                        r.batch,
                        r.updated,
                        r.total
                    );
                    if !r.message.is_empty() {
                        println!("             {}", r.message);
                    }
                }
                println!("Conditions:");
                for c in &a.conditions {
                    println!(
                        "  {:<12} {:<6} {:<26} {}",
                        c.r#type, c.status, c.reason, c.message
                    );
                }
                let pods = self
                    .client
                    .list_pods(ListRequest {
                        namespace: a.namespace.clone(),
                        app: a.name.clone(),
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .pods;
                println!("Pods:");
                for p in pods {
                    println!(
                        "  {:<28} {:<8} rev {:<3} {:<5} {:<16} {}",
                        p.name,
                        p.node,
                        p.revision,
                        if p.ready { "ready" } else { "-" },
                        p.ip,
                        p.message
                    );
                }
                Ok(())
            }
            Kind::Pod => {
                let p = self
                    .client
                    .list_pods(ListRequest {
                        namespace: self.namespace.clone(),
                        app: String::new(),
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .pods
                    .into_iter()
                    .find(|p| p.name == name)
                    .ok_or_else(|| anyhow!("pod {}/{name} not found", self.namespace))?;
                println!("Name:        {}", p.name);
                println!("Namespace:   {}", p.namespace);
                println!(
                    "App:         {} (revision {}, running {})",
                    p.app, p.revision, p.running_revision
                );
                println!("Node:        {}", p.node);
                println!(
                    "Status:      {}{}",
                    p.phase,
                    if p.ready { ", ready" } else { "" }
                );
                println!(
                    "IP:          {}",
                    if p.ip.is_empty() { "<none>" } else { &p.ip }
                );
                if !p.message.is_empty() {
                    println!("Message:     {}", p.message);
                }
                if !p.stages.is_empty() {
                    println!("Start (from the bind on its node):");
                    for s in &p.stages {
                        println!("  {}", crate::output::stage_line(s));
                    }
                    print!("{}", crate::output::waterfall(&p.stages, 60));
                }
                if !p.events.is_empty() {
                    println!("Events:");
                    for e in &p.events {
                        println!("  {:<8} {:<18} {}", e.r#type, e.reason, e.message);
                    }
                }
                Ok(())
            }
            Kind::Node => self.get(kind, Some(name), Some("yaml"), false).await,
        }
    }

    pub async fn delete(&mut self, name: &str) -> anyhow::Result<()> {
        let app = self
            .client
            .delete_app(self.app_ref(name))
            .await
            .map_err(status_error)?
            .into_inner();
        println!("deployment.apps/{} deleted", app.name);
        Ok(())
    }

    pub async fn schedulable(
        &mut self,
        node: &str,
        cordon: bool,
        drain: bool,
    ) -> anyhow::Result<()> {
        let n = self
            .client
            .set_schedulable(SchedulableRequest {
                node: node.into(),
                cordon,
                drain,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        let what = match (cordon, drain) {
            (_, true) => "drained",
            (true, _) => "cordoned",
            _ => "uncordoned",
        };
        println!("node/{} {what}", n.name);
        Ok(())
    }

    /// A pod's log (not followed) through its node.
    pub async fn logs(
        &mut self,
        pod: &str,
        container: String,
        previous: bool,
    ) -> anyhow::Result<()> {
        let r = self
            .client
            .pod_logs(PodCall {
                namespace: self.namespace.clone(),
                name: pod.into(),
                container,
                previous,
                ..Default::default()
            })
            .await
            .map_err(status_error)?
            .into_inner();
        std::io::stdout().write_all(&r.stdout)?;
        Ok(())
    }

    /// Runs a command in a pod's container through its node: the command's exit code.
    pub async fn exec(
        &mut self,
        pod: &str,
        container: String,
        timeout_secs: u32,
        command: Vec<String>,
    ) -> anyhow::Result<i32> {
        let r = self
            .client
            .pod_exec(PodCall {
                namespace: self.namespace.clone(),
                name: pod.into(),
                container,
                command,
                timeout_secs,
                ..Default::default()
            })
            .await
            .map_err(status_error)?
            .into_inner();
        std::io::stdout().write_all(&r.stdout)?;
        std::io::stderr().write_all(&r.stderr)?;
        Ok(r.exit_code)
    }

    pub async fn token_create(&mut self, ttl_secs: u64, description: String) -> anyhow::Result<()> {
        let t = self
            .client
            .create_token(CreateTokenRequest {
                ttl_secs,
                description,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        println!("{}", t.token);
        Ok(())
    }
}

enum Kind {
    App,
    Pod,
    Node,
}

fn kind_of(kind: &str) -> anyhow::Result<Kind> {
    Ok(match kind {
        "app" | "apps" | "deployment" | "deployments" | "deploy" => Kind::App,
        "pod" | "pods" | "po" => Kind::Pod,
        "node" | "nodes" | "no" => Kind::Node,
        other => bail!("kitectl knows apps (deployments), pods and nodes, not {other:?}"),
    })
}

/// `deployment/NAME`, `app/NAME` or `NAME`.
pub fn app_name(text: &str) -> anyhow::Result<String> {
    let name = ["deployment/", "deployments/", "deploy/", "app/", "apps/"]
        .iter()
        .find_map(|p| text.strip_prefix(p))
        .unwrap_or(text);
    if name.is_empty() || name.contains('/') {
        bail!("{text:?} is not an app (NAME or deployment/NAME)");
    }
    Ok(name.into())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn app_object(a: &App) -> Value {
    let mut v: Value = serde_json::from_str(&a.manifest_json).unwrap_or_else(|_| json!({}));
    v["status"] = json!({
        "replicas": a.replicas,
        "readyReplicas": a.ready_replicas,
        "updatedReplicas": a.updated_replicas,
        "availableReplicas": a.available_replicas,
        "observedRevision": a.revision,
        "rollout": a.rollout,
        "conditions": a.conditions,
    });
    v
}

/// `[#####-----] 3/6 ready, 2 updated · Updating 1 → 2 batch 2`
fn progress_line(a: &App) -> String {
    let width = 20usize;
    let total = a.replicas.max(1) as usize;
    let done = (a.available_replicas as usize).min(total);
    let filled = done * width / total;
    let mut line = format!(
        "[{}{}] {}/{} ready, {} updated",
        "#".repeat(filled),
        "-".repeat(width - filled),
        a.ready_replicas,
        a.replicas,
        a.updated_replicas
    );
    if let Some(r) = &a.rollout {
        if !matches!(r.state.as_str(), "Complete") {
            line += &format!(
                " · {} {} → {} batch {}",
                r.state, r.from_revision, r.to_revision, r.batch
            );
        }
    }
    line
}
