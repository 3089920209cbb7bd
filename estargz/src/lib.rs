//! The eStargz layer format, read side: the footer that locates the TOC, the TOC itself, and
//! the validated index of a layer that lazy mounts serve from.
//!
//! An eStargz blob is a gzip'd tar whose files start new gzip members (large files are cut into
//! chunks, one member each), followed by a member holding the TOC (`stargz.index.json`, JSON:
//! every entry with its blob offset and, per chunk, its digest) and a 51-byte footer: an empty
//! gzip member whose Extra field is `%016xSTARGZ` with the TOC's offset.
//!
//! The TOC comes from the registry, so it is untrusted: [`Index::from_toc`] accepts it only if
//! every name stays inside the layer (names are cleaned the way containerd's unpacker cleans
//! them, `..` never climbing above the root), hard links point at earlier regular files,
//! offsets lie inside the blob's payload, and each file's chunks cover it exactly once. Later
//! entries for the same name replace earlier ones, as a tar unpack does.

pub mod writer;

use std::collections::BTreeMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};

pub const FOOTER_SIZE: usize = 51;
/// The largest chunk accepted: a chunk is decompressed and verified in memory as a whole
/// (eStargz writers cut files into 4 MiB chunks by default).
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;
/// The annotation on an image layer that names the digest of its TOC JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Files before this entry are prefetched first (the start-up working set).
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EstargzError {
    #[error("eStargz footer: {0}")]
    Footer(String),
    #[error("eStargz TOC: digest {actual} does not match the layer's {expected}")]
    TocDigest { expected: String, actual: String },
    #[error("eStargz TOC: {0}")]
    Toc(String),
    #[error("eStargz TOC entry {name:?}: {reason}")]
    Entry { name: String, reason: String },
    #[error("eStargz chunk at blob offset {offset}: {reason}")]
    Chunk { offset: u64, reason: String },
}

/// Reads the TOC's offset from the blob's last [`FOOTER_SIZE`] bytes.
pub fn parse_footer(footer: &[u8]) -> Result<u64, EstargzError> {
    let bad = |why: &str| Err(EstargzError::Footer(why.to_string()));
    if footer.len() != FOOTER_SIZE {
        return bad("not 51 bytes");
    }
    // gzip magic, deflate, FEXTRA set
    if footer[0..3] != [0x1f, 0x8b, 0x08] || footer[3] & 0x04 == 0 {
        return bad("not a gzip member with an Extra field");
    }
    let xlen = u16::from_le_bytes([footer[10], footer[11]]);
    let sublen = u16::from_le_bytes([footer[14], footer[15]]);
    if xlen != 26 || &footer[12..14] != b"SG" || sublen != 22 {
        return bad("no SG subfield of 22 bytes");
    }
    let field = &footer[16..38];
    if &field[16..] != b"STARGZ" {
        return bad("subfield does not end in STARGZ");
    }
    let hex = std::str::from_utf8(&field[..16])
        .map_err(|_| EstargzError::Footer("offset is not hex".into()))?;
    u64::from_str_radix(hex, 16).map_err(|_| EstargzError::Footer("offset is not hex".into()))
}

/// Checks the TOC JSON against the digest the image manifest gives for it (`sha256:…`).
pub fn verify_toc_digest(toc_json: &[u8], expected: &str) -> Result<(), EstargzError> {
    let actual = format!("sha256:{:x}", Sha256::digest(toc_json));
    if actual != expected {
        return Err(EstargzError::TocDigest {
            expected: expected.into(),
            actual,
        });
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
pub struct Toc {
    pub version: u32,
    pub entries: Vec<TocEntry>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TocEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub link_name: String,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Blob offset of the gzip member that holds this entry's (first chunk's) data.
    pub offset: u64,
    pub chunk_offset: u64,
    pub chunk_size: u64,
    pub chunk_digest: String,
    pub digest: String,
    pub xattrs: BTreeMap<String, String>,
    /// RFC 3339 (as Go's time.Time marshals).
    pub modtime: String,
}

/// A file's data chunk: where in the file, where in the blob, and the digest to verify.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub file_offset: u64,
    pub size: u64,
    pub blob_offset: u64,
    pub digest: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Dir {
        opaque: bool,
    },
    File {
        size: u64,
        chunks: Vec<Chunk>,
    },
    Symlink {
        target: String,
    },
    /// A hard link to another file of the layer (cleaned path).
    Hardlink {
        target: String,
    },
    Device {
        kind: String,
        major: u32,
        minor: u32,
    },
    Fifo,
    /// Hides the lower layers' file of this name (an overlay whiteout).
    Whiteout,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub node: Node,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub xattrs: BTreeMap<String, String>,
    /// Modification time, seconds since the epoch (0 when the TOC gives none).
    pub mtime: i64,
}

/// A layer's validated index: cleaned path → inode, and the prefetch order.
#[derive(Debug)]
pub struct Index {
    pub inodes: BTreeMap<String, Inode>,
    /// Files to fetch first: those before the prefetch landmark, in blob order.
    pub prefetch: Vec<String>,
    /// Where the payload ends (the TOC member starts).
    pub toc_offset: u64,
    /// Every chunk's blob offset, sorted: a chunk's gzip member ends before the next one.
    member_starts: Vec<u64>,
}

/// Cleans a tar name as containerd's unpacker resolves it under the layer root: `.` and empty
/// parts vanish, `..` removes a part but never climbs above the root, a leading `/` means the
/// root. Returns the path relative to the root ("" is the root).
pub fn clean_path(name: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for p in name.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    parts.join("/")
}

impl Index {
    /// Validates `toc` for a blob whose TOC starts at `toc_offset` (the payload ends there).
    pub fn from_toc(toc: &Toc, toc_offset: u64) -> Result<Index, EstargzError> {
        if toc.version != 1 {
            return Err(EstargzError::Toc(format!(
                "version {} (want 1)",
                toc.version
            )));
        }
        let mut inodes: BTreeMap<String, Inode> = BTreeMap::new();
        let mut prefetch = Vec::new();
        let mut landmark = false;
        // The file that chunk entries continue.
        let mut open_file: Option<String> = None;
        for e in &toc.entries {
            let err = |reason: String| EstargzError::Entry {
                name: e.name.clone(),
                reason,
            };
            let path = clean_path(&e.name);
            if e.kind == "chunk" {
                let Some(file) = open_file.as_ref() else {
                    return Err(err("a chunk with no file before it".into()));
                };
                let inode = inodes.get_mut(file).expect("open file is indexed");
                let Node::File { size, chunks } = &mut inode.node else {
                    unreachable!("only regular files are open");
                };
                let next = chunks.last().map_or(0, |c| c.file_offset + c.size);
                let chunk = chunk_of(e, *size, toc_offset).map_err(|c| err(c.to_string()))?;
                if chunk.file_offset != next {
                    return Err(err(format!(
                        "chunk at {} of {file}, expected {next}",
                        chunk.file_offset
                    )));
                }
                chunks.push(chunk);
                continue;
            }
            if let Some(file) = open_file.take() {
                check_covered(&inodes, &file)?;
            }
            let base = path.rsplit('/').next().unwrap_or("");
            if path.is_empty() && e.kind != "dir" {
                return Err(err("only a directory can be the layer's root".into()));
            }
            if base == PREFETCH_LANDMARK || base == NO_PREFETCH_LANDMARK {
                landmark = true;
                continue;
            }
            let node = match e.kind.as_str() {
                "dir" => Node::Dir { opaque: false },
                "reg" => {
                    let chunk = chunk_of(e, e.size, toc_offset).map_err(|c| err(c.to_string()))?;
                    if chunk.file_offset != 0 {
                        return Err(err("a file's first chunk must start at 0".into()));
                    }
                    if !landmark && e.size > 0 {
                        prefetch.push(path.clone());
                    }
                    open_file = Some(path.clone());
                    Node::File {
                        size: e.size,
                        chunks: if e.size > 0 { vec![chunk] } else { Vec::new() },
                    }
                }
                "symlink" => Node::Symlink {
                    target: e.link_name.clone(),
                },
                "hardlink" => {
                    let target = clean_path(&e.link_name);
                    match inodes.get(&target).map(|i| &i.node) {
                        Some(Node::File { .. }) => Node::Hardlink { target },
                        _ => {
                            return Err(err(format!(
                                "hard link to {:?}, which is no earlier file of the layer",
                                e.link_name
                            )))
                        }
                    }
                }
                "char" | "block" => Node::Device {
                    kind: e.kind.clone(),
                    major: e.dev_major,
                    minor: e.dev_minor,
                },
                "fifo" => Node::Fifo,
                other => return Err(err(format!("unknown type {other:?}"))),
            };
            // Whiteouts become overlay whiteouts of their target, or an opaque parent.
            if base == OPAQUE_WHITEOUT {
                let parent = path.rsplit_once('/').map_or("", |(p, _)| p).to_string();
                match inodes.get_mut(&parent) {
                    Some(Inode {
                        node: Node::Dir { opaque },
                        ..
                    }) => *opaque = true,
                    _ => return Err(err("opaque whiteout in no directory of the layer".into())),
                }
                continue;
            }
            if let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX) {
                let parent = path.rsplit_once('/').map_or("", |(p, _)| p);
                let target = if parent.is_empty() {
                    hidden.to_string()
                } else {
                    format!("{parent}/{hidden}")
                };
                inodes.insert(target, inode(e, Node::Whiteout));
                continue;
            }
            // A later entry replaces an earlier one, except that directories merge.
            let replacing_dir = matches!(
                (inodes.get(&path).map(|i| &i.node), &node),
                (Some(Node::Dir { .. }), Node::Dir { .. })
            );
            if replacing_dir {
                let i = inodes.get_mut(&path).expect("checked");
                (i.mode, i.uid, i.gid) = (e.mode, e.uid, e.gid);
                continue;
            }
            inodes.insert(path, inode(e, node));
        }
        if let Some(file) = open_file.take() {
            check_covered(&inodes, &file)?;
        }
        // Without a landmark nothing was prioritized.
        if !landmark {
            prefetch.clear();
        }
        let mut member_starts: Vec<u64> = toc
            .entries
            .iter()
            .filter(|e| (e.kind == "reg" && e.size > 0) || e.kind == "chunk")
            .map(|e| e.offset)
            .collect();
        member_starts.sort_unstable();
        member_starts.dedup();
        Ok(Index {
            inodes,
            prefetch,
            toc_offset,
            member_starts,
        })
    }

    /// The blob bytes to fetch for `chunk`: from its member's start to the next member's
    /// (or the TOC's). Decompressing the start of that range gives the chunk's data.
    pub fn compressed_range(&self, chunk: &Chunk) -> std::ops::Range<u64> {
        let next = self
            .member_starts
            .partition_point(|o| *o <= chunk.blob_offset);
        let end = self
            .member_starts
            .get(next)
            .copied()
            .unwrap_or(self.toc_offset);
        chunk.blob_offset..end
    }

    /// Every chunk of the layer once (hard links share their target's), in blob order.
    pub fn chunks_in_blob_order(&self) -> Vec<&Chunk> {
        let mut all: Vec<&Chunk> = self
            .inodes
            .values()
            .filter_map(|i| match &i.node {
                Node::File { chunks, .. } => Some(chunks.iter()),
                _ => None,
            })
            .flatten()
            .collect();
        all.sort_by_key(|c| c.blob_offset);
        all.dedup_by_key(|c| c.blob_offset);
        all
    }

    /// The regular file at `path` with its chunks (following a hard link).
    pub fn file(&self, path: &str) -> Option<(u64, &[Chunk])> {
        match &self.inodes.get(path)?.node {
            Node::File { size, chunks } => Some((*size, chunks)),
            Node::Hardlink { target } => self.file(target),
            _ => None,
        }
    }
}

/// Decompresses `size` bytes of chunk data from the start of its compressed range and checks
/// them against the chunk's digest: nothing unverified is ever served.
pub fn decode_chunk(chunk: &Chunk, compressed: &[u8]) -> Result<Vec<u8>, EstargzError> {
    use std::io::Read;
    let bad = |reason: String| EstargzError::Chunk {
        offset: chunk.blob_offset,
        reason,
    };
    let mut data = Vec::with_capacity(chunk.size as usize);
    flate2::read::GzDecoder::new(compressed)
        .take(chunk.size)
        .read_to_end(&mut data)
        .map_err(|e| bad(format!("gzip: {e}")))?;
    if data.len() as u64 != chunk.size {
        return Err(bad(format!(
            "{} bytes decompressed, the TOC says {}",
            data.len(),
            chunk.size
        )));
    }
    let actual = format!("sha256:{:x}", Sha256::digest(&data));
    if actual != chunk.digest {
        return Err(bad(format!(
            "digest {actual} does not match the TOC's {}",
            chunk.digest
        )));
    }
    Ok(data)
}

/// Seconds since the epoch of an RFC 3339 time; 0 for none or a malformed one (a file time
/// is not worth refusing a layer over).
pub fn parse_modtime(t: &str) -> i64 {
    if t.is_empty() {
        return 0;
    }
    match humantime::parse_rfc3339_weak(t) {
        Ok(st) => match st.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
        },
        Err(_) => 0,
    }
}

fn inode(e: &TocEntry, node: Node) -> Inode {
    Inode {
        node,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        xattrs: e.xattrs.clone(),
        mtime: parse_modtime(&e.modtime),
    }
}

/// The hex part of a `sha256:` digest (64 lowercase hex digits), or `None` for anything else.
/// Digests name files in the chunk cache, so nothing else may pass.
pub fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(hex)
}

/// What is wrong with a chunk a TOC entry describes.
#[derive(Debug, thiserror::Error)]
pub enum BadChunk {
    #[error("a chunk of {size} bytes (more than {MAX_CHUNK_SIZE}: it would be decompressed in memory at once)")]
    TooLarge { size: u64 },
    #[error("chunk offset and size overflow")]
    Overflow,
    #[error("chunk {offset}+{size} runs past the file's {file_size} bytes")]
    PastFile {
        offset: u64,
        size: u64,
        file_size: u64,
    },
    #[error("data offset {offset} is not in the payload (which ends at {toc_offset})")]
    OutsidePayload { offset: u64, toc_offset: u64 },
    #[error("chunk digest {0:?} is not sha256:<64 hex>")]
    Digest(String),
}

/// The chunk an entry describes, checked against the file's size and the blob's payload.
fn chunk_of(e: &TocEntry, file_size: u64, toc_offset: u64) -> Result<Chunk, BadChunk> {
    // A file stored in one piece has no chunk fields: its one chunk is the whole file.
    let size = if e.chunk_size == 0 {
        file_size.saturating_sub(e.chunk_offset)
    } else {
        e.chunk_size
    };
    if size > MAX_CHUNK_SIZE {
        return Err(BadChunk::TooLarge { size });
    }
    let end = e.chunk_offset.checked_add(size).ok_or(BadChunk::Overflow)?;
    if end > file_size {
        return Err(BadChunk::PastFile {
            offset: e.chunk_offset,
            size,
            file_size,
        });
    }
    if size > 0 && e.offset >= toc_offset {
        return Err(BadChunk::OutsidePayload {
            offset: e.offset,
            toc_offset,
        });
    }
    let digest = if e.chunk_digest.is_empty() {
        e.digest.clone()
    } else {
        e.chunk_digest.clone()
    };
    if size > 0 && digest_hex(&digest).is_none() {
        return Err(BadChunk::Digest(digest));
    }
    Ok(Chunk {
        file_offset: e.chunk_offset,
        size,
        blob_offset: e.offset,
        digest,
    })
}

fn check_covered(inodes: &BTreeMap<String, Inode>, file: &str) -> Result<(), EstargzError> {
    if let Some(Inode {
        node: Node::File { size, chunks },
        ..
    }) = inodes.get(file)
    {
        let covered = chunks.last().map_or(0, |c| c.file_offset + c.size);
        if covered != *size {
            return Err(EstargzError::Entry {
                name: file.to_string(),
                reason: format!("chunks cover {covered} of {size} bytes"),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::footer;

    fn toc(entries: serde_json::Value) -> Toc {
        serde_json::from_value(serde_json::json!({"version": 1, "entries": entries})).unwrap()
    }

    const D: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn footer_gives_the_toc_offset_and_rejects_others() {
        let f = footer(0x1234);
        assert_eq!(f.len(), FOOTER_SIZE);
        assert_eq!(parse_footer(&f), Ok(0x1234));
        let mut bad = f.clone();
        bad[33] = b'X'; // inside "STARGZ"
        assert!(parse_footer(&bad).is_err());
        assert!(parse_footer(&f[1..]).is_err());
        let mut not_gzip = f;
        not_gzip[0] = 0;
        assert!(parse_footer(&not_gzip).is_err());
    }

    #[test]
    fn toc_digest_is_checked() {
        let json = br#"{"version":1,"entries":[]}"#;
        let good = format!("sha256:{:x}", Sha256::digest(json));
        assert!(verify_toc_digest(json, &good).is_ok());
        assert!(matches!(
            verify_toc_digest(b"{}", &good),
            Err(EstargzError::TocDigest { .. })
        ));
    }

    #[test]
    fn names_never_leave_the_layer() {
        assert_eq!(clean_path("./usr/bin/../lib/x"), "usr/lib/x");
        assert_eq!(clean_path("/etc/passwd"), "etc/passwd");
        assert_eq!(clean_path("../../../etc/shadow"), "etc/shadow");
        assert_eq!(clean_path("a/./b//c/"), "a/b/c");
        assert_eq!(clean_path(".."), "");
    }

    #[test]
    fn a_good_toc_indexes_files_chunks_links_whiteouts_and_prefetch() {
        let t = toc(serde_json::json!([
            {"name": "bin/", "type": "dir", "mode": 493},
            {"name": "bin/app", "type": "reg", "size": 10, "offset": 100, "chunkSize": 6, "chunkDigest": D},
            {"name": "bin/app", "type": "chunk", "offset": 200, "chunkOffset": 6, "chunkSize": 4, "chunkDigest": D},
            {"name": ".prefetch.landmark", "type": "reg", "size": 1, "offset": 300, "digest": D},
            {"name": "bin/app2", "type": "hardlink", "linkName": "bin/app"},
            {"name": "bin/sh", "type": "symlink", "linkName": "/bin/busybox"},
            {"name": "etc/", "type": "dir"},
            {"name": "etc/.wh.old", "type": "reg"},
            {"name": "etc/.wh..wh..opq", "type": "reg"},
            {"name": "bin/", "type": "dir", "mode": 448}
        ]));
        let i = Index::from_toc(&t, 1000).unwrap();
        let Node::File { size, chunks } = &i.inodes["bin/app"].node else {
            panic!()
        };
        assert_eq!(*size, 10);
        assert_eq!(chunks.len(), 2);
        assert_eq!((chunks[1].file_offset, chunks[1].blob_offset), (6, 200));
        assert_eq!(i.prefetch, ["bin/app"]);
        assert!(!i.inodes.contains_key(".prefetch.landmark"));
        assert_eq!(
            i.inodes["bin/app2"].node,
            Node::Hardlink {
                target: "bin/app".into()
            }
        );
        assert_eq!(i.inodes["etc/old"].node, Node::Whiteout);
        assert_eq!(i.inodes["etc"].node, Node::Dir { opaque: true });
        assert_eq!(
            i.inodes["bin"].mode, 448,
            "a later dir entry updates, not replaces"
        );
    }

    fn rejected(entries: serde_json::Value, toc_offset: u64) -> String {
        Index::from_toc(&toc(entries), toc_offset)
            .expect_err("must be rejected")
            .to_string()
    }

    #[test]
    fn hostile_tocs_are_rejected_with_the_entry_named() {
        // Data outside the payload.
        let e = rejected(
            serde_json::json!([
                {"name": "f", "type": "reg", "size": 4, "offset": 5000, "digest": D}
            ]),
            1000,
        );
        assert!(e.contains("\"f\"") && e.contains("payload"), "{e}");
        // Chunks that do not cover the file, overlap, or run past it.
        let e = rejected(
            serde_json::json!([
                {"name": "f", "type": "reg", "size": 10, "offset": 1, "chunkSize": 4, "chunkDigest": D}
            ]),
            1000,
        );
        assert!(e.contains("cover 4 of 10"), "{e}");
        let e = rejected(
            serde_json::json!([
                {"name": "f", "type": "reg", "size": 10, "offset": 1, "chunkSize": 6, "chunkDigest": D},
                {"name": "f", "type": "chunk", "offset": 2, "chunkOffset": 3, "chunkSize": 7, "chunkDigest": D}
            ]),
            1000,
        );
        assert!(e.contains("expected 6"), "{e}");
        // A chunk claiming more than a chunk's bound (a bomb in one member).
        let e = rejected(
            serde_json::json!([
                {"name": "f", "type": "reg", "size": 1u64 << 40, "offset": 1, "chunkDigest": D}
            ]),
            1000,
        );
        assert!(e.contains("decompressed in memory"), "{e}");
        let e = rejected(
            serde_json::json!([
                {"name": "f", "type": "reg", "size": 10, "offset": 1, "chunkSize": 60, "chunkDigest": D}
            ]),
            1000,
        );
        assert!(e.contains("runs past"), "{e}");
        // A hard link out of the layer or to nothing.
        let e = rejected(
            serde_json::json!([
                {"name": "l", "type": "hardlink", "linkName": "../../etc/shadow"}
            ]),
            1000,
        );
        assert!(e.contains("hard link"), "{e}");
        // No digest to verify against, an unknown type, a chunk with no file.
        let e = rejected(
            serde_json::json!([
                {"name": "f", "type": "reg", "size": 4, "offset": 1}
            ]),
            1000,
        );
        assert!(e.contains("sha256"), "{e}");
        let e = rejected(serde_json::json!([{"name": "x", "type": "weird"}]), 1000);
        assert!(e.contains("weird"), "{e}");
        let e = rejected(
            serde_json::json!([
                {"name": "x", "type": "chunk", "chunkSize": 1, "chunkDigest": D}
            ]),
            1000,
        );
        assert!(e.contains("no file"), "{e}");
        let e = Index::from_toc(
            &serde_json::from_value(serde_json::json!({"version": 2, "entries": []})).unwrap(),
            1000,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("version 2"), "{e}");
    }

    #[test]
    fn escaping_names_land_inside_the_layer_like_containerds_unpack() {
        let t = toc(serde_json::json!([
            {"name": "../../etc/passwd", "type": "reg", "size": 1, "offset": 1, "digest": D},
            {"name": "/abs", "type": "symlink", "linkName": "/etc/shadow"}
        ]));
        let i = Index::from_toc(&t, 1000).unwrap();
        assert!(i.inodes.contains_key("etc/passwd"));
        // A symlink's target is kept as is: it is resolved in the container's root, never on
        // the host (the lazy filesystem serves it as a link and follows nothing).
        assert_eq!(
            i.inodes["abs"].node,
            Node::Symlink {
                target: "/etc/shadow".into()
            }
        );
    }
}
