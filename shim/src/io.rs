//! Relays a process's stdio between containerd's FIFOs and the guest agent.
//!
//! Output is pulled: the shim asks the agent for the next chunk only after it has written the
//! previous one to containerd, so a slow reader on the host holds the process back (the guest
//! pipe fills) instead of growing buffers anywhere.

use std::path::Path;
use std::time::Duration;

use kite_protocol::agent::{ProcessRequest, ReadStreamRequest, WriteStreamRequest};
use kite_protocol::agent_ttrpc::AgentClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use kite_vmm::rpc_context as ctx;

/// Largest chunk asked of the agent at once.
const CHUNK: u32 = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

/// The running relays of one process.
pub struct Relays {
    stdin_close: Option<oneshot::Sender<()>>,
    stdin: Option<JoinHandle<()>>,
    output: Option<JoinHandle<()>>,
}

/// What containerd names as a process's stdio: FIFO paths (or `file://` URIs), empty for none.
#[derive(Clone, Debug, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioPaths {
    pub fn new(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> Self {
        Self {
            stdin: stdin.into(),
            stdout: stdout.into(),
            stderr: stderr.into(),
            terminal,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("open {what} {path}")]
pub struct OpenError {
    what: &'static str,
    path: String,
    #[source]
    source: std::io::Error,
}

fn local_path(uri: &str) -> Result<&str, std::io::Error> {
    match uri.split_once("://") {
        None => Ok(uri),
        Some(("file", path)) | Some(("fifo", path)) => Ok(path),
        Some((scheme, _)) => Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("stdio scheme {scheme}:// is not supported"),
        )),
    }
}

enum Sink {
    Fifo(pipe::Sender),
    File(tokio::fs::File),
    Discard,
}

impl Sink {
    async fn open(uri: &str, what: &'static str) -> Result<Self, OpenError> {
        let err = |source| OpenError {
            what,
            path: uri.to_string(),
            source,
        };
        if uri.is_empty() {
            return Ok(Sink::Discard);
        }
        let path = local_path(uri).map_err(err)?;
        let meta = std::fs::metadata(path);
        if meta.as_ref().map(is_fifo).unwrap_or(false) {
            // Read-write never blocks and never fails for want of a reader.
            let tx = pipe::OpenOptions::new()
                .read_write(true)
                .open_sender(path)
                .map_err(err)?;
            return Ok(Sink::Fifo(tx));
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .map_err(err)?;
        Ok(Sink::File(file))
    }

    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Fifo(tx) => tx.write_all(data).await,
            Sink::File(f) => f.write_all(data).await,
            Sink::Discard => Ok(()),
        }
    }
}

fn is_fifo(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    meta.file_type().is_fifo()
}

async fn pump_output(agent: AgentClient, cid: String, eid: String, stream: Stream, mut sink: Sink) {
    loop {
        let req = ReadStreamRequest {
            container_id: cid.clone(),
            exec_id: eid.clone(),
            len: CHUNK,
            ..Default::default()
        };
        let got = match stream {
            Stream::Stdout => agent.read_stdout(ctx(None), &req).await,
            Stream::Stderr => agent.read_stderr(ctx(None), &req).await,
        };
        match got {
            Ok(resp) if resp.data.is_empty() => break,
            Ok(resp) => {
                let what = format!("container {cid} exec {eid:?} {stream:?}");
                if let Err(e) = crate::task::answers::chunk(&what, CHUNK, &resp) {
                    warn!("{e}");
                    break;
                }
                if let Err(e) = sink.write_all(&resp.data).await {
                    debug!(container = %cid, exec = %eid, "{stream:?}: write to containerd: {e}");
                    // Keep draining so the process is not blocked on a full pipe.
                    sink = Sink::Discard;
                }
            }
            Err(e) => {
                debug!(container = %cid, exec = %eid, "{stream:?}: {e}");
                break;
            }
        }
    }
}

async fn pump_stdin(
    agent: AgentClient,
    cid: String,
    eid: String,
    mut source: pipe::Receiver,
    mut close: oneshot::Receiver<()>,
) {
    let mut buf = vec![0u8; CHUNK as usize];
    let write = |data: Vec<u8>| {
        let req = WriteStreamRequest {
            container_id: cid.clone(),
            exec_id: eid.clone(),
            data,
            ..Default::default()
        };
        let agent = agent.clone();
        async move { agent.write_stdin(ctx(None), &req).await }
    };
    loop {
        tokio::select! {
            read = source.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if write(buf[..n].to_vec()).await.is_err() {
                        return;
                    }
                }
            },
            _ = &mut close => {
                // containerd closed stdin: pass on what is still in the FIFO, then end it.
                while let Ok(n) = source.try_read(&mut buf) {
                    if n == 0 || write(buf[..n].to_vec()).await.is_err() {
                        break;
                    }
                }
                break;
            }
        }
    }
    let req = ProcessRequest {
        container_id: cid.clone(),
        exec_id: eid.clone(),
        ..Default::default()
    };
    let _ = agent
        .close_stdin(ctx(Some(Duration::from_secs(5))), &req)
        .await;
}

impl Relays {
    /// No relays: a process whose stdio nobody reads (and the unit tests' fakes).
    pub fn none() -> Relays {
        Relays {
            stdin_close: None,
            stdin: None,
            output: None,
        }
    }

    /// Opens containerd's end of the stdio and starts relaying.
    pub async fn start(
        agent: &AgentClient,
        cid: &str,
        eid: &str,
        paths: &StdioPaths,
    ) -> Result<Relays, OpenError> {
        let stdout = Sink::open(&paths.stdout, "stdout").await?;
        let stderr = if paths.terminal {
            None
        } else {
            Some(Sink::open(&paths.stderr, "stderr").await?)
        };
        let stdin = if paths.stdin.is_empty() {
            None
        } else {
            let path = local_path(&paths.stdin).map_err(|source| OpenError {
                what: "stdin",
                path: paths.stdin.clone(),
                source,
            })?;
            // Read-write: containerd may not have opened its end yet, and a read-only FIFO
            // without writers would read end-of-file at once. The end of stdin comes as CloseIO.
            let rx = pipe::OpenOptions::new()
                .read_write(true)
                .open_receiver(Path::new(path))
                .map_err(|source| OpenError {
                    what: "stdin",
                    path: paths.stdin.clone(),
                    source,
                })?;
            Some(rx)
        };

        let (stdin_close, stdin) = match stdin {
            Some(rx) => {
                let (tx, close) = oneshot::channel();
                let pump =
                    tokio::spawn(pump_stdin(agent.clone(), cid.into(), eid.into(), rx, close));
                (Some(tx), Some(pump))
            }
            None => (None, None),
        };
        let out = tokio::spawn(pump_output(
            agent.clone(),
            cid.into(),
            eid.into(),
            Stream::Stdout,
            stdout,
        ));
        let err = stderr.map(|sink| {
            tokio::spawn(pump_output(
                agent.clone(),
                cid.into(),
                eid.into(),
                Stream::Stderr,
                sink,
            ))
        });
        let output = tokio::spawn(async move {
            let _ = out.await;
            if let Some(err) = err {
                let _ = err.await;
            }
        });
        Ok(Relays {
            stdin_close,
            stdin,
            output: Some(output),
        })
    }

    /// containerd's CloseIO: stdin ends once what was written is delivered.
    pub fn close_stdin(&mut self) {
        if let Some(tx) = self.stdin_close.take() {
            let _ = tx.send(());
        }
    }

    /// Waits (at most `limit`) until all output has reached containerd.
    pub async fn drain(&mut self, limit: Duration) {
        if let Some(output) = self.output.take() {
            let _ = tokio::time::timeout(limit, output).await;
        }
    }
}

impl Drop for Relays {
    /// A deleted process's relays stop, and containerd's FIFOs are closed with them.
    fn drop(&mut self) {
        for task in [self.stdin.take(), self.output.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdio_uris() {
        assert_eq!(local_path("/run/x/fifo").unwrap(), "/run/x/fifo");
        assert_eq!(local_path("file:///var/log/a").unwrap(), "/var/log/a");
        let err = local_path("binary:///bin/logger").unwrap_err();
        assert!(err.to_string().contains("binary"));
    }
}
