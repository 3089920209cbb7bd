//! Image references as users, manifests and the CRI give them.
#![no_main]
use kite_snapshotter::registry::ImageRef;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(image) = ImageRef::parse(text) {
        // The normalized form parses to itself.
        let again = ImageRef::parse(&image.to_string()).expect("normalized reference parses");
        assert_eq!(again.to_string(), image.to_string());
    }
});
