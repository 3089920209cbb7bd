//! The eStargz footer: the last 51 bytes of a layer blob, from the registry.
#![no_main]
use kite_estargz::{parse_footer, writer::footer, FOOTER_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(offset) = parse_footer(data) {
        assert_eq!(data.len(), FOOTER_SIZE);
        // What kite writes for that offset reads back the same.
        assert_eq!(parse_footer(&footer(offset)).unwrap(), offset);
    }
});
