//! The warm pool's hand-over, through the filesystem: VMs booted before their pods sit in the
//! pool directory (`<state_dir>/.pool`, one sub-directory per VM), and a pod's shim claims one
//! by renaming its directory to the sandbox's. A rename is atomic: of two shims (or a shim and
//! the holder retiring the VM) exactly one wins, nothing needs a lock, and claims keep working
//! while the holder is down. Everything a VM holds is recorded in its directory (`vm.json`,
//! pid files), so the claimed VM's directory is an ordinary sandbox directory from then on.
//!
//! A VM is ready when [`PoolMeta::FILE`] exists in its directory; the holder writes it last,
//! once the VM's agent answered and the holder let go of its connection.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{renameat2, RenameFlags};
use serde::{Deserialize, Serialize};

use crate::config::VmSize;
use crate::machine::cleanup_moved_vm_dir;

/// Directories in the pool whose names start so are not VMs being offered (a retired VM on its
/// way out, a temporary file).
const HIDDEN: char = '.';
const RETIRED_PREFIX: &str = ".retired-";

/// What the holder records about a pooled VM, beside its `vm.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolMeta {
    /// What the VM was made from (configuration, kernel, initrd, binaries): an adopter with a
    /// different one must not take it.
    pub fingerprint: String,
    pub size: VmSize,
    /// The VM's NIC as booted: its tap in the holding namespace and the MAC the guest has.
    pub tap: String,
    pub mac: String,
    /// When it became ready (ms since the epoch).
    pub ready_unix_ms: u64,
}

impl PoolMeta {
    pub const FILE: &'static str = "pool.json";

    /// How long ago the VM became ready.
    pub fn age(&self) -> Duration {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        now.saturating_sub(Duration::from_millis(self.ready_unix_ms))
    }
}

/// The milliseconds since the epoch now.
pub fn unix_ms() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(now.as_millis()).unwrap_or(u64::MAX)
}

/// A VM in the pool directory.
#[derive(Clone, Debug)]
pub struct PoolEntry {
    pub name: String,
    pub dir: PathBuf,
    /// `None` while it boots (or when its holder died booting it).
    pub meta: Option<PoolMeta>,
}

/// Offers the VM in `dir` to adopters: writes its [`PoolMeta`] (under a temporary name, then
/// renamed, so an adopter never reads half of it).
pub fn publish(dir: &Path, meta: &PoolMeta) -> std::io::Result<()> {
    let temporary = dir.join(".pool.json.tmp");
    std::fs::write(
        &temporary,
        serde_json::to_vec(meta).expect("pool meta serializes"),
    )?;
    std::fs::rename(&temporary, dir.join(PoolMeta::FILE))
}

fn read_meta(dir: &Path) -> Option<PoolMeta> {
    let bytes = std::fs::read(dir.join(PoolMeta::FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The VMs in `pool_dir` (ready or booting), in no particular order. A missing pool directory
/// has none.
pub fn entries(pool_dir: &Path) -> Vec<PoolEntry> {
    let Ok(read) = std::fs::read_dir(pool_dir) else {
        return Vec::new();
    };
    read.flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if name.starts_with(HIDDEN) {
                return None;
            }
            let dir = e.path();
            Some(PoolEntry {
                meta: read_meta(&dir),
                name,
                dir,
            })
        })
        .collect()
}

/// Why no VM was claimed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Miss {
    /// No VM is ready.
    Empty,
    /// VMs are ready, but none of this size.
    Size,
    /// VMs of this size are ready, but made from another configuration or guest.
    Config,
}

impl Miss {
    pub fn as_str(self) -> &'static str {
        match self {
            Miss::Empty => "empty",
            Miss::Size => "size",
            Miss::Config => "config",
        }
    }
}

/// Claims a ready VM of `size` made from `fingerprint`: renames its directory to `target`
/// (which must not exist; on the pool's filesystem). Returns what the holder recorded about it.
pub fn claim(
    pool_dir: &Path,
    fingerprint: &str,
    size: VmSize,
    target: &Path,
) -> std::io::Result<Result<PoolMeta, Miss>> {
    let ready: Vec<(PoolEntry, PoolMeta)> = entries(pool_dir)
        .into_iter()
        .filter_map(|e| e.meta.clone().map(|m| (e, m)))
        .collect();
    if ready.is_empty() {
        return Ok(Err(Miss::Empty));
    }
    let sized: Vec<_> = ready.iter().filter(|(_, m)| m.size == size).collect();
    if sized.is_empty() {
        return Ok(Err(Miss::Size));
    }
    let mut fitting: Vec<_> = sized
        .into_iter()
        .filter(|(_, m)| m.fingerprint == fingerprint)
        .collect();
    if fitting.is_empty() {
        return Ok(Err(Miss::Config));
    }
    // The oldest first: it has waited longest (and the holder recycles the old ones).
    fitting.sort_by_key(|(_, m)| m.ready_unix_ms);
    for (entry, meta) in fitting {
        match renameat2(
            None,
            &entry.dir,
            None,
            target,
            RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => return Ok(Ok(meta.clone())),
            // Someone else claimed or retired it first.
            Err(nix::errno::Errno::ENOENT) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Err(Miss::Empty))
}

/// The QEMU command lines (kernel command line included) of a pooled VM of `size` booted with
/// `config`, under TCG and under KVM, with the configured agent channel and one tap NIC, with
/// fixed stand-ins for its directory, CID, MAC and descriptors: part of the pool's fingerprint,
/// so VMs started by another rendering of the command line are not adopted by a newer shim.
pub fn command_line_template(config: &crate::VmConfig, size: VmSize) -> String {
    use crate::config::ChannelChoice;
    use crate::net::{AttachedNic, Attachment};
    use crate::qemu::AgentChannel;
    let dir = Path::new("/pool/vm");
    let channel = match config.agent_channel {
        ChannelChoice::Serial => AgentChannel::Serial(dir.join("agent.sock")),
        ChannelChoice::Auto | ChannelChoice::Vsock => AgentChannel::Vsock(3),
    };
    let mut lines = Vec::new();
    // The accelerator is the host's to decide (its choice is in the configuration, hashed
    // beside this): both renderings, without probing the host at every look.
    for accelerator in [crate::Accelerator::Tcg, crate::Accelerator::Kvm] {
        let spec = crate::qemu::VmSpec {
            vm_id: "vm".into(),
            accelerator,
            machine: config.machine,
            vcpus: size.vcpus,
            memory_mib: size.memory_mib,
            kernel: config.kernel_path.clone(),
            initrd: config.initrd_path.clone(),
            kernel_params: config.kernel_params.clone(),
            tsc_khz: None,
            qemu_sandbox: config.qemu_sandbox,
            channel: channel.clone(),
            agent_listens: true,
            virtiofs_socket: dir.join("virtiofsd.sock"),
            qmp_socket: dir.join("qmp.sock"),
            console_log: dir.join("console.log"),
            pid_file: dir.join("qemu.pid"),
            free_page_reporting: config.free_page_reporting,
            nics: vec![AttachedNic {
                name: "eth0".into(),
                mac: "02:00:00:00:00:01".into(),
                device_mac: None,
                attachment: Attachment::Tap {
                    tap: "kite-tap0".into(),
                },
            }],
            tap_fds: vec![3],
        };
        lines.push(crate::qemu::qemu_args(&spec).join(" "));
    }
    lines.join("\n")
}

/// Takes the VM `entry` out of the pool (so no adopter can claim it any more) and releases it.
/// `Ok(false)`: it was no longer there to retire (a pod claimed it first); an error leaves it
/// in the pool, untouched.
pub fn retire(pool_dir: &Path, entry: &PoolEntry) -> std::io::Result<bool> {
    let retired = pool_dir.join(format!("{RETIRED_PREFIX}{}", entry.name));
    match renameat2(
        None,
        &entry.dir,
        None,
        &retired,
        RenameFlags::RENAME_NOREPLACE,
    ) {
        Ok(()) => {}
        Err(nix::errno::Errno::ENOENT) => return Ok(false),
        Err(e) => return Err(e.into()),
    }
    // Its processes name the directory it was started in (its state may not say so yet).
    cleanup_moved_vm_dir(&retired, &entry.dir);
    Ok(true)
}

/// Releases what retirements that were cut short left in `pool_dir`.
pub fn sweep_retired(pool_dir: &Path) {
    let Ok(read) = std::fs::read_dir(pool_dir) else {
        return;
    };
    for e in read.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(vm) = name.strip_prefix(RETIRED_PREFIX) {
            cleanup_moved_vm_dir(&e.path(), &pool_dir.join(vm));
        }
    }
}

/// A locally administered unicast MAC (`02:…`) for a pooled VM's NIC.
pub fn random_mac() -> String {
    let a = crate::machine::random_u32().to_be_bytes();
    let b = crate::machine::random_u32().to_be_bytes();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        a[0], a[1], a[2], a[3], b[0]
    )
}

/// A name for a pooled VM: 8 hex digits (short enough for its tap's name).
pub fn random_name() -> String {
    format!("{:08x}", crate::machine::random_u32())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(fp: &str, mib: u64, ready: u64) -> PoolMeta {
        PoolMeta {
            fingerprint: fp.into(),
            size: VmSize {
                vcpus: 1,
                memory_mib: mib,
            },
            tap: "kite-p1".into(),
            mac: "02:00:00:00:00:01".into(),
            ready_unix_ms: ready,
        }
    }

    fn offer(pool: &Path, name: &str, m: Option<PoolMeta>) {
        let dir = pool.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        if let Some(m) = m {
            publish(&dir, &m).unwrap();
        }
    }

    #[test]
    fn a_claim_takes_a_ready_fitting_vm_once() {
        let root = tempfile::tempdir().unwrap();
        let pool = root.path().join(".pool");
        let size = VmSize {
            vcpus: 1,
            memory_mib: 256,
        };
        let target = |n: &str| root.path().join(n);
        assert_eq!(
            claim(&pool, "fp", size, &target("a")).unwrap(),
            Err(Miss::Empty)
        );
        offer(&pool, "booting", None);
        offer(&pool, "big", Some(meta("fp", 512, 1)));
        assert_eq!(
            claim(&pool, "fp", size, &target("a")).unwrap(),
            Err(Miss::Size)
        );
        offer(&pool, "stale", Some(meta("old", 256, 1)));
        assert_eq!(
            claim(&pool, "fp", size, &target("a")).unwrap(),
            Err(Miss::Config)
        );
        offer(&pool, "young", Some(meta("fp", 256, 20)));
        offer(&pool, "old", Some(meta("fp", 256, 10)));
        let got = claim(&pool, "fp", size, &target("a")).unwrap().unwrap();
        assert_eq!(got.ready_unix_ms, 10, "the oldest first");
        assert!(target("a").join(PoolMeta::FILE).exists());
        assert!(!pool.join("old").exists());
        // The target exists: a second claim for it must not replace it.
        assert!(claim(&pool, "fp", size, &target("a")).is_err());
        let got = claim(&pool, "fp", size, &target("b")).unwrap().unwrap();
        assert_eq!(got.ready_unix_ms, 20);
        assert_eq!(
            claim(&pool, "fp", size, &target("c")).unwrap(),
            Err(Miss::Config)
        );
    }

    #[test]
    fn a_retired_vm_cannot_be_claimed_and_a_claimed_one_not_retired() {
        let root = tempfile::tempdir().unwrap();
        let pool = root.path().join(".pool");
        offer(&pool, "v1", Some(meta("fp", 256, 1)));
        offer(&pool, "v2", Some(meta("fp", 256, 2)));
        let all = entries(&pool);
        assert_eq!(all.len(), 2);
        let v1 = all.iter().find(|e| e.name == "v1").unwrap();
        let v2 = all.iter().find(|e| e.name == "v2").unwrap();
        assert!(retire(&pool, v1).unwrap());
        assert!(!pool.join(".retired-v1").exists(), "released");
        let size = v2.meta.as_ref().unwrap().size;
        claim(&pool, "fp", size, &root.path().join("sb"))
            .unwrap()
            .unwrap();
        assert!(!retire(&pool, v2).unwrap(), "claimed first");
        assert!(root.path().join("sb").exists());
        assert!(entries(&pool).is_empty());
    }

    #[test]
    fn names_and_macs_are_well_formed() {
        let mac = random_mac();
        assert_eq!(mac.len(), 17);
        assert!(mac.starts_with("02:"));
        assert_eq!(random_name().len(), 8);
        assert_ne!(random_name(), random_name());
    }
}
