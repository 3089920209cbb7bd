//! Kernel modules: the guest kernel (Debian's cloud kernel) has everything virtio as modules.
//!
//! The initrd carries the modules the agent needs and a list, `modules.load`, of their paths in
//! dependency order (written by hack/build-guest.sh with `modprobe --show-depends`), so no
//! dependency resolution happens at boot. Parameters for a module come from the kernel command
//! line as `module.param=value`, the way modprobe passes them (microvm's virtio-mmio devices are
//! described there).

use std::ffi::CString;
use std::fs::File;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("read module list {path}: {source}")]
    List {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("open module {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("load module {path}: {source}")]
    Load { path: PathBuf, source: Errno },
}

/// The module name of a `.ko` path as the kernel knows it: file stem with `-` as `_`.
pub fn module_name(path: &Path) -> String {
    let file = path
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or_default();
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// The parameters for `module` on a kernel command line (`module.key=value` words).
pub fn params_for(cmdline: &str, module: &str) -> String {
    let prefix = format!("{module}.");
    cmdline
        .split_whitespace()
        .filter_map(|word| word.strip_prefix(&prefix))
        .filter(|rest| !rest.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parses a `modules.load` list: one path per line (relative to `base`), `#` comments.
pub fn parse_load_list(text: &str, base: &Path) -> Vec<PathBuf> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| base.join(l.trim_start_matches('/')))
        .collect()
}

/// Loads every module of the list in order; a module that is already loaded (or built in) is
/// skipped. Returns the names it loaded.
pub fn load_all(list: &Path, base: &Path, cmdline: &str) -> Result<Vec<String>, ModuleError> {
    let text = std::fs::read_to_string(list).map_err(|source| ModuleError::List {
        path: list.to_path_buf(),
        source,
    })?;
    let mut loaded = Vec::new();
    for path in parse_load_list(&text, base) {
        let name = module_name(&path);
        let file = File::open(&path).map_err(|source| ModuleError::Open {
            path: path.clone(),
            source,
        })?;
        let params = CString::new(params_for(cmdline, &name)).unwrap_or_default();
        match finit_module(&file, &params, ModuleInitFlags::empty()) {
            Ok(()) => loaded.push(name),
            Err(Errno::EEXIST) => {}
            Err(source) => return Err(ModuleError::Load { path, source }),
        }
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_kernel_convention() {
        assert_eq!(module_name(Path::new("/lib/x/virtio_pci.ko")), "virtio_pci");
        assert_eq!(module_name(Path::new("virtio-rng.ko")), "virtio_rng");
        assert_eq!(module_name(Path::new("a/fuse.ko.xz")), "fuse");
    }

    #[test]
    fn params_are_taken_from_the_command_line() {
        let cmdline = "console=ttyS0 virtio_mmio.device=4K@0xfeb00e00:12 quiet \
                       virtio_mmio.device=4K@0xfeb00c00:11 virtio_pci.force_legacy=1";
        assert_eq!(
            params_for(cmdline, "virtio_mmio"),
            "device=4K@0xfeb00e00:12 device=4K@0xfeb00c00:11"
        );
        assert_eq!(params_for(cmdline, "virtio_pci"), "force_legacy=1");
        assert_eq!(params_for(cmdline, "virtio"), "");
    }

    #[test]
    fn load_list_keeps_order_and_skips_comments() {
        let list = "# generated\nkernel/drivers/virtio/virtio_ring.ko\n\n/kernel/drivers/virtio/virtio.ko\n";
        let got = parse_load_list(list, Path::new("/lib/modules/k"));
        assert_eq!(
            got,
            vec![
                PathBuf::from("/lib/modules/k/kernel/drivers/virtio/virtio_ring.ko"),
                PathBuf::from("/lib/modules/k/kernel/drivers/virtio/virtio.ko"),
            ]
        );
    }
}
