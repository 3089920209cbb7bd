//! The warm pool: VMs booted before their pods exist, so a pod's start skips the VM's boot.
//!
//! - [`holder`]: `kite-pool`, the daemon that keeps `[shim.pool]`'s VMs ready in the pool
//!   directory, refills it, retires VMs that died, aged or no longer fit the configuration, and
//!   releases the pool when it is turned off (`kite-pool drain`).
//! - The shim's side is [`crate::sandbox::Sandbox::start`]: a pod claims a VM of its size made
//!   from its configuration ([`fingerprint`]), else boots its own as without a pool.
//!
//! The hand-over is the filesystem's ([`kite_vmm::pool`]): a claim is a rename, so claims work
//! while the holder restarts, and a pooled VM's processes do not depend on the holder's.

pub mod holder;
pub mod metrics;

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use kite_vmm::VmSize;

use crate::config::ShimConfig;

/// The file in the pool directory where shims note their misses (one reason per line) for the
/// holder's metrics.
pub const MISSES_FILE: &str = ".misses";
/// The holding network namespace, in the pool directory.
pub const NETNS_FILE: &str = ".netns";

/// What a VM of `size` booted with `config` is made from: the VM layer's configuration, the
/// size, the kite version, the QEMU command lines kite renders for it, and the identity (size,
/// modification time, inode) of QEMU, virtiofsd, the guest kernel and initrd. A pod adopts only a VM with its own fingerprint, so a changed
/// configuration or a rebuilt guest never serves a pod from a VM made otherwise.
pub fn fingerprint(config: &ShimConfig, size: VmSize) -> String {
    let vm = config.vm_config();
    // `DefaultHasher::new()` hashes the same in every process of one build (fixed keys): the
    // holder and the shims are one build; a different build has another version or binaries.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    env!("CARGO_PKG_VERSION").hash(&mut hasher);
    format!("{vm:?}").hash(&mut hasher);
    kite_vmm::pool::command_line_template(&vm, size).hash(&mut hasher);
    (size.vcpus, size.memory_mib).hash(&mut hasher);
    // A VM booted without a warm-up is not offered once warm-ups are on (and the other way).
    config.pool.warm_up.hash(&mut hasher);
    for path in [
        &vm.qemu_path,
        &vm.virtiofsd_path,
        &vm.kernel_path,
        &vm.initrd_path,
    ] {
        path.hash(&mut hasher);
        if let Ok(m) = std::fs::metadata(path) {
            (m.len(), m.mtime(), m.mtime_nsec(), m.ino()).hash(&mut hasher);
        }
    }
    format!("{:016x}", hasher.finish())
}

/// Notes that a pod found no fitting VM in `pool_dir`, and why (a word), for the holder's
/// metrics. One append of one line: shims that note at once do not interleave.
pub fn record_miss(pool_dir: &Path, reason: &str) {
    let line = format!("{reason}\n");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(pool_dir.join(MISSES_FILE))
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        tracing::debug!(pool = %pool_dir.display(), error = %e, "note a pool miss");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_follows_the_size_the_configuration_and_the_guest() {
        let dir = tempfile::tempdir().unwrap();
        let initrd = dir.path().join("initrd.img");
        std::fs::write(&initrd, b"one").unwrap();
        let config = ShimConfig {
            initrd_path: initrd.clone(),
            ..ShimConfig::default()
        };
        let size = VmSize {
            vcpus: 1,
            memory_mib: 256,
        };
        let fp = fingerprint(&config, size);
        assert_eq!(fp, fingerprint(&config, size), "stable");
        let bigger = VmSize {
            memory_mib: 512,
            ..size
        };
        assert_ne!(fp, fingerprint(&config, bigger));
        let other = ShimConfig {
            kernel_params: "debug".into(),
            ..config.clone()
        };
        assert_ne!(fp, fingerprint(&other, size));
        std::fs::write(&initrd, b"a rebuilt guest").unwrap();
        assert_ne!(fp, fingerprint(&config, size));
    }

    #[test]
    fn misses_are_lines() {
        let dir = tempfile::tempdir().unwrap();
        record_miss(dir.path(), "empty");
        record_miss(dir.path(), "size");
        let text = std::fs::read_to_string(dir.path().join(MISSES_FILE)).unwrap();
        assert_eq!(text, "empty\nsize\n");
    }
}
