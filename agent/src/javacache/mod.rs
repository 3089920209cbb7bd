//! The node's Java start-up cache: a Java app's class archive is recorded once per node (a
//! training run of the same container, off the pod's start path) and mapped by every later
//! start of the same app, from outside the JVM and with no change to the app or its image.
//!
//! - [`key`]: what makes two starts "the same app" for the JVM.
//! - [`jvmlog`]: what the JVM's own log says (version, whether it mapped the archive).
//! - [`training`]: the training run (a sandbox of its own, the JDK's recording flags, a
//!   graceful stop so the JVM writes the archive at exit).
//! - [`JavaCache`]: the archives on disk (published atomically, read-only, sha256-checked
//!   before every attach), their index (which survives agent restarts), the bound in bytes
//!   (least recently used out first), and what is remembered about keys that cannot be cached.
//!
//! See docs/java-cache.md.

pub mod jvmlog;
pub mod key;
pub mod training;

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use key::{app_key, AppKey};

/// The annotation by which a pod opts in (`"on"`; `"off"` or absent: no cache).
pub const ANNOTATION: &str = "kite.io/java-cache";

/// Where a container sees the cache's files.
pub const GUEST_ARCHIVE_DIR: &str = "/.kite/java/archive";
pub const GUEST_LOG_DIR: &str = "/.kite/java/log";
pub const GUEST_OUT_DIR: &str = "/.kite/java/out";
/// Log files of the JVMs a container runs (one per process).
pub const LOG_PREFIX: &str = "jvm-";

/// The `[agent.java_cache]` section.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JavaCacheConfig {
    /// Off: pods asking for the cache start without it.
    pub enabled: bool,
    /// The archives and their index.
    pub dir: PathBuf,
    /// The bound of the archives in bytes; the least recently used go first.
    pub max_bytes: u64,
    /// How long a training run keeps running once ready, so that what the app loads on its
    /// first requests is recorded too.
    pub warmup_secs: u64,
    /// A training container that is not ready within this many seconds is given up.
    pub ready_timeout_secs: u64,
    /// The grace period of the training run's stop: the JVM writes the archive at exit (the
    /// AOT cache takes seconds more than a plain stop; under TCG tens of seconds).
    pub dump_grace_secs: u64,
    /// A container given the JVM options whose JVM has not logged within this many seconds of
    /// its start is taken for one that runs no JVM reading them.
    pub observe_timeout_secs: u64,
}

impl Default for JavaCacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: "/var/lib/kite/java-cache".into(),
            max_bytes: 4 << 30,
            warmup_secs: 5,
            ready_timeout_secs: 600,
            dump_grace_secs: 300,
            observe_timeout_secs: 120,
        }
    }
}

/// How an archive is recorded and used, by JDK.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// JDK 13–23: dynamic AppCDS (`-XX:ArchiveClassesAtExit`, `-XX:SharedArchiveFile`).
    DynamicAppCds,
    /// JDK 24+: the AOT cache (JEP 483/514: `-XX:AOTCacheOutput`, `-XX:AOTCache`): classes
    /// loaded and linked ahead of time.
    AotCache,
}

impl Method {
    /// The method for a JDK feature release; None below 13 (no dynamic archive).
    pub fn for_feature(feature: u32) -> Option<Method> {
        match feature {
            24.. => Some(Method::AotCache),
            13..=23 => Some(Method::DynamicAppCds),
            _ => None,
        }
    }

    pub fn file_name(self) -> &'static str {
        match self {
            Method::DynamicAppCds => "app.jsa",
            Method::AotCache => "app.aot",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::DynamicAppCds => "dynamic AppCDS",
            Method::AotCache => "AOT cache",
        }
    }

    /// The log tags of this JDK's archive messages (`aot` is unknown to JDK 17 and stops it).
    fn log_tags(self) -> &'static str {
        match self {
            Method::DynamicAppCds => "cds=info,cds+dynamic=info",
            Method::AotCache => "aot=info,cds=info",
        }
    }

    /// The options of a training run: record at exit, into the output directory.
    pub fn record_options(self) -> String {
        let out = format!("{GUEST_OUT_DIR}/{}", self.file_name());
        let record = match self {
            Method::DynamicAppCds => format!("-XX:ArchiveClassesAtExit={out}"),
            Method::AotCache => format!("-XX:AOTCacheOutput={out}"),
        };
        format!(
            "{record} -Xlog:gc+init=info,{}:file={GUEST_OUT_DIR}/{LOG_PREFIX}%p.log",
            self.log_tags()
        )
    }

    /// The archive's path as the container sees it.
    pub fn guest_archive(self) -> String {
        format!("{GUEST_ARCHIVE_DIR}/{}", self.file_name())
    }

    /// The options of a start that maps the archive (and logs whether it did).
    pub fn use_options(self) -> String {
        let archive = self.guest_archive();
        let use_it = match self {
            Method::DynamicAppCds => format!("-XX:SharedArchiveFile={archive}"),
            Method::AotCache => format!("-XX:AOTCache={archive}"),
        };
        format!(
            "{use_it} -Xlog:gc+init=info,{},class+path=info:file={GUEST_LOG_DIR}/{LOG_PREFIX}%p.log",
            self.log_tags()
        )
    }
}

/// The options of a start without an archive: only the log that tells the JVM's version
/// (tags every JDK since 9 knows, so that no JVM refuses them).
pub fn observe_options() -> String {
    format!("-Xlog:gc+init=info:file={GUEST_LOG_DIR}/{LOG_PREFIX}%p.log")
}

/// `JAVA_TOOL_OPTIONS` with kite's options first: the user's come after and win where they
/// set the same flag; nothing the user set is dropped.
pub fn merged_tool_options(ours: &str, env: &[(String, String)]) -> String {
    match env.iter().rev().find(|(k, _)| k == "JAVA_TOOL_OPTIONS") {
        Some((_, user)) if !user.trim().is_empty() => format!("{ours} {user}"),
        _ => ours.to_string(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JavaCacheError {
    #[error("java cache: {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("java cache: the archive of {key} is {bytes} bytes, more than the cache's bound ({max} bytes)")]
    TooLarge { key: String, bytes: u64, max: u64 },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JavaCacheError {
    let path = path.to_path_buf();
    move |source| JavaCacheError::Io { op, path, source }
}

/// A published archive.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Archive {
    pub method: Method,
    /// The JDK that recorded it (`25.0.2+10-LTS`).
    pub jdk: String,
    pub sha256: String,
    pub bytes: u64,
    pub created_ms: i64,
    pub last_used_ms: i64,
}

/// What the cache knows of one key.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Entry {
    /// The app, for people: `namespace/pod container image`.
    pub app: String,
    #[serde(default)]
    pub archive: Option<Archive>,
    /// Training runs made, and rejections the archives met.
    #[serde(default)]
    pub trainings: u32,
    #[serde(default)]
    pub rejections: u32,
    /// Why this key is not cached (remembered: it is not tried again).
    #[serde(default)]
    pub unusable: Option<String>,
    /// A training run is under way (not persisted: a restarted agent starts afresh).
    #[serde(skip)]
    pub training: bool,
}

#[derive(Default, Serialize, Deserialize)]
struct Index {
    entries: BTreeMap<String, Entry>,
}

/// What a container start gets.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Map this archive: `dir` (host) is mounted read-only at [`GUEST_ARCHIVE_DIR`].
    Attach { dir: PathBuf, archive: Archive },
    /// No archive yet: start with the version log only (a training may follow).
    Observe,
    /// Not cached, and why.
    Skip(String),
}

/// What a rejection leads to.
#[derive(Debug, PartialEq, Eq)]
pub enum AfterRejection {
    Retrain,
    Unusable(String),
}

/// The node's archives and their index.
pub struct JavaCache {
    config: JavaCacheConfig,
    index: Mutex<Index>,
    /// One training run at a time on the node: it costs a sandbox and a whole app start.
    pub training_slots: tokio::sync::Semaphore,
}

fn now_ms() -> i64 {
    crate::status::now_ms()
}

/// The sha256 of a file, in hex.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

impl JavaCache {
    /// Opens (or makes) the cache under `config.dir`: reads its index, drops entries whose
    /// archive is missing or of another size, removes files the index does not name and
    /// leftovers of training runs.
    pub fn open(config: JavaCacheConfig) -> Result<JavaCache, JavaCacheError> {
        let archives = config.dir.join("archives");
        std::fs::create_dir_all(&archives).map_err(io_err("create", &archives))?;
        let training = config.dir.join("training");
        if training.exists() {
            std::fs::remove_dir_all(&training).map_err(io_err("remove", &training))?;
        }
        std::fs::create_dir_all(&training).map_err(io_err("create", &training))?;
        let index_path = config.dir.join("index.json");
        let mut index: Index = match std::fs::read(&index_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %index_path.display(), error = %e, "the java cache's index does not parse; starting empty");
                Index::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Index::default(),
            Err(e) => return Err(io_err("read", &index_path)(e)),
        };
        index.entries.retain(|k, _| AppKey::parse(k).is_some());
        for (k, entry) in index.entries.iter_mut() {
            if let Some(a) = &entry.archive {
                let file = archives.join(k).join(a.method.file_name());
                let ok = std::fs::metadata(&file).is_ok_and(|m| m.len() == a.bytes);
                if !ok {
                    tracing::warn!(key = %k, "the java cache's archive is missing or truncated; dropped");
                    entry.archive = None;
                }
            }
        }
        if let Ok(dirs) = std::fs::read_dir(&archives) {
            for d in dirs.flatten() {
                let name = d.file_name().to_string_lossy().into_owned();
                let named = index
                    .entries
                    .get(&name)
                    .is_some_and(|e| e.archive.is_some());
                if !named {
                    remove_archive_dir(&d.path());
                }
            }
        }
        let cache = JavaCache {
            config,
            index: Mutex::new(index),
            training_slots: tokio::sync::Semaphore::new(1),
        };
        cache.save(&cache.index.lock().expect("java cache lock"))?;
        Ok(cache)
    }

    pub fn config(&self) -> &JavaCacheConfig {
        &self.config
    }

    fn archive_dir(&self, key: &AppKey) -> PathBuf {
        self.config.dir.join("archives").join(key.as_str())
    }

    /// A fresh directory for a training run's output (writable by the container's user).
    pub fn training_dir(&self, key: &AppKey) -> Result<PathBuf, JavaCacheError> {
        let dir = self.config.dir.join("training").join(format!(
            "{}-{}",
            key.short(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
            .map_err(io_err("chmod", &dir))?;
        Ok(dir)
    }

    fn save(&self, index: &Index) -> Result<(), JavaCacheError> {
        let path = self.config.dir.join("index.json");
        let bytes = serde_json::to_vec_pretty(index).expect("index serialises");
        kite_config::files::write_durable(&path, &bytes, 0o644).map_err(io_err("write", &path))
    }

    fn with_index<T>(&self, f: impl FnOnce(&mut Index) -> T) -> T {
        let mut index = self.index.lock().expect("java cache lock");
        let out = f(&mut index);
        if let Err(e) = self.save(&index) {
            tracing::warn!(error = %kite_protocol::errors::error_chain(&e), "save the java cache's index");
        }
        out
    }

    /// What a start of `key` gets.
    pub fn plan(&self, key: &AppKey) -> Plan {
        let index = self.index.lock().expect("java cache lock");
        match index.entries.get(key.as_str()) {
            Some(Entry {
                unusable: Some(why),
                ..
            }) => Plan::Skip(why.clone()),
            Some(Entry {
                archive: Some(a), ..
            }) => Plan::Attach {
                dir: self.archive_dir(key),
                archive: a.clone(),
            },
            _ => Plan::Observe,
        }
    }

    /// Checks the archive's sha256 before it is attached (a corrupted archive crashes the
    /// JVM: it must never reach one). A mismatch evicts it (the next start trains again) and
    /// says why; a match marks it used.
    pub fn verify(&self, key: &AppKey, archive: &Archive) -> Result<(), String> {
        let file = self.archive_dir(key).join(archive.method.file_name());
        let actual = file_sha256(&file).map_err(|e| format!("read {}: {e}", file.display()));
        match actual {
            Ok(sum) if sum == archive.sha256 => {
                // In memory only: a start does not wait for the index on disk; the next
                // change that is saved carries it (the LRU order after a crash may be a
                // little older, nothing more).
                let mut index = self.index.lock().expect("java cache lock");
                if let Some(a) = index
                    .entries
                    .get_mut(key.as_str())
                    .and_then(|e| e.archive.as_mut())
                {
                    a.last_used_ms = now_ms();
                }
                Ok(())
            }
            other => {
                let why = match other {
                    Ok(sum) => format!(
                        "archive {} is corrupted (sha256 {sum}, recorded {})",
                        file.display(),
                        archive.sha256
                    ),
                    Err(e) => e,
                };
                self.with_index(|index| {
                    if let Some(e) = index.entries.get_mut(key.as_str()) {
                        e.archive = None;
                        // It may be trained again once.
                        e.trainings = e.rejections;
                    }
                });
                remove_archive_dir(&self.archive_dir(key));
                Err(why)
            }
        }
    }

    /// Claims the training of `key` (false: trained already, under way, or not to be).
    pub fn begin_training(&self, key: &AppKey, app: &str) -> bool {
        self.with_index(|index| {
            let e = index.entries.entry(key.to_string()).or_default();
            if e.app.is_empty() {
                e.app = app.to_string();
            }
            // One training, and one more after a rejection.
            if e.training
                || e.archive.is_some()
                || e.unusable.is_some()
                || e.trainings > e.rejections
            {
                return false;
            }
            e.training = true;
            e.trainings += 1;
            true
        })
    }

    /// Never cache `key`, for `why` (also how a training that made no archive ends).
    pub fn mark_unusable(&self, key: &AppKey, why: &str) {
        self.with_index(|index| {
            let e = index.entries.entry(key.to_string()).or_default();
            e.training = false;
            e.archive = None;
            e.unusable = Some(why.to_string());
        });
        remove_archive_dir(&self.archive_dir(key));
    }

    /// Publishes the archive a training run wrote at `produced` (same filesystem): read-only,
    /// fsynced, renamed into place, with its sha256; older archives make room for it.
    pub fn publish(
        &self,
        key: &AppKey,
        produced: &Path,
        method: Method,
        jdk: &str,
    ) -> Result<Archive, JavaCacheError> {
        let bytes = std::fs::metadata(produced)
            .map_err(io_err("stat", produced))?
            .len();
        if bytes > self.config.max_bytes {
            return Err(JavaCacheError::TooLarge {
                key: key.to_string(),
                bytes,
                max: self.config.max_bytes,
            });
        }
        let file = std::fs::File::open(produced).map_err(io_err("open", produced))?;
        file.sync_all().map_err(io_err("sync", produced))?;
        let sha256 = file_sha256(produced).map_err(io_err("read", produced))?;
        let dir = self.archive_dir(key);
        remove_archive_dir(&dir);
        std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let tmp = dir.join(format!(".{}.tmp", method.file_name()));
        std::fs::rename(produced, &tmp).map_err(io_err("rename", produced))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444))
            .map_err(io_err("chmod", &tmp))?;
        let target = dir.join(method.file_name());
        std::fs::rename(&tmp, &target).map_err(io_err("rename", &tmp))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555))
            .map_err(io_err("chmod", &dir))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("sync", &dir))?;
        let archive = Archive {
            method,
            jdk: jdk.to_string(),
            sha256,
            bytes,
            created_ms: now_ms(),
            last_used_ms: now_ms(),
        };
        let evicted = self.with_index(|index| {
            let evicted = self.make_room(index, key, bytes);
            let e = index.entries.entry(key.to_string()).or_default();
            e.training = false;
            e.archive = Some(archive.clone());
            evicted
        });
        for k in evicted {
            tracing::info!(key = %k, "java cache: evicted (least recently used) to stay within its bound");
            remove_archive_dir(&self.config.dir.join("archives").join(&k));
        }
        Ok(archive)
    }

    /// Drops the least recently used archives (not `key`'s) until `bytes` more fit; the keys
    /// dropped (their entries go: a later start trains again).
    fn make_room(&self, index: &mut Index, key: &AppKey, bytes: u64) -> Vec<String> {
        let mut evicted = Vec::new();
        loop {
            let used: u64 = index
                .entries
                .iter()
                .filter(|(k, _)| k.as_str() != key.as_str())
                .filter_map(|(_, e)| e.archive.as_ref().map(|a| a.bytes))
                .sum();
            if used + bytes <= self.config.max_bytes {
                return evicted;
            }
            let Some(oldest) = index
                .entries
                .iter()
                .filter(|(k, _)| k.as_str() != key.as_str())
                .filter_map(|(k, e)| e.archive.as_ref().map(|a| (a.last_used_ms, k.clone())))
                .min()
                .map(|(_, k)| k)
            else {
                return evicted;
            };
            index.entries.remove(&oldest);
            evicted.push(oldest);
        }
    }

    /// A start's JVM gave the archive up: it stops being attached at once; the key is trained
    /// once more, and after a second rejection it is not cached.
    pub fn reject(&self, key: &AppKey, why: &str) -> AfterRejection {
        let after = self.with_index(|index| {
            let e = index.entries.entry(key.to_string()).or_default();
            e.archive = None;
            e.rejections += 1;
            if e.rejections >= 2 {
                let reason = format!("the JVM rejected its archive twice: {why}");
                e.unusable = Some(reason.clone());
                AfterRejection::Unusable(reason)
            } else {
                AfterRejection::Retrain
            }
        });
        remove_archive_dir(&self.archive_dir(key));
        after
    }

    /// A training run failed for a reason other than the app (the node, the runtime): its
    /// claim is given back, so a later start tries again.
    pub fn training_aborted(&self, key: &AppKey) {
        self.with_index(|index| {
            if let Some(e) = index.entries.get_mut(key.as_str()) {
                e.training = false;
                e.trainings = e.trainings.saturating_sub(1);
            }
        });
    }

    /// Bytes of archives held.
    pub fn bytes(&self) -> u64 {
        let index = self.index.lock().expect("java cache lock");
        index
            .entries
            .values()
            .filter_map(|e| e.archive.as_ref().map(|a| a.bytes))
            .sum()
    }

    /// A copy of the entry of `key`.
    pub fn entry(&self, key: &AppKey) -> Option<Entry> {
        let index = self.index.lock().expect("java cache lock");
        index.entries.get(key.as_str()).cloned()
    }
}

/// Removes a published archive's directory (it is read-only: made writable first). Running
/// containers that mapped the file keep it until they end.
fn remove_archive_dir(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "java cache: remove an archive");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> AppKey {
        AppKey::parse(&format!("{n:02x}").repeat(32)).unwrap()
    }

    fn cache(dir: &Path, max_bytes: u64) -> JavaCache {
        JavaCache::open(JavaCacheConfig {
            dir: dir.to_path_buf(),
            max_bytes,
            ..Default::default()
        })
        .unwrap()
    }

    fn produce(c: &JavaCache, k: &AppKey, bytes: usize) -> PathBuf {
        let dir = c.training_dir(k).unwrap();
        let f = dir.join("app.jsa");
        std::fs::write(&f, vec![7u8; bytes]).unwrap();
        f
    }

    #[test]
    fn options_fit_each_jdk_and_keep_the_users() {
        assert_eq!(Method::for_feature(25), Some(Method::AotCache));
        assert_eq!(Method::for_feature(17), Some(Method::DynamicAppCds));
        assert_eq!(Method::for_feature(11), None);
        assert!(!Method::DynamicAppCds.use_options().contains("aot"));
        assert!(!observe_options().contains("aot") && !observe_options().contains("cds"));
        assert!(Method::AotCache
            .record_options()
            .starts_with("-XX:AOTCacheOutput=/.kite/java/out/app.aot "));
        let env = vec![("JAVA_TOOL_OPTIONS".to_string(), "-Xmx1g -Dx=y".to_string())];
        assert_eq!(merged_tool_options("-A", &env), "-A -Xmx1g -Dx=y");
        assert_eq!(merged_tool_options("-A", &[]), "-A");
    }

    #[test]
    fn publish_verify_reject_and_remember() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path(), 1 << 20);
        let k = key(1);
        assert_eq!(c.plan(&k), Plan::Observe);
        assert!(c.begin_training(&k, "ns/p app img"));
        assert!(!c.begin_training(&k, "ns/p app img"), "one at a time");
        let produced = produce(&c, &k, 1000);
        let a = c
            .publish(&k, &produced, Method::DynamicAppCds, "17.0.15")
            .unwrap();
        let Plan::Attach { dir: adir, archive } = c.plan(&k) else {
            panic!("published")
        };
        assert_eq!(archive, a);
        let file = adir.join("app.jsa");
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o444
        );
        c.verify(&k, &archive).unwrap();
        // Survives a restart.
        drop(c);
        let c = cache(dir.path(), 1 << 20);
        assert!(matches!(c.plan(&k), Plan::Attach { .. }));
        // A rejection: not attached, trained once more; a second: never again.
        assert_eq!(c.reject(&k, "stale jar"), AfterRejection::Retrain);
        assert_eq!(c.plan(&k), Plan::Observe);
        assert!(!file.exists());
        assert!(c.begin_training(&k, ""));
        let produced = produce(&c, &k, 1000);
        c.publish(&k, &produced, Method::DynamicAppCds, "17.0.15")
            .unwrap();
        assert!(matches!(
            c.reject(&k, "stale jar"),
            AfterRejection::Unusable(_)
        ));
        assert!(matches!(c.plan(&k), Plan::Skip(why) if why.contains("stale jar")));
        assert!(!c.begin_training(&k, ""));
        drop(c);
        let c = cache(dir.path(), 1 << 20);
        assert!(matches!(c.plan(&k), Plan::Skip(_)), "remembered");
    }

    #[test]
    fn a_corrupted_archive_is_caught_and_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path(), 1 << 20);
        let k = key(2);
        assert!(c.begin_training(&k, ""));
        let a = c
            .publish(&k, &produce(&c, &k, 4096), Method::AotCache, "25")
            .unwrap();
        let Plan::Attach { dir: adir, .. } = c.plan(&k) else {
            panic!()
        };
        let file = adir.join("app.aot");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&file, bytes).unwrap();
        let why = c.verify(&k, &a).unwrap_err();
        assert!(why.contains("corrupted"), "{why}");
        assert_eq!(c.plan(&k), Plan::Observe);
        assert!(!adir.exists());
        assert!(c.begin_training(&k, ""), "trained again");
    }

    #[test]
    fn the_bound_evicts_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path(), 2500);
        for n in 1..=2 {
            let k = key(n);
            assert!(c.begin_training(&k, ""));
            c.publish(&k, &produce(&c, &k, 1000), Method::AotCache, "25")
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // Key 1 used after key 2 was made: key 2 is the least recently used.
        let Plan::Attach { archive, .. } = c.plan(&key(1)) else {
            panic!()
        };
        c.verify(&key(1), &archive).unwrap();
        let k3 = key(3);
        assert!(c.begin_training(&k3, ""));
        c.publish(&k3, &produce(&c, &k3, 1000), Method::AotCache, "25")
            .unwrap();
        assert!(matches!(c.plan(&key(1)), Plan::Attach { .. }));
        assert_eq!(c.plan(&key(2)), Plan::Observe);
        assert!(c.bytes() <= 2500);
        let k4 = key(4);
        assert!(c.begin_training(&k4, ""));
        let err = c
            .publish(&k4, &produce(&c, &k4, 3000), Method::AotCache, "25")
            .unwrap_err();
        assert!(matches!(err, JavaCacheError::TooLarge { .. }));
    }
}
