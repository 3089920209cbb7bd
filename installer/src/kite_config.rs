//! The kite.toml an install writes: every path under the install's own directories, so that
//! an install can be taken away whole, with the operator's overrides merged over it.

use std::path::{Path, PathBuf};

use toml::{Table, Value};

use crate::containerd_config::merge;

/// Where an install keeps things on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Versioned binaries and guest images: `<prefix>/<version>/…`, `<prefix>/current`.
    pub prefix: PathBuf,
    /// kite.toml and kite's containerd drop-in directory.
    pub config_dir: PathBuf,
    /// Sockets, pid files, sandboxes' runtime state.
    pub run_dir: PathBuf,
    /// The snapshotter's layers and cache, the agent's state, the Java archive cache.
    pub state_dir: PathBuf,
    /// Daemon logs and pod logs.
    pub log_dir: PathBuf,
}

impl Layout {
    pub fn current(&self) -> PathBuf {
        self.prefix.join("current")
    }
    pub fn current_bin(&self, name: &str) -> PathBuf {
        self.current().join("bin").join(name)
    }
    pub fn kite_config(&self) -> PathBuf {
        self.config_dir.join("kite.toml")
    }
    /// The directory containerd's import glob names.
    pub fn drop_in_dir(&self) -> PathBuf {
        self.config_dir.join("containerd.d")
    }
    pub fn drop_in(&self) -> PathBuf {
        self.drop_in_dir().join("kite.toml")
    }
    /// The `imports` entry: a glob, so a drop-in removed by hand never stops containerd.
    pub fn import_glob(&self) -> String {
        format!("{}/*.toml", self.drop_in_dir().display())
    }
    pub fn snapshotter_socket(&self) -> PathBuf {
        self.run_dir.join("snapshotter.sock")
    }
    pub fn agent_socket(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }
    pub fn snapshotter_root(&self) -> PathBuf {
        self.state_dir.join("snapshotter")
    }
    pub fn pidfile(&self, daemon: &str) -> PathBuf {
        self.run_dir.join(format!("{daemon}.pid"))
    }
    pub fn daemon_log(&self, daemon: &str) -> PathBuf {
        self.log_dir.join(format!("{daemon}.log"))
    }
    /// The install record (what was added, to take away exactly that).
    pub fn record(&self) -> PathBuf {
        self.prefix.join("install.json")
    }
}

/// kite.toml for `layout`, with `cri_socket` (containerd's) and `overlay` (the operator's TOML,
/// merged last).
pub fn render(layout: &Layout, cri_socket: &Path, overlay: Option<Table>) -> String {
    let p = |path: PathBuf| Value::String(path.display().to_string());
    let cur = layout.current();
    let mut root = Table::new();
    let section = |entries: Vec<(&str, Value)>| {
        Value::Table(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
    };
    root.insert(
        "shim".into(),
        section(vec![
            ("kernel_path", p(cur.join("share/guest/vmlinuz"))),
            ("initrd_path", p(cur.join("share/guest/initrd.img"))),
            ("virtiofsd_path", p(cur.join("bin/virtiofsd"))),
            ("state_dir", p(layout.run_dir.join("sandboxes"))),
            ("timings_file", p(layout.run_dir.join("timings.jsonl"))),
            // The warm pool (kite-pool), with its defaults: 2 VMs of the default size.
            ("pool", section(vec![("enabled", Value::Boolean(true))])),
        ]),
    );
    root.insert(
        "snapshotter".into(),
        section(vec![
            ("root", p(layout.snapshotter_root())),
            ("socket", p(layout.snapshotter_socket())),
            ("prefetch_socket", p(layout.run_dir.join("prefetch.sock"))),
            ("lazyfs_socket", p(layout.run_dir.join("lazyfs.sock"))),
            ("lazyfs_path", p(cur.join("bin/kite-lazyfs"))),
        ]),
    );
    let mut agent = Table::new();
    for (k, v) in [
        ("cri_socket", p(cri_socket.to_path_buf())),
        ("api_socket", p(layout.agent_socket())),
        ("prefetch_socket", p(layout.run_dir.join("prefetch.sock"))),
        ("state_dir", p(layout.state_dir.join("agent"))),
        ("log_dir", p(layout.log_dir.join("pods"))),
    ] {
        agent.insert(k.into(), v);
    }
    agent.insert(
        "java_cache".into(),
        section(vec![("dir", p(layout.state_dir.join("java-cache")))]),
    );
    root.insert("agent".into(), Value::Table(agent));
    if let Some(overlay) = overlay {
        merge(&mut root, overlay);
    }
    format!(
        "# kite's configuration, written by kite-deploy (removed by `kite-deploy uninstall`\n\
         # unless changed since). Every path is under the install's directories.\n{}",
        toml::to_string(&root).unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            prefix: "/opt/kite".into(),
            config_dir: "/etc/kite".into(),
            run_dir: "/run/kite".into(),
            state_dir: "/var/lib/kite".into(),
            log_dir: "/var/log/kite".into(),
        }
    }

    #[test]
    fn every_path_is_under_the_layout_and_the_overlay_wins() {
        let overlay: Table = toml::from_str(
            "[agent]\nmetrics_addr = \"127.0.0.1:9700\"\n[shim]\ndefault_vcpus = 2\n",
        )
        .unwrap();
        let text = render(
            &layout(),
            Path::new("/run/containerd/containerd.sock"),
            Some(overlay),
        );
        let t: Table = toml::from_str(&text).unwrap();
        assert_eq!(
            t["shim"]["kernel_path"].as_str(),
            Some("/opt/kite/current/share/guest/vmlinuz")
        );
        assert_eq!(t["shim"]["default_vcpus"].as_integer(), Some(2));
        assert_eq!(t["shim"]["pool"]["enabled"].as_bool(), Some(true));
        assert_eq!(
            t["snapshotter"]["lazyfs_path"].as_str(),
            Some("/opt/kite/current/bin/kite-lazyfs")
        );
        assert_eq!(t["agent"]["metrics_addr"].as_str(), Some("127.0.0.1:9700"));
        assert_eq!(
            t["agent"]["cri_socket"].as_str(),
            Some("/run/containerd/containerd.sock")
        );
        assert_eq!(
            t["agent"]["java_cache"]["dir"].as_str(),
            Some("/var/lib/kite/java-cache")
        );
        let roots = [
            "/opt/kite/",
            "/run/kite/",
            "/var/lib/kite/",
            "/var/log/kite/",
            "/run/containerd/",
        ];
        for section in ["shim", "snapshotter", "agent"] {
            for (k, v) in t[section].as_table().unwrap() {
                if let Some(s) = v.as_str().filter(|s| s.starts_with('/')) {
                    assert!(
                        roots.iter().any(|r| s.starts_with(r)),
                        "{section}.{k} = {s}"
                    );
                }
            }
        }
        assert_eq!(layout().import_glob(), "/etc/kite/containerd.d/*.toml");
    }
}
