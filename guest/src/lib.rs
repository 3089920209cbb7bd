//! `kite-guest`: PID 1 inside a kite microVM.
//!
//! It mounts the kernel filesystems, loads the virtio modules, mounts the sandbox's virtio-fs
//! share and serves the agent protocol (`kite-protocol`) to the shim over a virtio-serial port
//! (vsock where the host has it), and configures the pod's NICs. Containers are set up with youki's libcontainer.

pub mod boot;
pub mod channel;
pub mod init;
#[cfg(feature = "misbehave")]
pub mod misbehave;
pub mod modules;
pub mod network;
pub mod process;
pub mod reaper;
pub mod request;
pub mod runtime;
pub mod service;
pub mod warm_up;
pub mod zygote;
