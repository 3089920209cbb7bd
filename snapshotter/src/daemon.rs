//! The snapshotter's daemons' plumbing: kite's shared daemon helpers, and serving ttrpc.

pub use kite_config::daemon::{
    init_logging, listen_unix, remove_socket, socket_inode, stop_requested,
};

/// Serves ttrpc `services` on `listener` (bound with [`listen_unix`]); the server runs until it
/// is shut down or dropped.
pub async fn serve_ttrpc(
    listener: tokio::net::UnixListener,
    services: std::collections::HashMap<String, ttrpc::r#async::Service>,
) -> Result<ttrpc::r#async::Server, ttrpc::Error> {
    use std::os::fd::IntoRawFd;
    let fd = listener
        .into_std()
        .map_err(|e| ttrpc::Error::Socket(e.to_string()))?
        .into_raw_fd();
    let mut server = ttrpc::r#async::Server::new()
        .set_domain_unix()
        .add_listener(fd)?
        .register_service(services);
    server.start().await?;
    Ok(server)
}
