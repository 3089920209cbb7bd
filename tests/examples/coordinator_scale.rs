//! The coordinator at a scale beyond this machine, simulated (hack/bench-coordinator.sh runs
//! it): a real kite-coordinator (its own directory, CA and store) and NODES simulated agents in
//! this process. Each one joins with a token and a CSR of its own, holds its mutual-TLS stream,
//! sends its status and heartbeats, and answers every assignment at once with a ready pod (no
//! pods run). Then APPS apps of REPLICAS replicas each are applied one after the other.
//!
//! Reported: the time to join the nodes; per app, apply → every replica assigned and apply →
//! every replica reported ready back; the assignment latency (apply → the node's receipt of
//! each pod) p50/p99 over all pods; the coordinator's resident memory at the end.
//!
//!     cargo run --release -p kite-e2e --example coordinator_scale -- NODES APPS REPLICAS
//!     e.g. 1000 10 1000
//!
//! With ETCD_ENDPOINTS set (comma-separated client URLs), the coordinator keeps its state in
//! that etcd (under a prefix of its own) instead of its embedded store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kite_e2e::cluster::TestCoordinator;
use kite_protocol::cluster::node_link_client::NodeLinkClient;
use kite_protocol::cluster::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// When each pod's assignment reached its node.
type Receipts = Arc<Mutex<HashMap<String, Instant>>>;

fn app_manifest(name: &str, replicas: u32) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      runtimeClassName: runc
      containers:
      - name: app
        image: 127.0.0.1:5000/kite/{name}:v1
        resources: {{requests: {{cpu: 100m, memory: 128Mi}}}}
"#
    )
}

fn status() -> NodeStatus {
    NodeStatus {
        allocatable_cpu_millis: 64_000,
        allocatable_memory_bytes: 256 << 30,
        runtime_classes: vec!["kite".into(), "runc".into()],
        ..Default::default()
    }
}

/// One simulated node: join, link, answer assignments with ready pods, heartbeat.
async fn sim_node(
    address: String,
    ca: String,
    token: String,
    name: String,
    receipts: Receipts,
) -> Result<(), String> {
    let (key, csr) = kite_agent::link::new_csr(&name)?;
    let channel = kite_protocol::cluster::connect(&address, &ca, None)
        .await
        .map_err(|e| format!("{name}: connect: {e}"))?;
    let cert = NodeLinkClient::new(channel)
        .join(JoinRequest {
            token,
            node_name: name.clone(),
            csr_pem: csr,
        })
        .await
        .map_err(|e| format!("{name}: join: {}", e.message()))?
        .into_inner()
        .cert_pem;
    let channel = kite_protocol::cluster::connect(&address, &ca, Some((&cert, &key)))
        .await
        .map_err(|e| format!("{name}: connect with its certificate: {e}"))?;
    let (tx, rx) = mpsc::channel(64);
    let msg = |m| NodeMessage { msg: Some(m) };
    tx.send(msg(node_message::Msg::Hello(NodeHello {
        name: name.clone(),
        status: Some(status()),
        pods: Some(PodReports {
            full: true,
            pods: Vec::new(),
        }),
    })))
    .await
    .map_err(|_| "send the hello")?;
    let mut inbound = NodeLinkClient::new(channel)
        .link(ReceiverStream::new(rx))
        .await
        .map_err(|e| format!("{name}: link: {}", e.message()))?
        .into_inner();
    let beat = tx.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if beat
                .send(msg(node_message::Msg::Heartbeat(Heartbeat { unix_ms: 0 })))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    while let Ok(Some(m)) = inbound.message().await {
        let Some(coordinator_message::Msg::Assignments(a)) = m.msg else {
            continue;
        };
        let now = Instant::now();
        let mut reports = Vec::new();
        {
            let mut r = receipts.lock().unwrap();
            for p in &a.pods {
                r.entry(format!("{}/{}", p.namespace, p.name))
                    .or_insert(now);
            }
        }
        for p in a.pods {
            reports.push(PodReport {
                namespace: p.namespace,
                name: p.name,
                revision: p.revision,
                phase: "Running".into(),
                ready: true,
                ip: "10.0.0.1".into(),
                ..Default::default()
            });
        }
        if !reports.is_empty() {
            let m = msg(node_message::Msg::Pods(PodReports {
                full: false,
                pods: reports,
            }));
            if tx.send(m).await.is_err() {
                break;
            }
        }
    }
    Ok(())
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: u32| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (nodes, apps, replicas) = (arg(0, 1000), arg(1, 10), arg(2, 1000));
    // One file descriptor per node link on both sides.
    let want = u64::from(nodes) * 2 + 1024;
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, want, want);
    let mut extra =
        String::from("node_timeout_secs = 60\npod_eviction_secs = 60\nlog_level = \"warn\"\n");
    if let Ok(endpoints) = std::env::var("ETCD_ENDPOINTS") {
        let list: Vec<String> = endpoints.split(',').map(|e| format!("\"{e}\"")).collect();
        extra = format!(
            "store = \"etcd\"\n{extra}[coordinator.etcd]\nendpoints = [{}]\nprefix = \"/scale-{}\"\n",
            list.join(","),
            std::process::id()
        );
        println!("store: etcd at {endpoints}");
    } else {
        println!("store: embedded");
    }
    let c = TestCoordinator::start("scale", &extra);
    let pid = c.pid().expect("the coordinator runs");
    let ca = std::fs::read_to_string(c.pki().join("ca.crt")).unwrap();
    let mut admin = c.client().await;
    let idle_rss = rss_mib(pid);

    let started = Instant::now();
    let receipts: Receipts = Arc::default();
    let mut joins = Vec::new();
    for i in 0..nodes {
        let token = admin
            .create_token(CreateTokenRequest {
                ttl_secs: 3600,
                description: String::new(),
            })
            .await
            .expect("a token")
            .into_inner()
            .token;
        joins.push(tokio::spawn(sim_node(
            c.address.clone(),
            ca.clone(),
            token,
            format!("sim-{i:05}"),
            receipts.clone(),
        )));
    }
    loop {
        let listed = admin
            .list_nodes(ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes;
        let ready = listed.iter().filter(|n| n.state == "Ready").count();
        if ready == nodes as usize {
            break;
        }
        if let Some(j) = joins.iter().find(|j| j.is_finished()) {
            let _ = j;
            panic!("a simulated node ended before all joined ({ready} ready)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let join_secs = started.elapsed().as_secs_f64();
    println!("nodes: {nodes} joined and linked in {join_secs:.1} s; coordinator RSS {idle_rss:.0} MiB before, {:.0} MiB now", rss_mib(pid));

    let mut latencies = Vec::new();
    let mut assigned_secs = Vec::new();
    let mut ready_secs = Vec::new();
    for a in 0..apps {
        let name = format!("app-{a:02}");
        let applied = Instant::now();
        admin
            .apply(ApplyRequest {
                manifest: app_manifest(&name, replicas),
            })
            .await
            .expect("apply");
        let prefix = format!("default/{name}-");
        let mut assigned_at = None;
        loop {
            let got: Vec<Instant> = receipts
                .lock()
                .unwrap()
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(_, t)| *t)
                .collect();
            if assigned_at.is_none() && got.len() == replicas as usize {
                assigned_at = Some(applied.elapsed());
                latencies.extend(
                    got.iter()
                        .map(|t| t.duration_since(applied).as_secs_f64() * 1000.0),
                );
            }
            if assigned_at.is_some() {
                let app = admin
                    .get_app(AppRef {
                        namespace: "default".into(),
                        name: name.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                if app.ready_replicas == replicas {
                    break;
                }
            }
            assert!(
                applied.elapsed() < Duration::from_secs(600),
                "{name} not placed within 10 min"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let assigned = assigned_at.unwrap().as_secs_f64();
        let ready = applied.elapsed().as_secs_f64();
        println!("{name}: {replicas} replicas assigned in {assigned:.3} s, reported ready in {ready:.3} s");
        assigned_secs.push(assigned);
        ready_secs.push(ready);
    }
    latencies.sort_by(f64::total_cmp);
    let (m, lo, hi) = kite_e2e::bench::spread(&assigned_secs);
    let (rm, rlo, rhi) = kite_e2e::bench::spread(&ready_secs);
    println!();
    println!(
        "| {nodes} simulated nodes, {apps} apps × {replicas} replicas ({} pods) | value |",
        apps * replicas
    );
    println!("|---|---|");
    println!("| nodes joined and linked | {join_secs:.1} s |");
    println!("| apply → all {replicas} replicas at their nodes, median [min–max] | {m:.3} s [{lo:.3}–{hi:.3}] |");
    println!("| apply → all reported ready | {rm:.3} s [{rlo:.3}–{rhi:.3}] |");
    println!(
        "| assignment latency (apply → node), p50 / p99 over {} pods | {:.0} / {:.0} ms |",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
    println!(
        "| coordinator memory (RSS) with {} pods | {:.0} MiB |",
        apps * replicas,
        rss_mib(pid)
    );
}
