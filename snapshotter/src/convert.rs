//! `kite-snapshotter convert SRC DST`: an image to eStargz, registry to registry.
//!
//! Each layer is fetched (and checked against its digest), decompressed, converted
//! ([`kite_estargz::writer::convert`]) and pushed; the config gets the new layers' diff ids,
//! the manifest (OCI) the new layers with their TOC digest annotations. The result is still an
//! ordinary gzip'd-tar image: any runtime and snapshotter can run it.

use std::io::Read;

use bytes::Bytes;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tracing::info;

use crate::registry::{
    Descriptor, ImageRef, Manifest, RegistryClient, RegistryError, OCI_LAYER_GZIP, OCI_MANIFEST,
};
use kite_estargz::writer;
use kite_estargz::{EstargzError, TOC_DIGEST_ANNOTATION};

/// The annotation eStargz tools put on a layer: the size of its uncompressed tar.
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("convert {image}")]
    Registry {
        image: String,
        source: RegistryError,
    },
    #[error("convert {image}: layer {layer}: {reason}")]
    Layer {
        image: String,
        layer: String,
        reason: String,
    },
    #[error("convert {image}: layer {layer}")]
    Estargz {
        image: String,
        layer: String,
        source: EstargzError,
    },
    #[error("convert {image}: config: {reason}")]
    Config { image: String, reason: String },
}

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Largest chunk of a file (one gzip member, one verified unit of lazy reads).
    pub chunk_size: u64,
    /// Files to put first and mark with the prefetch landmark (paths in the image).
    pub prioritized: Vec<String>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            chunk_size: 4 << 20,
            prioritized: Vec::new(),
        }
    }
}

/// What a conversion did, layer by layer.
#[derive(Debug)]
pub struct Converted {
    pub manifest_digest: String,
    pub layers: Vec<Descriptor>,
}

/// Progress reports: (layers done, layers in all, bytes of compressed input read so far).
pub type Progress<'a> = &'a (dyn Fn(usize, usize, u64) + Send + Sync);

fn decompress(media_type: &str, blob: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    if media_type.ends_with("+zstd") || media_type.ends_with(".zstd") {
        return Err(format!("{media_type}: zstd layers are not supported"));
    }
    if blob.starts_with(&[0x1f, 0x8b]) {
        flate2::read::MultiGzDecoder::new(blob)
            .read_to_end(&mut out)
            .map_err(|e| format!("gunzip: {e}"))?;
        Ok(out)
    } else if media_type.ends_with(".tar") || media_type.ends_with("tar") {
        Ok(blob.to_vec())
    } else {
        Err(format!("{media_type}: neither gzip nor a plain tar"))
    }
}

pub async fn convert_image(
    registry: &RegistryClient,
    src: &ImageRef,
    dst: &ImageRef,
    options: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<Converted, ConvertError> {
    let at_src = |source| ConvertError::Registry {
        image: src.to_string(),
        source,
    };
    let at_dst = |source| ConvertError::Registry {
        image: dst.to_string(),
        source,
    };
    let resolved = registry.resolve(src).await.map_err(at_src)?;
    let manifest = resolved.manifest;
    let config_raw = registry
        .blob(src, &manifest.config.digest)
        .await
        .map_err(at_src)?;
    let mut config: Value =
        serde_json::from_slice(&config_raw).map_err(|e| ConvertError::Config {
            image: src.to_string(),
            reason: e.to_string(),
        })?;
    let total = manifest.layers.len();
    let mut layers = Vec::with_capacity(total);
    let mut diff_ids = Vec::with_capacity(total);
    let mut read = 0u64;
    progress(0, total, 0);
    for (n, layer) in manifest.layers.iter().enumerate() {
        let blob = registry.blob(src, &layer.digest).await.map_err(at_src)?;
        read += blob.len() as u64;
        let tar = decompress(&layer.media_type, &blob).map_err(|reason| ConvertError::Layer {
            image: src.to_string(),
            layer: layer.digest.clone(),
            reason,
        })?;
        let uncompressed = tar.len();
        let mut out = Vec::with_capacity(blob.len() + blob.len() / 8);
        let options = options.clone();
        let (converted, out) = tokio::task::spawn_blocking(move || {
            let c = writer::convert(&tar[..], &mut out, options.chunk_size, &options.prioritized);
            (c, out)
        })
        .await
        .expect("convert thread");
        let converted = converted.map_err(|source| ConvertError::Estargz {
            image: src.to_string(),
            layer: layer.digest.clone(),
            source,
        })?;
        let size = out.len() as u64;
        let digest = registry
            .push_blob(dst, Bytes::from(out))
            .await
            .map_err(at_dst)?;
        info!(from = %layer.digest, to = %digest, toc = %converted.toc_digest, size, "layer converted");
        let mut annotations = std::collections::BTreeMap::new();
        annotations.insert(TOC_DIGEST_ANNOTATION.to_string(), converted.toc_digest);
        annotations.insert(
            UNCOMPRESSED_SIZE_ANNOTATION.to_string(),
            uncompressed.to_string(),
        );
        layers.push(Descriptor {
            media_type: OCI_LAYER_GZIP.into(),
            digest,
            size,
            annotations,
            platform: None,
        });
        diff_ids.push(Value::String(converted.diff_id));
        progress(n + 1, total, read);
    }
    let rootfs = config
        .get_mut("rootfs")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| ConvertError::Config {
            image: src.to_string(),
            reason: "no rootfs object".into(),
        })?;
    rootfs.insert("diff_ids".into(), Value::Array(diff_ids));
    let config_bytes = Bytes::from(serde_json::to_vec(&config).expect("config serializes"));
    let config_size = config_bytes.len() as u64;
    let config_digest = registry
        .push_blob(dst, config_bytes)
        .await
        .map_err(at_dst)?;
    let out = Manifest {
        schema_version: 2,
        media_type: OCI_MANIFEST.into(),
        config: Descriptor {
            media_type: OCI_CONFIG.into(),
            digest: config_digest,
            size: config_size,
            ..Default::default()
        },
        layers: layers.clone(),
        annotations: Default::default(),
    };
    let raw = Bytes::from(serde_json::to_vec(&out).expect("manifest serializes"));
    let manifest_digest = format!("sha256:{:x}", Sha256::digest(&raw));
    registry
        .push_manifest(dst, OCI_MANIFEST, raw)
        .await
        .map_err(at_dst)?;
    Ok(Converted {
        manifest_digest,
        layers,
    })
}
