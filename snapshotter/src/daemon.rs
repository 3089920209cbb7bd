//! What both daemons (kite-snapshotter, kite-lazyfs) share: logging, and the graceful stop on
//! SIGTERM or SIGINT.

/// Logs to stderr (the service's log file) at `level` (tracing `EnvFilter` syntax).
pub fn init_logging(level: &str) -> Result<(), tracing_subscriber::filter::ParseError> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(level)?)
        .with_ansi(false)
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
