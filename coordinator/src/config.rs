//! The `[coordinator]` section of /etc/kite/kite.toml.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use kite_config::ConfigError;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// The cluster's name (in its CA's name).
    pub cluster_name: String,
    /// The state (the embedded store's file).
    pub state_dir: PathBuf,
    /// The CA, the coordinator's certificate and the first admin credential (`init` writes
    /// them; keys are mode 0600).
    pub pki_dir: PathBuf,
    /// Where agents and kitectl reach the coordinator (mutual TLS).
    pub listen: String,
    /// Further names and addresses clients reach it by (in its certificate).
    pub advertise: Vec<String>,
    pub metrics_addr: String,
    pub log_level: String,
    /// A node whose heartbeat stops for this long is NotReady (no new pods).
    pub node_timeout_secs: u64,
    /// A NotReady node's pods are placed elsewhere after this further time.
    pub pod_eviction_secs: u64,
    /// How long a rollout waits for its nodes to prefetch the new images before it updates
    /// anyway (prefetch only saves time; it gates nothing).
    pub prefetch_timeout_secs: u64,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            cluster_name: "kite".into(),
            state_dir: "/var/lib/kite/coordinator".into(),
            pki_dir: "/etc/kite/pki".into(),
            listen: "127.0.0.1:9620".into(),
            advertise: Vec::new(),
            metrics_addr: "127.0.0.1:9621".into(),
            log_level: "info".into(),
            node_timeout_secs: 20,
            pod_eviction_secs: 30,
            prefetch_timeout_secs: 120,
        }
    }
}

impl CoordinatorConfig {
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        kite_config::parse_section::<CoordinatorConfig>(text, path, "coordinator")
    }

    pub fn load(path: &Path, missing_is_default: bool) -> Result<Self, ConfigError> {
        kite_config::load_section::<CoordinatorConfig>(path, "coordinator", missing_is_default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section_is_read_and_unknown_keys_refused() {
        let c = CoordinatorConfig::from_toml(
            "[coordinator]\nlisten = \"0.0.0.0:9620\"\nadvertise = [\"10.0.0.1\"]\n",
            Path::new("/k"),
        )
        .unwrap();
        assert_eq!(c.listen, "0.0.0.0:9620");
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/kite/coordinator"));
        assert!(
            CoordinatorConfig::from_toml("[coordinator]\nlisen = 1\n", Path::new("/k")).is_err()
        );
    }
}
