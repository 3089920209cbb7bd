//! The coordinator's state as a versioned key-value store, the model etcd has (and Kubernetes'
//! API server on it): every key carries the revision of its last change, the store a revision
//! that every committed change increments, and a change is a transaction that commits only if
//! the revisions it read are still current (no lost update when two writers race).
//!
//! [`EmbeddedStore`] keeps it in one redb file (the default, under
//! `/var/lib/kite/coordinator`); an etcd store implements the same [`Store`] for high
//! availability.

use std::path::PathBuf;

mod embedded;
mod etcd;

pub use embedded::EmbeddedStore;
pub use etcd::{EtcdOptions, EtcdStore, Fence};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {op}")]
    Db {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("etcd at {endpoints}: {op}")]
    Etcd {
        endpoints: String,
        op: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd at {endpoints}: {op}: no member with a leader answered within {secs} s (is a quorum of its members up?): {reason}")]
    Unavailable {
        endpoints: String,
        op: String,
        secs: u64,
        reason: String,
    },
    /// The write carried this coordinator's leadership, and the leadership is gone: another
    /// coordinator may lead now, so nothing was written.
    #[error("this coordinator no longer leads (its leader key {key} is gone from etcd); nothing was written")]
    NotLeader { key: String },
}

/// A key's value and the revision of its last change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: u64,
}

/// What a transaction requires of a key to commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Guard {
    /// The key does not exist.
    Absent(String),
    /// The key was last changed at this revision (the one that was read).
    Revision(String, u64),
}

/// A change: guards, then puts and deletes, all or nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub guards: Vec<Guard>,
    pub puts: Vec<(String, Vec<u8>)>,
    pub deletes: Vec<String>,
}

impl Txn {
    pub fn guard(mut self, g: Guard) -> Txn {
        self.guards.push(g);
        self
    }

    pub fn put(mut self, key: impl Into<String>, value: Vec<u8>) -> Txn {
        self.puts.push((key.into(), value));
        self
    }

    pub fn delete(mut self, key: impl Into<String>) -> Txn {
        self.deletes.push(key.into());
        self
    }
}

/// A transaction's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Commit {
    /// Committed: the store's new revision.
    Done(u64),
    /// A guard failed (the key, and its revision now: 0 when absent); nothing changed.
    Conflict { key: String, revision: u64 },
}

/// The coordinator's state store.
pub trait Store: Send + Sync {
    fn get(&self, key: &str) -> Result<Option<Kv>, StoreError>;
    /// Every key under `prefix`, in key order.
    fn list(&self, prefix: &str) -> Result<Vec<Kv>, StoreError>;
    fn commit(&self, txn: Txn) -> Result<Commit, StoreError>;
    /// The revision of the last committed change (0 for an empty store).
    fn revision(&self) -> Result<u64, StoreError>;
    /// The most changes one transaction may carry (etcd refuses more than `--max-txn-ops`,
    /// 128 by default, comparisons included); larger independent changes are split.
    fn max_changes(&self) -> usize {
        usize::MAX
    }
}

/// The behaviour every [`Store`] must have, run by the embedded store's unit test and by the
/// etcd store's test against a real etcd: revisions guard every change, created-twice loses,
/// two writers that read the same revision cannot both win, lists are in key order.
pub fn check_conformance(s: &dyn Store) {
    let base = s.revision().unwrap();
    let r1 = s
        .commit(
            Txn::default()
                .guard(Guard::Absent("/apps/a".into()))
                .put("/apps/a", b"1".to_vec()),
        )
        .unwrap();
    let Commit::Done(r1) = r1 else {
        panic!("first create: {r1:?}")
    };
    assert!(r1 > base);
    assert_eq!(s.revision().unwrap(), r1);
    // Created twice: the second loses.
    let again = s
        .commit(
            Txn::default()
                .guard(Guard::Absent("/apps/a".into()))
                .put("/apps/a", b"x".to_vec()),
        )
        .unwrap();
    assert_eq!(
        again,
        Commit::Conflict {
            key: "/apps/a".into(),
            revision: r1
        }
    );
    // Two writers read the same revision; the first wins, the second must read again.
    let read = s.get("/apps/a").unwrap().unwrap();
    assert_eq!(read.mod_revision, r1);
    let first = Txn::default()
        .guard(Guard::Revision("/apps/a".into(), read.mod_revision))
        .put("/apps/a", b"2".to_vec());
    let second = Txn::default()
        .guard(Guard::Revision("/apps/a".into(), read.mod_revision))
        .put("/apps/a", b"3".to_vec());
    let Commit::Done(r2) = s.commit(first).unwrap() else {
        panic!("first writer lost")
    };
    assert_eq!(
        s.commit(second).unwrap(),
        Commit::Conflict {
            key: "/apps/a".into(),
            revision: r2
        }
    );
    assert_eq!(s.get("/apps/a").unwrap().unwrap().value, b"2");
    // A failed guard among several changes nothing.
    assert!(matches!(
        s.commit(
            Txn::default()
                .guard(Guard::Absent("/apps/c".into()))
                .guard(Guard::Revision("/apps/a".into(), r1))
                .put("/apps/c", b"c".to_vec())
        )
        .unwrap(),
        Commit::Conflict { .. }
    ));
    assert_eq!(s.get("/apps/c").unwrap(), None);
    s.commit(
        Txn::default()
            .put("/apps/b", b"b".to_vec())
            .put("/nodes/n1", b"n".to_vec()),
    )
    .unwrap();
    let apps: Vec<String> = s
        .list("/apps/")
        .unwrap()
        .into_iter()
        .map(|k| k.key)
        .collect();
    assert_eq!(apps, ["/apps/a", "/apps/b"]);
    s.commit(Txn::default().delete("/apps/a")).unwrap();
    assert_eq!(s.get("/apps/a").unwrap(), None);
    assert_eq!(s.list("/").unwrap().len(), 2);
}
