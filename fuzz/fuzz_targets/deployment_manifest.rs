//! apps/v1 Deployment manifests (YAML or JSON) as the coordinator takes them.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = kite_coordinator::app::parse(text);
});
