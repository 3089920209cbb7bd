//! The node agent's hot paths: a v1/Pod manifest parsed and checked into a pod plan (every
//! `kitectl run`, every record a restarted agent reads), and a pod's status encoded and decoded
//! (every status change is recorded and sent to watchers).

use criterion::{criterion_group, criterion_main, Criterion};
use kite_agent::manifest;
use kite_protocol::node::{ContainerStatus, Event, Pod, Stage};
use prost::Message;

const MANIFEST: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: shop
  namespace: prod
  labels: {app: shop, tier: web}
  annotations: {kite.io/start-order: parallel}
spec:
  runtimeClassName: kite
  terminationGracePeriodSeconds: 10
  volumes:
  - {name: cache, emptyDir: {}}
  containers:
  - name: app
    image: registry.example.com/shop/app:1.42.0
    command: [java]
    args: ["-Xmx512m", "-jar", "/app/shop.jar"]
    env:
    - {name: SPRING_PROFILES_ACTIVE, value: prod}
    - {name: JAVA_TOOL_OPTIONS, value: "-XX:+UseSerialGC"}
    ports:
    - {name: http, containerPort: 8080}
    resources:
      requests: {cpu: 500m, memory: 512Mi}
      limits: {cpu: "2", memory: 1Gi}
    readinessProbe:
      httpGet: {path: /actuator/health, port: http}
      periodSeconds: 2
    livenessProbe:
      tcpSocket: {port: 8080}
      initialDelaySeconds: 30
    volumeMounts:
    - {name: cache, mountPath: /cache}
  - name: sidecar
    image: registry.example.com/shop/envoy:1.30
    args: ["-c", "/etc/envoy.yaml"]
    resources:
      limits: {cpu: 200m, memory: 128Mi}
"#;

fn status() -> Pod {
    let stage = |name: &str, start: i64, d: i64| Stage {
        name: name.into(),
        start_ms: start,
        duration_ms: d,
        detail: String::new(),
    };
    Pod {
        namespace: "prod".into(),
        name: "shop".into(),
        uid: "0f8e5a52-5d2a-4b8e-9c61-0c1a2b3c4d5e".into(),
        phase: "Running".into(),
        ready: true,
        ip: "10.88.0.17".into(),
        runtime_class: "kite".into(),
        sandbox_id: "b".repeat(64),
        start_order: "parallel".into(),
        containers: ["app", "sidecar"]
            .iter()
            .map(|n| ContainerStatus {
                name: n.to_string(),
                image: format!("registry.example.com/shop/{n}:1.42.0"),
                image_id: format!("sha256:{}", "c".repeat(64)),
                container_id: "d".repeat(64),
                state: "running".into(),
                ready: true,
                ..Default::default()
            })
            .collect(),
        stages: vec![
            stage("prefetch", 0, 900),
            stage("pull", 0, 1400),
            stage("sandbox", 0, 2100),
            stage("create/app", 2100, 250),
            stage("start/app", 2350, 40),
            stage("create/sidecar", 2390, 240),
            stage("start/sidecar", 2630, 40),
            stage("ready", 2670, 800),
        ],
        events: (0..30)
            .map(|i| Event {
                unix_ms: 1_796_000_000_000 + i,
                r#type: "Normal".into(),
                reason: "Started".into(),
                message: format!(
                    "started container app (registry.example.com/shop/app:1.42.0, attempt {i})"
                ),
                container: "app".into(),
            })
            .collect(),
        manifest_json: "{}".repeat(600),
        created_unix_ms: 1_796_000_000_000,
        message: String::new(),
        sandbox_attempt: 0,
    }
}

fn bench(c: &mut Criterion) {
    c.bench_function(
        "manifest parse + validate (2 containers, probes, volumes)",
        |b| {
            b.iter(|| {
                manifest::parse(std::hint::black_box(MANIFEST), "kite").expect("a valid manifest")
            })
        },
    );
    let pod = status();
    c.bench_function(
        "pod status encode (2 containers, 8 stages, 30 events)",
        |b| b.iter(|| std::hint::black_box(&pod).encode_to_vec()),
    );
    let bytes = pod.encode_to_vec();
    c.bench_function("pod status decode", |b| {
        b.iter(|| Pod::decode(std::hint::black_box(bytes.as_slice())).expect("decodes"))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
