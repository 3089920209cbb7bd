//! Lazy pull benchmark through the CRI (hack/bench-lazy.sh runs it), all variants in one run:
//!
//! - an image generated here: busybox plus an app layer of TOTAL MiB of incompressible files, of
//!   which the container's start reads START MiB (`cat /app/start.dat; echo ready`);
//! - pulled through a registry link throttled to RATE MB/s (a pacing proxy on 127.0.0.1:5050 in
//!   front of the local registry: this kernel has no shaping qdiscs);
//! - time from PullImage to the container's first output (runc), N rounds of: the full image
//!   (containerd downloads and unpacks it), the eStargz image (lazy), and the eStargz image
//!   with its start-up files prioritized and the prefetch API called when the pull starts;
//!   the chunk cache and TOCs are emptied before each;
//! - bytes fetched from the registry before the first output;
//! - read throughput of the app files through the lazy layer's FUSE mount (chunks cached,
//!   page cache dropped) against the same files unpacked on the overlayfs-style snapshot.
//!
//!     cargo run --release -p kite-e2e --example lazy_bench -- [N] [TOTAL_MIB] [START_MIB] [RATE_MB]

use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use kite_e2e::bench::{ms, push_full_image, spread, throttling_proxy, PROXY_PORT, ROOT};
use kite_e2e::cri::{status_message, Cri, RemoveOnDrop, RUNC};
use kite_snapshotter::convert::{convert_image, ConvertOptions};
use kite_snapshotter::registry::ImageRef;

struct Round {
    first_output: f64,
    pull: f64,
    fetched: u64,
}

async fn round(c: &mut Cri, image: &str, prefetch: bool, name: &str) -> Round {
    let t0 = Instant::now();
    let fetched0 = kite_e2e::bench::snapshotter_metric("fetched_bytes_total");
    if prefetch {
        let image = image.to_string();
        tokio::spawn(async move {
            let socket = Path::new("/run/kite/prefetch.sock");
            match kite_protocol::prefetch_client::prefetch(socket, &image, |_| {}).await {
                Ok(p) if !p.error.is_empty() => eprintln!("prefetch {image}: {}", p.error),
                Ok(_) => {}
                Err(e) => eprintln!("{}", kite_protocol::errors::error_chain(&e)),
            }
        });
    }
    c.pull(image)
        .await
        .unwrap_or_else(|e| panic!("pull {image}: {}", status_message(&e)));
    let pull = ms(t0.elapsed());
    let pod = c
        .run_pod(name, RUNC, &[])
        .await
        .unwrap_or_else(|e| panic!("run pod: {}", status_message(&e)));
    let _cleanup = RemoveOnDrop(pod.id.clone());
    c.run_container(
        &pod,
        "app",
        0,
        image,
        &[
            "sh",
            "-c",
            "cat /app/start.dat > /dev/null; echo ready; exec sleep 100000",
        ],
    )
    .await;
    let log = pod.log_dir().join("app/0.log");
    loop {
        if std::fs::read_to_string(&log).is_ok_and(|l| l.contains("ready")) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "no output from {image}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first_output = ms(t0.elapsed());
    let fetched = kite_e2e::bench::snapshotter_metric("fetched_bytes_total") - fetched0;
    c.remove_pod(&pod.id).await.unwrap();
    Round {
        first_output,
        pull,
        fetched,
    }
}

fn drop_page_cache() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

/// MB/s reading every file under `dir` once.
fn read_throughput(dir: &Path) -> f64 {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    let t = Instant::now();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut f = std::fs::File::open(f).unwrap();
        loop {
            let n = std::io::Read::read(&mut f, &mut buf).unwrap();
            if n == 0 {
                break;
            }
            bytes += n as u64;
        }
    }
    bytes as f64 / 1e6 / t.elapsed().as_secs_f64()
}

/// The app directory of the snapshot holding it: lazy (a fuse.kite mount) or unpacked.
fn app_dirs() -> (Option<PathBuf>, Option<PathBuf>) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let (mut lazy, mut unpacked) = (None, None);
    for e in std::fs::read_dir(Path::new(ROOT).join("snapshots"))
        .unwrap()
        .flatten()
    {
        let fs = e.path().join("fs");
        if !fs.join("app/start.dat").exists() {
            continue;
        }
        let is_fuse = mounts
            .lines()
            .any(|l| l.contains(" - fuse.kite ") && l.split(' ').nth(4) == fs.to_str());
        if is_fuse {
            lazy = Some(fs.join("app"));
        } else {
            unpacked = Some(fs.join("app"));
        }
    }
    (lazy, unpacked)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let [rounds, total, start, rate] = kite_e2e::bench::scenario_args([3, 1024, 20, 50]);
    kite_e2e::require_setup();
    let client = kite_e2e::bench::registry_client();
    let tag = format!("{total}m-{start}m");
    let at = |port: u16, name: &str| format!("127.0.0.1:{port}/kite/lazybench:{name}-{tag}");
    let full = ImageRef::parse(&at(5000, "full")).unwrap();
    eprintln!("building {full} ({total} MiB app layer, {start} MiB read at start)");
    let app_size = push_full_image(&client, &full, total, start).await;
    let t = Instant::now();
    let lazy = ImageRef::parse(&at(5000, "esgz")).unwrap();
    convert_image(
        &client,
        &full,
        &lazy,
        &ConvertOptions::default(),
        &|_, _, _| {},
    )
    .await
    .unwrap();
    let prio = ImageRef::parse(&at(5000, "esgz-prio")).unwrap();
    let options = ConvertOptions {
        prioritized: vec!["bin/busybox".into(), "app/start.dat".into()],
        ..Default::default()
    };
    convert_image(&client, &full, &prio, &options, &|_, _, _| {})
        .await
        .unwrap();
    eprintln!("converted both in {:.1} s", t.elapsed().as_secs_f64());

    tokio::spawn(throttling_proxy(rate as f64 * 1e6));
    let variants = [
        ("full pull", at(PROXY_PORT, "full"), false),
        ("lazy", at(PROXY_PORT, "esgz"), false),
        ("lazy+prefetch", at(PROXY_PORT, "esgz-prio"), true),
    ];
    let images: Vec<String> = variants.iter().map(|v| v.1.clone()).collect();
    let mut c = Cri::connect().await;
    let mut results: Vec<Vec<Round>> = variants.iter().map(|_| Vec::new()).collect();
    for r in 0..rounds {
        for (i, (label, image, prefetch)) in variants.iter().enumerate() {
            kite_e2e::bench::reset_images(&mut c, &images).await;
            let out = round(&mut c, image, *prefetch, &format!("lazybench-{r}-{i}")).await;
            eprintln!(
                "round {r} {label}: first output {:.0} ms (pull {:.0} ms), fetched {:.1} MB",
                out.first_output,
                out.pull,
                out.fetched as f64 / 1e6
            );
            results[i].push(out);
        }
    }

    println!(
        "\nlazy pull, {total} MiB app layer ({:.0} MB compressed), {start} MiB read at start, \
         registry link {rate} MB/s, runc, {rounds} rounds (median [min–max])",
        app_size as f64 / 1e6
    );
    let full_median = spread(
        &results[0]
            .iter()
            .map(|r| r.first_output)
            .collect::<Vec<_>>(),
    )
    .0;
    for (i, (label, _, _)) in variants.iter().enumerate() {
        let (m, lo, hi) = spread(
            &results[i]
                .iter()
                .map(|r| r.first_output)
                .collect::<Vec<_>>(),
        );
        let (p, _, _) = spread(&results[i].iter().map(|r| r.pull).collect::<Vec<_>>());
        let fetched = spread(
            &results[i]
                .iter()
                .map(|r| r.fetched as f64 / 1e6)
                .collect::<Vec<_>>(),
        )
        .0;
        let fetched = if i == 0 {
            "all (containerd downloads it)".to_string()
        } else {
            format!("{fetched:.1} MB")
        };
        println!(
            "  {label:14} first output {m:8.0} ms [{lo:.0}–{hi:.0}]  pull {p:8.0} ms  \
             {:5.1}% of full  fetched before output: {fetched}",
            100.0 * m / full_median
        );
    }

    // Read throughput: the lazy layer fully cached vs the same files unpacked.
    kite_e2e::bench::reset_images(&mut c, &images).await;
    c.pull(&at(PROXY_PORT, "full")).await.unwrap();
    c.pull(&at(PROXY_PORT, "esgz-prio")).await.unwrap();
    let (lazy_dir, unpacked_dir) = tokio::task::spawn_blocking(app_dirs).await.unwrap();
    let (lazy_dir, unpacked_dir) = (
        lazy_dir.expect("a lazy app layer"),
        unpacked_dir.expect("an unpacked app layer"),
    );
    let (fuse, overlay, fuse_warm, overlay_warm) = tokio::task::spawn_blocking(move || {
        read_throughput(&lazy_dir); // fetches whatever the background has not
        drop_page_cache();
        let fuse = read_throughput(&lazy_dir);
        let fuse_warm = read_throughput(&lazy_dir);
        drop_page_cache();
        let overlay = read_throughput(&unpacked_dir);
        let overlay_warm = read_throughput(&unpacked_dir);
        (fuse, overlay, fuse_warm, overlay_warm)
    })
    .await
    .unwrap();
    println!(
        "  read {total} MiB, page cache dropped: FUSE (chunks cached) {fuse:.0} MB/s, unpacked \
         {overlay:.0} MB/s ({:.0}%); page cache warm: FUSE {fuse_warm:.0} MB/s, unpacked \
         {overlay_warm:.0} MB/s ({:.0}%)",
        100.0 * fuse / overlay,
        100.0 * fuse_warm / overlay_warm
    );
    for i in &images {
        let _ = c.remove_image(i).await;
    }
}
