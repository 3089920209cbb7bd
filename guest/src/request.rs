//! Checks of what the shim asks of the agent, made before anything in the guest changes: ids
//! that become file and cgroup names, the rootfs within the share, the OCI spec and process.
//! Pure functions, so the fuzz targets (`fuzz/`) drive them with arbitrary requests.

use std::path::{Component, Path, PathBuf};

use kite_protocol::agent::{CreateContainerRequest, ExecProcessRequest};
use oci_spec::runtime::{Process, Spec};

use crate::runtime;

pub use kite_protocol::MAX_ID_LEN;
/// The largest OCI spec or process (JSON) the agent reads; containerd's are a few KiB.
pub const MAX_SPEC_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{what} {id:?}: {reason}")]
    Id {
        what: &'static str,
        id: String,
        reason: &'static str,
    },
    #[error("container {id}: rootfs {rootfs:?}: {reason}")]
    Rootfs {
        id: String,
        rootfs: String,
        reason: &'static str,
    },
    #[error("container {id}: OCI spec: {reason}")]
    Spec { id: String, reason: String },
    #[error("container {id}: exec {exec_id}: OCI process: {reason}")]
    Process {
        id: String,
        exec_id: String,
        reason: String,
    },
}

/// A container id: a containerd identifier ([`kite_protocol::identifier_problem`]).
pub fn check_id(what: &'static str, id: &str) -> Result<(), RequestError> {
    match kite_protocol::identifier_problem(id) {
        None => Ok(()),
        Some(reason) => Err(RequestError::Id {
            what,
            id: id.chars().take(2 * MAX_ID_LEN).collect(),
            reason,
        }),
    }
}

/// The longest exec id taken: containerd only asks for a non-empty one, but it names files.
pub const MAX_EXEC_ID_LEN: usize = 128;

/// An exec id: containerd checks only that it is not empty (`ctr task exec --exec-id` takes
/// `a:b`), so any name that is safe as one file name in the container's directory passes.
pub fn check_exec_id(id: &str) -> Result<(), RequestError> {
    let bad = |reason| {
        Err(RequestError::Id {
            what: "exec",
            id: id.chars().take(2 * MAX_EXEC_ID_LEN).collect(),
            reason,
        })
    };
    if id.is_empty() || id == "." || id == ".." {
        return bad("is empty, . or ..");
    }
    if id.len() > MAX_EXEC_ID_LEN {
        return bad("is longer than 128 bytes");
    }
    if id.contains(['/', '\0']) {
        return bad("holds a / or a NUL");
    }
    Ok(())
}

/// The container's rootfs: `rootfs` must be a relative path of plain names under `share`.
pub fn rootfs_in_share(share: &Path, id: &str, rootfs: &str) -> Result<PathBuf, RequestError> {
    let bad = |reason| RequestError::Rootfs {
        id: id.to_string(),
        rootfs: rootfs.chars().take(256).collect(),
        reason,
    };
    let rel = Path::new(rootfs);
    if rootfs.is_empty() || rootfs.contains('\0') {
        return Err(bad("is empty or holds a NUL"));
    }
    if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(bad("is not a relative path of plain names in the share"));
    }
    Ok(share.join(rel))
}

/// A container to create: its checked id, its spec adapted to the guest, its rootfs.
#[derive(Debug)]
pub struct CreatePlan {
    pub id: String,
    pub spec: Spec,
    pub rootfs: PathBuf,
}

/// Checks a `CreateContainer` request and adapts its spec to the guest (see
/// [`runtime::adapt_spec`]); the rootfs is not looked at on disk here.
pub fn plan_create(share: &Path, req: &CreateContainerRequest) -> Result<CreatePlan, RequestError> {
    let id = &req.container_id;
    check_id("container", id)?;
    let rootfs = rootfs_in_share(share, id, &req.rootfs)?;
    let spec_error = |reason: String| RequestError::Spec {
        id: id.clone(),
        reason,
    };
    if req.oci_spec.len() > MAX_SPEC_BYTES {
        return Err(spec_error(format!(
            "{} bytes, over {MAX_SPEC_BYTES}",
            req.oci_spec.len()
        )));
    }
    let mut spec: Spec =
        serde_json::from_slice(&req.oci_spec).map_err(|e| spec_error(e.to_string()))?;
    runtime::adapt_spec(id, &mut spec, &rootfs).map_err(|e| match e {
        runtime::RuntimeError::Spec { reason, .. } => spec_error(reason),
        other => spec_error(other.to_string()),
    })?;
    if let Some(p) = spec.process_mut() {
        p.set_terminal(Some(req.terminal));
    }
    Ok(CreatePlan {
        id: id.clone(),
        spec,
        rootfs,
    })
}

/// Checks an `ExecProcess` request; returns the process to run, adapted to the guest.
pub fn plan_exec(req: &ExecProcessRequest) -> Result<Process, RequestError> {
    let (id, exec_id) = (&req.container_id, &req.exec_id);
    check_id("container", id)?;
    check_exec_id(exec_id)?;
    let process_error = |reason: String| RequestError::Process {
        id: id.clone(),
        exec_id: exec_id.clone(),
        reason,
    };
    if req.process.len() > MAX_SPEC_BYTES {
        return Err(process_error(format!(
            "{} bytes, over {MAX_SPEC_BYTES}",
            req.process.len()
        )));
    }
    let mut process: Process =
        serde_json::from_slice(&req.process).map_err(|e| process_error(e.to_string()))?;
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(process_error("args is empty".into()));
    }
    process.set_terminal(Some(req.terminal));
    process.set_apparmor_profile(None);
    process.set_selinux_label(None);
    Ok(process)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_containerd_identifiers() {
        for ok in ["c1", "a.b-c_d", "0123abcdef", &"x".repeat(MAX_ID_LEN)] {
            check_id("container", ok).unwrap();
        }
        for bad in [
            "",
            "..",
            "../etc",
            "a/b",
            "a..b",
            "-a",
            "a-",
            "a b",
            "a\0b",
            "é",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            let e = check_id("container", bad).unwrap_err().to_string();
            assert!(e.starts_with("container "), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_rootfs_stays_in_the_share() {
        let share = Path::new("/run/kite/share");
        assert_eq!(
            rootfs_in_share(share, "c1", "c1/rootfs").unwrap(),
            Path::new("/run/kite/share/c1/rootfs")
        );
        for bad in ["", "/etc", "../x", "c1/../../x", "./c1", "c1\0"] {
            assert!(rootfs_in_share(share, "c1", bad).is_err(), "{bad:?}");
        }
    }

    fn create(id: &str, spec: &str) -> CreateContainerRequest {
        CreateContainerRequest {
            container_id: id.into(),
            oci_spec: spec.as_bytes().to_vec(),
            rootfs: format!("{id}/rootfs"),
            ..Default::default()
        }
    }

    #[test]
    fn a_create_request_is_checked_before_anything_is_written() {
        let share = Path::new("/share");
        let spec = r#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},"root":{"path":"rootfs"}}"#;
        let plan = plan_create(share, &create("c1", spec)).unwrap();
        assert_eq!(plan.rootfs, Path::new("/share/c1/rootfs"));
        assert_eq!(
            plan.spec.root().as_ref().unwrap().path(),
            Path::new("/share/c1/rootfs")
        );
        let e = plan_create(share, &create("../c1", spec)).unwrap_err();
        assert!(e.to_string().contains("container \"../c1\""), "{e}");
        let e = plan_create(share, &create("c1", "{")).unwrap_err();
        assert!(e.to_string().contains("container c1: OCI spec"), "{e}");
        let no_args =
            r#"{"ociVersion":"1.0.2","process":{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}}"#;
        assert!(plan_create(share, &create("c1", no_args)).is_err());
    }

    #[test]
    fn an_exec_request_needs_ids_and_a_command() {
        let req = |exec_id: &str, process: &str| ExecProcessRequest {
            container_id: "c1".into(),
            exec_id: exec_id.into(),
            process: process.as_bytes().to_vec(),
            ..Default::default()
        };
        let p = r#"{"args":["ps"],"cwd":"/","user":{"uid":0,"gid":0}}"#;
        assert_eq!(
            plan_exec(&req("e1", p)).unwrap().args().as_ref().unwrap()[0],
            "ps"
        );
        // What ctr takes, the guest takes; what would leave the directory, it refuses.
        assert!(plan_exec(&req("my:exec @1", p)).is_ok());
        for bad in ["../e1", "a/b", "", ".", "..", "a\0b", &"x".repeat(129)] {
            assert!(plan_exec(&req(bad, p)).is_err(), "{bad:?}");
        }
        assert!(plan_exec(&req(
            "e1",
            r#"{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}"#
        ))
        .is_err());
    }
}
