//! kite-snapshotter as containerd's proxy snapshotter `kite`, for ordinary layers: an image
//! pulled and unpacked through it runs under runc and under kite, snapshots survive a
//! snapshotter restart, and the API behaves as containerd's overlayfs snapshotter does.
//! One test: it restarts the snapshotter, which the other steps use.
use kite_e2e::*;

fn ctr_ok(args: &[&str]) -> String {
    let out = ctr(args);
    assert!(
        out.status.success(),
        "ctr {}: {}",
        args.join(" "),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn run_with(runtime: &str, id: &str) -> String {
    ctr_ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "kite",
        "--runtime",
        runtime,
        IMAGE,
        id,
        "sh",
        "-c",
        "echo written > /tmp/x && cat /tmp/x && ls /bin/busybox",
    ])
}

#[test]
fn images_unpack_and_run_through_the_kite_snapshotter() {
    require_setup();
    ctr_ok(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "kite",
        IMAGE,
    ]);
    let listed = ctr_ok(&["snapshots", "--snapshotter", "kite", "ls"]);
    assert!(listed.contains("Committed"), "{listed}");

    let runc_id = unique_id("snap-runc");
    assert_eq!(
        run_with("io.containerd.runc.v2", &runc_id),
        "written\n/bin/busybox\n"
    );
    let kite_id = unique_id("snap-kite");
    assert_eq!(run_with(RUNTIME, &kite_id), "written\n/bin/busybox\n");
    assert_no_leaks(&kite_id);

    // The container's snapshot was active with the layer as its parent, and is gone with it.
    let after = ctr_ok(&["snapshots", "--snapshotter", "kite", "ls"]);
    assert!(
        !after.contains(&kite_id) && !after.contains(&runc_id),
        "{after}"
    );

    // A restart keeps every snapshot; containers start from them again.
    snapshotter_script("restart");
    wait_snapshotter_reachable();
    let relisted = ctr_ok(&["snapshots", "--snapshotter", "kite", "ls"]);
    assert_eq!(relisted, listed, "snapshots changed across a restart");
    let again = unique_id("snap-again");
    assert_eq!(
        run_with("io.containerd.runc.v2", &again),
        "written\n/bin/busybox\n"
    );

    // Usage of a committed layer, and a clear error for a snapshot that does not exist.
    let layer = relisted
        .lines()
        .skip(1)
        .find(|l| l.contains("Committed"))
        .and_then(|l| l.split_whitespace().next())
        .expect("a committed layer")
        .to_string();
    let usage = ctr_ok(&["snapshots", "--snapshotter", "kite", "usage", &layer]);
    assert!(usage.contains(&layer), "{usage}");
    let missing = ctr(&[
        "snapshots",
        "--snapshotter",
        "kite",
        "info",
        "no-such-snapshot",
    ]);
    assert!(!missing.status.success());
    assert!(
        text(&missing.stderr).contains("no-such-snapshot"),
        "{}",
        text(&missing.stderr)
    );

    // Metrics on the configured port.
    let metrics = std::process::Command::new("curl")
        .args(["-fsS", "http://127.0.0.1:9471/metrics"])
        .output()
        .unwrap();
    let metrics = text(&metrics.stdout);
    assert!(
        metrics.contains("kite_snapshotter_snapshots{kind=\"committed\"}"),
        "{metrics}"
    );
}
