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
    #[error("read module list {path}")]
    List {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("open module {path}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("load module {path}")]
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

/// Parses a `modules.load` list: one `GROUP PATH` per line (path relative to `base`), `#`
/// comments. Keeps the modules of the `wanted` groups (all when `wanted` is `None`), in order.
pub fn parse_load_list(text: &str, base: &Path, wanted: Option<&[&str]>) -> Vec<PathBuf> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let (group, path) = l.split_once(' ').unwrap_or(("", l));
            let keep = wanted.is_none_or(|w| group.is_empty() || w.contains(&group));
            keep.then(|| base.join(path.trim().trim_start_matches('/')))
        })
        .collect()
}

/// The module groups the kernel command line asks for (`kite.modules=a,b`); `None`: all.
pub fn wanted_groups(cmdline: &str) -> Option<Vec<&str>> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("kite.modules="))
        .map(|v| v.split(',').filter(|g| !g.is_empty()).collect())
}

/// Loads every module of the list in order; a module that is already loaded (or built in) is
/// skipped. Returns the names it loaded, each with the time its load took (ms).
pub fn load_all(
    list: &Path,
    base: &Path,
    cmdline: &str,
) -> Result<Vec<(String, f64)>, ModuleError> {
    let text = std::fs::read_to_string(list).map_err(|source| ModuleError::List {
        path: list.to_path_buf(),
        source,
    })?;
    let mut loaded = Vec::new();
    let wanted = wanted_groups(cmdline);
    for path in parse_load_list(&text, base, wanted.as_deref()) {
        let name = module_name(&path);
        let file = File::open(&path).map_err(|source| ModuleError::Open {
            path: path.clone(),
            source,
        })?;
        let params = CString::new(params_for(cmdline, &name)).unwrap_or_default();
        let started = std::time::Instant::now();
        match finit_module(&file, &params, ModuleInitFlags::empty()) {
            Ok(()) => loaded.push((name, started.elapsed().as_secs_f64() * 1000.0)),
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
    fn load_list_keeps_order_and_the_wanted_groups() {
        let list = "# generated\ncore kernel/virtio_ring.ko\n\ncore /kernel/virtio.ko\n\
                    pci kernel/virtio_pci.ko\nmmio kernel/virtio_mmio.ko\nkernel/fuse.ko\n";
        let base = Path::new("/m");
        let all = parse_load_list(list, base, None);
        assert_eq!(all.len(), 5);
        assert_eq!(all[1], PathBuf::from("/m/kernel/virtio.ko"));
        let cmdline = "quiet kite.modules=core,mmio";
        let wanted = wanted_groups(cmdline).unwrap();
        let some = parse_load_list(list, base, Some(&wanted));
        assert_eq!(
            some,
            vec![
                PathBuf::from("/m/kernel/virtio_ring.ko"),
                PathBuf::from("/m/kernel/virtio.ko"),
                PathBuf::from("/m/kernel/virtio_mmio.ko"),
                PathBuf::from("/m/kernel/fuse.ko"),
            ]
        );
        assert_eq!(wanted_groups("quiet"), None);
    }
}
