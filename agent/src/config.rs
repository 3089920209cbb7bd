//! The `[agent]` section of /etc/kite/kite.toml.

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("parse config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// containerd's CRI socket.
    pub cri_socket: PathBuf,
    /// The runtime handler pods run with.
    pub runtime_handler: String,
    /// Pre-booted VMs kept ready for new pods.
    pub warm_sandboxes: u32,
    /// Node-level App CDS archive cache.
    pub cds_cache_dir: PathBuf,
    /// Prometheus metrics.
    pub metrics_addr: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            cri_socket: "/run/containerd/containerd.sock".into(),
            runtime_handler: "kite".into(),
            warm_sandboxes: 0,
            cds_cache_dir: "/var/lib/kite/cds".into(),
            metrics_addr: "127.0.0.1:9611".into(),
        }
    }
}

impl AgentConfig {
    /// Parses the `[agent]` section of a kite.toml text; other sections are ignored.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let parse = |source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        };
        let table: toml::Table = toml::from_str(text).map_err(parse)?;
        match table.get("agent") {
            Some(v) => v.clone().try_into::<AgentConfig>().map_err(parse),
            None => Ok(AgentConfig::default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section_is_read_and_unknown_keys_refused() {
        let c = AgentConfig::from_toml("[agent]\nwarm_sandboxes = 2\n", Path::new("/k")).unwrap();
        assert_eq!(c.warm_sandboxes, 2);
        assert_eq!(c.runtime_handler, "kite");
        let err = AgentConfig::from_toml("[agent]\nwarm = 2\n", Path::new("/k.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/k.toml") && err.contains("warm"), "{err}");
    }
}
