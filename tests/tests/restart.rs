//! containerd restarts while a kite task runs: the shim (and the VM) keep going, and a new
//! containerd reconnects to them. Runs alone (it restarts containerd for everyone).

use std::time::Duration;

use kite_e2e::*;

#[test]
fn tasks_survive_a_containerd_restart() {
    require_setup();
    let id = unique_id("restart");
    run_detached(&id, &[], &["sh", "-c", "echo alive > /tmp/a; sleep 1000"]);
    wait_running(&id);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../hack/containerd.sh");
    let st = std::process::Command::new(script)
        .arg("restart")
        .status()
        .unwrap();
    assert!(st.success(), "restart containerd");
    wait_until("task seen again", Duration::from_secs(30), || {
        task_status(&id).as_deref() == Some("RUNNING")
    });
    let out = ctr(&["task", "exec", "--exec-id", "after", &id, "cat", "/tmp/a"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "alive\n");
    force_remove(&id);
    assert_no_leaks(&id);
}
