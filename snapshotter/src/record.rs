//! `convert --record`: the files an image's command opens as it starts, in the order it opens
//! them, so the converter can put them first and mark them with the prefetch landmark.
//!
//! The image is unpacked (layers in order, whiteouts applied) into a tmpfs of its own, the
//! host's /dev bound into it, and its command run there with util-linux `unshare` (own mount,
//! PID, network, IPC and UTS namespaces, the image's root and working directory, /proc
//! mounted, the image's environment) for a bounded time. A fanotify mark on the tmpfs (the
//! whole filesystem, so the command's own mount namespace is covered) reports every open; the
//! first open of each regular file is recorded. The command runs as root on the host's kernel:
//! record images you would run.

use std::collections::HashSet;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};
use serde_json::Value;
use tracing::{debug, info, warn};

use crate::registry::{ImageRef, RegistryClient, RegistryError};

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record {image}")]
    Registry {
        image: String,
        source: RegistryError,
    },
    #[error("record {image}: {what}: {reason}")]
    Failed {
        image: String,
        what: String,
        reason: String,
    },
}

#[derive(Clone, Debug)]
pub struct RecordOptions {
    /// Run this instead of the image's entrypoint and command.
    pub command: Option<Vec<String>>,
    /// How long the command may run (it is killed then; start-up is what matters).
    pub duration: Duration,
}

impl Default for RecordOptions {
    fn default() -> Self {
        Self {
            command: None,
            duration: Duration::from_secs(10),
        }
    }
}

/// Unmounts and removes the recording's tmpfs however the recording ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0.join("rootfs/dev"), nix::mount::MntFlags::MNT_DETACH);
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Unpacks one layer tar onto `root`, applying its whiteouts.
fn apply_layer(root: &Path, tar_bytes: &[u8]) -> std::io::Result<()> {
    let mut archive = tar::Archive::new(tar_bytes);
    archive.set_preserve_permissions(true);
    archive.set_overwrite(true);
    // What this layer wrote: an opaque directory hides the lower layers' files, not these.
    let mut written: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = kite_estargz::clean_path(
            &path
                .parent()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        if name == ".wh..wh..opq" {
            let dir = root.join(&parent);
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    if !written.contains(&e.path()) {
                        let _ = remove_any(&e.path());
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let _ = remove_any(&root.join(&parent).join(hidden));
            continue;
        }
        // unpack_in refuses names and links that would leave `root`.
        entry.unpack_in(root)?;
        let mut at = root.to_path_buf();
        for part in kite_estargz::clean_path(&path.to_string_lossy()).split('/') {
            at.push(part);
            written.insert(at.clone());
        }
    }
    Ok(())
}

fn remove_any(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) => Err(e),
    }
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `image`'s command (or `options.command`) and returns the regular files it opened, in
/// first-open order, as paths inside the image.
pub async fn record(
    registry: &RegistryClient,
    image: &ImageRef,
    options: &RecordOptions,
) -> Result<Vec<String>, RecordError> {
    let failed = |what: &str, reason: String| RecordError::Failed {
        image: image.to_string(),
        what: what.to_string(),
        reason,
    };
    let reg = |source| RecordError::Registry {
        image: image.to_string(),
        source,
    };
    let resolved = registry.resolve(image).await.map_err(reg)?;
    let config_raw = registry
        .blob(image, &resolved.manifest.config.digest)
        .await
        .map_err(reg)?;
    let config: Value = serde_json::from_slice(&config_raw)
        .map_err(|e| failed("the image config", e.to_string()))?;
    let c = config.get("config");
    let command = match &options.command {
        Some(cmd) => cmd.clone(),
        None => {
            let mut cmd = strings(c.and_then(|c| c.get("Entrypoint")));
            cmd.extend(strings(c.and_then(|c| c.get("Cmd"))));
            cmd
        }
    };
    if command.is_empty() {
        return Err(failed(
            "the command",
            "the image has none; give --record-command".into(),
        ));
    }
    let env = strings(c.and_then(|c| c.get("Env")));
    let workdir = c
        .and_then(|c| c.get("WorkingDir"))
        .and_then(Value::as_str)
        .filter(|w| !w.is_empty())
        .unwrap_or("/")
        .to_string();

    let scratch = Scratch(std::env::temp_dir().join(format!("kite-record-{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0)
        .map_err(|e| failed("the scratch directory", e.to_string()))?;
    nix::mount::mount(
        Some("tmpfs"),
        &scratch.0,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(|e| failed("mount the scratch tmpfs", e.to_string()))?;
    let rootfs = scratch.0.join("rootfs");
    std::fs::create_dir(&rootfs).map_err(|e| failed("the rootfs", e.to_string()))?;
    for layer in &resolved.manifest.layers {
        let blob = registry.blob(image, &layer.digest).await.map_err(reg)?;
        let mut tar = Vec::new();
        if blob.starts_with(&[0x1f, 0x8b]) {
            flate2::read::MultiGzDecoder::new(&blob[..])
                .read_to_end(&mut tar)
                .map_err(|e| failed(&format!("layer {}", layer.digest), e.to_string()))?;
        } else {
            tar = blob.to_vec();
        }
        let root = rootfs.clone();
        tokio::task::spawn_blocking(move || apply_layer(&root, &tar))
            .await
            .expect("unpack thread")
            .map_err(|e| failed(&format!("unpack layer {}", layer.digest), e.to_string()))?;
    }
    for d in ["dev", "proc", "tmp"] {
        let _ = std::fs::create_dir_all(rootfs.join(d));
    }
    nix::mount::mount(
        Some("/dev"),
        &rootfs.join("dev"),
        None::<&str>,
        nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| failed("bind /dev", e.to_string()))?;

    // The image's regular files by inode (the tmpfs is one filesystem); a hard-linked file
    // is known by its first name.
    let (image_dev, image_files) = {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(&rootfs)
            .map_err(|e| failed("the rootfs", e.to_string()))?
            .dev();
        let mut files: std::collections::HashMap<u64, String> = Default::default();
        let mut stack = vec![rootfs.clone()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            let mut entries: Vec<_> = rd.flatten().collect();
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let Ok(md) = e.metadata() else { continue };
                if md.dev() != dev {
                    continue; // the bound /dev
                }
                if md.is_dir() {
                    stack.push(e.path());
                } else if md.is_file() {
                    if let Ok(rel) = e.path().strip_prefix(&rootfs) {
                        files
                            .entry(md.ino())
                            .or_insert_with(|| rel.to_string_lossy().into_owned());
                    }
                }
            }
        }
        (dev, files)
    };

    let fan = Fanotify::init(
        InitFlags::FAN_CLASS_NOTIF | InitFlags::FAN_CLOEXEC | InitFlags::FAN_NONBLOCK,
        EventFFlags::O_RDONLY | EventFFlags::O_LARGEFILE | EventFFlags::O_CLOEXEC,
    )
    .map_err(|e| failed("fanotify_init", e.to_string()))?;
    fan.mark(
        MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_FILESYSTEM,
        MaskFlags::FAN_OPEN | MaskFlags::FAN_OPEN_EXEC,
        None,
        Some(&rootfs),
    )
    .map_err(|e| failed("fanotify_mark", e.to_string()))?;

    let mut child = tokio::process::Command::new("unshare")
        .args([
            "--mount",
            "--pid",
            "--net",
            "--ipc",
            "--uts",
            "--fork",
            "--kill-child",
        ])
        .arg(format!("--root={}", rootfs.display()))
        .arg(format!("--wd={workdir}"))
        .arg("--mount-proc")
        .arg("--")
        .args(&command)
        .env_clear()
        .envs(env.iter().filter_map(|kv| kv.split_once('=')))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| failed("run the command with unshare", e.to_string()))?;
    info!(%image, command = ?command, secs = options.duration.as_secs(), "recording");

    let mut seen = HashSet::new();
    let mut order = Vec::new();
    let started = Instant::now();
    let mut exited = None;
    loop {
        match fan.read_events() {
            Ok(events) => {
                for ev in events {
                    let Some(fd) = ev.fd() else {
                        warn!("fanotify queue overflowed; the recording may miss files");
                        continue;
                    };
                    let Ok(st) = nix::sys::stat::fstat(fd.as_raw_fd()) else {
                        continue;
                    };
                    if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_dev != image_dev {
                        continue;
                    }
                    // By inode: the opener's paths are in its own mount namespace and root.
                    if let Some(rel) = image_files.get(&st.st_ino) {
                        if seen.insert(rel.clone()) {
                            order.push(rel.clone());
                        }
                    }
                }
                continue;
            }
            Err(nix::errno::Errno::EAGAIN) => {}
            Err(e) => return Err(failed("read fanotify events", e.to_string())),
        }
        if exited.is_some() {
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            // One more pass collects the last events.
            exited = Some(st);
            continue;
        }
        if started.elapsed() > options.duration {
            let _ = child.kill().await;
            exited = child.try_wait().ok().flatten();
            if exited.is_none() {
                break;
            }
            continue;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    match exited {
        Some(st) if !st.success() => {
            warn!(%image, status = %st, "the recorded command failed; what it opened is kept")
        }
        _ => debug!(%image, files = order.len(), status = ?exited, "recorded"),
    }
    drop(scratch);
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn layers_apply_in_order_with_whiteouts() {
        let root = tempfile::tempdir().unwrap();
        apply_layer(
            root.path(),
            &layer(&[("a/x", b"1"), ("a/y", b"2"), ("b/z", b"3")]),
        )
        .unwrap();
        apply_layer(
            root.path(),
            &layer(&[("b/new", b"4"), ("a/.wh.x", b""), ("b/.wh..wh..opq", b"")]),
        )
        .unwrap();
        assert!(!root.path().join("a/x").exists());
        assert_eq!(std::fs::read(root.path().join("a/y")).unwrap(), b"2");
        assert!(!root.path().join("b/z").exists());
        assert_eq!(std::fs::read(root.path().join("b/new")).unwrap(), b"4");
    }
}
