//! Pod benchmark through the CRI, runc and kite in one run (hack/bench-pods.sh runs it):
//!
//! - pod start: RunPodSandbox → CreateContainer → StartContainer → the container's first
//!   output in its CRI log, N pods of each, interleaved;
//! - host memory per idle pod: PSS of kite's QEMU + virtiofsd + shim (runc: its shim, pause
//!   and the container), with all N pods of each kind up;
//! - host ↔ pod TCP throughput with iperf3, both directions, runc and kite.
//!
//!     cargo run --release -p kite-e2e --example pod_bench -- [N]

use std::process::Command;
use std::time::{Duration, Instant};

use kite_e2e::cri::{status_message, Cri, Pod, RemoveOnDrop, KITE, RUNC};
use kite_e2e::IMAGE;

const IPERF_IMAGE: &str = "127.0.0.1:5000/kite/iperf3:latest";

struct Start {
    run_pod: f64,
    create: f64,
    start: f64,
    first_output: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// median, min, p90, max
fn spread(v: &[f64]) -> (f64, f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    // q is in 0..=1, so the index is in 0..len.
    #[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation)]
    let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
    (at(0.5), s[0], at(0.9), s[s.len() - 1])
}

async fn start_pod(c: &mut Cri, handler: &str, name: &str) -> (Pod, Start) {
    let t0 = Instant::now();
    let pod = c
        .run_pod(name, handler, &[])
        .await
        .unwrap_or_else(|e| panic!("run {handler} pod: {}", status_message(&e)));
    let t1 = Instant::now();
    let id = c
        .create_container(
            &pod,
            "app",
            0,
            IMAGE,
            &["sh", "-c", "echo ready; exec sleep 100000"],
        )
        .await
        .unwrap_or_else(|e| panic!("create in {handler} pod: {}", status_message(&e)));
    let t2 = Instant::now();
    c.start(&id)
        .await
        .unwrap_or_else(|e| panic!("start in {handler} pod: {}", status_message(&e)));
    let t3 = Instant::now();
    let log = pod.log_dir().join("app/0.log");
    loop {
        if std::fs::read_to_string(&log).is_ok_and(|l| l.contains(" stdout F ready")) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no output in {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let t4 = Instant::now();
    (
        pod,
        Start {
            run_pod: ms(t1 - t0),
            create: ms(t2 - t1),
            start: ms(t3 - t2),
            first_output: ms(t4 - t0),
        },
    )
}

fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn processes() -> Vec<(u32, u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let cmd = std::fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        out.push((pid, ppid, cmd));
    }
    out
}

/// The shim's record of a kite pod's sandbox start (`timings_file`): its JSON line.
fn sandbox_record(pod_id: &str) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string("/run/kite/timings.jsonl").ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|r| r["container"] == pod_id)
}

/// PSS (MiB) of what a pod costs the host: the pod's shim and every process under it (runc:
/// pause and the container; kite: QEMU and virtiofsd).
fn pod_pss_mib(pod_id: &str) -> f64 {
    let procs = processes();
    let Some(shim) = procs
        .iter()
        .find(|(_, _, cmd)| {
            cmd.contains("containerd-shim") && cmd.contains(&format!("-id {pod_id} "))
        })
        .map(|p| p.0)
    else {
        panic!("no shim for pod {pod_id}");
    };
    let mut pids = vec![shim];
    let mut i = 0;
    while i < pids.len() {
        let parent = pids[i];
        pids.extend(procs.iter().filter(|p| p.1 == parent).map(|p| p.0));
        i += 1;
    }
    pids.iter().map(|p| pss_kib(*p)).sum::<u64>() as f64 / 1024.0
}

/// iperf3 from the host to `ip` (or back with `reverse`), Gbit/s.
fn iperf(ip: &str, reverse: bool) -> f64 {
    let mut cmd = Command::new("iperf3");
    cmd.args(["-c", ip, "-t", "5", "-J"]);
    if reverse {
        cmd.arg("-R");
    }
    let mut last = String::new();
    for _ in 0..50 {
        let out = cmd.output().expect("run iperf3");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
            return bps / 1e9;
        }
        // Not up yet, or busy: iperf3 says why in its JSON.
        last = v["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned());
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("iperf3 to {ip}: {last}");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let accel = match kite_e2e::bench::accelerator() {
        "TCG" => "TCG (software emulation)",
        a => a,
    };
    let mut c = Cri::connect().await;
    for image in [IMAGE, IPERF_IMAGE] {
        c.pull(image)
            .await
            .unwrap_or_else(|e| panic!("pull {image}: {}", status_message(&e)));
    }

    let mut starts: Vec<(&str, Start)> = Vec::new();
    let mut pods: Vec<(&str, Pod)> = Vec::new();
    let mut guards = Vec::new();
    for i in 0..n {
        for handler in [RUNC, KITE] {
            let (pod, s) = start_pod(&mut c, handler, &format!("bench-{handler}-{i}")).await;
            eprintln!(
                "{handler} pod {i}: first output after {:.0} ms",
                s.first_output
            );
            starts.push((handler, s));
            guards.push(RemoveOnDrop(pod.id.clone()));
            pods.push((handler, pod));
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut memory: Vec<(&str, f64)> = Vec::new();
    for (handler, pod) in &pods {
        memory.push((handler, pod_pss_mib(&pod.id)));
    }
    for (_, pod) in &pods {
        let _ = c.remove_pod(&pod.id).await;
    }

    // The stages of each kite pod's sandbox start, from the shim's structured record.
    let stage = |key: &str| -> Vec<f64> {
        pods.iter()
            .filter(|(h, _)| *h == KITE)
            .filter_map(|(_, p)| sandbox_record(&p.id)?[key].as_f64())
            .collect()
    };
    let stages: Vec<(&str, Vec<f64>)> = [
        "vm_boot_ms",
        "guest_kernel_ms",
        "network_attach_ms",
        "network_guest_ms",
        "create_ms",
    ]
    .iter()
    .map(|k| (*k, stage(k)))
    .collect();

    let mut throughput = Vec::new();
    for handler in [RUNC, KITE] {
        let pod = c
            .run_pod(&format!("iperf-{handler}"), handler, &[])
            .await
            .unwrap_or_else(|e| panic!("run {handler} pod: {}", status_message(&e)));
        let _guard = RemoveOnDrop(pod.id.clone());
        c.run_container(&pod, "iperf", 0, IPERF_IMAGE, &["/usr/bin/iperf3", "-s"])
            .await;
        let ip = c.pod_ip(&pod.id).await;
        let ip2 = ip.clone();
        let (to_pod, from_pod) =
            tokio::task::spawn_blocking(move || (iperf(&ip2, false), iperf(&ip2, true)))
                .await
                .unwrap();
        throughput.push((handler, to_pod, from_pod));
        let _ = c.remove_pod(&pod.id).await;
    }

    println!("\nkite pod benchmark: {n} pods each, runc and kite interleaved; accelerator {accel}");
    println!("\npod start through the CRI, ms     median      min      p90      max");
    for handler in [RUNC, KITE] {
        let pick = |f: fn(&Start) -> f64| -> Vec<f64> {
            starts
                .iter()
                .filter(|(h, _)| *h == handler)
                .map(|(_, s)| f(s))
                .collect()
        };
        for (what, v) in [
            ("RunPodSandbox", pick(|s| s.run_pod)),
            ("CreateContainer", pick(|s| s.create)),
            ("StartContainer", pick(|s| s.start)),
            ("to first output", pick(|s| s.first_output)),
        ] {
            let (med, min, p90, max) = spread(&v);
            println!("  {handler:5} {what:24} {med:8.1} {min:8.1} {p90:8.1} {max:8.1}");
        }
    }
    let med = |h: &str| {
        spread(
            &starts
                .iter()
                .filter(|(x, _)| *x == h)
                .map(|(_, s)| s.first_output)
                .collect::<Vec<_>>(),
        )
        .0
    };
    println!(
        "  kite/runc, to first output: {:.1}x",
        med(KITE) / med(RUNC)
    );

    println!("\nkite sandbox start stages (shim record), ms  median      min      p90      max");
    for (key, v) in &stages {
        if v.is_empty() {
            continue;
        }
        let (med, min, p90, max) = spread(v);
        println!("  {key:28} {med:8.1} {min:8.1} {p90:8.1} {max:8.1}");
    }

    println!("\nhost memory per idle pod (PSS, MiB)  median      min      p90      max");
    for handler in [RUNC, KITE] {
        let v: Vec<f64> = memory
            .iter()
            .filter(|(h, _)| *h == handler)
            .map(|(_, m)| *m)
            .collect();
        let (med, min, p90, max) = spread(&v);
        println!(
            "  {handler:5} {:28} {med:8.1} {min:8.1} {p90:8.1} {max:8.1}",
            ""
        );
    }

    println!("\nhost <-> pod TCP (iperf3, 5 s), Gbit/s   host->pod  pod->host");
    for (handler, to, from) in &throughput {
        println!("  {handler:5} {:30} {to:9.2} {from:9.2}", "");
    }
    if let [(_, rt, rf), (_, kt, kf)] = throughput.as_slice() {
        println!(
            "  kite/runc: host->pod {:.2}, pod->host {:.2}",
            kt / rt,
            kf / rf
        );
    }
}
