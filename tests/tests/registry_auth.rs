//! The snapshotter's registry client against a real registry (Debian's docker-registry) that
//! wants HTTPS and Basic auth (htpasswd): convert pushes to it and a lazy layer reads from it
//! with the configured CA and credentials; without the credentials, or without trusting the
//! CA, the errors say what failed and where.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use kite_e2e::{require_setup, RegistryProcess, IMAGE};
use kite_estargz::TOC_DIGEST_ANNOTATION;
use kite_snapshotter::convert::{convert_image, ConvertOptions};
use kite_snapshotter::lazy::cache::ChunkCache;
use kite_snapshotter::lazy::layer::LayerSource;
use kite_snapshotter::lazy::remote::LazyLayers;
use kite_snapshotter::registry::{Credential, ImageRef, RegistryClient, RegistryOptions};

/// A loopback address that is not 127.0.0.1, so the client speaks HTTPS to it.
const HOST: &str = "127.0.0.2:5079";

fn options(ca: Option<&[u8]>, user: Option<(&str, &str)>) -> RegistryOptions {
    let mut credentials = BTreeMap::new();
    if let Some((u, p)) = user {
        credentials.insert(
            HOST.to_string(),
            Credential {
                username: u.into(),
                password: p.into(),
            },
        );
    }
    RegistryOptions {
        ca_pems: ca.map(|c| vec![c.to_vec()]).unwrap_or_default(),
        credentials,
        attempts: 2,
        first_backoff: Duration::from_millis(50),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_basic_auth_work_and_fail_clearly() {
    tokio::task::spawn_blocking(require_setup).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A CA and a server certificate it signs (rustls refuses a CA certificate as a server's).
    let p = |f: &str| dir.path().join(f);
    let (ca_cert, cert, key) = (p("ca.pem"), p("cert.pem"), p("key.pem"));
    std::fs::write(
        p("ext.cnf"),
        "subjectAltName=IP:127.0.0.2\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    for args in [
        vec![
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=kite-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
        vec![
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.2",
            "-keyout",
            "key.pem",
            "-out",
            "server.csr",
        ],
        vec![
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
            "-out",
            "cert.pem",
        ],
    ] {
        let made = Command::new("openssl")
            .args(&args)
            .current_dir(dir.path())
            .stderr(Stdio::null())
            .status()
            .expect("openssl");
        assert!(made.success(), "openssl {}", args.join(" "));
    }
    let hash = bcrypt::hash("s3cret", 5).unwrap();
    std::fs::write(dir.path().join("htpasswd"), format!("kite:{hash}\n")).unwrap();
    let config = dir.path().join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {data}\n\
             auth:\n  htpasswd:\n    realm: kite-test\n    path: {htpasswd}\n\
             http:\n  addr: {HOST}\n  tls:\n    certificate: {cert}\n    key: {key}\n",
            data = dir.path().join("data").display(),
            htpasswd = dir.path().join("htpasswd").display(),
            cert = cert.display(),
            key = key.display(),
        ),
    )
    .unwrap();
    let _registry = RegistryProcess::start(&config, HOST);
    let ca = std::fs::read(&ca_cert).unwrap();
    let dst = ImageRef::parse(&format!("{HOST}/kite/auth:1")).unwrap();
    let src = ImageRef::parse(IMAGE).unwrap();

    // Trusted CA and credentials: push, resolve, read lazily.
    let good = Arc::new(RegistryClient::new(options(Some(&ca), Some(("kite", "s3cret")))).unwrap());
    // (The source is the local plain, open registry: the same client reaches both.)
    let converted = convert_image(&good, &src, &dst, &ConvertOptions::default(), &|_, _, _| {})
        .await
        .expect("convert and push over HTTPS with Basic auth");
    let resolved = good.resolve(&dst).await.expect("resolve with credentials");
    assert_eq!(resolved.digest, converted.manifest_digest);
    let layer = &converted.layers[0];
    let source = LayerSource {
        image: dst.to_string(),
        layer_digest: layer.digest.clone(),
        toc_digest: layer.annotations[TOC_DIGEST_ANNOTATION].clone(),
    };
    let cache = Arc::new(ChunkCache::open(&dir.path().join("cache"), 64 << 20).unwrap());
    let lazy = LazyLayers::new(dir.path(), cache, good.clone(), None);
    let index = lazy.load_index(&source).await.expect("the TOC over HTTPS");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    lazy.mount(&source, index, &mnt).unwrap();
    let busybox = mnt.join("bin/busybox");
    let head = tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(busybox).unwrap();
        let mut b = [0u8; 4];
        std::io::Read::read_exact(&mut f, &mut b).map(|_| b)
    })
    .await
    .unwrap()
    .expect("read through the lazy layer");
    assert_eq!(&head, b"\x7fELF");
    lazy.unmount(&mnt).unwrap();

    // No credentials: the registry's Basic challenge is answered with a clear error.
    let anonymous = RegistryClient::new(options(Some(&ca), None)).unwrap();
    let e = anonymous.resolve(&dst).await.unwrap_err();
    let e = kite_protocol::errors::error_chain(&e);
    assert!(e.contains(HOST) && e.contains("Basic"), "{e}");
    // Wrong password: the registry refuses; the error names the URL and the status.
    let wrong = RegistryClient::new(options(Some(&ca), Some(("kite", "nope")))).unwrap();
    let e = wrong.resolve(&dst).await.unwrap_err();
    let e = kite_protocol::errors::error_chain(&e);
    assert!(e.contains(HOST) && e.contains("401"), "{e}");
    // The CA not trusted: the TLS failure names the URL.
    let untrusting = RegistryClient::new(options(None, Some(("kite", "s3cret")))).unwrap();
    let e = untrusting.resolve(&dst).await.unwrap_err();
    let e = kite_protocol::errors::error_chain(&e);
    assert!(e.contains(&format!("https://{HOST}/v2/")), "{e}");
}
