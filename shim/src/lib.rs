//! `containerd-shim-kite-v2`: a containerd shim v2 that runs every pod (or plain container) in
//! its own QEMU microVM (through `kite_vmm`), with `kite-guest` as the VM's PID 1.
//!
//! - [`config`]: the `[shim]` section of /etc/kite/kite.toml;
//! - [`sandbox`]: a pod's VM with the pod's identity (network, hostname); [`sizing`]: its size;
//! - [`rootfs`]: container rootfs and bind mounts in the share;
//! - [`io`]: stdio between containerd's FIFOs and the guest;
//! - [`task`]: the Task API (ttrpc adapter, state machine, events, guest-agent interface);
//! - [`orphans`]: ending tasks whose container record containerd lost;
//! - [`shim`]: the shim's life (start, serve, delete).

pub mod config;
pub mod io;
pub mod orphans;
pub mod pool;
pub mod rootfs;
pub mod sandbox;
pub mod shim;
pub mod sizing;
pub mod task;

/// The runtime name containerd knows kite by.
pub const RUNTIME_NAME: &str = "io.containerd.kite.v2";
