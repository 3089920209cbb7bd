//! Passing a pod's PCI network function (an ENI, an SR-IOV VF) into its VM with VFIO.
//!
//! The function is taken from its host driver and bound to `vfio-pci` through sysfs
//! (`driver_override`, `unbind`, `drivers_probe`), QEMU gets `-device vfio-pci,host=…`, and
//! on release the override is cleared and the host driver bound again. Every step reads or
//! writes files under a sysfs root, which tests point at a directory of their own.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const VFIO_DRIVER: &str = "vfio-pci";

/// Where the host's sysfs is (tests use a directory of their own).
pub const SYSFS: &str = "/sys";

#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    #[error(
        "PCI function {address} has no IOMMU group: VFIO needs the IOMMU on \
         (intel_iommu=on or amd_iommu=on on the host's kernel command line)"
    )]
    NoIommuGroup { address: String },
    #[error("PCI function {address}: the vfio-pci driver is not loaded (modprobe vfio-pci)")]
    NoVfioDriver { address: String },
    #[error("PCI function {address}: {op} {path}")]
    Sysfs {
        address: String,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("PCI function {address}: still bound to {driver:?} after binding it to vfio-pci")]
    NotBound { address: String, driver: String },
}

/// A PCI function as the host had it before kite took it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciFunction {
    /// `0000:00:05.0`
    pub address: String,
    /// The driver to give it back to ("" if it had none).
    pub host_driver: String,
    pub iommu_group: String,
}

fn device_dir(sysfs: &Path, address: &str) -> PathBuf {
    sysfs.join("bus/pci/devices").join(address)
}

fn link_name(path: &Path) -> Option<String> {
    std::fs::read_link(path)
        .ok()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

/// The driver a function is bound to now ("" for none).
pub fn current_driver(sysfs: &Path, address: &str) -> String {
    link_name(&device_dir(sysfs, address).join("driver")).unwrap_or_default()
}

/// Whether a PCI address is well formed (`dddd:bb:dd.f`), so it can be used in a path.
pub fn valid_address(address: &str) -> bool {
    let b = address.as_bytes();
    b.len() == 12
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b':',
            10 => *c == b'.',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Reads what binding `address` to VFIO needs: its driver now and its IOMMU group.
pub fn probe(sysfs: &Path, address: &str) -> Result<PciFunction, PassthroughError> {
    let dir = device_dir(sysfs, address);
    if !dir.exists() {
        return Err(PassthroughError::Sysfs {
            address: address.into(),
            op: "find",
            path: dir,
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    let iommu_group =
        link_name(&dir.join("iommu_group")).ok_or_else(|| PassthroughError::NoIommuGroup {
            address: address.into(),
        })?;
    Ok(PciFunction {
        address: address.into(),
        host_driver: current_driver(sysfs, address),
        iommu_group,
    })
}

fn write(sysfs_file: PathBuf, value: &str, address: &str) -> Result<(), PassthroughError> {
    std::fs::write(&sysfs_file, value).map_err(|source| PassthroughError::Sysfs {
        address: address.into(),
        op: "write",
        path: sysfs_file,
        source,
    })
}

/// Binds the function to vfio-pci (a no-op if it already is).
pub fn bind_vfio(sysfs: &Path, f: &PciFunction) -> Result<(), PassthroughError> {
    let address = f.address.as_str();
    if current_driver(sysfs, address) == VFIO_DRIVER {
        return Ok(());
    }
    if !sysfs.join("bus/pci/drivers").join(VFIO_DRIVER).exists() {
        return Err(PassthroughError::NoVfioDriver {
            address: address.into(),
        });
    }
    let dir = device_dir(sysfs, address);
    write(dir.join("driver_override"), VFIO_DRIVER, address)?;
    let driver = current_driver(sysfs, address);
    if !driver.is_empty() {
        write(dir.join("driver/unbind"), address, address)?;
    }
    write(sysfs.join("bus/pci/drivers_probe"), address, address)?;
    let now = current_driver(sysfs, address);
    if now != VFIO_DRIVER {
        return Err(PassthroughError::NotBound {
            address: address.into(),
            driver: now,
        });
    }
    Ok(())
}

/// Gives the function back to its host driver.
pub fn rebind_host(sysfs: &Path, f: &PciFunction) -> Result<(), PassthroughError> {
    let address = f.address.as_str();
    let dir = device_dir(sysfs, address);
    if !dir.exists() {
        return Ok(());
    }
    write(dir.join("driver_override"), "\n", address)?;
    if current_driver(sysfs, address) == VFIO_DRIVER {
        write(dir.join("driver/unbind"), address, address)?;
    }
    if f.host_driver.is_empty() || f.host_driver == VFIO_DRIVER {
        return write(sysfs.join("bus/pci/drivers_probe"), address, address);
    }
    write(
        sysfs
            .join("bus/pci/drivers")
            .join(&f.host_driver)
            .join("bind"),
        address,
        address,
    )
}

/// The VFIO group device QEMU opens for the function.
pub fn group_device(f: &PciFunction) -> PathBuf {
    Path::new("/dev/vfio").join(&f.iommu_group)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A sysfs tree with one function bound to `driver`, in IOMMU group 12 unless `no_group`.
    fn fake_sysfs(driver: &str, no_group: bool) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let dev = r.join("devices/pci0000:00/0000:00:05.0");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::create_dir_all(r.join("bus/pci/devices")).unwrap();
        symlink(&dev, r.join("bus/pci/devices/0000:00:05.0")).unwrap();
        for d in [driver, VFIO_DRIVER] {
            std::fs::create_dir_all(r.join("bus/pci/drivers").join(d)).unwrap();
        }
        symlink(r.join("bus/pci/drivers").join(driver), dev.join("driver")).unwrap();
        if !no_group {
            std::fs::create_dir_all(r.join("kernel/iommu_groups/12")).unwrap();
            symlink(r.join("kernel/iommu_groups/12"), dev.join("iommu_group")).unwrap();
        }
        root
    }

    #[test]
    fn addresses_are_checked() {
        assert!(valid_address("0000:00:05.0"));
        assert!(valid_address("0000:af:1f.7"));
        assert!(!valid_address("../../etc"));
        assert!(!valid_address("0000:00:05"));
    }

    #[test]
    fn probe_reads_driver_and_group() {
        let sys = fake_sysfs("ixgbevf", false);
        let f = probe(sys.path(), "0000:00:05.0").unwrap();
        assert_eq!(f.host_driver, "ixgbevf");
        assert_eq!(f.iommu_group, "12");
        assert_eq!(group_device(&f), PathBuf::from("/dev/vfio/12"));
    }

    #[test]
    fn no_iommu_group_is_a_clear_error() {
        let sys = fake_sysfs("ena", true);
        let e = probe(sys.path(), "0000:00:05.0").unwrap_err().to_string();
        assert!(
            e.contains("no IOMMU group") && e.contains("intel_iommu=on"),
            "{e}"
        );
        let missing = probe(sys.path(), "0000:00:06.0").unwrap_err().to_string();
        assert!(missing.contains("0000:00:06.0"), "{missing}");
    }

    #[test]
    fn binding_writes_override_unbind_and_probe_then_checks() {
        let sys = fake_sysfs("ixgbevf", false);
        let f = probe(sys.path(), "0000:00:05.0").unwrap();
        // No kernel behind these files: the writes land, the driver stays, and the error says so.
        let e = bind_vfio(sys.path(), &f).unwrap_err();
        assert!(matches!(&e, PassthroughError::NotBound { driver, .. } if driver == "ixgbevf"));
        let dev = sys.path().join("bus/pci/devices/0000:00:05.0");
        assert_eq!(
            std::fs::read_to_string(dev.join("driver_override")).unwrap(),
            "vfio-pci"
        );
        assert_eq!(
            std::fs::read_to_string(dev.join("driver/unbind")).unwrap(),
            "0000:00:05.0"
        );
        assert_eq!(
            std::fs::read_to_string(sys.path().join("bus/pci/drivers_probe")).unwrap(),
            "0000:00:05.0"
        );
    }

    #[test]
    fn already_bound_to_vfio_is_left_alone() {
        let sys = fake_sysfs(VFIO_DRIVER, false);
        let f = probe(sys.path(), "0000:00:05.0").unwrap();
        bind_vfio(sys.path(), &f).unwrap();
        assert!(!sys
            .path()
            .join("bus/pci/devices/0000:00:05.0/driver_override")
            .exists());
    }

    #[test]
    fn missing_vfio_driver_is_a_clear_error() {
        let sys = fake_sysfs("ena", false);
        std::fs::remove_dir(sys.path().join("bus/pci/drivers/vfio-pci")).unwrap();
        let f = probe(sys.path(), "0000:00:05.0").unwrap();
        let e = bind_vfio(sys.path(), &f).unwrap_err().to_string();
        assert!(e.contains("modprobe vfio-pci"), "{e}");
    }

    #[test]
    fn release_gives_the_function_back_to_its_driver() {
        let sys = fake_sysfs(VFIO_DRIVER, false);
        let f = PciFunction {
            address: "0000:00:05.0".into(),
            host_driver: "ena".into(),
            iommu_group: "12".into(),
        };
        std::fs::create_dir_all(sys.path().join("bus/pci/drivers/ena")).unwrap();
        rebind_host(sys.path(), &f).unwrap();
        let d = sys.path().join("bus/pci/drivers");
        assert_eq!(
            std::fs::read_to_string(d.join("vfio-pci/unbind")).unwrap(),
            "0000:00:05.0"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("ena/bind")).unwrap(),
            "0000:00:05.0"
        );
    }
}
