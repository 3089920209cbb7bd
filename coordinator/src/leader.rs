//! Which coordinator acts. With the embedded store there is one coordinator and it always
//! leads. With etcd, several coordinators campaign in etcd's election (a lease and the
//! election API, as Kubernetes' controllers do): one leads — it holds the state in memory,
//! runs the controllers and serves agents and kitectl — and the others stand by, answering every
//! call with `Unavailable` and the leader's address (metadata [`LEADER_METADATA`]), until the
//! leader's lease runs out (it died, was cut off or paused) and one of them wins.
//!
//! A leader stops acting before another can start: it considers itself the leader only until
//! its lease's expiry as last renewed, counted from *before* the renewal was sent (etcd counts
//! from when it received it, later), and every write it makes also requires its leader key
//! (the [`Fence`]), so a leader that was paused past its lease writes nothing when it resumes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::Client;
use tokio::sync::watch;
use tonic::{Request, Status};

pub use kite_protocol::cluster::LEADER_METADATA;

use crate::store::{EtcdOptions, Fence, StoreError};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// This coordinator acts; the term is its leader key's revision (grows with each election).
    Leading { term: u64 },
    /// Another leads (its address when known), or nobody yet.
    Following { leader: Option<String> },
}

pub struct Leadership {
    /// Where clients reach this coordinator.
    pub me: String,
    role: watch::Sender<Role>,
    /// Leading: until when the lease is surely held (`None`: no lease, the embedded store).
    deadline: Mutex<Option<Instant>>,
}

impl Leadership {
    /// The only coordinator: leads for good.
    pub fn solo(me: impl Into<String>) -> Arc<Leadership> {
        Arc::new(Leadership {
            me: me.into(),
            role: watch::channel(Role::Leading { term: 1 }).0,
            deadline: Mutex::new(None),
        })
    }

    /// One of several: follows until it wins an election.
    pub fn candidate(me: impl Into<String>) -> Arc<Leadership> {
        Arc::new(Leadership {
            me: me.into(),
            role: watch::channel(Role::Following { leader: None }).0,
            deadline: Mutex::new(Some(Instant::now())),
        })
    }

    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    /// Whether this coordinator may act now.
    pub fn is_leading(&self) -> bool {
        matches!(*self.role.borrow(), Role::Leading { .. })
            && self
                .deadline
                .lock()
                .expect("deadline lock")
                .is_none_or(|d| Instant::now() < d)
    }

    pub fn term(&self) -> u64 {
        match *self.role.borrow() {
            Role::Leading { term } => term,
            Role::Following { .. } => 0,
        }
    }

    /// The leader's address as far as this coordinator knows.
    pub fn leader(&self) -> Option<String> {
        match &*self.role.borrow() {
            Role::Leading { .. } => Some(self.me.clone()),
            Role::Following { leader } => leader.clone(),
        }
    }

    fn set_deadline(&self, until: Instant) {
        *self.deadline.lock().expect("deadline lock") = Some(until);
    }

    /// Starts acting (after the state was loaded).
    pub fn lead(&self, term: u64) {
        self.role.send_replace(Role::Leading { term });
    }

    /// Stops leading (the term's end: only the election loop calls it).
    pub fn step_down(&self) {
        self.role.send_replace(Role::Following { leader: None });
    }

    /// Learns who leads, while following. An observation never demotes a leader (a lagging
    /// member may tell of an earlier term): only losing the lease ends a term.
    pub fn observed(&self, leader: Option<String>) {
        self.role.send_if_modified(|r| {
            let next = Role::Following {
                leader: leader.clone(),
            };
            if matches!(r, Role::Leading { .. }) || *r == next {
                return false;
            }
            *r = next;
            true
        });
    }

    /// The refusal a follower answers with.
    pub fn not_leader(&self) -> Status {
        let mut status = match self.leader() {
            Some(l) if l != self.me => Status::unavailable(format!(
                "the coordinator at {} does not lead; the leader is at {l}",
                self.me
            )),
            _ => Status::unavailable(format!(
                "the coordinator at {} does not lead, and no coordinator leads at the moment (an election is under way, or etcd has no quorum); try again",
                self.me
            )),
        };
        if let Some(l) = self.leader().filter(|l| *l != self.me) {
            if let Ok(v) = l.parse() {
                status.metadata_mut().insert(LEADER_METADATA, v);
            }
        }
        status
    }
}

/// The interceptor in front of the node link and the cluster API: only the leader answers.
#[derive(Clone)]
pub struct LeaderGate(pub Arc<Leadership>);

impl tonic::service::Interceptor for LeaderGate {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.0.is_leading() {
            Ok(request)
        } else {
            Err(self.0.not_leader())
        }
    }
}

/// A won election: the fence for the store, and a receiver that turns true when the
/// leadership is lost (lease not renewed in time, the key gone, etcd unreachable).
pub struct Term {
    pub number: u64,
    pub fence: Fence,
    pub lost: watch::Receiver<bool>,
    lease: i64,
    client: Client,
    _keeper: Keeper,
}

impl Term {
    /// Gives the leadership up: the lease goes, and with it the leader key, so another
    /// coordinator wins at once instead of after the lease's TTL.
    pub async fn resign(mut self) {
        self._keeper.stop();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.lease_revoke(self.lease))
            .await;
    }
}

/// The lease's keep-alive, on a thread and runtime of its own with its own connection: a
/// coordinator whose async threads are busy (or blocked on its state's lock while etcd is slow)
/// still renews its lease. Stopped when dropped (a campaign abandoned, a term over).
struct Keeper(watch::Sender<bool>);

impl Keeper {
    fn start(
        options: EtcdOptions,
        lease: i64,
        ttl: i64,
        since: Instant,
        leadership: Arc<Leadership>,
        lost: watch::Sender<bool>,
    ) -> Keeper {
        let (stop_tx, mut stop) = watch::channel(false);
        let spawned = std::thread::Builder::new()
            .name("kite-lease".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "start the lease keeper's runtime");
                        let _ = lost.send(true);
                        return;
                    }
                };
                runtime.block_on(async move {
                    tokio::select! {
                        _ = keep_alive(options, lease, ttl, since, leadership, &lost) => {}
                        _ = stop.wait_for(|s| *s) => {}
                    }
                });
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "start the lease keeper's thread");
        }
        Keeper(stop_tx)
    }

    fn stop(&self) {
        let _ = self.0.send(true);
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Campaigns in etcd's election for this cluster.
pub struct Elector {
    pub options: EtcdOptions,
    /// The election's name: `<prefix>/leader`.
    pub name: String,
    pub ttl_secs: i64,
}

impl Elector {
    pub fn new(options: EtcdOptions, ttl_secs: u64) -> Elector {
        let name = format!("{}/leader", options.prefix);
        Elector {
            options,
            name,
            ttl_secs: i64::try_from(ttl_secs.max(2)).unwrap_or(60),
        }
    }

    /// The store's own error for a failed etcd call (one shape for both).
    fn error(&self, op: &str) -> impl FnOnce(etcd_client::Error) -> StoreError {
        self.options.error(op.to_string())
    }

    /// Follows the election's leader (for the redirects followers answer with) until `stop`.
    pub async fn observe(&self, leadership: Arc<Leadership>, mut stop: watch::Receiver<bool>) {
        loop {
            let round = async {
                let mut client = self.options.connect().await?;
                // The current leader first (observe only tells of changes from now on).
                if let Ok(mut l) = client.leader(self.name.clone()).await {
                    if let Some(kv) = l.take_kv() {
                        leadership.observed(Some(String::from_utf8_lossy(kv.value()).into_owned()));
                    }
                }
                let mut stream = client
                    .observe(self.name.clone())
                    .await
                    .map_err(self.error("observe the election"))?;
                while let Some(mut answer) = stream
                    .message()
                    .await
                    .map_err(self.error("observe the election"))?
                {
                    if let Some(kv) = answer.take_kv() {
                        leadership.observed(Some(String::from_utf8_lossy(kv.value()).into_owned()));
                    }
                }
                Ok::<(), StoreError>(())
            };
            tokio::select! {
                r = round => if let Err(e) = r {
                    tracing::debug!(error = %kite_protocol::errors::error_chain(&e), "observing the election");
                },
                _ = stop.wait_for(|s| *s) => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Campaigns until this coordinator leads; the lease is kept alive from the start (a
    /// campaign waits while another leads), and by a task of its own once leading.
    pub async fn campaign(&self, leadership: &Arc<Leadership>) -> Result<Term, StoreError> {
        let mut client = self.options.connect().await?;
        let ttl = self.ttl_secs;
        // The lease runs from no earlier than this (etcd starts it when the grant arrives).
        let since = Instant::now();
        let lease = client
            .lease_grant(ttl, None)
            .await
            .map_err(self.error("grant the leadership lease"))?
            .id();
        let (lost_tx, lost) = watch::channel(false);
        let keeper = Keeper::start(
            self.options.clone(),
            lease,
            ttl,
            since,
            leadership.clone(),
            lost_tx,
        );
        let campaign = client.campaign(self.name.clone(), leadership.me.clone(), lease);
        let mut lost_while_waiting = lost.clone();
        let won = tokio::select! {
            won = campaign => won,
            _ = lost_while_waiting.wait_for(|l| *l) => {
                return Err(self.error("campaign")(etcd_client::Error::LeaseKeepAliveError(
                    "the lease was lost while waiting".into(),
                )));
            }
        };
        let won = match won {
            Ok(w) => w,
            Err(e) => {
                drop(keeper);
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(lease)).await;
                return Err(self.error("campaign")(e));
            }
        };
        let key = won.leader().cloned().ok_or_else(|| {
            self.error("campaign")(etcd_client::Error::ElectError(
                "no leader key in the answer".into(),
            ))
        })?;
        let number = u64::try_from(key.rev()).unwrap_or(0);
        Ok(Term {
            number,
            fence: Fence {
                key: key.key().to_vec(),
                revision: key.rev(),
            },
            lost,
            lease,
            client,
            _keeper: keeper,
        })
    }
}

/// Renews the lease every third of its TTL and moves the leadership's deadline; turns `lost`
/// true when a renewal comes back expired, or none comes back before the deadline. A renewal
/// that takes longer than a third of the TTL, or a broken keep-alive stream (the etcd member it
/// used died or hangs), opens the stream again, through another member, while there is time.
async fn keep_alive(
    options: EtcdOptions,
    lease: i64,
    ttl: i64,
    since: Instant,
    leadership: Arc<Leadership>,
    lost: &watch::Sender<bool>,
) {
    let ttl_d = Duration::from_secs(u64::try_from(ttl).unwrap_or(10));
    // Stop acting a little before etcd would let the lease go (clocks and scheduling).
    let margin = (ttl_d / 10).max(Duration::from_millis(500));
    let mut deadline = since + ttl_d - margin;
    leadership.set_deadline(deadline);
    let give_up = |why: String| {
        tracing::warn!(lease, reason = %why, "leadership lease lost");
        let _ = lost.send(true);
    };
    let mut client = None;
    let mut stream = None;
    loop {
        if Instant::now() >= deadline {
            return give_up("no renewal before the lease's deadline".into());
        }
        if stream.is_none() {
            let opened = tokio::time::timeout_at(deadline.into(), async {
                if client.is_none() {
                    client = Some(options.connect().await.map_err(|e| e.to_string())?);
                }
                let c = client.as_mut().expect("connected");
                c.lease_keep_alive(lease).await.map_err(|e| e.to_string())
            })
            .await;
            match opened {
                Ok(Ok(s)) => stream = Some(s),
                Ok(Err(e)) => {
                    tracing::debug!(lease, error = %e, "open the lease's keep-alive stream");
                    client = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(_) => return give_up("no keep-alive stream before the deadline".into()),
            }
        }
        let Some((keeper, answers)) = stream.as_mut() else {
            continue;
        };
        let sent = Instant::now();
        let patience = (sent + ttl_d / 3).min(deadline);
        let renewed = tokio::time::timeout_at(patience.into(), async {
            keeper.keep_alive().await?;
            answers.message().await
        })
        .await;
        match renewed {
            Ok(Ok(Some(answer))) if answer.ttl() > 0 => {
                let granted = Duration::from_secs(u64::try_from(answer.ttl()).unwrap_or(0));
                deadline = sent + granted.saturating_sub(margin);
                leadership.set_deadline(deadline);
            }
            Ok(Ok(Some(_))) => return give_up("the lease expired".into()),
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                // The member behind the stream went away or hangs: another one, soon.
                stream = None;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        tokio::time::sleep(ttl_d / 3).await;
        // A process paused past its deadline wakes here: it has lost, whatever etcd says.
        if Instant::now() >= deadline {
            return give_up("woke after the lease's deadline (the process was paused?)".into());
        }
    }
}
