//! The coordinator's store, embedded (redb, fsync per commit) against etcd (a cluster of three
//! members on loopback, hack/etcd.sh; Raft commit = fsync on a quorum): the latency of one
//! guarded commit (a pod's assignment, ~200 bytes, guarded by the revision read), of a commit of
//! 60 assignments (the most one etcd transaction carries), and of listing 1,000 keys.
//! hack/bench-coordinator.sh runs it.
//!
//!     ETCD_ENDPOINTS=http://127.0.0.1:32310,… cargo run --release -p kite-e2e --example store_latency -- [N]

use std::time::{Duration, Instant};

use kite_coordinator::store::{Commit, EmbeddedStore, EtcdOptions, EtcdStore, Guard, Store, Txn};

fn record(i: usize) -> Vec<u8> {
    format!(
        r#"{{"namespace":"default","name":"app-{i:05}","app":"default/app","node":"node{:03}","revision":1,"created_ms":1764540000000}}"#,
        i % 100
    )
    .into_bytes()
}

fn stats(mut v: Vec<Duration>) -> String {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    // The q-th quantile by rank: (len - 1) * q / 100.
    let p = |q: usize| v[(v.len() - 1) * q / 100];
    format!(
        "median {:.2} ms, p99 {:.2} ms [{:.2}–{:.2}]",
        ms(p(50)),
        ms(p(99)),
        ms(v[0]),
        ms(v[v.len() - 1])
    )
}

fn measure(name: &str, store: &dyn Store, n: usize) {
    // One guarded commit at a time: create, then updates guarded by the revision read.
    let mut revs = vec![0u64; 100];
    let mut one = Vec::with_capacity(n);
    for i in 0..n {
        let k = format!("/pods/default/one-{:03}", i % 100);
        let guard = match revs[i % 100] {
            0 => Guard::Absent(k.clone()),
            r => Guard::Revision(k.clone(), r),
        };
        let t = Instant::now();
        let c = store
            .commit(Txn::default().guard(guard).put(k, record(i)))
            .expect("commit");
        one.push(t.elapsed());
        match c {
            Commit::Done(r) => revs[i % 100] = r,
            Commit::Conflict { key, .. } => panic!("{key}: conflict"),
        }
    }
    let mut batch = Vec::new();
    for b in 0..(n / 60).max(5) {
        let mut txn = Txn::default();
        for j in 0..60 {
            let k = format!("/pods/default/batch-{b:04}-{j:02}");
            txn = txn.guard(Guard::Absent(k.clone())).put(k, record(j));
        }
        let t = Instant::now();
        store.commit(txn).expect("commit a batch");
        batch.push(t.elapsed());
    }
    // 1,000 keys under one prefix, listed.
    let mut txn = Txn::default();
    for i in 0..1000 {
        txn = txn.put(format!("/list/p{i:04}"), record(i));
        if txn.puts.len() == 60 {
            store.commit(std::mem::take(&mut txn)).expect("fill");
        }
    }
    store.commit(txn).expect("fill");
    let mut list = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(store.list("/list/").expect("list").len(), 1000);
        list.push(t.elapsed());
    }
    println!(
        "| {name} | {} | {} | {} |",
        stats(one),
        stats(batch),
        stats(list)
    );
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(500);
    println!(
        "| store | one guarded commit ({n}) | 60 assignments in one commit | list 1,000 keys |"
    );
    println!("|---|---|---|---|");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let embedded = EmbeddedStore::open(&dir.path().join("state.redb")).expect("open redb");
    measure("embedded (redb)", &embedded, n);
    if let Ok(endpoints) = std::env::var("ETCD_ENDPOINTS") {
        let etcd = EtcdStore::connect(EtcdOptions {
            endpoints: endpoints.split(',').map(str::to_string).collect(),
            prefix: format!("/latency-{}", std::process::id()),
            ca_file: None,
            cert_file: None,
            key_file: None,
            request_timeout: Duration::from_secs(5),
        })
        .expect("connect to etcd");
        measure("etcd, 3 members", &etcd, n);
    }
}
