//! The on-disk chunk cache: verified chunk data by content digest, bounded in size, least
//! recently used chunks evicted first, kept across restarts.
//!
//! A chunk lives at `<dir>/<first two hex digits>/<64 hex digits>`, written to a temporary
//! name and renamed, so a crash leaves either the whole chunk or nothing. Data is verified
//! against its digest before it is put; after a restart each chunk is verified again the
//! first time it is read (a file damaged on disk is dropped and fetched anew, never served).
//! Recency survives restarts through the files' modification times.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use tracing::{debug, warn};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("chunk cache: digest {0:?} is not sha256:<64 lowercase hex>")]
    BadDigest(String),
    #[error("chunk cache: {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

struct Entry {
    size: u64,
    tick: u64,
    verified: bool,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// tick → digest hex: the eviction order.
    order: BTreeMap<u64, String>,
    total: u64,
    tick: u64,
    hits: u64,
    misses: u64,
    evicted: u64,
}

impl State {
    fn touch(&mut self, hex: &str) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.entries.get_mut(hex) {
            self.order.remove(&e.tick);
            e.tick = tick;
            self.order.insert(tick, hex.to_string());
        }
    }

    fn forget(&mut self, hex: &str) -> Option<Entry> {
        let e = self.entries.remove(hex)?;
        self.order.remove(&e.tick);
        self.total -= e.size;
        Some(e)
    }
}

/// Counters for the metrics endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    pub bytes: u64,
    pub chunks: u64,
    pub hits: u64,
    pub misses: u64,
    pub evicted: u64,
}

pub struct ChunkCache {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
}

/// The hex part of a `sha256:` digest, refusing anything else (it becomes a file name).
pub fn digest_hex(digest: &str) -> Result<&str, CacheError> {
    kite_estargz::digest_hex(digest).ok_or_else(|| CacheError::BadDigest(digest.into()))
}

impl ChunkCache {
    /// Opens the cache in `dir` (created if missing), indexing the chunks already there.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<ChunkCache, CacheError> {
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| CacheError::Io { op, path, source }
        };
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let mut found = Vec::new();
        for sub in std::fs::read_dir(dir).map_err(io("read", dir))?.flatten() {
            if !sub.path().is_dir() {
                continue;
            }
            for f in std::fs::read_dir(sub.path())
                .map_err(io("read", &sub.path()))?
                .flatten()
            {
                let name = f.file_name().to_string_lossy().into_owned();
                let Ok(md) = f.metadata() else { continue };
                if digest_hex(&format!("sha256:{name}")).is_err() {
                    // A temporary file a crash left behind.
                    let _ = std::fs::remove_file(f.path());
                    continue;
                }
                let mtime = md.modified().unwrap_or(std::time::UNIX_EPOCH);
                found.push((mtime, name, md.len()));
            }
        }
        found.sort();
        let mut state = State::default();
        for (_, hex, size) in found {
            state.tick += 1;
            state.total += size;
            state.order.insert(state.tick, hex.clone());
            state.entries.insert(
                hex,
                Entry {
                    size,
                    tick: state.tick,
                    verified: false,
                },
            );
        }
        debug!(dir = %dir.display(), chunks = state.entries.len(), bytes = state.total,
               "chunk cache opened");
        let cache = ChunkCache {
            dir: dir.to_path_buf(),
            max_bytes,
            state: Mutex::new(state),
        };
        cache.evict(None);
        Ok(cache)
    }

    fn path(&self, hex: &str) -> PathBuf {
        self.dir.join(&hex[..2]).join(hex)
    }

    /// Whether the chunk is cached (without verifying or touching it).
    pub fn contains(&self, digest: &str) -> bool {
        digest_hex(digest)
            .map(|hex| {
                self.state
                    .lock()
                    .expect("cache lock")
                    .entries
                    .contains_key(hex)
            })
            .unwrap_or(false)
    }

    /// The cached chunk's file, opened for reading, or None. A chunk not yet verified since
    /// this process started is hashed first; one that fails is removed.
    pub fn open_chunk(&self, digest: &str) -> Option<File> {
        let hex = digest_hex(digest).ok()?;
        let verified = {
            let mut st = self.state.lock().expect("cache lock");
            let Some(e) = st.entries.get(hex) else {
                st.misses += 1;
                return None;
            };
            let v = e.verified;
            st.hits += 1;
            st.touch(hex);
            v
        };
        let path = self.path(hex);
        if !verified {
            let ok = std::fs::read(&path)
                .map(|data| format!("{:x}", Sha256::digest(&data)) == hex)
                .unwrap_or(false);
            let mut st = self.state.lock().expect("cache lock");
            if !ok {
                warn!(path = %path.display(), "cached chunk is damaged; dropping it");
                st.forget(hex);
                st.hits -= 1;
                st.misses += 1;
                drop(st);
                let _ = std::fs::remove_file(&path);
                return None;
            }
            if let Some(e) = st.entries.get_mut(hex) {
                e.verified = true;
            }
            drop(st);
            // The modification time carries recency across restarts.
            if let Ok(f) = File::options().append(true).open(&path) {
                let _ = f.set_modified(std::time::SystemTime::now());
            }
        }
        match File::open(&path) {
            Ok(f) => Some(f),
            Err(_) => {
                // Evicted between the lookup and the open.
                self.state.lock().expect("cache lock").forget(hex);
                None
            }
        }
    }

    /// Stores verified chunk data under its digest, then evicts down to the bound.
    pub fn put(&self, digest: &str, data: &[u8]) -> Result<(), CacheError> {
        let hex = digest_hex(digest)?;
        if self.contains(digest) {
            return Ok(());
        }
        let path = self.path(hex);
        let dir = path.parent().expect("a chunk path has a parent");
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| CacheError::Io { op, path, source }
        };
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let tmp = dir.join(format!(
            ".{hex}.{}.{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let written = File::create(&tmp).and_then(|mut f| f.write_all(data));
        if let Err(source) = written.and_then(|_| std::fs::rename(&tmp, &path)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(CacheError::Io {
                op: "write",
                path,
                source,
            });
        }
        {
            let mut st = self.state.lock().expect("cache lock");
            st.tick += 1;
            let tick = st.tick;
            if let Some(old) = st.entries.insert(
                hex.to_string(),
                Entry {
                    size: data.len() as u64,
                    tick,
                    verified: true,
                },
            ) {
                st.order.remove(&old.tick);
                st.total -= old.size;
            }
            st.order.insert(tick, hex.to_string());
            st.total += data.len() as u64;
        }
        self.evict(Some(hex));
        Ok(())
    }

    /// Removes least recently used chunks until the cache fits its bound (`keep` stays).
    fn evict(&self, keep: Option<&str>) {
        loop {
            let victim = {
                let mut st = self.state.lock().expect("cache lock");
                if st.total <= self.max_bytes {
                    return;
                }
                let Some(hex) = st
                    .order
                    .values()
                    .find(|h| Some(h.as_str()) != keep)
                    .cloned()
                else {
                    return;
                };
                st.forget(&hex);
                st.evicted += 1;
                hex
            };
            let _ = std::fs::remove_file(self.path(&victim));
        }
    }

    pub fn stats(&self) -> CacheStats {
        let st = self.state.lock().expect("cache lock");
        CacheStats {
            bytes: st.total,
            chunks: st.entries.len() as u64,
            hits: st.hits,
            misses: st.misses,
            evicted: st.evicted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn digest(data: &[u8]) -> String {
        format!("sha256:{:x}", Sha256::digest(data))
    }

    fn read(cache: &ChunkCache, d: &str) -> Option<Vec<u8>> {
        let mut v = Vec::new();
        cache.open_chunk(d)?.read_to_end(&mut v).unwrap();
        Some(v)
    }

    #[test]
    fn put_get_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (vec![1u8; 1000], vec![2u8; 2000]);
        {
            let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
            c.put(&digest(&a), &a).unwrap();
            c.put(&digest(&b), &b).unwrap();
            assert_eq!(read(&c, &digest(&a)), Some(a.clone()));
            assert_eq!(c.stats().bytes, 3000);
        }
        let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(c.stats().chunks, 2);
        assert_eq!(read(&c, &digest(&b)), Some(b));
        assert_eq!(read(&c, &digest(&[9])), None);
    }

    #[test]
    fn least_recently_used_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(dir.path(), 2500).unwrap();
        let chunks: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 1000]).collect();
        c.put(&digest(&chunks[0]), &chunks[0]).unwrap();
        c.put(&digest(&chunks[1]), &chunks[1]).unwrap();
        // Reading 0 makes 1 the least recently used.
        assert!(read(&c, &digest(&chunks[0])).is_some());
        c.put(&digest(&chunks[2]), &chunks[2]).unwrap();
        assert!(c.contains(&digest(&chunks[0])));
        assert!(!c.contains(&digest(&chunks[1])));
        assert!(c.contains(&digest(&chunks[2])));
        assert_eq!(c.stats().evicted, 1);
        assert!(c.stats().bytes <= 2500);
    }

    #[test]
    fn a_damaged_chunk_is_dropped_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![7u8; 4096];
        let d = digest(&data);
        ChunkCache::open(dir.path(), 1 << 20)
            .unwrap()
            .put(&d, &data)
            .unwrap();
        let hex = digest_hex(&d).unwrap();
        std::fs::write(dir.path().join(&hex[..2]).join(hex), b"garbage").unwrap();
        let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(read(&c, &d), None);
        assert!(!c.contains(&d));
    }

    #[test]
    fn digests_that_are_not_file_names_are_refused() {
        for bad in ["sha256:../../etc", "md5:abc", "sha256:ABCD"] {
            assert!(digest_hex(bad).is_err(), "{bad}");
        }
    }
}
