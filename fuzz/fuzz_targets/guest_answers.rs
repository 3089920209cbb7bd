//! Every answer of the guest agent, as the shim decodes and checks it: the guest is not
//! trusted once a container has run as root in it.
#![no_main]
use std::time::SystemTime;

use kite_protocol::agent as proto;
use kite_shim::task::answers;
use libfuzzer_sys::fuzz_target;
use protobuf::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 9 {
        0 => {
            if let Ok(a) = proto::CreateContainerResponse::parse_from_bytes(bytes) {
                let _ = answers::pid("create", a.pid);
            }
        }
        1 => {
            if let Ok(a) = proto::StartResponse::parse_from_bytes(bytes) {
                let _ = answers::pid("start", a.pid);
            }
        }
        2 => {
            if let Ok(a) = proto::ExecProcessResponse::parse_from_bytes(bytes) {
                let _ = answers::pid("exec", a.pid);
            }
        }
        3 => {
            if let Ok(a) = proto::WaitResponse::parse_from_bytes(bytes) {
                let exit = answers::exit(&a, SystemTime::now());
                assert!(exit.status <= answers::MAX_EXIT_STATUS);
            }
        }
        4 => {
            if let Ok(a) = proto::PidsResponse::parse_from_bytes(bytes) {
                if let Ok(pids) = answers::pids("c1", a) {
                    assert!(pids.len() <= answers::MAX_PIDS);
                }
            }
        }
        5 => {
            if let Ok(a) = proto::StatsResponse::parse_from_bytes(bytes) {
                let s = answers::stats(&a);
                assert_eq!(s.pids_limit, a.pids_limit);
            }
        }
        6 => {
            if let Ok(a) = proto::OomEvent::parse_from_bytes(bytes) {
                let _ = answers::oom_container(a);
            }
        }
        7 => {
            if let Ok(a) = proto::ReadStreamResponse::parse_from_bytes(bytes) {
                let _ = answers::chunk("c1 stdout", 32 << 10, &a);
            }
        }
        _ => {
            let _ = proto::PingResponse::parse_from_bytes(bytes);
        }
    }
});
