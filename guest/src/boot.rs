//! Early boot as PID 1: leave the initramfs root, mount the kernel filesystems, load modules,
//! mount the sandbox share.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};
use nix::unistd::{chdir, chroot, execv};

use crate::modules;

/// Where the initrd keeps the agent's root; `/init` is a link into it.
const SYSROOT: &str = "/sysroot";
const MODULE_LIST: &str = "/lib/modules/modules.load";
const MODULE_BASE: &str = "/lib/modules";

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("mount {fstype} on {target}")]
    Mount {
        fstype: String,
        target: String,
        source: nix::Error,
    },
    #[error("leave the initramfs root: {0}")]
    SwitchRoot(nix::Error),
    #[error(transparent)]
    Modules(#[from] modules::ModuleError),
    #[error("mount the sandbox share {tag} on {target} (waited {waited:?})")]
    Share {
        tag: String,
        target: String,
        waited: Duration,
        source: nix::Error,
    },
}

/// The initramfs root (`rootfs`) cannot be the old root of a `pivot_root`, which container
/// set-up needs. So PID 1 first makes `/sysroot` a mount, moves it over `/`, enters it and
/// executes itself again there. Returns only when there is nothing to switch (already done).
pub fn leave_initramfs() -> Result<(), BootError> {
    let sysroot = Path::new(SYSROOT);
    if !sysroot.join("init").exists() {
        return Ok(());
    }
    let err = BootError::SwitchRoot;
    mount(
        Some(sysroot),
        sysroot,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(err)?;
    chdir(sysroot).map_err(err)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(err)?;
    chroot(".").map_err(err)?;
    chdir("/").map_err(err)?;
    let init = c"/init";
    execv(init, &[init]).map_err(err)?;
    unreachable!("execv returns only on error");
}

fn mount_fs(
    fstype: &str,
    target: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), BootError> {
    std::fs::create_dir_all(target).ok();
    mount(Some(fstype), target, Some(fstype), flags, data).map_err(|source| BootError::Mount {
        fstype: fstype.to_string(),
        target: target.to_string(),
        source,
    })
}

/// Mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /run, /tmp and the cgroup2 hierarchy, and
/// delegates the cgroup controllers so containers get their own limits.
pub fn mount_kernel_filesystems() -> Result<(), BootError> {
    let common = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", common, None)?;
    mount_fs("sysfs", "/sys", common, None)?;
    mount_fs("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    mount_fs(
        "devpts",
        "/dev/pts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mount_fs("tmpfs", "/dev/shm", common, Some("mode=1777"))?;
    mount_fs(
        "tmpfs",
        "/run",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mount_fs(
        "tmpfs",
        "/tmp",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_fs("cgroup2", "/sys/fs/cgroup", common, None)?;
    // Each controller separately: one the kernel lacks must not disable the others.
    for controller in ["cpu", "cpuset", "memory", "pids", "io", "hugetlb"] {
        let _ = std::fs::write(
            "/sys/fs/cgroup/cgroup.subtree_control",
            format!("+{controller}"),
        );
    }
    Ok(())
}

/// Loads the modules listed in the initrd. Returns each one's name and load time (ms).
pub fn load_modules(cmdline: &str) -> Result<Vec<(String, f64)>, BootError> {
    let loaded = modules::load_all(Path::new(MODULE_LIST), Path::new(MODULE_BASE), cmdline)?;
    // Every module the VM needs is loaded at boot (the host names the groups): the files held
    // in the guest's RAM (the initrd's, unpacked) go.
    let _ = std::fs::remove_dir_all(MODULE_BASE);
    Ok(loaded)
}

/// The smallest free block free page reporting gives back to the host: 2^5 pages = 128 KiB
/// (the kernel's default is a 2 MiB pageblock, which leaves the memory a boot frees in pieces
/// with the guest). Measured here on an idle VM after compaction: 110.7 MiB of guest RAM held
/// with order 9, 93.7 with 5, 93.0 with 3, 92.8 with 0; 5 keeps the reports (and the host's
/// refaults of reported memory) coarse.
const PAGE_REPORTING_ORDER: u32 = 5;

/// Lets free page reporting give back blocks of [`PAGE_REPORTING_ORDER`] (a parameter of the
/// kernel's page_reporting, set once the balloon driver has registered; without the driver
/// nothing is reported anyway).
pub fn report_free_memory_finely() {
    let _ = std::fs::write(
        "/sys/module/page_reporting/parameters/page_reporting_order",
        PAGE_REPORTING_ORDER.to_string(),
    );
}

/// Compacts the guest's free memory once, so that free page reporting (which gives back only
/// whole blocks, see [`PAGE_REPORTING_ORDER`]) returns what the boot freed in pieces.
pub fn compact_memory() {
    let _ = std::fs::write("/proc/sys/vm/compact_memory", "1");
}

/// Mounts the virtio-fs share `tag` on `target`. The device may still be probing right after
/// its module was loaded, so this retries for up to `timeout`.
pub fn mount_share(tag: &str, target: &str, timeout: Duration) -> Result<(), BootError> {
    std::fs::create_dir_all(target).ok();
    let start = Instant::now();
    loop {
        match mount(
            Some(tag),
            target,
            Some("virtiofs"),
            MsFlags::empty(),
            None::<&str>,
        ) {
            Ok(()) => return Ok(()),
            Err(source) if start.elapsed() >= timeout => {
                return Err(BootError::Share {
                    tag: tag.to_string(),
                    target: target.to_string(),
                    waited: start.elapsed(),
                    source,
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Monotonic clock in nanoseconds (CLOCK_MONOTONIC counts from the guest kernel's boot).
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|ts| {
            // CLOCK_MONOTONIC is never negative.
            let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
            secs * 1_000_000_000 + u64::try_from(ts.tv_nsec()).unwrap_or(0)
        })
        .unwrap_or_default()
}
