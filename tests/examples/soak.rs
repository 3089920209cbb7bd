//! Soak under faults (hack/soak.sh runs it): N cycles of pods through the CRI, each with one
//! fault injected at a random moment, and after every cycle the invariants checked.
//!
//! A cycle runs a kite pod (a container that prints and sleeps; exec; its log read) and a runc
//! pod over an image of its own, pulled lazily (eStargz, converted by `kite-snapshotter
//! convert`, in a registry of the soak's own) whose data files are read back and compared byte
//! for byte; then it deletes both pods and the image. The faults take turns: `kill -9` of the
//! cycle's QEMU, virtiofsd and shim, of kite-snapshotter, kite-lazyfs, kite-agent and kite-pool;
//! containerd restarted; the registry stopped for a while; the filesystem of the chunk cache
//! filled up; the VM frozen (SIGSTOP) past the boot timeout. A daemon killed is started again
//! after a second, as its service manager would (kite-lazyfs by kite-snapshotter itself).
//!
//! After every cycle: nothing of the cycle's pods is left (processes, mounts, state
//! directories, cgroups, network namespaces, host veths, shim sockets, pooled VMs nobody
//! holds); containerd's view (CRI pods) and kite's (state directories, QEMU and shim
//! processes) agree; the sentinel pods (runc and kite through the CRI, one run by kite-agent)
//! still answer; no lazily read byte differed from what was pushed. A cycle whose pod
//! operations failed because of its fault is counted, not a problem; a hang (an operation
//! past its limit), a wrong byte, a leak, or a failure the fault cannot explain is.
//!
//!     cargo run --release -p kite-e2e --example soak -- [CYCLES] [SEED]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kite_e2e::cri::{status_message, Cri, Pod, KITE, RUNC};
use kite_e2e::{RegistryProcess, IMAGE, STATE_DIR};
use kite_snapshotter::registry::ImageRef;
use sha2::{Digest, Sha256};

const REGISTRY: &str = "127.0.0.1:5078";
/// The containers the soak ran under runc, and what runc left of them (see `invariants_once`).
static RUNC_CONTAINERS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
/// Every runc pod of the soak the CRI listed (also those whose RunPodSandbox never answered).
static RUNC_SANDBOXES: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
static UPSTREAM_LEAKS: Mutex<Vec<String>> = Mutex::new(Vec::new());
const TASKS: &str = "/run/containerd/io.containerd.runtime.v2.task/k8s.io";
const SHIM_SOCKETS: &str = "/run/containerd/s";
const CACHE_ROOT: &str = "/var/lib/kite/snapshotter";
/// A frozen VM stays frozen this long: past the shim's boot timeout (30 s in deploy/kite.toml).
const FREEZE: Duration = Duration::from_secs(35);
/// The latest moment of a cycle a fault is injected at (after the cycle started): its pod
/// operations take 2–3 s with a pooled VM under TCG.
const FAULT_WINDOW_MS: u64 = 3000;
/// An operation that takes longer hangs (a problem): above every timeout kite and containerd
/// have (a create waits up to 75 s for the guest; a frozen VM adds 35 s).
const HANG: Duration = Duration::from_secs(200);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillQemu,
    KillVirtiofsd,
    KillShim,
    KillSnapshotter,
    KillLazyfs,
    KillAgent,
    KillPool,
    RestartContainerd,
    StopRegistry,
    CacheFsFull,
    FreezeVm,
}

const FAULTS: [Fault; 11] = [
    Fault::KillQemu,
    Fault::KillVirtiofsd,
    Fault::KillShim,
    Fault::KillSnapshotter,
    Fault::KillLazyfs,
    Fault::KillAgent,
    Fault::KillPool,
    Fault::RestartContainerd,
    Fault::StopRegistry,
    Fault::CacheFsFull,
    Fault::FreezeVm,
];

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::KillQemu => "kill -9 qemu",
            Fault::KillVirtiofsd => "kill -9 virtiofsd",
            Fault::KillShim => "kill -9 shim",
            Fault::KillSnapshotter => "kill -9 kite-snapshotter",
            Fault::KillLazyfs => "kill -9 kite-lazyfs",
            Fault::KillAgent => "kill -9 kite-agent",
            Fault::KillPool => "kill -9 kite-pool",
            Fault::RestartContainerd => "containerd restarted",
            Fault::StopRegistry => "registry stopped",
            Fault::CacheFsFull => "cache filesystem full",
            Fault::FreezeVm => "VM frozen past boot timeout",
        }
    }

    /// Whether the cycle's pod operations may fail because of it. The agent and the pool are
    /// not on the CRI's path: a pod starts without them (without the pool it boots its VM).
    fn may_fail_operations(self) -> bool {
        !matches!(self, Fault::KillAgent | Fault::KillPool)
    }
}

/// xorshift64*: the soak's choices (fault moments) replay from the seed printed at its start.
/// (A dependency for a dozen random numbers a run is not worth it.)
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What one cycle's pod operations came to.
#[derive(Default)]
struct Outcome {
    /// The first operation that failed, and how.
    failed: Option<String>,
    /// Operations past [`HANG`], wrong bytes, wrong output: always problems.
    problems: Vec<String>,
}

#[derive(Default)]
struct Counts {
    cycles: u32,
    applied: u32,
    operations_failed: u32,
    problems: u32,
}

/// A CRI connection, waiting for containerd (it may be restarting) up to a minute.
async fn cri() -> Result<Cri, String> {
    let start = Instant::now();
    loop {
        match kite_cri::CriClient::connect(Path::new(kite_cri::CONTAINERD_SOCKET)).await {
            Ok(client) => return Ok(Cri { client }),
            Err(e) if start.elapsed() > Duration::from_secs(60) => {
                return Err(format!("connect to containerd's CRI: {e}"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Runs `op`; its error says `what` failed; past [`HANG`] it is a hang (a problem).
async fn step<T, E: std::fmt::Display>(
    out: &mut Outcome,
    what: &str,
    op: impl Future<Output = Result<T, E>>,
) -> Option<T> {
    match tokio::time::timeout(HANG, op).await {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            out.failed.get_or_insert_with(|| format!("{what}: {e}"));
            None
        }
        Err(_) => {
            out.problems
                .push(format!("{what}: no answer in {} s (hang)", HANG.as_secs()));
            out.failed.get_or_insert_with(|| format!("{what}: hang"));
            None
        }
    }
}

fn cri_err(e: kite_cri::CriError) -> String {
    status_message(&e)
}

/// One cycle's data files: (path in the image, content), different every cycle.
fn cycle_files(cycle: u64) -> Vec<(String, Vec<u8>)> {
    (0..3u64)
        .map(|n| {
            // 1.5 MiB, 256 KiB, 40 KiB: several chunks, one, part of one.
            let len = [3 << 19, 1 << 18, 40 << 10][n as usize];
            let mut data = vec![0u8; len];
            kite_e2e::bench::random_fill(&mut data, cycle * 16 + n + 1);
            (format!("app/data/file-{n}"), data)
        })
        .collect()
}

/// `sha256sum` lines for `files` as busybox prints them (paths from /).
fn expected_sums(files: &[(String, Vec<u8>)]) -> String {
    files
        .iter()
        .map(|(p, d)| format!("{:x}  /{p}\n", Sha256::digest(d)))
        .collect()
}

/// Pushes the cycle's image to the soak's registry and converts it to eStargz (the lazy ref).
async fn push_lazy_image(tag: &str, files: &[(String, Vec<u8>)]) -> Result<String, String> {
    let client = kite_e2e::bench::registry_client();
    let src = format!("{REGISTRY}/soak/src:{tag}");
    kite_e2e::bench::push_image_with_files(&client, &ImageRef::parse(&src).unwrap(), files).await;
    let dst = format!("{REGISTRY}/soak/lazy:{tag}");
    let out = tokio::process::Command::new("/usr/local/bin/kite-snapshotter")
        .args(["convert", &src, &dst])
        .output()
        .await
        .map_err(|e| format!("run kite-snapshotter convert: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "convert {src}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(dst)
}

/// The cycle's pod operations. The pods it ran are pushed to `pods` as soon as they exist.
async fn workload(
    cycle: u64,
    lazy_ref: String,
    files: Vec<(String, Vec<u8>)>,
    kept: (String, Vec<(String, Vec<u8>)>),
    pods: Arc<Mutex<Vec<String>>>,
) -> Outcome {
    let mut out = Outcome::default();
    let Some(mut c) = step(&mut out, "connect", cri()).await else {
        return out;
    };
    // A kite pod: run, a container printing and sleeping, exec, its log.
    let name = format!("soak-c{cycle}-kite");
    let kite = step(&mut out, "run the kite pod", async {
        c.run_pod(&name, KITE, &[]).await.map_err(cri_err)
    })
    .await;
    let mut serving = None;
    if let Some(pod) = &kite {
        pods.lock().unwrap().push(pod.id.clone());
        serving = kite_container(&mut out, &mut c, pod, cycle).await;
    }
    // A runc pod over the cycle's lazily pulled image: every data file read back.
    if out.failed.is_some() {
        return out;
    }
    let name = format!("soak-c{cycle}-runc");
    let Some(pod) = step(&mut out, "run the runc pod", async {
        c.run_pod(&name, RUNC, &[]).await.map_err(cri_err)
    })
    .await
    else {
        return out;
    };
    pods.lock().unwrap().push(pod.id.clone());
    if step(&mut out, "pull the lazy image", async {
        c.pull(&lazy_ref).await.map_err(cri_err)
    })
    .await
    .is_none()
    {
        return out;
    }
    lazy_container(&mut out, &mut c, &pod, "lazy", &lazy_ref, &files).await;
    // The image kept pulled through the whole soak: its layers must still serve new
    // containers after every fault (kite-lazyfs killed included).
    if out.failed.is_none() {
        let (kept_ref, kept_files) = kept;
        lazy_container(&mut out, &mut c, &pod, "kept", &kept_ref, &kept_files).await;
    }
    // The kite pod lived through all of it: it still serves.
    if let (Some(id), None) = (serving, &out.failed) {
        exec_echo(&mut out, &mut c, &id, &format!("again-{cycle}")).await;
    }
    out
}

/// `echo WORD` in container `id`: it must print WORD.
async fn exec_echo(out: &mut Outcome, c: &mut Cri, id: &str, word: &str) {
    if let Some((code, stdout, _)) = step(out, "exec in the kite container", async {
        c.exec_sync(id, &["echo", word], Duration::from_secs(60))
            .await
            .map_err(cri_err)
    })
    .await
    {
        if code == 0 && stdout != format!("{word}\n") {
            out.problems
                .push(format!("exec printed {stdout:?}, not {word:?}"));
        } else if code != 0 {
            out.failed
                .get_or_insert_with(|| format!("exec in the kite container: exit {code}"));
        }
    }
}

/// A container `name` of `image` (lazily pulled) in `pod`, whose data files `files` must read
/// back exactly (or fail to read, not read wrong).
async fn lazy_container(
    out: &mut Outcome,
    c: &mut Cri,
    pod: &Pod,
    name: &str,
    image: &str,
    files: &[(String, Vec<u8>)],
) {
    let Some(id) = step(out, &format!("create the {name} container"), async {
        c.create_container(pod, name, 0, image, &["sleep", "100000"])
            .await
            .map_err(cri_err)
    })
    .await
    else {
        return;
    };
    RUNC_CONTAINERS.lock().unwrap().insert(id.clone());
    if step(out, &format!("start the {name} container"), async {
        c.start(&id).await.map_err(cri_err)
    })
    .await
    .is_none()
    {
        return;
    }
    let mut cmd = vec!["sha256sum"];
    let paths: Vec<String> = files.iter().map(|(p, _)| format!("/{p}")).collect();
    cmd.extend(paths.iter().map(String::as_str));
    let Some((code, stdout, stderr)) = step(out, &format!("read the {name} files"), async {
        c.exec_sync(&id, &cmd, Duration::from_secs(120))
            .await
            .map_err(cri_err)
    })
    .await
    else {
        return;
    };
    let want = expected_sums(files);
    if code == 0 && stdout != want {
        out.problems.push(format!(
            "wrong bytes from the lazy layer of {image}:\n{stdout}expected:\n{want}"
        ));
    } else if code != 0 {
        // A read that failed (EIO while the registry is away) is not a wrong byte; a sum that
        // was printed must still be right.
        for line in stdout.lines() {
            if !want.lines().any(|w| w == line) {
                out.problems.push(format!(
                    "wrong bytes from the lazy layer of {image}: {line}"
                ));
            }
        }
        out.failed.get_or_insert_with(|| {
            format!("read the {name} files: exit {code}: {}", stderr.trim())
        });
    }
}

/// A container in the kite pod that prints and sleeps, its log read and an exec: its id if all
/// went well.
async fn kite_container(out: &mut Outcome, c: &mut Cri, pod: &Pod, cycle: u64) -> Option<String> {
    let id = step(out, "create the kite container", async {
        c.create_container(
            pod,
            "app",
            0,
            IMAGE,
            &["sh", "-c", "echo ready; exec sleep 100000"],
        )
        .await
        .map_err(cri_err)
    })
    .await?;
    step(out, "start the kite container", async {
        c.start(&id).await.map_err(cri_err)
    })
    .await?;
    let log = pod.log_dir().join("app/0.log");
    step(out, "read the kite container's log", async {
        let start = Instant::now();
        loop {
            if std::fs::read_to_string(&log).is_ok_and(|l| l.contains(" stdout F ready")) {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(120) {
                return Err(format!("no output in {}", log.display()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await?;
    exec_echo(out, c, &id, &format!("exec-{cycle}")).await;
    out.failed.is_none().then_some(id)
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).is_ok()
}

/// The sandbox directories of kite pods (not the pool's).
fn sandbox_dirs() -> BTreeSet<String> {
    std::fs::read_dir(STATE_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect()
}

/// A pid from a sandbox's `vm.json` (a VM it booted or adopted from the pool).
fn vm_pid(dir: &str, key: &str) -> Option<i32> {
    let text = std::fs::read_to_string(Path::new(STATE_DIR).join(dir).join("vm.json")).ok()?;
    let state: serde_json::Value = serde_json::from_str(&text).ok()?;
    state.get(key)?.as_i64().and_then(|p| i32::try_from(p).ok())
}

/// The pid of the process of the cycle's kite pod that `fault` goes after, once it exists.
fn pod_target(fault: Fault, known: &BTreeSet<String>) -> Option<i32> {
    let dir = sandbox_dirs().into_iter().find(|d| !known.contains(d))?;
    match fault {
        Fault::KillQemu | Fault::FreezeVm => vm_pid(&dir, "qemu_pid"),
        Fault::KillVirtiofsd => vm_pid(&dir, "virtiofsd_pid"),
        Fault::KillShim => kite_e2e::shim_pid(&dir),
        _ => None,
    }
}

fn comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim().to_string())
}

fn pids_named(comm_prefix: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|p| comm(*p).is_some_and(|c| c.starts_with(comm_prefix)))
        .collect()
}

fn hack(script: &str, action: &str) -> Result<(), String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../hack/").to_string() + script;
    let out = Command::new(&path)
        .arg(action)
        .output()
        .map_err(|e| format!("{path} {action}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{path} {action}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Kills the daemon whose process name starts with `comm`; its service manager starts it
/// again a second later (`script start`), if it has one.
async fn kill_daemon(comm_prefix: &str, restart: Option<&str>) -> Result<bool, String> {
    let pids = pids_named(comm_prefix);
    for p in &pids {
        signal(*p, nix::sys::signal::Signal::SIGKILL);
    }
    if let Some(script) = restart {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let script = script.to_string();
        tokio::task::spawn_blocking(move || hack(&script, "start"))
            .await
            .unwrap()?;
    }
    Ok(!pids.is_empty())
}

/// Fills the filesystem of the chunk cache (the root of this machine, as on most nodes) to
/// its last block root may write (blocks reserved for another user stay reserved), for `hold`,
/// then frees it.
async fn fill_cache_fs(hold: Duration) -> Result<(), String> {
    let st =
        nix::sys::statvfs::statvfs(CACHE_ROOT).map_err(|e| format!("statvfs {CACHE_ROOT}: {e}"))?;
    let mut size = st.blocks_available() as u64 * st.fragment_size() as u64;
    let mut fillers = Vec::new();
    // Files as large as fit, halving the size at each refusal, down to a block.
    while size >= 4096 {
        let filler = Path::new(CACHE_ROOT).join(format!("soak-filler-{}", fillers.len()));
        let st = Command::new("fallocate")
            .args(["-l", &size.to_string()])
            .arg(&filler)
            .stderr(std::process::Stdio::null())
            .status()
            .map_err(|e| format!("fallocate: {e}"))?;
        if st.success() {
            fillers.push(filler);
        } else {
            let _ = std::fs::remove_file(&filler);
            size /= 2;
        }
    }
    tokio::time::sleep(hold).await;
    for f in &fillers {
        let _ = std::fs::remove_file(f);
    }
    if fillers.is_empty() {
        return Err(format!("could not fill the filesystem of {CACHE_ROOT}"));
    }
    Ok(())
}

/// Injects `fault` after `delay`; Ok(true) when it hit something. The pod faults wait for the
/// cycle's kite pod's process (until `done`).
async fn inject(
    fault: Fault,
    delay: Duration,
    known: BTreeSet<String>,
    registry: Arc<Mutex<RegistryProcess>>,
    done: Arc<std::sync::atomic::AtomicBool>,
    rng_hold: Duration,
) -> Result<bool, String> {
    use nix::sys::signal::Signal;
    tokio::time::sleep(delay).await;
    match fault {
        Fault::KillQemu | Fault::KillVirtiofsd | Fault::KillShim | Fault::FreezeVm => {
            let pid = loop {
                if let Some(pid) = pod_target(fault, &known) {
                    break pid;
                }
                if done.load(std::sync::atomic::Ordering::SeqCst) {
                    return Ok(false);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            if fault == Fault::FreezeVm {
                if !signal(pid, Signal::SIGSTOP) {
                    return Ok(false);
                }
                tokio::time::sleep(FREEZE).await;
                signal(pid, Signal::SIGCONT);
                Ok(true)
            } else {
                Ok(signal(pid, Signal::SIGKILL))
            }
        }
        Fault::KillSnapshotter => kill_daemon("kite-snapshotte", Some("snapshotter.sh")).await,
        // kite-snapshotter starts it again when it next needs it.
        Fault::KillLazyfs => kill_daemon("kite-lazyfs", None).await,
        Fault::KillAgent => kill_daemon("kite-agent", Some("agent.sh")).await,
        Fault::KillPool => kill_daemon("kite-pool", Some("pool.sh")).await,
        Fault::RestartContainerd => {
            tokio::task::spawn_blocking(|| hack("containerd.sh", "restart"))
                .await
                .unwrap()
                .map(|()| true)
        }
        Fault::StopRegistry => {
            registry.lock().unwrap().down();
            tokio::time::sleep(rng_hold).await;
            tokio::task::spawn_blocking(move || registry.lock().unwrap().up())
                .await
                .unwrap();
            Ok(true)
        }
        Fault::CacheFsFull => fill_cache_fs(rng_hold).await.map(|()| true),
    }
}

/// Removes the pods the cycle made (and any other `soak-c…` pod the CRI holds: a run that
/// timed out on our side may have finished in containerd) and the cycle's images.
async fn clean_up(pods: &[String], images: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut first_error: Option<String> = None;
    let start = Instant::now();
    loop {
        let attempt = async {
            let mut c = cri().await?;
            let mut ids: BTreeSet<String> = pods.iter().cloned().collect();
            for s in c.client.list_pod_sandboxes(&[]).await.map_err(cri_err)? {
                if s.metadata
                    .as_ref()
                    .is_some_and(|m| m.name.starts_with("soak-c"))
                {
                    if s.runtime_handler != KITE {
                        RUNC_SANDBOXES.lock().unwrap().insert(s.id.clone());
                    }
                    ids.insert(s.id);
                }
            }
            // Each pod on its own: one that does not go must not keep the others.
            let removals = ids.iter().map(|id| async move {
                let mut c = cri().await?;
                match c.remove_pod(id).await {
                    // Removed by an earlier attempt.
                    Err(e) if e.code() == Some(tonic::Code::NotFound) => Ok(()),
                    r => r.map_err(|e| format!("remove pod {id}: {}", cri_err(e))),
                }
            });
            for r in futures::future::join_all(removals).await {
                r?;
            }
            for i in images {
                match c.remove_image(i).await {
                    Ok(()) => {}
                    Err(e) if e.code() == Some(tonic::Code::NotFound) => {}
                    Err(e) => return Err(format!("remove image {i}: {}", cri_err(e))),
                }
            }
            Ok::<(), String>(())
        };
        match tokio::time::timeout(HANG, attempt).await {
            Ok(Ok(())) => return problems,
            Ok(Err(e)) if start.elapsed() < Duration::from_secs(120) => {
                first_error.get_or_insert(e);
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Ok(Err(e)) => {
                problems.push(format!(
                    "clean-up does not succeed after 120 s: {e} (first: {})",
                    first_error.unwrap_or_default()
                ));
                return problems;
            }
            Err(_) => {
                problems.push("clean-up: no answer (hang)".into());
                return problems;
            }
        }
    }
}

/// The sentinel pods, which no fault aims at: each must keep answering.
struct Sentinels {
    kite: String,
    runc: String,
    agent_pod: &'static str,
}

const AGENT_POD: &str = "soak-sentinel-agent";
const KITECTL: &str = "/usr/local/bin/kitectl";

async fn sentinel(c: &mut Cri, handler: &str) -> (Pod, String) {
    let pod = c
        .run_pod(&format!("soak-sentinel-{handler}"), handler, &[])
        .await
        .unwrap_or_else(|e| panic!("run the {handler} sentinel: {}", status_message(&e)));
    let id = c
        .run_container(
            &pod,
            "app",
            0,
            IMAGE,
            &["sh", "-c", "echo alive > /tmp/alive; exec sleep 100000"],
        )
        .await;
    c.wait_running(&id, Duration::from_secs(120)).await;
    (pod, id)
}

fn kitectl(args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    use std::io::Write;
    let mut child = Command::new(KITECTL)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("run kitectl: {e}"))?;
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "kitectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Sentinels {
    /// Problems if a sentinel does not answer (retrying for `limit`: a daemon may be coming
    /// back).
    async fn check(&self, limit: Duration) -> Vec<String> {
        let start = Instant::now();
        loop {
            let problems = self.check_once().await;
            if problems.is_empty() || start.elapsed() > limit {
                return problems;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn check_once(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match cri().await {
            Ok(mut c) => {
                for (what, id) in [("kite", &self.kite), ("runc", &self.runc)] {
                    match tokio::time::timeout(
                        Duration::from_secs(60),
                        c.exec_sync(id, &["cat", "/tmp/alive"], Duration::from_secs(30)),
                    )
                    .await
                    {
                        Ok(Ok((0, out, _))) if out == "alive\n" => {}
                        Ok(Ok((code, out, err))) => problems.push(format!(
                            "the {what} sentinel answered exit {code}, {out:?} {err:?}"
                        )),
                        Ok(Err(e)) => {
                            problems.push(format!("the {what} sentinel: {}", status_message(&e)))
                        }
                        Err(_) => problems.push(format!("the {what} sentinel: no answer")),
                    }
                }
            }
            Err(e) => problems.push(e),
        }
        let agent = tokio::task::spawn_blocking(|| {
            kitectl(&["exec", AGENT_POD, "--", "cat", "/www/index.html"], None)
        })
        .await
        .unwrap();
        match agent {
            Ok(out) if out.trim() == "v1" => {}
            Ok(out) => problems.push(format!("the agent's sentinel pod served {out:?}")),
            Err(e) => problems.push(format!("the agent's sentinel pod: {e}")),
        }
        let _ = self.agent_pod;
        problems
    }
}

/// Everything that must hold between cycles (nothing of the cycle's pods left; containerd's
/// and kite's views agree), given the pods that should exist. Retried for a while: processes
/// take a moment to go.
async fn invariants(cycle_pods: &[String], limit: Duration) -> Vec<String> {
    let start = Instant::now();
    loop {
        let problems = invariants_once(cycle_pods).await;
        if problems.is_empty() || start.elapsed() > limit {
            return problems;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn invariants_once(cycle_pods: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut c = match cri().await {
        Ok(c) => c,
        Err(e) => return vec![e],
    };
    let sandboxes = match c.client.list_pod_sandboxes(&[]).await {
        Ok(s) => s,
        Err(e) => return vec![format!("list pods: {}", cri_err(e))],
    };
    let live: BTreeSet<String> = sandboxes.iter().map(|s| s.id.clone()).collect();
    let kite_pods: BTreeSet<String> = sandboxes
        .iter()
        .filter(|s| s.runtime_handler == KITE)
        .map(|s| s.id.clone())
        .collect();
    let mut containers = BTreeSet::new();
    let listed = match c.client.list_containers("").await {
        Ok(list) => {
            containers.extend(list.into_iter().map(|c| c.id));
            true
        }
        Err(e) => {
            problems.push(format!("list containers: {}", cri_err(e)));
            false
        }
    };
    // The cycle's pods: gone, with everything they had.
    for id in cycle_pods {
        if live.contains(id) {
            problems.push(format!("pod {id} is still listed by the CRI"));
        }
        problems.extend(kite_e2e::leftovers(id));
        for p in kite_e2e::processes_mentioning(id) {
            problems.push(format!("process of removed pod {id}: {p}"));
        }
    }
    // kite's view: a state directory, a shim and a QEMU per kite pod the CRI lists.
    let dirs = sandbox_dirs();
    if dirs != kite_pods {
        problems.push(format!(
            "kite's sandbox directories {dirs:?} differ from the CRI's kite pods {kite_pods:?}"
        ));
    }
    let pool_vms: usize = std::fs::read_dir(STATE_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".pool"))
        .map(|e| {
            std::fs::read_dir(e.path())
                .into_iter()
                .flatten()
                .flatten()
                .filter(|v| v.path().is_dir())
                .count()
        })
        .sum();
    let qemus = pids_named("qemu-system").len();
    if qemus != kite_pods.len() + pool_vms {
        problems.push(format!(
            "{qemus} QEMU processes for {} kite pods and {pool_vms} pooled VMs",
            kite_pods.len()
        ));
    }
    problems.extend(kite_e2e::orphaned_pool_vms());
    let shims = kite_e2e::processes_mentioning("containerd-shim-kite-v2")
        .into_iter()
        .filter(|p| p.contains(" -id "))
        .count();
    if shims != kite_pods.len() {
        problems.push(format!(
            "{shims} kite shims for {} kite pods",
            kite_pods.len()
        ));
    }
    // containerd's tasks: a bundle per pod and container it lists.
    for e in std::fs::read_dir(TASKS).into_iter().flatten().flatten() {
        let id = e.file_name().to_string_lossy().into_owned();
        if live.contains(&id) || containers.contains(&id) {
            continue;
        }
        // Only what containerd itself has no record of (the CRI's lists are a moment old).
        if listed && containerd_lost(&id).await && reap_runc_orphan(&id) {
            continue;
        }
        if let Some(deleted) = id.strip_prefix('.') {
            if listed && containerd_lost(deleted).await && reap_half_deleted_runc_bundle(&id) {
                continue;
            }
        }
        problems.push(format!("task bundle {TASKS}/{id} of no pod or container"));
    }
    // Mounts: none of a task, a sandbox or a snapshot of what is gone; lazy mounts alive.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for l in mounts.lines() {
        let point = l.split(' ').nth(4).unwrap_or("");
        if let Some(rest) = point.strip_prefix(&format!("{TASKS}/")) {
            let id = rest.split('/').next().unwrap_or("");
            if !live.contains(id) && !containers.contains(id) {
                problems.push(format!("mount {point} of no pod or container"));
            }
        }
        if let Some(rest) = point.strip_prefix(&format!("{STATE_DIR}/")) {
            let id = rest.split('/').next().unwrap_or("");
            if !id.starts_with('.') && !live.contains(id) {
                problems.push(format!("mount {point} of no pod"));
            }
        }
        // statfs always reaches the FUSE server (stat may be answered from a cache).
        if l.contains(" - fuse.kite ") && nix::sys::statfs::statfs(point).is_err() {
            problems.push(format!("dead lazy mount {point}"));
        }
    }
    // Networks: a namespace and a host veth per pod.
    for (dir, prefix, what) in [
        ("/var/run/netns", "cni-", "CNI network namespaces"),
        ("/sys/class/net", "veth", "host veths"),
    ] {
        let n = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .count();
        if n != live.len() {
            problems.push(format!("{n} {what} for {} pods", live.len()));
        }
    }
    // Shim sockets: each one listened on.
    let unix = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    for e in std::fs::read_dir(SHIM_SOCKETS)
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = e.path().display().to_string();
        if !unix.lines().any(|l| l.ends_with(&path)) {
            if listed && reap_runc_shim_socket(&path, &live, &containers) {
                continue;
            }
            problems.push(format!("shim socket {path} nobody listens on"));
        }
    }
    // Cgroups: containerd's CRI ones belong to live pods and containers.
    for root in ["/sys/fs/cgroup/k8s.io", "/sys/fs/cgroup/unified/k8s.io"] {
        for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() && !live.contains(&id) && !containers.contains(&id) {
                let runc = RUNC_CONTAINERS.lock().unwrap().contains(&id);
                if runc && std::fs::remove_dir(e.path()).is_ok() {
                    // runc's, not kite's: a runc container being started when containerd
                    // restarts keeps its cgroup in the hybrid host's unified hierarchy after
                    // containerd cleans the dead shim up. Counted and removed.
                    UPSTREAM_LEAKS.lock().unwrap().push(format!("{root}/{id}"));
                } else {
                    problems.push(format!("cgroup {root}/{id} of no pod or container"));
                }
            }
        }
    }
    problems
}

/// Whether containerd clearly has no record of container `id` (k8s.io).
async fn containerd_lost(id: &str) -> bool {
    use kite_protocol::containerd::ContainerRecords;
    match ContainerRecords::connect("/run/containerd/containerd.sock", "k8s.io").await {
        Ok(mut records) => matches!(records.exists(id).await, Ok(false)),
        Err(_) => false,
    }
}

/// containerd#12344 with runc's shim: a containerd restart during a runc pod's RunPodSandbox
/// leaves the sandbox's task (runc's shim, the bundle) running after the CRI removed the
/// sandbox. Not kite's doing, and not one kite can end (kite's own shim ends such a task
/// itself; runc's never does): the soak ends it as an operator would (its shim and processes
/// killed, its rootfs unmounted, its bundle, work directory and socket removed; its cgroups go
/// with the runc containers' below) and counts it. Whether `id`'s bundle was such a task.
fn reap_runc_orphan(id: &str) -> bool {
    use nix::sys::signal::{kill, Signal::SIGKILL};
    use nix::unistd::Pid;
    let bundle = Path::new(TASKS).join(id);
    let (runs_runc, how) = match std::fs::read_to_string(bundle.join("shim-binary-path")) {
        Ok(p) => (
            p.trim_end().ends_with("containerd-shim-runc-v2"),
            "containerd#12344",
        ),
        // containerd stopped after runc's shim started and before it wrote which shim it ran
        // (it does so once connected); 1.6 neither loads nor ends such a shim at its restart
        // (containerd#6860, fixed in 1.7). The soak's cycle 150 of 1,000. The pod's name says
        // it is runc's (only the soak's runc pods are named so), and no kite shim serves it.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
            soak_runc_pod(&bundle).is_some()
                && kite_e2e::processes_mentioning("containerd-shim-kite-v2")
                    .iter()
                    .all(|p| !p.contains(id)),
            "containerd#6860: its shim started, not yet recorded",
        ),
        Err(_) => (false, ""),
    };
    if !runs_runc {
        return false;
    }
    let shims = kite_e2e::shim_pid(id).into_iter();
    let in_cgroups = [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup/pids",
    ]
    .iter()
    .flat_map(|root| {
        std::fs::read_to_string(format!("{root}/k8s.io/{id}/cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
            .collect::<Vec<_>>()
    });
    for pid in shims.chain(in_cgroups) {
        let _ = kill(Pid::from_raw(pid), SIGKILL);
    }
    let rootfs = bundle.join("rootfs");
    let _ = nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if mounts.contains(&format!(" {} ", bundle.display()))
        || mounts.contains(&format!(" {} ", rootfs.display()))
    {
        return false;
    }
    let work = Path::new("/var/lib/containerd/io.containerd.runtime.v2.task/k8s.io").join(id);
    let _ = std::fs::remove_dir_all(work);
    if std::fs::remove_dir_all(&bundle).is_err() {
        return false;
    }
    std::thread::sleep(Duration::from_millis(200));
    let _ = std::fs::remove_file(shim_socket(id));
    RUNC_CONTAINERS.lock().unwrap().insert(id.to_string());
    UPSTREAM_LEAKS
        .lock()
        .unwrap()
        .push(format!("runc task {id} ({how})"));
    true
}

/// The soak's runc pod a task bundle belongs to, by its spec's sandbox-name annotation.
fn soak_runc_pod(bundle: &Path) -> Option<String> {
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).ok()?).ok()?;
    let pod = spec["annotations"]["io.kubernetes.cri.sandbox-name"].as_str()?;
    (pod.starts_with("soak-") && pod.ends_with("-runc")).then(|| pod.to_string())
}

/// The socket a shim started for task `id` listens on (containerd's naming, any runtime).
fn shim_socket(id: &str) -> String {
    containerd_shim::socket_address("/run/containerd/containerd.sock", "k8s.io", id)
        .trim_start_matches("unix://")
        .to_string()
}

/// containerd stopped while it started a runc pod's shim (`containerd-shim-runc-v2 start` made
/// the socket; nothing connected, so the shim went): runc's shim leaves its socket, which
/// nobody removes. Not kite's (kite's shim removes its socket in `delete`): removed and counted
/// when it is the socket of a runc pod or container of the soak that is gone. Whether `path`
/// was such a socket.
fn reap_runc_shim_socket(
    path: &str,
    live: &BTreeSet<String>,
    containers: &BTreeSet<String>,
) -> bool {
    let runc: Vec<String> = RUNC_SANDBOXES
        .lock()
        .unwrap()
        .iter()
        .chain(RUNC_CONTAINERS.lock().unwrap().iter())
        .cloned()
        .collect();
    let owner = runc.into_iter().find(|id| shim_socket(id) == path);
    let Some(id) = owner.filter(|id| !live.contains(id) && !containers.contains(id)) else {
        return false;
    };
    if std::fs::remove_file(path).is_err() {
        return false;
    }
    UPSTREAM_LEAKS.lock().unwrap().push(format!(
        "socket of runc's shim for {id} (containerd stopped while starting it)"
    ));
    true
}

/// containerd (1.6) deletes a task bundle by renaming it to `.<id>` and then removing that; a
/// containerd stopped in between (the containerd-restart fault) leaves the hidden directory for
/// good, since its next start skips hidden directories. Not kite's doing: removed and counted
/// as containerd's when it was a container of one of the soak's runc pods (its spec names the
/// pod) and nothing is mounted in it; any other is a problem. Whether `name` was such a bundle.
fn reap_half_deleted_runc_bundle(name: &str) -> bool {
    let bundle = Path::new(TASKS).join(name);
    let Some(pod) = soak_runc_pod(&bundle) else {
        return false;
    };
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = format!(" {}", bundle.display());
    if mounts.lines().any(|l| l.contains(&prefix)) || std::fs::remove_dir_all(&bundle).is_err() {
        return false;
    }
    UPSTREAM_LEAKS.lock().unwrap().push(format!(
        "half-deleted bundle {name} of a container of {pod} (containerd stopped while deleting it)"
    ));
    true
}

#[tokio::main]
async fn main() {
    let arg = |i: usize| std::env::args().nth(i).and_then(|a| a.parse::<u64>().ok());
    let cycles = arg(1).unwrap_or(22);
    let seed = arg(2).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let mut rng = Rng(seed | 1);
    println!("soak: {cycles} cycles, seed {seed} (replay: hack/soak.sh {cycles} {seed})");

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {REGISTRY}\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let registry = Arc::new(Mutex::new(RegistryProcess::start(&config, REGISTRY)));

    let mut c = Cri::connect().await;
    c.pull(IMAGE)
        .await
        .unwrap_or_else(|e| panic!("pull {IMAGE}: {}", status_message(&e)));
    c.pull(kite_e2e::agent::WEB_V1)
        .await
        .unwrap_or_else(|e| panic!("pull {}: {}", kite_e2e::agent::WEB_V1, status_message(&e)));
    // Leftovers of an interrupted run go first (a disk filled by its last fault too).
    for e in std::fs::read_dir(CACHE_ROOT)
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with("soak-filler-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let _ = kitectl(&["delete", "pod", AGENT_POD], None);
    for s in c.client.list_pod_sandboxes(&[]).await.unwrap() {
        if s.metadata
            .as_ref()
            .is_some_and(|m| m.name.starts_with("soak-"))
        {
            let _ = c.remove_pod(&s.id).await;
        }
    }
    // An image kept pulled (not running) through the soak: lazy layers that must outlive
    // every fault.
    let kept_files = cycle_files(u64::MAX / 32);
    let kept_ref = push_lazy_image("kept", &kept_files)
        .await
        .unwrap_or_else(|e| panic!("prepare the kept lazy image: {e}"));
    let _ = c.remove_image(&kept_ref).await;
    c.pull(&kept_ref)
        .await
        .unwrap_or_else(|e| panic!("pull {kept_ref}: {}", status_message(&e)));
    let (kite_pod, kite_id) = sentinel(&mut c, KITE).await;
    let (runc_pod, runc_id) = sentinel(&mut c, RUNC).await;
    let manifest = kite_e2e::agent::web_manifest(AGENT_POD, "runc", kite_e2e::agent::WEB_V1);
    kitectl(&["run", "-f", "-"], Some(&manifest)).expect("run the agent's sentinel pod");
    let sentinels = Sentinels {
        kite: kite_id,
        runc: runc_id,
        agent_pod: AGENT_POD,
    };
    let problems = sentinels.check(Duration::from_secs(60)).await;
    assert!(
        problems.is_empty(),
        "sentinels before the soak: {problems:?}"
    );
    let problems = invariants(&[], Duration::from_secs(30)).await;
    assert!(
        problems.is_empty(),
        "invariants before the soak: {problems:?}"
    );

    let mut counts: BTreeMap<Fault, Counts> = BTreeMap::new();
    let mut all_problems: Vec<String> = Vec::new();
    let mut durations = Vec::new();
    let t0 = Instant::now();
    for cycle in 0..cycles {
        let fault = FAULTS[(cycle % FAULTS.len() as u64) as usize];
        let delay = Duration::from_millis(rng.below(FAULT_WINDOW_MS));
        let hold = Duration::from_millis(1000 + rng.below(6000));
        let t = Instant::now();
        let files = cycle_files(cycle);
        let lazy_ref = match push_lazy_image(&format!("c{cycle}"), &files).await {
            Ok(r) => r,
            Err(e) => panic!("cycle {cycle}: prepare the lazy image: {e}"),
        };
        let known = sandbox_dirs();
        let pods = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let injector = tokio::spawn(inject(
            fault,
            delay,
            known,
            registry.clone(),
            done.clone(),
            hold,
        ));
        let outcome = workload(
            cycle,
            lazy_ref.clone(),
            files,
            (kept_ref.clone(), kept_files.clone()),
            pods.clone(),
        )
        .await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let applied = match injector.await.unwrap() {
            Ok(hit) => hit,
            Err(e) => {
                all_problems.push(format!("cycle {cycle} ({}): inject: {e}", fault.name()));
                false
            }
        };
        // Recovery as an operator's tooling would see it: the snapshotter reachable again.
        if matches!(fault, Fault::KillSnapshotter | Fault::RestartContainerd) {
            let _ = tokio::task::spawn_blocking(|| hack("snapshotter.sh", "wait-containerd")).await;
        }
        let cycle_pods = pods.lock().unwrap().clone();
        let src_ref = format!("{REGISTRY}/soak/src:c{cycle}");
        let mut problems = outcome.problems;
        problems.extend(clean_up(&cycle_pods, &[lazy_ref, src_ref]).await);
        // 60 s: a task containerd lost (containerd#12344) is ended by its shim within ~40 s.
        problems.extend(invariants(&cycle_pods, Duration::from_secs(60)).await);
        problems.extend(sentinels.check(Duration::from_secs(60)).await);
        if let Some(f) = &outcome.failed {
            if !fault.may_fail_operations() || !applied {
                problems.push(format!("operations failed, not because of the fault: {f}"));
            }
        }
        let e = counts.entry(fault).or_default();
        e.cycles += 1;
        e.applied += u32::from(applied);
        e.operations_failed += u32::from(outcome.failed.is_some());
        e.problems += problems.len() as u32;
        let took = t.elapsed();
        durations.push(took.as_secs_f64());
        println!(
            "cycle {cycle:4} {:30} at {:>5} ms{} {:>5.1} s  {}",
            fault.name(),
            delay.as_millis(),
            if applied { " " } else { "*" },
            took.as_secs_f64(),
            match (&outcome.failed, problems.is_empty()) {
                (_, false) => format!("PROBLEMS: {}", problems.join(" | ")),
                (Some(f), true) => format!("failed cleanly: {f}"),
                (None, true) => "ok".into(),
            }
        );
        all_problems.extend(
            problems
                .into_iter()
                .map(|p| format!("cycle {cycle} ({}): {p}", fault.name())),
        );
    }

    // The sentinels go last, and must leave nothing either.
    let mut c = Cri::connect().await;
    for id in [&kite_pod.id, &runc_pod.id] {
        c.remove_pod(id)
            .await
            .unwrap_or_else(|e| panic!("remove sentinel {id}: {}", status_message(&e)));
    }
    if let Err(e) = c.remove_image(&kept_ref).await {
        all_problems.push(format!("remove {kept_ref}: {}", status_message(&e)));
    }
    if let Err(e) = kitectl(&["delete", "pod", AGENT_POD], None) {
        all_problems.push(format!("delete the agent's sentinel: {e}"));
    }
    all_problems.extend(
        invariants(
            &[kite_pod.id.clone(), runc_pod.id.clone()],
            Duration::from_secs(60),
        )
        .await,
    );

    durations.sort_by(f64::total_cmp);
    println!(
        "\nsoak: {cycles} cycles in {:.0} s (cycle median {:.1} s, min {:.1}, max {:.1}; accelerator {}), seed {seed}",
        t0.elapsed().as_secs_f64(),
        durations.get(durations.len() / 2).copied().unwrap_or(0.0),
        durations.first().copied().unwrap_or(0.0),
        durations.last().copied().unwrap_or(0.0),
        kite_e2e::bench::accelerator()
    );
    println!(
        "  {:30} {:>7} {:>8} {:>18} {:>9}",
        "fault", "cycles", "applied", "operations failed", "problems"
    );
    for (f, n) in &counts {
        println!(
            "  {:30} {:>7} {:>8} {:>18} {:>9}",
            f.name(),
            n.cycles,
            n.applied,
            n.operations_failed,
            n.problems
        );
    }
    let upstream = UPSTREAM_LEAKS.lock().unwrap().clone();
    if !upstream.is_empty() {
        println!(
            "  left by runc/containerd, not kite (removed): {}",
            upstream.join(", ")
        );
    }
    if !all_problems.is_empty() {
        panic!(
            "soak: {} problems:\n{}",
            all_problems.len(),
            all_problems.join("\n")
        );
    }
    println!("no problem: nothing leaked, no wrong byte, every sentinel kept answering");
}
