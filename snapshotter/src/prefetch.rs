//! The prefetch API: given an image reference, start fetching what its lazy start needs, before
//! the kubelet asks for the image: the manifest, every eStargz layer's TOC (saved, so the later
//! Prepare mounts without the registry) and the chunks of its prioritized files (cached, so the
//! container's first reads hit the cache). The node agent calls it when a pod is bound to the
//! node.
//!
//! Wire format, on a unix socket (`prefetch_socket`): the client sends one JSON line
//! `{"image": "<reference>"}`; the server answers with JSON lines of [`Progress`] as the fetch
//! goes on, the last one with `state` `done` or `failed`. Requests for an image whose prefetch is
//! under way join it (one fetch, every requester sees its progress); a finished prefetch is
//! forgotten, so asking again checks again (cheaply: TOCs and chunks are already local).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::estargz::TOC_DIGEST_ANNOTATION;
use crate::lazy_layer::LayerSource;
use crate::registry::ImageRef;
use crate::remote::LazyLayers;

#[derive(Debug, Deserialize, Serialize)]
pub struct Request {
    pub image: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Progress {
    pub image: String,
    /// `resolving`, `fetching`, `done` or `failed`.
    pub state: String,
    /// Whether this request joined a prefetch already under way.
    #[serde(default)]
    pub joined: bool,
    pub layers: usize,
    /// Layers that are eStargz (the others are unpacked by containerd at pull time).
    pub lazy_layers: usize,
    pub layers_done: usize,
    /// Bytes of prioritized file data now cached.
    pub prefetched_bytes: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl Progress {
    pub fn finished(&self) -> bool {
        self.state == "done" || self.state == "failed"
    }
}

/// Prefetches under way, by image reference.
pub struct Prefetcher {
    lazy: Arc<LazyLayers>,
    jobs: Mutex<HashMap<String, watch::Receiver<Progress>>>,
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
    pub fn start(self: &Arc<Self>, image: &str) -> (watch::Receiver<Progress>, bool) {
        let mut jobs = self.jobs.lock().expect("jobs lock");
        if let Some(rx) = jobs.get(image) {
            return (rx.clone(), true);
        }
        let (tx, rx) = watch::channel(Progress {
            image: image.to_string(),
            state: "resolving".into(),
            ..Default::default()
        });
        jobs.insert(image.to_string(), rx.clone());
        self.lazy.stats.prefetches.fetch_add(1, Ordering::Relaxed);
        let me = self.clone();
        let image = image.to_string();
        tokio::spawn(async move {
            let result = me.run(&image, &tx).await;
            tx.send_modify(|p| match result {
                Ok(()) => p.state = "done".into(),
                Err(e) => {
                    p.state = "failed".into();
                    p.error = e;
                }
            });
            me.jobs.lock().expect("jobs lock").remove(&image);
            let p = tx.borrow().clone();
            info!(image = %p.image, state = %p.state, lazy_layers = p.lazy_layers,
                  bytes = p.prefetched_bytes, error = %p.error, "prefetch finished");
        });
        (rx, false)
    }

    async fn run(&self, image: &str, tx: &watch::Sender<Progress>) -> Result<(), String> {
        let reference = ImageRef::parse(image).map_err(|e| e.to_string())?;
        let resolved = self
            .lazy
            .registry()
            .resolve(&reference)
            .await
            .map_err(|e| e.to_string())?;
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
            p.state = "fetching".into();
            p.layers = resolved.manifest.layers.len();
            p.lazy_layers = layers.len();
        });
        // Layers one by one: the first layers hold what starts first, and a node's link is
        // better used by one stream of requests than by many competing ones.
        for src in layers {
            let index = self
                .lazy
                .load_index(&src)
                .await
                .map_err(|e| e.to_string())?;
            let reader = self.lazy.reader(&src, index).map_err(|e| e.to_string())?;
            let chunks = reader.prefetch_chunks();
            reader.ensure(&chunks).await.map_err(|e| e.to_string())?;
            let bytes: u64 = chunks.iter().map(|c| c.size).sum();
            tx.send_modify(|p| {
                p.layers_done += 1;
                p.prefetched_bytes += bytes;
            });
        }
        Ok(())
    }
}

/// Serves the prefetch API on `listener` until the task is dropped.
pub async fn serve(listener: UnixListener, prefetcher: Arc<Prefetcher>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let prefetcher = prefetcher.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(conn, prefetcher).await {
                warn!("prefetch API: {e}");
            }
        });
    }
}

async fn answer(conn: UnixStream, prefetcher: Arc<Prefetcher>) -> std::io::Result<()> {
    let (read, mut write) = conn.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let send = |p: &Progress| {
        let mut s = serde_json::to_string(p).expect("progress serializes");
        s.push('\n');
        s
    };
    let request: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => {
            let p = Progress {
                state: "failed".into(),
                error: format!(
                    "bad request {:?}: {e} (want {{\"image\": \"REF\"}})",
                    line.trim()
                ),
                ..Default::default()
            };
            return write.write_all(send(&p).as_bytes()).await;
        }
    };
    if let Err(e) = ImageRef::parse(&request.image) {
        let p = Progress {
            image: request.image.clone(),
            state: "failed".into(),
            error: e.to_string(),
            ..Default::default()
        };
        return write.write_all(send(&p).as_bytes()).await;
    }
    let (mut rx, joined) = prefetcher.start(&request.image);
    loop {
        let p = Progress {
            joined,
            ..rx.borrow_and_update().clone()
        };
        write.write_all(send(&p).as_bytes()).await?;
        if p.finished() {
            return Ok(());
        }
        if rx.changed().await.is_err() {
            // The job ended between our reads: its last state is final.
            let p = Progress {
                joined,
                ..rx.borrow().clone()
            };
            if !p.finished() {
                write.write_all(send(&p).as_bytes()).await?;
            }
            return Ok(());
        }
    }
}

/// The client side (`kite-snapshotter prefetch IMAGE`): sends the request and hands each
/// progress line to `each` until the last.
pub async fn request(
    socket: &std::path::Path,
    image: &str,
    mut each: impl FnMut(&Progress),
) -> std::io::Result<Progress> {
    let conn = UnixStream::connect(socket).await?;
    let (read, mut write) = conn.into_split();
    let mut req = serde_json::to_string(&Request {
        image: image.to_string(),
    })
    .expect("request serializes");
    req.push('\n');
    write.write_all(req.as_bytes()).await?;
    let mut lines = BufReader::new(read).lines();
    let mut last = None;
    while let Some(line) = lines.next_line().await? {
        let p: Progress = serde_json::from_str(&line)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        each(&p);
        let done = p.finished();
        last = Some(p);
        if done {
            break;
        }
    }
    last.ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the prefetch API closed without an answer",
        )
    })
}
