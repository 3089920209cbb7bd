//! The snapshots service ↔ `kite-lazyfs` channel.
//!
//! `kite-lazyfs` is the process that serves lazy layers over FUSE (and the prefetch API, and
//! owns the chunk cache). It is separate from the snapshots service so that restarting or
//! upgrading the service, or the service crashing, leaves the FUSE mounts of running
//! containers served. The service starts it when it is not running and tells it what to mount.
//!
//! Wire format, on a unix socket (`lazyfs_socket`): one JSON [`Call`] line per connection, one
//! JSON [`Answer`] line back.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use crate::lazy_layer::LayerSource;
use crate::remote::{LayerUsage, LazyBackend, LazyLayers, LazyStats};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Call {
    Prepare {
        source: LayerSource,
    },
    Mount {
        source: LayerSource,
        mountpoint: PathBuf,
    },
    Unmount {
        mountpoint: PathBuf,
    },
    Mounted,
    Stats,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Answer {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<LayerUsage>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounted: Vec<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<LazyStats>,
}

/// Serves calls on `listener` until the task is dropped.
pub async fn serve(listener: UnixListener, lazy: Arc<LazyLayers>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let lazy = lazy.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(conn, &lazy).await {
                warn!("lazyfs call: {e}");
            }
        });
    }
}

async fn answer(conn: UnixStream, lazy: &LazyLayers) -> std::io::Result<()> {
    let (read, mut write) = conn.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let failed = |error: String| Answer {
        error,
        ..Default::default()
    };
    let answer = match serde_json::from_str::<Call>(line.trim()) {
        Err(e) => failed(format!("bad call {:?}: {e}", line.trim())),
        Ok(Call::Prepare { source }) => match lazy.prepare(&source).await {
            Ok(usage) => Answer {
                usage: Some(usage),
                ..Default::default()
            },
            Err(e) => failed(e),
        },
        Ok(Call::Mount { source, mountpoint }) => {
            match LazyBackend::mount(lazy, &source, &mountpoint).await {
                Ok(()) => Answer::default(),
                Err(e) => failed(e),
            }
        }
        Ok(Call::Unmount { mountpoint }) => match LazyBackend::unmount(lazy, &mountpoint).await {
            Ok(()) => Answer::default(),
            Err(e) => failed(e),
        },
        Ok(Call::Mounted) => Answer {
            mounted: lazy.mounted().await.unwrap_or_default(),
            ..Default::default()
        },
        Ok(Call::Stats) => Answer {
            stats: lazy.stats().await.ok(),
            ..Default::default()
        },
    };
    let mut out = serde_json::to_string(&answer).expect("answer serializes");
    out.push('\n');
    write.write_all(out.as_bytes()).await
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

    async fn connect(&self) -> Result<UnixStream, String> {
        match UnixStream::connect(&self.socket).await {
            Ok(c) => return Ok(c),
            Err(e) if self.launch.is_none() => {
                return Err(format!("kite-lazyfs at {}: {e}", self.socket.display()))
            }
            Err(_) => {}
        }
        let _one = self.launching.lock().await;
        if let Ok(c) = UnixStream::connect(&self.socket).await {
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
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("start {}: {e}", launch.program.display()))?;
        info!(program = %launch.program.display(), pid = child.id(), "started kite-lazyfs");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(c) = UnixStream::connect(&self.socket).await {
                // Reap it whenever it ends (it outlives this process in the normal case).
                tokio::spawn(async move {
                    if let Ok(st) = child.wait().await {
                        warn!(status = %st, "kite-lazyfs exited");
                    }
                });
                return Ok(c);
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!("kite-lazyfs exited at start: {st}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill().await;
                return Err(format!(
                    "kite-lazyfs did not answer on {} within 20 s",
                    self.socket.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn call(&self, call: &Call) -> Result<Answer, String> {
        let conn = self.connect().await?;
        let (read, mut write) = conn.into_split();
        let mut line = serde_json::to_string(call).expect("call serializes");
        line.push('\n');
        let io = |e: std::io::Error| format!("kite-lazyfs at {}: {e}", self.socket.display());
        write.write_all(line.as_bytes()).await.map_err(io)?;
        let mut reply = String::new();
        BufReader::new(read)
            .read_line(&mut reply)
            .await
            .map_err(io)?;
        let answer: Answer = serde_json::from_str(reply.trim())
            .map_err(|e| format!("kite-lazyfs answered {:?}: {e}", reply.trim()))?;
        if answer.error.is_empty() {
            Ok(answer)
        } else {
            Err(answer.error)
        }
    }

    /// Starts `kite-lazyfs` if it is not running.
    pub async fn ensure_running(&self) -> Result<(), String> {
        self.call(&Call::Mounted).await.map(|_| ())
    }
}

#[async_trait::async_trait]
impl LazyBackend for LazyFsClient {
    async fn prepare(&self, src: &LayerSource) -> Result<LayerUsage, String> {
        let a = self
            .call(&Call::Prepare {
                source: src.clone(),
            })
            .await?;
        a.usage
            .ok_or_else(|| "kite-lazyfs gave no usage".to_string())
    }

    async fn mount(&self, src: &LayerSource, mountpoint: &Path) -> Result<(), String> {
        self.call(&Call::Mount {
            source: src.clone(),
            mountpoint: mountpoint.to_path_buf(),
        })
        .await
        .map(|_| ())
    }

    async fn unmount(&self, mountpoint: &Path) -> Result<(), String> {
        self.call(&Call::Unmount {
            mountpoint: mountpoint.to_path_buf(),
        })
        .await
        .map(|_| ())
    }

    async fn mounted(&self) -> Result<Vec<PathBuf>, String> {
        Ok(self.call(&Call::Mounted).await?.mounted)
    }

    async fn stats(&self) -> Result<LazyStats, String> {
        self.call(&Call::Stats)
            .await?
            .stats
            .ok_or_else(|| "kite-lazyfs gave no stats".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_and_answers_round_trip() {
        let call = Call::Mount {
            source: LayerSource {
                image: "127.0.0.1:5000/a:1".into(),
                layer_digest: "sha256:aa".into(),
                toc_digest: "sha256:bb".into(),
            },
            mountpoint: "/m".into(),
        };
        let line = serde_json::to_string(&call).unwrap();
        assert!(line.contains(r#""op":"mount""#), "{line}");
        assert!(matches!(
            serde_json::from_str::<Call>(&line).unwrap(),
            Call::Mount { .. }
        ));
        let a: Answer = serde_json::from_str(r#"{"mounted":["/x"]}"#).unwrap();
        assert_eq!(a.mounted, [PathBuf::from("/x")]);
        assert!(a.error.is_empty());
    }
}
