//! The coordinator's placement decision (issue: one decision over 1,000 and 10,000 nodes): a
//! replica of an app with a 2-layer image against nodes of which some hold the image, some
//! run replicas of the app, some are full, cordoned or not ready.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kite_coordinator::placement::{place, NodeView, PodRequest, Resources, Weights};

fn nodes(n: usize) -> Vec<NodeView> {
    (0..n)
        .map(|i| {
            let mut node = NodeView {
                name: format!("node-{i:05}"),
                ready: i % 97 != 0,
                cordoned: i % 101 == 0,
                allocatable: Resources {
                    cpu_millis: 16_000,
                    memory_bytes: 64 << 30,
                },
                requested: Resources {
                    cpu_millis: (i as u64 * 37) % 16_000,
                    memory_bytes: ((i as u64 * 53) % 64) << 30,
                },
                runtime_classes: ["kite".to_string(), "runc".to_string()].into(),
                ..Default::default()
            };
            for l in 0..40 {
                node.layers
                    .insert(format!("sha256:{:064x}", (i * 7 + l) % 500));
            }
            if i % 3 == 0 {
                node.layers.insert("sha256:app".into());
            }
            if i % 10 == 0 {
                node.replicas.insert("shop/web".into(), (i % 4) as u32);
            }
            node
        })
        .collect()
}

fn placement(c: &mut Criterion) {
    let pod = PodRequest {
        app: "shop/web".into(),
        requests: Resources {
            cpu_millis: 500,
            memory_bytes: 1 << 30,
        },
        runtime_class: "kite".into(),
        layers: vec![
            ("sha256:base".into(), 30 << 20),
            ("sha256:app".into(), 300 << 20),
        ],
        java_key: Some("k".into()),
    };
    let weights = Weights::default();
    let mut group = c.benchmark_group("placement");
    for n in [1_000usize, 10_000] {
        let nodes = nodes(n);
        group.bench_with_input(BenchmarkId::new("one_decision", n), &nodes, |b, nodes| {
            b.iter(|| place(nodes, &pod, &weights).expect("a node fits"))
        });
    }
    group.finish();
}

criterion_group!(benches, placement);
criterion_main!(benches);
