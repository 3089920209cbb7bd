//! The `[agent]` section of /etc/kite/kite.toml.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use kite_config::ConfigError;

/// The order a pod's start takes.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StartOrder {
    /// The agent's: at the bind, prefetch + pull and the sandbox (VM boot) at the same time.
    Parallel,
    /// A kubelet's: sandbox, then pull, then create, then start.
    Kubelet,
}

impl StartOrder {
    pub fn name(self) -> &'static str {
        match self {
            StartOrder::Parallel => "parallel",
            StartOrder::Kubelet => "kubelet",
        }
    }

    pub fn parse(s: &str) -> Option<StartOrder> {
        match s {
            "parallel" => Some(StartOrder::Parallel),
            "kubelet" => Some(StartOrder::Kubelet),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// containerd's CRI socket.
    pub cri_socket: PathBuf,
    /// The agent's gRPC API (kitectl); created mode 0600 (root only).
    pub api_socket: PathBuf,
    /// kite-lazyfs's prefetch API; "" when there is none (images are then only pulled).
    pub prefetch_socket: PathBuf,
    /// What the agent keeps across its own restarts (one record per pod) and the pods' emptyDir
    /// volumes.
    pub state_dir: PathBuf,
    /// Containers' logs: `<log_dir>/<namespace>_<name>_<uid>/<container>/<attempt>.log`.
    pub log_dir: PathBuf,
    /// The shim's start records (its `timings_file`): the VM boot's breakdown in a pod's
    /// sandbox stage. "" for none.
    pub shim_timings_file: PathBuf,
    /// This agent's name on the sandboxes it makes (CRI label `kite.io/agent`): on restart it
    /// adopts, or removes, only its own. Two agents on one node need two names.
    pub agent_id: String,
    /// RuntimeClass of a pod that names none.
    pub default_runtime_class: String,
    /// Start order of a pod that names none (annotation `kite.io/start-order`).
    pub start_order: StartOrder,
    /// CPU (millicores) and memory (MiB) kept for the system: a pod is admitted only if its
    /// requests fit in what is left of the node.
    pub reserved_cpu_millis: u64,
    pub reserved_memory_mib: u64,
    /// Crash-loop back-off: the first delay before a restart, doubled per restart up to the
    /// maximum (a kubelet's: 10 s, 300 s); reset after a container ran `backoff_reset_secs`.
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    pub backoff_reset_secs: u64,
    /// How often containers' states are read from the CRI.
    pub sync_interval_ms: u64,
    /// While a container has not yet been ready, its state is read and its readiness probe
    /// run this often instead (a kubelet waits a whole probe period): a pod is ready when it
    /// is, not up to a period later.
    pub ready_poll_ms: u64,
    /// An in-place update that is not ready within this many seconds is rolled back.
    pub update_timeout_secs: u64,
    /// Prometheus metrics (`GET /metrics`).
    pub metrics_addr: String,
    pub log_level: String,
    /// Pre-booted VMs kept ready for new pods (the warm pool; not used yet).
    pub warm_sandboxes: u32,
    /// The Java start-up cache (`[agent.java_cache]`).
    pub java_cache: crate::javacache::JavaCacheConfig,
    /// The link to a cluster coordinator (`[agent.coordinator]`; none by default).
    pub coordinator: crate::link::CoordinatorLinkConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            cri_socket: "/run/containerd/containerd.sock".into(),
            api_socket: "/run/kite/agent.sock".into(),
            prefetch_socket: "/run/kite/prefetch.sock".into(),
            state_dir: "/var/lib/kite/agent".into(),
            log_dir: "/var/log/kite/pods".into(),
            shim_timings_file: "/run/kite/timings.jsonl".into(),
            agent_id: "kite-agent".into(),
            default_runtime_class: "kite".into(),
            start_order: StartOrder::Parallel,
            reserved_cpu_millis: 200,
            reserved_memory_mib: 512,
            backoff_initial_ms: 10_000,
            backoff_max_ms: 300_000,
            backoff_reset_secs: 600,
            sync_interval_ms: 500,
            ready_poll_ms: 50,
            update_timeout_secs: 120,
            metrics_addr: "127.0.0.1:9611".into(),
            log_level: "info".into(),
            warm_sandboxes: 0,
            java_cache: Default::default(),
            coordinator: Default::default(),
        }
    }
}

impl AgentConfig {
    /// Parses the `[agent]` section of a kite.toml text; other sections are ignored.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        kite_config::parse_section::<AgentConfig>(text, path, "agent")?.validated(path)
    }

    /// Reads the `[agent]` section of the file at `path`; see [`kite_config::load_section`].
    pub fn load(path: &Path, missing_is_default: bool) -> Result<Self, ConfigError> {
        kite_config::load_section::<AgentConfig>(path, "agent", missing_is_default)?.validated(path)
    }

    fn validated(self, path: &Path) -> Result<Self, ConfigError> {
        let config = self;
        let invalid = |key: &'static str, reason: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            section: "agent",
            key,
            reason: reason.into(),
        };
        if config.agent_id.is_empty() {
            return Err(invalid("agent_id", "must not be empty"));
        }
        if !matches!(config.default_runtime_class.as_str(), "kite" | "runc") {
            return Err(invalid("default_runtime_class", "must be kite or runc"));
        }
        if config.backoff_initial_ms == 0 || config.backoff_max_ms < config.backoff_initial_ms {
            return Err(invalid(
                "backoff_initial_ms",
                "must be positive and not above backoff_max_ms",
            ));
        }
        if config.sync_interval_ms == 0 || config.ready_poll_ms == 0 {
            return Err(invalid(
                "sync_interval_ms",
                "and ready_poll_ms must be positive",
            ));
        }
        let j = &config.java_cache;
        if j.enabled && (j.dir.as_os_str().is_empty() || !j.dir.is_absolute()) {
            return Err(invalid("java_cache.dir", "must be an absolute path"));
        }
        if j.dump_grace_secs == 0 || j.observe_timeout_secs == 0 || j.ready_timeout_secs == 0 {
            return Err(invalid(
                "java_cache.dump_grace_secs",
                "and the other java_cache timeouts must be positive",
            ));
        }
        Ok(config)
    }

    pub fn sync_interval(&self) -> Duration {
        Duration::from_millis(self.sync_interval_ms)
    }

    pub fn ready_poll(&self) -> Duration {
        Duration::from_millis(self.ready_poll_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section_is_read_and_unknown_keys_refused() {
        let c = AgentConfig::from_toml(
            "[agent]\nwarm_sandboxes = 2\nstart_order = \"kubelet\"\n",
            Path::new("/k"),
        )
        .unwrap();
        assert_eq!(c.warm_sandboxes, 2);
        assert_eq!(c.start_order, StartOrder::Kubelet);
        assert_eq!(c.default_runtime_class, "kite");
        let c = AgentConfig::from_toml(
            "[agent]\n[agent.java_cache]\nmax_bytes = 1000\nwarmup_secs = 1\n",
            Path::new("/k"),
        )
        .unwrap();
        assert_eq!(
            (c.java_cache.max_bytes, c.java_cache.warmup_secs),
            (1000, 1)
        );
        assert!(AgentConfig::from_toml("[agent.java_cache]\nsize = 1\n", Path::new("/k")).is_err());
        let err = AgentConfig::from_toml("[agent]\nwarm = 2\n", Path::new("/k.toml")).unwrap_err();
        let err = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(err.contains("/k.toml") && err.contains("warm"), "{err}");
    }

    #[test]
    fn the_shipped_config_parses_and_matches_the_defaults() {
        let text = include_str!("../../deploy/kite.toml");
        let c = AgentConfig::from_toml(text, Path::new("deploy/kite.toml")).unwrap();
        assert_eq!(c.java_cache, crate::javacache::JavaCacheConfig::default());
        assert_eq!(c.start_order, StartOrder::Parallel);
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = AgentConfig::from_toml(
            "[agent]\ndefault_runtime_class = \"gvisor\"\n",
            Path::new("/k"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("default_runtime_class"), "{err}");
    }
}
