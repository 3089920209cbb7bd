//! /etc/kite/kite.toml: every component's section from one file.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/kite/kite.toml");
    if let Ok(shim) = kite_shim::config::ShimConfig::from_toml(text, path) {
        let _ = shim.validate(path);
        let _ = shim.pool_classes();
    }
    let _ = kite_snapshotter::config::SnapshotterConfig::from_toml(text, path);
    let _ = kite_agent::config::AgentConfig::from_toml(text, path);
    let _ = kite_coordinator::config::CoordinatorConfig::from_toml(text, path);
});
