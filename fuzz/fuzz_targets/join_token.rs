//! What a joining node sends the coordinator: its bootstrap token and its certificate signing
//! request (PEM); and the peer certificates whose identity the coordinator reads.
#![no_main]
use std::sync::OnceLock;

use kite_coordinator::pki::{identity_of, ClusterCa, Identity};
use kite_coordinator::token::BootstrapToken;
use libfuzzer_sys::fuzz_target;

static CA: OnceLock<ClusterCa> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 3 {
        0 => {
            if let Ok(text) = std::str::from_utf8(bytes) {
                let _ = BootstrapToken::parse(text);
            }
        }
        1 => {
            if let Ok(pem) = std::str::from_utf8(bytes) {
                let ca = CA.get_or_init(|| ClusterCa::create("fuzz").expect("a CA"));
                let _ = ca.sign_csr(pem, &Identity::Node("node-1".into()), 1);
            }
        }
        _ => {
            let _ = identity_of(bytes);
        }
    }
});
