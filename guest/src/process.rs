//! A process the agent runs for the host: a container's init or an exec. Holds the agent's ends
//! of its stdio and its exit status.

use std::os::fd::OwnedFd;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, watch, Mutex};

use crate::channel::FdStream;

/// Largest chunk one read of a stream returns.
pub const MAX_READ: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    pub status: u32,
    pub at_ns: u64,
}

/// The agent's ends of a process's stdio.
pub enum Stdio {
    /// Pipes: stdin (absent when the host attached none), stdout, stderr.
    Pipes {
        stdin: Option<OwnedFd>,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    /// A pty master: stdin and stdout both, stderr merged.
    Tty(OwnedFd),
}

pub struct Process {
    pub pid: i32,
    stdin: Mutex<Option<FdStream>>,
    stdout: Mutex<Option<FdStream>>,
    stderr: Mutex<Option<FdStream>>,
    tty: Option<std::os::fd::RawFd>,
    exit: watch::Receiver<Option<Exit>>,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}

impl Process {
    /// Wraps a running process; `exited` resolves with its exit code (from the reaper).
    pub fn new(pid: i32, stdio: Stdio, exited: oneshot::Receiver<u32>) -> std::io::Result<Self> {
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            // A dropped sender means the reaper is gone: report the process as killed.
            let status = exited.await.unwrap_or(137);
            let _ = tx.send(Some(Exit {
                status,
                at_ns: now_ns(),
            }));
        });
        let (stdin, stdout, stderr, tty) = match stdio {
            Stdio::Pipes {
                stdin,
                stdout,
                stderr,
            } => (
                stdin.map(FdStream::new).transpose()?,
                Some(FdStream::new(stdout)?),
                Some(FdStream::new(stderr)?),
                None,
            ),
            Stdio::Tty(master) => {
                let reader = FdStream::new(master.try_clone()?)?;
                // Resizes go through the writer, which lives as long as the process does.
                let writer = FdStream::new(master)?;
                let raw = writer.as_raw_fd();
                (Some(writer), Some(reader), None, Some(raw))
            }
        };
        Ok(Self {
            pid,
            stdin: Mutex::new(stdin),
            stdout: Mutex::new(stdout),
            stderr: Mutex::new(stderr),
            tty,
            exit: rx,
        })
    }

    pub fn exit(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    pub async fn wait(&self) -> Exit {
        let mut rx = self.exit.clone();
        let exit = rx.wait_for(Option::is_some).await.ok().and_then(|e| *e);
        exit.unwrap_or(Exit {
            status: 137,
            at_ns: now_ns(),
        })
    }

    async fn read_from(stream: &Mutex<Option<FdStream>>, len: usize) -> std::io::Result<Vec<u8>> {
        let mut guard = stream.lock().await;
        let Some(stream) = guard.as_mut() else {
            return Ok(Vec::new());
        };
        let mut buf = vec![0u8; len.clamp(1, MAX_READ)];
        let n = stream.read(&mut buf).await?;
        buf.truncate(n);
        if n == 0 {
            *guard = None;
        }
        Ok(buf)
    }

    /// Reads the next chunk of stdout; empty at end of stream.
    pub async fn read_stdout(&self, len: usize) -> std::io::Result<Vec<u8>> {
        Self::read_from(&self.stdout, len).await
    }

    /// Reads the next chunk of stderr; empty at end of stream (at once for a tty).
    pub async fn read_stderr(&self, len: usize) -> std::io::Result<Vec<u8>> {
        Self::read_from(&self.stderr, len).await
    }

    pub async fn write_stdin(&self, data: &[u8]) -> std::io::Result<usize> {
        let mut guard = self.stdin.lock().await;
        let Some(stdin) = guard.as_mut() else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "stdin is closed",
            ));
        };
        stdin.write_all(data).await?;
        Ok(data.len())
    }

    /// Closes stdin (the process reads end-of-file). A tty has no separate stdin to close.
    pub async fn close_stdin(&self) {
        if self.tty.is_none() {
            self.stdin.lock().await.take();
        }
    }

    pub fn resize(&self, width: u16, height: u16) -> nix::Result<()> {
        let Some(fd) = self.tty else {
            return Ok(());
        };
        let size = libc::winsize {
            ws_row: height,
            ws_col: width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is valid for the call;
        // `fd` is the pty master this process owns until it is dropped.
        let rc = unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &size) };
        nix::errno::Errno::result(rc).map(drop)
    }
}
