//! The task service's errors, and the one mapping from them to the ttrpc codes containerd
//! acts on.

use kite_protocol::errors::rpc_status;

use super::guest::GuestError;
use crate::config::ConfigError;
use crate::io::OpenError;
use crate::rootfs::RootfsError;
use crate::sandbox::SandboxError;

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{what} exists")]
    AlreadyExists { what: String },
    #[error("{what}: {why}")]
    FailedPrecondition { what: String, why: &'static str },
    #[error("{what}: {why}")]
    InvalidArgument { what: String, why: String },
    #[error("container {container}: read its OCI spec {path}")]
    ReadSpec {
        container: String,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("container {container}: its OCI spec {path}")]
    ParseSpec {
        container: String,
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("container {container}: its runtime configuration")]
    Config {
        container: String,
        #[source]
        source: ConfigError,
    },
    #[error("{what}")]
    Guest {
        what: String,
        #[source]
        source: GuestError,
    },
    #[error("{what}: stdio")]
    Stdio {
        what: String,
        #[source]
        source: OpenError,
    },
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error("sandbox {sandbox}: the VM has exited")]
    VmGone { sandbox: String },
    #[error("no sandbox is running")]
    NoSandbox,
    #[error("kite does not {0} containers")]
    Unimplemented(&'static str),
    #[error("{what}")]
    Internal {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl TaskError {
    /// A call to the guest agent about `what` (a container or process) that failed.
    pub fn guest(what: impl Into<String>) -> impl FnOnce(GuestError) -> TaskError {
        let what = what.into();
        move |source| TaskError::Guest { what, source }
    }

    pub fn code(&self) -> ttrpc::Code {
        use ttrpc::Code;
        match self {
            TaskError::NotFound { .. } => Code::NOT_FOUND,
            TaskError::AlreadyExists { .. } => Code::ALREADY_EXISTS,
            TaskError::FailedPrecondition { .. }
            | TaskError::Stdio { .. }
            | TaskError::Rootfs(_)
            | TaskError::NoSandbox => Code::FAILED_PRECONDITION,
            TaskError::InvalidArgument { .. }
            | TaskError::ReadSpec { .. }
            | TaskError::ParseSpec { .. }
            | TaskError::Config { .. } => Code::INVALID_ARGUMENT,
            TaskError::Guest { source, .. } => source.code(),
            TaskError::Sandbox(_) | TaskError::VmGone { .. } => Code::UNAVAILABLE,
            TaskError::Unimplemented(_) => Code::UNIMPLEMENTED,
            TaskError::Internal { .. } => Code::INTERNAL,
        }
    }
}

/// The one way a task error reaches containerd: its code, and its whole chain as the message.
impl From<TaskError> for ttrpc::Error {
    fn from(e: TaskError) -> Self {
        rpc_status(e.code(), &e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(e: TaskError) -> (ttrpc::Code, String) {
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn the_guests_code_is_passed_on_and_the_object_named() {
        let e = TaskError::guest("container c1: start")(GuestError::Status {
            code: ttrpc::Code::NOT_FOUND,
            message: "exec: /nonexistent: no such file".into(),
        });
        assert_eq!(
            status(e),
            (
                ttrpc::Code::NOT_FOUND,
                "container c1: start: exec: /nonexistent: no such file".into()
            )
        );
    }

    #[test]
    fn a_broken_channel_is_unavailable() {
        let e =
            TaskError::guest("container c1: kill")(GuestError::Channel(ttrpc::Error::LocalClosed));
        let (code, message) = status(e);
        assert_eq!(code, ttrpc::Code::UNAVAILABLE);
        assert!(
            message.starts_with("container c1: kill: the connection failed"),
            "{message}"
        );
    }
}
