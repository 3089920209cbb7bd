//! Taps: the tun/tap character device, named and flagged with TUNSETIFF.
//!
//! Written here rather than taken from a tun crate: it is one ioctl, and the crates that wrap it
//! also configure addresses and routes, which the tc redirect must not have.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

#[repr(C)]
pub(super) struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

// TUNSETIFF is _IOW('T', 202, int) in <linux/if_tun.h>, although it reads a struct ifreq.
nix::ioctl_write_ptr_bad!(
    tunsetiff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
    IfReq
);

/// The flags kite's taps and macvtaps get: a tap, no packet info, virtio-net headers (so QEMU
/// can pass offloads through).
const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// TUNSETIFF: names (tun) and sets the flags of a tun/tap or macvtap descriptor.
fn set_iff(file: &File, name: &str) -> std::io::Result<()> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::other("interface name too long"));
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: libc::c_short::try_from(TAP_FLAGS).expect("the tap flags fit a short"),
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads a struct ifreq, which IfReq lays out (name, then the flags in
    // the union, padded to the full 40 bytes); `req` outlives the call and `file` is open.
    unsafe { tunsetiff(file.as_raw_fd(), &req) }?;
    Ok(())
}

/// Turns on virtio-net headers on a macvtap (its name is fixed; TUNSETIFF sets the flags).
pub(super) fn set_vnet_hdr(file: &File) -> std::io::Result<()> {
    set_iff(file, "")
}

/// Opens a new (non-persistent) tap named `name` in the calling thread's network namespace.
/// (std opens files close-on-exec: only QEMU, which is told to, inherits it.)
pub(super) fn open_tap(name: &str) -> std::io::Result<OwnedFd> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    set_iff(&file, name)?;
    Ok(OwnedFd::from(file))
}

#[cfg(test)]
mod tests {
    #[test]
    fn tunsetiff_is_the_kernels_number() {
        assert_eq!(
            nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
            0x4004_54ca
        );
        assert_eq!(std::mem::size_of::<super::IfReq>(), 40);
    }
}
