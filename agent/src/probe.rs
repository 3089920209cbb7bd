//! Readiness and liveness probes, as a kubelet runs them: an HTTP GET or a TCP connect to the
//! pod's IP, or a command in the container (CRI ExecSync), each with its timeout; thresholds of
//! consecutive results flip the outcome.

use std::time::{Duration, Instant};

use kite_cri::CriClient;

use crate::manifest::{ProbeAction, ProbePlan};

/// One probe's result: Ok, or what failed.
pub async fn run_once(
    action: &ProbeAction,
    timeout: Duration,
    pod_ip: &str,
    container_id: &str,
    cri: &mut CriClient,
) -> Result<(), String> {
    match action {
        ProbeAction::Http { port, path } => {
            let url = format!("http://{pod_ip}:{port}{path}");
            let client = reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .map_err(|e| format!("HTTP client: {e}"))?;
            let answer = client
                .get(&url)
                .send()
                .await
                .map_err(|e| format!("GET {url}: {}", error_text(&e)))?;
            let code = answer.status();
            // A kubelet counts 200–399 as success.
            if code.is_success() || code.is_redirection() {
                Ok(())
            } else {
                Err(format!("GET {url}: HTTP {code}"))
            }
        }
        ProbeAction::Tcp { port } => {
            let addr = format!("{pod_ip}:{port}");
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&addr)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("connect {addr}: {e}")),
                Err(_) => Err(format!("connect {addr}: timed out after {timeout:?}")),
            }
        }
        ProbeAction::Exec { command } => {
            let args: Vec<&str> = command.iter().map(String::as_str).collect();
            // The runtime enforces the timeout in the container; this one holds if it cannot
            // (a wedged VM), so the pod's worker is never stuck on a probe.
            let exec = cri.exec_sync(container_id, &args, timeout);
            match tokio::time::timeout(timeout + Duration::from_secs(2), exec).await {
                Ok(Ok((0, _, _))) => Ok(()),
                Ok(Ok((code, out, err))) => Err(format!(
                    "{command:?} exited {code}: {}",
                    format!("{out}{err}").trim()
                )),
                Ok(Err(e)) => Err(format!("{command:?}: {e}")),
                Err(_) => Err(format!("{command:?}: no answer within {timeout:?}")),
            }
        }
    }
}

fn error_text(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// A probe's running state: when it is due and its consecutive results.
#[derive(Clone, Debug)]
pub struct ProbeState {
    pub next: Instant,
    successes: u32,
    failures: u32,
    /// The outcome thresholds have decided (None: not yet).
    pub outcome: Option<bool>,
    /// Until the first success, probe this often instead of every period.
    until_ready: Option<Duration>,
    /// The outcome has been "ready" at least once.
    ever_ready: bool,
}

impl ProbeState {
    /// For a container started at `started`.
    pub fn new(plan: &ProbePlan, started: Instant) -> ProbeState {
        ProbeState {
            next: started + plan.initial_delay,
            successes: 0,
            failures: 0,
            outcome: None,
            until_ready: None,
            ever_ready: false,
        }
    }

    /// Probes every `interval` until the first success (a readiness probe: a container is
    /// ready when it is, not up to a period later), then every period.
    pub fn until_ready_every(mut self, interval: Duration) -> ProbeState {
        self.until_ready = Some(interval);
        self
    }

    pub fn due(&self, now: Instant) -> bool {
        now >= self.next
    }

    /// Takes a result; gives the new outcome when it flips.
    pub fn record(&mut self, plan: &ProbePlan, ok: bool, now: Instant) -> Option<bool> {
        if ok {
            self.successes += 1;
            self.failures = 0;
        } else {
            self.failures += 1;
            self.successes = 0;
        }
        let decided = if self.successes >= plan.success_threshold {
            Some(true)
        } else if self.failures >= plan.failure_threshold {
            Some(false)
        } else {
            None
        };
        self.ever_ready |= decided == Some(true);
        self.next = match self.until_ready {
            Some(fast) if !self.ever_ready => now + fast.min(plan.period),
            _ => now + plan.period,
        };
        match decided {
            Some(d) if self.outcome != Some(d) => {
                self.outcome = Some(d);
                Some(d)
            }
            _ => None,
        }
    }

    /// Whether the probe has said "ready" at least once (until then it polls fast).
    pub fn ever_ready(&self) -> bool {
        self.ever_ready
    }

    /// For an adopted container that was ready: not "starting" again.
    pub fn assume_ready(mut self) -> ProbeState {
        self.outcome = Some(true);
        self.ever_ready = true;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_flip_the_outcome_once() {
        let plan = ProbePlan {
            action: ProbeAction::Tcp { port: 1 },
            initial_delay: Duration::from_secs(2),
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_threshold: 1,
            failure_threshold: 3,
        };
        let t0 = Instant::now();
        let mut s = ProbeState::new(&plan, t0);
        assert!(!s.due(t0) && s.due(t0 + Duration::from_secs(2)));
        assert_eq!(s.record(&plan, true, t0), Some(true));
        assert_eq!(s.record(&plan, true, t0), None);
        assert_eq!(s.record(&plan, false, t0), None);
        assert_eq!(s.record(&plan, false, t0), None);
        assert_eq!(s.record(&plan, false, t0), Some(false));
        assert_eq!(s.next, t0 + Duration::from_secs(1));
        assert_eq!(s.record(&plan, true, t0), Some(true));
    }

    #[test]
    fn a_readiness_probe_polls_fast_only_until_first_ready() {
        let plan = ProbePlan {
            action: ProbeAction::Tcp { port: 1 },
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
            success_threshold: 1,
            failure_threshold: 3,
        };
        let t0 = Instant::now();
        let fast = Duration::from_millis(200);
        let mut s = ProbeState::new(&plan, t0).until_ready_every(fast);
        s.record(&plan, false, t0);
        assert_eq!(s.next, t0 + fast);
        s.record(&plan, true, t0);
        assert_eq!(s.next, t0 + plan.period);
        for _ in 0..3 {
            s.record(&plan, false, t0);
        }
        assert_eq!(s.outcome, Some(false));
        assert_eq!(
            s.next,
            t0 + plan.period,
            "a container once ready is probed on its period"
        );
    }
}
