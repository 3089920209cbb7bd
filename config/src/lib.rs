//! What every kite daemon shares: its configuration and its plumbing ([`daemon`]: sockets,
//! signals, logging; [`files`]: files replaced whole).
//!
//! kite.toml: one file, one section per component (`[shim]`, `[snapshotter]`, `[agent]`, …).
//! Each component owns its section's type; this crate reads a section out of the file, so that
//! every daemon reports a missing file, a bad file and a bad key the same way.

use std::path::{Path, PathBuf};

pub mod daemon;
pub mod files;

use serde::de::DeserializeOwned;

/// Where kite's configuration lives unless a flag or `KITE_CONFIG` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kite/kite.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parse config {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("config {path}: {section}.{key}: {reason}")]
    Invalid {
        path: PathBuf,
        section: &'static str,
        key: &'static str,
        reason: String,
    },
}

/// The configuration file to read: `explicit` (a flag), else `KITE_CONFIG`, else the default.
pub fn config_path(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("KITE_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
}

/// Parses section `name` of a kite.toml `text` (read from `path`, named in errors). A file
/// without that section gives `T::default()`; other sections are other components' and are not
/// looked at. Unknown keys are refused when `T` says `deny_unknown_fields`.
pub fn parse_section<T: DeserializeOwned + Default>(
    text: &str,
    path: &Path,
    name: &str,
) -> Result<T, ConfigError> {
    let parse = |source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    };
    let mut table: toml::Table = toml::from_str(text).map_err(parse)?;
    match table.remove(name) {
        Some(section) => section.try_into::<T>().map_err(parse),
        None => Ok(T::default()),
    }
}

/// Reads section `name` of the file at `path`. When `missing_is_default`, a file that does not
/// exist gives `T::default()` (a node without /etc/kite/kite.toml runs on the defaults); a file
/// named explicitly must exist.
pub fn load_section<T: DeserializeOwned + Default>(
    path: &Path,
    name: &str,
    missing_is_default: bool,
) -> Result<T, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_section(&text, path, name),
        Err(e) if missing_is_default && e.kind() == std::io::ErrorKind::NotFound => {
            Ok(T::default())
        }
        Err(source) => Err(ConfigError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Section {
        size: u32,
    }

    #[test]
    fn a_section_is_read_and_others_ignored() {
        let s: Section =
            parse_section("[x]\nsize = 3\n[y]\nother = 1\n", Path::new("/k.toml"), "x").unwrap();
        assert_eq!(s.size, 3);
        let s: Section = parse_section("", Path::new("/k.toml"), "x").unwrap();
        assert_eq!(s, Section::default());
    }

    #[test]
    fn a_bad_key_names_the_file_and_the_key_in_the_cause() {
        let e = parse_section::<Section>("[x]\nsiz = 3\n", Path::new("/k.toml"), "x").unwrap_err();
        assert_eq!(e.to_string(), "parse config /k.toml");
        let cause = std::error::Error::source(&e)
            .expect("the parser's error")
            .to_string();
        assert!(cause.contains("siz"), "{cause}");
    }

    #[test]
    fn a_missing_file_is_the_defaults_only_when_allowed() {
        let dir = std::env::temp_dir().join(format!("kite-config-test-{}", std::process::id()));
        let path = dir.join("none.toml");
        let s: Section = load_section(&path, "x", true).unwrap();
        assert_eq!(s, Section::default());
        let e = load_section::<Section>(&path, "x", false).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
    }
}
