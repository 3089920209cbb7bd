//! The Java start-up cache's benchmark (hack/bench-java.sh runs it): real Java server apps in
//! images, JDK 17 (dynamic AppCDS) and JDK 25 (AOT cache), runc and kite pods, through
//! kite-agent. Per app, JDK and runtime: one training run (its time, the archive's size), then
//! ROUNDS starts without the cache (the JDK's default CDS) and with it, interleaved (the order
//! alternates by round). The figure is the agent's `ready` stage: from the container's start to
//! its first successful readiness probe (polled every 50 ms); every start with the cache must
//! have mapped the archive (the JVM's own log, `JavaCacheMapped`).
//!
//!     cargo run --release -p kite-e2e --example java_bench -- ROUNDS RUNTIMES APPS
//!     e.g. 5 runc,kite hello,spring,tomcat,zookeeper,activemq

use std::collections::BTreeSet;
use std::time::Duration;

use kite_e2e::agent::{JavaPod, TestAgent};
use kite_e2e::bench::spread;
use kite_protocol::node::Pod;

const LIMIT: Duration = Duration::from_secs(900);
const BENCH_DIR: &str = "/var/lib/kite/java-bench";

fn image(app: &str, jdk: u32) -> String {
    match app {
        "hello" => format!("127.0.0.1:5000/kite/java{jdk}-hello:latest"),
        _ => format!("127.0.0.1:5000/kite/bench-{app}-jdk{jdk}:latest"),
    }
}

fn probe_path(app: &str) -> String {
    std::fs::read_to_string(format!("{BENCH_DIR}/{app}/probe_path"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| s.starts_with('/'))
        .unwrap_or_else(|| "/".into())
}

fn manifest(name: &str, runtime: &str, image: &str, probe: &str, cache: bool) -> String {
    JavaPod {
        name,
        runtime,
        image,
        memory: "1Gi",
        cpu_request: "1",
        tool_options: "",
        probe_path: probe,
        failure_threshold: 600,
        cache,
    }
    .manifest()
}

fn event_ms(p: &Pod, reason: &str) -> Option<i64> {
    p.events
        .iter()
        .find(|e| e.reason == reason)
        .map(|e| e.unix_ms)
}

fn ready_ms(p: &Pod) -> f64 {
    p.stages
        .iter()
        .find(|s| s.name == "ready")
        .map(|s| s.duration_ms as f64)
        .expect("a ready stage")
}

fn fmt(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let (m, lo, hi) = spread(v);
    format!("{m:.0} [{lo:.0}–{hi:.0}]")
}

fn archives(agent: &TestAgent) -> Vec<(String, u64)> {
    agent.java_index()["entries"]
        .as_object()
        .expect("entries")
        .iter()
        .filter_map(|(k, e)| Some((k.clone(), e["archive"]["bytes"].as_u64()?)))
        .collect()
}

struct Row {
    app: String,
    jdk: u32,
    runtime: String,
    without: Vec<f64>,
    with: Vec<f64>,
    training_s: f64,
    archive_mb: f64,
    note: String,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rounds: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(5);
    let runtimes: Vec<String> = args
        .get(1)
        .map(|s| s.split(',').map(String::from).collect())
        .unwrap_or_else(|| vec!["runc".into(), "kite".into()]);
    let apps: Vec<String> = args
        .get(2)
        .map(|s| s.split(',').map(String::from).collect())
        .unwrap_or_else(|| vec!["hello".into(), "spring".into()]);
    kite_e2e::require_setup();
    let agent = TestAgent::start_with("java-bench", "warmup_secs = 5\ndump_grace_secs = 600");
    let mut rows = Vec::new();
    for app in &apps {
        let probe = probe_path(app);
        for jdk in [17u32, 25] {
            for runtime in &runtimes {
                let image = image(app, jdk);
                let tag = format!("{app}-{jdk}-{runtime}");
                // The training (the first start records the archive).
                let before: BTreeSet<String> =
                    archives(&agent).into_iter().map(|(k, _)| k).collect();
                let name = format!("train-{tag}");
                agent
                    .run_ready(
                        &manifest(&name, runtime, &image, &probe, true),
                        &name,
                        LIMIT,
                    )
                    .await;
                let pod = agent
                    .wait_pod(&name, LIMIT, |p| {
                        p.events.iter().any(|e| {
                            matches!(
                                e.reason.as_str(),
                                "JavaCacheTrained" | "JavaCacheUnusable" | "JavaCacheSkipped"
                            )
                        })
                    })
                    .await;
                agent.delete_gone(&name, 10, LIMIT).await;
                let mut row = Row {
                    app: app.clone(),
                    jdk,
                    runtime: runtime.clone(),
                    without: Vec::new(),
                    with: Vec::new(),
                    training_s: 0.0,
                    archive_mb: 0.0,
                    note: String::new(),
                };
                match (
                    event_ms(&pod, "JavaCacheTraining"),
                    event_ms(&pod, "JavaCacheTrained"),
                ) {
                    (Some(a), Some(b)) => row.training_s = (b - a) as f64 / 1000.0,
                    _ => {
                        row.note = pod
                            .events
                            .iter()
                            .rev()
                            .find(|e| e.reason.starts_with("JavaCache"))
                            .map(|e| e.message.clone())
                            .unwrap_or_default();
                        eprintln!("{tag}: not cached: {}", row.note);
                        rows.push(row);
                        continue;
                    }
                }
                row.archive_mb = archives(&agent)
                    .into_iter()
                    .find(|(k, _)| !before.contains(k))
                    .map(|(_, b)| b as f64 / 1e6)
                    .unwrap_or_default();
                for r in 0..rounds {
                    let order = if r % 2 == 0 {
                        [false, true]
                    } else {
                        [true, false]
                    };
                    for cache in order {
                        let name = format!("{tag}-{r}-{}", if cache { "with" } else { "without" });
                        let pod = agent
                            .run_ready(
                                &manifest(&name, runtime, &image, &probe, cache),
                                &name,
                                LIMIT,
                            )
                            .await;
                        let ms = ready_ms(&pod);
                        if cache {
                            let pod = agent
                                .wait_pod(&name, LIMIT, |p| {
                                    p.events.iter().any(|e| {
                                        e.reason == "JavaCacheMapped"
                                            || e.reason == "JavaCacheRejected"
                                    })
                                })
                                .await;
                            assert!(
                                event_ms(&pod, "JavaCacheMapped").is_some(),
                                "{name}: the archive was not mapped: {:?}",
                                pod.events
                            );
                            row.with.push(ms);
                        } else {
                            row.without.push(ms);
                        }
                        eprintln!("{name}: ready {ms:.0} ms");
                        agent.delete_gone(&name, 10, LIMIT).await;
                    }
                }
                rows.push(row);
            }
        }
    }
    println!(
        "\nJava start-up cache: container start → first successful readiness probe, ms, median \
         [min–max] of {rounds} interleaved starts each; accelerator {}; cpu 1, memory 1Gi",
        kite_e2e::bench::accelerator()
    );
    println!(
        "{:<10} {:>3} {:<5} {:>22} {:>22} {:>7} {:>10} {:>9}",
        "app",
        "jdk",
        "pod",
        "without (default CDS)",
        "with the archive",
        "change",
        "training",
        "archive"
    );
    for r in &rows {
        if r.with.is_empty() {
            println!(
                "{:<10} {:>3} {:<5} not cached: {}",
                r.app, r.jdk, r.runtime, r.note
            );
            continue;
        }
        let change = (spread(&r.with).0 / spread(&r.without).0 - 1.0) * 100.0;
        println!(
            "{:<10} {:>3} {:<5} {:>22} {:>22} {:>6.0}% {:>8.1} s {:>6.1} MB",
            r.app,
            r.jdk,
            r.runtime,
            fmt(&r.without),
            fmt(&r.with),
            change,
            r.training_s,
            r.archive_mb
        );
    }
}
