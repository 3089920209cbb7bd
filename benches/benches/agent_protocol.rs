//! Round trip of the shim <-> guest agent protocol: the real agent service (kite-guest) behind
//! a ttrpc server, called by the generated client, over a unix socket. In a VM the bytes also
//! cross the virtio-serial port; this measures the protocol stack's own cost.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use kite_guest::reaper::Reaper;
use kite_guest::service::AgentService;
use kite_protocol::agent::{PingRequest, PingResponse, ProcessRequest};
use kite_protocol::agent_ttrpc::{create_agent, AgentClient};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = format!("unix://{}/agent.sock", dir.path().display());
    let (client, _server) = rt.block_on(async {
        let service = AgentService::new(Reaper::default(), PingResponse::default(), None);
        let mut server = ttrpc::r#async::Server::new()
            .bind(&sock)
            .expect("bind")
            .register_service(create_agent(service));
        server.start().await.expect("serve");
        let client = AgentClient::new(ttrpc::r#async::Client::connect(&sock).expect("connect"));
        (Arc::new(client), server)
    });
    let mut group = c.benchmark_group("agent_protocol");
    group.bench_function("ping_round_trip", |b| {
        let client = client.clone();
        b.to_async(&rt).iter(|| {
            let client = client.clone();
            async move {
                client
                    .ping(ttrpc::context::Context::default(), &PingRequest::new())
                    .await
                    .expect("ping")
            }
        })
    });
    // An error answer (unknown container) goes through the same path with a status payload.
    group.bench_function("error_round_trip", |b| {
        let client = client.clone();
        b.to_async(&rt).iter(|| {
            let client = client.clone();
            async move {
                let req = ProcessRequest {
                    container_id: "missing".into(),
                    ..Default::default()
                };
                client
                    .close_stdin(ttrpc::context::Context::default(), &req)
                    .await
                    .expect_err("no such container")
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
