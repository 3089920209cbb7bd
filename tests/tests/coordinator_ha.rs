//! The coordinator's high availability, against a real etcd cluster (three members of Debian's
//! etcd-server on loopback, hack/etcd.sh) and three kite-coordinators on a rig of two nodes
//! (hack/rig.sh): the etcd store's guards and fencing, the migration from the embedded store,
//! a leader killed in the middle of a rollout, an etcd member lost, the quorum lost and back,
//! and a leader paused past its lease. Each test has its own etcd cluster and rig, and checks
//! that neither leaves anything behind.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kite_coordinator::leader::{Elector, Leadership};
use kite_coordinator::store::{
    check_conformance, Commit, EmbeddedStore, EtcdOptions, EtcdStore, Store, StoreError, Txn,
};
use kite_e2e::agent::{WEB_V1, WEB_V2};
use kite_e2e::cluster::*;
use kite_e2e::cri::http_get;
use kite_e2e::require_setup;
use kite_protocol::cluster::{App, PodInfo};

const LIMIT: Duration = Duration::from_secs(120);
/// The rig's leader lease: a new leader within this (plus the election) after a loss.
const TTL: u64 = 4;

async fn setup() {
    tokio::task::spawn_blocking(require_setup).await.unwrap();
}

fn all_ready_at(app: &App, pods: &[PodInfo], revision: u64) -> bool {
    pods.len() == app.replicas as usize
        && pods
            .iter()
            .all(|p| p.ready && p.revision == revision && p.running_revision == revision)
}

async fn serves(pod: &PodInfo, body: &str) {
    let got = http_get(&format!("{}:8080", pod.ip), "/", Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("pod {} ({}): {e}", pod.name, pod.ip));
    assert_eq!(got.trim(), body, "pod {} serves", pod.name);
}

fn options(etcd: &Etcd, prefix: &str) -> EtcdOptions {
    EtcdOptions {
        endpoints: etcd.endpoints().split(',').map(str::to_string).collect(),
        prefix: prefix.into(),
        ca_file: None,
        cert_file: None,
        key_file: None,
        request_timeout: Duration::from_secs(3),
    }
}

/// Every pod the nodes run, by node, with its sandbox.
async fn on_nodes(rig: &Rig) -> Vec<(u32, String, String)> {
    let mut out = Vec::new();
    for node in 1..=rig.nodes {
        for name in rig.node_pods(node).await {
            let sandbox = rig
                .node_pod(node, &name)
                .await
                .map(|p| p.sandbox_id)
                .unwrap_or_default();
            out.push((node, name, sandbox));
        }
    }
    out.sort();
    out
}

/// Waits until the nodes run exactly `count` pods (a scale-in's pods stop gracefully).
async fn wait_on_nodes(rig: &Rig, count: usize) -> Vec<(u32, String, String)> {
    let started = Instant::now();
    loop {
        let now = on_nodes(rig).await;
        if now.len() == count {
            return now;
        }
        assert!(
            started.elapsed() < LIMIT,
            "the nodes run {now:?}, not {count} pods"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_store_guards_fences_migrates_and_says_when_quorum_is_lost() {
    setup().await;
    let etcd = Etcd::up(1, 3);
    let prefix = format!("/t{}", std::process::id());
    let o = options(&etcd, &prefix);
    let store = tokio::task::spawn_blocking({
        let o = o.clone();
        move || EtcdStore::connect(o).expect("connect to etcd")
    })
    .await
    .unwrap();
    let store = Arc::new(store);

    // The same behaviour as the embedded store, against etcd.
    tokio::task::spawn_blocking({
        let s = store.clone();
        move || check_conformance(s.as_ref())
    })
    .await
    .unwrap();

    // Fencing: writes carry the leader key; once it is gone nothing is written.
    let leadership = Leadership::candidate("127.0.0.1:1");
    let elector = Elector::new(o.clone(), 5);
    let term = elector
        .campaign(&leadership)
        .await
        .expect("win the election");
    store.set_fence(Some(term.fence.clone()));
    let s = store.clone();
    let put = move |key: &'static str| {
        let s = s.clone();
        async move {
            tokio::task::spawn_blocking(move || s.commit(Txn::default().put(key, b"v".to_vec())))
                .await
                .unwrap()
        }
    };
    assert!(matches!(put("/fenced/a").await, Ok(Commit::Done(_))));
    term.resign().await;
    match put("/fenced/b").await {
        Err(StoreError::NotLeader { key }) => assert!(key.contains("/leader"), "{key}"),
        other => panic!("a write after the leadership went: {other:?}"),
    }
    let s = store.clone();
    let b = tokio::task::spawn_blocking(move || s.get("/fenced/b"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b, None, "the fenced write left nothing");
    store.set_fence(None);

    // Migration: an embedded store's keys into an empty prefix, once.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    {
        let embedded = EmbeddedStore::open(&state.join("state.redb")).unwrap();
        let mut txn = Txn::default();
        for i in 0..150 {
            txn = txn.put(
                format!("/pods/default/p{i:03}"),
                format!("{i}").into_bytes(),
            );
        }
        embedded
            .commit(txn.put("/apps/default/a", b"{}".to_vec()))
            .unwrap();
    }
    let config = dir.path().join("kite.toml");
    let migrated = format!("/m{}", std::process::id());
    std::fs::write(
        &config,
        format!(
            "[coordinator]\nstate_dir = \"{}\"\nstore = \"etcd\"\n[coordinator.etcd]\nendpoints = [{}]\nprefix = \"{migrated}\"\n",
            state.display(),
            etcd.endpoints()
                .split(',')
                .map(|e| format!("\"{e}\""))
                .collect::<Vec<_>>()
                .join(",")
        ),
    )
    .unwrap();
    let migrate = || {
        Command::new(COORDINATOR)
            .arg("--config")
            .arg(&config)
            .arg("migrate-to-etcd")
            .output()
            .unwrap()
    };
    let out = migrate();
    assert!(out.status.success(), "{}", kite_e2e::text(&out.stderr));
    assert!(
        kite_e2e::text(&out.stdout).contains("copied 151 keys"),
        "{}",
        kite_e2e::text(&out.stdout)
    );
    let copy = {
        let o = options(&etcd, &migrated);
        tokio::task::spawn_blocking(move || EtcdStore::connect(o).unwrap().list("/").unwrap())
            .await
            .unwrap()
    };
    assert_eq!(copy.len(), 151);
    assert_eq!(copy[0].key, "/apps/default/a");
    let again = migrate();
    assert!(!again.status.success());
    assert!(
        kite_e2e::text(&again.stderr).contains("already holds 151 keys"),
        "{}",
        kite_e2e::text(&again.stderr)
    );

    // One member down: everything works. Two down: a write fails, saying why; back: works.
    etcd.stop(3);
    assert!(matches!(put("/q/one-down").await, Ok(Commit::Done(_))));
    etcd.stop(2);
    let started = Instant::now();
    let err = put("/q/two-down")
        .await
        .expect_err("a write without quorum");
    let message = kite_protocol::errors::error_chain(&err);
    assert!(
        message.contains("quorum") || message.contains("no leader"),
        "{message}"
    );
    assert!(started.elapsed() < Duration::from_secs(10), "{message}");
    etcd.start(2);
    etcd.start(3);
    let started = Instant::now();
    loop {
        match put("/q/back").await {
            Ok(Commit::Done(_)) => break,
            other => assert!(
                started.elapsed() < Duration::from_secs(30),
                "etcd back, writes still fail: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(store);
    etcd.down();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_coordinators_keep_the_cluster_through_the_loss_of_any_one_part() {
    setup().await;
    let etcd = Etcd::up(2, 3);
    let rig = Rig::up_ha(5, 2, &etcd, TTL);
    let c = &rig.coordinator;

    // An app whose batches take seconds (the probe starts 3 s after the container).
    let v1 = slow_web_app("ha", WEB_V1, 4);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &v1).unwrap();
    let path = file.path().to_str().unwrap();
    c.kitectl_ok(&["apply", "-f", path]);
    let (_, pods) = c
        .wait_app("ha", "ready", LIMIT, |a, p| all_ready_at(a, p, 1))
        .await;
    let names: BTreeSet<String> = pods.iter().map(|p| p.name.clone()).collect();
    let before = on_nodes(&rig).await;
    assert_eq!(before.len(), 4, "{before:?}");

    // 1. The leader dies in the middle of a rollout: another leads within the lease and
    //    finishes it; no pod is started twice (same sandboxes: in place) or lost.
    let first = rig.wait_leader(None, LIMIT).await;
    std::fs::write(file.path(), v1.replace(WEB_V1, WEB_V2)).unwrap();
    c.kitectl_ok(&["apply", "-f", path, "--no-wait"]);
    c.wait_app("ha", "in its first batch", LIMIT, |a, _| {
        a.rollout
            .as_ref()
            .is_some_and(|r| r.state == "Updating" && r.batch >= 1)
    })
    .await;
    let killed = Instant::now();
    rig.run(&["coordinator-kill", &first.to_string()]);
    let second = rig
        .wait_leader(Some(first), Duration::from_secs(TTL + 6))
        .await;
    let failover = killed.elapsed();
    assert!(
        failover < Duration::from_secs(TTL + 3),
        "fail-over took {failover:?}"
    );
    let (app, pods) = c
        .wait_app("ha", "rolled out", LIMIT, |a, p| {
            a.rollout.as_ref().is_some_and(|r| r.state == "Complete") && all_ready_at(a, p, 2)
        })
        .await;
    assert_eq!(app.replicas, 4);
    assert_eq!(
        pods.iter().map(|p| p.name.clone()).collect::<BTreeSet<_>>(),
        names,
        "the same pods"
    );
    assert_eq!(
        on_nodes(&rig).await,
        before,
        "same pods, same nodes, same sandboxes"
    );
    for p in &pods {
        serves(p, "v2").await;
    }
    assert!(
        rig.coordinator_log(second).contains("leading"),
        "{}",
        rig.coordinator_log(second)
    );
    // The dead one comes back and stands by.
    rig.run(&["coordinator-up", &first.to_string()]);
    let started = Instant::now();
    let info = loop {
        if let Some(info) = rig.leader_info(first).await {
            break info;
        }
        assert!(
            started.elapsed() < LIMIT,
            "coordinator {first} does not answer"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(!info.leading, "{info:?}");
    assert_eq!(rig.leader().await, Some(second));

    // 2. One etcd member lost: placing and scaling go on.
    etcd.stop(1);
    c.kitectl_ok(&["scale", "deployment/ha", "--replicas", "5"]);
    let (_, pods) = c
        .wait_app("ha", "scaled to 5", LIMIT, |a, p| {
            a.replicas == 5 && all_ready_at(a, p, 2)
        })
        .await;
    etcd.start(1);

    // 3. Two lost (no quorum): a change fails with a clear error, the pods keep serving; when
    //    a member returns, so does the cluster.
    etcd.stop(1);
    etcd.stop(2);
    let out = c.kitectl(&["scale", "deployment/ha", "--replicas", "3"]);
    assert!(!out.status.success(), "a scale without a quorum");
    let err = kite_e2e::text(&out.stderr);
    assert!(
        err.contains("quorum")
            || err.contains("no coordinator leads")
            || err.contains("does not lead"),
        "{err}"
    );
    for p in &pods {
        serves(p, "v2").await;
    }
    etcd.start(2);
    let back = rig.wait_leader(None, Duration::from_secs(60)).await;
    c.kitectl_ok(&["scale", "deployment/ha", "--replicas", "3"]);
    c.wait_app("ha", "scaled to 3", LIMIT, |a, p| {
        a.replicas == 3 && all_ready_at(a, p, 2)
    })
    .await;
    etcd.start(1);
    wait_on_nodes(&rig, 3).await;

    // 4. The leader paused past its lease: another leads, the app changes under it, and the
    //    old leader, resumed, does not act on what it remembers.
    rig.run(&["coordinator-pause", &back.to_string()]);
    let next = rig
        .wait_leader(Some(back), Duration::from_secs(TTL + 10))
        .await;
    c.kitectl_ok(&["scale", "deployment/ha", "--replicas", "2"]);
    c.wait_app("ha", "scaled to 2", LIMIT, |a, p| {
        a.replicas == 2 && all_ready_at(a, p, 2)
    })
    .await;
    rig.run(&["coordinator-resume", &back.to_string()]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let info = rig.leader_info(back).await.expect("it answers again");
    assert!(!info.leading, "the paused leader leads again: {info:?}");
    assert_eq!(rig.leader().await, Some(next));
    let log = rig.coordinator_log(back);
    assert!(log.contains("lost the leadership"), "{log}");
    let (app, pods) = c
        .wait_app("ha", "still at 2", LIMIT, |a, p| {
            a.replicas == 2 && all_ready_at(a, p, 2)
        })
        .await;
    assert_eq!(app.replicas, 2);
    let two = wait_on_nodes(&rig, 2).await;
    assert_eq!(
        two.iter()
            .map(|(_, n, _)| n.clone())
            .collect::<BTreeSet<_>>(),
        pods.iter().map(|p| p.name.clone()).collect::<BTreeSet<_>>()
    );

    c.kitectl_ok(&["delete", "deployment", "ha"]);
    rig.down_clean();
    etcd.down();
}
