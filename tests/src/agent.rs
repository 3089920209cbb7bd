//! A kite-agent of a test's own (the binary hack/setup.sh installs, its own socket, state,
//! logs and CRI label, a short crash back-off), its API client, and kitectl pointed at it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kite_protocol::node::node_agent_client::NodeAgentClient;
use kite_protocol::node::{Pod, PodRef, RunPodRequest};
use tonic::transport::Channel;

pub const AGENT: &str = "/usr/local/bin/kite-agent";
pub const KITECTL: &str = "/usr/local/bin/kitectl";
pub const WEB_V1: &str = "127.0.0.1:5000/kite/web-v1:latest";
pub const WEB_V2: &str = "127.0.0.1:5000/kite/web-v2:latest";
pub const WEB_BROKEN: &str = "127.0.0.1:5000/kite/web-broken:latest";
pub const JAVA17: &str = "127.0.0.1:5000/kite/java17-hello:latest";
pub const JAVA25: &str = "127.0.0.1:5000/kite/java25-hello:latest";
/// JDK 17, and its start copies the jar (a new mtime each start): archives are rejected.
pub const JAVA17_STALE: &str = "127.0.0.1:5000/kite/java17-stale:latest";

pub struct TestAgent {
    pub id: String,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl TestAgent {
    /// Starts an agent named `e2e-NAME-PID` and waits until it serves.
    pub fn start(name: &str) -> TestAgent {
        TestAgent::start_with(name, "")
    }

    /// The same, with `extra` appended to its kite.toml (further sections such as
    /// `[agent.java_cache]`). The Java cache lives in the agent's directory, with a 1 s warm-up.
    pub fn start_with(name: &str, extra: &str) -> TestAgent {
        for path in [AGENT, KITECTL] {
            assert!(
                Path::new(path).exists(),
                "{path} is missing: run hack/setup.sh first"
            );
        }
        let id = crate::unique_id(name);
        let dir = tempfile::Builder::new()
            .prefix(&format!("kite-agent-{name}-"))
            .tempdir()
            .expect("a temporary directory");
        let config = format!(
            "[agent]\n\
             api_socket = \"{d}/agent.sock\"\n\
             state_dir = \"{d}/state\"\n\
             log_dir = \"{d}/logs\"\n\
             agent_id = \"{id}\"\n\
             metrics_addr = \"127.0.0.1:0\"\n\
             backoff_initial_ms = 1000\n\
             backoff_max_ms = 8000\n\
             sync_interval_ms = 200\n\
             update_timeout_secs = 40\n\
             log_level = \"info,kite_agent=debug\"\n\
             [agent.java_cache]\n\
             dir = \"{d}/java-cache\"\n\
             {warmup}\
             {extra}\n",
            d = dir.path().display(),
            warmup = if extra.contains("warmup_secs") {
                ""
            } else {
                "warmup_secs = 1\n"
            },
        );
        std::fs::write(dir.path().join("kite.toml"), config).expect("write the agent's config");
        let mut agent = TestAgent {
            id,
            dir,
            child: None,
        };
        agent.spawn();
        agent
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Starts the agent process (again) and waits until its API answers.
    pub fn spawn(&mut self) {
        let socket = self.socket();
        self.child = Some(crate::start_daemon(
            AGENT,
            &self.dir.path().join("kite.toml"),
            &self.dir.path().join("agent.log"),
            Duration::from_secs(60),
            || std::os::unix::net::UnixStream::connect(&socket).is_ok(),
        ));
    }

    /// SIGKILL: the agent dies without a word; its pods must not notice.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and waits for the exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(c.id()).expect("pid"));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = c.wait();
        }
    }

    /// What the JVMs of instance `attempt` of container `container` of pod `uid` logged (the
    /// files the JVM itself wrote through the options the agent gave it), concatenated.
    pub fn jvm_log(&self, uid: &str, container: &str, attempt: u32) -> String {
        let dir = self
            .dir
            .path()
            .join("state/java")
            .join(uid)
            .join(format!("{container}-{attempt}"));
        let mut text = String::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            files.sort();
            for f in files {
                text.push_str(&std::fs::read_to_string(&f).unwrap_or_default());
            }
        }
        text
    }

    /// The Java cache's index (its archives by key).
    pub fn java_index(&self) -> serde_json::Value {
        let path = self.dir.path().join("java-cache/index.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        serde_json::from_str(&text).expect("the index is JSON")
    }

    pub async fn client(&self) -> NodeAgentClient<Channel> {
        kite_protocol::node::connect(&self.socket())
            .await
            .unwrap_or_else(|e| panic!("connect to the agent: {e}"))
    }

    /// kitectl against this agent, with `stdin` fed in.
    pub fn kitectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(KITECTL)
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kitectl");
        if let Some(text) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())
                .expect("write kitectl's stdin");
        }
        child.wait_with_output().expect("wait for kitectl")
    }

    /// kitectl that must succeed: its stdout.
    pub fn kitectl_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kitectl(args, stdin);
        assert!(
            out.status.success(),
            "kitectl {args:?}: {}{}\nagent log:\n{}",
            crate::text(&out.stdout),
            crate::text(&out.stderr),
            self.log()
        );
        crate::text(&out.stdout)
    }

    pub async fn get(&self, name: &str) -> Option<Pod> {
        self.client()
            .await
            .get_pod(PodRef {
                namespace: "default".into(),
                name: name.into(),
            })
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// Runs a manifest without waiting (the agent starts it in the background).
    pub async fn run_nowait(&self, manifest: &str) -> Result<Pod, tonic::Status> {
        use futures::StreamExt;
        let mut stream = self
            .client()
            .await
            .run_pod(RunPodRequest {
                manifest: manifest.into(),
                watch: false,
            })
            .await?
            .into_inner();
        let first = stream.next().await.expect("one answer")?;
        Ok(first.pod.expect("a pod"))
    }

    /// Deletes a pod with `grace` seconds (the agent's call returns when it is gone).
    pub async fn delete(&self, name: &str, grace: u32) -> Result<(), tonic::Status> {
        self.client()
            .await
            .delete_pod(kite_protocol::node::DeletePodRequest {
                pod: Some(PodRef {
                    namespace: "default".into(),
                    name: name.into(),
                }),
                grace_period_secs: Some(grace),
            })
            .await
            .map(|_| ())
    }

    /// Runs a manifest and waits until the pod is ready (panics when it fails, or is not ready
    /// within `limit`): its status (stages, events).
    pub async fn run_ready(&self, manifest: &str, name: &str, limit: Duration) -> Pod {
        self.run_nowait(manifest)
            .await
            .unwrap_or_else(|e| panic!("run {name}: {}", e.message()));
        self.wait_pod(name, limit, |p| {
            assert!(p.phase != "Failed", "pod {name} failed: {}", p.message);
            p.ready
        })
        .await
    }

    /// Deletes a pod with `grace` seconds and waits until the agent no longer lists it.
    pub async fn delete_gone(&self, name: &str, grace: u32, limit: Duration) {
        self.delete(name, grace)
            .await
            .unwrap_or_else(|e| panic!("delete {name}: {}", e.message()));
        let start = Instant::now();
        while self.get(name).await.is_some() {
            assert!(
                start.elapsed() < limit,
                "{name} not deleted within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until `check` holds for the pod (panics with its status after `limit`).
    /// The names of the pods the agent has.
    pub async fn pod_names(&self) -> std::collections::BTreeSet<String> {
        self.client()
            .await
            .list_pods(kite_protocol::node::ListPodsRequest::default())
            .await
            .expect("list the agent's pods")
            .into_inner()
            .pods
            .into_iter()
            .map(|p| p.name)
            .collect()
    }

    /// Waits until the agent no longer has the pod.
    pub async fn wait_pod_gone(&self, name: &str, limit: Duration) {
        let start = Instant::now();
        while self.get(name).await.is_some() {
            assert!(
                start.elapsed() < limit,
                "pod {name} still on the agent after {limit:?}: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn wait_pod(&self, name: &str, limit: Duration, check: impl Fn(&Pod) -> bool) -> Pod {
        let start = Instant::now();
        loop {
            let pod = self.get(name).await;
            if let Some(p) = &pod {
                if check(p) {
                    return p.clone();
                }
            }
            assert!(
                start.elapsed() < limit,
                "pod {name} not as expected after {limit:?}: {pod:#?}\nagent log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.kill9();
        // What a failed test left: this agent's sandboxes, found by its label.
        let id = self.id.clone();
        crate::block_on_own_thread(move || async move {
            let Ok(mut cri) =
                kite_cri::CriClient::connect(Path::new(kite_cri::CONTAINERD_SOCKET)).await
            else {
                return;
            };
            if let Ok(sandboxes) = cri
                .list_pod_sandboxes(&[("kite.io/agent", id.as_str())])
                .await
            {
                for s in sandboxes {
                    let _ = cri.stop_pod_sandbox(&s.id).await;
                    let _ = cri.remove_pod_sandbox(&s.id).await;
                }
            }
        });
    }
}

/// The sandboxes the CRI holds for this agent (all states).
pub async fn agent_sandboxes(agent_id: &str) -> Vec<kite_cri::api::PodSandbox> {
    let mut cri = kite_cri::CriClient::connect(Path::new(kite_cri::CONTAINERD_SOCKET))
        .await
        .expect("connect to the CRI");
    cri.list_pod_sandboxes(&[("kite.io/agent", agent_id)])
        .await
        .expect("list sandboxes")
}

/// A pod manifest serving `image` (busybox httpd on 8080) with an HTTP readiness probe and an
/// emptyDir at /data.
pub fn web_manifest(name: &str, runtime: &str, image: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{app: web}}
spec:
  runtimeClassName: {runtime}
  terminationGracePeriodSeconds: 2
  volumes:
  - name: data
    emptyDir: {{}}
  containers:
  - name: web
    image: {image}
    ports:
    - {{name: http, containerPort: 8080}}
    resources:
      requests: {{cpu: 100m, memory: 32Mi}}
      limits: {{cpu: "1", memory: 128Mi}}
    readinessProbe:
      httpGet: {{path: /, port: http}}
      periodSeconds: 1
      failureThreshold: 2
    volumeMounts:
    - {{name: data, mountPath: /data}}
"#
    )
}

/// The QEMU pid of a kite sandbox.
pub fn qemu_pid(sandbox_id: &str) -> String {
    std::fs::read_to_string(
        Path::new(crate::STATE_DIR)
            .join(sandbox_id)
            .join("qemu.pid"),
    )
    .unwrap_or_else(|e| panic!("sandbox {sandbox_id} has no QEMU pid file: {e}"))
    .trim()
    .to_string()
}

/// A Java app's pod (HTTP on 8080 with a readiness probe), for the Java cache's tests and
/// benchmark.
#[derive(Clone, Debug)]
pub struct JavaPod<'a> {
    pub name: &'a str,
    pub runtime: &'a str,
    pub image: &'a str,
    /// Its memory request and limit.
    pub memory: &'a str,
    pub cpu_request: &'a str,
    /// JAVA_TOOL_OPTIONS ("" for none).
    pub tool_options: &'a str,
    pub probe_path: &'a str,
    pub failure_threshold: u32,
    /// The annotation `kite.io/java-cache`: on or off.
    pub cache: bool,
}

impl JavaPod<'_> {
    pub fn manifest(&self) -> String {
        let env = if self.tool_options.is_empty() {
            String::new()
        } else {
            format!(
                "    env: [{{name: JAVA_TOOL_OPTIONS, value: \"{}\"}}]\n",
                self.tool_options
            )
        };
        format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  annotations: {{kite.io/java-cache: "{cache}"}}
spec:
  runtimeClassName: {runtime}
  terminationGracePeriodSeconds: 10
  containers:
  - name: app
    image: {image}
{env}    resources:
      requests: {{cpu: "{cpu}", memory: {memory}}}
      limits: {{cpu: "1", memory: {memory}}}
    readinessProbe:
      httpGet: {{path: "{probe}", port: 8080}}
      periodSeconds: 1
      failureThreshold: {failures}
"#,
            name = self.name,
            cache = if self.cache { "on" } else { "off" },
            runtime = self.runtime,
            image = self.image,
            cpu = self.cpu_request,
            memory = self.memory,
            probe = self.probe_path,
            failures = self.failure_threshold,
        )
    }
}

/// A pod of the Java test app that asks for the Java cache, with `memory` as its limit and
/// `tool_options` as its JAVA_TOOL_OPTIONS ("" for none).
pub fn java_manifest(
    name: &str,
    runtime: &str,
    image: &str,
    memory: &str,
    tool_options: &str,
) -> String {
    JavaPod {
        name,
        runtime,
        image,
        memory,
        cpu_request: "100m",
        tool_options,
        probe_path: "/",
        failure_threshold: 3,
        cache: true,
    }
    .manifest()
}
