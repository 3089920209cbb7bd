//! The agent's records, one per pod (`<state_dir>/pods/<uid>.pb`, the `kite.node.v1.Pod`
//! protobuf: its manifest and what the agent made of it), written atomically on each change.
//! A new agent reads them to adopt the pods that run.

use std::path::{Path, PathBuf};

use kite_protocol::node::Pod;
use prost::Message;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pod record {path} is not a kite.node.v1.Pod")]
    Decode {
        path: PathBuf,
        #[source]
        source: prost::DecodeError,
    },
}

#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

impl Store {
    /// The records under `<state_dir>/pods`, made if missing.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        let dir = state_dir.join("pods");
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        Ok(Store { dir })
    }

    fn path(&self, uid: &str) -> PathBuf {
        self.dir.join(format!("{uid}.pb"))
    }

    pub fn save(&self, pod: &Pod) -> Result<(), StoreError> {
        let path = self.path(&pod.uid);
        kite_config::files::write_atomic(&path, &pod.encode_to_vec(), 0o644)
            .map_err(io("write", &path))
    }

    pub fn remove(&self, uid: &str) -> Result<(), StoreError> {
        let path = self.path(uid);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", &path)(e)),
            _ => Ok(()),
        }
    }

    /// Every record; one that cannot be read is reported and skipped (the others still load).
    pub fn load_all(&self) -> (Vec<Pod>, Vec<StoreError>) {
        let (mut pods, mut errors) = (Vec::new(), Vec::new());
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => return (pods, vec![io("read", &self.dir)(e)]),
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("pb") {
                continue;
            }
            match std::fs::read(&path) {
                Ok(bytes) => match Pod::decode(bytes.as_slice()) {
                    Ok(pod) => pods.push(pod),
                    Err(source) => errors.push(StoreError::Decode { path, source }),
                },
                Err(e) => errors.push(io("read", &path)(e)),
            }
        }
        pods.sort_by_key(|p| p.created_unix_ms);
        (pods, errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_a_bad_one_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let pod = Pod {
            uid: "u1".into(),
            name: "web".into(),
            manifest_json: "{}".into(),
            ..Default::default()
        };
        store.save(&pod).unwrap();
        std::fs::write(dir.path().join("pods/bad.pb"), b"\xff\xff\xff").unwrap();
        let (pods, errors) = store.load_all();
        assert_eq!(pods, vec![pod]);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("bad.pb"));
        store.remove("u1").unwrap();
        store.remove("u1").unwrap();
        assert!(store.load_all().0.is_empty());
    }
}
