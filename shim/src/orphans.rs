//! Orphaned tasks: containers this shim runs whose record containerd has lost.
//!
//! containerd deletes a task before its container record, and a shim is asked to end only
//! through its tasks. When a record goes first, nothing will ever kill, delete or shut down what
//! the shim runs: the VM, its memory and the pod's network stay for good. containerd 1.6 does
//! this when it restarts while the CRI runs a pod sandbox: on the failed RunPodSandbox the CRI
//! deletes the sandbox's container while the task stays (containerd#12344; kite's soak found it).
//! So the shim asks containerd, every [`CHECK_EVERY`], whether it still holds a record of each
//! container it serves; a container without one in [`GONE_AFTER`] answers in a row is ended
//! ([`TaskState::abandon`]), and the shim exits when none is left: containerd then cleans up
//! after it as after any shim that went (`shim delete`, the bundle).
//!
//! A shim serving no container is asked about by its own id (its pod's sandbox container): a
//! containerd that stops while a sandbox's task is being created drops the create (the shim
//! releases what it had made) and, restarted, reconnects to the shim while the CRI deletes the
//! sandbox's record; nothing would ever shut that shim down (the soak found it). Without a
//! record of its own id in [`GONE_AFTER`] answers, such a shim exits.
//!
//! Only a clear NotFound counts: a containerd that does not answer (restarting, stopped) tells
//! nothing, and the count waits for it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::asynchronous::ExitSignal;
use kite_protocol::containerd::ContainerRecords;
use tracing::{debug, error, warn};

use crate::task::state::TaskState;

/// How often containerd is asked about the shim's containers.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);
/// How many answers in a row without a record make a container orphaned (a record deleted
/// while its task was being deleted is gone from the shim by the second answer).
pub const GONE_AFTER: u32 = 3;
/// How long one question may take.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// Counts, for each container, containerd's answers in a row that it has no record of it.
#[derive(Debug, Default)]
pub struct OrphanTracker {
    misses: HashMap<String, u32>,
}

impl OrphanTracker {
    /// Takes one round of answers for the containers served now (`Some(true)`: a record,
    /// `Some(false)`: none, `None`: no answer) and returns those without a record in
    /// [`GONE_AFTER`] answers in a row (again every round until they are gone).
    pub fn observe(&mut self, answers: &[(String, Option<bool>)]) -> Vec<String> {
        self.misses
            .retain(|id, _| answers.iter().any(|(served, _)| served == id));
        let mut orphans = Vec::new();
        for (id, answer) in answers {
            let misses = self.misses.entry(id.clone()).or_default();
            match answer {
                Some(true) => *misses = 0,
                Some(false) => *misses += 1,
                None => {}
            }
            if *misses >= GONE_AFTER {
                orphans.push(id.clone());
            }
        }
        orphans
    }
}

/// `call`'s result if it came within [`ANSWER_WITHIN`]; a failure is no answer.
async fn within<T>(
    call: impl std::future::Future<Output = Result<T, kite_protocol::containerd::ContainerdError>>,
) -> Option<T> {
    match tokio::time::timeout(ANSWER_WITHIN, call).await {
        Ok(Ok(answer)) => Some(answer),
        Ok(Err(e)) => {
            debug!(error = %kite_protocol::errors::error_chain(&e), "orphan check: no answer from containerd");
            None
        }
        Err(_) => None,
    }
}

/// Asks containerd (gRPC on `socket`, `namespace`) whether it holds a record of each of `ids`.
async fn ask(socket: &str, namespace: &str, ids: &[String]) -> Vec<(String, Option<bool>)> {
    let mut records = within(ContainerRecords::connect(socket, namespace)).await;
    let mut answers = Vec::with_capacity(ids.len());
    for id in ids {
        let answer = match records.as_mut() {
            Some(records) => within(records.exists(id)).await,
            None => None,
        };
        answers.push((id.clone(), answer));
    }
    answers
}

/// What to ask containerd about: the containers served, or the shim's own id (`own`) when it
/// serves none; and whether it serves none.
fn to_ask(served: Vec<String>, own: &str) -> (Vec<String>, bool) {
    if served.is_empty() {
        (vec![own.to_string()], true)
    } else {
        (served, false)
    }
}

/// Runs for the serving shim's life (`own`: the id it was started for): ends orphaned
/// containers, and the shim when none is left or when it serves none and its own record is gone.
pub async fn watch(
    state: Arc<TaskState>,
    own: String,
    socket: String,
    namespace: String,
    exit: Arc<ExitSignal>,
) {
    let mut tracker = OrphanTracker::default();
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let (ids, idle) = to_ask(state.container_ids().await, &own);
        let answers = ask(&socket, &namespace, &ids).await;
        let orphans = tracker.observe(&answers);
        if idle {
            if !orphans.is_empty() && state.container_ids().await.is_empty() {
                error!(shim = %own, namespace = %namespace,
                       "this shim serves no container and containerd has no record of its own: nothing would ever shut it down; it exits");
                exit.signal();
                return;
            }
            continue;
        }
        for id in orphans {
            error!(container = %id, namespace = %namespace,
                   "containerd has no record of this container any more: its task is orphaned (nothing would delete it); ending it");
            if state.abandon(&id).await {
                warn!("no container left: the shim exits");
                exit.signal();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{OrphanTracker, GONE_AFTER};

    fn round(t: &mut OrphanTracker, answers: &[(&str, Option<bool>)]) -> Vec<String> {
        let answers: Vec<(String, Option<bool>)> =
            answers.iter().map(|(i, a)| (i.to_string(), *a)).collect();
        t.observe(&answers)
    }

    #[test]
    fn only_answers_in_a_row_without_a_record_make_an_orphan() {
        let mut t = OrphanTracker::default();
        for _ in 1..GONE_AFTER {
            assert!(round(&mut t, &[("pod", Some(false)), ("app", Some(true))]).is_empty());
        }
        // A record found again starts the count over; no answer leaves it as it is.
        assert!(round(&mut t, &[("pod", Some(true))]).is_empty());
        for _ in 1..GONE_AFTER {
            assert!(round(&mut t, &[("pod", Some(false))]).is_empty());
            assert!(round(&mut t, &[("pod", None)]).is_empty());
        }
        assert_eq!(round(&mut t, &[("pod", Some(false))]), ["pod"]);
        // Asked again while it is still served.
        assert_eq!(round(&mut t, &[("pod", None)]), ["pod"]);
    }

    #[test]
    fn a_shim_serving_nothing_asks_about_itself() {
        assert_eq!(
            super::to_ask(Vec::new(), "sb1"),
            (vec!["sb1".to_string()], true)
        );
        assert_eq!(
            super::to_ask(vec!["sb1".into(), "app".into()], "sb1"),
            (vec!["sb1".to_string(), "app".to_string()], false)
        );
        // Its own id counts like a container's: answers in a row.
        let mut t = OrphanTracker::default();
        for _ in 1..GONE_AFTER {
            assert!(round(&mut t, &[("sb1", Some(false))]).is_empty());
        }
        assert_eq!(round(&mut t, &[("sb1", Some(false))]), ["sb1"]);
    }

    #[test]
    fn a_container_no_longer_served_is_forgotten() {
        let mut t = OrphanTracker::default();
        for _ in 1..GONE_AFTER {
            round(&mut t, &[("old", Some(false))]);
        }
        // Deleted (by containerd, its record first) and then created again under that id.
        round(&mut t, &[]);
        assert!(round(&mut t, &[("old", Some(false))]).is_empty());
    }
}
