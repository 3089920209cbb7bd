//! `containerd-shim-kite-v2`: a containerd shim v2 that runs every pod (or plain container) in
//! its own QEMU microVM, with `kite-guest` as the VM's PID 1.
//!
//! - [`config`]: the `[shim]` section of /etc/kite/kite.toml;
//! - [`vm`]: accelerator choice and QEMU/virtiofsd processes; [`qmp`]: QEMU control;
//! - [`sandbox`]: one VM with its share and agent connection, and crash clean-up;
//! - [`rootfs`]: container rootfs and bind mounts in the share;
//! - [`network`]: the pod's NICs into the VM (tap + tc redirect), [`passthrough`]: VFIO;
//! - [`io`]: stdio between containerd's FIFOs and the guest;
//! - [`task`]: the Task API; [`shim`]: the shim's life (start, serve, delete).

pub mod config;
pub mod io;
pub mod network;
pub mod passthrough;
pub mod qmp;
pub mod rootfs;
pub mod sandbox;
pub mod shim;
pub mod task;
pub mod vm;

/// The runtime name containerd knows kite by.
pub const RUNTIME_NAME: &str = "io.containerd.kite.v2";
