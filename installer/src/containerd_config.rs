//! containerd's configuration, as kite changes it: a drop-in of kite's own, imported by the
//! operator's `config.toml` through one added `imports` entry.
//!
//! containerd 1.6 and 1.7 merge an imported file into the main one *per plugin*: a drop-in that
//! names `plugins."io.containerd.grpc.v1.cri"` replaces the main file's whole CRI section
//! (registry mirrors, CNI, the sandbox image, every runtime). So kite's drop-in restates the CRI
//! section containerd would otherwise use — the last one among the main file and its imports —
//! and adds kite's runtime to it. `proxy_plugins` merge by name and need no such care. The
//! import is an absolute glob: a drop-in that is gone (kite removed by hand) leaves containerd
//! starting, where a plain path that is missing stops it.

use std::path::{Path, PathBuf};

use toml::{Table, Value};

/// containerd's CRI plugin, as a version-2 config names it.
pub const CRI_PLUGIN: &str = "io.containerd.grpc.v1.cri";
/// kite's runtime type (the shim `containerd-shim-kite-v2`).
pub const KITE_RUNTIME_TYPE: &str = "io.containerd.kite.v2";
/// The RuntimeClass handler and the proxy snapshotter's name.
pub const KITE_HANDLER: &str = "kite";
/// containerd's socket when its config does not say.
pub const DEFAULT_GRPC_ADDRESS: &str = "/run/containerd/containerd.sock";

#[derive(Debug, thiserror::Error)]
pub enum ContainerdConfigError {
    #[error("containerd config {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("containerd config {path}: {source}")]
    Edit {
        path: PathBuf,
        #[source]
        source: Box<toml_edit::TomlError>,
    },
    #[error(
        "containerd config {path} is version {version}: kite's drop-in needs version 2 \
         (containerd 1.x with `version = 2`; plugin names like \"io.containerd.grpc.v1.cri\")"
    )]
    Version { path: PathBuf, version: i64 },
    #[error("containerd config {path}: `{key}` is not {expected}")]
    Shape {
        path: PathBuf,
        key: String,
        expected: &'static str,
    },
    #[error("kite's extra containerd settings: {0}")]
    Extra(String),
}

/// The operator's main config file, read (or absent: containerd then runs on its defaults and
/// reads no imports, so kite creates a file holding only the import).
#[derive(Debug, Clone)]
pub struct MainConfig {
    path: PathBuf,
    text: Option<String>,
    table: Table,
}

impl MainConfig {
    pub fn parse(path: &Path, text: Option<String>) -> Result<MainConfig, ContainerdConfigError> {
        let table = match &text {
            Some(t) => toml::from_str::<Table>(t).map_err(|e| ContainerdConfigError::Parse {
                path: path.to_path_buf(),
                source: Box::new(e),
            })?,
            None => Table::new(),
        };
        let config = MainConfig {
            path: path.to_path_buf(),
            text,
            table,
        };
        let version = config.version();
        if version != 2 {
            return Err(ContainerdConfigError::Version {
                path: path.to_path_buf(),
                version,
            });
        }
        Ok(config)
    }

    pub fn exists(&self) -> bool {
        self.text.is_some()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `version` (1 when an existing file does not say, as containerd reads it; a missing file
    /// becomes a version-2 file of kite's).
    pub fn version(&self) -> i64 {
        match (&self.text, self.table.get("version")) {
            (None, _) => 2,
            (Some(_), Some(Value::Integer(v))) => *v,
            (Some(_), _) => 1,
        }
    }

    /// The socket containerd serves its API (and the CRI) on.
    pub fn grpc_address(&self) -> PathBuf {
        self.table
            .get("grpc")
            .and_then(|g| g.get("address"))
            .and_then(Value::as_str)
            .filter(|a| !a.is_empty())
            .unwrap_or(DEFAULT_GRPC_ADDRESS)
            .into()
    }

    /// The main file's `imports`, as written.
    pub fn imports(&self) -> Vec<String> {
        self.table
            .get("imports")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The main file's CRI section.
    pub fn cri_section(&self) -> Option<Table> {
        cri_section(&self.table)
    }

    /// The file's text with `import` added to `imports` (unchanged when it is there already);
    /// the rest of the operator's text — comments, order, spacing — is kept as it was.
    pub fn with_import(&self, import: &str) -> Result<String, ContainerdConfigError> {
        let Some(text) = &self.text else {
            return Ok(format!(
                "# Written by kite-deploy: containerd reads no imports without a config file.\n\
                 version = 2\nimports = [{}]\n",
                Value::String(import.into())
            ));
        };
        if self.imports().iter().any(|i| i == import) {
            return Ok(text.clone());
        }
        let mut doc = self.edit_doc(text)?;
        match doc.get_mut("imports") {
            Some(item) => {
                let array = item.as_array_mut().ok_or(ContainerdConfigError::Shape {
                    path: self.path.clone(),
                    key: "imports".into(),
                    expected: "an array of paths",
                })?;
                array.push(import);
            }
            None => {
                let mut array = toml_edit::Array::new();
                array.push(import);
                doc.insert("imports", toml_edit::value(array));
            }
        }
        Ok(doc.to_string())
    }

    /// The file's text with `import` taken out of `imports` (the key removed when nothing else
    /// is left in it): for an operator's file that changed since kite added the import.
    pub fn without_import(&self, import: &str) -> Result<Option<String>, ContainerdConfigError> {
        let Some(text) = &self.text else {
            return Ok(None);
        };
        let mut doc = self.edit_doc(text)?;
        let mut now_empty = false;
        if let Some(array) = doc.get_mut("imports").and_then(|i| i.as_array_mut()) {
            array.retain(|v| v.as_str() != Some(import));
            now_empty = array.is_empty();
        }
        if now_empty {
            doc.remove("imports");
        }
        Ok(Some(doc.to_string()))
    }

    fn edit_doc(&self, text: &str) -> Result<toml_edit::DocumentMut, ContainerdConfigError> {
        text.parse::<toml_edit::DocumentMut>()
            .map_err(|e| ContainerdConfigError::Edit {
                path: self.path.clone(),
                source: Box::new(e),
            })
    }
}

/// The CRI section of a parsed config file.
pub fn cri_section(table: &Table) -> Option<Table> {
    table
        .get("plugins")
        .and_then(|p| p.get(CRI_PLUGIN))
        .and_then(Value::as_table)
        .cloned()
}

/// What kite's drop-in says.
#[derive(Debug, Clone)]
pub struct DropInSpec {
    /// The shim, through the install's `current` link (an upgrade switches new pods over).
    pub runtime_path: PathBuf,
    /// kite's own config, handed to the shim as the runtime's `ConfigPath` option.
    pub kite_config: PathBuf,
    /// kite-snapshotter's socket (the proxy plugin `kite`).
    pub snapshotter_socket: PathBuf,
    /// Make `kite` the CRI's snapshotter (for every pod: containerd 1.6 has no per-runtime one).
    pub cri_snapshotter: bool,
    /// The operator's extra settings, merged over the drop-in last.
    pub extra: Option<Table>,
}

/// kite's drop-in: the proxy snapshotter, and `base_cri` (the CRI section containerd uses
/// without kite; its built-in defaults when `None`) with kite's runtime added.
pub fn render_drop_in(
    base_cri: Option<Table>,
    spec: &DropInSpec,
) -> Result<String, ContainerdConfigError> {
    let mut cri = base_cri.unwrap_or_else(|| {
        // containerd's own defaults for what a replaced section must keep: the default runtime
        // and its entry (a section naming any runtime replaces the whole map).
        table([(
            "containerd",
            table([
                ("default_runtime_name", "runc".into()),
                (
                    "runtimes",
                    table([(
                        "runc",
                        table([("runtime_type", "io.containerd.runc.v2".into())]),
                    )]),
                ),
            ]),
        )])
        .as_table()
        .cloned()
        .unwrap_or_default()
    });
    let shape = |key: &str| ContainerdConfigError::Shape {
        path: "(the CRI section kite restates)".into(),
        key: key.into(),
        expected: "a table",
    };
    let containerd = entry_table(&mut cri, "containerd").ok_or_else(|| shape("containerd"))?;
    if spec.cri_snapshotter {
        containerd.insert("snapshotter".into(), KITE_HANDLER.into());
        containerd.insert("disable_snapshot_annotations".into(), false.into());
    }
    let runtimes =
        entry_table(containerd, "runtimes").ok_or_else(|| shape("containerd.runtimes"))?;
    let kite = table([
        ("runtime_type", KITE_RUNTIME_TYPE.into()),
        ("runtime_path", path_value(&spec.runtime_path)),
        // The annotations kite reads (io.kite.*) reach the shim.
        ("pod_annotations", Value::Array(vec!["io.kite.*".into()])),
        ("privileged_without_host_devices", true.into()),
        (
            "options",
            table([("ConfigPath", path_value(&spec.kite_config))]),
        ),
    ]);
    runtimes.insert(KITE_HANDLER.into(), kite);

    let mut root = Table::new();
    root.insert("version".into(), 2.into());
    root.insert(
        "proxy_plugins".into(),
        table([(
            KITE_HANDLER,
            table([
                ("type", "snapshot".into()),
                ("address", path_value(&spec.snapshotter_socket)),
            ]),
        )]),
    );
    root.insert("plugins".into(), table([(CRI_PLUGIN, Value::Table(cri))]));
    if let Some(extra) = &spec.extra {
        merge(&mut root, extra.clone());
    }
    let body =
        toml::to_string(&root).map_err(|e| ContainerdConfigError::Extra(format!("render: {e}")))?;
    Ok(format!(
        "# kite's containerd drop-in, written by kite-deploy (removed by `kite-deploy uninstall`).\n\
         # It restates the CRI section containerd used before (containerd 1.x replaces a plugin's\n\
         # whole section with an imported one) and adds the runtime `kite`.\n{body}"
    ))
}

/// Parses the operator's extra drop-in settings (TOML).
pub fn parse_extra(text: &str) -> Result<Table, ContainerdConfigError> {
    toml::from_str(text).map_err(|e| ContainerdConfigError::Extra(e.to_string()))
}

/// Merges `over` into `base`: tables key by key, anything else replaced.
pub fn merge(base: &mut Table, over: Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn table<const N: usize>(entries: [(&str, Value); N]) -> Value {
    Value::Table(
        entries
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

fn path_value(p: &Path) -> Value {
    Value::String(p.display().to_string())
}

/// `t[key]` as a table, made when absent; `None` when it is something else.
fn entry_table<'a>(t: &'a mut Table, key: &str) -> Option<&'a mut Table> {
    t.entry(key.to_string())
        .or_insert_with(|| Value::Table(Table::new()))
        .as_table_mut()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPERATOR: &str = r#"# the operator's file
version = 2
root = "/var/lib/containerd"

[grpc]
  address = "/run/x/containerd.sock"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.example/pause:3.9"
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/usr/lib/cni"
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
"#;

    fn spec(cri_snapshotter: bool) -> DropInSpec {
        DropInSpec {
            runtime_path: "/opt/kite/current/bin/containerd-shim-kite-v2".into(),
            kite_config: "/etc/kite/kite.toml".into(),
            snapshotter_socket: "/run/kite/snapshotter.sock".into(),
            cri_snapshotter,
            extra: None,
        }
    }

    fn main(text: Option<&str>) -> MainConfig {
        MainConfig::parse(
            Path::new("/etc/containerd/config.toml"),
            text.map(str::to_string),
        )
        .unwrap()
    }

    #[test]
    fn the_import_is_one_added_line_and_comes_out_again() {
        let m = main(Some(OPERATOR));
        assert_eq!(m.grpc_address(), PathBuf::from("/run/x/containerd.sock"));
        let with = m.with_import("/etc/kite/containerd.d/*.toml").unwrap();
        // Everything the operator wrote is still there, byte for byte, around the new key.
        let added: Vec<_> = with
            .lines()
            .filter(|l| !OPERATOR.lines().any(|o| o == *l))
            .collect();
        assert_eq!(
            added,
            vec![r#"imports = ["/etc/kite/containerd.d/*.toml"]"#]
        );
        let again = main(Some(&with));
        assert_eq!(again.imports(), vec!["/etc/kite/containerd.d/*.toml"]);
        assert_eq!(
            again.with_import("/etc/kite/containerd.d/*.toml").unwrap(),
            with,
            "adding twice changes nothing"
        );
        let without = again
            .without_import("/etc/kite/containerd.d/*.toml")
            .unwrap()
            .unwrap();
        assert_eq!(without, OPERATOR);
    }

    #[test]
    fn other_imports_are_kept() {
        let text = "version = 2\nimports = [\"/etc/containerd/other.toml\"]\n";
        let m = main(Some(text));
        let with = m.with_import("/etc/kite/containerd.d/*.toml").unwrap();
        assert_eq!(
            main(Some(&with)).imports(),
            vec![
                "/etc/containerd/other.toml",
                "/etc/kite/containerd.d/*.toml"
            ]
        );
        let without = main(Some(&with))
            .without_import("/etc/kite/containerd.d/*.toml")
            .unwrap()
            .unwrap();
        assert_eq!(
            main(Some(&without)).imports(),
            vec!["/etc/containerd/other.toml"]
        );
    }

    #[test]
    fn a_missing_file_becomes_one_holding_the_import() {
        let m = main(None);
        assert!(!m.exists());
        assert_eq!(m.grpc_address(), PathBuf::from(DEFAULT_GRPC_ADDRESS));
        let text = m.with_import("/etc/kite/containerd.d/*.toml").unwrap();
        let back = main(Some(&text));
        assert_eq!(back.version(), 2);
        assert_eq!(back.imports(), vec!["/etc/kite/containerd.d/*.toml"]);
    }

    #[test]
    fn version_1_files_are_refused() {
        for text in ["[plugins.cri]\nsandbox_image = \"x\"\n", "version = 1\n"] {
            let err = MainConfig::parse(Path::new("/c.toml"), Some(text.into())).unwrap_err();
            assert!(err.to_string().contains("/c.toml") && err.to_string().contains("version 2"));
        }
        let err = MainConfig::parse(Path::new("/c.toml"), Some("version = [".into())).unwrap_err();
        assert!(err.to_string().contains("/c.toml"), "{err}");
    }

    #[test]
    fn the_drop_in_restates_the_operators_cri_section_and_adds_kite() {
        let m = main(Some(OPERATOR));
        let text = render_drop_in(m.cri_section(), &spec(false)).unwrap();
        let t: Table = toml::from_str(&text).unwrap();
        assert_eq!(t["version"].as_integer(), Some(2));
        assert_eq!(
            t["proxy_plugins"]["kite"]["address"].as_str(),
            Some("/run/kite/snapshotter.sock")
        );
        let cri = cri_section(&t).unwrap();
        // The operator's settings survive the section's replacement.
        assert_eq!(
            cri["sandbox_image"].as_str(),
            Some("registry.example/pause:3.9")
        );
        assert_eq!(cri["cni"]["bin_dir"].as_str(), Some("/usr/lib/cni"));
        let c = &cri["containerd"];
        assert_eq!(c["default_runtime_name"].as_str(), Some("runc"));
        assert!(
            c.get("snapshotter").is_none(),
            "the CRI's snapshotter is kept"
        );
        assert_eq!(
            c["runtimes"]["runc"]["runtime_type"].as_str(),
            Some("io.containerd.runc.v2")
        );
        let kite = &c["runtimes"]["kite"];
        assert_eq!(kite["runtime_type"].as_str(), Some(KITE_RUNTIME_TYPE));
        assert_eq!(
            kite["runtime_path"].as_str(),
            Some("/opt/kite/current/bin/containerd-shim-kite-v2")
        );
        assert_eq!(
            kite["options"]["ConfigPath"].as_str(),
            Some("/etc/kite/kite.toml")
        );
        assert_eq!(kite["pod_annotations"][0].as_str(), Some("io.kite.*"));
    }

    #[test]
    fn without_a_cri_section_the_drop_in_keeps_containerds_defaults() {
        let text = render_drop_in(None, &spec(true)).unwrap();
        let t: Table = toml::from_str(&text).unwrap();
        let c = &cri_section(&t).unwrap()["containerd"];
        assert_eq!(c["default_runtime_name"].as_str(), Some("runc"));
        assert_eq!(
            c["runtimes"]["runc"]["runtime_type"].as_str(),
            Some("io.containerd.runc.v2")
        );
        assert_eq!(c["snapshotter"].as_str(), Some("kite"));
        assert_eq!(c["disable_snapshot_annotations"].as_bool(), Some(false));
    }

    #[test]
    fn extra_settings_merge_over_the_drop_in() {
        let mut s = spec(false);
        s.extra = Some(
            parse_extra(
                "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kite]\n\
                 privileged_without_host_devices = false\n",
            )
            .unwrap(),
        );
        let t: Table = toml::from_str(&render_drop_in(None, &s).unwrap()).unwrap();
        let kite = &cri_section(&t).unwrap()["containerd"]["runtimes"]["kite"];
        assert_eq!(
            kite["privileged_without_host_devices"].as_bool(),
            Some(false)
        );
        assert_eq!(kite["runtime_type"].as_str(), Some(KITE_RUNTIME_TYPE));
        assert!(parse_extra("x = [").is_err());
    }
}
