//! Helpers for kite's end-to-end tests: they drive the real containerd (`ctr`), real QEMU VMs
//! and the local registry that `hack/setup.sh` installs and starts. A missing piece fails the
//! test with the reason; nothing is skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const RUNTIME: &str = "io.containerd.kite.v2";
pub const IMAGE: &str = "127.0.0.1:5000/kite/busybox:latest";
pub const STATE_DIR: &str = "/run/kite/sandboxes";

/// Fails with the reason when the environment is not set up.
pub fn require_setup() {
    let ok = Command::new("ctr")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "containerd is not running: run hack/setup.sh (or hack/test.sh) first"
    );
    for path in [
        "/usr/local/bin/containerd-shim-kite-v2",
        "/var/lib/kite/guest/vmlinuz",
        "/var/lib/kite/guest/initrd.img",
        "/usr/local/bin/virtiofsd",
    ] {
        assert!(
            Path::new(path).exists(),
            "{path} is missing: run hack/setup.sh first"
        );
    }
    let pulled = ctr(&["images", "pull", "--plain-http", IMAGE]);
    assert!(
        pulled.status.success(),
        "pull {IMAGE}: {}",
        text(&pulled.stderr)
    );
}

/// A container id unique to this test run.
/// Starts `binary --config CONFIG` with its output appended to `log`, and waits until
/// `serving` says it serves (a panic with its log if it exits or takes over `limit`).
pub fn start_daemon(
    binary: &str,
    config: &std::path::Path,
    log: &std::path::Path,
    limit: Duration,
    serving: impl Fn() -> bool,
) -> std::process::Child {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
    let mut child = Command::new(binary)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("start {binary}: {e}"));
    let start = std::time::Instant::now();
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    while !serving() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{binary} exited ({status}): {}", log_text());
        }
        assert!(
            start.elapsed() < limit,
            "{binary} does not serve after {limit:?}: {}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

pub fn unique_id(name: &str) -> String {
    format!("e2e-{name}-{}", std::process::id())
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn ctr(args: &[&str]) -> Output {
    Command::new("ctr").args(args).output().expect("run ctr")
}

/// `ctr run --rm --runtime kite IMAGE ID ARGS…` with `stdin` fed in.
pub fn run(id: &str, extra: &[&str], args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new("ctr");
    cmd.args(["run", "--rm", "--runtime", RUNTIME])
        .args(extra)
        .args([IMAGE, id])
        .args(args);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run ctr");
    if let Some(data) = stdin {
        use std::io::Write;
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(data).expect("write stdin");
    }
    child.wait_with_output().expect("wait for ctr")
}

/// Starts `ctr run --rm … ARGS` in the background (stdout and stderr piped) and waits until
/// the task runs.
pub fn spawn_running(id: &str, args: &[&str]) -> std::process::Child {
    let child = Command::new("ctr")
        .args(["run", "--rm", "--runtime", RUNTIME, IMAGE, id])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ctr");
    wait_running(id);
    child
}

/// Waits until the task of `id` runs.
pub fn wait_running(id: &str) {
    wait_until(
        &format!("task {id} running"),
        Duration::from_secs(60),
        || task_status(id).as_deref() == Some("RUNNING"),
    );
}

/// Starts a detached container running `args`.
pub fn run_detached(id: &str, extra: &[&str], args: &[&str]) {
    let mut all = vec!["run", "-d", "--runtime", RUNTIME];
    all.extend_from_slice(extra);
    all.extend_from_slice(&[IMAGE, id]);
    all.extend_from_slice(args);
    let out = ctr(&all);
    assert!(
        out.status.success(),
        "ctr run -d {id}: {}",
        text(&out.stderr)
    );
}

/// The task's status as `ctr task ls` shows it (RUNNING, STOPPED, …), if it exists.
pub fn task_status(id: &str) -> Option<String> {
    let out = ctr(&["task", "ls"]);
    text(&out.stdout)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
}

pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Removes a container and its task whatever state they are in.
pub fn force_remove(id: &str) {
    let _ = ctr(&["task", "kill", "-s", "SIGKILL", id]);
    let _ = wait_for_stopped(id, Duration::from_secs(20));
    let _ = ctr(&["task", "delete", id]);
    let _ = ctr(&["container", "delete", id]);
}

fn wait_for_stopped(id: &str, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        match task_status(id).as_deref() {
            None | Some("STOPPED") => return true,
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    false
}

/// The processes (`pid: command line`) whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    command_lines_mentioning(needle)
        .into_iter()
        .map(|(pid, cmd)| format!("{pid}: {cmd}"))
        .collect()
}

/// The pids of the processes whose command line mentions `needle` (as
/// [`processes_mentioning`] finds them).
pub fn pids_mentioning(needle: &str) -> Vec<i32> {
    command_lines_mentioning(needle)
        .into_iter()
        .map(|(pid, _)| pid)
        .collect()
}

/// The pid of the shim serving `id` (a sandbox or a lone container), once it runs.
pub fn shim_pid(id: &str) -> Option<i32> {
    pids_mentioning(&format!("-id {id} "))
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.starts_with("containerd-shim"))
        })
}

fn command_lines_mentioning(needle: &str) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if u32::try_from(pid).ok() == Some(std::process::id()) {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) && !cmd.starts_with("ctr ") {
                found.push((pid, cmd));
            }
        }
    }
    found
}

/// The directory a pooled VM's processes name (`<STATE_DIR>/.pool…/<vm>`), from a command line.
fn pool_origin_in(cmdline: &str) -> Option<String> {
    let start = cmdline.find(&format!("{STATE_DIR}/.pool"))?;
    let rest = &cmdline[start + STATE_DIR.len() + 1..];
    let mut parts = rest.splitn(3, '/');
    let (pool, vm) = (parts.next()?, parts.next()?);
    let vm = vm.split(|c: char| c.is_whitespace() || c == ',').next()?;
    Some(format!("{STATE_DIR}/{pool}/{vm}"))
}

/// Processes of VMs booted for a warm pool that no pool offers any more and no sandbox adopted
/// (by its `vm.json`'s origin): what a pod that adopted a pooled VM would leak.
pub fn orphaned_pool_vms() -> Vec<String> {
    let mut known = std::collections::HashSet::new();
    for e in std::fs::read_dir(STATE_DIR).into_iter().flatten().flatten() {
        let path = e.path();
        if e.file_name().to_string_lossy().starts_with(".pool") {
            for vm in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                known.insert(vm.path().display().to_string());
            }
        } else if let Ok(text) = std::fs::read_to_string(path.join("vm.json")) {
            let state: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            if let Some(origin) = state.get("origin").and_then(|o| o.as_str()) {
                known.insert(origin.to_string());
            }
        }
    }
    processes_mentioning(&format!("{STATE_DIR}/.pool"))
        .into_iter()
        .filter(|p| pool_origin_in(p).is_some_and(|o| !known.contains(&o)))
        .map(|p| format!("orphaned pooled VM process {p}"))
        .collect()
}

/// What a sandbox `id` left behind: processes (QEMU, virtiofsd, shim), mounts, state, the shim's
/// socket; and pooled VMs nobody holds (a sandbox may have adopted one).
pub fn leftovers(id: &str) -> Vec<String> {
    let dir: PathBuf = Path::new(STATE_DIR).join(id);
    let marker = dir.display().to_string();
    let mut left = processes_mentioning(&marker);
    left.extend(orphaned_pool_vms());
    left.extend(
        processes_mentioning(&format!("-id {id} "))
            .into_iter()
            .filter(|p| p.contains("containerd-shim-kite-v2")),
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    left.extend(
        mounts
            .lines()
            .filter(|l| l.contains(&marker) || l.contains(&format!("/{id}/rootfs")))
            .map(|l| format!("mount: {l}")),
    );
    if dir.exists() {
        left.push(format!("state dir {marker}"));
    }
    // The shim's socket (containerd names it by its address, the namespace and the id).
    for ns in ["default", "k8s.io"] {
        let address = containerd_shim::socket_address("/run/containerd/containerd.sock", ns, id);
        let path = address.trim_start_matches("unix://");
        if Path::new(path).exists() {
            left.push(format!("shim socket {path} ({ns})"));
        }
    }
    left.extend(
        host_cgroups(id)
            .into_iter()
            .map(|p| format!("cgroup {}", p.display())),
    );
    left
}

/// The host cgroups named for sandbox `id` (containerd's `ctr` and CRI namespaces), in every
/// v1 hierarchy and the v2 tree.
pub fn host_cgroups(id: &str) -> Vec<PathBuf> {
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        roots.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    roots
        .iter()
        .flat_map(|r| [r.join("default").join(id), r.join("k8s.io").join(id)])
        .filter(|p| p.exists())
        .collect()
}

/// Asserts that nothing of sandbox `id` is left (waiting a little for the shim to go).
pub fn assert_no_leaks(id: &str) {
    let start = Instant::now();
    loop {
        let left = leftovers(id);
        if left.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "sandbox {id} leaked:\n{}",
            left.join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Writes a kite.toml for one test (used with `--runtime-config-path`).
pub fn write_config(name: &str, shim_section: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kite-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create config dir");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, format!("[shim]\n{shim_section}\n")).expect("write config");
    path
}
/// Runs async clean-up from a `Drop` (which may run inside a test's runtime and must not block
/// it): on a thread and runtime of its own, waited for.
pub fn block_on_own_thread<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(f());
    })
    .join();
}

pub mod agent;
pub mod bench;
pub mod cluster;
pub mod cri;
pub mod deploy;

/// Runs `hack/snapshotter.sh ACTION` (start, restart, stop, stop-all); panics if it fails.
pub fn snapshotter_script(action: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../hack/snapshotter.sh");
    let st = Command::new(script).arg(action).status().unwrap();
    assert!(st.success(), "hack/snapshotter.sh {action}");
}

/// Waits until containerd reaches the kite snapshotter again: after a restart containerd
/// redials a proxy plugin with a backoff, and until then its calls fail with "connection
/// refused". `hack/snapshotter.sh wait-containerd` makes a call that containerd must pass on.
pub fn wait_snapshotter_reachable() {
    snapshotter_script("wait-containerd");
}

/// A docker-registry of a test's own, serving `config` on `addr`: tests stop and start it to
/// make outages. Stopped when dropped.
pub struct RegistryProcess {
    config: PathBuf,
    addr: String,
    child: Option<std::process::Child>,
}

impl RegistryProcess {
    /// Starts it and waits until `addr` accepts connections.
    pub fn start(config: &Path, addr: &str) -> RegistryProcess {
        let mut r = RegistryProcess {
            config: config.to_path_buf(),
            addr: addr.to_string(),
            child: None,
        };
        r.up();
        r
    }

    pub fn up(&mut self) {
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry (hack/setup.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&self.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "the test registry did not start on {}",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RegistryProcess {
    fn drop(&mut self) {
        self.down();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_pooled_vms_directory_is_read_from_its_command_line() {
        let cmd = "/usr/bin/qemu-system-x86_64 -name kite-pool-ab -qmp unix:/run/kite/sandboxes/.pool/ab12cd34/qmp.sock,server=on";
        assert_eq!(
            super::pool_origin_in(cmd).as_deref(),
            Some("/run/kite/sandboxes/.pool/ab12cd34")
        );
        assert_eq!(
            super::pool_origin_in("/usr/bin/qemu-system-x86_64 -name kite-x"),
            None
        );
    }
}
