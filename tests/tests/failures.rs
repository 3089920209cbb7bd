//! Failure paths: each must give a clear error at `ctr` and leave nothing behind (no QEMU,
//! virtiofsd, shim, mount or state directory).

use std::time::Duration;

use kite_e2e::*;

fn assert_fails_with(out: &std::process::Output, needles: &[&str]) {
    assert!(!out.status.success(), "expected a failure, got success");
    let stderr = text(&out.stderr);
    for n in needles {
        assert!(stderr.contains(n), "error does not mention {n:?}: {stderr}");
    }
}

#[test]
fn a_missing_kernel_is_named() {
    require_setup();
    let id = unique_id("nokernel");
    let cfg = write_config("nokernel", "kernel_path = \"/nonexistent/vmlinuz\"");
    let cfg = cfg.display().to_string();
    let out = run(&id, &["--runtime-config-path", &cfg], &["true"], None);
    assert_fails_with(&out, &["guest kernel", "/nonexistent/vmlinuz", &id]);
    assert_no_leaks(&id);
}

#[test]
fn a_kernel_that_does_not_boot_is_reported() {
    require_setup();
    let id = unique_id("badkernel");
    let cfg = write_config("badkernel", "kernel_path = \"/etc/hostname\"");
    let cfg = cfg.display().to_string();
    let out = run(&id, &["--runtime-config-path", &cfg], &["true"], None);
    assert_fails_with(&out, &["did not boot", "QEMU exited"]);
    assert_no_leaks(&id);
}

#[test]
fn an_agent_that_never_answers_times_out() {
    require_setup();
    let id = unique_id("noagent");
    // An initrd whose init never serves the agent.
    let dir = std::env::temp_dir().join(format!("kite-e2e-noagent-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("root/bin")).unwrap();
    std::fs::copy("/bin/busybox", dir.join("root/bin/busybox")).unwrap();
    std::fs::write(
        dir.join("root/init"),
        "#!/bin/busybox sh\n/bin/busybox sleep 1000\n",
    )
    .unwrap();
    let st = std::process::Command::new("sh")
        .arg("-c")
        .arg("chmod +x root/init && cd root && find . | cpio -o -H newc --quiet > ../initrd.img")
        .current_dir(&dir)
        .status()
        .unwrap();
    assert!(st.success(), "build the test initrd");
    let cfg = write_config(
        "noagent",
        &format!(
            "initrd_path = \"{}\"\nboot_timeout_secs = 8",
            dir.join("initrd.img").display()
        ),
    );
    let cfg = cfg.display().to_string();
    let out = run(&id, &["--runtime-config-path", &cfg], &["true"], None);
    assert_fails_with(
        &out,
        &["did not boot", "no answer from the guest agent within 8s"],
    );
    assert_no_leaks(&id);
}

#[test]
fn a_missing_binary_is_a_clear_error() {
    require_setup();
    let id = unique_id("nobin");
    let out = run(&id, &[], &["/nonexistent-binary"], None);
    assert_fails_with(&out, &["/nonexistent-binary"]);
    assert_no_leaks(&id);
}

#[test]
fn a_cwd_that_is_not_a_directory_is_a_clear_error() {
    require_setup();
    let id = unique_id("badcwd");
    let out = run(&id, &["--cwd", "/etc/passwd"], &["true"], None);
    assert!(!out.status.success(), "expected a failure");
    assert!(!text(&out.stderr).is_empty());
    assert_no_leaks(&id);
}

#[test]
fn a_malformed_config_is_refused_with_its_path() {
    require_setup();
    let id = unique_id("badcfg");
    let cfg = write_config("badcfg", "default_vcpus = \"many\"");
    let cfg_s = cfg.display().to_string();
    let out = run(&id, &["--runtime-config-path", &cfg_s], &["true"], None);
    assert_fails_with(&out, &[&cfg_s]);
    assert_no_leaks(&id);
}

fn pid_in(id: &str, file: &str) -> i32 {
    let path = std::path::Path::new(STATE_DIR).join(id).join(file);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn killing_qemu_ends_the_task_and_releases_waiters() {
    require_setup();
    let id = unique_id("qemukill");
    let child = spawn_running(&id, &["sleep", "1000"]);
    let qemu = pid_in(&id, "qemu.pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The waiting `ctr run` is released with the VM's death.
    let done = child.wait_with_output().unwrap();
    assert_eq!(done.status.code(), Some(137), "{}", text(&done.stderr));
    assert_no_leaks(&id);
}

#[test]
fn killing_the_shim_is_cleaned_up_by_delete() {
    require_setup();
    let id = unique_id("shimkill");
    run_detached(&id, &[], &["sleep", "1000"]);
    wait_running(&id);
    let shim = leftovers(&id)
        .into_iter()
        .find(|l| l.contains("containerd-shim-kite-v2"))
        .and_then(|l| l.split(':').next().and_then(|p| p.parse::<i32>().ok()))
        .expect("the shim process of the container");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("task stopped", Duration::from_secs(30), || {
        task_status(&id).as_deref() != Some("RUNNING")
    });
    let _ = ctr(&["task", "delete", &id]);
    let out = ctr(&["container", "delete", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_no_leaks(&id);
}

#[test]
fn an_unknown_exec_user_is_a_clear_error() {
    require_setup();
    let id = unique_id("baduser");
    run_detached(&id, &[], &["sleep", "1000"]);
    wait_running(&id);
    let out = ctr(&[
        "task",
        "exec",
        "--exec-id",
        "u",
        "--user",
        "nosuchuser",
        &id,
        "id",
    ]);
    // containerd resolves user names against the image before the runtime sees the process;
    // the failure must leave the running container unharmed.
    assert_fails_with(&out, &["no users found"]);
    let ok = ctr(&["task", "exec", "--exec-id", "ok", &id, "true"]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    force_remove(&id);
    assert_no_leaks(&id);
}
