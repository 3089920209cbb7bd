//! What every kite daemon (kite-snapshotter, kite-lazyfs, kite-agent) shares: logging, its
//! listening sockets, and the graceful stop on SIGTERM or SIGINT.

use std::path::{Path, PathBuf};

/// Logs to stderr (the service's log file) at `level` (tracing `EnvFilter` syntax).
pub fn init_logging(level: &str) -> Result<(), tracing_subscriber::filter::ParseError> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(level)?)
        .with_ansi(false)
        // A log that cannot be written (its disk full) must not stop the daemon: the crate
        // reports a failed write with eprintln!, which panics when stderr fails too (and
        // kite's daemons abort on a panic). The soak's full-disk fault killed kite-agent so.
        .log_internal_errors(false)
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

/// Resolves when the process is asked to stop.
pub async fn stop_requested() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("stopping");
}

/// Listens on the unix socket `path` such that the path only ever names a socket that has a
/// listener behind it, or a dead process's leftover (connect: ECONNREFUSED): the socket is bound
/// under a temporary name beside `path` and renamed over it, which replaces a stale socket
/// atomically. A caller binds only when it is about to serve, so "connect succeeds" is the
/// readiness check (hack/snapshotter.sh uses it), never "the file exists".
pub fn listen_unix(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{}.tmp", std::process::id()));
    let temporary = PathBuf::from(name);
    let _ = std::fs::remove_file(&temporary);
    let listener = tokio::net::UnixListener::bind(&temporary)?;
    if let Err(e) = std::fs::rename(&temporary, path) {
        let _ = std::fs::remove_file(&temporary);
        return Err(e);
    }
    Ok(listener)
}

/// The inode of the socket at `path` (to tell this process's socket from a successor's).
pub fn socket_inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| m.ino())
}

/// Removes the socket at `path` at exit, unless a successor has put its own there since.
pub fn remove_socket(path: &Path, inode: Option<u64>) {
    if inode.is_some() && socket_inode(path) == inode {
        let _ = std::fs::remove_file(path);
    }
}

/// Serves `GET /metrics` on `addr` with what `render` gives (OpenMetrics text) until `stop`
/// completes: every kite daemon's endpoint.
#[cfg(feature = "metrics")]
pub async fn serve_metrics(
    addr: &str,
    render: impl Fn() -> String + Clone + Send + Sync + 'static,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
}

/// A registry's metrics in the text exposition format (an encoding failure is logged and
/// gives what was encoded so far).
#[cfg(feature = "metrics")]
pub fn encode_metrics(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "encode the metrics");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daemon whose log cannot be written (stderr on a full disk: /dev/full here) keeps
    /// running. The test runs itself again as the "daemon" (a process's logging is set once).
    #[test]
    fn a_log_that_cannot_be_written_does_not_stop_the_daemon() {
        if std::env::var_os("KITE_TEST_LOG_TO_FULL").is_some() {
            init_logging("info").unwrap();
            for i in 0..3 {
                tracing::warn!(i, "a line that does not fit on the disk");
            }
            std::process::exit(7);
        }
        let me = std::env::current_exe().unwrap();
        let status = std::process::Command::new(me)
            .args([
                "--exact",
                "daemon::tests::a_log_that_cannot_be_written_does_not_stop_the_daemon",
                "--nocapture",
            ])
            .env("KITE_TEST_LOG_TO_FULL", "1")
            .stdout(std::process::Stdio::null())
            .stderr(
                std::fs::File::options()
                    .write(true)
                    .open("/dev/full")
                    .unwrap(),
            )
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(7), "the logging process died: {status}");
    }

    #[tokio::test]
    async fn a_socket_appears_only_with_its_listener_and_replaces_a_stale_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sock");
        // A dead daemon's leftover: a socket file nobody listens on.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(std::os::unix::net::UnixStream::connect(&path).is_err());
        let listener = listen_unix(&path).unwrap();
        let client = tokio::net::UnixStream::connect(&path);
        let (accepted, connected) = tokio::join!(listener.accept(), client);
        accepted.unwrap();
        connected.unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("d.sock")],
            "no temporary left behind"
        );
    }
}
