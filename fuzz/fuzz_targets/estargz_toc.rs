//! An eStargz blob's TOC (gzip member with a tar entry of JSON) and the layer index built from
//! it: what a hostile registry can send before any file of the layer is read.
#![no_main]
use kite_estargz::{verify_toc_digest, writer::read_toc, Index};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((toc, json, toc_offset)) = read_toc(data, 1 << 20) else {
        return;
    };
    let _ = verify_toc_digest(&json, "sha256:00");
    if let Ok(index) = Index::from_toc(&toc, toc_offset) {
        // The index is what lazyfs serves from: every prefetch entry is one of its files.
        for name in &index.prefetch {
            assert!(
                index.inodes.contains_key(name),
                "prefetch {name:?} not indexed"
            );
        }
    }
});
