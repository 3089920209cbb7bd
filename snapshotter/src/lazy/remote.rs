//! Lazy layers: resolving an eStargz layer's TOC from the registry (footer, then the TOC
//! member, checked against the manifest's TOC digest), mounting it as a [`LazyFs`], and the
//! background fetch that follows.
//!
//! TOCs are kept under `<root>/tocs/` by digest, so a restart re-mounts lazy layers without
//! the registry.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use crate::lazy::cache::{digest_hex, CacheError, ChunkCache};
use crate::lazy::fs::{LazyFs, LazyMount};
use crate::lazy::layer::{FetchStats, LayerReader, LayerSource};
use crate::registry::{ImageRef, RegistryClient, RegistryError};
use kite_estargz::writer::decode_toc_member;
use kite_estargz::{parse_footer, verify_toc_digest, EstargzError, Index, FOOTER_SIZE};

/// The largest TOC JSON accepted (a decompression bomb stops here).
pub const MAX_TOC_JSON: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("layer {layer} of {image}")]
    Registry {
        image: String,
        layer: String,
        source: Box<RegistryError>,
    },
    #[error("layer {layer} of {image}: not eStargz or a bad TOC")]
    Estargz {
        image: String,
        layer: String,
        source: EstargzError,
    },
    #[error("layer {layer}")]
    Cache { layer: String, source: CacheError },
    #[error("layer {layer}: {op} {path}")]
    Io {
        layer: String,
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

struct Mounted {
    _mount: LazyMount,
    background: tokio::task::JoinHandle<()>,
}

pub struct LazyLayers {
    tocs: PathBuf,
    cache: Arc<ChunkCache>,
    registry: Arc<RegistryClient>,
    pub stats: Arc<FetchStats>,
    /// None: no background fetch (reads and the prioritized files only).
    background_bytes_per_sec: Option<u64>,
    mounts: Mutex<HashMap<PathBuf, Mounted>>,
    readers: Mutex<HashMap<String, std::sync::Weak<LayerReader>>>,
    /// Indexes `prepare` built, by TOC digest, for the `mount` that follows it (a TOC is
    /// parsed and validated once per pull, not twice).
    prepared: Mutex<HashMap<String, Index>>,
}

impl LazyLayers {
    pub fn new(
        root: &Path,
        cache: Arc<ChunkCache>,
        registry: Arc<RegistryClient>,
        background_bytes_per_sec: Option<u64>,
    ) -> LazyLayers {
        LazyLayers {
            tocs: root.join("tocs"),
            cache,
            registry,
            stats: Arc::default(),
            background_bytes_per_sec,
            mounts: Mutex::new(HashMap::new()),
            readers: Mutex::new(HashMap::new()),
            prepared: Mutex::new(HashMap::new()),
        }
    }

    pub fn cache(&self) -> &ChunkCache {
        &self.cache
    }

    pub fn registry(&self) -> &RegistryClient {
        &self.registry
    }

    /// The reader of layer `src` (indexed as `index`): its chunks, fetched and cached. A layer
    /// of an image has one live reader, so a prefetch and a mount of it share their fetches.
    pub fn reader(&self, src: &LayerSource, index: Index) -> Result<Arc<LayerReader>, RemoteError> {
        let mut readers = self.readers.lock().expect("readers lock");
        readers.retain(|_, r| r.strong_count() > 0);
        // By image too: another image's copy of the layer may live on another registry.
        let key = format!("{}@{}", src.image, src.layer_digest);
        if let Some(r) = readers.get(&key).and_then(|r| r.upgrade()) {
            return Ok(r);
        }
        let r = self.new_reader(src, index)?;
        readers.insert(key, Arc::downgrade(&r));
        Ok(r)
    }

    fn new_reader(&self, src: &LayerSource, index: Index) -> Result<Arc<LayerReader>, RemoteError> {
        let image = ImageRef::parse(&src.image).map_err(|source| RemoteError::Registry {
            image: src.image.clone(),
            layer: src.layer_digest.clone(),
            source: Box::new(source),
        })?;
        Ok(Arc::new(LayerReader::new(
            src.clone(),
            image,
            Arc::new(index),
            self.cache.clone(),
            self.registry.clone(),
            self.stats.clone(),
        )))
    }

    pub fn mount_count(&self) -> usize {
        self.mounts.lock().expect("mounts lock").len()
    }

    fn estargz_err(src: &LayerSource, source: EstargzError) -> RemoteError {
        RemoteError::Estargz {
            image: src.image.clone(),
            layer: src.layer_digest.clone(),
            source,
        }
    }

    /// The layer's validated index: from the saved TOC, or fetched (footer, then the TOC
    /// member) and checked against the TOC digest.
    pub async fn load_index(&self, src: &LayerSource) -> Result<Index, RemoteError> {
        let hex = digest_hex(&src.toc_digest).map_err(|source| RemoteError::Cache {
            layer: src.layer_digest.clone(),
            source,
        })?;
        let saved = self.tocs.join(format!("{hex}.json"));
        let toc_offset_file = self.tocs.join(format!("{hex}.offset"));
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            let layer = src.layer_digest.clone();
            move |source| RemoteError::Io {
                layer,
                op,
                path,
                source,
            }
        };
        if let (Ok(json), Ok(offset)) = (
            std::fs::read(&saved),
            std::fs::read_to_string(&toc_offset_file),
        ) {
            if verify_toc_digest(&json, &src.toc_digest).is_ok() {
                if let Ok(toc_offset) = offset.trim().parse::<u64>() {
                    let toc = serde_json::from_slice(&json)
                        .map_err(|e| EstargzError::Toc(format!("JSON: {e}")))
                        .map_err(|e| Self::estargz_err(src, e))?;
                    return Index::from_toc(&toc, toc_offset)
                        .map_err(|e| Self::estargz_err(src, e));
                }
            }
            warn!(path = %saved.display(), "saved TOC does not match its digest; fetching it");
        }
        let image = ImageRef::parse(&src.image).map_err(|source| RemoteError::Registry {
            image: src.image.clone(),
            layer: src.layer_digest.clone(),
            source: Box::new(source),
        })?;
        let reg = |source| RemoteError::Registry {
            image: src.image.clone(),
            layer: src.layer_digest.clone(),
            source: Box::new(source),
        };
        let size = self
            .registry
            .blob_size(&image, &src.layer_digest)
            .await
            .map_err(reg)?;
        if size < FOOTER_SIZE as u64 {
            return Err(Self::estargz_err(
                src,
                EstargzError::Footer("blob shorter than a footer".into()),
            ));
        }
        let footer = self
            .registry
            .blob_range(&image, &src.layer_digest, size - FOOTER_SIZE as u64..size)
            .await
            .map_err(reg)?;
        let toc_offset = parse_footer(&footer).map_err(|e| Self::estargz_err(src, e))?;
        let end = size - FOOTER_SIZE as u64;
        if toc_offset >= end {
            return Err(Self::estargz_err(
                src,
                EstargzError::Footer(format!(
                    "TOC offset {toc_offset} is not before the footer at {end}"
                )),
            ));
        }
        let member = self
            .registry
            .blob_range(&image, &src.layer_digest, toc_offset..end)
            .await
            .map_err(reg)?;
        self.stats.bytes.fetch_add(
            (footer.len() + member.len()) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let (toc, json) =
            decode_toc_member(&member, MAX_TOC_JSON).map_err(|e| Self::estargz_err(src, e))?;
        verify_toc_digest(&json, &src.toc_digest).map_err(|e| Self::estargz_err(src, e))?;
        let index = Index::from_toc(&toc, toc_offset).map_err(|e| Self::estargz_err(src, e))?;
        std::fs::create_dir_all(&self.tocs).map_err(io("create", &self.tocs))?;
        let tmp = saved.with_extension("tmp");
        std::fs::write(&tmp, &json).map_err(io("write", &tmp))?;
        std::fs::rename(&tmp, &saved).map_err(io("rename", &saved))?;
        std::fs::write(&toc_offset_file, toc_offset.to_string())
            .map_err(io("write", &toc_offset_file))?;
        Ok(index)
    }

    /// Mounts the layer `src` (indexed as `index`) at `mountpoint` and starts fetching it:
    /// prioritized files first, then the rest at the configured rate.
    pub fn mount(
        &self,
        src: &LayerSource,
        index: Index,
        mountpoint: &Path,
    ) -> Result<(), RemoteError> {
        if self
            .mounts
            .lock()
            .expect("mounts lock")
            .contains_key(mountpoint)
        {
            // Already served (running containers may be reading it): nothing to do.
            return Ok(());
        }
        let reader = self.reader(src, index)?;
        let rt = tokio::runtime::Handle::current();
        // A mount left by a previous run (its server gone) is replaced.
        let _ = crate::lazy::fs::unmount(mountpoint);
        let mount = crate::lazy::fs::mount(mountpoint, LazyFs::new(reader.clone(), rt)).map_err(
            |source| RemoteError::Io {
                layer: src.layer_digest.clone(),
                op: "mount",
                path: mountpoint.to_path_buf(),
                source,
            },
        )?;
        let background = match self.background_bytes_per_sec {
            Some(rate) => tokio::spawn(reader.fetch_all(rate)),
            None => tokio::spawn(async move {
                let first = reader.prefetch_chunks();
                if let Err(e) = reader.ensure(&first).await {
                    tracing::warn!(error = %kite_protocol::errors::error_chain(&e), "prefetch of the prioritized files failed");
                }
            }),
        };
        info!(layer = %src.layer_digest, image = %src.image, mountpoint = %mountpoint.display(),
              "lazy layer mounted");
        self.mounts.lock().expect("mounts lock").insert(
            mountpoint.to_path_buf(),
            Mounted {
                _mount: mount,
                background,
            },
        );
        Ok(())
    }

    /// Stops the layer's background fetch and detaches its mount.
    pub fn unmount(&self, mountpoint: &Path) -> std::io::Result<()> {
        if let Some(m) = self.mounts.lock().expect("mounts lock").remove(mountpoint) {
            m.background.abort();
        }
        crate::lazy::fs::unmount(mountpoint)
    }
}

/// What a lazy layer holds, for the snapshot's usage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerUsage {
    pub size: u64,
    pub inodes: i64,
}

impl LayerUsage {
    pub fn of(index: &Index) -> LayerUsage {
        LayerUsage {
            size: index
                .inodes
                .values()
                .map(|i| match i.node {
                    kite_estargz::Node::File { size, .. } => size,
                    _ => 0,
                })
                .sum(),
            inodes: i64::try_from(index.inodes.len()).unwrap_or(i64::MAX),
        }
    }
}

/// The lazy layers' counters, as the metrics endpoint shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LazyStats {
    pub mounted: u64,
    pub fetched_bytes: u64,
    pub fetch_requests: u64,
    pub fetched_chunks: u64,
    pub fetch_errors: u64,
    pub prefetches: u64,
    pub cache: crate::lazy::cache::CacheStats,
}

/// Why an operation on a lazy layer failed: in this process, or in `kite-lazyfs` (whose
/// answer carries its whole chain), or because `kite-lazyfs` could not be reached or started.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Layer(Box<dyn std::error::Error + Send + Sync>),
    #[error("unmount {path}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kite-lazyfs at {socket}")]
    Remote {
        socket: PathBuf,
        #[source]
        source: kite_protocol::errors::RpcError,
    },
    #[error("start kite-lazyfs ({program})")]
    Launch {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kite-lazyfs exited as it started: {status}")]
    LaunchExited { status: std::process::ExitStatus },
    #[error("kite-lazyfs did not answer on {socket} within {waited:?}")]
    LaunchTimeout {
        socket: PathBuf,
        waited: std::time::Duration,
    },
}

impl BackendError {
    /// A local file operation for a layer that failed.
    pub fn layer_io(e: std::io::Error) -> BackendError {
        BackendError::Layer(Box::new(e))
    }

    fn layer(e: impl std::error::Error + Send + Sync + 'static) -> BackendError {
        BackendError::Layer(Box::new(e))
    }
}

/// What the snapshots service needs of lazy layers: the in-process [`LazyLayers`], or the
/// `kite-lazyfs` process that serves them across snapshotter restarts
/// ([`crate::lazy::rpc::LazyFsClient`]). A layer that cannot be mounted lazily is unpacked by
/// containerd; the error is logged.
#[async_trait::async_trait]
pub trait LazyBackend: Send + Sync {
    /// Fetches, checks and saves the layer's TOC; what the layer holds.
    async fn prepare(&self, src: &LayerSource) -> Result<LayerUsage, BackendError>;
    /// Mounts the layer (its TOC saved by `prepare`) at `mountpoint`, and starts fetching it.
    async fn mount(&self, src: &LayerSource, mountpoint: &Path) -> Result<(), BackendError>;
    async fn unmount(&self, mountpoint: &Path) -> Result<(), BackendError>;
    /// The mount points being served.
    async fn mounted(&self) -> Result<Vec<PathBuf>, BackendError>;
    async fn stats(&self) -> Result<LazyStats, BackendError>;
}

#[async_trait::async_trait]
impl LazyBackend for LazyLayers {
    async fn prepare(&self, src: &LayerSource) -> Result<LayerUsage, BackendError> {
        let index = self.load_index(src).await.map_err(BackendError::layer)?;
        let usage = LayerUsage::of(&index);
        let mut prepared = self.prepared.lock().expect("prepared lock");
        // A prepare whose mount never came (the layer was unpacked after all) is not kept
        // beyond a few.
        if prepared.len() >= 16 {
            prepared.clear();
        }
        prepared.insert(src.toc_digest.clone(), index);
        Ok(usage)
    }

    async fn mount(&self, src: &LayerSource, mountpoint: &Path) -> Result<(), BackendError> {
        let prepared = self
            .prepared
            .lock()
            .expect("prepared lock")
            .remove(&src.toc_digest);
        let index = match prepared {
            Some(i) => i,
            None => self.load_index(src).await.map_err(BackendError::layer)?,
        };
        LazyLayers::mount(self, src, index, mountpoint).map_err(BackendError::layer)
    }

    async fn unmount(&self, mountpoint: &Path) -> Result<(), BackendError> {
        LazyLayers::unmount(self, mountpoint).map_err(|source| BackendError::Unmount {
            path: mountpoint.to_path_buf(),
            source,
        })
    }

    async fn mounted(&self) -> Result<Vec<PathBuf>, BackendError> {
        Ok(self
            .mounts
            .lock()
            .expect("mounts lock")
            .keys()
            .cloned()
            .collect())
    }

    async fn stats(&self) -> Result<LazyStats, BackendError> {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.stats;
        Ok(LazyStats {
            mounted: u64::try_from(self.mount_count()).unwrap_or(u64::MAX),
            fetched_bytes: s.bytes.load(Relaxed),
            fetch_requests: s.requests.load(Relaxed),
            fetched_chunks: s.chunks.load(Relaxed),
            fetch_errors: s.errors.load(Relaxed),
            prefetches: s.prefetches.load(Relaxed),
            cache: self.cache.stats(),
        })
    }
}
