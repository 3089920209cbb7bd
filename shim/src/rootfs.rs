//! A container's files in the sandbox share: its rootfs (containerd's snapshot mounts) and the
//! host files its OCI bind mounts name, which the guest cannot see otherwise.
//!
//! Layout under the share: `<cid>/rootfs` and `<cid>/mounts/<n>`.

use std::path::{Path, PathBuf};

use containerd_shim::protos::api::Mount;
use nix::mount::{mount, MsFlags};
use oci_spec::runtime::Spec;

use kite_vmm::mounts::unmount_under;

pub const ROOTFS: &str = "rootfs";
const MOUNTS: &str = "mounts";

/// The CRI names a container's pod (sandbox) in this annotation.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("container {cid}: {op} {path}")]
    Io {
        cid: String,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("container {cid}: mount {what} on {target}")]
    Mount {
        cid: String,
        what: String,
        target: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("container {cid}: bind mount source {source_path} does not exist")]
    MissingSource { cid: String, source_path: PathBuf },
}

/// The CRI marks a pod's sandbox ("pause") container with `sandbox` here.
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";

/// Whether the container is a pod's sandbox container: kite runs nothing for it in the VM
/// (under runc its process only holds the pod's namespaces; here the VM holds them).
pub fn is_pod_sandbox(spec: &Spec) -> bool {
    spec.annotations()
        .as_ref()
        .and_then(|a| a.get(CONTAINER_TYPE_ANNOTATION))
        .is_some_and(|t| t == "sandbox")
}

/// The sandbox a container belongs to: its pod's, or its own.
pub fn sandbox_id(cid: &str, spec: &Spec) -> String {
    spec.annotations()
        .as_ref()
        .and_then(|a| a.get(SANDBOX_ID_ANNOTATION))
        .filter(|s| !s.is_empty())
        .cloned()
        .unwrap_or_else(|| cid.to_string())
}

fn is_bind(m: &oci_spec::runtime::Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

/// Mounts the rootfs into `cdir/rootfs` and the bind-mount sources into `cdir/mounts/<n>`,
/// rewriting the spec's sources to the guest's view of the share.
pub fn prepare(
    cid: &str,
    cdir: &Path,
    bundle: &Path,
    rootfs_mounts: &[Mount],
    spec: &mut Spec,
) -> Result<(), RootfsError> {
    let io = |op, path: &Path| {
        let cid = cid.to_string();
        let path = path.to_path_buf();
        move |source| RootfsError::Io {
            cid,
            op,
            path,
            source,
        }
    };
    let target = cdir.join(ROOTFS);
    std::fs::create_dir_all(&target).map_err(io("create", &target))?;
    if rootfs_mounts.is_empty() {
        // The bundle's rootfs is ready as it is (ctr run --rootfs).
        let source = bundle.join(ROOTFS);
        bind(cid, &source, &target, true)?;
    } else {
        for m in rootfs_mounts {
            containerd_shim::mount::mount_rootfs(
                Some(m.type_.as_str()).filter(|t| !t.is_empty()),
                Some(m.source.as_str()).filter(|s| !s.is_empty()),
                &m.options,
                &target,
            )
            .map_err(|e| RootfsError::Mount {
                cid: cid.to_string(),
                what: format!("{} {}", m.type_, m.source),
                target: target.clone(),
                source: Box::new(e),
            })?;
        }
    }

    let Some(mounts) = spec.mounts().clone() else {
        return Ok(());
    };
    let mut rewritten = Vec::with_capacity(mounts.len());
    for (n, mut m) in mounts.into_iter().enumerate() {
        if is_bind(&m) {
            if let Some(source) = m.source().clone().filter(|s| s.is_absolute()) {
                if !source.exists() {
                    return Err(RootfsError::MissingSource {
                        cid: cid.to_string(),
                        source_path: source,
                    });
                }
                let rel = PathBuf::from(cid).join(MOUNTS).join(n.to_string());
                let host_target = cdir.join(MOUNTS).join(n.to_string());
                if source.is_dir() {
                    std::fs::create_dir_all(&host_target).map_err(io("create", &host_target))?;
                } else {
                    std::fs::create_dir_all(cdir.join(MOUNTS)).map_err(io("create", cdir))?;
                    std::fs::write(&host_target, b"").map_err(io("create", &host_target))?;
                }
                let recursive = m
                    .options()
                    .as_ref()
                    .is_some_and(|o| o.iter().any(|x| x == "rbind"));
                bind(cid, &source, &host_target, recursive)?;
                m.set_source(Some(Path::new(kite_protocol::GUEST_SHARE_DIR).join(rel)));
            }
        }
        rewritten.push(m);
    }
    spec.set_mounts(Some(rewritten));
    Ok(())
}

fn bind(cid: &str, source: &Path, target: &Path, recursive: bool) -> Result<(), RootfsError> {
    let mut flags = MsFlags::MS_BIND;
    if recursive {
        flags |= MsFlags::MS_REC;
    }
    mount(Some(source), target, None::<&str>, flags, None::<&str>).map_err(|e| RootfsError::Mount {
        cid: cid.to_string(),
        what: source.display().to_string(),
        target: target.to_path_buf(),
        source: Box::new(e),
    })
}

/// Unmounts and removes a container's directory in the share. Safe to call twice.
pub fn release(cdir: &Path) {
    unmount_under(cdir);
    let _ = std::fs::remove_dir_all(cdir);
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::SpecBuilder;
    use std::collections::HashMap;

    #[test]
    fn containers_of_a_pod_share_its_sandbox() {
        let mut annotations = HashMap::new();
        annotations.insert(SANDBOX_ID_ANNOTATION.to_string(), "pod1".to_string());
        let spec = SpecBuilder::default()
            .annotations(annotations)
            .build()
            .unwrap();
        assert_eq!(sandbox_id("c1", &spec), "pod1");
        let plain = SpecBuilder::default().build().unwrap();
        assert_eq!(sandbox_id("c1", &plain), "c1");
    }

    #[test]
    fn bind_mounts_are_recognised() {
        let m = |typ: &str, opts: &[&str]| {
            oci_spec::runtime::MountBuilder::default()
                .destination("/x")
                .typ(typ)
                .options(opts.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .build()
                .unwrap()
        };
        assert!(is_bind(&m("bind", &[])));
        assert!(is_bind(&m("none", &["rbind", "ro"])));
        assert!(!is_bind(&m("proc", &[])));
    }
}
