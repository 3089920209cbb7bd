//! The agent channel inside the guest: a virtio-serial port (or a vsock listener).
//!
//! A virtio-serial port is one byte stream, not a listener. ttrpc multiplexes requests over one
//! connection, so the agent serves exactly one connection, which `init` pumps to and from the
//! port (see `init::pump_serial_port`: a host that reconnects finds the agent still serving).
//! [`FdStream`] makes the other descriptors the agent relays (pipes, pty masters) async.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Finds the device node of the virtio-serial port called `name` (no udev in the guest, so
/// /dev/virtio-ports/NAME does not exist: the name is in sysfs).
pub fn find_port(sys_class: &Path, name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sys_class).ok()?;
    for entry in entries.flatten() {
        let port_name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim() == name {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    None
}

/// Waits up to `timeout` for the port called `name` to appear.
pub fn wait_for_port(name: &str, timeout: Duration) -> io::Result<PathBuf> {
    let start = Instant::now();
    loop {
        if let Some(dev) = find_port(Path::new("/sys/class/virtio-ports"), name) {
            if dev.exists() {
                return Ok(dev);
            }
        }
        if start.elapsed() > timeout {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("virtio-serial port {name} did not appear within {timeout:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A non-blocking descriptor (pipe end, pty master) as an async stream.
pub struct FdStream {
    fd: AsyncFd<OwnedFd>,
}

impl FdStream {
    /// Wraps `fd`, switching it to non-blocking mode.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        let flags =
            OFlag::from_bits_truncate(nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::F_GETFL)?);
        nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::F_SETFL(flags | OFlag::O_NONBLOCK),
        )?;
        Ok(Self {
            // SAFETY: the OwnedFd is moved into the AsyncFd and stays open, the same descriptor,
            // until the AsyncFd is dropped.
            fd: unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?,
        })
    }

    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.get_ref().as_raw_fd()
    }
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = std::task::ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match nix::unistd::read(guard.get_inner().as_raw_fd(), unfilled) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                // A pty master reads EIO once the last slave is closed: that is its end.
                Err(nix::errno::Errno::EIO) => return Poll::Ready(Ok(())),
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = std::task::ready!(self.fd.poll_write_ready(cx))?;
            match nix::unistd::write(guard.get_inner(), data) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_port_by_name_in_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        for (dev, name) in [("vport0p1", "kite.log"), ("vport0p2", "kite.agent")] {
            std::fs::create_dir(dir.path().join(dev)).unwrap();
            std::fs::write(dir.path().join(dev).join("name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(
            find_port(dir.path(), "kite.agent"),
            Some(PathBuf::from("/dev/vport0p2"))
        );
        assert_eq!(find_port(dir.path(), "other"), None);
    }
}
