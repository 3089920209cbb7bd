//! Kubernetes v1/Pod manifests (YAML or JSON) as the node agent takes them.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = kite_agent::manifest::parse(text, "kite");
});
