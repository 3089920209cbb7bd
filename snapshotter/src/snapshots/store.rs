//! Snapshot metadata: what containerd knows a snapshot by (its key or committed name, kind,
//! parent, labels, times) and where its files are (`snapshots/<id>/`).
//!
//! One JSON document, rewritten atomically (write, fsync, rename) on every change, so a
//! snapshotter restart finds exactly the snapshots containerd was told about. The set is small
//! (a node's layers and containers), and every change is one containerd call that already waits
//! on disk work, so a document is simpler than a database and not slower where it matters.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    View,
    Active,
    Committed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Names the snapshot's directory; never reused.
    pub id: u64,
    pub kind: Kind,
    /// The committed snapshot this one stands on ("" for none).
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
    /// Bytes and inodes of the snapshot's own layer, measured when it was committed.
    pub size: i64,
    pub inodes: i64,
    /// For a lazily pulled layer: where its data comes from (it is re-mounted at start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<crate::lazy::layer::LayerSource>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Document {
    next_id: u64,
    snapshots: BTreeMap<String, Snapshot>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("snapshot metadata {path}: {op}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("snapshot metadata {path}: corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

pub struct Store {
    path: PathBuf,
    doc: Document,
}

impl Store {
    /// Opens the metadata at `path`, or starts empty when there is none yet.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let doc = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Document::default(),
            Err(source) => {
                return Err(StoreError::Io {
                    path: path.to_path_buf(),
                    op: "read",
                    source,
                })
            }
        };
        Ok(Store {
            path: path.to_path_buf(),
            doc,
        })
    }

    fn save(&self) -> Result<(), StoreError> {
        let io = |op, source| StoreError::Io {
            path: self.path.clone(),
            op,
            source,
        };
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(&self.doc).expect("snapshot metadata serializes");
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("create", e))?;
        f.write_all(&bytes).map_err(|e| io("write", e))?;
        f.sync_all().map_err(|e| io("sync", e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| io("rename", e))
    }

    pub fn get(&self, key: &str) -> Option<&Snapshot> {
        self.doc.snapshots.get(key)
    }

    pub fn all(&self) -> impl Iterator<Item = (&String, &Snapshot)> {
        self.doc.snapshots.iter()
    }

    pub fn has_children(&self, key: &str) -> bool {
        self.doc.snapshots.values().any(|s| s.parent == key)
    }

    /// The parent chain of `key`'s parent, nearest first: (key, snapshot) pairs.
    pub fn ancestors(&self, parent: &str) -> Vec<(&String, &Snapshot)> {
        let mut chain = Vec::new();
        let mut next = parent;
        while let Some((k, s)) = self.doc.snapshots.get_key_value(next) {
            chain.push((k, s));
            next = &s.parent;
            if chain.len() > 10_000 {
                break; // a cycle cannot be made through the API; never loop on a corrupt file
            }
        }
        chain
    }

    /// Adds a new snapshot and saves; returns it.
    pub fn insert(
        &mut self,
        key: &str,
        kind: Kind,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Snapshot, StoreError> {
        self.doc.next_id += 1;
        let now = SystemTime::now();
        let s = Snapshot {
            id: self.doc.next_id,
            kind,
            parent: parent.to_string(),
            labels,
            created: now,
            updated: now,
            size: 0,
            inodes: 0,
            remote: None,
        };
        self.doc.snapshots.insert(key.to_string(), s.clone());
        if let Err(e) = self.save() {
            self.doc.snapshots.remove(key);
            return Err(e);
        }
        Ok(s)
    }

    /// Replaces `key`'s record with `s` under `new_key` (the same key for an update), and saves.
    pub fn replace(&mut self, key: &str, new_key: &str, s: Snapshot) -> Result<(), StoreError> {
        let old = self.doc.snapshots.remove(key);
        self.doc.snapshots.insert(new_key.to_string(), s);
        if let Err(e) = self.save() {
            self.doc.snapshots.remove(new_key);
            if let Some(old) = old {
                self.doc.snapshots.insert(key.to_string(), old);
            }
            return Err(e);
        }
        Ok(())
    }

    pub fn remove(&mut self, key: &str) -> Result<Option<Snapshot>, StoreError> {
        let old = self.doc.snapshots.remove(key);
        if let Err(e) = self.save() {
            if let Some(old) = old {
                self.doc.snapshots.insert(key.to_string(), old);
            }
            return Err(e);
        }
        Ok(old)
    }

    /// The ids of every snapshot, for clean-up of directories nothing names.
    pub fn ids(&self) -> std::collections::BTreeSet<u64> {
        self.doc.snapshots.values().map(|s| s.id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_survive_a_reopen_and_chains_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.json");
        let mut s = Store::open(&path).unwrap();
        let a = s.insert("a", Kind::Committed, "", BTreeMap::new()).unwrap();
        let b = s
            .insert("b", Kind::Committed, "a", BTreeMap::new())
            .unwrap();
        s.insert("c", Kind::Active, "b", BTreeMap::new()).unwrap();
        assert!(a.id < b.id);
        let s = Store::open(&path).unwrap();
        let chain: Vec<&str> = s.ancestors("b").iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(chain, ["b", "a"]);
        assert!(s.has_children("a") && s.has_children("b") && !s.has_children("c"));
        assert_eq!(s.ids().len(), 3);
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.json");
        std::fs::write(&path, b"{not json").unwrap();
        let e = Store::open(&path).err().unwrap().to_string();
        assert!(e.contains("metadata.json") && e.contains("corrupt"), "{e}");
    }
}
