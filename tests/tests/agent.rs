//! kite-agent against the real containerd CRI, QEMU, CNI and registry: pods from v1/Pod
//! manifests (kite and runc), HTTP readiness on the pod IP, kitectl's verbs, in-place updates
//! that keep the VM, IP and emptyDir, rollback, crash-loop back-off, liveness restarts, the
//! agent's own death (kill -9) while pods run and start, bad manifests, and deletion during a
//! start. Each test runs an agent of its own (own socket, state, CRI label).

use std::time::{Duration, Instant};

use kite_e2e::agent::*;
use kite_e2e::cri::http_get;
use kite_e2e::{assert_no_leaks, require_setup};
use kite_protocol::node::{Pod, PodRef, UpdateContainerRequest};

const LIMIT: Duration = Duration::from_secs(120);

async fn setup() {
    tokio::task::spawn_blocking(require_setup).await.unwrap();
}

fn ready(p: &Pod) -> bool {
    p.ready
}

async fn serves(pod: &Pod, body: &str) {
    let got = http_get(&format!("{}:8080", pod.ip), "/", Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("pod {}: {e}", pod.name));
    assert_eq!(got.trim(), body, "pod {} serves", pod.name);
}

/// The pod is gone: not in the agent, no sandbox of it in the CRI, nothing of its VM left.
async fn assert_gone(agent: &TestAgent, pod: &Pod) {
    assert!(
        agent.get(&pod.name).await.is_none(),
        "pod {} still listed",
        pod.name
    );
    let left: Vec<_> = agent_sandboxes(&agent.id)
        .await
        .into_iter()
        .filter(|s| s.labels.get("kite.io/pod-uid") == Some(&pod.uid))
        .collect();
    assert!(
        left.is_empty(),
        "sandboxes of pod {} left: {left:?}",
        pod.name
    );
    if !pod.sandbox_id.is_empty() {
        let id = pod.sandbox_id.clone();
        tokio::task::spawn_blocking(move || assert_no_leaks(&id))
            .await
            .unwrap();
    }
    assert!(
        !agent
            .dir
            .path()
            .join("state/volumes")
            .join(&pod.uid)
            .exists(),
        "emptyDir of pod {} left",
        pod.name
    );
}

fn event_reasons(p: &Pod) -> Vec<String> {
    p.events.iter().map(|e| e.reason.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_run_as_kite_and_runc_pods_ready_by_http_probe_through_kitectl() {
    setup().await;
    let agent = TestAgent::start("run");
    for runtime in ["kite", "runc"] {
        let name = format!("web-{runtime}");
        let manifest = web_manifest(&name, runtime, WEB_V1);
        let out = agent.kitectl_ok(&["run", "-f", "-"], Some(&manifest));
        // The stages were shown as they completed, and the end.
        for stage in ["sandbox", "pull", "create/web", "start/web", "ready"] {
            assert!(out.contains(stage), "kitectl run shows {stage}: {out}");
        }
        assert!(out.contains(&format!("pod/{name} ready in")), "{out}");
        let pod = agent.get(&name).await.expect("the pod");
        assert!(pod.ready && !pod.ip.is_empty(), "{pod:#?}");
        assert_eq!(pod.runtime_class, runtime);
        serves(&pod, "v1").await;
        // The pod's own hostname resolves to its IP (a kubelet-like /etc/hosts).
        let hosts = agent.kitectl_ok(&["exec", &name, "--", "cat", "/etc/hosts"], None);
        assert!(
            hosts.contains(&format!("{}\t{name}\n", pod.ip)) && hosts.contains("localhost"),
            "{hosts}"
        );
        if runtime == "kite" {
            // The start's parallel order: the fetch did not wait for the sandbox.
            let stage = |n: &str| {
                pod.stages
                    .iter()
                    .find(|s| s.name == n)
                    .unwrap_or_else(|| panic!("{n}: {:?}", pod.stages))
                    .clone()
            };
            assert_eq!(
                stage("pull").start_ms,
                stage("sandbox").start_ms,
                "{:?}",
                pod.stages
            );
            assert!(
                stage("sandbox").detail.contains("VM boot"),
                "{:?}",
                pod.stages
            );
            assert!(!qemu_pid(&pod.sandbox_id).is_empty());
        }

        let table = agent.kitectl_ok(&["get", "pods"], None);
        let row = table
            .lines()
            .find(|l| l.starts_with(&name))
            .unwrap_or_else(|| panic!("{table}"));
        assert!(row.contains("1/1") && row.contains("Running"), "{table}");
        let yaml = agent.kitectl_ok(&["get", "pod", &name, "-o", "yaml"], None);
        assert!(
            yaml.contains("kind: Pod") && yaml.contains(&format!("podIP: {}", pod.ip)),
            "{yaml}"
        );
        let json = agent.kitectl_ok(&["get", "pods", "-o", "json"], None);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["items"].as_array().unwrap().len(), 1, "{json}");
        let described = agent.kitectl_ok(&["describe", "pod", &name], None);
        for expected in [
            "Start (ms from the bind",
            "█",
            "Scheduled",
            "Ready",
            &pod.ip,
        ] {
            assert!(
                described.contains(expected),
                "describe shows {expected}: {described}"
            );
        }
        let logs = agent.kitectl_ok(&["logs", &name], None);
        assert_eq!(logs.trim(), "serving v1", "{logs}");
        let exec = agent.kitectl_ok(&["exec", &name, "--", "cat", "/www/index.html"], None);
        assert_eq!(exec.trim(), "v1");
        let failed = agent.kitectl(&["exec", &name, "--", "sh", "-c", "exit 7"], None);
        assert_eq!(failed.status.code(), Some(7));

        let out = agent.kitectl_ok(&["delete", "pod", &name], None);
        assert!(out.contains("deleted"), "{out}");
        assert_gone(&agent, &pod).await;
    }
    let err = agent.kitectl(&["describe", "pod", "nope"], None);
    assert!(!err.status.success());
    assert_eq!(
        kite_e2e::text(&err.stderr).trim(),
        "error: pod default/nope not found"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_update_keeps_vm_ip_and_volume_and_a_broken_image_rolls_back() {
    setup().await;
    let agent = TestAgent::start("update");
    let manifest = web_manifest("app", "kite", WEB_V1);
    agent.kitectl_ok(&["run", "-f", "-"], Some(&manifest));
    let before = agent.get("app").await.unwrap();
    serves(&before, "v1").await;
    let qemu = qemu_pid(&before.sandbox_id);
    agent.kitectl_ok(
        &["exec", "app", "--", "sh", "-c", "echo kept > /data/f"],
        None,
    );

    // An image whose command does not exist: rolled back to v1, with the reason.
    let out = agent.kitectl(
        &["set", "image", "pod/app", &format!("web={WEB_BROKEN}")],
        None,
    );
    assert!(
        !out.status.success(),
        "the update must fail: {}",
        kite_e2e::text(&out.stdout)
    );
    let err = kite_e2e::text(&out.stderr);
    assert!(
        err.contains("rolled back") && err.contains("no/such/command"),
        "{err}"
    );
    let back = agent.wait_pod("app", LIMIT, ready).await;
    assert_eq!(back.containers[0].image, WEB_V1);
    assert!(
        event_reasons(&back).contains(&"RolledBack".to_string()),
        "{:?}",
        back.events
    );
    assert_eq!(
        (back.sandbox_id.as_str(), back.ip.as_str()),
        (before.sandbox_id.as_str(), before.ip.as_str())
    );
    serves(&back, "v1").await;

    // v2 in place: same VM (QEMU pid), same IP, the emptyDir kept, the answer changes.
    let out = agent.kitectl_ok(&["set", "image", "pod/app", &format!("web={WEB_V2}")], None);
    assert!(out.contains("updated in place"), "{out}");
    for stage in [
        "update/pull",
        "update/stop",
        "update/create/web",
        "update/start/web",
        "update/ready",
    ] {
        assert!(out.contains(stage), "{stage}: {out}");
    }
    let after = agent.get("app").await.unwrap();
    assert!(after.ready);
    assert_eq!(after.containers[0].image, WEB_V2);
    assert_eq!(after.sandbox_id, before.sandbox_id);
    assert_eq!(after.ip, before.ip);
    assert_eq!(qemu_pid(&after.sandbox_id), qemu, "the VM was kept");
    serves(&after, "v2").await;
    let kept = agent.kitectl_ok(&["exec", "app", "--", "cat", "/data/f"], None);
    assert_eq!(kept.trim(), "kept");
    // The manifest the agent keeps now names v2 (what a restarted agent would run).
    assert!(
        after.manifest_json.contains("web-v2"),
        "{}",
        after.manifest_json
    );

    // An env update through the API.
    let mut client = agent.client().await;
    let mut stream = client
        .update_container(UpdateContainerRequest {
            pod: Some(PodRef {
                namespace: "default".into(),
                name: "app".into(),
            }),
            container: "web".into(),
            env: [("GREETING".to_string(), "hi".to_string())].into(),
            watch: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    use futures::StreamExt;
    while let Some(u) = stream.next().await {
        u.unwrap();
    }
    let env = agent.kitectl_ok(&["exec", "app", "--", "sh", "-c", "echo $GREETING"], None);
    assert_eq!(env.trim(), "hi");
    assert_eq!(qemu_pid(&after.sandbox_id), qemu);

    agent.kitectl_ok(&["delete", "pod", "app"], None);
    assert_gone(&agent, &after).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loops_back_off_and_liveness_failures_restart() {
    setup().await;
    let agent = TestAgent::start("backoff");
    let crash = r#"apiVersion: v1
kind: Pod
metadata: {name: crash}
spec:
  runtimeClassName: runc
  containers:
  - name: c
    image: 127.0.0.1:5000/kite/busybox:latest
    command: [sh, -c, "echo run; exit 3"]
"#;
    let live = r#"apiVersion: v1
kind: Pod
metadata: {name: live}
spec:
  runtimeClassName: runc
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: 127.0.0.1:5000/kite/busybox:latest
    command: [sleep, "1000"]
    livenessProbe:
      tcpSocket: {port: 9999}
      periodSeconds: 1
      failureThreshold: 2
"#;
    agent.run_nowait(crash).await.unwrap();
    agent.run_nowait(live).await.unwrap();
    let pod = agent
        .wait_pod("crash", LIMIT, |p| {
            p.containers.first().is_some_and(|c| c.restart_count >= 3)
        })
        .await;
    // Starts of the container: back-off delays of 1 s, 2 s, 4 s between its ends and restarts.
    let starts: Vec<i64> = pod
        .events
        .iter()
        .filter(|e| e.reason == "Started")
        .map(|e| e.unix_ms)
        .collect();
    assert!(starts.len() >= 4, "{:?}", pod.events);
    let gaps: Vec<i64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    for (gap, delay) in gaps.iter().zip([1000, 2000, 4000]) {
        assert!(
            *gap >= delay,
            "restart after {gap} ms, before its back-off of {delay} ms: {gaps:?}"
        );
        assert!(
            *gap < delay + 3000,
            "restart after {gap} ms, long after its back-off of {delay} ms: {gaps:?}"
        );
    }
    let backoffs = pod.events.iter().filter(|e| e.reason == "BackOff").count();
    assert!(backoffs >= 3, "{:?}", pod.events);
    let table = agent.kitectl_ok(&["get", "pods"], None);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("crash")
                && (l.contains("CrashLoopBackOff") || l.contains("Running"))),
        "{table}"
    );
    let previous = agent.kitectl_ok(&["logs", "crash", "-p"], None);
    assert_eq!(previous.trim(), "run");

    let live = agent
        .wait_pod("live", LIMIT, |p| {
            p.containers.first().is_some_and(|c| c.restart_count >= 1)
        })
        .await;
    let reasons = event_reasons(&live);
    assert!(
        reasons.contains(&"Unhealthy".to_string()) && reasons.contains(&"Killing".to_string()),
        "{reasons:?}"
    );

    for p in [pod, live] {
        agent.kitectl_ok(&["delete", "pod", &p.name, "--grace-period", "0"], None);
        assert_gone(&agent, &p).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_killed_while_pods_run_and_start_is_replaced_without_disturbing_them() {
    setup().await;
    let mut agent = TestAgent::start("kill9");
    agent.kitectl_ok(
        &["run", "-f", "-"],
        Some(&web_manifest("vm", "kite", WEB_V1)),
    );
    let vm = agent.get("vm").await.unwrap();
    let qemu = qemu_pid(&vm.sandbox_id);
    // Pods still starting when the agent dies: a runc one, and a kite one whose VM is booting
    // (its RunPodSandbox completes after the next agent has started the pod again).
    for (name, runtime) in [("starting", "runc"), ("booting", "kite")] {
        agent
            .run_nowait(&web_manifest(name, runtime, WEB_V1))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    agent.kill9();
    serves(&vm, "v1").await;

    agent.spawn();
    let adopted = agent.wait_pod("vm", LIMIT, ready).await;
    assert_eq!(adopted.sandbox_id, vm.sandbox_id, "adopted, not remade");
    assert_eq!(qemu_pid(&adopted.sandbox_id), qemu);
    assert!(event_reasons(&adopted).contains(&"Adopted".to_string()));
    let started = agent.wait_pod("starting", LIMIT, ready).await;
    serves(&started, "v1").await;
    let booted = agent.wait_pod("booting", LIMIT, ready).await;
    serves(&booted, "v1").await;
    // One sandbox per pod: nothing duplicated (a stray is removed within seconds).
    let t = Instant::now();
    loop {
        let sandboxes = agent_sandboxes(&agent.id).await;
        if sandboxes.len() == 3 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{sandboxes:#?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    agent.kitectl_ok(&["delete", "pod", "booting"], None);
    assert_gone(&agent, &booted).await;

    // Killed again while both run: both keep serving and are adopted as they are.
    agent.kill9();
    serves(&adopted, "v1").await;
    serves(&started, "v1").await;
    agent.spawn();
    for p in [&adopted, &started] {
        let again = agent.wait_pod(&p.name, LIMIT, ready).await;
        assert_eq!(again.sandbox_id, p.sandbox_id);
        assert_eq!(
            again.containers[0].container_id,
            p.containers[0].container_id
        );
    }
    // A graceful stop leaves them running too.
    agent.stop();
    serves(&adopted, "v1").await;
    agent.spawn();
    for p in [adopted, started] {
        agent.wait_pod(&p.name, LIMIT, ready).await;
        agent.kitectl_ok(&["delete", "pod", &p.name], None);
        assert_gone(&agent, &p).await;
    }
    assert!(agent_sandboxes(&agent.id).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_manifests_and_missing_images_get_clear_errors() {
    setup().await;
    let agent = TestAgent::start("bad");
    let good = web_manifest("bad", "runc", WEB_V1);
    for (manifest, expected) in [
        (
            good.replace("    image: ", "    imagee: x\n    image: "),
            "spec.containers[0].imagee: unknown field",
        ),
        (
            good.replace("memory: 32Mi", "memory: 32Zi"),
            "spec.containers[0].resources.requests.memory: \"32Zi\" is not a quantity",
        ),
        (
            good.replace(&format!("    image: {WEB_V1}\n"), ""),
            "spec.containers[0].image: required",
        ),
        (
            good.replace("  volumes:", "  hostNetwork: true\n  volumes:"),
            "spec.hostNetwork: not supported by kite",
        ),
        (
            good.replace("cpu: 100m", "cpu: \"64\"")
                .replace("cpu: \"1\"", "cpu: \"64\""),
            "does not fit on this node: it requests cpu 64000m",
        ),
    ] {
        let out = agent.kitectl(&["run", "-f", "-"], Some(&manifest));
        assert!(!out.status.success());
        let err = kite_e2e::text(&out.stderr);
        assert!(err.contains(expected), "expected {expected:?} in: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
    assert!(agent.get("bad").await.is_none(), "nothing admitted");

    // An image the registry does not have: the pod fails with the reason, nothing is left.
    let missing = good.replace(WEB_V1, "127.0.0.1:5000/kite/no-such-image:latest");
    let out = agent.kitectl(&["run", "-f", "-"], Some(&missing));
    assert!(!out.status.success());
    let err = kite_e2e::text(&out.stderr);
    assert!(
        err.contains("no-such-image") && err.contains("did not become ready"),
        "{err}"
    );
    let pod = agent.wait_pod("bad", LIMIT, |p| p.phase == "Failed").await;
    assert!(pod.message.contains("no-such-image"), "{}", pod.message);
    assert!(
        agent_sandboxes(&agent.id).await.is_empty(),
        "a failed start keeps no sandbox"
    );
    agent.kitectl_ok(&["delete", "pod", "bad"], None);
    assert_gone(&agent, &pod).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_deleted_while_it_starts_leaves_nothing() {
    setup().await;
    let agent = TestAgent::start("delstart");
    // `kitectl run` watching the start: its stream must end when the pod is deleted.
    let mut watching = tokio::process::Command::new(KITECTL)
        .arg("--socket")
        .arg(agent.socket())
        .args(["run", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = watching.stdin.take().unwrap();
        stdin
            .write_all(web_manifest("early", "kite", WEB_V1).as_bytes())
            .await
            .unwrap();
    }
    let pod = agent.wait_pod("early", LIMIT, |_| true).await;
    // Every sandbox the CRI shows for it while it starts, to check each is gone after.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let watcher = {
        let (seen, id) = (seen.clone(), agent.id.clone());
        tokio::spawn(async move {
            loop {
                for s in agent_sandboxes(&id).await {
                    seen.lock().unwrap().insert(s.id);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let t = Instant::now();
    agent.delete("early", 1).await.unwrap();
    watcher.abort();
    assert!(t.elapsed() < LIMIT);
    let out = tokio::time::timeout(Duration::from_secs(10), watching.wait_with_output())
        .await
        .expect("kitectl run still waits for a pod that was deleted")
        .unwrap();
    assert!(!out.status.success());
    let err = kite_e2e::text(&out.stderr);
    assert!(err.contains("did not become ready"), "{err}");
    assert_gone(&agent, &pod).await;
    let seen: Vec<String> = seen.lock().unwrap().iter().cloned().collect();
    for id in seen {
        tokio::task::spawn_blocking(move || assert_no_leaks(&id))
            .await
            .unwrap();
    }
    assert!(agent_sandboxes(&agent.id).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_whose_vm_dies_starts_again_in_a_new_sandbox() {
    setup().await;
    let agent = TestAgent::start("vmdies");
    agent.kitectl_ok(
        &["run", "-f", "-"],
        Some(&web_manifest("phoenix", "kite", WEB_V1)),
    );
    let before = agent.get("phoenix").await.unwrap();
    let qemu: i32 = qemu_pid(&before.sandbox_id).parse().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let after = agent
        .wait_pod("phoenix", LIMIT, |p| {
            p.ready && !p.sandbox_id.is_empty() && p.sandbox_id != before.sandbox_id
        })
        .await;
    assert!(
        event_reasons(&after).contains(&"SandboxChanged".to_string()),
        "{:?}",
        after.events
    );
    serves(&after, "v1").await;
    let old = before.sandbox_id.clone();
    tokio::task::spawn_blocking(move || assert_no_leaks(&old))
        .await
        .unwrap();
    assert_eq!(agent_sandboxes(&agent.id).await.len(), 1);
    agent.kitectl_ok(&["delete", "pod", "phoenix"], None);
    assert_gone(&agent, &after).await;
}
