//! The protocol between the kite shim (host) and `kite-guest` (PID 1 in the VM).
//!
//! One definition, `proto/agent.proto`; both sides use the code generated from it here.
//! The transport is ttrpc over a virtio-serial port (vsock where the host has it).

#[allow(warnings, clippy::all)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

#[allow(warnings, clippy::all)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// Name of the virtio-serial port that carries the agent channel (guest: /dev/virtio-ports/NAME).
pub const SERIAL_PORT_NAME: &str = "kite.agent";

/// vsock port the guest agent listens on when the host has vhost-vsock.
pub const VSOCK_PORT: u32 = 1024;

/// Path inside the guest where the sandbox's virtio-fs share is mounted.
pub const GUEST_SHARE_DIR: &str = "/run/kite/share";

/// virtio-fs tag of the sandbox share.
pub const SHARE_TAG: &str = "kiteshare";
