//! The coordinator's state as a versioned key-value store, the model etcd has (and Kubernetes'
//! API server on it): every key carries the revision of its last change, the store a revision
//! that every committed change increments, and a change is a transaction that commits only if
//! the revisions it read are still current (no lost update when two writers race).
//!
//! [`EmbeddedStore`] keeps it in one redb file (the default, under
//! `/var/lib/kite/coordinator`); an etcd store implements the same [`Store`] for high
//! availability.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

/// key → (mod_revision, value)
const KV: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("kv");
/// "revision" → the store's revision
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {op}")]
    Db {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
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
}

/// The store in one redb file.
pub struct EmbeddedStore {
    path: PathBuf,
    db: Database,
}

impl EmbeddedStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        let db = Database::create(path).map_err(db_err(path, "open"))?;
        let store = EmbeddedStore {
            path: path.to_path_buf(),
            db,
        };
        // The tables exist from the start, so readers never find them missing.
        let w = store.db.begin_write().map_err(store.err("begin write"))?;
        w.open_table(KV).map_err(store.err("open table kv"))?;
        w.open_table(META).map_err(store.err("open table meta"))?;
        w.commit().map_err(store.err("commit"))?;
        Ok(store)
    }

    fn err<E: std::error::Error + Send + Sync + 'static>(
        &self,
        op: &'static str,
    ) -> impl FnOnce(E) -> StoreError + '_ {
        move |e| StoreError::Db {
            path: self.path.clone(),
            op,
            source: Box::new(e),
        }
    }
}

fn db_err<E: std::error::Error + Send + Sync + 'static>(
    path: &Path,
    op: &'static str,
) -> impl FnOnce(E) -> StoreError {
    let path = path.to_path_buf();
    move |e| StoreError::Db {
        path,
        op,
        source: Box::new(e),
    }
}

impl Store for EmbeddedStore {
    fn get(&self, key: &str) -> Result<Option<Kv>, StoreError> {
        let r = self.db.begin_read().map_err(self.err("begin read"))?;
        let t = r.open_table(KV).map_err(self.err("open table kv"))?;
        let found = t.get(key).map_err(self.err("get"))?;
        Ok(found.map(|v| {
            let (rev, value) = v.value();
            Kv {
                key: key.to_string(),
                value: value.to_vec(),
                mod_revision: rev,
            }
        }))
    }

    fn list(&self, prefix: &str) -> Result<Vec<Kv>, StoreError> {
        let r = self.db.begin_read().map_err(self.err("begin read"))?;
        let t = r.open_table(KV).map_err(self.err("open table kv"))?;
        let mut out = Vec::new();
        for item in t.range(prefix..).map_err(self.err("range"))? {
            let (k, v) = item.map_err(self.err("range"))?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            let (rev, value) = v.value();
            out.push(Kv {
                key: key.to_string(),
                value: value.to_vec(),
                mod_revision: rev,
            });
        }
        Ok(out)
    }

    fn commit(&self, txn: Txn) -> Result<Commit, StoreError> {
        // redb has one writer at a time: the guards are checked and the changes made inside
        // the same write transaction, so nothing can change in between.
        let w = self.db.begin_write().map_err(self.err("begin write"))?;
        let revision = {
            let mut kv = w.open_table(KV).map_err(self.err("open table kv"))?;
            let mut meta = w.open_table(META).map_err(self.err("open table meta"))?;
            for g in &txn.guards {
                let (key, want) = match g {
                    Guard::Absent(k) => (k, 0),
                    Guard::Revision(k, r) => (k, *r),
                };
                let now = kv
                    .get(key.as_str())
                    .map_err(self.err("get"))?
                    .map(|v| v.value().0)
                    .unwrap_or(0);
                if now != want {
                    return Ok(Commit::Conflict {
                        key: key.clone(),
                        revision: now,
                    });
                }
            }
            let revision = meta
                .get("revision")
                .map_err(self.err("get revision"))?
                .map(|v| v.value())
                .unwrap_or(0)
                + 1;
            for (k, v) in &txn.puts {
                kv.insert(k.as_str(), (revision, v.as_slice()))
                    .map_err(self.err("put"))?;
            }
            for k in &txn.deletes {
                kv.remove(k.as_str()).map_err(self.err("delete"))?;
            }
            meta.insert("revision", revision)
                .map_err(self.err("put revision"))?;
            revision
        };
        w.commit().map_err(self.err("commit"))?;
        Ok(Commit::Done(revision))
    }

    fn revision(&self) -> Result<u64, StoreError> {
        let r = self.db.begin_read().map_err(self.err("begin read"))?;
        let t = r.open_table(META).map_err(self.err("open table meta"))?;
        Ok(t.get("revision")
            .map_err(self.err("get revision"))?
            .map(|v| v.value())
            .unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_guard_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let s = EmbeddedStore::open(&path).unwrap();
        assert_eq!(s.revision().unwrap(), 0);
        let r1 = s
            .commit(
                Txn::default()
                    .guard(Guard::Absent("/apps/a".into()))
                    .put("/apps/a", b"1".to_vec()),
            )
            .unwrap();
        assert_eq!(r1, Commit::Done(1));
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
                revision: 1
            }
        );
        // Two writers read revision 1; the first wins, the second must read again.
        let read = s.get("/apps/a").unwrap().unwrap();
        let first = Txn::default()
            .guard(Guard::Revision("/apps/a".into(), read.mod_revision))
            .put("/apps/a", b"2".to_vec());
        let second = Txn::default()
            .guard(Guard::Revision("/apps/a".into(), read.mod_revision))
            .put("/apps/a", b"3".to_vec());
        assert_eq!(s.commit(first).unwrap(), Commit::Done(2));
        assert!(matches!(
            s.commit(second).unwrap(),
            Commit::Conflict { revision: 2, .. }
        ));
        assert_eq!(s.get("/apps/a").unwrap().unwrap().value, b"2");
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
        // It survives a reopen, revision included.
        let rev = s.revision().unwrap();
        drop(s);
        let s = EmbeddedStore::open(&path).unwrap();
        assert_eq!(s.revision().unwrap(), rev);
        assert_eq!(s.list("/").unwrap().len(), 2);
    }
}
