//! A lazily pulled layer's data: chunks fetched from the registry with HTTP range reads,
//! verified against the TOC, kept in the [`ChunkCache`].
//!
//! Chunks whose compressed ranges touch are fetched in one request (the prioritized files sit
//! together at the front of the blob, so the whole start-up set is one request). Concurrent
//! readers of a chunk share one fetch. After the prioritized files, the rest of the layer is
//! fetched in the background at the configured rate.

use std::collections::HashMap;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::lazy::cache::{CacheError, ChunkCache};
use crate::registry::{ImageRef, RegistryClient, RegistryError};
use kite_estargz::{decode_chunk, Chunk, EstargzError, Index};

/// Most bytes one range request asks for.
const MAX_REQUEST_BYTES: u64 = 16 << 20;
/// The background fetch's batch (one request each).
const BACKGROUND_BATCH_BYTES: u64 = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer {layer} of {image}")]
    Registry {
        image: String,
        layer: String,
        source: RegistryError,
    },
    #[error("layer {layer} of {image}")]
    Chunk {
        image: String,
        layer: String,
        source: EstargzError,
    },
    #[error("layer {layer}")]
    Cache { layer: String, source: CacheError },
}

/// Where a lazy layer comes from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerSource {
    /// The image reference the layer was pulled for (its repository serves the blob).
    pub image: String,
    pub layer_digest: String,
    pub toc_digest: String,
}

/// What lazy layers fetched, for the metrics endpoint.
#[derive(Debug, Default)]
pub struct FetchStats {
    pub bytes: AtomicU64,
    pub requests: AtomicU64,
    pub chunks: AtomicU64,
    pub errors: AtomicU64,
    /// Prefetches started through the prefetch API (joined ones not counted).
    pub prefetches: AtomicU64,
}

pub struct LayerReader {
    pub source: LayerSource,
    image: ImageRef,
    pub index: Arc<Index>,
    cache: Arc<ChunkCache>,
    registry: Arc<RegistryClient>,
    stats: Arc<FetchStats>,
    /// One lock per chunk (by blob offset) while it is being fetched.
    inflight: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
}

impl LayerReader {
    pub fn new(
        source: LayerSource,
        image: ImageRef,
        index: Arc<Index>,
        cache: Arc<ChunkCache>,
        registry: Arc<RegistryClient>,
        stats: Arc<FetchStats>,
    ) -> LayerReader {
        LayerReader {
            source,
            image,
            index,
            cache,
            registry,
            stats,
            inflight: Mutex::new(HashMap::new()),
        }
    }

    fn registry_err(&self, source: RegistryError) -> LayerError {
        LayerError::Registry {
            image: self.source.image.clone(),
            layer: self.source.layer_digest.clone(),
            source,
        }
    }

    /// Copies file bytes `range` (which `chunks` cover) from the cache; None if a chunk is
    /// not cached.
    pub fn read_cached(&self, chunks: &[Chunk], range: Range<u64>) -> Option<Vec<u8>> {
        let mut out = vec![0u8; (range.end - range.start) as usize];
        for c in chunks {
            let start = range.start.max(c.file_offset);
            let end = range.end.min(c.file_offset + c.size);
            if start >= end {
                continue;
            }
            let file = self.cache.open_chunk(&c.digest)?;
            let dst = &mut out[(start - range.start) as usize..(end - range.start) as usize];
            file.read_exact_at(dst, start - c.file_offset).ok()?;
        }
        Some(out)
    }

    /// Makes sure every chunk of `chunks` is in the cache, fetching the missing ones.
    pub async fn ensure(&self, chunks: &[&Chunk]) -> Result<(), LayerError> {
        let mut missing: Vec<&Chunk> = chunks
            .iter()
            .copied()
            .filter(|c| c.size > 0 && !self.cache.contains(&c.digest))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        missing.sort_by_key(|c| c.blob_offset);
        missing.dedup_by_key(|c| c.blob_offset);
        // Lock in blob order (no two callers can wait on each other), then look again:
        // another caller may have fetched a chunk meanwhile.
        let locks: Vec<_> = {
            let mut map = self.inflight.lock().expect("inflight lock");
            missing
                .iter()
                .map(|c| map.entry(c.blob_offset).or_default().clone())
                .collect()
        };
        let mut guards = Vec::with_capacity(locks.len());
        for l in &locks {
            guards.push(l.clone().lock_owned().await);
        }
        missing.retain(|c| !self.cache.contains(&c.digest));
        let result = self.fetch(&missing).await;
        drop(guards);
        {
            let mut map = self.inflight.lock().expect("inflight lock");
            for c in chunks {
                if let Some(l) = map.get(&c.blob_offset) {
                    // Only the map holds it: nobody is fetching or waiting.
                    if Arc::strong_count(l) == 1 {
                        map.remove(&c.blob_offset);
                    }
                }
            }
        }
        result
    }

    /// Fetches `chunks` (sorted by blob offset, none cached), touching ranges in one request.
    async fn fetch(&self, chunks: &[&Chunk]) -> Result<(), LayerError> {
        let mut i = 0;
        while i < chunks.len() {
            let first = self.index.compressed_range(chunks[i]);
            let mut group = first.clone();
            let mut j = i + 1;
            while j < chunks.len() {
                let r = self.index.compressed_range(chunks[j]);
                if r.start != group.end || r.end - group.start > MAX_REQUEST_BYTES {
                    break;
                }
                group.end = r.end;
                j += 1;
            }
            let bytes = self
                .registry
                .blob_range(&self.image, &self.source.layer_digest, group.clone())
                .await
                .map_err(|e| {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    self.registry_err(e)
                })?;
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            self.stats
                .bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            for c in &chunks[i..j] {
                let r = self.index.compressed_range(c);
                let slice =
                    &bytes[(r.start - group.start) as usize..(r.end - group.start) as usize];
                let data = decode_chunk(c, slice).map_err(|source| {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    LayerError::Chunk {
                        image: self.source.image.clone(),
                        layer: self.source.layer_digest.clone(),
                        source,
                    }
                })?;
                self.cache
                    .put(&c.digest, &data)
                    .map_err(|source| LayerError::Cache {
                        layer: self.source.layer_digest.clone(),
                        source,
                    })?;
                self.stats.chunks.fetch_add(1, Ordering::Relaxed);
            }
            i = j;
        }
        Ok(())
    }

    /// The chunks of the prioritized files (the start-up working set).
    pub fn prefetch_chunks(&self) -> Vec<&Chunk> {
        self.index
            .prefetch
            .iter()
            .filter_map(|p| self.index.file(p))
            .flat_map(|(_, chunks)| chunks.iter())
            .collect()
    }

    /// Fetches the prioritized files, then the rest of the layer at `bytes_per_sec` (0: as
    /// fast as the registry gives). Errors are logged: reads fetch on demand anyway.
    pub async fn fetch_all(self: Arc<Self>, bytes_per_sec: u64) {
        let started = Instant::now();
        let first = self.prefetch_chunks();
        if let Err(e) = self.ensure(&first).await {
            warn!(error = %kite_protocol::errors::error_chain(&e), "prefetch of the prioritized files failed");
        }
        let prefetched = first.iter().map(|c| c.size).sum::<u64>();
        debug!(layer = %self.source.layer_digest, files = self.index.prefetch.len(),
               bytes = prefetched, ms = started.elapsed().as_millis() as u64, "prefetched");
        let all = self.index.chunks_in_blob_order();
        let (mut batch, mut batch_bytes, mut sent) = (Vec::new(), 0u64, 0u64);
        let paced = Instant::now();
        for c in all {
            if c.size == 0 || self.cache.contains(&c.digest) {
                continue;
            }
            let r = self.index.compressed_range(c);
            batch_bytes += r.end - r.start;
            batch.push(c);
            if batch_bytes < BACKGROUND_BATCH_BYTES {
                continue;
            }
            if let Err(e) = self.ensure(&batch).await {
                warn!(error = %kite_protocol::errors::error_chain(&e), "background fetch failed; reads still fetch on demand");
                return;
            }
            sent += batch_bytes;
            (batch, batch_bytes) = (Vec::new(), 0);
            if bytes_per_sec > 0 {
                let due = Duration::from_secs_f64(sent as f64 / bytes_per_sec as f64);
                if let Some(wait) = due.checked_sub(paced.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        if let Err(e) = self.ensure(&batch).await {
            warn!(error = %kite_protocol::errors::error_chain(&e), "background fetch failed; reads still fetch on demand");
            return;
        }
        info!(layer = %self.source.layer_digest, image = %self.source.image,
              secs = started.elapsed().as_secs_f64(), "layer fully cached");
    }
}
