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
    pub address: String,
    pki: PathBuf,
    rig: Option<u32>,
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
            let out = rig_script(id, &["coordinator-up"]);
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
            let out = rig_script(id, &["coordinator-kill"]);
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
        let channel = kite_protocol::cluster::connect(
            &self.address,
            &read("ca.crt"),
            Some((&read("admin.crt"), &read("admin.key"))),
        )
        .await
        .expect("connect to the coordinator");
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

/// A cluster on hack/rig.sh: the coordinator and `nodes` nodes, each a network namespace with
/// its own containerd, snapshotter and agent. Torn down (everything) when dropped.
pub struct Rig {
    pub id: u32,
    pub nodes: u32,
    pub coordinator: TestCoordinator,
}

const RIG_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../hack/rig.sh");

fn rig_script(id: u32, args: &[&str]) -> Output {
    Command::new("bash")
        .arg(RIG_SCRIPT)
        .args(args)
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
        let _ = rig_script(id, &["down"]);
        let out = rig_script(id, &["up", &nodes.to_string()]);
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
                address: format!("10.99.{id}.1:9620"),
                pki: PathBuf::from(format!("/etc/kite/rig{id}/pki")),
                rig: Some(id),
            },
        }
    }

    pub fn run(&self, args: &[&str]) {
        let out = rig_script(self.id, args);
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
        let netns = crate::text(
            &Command::new("ip")
                .args(["netns", "list"])
                .output()
                .unwrap()
                .stdout,
        );
        assert!(
            !netns.contains(&format!("kite-r{id}-")),
            "namespaces left: {netns}"
        );
        let links = crate::text(&Command::new("ip").args(["link"]).output().unwrap().stdout);
        assert!(
            !links.contains(&format!("kiterig{id}")),
            "links left: {links}"
        );
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        let prefix = format!("rig{id}/");
        assert!(!mounts.contains(&prefix), "mounts left: {mounts}");
        let ps = crate::text(
            &Command::new("ps")
                .args(["-eo", "args"])
                .output()
                .unwrap()
                .stdout,
        );
        assert!(
            !ps.lines().any(|l| l.contains(&format!("/rig{id}/"))),
            "processes left: {ps}"
        );
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if self.id != 0 {
            let _ = rig_script(self.id, &["down"]);
        }
    }
}
