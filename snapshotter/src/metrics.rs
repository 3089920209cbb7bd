//! The Prometheus endpoint: `GET /metrics` on `metrics_address`, text format.
//!
//! Served by hand on a tokio listener: one route and a few gauges do not need an HTTP stack.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::warn;

use crate::snapshots::service::OverlaySnapshotter;

/// Renders the metrics text.
pub async fn render(sn: &OverlaySnapshotter) -> String {
    let counts = sn.counts().await;
    let mut out = String::from(
        "# HELP kite_snapshotter_snapshots Snapshots the snapshotter holds, by kind.\n\
         # TYPE kite_snapshotter_snapshots gauge\n",
    );
    for (kind, n) in counts {
        out.push_str(&format!(
            "kite_snapshotter_snapshots{{kind=\"{kind}\"}} {n}\n"
        ));
    }
    if let Some(lazy) = sn.lazy() {
        let (up, s) = match lazy.stats().await {
            Ok(s) => (1, s),
            Err(_) => (0, Default::default()),
        };
        let c = s.cache;
        let rows: [(&str, &str, &str, u64); 12] = [
            (
                "lazyfs_up",
                "gauge",
                "Whether kite-lazyfs (which serves lazy layers) answers.",
                up,
            ),
            (
                "prefetches_total",
                "counter",
                "Image prefetches started by the prefetch API (joined requests not counted).",
                s.prefetches,
            ),
            (
                "lazy_layers_mounted",
                "gauge",
                "Lazily mounted eStargz layers.",
                s.mounted,
            ),
            (
                "fetched_bytes_total",
                "counter",
                "Bytes fetched from registries for lazy layers (ranges, TOCs).",
                s.fetched_bytes,
            ),
            (
                "fetch_requests_total",
                "counter",
                "Range requests to registries.",
                s.fetch_requests,
            ),
            (
                "fetched_chunks_total",
                "counter",
                "Chunks fetched, verified and cached.",
                s.fetched_chunks,
            ),
            (
                "fetch_errors_total",
                "counter",
                "Fetches that failed (after retries) or did not verify.",
                s.fetch_errors,
            ),
            (
                "chunk_cache_bytes",
                "gauge",
                "Bytes in the on-disk chunk cache.",
                c.bytes,
            ),
            (
                "chunk_cache_chunks",
                "gauge",
                "Chunks in the on-disk chunk cache.",
                c.chunks,
            ),
            (
                "chunk_cache_hits_total",
                "counter",
                "Reads served from the chunk cache.",
                c.hits,
            ),
            (
                "chunk_cache_misses_total",
                "counter",
                "Reads that had to fetch.",
                c.misses,
            ),
            (
                "chunk_cache_evictions_total",
                "counter",
                "Chunks evicted (least recently used).",
                c.evicted,
            ),
        ];
        for (name, kind, help, v) in rows {
            out.push_str(&format!(
                "# HELP kite_snapshotter_{name} {help}\n# TYPE kite_snapshotter_{name} {kind}\nkite_snapshotter_{name} {v}\n"
            ));
        }
    }
    out
}

/// Serves until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, sn: Arc<OverlaySnapshotter>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let sn = sn.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = conn.read(&mut buf).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if request.starts_with("GET /metrics") {
                ("200 OK", render(&sn).await)
            } else {
                ("404 Not Found", "not found: try /metrics\n".to_string())
            };
            let reply = format!(
                "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if let Err(e) = conn.write_all(reply.as_bytes()).await {
                warn!("metrics: {e}");
            }
        });
    }
}
