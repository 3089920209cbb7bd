//! What the scenario benchmarks share (hack/bench-*.sh run them): a paced link to the
//! registry, the generated "big app" image, resets of the snapshotter's caches, statistics.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kite_snapshotter::registry::{Descriptor, ImageRef, Manifest, RegistryClient, RegistryOptions};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cri::Cri;
use crate::IMAGE;

/// The paced proxy's port in front of the registry (containerd's config has a mirror for it).
pub const PROXY_PORT: u16 = 5050;
const FILE_MIB: usize = 64;
/// kite-snapshotter's root (its snapshots, chunk cache and TOCs).
pub const ROOT: &str = "/var/lib/kite/snapshotter";

/// Incompressible bytes, fast (xorshift64*), reproducible per seed.
pub fn random_fill(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// The scenario's arguments `[ROUNDS] [TOTAL_MIB] [START_MIB] [RATE_MB]`, each defaulting to
/// its entry of `defaults`.
pub fn scenario_args(defaults: [usize; 4]) -> [usize; 4] {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut out = defaults;
    for (i, v) in out.iter_mut().enumerate() {
        if let Some(a) = args.get(i).and_then(|a| a.parse().ok()) {
            *v = a;
        }
    }
    out
}

/// A registry client for building the benchmarks' images (a few retries).
pub fn registry_client() -> RegistryClient {
    RegistryClient::new(RegistryOptions {
        attempts: 3,
        first_backoff: Duration::from_millis(200),
        ..Default::default()
    })
    .expect("a registry client")
}

/// The accelerator kite's VMs get on this machine ("KVM" when the CPU exposes vmx/svm, else
/// "TCG"), for labelling absolute figures.
pub fn accelerator() -> &'static str {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if cpu.split_whitespace().any(|f| f == "vmx" || f == "svm") {
        "KVM"
    } else {
        "TCG"
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// median, min, max
pub fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

/// A TCP proxy to the registry whose responses share one link of `rate` bytes/s.
pub async fn throttling_proxy(rate: f64) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", PROXY_PORT))
        .await
        .expect("bind the throttling proxy");
    let link = Arc::new(Mutex::new(Instant::now()));
    loop {
        let (client, _) = listener.accept().await.unwrap();
        let link = link.clone();
        tokio::spawn(async move {
            let Ok(server) = tokio::net::TcpStream::connect("127.0.0.1:5000").await else {
                return;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let up = tokio::spawn(async move {
                let _ = tokio::io::copy(&mut cr, &mut sw).await;
                let _ = sw.shutdown().await;
            });
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match sr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                // Reserve the link for n bytes after whatever is queued on it.
                let at = {
                    let mut next = link.lock().unwrap();
                    let at = (*next).max(Instant::now());
                    *next = at + Duration::from_secs_f64(n as f64 / rate);
                    *next
                };
                tokio::time::sleep_until(at.into()).await;
                if cw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = cw.shutdown().await;
            up.abort();
        });
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// Pushes busybox + the app layer as `name:tag` (on the real registry); returns the app
/// layer's compressed size.
pub async fn push_full_image(
    client: &RegistryClient,
    dst: &ImageRef,
    total_mib: usize,
    start_mib: usize,
) -> u64 {
    let file = |mib: usize, seed: u64| {
        let mut data = vec![0u8; mib << 20];
        random_fill(&mut data, seed);
        data
    };
    let mut files = vec![("app/start.dat".to_string(), file(start_mib, 1))];
    let mut left = total_mib.saturating_sub(start_mib);
    let mut n: u64 = 0;
    while left > 0 {
        let mib = left.min(FILE_MIB);
        files.push((format!("app/data/blob-{n:03}"), file(mib, 100 + n)));
        left -= mib;
        n += 1;
    }
    push_image_with_files(client, dst, &files).await
}

/// Pushes busybox (from [`IMAGE`]) + a layer of `files` (path, content) as `dst`; returns that
/// layer's compressed size.
pub async fn push_image_with_files(
    client: &RegistryClient,
    dst: &ImageRef,
    files: &[(String, Vec<u8>)],
) -> u64 {
    let base = ImageRef::parse(IMAGE).unwrap();
    let resolved = client.resolve(&base).await.unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let diff_id = format!("sha256:{:x}", Sha256::digest(&tar));
    let layer = gzip(&tar);
    let size = layer.len() as u64;
    let mut layers = Vec::new();
    for l in &resolved.manifest.layers {
        let blob = client.blob(&base, &l.digest).await.unwrap();
        client.push_blob(dst, blob).await.unwrap();
        layers.push(l.clone());
    }
    let digest = client.push_blob(dst, layer.into()).await.unwrap();
    layers.push(Descriptor {
        media_type: kite_snapshotter::registry::OCI_LAYER_GZIP.into(),
        digest,
        size,
        ..Default::default()
    });
    let config_raw = client
        .blob(&base, &resolved.manifest.config.digest)
        .await
        .unwrap();
    let mut config: serde_json::Value = serde_json::from_slice(&config_raw).unwrap();
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .unwrap()
        .push(diff_id.into());
    let config = bytes::Bytes::from(serde_json::to_vec(&config).unwrap());
    let config_size = config.len() as u64;
    let config_digest = client.push_blob(dst, config).await.unwrap();
    let manifest = Manifest {
        schema_version: 2,
        media_type: kite_snapshotter::registry::OCI_MANIFEST.into(),
        config: Descriptor {
            media_type: "application/vnd.oci.image.config.v1+json".into(),
            digest: config_digest,
            size: config_size,
            ..Default::default()
        },
        layers,
        annotations: Default::default(),
    };
    client
        .push_manifest(
            dst,
            kite_snapshotter::registry::OCI_MANIFEST,
            serde_json::to_vec(&manifest).unwrap().into(),
        )
        .await
        .unwrap();
    size
}

pub fn snapshotter_metric(name: &str) -> u64 {
    let out = Command::new("curl")
        .args(["-sf", "http://127.0.0.1:9471/metrics"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("kite_snapshotter_{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Every image of the benchmark gone, the chunk cache and TOCs empty, the snapshotter fresh.
pub async fn reset_images(c: &mut Cri, images: &[String]) {
    for i in images {
        let _ = c.remove_image(i).await;
    }
    tokio::task::spawn_blocking(|| {
        // kite-lazyfs owns the chunk cache: it stops too, and starts again empty.
        crate::snapshotter_script("stop-all");
        for d in ["cache", "tocs"] {
            let _ = std::fs::remove_dir_all(Path::new(ROOT).join(d));
        }
        crate::snapshotter_script("start");
        crate::wait_snapshotter_reachable();
    })
    .await
    .unwrap();
}
