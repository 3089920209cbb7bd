//! The task events containerd hears from the shim, and where they go.

use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics;
use tracing::warn;

/// One event of the task API.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskEvent {
    Create(TaskCreate),
    Start(TaskStart),
    ExecAdded(TaskExecAdded),
    ExecStarted(TaskExecStarted),
    Exit(TaskExit),
    Delete(TaskDelete),
    Oom(TaskOOM),
}

impl TaskEvent {
    pub fn topic(&self) -> &'static str {
        match self {
            TaskEvent::Create(_) => topics::TASK_CREATE_EVENT_TOPIC,
            TaskEvent::Start(_) => topics::TASK_START_EVENT_TOPIC,
            TaskEvent::ExecAdded(_) => topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            TaskEvent::ExecStarted(_) => topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            TaskEvent::Exit(_) => topics::TASK_EXIT_EVENT_TOPIC,
            TaskEvent::Delete(_) => topics::TASK_DELETE_EVENT_TOPIC,
            TaskEvent::Oom(_) => topics::TASK_OOM_EVENT_TOPIC,
        }
    }

    fn into_message(self) -> Box<dyn MessageDyn> {
        match self {
            TaskEvent::Create(e) => Box::new(e),
            TaskEvent::Start(e) => Box::new(e),
            TaskEvent::ExecAdded(e) => Box::new(e),
            TaskEvent::ExecStarted(e) => Box::new(e),
            TaskEvent::Exit(e) => Box::new(e),
            TaskEvent::Delete(e) => Box::new(e),
            TaskEvent::Oom(e) => Box::new(e),
        }
    }
}

/// Where task events go: containerd, or a recorder in unit tests.
#[async_trait]
pub trait EventSink: Send + Sync {
    async fn publish(&self, event: TaskEvent);
}

/// containerd's event service, in the shim's namespace.
pub struct ContainerdEvents {
    publisher: RemotePublisher,
    namespace: String,
}

impl ContainerdEvents {
    pub fn new(publisher: RemotePublisher, namespace: &str) -> Self {
        ContainerdEvents {
            publisher,
            namespace: namespace.to_string(),
        }
    }
}

#[async_trait]
impl EventSink for ContainerdEvents {
    async fn publish(&self, event: TaskEvent) {
        let topic = event.topic();
        let published = self
            .publisher
            .publish(
                ttrpc::context::Context::default(),
                topic,
                &self.namespace,
                event.into_message(),
            )
            .await;
        if let Err(e) = published {
            warn!(topic, error = %e, "publish an event");
        }
    }
}

/// A protobuf timestamp for a time since the Unix epoch.
pub fn timestamp(since_epoch: Duration) -> Timestamp {
    Timestamp {
        seconds: i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since_epoch.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

/// Now, as a protobuf timestamp.
pub fn now() -> Timestamp {
    timestamp(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_split_seconds_and_nanos() {
        let t = timestamp(Duration::from_nanos(3_000_000_007));
        assert_eq!((t.seconds, t.nanos), (3, 7));
    }
}
