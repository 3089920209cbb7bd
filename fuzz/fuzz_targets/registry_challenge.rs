//! `WWW-Authenticate` challenges from a registry (Basic, Bearer with realm, service, scope).
#![no_main]
use kite_snapshotter::registry::parse_challenge;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = std::str::from_utf8(data) else {
        return;
    };
    let (scheme, params) = parse_challenge(header);
    assert_eq!(scheme, scheme.to_ascii_lowercase());
    assert!(params.keys().all(|k| *k == k.to_ascii_lowercase()));
});
