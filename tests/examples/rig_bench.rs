//! The coordinator's benchmarks on a two-node rig (hack/bench-coordinator.sh runs it), every
//! variant in one run:
//!
//! (a) scale-out 0 → N ready (runc N=20, kite N=4) of an app whose image (busybox + a MIB MiB
//!     layer) no node holds (a fresh rig per round): the nodes' agents in their parallel order
//!     (the fetch starts at the bind, beside the sandbox) against a kubelet's order (sandbox,
//!     then pull) — bind-time fetch on and off;
//! (b) a rollout of 4 replicas to a new image in place (same sandboxes) against a recreate
//!     rollout (new pods), maxUnavailable 1, images cached; apply → rollout complete.
//!
//!     cargo run --release -p kite-e2e --example rig_bench -- [ROUNDS] [MIB]

use std::time::{Duration, Instant};

use kite_e2e::agent::{WEB_V1, WEB_V2};
use kite_e2e::bench::{push_full_image, spread};
use kite_e2e::cluster::{Rig, TestCoordinator};
use kite_protocol::cluster::{App, PodInfo};
use kite_snapshotter::registry::ImageRef;

const LIMIT: Duration = Duration::from_secs(600);

fn app(
    name: &str,
    runtime: &str,
    image: &str,
    replicas: u32,
    annotations: &str,
    template_annotations: &str,
) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  annotations: {{{annotations}}}
spec:
  replicas: {replicas}
  strategy: {{rollingUpdate: {{maxUnavailable: 1}}}}
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
      annotations: {{{template_annotations}}}
    spec:
      runtimeClassName: {runtime}
      terminationGracePeriodSeconds: 1
      containers:
      - name: app
        image: {image}
        command: [sh, -c, "mkdir -p /www; echo ok > /www/index.html; exec httpd -f -p 8080 -h /www"]
        readinessProbe:
          httpGet: {{path: /, port: 8080}}
          periodSeconds: 1
        resources:
          requests: {{cpu: 10m, memory: 16Mi}}
"#
    )
}

fn all_ready(a: &App, p: &[PodInfo], revision: u64) -> bool {
    p.len() == a.replicas as usize && p.iter().all(|p| p.ready && p.running_revision == revision)
}

async fn apply(c: &TestCoordinator, manifest: &str) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), manifest).unwrap();
    c.kitectl_ok(&["apply", "-f", file.path().to_str().unwrap(), "--no-wait"]);
}

fn line(what: &str, v: &[f64]) -> String {
    let (m, lo, hi) = spread(v);
    format!("{what}: {m:.0} ms [{lo:.0}–{hi:.0}]")
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rounds: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(3);
    let mib: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(64);
    let accel = kite_e2e::bench::accelerator();
    let client = kite_e2e::bench::registry_client();
    let image = "127.0.0.1:5000/kite/rig-bench-app:latest";
    push_full_image(&client, &ImageRef::parse(image).unwrap(), mib, 1).await;
    let mut out = vec![format!(
        "rig: 2 nodes, {accel}, {} cores; image busybox + {mib} MiB layer; {rounds} rounds",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    )];

    // (a) Scale-out 0 → N, fetch at the bind (parallel) or after the sandbox (kubelet).
    for (runtime, n) in [("runc", 20u32), ("kite", 4)] {
        let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for round in 0..rounds {
            // Alternate which goes first.
            let orders = if round % 2 == 0 {
                ["parallel", "kubelet"]
            } else {
                ["kubelet", "parallel"]
            };
            for order in orders {
                let rig = Rig::up(7, 2);
                let c = &rig.coordinator;
                let started = Instant::now();
                apply(
                    c,
                    &app(
                        "scale",
                        runtime,
                        image,
                        n,
                        "",
                        &format!("kite.io/start-order: {order}"),
                    ),
                )
                .await;
                c.wait_app("scale", "ready", LIMIT, |a, p| all_ready(a, p, 1))
                    .await;
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                eprintln!("scale-out {runtime} 0→{n} {order}: {ms:.0} ms");
                times[usize::from(order == "kubelet")].push(ms);
                rig.down_clean();
            }
        }
        let (on, off) = (spread(&times[0]).0, spread(&times[1]).0);
        out.push(format!(
            "scale-out 0→{n} ready, {runtime}: {}; {}; on/off = {:.0}%",
            line("bind-time fetch on", &times[0]),
            line("off (kubelet order)", &times[1]),
            on / off * 100.0
        ));
    }

    // (b) In-place against recreate, 4 replicas, images cached.
    for runtime in ["runc", "kite"] {
        let rig = Rig::up(7, 2);
        let c = &rig.coordinator;
        let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut revision = 1;
        apply(c, &app("roll", runtime, WEB_V1, 4, "", "")).await;
        c.wait_app("roll", "ready", LIMIT, |a, p| all_ready(a, p, 1))
            .await;
        for round in 0..rounds * 2 {
            let recreate = round % 2 == 1;
            let image = if round % 2 == 0 { WEB_V2 } else { WEB_V1 };
            let annotation = if recreate {
                "kite.io/rollout: recreate"
            } else {
                ""
            };
            revision += 1;
            let started = Instant::now();
            apply(c, &app("roll", runtime, image, 4, annotation, "")).await;
            let want = revision;
            c.wait_app("roll", "rolled out", LIMIT, |a, p| {
                a.rollout
                    .as_ref()
                    .is_some_and(|r| r.state == "Complete" && r.to_revision == want)
                    && all_ready(a, p, want)
            })
            .await;
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            eprintln!(
                "rollout {runtime} {}: {ms:.0} ms",
                if recreate { "recreate" } else { "in place" }
            );
            times[usize::from(recreate)].push(ms);
        }
        let (inplace, recreate) = (spread(&times[0]).0, spread(&times[1]).0);
        out.push(format!(
            "rollout of 4, {runtime}: {}; {}; in place/recreate = {:.0}%",
            line("in place", &times[0]),
            line("recreate", &times[1]),
            inplace / recreate * 100.0
        ));
        rig.down_clean();
    }
    println!("{}", out.join("\n"));
}
