//! A minimal QMP client: the shim only needs to ask QEMU to quit.
//!
//! Hand-written rather than a QMP crate: two commands (`qmp_capabilities`, `quit`) over a unix
//! socket with line-delimited JSON do not justify the dependency.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP {path}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("QMP {path}: {message}")]
    Protocol { path: String, message: String },
}

/// Connects, negotiates and sends `command`; waits for QEMU's answer.
pub async fn execute(socket: &Path, command: &str, timeout: Duration) -> Result<(), QmpError> {
    let path = socket.display().to_string();
    let io = |source| QmpError::Io {
        path: path.clone(),
        source,
    };
    let run = async {
        let stream = UnixStream::connect(socket).await.map_err(io)?;
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        // Greeting, then capabilities negotiation, then the command.
        for cmd in [None, Some("qmp_capabilities"), Some(command)] {
            if let Some(cmd) = cmd {
                let msg = format!("{{\"execute\":\"{cmd}\"}}\n");
                write.write_all(msg.as_bytes()).await.map_err(io)?;
            }
            loop {
                let Some(line) = lines.next_line().await.map_err(io)? else {
                    // QEMU closes the socket as it quits.
                    return Ok(());
                };
                let value: serde_json::Value =
                    serde_json::from_str(&line).map_err(|e| QmpError::Protocol {
                        path: path.clone(),
                        message: format!("bad JSON {line:?}: {e}"),
                    })?;
                if let Some(err) = value.get("error") {
                    return Err(QmpError::Protocol {
                        path: path.clone(),
                        message: format!("{cmd:?} failed: {err}"),
                    });
                }
                if value.get("QMP").is_some() || value.get("return").is_some() {
                    break;
                }
                // Asynchronous events are skipped.
            }
        }
        Ok(())
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| QmpError::Protocol {
            path: path.clone(),
            message: format!("no answer within {timeout:?}"),
        })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn negotiates_then_sends_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"{\"QMP\":{\"version\":{}}}\n").await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 256];
            while !String::from_utf8_lossy(&got).contains("quit") {
                let n = s.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&got).contains("qmp_capabilities")
                    && !String::from_utf8_lossy(&got).contains("quit")
                {
                    s.write_all(b"{\"return\":{}}\n").await.unwrap();
                }
            }
            s.write_all(b"{\"event\":\"SHUTDOWN\"}\n{\"return\":{}}\n")
                .await
                .unwrap();
            String::from_utf8(got).unwrap()
        });
        execute(&sock, "quit", Duration::from_secs(5))
            .await
            .unwrap();
        let sent = server.await.unwrap();
        assert!(sent.contains("qmp_capabilities") && sent.ends_with("{\"execute\":\"quit\"}\n"));
    }
}
