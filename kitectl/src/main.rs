//! `kitectl`: kite's CLI. It talks to a node's agent on its API socket, or, with
//! `--coordinator`, to the cluster's coordinator ([`cluster`]).

mod cluster;
mod output;

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use kite_protocol::node::node_agent_client::NodeAgentClient;
use kite_protocol::node::*;
use tonic::transport::Channel;

/// kite's CLI, with kubectl's habits. On a node (its agent's socket): run pods from manifests,
/// list and describe them (with the start's waterfall), read logs, exec, update containers in
/// place. With --coordinator: apps from Deployment manifests over the cluster's nodes (apply,
/// get, describe, scale, rollout, delete), nodes (cordon, uncordon, drain), bootstrap tokens,
/// and logs and exec relayed to the pod's node.
#[derive(Parser)]
#[command(name = "kitectl", version)]
struct Cli {
    /// The node agent's API socket.
    #[arg(
        long,
        global = true,
        default_value = "/run/kite/agent.sock",
        env = "KITE_AGENT_SOCKET"
    )]
    socket: PathBuf,
    /// The cluster's coordinator (HOST:PORT), or all coordinators of a highly available set
    /// (A:PORT,B:PORT,…: kitectl finds the one that leads): apps, their pods and the nodes instead of one
    /// node's pods.
    #[arg(long, global = true, env = "KITE_COORDINATOR")]
    coordinator: Option<String>,
    /// The admin credential for the coordinator: admin.crt, admin.key and ca.crt
    /// (`kite-coordinator init` writes them).
    #[arg(
        long,
        global = true,
        default_value = "/etc/kite/pki",
        env = "KITE_CREDENTIALS"
    )]
    credentials: PathBuf,
    /// The namespace of the pods named.
    #[arg(short = 'n', long, global = true, default_value = "default")]
    namespace: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the pod of a v1/Pod manifest (YAML or JSON; "-" reads stdin) and shows its start's
    /// stages as they complete, until it is ready.
    Run {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Return once the pod is admitted.
        #[arg(long)]
        no_wait: bool,
    },
    /// Creates or changes an app from an apps/v1 Deployment manifest (coordinator), and shows
    /// its rollout until it is done (unless --no-wait).
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[arg(long)]
        no_wait: bool,
    },
    /// Sets an app's replicas (coordinator): kitectl scale deployment/NAME --replicas N.
    Scale {
        app: String,
        #[arg(long)]
        replicas: u32,
        #[arg(long)]
        no_wait: bool,
    },
    /// An app's rollout (coordinator): status, history, undo [--to-revision N], pause, resume.
    Rollout {
        action: String,
        app: String,
        #[arg(long, default_value_t = 0)]
        to_revision: u64,
    },
    /// No new pods on the node (coordinator).
    Cordon { node: String },
    /// New pods on the node again (coordinator).
    Uncordon { node: String },
    /// Cordons the node and moves its pods to other nodes (coordinator).
    Drain { node: String },
    /// Bootstrap tokens for joining nodes (coordinator): kitectl token create [--ttl 24h].
    Token {
        action: String,
        #[arg(long, default_value = "24h")]
        ttl: humantime::Duration,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Lists pods (`get pods`), or shows one (`get pod NAME`); with --coordinator also apps
    /// (deployments) and nodes.
    Get {
        /// pods (or pod, po)
        kind: String,
        name: Option<String>,
        /// wide, json or yaml
        #[arg(short = 'o', long)]
        output: Option<String>,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// A pod's status, containers, events and its start drawn as a waterfall.
    Describe { kind: String, name: String },
    /// A container's log.
    Logs {
        pod: String,
        #[arg(short = 'c', long)]
        container: Option<String>,
        #[arg(short = 'f', long)]
        follow: bool,
        /// The previous instance's log.
        #[arg(short = 'p', long)]
        previous: bool,
    },
    /// Runs a command in a container: kitectl exec POD [-c C] -- CMD ARGS…
    Exec {
        pod: String,
        #[arg(short = 'c', long)]
        container: Option<String>,
        #[arg(long, default_value_t = 60)]
        timeout: u32,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Deletes a pod: `delete pod NAME`, or `delete -f FILE`.
    Delete {
        kind: Option<String>,
        name: Option<String>,
        #[arg(short = 'f', long = "filename")]
        file: Option<PathBuf>,
        /// Seconds the containers get to stop (default: the pod's own).
        #[arg(long)]
        grace_period: Option<u32>,
    },
    /// Changes a container of a running pod in place (same VM, IP, volumes); rolls back if the
    /// new one does not become ready.
    Set {
        #[command(subcommand)]
        what: SetCommand,
    },
    /// Asks the node's snapshotter to prefetch an image.
    Prefetch { image: String },
    /// A pod's events; with -w, then the new ones as they happen.
    Events {
        pod: String,
        #[arg(short = 'w', long)]
        watch: bool,
    },
}

#[derive(Subcommand)]
enum SetCommand {
    /// kitectl set image pod/NAME CONTAINER=IMAGE
    Image {
        pod: String,
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// kitectl set env pod/NAME -c CONTAINER KEY=VALUE…
    Env {
        pod: String,
        #[arg(short = 'c', long)]
        container: Option<String>,
        #[arg(required = true)]
        values: Vec<String>,
    },
}

fn pod_name(text: &str) -> anyhow::Result<String> {
    let name = text
        .strip_prefix("pod/")
        .or_else(|| text.strip_prefix("pods/"))
        .unwrap_or(text);
    if name.is_empty() || name.contains('/') {
        bail!("{text:?} is not a pod (NAME or pod/NAME)");
    }
    Ok(name.to_string())
}

fn check_pod_kind(kind: &str) -> anyhow::Result<()> {
    match kind {
        "pod" | "pods" | "po" => Ok(()),
        other => bail!("kitectl knows pods only, not {other:?}"),
    }
}

/// The gRPC status as one line (what failed on which object is in its message).
fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow!("{}", s.message())
}

struct Ctl {
    client: NodeAgentClient<Channel>,
    namespace: String,
}

impl Ctl {
    fn pod_ref(&self, name: &str) -> PodRef {
        PodRef {
            namespace: self.namespace.clone(),
            name: name.into(),
        }
    }

    async fn run(&mut self, file: &PathBuf, no_wait: bool) -> anyhow::Result<()> {
        let manifest = read_manifest(file)?;
        let mut stream = self
            .client
            .run_pod(RunPodRequest {
                manifest,
                watch: !no_wait,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        let mut shown_stages = 0;
        let mut shown_events = 0;
        let mut last_pod = None;
        while let Some(update) = stream.next().await {
            let update = update.map_err(status_error)?;
            let Some(pod) = update.pod else { continue };
            if last_pod.is_none() {
                println!(
                    "pod/{} created ({} pod, {} start)",
                    pod.name, pod.runtime_class, pod.start_order
                );
            }
            for s in pod.stages.iter().skip(shown_stages) {
                println!("  {}", output::stage_line(s));
            }
            shown_stages = pod.stages.len();
            for e in pod.events.iter().skip(shown_events) {
                if e.r#type == "Warning" {
                    println!("  {}: {}", e.reason, e.message);
                }
            }
            shown_events = pod.events.len();
            last_pod = Some(pod);
            if update.last {
                break;
            }
        }
        let pod = last_pod
            .ok_or_else(|| anyhow!("the agent closed the stream before the pod's status"))?;
        if no_wait {
            return Ok(());
        }
        if pod.ready {
            let total = pod
                .stages
                .iter()
                .find(|s| s.name == "ready")
                .map(|s| s.start_ms + s.duration_ms)
                .unwrap_or(0);
            println!("pod/{} ready in {total} ms (IP {})", pod.name, pod.ip);
            Ok(())
        } else if pod.phase == "Succeeded" {
            println!("pod/{} completed", pod.name);
            Ok(())
        } else {
            // The cause, not the back-off that follows it.
            let why = pod
                .events
                .iter()
                .rev()
                .find(|e| e.r#type == "Warning" && e.reason != "BackOff")
                .map(|e| e.message.clone())
                .unwrap_or_else(|| pod.message.clone());
            bail!(
                "pod {}/{} did not become ready: {why}",
                pod.namespace,
                pod.name
            )
        }
    }

    async fn get(
        &mut self,
        name: Option<String>,
        output_kind: Option<String>,
        all: bool,
    ) -> anyhow::Result<()> {
        let pods = match &name {
            Some(n) => vec![self
                .client
                .get_pod(self.pod_ref(n))
                .await
                .map_err(status_error)?
                .into_inner()],
            None => {
                self.client
                    .list_pods(ListPodsRequest {
                        namespace: if all {
                            String::new()
                        } else {
                            self.namespace.clone()
                        },
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .pods
            }
        };
        match output_kind.as_deref() {
            None | Some("wide") => {
                if pods.is_empty() && name.is_none() {
                    eprintln!(
                        "No pods found in {} namespace.",
                        if all { "any" } else { &self.namespace }
                    );
                    return Ok(());
                }
                print!("{}", output::pod_table(&pods, output_kind.is_some(), all));
            }
            Some("json") | Some("yaml") => {
                let objects: Vec<serde_json::Value> = pods.iter().map(output::pod_object).collect();
                let value = match (name.is_some(), objects.len()) {
                    (true, 1) => objects.into_iter().next().unwrap_or_default(),
                    _ => serde_json::json!({"apiVersion": "v1", "kind": "List", "items": objects}),
                };
                if output_kind.as_deref() == Some("json") {
                    println!("{}", serde_json::to_string_pretty(&value)?);
                } else {
                    print!("{}", serde_yaml_ng::to_string(&value)?);
                }
            }
            Some(other) => bail!("-o {other}: kitectl prints wide, json or yaml"),
        }
        Ok(())
    }

    async fn describe(&mut self, name: &str) -> anyhow::Result<()> {
        let pod = self
            .client
            .get_pod(self.pod_ref(name))
            .await
            .map_err(status_error)?
            .into_inner();
        print!("{}", output::describe(&pod));
        Ok(())
    }

    async fn logs(
        &mut self,
        pod: &str,
        container: Option<String>,
        follow: bool,
        previous: bool,
    ) -> anyhow::Result<()> {
        let mut stream = self
            .client
            .logs(LogsRequest {
                pod: Some(self.pod_ref(pod)),
                container: container.unwrap_or_default(),
                follow,
                previous,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        let mut out = std::io::stdout();
        while let Some(chunk) = stream.next().await {
            out.write_all(&chunk.map_err(status_error)?.data)?;
            out.flush()?;
        }
        Ok(())
    }

    async fn exec(
        &mut self,
        pod: &str,
        container: Option<String>,
        timeout: u32,
        command: Vec<String>,
    ) -> anyhow::Result<i32> {
        let answer = self
            .client
            .exec(ExecRequest {
                pod: Some(self.pod_ref(pod)),
                container: container.unwrap_or_default(),
                command,
                timeout_secs: timeout,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        std::io::stdout().write_all(&answer.stdout)?;
        std::io::stderr().write_all(&answer.stderr)?;
        Ok(answer.exit_code)
    }

    async fn delete(&mut self, name: &str, grace: Option<u32>) -> anyhow::Result<()> {
        self.client
            .delete_pod(DeletePodRequest {
                pod: Some(self.pod_ref(name)),
                grace_period_secs: grace,
            })
            .await
            .map_err(status_error)?;
        println!("pod \"{name}\" deleted");
        Ok(())
    }

    async fn update(
        &mut self,
        pod: &str,
        container: String,
        image: String,
        env: HashMap<String, String>,
    ) -> anyhow::Result<()> {
        let mut stream = self
            .client
            .update_container(UpdateContainerRequest {
                pod: Some(self.pod_ref(pod)),
                container: container.clone(),
                image,
                env,
                watch: true,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        let mut shown_stages = None;
        let mut last = None;
        while let Some(update) = stream.next().await {
            let update = update.map_err(status_error)?;
            let Some(pod) = update.pod else { continue };
            let skip = *shown_stages.get_or_insert(pod.stages.len());
            for s in pod.stages.iter().skip(skip) {
                println!("  {}", output::stage_line(s));
            }
            shown_stages = Some(pod.stages.len());
            last = Some(pod);
            if update.last {
                break;
            }
        }
        let pod =
            last.ok_or_else(|| anyhow!("the agent closed the stream before the update's end"))?;
        println!(
            "pod/{} container {container} updated in place (IP {}, sandbox {})",
            pod.name,
            pod.ip,
            short(&pod.sandbox_id)
        );
        Ok(())
    }

    async fn events(&mut self, pod: &str, watch: bool) -> anyhow::Result<()> {
        let print = |e: &Event| {
            println!(
                "{}  {:<7}  {:<12}  {:<10}  {}",
                output::clock(e.unix_ms),
                e.r#type,
                e.reason,
                if e.container.is_empty() {
                    "-"
                } else {
                    &e.container
                },
                e.message
            )
        };
        if !watch {
            let pod = self
                .client
                .get_pod(self.pod_ref(pod))
                .await
                .map_err(status_error)?
                .into_inner();
            pod.events.iter().for_each(print);
            return Ok(());
        }
        let mut stream = self
            .client
            .watch_events(self.pod_ref(pod))
            .await
            .map_err(status_error)?
            .into_inner();
        while let Some(e) = stream.next().await {
            print(&e.map_err(status_error)?);
        }
        Ok(())
    }

    async fn prefetch(&mut self, image: String) -> anyhow::Result<()> {
        let mut stream = self
            .client
            .prefetch(PrefetchRequest {
                image: image.clone(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        let mut last = None;
        while let Some(p) = stream.next().await {
            let p = p.map_err(status_error)?;
            println!(
                "{}: {} ({} of {} layers done, {} lazy, {} KiB prefetched)",
                p.image,
                p.state,
                p.layers_done,
                p.layers,
                p.lazy_layers,
                p.prefetched_bytes / 1024
            );
            last = Some(p);
        }
        match last {
            Some(p) if p.state == "done" => Ok(()),
            Some(p) => bail!("prefetch {image}: {}", p.error),
            None => bail!("prefetch {image}: no answer"),
        }
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(13)]
}

fn read_manifest(file: &PathBuf) -> anyhow::Result<String> {
    if file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("read the manifest from stdin")?;
        Ok(text)
    } else {
        std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))
    }
}

/// The name a manifest file gives its object; its namespace, if it names one, replaces
/// `namespace`.
fn named_in(file: &PathBuf, namespace: &mut String) -> anyhow::Result<String> {
    let value: serde_json::Value = serde_yaml_ng::from_str(&read_manifest(file)?)
        .with_context(|| format!("{} is not YAML or JSON", file.display()))?;
    if let Some(ns) = value["metadata"]["namespace"].as_str() {
        *namespace = ns.to_string();
    }
    Ok(value["metadata"]["name"]
        .as_str()
        .ok_or_else(|| anyhow!("{}: metadata.name is missing", file.display()))?
        .to_string())
}

/// `KEY=VALUE` pairs.
fn pairs(items: &[String], what: &str) -> anyhow::Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|i| {
            i.split_once('=')
                .filter(|(k, v)| !k.is_empty() && !v.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow!("{i:?} is not {what}"))
        })
        .collect()
}

/// The commands against the coordinator.
async fn cluster_main(address: &str, cli: Cli) -> anyhow::Result<i32> {
    let mut ctl = cluster::ClusterCtl::connect(address, &cli.credentials, cli.namespace).await?;
    match cli.command {
        Command::Apply { file, no_wait } => ctl.apply(read_manifest(&file)?, !no_wait).await?,
        Command::Scale {
            app,
            replicas,
            no_wait,
        } => {
            ctl.scale(&cluster::app_name(&app)?, replicas, !no_wait)
                .await?
        }
        Command::Rollout {
            action,
            app,
            to_revision,
        } => {
            ctl.rollout(&action, &cluster::app_name(&app)?, to_revision)
                .await?
        }
        Command::Cordon { node } => ctl.schedulable(&node, true, false).await?,
        Command::Uncordon { node } => ctl.schedulable(&node, false, false).await?,
        Command::Drain { node } => ctl.schedulable(&node, true, true).await?,
        Command::Token {
            action,
            ttl,
            description,
        } => match action.as_str() {
            "create" => ctl.token_create(ttl.as_secs(), description).await?,
            other => bail!("token {other}: kitectl knows token create"),
        },
        Command::Get {
            kind,
            name,
            output,
            all_namespaces,
        } => {
            ctl.get(&kind, name.as_deref(), output.as_deref(), all_namespaces)
                .await?
        }
        Command::Describe { kind, name } => ctl.describe(&kind, &name).await?,
        Command::Delete {
            kind, name, file, ..
        } => {
            let name = match (kind, name, file) {
                (_, _, Some(file)) => named_in(&file, &mut ctl.namespace)?,
                (Some(_), Some(name), None) => name,
                (Some(kind), None, None) => cluster::app_name(&kind)?,
                _ => bail!("delete what? kitectl delete deployment NAME, or -f FILE"),
            };
            ctl.delete(&name).await?
        }
        Command::Logs {
            pod,
            container,
            follow,
            previous,
        } => {
            if follow {
                bail!("logs -f follows on the node only (kitectl --socket on the node, without --coordinator)");
            }
            ctl.logs(&pod_name(&pod)?, container.unwrap_or_default(), previous)
                .await?
        }
        Command::Exec {
            pod,
            container,
            timeout,
            command,
        } => {
            return ctl
                .exec(
                    &pod_name(&pod)?,
                    container.unwrap_or_default(),
                    timeout,
                    command,
                )
                .await
        }
        _ => {
            bail!("this command talks to a node's agent: run it on the node without --coordinator")
        }
    }
    Ok(0)
}

async fn main_inner(cli: Cli) -> anyhow::Result<i32> {
    if let Some(address) = cli.coordinator.clone() {
        return cluster_main(&address, cli).await;
    }
    let client = kite_protocol::node::connect(&cli.socket)
        .await
        .map_err(|e| {
            anyhow!(
                "connect to the node agent on {}: {} (is kite-agent running?)",
                cli.socket.display(),
                kite_protocol::errors::error_chain(&e)
            )
        })?;
    let mut ctl = Ctl {
        client,
        namespace: cli.namespace,
    };
    match cli.command {
        Command::Run { file, no_wait } => ctl.run(&file, no_wait).await?,
        Command::Get {
            kind,
            name,
            output,
            all_namespaces,
        } => {
            check_pod_kind(&kind)?;
            ctl.get(name, output, all_namespaces).await?
        }
        Command::Describe { kind, name } => {
            check_pod_kind(&kind)?;
            ctl.describe(&name).await?
        }
        Command::Logs {
            pod,
            container,
            follow,
            previous,
        } => {
            ctl.logs(&pod_name(&pod)?, container, follow, previous)
                .await?
        }
        Command::Exec {
            pod,
            container,
            timeout,
            command,
        } => {
            return ctl
                .exec(&pod_name(&pod)?, container, timeout, command)
                .await;
        }
        Command::Delete {
            kind,
            name,
            file,
            grace_period,
        } => {
            let name = match (kind, name, file) {
                (_, _, Some(file)) => named_in(&file, &mut ctl.namespace)?,
                (Some(kind), Some(name), None) => {
                    check_pod_kind(&kind)?;
                    name
                }
                (Some(kind), None, None) => pod_name(&kind)?,
                _ => bail!("delete what? kitectl delete pod NAME, or -f FILE"),
            };
            ctl.delete(&name, grace_period).await?
        }
        Command::Set { what } => match what {
            SetCommand::Image { pod, images } => {
                let pod = pod_name(&pod)?;
                for (container, image) in pairs(&images, "CONTAINER=IMAGE")? {
                    ctl.update(&pod, container, image, HashMap::new()).await?;
                }
            }
            SetCommand::Env {
                pod,
                container,
                values,
            } => {
                let pod = pod_name(&pod)?;
                let env = pairs(&values, "KEY=VALUE")?.into_iter().collect();
                ctl.update(&pod, container.unwrap_or_default(), String::new(), env)
                    .await?;
            }
        },
        Command::Prefetch { image } => ctl.prefetch(image).await?,
        Command::Apply { .. }
        | Command::Scale { .. }
        | Command::Rollout { .. }
        | Command::Cordon { .. }
        | Command::Uncordon { .. }
        | Command::Drain { .. }
        | Command::Token { .. } => {
            bail!("this command talks to the coordinator: give --coordinator HOST:PORT (or KITE_COORDINATOR)")
        }
        Command::Events { pod, watch } => ctl.events(&pod_name(&pod)?, watch).await?,
    }
    Ok(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    match main_inner(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
