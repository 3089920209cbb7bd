//! The `[snapshotter]` section of /etc/kite/kite.toml.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::registry::{Credential, RegistryOptions};

pub use kite_config::ConfigError;

/// The section of kite.toml this file reads.
const SECTION: &str = "snapshotter";

/// A CA file named in `ca_files` that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("snapshotter.ca_files: read {path}")]
pub struct CaFileError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotterConfig {
    /// Snapshots, the chunk cache and metadata.
    pub root: PathBuf,
    /// containerd's proxy plugin socket.
    pub socket: PathBuf,
    /// The prefetch API's socket (the node agent calls it when a pod is bound).
    pub prefetch_socket: PathBuf,
    /// Where `kite-lazyfs` (the process serving lazy layers) answers the snapshots service.
    pub lazyfs_socket: PathBuf,
    /// The `kite-lazyfs` program ("": next to `kite-snapshotter`).
    pub lazyfs_path: PathBuf,
    /// Upper bound of the on-disk chunk cache; least recently used chunks go first.
    pub cache_max_bytes: u64,
    /// Fetch the rest of a lazily mounted layer in the background (after its prioritized
    /// files), at `background_fetch_bytes_per_sec` (0: unlimited).
    pub background_fetch: bool,
    pub background_fetch_bytes_per_sec: u64,
    /// Registries reached over plain HTTP (loopback ones always are).
    pub insecure_registries: Vec<String>,
    /// Mount eStargz layers lazily (false: every layer is unpacked by containerd).
    pub lazy: bool,
    /// Per registry host: `{ username, password }` for Basic auth or its token service.
    pub credentials: BTreeMap<String, Credential>,
    /// Extra CA certificates (PEM files) trusted for registries' HTTPS.
    pub ca_files: Vec<PathBuf>,
    /// Attempts of a registry request that fails transiently (network, 5xx) before a read
    /// gets EIO; the wait doubles from `fetch_first_backoff_ms`.
    pub fetch_attempts: u32,
    pub fetch_first_backoff_ms: u64,
    /// Where Prometheus scrapes the daemon's metrics (host:port).
    pub metrics_address: String,
    /// Log filter (tracing `EnvFilter` syntax).
    pub log_level: String,
}

impl Default for SnapshotterConfig {
    fn default() -> Self {
        Self {
            root: "/var/lib/kite/snapshotter".into(),
            socket: "/run/kite/snapshotter.sock".into(),
            prefetch_socket: "/run/kite/prefetch.sock".into(),
            lazyfs_socket: "/run/kite/lazyfs.sock".into(),
            lazyfs_path: PathBuf::new(),
            cache_max_bytes: 10 << 30,
            background_fetch: true,
            background_fetch_bytes_per_sec: 0,
            insecure_registries: Vec::new(),
            lazy: true,
            credentials: BTreeMap::new(),
            ca_files: Vec::new(),
            fetch_attempts: 5,
            fetch_first_backoff_ms: 200,
            metrics_address: "127.0.0.1:9471".into(),
            log_level: "info".into(),
        }
    }
}

impl SnapshotterConfig {
    /// Parses the `[snapshotter]` section of a kite.toml text; other sections are ignored.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: SnapshotterConfig = kite_config::parse_section(text, path, SECTION)?;
        config.validate(path)?;
        Ok(config)
    }

    /// Loads `path` (or `KITE_CONFIG`, or /etc/kite/kite.toml); a missing default file gives
    /// the defaults, a file named explicitly must exist.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let file = kite_config::config_path(path);
        let config: SnapshotterConfig = kite_config::load_section(&file, SECTION, path.is_none())?;
        config.validate(&file)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        if self.cache_max_bytes < 64 << 20 {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                section: SECTION,
                key: "cache_max_bytes",
                reason: "must be at least 64 MiB".into(),
            });
        }
        Ok(())
    }

    /// How the registry client reaches registries (reads the CA files).
    pub fn registry_options(&self) -> Result<RegistryOptions, CaFileError> {
        let mut ca_pems = Vec::new();
        for f in &self.ca_files {
            ca_pems.push(std::fs::read(f).map_err(|source| CaFileError {
                path: f.clone(),
                source,
            })?);
        }
        Ok(RegistryOptions {
            insecure: self.insecure_registries.clone(),
            credentials: self.credentials.clone(),
            ca_pems,
            attempts: self.fetch_attempts,
            first_backoff: std::time::Duration::from_millis(self.fetch_first_backoff_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c = SnapshotterConfig::from_toml("[shim]\nx = 1\n", Path::new("/k")).unwrap();
        assert_eq!(c, SnapshotterConfig::default());
        let c = SnapshotterConfig::from_toml(
            "[snapshotter]\ncache_max_bytes = 1073741824\ninsecure_registries = [\"reg:5000\"]\n",
            Path::new("/k"),
        )
        .unwrap();
        assert_eq!(c.cache_max_bytes, 1 << 30);
        assert_eq!(c.registry_options().unwrap().insecure, ["reg:5000"]);
    }

    #[test]
    fn bad_values_name_file_and_key() {
        let err = SnapshotterConfig::from_toml(
            "[snapshotter]\ncache_max_bytes = 1\n",
            Path::new("/k.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("/k.toml") && err.contains("cache_max_bytes"),
            "{err}"
        );
        let err =
            SnapshotterConfig::from_toml("[snapshotter]\nroots = \"/x\"\n", Path::new("/k.toml"))
                .unwrap_err();
        let err = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(err.contains("roots"), "{err}");
    }
}
