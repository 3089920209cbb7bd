//! The warm pool through containerd's CRI: kite-pool keeps VMs booted, pods adopt them (and
//! cannot tell them from VMs booted for them), the pool refills, survives its holder's restart
//! and SIGKILL, falls back to a cold boot when empty or when no VM fits, drains VMs of a size
//! class the configuration dropped, and leaves nothing behind.
//!
//! The test runs a pool of its own: the CRI handler `kite-pool-test` (deploy/containerd-config.toml)
//! reads /etc/kite/kite-pool-test.toml, which this test writes, with its own pool directory,
//! metrics port and cgroup; the node's pool (hack/pool.sh) is not touched.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kite_e2e::cri::{http_get, kite_pod_netns, status_message, Cri, Pod, RemoveOnDrop};
use kite_e2e::{assert_no_leaks, processes_mentioning, require_setup, IMAGE, STATE_DIR};

const HANDLER: &str = "kite-pool-test";
const CONFIG: &str = "/etc/kite/kite-pool-test.toml";
const METRICS: &str = "127.0.0.1:9623";
const LIMIT: Duration = Duration::from_secs(90);

fn pool_dir() -> PathBuf {
    Path::new(STATE_DIR).join(".pool-test")
}

/// Writes the test's kite.toml: the node's defaults, with a pool of its own and `pool_extra`.
fn write_config(pool_extra: &str) {
    let text = format!(
        "# Written by tests/tests/pool.rs (the CRI handler {HANDLER}).\n[shim]\n\n[shim.pool]\n\
         enabled = true\ndir = \"{}\"\nmetrics_addr = \"{METRICS}\"\nrefill_delay_ms = 0\n\
         cgroup = \"/kite-pool-test\"\n{pool_extra}\n",
        pool_dir().display()
    );
    std::fs::write(CONFIG, text).unwrap_or_else(|e| panic!("write {CONFIG}: {e}"));
}

/// The test's kite-pool, stopped with SIGTERM when dropped.
struct Holder {
    child: Child,
}

impl Holder {
    fn start() -> Holder {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open("/var/log/kite/pool-test.log")
            .expect("open the test pool's log");
        let child = Command::new("/usr/local/bin/kite-pool")
            .args(["--config", CONFIG, "run"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start kite-pool (run hack/setup.sh)");
        Holder { child }
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("a pid"))
    }

    /// Sends `signal` and waits for kite-pool's exit; whether a SIGTERM ended it well.
    fn signal(&mut self, signal: nix::sys::signal::Signal) -> bool {
        let _ = nix::sys::signal::kill(self.pid(), signal);
        let status = self.child.wait().expect("wait for kite-pool");
        signal != nix::sys::signal::Signal::SIGTERM || status.success()
    }

    /// Freezes kite-pool where it is (SIGSTOP): whatever it was doing stays half-done.
    fn freeze(&self) {
        let _ = nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGSTOP);
    }

    fn stop(mut self) {
        let ok = self.signal(nix::sys::signal::Signal::SIGTERM);
        std::mem::forget(self);
        assert!(ok, "kite-pool did not exit cleanly on SIGTERM");
    }

    fn kill(mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        std::mem::forget(self);
    }
}

impl Drop for Holder {
    /// Stops kite-pool when a test fails before it does (no assertion: it may be unwinding).
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
    }
}

/// The ready VMs in the test's pool: name → (size as `vcpus x MiB`, QEMU's pid).
fn ready() -> Vec<(String, String, u32)> {
    let mut vms = Vec::new();
    for e in std::fs::read_dir(pool_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let Ok(meta) = std::fs::read_to_string(e.path().join("pool.json")) else {
            continue;
        };
        let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
        let size = format!("{}x{}", meta["size"]["vcpus"], meta["size"]["memory_mib"]);
        let pid = std::fs::read_to_string(e.path().join("qemu.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0);
        vms.push((name, size, pid));
    }
    vms.sort();
    vms
}

fn ready_names() -> HashSet<String> {
    ready().into_iter().map(|(n, _, _)| n).collect()
}

async fn wait_ready(what: &str, limit: Duration, f: impl Fn(&[(String, String, u32)]) -> bool) {
    let start = Instant::now();
    loop {
        let vms = ready();
        if f(&vms) {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "the pool: {what} not within {limit:?}; ready: {vms:?}; log: {}",
            log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn log_tail() -> String {
    let text = std::fs::read_to_string("/var/log/kite/pool-test.log").unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// A metric's value from the test pool's endpoint (0 when absent).
async fn metric(name: &str) -> f64 {
    let text = http_get(METRICS, "/metrics", Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("kite-pool's metrics: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Whether `pid` runs (a zombie its parent has yet to reap does not).
fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // `pid (comm) S …`: the state follows the command's closing parenthesis.
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    pid != 0 && state.is_some_and(|s| s != 'Z' && s != 'X')
}

fn drain() {
    let out = Command::new("/usr/local/bin/kite-pool")
        .args(["--config", CONFIG, "drain"])
        .output()
        .expect("run kite-pool drain");
    assert!(
        out.status.success(),
        "kite-pool drain: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The timings record of the sandbox's boot (the shim writes one per container start; the
/// sandbox's own says what the pool did).
fn pool_use(pod_id: &str) -> String {
    let text = std::fs::read_to_string("/run/kite/timings.jsonl").unwrap_or_default();
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["sandbox"] == pod_id && r["booted"] == true)
        .find_map(|r| r["pool"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("no boot record for sandbox {pod_id}"))
}

/// The pooled VM a sandbox adopted (its `vm.json` origin), if it adopted one.
fn adopted_from(pod_id: &str) -> Option<String> {
    let text = std::fs::read_to_string(Path::new(STATE_DIR).join(pod_id).join("vm.json")).ok()?;
    let state: serde_json::Value = serde_json::from_str(&text).ok()?;
    let origin = state["origin"].as_str()?;
    Path::new(origin)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

fn qemu_pid(pod_id: &str) -> u32 {
    std::fs::read_to_string(Path::new(STATE_DIR).join(pod_id).join("qemu.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("pod {pod_id} has no QEMU pid"))
}

fn in_netns(netns: &Path, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(args)
        .output()
        .expect("run nsenter");
    assert!(
        out.status.success(),
        "{args:?} in {}: {}",
        netns.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The cgroup the test's pods are put under, as a kubelet's pod cgroup.
fn pod_cgroup_parent() -> String {
    format!("/kite-e2e-pool-{}", std::process::id())
}

/// Removes the test's pod cgroup parent when the test ends, passed or not (containerd removes
/// each pod's own cgroup, not the parent a kubelet made).
struct PodCgroupParent;

impl Drop for PodCgroupParent {
    fn drop(&mut self) {
        kite_vmm::cgroup::remove_path(&pod_cgroup_parent());
    }
}

/// Runs a pod serving `body` on :8080 and checks it serves on its IP.
async fn serving_pod(c: &mut Cri, name: &str, annotations: &[(&str, &str)]) -> (Pod, String) {
    // A pod cgroup as a kubelet makes one (the CRI's pod stats read it).
    let parent = pod_cgroup_parent();
    let pod = c
        .run_pod_in(name, HANDLER, annotations, &parent)
        .await
        .unwrap_or_else(|e| panic!("run pod {name}: {}", status_message(&e)));
    let cmd =
        format!("mkdir -p /www && echo {name} > /www/index.html && exec httpd -f -p 8080 -h /www");
    let web = c
        .run_container(&pod, "web", 0, IMAGE, &["sh", "-c", &cmd])
        .await;
    c.wait_running(&web, LIMIT).await;
    let ip = c.pod_ip(&pod.id).await;
    let body = http_get(&format!("{ip}:8080"), "/", LIMIT)
        .await
        .unwrap_or_else(|e| panic!("pod {name} on {ip}: {e}"));
    assert_eq!(body.trim(), name);
    (pod, web)
}

/// What a pod sees of its VM, the same whether it was pooled or cold: the pod's hostname, its
/// IP and MAC on eth0 (the host side's, set at run time), and the host side: kite-tap0 beside eth0 in its
/// namespace, QEMU in the pod's cgroup.
async fn assert_pod_identity(c: &mut Cri, pod: &Pod, web: &str) {
    let netns = kite_pod_netns(&pod.id).expect("the pod's network namespace");
    // (netlink, not /sys: nsenter keeps the host's sysfs)
    let eth0 = in_netns(&netns, &["ip", "-o", "link", "show", "eth0"]);
    let host_mac = eth0
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {eth0}"))
        .to_string();
    let links = in_netns(&netns, &["ip", "-o", "link", "show"]);
    assert!(
        links.contains("kite-tap0"),
        "no kite-tap0 in the pod's namespace: {links}"
    );
    let ip = c.pod_ip(&pod.id).await;
    let (code, out, err) = c
        .exec_sync(
            web,
            &[
                "sh",
                "-c",
                "hostname; cat /sys/class/net/eth0/address; \
                 cat /sys/class/net/eth0/addr_assign_type; ip -o -4 addr show eth0",
            ],
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|e| panic!("exec in pod {}: {}", pod.id, status_message(&e)));
    assert_eq!(code, 0, "exec: {err}");
    let name = &pod.config.metadata.as_ref().unwrap().name;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some(name.as_str()),
        "hostname: {out}"
    );
    assert_eq!(
        lines.get(1).copied(),
        Some(host_mac.trim()),
        "the guest's MAC: {out}"
    );
    // 3: the MAC was set at run time (NET_ADDR_SET), pooled or cold: the NIC of either boots
    // with a MAC of its own and takes the pod's when the guest is configured.
    assert_eq!(
        lines.get(2).copied(),
        Some("3"),
        "the guest NIC's addr_assign_type: {out}"
    );
    assert!(
        out.contains(&format!("inet {ip}/")),
        "the pod's IP in the guest: {out}"
    );
    // The guest's runtime zygote forked the container's set-up (and the exec's), in a pooled
    // VM as in a cold one.
    let console = std::path::Path::new(kite_e2e::STATE_DIR)
        .join(&pod.id)
        .join("console.log");
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        log.contains("runtime helper") && log.contains("via=\"zygote\""),
        "{}: no container set-up forked by the runtime zygote:\n{log}",
        console.display()
    );
    assert!(
        !log.contains("executing the runtime helper"),
        "{}: the runtime zygote failed:\n{log}",
        console.display()
    );
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", qemu_pid(&pod.id))).unwrap();
    let memory = cgroups
        .lines()
        .find(|l| {
            l.split(':')
                .nth(1)
                .is_some_and(|c| c.split(',').any(|c| c == "memory"))
        })
        .unwrap_or_default();
    assert!(memory.contains(&pod.id), "QEMU's memory cgroup: {memory}");
    let stats = c
        .pod_stats(&pod.id)
        .await
        .unwrap_or_else(|e| panic!("pod stats: {}", status_message(&e)));
    let working_set = stats
        .linux
        .and_then(|l| l.memory)
        .and_then(|m| m.working_set_bytes)
        .map(|v| v.value)
        .unwrap_or(0);
    // What the VM allocates in the pod is charged to the pod; what a pooled VM touched before
    // its adoption stays charged to the pool's cgroup (charges never move between cgroups).
    assert!(
        working_set > 0,
        "the pod's memory should include its VM's: {working_set} bytes"
    );
}

async fn remove(c: &mut Cri, pod: &Pod) {
    let qemu = qemu_pid(&pod.id);
    c.remove_pod(&pod.id)
        .await
        .unwrap_or_else(|e| panic!("remove pod {}: {}", pod.id, status_message(&e)));
    let id = pod.id.clone();
    tokio::task::spawn_blocking(move || assert_no_leaks(&id))
        .await
        .unwrap();
    let start = Instant::now();
    while alive(qemu) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "QEMU {qemu} of pod {} still runs",
            pod.id
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_adopt_pooled_vms_and_the_pool_survives_its_holder() {
    tokio::task::spawn_blocking(require_setup).await.unwrap();
    let _parent = PodCgroupParent;
    let mut c = Cri::connect().await;
    c.pull(IMAGE)
        .await
        .unwrap_or_else(|e| panic!("pull {IMAGE}: {}", status_message(&e)));
    // A test that died midway may have left its holder and VMs.
    let _ = Command::new("pkill")
        .args(["-f", &format!("kite-pool --config {CONFIG}")])
        .status();
    std::thread::sleep(Duration::from_millis(300));
    write_config("count = 2");
    drain();

    // 1. Two pods at once: each adopts a VM of its own from the pool.
    let mut holder = Holder::start();
    wait_ready("two VMs", LIMIT, |v| v.len() == 2).await;
    let offered = ready_names();
    let (mut c1, mut c2) = (Cri::connect().await, Cri::connect().await);
    let ((a, web_a), (b, web_b)) = tokio::join!(
        serving_pod(&mut c1, "pool-a", &[]),
        serving_pod(&mut c2, "pool-b", &[])
    );
    let _guards = [RemoveOnDrop(a.id.clone()), RemoveOnDrop(b.id.clone())];
    for pod in [&a, &b] {
        assert_eq!(pool_use(&pod.id), "hit", "pod {}", pod.id);
    }
    let (from_a, from_b) = (adopted_from(&a.id).unwrap(), adopted_from(&b.id).unwrap());
    assert!(
        offered.contains(&from_a) && offered.contains(&from_b),
        "{offered:?}"
    );
    assert_ne!(from_a, from_b, "two pods adopted the same VM");
    assert_pod_identity(&mut c, &a, &web_a).await;
    assert_pod_identity(&mut c, &b, &web_b).await;

    // 2. The pool refills with new VMs, and counts the hits.
    wait_ready("a refill", LIMIT, |v| {
        v.len() == 2 && v.iter().all(|(n, _, _)| !offered.contains(n))
    })
    .await;
    assert_eq!(metric("kite_pool_claims_total").await, 2.0);
    // Every VM offered was warmed up first (the guest checks its warm-up left nothing, or the
    // VM is not offered). The count follows the publication by a moment.
    let start = Instant::now();
    while metric("kite_pool_warm_ups_total{result=\"warmed\"}").await < 4.0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "4 VMs offered, not all warmed up: {}",
            log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for result in ["failed", "unsupported", "off"] {
        assert_eq!(
            metric(&format!("kite_pool_warm_ups_total{{result=\"{result}\"}}")).await,
            0.0,
            "warm-ups {result}: {}",
            log_tail()
        );
    }
    remove(&mut c, &a).await;
    remove(&mut c, &b).await;

    // 3. The holder SIGKILLed: its VMs keep running; the next holder keeps them (retires
    // none) and a pod adopts one.
    let before = ready();
    holder.kill();
    for (name, _, pid) in &before {
        assert!(alive(*pid), "pooled VM {name} died with its holder");
    }
    holder = Holder::start();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(ready(), before, "the new holder kept the pool");
    assert_eq!(metric("kite_pool_ready{class=\"1x256\"}").await, 2.0);
    let (p, web_p) = serving_pod(&mut c, "pool-c", &[]).await;
    let _guard = RemoveOnDrop(p.id.clone());
    assert_eq!(pool_use(&p.id), "hit");
    assert!(before
        .iter()
        .any(|(n, _, _)| Some(n) == adopted_from(&p.id).as_ref()));
    assert_pod_identity(&mut c, &p, &web_p).await;
    remove(&mut c, &p).await;

    // 4. The holder SIGKILLed while it boots a VM: the next holder releases the unfinished
    // VM, processes included. (A third VM is asked for so that a boot surely begins; the
    // holder is frozen the moment QEMU runs, so the boot cannot be published before the kill.)
    // Then it is stopped and the pool drained: a pod boots its own VM, as without a pool.
    wait_ready("the refill after pod C", LIMIT, |v| v.len() == 2).await;
    holder.stop();
    write_config("count = 3");
    let holder = Holder::start();
    let start = Instant::now();
    let booting = loop {
        let found = std::fs::read_dir(pool_dir()).unwrap().flatten().find(|e| {
            !e.file_name().to_string_lossy().starts_with('.')
                && e.path().join("qemu.pid").exists()
                && !e.path().join("pool.json").exists()
        });
        if let Some(e) = found {
            holder.freeze();
            break e.path();
        }
        assert!(start.elapsed() < LIMIT, "no third VM began: {}", log_tail());
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let pids: Vec<u32> = ["qemu.pid", "virtiofsd.pid"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(booting.join(f)).ok())
        .filter_map(|t| t.trim().parse().ok())
        .collect();
    assert!(
        !pids.is_empty(),
        "the booting VM {} has pids",
        booting.display()
    );
    holder.kill();
    write_config("count = 2");
    let holder = Holder::start();
    let start = Instant::now();
    loop {
        let orphans = kite_e2e::orphaned_pool_vms();
        let released = !booting.exists()
            && pids.iter().all(|p| !alive(*p))
            && orphans.is_empty()
            && metric("kite_pool_retired_total{reason=\"unfinished\"}").await == 1.0;
        if released {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the unfinished VM {} (pids {pids:?}) was not released: {orphans:?}; {}",
            booting.display(),
            log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    holder.stop();
    drain();
    assert!(ready().is_empty());
    let (d, web_d) = serving_pod(&mut c, "pool-d", &[]).await;
    let _guard = RemoveOnDrop(d.id.clone());
    assert_eq!(pool_use(&d.id), "miss:empty");
    assert_eq!(adopted_from(&d.id), None);
    assert_pod_identity(&mut c, &d, &web_d).await;
    remove(&mut c, &d).await;

    // 5. A size class dropped from the configuration: the next holder retires its VMs and
    // boots the new class; a pod of the old size boots its own VM, one of the new size adopts.
    let holder = Holder::start();
    wait_ready("two VMs", LIMIT, |v| v.len() == 2).await;
    let old = ready_names();
    holder.stop();
    write_config("count = 0\n[[shim.pool.classes]]\nvcpus = 1\nmemory_mib = 320\ncount = 1");
    let holder = Holder::start();
    wait_ready("the new class", LIMIT, |v| {
        v.len() == 1 && v[0].1 == "1x320" && !old.contains(&v[0].0)
    })
    .await;
    assert_eq!(
        metric("kite_pool_retired_total{reason=\"config\"}").await,
        2.0
    );
    let (e, _) = serving_pod(&mut c, "pool-e", &[]).await;
    let _guard = RemoveOnDrop(e.id.clone());
    assert_eq!(pool_use(&e.id), "miss:size");
    let (f, web_f) = serving_pod(&mut c, "pool-f", &[("io.kite.memory_mib", "320")]).await;
    let _guard = RemoveOnDrop(f.id.clone());
    assert_eq!(pool_use(&f.id), "hit");
    assert_pod_identity(&mut c, &f, &web_f).await;
    remove(&mut c, &e).await;
    remove(&mut c, &f).await;
    assert!(metric("kite_pool_misses_total{reason=\"size\"}").await >= 1.0);

    // 6. A pod that declines the pool (annotation) boots its own VM while VMs are ready.
    let (g, _) = serving_pod(&mut c, "pool-g", &[("io.kite.warm-pool", "false")]).await;
    let _guard = RemoveOnDrop(g.id.clone());
    assert_eq!(pool_use(&g.id), "miss:declined");
    assert_eq!(adopted_from(&g.id), None);
    remove(&mut c, &g).await;

    // 7. Drained: nothing of the pool is left (processes, namespace, directories).
    holder.stop();
    drain();
    write_config("count = 2");
    let pool = pool_dir().display().to_string();
    let left = processes_mentioning(&pool);
    assert!(left.is_empty(), "pool processes left: {left:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&pool),
        "the pool's namespace is still mounted"
    );
    assert!(ready().is_empty());
}
