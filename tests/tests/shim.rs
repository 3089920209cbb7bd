//! The kite runtime through containerd, as `ctr` users see it: the same behaviour as runc,
//! with the process in its own VM. Every test checks that its sandbox leaves nothing behind.

use std::time::Duration;

use kite_e2e::*;

#[test]
fn output_reaches_stdout_and_stderr_separately() {
    require_setup();
    let id = unique_id("output");
    let out = run(
        &id,
        &[],
        &["sh", "-c", "echo to-out; echo to-err >&2"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "to-out\n");
    assert!(
        text(&out.stderr).contains("to-err"),
        "{}",
        text(&out.stderr)
    );
    assert!(!text(&out.stdout).contains("to-err"));
    assert_no_leaks(&id);
}

#[test]
fn the_process_runs_in_a_vm_with_its_own_kernel() {
    require_setup();
    let id = unique_id("kernel");
    let out = run(&id, &[], &["uname", "-r"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let guest = text(&out.stdout).trim().to_string();
    let host = nix::sys::utsname::uname()
        .unwrap()
        .release()
        .to_string_lossy()
        .into_owned();
    assert!(guest.contains("cloud-amd64"), "guest kernel {guest:?}");
    assert_ne!(guest, host, "the container saw the host's kernel");
    assert_no_leaks(&id);
}

#[test]
fn stdin_is_relayed_and_closed() {
    require_setup();
    let id = unique_id("stdin");
    let data: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let out = run(&id, &[], &["sh", "-c", "wc -c; echo done"], Some(&data));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).split_whitespace().collect::<Vec<_>>(),
        ["200000", "done"]
    );
    assert_no_leaks(&id);
}

#[test]
fn large_output_arrives_whole() {
    require_setup();
    let id = unique_id("bigout");
    // 4 MiB through the pull-based relay: nothing lost, nothing reordered.
    let out = run(&id, &[], &["sh", "-c", "seq 1 500000"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 500_000);
    assert_eq!(lines[0], "1");
    assert_eq!(lines[499_999], "500000");
    assert_no_leaks(&id);
}

#[test]
fn exit_codes_are_passed_through() {
    require_setup();
    let id = unique_id("exit");
    let out = run(&id, &[], &["sh", "-c", "exit 7"], None);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_no_leaks(&id);
}

#[test]
fn sigkill_gives_137_and_sigterm_reaches_the_process() {
    require_setup();
    let id = unique_id("kill");
    let child = spawn_running(&id, &["sleep", "1000"]);
    let out = ctr(&["task", "kill", "-s", "SIGKILL", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let done = child.wait_with_output().unwrap();
    assert_eq!(done.status.code(), Some(137), "{}", text(&done.stderr));
    assert_no_leaks(&id);

    let id = unique_id("term");
    let script = "trap 'echo got-term; exit 3' TERM; echo ready; while true; do sleep 0.1; done";
    let child = spawn_running(&id, &["sh", "-c", script]);
    std::thread::sleep(Duration::from_millis(500));
    let out = ctr(&["task", "kill", "-s", "SIGTERM", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let done = child.wait_with_output().unwrap();
    assert_eq!(done.status.code(), Some(3), "{}", text(&done.stderr));
    assert!(
        text(&done.stdout).contains("got-term"),
        "{}",
        text(&done.stdout)
    );
    assert_no_leaks(&id);
}

#[test]
fn exec_runs_in_the_same_container() {
    require_setup();
    let id = unique_id("exec");
    run_detached(&id, &[], &["sh", "-c", "echo marker > /tmp/m; sleep 1000"]);
    wait_running(&id);
    let out = ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        &id,
        "sh",
        "-c",
        "cat /tmp/m; echo err >&2; exit 5",
    ]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "marker\n");
    assert!(text(&out.stderr).contains("err"));
    let pids = ctr(&["task", "ps", &id]);
    assert!(pids.status.success(), "{}", text(&pids.stderr));
    assert!(
        text(&pids.stdout).lines().count() >= 2,
        "{}",
        text(&pids.stdout)
    );
    let metrics = ctr(&["task", "metrics", &id]);
    assert!(metrics.status.success(), "{}", text(&metrics.stderr));
    assert!(
        text(&metrics.stdout).contains("memory"),
        "{}",
        text(&metrics.stdout)
    );
    force_remove(&id);
    assert_no_leaks(&id);
}

#[test]
fn a_tty_is_a_pty_in_the_guest() {
    require_setup();
    let id = unique_id("tty");
    // ctr needs a terminal of its own for -t: script(1) gives it one. The outer terminal's
    // size (set inside script's pty) must reach the guest's pty; ctr resizes after Start (as
    // with runc), hence the pause before reading it.
    let cmd = format!(
        "stty cols 123 rows 45; \
         ctr run --rm -t --runtime {RUNTIME} {IMAGE} {id} sh -c 'tty; sleep 1; stty size; exit 4'"
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(stdout.contains("/dev/pts/"), "{stdout}");
    assert!(
        stdout.contains("45 123"),
        "terminal size not passed on: {stdout}"
    );
    assert_eq!(out.status.code(), Some(4), "{stdout}");
    assert_no_leaks(&id);
}

#[test]
fn two_containers_start_at_once() {
    require_setup();
    let ids = [unique_id("pair-a"), unique_id("pair-b")];
    let handles: Vec<_> = ids
        .iter()
        .cloned()
        .map(|id| {
            std::thread::spawn(move || run(&id, &[], &["sh", "-c", "echo hi-$(hostname)"], None))
        })
        .collect();
    for h in handles {
        let out = h.join().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stdout).starts_with("hi-"));
    }
    for id in &ids {
        assert_no_leaks(id);
    }
}

#[test]
fn cwd_env_mounts_and_limits_follow_the_spec() {
    require_setup();
    let id = unique_id("spec");
    let host_dir = std::env::temp_dir().join(format!("kite-e2e-mount-{}", std::process::id()));
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(host_dir.join("f"), "from-host\n").unwrap();
    let mount = format!(
        "type=bind,src={},dst=/host,options=rbind:ro",
        host_dir.display()
    );
    let out = run(
        &id,
        &[
            "--cwd",
            "/tmp",
            "--env",
            "KITE_E2E=yes",
            "--mount",
            &mount,
            "--memory-limit",
            "134217728",
        ],
        &[
            "sh",
            "-c",
            "pwd; echo $KITE_E2E; cat /host/f; touch /host/x 2>/dev/null || echo read-only; \
             free -m | awk '/Mem:/{print ($2 > 300) ? \"big-enough\" : \"too-small \" $2}'",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "/tmp\nyes\nfrom-host\nread-only\nbig-enough\n",
        "{}",
        text(&out.stderr)
    );
    assert!(!host_dir.join("x").exists());
    assert_no_leaks(&id);
}

#[test]
fn exec_takes_its_own_user() {
    require_setup();
    let id = unique_id("user");
    run_detached(&id, &[], &["sleep", "1000"]);
    wait_running(&id);
    let out = ctr(&[
        "task",
        "exec",
        "--exec-id",
        "u",
        "--user",
        "65534",
        &id,
        "id",
        "-u",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "65534\n");
    force_remove(&id);
    assert_no_leaks(&id);
}

#[test]
fn kill_all_reaches_every_process() {
    require_setup();
    let id = unique_id("killall");
    let child = spawn_running(&id, &["sh", "-c", "sleep 1000 & sleep 1000; wait"]);
    let out = ctr(&["task", "kill", "--all", "-s", "SIGKILL", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let done = child.wait_with_output().unwrap();
    assert_eq!(done.status.code(), Some(137), "{}", text(&done.stderr));
    assert_no_leaks(&id);
}

#[test]
fn an_oom_kill_is_reported() {
    require_setup();
    let id = unique_id("oom");
    let mut events = std::process::Command::new("ctr")
        .arg("events")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // tail keeps the whole newline-free input: far more than the 32 MiB limit.
    let out = run(
        &id,
        &["--memory-limit", "33554432"],
        &[
            "sh",
            "-c",
            "head -c 200000000 /dev/zero | tail; echo survived",
        ],
        None,
    );
    std::thread::sleep(Duration::from_millis(500));
    let _ = events.kill();
    let seen = events.wait_with_output().unwrap();
    // Only the greedy process is killed; the container's init goes on.
    assert!(
        text(&out.stdout).contains("survived"),
        "{}",
        text(&out.stderr)
    );
    let log = text(&seen.stdout);
    assert!(
        log.lines()
            .any(|l| l.contains("/tasks/oom") && l.contains(&id)),
        "no OOM event for {id}:\n{log}"
    );
    assert_no_leaks(&id);
}

#[test]
fn the_seccomp_profile_is_applied_in_the_guest() {
    require_setup();
    let id = unique_id("seccomp");
    let out = run(
        &id,
        &["--seccomp"],
        &["grep", "Seccomp:", "/proc/self/status"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Mode 2: a filter is installed, as runc does with the same spec.
    assert_eq!(
        text(&out.stdout).split_whitespace().collect::<Vec<_>>(),
        ["Seccomp:", "2"]
    );
    assert_no_leaks(&id);
}

#[test]
fn update_changes_the_guest_cgroup() {
    use containerd_shim_protos::api::UpdateTaskRequest;
    use containerd_shim_protos::protobuf::well_known_types::any::Any;
    use containerd_shim_protos::protobuf::MessageField;

    require_setup();
    let id = unique_id("update");
    run_detached(&id, &[], &["sleep", "1000"]);
    wait_running(&id);
    // ctr 1.6 cannot send Update: call the shim's Task API the way containerd does.
    let address_file =
        format!("/run/containerd/io.containerd.runtime.v2.task/default/{id}/address");
    let address = std::fs::read_to_string(&address_file).unwrap();
    let client = ttrpc::Client::connect(address.trim()).unwrap();
    let task = containerd_shim_protos::TaskClient::new(client);
    let limit: u64 = 96 * 1024 * 1024;
    let req = UpdateTaskRequest {
        id: id.clone(),
        resources: MessageField::some(Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
            value: format!("{{\"memory\":{{\"limit\":{limit}}}}}").into_bytes(),
            ..Default::default()
        }),
        ..Default::default()
    };
    task.update(ttrpc::context::with_timeout(30_000_000_000), &req)
        .unwrap();
    let metrics = ctr(&["task", "metrics", &id]);
    assert!(metrics.status.success(), "{}", text(&metrics.stderr));
    let shown = text(&metrics.stdout);
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("memory.limit_in_bytes") && l.contains(&limit.to_string())),
        "{shown}"
    );
    force_remove(&id);
    assert_no_leaks(&id);
}
