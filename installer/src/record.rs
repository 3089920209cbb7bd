//! The install record: what an install added to the host, so that `uninstall` takes away
//! exactly that and puts back what was there before.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    /// The version `current` points at.
    pub version: String,
    /// Versions installed by a package (`--source` was already in place): not ours to remove.
    #[serde(default)]
    pub package_versions: Vec<String>,
    /// Directories the install created (removed whole by uninstall).
    pub created_dirs: Vec<PathBuf>,
    /// Files the install wrote, with the digest of what it wrote: uninstall removes a file
    /// only while it still holds that (an operator's later edit is kept and reported).
    pub written_files: Vec<WrittenFile>,
    /// containerd's main config as it was before kite: `None` when there was no file.
    pub containerd_config_before: Option<String>,
    /// The main config as kite left it (its digest): unchanged since, uninstall puts the old
    /// bytes back; changed by the operator since, uninstall only takes kite's import out.
    pub containerd_config_after_sha256: String,
    /// `systemd` or `command`: how the daemons were started.
    pub service_manager: String,
    /// False while an install or upgrade is under way (`status` is not healthy then).
    #[serde(default)]
    pub complete: bool,
    /// The link to the shim in a directory on containerd's PATH.
    #[serde(default)]
    pub shim_link: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WrittenFile {
    pub path: PathBuf,
    pub sha256: String,
}

impl Record {
    /// Notes that the install wrote `bytes` to `path`.
    pub fn wrote(&mut self, path: &Path, bytes: &[u8]) {
        self.written_files.retain(|f| f.path != path);
        self.written_files.push(WrittenFile {
            path: path.to_path_buf(),
            sha256: sha256(bytes),
        });
    }

    pub fn created_dir(&mut self, path: &Path) {
        if !self.created_dirs.iter().any(|d| d == path) {
            self.created_dirs.push(path.to_path_buf());
        }
    }

    pub fn wrote_file(&self, path: &Path) -> Option<&WrittenFile> {
        self.written_files.iter().find(|f| f.path == path)
    }
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_remembers_the_last_write() {
        let mut r = Record {
            version: "1".into(),
            ..Default::default()
        };
        r.wrote(Path::new("/etc/kite/kite.toml"), b"a");
        r.wrote(Path::new("/etc/kite/kite.toml"), b"b");
        r.created_dir(Path::new("/opt/kite"));
        r.created_dir(Path::new("/opt/kite"));
        assert_eq!(r.written_files.len(), 1);
        assert_eq!(r.created_dirs.len(), 1);
        assert_eq!(
            r.wrote_file(Path::new("/etc/kite/kite.toml"))
                .unwrap()
                .sha256,
            sha256(b"b")
        );
        let back: Record = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}
