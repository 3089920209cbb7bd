//! A client of the Registry v2 API (the OCI distribution spec): image references, manifests
//! (an index resolves to this host's platform), ranged blob reads with retries, and the uploads
//! `kite-snapshotter convert` makes.
//!
//! Authentication follows the registry's challenge: a `401` with `WWW-Authenticate: Bearer`
//! sends us to its token service (with the configured user and password, if any), `Basic` gets
//! the configured credentials directly. Registries are reached over HTTPS, except loopback ones
//! and those configured insecure (plain HTTP).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RANGE};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("image reference {reference:?}: {reason}")]
    Reference { reference: String, reason: String },
    /// reqwest's own message leaves out why a request failed (refused, TLS, DNS): its sources
    /// say, and every renderer prints the chain.
    #[error("{method} {url}")]
    Transport {
        method: Method,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{method} {url}: HTTP {status}: {body}")]
    Status {
        method: Method,
        url: String,
        status: u16,
        body: String,
    },
    #[error("registry {registry}: authentication: {reason}")]
    Auth { registry: String, reason: String },
    #[error("image {image}: manifest: {reason}")]
    Manifest { image: String, reason: String },
    #[error("{url}: got {got} bytes, expected {expected}")]
    ShortRead {
        url: String,
        expected: u64,
        got: u64,
    },
    #[error("{url}: content digest {actual} is not the expected {expected}")]
    Digest {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("registry client: {0}")]
    Setup(String),
}

impl RegistryError {
    /// Whether trying again may help (the network, the server's 5xx, rate limits).
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Transport { .. } | RegistryError::ShortRead { .. } => true,
            RegistryError::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

/// `[registry/]repository[:tag][@digest]`, normalized as containerd does (`busybox` is
/// `docker.io/library/busybox:latest`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageRef {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl ImageRef {
    pub fn parse(reference: &str) -> Result<ImageRef, RegistryError> {
        let bad = |reason: &str| RegistryError::Reference {
            reference: reference.to_string(),
            reason: reason.to_string(),
        };
        let (rest, digest) = match reference.split_once('@') {
            Some((r, d)) => {
                if !d.starts_with("sha256:") || d.len() != 71 {
                    return Err(bad("the digest is not sha256:<64 hex>"));
                }
                (r, Some(d.to_string()))
            }
            None => (reference, None),
        };
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (
                &rest[..last_slash + i],
                Some(rest[last_slash + i + 1..].to_string()),
            ),
            None => (rest, None),
        };
        let (registry, repository) = match name.split_once('/') {
            Some((first, repo))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), repo.to_string())
            }
            Some(_) => ("docker.io".to_string(), name.to_string()),
            None => ("docker.io".to_string(), format!("library/{name}")),
        };
        let valid = |s: &str| {
            !s.is_empty()
                && s.split('/').all(|p| {
                    !p.is_empty()
                        && p.bytes().all(|b| {
                            b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                        })
                })
        };
        if !valid(&repository) {
            return Err(bad(
                "the repository name is not [a-z0-9._-] parts joined by /",
            ));
        }
        if let Some(t) = &tag {
            if t.is_empty()
                || t.len() > 128
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(bad("the tag is not [A-Za-z0-9._-]{1,128}"));
            }
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// What the manifest is fetched by: the digest if there is one, else the tag.
    pub fn reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The host the API is served on (`docker.io` is served by `registry-1.docker.io`).
    pub fn api_host(&self) -> &str {
        if self.registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct ManifestList {
    manifests: Vec<Descriptor>,
}

/// The most entries an index, and layers a manifest, may have (Docker's own limit is 127
/// layers; indexes list a few platforms).
pub const MAX_MANIFEST_ENTRIES: usize = 1024;

/// What a registry's manifest document is.
#[derive(Clone, Debug, PartialEq)]
pub enum ManifestDocument {
    /// An OCI index or Docker manifest list: `chosen` is the digest of its manifest for
    /// linux on this host's architecture.
    Index {
        chosen: String,
    },
    Image(Box<Manifest>),
}

/// An OCI digest (`algorithm:encoded`, e.g. `sha256:` and 64 hex digits): digests end up in
/// URLs and, through the chunk cache, in file names.
pub fn is_digest(digest: &str) -> bool {
    let Some((algorithm, encoded)) = digest.split_once(':') else {
        return false;
    };
    let component = |c: &str| {
        !c.is_empty()
            && c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    let algorithm_ok = algorithm.split(['+', '.', '_', '-']).all(component);
    let encoded_ok = !encoded.is_empty()
        && encoded
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b'_' | b'-'));
    let sha256_ok = algorithm != "sha256"
        || (encoded.len() == 64
            && encoded
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    algorithm_ok && encoded_ok && sha256_ok
}

/// Decodes a manifest document `raw` of `media_type` that a registry sent for `image`, choosing
/// linux/`arch` from an index. Every digest and count is checked here; sizes and digests of
/// the blobs are checked when they are fetched.
pub fn decode_manifest(
    image: &str,
    media_type: &str,
    raw: &[u8],
    arch: &str,
) -> Result<ManifestDocument, RegistryError> {
    let bad = |reason: String| RegistryError::Manifest {
        image: image.to_string(),
        reason,
    };
    let probe: serde_json::Value =
        serde_json::from_slice(raw).map_err(|e| bad(format!("not JSON: {e}")))?;
    let is_list = media_type.starts_with(OCI_INDEX)
        || media_type.starts_with(DOCKER_LIST)
        || probe.get("manifests").is_some();
    let check = |what: &str, d: &Descriptor| {
        if is_digest(&d.digest) {
            Ok(())
        } else {
            Err(bad(format!("{what} has the digest {:?}", d.digest)))
        }
    };
    if is_list {
        let list: ManifestList =
            serde_json::from_value(probe).map_err(|e| bad(format!("index: {e}")))?;
        if list.manifests.len() > MAX_MANIFEST_ENTRIES {
            return Err(bad(format!(
                "the index has {} entries, over {MAX_MANIFEST_ENTRIES}",
                list.manifests.len()
            )));
        }
        let chosen = list
            .manifests
            .iter()
            .find(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == arch)
            })
            .ok_or_else(|| bad(format!("the index has no linux/{arch} manifest")))?;
        check(&format!("the index's linux/{arch} entry"), chosen)?;
        return Ok(ManifestDocument::Index {
            chosen: chosen.digest.clone(),
        });
    }
    let manifest: Manifest =
        serde_json::from_value(probe).map_err(|e| bad(format!("{media_type}: {e}")))?;
    if manifest.layers.len() > MAX_MANIFEST_ENTRIES {
        return Err(bad(format!(
            "{} layers, over {MAX_MANIFEST_ENTRIES}",
            manifest.layers.len()
        )));
    }
    check("the config", &manifest.config)?;
    for (i, layer) in manifest.layers.iter().enumerate() {
        check(&format!("layer {i}"), layer)?;
    }
    Ok(ManifestDocument::Image(Box::new(manifest)))
}

/// A manifest as resolved: the manifest, its digest, its raw bytes.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub manifest: Manifest,
    pub digest: String,
    pub raw: Bytes,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    pub username: String,
    pub password: String,
}

/// How registries are reached.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// Hosts (host[:port]) reached over plain HTTP; loopback hosts always are.
    pub insecure: Vec<String>,
    /// Per host: the user and password for Basic auth or for the token service.
    pub credentials: BTreeMap<String, Credential>,
    /// Extra PEM CA certificates trusted for HTTPS (a private registry's CA).
    pub ca_pems: Vec<Vec<u8>>,
    /// Attempts per request when the failure is transient (at least 1).
    pub attempts: u32,
    /// Wait before the first retry; it doubles each time.
    pub first_backoff: Duration,
}

pub struct RegistryClient {
    http: reqwest::Client,
    options: RegistryOptions,
    /// Authorization header values by (host, repository).
    auth: Mutex<HashMap<(String, String), HeaderValue>>,
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// The parameters of a `WWW-Authenticate` challenge: its scheme and `key="value"` pairs.
pub fn parse_challenge(header: &str) -> (String, BTreeMap<String, String>) {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = BTreeMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        params.insert(key, value.to_string());
        rest = next.trim_start().trim_start_matches(',').trim_start();
    }
    (scheme.to_ascii_lowercase(), params)
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

impl RegistryClient {
    pub fn new(options: RegistryOptions) -> Result<RegistryClient, RegistryError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("kite-snapshotter/", env!("CARGO_PKG_VERSION")));
        for pem in &options.ca_pems {
            let cert = reqwest::Certificate::from_pem(pem)
                .map_err(|e| RegistryError::Setup(format!("a CA certificate: {e}")))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| RegistryError::Setup(e.to_string()))?;
        Ok(RegistryClient {
            http,
            options: RegistryOptions {
                attempts: options.attempts.max(1),
                ..options
            },
            auth: Mutex::new(HashMap::new()),
        })
    }

    /// `http` for loopback and configured insecure hosts, else `https`.
    pub fn scheme(&self, host: &str) -> &'static str {
        let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
        let loopback = matches!(name, "localhost" | "127.0.0.1" | "[::1]");
        if loopback || self.options.insecure.iter().any(|h| h == host) {
            "http"
        } else {
            "https"
        }
    }

    fn url(&self, image: &ImageRef, tail: &str) -> String {
        let host = image.api_host();
        format!(
            "{}://{host}/v2/{}/{tail}",
            self.scheme(host),
            image.repository
        )
    }

    /// A pull-side request that must succeed (auth answered, non-2xx an error).
    async fn get_ok(
        &self,
        image: &ImageRef,
        method: Method,
        url: &str,
        headers: HeaderMap,
    ) -> Result<reqwest::Response, RegistryError> {
        let resp = self
            .send(image, method.clone(), url, headers, None, false)
            .await?;
        Self::check(method, url, resp).await
    }

    /// A response's whole body.
    async fn body(url: &str, resp: reqwest::Response) -> Result<Bytes, RegistryError> {
        resp.bytes()
            .await
            .map_err(|source| RegistryError::Transport {
                method: Method::GET,
                url: url.to_string(),
                source,
            })
    }

    /// Sends a request (built afresh for each try), answering an auth challenge once.
    async fn send(
        &self,
        image: &ImageRef,
        method: Method,
        url: &str,
        headers: HeaderMap,
        body: Option<Bytes>,
        push: bool,
    ) -> Result<reqwest::Response, RegistryError> {
        let (host, repo) = (image.api_host(), image.repository.as_str());
        let key = (host.to_string(), repo.to_string());
        let mut challenged = false;
        loop {
            let mut req = self
                .http
                .request(method.clone(), url)
                .headers(headers.clone());
            if let Some(auth) = self.auth.lock().expect("auth lock").get(&key) {
                req = req.header(AUTHORIZATION, auth.clone());
            }
            if let Some(b) = &body {
                req = req.body(b.clone());
            }
            let resp = req
                .send()
                .await
                .map_err(|source| RegistryError::Transport {
                    method: method.clone(),
                    url: url.to_string(),
                    source,
                })?;
            if resp.status() != StatusCode::UNAUTHORIZED || challenged {
                return Ok(resp);
            }
            challenged = true;
            let challenge = resp
                .headers()
                .get(reqwest::header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let value = self.answer(host, repo, &challenge, push).await?;
            self.auth
                .lock()
                .expect("auth lock")
                .insert(key.clone(), value);
        }
    }

    /// The Authorization header that answers `challenge`.
    async fn answer(
        &self,
        host: &str,
        repo: &str,
        challenge: &str,
        push: bool,
    ) -> Result<HeaderValue, RegistryError> {
        use base64::Engine;
        let auth_err = |reason: String| RegistryError::Auth {
            registry: host.to_string(),
            reason,
        };
        let cred = self.options.credentials.get(host);
        let basic = |c: &Credential| {
            let raw = format!("{}:{}", c.username, c.password);
            HeaderValue::from_str(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            ))
            .map_err(|e| auth_err(e.to_string()))
        };
        let (scheme, params) = parse_challenge(challenge);
        match scheme.as_str() {
            "basic" => match cred {
                Some(c) => basic(c),
                None => Err(auth_err(
                    "the registry asks for Basic credentials and none are configured".into(),
                )),
            },
            "bearer" => {
                let realm = params
                    .get("realm")
                    .ok_or_else(|| auth_err("a Bearer challenge without a realm".into()))?;
                let actions = if push { "pull,push" } else { "pull" };
                let default_scope = format!("repository:{repo}:{actions}");
                let scope = if push {
                    &default_scope
                } else {
                    params.get("scope").unwrap_or(&default_scope)
                };
                let mut req = self.http.get(realm.as_str()).query(&[("scope", scope)]);
                if let Some(service) = params.get("service") {
                    req = req.query(&[("service", service)]);
                }
                if let Some(c) = cred {
                    req = req.header(AUTHORIZATION, basic(c)?);
                }
                let resp = req
                    .send()
                    .await
                    .map_err(|e| auth_err(format!("token service {realm}: {e}")))?;
                if !resp.status().is_success() {
                    return Err(auth_err(format!(
                        "token service {realm}: HTTP {}",
                        resp.status().as_u16()
                    )));
                }
                #[derive(Deserialize)]
                struct Token {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let t: Token = resp
                    .json()
                    .await
                    .map_err(|e| auth_err(format!("token service {realm}: {e}")))?;
                let token = t
                    .token
                    .or(t.access_token)
                    .ok_or_else(|| auth_err(format!("token service {realm} gave no token")))?;
                HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|e| auth_err(e.to_string()))
            }
            other => Err(auth_err(format!(
                "unsupported challenge scheme {other:?} ({challenge:?})"
            ))),
        }
    }

    async fn check(
        method: Method,
        url: &str,
        resp: reqwest::Response,
    ) -> Result<reqwest::Response, RegistryError> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let mut body = resp.text().await.unwrap_or_default();
        body.truncate(300);
        Err(RegistryError::Status {
            method,
            url: url.to_string(),
            status,
            body,
        })
    }

    /// Runs `op` up to the configured number of attempts while it fails transiently, waiting
    /// twice as long before each retry.
    async fn retrying<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let mut wait = self.options.first_backoff;
        let mut attempt = 1;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && attempt < self.options.attempts => {
                    warn!(%what, attempt, error = %e, "retrying");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn get_manifest(
        &self,
        image: &ImageRef,
        reference: &str,
    ) -> Result<(String, Bytes, String), RegistryError> {
        let url = self.url(image, &format!("manifests/{reference}"));
        let mut headers = HeaderMap::new();
        headers.insert(
            ACCEPT,
            HeaderValue::from_str(
                &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST].join(", "),
            )
            .expect("static header"),
        );
        self.retrying(&url, || async {
            let resp = self
                .get_ok(image, Method::GET, &url, headers.clone())
                .await?;
            let media_type = resp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let raw = Self::body(&url, resp).await?;
            let digest = sha256(&raw);
            Ok((media_type, raw, digest))
        })
        .await
    }

    /// Resolves `image` to its manifest for this host's platform (linux, this architecture).
    pub async fn resolve(&self, image: &ImageRef) -> Result<Resolved, RegistryError> {
        let bad = |reason: String| RegistryError::Manifest {
            image: image.to_string(),
            reason,
        };
        let (mut media_type, mut raw, mut digest) =
            self.get_manifest(image, image.reference()).await?;
        if let Some(d) = &image.digest {
            if *d != digest {
                return Err(RegistryError::Digest {
                    url: image.to_string(),
                    expected: d.clone(),
                    actual: digest,
                });
            }
        }
        let arch = host_arch();
        let manifest = match decode_manifest(&image.to_string(), &media_type, &raw, arch)? {
            ManifestDocument::Image(manifest) => *manifest,
            ManifestDocument::Index { chosen } => {
                (media_type, raw, digest) = self.get_manifest(image, &chosen).await?;
                if digest != chosen {
                    return Err(RegistryError::Digest {
                        url: format!("{image} ({chosen})"),
                        expected: chosen,
                        actual: digest,
                    });
                }
                match decode_manifest(&image.to_string(), &media_type, &raw, arch)? {
                    ManifestDocument::Image(manifest) => *manifest,
                    ManifestDocument::Index { .. } => {
                        return Err(bad(format!(
                            "the index's linux/{arch} entry {chosen} is an index too"
                        )))
                    }
                }
            }
        };
        debug!(%image, %digest, layers = manifest.layers.len(), "resolved");
        Ok(Resolved {
            manifest,
            digest,
            raw,
        })
    }

    /// Bytes `range` of blob `digest` of `image`'s repository.
    pub async fn blob_range(
        &self,
        image: &ImageRef,
        digest: &str,
        range: Range<u64>,
    ) -> Result<Bytes, RegistryError> {
        let url = self.url(image, &format!("blobs/{digest}"));
        let want = range.end.saturating_sub(range.start);
        if want == 0 {
            return Ok(Bytes::new());
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            RANGE,
            HeaderValue::from_str(&format!("bytes={}-{}", range.start, range.end - 1))
                .expect("a range header"),
        );
        self.retrying(&url, || async {
            let resp = self
                .get_ok(image, Method::GET, &url, headers.clone())
                .await?;
            let whole = resp.status() == StatusCode::OK;
            let body = Self::body(&url, resp).await?;
            // A server that ignores Range sends the whole blob.
            let body = if whole && body.len() as u64 >= range.end {
                body.slice(range.start as usize..range.end as usize)
            } else {
                body
            };
            if body.len() as u64 != want {
                return Err(RegistryError::ShortRead {
                    url: url.clone(),
                    expected: want,
                    got: body.len() as u64,
                });
            }
            Ok(body)
        })
        .await
    }

    /// The size of blob `digest`.
    pub async fn blob_size(&self, image: &ImageRef, digest: &str) -> Result<u64, RegistryError> {
        let url = self.url(image, &format!("blobs/{digest}"));
        self.retrying(&url, || async {
            let resp = self
                .get_ok(image, Method::HEAD, &url, HeaderMap::new())
                .await?;
            resp.headers()
                .get(reqwest::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| RegistryError::Status {
                    method: Method::HEAD,
                    url: url.clone(),
                    status: 200,
                    body: "no Content-Length".into(),
                })
        })
        .await
    }

    /// The whole blob `digest`, checked against its digest.
    pub async fn blob(&self, image: &ImageRef, digest: &str) -> Result<Bytes, RegistryError> {
        let url = self.url(image, &format!("blobs/{digest}"));
        let body = self
            .retrying(&url, || async {
                let resp = self
                    .get_ok(image, Method::GET, &url, HeaderMap::new())
                    .await?;
                Self::body(&url, resp).await
            })
            .await?;
        let actual = sha256(&body);
        if actual != digest {
            return Err(RegistryError::Digest {
                url,
                expected: digest.to_string(),
                actual,
            });
        }
        Ok(body)
    }

    /// Uploads `data` as a blob of `image`'s repository (skipped if the registry has it);
    /// returns its digest.
    pub async fn push_blob(&self, image: &ImageRef, data: Bytes) -> Result<String, RegistryError> {
        let digest = sha256(&data);
        let host = image.api_host();
        let head = self.url(image, &format!("blobs/{digest}"));
        let resp = self
            .send(image, Method::HEAD, &head, HeaderMap::new(), None, true)
            .await?;
        if resp.status().is_success() {
            return Ok(digest);
        }
        let start = self.url(image, "blobs/uploads/");
        let resp = self
            .send(image, Method::POST, &start, HeaderMap::new(), None, true)
            .await?;
        let resp = Self::check(Method::POST, &start, resp).await?;
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| RegistryError::Status {
                method: Method::POST,
                url: start.clone(),
                status: resp.status().as_u16(),
                body: "no Location for the upload".into(),
            })?;
        let mut put = if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else {
            format!("{}://{host}{location}", self.scheme(host))
        };
        put.push(if put.contains('?') { '&' } else { '?' });
        put.push_str(&format!("digest={digest}"));
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        let resp = self
            .send(image, Method::PUT, &put, headers, Some(data), true)
            .await?;
        Self::check(Method::PUT, &put, resp).await?;
        Ok(digest)
    }

    /// Uploads a manifest under `image`'s tag (or digest); returns its digest.
    pub async fn push_manifest(
        &self,
        image: &ImageRef,
        media_type: &str,
        raw: Bytes,
    ) -> Result<String, RegistryError> {
        let digest = sha256(&raw);
        let url = self.url(image, &format!("manifests/{}", image.reference()));
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_str(media_type).map_err(|e| RegistryError::Manifest {
                image: image.to_string(),
                reason: e.to_string(),
            })?,
        );
        let resp = self
            .send(image, Method::PUT, &url, headers, Some(raw), true)
            .await?;
        Self::check(Method::PUT, &url, resp).await?;
        Ok(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalize_like_containerd() {
        let r = ImageRef::parse("busybox").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        let r = ImageRef::parse("127.0.0.1:5000/kite/app:v1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.reference()),
            ("127.0.0.1:5000", "kite/app", "v1")
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("localhost/x/y@{d}")).unwrap();
        assert_eq!(r.reference(), d);
        assert_eq!(r.tag, None);
        let r = ImageRef::parse("ghcr.io/org/img:1.0").unwrap();
        assert_eq!(r.registry, "ghcr.io");
        assert_eq!(
            ImageRef::parse("user/app").unwrap().to_string(),
            "docker.io/user/app:latest"
        );
    }

    #[test]
    fn bad_references_say_why() {
        for bad in ["", "UPPER/case", "a//b", "x@sha256:12", "reg.io/a:bad tag"] {
            let e = ImageRef::parse(bad).unwrap_err().to_string();
            assert!(e.contains("image reference"), "{bad}: {e}");
        }
    }

    #[test]
    fn loopback_and_insecure_hosts_use_plain_http() {
        let c = RegistryClient::new(RegistryOptions {
            insecure: vec!["reg.lan:5000".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.scheme("127.0.0.1:5000"), "http");
        assert_eq!(c.scheme("localhost"), "http");
        assert_eq!(c.scheme("reg.lan:5000"), "http");
        assert_eq!(c.scheme("reg.lan"), "https");
        assert_eq!(c.scheme("ghcr.io"), "https");
    }

    #[test]
    fn challenges_parse() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        );
        assert_eq!(s, "bearer");
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a/b:pull");
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(
            (s.as_str(), p["realm"].as_str()),
            ("basic", "Registry Realm")
        );
    }

    #[test]
    fn digests_follow_the_oci_grammar() {
        let hex = "a".repeat(64);
        assert!(is_digest(&format!("sha256:{hex}")));
        assert!(is_digest(
            "sha512+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564"
        ));
        for bad in [
            "",
            "sha256",
            "sha256:",
            ":abc",
            &format!("sha256:{}", "A".repeat(64)),
            "sha256:abc",
            &format!("sha256:../{}", "a".repeat(61)),
            "SHA256:abc",
            "sha256:ab/cd",
        ] {
            assert!(!is_digest(bad), "{bad:?}");
        }
    }

    #[test]
    fn manifests_and_indexes_decode_with_checked_digests() {
        let d = |n: u8| format!("sha256:{}", format!("{n:02x}").repeat(32));
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"c","digest":"{}","size":1}},"layers":[{{"mediaType":"l","digest":"{}","size":2}}]}}"#,
            d(1),
            d(2)
        );
        match decode_manifest("img", OCI_MANIFEST, manifest.as_bytes(), "amd64").unwrap() {
            ManifestDocument::Image(m) => assert_eq!(m.layers[0].digest, d(2)),
            other => panic!("{other:?}"),
        }
        let index = format!(
            r#"{{"manifests":[{{"mediaType":"m","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}},{{"mediaType":"m","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            d(3),
            d(4)
        );
        assert_eq!(
            decode_manifest("img", OCI_INDEX, index.as_bytes(), "amd64").unwrap(),
            ManifestDocument::Index { chosen: d(4) }
        );
        let e = decode_manifest("img", OCI_INDEX, index.as_bytes(), "s390x").unwrap_err();
        assert!(
            e.to_string().contains("img") && e.to_string().contains("s390x"),
            "{e}"
        );
        let hostile = manifest.replace(&d(2), "sha256:../../etc/passwd");
        let e = decode_manifest("img", OCI_MANIFEST, hostile.as_bytes(), "amd64").unwrap_err();
        assert!(e.to_string().contains("layer 0"), "{e}");
        assert!(decode_manifest("img", OCI_MANIFEST, b"[", "amd64").is_err());
    }

    #[test]
    fn transient_errors_are_retried_others_not() {
        let status = |status| RegistryError::Status {
            method: Method::GET,
            url: "u".into(),
            status,
            body: String::new(),
        };
        assert!(status(503).is_transient() && status(429).is_transient());
        assert!(!status(404).is_transient() && !status(401).is_transient());
    }
}
