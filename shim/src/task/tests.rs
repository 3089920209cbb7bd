//! The state machine against a fake sandbox and guest agent: which calls reach the guest, which
//! events containerd hears, in which order, and what each error says.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex as StdMutex};

use async_trait::async_trait;
use containerd_shim::protos::api::{Mount, Status};
use tokio::sync::{watch, Notify};

use super::error::TaskError;
use super::events::{EventSink, TaskEvent};
use super::guest::{
    ContainerStats, Exit, GuestAgent, GuestError, NewContainer, PodSandbox, SandboxBooter,
};
use super::state::{CreateRequest, TaskState, VM_GONE_STATUS};
use crate::config::ShimConfig;
use crate::io::{OpenError, Relays, StdioPaths};
use crate::rootfs::RootfsError;
use crate::sandbox::{BootTiming, SandboxError};

/// A guest agent that records calls; processes exit when the test says so.
#[derive(Default)]
struct FakeGuest {
    calls: StdMutex<Vec<String>>,
    exits: StdMutex<HashMap<String, watch::Sender<Option<u32>>>>,
    /// Create answers with this status code when set.
    fail_create: StdMutex<Option<ttrpc::Code>>,
    next_pid: StdMutex<u32>,
    /// When set, WaitOom answers at once with this (a lying or shutting-down guest); counts.
    oom_answer: StdMutex<Option<Option<String>>>,
    oom_calls: StdMutex<u32>,
    /// When set, signals get no answer (the call's deadline passes).
    deaf: StdMutex<bool>,
    /// When set, SIGKILL is answered with this (OK, or an error status) and carried out never.
    unkillable: StdMutex<Option<Option<ttrpc::Code>>>,
}

impl FakeGuest {
    fn call(&self, text: String) {
        self.calls.lock().unwrap().push(text);
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn pid(&self) -> u32 {
        let mut p = self.next_pid.lock().unwrap();
        *p += 1;
        100 + *p
    }

    fn exit_channel(&self, key: &str) -> watch::Receiver<Option<u32>> {
        self.exits
            .lock()
            .unwrap()
            .entry(key.to_string())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    /// Makes process `key` (`container` or `container/exec`) exit with `status`.
    fn exit(&self, key: &str, status: u32) {
        let _ = self.exit_channel(key);
        self.exits.lock().unwrap()[key].send_replace(Some(status));
    }
}

fn key(container_id: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        container_id.to_string()
    } else {
        format!("{container_id}/{exec_id}")
    }
}

#[async_trait]
impl GuestAgent for FakeGuest {
    async fn create_container(&self, c: NewContainer) -> Result<u32, GuestError> {
        self.call(format!("create {} {}", c.container_id, c.rootfs));
        if let Some(code) = *self.fail_create.lock().unwrap() {
            return Err(GuestError::Status {
                code,
                message: "exec: /nonexistent: no such file".into(),
            });
        }
        Ok(self.pid())
    }
    async fn start_container(&self, id: &str) -> Result<u32, GuestError> {
        self.call(format!("start {id}"));
        Ok(self.pid())
    }
    async fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        _process: Vec<u8>,
        _stdio: &StdioPaths,
    ) -> Result<u32, GuestError> {
        self.call(format!("exec {id} {exec_id}"));
        Ok(self.pid())
    }
    async fn signal_process(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        _all: bool,
    ) -> Result<(), GuestError> {
        self.call(format!("signal {} {signal}", key(id, exec_id)));
        if *self.deaf.lock().unwrap() {
            return Err(GuestError::Channel(ttrpc::Error::Others(
                "Receive packet timeout".into(),
            )));
        }
        if signal == 9 {
            if let Some(answer) = *self.unkillable.lock().unwrap() {
                return match answer {
                    None => Ok(()),
                    Some(code) => Err(GuestError::Status {
                        code,
                        message: "no such process".into(),
                    }),
                };
            }
            self.exit(&key(id, exec_id), 137);
        }
        Ok(())
    }
    async fn wait_process(&self, id: &str, exec_id: &str) -> Result<Exit, GuestError> {
        let mut rx = self.exit_channel(&key(id, exec_id));
        let status = rx
            .wait_for(Option::is_some)
            .await
            .map(|s| s.unwrap_or_default())
            .map_err(|_| GuestError::Channel(ttrpc::Error::LocalClosed))?;
        Ok(Exit { status, at_ns: 7 })
    }
    async fn remove_process(&self, id: &str, exec_id: &str) -> Result<(), GuestError> {
        self.call(format!("remove {}", key(id, exec_id)));
        Ok(())
    }
    async fn remove_container(&self, id: &str) -> Result<(), GuestError> {
        self.call(format!("remove {id}"));
        Ok(())
    }
    async fn resize_tty(&self, _: &str, _: &str, _: u32, _: u32) -> Result<(), GuestError> {
        Ok(())
    }
    async fn list_pids(&self, _: &str) -> Result<Vec<u32>, GuestError> {
        Ok(vec![1])
    }
    async fn container_stats(&self, id: &str) -> Result<ContainerStats, GuestError> {
        self.call(format!("stats {id:?}"));
        Ok(ContainerStats::default())
    }
    async fn update_container(&self, id: &str, _: Vec<u8>) -> Result<(), GuestError> {
        self.call(format!("update {id}"));
        Ok(())
    }
    async fn wait_oom(&self) -> Result<Option<String>, GuestError> {
        let answer = self.oom_answer.lock().unwrap().clone();
        match answer {
            Some(a) => {
                *self.oom_calls.lock().unwrap() += 1;
                Ok(a)
            }
            None => std::future::pending().await,
        }
    }
    async fn relay_stdio(&self, _: &str, _: &str, _: &StdioPaths) -> Result<Relays, OpenError> {
        Ok(Relays::none())
    }
}

struct FakeSandbox {
    id: String,
    guest: Arc<FakeGuest>,
    running: watch::Sender<bool>,
    stopped: Notify,
    log: Arc<StdMutex<Vec<String>>>,
}

#[async_trait]
impl PodSandbox for FakeSandbox {
    fn id(&self) -> &str {
        &self.id
    }
    fn pid(&self) -> u32 {
        42
    }
    fn timing(&self) -> BootTiming {
        BootTiming::default()
    }
    fn is_running(&self) -> bool {
        *self.running.borrow()
    }
    async fn exited(&self) {
        let _ = self.running.subscribe().wait_for(|r| !*r).await;
    }
    async fn shutdown(&self) {
        self.log
            .lock()
            .unwrap()
            .push(format!("shutdown {}", self.id));
        self.running.send_replace(false);
        self.stopped.notify_waiters();
    }
    fn agent(&self) -> &dyn GuestAgent {
        &*self.guest
    }
    fn prepare_container_files(
        &self,
        id: &str,
        _bundle: &Path,
        _rootfs: &[Mount],
        _spec: &mut oci_spec::runtime::Spec,
    ) -> Result<String, RootfsError> {
        self.log.lock().unwrap().push(format!("files {id}"));
        Ok(format!("{id}/rootfs"))
    }
    fn release_container_files(&self, id: &str) {
        self.log.lock().unwrap().push(format!("release {id}"));
    }
}

#[derive(Default)]
struct FakeBooter {
    guest: Arc<FakeGuest>,
    log: Arc<StdMutex<Vec<String>>>,
    sandboxes: StdMutex<Vec<Arc<FakeSandbox>>>,
}

#[async_trait]
impl SandboxBooter for FakeBooter {
    async fn boot(
        &self,
        _config: &ShimConfig,
        sandbox_id: &str,
        _spec: &oci_spec::runtime::Spec,
    ) -> Result<Arc<dyn PodSandbox>, SandboxError> {
        self.log.lock().unwrap().push(format!("boot {sandbox_id}"));
        let sandbox = Arc::new(FakeSandbox {
            id: sandbox_id.to_string(),
            guest: self.guest.clone(),
            running: watch::channel(true).0,
            stopped: Notify::new(),
            log: self.log.clone(),
        });
        self.sandboxes.lock().unwrap().push(sandbox.clone());
        Ok(sandbox)
    }
}

#[derive(Default)]
struct RecordedEvents(StdMutex<Vec<TaskEvent>>);

#[async_trait]
impl EventSink for RecordedEvents {
    async fn publish(&self, event: TaskEvent) {
        self.0.lock().unwrap().push(event);
    }
}

impl RecordedEvents {
    fn topics(&self) -> Vec<&'static str> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.topic().rsplit('/').next().unwrap_or_default())
            .collect()
    }

    fn exits(&self) -> Vec<(String, u32)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                TaskEvent::Exit(x) => Some((x.id.clone(), x.exit_status)),
                _ => None,
            })
            .collect()
    }
}

struct Harness {
    state: TaskState,
    booter: Arc<FakeBooter>,
    events: Arc<RecordedEvents>,
    bundles: tempfile::TempDir,
}

impl Harness {
    fn new() -> Self {
        let booter = Arc::new(FakeBooter::default());
        let events = Arc::new(RecordedEvents::default());
        let config = ShimConfig {
            timings_file: Default::default(),
            ..ShimConfig::default()
        };
        Harness {
            state: TaskState::new(config, booter.clone(), events.clone()),
            booter,
            events,
            bundles: tempfile::tempdir().unwrap(),
        }
    }

    fn guest(&self) -> &FakeGuest {
        &self.booter.guest
    }

    fn log(&self) -> Vec<String> {
        self.booter.log.lock().unwrap().clone()
    }

    /// A bundle whose spec belongs to pod `pod` (a sandbox container when `sandbox`).
    fn bundle(&self, id: &str, pod: Option<&str>, sandbox: bool) -> CreateRequest {
        let dir = self.bundles.path().join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let mut annotations = serde_json::Map::new();
        if let Some(pod) = pod {
            annotations.insert(crate::rootfs::SANDBOX_ID_ANNOTATION.into(), pod.into());
            annotations.insert(
                crate::rootfs::CONTAINER_TYPE_ANNOTATION.into(),
                if sandbox { "sandbox" } else { "container" }.into(),
            );
        }
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "annotations": annotations,
        });
        std::fs::write(dir.join("config.json"), spec.to_string()).unwrap();
        CreateRequest {
            container_id: id.to_string(),
            bundle: dir,
            ..CreateRequest::default()
        }
    }
}

async fn until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn a_container_runs_its_course_and_takes_its_sandbox_along() {
    let h = Harness::new();
    let pid = h.state.create(h.bundle("c1", None, false)).await.unwrap();
    assert_eq!(
        h.state.state("c1", "").await.unwrap().status.status,
        Status::CREATED
    );
    let started = h.state.start("c1", "").await.unwrap();
    assert_ne!(pid, started, "create and start each answer the guest's pid");
    assert_eq!(
        h.state.state("c1", "").await.unwrap().status.status,
        Status::RUNNING
    );
    let err = h.state.delete("c1", "").await.unwrap_err();
    assert_eq!(err.code(), ttrpc::Code::FAILED_PRECONDITION, "{err}");

    h.guest().exit("c1", 3);
    let waited = h.state.wait("c1", "").await.unwrap();
    assert_eq!((waited.status, waited.exit_status), (Status::STOPPED, 3));
    let deleted = h.state.delete("c1", "").await.unwrap();
    assert_eq!(deleted.exit_status, 3);

    assert_eq!(
        h.guest().calls(),
        ["create c1 c1/rootfs", "start c1", "remove c1"]
    );
    assert_eq!(
        h.log(),
        ["boot c1", "files c1", "release c1", "shutdown c1"]
    );
    assert_eq!(h.events.topics(), ["create", "start", "exit", "delete"]);
    let err = h.state.state("c1", "").await.unwrap_err();
    assert_eq!(err.code(), ttrpc::Code::NOT_FOUND);
    assert!(
        h.state.shutdown().await,
        "no container left: the shim may go"
    );
}

#[tokio::test]
async fn a_pods_containers_share_one_sandbox_and_the_sandbox_container_goes_last() {
    let h = Harness::new();
    let sandbox_pid = h
        .state
        .create(h.bundle("pod1", Some("pod1"), true))
        .await
        .unwrap();
    assert_eq!(sandbox_pid, 42, "the sandbox container's pid is the VM's");
    h.state.start("pod1", "").await.unwrap();
    h.state
        .create(h.bundle("app", Some("pod1"), false))
        .await
        .unwrap();
    h.state.start("app", "").await.unwrap();
    assert_eq!(h.log().iter().filter(|l| l.starts_with("boot")).count(), 1);

    // The sandbox container has no process in the guest: exec is refused, a signal ends it.
    let err = h
        .state
        .exec("pod1", "e1", b"{}".to_vec(), StdioPaths::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), ttrpc::Code::FAILED_PRECONDITION);
    h.state.kill("app", "", 9, false).await.unwrap();
    h.state.wait("app", "").await.unwrap();
    h.state.delete("app", "").await.unwrap();
    assert!(
        !h.log().iter().any(|l| l.starts_with("shutdown")),
        "the pod still stands"
    );
    h.state.kill("pod1", "", 15, false).await.unwrap();
    assert_eq!(
        h.state.wait("pod1", "").await.unwrap().exit_status,
        128 + 15
    );
    h.state.delete("pod1", "").await.unwrap();
    assert_eq!(h.log().last().map(String::as_str), Some("shutdown pod1"));
    assert_eq!(
        h.events.exits(),
        [("app".to_string(), 137), ("pod1".to_string(), 143)]
    );
}

#[tokio::test]
async fn the_vms_death_ends_every_process_with_137() {
    let h = Harness::new();
    h.state
        .create(h.bundle("pod2", Some("pod2"), true))
        .await
        .unwrap();
    h.state.start("pod2", "").await.unwrap();
    h.state
        .create(h.bundle("web", Some("pod2"), false))
        .await
        .unwrap();
    h.state.start("web", "").await.unwrap();
    let sandbox = h.booter.sandboxes.lock().unwrap()[0].clone();
    sandbox.running.send_replace(false);
    assert_eq!(
        h.state.wait("web", "").await.unwrap().exit_status,
        VM_GONE_STATUS
    );
    assert_eq!(
        h.state.wait("pod2", "").await.unwrap().exit_status,
        VM_GONE_STATUS
    );
    // A new container cannot join a pod whose VM is gone.
    let err = h
        .state
        .create(h.bundle("late", Some("pod2"), false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ttrpc::Code::UNAVAILABLE);
    assert!(err.to_string().contains("pod2"), "{err}");
}

#[tokio::test]
async fn a_failed_create_releases_its_files_and_the_sandbox_it_booted() {
    let h = Harness::new();
    *h.guest().fail_create.lock().unwrap() = Some(ttrpc::Code::NOT_FOUND);
    let err = h
        .state
        .create(h.bundle("bad", None, false))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        ttrpc::Code::NOT_FOUND,
        "the guest's code is passed on"
    );
    let message = kite_protocol::errors::error_chain(&err);
    assert_eq!(
        message,
        "container bad: create: exec: /nonexistent: no such file"
    );
    assert_eq!(
        h.log(),
        ["boot bad", "files bad", "release bad", "shutdown bad"]
    );
    assert!(
        h.events.topics().is_empty(),
        "no event for a container that never was"
    );
    // The id is free again.
    *h.guest().fail_create.lock().unwrap() = None;
    h.state.create(h.bundle("bad", None, false)).await.unwrap();
}

#[tokio::test]
async fn an_exec_is_added_started_reported_and_removed() {
    let h = Harness::new();
    h.state.create(h.bundle("c2", None, false)).await.unwrap();
    let err = h
        .state
        .exec(
            "c2",
            "e1",
            br#"{"args":["ls"],"cwd":"/","user":{"uid":0,"gid":0}}"#.to_vec(),
            StdioPaths::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        ttrpc::Code::FAILED_PRECONDITION,
        "not running yet: {err}"
    );
    h.state.start("c2", "").await.unwrap();
    let bad = h
        .state
        .exec("c2", "e0", b"not json".to_vec(), StdioPaths::default())
        .await
        .unwrap_err();
    assert_eq!(bad.code(), ttrpc::Code::INVALID_ARGUMENT);
    h.state
        .exec(
            "c2",
            "e1",
            br#"{"args":["ls"],"cwd":"/","user":{"uid":0,"gid":0}}"#.to_vec(),
            StdioPaths::default(),
        )
        .await
        .unwrap();
    let again = h
        .state
        .exec(
            "c2",
            "e1",
            br#"{"args":["ls"],"cwd":"/","user":{"uid":0,"gid":0}}"#.to_vec(),
            StdioPaths::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(again.code(), ttrpc::Code::ALREADY_EXISTS);
    let err = h.state.kill("c2", "e1", 9, false).await.unwrap_err();
    assert_eq!(
        err.code(),
        ttrpc::Code::FAILED_PRECONDITION,
        "an exec not started: {err}"
    );
    h.state.start("c2", "e1").await.unwrap();
    h.guest().exit("c2/e1", 0);
    assert_eq!(h.state.wait("c2", "e1").await.unwrap().exit_status, 0);
    let err = h.state.kill("c2", "e1", 15, false).await.unwrap_err();
    assert_eq!(
        err.code(),
        ttrpc::Code::NOT_FOUND,
        "a finished process: {err}"
    );
    h.state.delete("c2", "e1").await.unwrap();
    until("the exec's removal", || {
        h.guest().calls().contains(&"remove c2/e1".to_string())
    })
    .await;
    assert!(h.guest().calls().contains(&"exec c2 e1".to_string()));
    assert_eq!(
        h.events.topics(),
        ["create", "start", "exec-added", "exec-started", "exit"]
    );
    let err = h.state.start("c2", "e1").await.unwrap_err();
    assert_eq!(err.code(), ttrpc::Code::NOT_FOUND);
}

#[tokio::test]
async fn a_second_create_of_one_id_is_refused_and_bad_specs_are_named() {
    let h = Harness::new();
    h.state.create(h.bundle("dup", None, false)).await.unwrap();
    let err = h
        .state
        .create(h.bundle("dup", None, false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ttrpc::Code::ALREADY_EXISTS);

    let mut missing = h.bundle("nospec", None, false);
    missing.bundle = h.bundles.path().join("nowhere");
    let err = h.state.create(missing).await.unwrap_err();
    assert_eq!(err.code(), ttrpc::Code::INVALID_ARGUMENT);
    assert!(
        kite_protocol::errors::error_chain(&err).contains("nowhere/config.json"),
        "{err}"
    );
}

#[tokio::test]
async fn stats_and_updates_reach_the_guest_for_the_right_object() {
    let h = Harness::new();
    h.state
        .create(h.bundle("pod3", Some("pod3"), true))
        .await
        .unwrap();
    h.state
        .create(h.bundle("db", Some("pod3"), false))
        .await
        .unwrap();
    h.state.stats("pod3").await.unwrap();
    h.state.stats("db").await.unwrap();
    let err = h.state.update("db", b"\"x\"".to_vec()).await.unwrap_err();
    assert_eq!(err.code(), ttrpc::Code::INVALID_ARGUMENT);
    h.state
        .update("db", br#"{"memory":{"limit":1048576}}"#.to_vec())
        .await
        .unwrap();
    assert_eq!(h.state.pids("pod3").await.unwrap(), Vec::<u32>::new());
    let calls = h.guest().calls();
    assert!(
        calls.contains(&"stats \"\"".to_string()),
        "the whole pod: {calls:?}"
    );
    assert!(calls.contains(&"stats \"db\"".to_string()), "{calls:?}");
    assert!(calls.contains(&"update db".to_string()), "{calls:?}");
    assert!(matches!(
        h.state.update("nope", Vec::new()).await,
        Err(TaskError::NotFound { .. })
    ));
}

/// A guest that answers WaitOom at once, with or without an event, is asked at a bounded rate.
#[tokio::test(start_paused = true)]
async fn a_guest_answering_oom_waits_at_once_is_asked_at_a_bounded_rate() {
    for (answer, most) in [(None, 11), (Some("c1".to_string()), 101)] {
        let guest = Arc::new(FakeGuest::default());
        *guest.oom_answer.lock().unwrap() = Some(answer.clone());
        let sandbox: Arc<dyn PodSandbox> = Arc::new(FakeSandbox {
            id: "pod".into(),
            guest: guest.clone(),
            running: watch::channel(true).0,
            stopped: Notify::new(),
            log: Arc::default(),
        });
        let events = Arc::new(RecordedEvents::default());
        let task = tokio::spawn(super::state::report_ooms(sandbox, events.clone()));
        tokio::time::sleep(std::time::Duration::from_secs(10)).await;
        task.abort();
        let calls = *guest.oom_calls.lock().unwrap();
        assert!(
            calls >= 5 && calls <= most,
            "{answer:?}: {calls} calls in 10 s"
        );
        let published = events.0.lock().unwrap().len();
        assert_eq!(published, if answer.is_some() { calls as usize } else { 0 });
    }
}

#[tokio::test]
async fn a_sigkill_the_guest_does_not_carry_out_stops_the_vm() {
    let h = Harness::new();
    h.state.create(h.bundle("c1", None, false)).await.unwrap();
    h.state.start("c1", "").await.unwrap();
    *h.guest().deaf.lock().unwrap() = true;
    // Another signal's failure is the caller's: the process may well run on.
    let err = h.state.kill("c1", "", 15, false).await.unwrap_err();
    assert_eq!(err.code(), ttrpc::Code::UNAVAILABLE, "{err}");
    assert!(!h.log().contains(&"shutdown c1".to_string()));
    // SIGKILL must kill: the VM goes, and the process with it.
    h.state.kill("c1", "", 9, false).await.unwrap();
    assert!(
        h.log().contains(&"shutdown c1".to_string()),
        "{:?}",
        h.log()
    );
    let waited = h.state.wait("c1", "").await.unwrap();
    assert_eq!(waited.status, Status::STOPPED);
    assert_eq!(waited.exit_status, 137);
}

/// A pod with its sandbox container and one app container, both running.
async fn running_pod(h: &Harness, pod: &str, app: &str) {
    h.state
        .create(h.bundle(pod, Some(pod), true))
        .await
        .unwrap();
    h.state.start(pod, "").await.unwrap();
    h.state
        .create(h.bundle(app, Some(pod), false))
        .await
        .unwrap();
    h.state.start(app, "").await.unwrap();
}

#[tokio::test]
async fn an_orphaned_sandbox_container_takes_its_pod_and_lets_the_shim_go() {
    let h = Harness::new();
    running_pod(&h, "pod3", "app3").await;
    assert!(h.state.abandon("pod3").await, "nothing is left to serve");
    assert!(h.state.container_ids().await.is_empty());
    assert!(
        h.log().contains(&"shutdown pod3".to_string()),
        "{:?}",
        h.log()
    );
    let mut exits = h.events.exits();
    exits.sort();
    assert_eq!(
        exits,
        [
            ("app3".to_string(), VM_GONE_STATUS),
            ("pod3".to_string(), VM_GONE_STATUS)
        ]
    );
    assert_eq!(
        h.events.topics().iter().filter(|t| **t == "delete").count(),
        2,
        "{:?}",
        h.events.topics()
    );
}

#[tokio::test]
async fn an_orphaned_app_container_is_killed_and_removed_while_its_pod_lives_on() {
    let h = Harness::new();
    running_pod(&h, "pod4", "app4").await;
    assert!(!h.state.abandon("app4").await, "the pod is still served");
    assert_eq!(h.state.container_ids().await, ["pod4"]);
    let calls = h.guest().calls();
    assert!(calls.contains(&"signal app4 9".to_string()), "{calls:?}");
    assert!(calls.contains(&"remove app4".to_string()), "{calls:?}");
    assert!(
        !h.log().iter().any(|l| l.starts_with("shutdown")),
        "{:?}",
        h.log()
    );
    assert_eq!(h.events.exits(), [("app4".to_string(), 137)]);
    // A container the shim no longer serves is nothing to end.
    assert!(!h.state.abandon("app4").await);
}

#[tokio::test(start_paused = true)]
async fn a_sigkill_answered_but_not_carried_out_stops_the_vm_in_time() {
    for answer in [None, Some(ttrpc::Code::NOT_FOUND)] {
        let h = Harness::new();
        h.state.create(h.bundle("c2", None, false)).await.unwrap();
        h.state.start("c2", "").await.unwrap();
        *h.guest().unkillable.lock().unwrap() = Some(answer);
        let killed = h.state.kill("c2", "", 9, false).await;
        assert_eq!(killed.is_ok(), answer.is_none(), "{killed:?}");
        tokio::time::sleep(super::state::SIGKILL_EXIT_WITHIN / 2).await;
        assert!(!h.log().contains(&"shutdown c2".to_string()), "too early");
        tokio::time::sleep(super::state::SIGKILL_EXIT_WITHIN).await;
        assert!(
            h.log().contains(&"shutdown c2".to_string()),
            "answer {answer:?}: {:?}",
            h.log()
        );
        let waited = h.state.wait("c2", "").await.unwrap();
        assert_eq!(waited.exit_status, 137);
    }
}

#[tokio::test(start_paused = true)]
async fn a_created_container_killed_before_its_start_exits_at_once_and_its_pod_stays() {
    let h = Harness::new();
    running_pod(&h, "pod5", "app5").await;
    h.state
        .create(h.bundle("late5", Some("pod5"), false))
        .await
        .unwrap();
    // containerd's clean-up of a failed start: SIGKILL, then wait for the exit, then delete.
    h.state.kill("late5", "", 9, true).await.unwrap();
    let waited = h.state.wait("late5", "").await.unwrap();
    assert_eq!((waited.status, waited.exit_status), (Status::STOPPED, 137));
    h.state.delete("late5", "").await.unwrap();
    tokio::time::sleep(super::state::SIGKILL_EXIT_WITHIN * 2).await;
    assert!(
        !h.log().iter().any(|l| l.starts_with("shutdown")),
        "{:?}",
        h.log()
    );
    assert_eq!(
        h.state.container_ids().await.len(),
        2,
        "the pod and its app stay"
    );
}
