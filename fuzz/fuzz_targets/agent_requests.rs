//! Every request the guest agent takes, as it decodes and checks it before anything in the
//! guest changes: container and exec ids, rootfs, OCI spec and process, network configuration.
#![no_main]
use std::path::Path;

use kite_guest::{network, request};
use kite_protocol::agent as proto;
use libfuzzer_sys::fuzz_target;
use protobuf::Message;

const SHARE: &str = "/run/kite/share";

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 6 {
        0 => {
            if let Ok(req) = proto::CreateContainerRequest::parse_from_bytes(bytes) {
                if let Ok(plan) = request::plan_create(Path::new(SHARE), &req) {
                    assert!(plan.rootfs.starts_with(SHARE));
                    assert!(!plan.id.contains('/'));
                }
            }
        }
        1 => {
            // The OCI spec itself, as JSON (the mutator reaches deeper than through protobuf).
            let req = proto::CreateContainerRequest {
                container_id: "c1".into(),
                oci_spec: bytes.to_vec(),
                rootfs: "c1/rootfs".into(),
                ..Default::default()
            };
            let _ = request::plan_create(Path::new(SHARE), &req);
        }
        2 => {
            if let Ok(req) = proto::ExecProcessRequest::parse_from_bytes(bytes) {
                let _ = request::plan_exec(&req);
            }
        }
        3 => {
            let req = proto::ExecProcessRequest {
                container_id: "c1".into(),
                exec_id: "e1".into(),
                process: bytes.to_vec(),
                ..Default::default()
            };
            let _ = request::plan_exec(&req);
        }
        4 => {
            if let Ok(req) = proto::NetworkConfig::parse_from_bytes(bytes) {
                if let Ok(plan) = network::plan(&req) {
                    assert!(plan.interfaces.len() <= network::MAX_INTERFACES);
                    for r in &plan.routes {
                        let max = if r.destination.0.is_ipv4() { 32 } else { 128 };
                        assert!(r.destination.1 <= max);
                    }
                }
            }
        }
        _ => {
            if let Ok(req) = proto::ContainerRequest::parse_from_bytes(bytes) {
                let _ = request::check_id("container", &req.container_id);
            }
        }
    }
});
