//! The converter's tar reading: any layer tar converts or fails with an error, and what it
//! writes is an eStargz blob kite's own reader takes.
#![no_main]
use kite_estargz::{
    verify_toc_digest,
    writer::{convert, read_toc},
    Index,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, tar)) = data.split_first() else {
        return;
    };
    // Small chunks, so files split into several.
    let chunk_size = u64::from(chunk).max(1) * 64;
    let prioritized = vec!["bin/sh".to_string()];
    let mut out = Vec::new();
    let Ok(converted) = convert(tar, &mut out, chunk_size, &prioritized) else {
        return;
    };
    let (toc, json, toc_offset) = read_toc(&out, 64 << 20).expect("converted blob has a TOC");
    verify_toc_digest(&json, &converted.toc_digest).expect("TOC digest as reported");
    Index::from_toc(&toc, toc_offset).expect("converted TOC validates");
});
