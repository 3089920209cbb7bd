//! The runtime zygote: a single-threaded copy of the agent, forked before the agent starts any
//! thread, that forks the runtime helpers (see [`crate::runtime`]) instead of the agent
//! executing itself for each one.
//!
//! A container set-up needs a single-threaded process (libcontainer forks, and waits for its
//! own children). Executing the agent's binary for each one costs an `exec` of an 8 MB
//! static binary, its relocations and its start-up: under TCG 40–120 ms of a warm pod's
//! ~400 ms container start. A fork of the zygote, which is already loaded, costs a few.
//!
//! The agent sends the zygote a request on a `SOCK_SEQPACKET` pair: the helper's arguments
//! (`runtime create|exec …`, as for the executed helper) with its stdin, stdout and stderr as
//! `SCM_RIGHTS`. The zygote forks a launcher, which forks the helper and exits at once, so
//! the helper is re-parented to PID 1 and the agent's reaper sees its exit exactly as an
//! executed helper's; the zygote answers with the helper's pid. The helper writes its result
//! file as an executed one does. If the zygote is gone, or surely forked nothing, the agent
//! executes the helper as before (the zygote is an optimisation, never a dependency); after an
//! answer that leaves it unknown whether a helper started, the set-up fails instead of
//! risking a second one.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use nix::sys::wait::waitpid;
use nix::unistd::{dup2, fork, pipe2, read, write, ForkResult};

/// The largest request (the helper's arguments, JSON).
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    #[error("runtime zygote: {op}")]
    Os {
        op: &'static str,
        source: nix::Error,
    },
    #[error("runtime zygote: {0}")]
    Protocol(String),
    /// Nothing was forked for the request: running the helper another way is safe.
    #[error("runtime zygote: nothing forked: {0}")]
    NotForked(String),
}

impl ZygoteError {
    /// Whether the request surely started no helper (so executing one instead cannot run the
    /// container's set-up or command twice).
    pub fn nothing_forked(&self) -> bool {
        matches!(self, ZygoteError::NotForked(_))
    }
}

fn os(op: &'static str) -> impl FnOnce(nix::Error) -> ZygoteError {
    move |source| ZygoteError::Os { op, source }
}

/// How long the zygote may take to answer (a fork or two; as long as a whole set-up may take).
const ANSWER_WITHIN: std::time::Duration = kite_protocol::GUEST_HELPER_TIMEOUT;

/// The agent's end of the zygote.
pub struct Zygote {
    /// None once a request failed: the zygote is given up (its end closes, and it exits).
    socket: std::sync::Mutex<Option<OwnedFd>>,
}

impl Zygote {
    /// Forks the zygote. Must be called while the process has one thread (before the async
    /// runtime starts); refuses otherwise.
    pub fn spawn() -> Result<Zygote, ZygoteError> {
        if threads() != Some(1) {
            return Err(ZygoteError::Protocol(
                "not forked: the agent runs threads already".into(),
            ));
        }
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(os("socket pair"))?;
        // SAFETY: the process has a single thread (checked above), so the child may run any
        // code: no lock can be held by a thread that does not exist in it.
        match unsafe { fork() }.map_err(os("fork"))? {
            ForkResult::Child => {
                drop(ours);
                serve(theirs);
                std::process::exit(0);
            }
            ForkResult::Parent { .. } => {
                drop(theirs);
                let within = nix::sys::time::TimeVal::new(
                    i64::try_from(ANSWER_WITHIN.as_secs()).unwrap_or(i64::MAX),
                    0,
                );
                nix::sys::socket::setsockopt(
                    &ours,
                    nix::sys::socket::sockopt::ReceiveTimeout,
                    &within,
                )
                .map_err(os("set the answer timeout"))?;
                Ok(Zygote {
                    socket: std::sync::Mutex::new(Some(ours)),
                })
            }
        }
    }

    /// Has the zygote fork a runtime helper with `args` (`runtime create|exec …`) and `stdio`
    /// (stdin, stdout, stderr); returns the helper's pid. Blocking: call off the async
    /// runtime's threads.
    pub fn launch(&self, args: &[String], stdio: &[OwnedFd; 3]) -> Result<i32, ZygoteError> {
        let request = serde_json::to_vec(args)
            .map_err(|e| ZygoteError::NotForked(format!("encode the request: {e}")))?;
        if request.len() > MAX_REQUEST {
            return Err(ZygoteError::NotForked(format!(
                "request of {} bytes (at most {MAX_REQUEST})",
                request.len()
            )));
        }
        // One request and its answer at a time.
        let mut socket = self
            .socket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(fd) = socket.as_ref() else {
            return Err(ZygoteError::NotForked("given up after a failure".into()));
        };
        let answer = exchange(fd, &request, stdio);
        if matches!(answer, Err(ref e) if !e.nothing_forked()) || matches!(answer, Ok(0)) {
            // A lost or late answer would be taken for the next request's.
            *socket = None;
        }
        match answer? {
            pid if pid > 0 => Ok(pid),
            errno if errno == -libc::ECHILD => Err(ZygoteError::Protocol(
                "the launcher died before it told the helper's pid".into(),
            )),
            errno => Err(ZygoteError::NotForked(format!(
                "fork the helper: {}",
                nix::Error::from_raw(-errno)
            ))),
        }
    }
}

/// Sends one request and reads its answer: a pid, or a negative errno.
/// The zygote gets its own copies of `stdio` (SCM_RIGHTS); the caller's stay the caller's.
fn exchange(socket: &OwnedFd, request: &[u8], stdio: &[OwnedFd; 3]) -> Result<i32, ZygoteError> {
    let fds = stdio.each_ref().map(AsRawFd::as_raw_fd);
    // A SOCK_SEQPACKET message is queued whole or not at all.
    sendmsg::<()>(
        socket.as_raw_fd(),
        &[IoSlice::new(request)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(|e| ZygoteError::NotForked(format!("send the request: {e}")))?;
    let mut answer = [0u8; 4];
    let n = loop {
        match read(socket.as_raw_fd(), &mut answer) {
            Err(nix::Error::EINTR) => continue,
            other => break other.map_err(os("read the answer"))?,
        }
    };
    if n != answer.len() {
        return Err(ZygoteError::Protocol(format!("answer of {n} bytes")));
    }
    Ok(i32::from_le_bytes(answer))
}

/// The number of threads of this process (one line of /proc: not worth the procfs crate in
/// the guest's binary).
fn threads() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}

/// The zygote's loop: one request at a time until the agent's end closes.
fn serve(socket: OwnedFd) {
    let mut buf = vec![0u8; MAX_REQUEST];
    loop {
        let (len, fds) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!([RawFd; 3]);
            let msg = match recvmsg::<()>(
                socket.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => msg,
                Err(nix::Error::EINTR) => continue,
                Err(_) => return,
            };
            let mut fds = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(received) = c {
                        // SAFETY: SCM_RIGHTS gave this process these descriptors; each is
                        // owned here exactly once.
                        fds.extend(
                            received
                                .into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
            }
            (msg.bytes, fds)
        };
        if len == 0 {
            return; // the agent's end closed
        }
        let answer = match (
            serde_json::from_slice::<Vec<String>>(&buf[..len]),
            fds.try_into(),
        ) {
            (Ok(args), Ok(stdio)) => launch(&args, stdio, socket.as_raw_fd()),
            _ => -libc::EINVAL,
        };
        if write(&socket, &answer.to_le_bytes()).is_err() {
            return;
        }
    }
}

/// Forks a launcher that forks the helper and exits, so that the helper's parent is PID 1.
/// Returns the helper's pid, or a negative errno (`-ECHILD`: the launcher died before it
/// said). `socket` is the zygote's end, which the helper must not hold: its processes would
/// keep it open after the zygote's death, and the agent would not see the end.
fn launch(args: &[String], stdio: [OwnedFd; 3], socket: RawFd) -> i32 {
    let (pid_r, pid_w) = match pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(pair) => pair,
        Err(e) => return -(e as i32),
    };
    // SAFETY: the zygote has a single thread.
    let launcher = match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(pid_r);
            // The zygote's `OwnedFd` is never dropped in this process (it exits below).
            let _ = nix::unistd::close(socket);
            // SAFETY: the launcher has a single thread.
            let pid = match unsafe { fork() } {
                Ok(ForkResult::Child) => {
                    drop(pid_w);
                    std::process::exit(run_helper(args, stdio));
                }
                Ok(ForkResult::Parent { child }) => child.as_raw(),
                Err(e) => -(e as i32),
            };
            let _ = write(&pid_w, &pid.to_le_bytes());
            std::process::exit(0);
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => return -(e as i32),
    };
    drop(pid_w);
    drop(stdio);
    let mut answer = [0u8; 4];
    let pid = match read(pid_r.as_raw_fd(), &mut answer) {
        Ok(4) => i32::from_le_bytes(answer),
        _ => -libc::ECHILD,
    };
    let _ = waitpid(launcher, None);
    pid
}

/// The helper, in the zygote's grandchild: `stdio` becomes 0, 1 and 2, then the helper runs as
/// an executed one would (in `/`).
fn run_helper(args: &[String], stdio: [OwnedFd; 3]) -> i32 {
    // The agent's log subscriber, inherited, writes to stderr, which is the container's from
    // here on: an executed helper has none, and neither has this one.
    let _quiet = tracing::subscriber::set_default(tracing::subscriber::NoSubscriber::default());
    for (fd, target) in stdio.iter().zip(0..) {
        if dup2(fd.as_raw_fd(), target).is_err() {
            return 4;
        }
    }
    drop(stdio);
    if std::env::set_current_dir("/").is_err() {
        return 4;
    }
    crate::runtime::helper_main(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_zygote_is_forked_from_a_process_with_threads() {
        // The test harness runs tests on threads of its own.
        let _other = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_secs(1)));
        let refused = Zygote::spawn().err().expect("refused");
        assert!(refused.to_string().contains("runs threads"), "{refused}");
    }
}
