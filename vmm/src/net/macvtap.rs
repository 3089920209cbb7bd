//! macvtap: the alternative attachment, a passthru macvtap on the pod's interface.

use std::os::fd::OwnedFd;
use std::path::Path;

use nix::sched::CloneFlags;
use rtnetlink::Handle;

use super::netns::{index_of, io, netlink, Link};
use super::tap::set_vnet_hdr;
use super::NetnsError;

/// Makes a passthru macvtap `name` on `link` and opens its character device.
///
/// The device's number is in sysfs under the macvtap, and the shim's /sys shows the host's
/// namespace: this (per-thread) mount namespace gets a sysfs of the pod's network namespace.
/// The device node is made in `node_dir`, opened and removed again.
pub(super) async fn open(
    h: &Handle,
    link: &Link,
    name: &str,
    node_dir: &Path,
) -> Result<OwnedFd, NetnsError> {
    use rtnetlink::packet_route::link::MacVtapMode;
    h.link()
        .add(
            rtnetlink::LinkMacVtap::new(name, link.index, MacVtapMode::Passthrough)
                .mtu(link.mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(netlink("create"))?;
    let index = index_of(h, name)
        .await
        .ok_or_else(|| NetnsError::Vanished {
            interface: name.to_string(),
        })?;
    nix::sched::unshare(CloneFlags::CLONE_NEWNS).map_err(|e| io("unshare mounts")(e.into()))?;
    let none: Option<&str> = None;
    nix::mount::mount(
        none,
        "/",
        none,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        none,
    )
    .map_err(|e| io("make mounts private")(e.into()))?;
    let sys = node_dir.join(format!("sysfs-{name}"));
    std::fs::create_dir_all(&sys).map_err(io(format!("create {}", sys.display())))?;
    nix::mount::mount(
        Some("sysfs"),
        &sys,
        Some("sysfs"),
        nix::mount::MsFlags::empty(),
        none,
    )
    .map_err(|e| io("mount sysfs")(e.into()))?;
    let dev_file = sys.join(format!("class/net/{name}/macvtap/tap{index}/dev"));
    let numbers = std::fs::read_to_string(&dev_file);
    let _ = nix::mount::umount2(&sys, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir(&sys);
    let numbers = numbers.map_err(io(format!("read {}", dev_file.display())))?;
    let (major, minor) = numbers
        .trim()
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
        .ok_or_else(|| NetnsError::Unexpected {
            what: format!("{}: {numbers:?}", dev_file.display()),
        })?;
    let node = node_dir.join(format!("{name}.dev"));
    let _ = std::fs::remove_file(&node);
    nix::sys::stat::mknod(
        &node,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(major, minor),
    )
    .map_err(|e| io(format!("mknod {}", node.display()))(e.into()))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&node);
    let _ = std::fs::remove_file(&node);
    let file = file.map_err(io(format!("open {}", node.display())))?;
    set_vnet_hdr(&file).map_err(io("turn on virtio-net headers"))?;
    Ok(OwnedFd::from(file))
}
