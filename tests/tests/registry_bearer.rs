//! The snapshotter's registry client against a real registry (Debian's docker-registry) that
//! wants Bearer tokens: its challenge sends the client to a token service (a small one in this
//! test, checking Basic credentials and signing RS256 JWTs the registry verifies against its
//! root certificate), and pushes (convert), pulls and range reads work with the token; without
//! credentials the token service's refusal is the error.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use kite_e2e::{require_setup, RegistryProcess, IMAGE};
use kite_snapshotter::convert::{convert_image, ConvertOptions};
use kite_snapshotter::registry::{Credential, ImageRef, RegistryClient, RegistryOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const REGISTRY: &str = "127.0.0.1:5080";
const TOKENS: &str = "127.0.0.1:5081";
const ISSUER: &str = "kite-test-issuer";
const SERVICE: &str = "kite-test-registry";

/// The token service: `GET /token?scope=repository:NAME:ACTIONS&service=…` with Basic
/// `kite:s3cret` gets a JWT granting those actions; anything else gets 401.
async fn token_service(key: jsonwebtoken::EncodingKey, cert_der_b64: String) {
    let listener = tokio::net::TcpListener::bind(TOKENS).await.unwrap();
    let want = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("kite:s3cret")
    );
    loop {
        let (mut conn, _) = listener.accept().await.unwrap();
        let (key, cert, want) = (key.clone(), cert_der_b64.clone(), want.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let n = conn.read(&mut buf).await.unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]).into_owned();
            let authorized = req.lines().any(|l| {
                l.to_ascii_lowercase().starts_with("authorization:") && l[14..].trim() == want
            });
            let path = req.split_whitespace().nth(1).unwrap_or("");
            let scope = path
                .split(['?', '&'])
                .find_map(|kv| kv.strip_prefix("scope="))
                .map(|s| {
                    s.replace("%3A", ":")
                        .replace("%2F", "/")
                        .replace("%2C", ",")
                })
                .unwrap_or_default();
            let (status, body) = if !authorized {
                (
                    "401 Unauthorized",
                    r#"{"details":"bad credentials"}"#.to_string(),
                )
            } else {
                let mut parts = scope.splitn(3, ':');
                let (kind, name, actions) = (
                    parts.next().unwrap_or(""),
                    parts.next().unwrap_or(""),
                    parts.next().unwrap_or(""),
                );
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                let claims = serde_json::json!({
                    "iss": ISSUER, "sub": "kite", "aud": SERVICE,
                    "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("{now}-{n}"),
                    "access": [{"type": kind, "name": name,
                                "actions": actions.split(',').collect::<Vec<_>>()}],
                });
                let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
                header.x5c = Some(vec![cert]);
                let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
                ("200 OK", serde_json::json!({ "token": token }).to_string())
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(reply.as_bytes()).await;
        });
    }
}

fn client(user: Option<(&str, &str)>) -> RegistryClient {
    let mut options = RegistryOptions {
        attempts: 2,
        first_backoff: Duration::from_millis(50),
        ..Default::default()
    };
    if let Some((u, p)) = user {
        // Credentials are looked up by the registry's host.
        options.credentials.insert(
            REGISTRY.to_string(),
            Credential {
                username: u.into(),
                password: p.into(),
            },
        );
    }
    RegistryClient::new(options).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_from_the_registrys_token_service() {
    tokio::task::spawn_blocking(require_setup).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=kite-test-token-signer",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
        ])
        .current_dir(dir.path())
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(made.success(), "make the token signer's certificate");
    let der = Command::new("openssl")
        .args(["x509", "-in", "cert.pem", "-outform", "DER"])
        .current_dir(dir.path())
        .output()
        .unwrap()
        .stdout;
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(
        &std::fs::read(dir.path().join("key.pem")).unwrap(),
    )
    .unwrap();
    tokio::spawn(token_service(
        key,
        base64::engine::general_purpose::STANDARD.encode(der),
    ));
    let config = dir.path().join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {data}\n\
             auth:\n  token:\n    realm: http://{TOKENS}/token\n    service: {SERVICE}\n    \
             issuer: {ISSUER}\n    rootcertbundle: {cert}\n\
             http:\n  addr: {REGISTRY}\n",
            data = dir.path().join("data").display(),
            cert = dir.path().join("cert.pem").display(),
        ),
    )
    .unwrap();
    let _registry = RegistryProcess::start(&config, REGISTRY);

    let good = Arc::new(client(Some(("kite", "s3cret"))));
    let dst = ImageRef::parse(&format!("{REGISTRY}/kite/bearer:1")).unwrap();
    let converted = convert_image(
        &good,
        &ImageRef::parse(IMAGE).unwrap(),
        &dst,
        &ConvertOptions::default(),
        &|_, _, _| {},
    )
    .await
    .expect("push with a Bearer token (pull,push scope)");
    // A fresh client: its first call is challenged, it fetches a pull token, then reads.
    let reader = client(Some(("kite", "s3cret")));
    let resolved = reader.resolve(&dst).await.expect("resolve with a token");
    assert_eq!(resolved.digest, converted.manifest_digest);
    let layer = &converted.layers[0];
    let head = reader
        .blob_range(&dst, &layer.digest, 0..2)
        .await
        .expect("a range read with a token");
    assert_eq!(&head[..], &[0x1f, 0x8b]);

    // No credentials: the token service refuses, and the error says where.
    let e = client(None).resolve(&dst).await.unwrap_err();
    let e = kite_protocol::errors::error_chain(&e);
    assert!(e.contains("token service") && e.contains("401"), "{e}");
}
