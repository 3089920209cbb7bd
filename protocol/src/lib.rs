//! kite's protocols, each generated from one protobuf definition in `proto/`, spoken over ttrpc:
//!
//! - [`agent`]: the shim (host) ↔ `kite-guest` (PID 1 in the VM), over a virtio-serial port
//!   (vsock where the host has it);
//! - [`lazyfs`]: `kite-snapshotter` ↔ `kite-lazyfs` (the process serving lazy layers);
//! - [`prefetch`]: the prefetch API of `kite-lazyfs` (`kite.prefetch.v1`), with its client
//!   ([`prefetch_client`]) for the node agent and the CLI.
//!
//! - [`node`] (feature `node-api`): the node agent's gRPC API, which kitectl calls.
//!
//! Clients link this crate without any server side.

#[allow(warnings, clippy::all)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

#[allow(warnings, clippy::all)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

#[allow(warnings, clippy::all)]
pub mod lazyfs {
    include!(concat!(env!("OUT_DIR"), "/lazyfs.rs"));
}

#[allow(warnings, clippy::all)]
pub mod lazyfs_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/lazyfs_ttrpc.rs"));
}

#[allow(warnings, clippy::all)]
pub mod prefetch {
    include!(concat!(env!("OUT_DIR"), "/prefetch.rs"));
}

#[allow(warnings, clippy::all)]
pub mod prefetch_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/prefetch_ttrpc.rs"));
}

pub mod prefetch_client;

/// The node agent's API (`kite.node.v1`, gRPC on /run/kite/agent.sock): feature `node-api`.
#[cfg(feature = "node-api")]
#[allow(clippy::all, missing_docs)]
pub mod node {
    tonic::include_proto!("kite.node.v1");

    /// Connects to the node agent's API on its unix socket.
    pub async fn connect(
        socket: &std::path::Path,
    ) -> Result<
        node_agent_client::NodeAgentClient<tonic::transport::Channel>,
        tonic::transport::Error,
    > {
        Ok(node_agent_client::NodeAgentClient::new(
            crate::unix_channel(socket).await?,
        ))
    }
}

/// The coordinator's API (`kite.coordinator.v1`, gRPC over TLS): feature `node-api`.
#[cfg(feature = "node-api")]
#[allow(clippy::all, missing_docs)]
pub mod cluster {
    include!(concat!(
        env!("OUT_DIR"),
        "/coordinator/kite.coordinator.v1.rs"
    ));

    /// A TLS channel to the coordinator at `address` (`host:port`), trusting only the cluster's
    /// CA (`ca_pem`), presenting `identity` (certificate and key PEM) when given: a node's or an
    /// admin's. Without one, only `NodeLink.Join` answers.
    pub async fn connect(
        address: &str,
        ca_pem: &str,
        identity: Option<(&str, &str)>,
    ) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
        // The coordinator's certificate names it by the host clients dial.
        let host = address
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(['[', ']']))
            .unwrap_or(address);
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca_pem))
            .domain_name(host);
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Endpoint::from_shared(format!("https://{address}"))?
            .tls_config(tls)?
            .connect_timeout(std::time::Duration::from_secs(5))
            .tcp_keepalive(Some(std::time::Duration::from_secs(10)))
            // A coordinator that stops answering (paused, hung, its machine gone) is noticed
            // within seconds, and the node looks for the leader again.
            .http2_keep_alive_interval(std::time::Duration::from_secs(3))
            .keep_alive_timeout(std::time::Duration::from_secs(3))
            .keep_alive_while_idle(true)
            .connect()
            .await
    }

    /// The metadata key in which a coordinator that does not lead names the one that does.
    pub const LEADER_METADATA: &str = "kite-leader";

    /// The leader a follower's refusal names.
    pub fn leader_hint(status: &tonic::Status) -> Option<String> {
        status
            .metadata()
            .get(LEADER_METADATA)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// The addresses in a list such as `--coordinator a:9620,b:9620` (commas or spaces).
    pub fn addresses(list: &str) -> Vec<String> {
        list.split([',', ' '])
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect()
    }

    #[derive(Debug, thiserror::Error)]
    #[error("no coordinator leads among {tried} after {waited_secs} s: {last}")]
    pub struct NoLeader {
        pub tried: String,
        pub waited_secs: u64,
        pub last: String,
    }

    /// Finds the leading coordinator among `addresses` (any of them names it, or answers
    /// that it leads), waiting up to `wait` for an election to end, and connects to it:
    /// the channel and the leader's address. One address without a high-availability set
    /// answers at once.
    pub async fn connect_leader(
        addresses: &[String],
        ca_pem: &str,
        identity: Option<(&str, &str)>,
        wait: std::time::Duration,
    ) -> Result<(tonic::transport::Channel, String), NoLeader> {
        let started = std::time::Instant::now();
        let mut last = String::from("no address given");
        loop {
            let mut queue: std::collections::VecDeque<String> = addresses.iter().cloned().collect();
            let mut tried = std::collections::HashSet::new();
            while let Some(address) = queue.pop_front() {
                if !tried.insert(address.clone()) {
                    continue;
                }
                // A coordinator that is paused (or hung) accepts the TCP connection and then
                // says nothing: each one gets a few seconds.
                let asked = tokio::time::timeout(std::time::Duration::from_secs(3), async {
                    let channel = connect(&address, ca_pem, identity)
                        .await
                        .map_err(|e| crate::errors::error_chain(&e))?;
                    let info = coordinators_client::CoordinatorsClient::new(channel.clone())
                        .leader(LeaderRequest {})
                        .await
                        .map_err(|s| s.message().to_string())?
                        .into_inner();
                    Ok::<_, String>((channel, info))
                })
                .await
                .unwrap_or_else(|_| Err("no answer within 3 s".into()));
                match asked {
                    Ok((channel, info)) if info.leading => return Ok((channel, address)),
                    Ok((_, info)) => {
                        last = format!("{address} does not lead");
                        if !info.leader.is_empty() {
                            last.push_str(&format!(" (it names {})", info.leader));
                            queue.push_front(info.leader);
                        }
                    }
                    Err(e) => last = format!("{address}: {e}"),
                }
            }
            if started.elapsed() >= wait {
                return Err(NoLeader {
                    tried: addresses.join(","),
                    waited_secs: started.elapsed().as_secs(),
                    last,
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    }
}

/// containerd's container records (its containers service, `containerd.services.containers.v1`,
/// the subset in proto/containerd_containers.proto): feature `containerd-api`.
#[cfg(feature = "containerd-api")]
pub mod containerd {
    #[allow(clippy::all, missing_docs)]
    mod api {
        tonic::include_proto!("containerd.services.containers.v1");
    }

    use api::containers_client::ContainersClient;
    use tonic::metadata::MetadataValue;
    use tonic::transport::Channel;

    /// What containerd names the namespace of a call by (gRPC metadata).
    const NAMESPACE_HEADER: &str = "containerd-namespace";

    #[derive(Debug, thiserror::Error)]
    pub enum ContainerdError {
        #[error("connect to containerd at {socket}")]
        Connect {
            socket: String,
            #[source]
            source: tonic::transport::Error,
        },
        #[error("containerd namespace {namespace:?} is not a valid gRPC metadata value")]
        Namespace { namespace: String },
        #[error("containerd: {call} container {id} in namespace {namespace}")]
        Call {
            call: &'static str,
            id: String,
            namespace: String,
            #[source]
            source: tonic::Status,
        },
    }

    /// containerd's records of containers in one namespace.
    pub struct ContainerRecords {
        client: ContainersClient<Channel>,
        namespace: String,
        namespace_value: MetadataValue<tonic::metadata::Ascii>,
    }

    impl ContainerRecords {
        /// Connects to containerd's gRPC socket (`/run/containerd/containerd.sock`, with or
        /// without `unix://`).
        pub async fn connect(socket: &str, namespace: &str) -> Result<Self, ContainerdError> {
            let namespace_value = namespace.parse().map_err(|_| ContainerdError::Namespace {
                namespace: namespace.to_string(),
            })?;
            let path = std::path::Path::new(socket.trim_start_matches("unix://"));
            let channel =
                crate::unix_channel(path)
                    .await
                    .map_err(|source| ContainerdError::Connect {
                        socket: socket.to_string(),
                        source,
                    })?;
            Ok(Self {
                // A record carries the container's OCI spec: room for a large one.
                client: ContainersClient::new(channel).max_decoding_message_size(64 << 20),
                namespace: namespace.to_string(),
                namespace_value,
            })
        }

        fn request<T>(&self, message: T) -> tonic::Request<T> {
            let mut request = tonic::Request::new(message);
            request
                .metadata_mut()
                .insert(NAMESPACE_HEADER, self.namespace_value.clone());
            request
        }

        fn error(&self, call: &'static str, id: &str, source: tonic::Status) -> ContainerdError {
            ContainerdError::Call {
                call,
                id: id.to_string(),
                namespace: self.namespace.clone(),
                source,
            }
        }

        /// Whether containerd holds a record of container `id` (a clear NotFound is `false`;
        /// any other failure is an error, not an answer).
        pub async fn exists(&mut self, id: &str) -> Result<bool, ContainerdError> {
            let request = self.request(api::GetContainerRequest { id: id.to_string() });
            match self.client.get(request).await {
                Ok(_) => Ok(true),
                Err(status) if status.code() == tonic::Code::NotFound => Ok(false),
                Err(status) => Err(self.error("get", id, status)),
            }
        }

        /// Deletes container `id`'s record, whatever runs of it: containerd's own clients
        /// refuse while a task lives, the service does not (the tests make orphans with it).
        pub async fn delete(&mut self, id: &str) -> Result<(), ContainerdError> {
            let request = self.request(api::DeleteContainerRequest { id: id.to_string() });
            self.client
                .delete(request)
                .await
                .map(|_| ())
                .map_err(|status| self.error("delete", id, status))
        }
    }
}

/// A gRPC channel to a server on a unix socket (containerd's CRI, the node agent's API).
#[cfg(feature = "grpc")]
pub async fn unix_channel(
    socket: &std::path::Path,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = socket.to_path_buf();
    // The URI is a placeholder: the connector dials the unix socket.
    tonic::transport::Endpoint::from_static("http://[::]:0")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}

/// Errors on the wire: every kite component renders an error for an RPC status, a log field or
/// an answer the same way, one cause after another on one line.
pub mod errors {
    /// Renders an error and its causes on one line (`outer: cause: root cause`). A cause whose
    /// text the line already holds (some libraries repeat their source) is not added again.
    pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
        let mut text = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            let next = cause.to_string();
            if !text.contains(&next) {
                text.push_str(": ");
                text.push_str(&next);
            }
            source = cause.source();
        }
        text
    }

    /// A failed ttrpc call as the caller reads it: the server's status (its code and message:
    /// the server's whole chain), or the channel to it broke.
    #[derive(Debug, thiserror::Error)]
    pub enum RpcError {
        #[error("{message}")]
        Status { code: ttrpc::Code, message: String },
        #[error("the connection failed")]
        Channel(#[source] ttrpc::Error),
        /// The server answered what it cannot mean (a pid out of range, more data than asked
        /// for): a broken or hostile peer.
        #[error("impossible answer: {0}")]
        BadAnswer(String),
    }

    impl From<ttrpc::Error> for RpcError {
        fn from(e: ttrpc::Error) -> Self {
            match e {
                ttrpc::Error::RpcStatus(s) => RpcError::Status {
                    code: s.code(),
                    message: s.message().to_string(),
                },
                other => RpcError::Channel(other),
            }
        }
    }

    impl RpcError {
        /// The server's code, UNAVAILABLE when the channel broke, INTERNAL for an impossible
        /// answer.
        pub fn code(&self) -> ttrpc::Code {
            match self {
                RpcError::Status { code, .. } => *code,
                RpcError::Channel(_) => ttrpc::Code::UNAVAILABLE,
                RpcError::BadAnswer(_) => ttrpc::Code::INTERNAL,
            }
        }
    }

    /// A ttrpc status with `code` and the whole chain of `error` as its message.
    pub fn rpc_status(
        code: ttrpc::Code,
        error: &(dyn std::error::Error + 'static),
    ) -> ttrpc::Error {
        rpc_status_text(code, error_chain(error))
    }

    /// A ttrpc status with `code` and `message`.
    pub fn rpc_status_text(code: ttrpc::Code, message: impl Into<String>) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[derive(Debug, thiserror::Error)]
        #[error("start virtiofsd")]
        struct Outer(#[source] std::io::Error);

        #[test]
        fn a_chain_reads_outer_to_root_once() {
            let e = Outer(std::io::Error::other("no such file"));
            assert_eq!(error_chain(&e), "start virtiofsd: no such file");
            let status = rpc_status(ttrpc::Code::NOT_FOUND, &e);
            let ttrpc::Error::RpcStatus(s) = status else {
                panic!("a status")
            };
            assert_eq!(s.message(), "start virtiofsd: no such file");
            assert_eq!(s.code(), ttrpc::Code::NOT_FOUND);
        }
    }
}

/// A ttrpc context for a call to any kite protocol, with a deadline (`None`: wait as long as
/// it takes).
pub fn rpc_context(timeout: Option<std::time::Duration>) -> ttrpc::context::Context {
    match timeout {
        Some(t) => ttrpc::context::with_timeout(i64::try_from(t.as_nanos()).unwrap_or(i64::MAX)),
        None => ttrpc::context::Context::default(),
    }
}

/// Name of the virtio-serial port that carries the agent channel (guest: /dev/virtio-ports/NAME).
pub const SERIAL_PORT_NAME: &str = "kite.agent";

/// vsock port the guest agent listens on when the host has vhost-vsock.
pub const VSOCK_PORT: u32 = 1024;

/// Path inside the guest where the sandbox's virtio-fs share is mounted.
pub const GUEST_SHARE_DIR: &str = "/run/kite/share";

/// containerd's limit for identifiers (`identifiers.Validate`).
pub const MAX_ID_LEN: usize = 76;

/// What keeps `id` from being an identifier as containerd accepts one (letters and digits in
/// groups joined by single `.`, `_` or `-`, at most [`MAX_ID_LEN`] bytes), or `None`. Ids that
/// cross the VM boundary name files and cgroups, so nothing else (no `/`, no `..`) may pass.
pub fn identifier_problem(id: &str) -> Option<&'static str> {
    if id.is_empty() {
        return Some("is empty");
    }
    if id.len() > MAX_ID_LEN {
        return Some("is longer than 76 bytes");
    }
    let mut previous_separator = true;
    for b in id.bytes() {
        let separator = matches!(b, b'.' | b'_' | b'-');
        if !(b.is_ascii_alphanumeric() || separator) || (separator && previous_separator) {
            return Some("is not letters and digits joined by single '.', '_' or '-'");
        }
        previous_separator = separator;
    }
    previous_separator.then_some("ends in a separator")
}

/// How long the guest agent lets container set-up (its runtime helper: libcontainer) take
/// before it gives up with its own error. The shim waits longer than this, so the guest's
/// reason reaches containerd instead of a bare channel timeout.
pub const GUEST_HELPER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// How long the guest gives a warm-up, clean-up included (`WarmUp`).
pub const GUEST_WARM_UP_WITHIN: std::time::Duration = std::time::Duration::from_secs(20);
/// How long the pool's holder waits for a `WarmUp` answer: longer than the guest's own limit,
/// so the guest's answer (and its clean-up) comes first.
pub const WARM_UP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// virtio-fs tag of the sandbox share.
pub const SHARE_TAG: &str = "kiteshare";
