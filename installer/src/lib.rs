//! kite-deploy: puts kite on a containerd host and takes it away again, the way a platform
//! team installs a secure runtime — from a privileged DaemonSet pod (the host's `/` at `/host`,
//! the host's PID namespace) or from the Debian package on the host itself.
//!
//! An install is a versioned directory with a `current` link (running shims keep their
//! binaries through an upgrade), kite.toml, a containerd drop-in imported by one added line in
//! the operator's config, kite's daemons, and a record of all of it; `uninstall` takes away
//! what the record names and puts the operator's config back byte for byte. See
//! docs/install.md.

pub mod containerd_config;
pub mod host;
pub mod install;
pub mod kite_config;
pub mod node_label;
pub mod record;
pub mod services;
