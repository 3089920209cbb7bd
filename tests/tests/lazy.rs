//! Lazy pulling through kite-snapshotter, against the real registry and containerd's CRI: an
//! image converted to eStargz (`kite-snapshotter convert`) is pulled without downloading its
//! layer (the layer is a FUSE mount whose reads fetch verified chunks), runs under runc and
//! under kite, and every file reads back exactly as from a normal pull of the original image;
//! the prefetch API fetches its start-up files ahead of the pull; a snapshotter restart mounts
//! it again.
//! One test: it removes and pulls an image the steps share.

use std::process::Command;
use std::time::Duration;

use kite_e2e::cri::{status_message, Cri, RemoveOnDrop, KITE, RUNC};
use kite_e2e::{require_setup, IMAGE};

const LAZY_IMAGE: &str = "127.0.0.1:5000/kite/busybox-esgz:e2e";
const SNAPSHOTTER: &str = "/usr/local/bin/kite-snapshotter";

/// Every non-directory of the root filesystem (this mount only) with its type, mode, size,
/// link count, owner, modification time and symlink target, and the checksum of each singly
/// linked file and of busybox (every other hard link of the image is busybox). The files the
/// CRI bind-mounts are left out.
const LISTING: &str = "cd / && \
    find . -xdev ! -type d ! -path ./etc/hosts ! -path ./etc/hostname ! -path ./etc/resolv.conf \
      | sort | xargs stat -c '%n|%F|%a|%s|%h|%u:%g|%Y|%N' && \
    find . -xdev -type f -links 1 ! -path ./etc/hosts ! -path ./etc/hostname \
      ! -path ./etc/resolv.conf | sort | xargs sha256sum && sha256sum bin/busybox";

fn metric(name: &str) -> u64 {
    let out = Command::new("curl")
        .args(["-sf", "http://127.0.0.1:9471/metrics"])
        .output()
        .expect("curl the snapshotter's metrics");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("kite_snapshotter_{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} not in:\n{text}"))
}

fn lazy_mounts() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(" - fuse.kite "))
        .count()
}

/// Runs a pod with `handler`, a container of `image` sleeping in it, and returns the listing
/// from inside it.
async fn listing(c: &mut Cri, handler: &str, image: &str, name: &str) -> String {
    let (pod, id) = start_lister(c, handler, image, name).await;
    let _cleanup = RemoveOnDrop(pod.clone());
    let out = list_in(c, &id).await;
    c.remove_pod(&pod)
        .await
        .unwrap_or_else(|e| panic!("remove pod {name}: {}", status_message(&e)));
    out
}

/// A pod with `handler` and a container of `image` sleeping in it: (pod id, container id).
async fn start_lister(c: &mut Cri, handler: &str, image: &str, name: &str) -> (String, String) {
    let pod = c
        .run_pod(name, handler, &[])
        .await
        .unwrap_or_else(|e| panic!("run pod {name}: {}", status_message(&e)));
    let id = c
        .run_container(&pod, "lister", 0, image, &["sleep", "3600"])
        .await;
    (pod.id, id)
}

async fn list_in(c: &mut Cri, id: &str) -> String {
    let (code, out, err) = c
        .exec_sync(id, &["sh", "-c", LISTING], Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("exec in {id}: {}", status_message(&e)));
    assert_eq!(code, 0, "listing in {id} failed: {err}");
    out
}

/// Runs hack/snapshotter.sh `action`.
async fn script(action: &'static str) {
    tokio::task::spawn_blocking(move || kite_e2e::snapshotter_script(action))
        .await
        .unwrap();
}

/// Runs hack/snapshotter.sh `action`, then waits until containerd reaches the snapshotter.
async fn snapshotter(action: &'static str) {
    script(action).await;
    tokio::task::spawn_blocking(kite_e2e::wait_snapshotter_reachable)
        .await
        .unwrap();
}

/// Empties the page cache, so the next reads of the lazy layer go to its FUSE server.
async fn drop_page_cache() {
    tokio::task::spawn_blocking(|| std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_converted_image_starts_lazily_and_reads_back_exactly() {
    tokio::task::spawn_blocking(require_setup).await.unwrap();

    // 1. Convert: busybox to eStargz, busybox first (the prefetch landmark after it).
    let out = Command::new(SNAPSHOTTER)
        .args(["convert", "--prioritize", "bin/busybox", IMAGE, LAZY_IMAGE])
        .output()
        .expect("run kite-snapshotter convert");
    assert!(
        out.status.success(),
        "convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(printed.contains("TOC sha256:"), "{printed}");
    let layer = printed
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .expect("the converted layer's digest")
        .to_string();

    // 2. Prefetch ahead of the pull, as the node agent does when a pod is bound: the TOC and
    //    busybox (the prioritized file) are fetched now.
    let mut c = Cri::connect().await;
    let _ = c.remove_image(LAZY_IMAGE).await;
    let prefetches = metric("prefetches_total");
    let out = Command::new(SNAPSHOTTER)
        .args(["prefetch", LAZY_IMAGE])
        .output()
        .expect("run kite-snapshotter prefetch");
    let progress = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "prefetch: {progress}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last: serde_json::Value =
        serde_json::from_str(progress.lines().last().expect("progress lines")).unwrap();
    assert_eq!(last["state"], "done", "{progress}");
    assert_eq!(last["lazy_layers"], 1, "{progress}");
    assert!(
        last["prefetched_bytes"].as_u64().unwrap() > 1 << 20,
        "{progress}"
    );
    assert_eq!(metric("prefetches_total"), prefetches + 1);
    let bad = Command::new(SNAPSHOTTER)
        .args(["prefetch", "127.0.0.1:5000/kite/no-such-image:1"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let said = String::from_utf8_lossy(&bad.stderr).into_owned();
    assert!(said.contains("no-such-image"), "{said}");

    // 3. Pull through the CRI, from scratch: the layer is mounted, not downloaded.
    let mounted_before = metric("lazy_layers_mounted");
    c.pull(IMAGE)
        .await
        .unwrap_or_else(|e| panic!("pull {IMAGE}: {}", status_message(&e)));
    c.pull(LAZY_IMAGE)
        .await
        .unwrap_or_else(|e| panic!("pull {LAZY_IMAGE}: {}", status_message(&e)));
    assert_eq!(metric("lazy_layers_mounted"), mounted_before + 1);
    assert!(lazy_mounts() >= 1, "no fuse.kite mount");
    let content = kite_e2e::ctr(&["-n", "k8s.io", "content", "ls", "-q"]);
    let content = String::from_utf8_lossy(&content.stdout).into_owned();
    assert!(
        !content.contains(&layer),
        "containerd downloaded the lazy layer {layer}"
    );

    // 4. The same files, byte for byte, as a normal pull of the original image: under runc
    //    over the lazy layer, and under kite (virtio-fs of that overlay).
    let normal = listing(&mut c, RUNC, IMAGE, "lazy-normal").await;
    assert!(normal.contains("./bin/busybox|regular file"), "{normal}");
    let lazy_runc = listing(&mut c, RUNC, LAZY_IMAGE, "lazy-runc").await;
    assert_eq!(lazy_runc, normal, "runc over the lazy layer differs");
    let lazy_kite = listing(&mut c, KITE, LAZY_IMAGE, "lazy-kite").await;
    assert_eq!(lazy_kite, normal, "kite over the lazy layer differs");
    // Served through the chunk cache (fetched now, or by an earlier run: it persists).
    assert!(metric("chunk_cache_hits_total") + metric("fetched_chunks_total") > 0);
    assert!(metric("chunk_cache_bytes") > 0);
    assert_eq!(metric("fetch_errors_total"), 0);

    // 5. Restarts: a container running over the lazy layer keeps reading it (kite-lazyfs
    //    serves it while kite-snapshotter restarts, gracefully or after a crash), and new
    //    containers start from it.
    let (running_pod, running) = start_lister(&mut c, RUNC, LAZY_IMAGE, "lazy-running").await;
    let _running_cleanup = RemoveOnDrop(running_pod.clone());
    snapshotter("restart").await;
    assert_eq!(metric("lazy_layers_mounted"), mounted_before + 1);
    drop_page_cache().await;
    assert_eq!(
        list_in(&mut c, &running).await,
        normal,
        "a running container's lazy layer after a restart"
    );
    let killed = Command::new("pkill")
        .args(["-KILL", "-x", "kite-snapshotte"])
        .status()
        .unwrap();
    assert!(killed.success(), "kill kite-snapshotter");
    snapshotter("start").await;
    drop_page_cache().await;
    assert_eq!(
        list_in(&mut c, &running).await,
        normal,
        "a running container's lazy layer after a crash"
    );
    c.remove_pod(&running_pod).await.unwrap();
    let after_restart = listing(&mut c, RUNC, LAZY_IMAGE, "lazy-restarted").await;
    assert_eq!(
        after_restart, normal,
        "the lazy layer differs after a restart"
    );
    // kite-lazyfs itself stopped (an upgrade): the snapshotter mounts the layer again when it
    // starts, from the saved TOC.
    script("stop-all").await;
    snapshotter("start").await;
    assert_eq!(metric("lazy_layers_mounted"), mounted_before + 1);
    let after_lazyfs = listing(&mut c, RUNC, LAZY_IMAGE, "lazy-remounted").await;
    assert_eq!(
        after_lazyfs, normal,
        "the lazy layer after kite-lazyfs restarted"
    );

    // kite-lazyfs killed while the snapshotter runs: a new container over the layer right
    //    after finds it mounted again (not a dead FUSE mount), and reads it exactly.
    let killed = Command::new("pkill")
        .args(["-KILL", "-x", "kite-lazyfs"])
        .status()
        .unwrap();
    assert!(killed.success(), "kill kite-lazyfs");
    let after_kill = listing(&mut c, RUNC, LAZY_IMAGE, "lazy-after-kill").await;
    assert_eq!(
        after_kill, normal,
        "the lazy layer after kite-lazyfs was killed"
    );
    assert_eq!(metric("lazy_layers_mounted"), mounted_before + 1);

    // 6. Removing the image removes its snapshots, and with them the lazy mount.
    c.remove_image(LAZY_IMAGE)
        .await
        .unwrap_or_else(|e| panic!("remove {LAZY_IMAGE}: {}", status_message(&e)));
    assert_eq!(metric("lazy_layers_mounted"), mounted_before);
}
