//! A coordinator of its own per test (own directory, store, CA and port), and node agents that
//! join it with tokens, for the coordinator's end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use kite_protocol::cluster::cluster_client::ClusterClient;
use kite_protocol::cluster::{App, AppRef, ListRequest, PodInfo};
use tonic::transport::Channel;

use crate::agent::KITECTL;

pub const COORDINATOR: &str = "/usr/local/bin/kite-coordinator";

/// A coordinator: a process of the test's own, or a rig's.
pub struct TestCoordinator {
    dir: Option<tempfile::TempDir>,
    child: Option<Child>,
    /// `host:port`, or every coordinator of a highly available rig, comma-separated.
    pub address: String,
    pki: PathBuf,
    rig: Option<u32>,
    /// The rig script's environment (the etcd of a highly available rig).
    rig_env: Vec<(String, String)>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl TestCoordinator {
    /// `kite-coordinator init`, then the coordinator, with `extra` in its `[coordinator]`
    /// section (node timeouts are short: 3 s NotReady, 3 s more to move its pods).
    pub fn start(name: &str, extra: &str) -> TestCoordinator {
        assert!(
            Path::new(COORDINATOR).exists(),
            "{COORDINATOR} is missing: run hack/setup.sh first"
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("kite-coordinator-{name}-"))
            .tempdir()
            .expect("a temporary directory");
        let address = format!("127.0.0.1:{}", free_port());
        // Defaults `extra` may override.
        let defaults: String = [
            ("node_timeout_secs", "3"),
            ("pod_eviction_secs", "3"),
            ("log_level", "\"info,kite_coordinator=debug\""),
        ]
        .iter()
        .filter(|(k, _)| !extra.contains(k))
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect();
        let config = format!(
            "[coordinator]\n\
             state_dir = \"{d}/state\"\n\
             pki_dir = \"{d}/pki\"\n\
             listen = \"{address}\"\n\
             metrics_addr = \"127.0.0.1:0\"\n\
             {defaults}{extra}\n",
            d = dir.path().display()
        );
        std::fs::write(dir.path().join("kite.toml"), config).expect("write the config");
        let out = Command::new(COORDINATOR)
            .arg("--config")
            .arg(dir.path().join("kite.toml"))
            .arg("init")
            .output()
            .expect("run kite-coordinator init");
        assert!(out.status.success(), "init: {}", crate::text(&out.stderr));
        let mut c = TestCoordinator {
            pki: dir.path().join("pki"),
            dir: Some(dir),
            child: None,
            address,
            rig: None,
            rig_env: Vec::new(),
        };
        c.spawn();
        c
    }

    pub fn pki(&self) -> PathBuf {
        self.pki.clone()
    }

    fn log_path(&self) -> PathBuf {
        match (&self.dir, self.rig) {
            (Some(d), _) => d.path().join("coordinator.log"),
            (None, Some(id)) => PathBuf::from(format!("/var/log/kite/rig{id}/coordinator.log")),
            (None, None) => PathBuf::new(),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the coordinator (again) and waits until it takes connections.
    pub fn spawn(&mut self) {
        if let Some(id) = self.rig {
            let out = rig_script(id, &self.rig_env, &["coordinator-up"]);
            assert!(
                out.status.success(),
                "rig coordinator-up: {}",
                crate::text(&out.stderr)
            );
            return;
        }
        let dir = self
            .dir
            .as_ref()
            .expect("the coordinator's directory")
            .path();
        let address = self.address.clone();
        self.child = Some(crate::start_daemon(
            COORDINATOR,
            &dir.join("kite.toml"),
            &dir.join("coordinator.log"),
            Duration::from_secs(30),
            || std::net::TcpStream::connect(&address).is_ok(),
        ));
    }

    /// The process's id (a coordinator of the test's own).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill9(&mut self) {
        if let Some(id) = self.rig {
            let out = rig_script(id, &self.rig_env, &["coordinator-kill"]);
            assert!(
                out.status.success(),
                "rig coordinator-kill: {}",
                crate::text(&out.stderr)
            );
            return;
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// kitectl against this coordinator with the admin credential (or `credentials`).
    pub fn kitectl_as(&self, credentials: &Path, args: &[&str]) -> Output {
        Command::new(KITECTL)
            .arg("--coordinator")
            .arg(&self.address)
            .arg("--credentials")
            .arg(credentials)
            .args(args)
            .output()
            .expect("run kitectl")
    }

    pub fn kitectl(&self, args: &[&str]) -> Output {
        self.kitectl_as(&self.pki(), args)
    }

    pub fn kitectl_ok(&self, args: &[&str]) -> String {
        let out = self.kitectl(args);
        assert!(
            out.status.success(),
            "kitectl {args:?}: {}{}\ncoordinator log:\n{}",
            crate::text(&out.stdout),
            crate::text(&out.stderr),
            self.log()
        );
        crate::text(&out.stdout)
    }

    /// A bootstrap token, valid for `ttl`.
    pub fn token(&self, ttl: &str) -> String {
        self.kitectl_ok(&["token", "create", "--ttl", ttl])
            .trim()
            .to_string()
    }

    pub async fn client(&self) -> ClusterClient<Channel> {
        let read = |f: &str| {
            std::fs::read_to_string(self.pki().join(f)).unwrap_or_else(|e| panic!("read {f}: {e}"))
        };
        let (channel, _) = kite_protocol::cluster::connect_leader(
            &kite_protocol::cluster::addresses(&self.address),
            &read("ca.crt"),
            Some((&read("admin.crt"), &read("admin.key"))),
            Duration::from_secs(30),
        )
        .await
        .expect("connect to the (leading) coordinator");
        ClusterClient::new(channel)
    }

    pub async fn app(&self, name: &str) -> App {
        self.client()
            .await
            .get_app(AppRef {
                namespace: "default".into(),
                name: name.into(),
            })
            .await
            .expect("get the app")
            .into_inner()
    }

    pub async fn pods(&self, app: &str) -> Vec<PodInfo> {
        self.client()
            .await
            .list_pods(ListRequest {
                namespace: "default".into(),
                app: app.into(),
            })
            .await
            .expect("list pods")
            .into_inner()
            .pods
    }

    /// Waits until `check` holds of the app and its pods.
    pub async fn wait_app(
        &self,
        name: &str,
        what: &str,
        limit: Duration,
        check: impl Fn(&App, &[PodInfo]) -> bool,
    ) -> (App, Vec<PodInfo>) {
        let start = Instant::now();
        loop {
            let (app, pods) = (self.app(name).await, self.pods(name).await);
            if check(&app, &pods) {
                return (app, pods);
            }
            assert!(
                start.elapsed() < limit,
                "app {name}: not {what} within {limit:?}: {app:#?}\n{pods:#?}\ncoordinator log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for TestCoordinator {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An apps/v1 Deployment of `replicas` busybox web servers on :8080 (image `image`) with an
/// HTTP readiness probe.
pub fn web_app(name: &str, runtime: &str, image: &str, replicas: u32, extra_spec: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
spec:
  replicas: {replicas}
{extra_spec}  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      runtimeClassName: {runtime}
      terminationGracePeriodSeconds: 2
      containers:
      - name: web
        image: {image}
        ports:
        - {{name: http, containerPort: 8080}}
        readinessProbe:
          httpGet: {{path: /, port: http}}
          periodSeconds: 1
        resources:
          requests: {{cpu: 50m, memory: 32Mi}}
"#
    )
}

/// [`web_app`] rolled out one pod at a time, each batch taking seconds (the readiness probe
/// starts 3 s after the container): a rollout to interrupt.
pub fn slow_web_app(name: &str, image: &str, replicas: u32) -> String {
    web_app(
        name,
        "runc",
        image,
        replicas,
        "  strategy: {rollingUpdate: {maxUnavailable: 1}}\n",
    )
    .replace(
        "periodSeconds: 1",
        "periodSeconds: 1\n          initialDelaySeconds: 3",
    )
}

/// What `program args` printed.
fn output_of(program: &str, args: &[&str]) -> String {
    crate::text(
        &Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"))
            .stdout,
    )
}

/// A cluster on hack/rig.sh: the coordinator and `nodes` nodes, each a network namespace with
/// its own containerd, snapshotter and agent. Torn down (everything) when dropped.
pub struct Rig {
    pub id: u32,
    pub nodes: u32,
    pub coordinator: TestCoordinator,
    env: Vec<(String, String)>,
}

const RIG_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../hack/rig.sh");

fn rig_script(id: u32, env: &[(String, String)], args: &[&str]) -> Output {
    Command::new("bash")
        .arg(RIG_SCRIPT)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RIG", id.to_string())
        .env("NODE_TIMEOUT_SECS", "3")
        .env("POD_EVICTION_SECS", "3")
        .env(
            "AGENT_EXTRA",
            "update_timeout_secs = 40\nsync_interval_ms = 200",
        )
        .output()
        .expect("run hack/rig.sh")
}

impl Rig {
    /// Rig `id` (1-9; each test its own) with `nodes` nodes; one left by a failed run is
    /// removed first.
    pub fn up(id: u32, nodes: u32) -> Rig {
        Rig::up_with(id, nodes, Vec::new(), format!("10.99.{id}.1:9620"))
    }

    /// A highly available rig: three coordinators on `etcd` (lease TTL `lease_ttl_secs`),
    /// coordinator J (1-3) on 10.99.ID.1:(9620 + 2(J-1)).
    pub fn up_ha(id: u32, nodes: u32, etcd: &Etcd, lease_ttl_secs: u64) -> Rig {
        let env = vec![
            ("ETCD_ENDPOINTS".to_string(), etcd.endpoints()),
            ("COORDINATORS".to_string(), "3".to_string()),
            ("LEASE_TTL_SECS".to_string(), lease_ttl_secs.to_string()),
        ];
        let address = (1..=3)
            .map(|j| Rig::coordinator_address(id, j))
            .collect::<Vec<_>>()
            .join(",");
        Rig::up_with(id, nodes, env, address)
    }

    pub fn coordinator_address(id: u32, j: u32) -> String {
        format!("10.99.{id}.1:{}", 9620 + 2 * (j - 1))
    }

    fn up_with(id: u32, nodes: u32, env: Vec<(String, String)>, address: String) -> Rig {
        let _ = rig_script(id, &env, &["down"]);
        let out = rig_script(id, &env, &["up", &nodes.to_string()]);
        assert!(
            out.status.success(),
            "hack/rig.sh up: {}{}",
            crate::text(&out.stdout),
            crate::text(&out.stderr)
        );
        Rig {
            id,
            nodes,
            coordinator: TestCoordinator {
                dir: None,
                child: None,
                address,
                pki: PathBuf::from(format!("/etc/kite/rig{id}/pki")),
                rig: Some(id),
                rig_env: env.clone(),
            },
            env,
        }
    }

    /// What coordinator `j` of a highly available rig says of the leadership (None: it does
    /// not answer within 2 s — dead or paused).
    pub async fn leader_info(&self, j: u32) -> Option<kite_protocol::cluster::LeaderInfo> {
        let ca = std::fs::read_to_string(self.coordinator.pki().join("ca.crt")).ok()?;
        let address = Rig::coordinator_address(self.id, j);
        let ask = async {
            let channel = kite_protocol::cluster::connect(&address, &ca, None)
                .await
                .ok()?;
            kite_protocol::cluster::coordinators_client::CoordinatorsClient::new(channel)
                .leader(kite_protocol::cluster::LeaderRequest {})
                .await
                .ok()
                .map(|r| r.into_inner())
        };
        tokio::time::timeout(Duration::from_secs(2), ask)
            .await
            .ok()
            .flatten()
    }

    /// The coordinator that leads (1-3), as the leader itself says.
    pub async fn leader(&self) -> Option<u32> {
        for j in 1..=3 {
            if self.leader_info(j).await.is_some_and(|i| i.leading) {
                return Some(j);
            }
        }
        None
    }

    /// Waits until a coordinator other than `not` leads; returns it.
    pub async fn wait_leader(&self, not: Option<u32>, limit: Duration) -> u32 {
        let start = Instant::now();
        loop {
            if let Some(j) = self.leader().await.filter(|j| Some(*j) != not) {
                return j;
            }
            assert!(
                start.elapsed() < limit,
                "no coordinator (other than {not:?}) leads after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Coordinator `j`'s log.
    pub fn coordinator_log(&self, j: u32) -> String {
        std::fs::read_to_string(format!("/var/log/kite/rig{}/coordinator{j}.log", self.id))
            .unwrap_or_default()
    }

    pub fn run(&self, args: &[&str]) {
        let out = rig_script(self.id, &self.env, args);
        assert!(
            out.status.success(),
            "hack/rig.sh {args:?}: {}{}",
            crate::text(&out.stdout),
            crate::text(&out.stderr)
        );
    }

    /// Node `i`'s agent API socket.
    pub fn agent_socket(&self, node: u32) -> PathBuf {
        PathBuf::from(format!("/run/kite/rig{}/node{node}/agent.sock", self.id))
    }

    /// The pod as node `i`'s agent has it.
    pub async fn node_pod(&self, node: u32, name: &str) -> Option<kite_protocol::node::Pod> {
        let mut client = kite_protocol::node::connect(&self.agent_socket(node))
            .await
            .ok()?;
        client
            .get_pod(kite_protocol::node::PodRef {
                namespace: "default".into(),
                name: name.into(),
            })
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// The names of node `i`'s pods.
    pub async fn node_pods(&self, node: u32) -> std::collections::BTreeSet<String> {
        let mut client = kite_protocol::node::connect(&self.agent_socket(node))
            .await
            .expect("connect to the node's agent");
        client
            .list_pods(kite_protocol::node::ListPodsRequest::default())
            .await
            .expect("list the node's pods")
            .into_inner()
            .pods
            .into_iter()
            .map(|p| p.name)
            .collect()
    }

    /// Tears the rig down and checks it left nothing: namespaces, links, mounts, processes.
    pub fn down_clean(mut self) {
        self.run(&["down"]);
        let id = self.id;
        self.id = 0;
        let netns = output_of("ip", &["netns", "list"]);
        assert!(
            !netns.contains(&format!("kite-r{id}-")),
            "namespaces left: {netns}"
        );
        let links = output_of("ip", &["link"]);
        assert!(
            !links.contains(&format!("kiterig{id}")),
            "links left: {links}"
        );
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        let prefix = format!("rig{id}/");
        assert!(!mounts.contains(&prefix), "mounts left: {mounts}");
        let ps = output_of("ps", &["-eo", "args"]);
        assert!(
            !ps.lines().any(|l| l.contains(&format!("/rig{id}/"))),
            "processes left: {ps}"
        );
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if self.id != 0 {
            let _ = rig_script(self.id, &self.env, &["down"]);
        }
    }
}

const ETCD_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../hack/etcd.sh");

/// An etcd cluster on loopback (hack/etcd.sh, Debian's etcd-server): members as processes of
/// their own, stopped and their data removed when dropped.
pub struct Etcd {
    pub id: u32,
    pub members: u32,
}

fn etcd_script(id: u32, args: &[&str]) -> Output {
    Command::new("bash")
        .arg(ETCD_SCRIPT)
        .args(args)
        .env("ETCD_ID", id.to_string())
        .output()
        .expect("run hack/etcd.sh")
}

impl Etcd {
    /// Cluster `id` (0-9; each test its own) of `members` members; one left by a failed run is
    /// removed first.
    pub fn up(id: u32, members: u32) -> Etcd {
        let _ = etcd_script(id, &["down"]);
        let etcd = Etcd { id, members };
        etcd.run(&["up", &members.to_string()]);
        etcd
    }

    pub fn run(&self, args: &[&str]) {
        let out = etcd_script(self.id, args);
        assert!(
            out.status.success(),
            "hack/etcd.sh {args:?}: {}{}",
            crate::text(&out.stdout),
            crate::text(&out.stderr)
        );
    }

    pub fn endpoints(&self) -> String {
        (1..=self.members)
            .map(|m| format!("http://127.0.0.1:{}", 32000 + 100 * self.id + 10 * m))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// SIGKILLs member `m` (its data stays).
    pub fn stop(&self, m: u32) {
        self.run(&["stop", &m.to_string()]);
    }

    pub fn start(&self, m: u32) {
        self.run(&["start", &m.to_string()]);
    }

    /// Stops every member and checks none is left.
    pub fn down(mut self) {
        self.run(&["down"]);
        let id = self.id;
        self.members = 0;
        let ps = output_of("ps", &["-eo", "args"]);
        assert!(
            !ps.lines().any(|l| l.contains(&format!("/etcd{id}/"))),
            "etcd members left: {ps}"
        );
        assert!(
            !Path::new(&format!("/var/lib/kite/etcd{id}")).exists(),
            "etcd data left"
        );
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if self.members != 0 {
            let _ = etcd_script(self.id, &["down"]);
        }
    }
}
