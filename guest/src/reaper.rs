//! Child reaping for PID 1.
//!
//! Every orphan of the VM ends up as the agent's child, so the agent reaps with `waitpid(-1)`
//! and hands each status to whoever registered for that pid. A process can exit before its pid
//! is known to the agent (a container whose command fails at once); such a status is kept as
//! unclaimed for a while and given out when the pid is registered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How long an exit nobody asked for is kept.
const UNCLAIMED_TTL: Duration = Duration::from_secs(120);

/// The status a runtime reports for a wait status: the exit code, or 128 + the signal number.
pub fn exit_code(status: WaitStatus) -> Option<u32> {
    match status {
        // An exit code is 0..=255 and a signal number positive.
        WaitStatus::Exited(_, code) => Some(u32::try_from(code).unwrap_or(255)),
        WaitStatus::Signaled(_, sig, _) => Some(128 + u32::try_from(sig as i32).unwrap_or(0)),
        _ => None,
    }
}

#[derive(Default)]
struct Table {
    waiting: HashMap<i32, oneshot::Sender<u32>>,
    unclaimed: HashMap<i32, (u32, Instant)>,
}

#[derive(Clone, Default)]
pub struct Reaper {
    table: Arc<Mutex<Table>>,
}

impl Reaper {
    /// Starts reaping on SIGCHLD. Must run inside the tokio runtime.
    pub fn start() -> std::io::Result<Self> {
        let reaper = Reaper::default();
        let mut sigchld = signal(SignalKind::child())?;
        let this = reaper.clone();
        tokio::spawn(async move {
            loop {
                this.reap_all();
                // A missed signal is caught by the periodic sweep.
                let _ = tokio::time::timeout(Duration::from_secs(1), sigchld.recv()).await;
            }
        });
        Ok(reaper)
    }

    /// Returns a receiver for the exit code of `pid`.
    pub fn register(&self, pid: i32) -> oneshot::Receiver<u32> {
        let (tx, rx) = oneshot::channel();
        let mut table = self.table.lock().expect("reaper table lock");
        if let Some((code, _)) = table.unclaimed.remove(&pid) {
            let _ = tx.send(code);
        } else {
            table.waiting.insert(pid, tx);
        }
        rx
    }

    fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => {
                    let (Some(pid), Some(code)) = (status.pid(), exit_code(status)) else {
                        continue;
                    };
                    self.deliver(pid.as_raw(), code);
                }
            }
        }
    }

    fn deliver(&self, pid: i32, code: u32) {
        let mut table = self.table.lock().expect("reaper table lock");
        if let Some(tx) = table.waiting.remove(&pid) {
            let _ = tx.send(code);
        } else {
            let now = Instant::now();
            table
                .unclaimed
                .retain(|_, (_, at)| now.duration_since(*at) < UNCLAIMED_TTL);
            table.unclaimed.insert(pid, (code, now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn codes_match_runc() {
        let pid = Pid::from_raw(10);
        assert_eq!(exit_code(WaitStatus::Exited(pid, 3)), Some(3));
        assert_eq!(
            exit_code(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some(137)
        );
        assert_eq!(
            exit_code(WaitStatus::Signaled(pid, Signal::SIGTERM, true)),
            Some(143)
        );
        assert_eq!(exit_code(WaitStatus::StillAlive), None);
    }

    #[tokio::test]
    async fn an_exit_before_registration_is_kept() {
        let reaper = Reaper::default();
        reaper.deliver(4242, 7);
        assert_eq!(reaper.register(4242).await.unwrap(), 7);
        let rx = reaper.register(4343);
        reaper.deliver(4343, 0);
        assert_eq!(rx.await.unwrap(), 0);
    }
}
