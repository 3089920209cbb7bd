//! The `[agent]` section of /etc/kite/kite.toml.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use kite_config::ConfigError;

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
        kite_config::parse_section(text, path, "agent")
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
        let err = AgentConfig::from_toml("[agent]\nwarm = 2\n", Path::new("/k.toml")).unwrap_err();
        let err = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(err.contains("/k.toml") && err.contains("warm"), "{err}");
    }
}
