//! The prefetch API: given an image reference, start fetching what its lazy start needs, before
//! the kubelet asks for the image: the manifest, every eStargz layer's TOC (saved, so the later
//! Prepare mounts without the registry) and the chunks of its prioritized files (cached, so the
//! container's first reads hit the cache). The node agent calls it when a pod is bound to the
//! node.
//!
//! Wire format: ttrpc on a unix socket (`prefetch_socket`), service `kite.prefetch.v1.Prefetch`
//! (`protocol/proto/prefetch.proto`): one request with the image reference, a stream of
//! [`PrefetchProgress`] as the fetch goes on, the last one DONE or FAILED. Clients use
//! `kite_protocol::prefetch_client`. Requests for an image whose prefetch is under way join it
//! (one fetch, every requester sees its progress); a finished prefetch is forgotten, so asking
//! again checks again (cheaply: TOCs and chunks are already local).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use kite_protocol::errors::error_chain;
use kite_protocol::prefetch::{PrefetchProgress, PrefetchRequest, PrefetchState};
use kite_protocol::prefetch_client::{is_final, state_name};
use kite_protocol::prefetch_ttrpc;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tracing::info;
use ttrpc::r#async::{ServerStreamSender, TtrpcContext};

use crate::lazy::layer::LayerSource;
use crate::lazy::remote::LazyLayers;
use crate::registry::ImageRef;
use kite_estargz::TOC_DIGEST_ANNOTATION;

/// Why a prefetch failed: the registry, a TOC, a chunk (the requester reads the whole chain).
type Failure = Box<dyn std::error::Error + Send + Sync>;

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Prefetches under way, by image reference.
pub struct Prefetcher {
    lazy: Arc<LazyLayers>,
    jobs: Mutex<HashMap<String, watch::Receiver<PrefetchProgress>>>,
}

impl Prefetcher {
    pub fn new(lazy: Arc<LazyLayers>) -> Arc<Prefetcher> {
        Arc::new(Prefetcher {
            lazy,
            jobs: Mutex::new(HashMap::new()),
        })
    }

    /// Starts prefetching `image`, or joins the prefetch of it under way. Returns its progress
    /// and whether it was joined.
    pub fn start(self: &Arc<Self>, image: &str) -> (watch::Receiver<PrefetchProgress>, bool) {
        let mut jobs = self.jobs.lock().expect("jobs lock");
        if let Some(rx) = jobs.get(image) {
            return (rx.clone(), true);
        }
        let (tx, rx) = watch::channel(PrefetchProgress {
            image: image.to_string(),
            state: PrefetchState::RESOLVING.into(),
            ..Default::default()
        });
        jobs.insert(image.to_string(), rx.clone());
        self.lazy.stats.prefetches.fetch_add(1, Ordering::Relaxed);
        let me = self.clone();
        let image = image.to_string();
        tokio::spawn(async move {
            let result = me.run(&image, &tx).await;
            tx.send_modify(|p| match result {
                Ok(()) => p.state = PrefetchState::DONE.into(),
                Err(e) => {
                    p.state = PrefetchState::FAILED.into();
                    p.error = error_chain(&*e);
                }
            });
            me.jobs.lock().expect("jobs lock").remove(&image);
            let p = tx.borrow().clone();
            info!(image = %p.image, state = state_name(&p), lazy_layers = p.lazy_layers,
                  bytes = p.prefetched_bytes, error = %p.error, "prefetch finished");
        });
        (rx, false)
    }

    async fn run(&self, image: &str, tx: &watch::Sender<PrefetchProgress>) -> Result<(), Failure> {
        let reference = ImageRef::parse(image)?;
        let resolved = self.lazy.registry().resolve(&reference).await?;
        let layers: Vec<LayerSource> = resolved
            .manifest
            .layers
            .iter()
            .filter_map(|l| {
                Some(LayerSource {
                    image: image.to_string(),
                    layer_digest: l.digest.clone(),
                    toc_digest: l.annotations.get(TOC_DIGEST_ANNOTATION)?.clone(),
                })
            })
            .collect();
        tx.send_modify(|p| {
            p.state = PrefetchState::FETCHING.into();
            p.layers = count(resolved.manifest.layers.len());
            p.lazy_layers = count(layers.len());
        });
        // Layers one by one: the first layers hold what starts first, and a node's link is
        // better used by one stream of requests than by many competing ones.
        for src in layers {
            let index = self.lazy.load_index(&src).await?;
            let reader = self.lazy.reader(&src, index)?;
            let chunks = reader.prefetch_chunks();
            reader.ensure(&chunks).await?;
            let bytes: u64 = chunks.iter().map(|c| c.size).sum();
            tx.send_modify(|p| {
                p.layers_done += 1;
                p.prefetched_bytes += bytes;
            });
        }
        Ok(())
    }
}

/// The ttrpc service over a [`Prefetcher`].
struct PrefetchService {
    prefetcher: Arc<Prefetcher>,
}

fn failed(image: &str, error: String) -> PrefetchProgress {
    PrefetchProgress {
        image: image.to_string(),
        state: PrefetchState::FAILED.into(),
        error,
        ..Default::default()
    }
}

#[async_trait::async_trait]
impl prefetch_ttrpc::Prefetch for PrefetchService {
    async fn prefetch(
        &self,
        _ctx: &TtrpcContext,
        request: PrefetchRequest,
        sink: ServerStreamSender<PrefetchProgress>,
    ) -> ttrpc::Result<()> {
        if let Err(e) = ImageRef::parse(&request.image) {
            return sink.send(&failed(&request.image, error_chain(&e))).await;
        }
        let (mut rx, joined) = self.prefetcher.start(&request.image);
        loop {
            let progress = PrefetchProgress {
                joined,
                ..rx.borrow_and_update().clone()
            };
            sink.send(&progress).await?;
            if is_final(&progress) {
                return Ok(());
            }
            if rx.changed().await.is_err() {
                // The job ended between our reads: its last state is final.
                let progress = PrefetchProgress {
                    joined,
                    ..rx.borrow().clone()
                };
                if is_final(&progress) {
                    return sink.send(&progress).await;
                }
                let lost = "the prefetch ended without a result".to_string();
                return sink.send(&failed(&request.image, lost)).await;
            }
        }
    }
}

/// Serves the prefetch API on `listener` (bound by the caller, see
/// [`crate::daemon::listen_unix`]); the server runs until it is dropped or shut down.
pub async fn serve(
    listener: UnixListener,
    prefetcher: Arc<Prefetcher>,
) -> Result<ttrpc::r#async::Server, ttrpc::Error> {
    crate::daemon::serve_ttrpc(
        listener,
        prefetch_ttrpc::create_prefetch(Arc::new(PrefetchService { prefetcher })),
    )
    .await
}
