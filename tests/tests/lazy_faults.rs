//! Lazy layers under faults, against a real registry (Debian's docker-registry) started by the
//! test on a port of its own so it can be stopped: reads of cached chunks go on while the
//! registry is down, a read that needs it fails with EIO after the retries (never with wrong
//! bytes) and works again when the registry is back; a layer whose data does not match its TOC,
//! and a TOC that does not match its digest, are refused; prefetch requests share one fetch and
//! report a registry outage.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kite_e2e::{require_setup, RegistryProcess, IMAGE};
use kite_estargz::TOC_DIGEST_ANNOTATION;
use kite_protocol::prefetch::{PrefetchProgress as Progress, PrefetchState};
use kite_protocol::prefetch_client::is_final;
use kite_snapshotter::convert::{convert_image, ConvertOptions};
use kite_snapshotter::lazy::cache::ChunkCache;
use kite_snapshotter::lazy::layer::LayerSource;
use kite_snapshotter::lazy::prefetch::Prefetcher;
use kite_snapshotter::lazy::remote::LazyLayers;
use kite_snapshotter::registry::{ImageRef, RegistryClient, RegistryOptions};

const PORT: u16 = 5077;
const CHUNK: u64 = 64 << 10;

/// The test's own registry (plain HTTP on loopback), storing under `dir`.
fn start_registry(dir: &Path) -> RegistryProcess {
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{PORT}\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    RegistryProcess::start(&config, &format!("127.0.0.1:{PORT}"))
}

/// bin/busybox as the original image has it (the reference bytes).
async fn original_busybox(client: &RegistryClient) -> Vec<u8> {
    let image = ImageRef::parse(IMAGE).unwrap();
    let resolved = client.resolve(&image).await.unwrap();
    for layer in &resolved.manifest.layers {
        let blob = client.blob(&image, &layer.digest).await.unwrap();
        let mut a = tar::Archive::new(flate2::read::GzDecoder::new(&blob[..]));
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            if e.path().unwrap().to_str() == Some("bin/busybox") {
                let mut v = Vec::new();
                e.read_to_end(&mut v).unwrap();
                return v;
            }
        }
    }
    panic!("no bin/busybox in {IMAGE}");
}

/// Reads `len` bytes at `offset`, with readahead off (so only the chunks asked for are
/// fetched).
fn read_at(path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let f = std::fs::File::open(path)?;
    nix::fcntl::posix_fadvise(
        std::os::fd::AsRawFd::as_raw_fd(&f),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_RANDOM,
    )?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Drops the page cache, so reads reach the FUSE filesystem again.
fn drop_page_cache() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop the page cache (root)");
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_give_eio_never_wrong_bytes_and_bad_layers_are_refused() {
    blocking(require_setup).await;
    let dir = tempfile::tempdir().unwrap();
    let mut registry = start_registry(dir.path());
    let client = Arc::new(
        RegistryClient::new(RegistryOptions {
            attempts: 3,
            first_backoff: Duration::from_millis(50),
            ..Default::default()
        })
        .unwrap(),
    );
    let reference = original_busybox(&client).await;
    assert!(reference.len() > 4 * CHUNK as usize);

    // Small chunks, so busybox is many chunks; nothing prioritized, no background fetch: only
    // what is read is fetched.
    let dst = ImageRef::parse(&format!("127.0.0.1:{PORT}/kite/faults:1")).unwrap();
    let options = ConvertOptions {
        chunk_size: CHUNK,
        prioritized: Vec::new(),
    };
    let converted = convert_image(
        &client,
        &ImageRef::parse(IMAGE).unwrap(),
        &dst,
        &options,
        &|_, _, _| {},
    )
    .await
    .expect("convert into the test registry");
    let layer = &converted.layers[0];
    let src = LayerSource {
        image: dst.to_string(),
        layer_digest: layer.digest.clone(),
        toc_digest: layer.annotations[TOC_DIGEST_ANNOTATION].clone(),
    };
    let cache = Arc::new(ChunkCache::open(&dir.path().join("cache"), 64 << 20).unwrap());
    let lazy = LazyLayers::new(dir.path(), cache, client.clone(), None);
    let index = lazy.load_index(&src).await.expect("the TOC loads");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    lazy.mount(&src, index, &mnt).expect("mount the lazy layer");
    let busybox = mnt.join("bin/busybox");

    // Reads fetch exactly the bytes of the original.
    let head = blocking({
        let p = busybox.clone();
        move || read_at(&p, 0, CHUNK as usize)
    })
    .await
    .expect("read the first chunk");
    assert_eq!(head, reference[..CHUNK as usize]);
    let requests = lazy
        .stats
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);

    // Registry down: the cached chunk is still served; an uncached one is EIO after retries.
    registry.down();
    blocking(drop_page_cache).await;
    let again = blocking({
        let p = busybox.clone();
        move || read_at(&p, 0, CHUNK as usize)
    })
    .await
    .expect("a cached chunk with the registry down");
    assert_eq!(again, reference[..CHUNK as usize]);
    let far = 3 * CHUNK;
    let started = Instant::now();
    let err = blocking({
        let p = busybox.clone();
        move || read_at(&p, far, 4096)
    })
    .await
    .map(|b| b.len())
    .expect_err("an uncached chunk with the registry down");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "EIO took {:?}",
        started.elapsed()
    );
    assert!(lazy.stats.errors.load(std::sync::atomic::Ordering::Relaxed) > 0);

    // Back up: the same read works and is right.
    registry.up();
    let back = blocking({
        let p = busybox.clone();
        move || read_at(&p, far, 4096)
    })
    .await
    .expect("the read once the registry is back");
    assert_eq!(back, reference[far as usize..far as usize + 4096]);
    assert!(
        lazy.stats
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
            > requests
    );
    lazy.unmount(&mnt).unwrap();
    assert!(!kite_snapshotter::lazy::fs::is_mounted(&mnt));

    // A layer whose data does not match its TOC: flip a byte inside busybox's second chunk
    // (the TOC, and so its digest, unchanged). Reading it is EIO, never the wrong bytes.
    let blob = client.blob(&dst, &src.layer_digest).await.unwrap();
    let index = lazy.load_index(&src).await.unwrap();
    let (_, chunks) = index.file("bin/busybox").unwrap();
    let victim = &chunks[1];
    let mut bad = blob.to_vec();
    bad[(victim.blob_offset + 30) as usize] ^= 0x55;
    let bad_digest = client.push_blob(&dst, bad.into()).await.unwrap();
    let bad_src = LayerSource {
        layer_digest: bad_digest,
        ..src.clone()
    };
    // Fresh cache: the good layer's chunks (same digests) must not hide the damage.
    let cache = Arc::new(ChunkCache::open(&dir.path().join("cache2"), 64 << 20).unwrap());
    let lazy2 = LazyLayers::new(dir.path(), cache, client.clone(), None);
    let index = lazy2.load_index(&bad_src).await.unwrap();
    let mnt2 = dir.path().join("mnt2");
    std::fs::create_dir(&mnt2).unwrap();
    lazy2.mount(&bad_src, index, &mnt2).unwrap();
    let p = mnt2.join("bin/busybox");
    let offset = victim.file_offset;
    let err = blocking(move || read_at(&p, offset, 4096))
        .await
        .expect_err("a chunk that does not match its digest");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let p = mnt2.join("bin/busybox");
    let ok = blocking(move || read_at(&p, 0, 4096)).await.unwrap();
    assert_eq!(
        ok,
        reference[..4096],
        "an intact chunk of the damaged layer"
    );
    lazy2.unmount(&mnt2).unwrap();

    // A TOC that does not match the manifest's digest is refused (the layer is unpacked
    // normally instead).
    let lying = LayerSource {
        toc_digest: format!("sha256:{}", "0".repeat(64)),
        ..src.clone()
    };
    let e = lazy2.load_index(&lying).await.unwrap_err();
    let e = kite_protocol::errors::error_chain(&e);
    assert!(e.contains("digest") && e.contains(&src.layer_digest), "{e}");

    // Prefetch: requests for an image under way join it (one fetch); with the registry down
    // it fails after the retries, with the reason; once it is back the prioritized file is
    // fetched into the cache.
    let prio = ImageRef::parse(&format!("127.0.0.1:{PORT}/kite/prefetch:1")).unwrap();
    let options = ConvertOptions {
        chunk_size: CHUNK,
        prioritized: vec!["bin/busybox".into()],
    };
    convert_image(
        &client,
        &ImageRef::parse(IMAGE).unwrap(),
        &prio,
        &options,
        &|_, _, _| {},
    )
    .await
    .unwrap();
    let cache = Arc::new(ChunkCache::open(&dir.path().join("cache3"), 64 << 20).unwrap());
    let lazy3 = Arc::new(LazyLayers::new(dir.path(), cache, client.clone(), None));
    let prefetcher = Prefetcher::new(lazy3.clone());
    registry.down();
    let (mut first, joined_first) = prefetcher.start(&prio.to_string());
    let (mut second, joined_second) = prefetcher.start(&prio.to_string());
    assert!(!joined_first && joined_second);
    let failed = finish(&mut first).await;
    assert_eq!(failed.state, PrefetchState::FAILED.into());
    assert!(failed.error.contains("127.0.0.1:5077"), "{}", failed.error);
    assert_eq!(finish(&mut second).await, failed);
    assert_eq!(lazy3.stats.prefetches.load(Ordering::Relaxed), 1);
    registry.up();
    let (mut again, _) = prefetcher.start(&prio.to_string());
    let done = finish(&mut again).await;
    assert_eq!(done.state, PrefetchState::DONE.into(), "{}", done.error);
    assert_eq!((done.lazy_layers, done.layers_done), (1, 1));
    assert_eq!(done.prefetched_bytes, reference.len() as u64);
    assert!(lazy3.cache().stats().bytes >= reference.len() as u64);
}

async fn finish(rx: &mut tokio::sync::watch::Receiver<Progress>) -> Progress {
    loop {
        if is_final(&rx.borrow_and_update()) {
            return rx.borrow().clone();
        }
        if rx.changed().await.is_err() {
            return rx.borrow().clone();
        }
    }
}
