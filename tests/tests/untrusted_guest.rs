//! The guest is not trusted: a guest agent that misbehaves on purpose (kite-guest built with
//! its `misbehave` feature into an initrd of its own by hack/test.sh) floods the shim with
//! huge answers, stops answering, sends garbage on the channel and lies (impossible exit
//! statuses, pids out of range, OOM events for containers that do not exist). Each time the
//! shim's memory stays bounded, the misbehaving pod ends or is removed with nothing left, and a
//! neighbour pod keeps answering.
//! One test: the modes run one after the other beside one neighbour.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kite_e2e::*;

const INITRD: &str = "/var/lib/kite/guest-misbehave/initrd.img";
/// The shim's peak memory (VmHWM) with a misbehaving guest. An idle shim holds ~11 MiB; the
/// guest's largest answer is bounded by ttrpc (4 MiB) and the shim keeps none of it.
const SHIM_PEAK_LIMIT_KIB: u64 = 64 << 10;

fn config(mode: &str) -> String {
    write_config(
        &format!("misbehave-{mode}"),
        &format!("initrd_path = \"{INITRD}\"\nkernel_params = \"kite.misbehave={mode}\""),
    )
    .display()
    .to_string()
}

fn peak_kib(pid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Watches the shim of `id` on a thread until it exits (or `stop`): its largest peak RSS.
struct ShimWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl ShimWatch {
    fn start(id: &str) -> ShimWatch {
        let id = id.to_string();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                if let Some(kib) = shim_pid(&id).and_then(peak_kib) {
                    peak = peak.max(kib);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        ShimWatch { stop, thread }
    }

    fn peak(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

/// `ctr run` of a misbehaving pod, in the background.
fn start(id: &str, mode: &str, args: &[&str]) -> std::process::Child {
    let cfg = config(mode);
    Command::new("ctr")
        .args([
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--runtime-config-path",
            &cfg,
        ])
        .args([IMAGE, id])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ctr")
}

/// Waits for `child` up to `limit`; kills it (a hang) if it does not end.
fn finish(child: std::process::Child, what: &str, limit: Duration) -> std::process::Output {
    let pid = child.id();
    let start = Instant::now();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    let killer = std::thread::spawn(move || {
        while !flag.load(std::sync::atomic::Ordering::SeqCst) {
            if start.elapsed() > limit {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    });
    let out = child.wait_with_output().expect("wait for ctr");
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(
        !killer.join().unwrap(),
        "{what}: ctr did not end within {limit:?}"
    );
    out
}

fn neighbour_answers(neighbour: &str, mode: &str) {
    let out = ctr(&[
        "task",
        "exec",
        "--exec-id",
        &format!("n-{mode}"),
        neighbour,
        "echo",
        "still here",
    ]);
    assert!(
        out.status.success() && text(&out.stdout) == "still here\n",
        "after the {mode} guest, the neighbour pod: {} {}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn after(mode: &str, id: &str, peak: u64, neighbour: &str) {
    force_remove(id);
    assert_no_leaks(id);
    assert!(
        peak > 0 && peak < SHIM_PEAK_LIMIT_KIB,
        "{mode}: the shim's peak memory was {peak} KiB (limit {SHIM_PEAK_LIMIT_KIB})"
    );
    neighbour_answers(neighbour, mode);
    eprintln!(
        "{mode}: the shim's peak RSS {:.1} MiB",
        peak as f64 / 1024.0
    );
}

/// Removes a container when dropped (a failing test leaves nothing for the next run).
struct Removed(String);

impl Drop for Removed {
    fn drop(&mut self) {
        force_remove(&self.0);
    }
}

#[test]
fn a_misbehaving_guest_costs_its_own_pod_only() {
    require_setup();
    assert!(
        std::path::Path::new(INITRD).exists(),
        "{INITRD} is missing (hack/test.sh builds it)"
    );
    let neighbour = unique_id("neighbour");
    let _cleanup = Removed(neighbour.clone());
    run_detached(&neighbour, &[], &["sleep", "1000"]);
    wait_running(&neighbour);

    // Huge answers: 3 MiB output chunks whatever was asked, 200,000 pids. The output relay
    // refuses them (nothing of it reaches ctr), the pid list is refused, the task still ends.
    let id = unique_id("huge");
    let _huge = Removed(id.clone());
    let watch = ShimWatch::start(&id);
    let child = start(
        &id,
        "huge",
        &["sh", "-c", "echo out; echo err >&2; sleep 10"],
    );
    wait_running(&id);
    let ps = ctr(&["task", "ps", &id]);
    assert!(!ps.status.success(), "a list of 200,000 pids was taken");
    assert!(
        text(&ps.stderr).contains("pid"),
        "the refusal names the pids: {}",
        text(&ps.stderr)
    );
    let out = finish(child, "huge", Duration::from_secs(120));
    assert!(
        out.stdout.len() < 64 << 10 && out.stderr.len() < 64 << 10,
        "huge chunks reached ctr: {} bytes of stdout, {} of stderr",
        out.stdout.len(),
        out.stderr.len()
    );
    after("huge", &id, watch.peak(), &neighbour);

    // Lies: impossible exit statuses and times, pids out of range, an OOM event for a container
    // that does not exist, at once and again.
    let id = unique_id("lie");
    let _lie = Removed(id.clone());
    let watch = ShimWatch::start(&id);
    let child = start(&id, "lie", &["sh", "-c", "sleep 8"]);
    wait_running(&id);
    let ps = ctr(&["task", "ps", &id]);
    assert!(!ps.status.success(), "pids out of range were taken");
    let out = finish(child, "lie", Duration::from_secs(120));
    // An impossible exit status reads as 255 (not 70,000 mod 256), at the time the shim saw it.
    assert_eq!(
        out.status.code(),
        Some(255),
        "the exit status a lying guest gave: {}",
        text(&out.stderr)
    );
    after("lie", &id, watch.peak(), &neighbour);

    // Garbage on the channel after the guest's first answer: the pod fails to start, with
    // the reason, and nothing is left.
    let id = unique_id("garbage");
    let _garbage = Removed(id.clone());
    let watch = ShimWatch::start(&id);
    let child = start(&id, "garbage", &["true"]);
    let out = finish(child, "garbage", Duration::from_secs(180));
    assert!(
        !out.status.success(),
        "a pod whose guest sends garbage started"
    );
    eprintln!("garbage: {}", text(&out.stderr).trim());
    after("garbage", &id, watch.peak(), &neighbour);

    // A guest that stops answering once the container started: exec and kill get errors after
    // their deadlines, and the pod is still removed (its VM stopped) with nothing left.
    let id = unique_id("stall");
    let _stall = Removed(id.clone());
    let watch = ShimWatch::start(&id);
    let child = start(&id, "stall", &["sleep", "1000"]);
    wait_running(&id);
    let t = Instant::now();
    let exec = ctr(&["task", "exec", "--exec-id", "x", &id, "true"]);
    assert!(
        !exec.status.success(),
        "an exec in a stalled guest succeeded"
    );
    assert!(
        t.elapsed() < Duration::from_secs(90),
        "the exec waited {:?}",
        t.elapsed()
    );
    after("stall", &id, watch.peak(), &neighbour);
    let _ = finish(child, "stall", Duration::from_secs(120));

    force_remove(&neighbour);
    assert_no_leaks(&neighbour);
}
