//! Node agent benchmarks (hack/bench-agent.sh runs it), every variant in one run:
//!
//! (a) bind → ready of a pod through kite-agent, in a kubelet's order (sandbox, then pull,
//!     create, start) and in the agent's parallel order (prefetch + pull while the sandbox
//!     boots), kite and runc pods, for an ordinary image (busybox + TOTAL MiB app layer of which
//!     the start reads START MiB) and its eStargz conversion (start files prioritized), pulled
//!     through the registry link paced to RATE MB/s; images and caches emptied before each start;
//! (b) an in-place update (new image, same sandbox) against a recreate (delete, run a new pod),
//!     to ready, kite and runc, images cached.
//!
//!     cargo run --release -p kite-e2e --example agent_bench -- [N] [TOTAL_MIB] [START_MIB] [RATE_MB]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kite_e2e::agent::{web_manifest, TestAgent, WEB_V1, WEB_V2};
use kite_e2e::bench::{ms, push_full_image, reset_images, spread, throttling_proxy, PROXY_PORT};
use kite_e2e::cri::Cri;
use kite_protocol::node::{DeletePodRequest, Pod, PodRef, UpdateContainerRequest};
use kite_snapshotter::convert::{convert_image, ConvertOptions};
use kite_snapshotter::registry::ImageRef;

const LIMIT: Duration = Duration::from_secs(600);

fn app_manifest(name: &str, runtime: &str, order: &str, image: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  annotations: {{kite.io/start-order: {order}}}
spec:
  runtimeClassName: {runtime}
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: {image}
    command: [sh, -c, "cat /app/start.dat > /dev/null; mkdir -p /www; echo ok > /www/index.html; exec httpd -f -p 8080 -h /www"]
    readinessProbe:
      httpGet: {{path: /, port: 8080}}
      periodSeconds: 1
"#
    )
}

fn pod_ref(name: &str) -> PodRef {
    PodRef {
        namespace: "default".into(),
        name: name.into(),
    }
}

async fn delete(agent: &TestAgent, name: &str) {
    agent
        .client()
        .await
        .delete_pod(DeletePodRequest {
            pod: Some(pod_ref(name)),
            grace_period_secs: Some(1),
        })
        .await
        .unwrap_or_else(|e| panic!("delete {name}: {}", e.message()));
}

fn bind_to_ready(p: &Pod) -> f64 {
    p.stages
        .iter()
        .find(|s| s.name == "ready")
        .map(|s| (s.start_ms + s.duration_ms) as f64)
        .expect("a ready stage")
}

fn stage_ms(p: &Pod, name: &str) -> Option<f64> {
    p.stages
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.duration_ms as f64)
}

fn fmt(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let (m, lo, hi) = spread(v);
    format!("{m:.0} [{lo:.0}–{hi:.0}]")
}

async fn update_to_ready(agent: &TestAgent, name: &str, image: &str) -> f64 {
    let t = Instant::now();
    let mut stream = agent
        .client()
        .await
        .update_container(UpdateContainerRequest {
            pod: Some(pod_ref(name)),
            container: "web".into(),
            image: image.into(),
            watch: true,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("update {name}: {}", e.message()))
        .into_inner();
    while let Some(u) = stream.next().await {
        u.unwrap_or_else(|e| panic!("update {name}: {}", e.message()));
    }
    ms(t.elapsed())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let [rounds, total, start, rate] = kite_e2e::bench::scenario_args([3, 320, 20, 50]);
    kite_e2e::require_setup();
    let client = kite_e2e::bench::registry_client();
    let tag = format!("{total}m-{start}m");
    let at = |port: u16, name: &str| format!("127.0.0.1:{port}/kite/agentbench:{name}-{tag}");
    let full = ImageRef::parse(&at(5000, "full")).unwrap();
    eprintln!("building {full} ({total} MiB app layer, {start} MiB read at start)");
    let app_size = push_full_image(&client, &full, total, start).await;
    let lazy = ImageRef::parse(&at(5000, "esgz")).unwrap();
    let options = ConvertOptions {
        prioritized: vec!["bin/busybox".into(), "app/start.dat".into()],
        ..Default::default()
    };
    convert_image(&client, &full, &lazy, &options, &|_, _, _| {})
        .await
        .unwrap();
    tokio::spawn(throttling_proxy(rate as f64 * 1e6));
    let images = [
        ("ordinary", at(PROXY_PORT, "full")),
        ("eStargz", at(PROXY_PORT, "esgz")),
    ];
    let all: Vec<String> = images.iter().map(|i| i.1.clone()).collect();
    let agent = TestAgent::start("bench");
    let mut cri = Cri::connect().await;

    // (a) bind → ready by start order.
    let mut results: BTreeMap<(usize, &str, &str), Vec<Pod>> = BTreeMap::new();
    for r in 0..rounds {
        for (i, (label, image)) in images.iter().enumerate() {
            for runtime in ["kite", "runc"] {
                for order in ["kubelet", "parallel"] {
                    reset_images(&mut cri, &all).await;
                    let name = format!("bench-{r}-{i}-{runtime}-{order}");
                    let pod = agent
                        .run_ready(&app_manifest(&name, runtime, order, image), &name, LIMIT)
                        .await;
                    eprintln!(
                        "round {r} {label} {runtime} {order}: bind → ready {:.0} ms",
                        bind_to_ready(&pod)
                    );
                    delete(&agent, &name).await;
                    results.entry((i, runtime, order)).or_default().push(pod);
                }
            }
        }
    }
    println!(
        "\n(a) bind → ready through kite-agent, {total} MiB app layer ({:.0} MB compressed), \
         {start} MiB read at start, registry link {rate} MB/s, {rounds} rounds, ms (median [min–max])",
        app_size as f64 / 1e6
    );
    println!(
        "{:<9} {:<5} {:<9} {:>20} {:>18} {:>18} {:>18} {:>9}",
        "image", "pod", "order", "bind → ready", "sandbox", "pull", "ready wait", "vs kubelet"
    );
    for (i, (label, _)) in images.iter().enumerate() {
        for runtime in ["kite", "runc"] {
            let kubelet_median = spread(
                &results[&(i, runtime, "kubelet")]
                    .iter()
                    .map(bind_to_ready)
                    .collect::<Vec<_>>(),
            )
            .0;
            for order in ["kubelet", "parallel"] {
                let pods = &results[&(i, runtime, order)];
                let total: Vec<f64> = pods.iter().map(bind_to_ready).collect();
                let stage = |n: &str| {
                    pods.iter()
                        .filter_map(|p| stage_ms(p, n))
                        .collect::<Vec<_>>()
                };
                println!(
                    "{:<9} {:<5} {:<9} {:>20} {:>18} {:>18} {:>18} {:>8.0}%",
                    label,
                    runtime,
                    order,
                    fmt(&total),
                    fmt(&stage("sandbox")),
                    fmt(&stage("pull")),
                    fmt(&stage("ready")),
                    (spread(&total).0 / kubelet_median - 1.0) * 100.0
                );
            }
        }
    }

    // (b) in-place update against recreate.
    println!("\n(b) container image change to ready, images cached, {rounds} rounds, ms (median [min–max])");
    println!(
        "{:<5} {:>20} {:>20} {:>10}",
        "pod", "in place", "recreate", "ratio"
    );
    for runtime in ["kite", "runc"] {
        let name = format!("upd-{runtime}");
        for image in [WEB_V1, WEB_V2] {
            cri.pull(image).await.unwrap();
        }
        agent
            .run_ready(&web_manifest(&name, runtime, WEB_V1), &name, LIMIT)
            .await;
        let (mut in_place, mut recreate) = (Vec::new(), Vec::new());
        let mut current = WEB_V1;
        for _ in 0..rounds {
            let next = if current == WEB_V1 { WEB_V2 } else { WEB_V1 };
            in_place.push(update_to_ready(&agent, &name, next).await);
            current = next;
            let next = if current == WEB_V1 { WEB_V2 } else { WEB_V1 };
            let t = Instant::now();
            delete(&agent, &name).await;
            agent
                .run_ready(&web_manifest(&name, runtime, next), &name, LIMIT)
                .await;
            recreate.push(ms(t.elapsed()));
            current = next;
        }
        delete(&agent, &name).await;
        println!(
            "{:<5} {:>20} {:>20} {:>9.0}%",
            runtime,
            fmt(&in_place),
            fmt(&recreate),
            spread(&in_place).0 / spread(&recreate).0 * 100.0
        );
    }
    // Leave nothing behind: the benchmark's images share layers with the tests' (a lazy layer
    // already mounted for them would not be mounted again).
    reset_images(&mut cri, &all).await;
    for image in [full.to_string(), lazy.to_string()] {
        let _ = cri.remove_image(&image).await;
    }
    println!("\naccelerator: {}", kite_e2e::bench::accelerator());
}
