//! The embedded store: one redb file.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Commit, Guard, Kv, Store, StoreError, Txn};

/// key → (mod_revision, value)
const KV: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("kv");
/// "revision" → the store's revision
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

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
    fn revisions_guard_every_change_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let s = EmbeddedStore::open(&path).unwrap();
        assert_eq!(s.revision().unwrap(), 0);
        crate::store::check_conformance(&s);
        let rev = s.revision().unwrap();
        drop(s);
        let s = EmbeddedStore::open(&path).unwrap();
        assert_eq!(s.revision().unwrap(), rev);
        assert_eq!(s.list("/").unwrap().len(), 2);
    }
}
