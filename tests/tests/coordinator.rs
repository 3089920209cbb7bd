//! kite-coordinator with node agents that joined it, against the real containerd CRI, CNI,
//! QEMU and registry: apps from Deployment manifests placed over two nodes, scaled, rolled out
//! in place (same sandbox, VM and IP) and rolled back by themselves when a batch fails; a lost
//! node's replicas moved; a restarted coordinator finishing a rollout; and the security cases
//! (tokens, foreign CAs, nodes reaching for other nodes' pods, kitectl without the admin
//! credential).
//!
//! The pods' tests run on a rig of two nodes of their own (hack/rig.sh: a network namespace
//! per node with its own containerd, snapshotter and agent), checked to leave nothing behind.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kite_e2e::agent::{qemu_pid, KITECTL, WEB_BROKEN, WEB_V1, WEB_V2};
use kite_e2e::cluster::*;
use kite_e2e::cri::http_get;
use kite_e2e::require_setup;
use kite_protocol::cluster::node_link_client::NodeLinkClient;
use kite_protocol::cluster::*;

const LIMIT: Duration = Duration::from_secs(120);

async fn setup() {
    tokio::task::spawn_blocking(require_setup).await.unwrap();
}

async fn serves(pod: &PodInfo, body: &str) {
    let got = http_get(&format!("{}:8080", pod.ip), "/", Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("pod {} ({}): {e}", pod.name, pod.ip));
    assert_eq!(got.trim(), body, "pod {} serves", pod.name);
}

fn all_ready_at(app: &App, pods: &[PodInfo], revision: u64) -> bool {
    pods.len() == app.replicas as usize
        && pods
            .iter()
            .all(|p| p.ready && p.revision == revision && p.running_revision == revision)
}

fn stderr(out: &std::process::Output) -> String {
    kite_e2e::text(&out.stderr)
}

async fn join(c: &TestCoordinator, token: &str, node: &str) -> Result<JoinResponse, tonic::Status> {
    let ca = std::fs::read_to_string(c.pki().join("ca.crt")).unwrap();
    let (_key, csr) = kite_agent::link::new_csr(node).unwrap();
    let channel = kite_protocol::cluster::connect(&c.address, &ca, None)
        .await
        .expect("TLS without a client certificate");
    NodeLinkClient::new(channel)
        .join(JoinRequest {
            token: token.into(),
            node_name: node.into(),
            csr_pem: csr,
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_takes_a_good_token_and_every_call_checks_who_calls() {
    setup().await;
    let c = TestCoordinator::start("security", "");
    let other = TestCoordinator::start("security-other", "");

    // Tokens: malformed, unknown, expired, reused; a name joined already.
    let e = join(&c, "abc", "node-x").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("not a bootstrap token"),
        "{}",
        e.message()
    );
    let e = join(&c, "abcdef.0123456789abcdef", "node-x")
        .await
        .unwrap_err();
    assert!(e.message().contains("unknown"), "{}", e.message());
    let short = c.token("1s");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let e = join(&c, &short, "node-x").await.unwrap_err();
    assert!(e.message().contains("expired"), "{}", e.message());
    let token = c.token("10m");
    let ca = std::fs::read_to_string(c.pki().join("ca.crt")).unwrap();
    let (key_a, csr_a) = kite_agent::link::new_csr("node-a").unwrap();
    let channel = kite_protocol::cluster::connect(&c.address, &ca, None)
        .await
        .unwrap();
    let joined = NodeLinkClient::new(channel)
        .join(JoinRequest {
            token: token.clone(),
            node_name: "node-a".into(),
            csr_pem: csr_a,
        })
        .await
        .expect("a good token joins")
        .into_inner();
    let e = join(&c, &token, "node-b").await.unwrap_err();
    assert!(e.message().contains("already used"), "{}", e.message());
    let e = join(&c, &c.token("10m"), "node-a").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    join(&c, &c.token("10m"), "node-b")
        .await
        .expect("node-b joins");

    // A node sees its own assignments only, and speaks only for itself.
    let node_a = kite_protocol::cluster::connect(&c.address, &ca, Some((&joined.cert_pem, &key_a)))
        .await
        .unwrap();
    let mut link = NodeLinkClient::new(node_a.clone());
    link.list_assignments(NodeRef {
        name: "node-a".into(),
    })
    .await
    .expect("a node lists its own assignments");
    let e = link
        .list_assignments(NodeRef {
            name: "node-b".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("may not see node node-b"),
        "{}",
        e.message()
    );
    let hello = NodeMessage {
        msg: Some(node_message::Msg::Hello(NodeHello {
            name: "node-b".into(),
            ..Default::default()
        })),
    };
    let e = link
        .link(futures::stream::iter(vec![hello]))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("may not speak for node"),
        "{}",
        e.message()
    );
    // A node's certificate is no admin's.
    let e = cluster_client::ClusterClient::new(node_a)
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("not an admin"), "{}", e.message());
    // No certificate at all: only Join answers.
    let anonymous = kite_protocol::cluster::connect(&c.address, &ca, None)
        .await
        .unwrap();
    let e = cluster_client::ClusterClient::new(anonymous)
        .list_apps(ListRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

    // kitectl: without the admin credential; with an admin credential of another cluster.
    let empty = tempfile::tempdir().unwrap();
    let out = c.kitectl_as(empty.path(), &["get", "nodes"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("needs an admin credential"),
        "{}",
        stderr(&out)
    );
    let foreign = tempfile::tempdir().unwrap();
    std::fs::copy(c.pki().join("ca.crt"), foreign.path().join("ca.crt")).unwrap();
    for f in ["admin.crt", "admin.key"] {
        std::fs::copy(other.pki().join(f), foreign.path().join(f)).unwrap();
    }
    let out = c.kitectl_as(foreign.path(), &["get", "nodes"]);
    assert!(!out.status.success(), "another cluster's admin got in");
    let nodes = c.kitectl_ok(&["get", "nodes"]);
    assert!(
        nodes.contains("node-a") && nodes.contains("node-b"),
        "{nodes}"
    );
    assert!(!nodes.contains("node-x"), "{nodes}");
}

/// The pods' sandboxes and IPs by pod name, from the nodes' agents.
async fn sandboxes(rig: &Rig, pods: &[PodInfo]) -> BTreeMap<String, (String, String)> {
    let mut out = BTreeMap::new();
    for p in pods {
        for node in 1..=rig.nodes {
            if let Some(pod) = rig.node_pod(node, &p.name).await {
                out.insert(p.name.clone(), (pod.sandbox_id.clone(), pod.ip.clone()));
            }
        }
    }
    out
}

/// Waits until the nodes run exactly `names`.
async fn nodes_run(rig: &Rig, names: &BTreeSet<String>) {
    let start = std::time::Instant::now();
    loop {
        let mut on_nodes = BTreeSet::new();
        for node in 1..=rig.nodes {
            on_nodes.extend(rig.node_pods(node).await);
        }
        if on_nodes == *names {
            return;
        }
        assert!(
            start.elapsed() < LIMIT,
            "the nodes run {on_nodes:?}, not {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn names(pods: &[PodInfo]) -> BTreeSet<String> {
    pods.iter().map(|p| p.name.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_spreads_scales_and_rolls_out_in_place_and_back() {
    setup().await;
    let rig = Rig::up(1, 2);
    let c = &rig.coordinator;
    let v1 = web_app(
        "web",
        "runc",
        WEB_V1,
        3,
        "  strategy: {rollingUpdate: {maxUnavailable: 1}}\n",
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &v1).unwrap();
    let path = file.path().to_str().unwrap();
    let out = c.kitectl_ok(&["apply", "-f", path]);
    assert!(out.contains("successfully rolled out"), "{out}");

    // Spread over both nodes; each serves.
    let (_, pods) = c
        .wait_app("web", "ready", LIMIT, |a, p| all_ready_at(a, p, 1))
        .await;
    let nodes: BTreeSet<&str> = pods.iter().map(|p| p.node.as_str()).collect();
    assert_eq!(nodes, BTreeSet::from(["node1", "node2"]), "{pods:#?}");
    for p in &pods {
        serves(p, "v1").await;
    }

    // Scale out to 6 (3 per node), in to 2, back to 3.
    c.kitectl_ok(&["scale", "deployment/web", "--replicas", "6"]);
    let (_, pods) = c
        .wait_app("web", "6 ready", LIMIT, |a, p| all_ready_at(a, p, 1))
        .await;
    let per_node = |pods: &[PodInfo], n: &str| pods.iter().filter(|p| p.node == n).count();
    assert_eq!((per_node(&pods, "node1"), per_node(&pods, "node2")), (3, 3));
    c.kitectl_ok(&["scale", "deployment/web", "--replicas", "2"]);
    let (_, pods) = c
        .wait_app("web", "2", LIMIT, |a, p| {
            a.replicas == 2 && all_ready_at(a, p, 1)
        })
        .await;
    nodes_run(&rig, &names(&pods)).await;
    c.kitectl_ok(&["scale", "deployment/web", "--replicas", "3", "--no-wait"]);
    let (_, pods) = c
        .wait_app("web", "3", LIMIT, |a, p| {
            a.replicas == 3 && all_ready_at(a, p, 1)
        })
        .await;
    let before = sandboxes(&rig, &pods).await;
    assert_eq!(before.len(), 3);

    // v1 → v2 in place: the same sandboxes and IPs serve v2.
    std::fs::write(file.path(), v1.replace(WEB_V1, WEB_V2)).unwrap();
    let out = c.kitectl_ok(&["apply", "-f", path]);
    assert!(out.contains("successfully rolled out"), "{out}");
    let (app, pods) = c
        .wait_app("web", "at v2", LIMIT, |a, p| all_ready_at(a, p, 2))
        .await;
    let rollout = app.rollout.as_ref().unwrap();
    assert_eq!(
        (rollout.strategy.as_str(), rollout.state.as_str()),
        ("InPlace", "Complete")
    );
    assert_eq!(
        sandboxes(&rig, &pods).await,
        before,
        "in place: same sandboxes and IPs"
    );
    for p in &pods {
        serves(p, "v2").await;
    }
    // Logs and exec through the coordinator, relayed by the pod's node.
    let out = c.kitectl_ok(&["exec", &pods[0].name, "--", "cat", "/www/index.html"]);
    assert_eq!(out.trim(), "v2");
    let out = c.kitectl(&["exec", &pods[0].name, "--", "sh", "-c", "exit 3"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "exec gives the command's exit code"
    );
    let log = c.kitectl_ok(&["logs", &pods[0].name]);
    assert!(log.contains("serving v2"), "{log}");
    let out = c.kitectl(&["logs", "no-such-pod"]);
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
    // The node reports the pod's stages and events: describe shows its start.
    let described = c.kitectl_ok(&["describe", "pod", &pods[0].name]);
    assert!(
        described.contains("sandbox") && described.contains("ready"),
        "{described}"
    );
    assert!(described.contains("Updated"), "{described}");

    // v2 → broken: the first batch fails and the app rolls back by itself, while the other
    // replicas serve v2 throughout.
    std::fs::write(file.path(), v1.replace(WEB_V1, WEB_BROKEN)).unwrap();
    let apply = {
        let (address, pki, path) = (c.address.clone(), c.pki(), path.to_string());
        std::thread::spawn(move || {
            std::process::Command::new(KITECTL)
                .args(["--coordinator", &address, "--credentials"])
                .arg(pki)
                .args(["apply", "-f", &path])
                .output()
                .unwrap()
        })
    };
    let mut served = 0;
    while !apply.is_finished() {
        let (app, pods) = (c.app("web").await, c.pods("web").await);
        let batch: Vec<&str> = app
            .rollout
            .as_ref()
            .map(|r| r.message.as_str())
            .unwrap_or("")
            .split([' ', ',', ':'])
            .collect();
        for p in pods
            .iter()
            .filter(|p| p.revision == 2 && !batch.contains(&p.name.as_str()))
        {
            serves(p, "v2").await;
            served += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served > 0, "no replica was checked while the rollout ran");
    let out = apply.join().unwrap();
    assert!(
        !out.status.success(),
        "a rollout that rolled back is an error"
    );
    assert!(stderr(&out).contains("rolled back"), "{}", stderr(&out));
    let (app, pods) = c
        .wait_app("web", "back at v2", LIMIT, |a, p| {
            a.rollout.as_ref().is_some_and(|r| r.state == "RolledBack") && all_ready_at(a, p, 2)
        })
        .await;
    let rollout = app.rollout.as_ref().unwrap();
    assert_eq!(
        (rollout.from_revision, rollout.to_revision, rollout.batch),
        (2, 3, 1),
        "{rollout:?}"
    );
    assert_eq!(app.revision, 2);
    let cond = app
        .conditions
        .iter()
        .find(|c| c.r#type == "Progressing")
        .unwrap();
    assert_eq!(
        (cond.status.as_str(), cond.reason.as_str()),
        ("False", "UpdateFailed"),
        "{cond:?}"
    );
    assert_eq!(sandboxes(&rig, &pods).await, before);
    for p in &pods {
        serves(p, "v2").await;
    }

    // History and undo (to v1, in place).
    let history = c.kitectl_ok(&["rollout", "history", "deployment/web"]);
    assert!(
        history.contains("web-v1") && history.contains("web-broken"),
        "{history}"
    );
    c.kitectl_ok(&["rollout", "undo", "deployment/web", "--to-revision", "1"]);
    let (_, pods) = c
        .wait_app("web", "undone to v1", LIMIT, |a, p| {
            a.revision == 4 && all_ready_at(a, p, 4)
        })
        .await;
    for p in &pods {
        serves(p, "v1").await;
    }

    // Deleting the app removes its pods from the nodes.
    c.kitectl_ok(&["delete", "deployment", "web"]);
    nodes_run(&rig, &BTreeSet::new()).await;
    rig.down_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_node_s_replicas_move_and_its_agent_removes_them_on_return() {
    setup().await;
    let rig = Rig::up(2, 2);
    let c = &rig.coordinator;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), web_app("lost", "runc", WEB_V1, 2, "")).unwrap();
    c.kitectl_ok(&["apply", "-f", file.path().to_str().unwrap()]);
    let (_, pods) = c
        .wait_app("lost", "ready", LIMIT, |a, p| all_ready_at(a, p, 1))
        .await;
    let on_2: Vec<String> = pods
        .iter()
        .filter(|p| p.node == "node2")
        .map(|p| p.name.clone())
        .collect();
    assert_eq!(on_2.len(), 1, "one replica per node: {pods:#?}");

    // Node 2's agent and containerd die: NotReady after 3 s, its replica on node1 3 s later.
    rig.run(&["node-kill", "2"]);
    let (_, pods) = c
        .wait_app("lost", "moved to node1", LIMIT, |a, p| {
            all_ready_at(a, p, 1) && p.iter().all(|p| p.node == "node1")
        })
        .await;
    for p in &pods {
        serves(p, "v1").await;
    }
    let nodes = c.kitectl_ok(&["get", "nodes"]);
    assert!(
        nodes
            .lines()
            .any(|l| l.contains("node2") && l.contains("NotReady")),
        "{nodes}"
    );

    // It comes back: the pod the coordinator moved away is removed from it.
    rig.run(&["node-up", "2"]);
    let start = std::time::Instant::now();
    while !rig.node_pods(2).await.is_empty() {
        assert!(start.elapsed() < LIMIT, "node2 keeps {}", on_2[0]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let nodes = c.kitectl_ok(&["get", "nodes"]);
    assert!(
        nodes
            .lines()
            .any(|l| l.contains("node2") && l.contains("Ready") && !l.contains("NotReady")),
        "{nodes}"
    );
    rig.down_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_finishes_the_rollout() {
    setup().await;
    let mut rig = Rig::up(3, 2);
    // Each batch takes seconds: the readiness probe starts 3 s after the container.
    let v1 = slow_web_app("slow", WEB_V1, 4);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &v1).unwrap();
    let path = file.path().to_str().unwrap();
    let c = &mut rig.coordinator;
    c.kitectl_ok(&["apply", "-f", path]);
    c.wait_app("slow", "ready", LIMIT, |a, p| all_ready_at(a, p, 1))
        .await;
    std::fs::write(file.path(), v1.replace(WEB_V1, WEB_V2)).unwrap();
    c.kitectl_ok(&["apply", "-f", path, "--no-wait"]);
    c.wait_app("slow", "in its first batch", LIMIT, |a, _| {
        a.rollout
            .as_ref()
            .is_some_and(|r| r.state == "Updating" && r.batch >= 1)
    })
    .await;
    c.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.spawn();
    let (app, pods) = c
        .wait_app("slow", "rolled out", LIMIT, |a, p| {
            a.rollout.as_ref().is_some_and(|r| r.state == "Complete") && all_ready_at(a, p, 2)
        })
        .await;
    let rollout = app.rollout.clone().unwrap();
    assert!(rollout.batch >= 4, "{rollout:?}\n{}", c.log());
    for p in &pods {
        serves(p, "v2").await;
    }
    rig.down_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kite_pods_roll_out_in_place_in_their_vms() {
    setup().await;
    let rig = Rig::up(4, 2);
    let c = &rig.coordinator;
    let v1 = web_app("vm", "kite", WEB_V1, 2, "");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &v1).unwrap();
    let path = file.path().to_str().unwrap();
    c.kitectl_ok(&["apply", "-f", path]);
    let (_, pods) = c
        .wait_app("vm", "ready", LIMIT, |a, p| all_ready_at(a, p, 1))
        .await;
    let nodes: BTreeSet<&str> = pods.iter().map(|p| p.node.as_str()).collect();
    assert_eq!(nodes.len(), 2, "{pods:#?}");
    let before = sandboxes(&rig, &pods).await;
    let qemu: Vec<String> = before.values().map(|(id, _)| qemu_pid(id)).collect();
    for p in &pods {
        serves(p, "v1").await;
    }
    std::fs::write(file.path(), v1.replace(WEB_V1, WEB_V2)).unwrap();
    c.kitectl_ok(&["apply", "-f", path]);
    let (_, pods) = c
        .wait_app("vm", "at v2", LIMIT, |a, p| all_ready_at(a, p, 2))
        .await;
    let after = sandboxes(&rig, &pods).await;
    assert_eq!(after, before, "same sandboxes and IPs");
    let qemu_after: Vec<String> = after.values().map(|(id, _)| qemu_pid(id)).collect();
    assert_eq!(qemu_after, qemu, "same VMs");
    for p in &pods {
        serves(p, "v2").await;
    }
    c.kitectl_ok(&["delete", "deployment", "vm"]);
    nodes_run(&rig, &BTreeSet::new()).await;
    for pid in qemu {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "QEMU {pid} outlived its pod"
        );
    }
    rig.down_clean();
}
