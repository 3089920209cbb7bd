//! The etcd store (`[coordinator] store = "etcd"`): the same keys under a prefix in etcd, every
//! change one etcd transaction whose comparisons are the [`Guard`]s (a key's `mod_revision`
//! equal to the one read, or its `create_revision` 0 for "absent") — the optimistic
//! concurrency Kubernetes' API server uses on etcd.
//!
//! **Fencing.** While a coordinator leads, its writes also compare the leader key it won the
//! election with (its `create_revision`): once the key is gone (the lease expired while the
//! process was paused or cut off, or another coordinator won since), every write fails with
//! [`StoreError::NotLeader`] and nothing is written, whatever the old leader still believes.
//!
//! The [`Store`] trait is synchronous (the coordinator calls it from blocking threads, holding
//! its cache's lock); the etcd client is async, so the store keeps a small runtime of its own
//! and waits for each call's answer, with a deadline: with no quorum, etcd does not answer.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, TlsOptions,
    Txn as EtcdTxn, TxnOp,
};

use super::{Commit, Guard, Kv, Store, StoreError, Txn};

/// Where etcd is and how to reach it.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// `host:port` or `http(s)://host:port` of each member.
    pub endpoints: Vec<String>,
    /// Prepended to every key (`/kite` by default): several clusters may share one etcd.
    pub prefix: String,
    /// TLS: the CA that signed the members' certificates, and this client's certificate.
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// How long one call may take before it fails (etcd without a quorum never answers).
    pub request_timeout: Duration,
}

impl EtcdOptions {
    pub fn endpoints_text(&self) -> String {
        self.endpoints.join(",")
    }

    pub(crate) fn error(
        &self,
        op: impl Into<String>,
    ) -> impl FnOnce(etcd_client::Error) -> StoreError {
        let endpoints = self.endpoints_text();
        let op = op.into();
        move |source| StoreError::Etcd {
            endpoints,
            op,
            source,
        }
    }

    /// A client on the current runtime. Requests carry no deadline of their own (an election
    /// campaign waits as long as another leads); callers bound what must be bounded.
    pub async fn connect(&self) -> Result<Client, StoreError> {
        let read = |path: &PathBuf| {
            std::fs::read_to_string(path).map_err(|e| StoreError::Etcd {
                endpoints: self.endpoints_text(),
                op: format!("read {}", path.display()),
                source: etcd_client::Error::IoError(e),
            })
        };
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            // etcd refuses pings more often than every 5 s (--grpc-keepalive-min-time) by
            // closing the connection: a campaign waiting on it would break.
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true)
            // A member cut off from the others says so at once instead of waiting.
            .with_require_leader(true);
        if self.ca_file.is_some() || self.cert_file.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            match (&self.cert_file, &self.key_file) {
                (Some(c), Some(k)) => tls = tls.identity(Identity::from_pem(read(c)?, read(k)?)),
                (None, None) => {}
                _ => {
                    return Err(StoreError::Etcd {
                        endpoints: self.endpoints_text(),
                        op: "TLS options".into(),
                        source: etcd_client::Error::InvalidArgs(
                            "cert_file and key_file go together".into(),
                        ),
                    })
                }
            }
            options = options.with_tls(tls);
        }
        Client::connect(&self.endpoints, Some(options))
            .await
            .map_err(self.error("connect"))
    }

    /// The full etcd key of a store key.
    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

/// The leadership a write must still hold: the election's leader key and the revision it was
/// created at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub key: Vec<u8>,
    pub revision: i64,
}

pub struct EtcdStore {
    options: EtcdOptions,
    /// `Option` only so that `Drop` can take it: a runtime may not be dropped (blocking) from
    /// an async context, `shutdown_background` may.
    runtime: Option<tokio::runtime::Runtime>,
    client: Client,
    fence: Mutex<Option<Fence>>,
}

fn to_u64(rev: i64) -> u64 {
    u64::try_from(rev).unwrap_or(0)
}

fn to_i64(rev: u64) -> i64 {
    i64::try_from(rev).unwrap_or(i64::MAX)
}

/// The first key after every key that starts with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// How soon a call that reached no working member is made again.
const RETRY: Duration = Duration::from_millis(200);

/// Which failed calls are made again.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Reads: any failure to reach a working member.
    Reads,
    /// Writes: only failures where the request surely reached no member that could apply it
    /// (no connection, or a member without a leader, which refuses before proposing). A write
    /// whose answer was lost may have been applied: that is the caller's to find out.
    Unsent,
}

/// Whether a call failed without reaching a member that has a leader.
fn unavailable(e: &etcd_client::Error, retry: Retry) -> bool {
    let unsent = |message: &str| message.contains("connect error") || message.contains("no leader");
    match (e, retry) {
        (etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_), Retry::Reads) => {
            true
        }
        (etcd_client::Error::TransportError(t), Retry::Unsent) => unsent(&t.to_string()),
        (etcd_client::Error::GRpcStatus(s), Retry::Reads) => {
            s.code() == tonic::Code::Unavailable || s.message().contains("no leader")
        }
        (etcd_client::Error::GRpcStatus(s), Retry::Unsent) => unsent(s.message()),
        _ => false,
    }
}

/// Keys per page when listing (a page is one response, within [`MAX_ANSWER`] even when every
/// key is an app's record: its manifest and its revisions' templates, tens of KiB).
const PAGE: i64 = 500;

/// The largest answer taken from etcd (the client's default is 4 MiB).
const MAX_ANSWER: usize = 64 << 20;

impl EtcdStore {
    /// Connects (on the store's own runtime) and checks that etcd answers.
    pub fn connect(options: EtcdOptions) -> Result<EtcdStore, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-store")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Etcd {
                endpoints: options.endpoints_text(),
                op: "start the store's runtime".into(),
                source: etcd_client::Error::IoError(e),
            })?;
        let client = {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let o = options.clone();
            runtime.spawn(async move {
                let _ = tx.send(o.connect().await);
            });
            rx.recv().map_err(|_| StoreError::Unavailable {
                endpoints: options.endpoints_text(),
                op: "connect".into(),
                secs: 0,
                reason: "the store's runtime stopped".into(),
            })??
        };
        let store = EtcdStore {
            options,
            runtime: Some(runtime),
            client,
            fence: Mutex::new(None),
        };
        store.revision()?;
        Ok(store)
    }

    fn kv(&self) -> etcd_client::KvClient {
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_ANSWER)
    }

    pub fn options(&self) -> &EtcdOptions {
        &self.options
    }

    /// From now on every write also requires `fence` (the leader key) to be unchanged; `None`
    /// when this coordinator stops leading.
    pub fn set_fence(&self, fence: Option<Fence>) {
        *self.fence.lock().expect("fence lock") = fence;
    }

    /// Runs the call `f` makes on the store's runtime and waits for it, for at most the
    /// request timeout. A call that did not reach a member with a leader (a member down, one
    /// cut off from the others) is made again until the timeout: such a call changed nothing,
    /// and another member may answer (a transaction is guarded besides).
    fn run<T, F, Fut>(&self, op: &str, retry: Retry, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send,
    {
        let timeout = self.options.request_timeout;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.runtime
            .as_ref()
            .expect("the runtime lives as long as the store")
            .spawn(async move {
                let deadline = tokio::time::Instant::now() + timeout;
                let mut last = None;
                let answer = loop {
                    match tokio::time::timeout_at(deadline, f()).await {
                        Ok(Err(e)) if unavailable(&e, retry) => {
                            last = Some(e.to_string());
                            if tokio::time::Instant::now() + RETRY >= deadline {
                                break Err(last);
                            }
                            tokio::time::sleep(RETRY).await;
                        }
                        Ok(answer) => break Ok(answer),
                        Err(_) => break Err(last),
                    }
                };
                let _ = tx.send(answer);
            });
        match rx.recv() {
            Ok(Ok(answer)) => answer.map_err(self.options.error(op)),
            Ok(Err(reason)) => Err(StoreError::Unavailable {
                endpoints: self.options.endpoints_text(),
                op: op.to_string(),
                secs: timeout.as_secs(),
                reason: reason.unwrap_or_else(|| "no answer".into()),
            }),
            Err(_) => Err(StoreError::Unavailable {
                endpoints: self.options.endpoints_text(),
                op: op.to_string(),
                secs: timeout.as_secs(),
                reason: "the store's runtime stopped".into(),
            }),
        }
    }

    fn get_full(
        &self,
        op: &str,
        key: Vec<u8>,
    ) -> Result<Option<etcd_client::KeyValue>, StoreError> {
        let client = self.kv();
        let mut answer = self.run(op, Retry::Reads, move || {
            let (mut kv, key) = (client.clone(), key.clone());
            async move { kv.get(key, None).await }
        })?;
        Ok(answer.take_kvs().into_iter().next())
    }

    /// Why a transaction failed: the leadership it carried is gone, or the first guard whose
    /// key moved on.
    fn why_not(&self, guards: &[Guard], fence: Option<&Fence>) -> Result<Commit, StoreError> {
        if let Some(f) = fence {
            let held = self
                .get_full("read the leader key", f.key.clone())?
                .is_some_and(|kv| kv.create_revision() == f.revision);
            if !held {
                return Err(StoreError::NotLeader {
                    key: String::from_utf8_lossy(&f.key).into_owned(),
                });
            }
        }
        for g in guards {
            let (key, want) = match g {
                Guard::Absent(k) => (k, 0),
                Guard::Revision(k, r) => (k, *r),
            };
            let now = self
                .get_full("read a guarded key", self.options.full(key).into_bytes())?
                .map(|kv| to_u64(kv.mod_revision()))
                .unwrap_or(0);
            if now != want {
                return Ok(Commit::Conflict {
                    key: key.clone(),
                    revision: now,
                });
            }
        }
        // The key that moved has moved back (deleted and created again) since: still a
        // conflict, on the first key.
        let key = guards
            .first()
            .map(|g| match g {
                Guard::Absent(k) | Guard::Revision(k, _) => k.clone(),
            })
            .unwrap_or_default();
        Ok(Commit::Conflict { key, revision: 0 })
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Store for EtcdStore {
    fn get(&self, key: &str) -> Result<Option<Kv>, StoreError> {
        Ok(self
            .get_full(&format!("get {key}"), self.options.full(key).into_bytes())?
            .map(|kv| Kv {
                key: key.to_string(),
                value: kv.value().to_vec(),
                mod_revision: to_u64(kv.mod_revision()),
            }))
    }

    fn list(&self, prefix: &str) -> Result<Vec<Kv>, StoreError> {
        let full = self.options.full(prefix).into_bytes();
        let end = prefix_end(&full);
        let strip = self.options.prefix.len();
        let mut out = Vec::new();
        let mut from = full.clone();
        // Every page at the revision of the first: one consistent picture.
        let mut at = 0;
        loop {
            let client = self.kv();
            let options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(PAGE)
                .with_revision(at);
            let start = from.clone();
            let mut answer = self.run(&format!("list {prefix}"), Retry::Reads, move || {
                let (mut kv, start, options) = (client.clone(), start.clone(), options.clone());
                async move { kv.get(start, Some(options)).await }
            })?;
            if at == 0 {
                at = answer.header().map(|h| h.revision()).unwrap_or(0);
            }
            let more = answer.more();
            let kvs = answer.take_kvs();
            for kv in &kvs {
                let key = String::from_utf8_lossy(kv.key());
                out.push(Kv {
                    key: key.get(strip..).unwrap_or_default().to_string(),
                    value: kv.value().to_vec(),
                    mod_revision: to_u64(kv.mod_revision()),
                });
            }
            match kvs.last() {
                Some(last) if more => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    fn commit(&self, txn: Txn) -> Result<Commit, StoreError> {
        let fence = self.fence.lock().expect("fence lock").clone();
        let mut compares = Vec::with_capacity(txn.guards.len() + 1);
        for g in &txn.guards {
            compares.push(match g {
                Guard::Absent(k) => {
                    Compare::create_revision(self.options.full(k), CompareOp::Equal, 0)
                }
                Guard::Revision(k, r) => {
                    Compare::mod_revision(self.options.full(k), CompareOp::Equal, to_i64(*r))
                }
            });
        }
        if let Some(f) = &fence {
            compares.push(Compare::create_revision(
                f.key.clone(),
                CompareOp::Equal,
                f.revision,
            ));
        }
        let mut ops = Vec::with_capacity(txn.puts.len() + txn.deletes.len());
        for (k, v) in &txn.puts {
            ops.push(TxnOp::put(self.options.full(k), v.clone(), None));
        }
        for k in &txn.deletes {
            ops.push(TxnOp::delete(self.options.full(k), None));
        }
        let request = EtcdTxn::new().when(compares).and_then(ops);
        let client = self.kv();
        let answer = self.run("commit", Retry::Unsent, move || {
            let (mut kv, request) = (client.clone(), request.clone());
            async move { kv.txn(request).await }
        })?;
        if answer.succeeded() {
            let rev = answer.header().map(|h| h.revision()).unwrap_or(0);
            return Ok(Commit::Done(to_u64(rev)));
        }
        self.why_not(&txn.guards, fence.as_ref())
    }

    fn revision(&self) -> Result<u64, StoreError> {
        let client = self.kv();
        let key = self.options.full("/").into_bytes();
        let answer = self.run("read the revision", Retry::Reads, move || {
            let (mut kv, key) = (client.clone(), key.clone());
            async move { kv.get(key, Some(GetOptions::new().with_count_only())).await }
        })?;
        Ok(to_u64(answer.header().map(|h| h.revision()).unwrap_or(0)))
    }

    fn max_changes(&self) -> usize {
        // etcd's default --max-txn-ops is 128, and a change brings its comparison with it
        // (plus the fence).
        60
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_first_key_past_the_prefix() {
        assert_eq!(prefix_end(b"/kite/apps/"), b"/kite/apps0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
