//! The snapshots service ↔ `kite-lazyfs` channel.
//!
//! `kite-lazyfs` is the process that serves lazy layers over FUSE (and the prefetch API, and
//! owns the chunk cache). It is separate from the snapshots service so that restarting or
//! upgrading the service, or the service crashing, leaves the FUSE mounts of running
//! containers served. The service starts it when it is not running and tells it what to mount.
//!
//! Wire format: ttrpc on a unix socket (`lazyfs_socket`), service `kite.lazyfs.v1.LazyFs`
//! (`protocol/proto/lazyfs.proto`); one connection per call, so either side may restart
//! between calls.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kite_protocol::errors::{rpc_status, RpcError};
use kite_protocol::lazyfs as proto;
use kite_protocol::lazyfs_ttrpc::{self, LazyFs};
use kite_protocol::rpc_context;
use tokio::net::UnixListener;
use tracing::{info, warn};
use ttrpc::r#async::TtrpcContext;

use crate::lazy::layer::LayerSource;
use crate::lazy::remote::{BackendError, LayerUsage, LazyBackend, LazyLayers, LazyStats};

/// How long a started `kite-lazyfs` may take to answer.
const LAUNCH_WAIT: Duration = Duration::from_secs(20);
/// How long a call may take: a Prepare (and a Mount without one) fetches and checks a TOC from
/// the registry, with its retries; the others are local. A hung kite-lazyfs must not stall the
/// snapshots service.
const PREPARE_DEADLINE: Duration = Duration::from_secs(120);
const CALL_DEADLINE: Duration = Duration::from_secs(30);

fn layer_to_proto(src: &LayerSource) -> proto::Layer {
    proto::Layer {
        image: src.image.clone(),
        layer_digest: src.layer_digest.clone(),
        toc_digest: src.toc_digest.clone(),
        ..Default::default()
    }
}

fn layer_from_proto(layer: &proto::Layer) -> LayerSource {
    LayerSource {
        image: layer.image.clone(),
        layer_digest: layer.layer_digest.clone(),
        toc_digest: layer.toc_digest.clone(),
    }
}

fn stats_to_proto(s: &LazyStats) -> proto::LazyStats {
    proto::LazyStats {
        mounted: s.mounted,
        fetched_bytes: s.fetched_bytes,
        fetch_requests: s.fetch_requests,
        fetched_chunks: s.fetched_chunks,
        fetch_errors: s.fetch_errors,
        prefetches: s.prefetches,
        cache_bytes: s.cache.bytes,
        cache_chunks: s.cache.chunks,
        cache_hits: s.cache.hits,
        cache_misses: s.cache.misses,
        cache_evictions: s.cache.evicted,
        ..Default::default()
    }
}

fn stats_from_proto(s: &proto::LazyStats) -> LazyStats {
    LazyStats {
        mounted: s.mounted,
        fetched_bytes: s.fetched_bytes,
        fetch_requests: s.fetch_requests,
        fetched_chunks: s.fetched_chunks,
        fetch_errors: s.fetch_errors,
        prefetches: s.prefetches,
        cache: crate::lazy::cache::CacheStats {
            bytes: s.cache_bytes,
            chunks: s.cache_chunks,
            hits: s.cache_hits,
            misses: s.cache_misses,
            evicted: s.cache_evictions,
        },
    }
}

/// An error of the lazy layers as `kite-lazyfs` answers it (the whole chain).
fn status(e: &BackendError) -> ttrpc::Error {
    rpc_status(ttrpc::Code::INTERNAL, e)
}

/// `kite-lazyfs`'s side: the calls, served by the process's [`LazyLayers`].
struct LazyFsService {
    lazy: Arc<LazyLayers>,
}

#[async_trait::async_trait]
impl LazyFs for LazyFsService {
    async fn prepare(
        &self,
        _ctx: &TtrpcContext,
        layer: proto::Layer,
    ) -> ttrpc::Result<proto::LayerUsage> {
        let usage = LazyBackend::prepare(&*self.lazy, &layer_from_proto(&layer))
            .await
            .map_err(|e| status(&e))?;
        Ok(proto::LayerUsage {
            size: usage.size,
            inodes: usage.inodes,
            ..Default::default()
        })
    }

    async fn mount(
        &self,
        _ctx: &TtrpcContext,
        request: proto::MountRequest,
    ) -> ttrpc::Result<proto::Empty> {
        let layer = layer_from_proto(&request.layer.unwrap_or_default());
        LazyBackend::mount(&*self.lazy, &layer, Path::new(&request.mountpoint))
            .await
            .map_err(|e| status(&e))?;
        Ok(proto::Empty::new())
    }

    async fn unmount(
        &self,
        _ctx: &TtrpcContext,
        request: proto::UnmountRequest,
    ) -> ttrpc::Result<proto::Empty> {
        LazyBackend::unmount(&*self.lazy, Path::new(&request.mountpoint))
            .await
            .map_err(|e| status(&e))?;
        Ok(proto::Empty::new())
    }

    async fn mounted(
        &self,
        _ctx: &TtrpcContext,
        _request: proto::Empty,
    ) -> ttrpc::Result<proto::MountedResponse> {
        let mounted = self.lazy.mounted().await.map_err(|e| status(&e))?;
        Ok(proto::MountedResponse {
            mountpoints: mounted.iter().map(|p| p.display().to_string()).collect(),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        _request: proto::Empty,
    ) -> ttrpc::Result<proto::LazyStats> {
        let stats = self.lazy.stats().await.map_err(|e| status(&e))?;
        Ok(stats_to_proto(&stats))
    }
}

/// Serves the calls on `listener` (bound by the caller, see [`crate::daemon::listen_unix`]);
/// the server runs until it is dropped or shut down.
pub async fn serve(
    listener: UnixListener,
    lazy: Arc<LazyLayers>,
) -> Result<ttrpc::r#async::Server, ttrpc::Error> {
    crate::daemon::serve_ttrpc(
        listener,
        lazyfs_ttrpc::create_lazy_fs(Arc::new(LazyFsService { lazy })),
    )
    .await
}

/// How to start `kite-lazyfs` when it is not running.
#[derive(Clone, Debug)]
pub struct Launch {
    pub program: PathBuf,
    pub config: Option<PathBuf>,
}

/// The snapshots service's side: calls `kite-lazyfs`, starting it first when it is not
/// running.
pub struct LazyFsClient {
    socket: PathBuf,
    launch: Option<Launch>,
    launching: tokio::sync::Mutex<()>,
}

impl LazyFsClient {
    pub fn new(socket: &Path, launch: Option<Launch>) -> LazyFsClient {
        LazyFsClient {
            socket: socket.to_path_buf(),
            launch,
            launching: tokio::sync::Mutex::new(()),
        }
    }

    fn remote(&self) -> impl Fn(ttrpc::Error) -> BackendError + '_ {
        move |e| BackendError::Remote {
            socket: self.socket.clone(),
            source: RpcError::from(e),
        }
    }

    fn try_connect(&self) -> Result<lazyfs_ttrpc::LazyFsClient, ttrpc::Error> {
        let address = format!("unix://{}", self.socket.display());
        ttrpc::r#async::Client::connect(&address).map(lazyfs_ttrpc::LazyFsClient::new)
    }

    /// A client for one call, starting `kite-lazyfs` first if it does not answer.
    async fn connect(&self) -> Result<lazyfs_ttrpc::LazyFsClient, BackendError> {
        match self.try_connect() {
            Ok(c) => return Ok(c),
            Err(e) if self.launch.is_none() => return Err(self.remote()(e)),
            Err(_) => {}
        }
        let _one = self.launching.lock().await;
        if let Ok(c) = self.try_connect() {
            return Ok(c);
        }
        let launch = self.launch.as_ref().expect("checked above");
        let mut cmd = tokio::process::Command::new(&launch.program);
        if let Some(c) = &launch.config {
            cmd.arg("--config").arg(c);
        }
        // Its own process group: signals meant for the service do not reach it. Its logs go
        // where the service's go (inherited stderr).
        cmd.stdin(std::process::Stdio::null()).process_group(0);
        let mut child = cmd.spawn().map_err(|source| BackendError::Launch {
            program: launch.program.clone(),
            source,
        })?;
        info!(program = %launch.program.display(), pid = child.id(), "started kite-lazyfs");
        let deadline = Instant::now() + LAUNCH_WAIT;
        loop {
            if let Ok(c) = self.try_connect() {
                // Reap it whenever it ends (it outlives this process in the normal case).
                tokio::spawn(async move {
                    if let Ok(st) = child.wait().await {
                        warn!(status = %st, "kite-lazyfs exited");
                    }
                });
                return Ok(c);
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(BackendError::LaunchExited { status });
            }
            if Instant::now() > deadline {
                let _ = child.kill().await;
                return Err(BackendError::LaunchTimeout {
                    socket: self.socket.clone(),
                    waited: LAUNCH_WAIT,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts `kite-lazyfs` if it is not running.
    pub async fn ensure_running(&self) -> Result<(), BackendError> {
        self.mounted().await.map(|_| ())
    }
}

#[async_trait::async_trait]
impl LazyBackend for LazyFsClient {
    async fn prepare(&self, src: &LayerSource) -> Result<LayerUsage, BackendError> {
        let usage = self
            .connect()
            .await?
            .prepare(rpc_context(Some(PREPARE_DEADLINE)), &layer_to_proto(src))
            .await
            .map_err(self.remote())?;
        Ok(LayerUsage {
            size: usage.size,
            inodes: usage.inodes,
        })
    }

    async fn mount(&self, src: &LayerSource, mountpoint: &Path) -> Result<(), BackendError> {
        let request = proto::MountRequest {
            layer: Some(layer_to_proto(src)).into(),
            mountpoint: mountpoint.display().to_string(),
            ..Default::default()
        };
        self.connect()
            .await?
            .mount(rpc_context(Some(PREPARE_DEADLINE)), &request)
            .await
            .map_err(self.remote())?;
        Ok(())
    }

    async fn unmount(&self, mountpoint: &Path) -> Result<(), BackendError> {
        let request = proto::UnmountRequest {
            mountpoint: mountpoint.display().to_string(),
            ..Default::default()
        };
        self.connect()
            .await?
            .unmount(rpc_context(Some(CALL_DEADLINE)), &request)
            .await
            .map_err(self.remote())?;
        Ok(())
    }

    async fn mounted(&self) -> Result<Vec<PathBuf>, BackendError> {
        let mounted = self
            .connect()
            .await?
            .mounted(rpc_context(Some(CALL_DEADLINE)), &proto::Empty::new())
            .await
            .map_err(self.remote())?;
        Ok(mounted.mountpoints.iter().map(PathBuf::from).collect())
    }

    async fn stats(&self) -> Result<LazyStats, BackendError> {
        let stats = self
            .connect()
            .await?
            .stats(rpc_context(Some(CALL_DEADLINE)), &proto::Empty::new())
            .await
            .map_err(self.remote())?;
        Ok(stats_from_proto(&stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_and_stats_cross_the_wire_unchanged() {
        let src = LayerSource {
            image: "127.0.0.1:5000/a:1".into(),
            layer_digest: "sha256:aa".into(),
            toc_digest: "sha256:bb".into(),
        };
        assert_eq!(layer_from_proto(&layer_to_proto(&src)), src);
        let stats = LazyStats {
            mounted: 1,
            fetched_bytes: 2,
            fetch_requests: 3,
            fetched_chunks: 4,
            fetch_errors: 5,
            prefetches: 6,
            cache: crate::lazy::cache::CacheStats {
                bytes: 7,
                chunks: 8,
                hits: 9,
                misses: 10,
                evicted: 11,
            },
        };
        assert_eq!(stats_from_proto(&stats_to_proto(&stats)), stats);
    }
}
