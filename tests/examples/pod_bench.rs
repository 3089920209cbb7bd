//! Pod benchmark through the CRI, runc and kite in one run (hack/bench-pods.sh runs it):
//!
//! - pod start: RunPodSandbox → CreateContainer → StartContainer → the container's first
//!   output in its CRI log, N pods of each kind, interleaved: runc, kite booting its own VM
//!   ("kite-cold": the pod declines the warm pool), kite adopting a pooled VM ("kite-warm";
//!   each waits for the pool to have a VM ready, and is checked to have adopted it);
//! - host memory per idle pod: PSS of kite's QEMU + virtiofsd + shim (runc: its shim, pause
//!   and the container), with all N pods of each kind up, split into guest RAM (shared memory),
//!   QEMU's and the others' own memory (anonymous: under TCG mostly its translation cache)
//!   and files; and the same for the idle VMs in the warm pool;
//! - host ↔ pod TCP throughput with iperf3, both directions, runc and kite.
//!
//!     cargo run --release -p kite-e2e --example pod_bench -- [N]

use std::process::Command;
use std::time::{Duration, Instant};

use kite_e2e::cri::{status_message, Cri, Pod, RemoveOnDrop, KITE, RUNC};
use kite_e2e::IMAGE;

const IPERF_IMAGE: &str = "127.0.0.1:5000/kite/iperf3:latest";

/// The kinds of pod, in the order each round starts them.
const KITE_COLD: &str = "kite-cold";
const KITE_WARM: &str = "kite-warm";
const KINDS: [&str; 3] = [RUNC, KITE_COLD, KITE_WARM];
const POOL_DIR: &str = "/run/kite/sandboxes/.pool";

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

async fn start_pod(c: &mut Cri, kind: &str, name: &str) -> (Pod, Start) {
    let (handler, annotations): (&str, &[(&str, &str)]) = match kind {
        KITE_COLD => (KITE, &[("io.kite.warm-pool", "false")]),
        KITE_WARM => (KITE, &[]),
        other => (other, &[]),
    };
    let t0 = Instant::now();
    let pod = c
        .run_pod(name, handler, annotations)
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

/// A process's PSS (KiB): all, of shared memory (a VM's guest RAM), anonymous, files.
#[derive(Clone, Copy, Default)]
struct Pss {
    total: u64,
    shmem: u64,
    anon: u64,
    file: u64,
}

impl std::ops::Add for Pss {
    type Output = Pss;
    fn add(self, o: Pss) -> Pss {
        Pss {
            total: self.total + o.total,
            shmem: self.shmem + o.shmem,
            anon: self.anon + o.anon,
            file: self.file + o.file,
        }
    }
}

fn pss_kib(pid: u32) -> Pss {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Pss {
        total: field("Pss:"),
        shmem: field("Pss_Shmem:"),
        anon: field("Pss_Anon:"),
        file: field("Pss_File:"),
    }
}

/// The pids a kite VM's directory records (QEMU, virtiofsd).
fn vm_pids(dir: &std::path::Path) -> Vec<u32> {
    ["qemu.pid", "virtiofsd.pid"]
        .iter()
        .filter_map(|f| {
            std::fs::read_to_string(dir.join(f))
                .ok()?
                .trim()
                .parse()
                .ok()
        })
        .collect()
}

/// Whether the warm pool has a VM ready.
fn pool_has_ready() -> bool {
    std::fs::read_dir(POOL_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            !e.file_name().to_string_lossy().starts_with('.') && e.path().join("pool.json").exists()
        })
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

/// PSS of what a pod costs the host: the pod's shim and every process under it (runc: pause
/// and the container; kite: QEMU and virtiofsd, found by the VM's pid files: an adopted VM's
/// processes are not the shim's children).
fn pod_pss(pod_id: &str) -> Pss {
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
    for pid in vm_pids(&std::path::Path::new(kite_e2e::STATE_DIR).join(pod_id)) {
        if !pids.contains(&pid) {
            pids.push(pid);
        }
    }
    pids.iter()
        .map(|p| pss_kib(*p))
        .fold(Pss::default(), |a, b| a + b)
}

/// PSS of each idle VM in the warm pool.
fn pool_vms_pss() -> Vec<Pss> {
    std::fs::read_dir(POOL_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("pool.json").exists())
        .map(|e| {
            vm_pids(&e.path())
                .iter()
                .map(|p| pss_kib(*p))
                .fold(Pss::default(), |a, b| a + b)
        })
        .collect()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
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

    // The warm pool's idle VMs, before any pod takes one.
    let waited = Instant::now();
    while pool_vms_pss().len() < 2 && waited.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pooled_memory = pool_vms_pss();
    assert!(
        !pooled_memory.is_empty(),
        "the warm pool has no VM ready ([shim.pool] in /etc/kite/kite.toml; hack/pool.sh)"
    );

    let mut starts: Vec<(&str, Start)> = Vec::new();
    let mut pods: Vec<(&str, Pod)> = Vec::new();
    let mut guards = Vec::new();
    for i in 0..n {
        for kind in KINDS {
            if kind == KITE_WARM {
                // Warm means a VM is ready: give the pool its refill (not counted).
                let waited = Instant::now();
                while !pool_has_ready() && waited.elapsed() < Duration::from_secs(60) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            let (pod, s) = start_pod(&mut c, kind, &format!("bench-{kind}-{i}")).await;
            if kind != RUNC {
                let pool = sandbox_record(&pod.id)
                    .and_then(|r| r["pool"].as_str().map(str::to_string))
                    .unwrap_or_default();
                let expected = if kind == KITE_WARM {
                    "hit"
                } else {
                    "miss:declined"
                };
                assert_eq!(pool, expected, "{kind} pod {i}");
            }
            eprintln!(
                "{kind} pod {i}: first output after {:.0} ms",
                s.first_output
            );
            starts.push((kind, s));
            guards.push(RemoveOnDrop(pod.id.clone()));
            pods.push((kind, pod));
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut memory: Vec<(&str, Pss)> = Vec::new();
    for (kind, pod) in &pods {
        memory.push((kind, pod_pss(&pod.id)));
    }
    for (_, pod) in &pods {
        let _ = c.remove_pod(&pod.id).await;
    }

    // The stages of each kite pod's sandbox start, from the shim's structured record.
    let stage = |kind: &str, key: &str| -> Vec<f64> {
        pods.iter()
            .filter(|(h, _)| *h == kind)
            .filter_map(|(_, p)| sandbox_record(&p.id)?[key].as_f64())
            .collect()
    };
    let stages: Vec<(&str, &str, Vec<f64>)> = [KITE_COLD, KITE_WARM]
        .iter()
        .flat_map(|kind| {
            [
                "vm_boot_ms",
                "guest_kernel_ms",
                "network_attach_ms",
                "network_guest_ms",
                "create_ms",
            ]
            .iter()
            .map(|k| (*kind, *k, stage(kind, k)))
            .collect::<Vec<_>>()
        })
        .collect();

    let mut throughput = Vec::new();
    for handler in [RUNC, KITE] {
        let pod = c
            .run_pod(
                &format!("iperf-{handler}"),
                handler,
                &[("io.kite.warm-pool", "false")],
            )
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

    println!("\nkite pod benchmark: {n} pods each, runc, kite cold and kite warm interleaved; accelerator {accel}");
    println!("\npod start through the CRI, ms          median      min      p90      max");
    for handler in KINDS {
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
            println!("  {handler:9} {what:24} {med:8.1} {min:8.1} {p90:8.1} {max:8.1}");
        }
    }
    let med = |h: &str, f: fn(&Start) -> f64| {
        spread(
            &starts
                .iter()
                .filter(|(x, _)| *x == h)
                .map(|(_, s)| f(s))
                .collect::<Vec<_>>(),
        )
        .0
    };
    for kind in [KITE_COLD, KITE_WARM] {
        println!(
            "  {kind}/runc, to first output: {:.2}x",
            med(kind, |s| s.first_output) / med(RUNC, |s| s.first_output)
        );
    }
    println!(
        "  kite-warm/kite-cold, RunPodSandbox: {:.3}",
        med(KITE_WARM, |s| s.run_pod) / med(KITE_COLD, |s| s.run_pod)
    );

    println!(
        "\nkite sandbox start stages (shim record), ms       median      min      p90      max"
    );
    for (kind, key, v) in &stages {
        if v.is_empty() {
            continue;
        }
        let (med, min, p90, max) = spread(v);
        println!("  {kind:9} {key:24} {med:8.1} {min:8.1} {p90:8.1} {max:8.1}");
    }

    println!("\nhost memory per idle pod, PSS MiB (median, min-max)   total         guest RAM     own (anon)    files");
    let row = |what: &str, v: &[Pss]| {
        let col = |f: fn(&Pss) -> u64| {
            let x: Vec<f64> = v.iter().map(|p| mib(f(p))).collect();
            let (med, min, _, max) = spread(&x);
            format!("{med:6.1} ({min:.0}-{max:.0})")
        };
        println!(
            "  {what:48} {} {} {} {}",
            col(|p| p.total),
            col(|p| p.shmem),
            col(|p| p.anon),
            col(|p| p.file)
        );
    };
    for kind in KINDS {
        let v: Vec<Pss> = memory
            .iter()
            .filter(|(h, _)| *h == kind)
            .map(|(_, m)| *m)
            .collect();
        row(kind, &v);
    }
    row(
        "idle VM in the warm pool (QEMU + virtiofsd)",
        &pooled_memory,
    );

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
