//! Load through the CRI (hack/load.sh runs it): R runc pods and K kite pods started at once,
//! each running a container until its first output, then all removed at once. Checks that no
//! daemon falls over (containerd, kite-snapshotter, kite-lazyfs, kite-agent, kite-pool keep
//! their pids), that every pod started, that nothing of the kite pods is left, and that the
//! daemons' open files and memory return to their idle level; prints them idle, under load and
//! after.
//!
//!     cargo run --release -p kite-e2e --example load -- [RUNC_PODS] [KITE_PODS]

use std::time::{Duration, Instant};

use kite_e2e::cri::{status_message, Cri, KITE, RUNC};
use kite_e2e::IMAGE;

const DAEMONS: [&str; 5] = [
    "containerd",
    "kite-snapshotter",
    "kite-lazyfs",
    "kite-agent",
    "kite-pool",
];

/// One daemon's pid, open files and memory (RSS, KiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Reading {
    pid: u32,
    fds: usize,
    rss_kib: u64,
}

/// The running daemon whose process name is `name` (the oldest, if several).
fn daemon_pid(name: &str) -> Option<u32> {
    let mut found: Vec<(u64, u32)> = Vec::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // comm is in parentheses and cut to 15 bytes; the start time is field 22.
        let Some((comm, rest)) = stat.split_once(" (").and_then(|(_, r)| r.rsplit_once(") "))
        else {
            continue;
        };
        let short: String = name.chars().take(15).collect();
        if comm != short {
            continue;
        }
        let start = rest
            .split_whitespace()
            .nth(19)
            .and_then(|s| s.parse().ok())
            .unwrap_or(u64::MAX);
        found.push((start, pid));
    }
    found.sort();
    found.first().map(|(_, pid)| *pid)
}

fn read(name: &str) -> Option<Reading> {
    let pid = daemon_pid(name)?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
    Some(Reading { pid, fds, rss_kib })
}

fn readings() -> Vec<(&'static str, Option<Reading>)> {
    DAEMONS.iter().map(|d| (*d, read(d))).collect()
}

/// Runs pod `name` with `handler` and a container until its first output; returns the pod id
/// and how long it took, or what failed.
async fn start(handler: &'static str, name: String) -> Result<(String, Duration), String> {
    let t0 = Instant::now();
    let mut c = Cri::connect().await;
    let pod = c
        .run_pod(&name, handler, &[])
        .await
        .map_err(|e| format!("{name}: run pod: {}", status_message(&e)))?;
    let result = async {
        let id = c
            .create_container(
                &pod,
                "app",
                0,
                IMAGE,
                &["sh", "-c", "echo ready; exec sleep 100000"],
            )
            .await
            .map_err(|e| format!("{name}: create: {}", status_message(&e)))?;
        c.start(&id)
            .await
            .map_err(|e| format!("{name}: start: {}", status_message(&e)))?;
        let log = pod.log_dir().join("app/0.log");
        while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains(" stdout F ready")) {
            if t0.elapsed() > Duration::from_secs(300) {
                return Err(format!("{name}: no output in {}", log.display()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => Ok((pod.id, t0.elapsed())),
        Err(e) => {
            let _ = c.remove_pod(&pod.id).await;
            Err(e)
        }
    }
}

fn row(what: &str, r: &[(&str, Option<Reading>)]) {
    let cells: Vec<String> = r
        .iter()
        .map(|(_, x)| match x {
            Some(x) => format!("{:>5} {:>8.1}", x.fds, x.rss_kib as f64 / 1024.0),
            None => format!("{:>5} {:>8}", "-", "-"),
        })
        .collect();
    println!("  {what:12} {}", cells.join("   "));
}

#[tokio::main]
async fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (runc_pods, kite_pods) = (arg(1, 50), arg(2, 8));
    let mut c = Cri::connect().await;
    c.pull(IMAGE)
        .await
        .unwrap_or_else(|e| panic!("pull {IMAGE}: {}", status_message(&e)));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = readings();
    for (d, r) in &idle {
        assert!(r.is_some(), "{d} is not running (hack/setup.sh starts it)");
    }

    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..runc_pods {
        tasks.push(tokio::spawn(start(RUNC, format!("load-runc-{i}"))));
    }
    for i in 0..kite_pods {
        tasks.push(tokio::spawn(start(KITE, format!("load-kite-{i}"))));
    }
    let mut started = Vec::new();
    let mut failed = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let kind = if i < runc_pods { RUNC } else { KITE };
        match t.await.expect("start task") {
            Ok((id, took)) => started.push((kind, id, took)),
            Err(e) => failed.push(e),
        }
    }
    let all_up = t0.elapsed();
    let loaded = readings();

    let t1 = Instant::now();
    let mut removals = Vec::new();
    for (_, id, _) in &started {
        let id = id.clone();
        removals.push(tokio::spawn(async move {
            let mut c = Cri::connect().await;
            c.remove_pod(&id)
                .await
                .map_err(|e| format!("remove {id}: {}", status_message(&e)))
        }));
    }
    for r in removals {
        if let Err(e) = r.await.expect("removal task") {
            failed.push(e);
        }
    }
    let all_gone = t1.elapsed();
    // Let the daemons settle: closed connections, freed caches.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = readings();

    let mut leaks = Vec::new();
    for (kind, id, _) in &started {
        if *kind == KITE {
            leaks.extend(kite_e2e::leftovers(id));
        }
    }

    let accel = kite_e2e::bench::accelerator();
    println!(
        "\nload through the CRI: {runc_pods} runc pods and {kite_pods} kite pods started at once, then removed at once; accelerator {accel}"
    );
    for kind in [RUNC, KITE] {
        let mut t: Vec<f64> = started
            .iter()
            .filter(|(k, _, _)| *k == kind)
            .map(|(_, _, d)| kite_e2e::bench::ms(*d))
            .collect();
        if t.is_empty() {
            continue;
        }
        t.sort_by(f64::total_cmp);
        println!(
            "  {kind:5} pods started: {} of {}; to first output, ms: median {:.0}, min {:.0}, max {:.0}",
            t.len(),
            if kind == RUNC { runc_pods } else { kite_pods },
            t[t.len() / 2],
            t[0],
            t[t.len() - 1]
        );
    }
    println!(
        "  all up after {:.1} s, all removed after {:.1} s",
        all_up.as_secs_f64(),
        all_gone.as_secs_f64()
    );
    println!("\ndaemons: open files and RSS (MiB)");
    println!(
        "  {:12} {}",
        "",
        DAEMONS
            .iter()
            .map(|d| format!("{d:>14}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    row("idle", &idle);
    row("all pods up", &loaded);
    row("after", &after);

    let mut problems = failed;
    problems.extend(leaks);
    for ((d, before), (_, now)) in idle.iter().zip(&after) {
        match (before, now) {
            (Some(b), Some(n)) if b.pid != n.pid => {
                problems.push(format!("{d} restarted (pid {} -> {})", b.pid, n.pid))
            }
            (Some(_), None) => problems.push(format!("{d} is gone")),
            // Descriptors back to idle, give or take a few (a cached registry connection).
            (Some(b), Some(n)) if n.fds > b.fds + 8 => problems.push(format!(
                "{d}: {} open files after the load, {} idle",
                n.fds, b.fds
            )),
            _ => {}
        }
    }
    if !problems.is_empty() {
        panic!(
            "load: {} problems:\n{}",
            problems.len(),
            problems.join("\n")
        );
    }
    println!("\nno daemon restarted, every pod started and was removed, nothing left behind");
}
