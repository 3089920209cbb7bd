//! Image manifests, OCI indexes and Docker manifest lists from a registry.
#![no_main]
use kite_snapshotter::registry::{
    decode_manifest, is_digest, ManifestDocument, OCI_INDEX, OCI_MANIFEST,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, raw)) = data.split_first() else {
        return;
    };
    let media_type = match kind % 3 {
        0 => OCI_MANIFEST,
        1 => OCI_INDEX,
        _ => "application/octet-stream",
    };
    match decode_manifest("fuzz/image:tag", media_type, raw, "amd64") {
        Ok(ManifestDocument::Index { chosen }) => assert!(is_digest(&chosen)),
        Ok(ManifestDocument::Image(m)) => {
            assert!(is_digest(&m.config.digest));
            assert!(m.layers.iter().all(|l| is_digest(&l.digest)));
        }
        Err(e) => assert!(e.to_string().contains("fuzz/image:tag"), "{e}"),
    }
});
