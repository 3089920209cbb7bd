//! The shim's configuration: the `[shim]` section of `/etc/kite/kite.toml`, overridden by
//! `KITE_CONFIG` (another file) and `KITE_SHIM_*` environment variables.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kite_vmm::VmConfig;
use serde::Deserialize;

pub use kite_config::ConfigError;
pub use kite_vmm::{AcceleratorChoice, ChannelChoice, MachineType, NetworkMode};

/// The section of kite.toml this file reads.
const SECTION: &str = "shim";

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ShimConfig {
    pub qemu_path: PathBuf,
    pub virtiofsd_path: PathBuf,
    pub kernel_path: PathBuf,
    pub initrd_path: PathBuf,
    pub accelerator: AcceleratorChoice,
    pub machine: MachineType,
    /// How the shim reaches the guest agent.
    pub agent_channel: ChannelChoice,
    /// vCPUs of a VM before the pod's CPU limit is added.
    pub default_vcpus: u32,
    /// Memory of a VM (MiB) before the pod's memory limit is added.
    pub default_memory_mib: u64,
    pub max_vcpus: u32,
    pub max_memory_mib: u64,
    /// How long the guest agent may take to answer after QEMU starts.
    pub boot_timeout_secs: u64,
    /// QEMU's seccomp sandbox (`-sandbox on,...`).
    pub qemu_sandbox: bool,
    /// Extra words for the guest kernel command line.
    pub kernel_params: String,
    /// Where per-sandbox state lives (sockets, share, logs).
    pub state_dir: PathBuf,
    /// Log filter (tracing `EnvFilter` syntax), e.g. "info" or "kite_shim=debug".
    pub log_level: String,
    /// Pass a pod interface whose device is a PCI function (an ENI, an SR-IOV VF) into the
    /// VM with VFIO, rather than through a tap.
    pub vfio_passthrough: bool,
    /// How the other interfaces are attached: `tc` or `macvtap`.
    pub network_mode: NetworkMode,
    /// A virtio-balloon with free page reporting: memory the guest frees returns to the host.
    pub free_page_reporting: bool,
    /// Each container start's stages as a JSON line ("": none); rotated past 1 MiB.
    pub timings_file: PathBuf,
    /// The warm pool: VMs booted before their pods (`[shim.pool]`).
    pub pool: PoolConfig,
}

/// `[shim.pool]`: VMs kept booted (by `kite-pool`) for pods to adopt, so the VM's boot leaves
/// a pod's start. A pod adopts a VM of exactly its size made from the same configuration and
/// guest; any other pod, or any pod when none is ready, boots its own VM as without a pool.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// kite-pool keeps VMs booted and pods adopt them; off: kite-pool releases the pool.
    pub enabled: bool,
    /// VMs of the default size (`default_vcpus`, `default_memory_mib`) kept ready.
    pub count: u32,
    /// Further sizes (a pod whose limits make it this size adopts one).
    pub classes: Vec<PoolClass>,
    /// Where pooled VMs wait ("": `<state_dir>/.pool`); on the state_dir's mount, since a
    /// pod takes a VM by renaming its directory.
    pub dir: PathBuf,
    /// The guest memory all pooled VMs (ready and booting) may have together (MiB).
    pub memory_budget_mib: u64,
    /// No VM is booted into the pool while the host has less memory available (MiB).
    pub min_available_mib: u64,
    /// After a pod took a VM the refill waits this long: the pod's start needs the CPU more.
    pub refill_delay_ms: u64,
    /// A pooled VM this old is replaced by a fresh one (0: never).
    pub max_age_secs: u64,
    /// The host cgroup idle pooled VMs run in ("": the holder's own); a pod's VM moves to the
    /// pod's cgroup when adopted.
    pub cgroup: String,
    /// How long a pod's shim waits for a pooled VM's agent before it boots its own VM.
    pub adopt_timeout_ms: u64,
    /// Each booted VM runs one throwaway container (created, started, removed) before it is
    /// offered, so a pod's first container set-up finds that code paged in (and, under TCG,
    /// translated). The VM keeps nothing of it but warm caches.
    pub warm_up: bool,
    /// kite-pool's Prometheus metrics (`GET /metrics`); "" for none.
    pub metrics_addr: String,
    /// kite-pool's log filter (tracing `EnvFilter` syntax).
    pub log_level: String,
}

/// A size of pooled VM, and how many of it are kept ready.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PoolClass {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub count: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            enabled: false,
            count: 2,
            classes: Vec::new(),
            dir: PathBuf::new(),
            memory_budget_mib: 2048,
            min_available_mib: 1024,
            refill_delay_ms: 1000,
            max_age_secs: 3600,
            cgroup: "/kite-pool".into(),
            adopt_timeout_ms: 5000,
            warm_up: true,
            metrics_addr: "127.0.0.1:9613".into(),
            // libcgroups warns of every v1 controller the host lacks, on every VM it places.
            log_level: "info,libcgroups=error".into(),
        }
    }
}

impl Default for ShimConfig {
    fn default() -> Self {
        Self {
            qemu_path: "/usr/bin/qemu-system-x86_64".into(),
            virtiofsd_path: "/usr/local/bin/virtiofsd".into(),
            kernel_path: "/var/lib/kite/guest/vmlinuz".into(),
            initrd_path: "/var/lib/kite/guest/initrd.img".into(),
            accelerator: AcceleratorChoice::Auto,
            machine: MachineType::Microvm,
            agent_channel: ChannelChoice::Auto,
            default_vcpus: 1,
            default_memory_mib: 256,
            max_vcpus: 8,
            max_memory_mib: 16384,
            boot_timeout_secs: 30,
            qemu_sandbox: true,
            kernel_params: String::new(),
            state_dir: "/run/kite/sandboxes".into(),
            log_level: "info".into(),
            vfio_passthrough: true,
            network_mode: NetworkMode::Tc,
            free_page_reporting: true,
            timings_file: "/run/kite/timings.jsonl".into(),
            pool: PoolConfig::default(),
        }
    }
}

impl ShimConfig {
    pub fn boot_timeout(&self) -> Duration {
        Duration::from_secs(self.boot_timeout_secs)
    }

    /// Where pooled VMs wait.
    pub fn pool_dir(&self) -> PathBuf {
        if self.pool.dir.as_os_str().is_empty() {
            self.state_dir.join(".pool")
        } else {
            self.pool.dir.clone()
        }
    }

    /// The pool's sizes and how many VMs of each are kept: the default size first.
    pub fn pool_classes(&self) -> Vec<PoolClass> {
        let default = PoolClass {
            vcpus: self.default_vcpus,
            memory_mib: self.default_memory_mib,
            count: self.pool.count,
        };
        std::iter::once(default)
            .chain(self.pool.classes.iter().copied())
            .filter(|c| c.count > 0)
            .collect()
    }

    /// The parts of the configuration the VM layer reads.
    pub fn vm_config(&self) -> VmConfig {
        VmConfig {
            qemu_path: self.qemu_path.clone(),
            virtiofsd_path: self.virtiofsd_path.clone(),
            kernel_path: self.kernel_path.clone(),
            initrd_path: self.initrd_path.clone(),
            accelerator: self.accelerator,
            machine: self.machine,
            agent_channel: self.agent_channel,
            kernel_params: self.kernel_params.clone(),
            qemu_sandbox: self.qemu_sandbox,
            free_page_reporting: self.free_page_reporting,
            boot_timeout: self.boot_timeout(),
        }
    }

    /// Parses the `[shim]` section of a kite.toml text (other sections belong to the other
    /// components and are ignored here).
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let shim: ShimConfig = kite_config::parse_section(text, path, SECTION)?;
        shim.validate(path)?;
        Ok(shim)
    }

    /// Loads the configuration from `path` (a runtime's `ConfigPath` option, which must
    /// exist), then the environment overrides.
    pub fn load_from(path: &Path) -> Result<Self, ConfigError> {
        Self::load_path(path, false)
    }

    /// Loads the configuration: `KITE_CONFIG` or /etc/kite/kite.toml when it exists, then the
    /// environment overrides.
    pub fn load() -> Result<Self, ConfigError> {
        Self::load_path(&kite_config::config_path(None), true)
    }

    fn load_path(path: &Path, missing_is_default: bool) -> Result<Self, ConfigError> {
        let mut config: ShimConfig = kite_config::load_section(path, SECTION, missing_is_default)?;
        config.apply_env(path, |k| std::env::var(k).ok())?;
        config.validate(path)?;
        Ok(config)
    }

    fn apply_env(
        &mut self,
        path: &Path,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let invalid = |key, reason| ConfigError::Invalid {
            path: path.to_path_buf(),
            section: SECTION,
            key,
            reason,
        };
        if let Some(v) = get("KITE_SHIM_ACCELERATOR") {
            self.accelerator = match v.as_str() {
                "auto" => AcceleratorChoice::Auto,
                "kvm" => AcceleratorChoice::Kvm,
                "tcg" => AcceleratorChoice::Tcg,
                other => {
                    return Err(invalid(
                        "KITE_SHIM_ACCELERATOR",
                        format!("{other:?} is not auto, kvm or tcg"),
                    ))
                }
            };
        }
        if let Some(v) = get("KITE_SHIM_KERNEL") {
            self.kernel_path = v.into();
        }
        if let Some(v) = get("KITE_SHIM_INITRD") {
            self.initrd_path = v.into();
        }
        if let Some(v) = get("KITE_SHIM_BOOT_TIMEOUT_SECS") {
            self.boot_timeout_secs = v.parse().map_err(|_| {
                invalid(
                    "KITE_SHIM_BOOT_TIMEOUT_SECS",
                    format!("{v:?} is not a number of seconds"),
                )
            })?;
        }
        if let Some(v) = get("KITE_SHIM_LOG") {
            self.log_level = v;
        }
        Ok(())
    }

    /// Checks the values against each other; `path` is named in the error.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                section: SECTION,
                key,
                reason: reason.to_string(),
            })
        };
        if self.default_vcpus == 0 || self.default_vcpus > self.max_vcpus {
            return invalid("default_vcpus", "must be between 1 and max_vcpus");
        }
        if self.default_memory_mib < 64 || self.default_memory_mib > self.max_memory_mib {
            return invalid(
                "default_memory_mib",
                "must be between 64 and max_memory_mib",
            );
        }
        if self.boot_timeout_secs == 0 {
            return invalid("boot_timeout_secs", "must be at least 1");
        }
        for class in &self.pool.classes {
            if class.vcpus == 0 || class.vcpus > self.max_vcpus {
                return invalid("pool.classes.vcpus", "must be between 1 and max_vcpus");
            }
            if class.memory_mib < 64 || class.memory_mib > self.max_memory_mib {
                return invalid(
                    "pool.classes.memory_mib",
                    "must be between 64 and max_memory_mib",
                );
            }
        }
        // A pod takes a pooled VM by renaming its directory into state_dir; the holder treats
        // every directory in the pool as a VM of its own, so the pool must not be state_dir
        // itself, nor a directory a sandbox could be named.
        let pool_dir = self.pool_dir();
        let hidden_child = pool_dir.parent() == Some(self.state_dir.as_path())
            && pool_dir
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if !hidden_child {
            return invalid(
                "pool.dir",
                "must be a directory of state_dir whose name starts with '.' (e.g. <state_dir>/.pool)",
            );
        }
        Ok(())
    }
}

/// The `config_path` of containerd's runtime options (`runtimeoptions.v1.Options`, what
/// `ctr run --runtime-config-path` and the CRI's `ConfigPath` send), from its protobuf bytes.
pub fn runtime_options_config_path(type_url: &str, value: &[u8]) -> Option<PathBuf> {
    if !type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    let mut input = protobuf::CodedInputStream::from_bytes(value);
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 2 && wire == 2 {
            let path = input.read_string().ok()?;
            return (!path.is_empty()).then(|| PathBuf::from(path));
        }
        let wire_type = protobuf::rt::WireType::new(wire)?;
        input.skip_field(wire_type).ok()?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_path_is_read_from_runtime_options() {
        // type_url = "x" (field 1), config_path = "/tmp/k.toml" (field 2)
        let mut bytes = vec![0x0a, 1, b'x', 0x12, 11];
        bytes.extend_from_slice(b"/tmp/k.toml");
        assert_eq!(
            runtime_options_config_path("runtimeoptions.v1.Options", &bytes),
            Some(PathBuf::from("/tmp/k.toml"))
        );
        assert_eq!(
            runtime_options_config_path("containerd.runc.v1.Options", &bytes),
            None
        );
        assert_eq!(
            runtime_options_config_path("runtimeoptions.v1.Options", &[0x0a, 1, b'x']),
            None
        );
    }

    #[test]
    fn an_empty_file_gives_the_defaults() {
        let c = ShimConfig::from_toml("", Path::new("/x")).unwrap();
        assert_eq!(c, ShimConfig::default());
    }

    #[test]
    fn the_shim_section_is_read_and_others_ignored() {
        let text = r#"
            [shim]
            accelerator = "tcg"
            machine = "pc"
            default_memory_mib = 512
            [snapshotter]
            anything = 1
        "#;
        let c = ShimConfig::from_toml(text, Path::new("/etc/kite/kite.toml")).unwrap();
        assert_eq!(c.accelerator, AcceleratorChoice::Tcg);
        assert_eq!(c.machine, MachineType::Pc);
        assert_eq!(c.default_memory_mib, 512);
        assert_eq!(c.default_vcpus, 1);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_naming_the_file() {
        let err = ShimConfig::from_toml("[shim]\nacelerator = \"tcg\"", Path::new("/k.toml"))
            .unwrap_err();
        let err = kite_protocol::errors::error_chain(&err);
        assert!(
            err.contains("/k.toml") && err.contains("acelerator"),
            "{err}"
        );
        let err = ShimConfig::from_toml("[shim]\ndefault_vcpus = 0", Path::new("/k.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("default_vcpus"), "{err}");
    }

    #[test]
    fn the_pool_is_a_sub_table_with_the_default_size_first() {
        let text = r#"
            [shim]
            default_memory_mib = 384
            [shim.pool]
            enabled = true
            count = 1
            [[shim.pool.classes]]
            vcpus = 2
            memory_mib = 1024
            count = 3
        "#;
        let c = ShimConfig::from_toml(text, Path::new("/k.toml")).unwrap();
        assert!(c.pool.enabled);
        assert_eq!(c.pool_dir(), Path::new("/run/kite/sandboxes/.pool"));
        let classes: Vec<_> = c
            .pool_classes()
            .iter()
            .map(|k| (k.vcpus, k.memory_mib, k.count))
            .collect();
        assert_eq!(classes, vec![(1, 384, 1), (2, 1024, 3)]);
        let outside = "[shim.pool]\nenabled = true\ndir = \"/tmp/pool\"";
        let err = ShimConfig::from_toml(outside, Path::new("/k.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("pool.dir"), "{err}");
        // The pool must not be state_dir (every sandbox would look like a pooled VM) nor a
        // name a sandbox could have; checked with the pool off too (drain reads it).
        for dir in [
            "/run/kite/sandboxes",
            "/run/kite/sandboxes/pool",
            "/run/kite/sandboxes/a/.p",
        ] {
            let text = format!("[shim.pool]\ndir = \"{dir}\"");
            let err = ShimConfig::from_toml(&text, Path::new("/k.toml")).unwrap_err();
            assert!(err.to_string().contains("pool.dir"), "{dir}: {err}");
        }
        let own = "[shim.pool]\ndir = \"/run/kite/sandboxes/.pool-b\"";
        assert!(ShimConfig::from_toml(own, Path::new("/k.toml")).is_ok());
        let typo = "[shim.pool]\ncuont = 1";
        assert!(ShimConfig::from_toml(typo, Path::new("/k.toml")).is_err());
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut c = ShimConfig::default();
        let path = Path::new("/k.toml");
        c.apply_env(path, |k| {
            (k == "KITE_SHIM_ACCELERATOR").then(|| "kvm".to_string())
        })
        .unwrap();
        assert_eq!(c.accelerator, AcceleratorChoice::Kvm);
        let err = c
            .apply_env(path, |k| {
                (k == "KITE_SHIM_ACCELERATOR").then(|| "xen".to_string())
            })
            .unwrap_err();
        assert!(err.to_string().contains("xen"));
    }
}
