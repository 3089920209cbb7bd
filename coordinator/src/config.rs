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
    /// `host:port` clients reach this coordinator at, what the others of a highly available
    /// set redirect to while it leads (default: `listen`).
    pub address: String,
    /// Where the state lives: `embedded` (one redb file in `state_dir`, one coordinator) or
    /// `etcd` (`[coordinator.etcd]`; several coordinators, one leads).
    pub store: StoreKind,
    pub etcd: EtcdConfig,
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

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Embedded,
    Etcd,
}

/// `[coordinator.etcd]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdConfig {
    /// The members' client URLs (`http://host:2379`, `https://…` with TLS).
    pub endpoints: Vec<String>,
    /// Prepended to every key kite writes (several clusters may share one etcd).
    pub prefix: String,
    /// TLS to etcd: its CA, and this client's certificate and key.
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The leader's lease: a leader that stops renewing it (dead, cut off, paused) is replaced
    /// within this time.
    pub lease_ttl_secs: u64,
    /// One call to etcd fails after this long (without a quorum etcd does not answer).
    pub request_timeout_secs: u64,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/kite".into(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            lease_ttl_secs: 10,
            request_timeout_secs: 5,
        }
    }
}

impl EtcdConfig {
    pub fn options(&self) -> crate::store::EtcdOptions {
        crate::store::EtcdOptions {
            endpoints: self.endpoints.clone(),
            prefix: self.prefix.trim_end_matches('/').to_string(),
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            request_timeout: std::time::Duration::from_secs(self.request_timeout_secs.max(1)),
        }
    }
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            cluster_name: "kite".into(),
            state_dir: "/var/lib/kite/coordinator".into(),
            pki_dir: "/etc/kite/pki".into(),
            listen: "127.0.0.1:9620".into(),
            advertise: Vec::new(),
            address: String::new(),
            store: StoreKind::Embedded,
            etcd: EtcdConfig::default(),
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

    /// Where clients reach this coordinator.
    pub fn address(&self) -> String {
        if self.address.is_empty() {
            self.listen.clone()
        } else {
            self.address.clone()
        }
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
        assert_eq!(c.store, StoreKind::Embedded);
        assert_eq!(c.address(), "0.0.0.0:9620");
    }

    #[test]
    fn etcd_section_is_read() {
        let c = CoordinatorConfig::from_toml(
            "[coordinator]\nstore = \"etcd\"\naddress = \"10.0.0.1:9620\"\n[coordinator.etcd]\nendpoints = [\"http://10.0.0.5:2379\"]\nprefix = \"/c1/\"\nlease_ttl_secs = 6\n",
            Path::new("/k"),
        )
        .unwrap();
        assert_eq!(c.store, StoreKind::Etcd);
        assert_eq!(c.address(), "10.0.0.1:9620");
        let o = c.etcd.options();
        assert_eq!(o.prefix, "/c1");
        assert_eq!(o.endpoints, ["http://10.0.0.5:2379"]);
        assert_eq!(c.etcd.lease_ttl_secs, 6);
        assert!(CoordinatorConfig::from_toml(
            "[coordinator]\nstore = \"zookeeper\"\n",
            Path::new("/k")
        )
        .is_err());
        assert!(CoordinatorConfig::from_toml(
            "[coordinator.etcd]\nendpoint = \"x\"\n",
            Path::new("/k")
        )
        .is_err());
    }
}
