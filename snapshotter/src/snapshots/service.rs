//! Snapshots as containerd's overlayfs snapshotter makes them, so ordinary (non-lazy) layers
//! work through kite's snapshotter exactly as through containerd's own:
//!
//! - a snapshot is `snapshots/<id>/fs` (its layer's files) and `snapshots/<id>/work`;
//! - Prepare on no parent: a read-write bind mount of `fs`; on a parent: an overlay with the
//!   parent chain as `lowerdir` (nearest first), `fs` as `upperdir`;
//! - View: a read-only bind of a single parent's `fs`, or a lower-only overlay of the chain;
//! - Commit turns an active snapshot into a committed one under its name (same files),
//!   measuring its size; Remove refuses a snapshot that has children.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_snapshots::api::types::Mount;
use containerd_snapshots::tonic;
use containerd_snapshots::{Info, Kind as ApiKind, Usage};
use tokio::sync::Mutex;
use tracing::{error, info, warn};

use crate::lazy::layer::LayerSource;
use crate::lazy::remote::LazyBackend;
use crate::snapshots::store::{Kind, Snapshot, Store, StoreError};
use kite_estargz::TOC_DIGEST_ANNOTATION;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {key}: not found")]
    NotFound { key: String },
    #[error("snapshot {key}: already exists")]
    AlreadyExists { key: String },
    #[error("snapshot {key}: {reason}")]
    FailedPrecondition { key: String, reason: String },
    #[error("snapshot {key}: {op} {path}")]
    Io {
        key: String,
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<SnapshotError> for tonic::Status {
    fn from(e: SnapshotError) -> Self {
        let msg = kite_protocol::errors::error_chain(&e);
        match e {
            SnapshotError::NotFound { .. } => tonic::Status::not_found(msg),
            SnapshotError::AlreadyExists { .. } => tonic::Status::already_exists(msg),
            SnapshotError::FailedPrecondition { .. } => tonic::Status::failed_precondition(msg),
            SnapshotError::Io { .. } | SnapshotError::Store(_) => tonic::Status::internal(msg),
        }
    }
}

pub struct OverlaySnapshotter {
    root: PathBuf,
    store: Mutex<Store>,
    lazy: Option<Arc<dyn LazyBackend>>,
}

/// Labels containerd's unpacker and the CRI put on a layer's Prepare.
pub const TARGET_REF_LABEL: &str = "containerd.io/snapshot.ref";
pub const CRI_IMAGE_REF_LABEL: &str = "containerd.io/snapshot/cri.image-ref";
pub const CRI_LAYER_DIGEST_LABEL: &str = "containerd.io/snapshot/cri.layer-digest";

fn api_kind(k: Kind) -> ApiKind {
    match k {
        Kind::View => ApiKind::View,
        Kind::Active => ApiKind::Active,
        Kind::Committed => ApiKind::Committed,
    }
}

fn info(name: &str, s: &Snapshot) -> Info {
    Info {
        kind: api_kind(s.kind),
        name: name.to_string(),
        parent: s.parent.clone(),
        labels: s.labels.clone().into_iter().collect(),
        created_at: s.created,
        updated_at: s.updated,
    }
}

fn mount(typ: &str, source: &Path, options: Vec<String>) -> Mount {
    Mount {
        r#type: typ.into(),
        source: source.display().to_string(),
        target: String::new(),
        options,
    }
}

/// Bytes and inodes under `dir`, as `du` counts them (hard links once).
pub fn disk_usage(dir: &Path) -> std::io::Result<(i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let (mut bytes, mut inodes) = (0i64, 0i64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let md = entry.metadata()?;
            if !seen.insert((md.dev(), md.ino())) {
                continue;
            }
            inodes += 1;
            bytes += i64::try_from(md.blocks() * 512).unwrap_or(i64::MAX);
            if md.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok((bytes, inodes))
}

impl OverlaySnapshotter {
    /// Opens (or creates) the snapshotter's state under `root`.
    pub fn open(root: &Path) -> Result<Arc<Self>, SnapshotError> {
        Self::open_with(root, None)
    }

    /// Opens the state under `root`, mounting eStargz layers lazily through `lazy`.
    pub fn open_with(
        root: &Path,
        lazy: Option<Arc<dyn LazyBackend>>,
    ) -> Result<Arc<Self>, SnapshotError> {
        let dir = root.join("snapshots");
        std::fs::create_dir_all(&dir).map_err(|source| SnapshotError::Io {
            key: String::new(),
            op: "create",
            path: dir.clone(),
            source,
        })?;
        let store = Store::open(&root.join("metadata.json"))?;
        Ok(Arc::new(Self {
            root: root.to_path_buf(),
            store: Mutex::new(store),
            lazy,
        }))
    }

    pub fn lazy(&self) -> Option<&Arc<dyn LazyBackend>> {
        self.lazy.as_ref()
    }

    /// Mounts every lazy layer the metadata names that is not being served (after a restart
    /// of `kite-lazyfs`, or of the machine): from the saved TOCs, without the registry. Layers
    /// still served (this service restarted, `kite-lazyfs` did not) are left as they are, so
    /// running containers keep reading them. A layer that fails is logged.
    pub async fn remount_lazy(&self) {
        if let Err(e) = self.serve_lazy_layers(None).await {
            error!(error = %kite_protocol::errors::error_chain(&e), "cannot reach kite-lazyfs; lazy layers are not mounted");
        }
    }

    /// Keeps the lazy layers served while this service runs: `kite-lazyfs` may die (a crash,
    /// `kill -9`, the OOM killer) and nothing else would mount its layers again before this
    /// service's next start, so new containers over them would find a dead FUSE mount
    /// (ENOTCONN). Every `every` it asks `kite-lazyfs` (started again if it does not answer)
    /// what it serves and mounts the rest; a layer that fails is tried again after a minute.
    pub async fn keep_lazy_layers_served(self: Arc<Self>, every: std::time::Duration) {
        let mut failing: HashMap<String, std::time::Instant> = HashMap::new();
        let mut unreachable = false;
        loop {
            tokio::time::sleep(every).await;
            failing.retain(|_, at| at.elapsed() < std::time::Duration::from_secs(60));
            match self.serve_lazy_layers(Some(&mut failing)).await {
                Ok(0) => {}
                Ok(n) => info!(
                    layers = n,
                    "lazy layers mounted again after kite-lazyfs restarted"
                ),
                Err(e) if !unreachable => {
                    error!(error = %kite_protocol::errors::error_chain(&e), "cannot reach kite-lazyfs; lazy layers are not served");
                    unreachable = true;
                    continue;
                }
                Err(_) => continue,
            }
            unreachable = false;
        }
    }

    /// Before a snapshot is made on `parent`: if a lazy layer below it has lost its server
    /// (`kite-lazyfs` died and the periodic check has not come round yet), mounts the lazy
    /// layers again now, so the new snapshot's overlay does not stand on a dead FUSE mount.
    async fn revive_lazy_lowers(&self, parent: &str) {
        if self.lazy.is_none() || parent.is_empty() {
            return;
        }
        let lowers: Vec<PathBuf> = {
            let store = self.store.lock().await;
            store
                .ancestors(parent)
                .iter()
                .filter(|(_, s)| s.remote.is_some())
                .map(|(_, s)| self.dir(s.id).join("fs"))
                .collect()
        };
        if lowers.is_empty() {
            return;
        }
        // A FUSE mount whose server is gone answers ENOTCONN. statfs, not stat: FUSE answers
        // stat from its attribute cache without asking the server, statfs always asks. On a
        // thread of its own, bounded: a server that hangs must not hang this Prepare.
        let probe = tokio::task::spawn_blocking(move || {
            lowers.iter().any(|fs| {
                matches!(
                    nix::sys::statfs::statfs(fs),
                    Err(nix::errno::Errno::ENOTCONN)
                )
            })
        });
        let dead = matches!(
            tokio::time::timeout(std::time::Duration::from_secs(2), probe).await,
            Ok(Ok(true))
        );
        if dead {
            warn!(
                parent,
                "a lazy layer lost kite-lazyfs; mounting the lazy layers again"
            );
            if let Err(e) = self.serve_lazy_layers(None).await {
                error!(error = %kite_protocol::errors::error_chain(&e), "cannot reach kite-lazyfs; lazy layers are not mounted");
            }
        }
    }

    /// Mounts the lazy layers `kite-lazyfs` does not serve (as it said just before); returns
    /// how many it mounted. The metadata is locked while each layer mounts (so a layer removed
    /// meanwhile is not mounted again; one a Prepare mounted since is a no-op for kite-lazyfs),
    /// and released between layers, so snapshot calls wait for one mount at most. Layers in
    /// `skip` are left out, and one that fails is added.
    async fn serve_lazy_layers(
        &self,
        mut skip: Option<&mut HashMap<String, std::time::Instant>>,
    ) -> Result<usize, crate::lazy::remote::BackendError> {
        let Some(lazy) = &self.lazy else {
            return Ok(0);
        };
        let served: std::collections::HashSet<PathBuf> =
            lazy.mounted().await?.into_iter().collect();
        let lazy_keys: Vec<String> = {
            let store = self.store.lock().await;
            store
                .all()
                .filter(|(_, s)| s.remote.is_some())
                .map(|(key, _)| key.clone())
                .collect()
        };
        let mut mounted = 0;
        for key in lazy_keys {
            if skip.as_ref().is_some_and(|f| f.contains_key(&key)) {
                continue;
            }
            let store = self.store.lock().await;
            let Some((src, fs)) = store
                .get(&key)
                .and_then(|s| Some((s.remote.as_ref()?, self.dir(s.id).join("fs"))))
            else {
                continue;
            };
            if served.contains(&fs) {
                continue;
            }
            match lazy.mount(src, &fs).await {
                Ok(()) => mounted += 1,
                Err(e) => {
                    error!(snapshot = %key, error = %kite_protocol::errors::error_chain(&e), "cannot mount a lazy layer again");
                    if let Some(f) = skip.as_mut() {
                        f.insert(key.clone(), std::time::Instant::now());
                    }
                }
            }
        }
        Ok(mounted)
    }

    /// The layer a Prepare asks for, if it is a lazy candidate: containerd's unpacker names the
    /// target (chain id), the CRI the image and layer, the manifest the TOC digest.
    fn lazy_candidate(labels: &HashMap<String, String>) -> Option<(String, LayerSource)> {
        let target = labels.get(TARGET_REF_LABEL)?;
        Some((
            target.clone(),
            LayerSource {
                image: labels.get(CRI_IMAGE_REF_LABEL)?.clone(),
                layer_digest: labels.get(CRI_LAYER_DIGEST_LABEL)?.clone(),
                toc_digest: labels.get(TOC_DIGEST_ANNOTATION)?.clone(),
            },
        ))
    }

    /// Makes `target` a committed snapshot whose files are the lazily mounted layer `src`.
    /// Ok(false): the layer cannot be mounted lazily (containerd should unpack it).
    async fn prepare_lazy(
        &self,
        lazy: &dyn LazyBackend,
        target: &str,
        parent: &str,
        labels: &HashMap<String, String>,
        src: &LayerSource,
    ) -> Result<bool, SnapshotError> {
        // containerd finds the layer by its target label and parent; one mounted under the
        // same target for another parent (another namespace's chain) cannot serve this one.
        match self.store.lock().await.get(target) {
            Some(s) if s.parent == parent => {
                return Err(SnapshotError::AlreadyExists {
                    key: target.to_string(),
                })
            }
            Some(_) => return Ok(false),
            None => {}
        }
        // The network part runs without the metadata lock.
        let usage = match lazy.prepare(src).await {
            Ok(u) => u,
            Err(e) => {
                warn!(layer = %src.layer_digest, error = %kite_protocol::errors::error_chain(&e), "not mounting lazily; unpacking");
                return Ok(false);
            }
        };
        let mut store = self.store.lock().await;
        match store.get(target) {
            Some(s) if s.parent == parent => {
                return Err(SnapshotError::AlreadyExists {
                    key: target.to_string(),
                })
            }
            Some(_) => return Ok(false),
            None => {}
        }
        if !parent.is_empty() && store.get(parent).map(|p| p.kind) != Some(Kind::Committed) {
            return Ok(false);
        }
        // The target label stays: containerd looks the layer up by it (and the parent).
        let labels: BTreeMap<String, String> = labels.clone().into_iter().collect();
        let mut s = store.insert(target, Kind::Committed, parent, labels)?;
        let dir = self.dir(s.id);
        let made = ["fs", "work"]
            .iter()
            .try_for_each(|d| std::fs::create_dir_all(dir.join(d)));
        let mounted = match made {
            Ok(()) => lazy.mount(src, &dir.join("fs")).await,
            Err(e) => Err(crate::lazy::remote::BackendError::layer_io(e)),
        };
        if let Err(e) = mounted {
            warn!(layer = %src.layer_digest, error = %kite_protocol::errors::error_chain(&e), "lazy mount failed; unpacking");
            let _ = store.remove(target);
            let _ = std::fs::remove_dir_all(&dir);
            return Ok(false);
        }
        s.remote = Some(src.clone());
        s.size = i64::try_from(usage.size).unwrap_or(i64::MAX);
        s.inodes = usage.inodes;
        if let Err(e) = store.replace(target, target, s) {
            // Unrecorded, the mount would never be released.
            let _ = lazy.unmount(&dir.join("fs")).await;
            let _ = store.remove(target);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.into());
        }
        info!(snapshot = %target, layer = %src.layer_digest, image = %src.image,
              "layer mounted lazily; containerd skips its download");
        Ok(true)
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    /// The mounts of snapshot `s` (looked up in `store`), as the overlayfs snapshotter gives.
    fn mounts_of(&self, store: &Store, s: &Snapshot) -> Vec<Mount> {
        let own = self.dir(s.id);
        let lowers: Vec<PathBuf> = store
            .ancestors(&s.parent)
            .iter()
            .map(|(_, p)| self.dir(p.id).join("fs"))
            .collect();
        overlay_mounts(s.kind, &own, &lowers)
    }

    async fn create(
        &self,
        kind: Kind,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        self.revive_lazy_lowers(&parent).await;
        let mut store = self.store.lock().await;
        if store.get(&key).is_some() {
            return Err(SnapshotError::AlreadyExists { key });
        }
        if !parent.is_empty() {
            match store.get(&parent) {
                None => return Err(SnapshotError::NotFound { key: parent }),
                Some(p) if p.kind != Kind::Committed => {
                    return Err(SnapshotError::FailedPrecondition {
                        key,
                        reason: format!("parent {parent} is not committed"),
                    })
                }
                Some(_) => {}
            }
        }
        let labels: BTreeMap<String, String> = labels.into_iter().collect();
        let s = store.insert(&key, kind, &parent, labels)?;
        let dir = self.dir(s.id);
        let made = ["fs", "work"]
            .iter()
            .try_for_each(|d| std::fs::create_dir_all(dir.join(d)));
        if let Err(source) = made {
            let _ = store.remove(&key);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(SnapshotError::Io {
                key,
                op: "create",
                path: dir,
                source,
            });
        }
        Ok(self.mounts_of(&store, &s))
    }

    /// How many snapshots of each kind there are (for metrics).
    pub async fn counts(&self) -> Vec<(&'static str, usize)> {
        let store = self.store.lock().await;
        [
            (Kind::Active, "active"),
            (Kind::View, "view"),
            (Kind::Committed, "committed"),
        ]
        .into_iter()
        .map(|(k, name)| (name, store.all().filter(|(_, s)| s.kind == k).count()))
        .collect()
    }

    /// Removes directories under `snapshots/` that no snapshot names (left by a crash between
    /// a metadata change and the file work).
    pub async fn cleanup(&self) -> Result<(), SnapshotError> {
        let ids = self.store.lock().await.ids();
        let dir = self.root.join("snapshots");
        let entries = std::fs::read_dir(&dir).map_err(|source| SnapshotError::Io {
            key: String::new(),
            op: "read",
            path: dir.clone(),
            source,
        })?;
        for e in entries.flatten() {
            let orphan = e
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_none_or(|id| !ids.contains(&id));
            if orphan {
                warn!(path = %e.path().display(), "removing a snapshot directory nothing names");
                let _ = crate::lazy::fs::unmount(&e.path().join("fs"));
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        Ok(())
    }
}

/// The mounts of a snapshot whose own directory is `own` and whose parent chain's `fs`
/// directories are `lowers` (nearest first).
pub fn overlay_mounts(kind: Kind, own: &Path, lowers: &[PathBuf]) -> Vec<Mount> {
    let fs = own.join("fs");
    let lowerdir = || {
        format!(
            "lowerdir={}",
            lowers
                .iter()
                .map(|l| l.display().to_string())
                .collect::<Vec<_>>()
                .join(":")
        )
    };
    match (kind, lowers.len()) {
        (Kind::View, 0) => vec![mount("bind", &fs, vec!["ro".into(), "rbind".into()])],
        (Kind::View, 1) => vec![mount("bind", &lowers[0], vec!["ro".into(), "rbind".into()])],
        (Kind::View, _) => vec![mount("overlay", Path::new("overlay"), vec![lowerdir()])],
        (_, 0) => vec![mount("bind", &fs, vec!["rw".into(), "rbind".into()])],
        (_, _) => vec![mount(
            "overlay",
            Path::new("overlay"),
            vec![
                format!("workdir={}", own.join("work").display()),
                format!("upperdir={}", fs.display()),
                lowerdir(),
            ],
        )],
    }
}

#[async_trait::async_trait]
impl containerd_snapshots::Snapshotter for OverlaySnapshotter {
    type Error = SnapshotError;

    async fn stat(&self, key: String) -> Result<Info, Self::Error> {
        let store = self.store.lock().await;
        let s = store
            .get(&key)
            .ok_or(SnapshotError::NotFound { key: key.clone() })?;
        Ok(info(&key, s))
    }

    async fn update(
        &self,
        info_in: Info,
        fieldpaths: Option<Vec<String>>,
    ) -> Result<Info, Self::Error> {
        let key = info_in.name.clone();
        let mut store = self.store.lock().await;
        let mut s = store
            .get(&key)
            .cloned()
            .ok_or(SnapshotError::NotFound { key: key.clone() })?;
        let paths = fieldpaths.unwrap_or_default();
        if paths.is_empty() {
            s.labels = info_in.labels.clone().into_iter().collect();
        }
        for p in paths {
            if p == "labels" {
                s.labels = info_in.labels.clone().into_iter().collect();
            } else if let Some(label) = p.strip_prefix("labels.") {
                match info_in.labels.get(label) {
                    Some(v) => s.labels.insert(label.to_string(), v.clone()),
                    None => s.labels.remove(label),
                };
            } else {
                return Err(SnapshotError::FailedPrecondition {
                    key,
                    reason: format!("field {p:?} cannot be updated (only labels)"),
                });
            }
        }
        s.updated = std::time::SystemTime::now();
        store.replace(&key, &key, s.clone())?;
        Ok(info(&key, &s))
    }

    async fn usage(&self, key: String) -> Result<Usage, Self::Error> {
        let (s, dir) = {
            let store = self.store.lock().await;
            let s = store
                .get(&key)
                .cloned()
                .ok_or(SnapshotError::NotFound { key: key.clone() })?;
            let dir = self.dir(s.id).join("fs");
            (s, dir)
        };
        if s.kind == Kind::Committed {
            return Ok(Usage {
                size: s.size,
                inodes: s.inodes,
            });
        }
        let (size, inodes) = tokio::task::spawn_blocking(move || disk_usage(&dir))
            .await
            .expect("usage thread")
            .map_err(|source| SnapshotError::Io {
                key: key.clone(),
                op: "measure",
                path: self.dir(s.id),
                source,
            })?;
        Ok(Usage { size, inodes })
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Self::Error> {
        let store = self.store.lock().await;
        let s = store
            .get(&key)
            .ok_or(SnapshotError::NotFound { key: key.clone() })?;
        if s.kind == Kind::Committed {
            return Err(SnapshotError::FailedPrecondition {
                key,
                reason: "a committed snapshot has no mounts".into(),
            });
        }
        Ok(self.mounts_of(&store, s))
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Self::Error> {
        if let (Some(lazy), Some((target, src))) = (&self.lazy, Self::lazy_candidate(&labels)) {
            if self
                .prepare_lazy(lazy.as_ref(), &target, &parent, &labels, &src)
                .await?
            {
                // containerd's unpacker takes this as "the layer is there": it stats the
                // target and skips fetching and applying the layer.
                return Err(SnapshotError::AlreadyExists { key: target });
            }
        }
        self.create(Kind::Active, key, parent, labels).await
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Self::Error> {
        self.create(Kind::View, key, parent, labels).await
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<(), Self::Error> {
        let mut store = self.store.lock().await;
        if store.get(&name).is_some() {
            return Err(SnapshotError::AlreadyExists { key: name });
        }
        let mut s = store
            .get(&key)
            .cloned()
            .ok_or(SnapshotError::NotFound { key: key.clone() })?;
        if s.kind != Kind::Active {
            return Err(SnapshotError::FailedPrecondition {
                key,
                reason: "only an active snapshot can be committed".into(),
            });
        }
        let fs = self.dir(s.id).join("fs");
        let (size, inodes) = disk_usage(&fs).map_err(|source| SnapshotError::Io {
            key: key.clone(),
            op: "measure",
            path: fs,
            source,
        })?;
        s.kind = Kind::Committed;
        s.size = size;
        s.inodes = inodes;
        s.labels = labels.into_iter().collect();
        s.updated = std::time::SystemTime::now();
        store.replace(&key, &name, s)?;
        info!(snapshot = %name, bytes = size, "committed");
        Ok(())
    }

    async fn remove(&self, key: String) -> Result<(), Self::Error> {
        let mut store = self.store.lock().await;
        if store.get(&key).is_none() {
            return Err(SnapshotError::NotFound { key });
        }
        if store.has_children(&key) {
            return Err(SnapshotError::FailedPrecondition {
                key,
                reason: "other snapshots stand on it".into(),
            });
        }
        let s = store.remove(&key)?.expect("checked above");
        let dir = self.dir(s.id);
        drop(store);
        if s.remote.is_some() {
            if let Some(lazy) = &self.lazy {
                if let Err(e) = lazy.unmount(&dir.join("fs")).await {
                    // kite-lazyfs unreachable: detach the mount here, so the directory's
                    // removal below never walks into a FUSE mount.
                    warn!(snapshot = %key, error = %kite_protocol::errors::error_chain(&e), "unmount the lazy layer");
                    let _ = crate::lazy::fs::unmount(&dir.join("fs"));
                }
            }
        }
        // The record is gone first: a crash here leaves an orphan directory for Cleanup,
        // never a record without files.
        if let Err(e) = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir))
            .await
            .expect("remove thread")
        {
            warn!(snapshot = %key, "remove files: {e}");
        }
        Ok(())
    }

    async fn clear(&self) -> Result<(), Self::Error> {
        self.cleanup().await
    }

    type InfoStream = futures::stream::Iter<std::vec::IntoIter<Result<Info, SnapshotError>>>;

    async fn list(
        &self,
        _snapshotter: String,
        _filters: Vec<String>,
    ) -> Result<Self::InfoStream, Self::Error> {
        let store = self.store.lock().await;
        let all: Vec<Result<Info, SnapshotError>> =
            store.all().map(|(k, s)| Ok(info(k, s))).collect();
        Ok(futures::stream::iter(all))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_snapshots::Snapshotter;

    #[test]
    fn mounts_follow_containerds_overlayfs_snapshotter() {
        let own = Path::new("/s/3");
        let lowers = vec![PathBuf::from("/s/2/fs"), PathBuf::from("/s/1/fs")];
        let m = &overlay_mounts(Kind::Active, own, &[])[0];
        assert_eq!((m.r#type.as_str(), m.source.as_str()), ("bind", "/s/3/fs"));
        assert_eq!(m.options, ["rw", "rbind"]);
        let m = &overlay_mounts(Kind::Active, own, &lowers)[0];
        assert_eq!(m.r#type, "overlay");
        assert_eq!(
            m.options,
            [
                "workdir=/s/3/work",
                "upperdir=/s/3/fs",
                "lowerdir=/s/2/fs:/s/1/fs"
            ]
        );
        let m = &overlay_mounts(Kind::View, own, &lowers[..1])[0];
        assert_eq!((m.r#type.as_str(), m.source.as_str()), ("bind", "/s/2/fs"));
        assert_eq!(m.options, ["ro", "rbind"]);
        let m = &overlay_mounts(Kind::View, own, &lowers)[0];
        assert_eq!(m.options, ["lowerdir=/s/2/fs:/s/1/fs"]);
    }

    /// A lazy backend that mounts nothing: records the mounts asked for; serves what the test
    /// says (`kite-lazyfs` died: nothing).
    #[derive(Default)]
    struct FakeLazy {
        mounts: std::sync::Mutex<Vec<PathBuf>>,
        served: std::sync::Mutex<Vec<PathBuf>>,
        refuse: std::sync::Mutex<Option<PathBuf>>,
    }

    #[async_trait::async_trait]
    impl LazyBackend for FakeLazy {
        async fn prepare(
            &self,
            _: &LayerSource,
        ) -> Result<crate::lazy::remote::LayerUsage, crate::lazy::remote::BackendError> {
            Ok(Default::default())
        }
        async fn mount(
            &self,
            _: &LayerSource,
            at: &Path,
        ) -> Result<(), crate::lazy::remote::BackendError> {
            if self.refuse.lock().unwrap().as_deref() == Some(at) {
                return Err(crate::lazy::remote::BackendError::layer_io(
                    std::io::Error::other("refused"),
                ));
            }
            self.mounts.lock().unwrap().push(at.to_path_buf());
            self.served.lock().unwrap().push(at.to_path_buf());
            Ok(())
        }
        async fn unmount(&self, at: &Path) -> Result<(), crate::lazy::remote::BackendError> {
            self.served.lock().unwrap().retain(|p| p != at);
            Ok(())
        }
        async fn mounted(&self) -> Result<Vec<PathBuf>, crate::lazy::remote::BackendError> {
            Ok(self.served.lock().unwrap().clone())
        }
        async fn stats(
            &self,
        ) -> Result<crate::lazy::remote::LazyStats, crate::lazy::remote::BackendError> {
            Ok(Default::default())
        }
    }

    fn lazy_labels(target: &str, layer: &str) -> HashMap<String, String> {
        [
            (TARGET_REF_LABEL, target),
            (CRI_IMAGE_REF_LABEL, "127.0.0.1:5000/lazy:1"),
            (CRI_LAYER_DIGEST_LABEL, layer),
            (TOC_DIGEST_ANNOTATION, "sha256:toc"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[tokio::test]
    async fn lazy_layers_kite_lazyfs_lost_are_mounted_again_and_failures_retried_later() {
        let root = tempfile::tempdir().unwrap();
        let fake = Arc::new(FakeLazy::default());
        let sn = OverlaySnapshotter::open_with(root.path(), Some(fake.clone())).unwrap();
        for (target, parent, layer) in [("l1", "", "sha256:a"), ("l2", "l1", "sha256:b")] {
            let made = sn
                .prepare(
                    format!("extract-{target}"),
                    parent.into(),
                    lazy_labels(target, layer),
                )
                .await;
            assert!(
                matches!(made, Err(SnapshotError::AlreadyExists { .. })),
                "{made:?}"
            );
        }
        let layers = fake.mounts.lock().unwrap().clone();
        assert_eq!(layers.len(), 2);
        // All served: nothing to do.
        assert_eq!(sn.serve_lazy_layers(None).await.unwrap(), 0);
        // kite-lazyfs died: both again; one refused is skipped by the next rounds.
        fake.served.lock().unwrap().clear();
        *fake.refuse.lock().unwrap() = Some(layers[1].clone());
        let mut failing = HashMap::new();
        assert_eq!(sn.serve_lazy_layers(Some(&mut failing)).await.unwrap(), 1);
        assert_eq!(failing.keys().collect::<Vec<_>>(), ["l2"]);
        *fake.refuse.lock().unwrap() = None;
        assert_eq!(sn.serve_lazy_layers(Some(&mut failing)).await.unwrap(), 0);
        failing.clear();
        assert_eq!(sn.serve_lazy_layers(Some(&mut failing)).await.unwrap(), 1);
        // A removed layer is not mounted again.
        sn.remove("l2".into()).await.unwrap();
        fake.served.lock().unwrap().clear();
        assert_eq!(sn.serve_lazy_layers(None).await.unwrap(), 1);
        assert_eq!(fake.mounts.lock().unwrap().last(), Some(&layers[0]));
    }

    #[tokio::test]
    async fn the_snapshot_lifecycle_keeps_containerds_rules() {
        let root = tempfile::tempdir().unwrap();
        let sn = OverlaySnapshotter::open(root.path()).unwrap();
        let none = HashMap::new;
        sn.prepare("a-key".into(), "".into(), none()).await.unwrap();
        std::fs::write(root.path().join("snapshots/1/fs/file"), vec![7u8; 10_000]).unwrap();
        assert!(matches!(
            sn.prepare("a-key".into(), "".into(), none()).await,
            Err(SnapshotError::AlreadyExists { .. })
        ));
        // Only committed snapshots can be parents.
        assert!(matches!(
            sn.prepare("b".into(), "a-key".into(), none()).await,
            Err(SnapshotError::FailedPrecondition { .. })
        ));
        sn.commit("a".into(), "a-key".into(), none()).await.unwrap();
        assert!(matches!(
            sn.stat("a-key".into()).await,
            Err(SnapshotError::NotFound { .. })
        ));
        let usage = sn.usage("a".into()).await.unwrap();
        assert!(usage.size >= 10_000 && usage.inodes == 1, "{usage:?}");
        let m = sn.prepare("c".into(), "a".into(), none()).await.unwrap();
        assert_eq!(m[0].r#type, "overlay");
        assert!(matches!(
            sn.remove("a".into()).await,
            Err(SnapshotError::FailedPrecondition { .. })
        ));
        // Labels update by field path.
        let mut labels = HashMap::new();
        labels.insert("x".to_string(), "1".to_string());
        let i = sn
            .update(
                Info {
                    name: "a".into(),
                    labels,
                    ..Default::default()
                },
                Some(vec!["labels.x".into()]),
            )
            .await
            .unwrap();
        assert_eq!(i.labels.get("x").map(String::as_str), Some("1"));
        // Everything survives a reopen; removal in order works and frees the files.
        drop(sn);
        let sn = OverlaySnapshotter::open(root.path()).unwrap();
        assert_eq!(sn.stat("a".into()).await.unwrap().kind, ApiKind::Committed);
        sn.remove("c".into()).await.unwrap();
        sn.remove("a".into()).await.unwrap();
        assert!(!root.path().join("snapshots/1").exists());
        std::fs::create_dir_all(root.path().join("snapshots/99/fs")).unwrap();
        sn.cleanup().await.unwrap();
        assert!(!root.path().join("snapshots/99").exists());
    }
}
