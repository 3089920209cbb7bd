//! The prefetch API's client: what the node agent (when a pod is bound) and
//! `kite-snapshotter prefetch IMAGE` call. It links no server side: no FUSE, no registry client.

use std::path::{Path, PathBuf};

use crate::prefetch::{PrefetchProgress, PrefetchRequest, PrefetchState};
use crate::prefetch_ttrpc::PrefetchClient;

#[derive(Debug, thiserror::Error)]
pub enum PrefetchError {
    #[error("connect to the prefetch API on {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: ttrpc::Error,
    },
    #[error("prefetch {image} through {socket}")]
    Call {
        image: String,
        socket: PathBuf,
        #[source]
        source: ttrpc::Error,
    },
    #[error("prefetch {image}: the API closed before its final answer")]
    NoAnswer { image: String },
}

/// Whether a progress message is the last of its prefetch.
pub fn is_final(progress: &PrefetchProgress) -> bool {
    matches!(
        progress.state.enum_value(),
        Ok(PrefetchState::DONE) | Ok(PrefetchState::FAILED)
    )
}

/// The state's name as people read it (`resolving`, `fetching`, `done`, `failed`).
pub fn state_name(progress: &PrefetchProgress) -> &'static str {
    match progress.state.enum_value() {
        Ok(PrefetchState::RESOLVING) => "resolving",
        Ok(PrefetchState::FETCHING) => "fetching",
        Ok(PrefetchState::DONE) => "done",
        Ok(PrefetchState::FAILED) => "failed",
        _ => "unknown",
    }
}

/// Asks the prefetch API on `socket` to prefetch `image`, hands each progress message to
/// `each`, and returns the final one (state DONE or FAILED: a failed prefetch is an answer,
/// not an error of this call).
///
/// The stream is read on a current-thread runtime of its own: ttrpc 0.8's async client hands
/// each incoming message to the stream from a task of its own, so on a multi-threaded runtime
/// the server's close can overtake its last data message, which is then lost (seen here: the
/// final DONE never arrived). On one thread those tasks run in the order they were spawned.
pub async fn prefetch(
    socket: &Path,
    image: &str,
    mut each: impl FnMut(&PrefetchProgress),
) -> Result<PrefetchProgress, PrefetchError> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (socket_owned, image_owned) = (socket.to_path_buf(), image.to_string());
    let reader = tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| PrefetchError::Connect {
                socket: socket_owned.clone(),
                source: ttrpc::Error::Others(format!("start a runtime: {e}")),
            })?;
        runtime.block_on(read_progress(&socket_owned, &image_owned, tx))
    });
    while let Some(progress) = rx.recv().await {
        each(&progress);
    }
    reader.await.unwrap_or_else(|_| {
        Err(PrefetchError::NoAnswer {
            image: image.to_string(),
        })
    })
}

/// The stream of one prefetch: each message to `out`, the final one returned.
async fn read_progress(
    socket: &Path,
    image: &str,
    out: tokio::sync::mpsc::UnboundedSender<PrefetchProgress>,
) -> Result<PrefetchProgress, PrefetchError> {
    let address = format!("unix://{}", socket.display());
    let connection =
        ttrpc::r#async::Client::connect(&address).map_err(|source| PrefetchError::Connect {
            socket: socket.to_path_buf(),
            source,
        })?;
    let call = |source| PrefetchError::Call {
        image: image.to_string(),
        socket: socket.to_path_buf(),
        source,
    };
    let client = PrefetchClient::new(connection);
    let request = PrefetchRequest {
        image: image.to_string(),
        ..Default::default()
    };
    let mut stream = client
        .prefetch(ttrpc::context::Context::default(), &request)
        .await
        .map_err(call)?;
    while let Some(progress) = stream.recv().await.map_err(call)? {
        if is_final(&progress) {
            let _ = out.send(progress.clone());
            return Ok(progress);
        }
        if out.send(progress).is_err() {
            // The caller is gone: stop reading (the prefetch itself goes on in the server).
            break;
        }
    }
    Err(PrefetchError::NoAnswer {
        image: image.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::prefetch_ttrpc::{create_prefetch, Prefetch};

    /// A server that streams three states, a moment apart.
    struct Steps;

    #[async_trait::async_trait]
    impl Prefetch for Steps {
        async fn prefetch(
            &self,
            _ctx: &ttrpc::r#async::TtrpcContext,
            request: PrefetchRequest,
            sink: ttrpc::r#async::ServerStreamSender<PrefetchProgress>,
        ) -> ttrpc::Result<()> {
            for state in [
                PrefetchState::RESOLVING,
                PrefetchState::FETCHING,
                PrefetchState::DONE,
            ] {
                let progress = PrefetchProgress {
                    image: request.image.clone(),
                    state: state.into(),
                    ..Default::default()
                };
                sink.send(&progress).await?;
            }
            Ok(())
        }
    }

    // Multi-threaded, as the node agent and the CLI run: the final message must not be lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn progress_streams_to_the_final_state() {
        let dir = std::env::temp_dir().join(format!("kite-prefetch-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("prefetch.sock");
        let _ = std::fs::remove_file(&socket);
        let mut server = ttrpc::r#async::Server::new()
            .bind(&format!("unix://{}", socket.display()))
            .unwrap()
            .register_service(create_prefetch(Arc::new(Steps)));
        server.start().await.unwrap();
        for _ in 0..50 {
            let mut seen = Vec::new();
            let last = prefetch(&socket, "reg/app:1", |p| seen.push(state_name(p)))
                .await
                .unwrap();
            assert_eq!(seen, ["resolving", "fetching", "done"]);
            assert!(is_final(&last));
        }
        server.shutdown().await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
