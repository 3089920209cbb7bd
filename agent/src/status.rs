//! A pod's status as the agent keeps and publishes it: one `kite.node.v1.Pod` behind a lock,
//! every change broadcast to whoever watches (kitectl run, describe, the event stream) and
//! written to the pod's record.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use kite_protocol::node::{Event, Pod, PodUpdate, Stage};
use tokio::sync::broadcast;

use crate::store::Store;

/// Events kept per pod (older ones are dropped).
const EVENTS_KEPT: usize = 200;

pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

fn ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

pub struct PodShared {
    status: Mutex<Pod>,
    updates: broadcast::Sender<PodUpdate>,
    store: Store,
    /// The pod was deleted: nothing records it again (a late task's change is dropped).
    forgotten: AtomicBool,
}

impl PodShared {
    pub fn new(status: Pod, store: Store) -> PodShared {
        let (updates, _) = broadcast::channel(256);
        PodShared {
            status: Mutex::new(status),
            updates,
            store,
            forgotten: AtomicBool::new(false),
        }
    }

    pub fn snapshot(&self) -> Pod {
        self.status.lock().expect("pod status lock").clone()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<PodUpdate> {
        self.updates.subscribe()
    }

    /// Changes the status, records it and tells the watchers.
    pub fn update(&self, change: impl FnOnce(&mut Pod)) {
        self.publish(
            |p| {
                change(p);
                true
            },
            None,
        );
    }

    /// Applies `change`, which says whether it changed anything; only then is the status
    /// recorded and sent (the supervision calls this on every round).
    pub fn update_if_changed(&self, change: impl FnOnce(&mut Pod) -> bool) {
        self.publish(change, None);
    }

    fn publish(&self, change: impl FnOnce(&mut Pod) -> bool, event: Option<Event>) {
        let pod = {
            let mut status = self.status.lock().expect("pod status lock");
            if !change(&mut status) && event.is_none() {
                return;
            }
            if let Some(e) = &event {
                status.events.push(e.clone());
                let excess = status.events.len().saturating_sub(EVENTS_KEPT);
                status.events.drain(..excess);
            }
            // Saved under the lock: records are written in the order of the changes.
            if !self.forgotten.load(Ordering::SeqCst) {
                if let Err(e) = self.store.save(&status) {
                    tracing::warn!(pod = %status.name, namespace = %status.namespace, error = %e, "record the pod");
                }
            }
            status.clone()
        };
        // No watcher is fine.
        let _ = self.updates.send(PodUpdate {
            pod: Some(pod),
            event,
            last: false,
        });
    }

    /// Adds an event (and logs it).
    pub fn event(
        &self,
        kind: EventType,
        reason: &str,
        container: &str,
        message: impl Into<String>,
    ) {
        let message = message.into();
        let (namespace, name) = {
            let s = self.status.lock().expect("pod status lock");
            (s.namespace.clone(), s.name.clone())
        };
        match kind {
            EventType::Normal => {
                tracing::info!(%namespace, pod = %name, container, reason, "{message}")
            }
            EventType::Warning => {
                tracing::warn!(%namespace, pod = %name, container, reason, "{message}")
            }
        }
        let event = Event {
            unix_ms: now_ms(),
            r#type: match kind {
                EventType::Normal => "Normal",
                EventType::Warning => "Warning",
            }
            .into(),
            reason: reason.into(),
            message,
            container: container.into(),
        };
        self.publish(|_| true, Some(event));
    }

    /// Records a stage that ran from `started` to `ended`, timed from `origin` (the bind, or
    /// an update's request).
    pub fn stage(
        &self,
        name: &str,
        origin: Instant,
        started: Instant,
        ended: Instant,
        detail: String,
    ) {
        let stage = Stage {
            name: name.into(),
            start_ms: ms(started.saturating_duration_since(origin)),
            duration_ms: ms(ended.saturating_duration_since(started)),
            detail,
        };
        self.update(|p| p.stages.push(stage));
    }

    /// Forgets the pod's record (it was deleted); watchers get a last update.
    pub fn forget(&self) {
        let pod = {
            let status = self.status.lock().expect("pod status lock");
            self.forgotten.store(true, Ordering::SeqCst);
            if let Err(e) = self.store.remove(&status.uid) {
                tracing::warn!(pod = %status.name, error = %e, "remove the pod's record");
            }
            status.clone()
        };
        let _ = self.updates.send(PodUpdate {
            pod: Some(pod),
            event: None,
            last: true,
        });
    }
}
