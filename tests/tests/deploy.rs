//! The node install: the kite-deploy image run as the DaemonSet runs it (privileged, host PID
//! and network, the host's `/` at `/host`) against a containerd that never had kite. kite pods
//! then run through that containerd's CRI; an upgrade under a running kite pod keeps the pod on
//! its version and starts new pods on the new one; uninstall refuses while kite pods run and
//! afterwards leaves the node as it was — containerd's config byte for byte, no file, process
//! or mount of kite — with runc pods still running; a drop-in containerd refuses is rolled back.

use std::path::Path;
use std::time::Duration;

use kite_e2e::cri::{http_get, Cri, Pod, KITE, RUNC};
use kite_e2e::deploy::{
    build_deb, build_image, installer_env, mounts_under, processes_under, target_down, target_up,
    DeployPod, CONFIG_DIR, LOG_DIR, PREFIX, RUN_DIR, STATE_DIR, TARGET_CONFIG, TARGET_SOCKET,
};
use kite_e2e::{require_setup, IMAGE};

const LIMIT: Duration = Duration::from_secs(240);

fn httpd(body: &str) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!("mkdir -p /www && echo {body} > /www/index.html && exec httpd -f -p 8080 -h /www"),
    ]
}

async fn serving_pod(target: &mut Cri, name: &str, handler: &str, body: &str) -> (Pod, String) {
    let pod = target
        .run_pod(name, handler, &[])
        .await
        .unwrap_or_else(|e| panic!("run {handler} pod {name} on the target: {e}"));
    let cmd = httpd(body);
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let c = target.run_container(&pod, "web", 0, IMAGE, &cmd).await;
    target.wait_running(&c, LIMIT).await;
    let ip = target.pod_ip(&pod.id).await;
    let got = http_get(&format!("{ip}:8080"), "/", LIMIT)
        .await
        .unwrap_or_else(|e| panic!("pod {name} on {ip}: {e}"));
    assert_eq!(got.trim(), body, "pod {name} serves its page");
    (pod, ip)
}

/// The executable of the kite shim serving sandbox `pod_id`.
fn shim_of(pod_id: &str) -> std::path::PathBuf {
    shim_under(PREFIX, pod_id)
}

fn shim_under(prefix: &str, pod_id: &str) -> std::path::PathBuf {
    processes_under(prefix)
        .into_iter()
        .find(|(pid, exe)| {
            exe.ends_with("containerd-shim-kite-v2")
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(pod_id))
        })
        .map(|(_, exe)| exe)
        .unwrap_or_else(|| panic!("no kite shim under {prefix} serves pod {pod_id}"))
}

fn runtimes(info_config: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(info_config).unwrap();
    v["containerd"]["runtimes"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

async fn target_runtimes(target: &mut Cri) -> Vec<String> {
    let s = target
        .client
        .status()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    runtimes(s.info.get("config").expect("the CRI status has its config"))
}

/// Nothing of the tests' install is left on the host.
fn assert_nothing_left() {
    assert_nothing_left_of(PREFIX);
}

fn assert_nothing_left_of(prefix: &str) {
    for dir in [prefix, CONFIG_DIR, RUN_DIR, STATE_DIR, LOG_DIR] {
        assert!(!Path::new(dir).exists(), "{dir} is left after uninstall");
    }
    let link = Path::new(kite_e2e::deploy::TARGET_BIN).join("containerd-shim-kite-v2");
    assert!(link.symlink_metadata().is_err(), "the shim's link is left");
    let procs = processes_under(prefix);
    assert!(procs.is_empty(), "processes left: {procs:?}");
    // The warm pool's VMs run the host's QEMU: found by their directory under the install's.
    let vms = kite_e2e::processes_mentioning(&format!("{RUN_DIR}/"));
    assert!(vms.is_empty(), "pooled VMs left: {vms:?}");
    let mounts = mounts_under(&[prefix, RUN_DIR, STATE_DIR]);
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
}

/// Waits until the install's warm pool offers a VM (`pool.json` is published last).
async fn wait_pool_ready(limit: Duration) {
    let pool = Path::new(RUN_DIR).join("sandboxes/.pool");
    let start = std::time::Instant::now();
    loop {
        let ready = std::fs::read_dir(&pool)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.path().join("pool.json").exists());
        if ready {
            return;
        }
        let log = std::fs::read_to_string(format!("{LOG_DIR}/kite-pool.log")).unwrap_or_default();
        assert!(
            start.elapsed() < limit,
            "the install's warm pool offers no VM in {limit:?}: {}",
            &log[log.len().saturating_sub(2000)..]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How sandbox `pod_id` used the warm pool, from the shims' start records. A shim writes them
/// where the configuration it starts with says (the machine's /etc/kite/kite.toml: the
/// install's is in a directory of the test's own), hence both files.
fn pool_use_of(pod_id: &str) -> String {
    let paths = [
        format!("{RUN_DIR}/timings.jsonl"),
        "/run/kite/timings.jsonl".into(),
    ];
    paths
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .collect::<Vec<_>>()
        })
        .filter(|v| v["sandbox"].as_str() == Some(pod_id))
        .find_map(|v| v["pool"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("no start record with a pool use for {pod_id} in {paths:?}"))
}

/// The scenarios share one target node, so they run one after the other in one test (as
/// separate tests they would hold the test command's threads waiting for each other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_install_from_the_daemonset_image_and_the_debian_package() {
    tokio::task::spawn_blocking(require_setup).await.unwrap();
    let (image_a, image_b) =
        tokio::task::spawn_blocking(|| (build_image("e2e-a"), build_image("e2e-b")))
            .await
            .unwrap();
    the_deploy_image_installs_upgrades_under_a_running_pod_and_uninstalls_to_the_byte(
        &image_a, &image_b,
    )
    .await;
    a_drop_in_containerd_refuses_is_rolled_back_with_a_clear_error(&image_a).await;
    the_debian_package_installs_a_node_and_its_removal_puts_it_back().await;
}

async fn the_deploy_image_installs_upgrades_under_a_running_pod_and_uninstalls_to_the_byte(
    image_a: &str,
    image_b: &str,
) {
    tokio::task::spawn_blocking(target_up).await.unwrap();
    let original = std::fs::read(TARGET_CONFIG).unwrap();
    let mut host = Cri::connect().await;
    let mut target = Cri::connect_to(Path::new(TARGET_SOCKET)).await;
    target.pull(IMAGE).await.unwrap();
    assert_eq!(target_runtimes(&mut target).await, vec![RUNC.to_string()]);
    let (runc_pod, runc_ip) = serving_pod(&mut target, "before", RUNC, "runc-before").await;

    // Install, as the DaemonSet's container does (its entrypoint: install --wait).
    let a = DeployPod::start(&mut host, "kite-deploy-a", image_a, None, &[]).await;
    let status = a.wait_healthy(&mut host, "e2e-a", LIMIT).await;
    assert!(status.contains("kite-agent: running"), "{status}");
    let installed = std::fs::read_to_string(TARGET_CONFIG).unwrap();
    let added: Vec<&str> = installed
        .lines()
        .filter(|l| !String::from_utf8_lossy(&original).lines().any(|o| o == *l))
        .collect();
    assert_eq!(
        added,
        vec![format!("imports = [\"{CONFIG_DIR}/containerd.d/*.toml\"]").as_str()],
        "the operator's file gains exactly one line"
    );
    let mut with_kite = target_runtimes(&mut target).await;
    with_kite.sort();
    assert_eq!(with_kite, vec![KITE.to_string(), RUNC.to_string()]);
    // Installing again changes nothing.
    let again = a.kite_deploy(&mut host, &["install"]).await;
    assert_eq!(again.0, 0, "install twice: {again:?}");
    assert!(again.1.contains("already was"), "{again:?}");
    assert_eq!(std::fs::read_to_string(TARGET_CONFIG).unwrap(), installed);

    // A kite pod through the target's CRI, on version a, in a VM of the install's warm pool.
    wait_pool_ready(LIMIT).await;
    let (kite1, kite1_ip) = serving_pod(&mut target, "kite-one", KITE, "kite-one").await;
    assert_eq!(pool_use_of(&kite1.id), "hit", "pod one adopts a pooled VM");
    assert!(
        shim_of(&kite1.id).starts_with(format!("{PREFIX}/e2e-a")),
        "pod one runs version a's shim"
    );

    // The DaemonSet's rolling update: the old pod's preStop uninstall refuses (a kite pod runs)
    // and says which; the old pod goes; kite's daemons outlive it.
    let refused = a.kite_deploy(&mut host, &["uninstall"]).await;
    assert_ne!(
        refused.0, 0,
        "uninstall with a kite pod running: {refused:?}"
    );
    assert!(
        refused.2.contains("still in use") && refused.2.contains(&kite1.id),
        "the refusal names the pod: {refused:?}"
    );
    assert!(
        refused.2.contains("kite-e2e/kite-one"),
        "the refusal names the pod by name: {refused:?}"
    );
    let a_log = a.log();
    a.remove(&mut host).await;
    let agent_pid: i32 = std::fs::read_to_string(format!("{RUN_DIR}/kite-agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        Path::new(&format!("/proc/{agent_pid}")).exists(),
        "kite-agent survives the installer's pod"
    );

    // The new version installs over the old while pod one runs.
    let b = DeployPod::start(&mut host, "kite-deploy-b", image_b, None, &[]).await;
    let status = b.wait_healthy(&mut host, "e2e-b", LIMIT).await;
    assert!(
        status.contains("containerd: runtime kite loaded"),
        "{status}"
    );
    assert_eq!(
        std::fs::read_link(format!("{PREFIX}/current")).unwrap(),
        Path::new("e2e-b")
    );
    let got = http_get(&format!("{kite1_ip}:8080"), "/", LIMIT)
        .await
        .unwrap();
    assert_eq!(
        got.trim(),
        "kite-one",
        "pod one still serves after the upgrade"
    );
    assert!(
        shim_of(&kite1.id).starts_with(format!("{PREFIX}/e2e-a")),
        "pod one keeps version a's shim"
    );
    let (kite2, _) = serving_pod(&mut target, "kite-two", KITE, "kite-two").await;
    assert!(
        shim_of(&kite2.id).starts_with(format!("{PREFIX}/e2e-b")),
        "a new pod runs version b's shim"
    );

    // Uninstall once no kite pod runs: the node as it was.
    for p in [&kite1, &kite2] {
        target.remove_pod(&p.id).await.unwrap();
    }
    let done = b.kite_deploy(&mut host, &["uninstall"]).await;
    assert_eq!(done.0, 0, "uninstall: {done:?}\n{}", b.log());
    assert!(done.1.contains("kite e2e-b uninstalled in"), "{done:?}");
    let twice = b.kite_deploy(&mut host, &["uninstall"]).await;
    assert_eq!(twice.0, 0, "uninstall twice: {twice:?}");
    assert!(twice.1.contains("not installed"), "{twice:?}");
    // The installer's own timings, for the record.
    for line in format!("{}\n{}\n{}", a_log, b.log(), done.1).lines() {
        if line.contains(" installed in ") || line.contains(" uninstalled in ") {
            eprintln!("deploy timing: {line}");
        }
    }
    b.remove(&mut host).await;
    assert_eq!(
        std::fs::read(TARGET_CONFIG).unwrap(),
        original,
        "containerd's config is byte for byte what it was"
    );
    assert_nothing_left();
    assert_eq!(target_runtimes(&mut target).await, vec![RUNC.to_string()]);
    let got = http_get(&format!("{runc_ip}:8080"), "/", LIMIT)
        .await
        .unwrap();
    assert_eq!(
        got.trim(),
        "runc-before",
        "the runc pod from before still serves"
    );
    let (after, _) = serving_pod(&mut target, "after", RUNC, "runc-after").await;
    for p in [&runc_pod, &after] {
        target.remove_pod(&p.id).await.unwrap();
    }
    tokio::task::spawn_blocking(target_down).await.unwrap();
}

async fn a_drop_in_containerd_refuses_is_rolled_back_with_a_clear_error(image: &str) {
    tokio::task::spawn_blocking(target_up).await.unwrap();
    let original = std::fs::read(TARGET_CONFIG).unwrap();
    let mut host = Cri::connect().await;
    let mut target = Cri::connect_to(Path::new(TARGET_SOCKET)).await;
    target.pull(IMAGE).await.unwrap();

    // A drop-in whose CRI section containerd cannot load: its default runtime does not exist.
    let broken = "[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
                  default_runtime_name = \"missing\"\n";
    let pod = DeployPod::start(
        &mut host,
        "kite-deploy-broken",
        image,
        Some(&["sleep", "3600"]),
        &[
            ("KITE_CONTAINERD_EXTRA", broken),
            ("KITE_TIMEOUT_SECS", "20"),
        ],
    )
    .await;
    let (code, stdout, stderr) = pod.kite_deploy(&mut host, &["install"]).await;
    assert_ne!(
        code, 0,
        "a broken drop-in fails the install: {stdout}{stderr}"
    );
    assert!(
        stderr.contains("containerd did not accept kite")
            && stderr.contains("put back as it was before this install"),
        "the error says what failed and that the host was restored: {stderr}"
    );
    assert_eq!(
        std::fs::read(TARGET_CONFIG).unwrap(),
        original,
        "the operator's config is back byte for byte"
    );
    assert_eq!(target_runtimes(&mut target).await, vec![RUNC.to_string()]);
    pod.remove(&mut host).await;
    assert_nothing_left();
    let (runc, _) = serving_pod(&mut target, "after-rollback", RUNC, "runc-ok").await;
    target.remove_pod(&runc.id).await.unwrap();
    tokio::task::spawn_blocking(target_down).await.unwrap();
}

/// Runs `cmd` on the host with the installer's settings in /etc/default/kite.
fn sh(cmd: &str) -> std::process::Output {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap()
}

async fn the_debian_package_installs_a_node_and_its_removal_puts_it_back() {
    let version = "0.1.0~e2e";
    let deb = tokio::task::spawn_blocking(move || build_deb(version))
        .await
        .unwrap();
    tokio::task::spawn_blocking(target_up).await.unwrap();
    let _ = sh("dpkg -r kite");
    let original = std::fs::read(TARGET_CONFIG).unwrap();
    let mut target = Cri::connect_to(Path::new(TARGET_SOCKET)).await;
    target.pull(IMAGE).await.unwrap();

    // The package's settings: the tests' target node, and the package's own /opt/kite.
    let defaults: String = installer_env()
        .into_iter()
        .filter(|(k, _)| !matches!(k.as_str(), "KITE_PREFIX" | "KITE_HOST_PID" | "NODE_NAME"))
        .map(|(k, v)| format!("{k}='{v}'\n"))
        .collect();
    std::fs::write("/etc/default/kite", defaults).unwrap();
    let out = sh(&format!("apt-get install -y -q {} 2>&1", deb.display()));
    assert!(
        out.status.success(),
        "apt install: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let bin = format!("/opt/kite/{version}/bin/kite-deploy");
    let status = sh(&format!(
        "set -a; . /etc/default/kite; {bin} --host-root / status"
    ));
    assert!(
        status.status.success(),
        "status after apt install: {}",
        String::from_utf8_lossy(&status.stdout)
    );
    let (pod, _) = serving_pod(&mut target, "from-deb", KITE, "from-deb").await;
    assert!(shim_under("/opt/kite", &pod.id).starts_with(format!("/opt/kite/{version}")));

    // Removal refuses while the kite pod runs, and the package stays.
    let refused = sh("dpkg -r kite 2>&1");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stdout).contains("still in use"),
        "{}",
        String::from_utf8_lossy(&refused.stdout)
    );
    // (`dpkg -r` marks the selection "deinstall"; the package itself stays installed.)
    let state = String::from_utf8_lossy(&sh("dpkg -s kite").stdout).into_owned();
    assert!(state.contains("ok installed"), "{state}");

    target.remove_pod(&pod.id).await.unwrap();
    let removed = sh("apt-get remove -y -q kite 2>&1");
    assert!(
        removed.status.success(),
        "{}",
        String::from_utf8_lossy(&removed.stdout)
    );
    std::fs::remove_file("/etc/default/kite").unwrap();
    assert_eq!(std::fs::read(TARGET_CONFIG).unwrap(), original);
    assert_nothing_left_of("/opt/kite");
    assert_eq!(target_runtimes(&mut target).await, vec![RUNC.to_string()]);
    tokio::task::spawn_blocking(target_down).await.unwrap();
}
