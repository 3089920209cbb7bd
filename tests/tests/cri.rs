//! Pods through containerd's CRI, driven as a kubelet drives them (k8s-cri): one VM per kite
//! pod, the pod's IP reachable from the host and from other pods, localhost shared by a pod's
//! containers, restarts that keep the VM and IP, CRI log files, exec, stats, and clean-up.

use std::path::Path;
use std::time::Duration;

use kite_e2e::cri::{
    http_get, kite_pod_netns, log_lines, status_message, Cri, RemoveOnDrop, KITE, RUNC,
};
use kite_e2e::{assert_no_leaks, require_setup, IMAGE};

const LIMIT: Duration = Duration::from_secs(90);

/// busybox httpd serving `body` on port 8080, logging `ready` to stdout and `on-stderr` to
/// stderr first.
fn httpd(body: &str) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "mkdir -p /www && echo {body} > /www/index.html && echo ready && \
             echo on-stderr >&2 && exec httpd -f -p 8080 -h /www"
        ),
    ]
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

async fn setup() -> Cri {
    tokio::task::spawn_blocking(require_setup).await.unwrap();
    let mut c = Cri::connect().await;
    c.pull(IMAGE)
        .await
        .unwrap_or_else(|e| panic!("pull {IMAGE}: {}", status_message(&e)));
    c
}

/// Asserts a kite pod left nothing: no QEMU, virtiofsd or shim, no mount, no state, and its
/// network namespace (with the taps and filters in it) is gone.
async fn assert_pod_gone(pod_id: &str, netns: Option<&Path>) {
    let id = pod_id.to_string();
    tokio::task::spawn_blocking(move || assert_no_leaks(&id))
        .await
        .unwrap();
    if let Some(ns) = netns {
        assert!(!ns.exists(), "network namespace {} left", ns.display());
    }
}

/// The host cgroup directory (memory controller, or the v2 tree) the pod's QEMU runs in.
fn vm_cgroup_dir(pod_id: &str) -> std::path::PathBuf {
    let pid = qemu_pid(pod_id);
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let (root, path) = cgroups
        .lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            if controllers.split(',').any(|c| c == "memory") {
                Some(("/sys/fs/cgroup/memory", path.to_string()))
            } else {
                None
            }
        })
        .or_else(|| {
            cgroups
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(|p| ("/sys/fs/cgroup", p.to_string()))
        })
        .unwrap();
    Path::new(root).join(path.trim_start_matches('/'))
}

fn qemu_pid(pod_id: &str) -> String {
    std::fs::read_to_string(Path::new(kite_e2e::STATE_DIR).join(pod_id).join("qemu.pid"))
        .unwrap_or_else(|e| panic!("pod {pod_id} has no QEMU pid file: {e}"))
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kite_pod_serves_on_its_ip_logs_execs_and_leaves_nothing() {
    let mut c = setup().await;
    // A pod cgroup as a kubelet makes one. The VM is the pod's own (not the warm pool's): all
    // of its memory is charged to the pod (tests/tests/pool.rs covers adopted VMs).
    let parent = format!("/kite-e2e-pod-{}", std::process::id());
    let pod = c
        .run_pod_in("web", KITE, &[("io.kite.warm-pool", "false")], &parent)
        .await
        .unwrap_or_else(|e| {
            panic!("run a kite pod: {}", status_message(&e));
        });
    let _pod_guard = RemoveOnDrop(pod.id.clone());
    let netns = kite_pod_netns(&pod.id).expect("the kite pod attached a network namespace");
    let cmd = httpd("hello-from-kite");
    let web = c.run_container(&pod, "web", 0, IMAGE, &args(&cmd)).await;
    c.wait_running(&web, LIMIT).await;
    let ip = c.pod_ip(&pod.id).await;

    // The VM runs in the pod's sandbox cgroup on the host, so the pod's limits bound it, and
    // the CRI's pod stats (read from the pod's cgroup) count it.
    let cgroup = vm_cgroup_dir(&pod.id);
    assert!(
        cgroup.ends_with(format!("{}/{}", parent.trim_start_matches('/'), pod.id)),
        "QEMU is in {}",
        cgroup.display()
    );
    let stats = c.pod_stats(&pod.id).await.unwrap_or_else(|e| {
        panic!("pod stats: {}", status_message(&e));
    });
    let linux = stats.linux.expect("linux pod stats");
    let pod_memory = linux
        .memory
        .and_then(|m| m.working_set_bytes)
        .map(|v| v.value)
        .unwrap_or(0);
    assert!(
        pod_memory > 32 << 20,
        "the pod's memory should include its VM: {pod_memory} bytes"
    );
    assert!(
        linux
            .containers
            .iter()
            .any(|cs| cs.attributes.as_ref().is_some_and(|a| a.id == web)),
        "pod stats list the container: {:?}",
        linux.containers
    );

    // The pod's IP, from the host: the bridge, the veth, the tc redirect, the tap, the VM.
    let body = http_get(&format!("{ip}:8080"), "/", LIMIT).await.unwrap();
    assert_eq!(body.trim(), "hello-from-kite");

    // In a VM: the guest's kernel, the pod's hostname, eth0 with the pod's IP.
    let (code, out, err) = c
        .exec_sync(
            &web,
            &["sh", "-c", "uname -r; hostname; ip -4 addr show eth0"],
            LIMIT,
        )
        .await
        .unwrap();
    assert_eq!(code, 0, "exec: {err}");
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut lines = out.lines();
    assert_ne!(lines.next(), Some(host_kernel.trim()), "not in a VM: {out}");
    assert_eq!(lines.next(), Some("web"), "{out}");
    assert!(out.contains(&format!("inet {ip}/")), "{out}");
    // DNS as the CRI's DNS config says.
    let (code, resolv, _) = c
        .exec_sync(&web, &["cat", "/etc/resolv.conf"], LIMIT)
        .await
        .unwrap();
    assert_eq!(code, 0);
    for want in [
        "nameserver 10.88.0.1",
        "search kite-e2e.svc.cluster.local",
        "options ndots:5",
    ] {
        assert!(
            resolv.contains(want),
            "resolv.conf lacks {want:?}: {resolv}"
        );
    }
    let (code, _, _) = c.exec_sync(&web, &["false"], LIMIT).await.unwrap();
    assert_eq!(code, 1);

    // The CRI log file, in the kubelet's format.
    let log = pod.log_dir().join("web/0.log");
    let lines = log_lines(&log);
    assert!(
        lines.contains(&("stdout".into(), "ready".into())),
        "{}: {lines:?}",
        log.display()
    );
    assert!(
        lines.contains(&("stderr".into(), "on-stderr".into())),
        "{lines:?}"
    );

    // Stats from the guest's cgroups, and the listing.
    let stats = c.container_stats(&web).await;
    let mem = stats
        .memory
        .and_then(|m| m.working_set_bytes)
        .map(|v| v.value);
    assert!(mem.unwrap_or(0) > 0, "memory stats: {mem:?}");
    let listed = c.list_containers(&pod.id).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, web);

    c.stop_container(&web, 5).await.unwrap();
    let st = c.container_status(&web).await;
    assert_eq!(
        st.state,
        k8s_cri::v1::ContainerState::ContainerExited as i32
    );
    c.remove_container(&web).await.unwrap();
    c.remove_pod(&pod.id).await.unwrap();
    assert_pod_gone(&pod.id, Some(&netns)).await;
    assert!(!cgroup.exists(), "cgroup {} left", cgroup.display());
    // The pod cgroup is the kubelet's to remove.
    for root in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let _ = std::fs::remove_dir(root.path().join(parent.trim_start_matches('/')));
    }
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(parent.trim_start_matches('/')));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_attached_by_macvtap_serves_on_its_ip() {
    let mut c = setup().await;
    let pod = c
        .run_pod("mvt", "kite-macvtap", &[])
        .await
        .unwrap_or_else(|e| panic!("run a kite-macvtap pod: {}", status_message(&e)));
    let _pod_guard = RemoveOnDrop(pod.id.clone());
    let netns = kite_pod_netns(&pod.id).expect("network namespace");
    let network = std::fs::read_to_string(
        Path::new(kite_e2e::STATE_DIR)
            .join(&pod.id)
            .join("network.json"),
    )
    .unwrap();
    assert!(network.contains("Macvtap"), "{network}");
    let web = c
        .run_container(&pod, "web", 0, IMAGE, &args(&httpd("via-macvtap")))
        .await;
    c.wait_running(&web, LIMIT).await;
    let ip = c.pod_ip(&pod.id).await;
    let body = http_get(&format!("{ip}:8080"), "/", LIMIT).await.unwrap();
    assert_eq!(body.trim(), "via-macvtap");
    c.remove_pod(&pod.id).await.unwrap();
    assert_pod_gone(&pod.id, Some(&netns)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_container_pod_shares_localhost_and_a_restart_keeps_vm_and_ip() {
    let mut c = setup().await;
    let pod = c
        .run_pod("duo", KITE, &[])
        .await
        .unwrap_or_else(|e| panic!("run a kite pod: {}", status_message(&e)));
    let _pod_guard = RemoveOnDrop(pod.id.clone());
    let netns = kite_pod_netns(&pod.id).expect("network namespace");
    let cmd = httpd("from-the-web-container");
    let web = c.run_container(&pod, "web", 0, IMAGE, &args(&cmd)).await;
    let side = c
        .run_container(&pod, "side", 0, IMAGE, &["sleep", "1000"])
        .await;
    c.wait_running(&web, LIMIT).await;
    c.wait_running(&side, LIMIT).await;
    let vm = qemu_pid(&pod.id);
    let ip = c.pod_ip(&pod.id).await;

    // The sidecar reaches the web container on localhost: one network, one VM.
    let fetch = ["sh", "-c", "for i in $(seq 50); do wget -qO- http://127.0.0.1:8080/ && exit 0; sleep 0.2; done; exit 1"];
    let (code, out, err) = c.exec_sync(&side, &fetch, LIMIT).await.unwrap();
    assert_eq!((code, out.trim()), (0, "from-the-web-container"), "{err}");

    // The web container exits and is created again (a kubelet restart): same VM, same IP.
    c.stop_container(&web, 5).await.unwrap();
    c.remove_container(&web).await.unwrap();
    let cmd = httpd("after-restart");
    let web2 = c.run_container(&pod, "web", 1, IMAGE, &args(&cmd)).await;
    c.wait_running(&web2, LIMIT).await;
    assert_eq!(qemu_pid(&pod.id), vm, "the restart replaced the VM");
    assert_eq!(c.pod_ip(&pod.id).await, ip);
    let body = http_get(&format!("{ip}:8080"), "/", LIMIT).await.unwrap();
    assert_eq!(body.trim(), "after-restart");

    c.remove_pod(&pod.id).await.unwrap();
    assert_pod_gone(&pod.id, Some(&netns)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kite_and_runc_pods_reach_each_other() {
    let mut c = setup().await;
    let runc_pod = c
        .run_pod("peer-runc", RUNC, &[])
        .await
        .unwrap_or_else(|e| panic!("run a runc pod: {}", status_message(&e)));
    let _runc_pod_guard = RemoveOnDrop(runc_pod.id.clone());
    let kite_pod = c
        .run_pod("peer-kite", KITE, &[])
        .await
        .unwrap_or_else(|e| panic!("run a kite pod: {}", status_message(&e)));
    let _kite_pod_guard = RemoveOnDrop(kite_pod.id.clone());
    let netns = kite_pod_netns(&kite_pod.id).expect("network namespace");
    let r = c
        .run_container(&runc_pod, "web", 0, IMAGE, &args(&httpd("runc-side")))
        .await;
    let k = c
        .run_container(&kite_pod, "web", 0, IMAGE, &args(&httpd("kite-side")))
        .await;
    c.wait_running(&r, LIMIT).await;
    c.wait_running(&k, LIMIT).await;
    let runc_ip = c.pod_ip(&runc_pod.id).await;
    let kite_ip = c.pod_ip(&kite_pod.id).await;
    assert_ne!(runc_ip, kite_ip);

    let get = |ip: &str| {
        format!(
            "for i in $(seq 50); do wget -qO- http://{ip}:8080/ && exit 0; sleep 0.2; done; exit 1"
        )
    };
    let (code, out, err) = c
        .exec_sync(&k, &["sh", "-c", &get(&runc_ip)], LIMIT)
        .await
        .unwrap();
    assert_eq!((code, out.trim()), (0, "runc-side"), "kite -> runc: {err}");
    let (code, out, err) = c
        .exec_sync(&r, &["sh", "-c", &get(&kite_ip)], LIMIT)
        .await
        .unwrap();
    assert_eq!((code, out.trim()), (0, "kite-side"), "runc -> kite: {err}");

    c.remove_pod(&kite_pod.id).await.unwrap();
    c.remove_pod(&runc_pod.id).await.unwrap();
    assert_pod_gone(&kite_pod.id, Some(&netns)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_cri_error_and_leaks_nothing() {
    let mut c = setup().await;

    // An unknown runtime handler.
    let e = c.run_pod("nohandler", "no-such-handler", &[]).await.err();
    let e = status_message(&e.expect("an unknown handler must fail"));
    assert!(e.contains("no-such-handler"), "{e}");

    // An image that is not in the registry.
    let e = c
        .pull("127.0.0.1:5000/kite/no-such-image:latest")
        .await
        .err();
    let e = status_message(&e.expect("a missing image must fail"));
    assert!(e.contains("no-such-image"), "{e}");

    // A command that is not in the image: the start fails with the guest's reason.
    let pod = c
        .run_pod("badcmd", KITE, &[])
        .await
        .unwrap_or_else(|e| panic!("run a kite pod: {}", status_message(&e)));
    let _pod_guard = RemoveOnDrop(pod.id.clone());
    let netns = kite_pod_netns(&pod.id).expect("network namespace");
    let created = c
        .create_container(&pod, "bad", 0, IMAGE, &["/no/such/binary"])
        .await;
    let failure = match created {
        Err(e) => status_message(&e),
        Ok(id) => status_message(&c.start(&id).await.expect_err("starting a missing binary")),
    };
    assert!(failure.contains("/no/such/binary"), "{failure}");

    // A pod removed while one of its containers starts.
    let slow = c
        .create_container(&pod, "racer", 0, IMAGE, &["sleep", "1000"])
        .await
        .unwrap();
    let mut c2 = Cri::connect().await;
    let pod_id = pod.id.clone();
    let (start, removed) = tokio::join!(c.start(&slow), async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        c2.remove_pod(&pod_id).await
    });
    // Either order is fine; what must hold is a clean end.
    if let Err(e) = &start {
        assert!(!status_message(e).is_empty());
    }
    if removed.is_err() {
        c.remove_pod(&pod.id).await.unwrap();
    }
    assert_pod_gone(&pod.id, Some(&netns)).await;
}

/// A kite pod named `name` with a container `app` that sleeps, running; removed on drop.
async fn sleeping_kite_pod(
    c: &mut Cri,
    name: &str,
) -> (kite_e2e::cri::Pod, RemoveOnDrop, std::path::PathBuf, String) {
    let pod = c
        .run_pod(name, KITE, &[])
        .await
        .unwrap_or_else(|e| panic!("run a kite pod: {}", status_message(&e)));
    let guard = RemoveOnDrop(pod.id.clone());
    let netns = kite_pod_netns(&pod.id).expect("network namespace");
    let app = c
        .run_container(&pod, "app", 0, IMAGE, &["sleep", "1000"])
        .await;
    c.wait_running(&app, LIMIT).await;
    (pod, guard, netns, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_whose_vm_dies_is_reported_not_ready_and_cleans_up() {
    let mut c = setup().await;
    let (pod, _pod_guard, netns, app) = sleeping_kite_pod(&mut c, "doomed").await;

    let pid: i32 = qemu_pid(&pod.id).parse().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();

    // The app container and the pod sandbox both end, as when a node loses a pod's processes.
    let start = std::time::Instant::now();
    loop {
        let app_state = c.container_status(&app).await.state;
        let pod_state = c.pod_status(&pod.id).await.state;
        if app_state == k8s_cri::v1::ContainerState::ContainerExited as i32
            && pod_state == k8s_cri::v1::PodSandboxState::SandboxNotready as i32
        {
            break;
        }
        assert!(
            start.elapsed() < LIMIT,
            "after QEMU died: container state {app_state}, pod state {pod_state}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let st = c.container_status(&app).await;
    assert_eq!(st.exit_code, 137, "{st:?}");

    c.remove_pod(&pod.id).await.unwrap();
    assert_pod_gone(&pod.id, Some(&netns)).await;
}

/// containerd lost the record of a running kite pod's sandbox container (what a containerd
/// restart during RunPodSandbox does, containerd#12344; here the record is deleted through
/// containerd's containers service, which does not refuse while a task runs): nothing would
/// ever stop that task, so the shim notices, ends the VM and exits, containerd cleans up after
/// it, and the pod can still be removed, leaving nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_whose_record_containerd_lost_is_ended_by_its_shim() {
    use kite_protocol::containerd::ContainerRecords;
    use kite_shim::orphans::{CHECK_EVERY, GONE_AFTER};
    let mut c = setup().await;
    let (pod, _pod_guard, netns, app) = sleeping_kite_pod(&mut c, "orphan").await;
    let qemu = qemu_pid(&pod.id);
    let mut records = ContainerRecords::connect("/run/containerd/containerd.sock", "k8s.io")
        .await
        .unwrap();
    assert!(records.exists(&pod.id).await.unwrap());
    records.delete(&pod.id).await.unwrap();
    assert!(!records.exists(&pod.id).await.unwrap());

    // Within GONE_AFTER checks (and one more for the phase): the shim, the VM, the bundle go.
    let bundle = Path::new("/run/containerd/io.containerd.runtime.v2.task/k8s.io").join(&pod.id);
    let limit = CHECK_EVERY * (GONE_AFTER + 1) + Duration::from_secs(20);
    let start = std::time::Instant::now();
    while kite_e2e::shim_pid(&pod.id).is_some()
        || Path::new("/proc").join(&qemu).exists()
        || bundle.exists()
    {
        assert!(
            start.elapsed() < limit,
            "{limit:?} after containerd lost pod {}'s record: shim {:?}, QEMU {qemu} {}, bundle {}",
            pod.id,
            kite_e2e::shim_pid(&pod.id),
            if Path::new("/proc").join(&qemu).exists() {
                "runs"
            } else {
                "gone"
            },
            if bundle.exists() { "left" } else { "gone" },
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The app container ended with its VM, as the CRI sees it.
    let start = std::time::Instant::now();
    loop {
        let st = c.container_status(&app).await;
        if st.state == k8s_cri::v1::ContainerState::ContainerExited as i32 {
            assert_eq!(st.exit_code, 137, "{st:?}");
            break;
        }
        assert!(
            start.elapsed() < LIMIT,
            "app container after its VM went: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.remove_pod(&pod.id)
        .await
        .unwrap_or_else(|e| panic!("remove the orphaned pod: {}", status_message(&e)));
    assert_pod_gone(&pod.id, Some(&netns)).await;
}

/// A shim that serves no container and whose own record containerd does not have (left after
/// a containerd restart dropped its sandbox's create, containerd#12344's other face) exits on
/// its own, and takes its socket along.
#[tokio::test]
async fn a_shim_serving_nothing_without_a_record_exits() {
    use kite_shim::orphans::{CHECK_EVERY, GONE_AFTER};
    tokio::task::spawn_blocking(require_setup).await.unwrap();
    let id = format!("kite-e2e-idle-shim-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("/usr/local/bin/containerd-shim-kite-v2")
        .args([
            "-namespace",
            "k8s.io",
            "-id",
            &id,
            "-address",
            "/run/containerd/containerd.sock",
            "start",
        ])
        .env("TTRPC_ADDRESS", "/run/containerd/containerd.sock.ttrpc")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "shim start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let socket = String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("unix://")
        .to_string();
    let pid = kite_e2e::shim_pid(&id).expect("the started shim runs");
    let limit = CHECK_EVERY * (GONE_AFTER + 1) + Duration::from_secs(20);
    let start = std::time::Instant::now();
    while Path::new("/proc").join(pid.to_string()).exists() {
        if start.elapsed() > limit {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = std::fs::remove_file(&socket);
            panic!(
                "shim {id} (pid {pid}) with no container and no record still runs after {limit:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        !Path::new(&socket).exists(),
        "the shim left its socket {socket}"
    );
}
