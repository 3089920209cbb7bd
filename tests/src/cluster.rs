//! A coordinator of its own per test (own directory, store, CA and port), and node agents that
//! join it with tokens, for the coordinator's end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use kite_protocol::cluster::cluster_client::ClusterClient;
use kite_protocol::cluster::{App, AppRef, ListRequest, PodInfo};
use tonic::transport::Channel;

use crate::agent::{TestAgent, KITECTL};

pub const COORDINATOR: &str = "/usr/local/bin/kite-coordinator";

pub struct TestCoordinator {
    dir: tempfile::TempDir,
    child: Option<Child>,
    pub address: String,
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
        let config = format!(
            "[coordinator]\n\
             state_dir = \"{d}/state\"\n\
             pki_dir = \"{d}/pki\"\n\
             listen = \"{address}\"\n\
             metrics_addr = \"127.0.0.1:0\"\n\
             node_timeout_secs = 3\n\
             pod_eviction_secs = 3\n\
             log_level = \"info,kite_coordinator=debug\"\n\
             {extra}\n",
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
            dir,
            child: None,
            address,
        };
        c.spawn();
        c
    }

    pub fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("coordinator.log")).unwrap_or_default()
    }

    /// Starts the coordinator (again) and waits until it takes connections.
    pub fn spawn(&mut self) {
        let address = self.address.clone();
        self.child = Some(crate::start_daemon(
            COORDINATOR,
            &self.dir.path().join("kite.toml"),
            &self.dir.path().join("coordinator.log"),
            Duration::from_secs(30),
            || std::net::TcpStream::connect(&address).is_ok(),
        ));
    }

    pub fn kill9(&mut self) {
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

    /// An agent that joins as `node` with a fresh token.
    pub fn agent(&self, node: &str) -> TestAgent {
        let token = self.token("10m");
        TestAgent::start_with(
            node,
            &format!(
                "[agent.coordinator]\n\
                 address = \"{}\"\n\
                 ca_file = \"{}/ca.crt\"\n\
                 token = \"{token}\"\n\
                 node_name = \"{node}\"\n\
                 heartbeat_secs = 1\n",
                self.address,
                self.pki().display()
            ),
        )
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
        self.kill9();
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
