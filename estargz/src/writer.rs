//! The eStargz write side (the converter's core) and reading a blob's TOC back.
//!
//! [`convert`] turns an uncompressed layer tar into eStargz: every tar header is a gzip member
//! and every file's data starts a new one, files larger than the chunk size are cut into one member per chunk,
//! prioritized files come first followed by the prefetch landmark, then the TOC member
//! (`stargz.index.json` as a tar entry, then the end of the archive) and the footer. The result
//! is still one valid gzip'd tar, so any runtime can unpack it the ordinary way.
//!
//! [`read_toc`] finds the TOC through the footer and decompresses it with a size limit (a
//! decompression bomb fails, it does not fill the memory).

use std::io::{Read, Write};

use flate2::write::GzEncoder;
use flate2::Compression;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::{parse_footer, EstargzError, Toc, FOOTER_SIZE, PREFETCH_LANDMARK};

pub const TOC_NAME: &str = "stargz.index.json";

/// What a conversion produced, for the image manifest and config.
#[derive(Debug)]
pub struct Converted {
    /// `sha256:` of the TOC JSON: the layer's TOC digest annotation.
    pub toc_digest: String,
    /// `sha256:` of the uncompressed tar: the layer's diff id in the image config.
    pub diff_id: String,
}

#[derive(Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct OutEntry {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "is_zero")]
    size: u64,
    mode: u32,
    uid: u64,
    gid: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    link_name: String,
    #[serde(skip_serializing_if = "is_zero")]
    offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    chunk_offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    chunk_size: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    chunk_digest: String,
    #[serde(skip_serializing_if = "is_zero")]
    dev_major: u64,
    #[serde(skip_serializing_if = "is_zero")]
    dev_minor: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    modtime: String,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Counts what is written, so each member's blob offset is known.
struct Counting<W> {
    inner: W,
    written: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn io(e: std::io::Error) -> EstargzError {
    EstargzError::Toc(format!("convert: {e}"))
}

/// One gzip member holding `bytes`, appended to `out`.
fn member<W: Write>(out: &mut Counting<W>, bytes: &[u8]) -> Result<(), EstargzError> {
    let mut gz = GzEncoder::new(&mut *out, Compression::default());
    gz.write_all(bytes).map_err(io)?;
    gz.finish().map_err(io)?;
    Ok(())
}

fn padding(len: u64) -> usize {
    ((512 - len % 512) % 512) as usize
}

struct Item {
    header: tar::Header,
    name: String,
    link: String,
    /// The link target's bytes as the input has them (`link` is their lossy UTF-8).
    link_raw: Vec<u8>,
    data: Vec<u8>,
}

/// Converts the layer tar `input` into eStargz on `out`, chunks of at most `chunk_size`
/// bytes, `prioritized` files (tar names) first.
pub fn convert<R: Read, W: Write>(
    input: R,
    out: W,
    chunk_size: u64,
    prioritized: &[String],
) -> Result<Converted, EstargzError> {
    let mut archive = tar::Archive::new(input);
    let mut items = Vec::new();
    let mut raw_tar = Sha256::new();
    for entry in archive.entries().map_err(io)? {
        let mut entry = entry.map_err(io)?;
        let header = entry.header().clone();
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let link_raw = entry
            .link_name_bytes()
            .map(|l| l.into_owned())
            .unwrap_or_default();
        let link = String::from_utf8_lossy(&link_raw).into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).map_err(io)?;
        items.push(Item {
            header,
            name,
            link,
            link_raw,
            data,
        });
    }
    // Prioritized files first, in the order given; the rest keep their order. A prioritized
    // hard link brings its target just before it: the data is the target's, and a link must
    // follow its target in the tar.
    let key = |n: &str| n.trim_start_matches("./").to_string();
    let link_target: std::collections::HashMap<String, String> = items
        .iter()
        .filter(|i| i.header.entry_type() == tar::EntryType::Link)
        .map(|i| (key(&i.name), key(&i.link)))
        .collect();
    let mut order: Vec<String> = Vec::new();
    for p in prioritized {
        let mut chain = vec![key(p)];
        while let Some(t) = link_target.get(chain.last().expect("not empty")) {
            if chain.contains(t) || chain.len() > 8 {
                break;
            }
            chain.push(t.clone());
        }
        for n in chain.into_iter().rev() {
            if !order.contains(&n) {
                order.push(n);
            }
        }
    }
    let rank = |i: &Item| {
        order
            .iter()
            .position(|p| *p == key(&i.name))
            .unwrap_or(usize::MAX)
    };
    items.sort_by_key(rank);
    let landmark_at = items.iter().take_while(|i| rank(i) != usize::MAX).count();

    let mut out = Counting {
        inner: out,
        written: 0,
    };
    let mut toc = Vec::new();
    for (n, item) in items.iter().enumerate() {
        if n == landmark_at && !prioritized.is_empty() {
            write_landmark(&mut out, &mut toc, &mut raw_tar)?;
        }
        write_item(&mut out, &mut toc, &mut raw_tar, item, chunk_size)?;
    }
    // The TOC member: its tar entry, then the end of the archive.
    let toc_json = serde_json::to_vec(&serde_json::json!({"version": 1, "entries": toc}))
        .expect("TOC serializes");
    let toc_offset = out.written;
    // What the reader would refuse is refused here, naming the entry (a hard link to a file
    // the layer does not have, say), rather than pushed as a layer no kite node can mount.
    let written: crate::Toc = serde_json::from_slice(&toc_json)
        .map_err(|e| EstargzError::Toc(format!("the TOC written does not read back: {e}")))?;
    crate::Index::from_toc(&written, toc_offset)?;
    let mut tail = Vec::new();
    let mut h = tar::Header::new_ustar();
    h.set_path(TOC_NAME).map_err(io)?;
    h.set_size(toc_json.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tail.extend_from_slice(h.as_bytes());
    tail.extend_from_slice(&toc_json);
    tail.resize(tail.len() + padding(toc_json.len() as u64) + 1024, 0);
    raw_tar.update(&tail);
    member(&mut out, &tail)?;
    out.write_all(&footer(toc_offset)).map_err(io)?;
    out.flush().map_err(io)?;
    Ok(Converted {
        toc_digest: format!("sha256:{:x}", Sha256::digest(&toc_json)),
        diff_id: format!("sha256:{:x}", raw_tar.finalize()),
    })
}

fn write_landmark<W: Write>(
    out: &mut Counting<W>,
    toc: &mut Vec<OutEntry>,
    raw: &mut Sha256,
) -> Result<(), EstargzError> {
    let mut h = tar::Header::new_ustar();
    h.set_path(PREFETCH_LANDMARK).map_err(io)?;
    h.set_size(1);
    h.set_mode(0o644);
    h.set_cksum();
    let head = h.as_bytes().to_vec();
    raw.update(&head);
    member(out, &head)?;
    let mut bytes = vec![0xfu8];
    bytes.resize(512, 0);
    let offset = out.written;
    raw.update(&bytes);
    member(out, &bytes)?;
    toc.push(OutEntry {
        name: PREFETCH_LANDMARK.into(),
        kind: "reg",
        size: 1,
        mode: 0o644,
        uid: 0,
        gid: 0,
        link_name: String::new(),
        offset,
        chunk_offset: 0,
        chunk_size: 0,
        chunk_digest: format!("sha256:{:x}", Sha256::digest([0xfu8])),
        dev_major: 0,
        dev_minor: 0,
        modtime: String::new(),
    });
    Ok(())
}

/// A GNU long name or long link record for `value`: a header, then the value NUL-terminated
/// and padded to a block.
fn long_record(head: &mut Vec<u8>, kind: tar::EntryType, value: &[u8]) -> Result<(), EstargzError> {
    let mut long = tar::Header::new_gnu();
    long.set_entry_type(kind);
    long.set_path("././@LongLink").map_err(io)?;
    long.set_size(value.len() as u64 + 1);
    long.set_cksum();
    head.extend_from_slice(long.as_bytes());
    head.extend_from_slice(value);
    head.push(0);
    head.resize(head.len() + padding(value.len() as u64 + 1), 0);
    Ok(())
}

/// A ustar header field holding as much of `value` as fits, the rest zero.
fn fill_field(field: &mut [u8], value: &[u8]) {
    let n = value.len().min(field.len());
    field.fill(0);
    field[..n].copy_from_slice(&value[..n]);
}

fn write_item<W: Write>(
    out: &mut Counting<W>,
    toc: &mut Vec<OutEntry>,
    raw: &mut Sha256,
    item: &Item,
    chunk_size: u64,
) -> Result<(), EstargzError> {
    use tar::EntryType;
    let h = &item.header;
    let kind = match h.entry_type() {
        EntryType::Directory => "dir",
        EntryType::Regular | EntryType::Continuous => "reg",
        EntryType::Symlink => "symlink",
        EntryType::Link => "hardlink",
        EntryType::Char => "char",
        EntryType::Block => "block",
        EntryType::Fifo => "fifo",
        other => {
            return Err(EstargzError::Entry {
                name: item.name.clone(),
                reason: format!("tar entry type {other:?} is not supported"),
            })
        }
    };
    let base = OutEntry {
        name: item.name.clone(),
        kind,
        size: 0,
        mode: h.mode().unwrap_or(0o644),
        uid: h.uid().unwrap_or(0),
        gid: h.gid().unwrap_or(0),
        link_name: item.link.clone(),
        offset: 0,
        chunk_offset: 0,
        chunk_size: 0,
        chunk_digest: String::new(),
        dev_major: u64::from(h.device_major().ok().flatten().unwrap_or(0)),
        dev_minor: u64::from(h.device_minor().ok().flatten().unwrap_or(0)),
        modtime: match h.mtime() {
            Ok(t) if t > 0 => humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(t),
            )
            .to_string(),
            _ => String::new(),
        },
    };
    // The header is written anew with the entry's full name and link target; one that a ustar
    // header cannot hold (too long, or refused by `set_path`: absolute, `..`) goes first as a
    // GNU long-name (long-link) record, as GNU tar writes them, with the header's own field
    // holding the first 100 bytes. (Pax records, such as xattrs, are not carried over yet.)
    let mut header = h.clone();
    let mut head = Vec::new();
    if header.set_path(&item.name).is_err() {
        long_record(&mut head, EntryType::GNULongName, item.name.as_bytes())?;
        fill_field(&mut header.as_old_mut().name, item.name.as_bytes());
    }
    // The input header's own link field is kept byte for byte when the target fits in it
    // (set_link_name would normalize it: `a/./b`, lossy UTF-8).
    if item.link_raw.len() > header.as_old().linkname.len() {
        long_record(&mut head, EntryType::GNULongLink, &item.link_raw)?;
        fill_field(&mut header.as_old_mut().linkname, &item.link_raw);
    }
    header.set_cksum();
    head.extend_from_slice(header.as_bytes());

    if kind != "reg" || item.data.is_empty() {
        let offset = out.written;
        raw.update(&head);
        member(out, &head)?;
        toc.push(OutEntry {
            offset: if kind == "reg" { offset } else { 0 },
            ..base
        });
        return Ok(());
    }
    // As in every eStargz writer, the header closes its own member and each chunk's data
    // starts a fresh one at the offset the TOC gives, so a chunk decompresses on its own.
    raw.update(&head);
    member(out, &head)?;
    let size = item.data.len() as u64;
    let chunk = chunk_size.max(1);
    let mut at = 0u64;
    while at < size {
        let len = chunk.min(size - at);
        let data = &item.data[at as usize..(at + len) as usize];
        let mut bytes = data.to_vec();
        if at + len == size {
            bytes.resize(bytes.len() + padding(size), 0);
        }
        let offset = out.written;
        raw.update(&bytes);
        member(out, &bytes)?;
        let digest = format!("sha256:{:x}", Sha256::digest(data));
        toc.push(OutEntry {
            name: item.name.clone(),
            kind: if at == 0 { "reg" } else { "chunk" },
            size: if at == 0 { size } else { 0 },
            offset,
            chunk_offset: at,
            chunk_size: if len == size { 0 } else { len },
            chunk_digest: digest,
            ..base.clone()
        });
        at += len;
    }
    Ok(())
}

/// The 51-byte footer naming the TOC's offset.
pub fn footer(toc_offset: u64) -> Vec<u8> {
    let mut f = vec![
        0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
    ];
    f.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    // An empty stored deflate block, then CRC32 and ISIZE of nothing.
    f.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    debug_assert_eq!(f.len(), FOOTER_SIZE);
    f
}

/// Reads the TOC of the eStargz `blob` (the TOC member and footer suffice), decompressing at
/// most `max_json` bytes of JSON. Returns the TOC and its raw JSON (for the digest check).
pub fn read_toc(blob: &[u8], max_json: u64) -> Result<(Toc, Vec<u8>, u64), EstargzError> {
    if blob.len() < FOOTER_SIZE {
        return Err(EstargzError::Footer("blob shorter than a footer".into()));
    }
    let toc_offset = parse_footer(&blob[blob.len() - FOOTER_SIZE..])?;
    let end = (blob.len() - FOOTER_SIZE) as u64;
    if toc_offset >= end {
        return Err(EstargzError::Footer(format!(
            "TOC offset {toc_offset} is not before the footer at {end}"
        )));
    }
    let (toc, json) = decode_toc_member(&blob[toc_offset as usize..end as usize], max_json)?;
    Ok((toc, json, toc_offset))
}

/// Decodes the TOC member (the blob from the TOC's offset, footer excluded), decompressing
/// at most `max_json` bytes of JSON. Returns the TOC and its raw JSON.
pub fn decode_toc_member(member: &[u8], max_json: u64) -> Result<(Toc, Vec<u8>), EstargzError> {
    let gz = flate2::read::GzDecoder::new(member);
    // The tar header block plus the JSON, bounded.
    let mut limited = gz.take(max_json + 512);
    let mut archive = tar::Archive::new(&mut limited);
    let mut entries = archive
        .entries()
        .map_err(|e| EstargzError::Toc(format!("TOC member: {e}")))?;
    let mut entry = entries
        .next()
        .ok_or_else(|| EstargzError::Toc("TOC member holds no tar entry".into()))?
        .map_err(|e| EstargzError::Toc(format!("TOC member: {e}")))?;
    let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
    if name != TOC_NAME {
        return Err(EstargzError::Toc(format!("TOC member holds {name:?}")));
    }
    if entry.size() > max_json {
        return Err(EstargzError::Toc(format!(
            "TOC of {} bytes is over the {max_json}-byte limit",
            entry.size()
        )));
    }
    let mut json = Vec::new();
    entry
        .read_to_end(&mut json)
        .map_err(|e| EstargzError::Toc(format!("TOC member: {e}")))?;
    let toc: Toc =
        serde_json::from_slice(&json).map_err(|e| EstargzError::Toc(format!("JSON: {e}")))?;
    Ok((toc, json))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{verify_toc_digest, Index, Node};

    fn layer() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut dir = tar::Header::new_ustar();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_mode(0o755);
        dir.set_size(0);
        b.append_data(&mut dir, "bin/", std::io::empty()).unwrap();
        for (name, len) in [
            ("bin/big", 10_000usize),
            ("bin/small", 10),
            ("etc/app.conf", 3),
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o644);
            h.set_size(len as u64);
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        let mut l = tar::Header::new_ustar();
        l.set_entry_type(tar::EntryType::Symlink);
        l.set_size(0);
        b.append_link(&mut l, "bin/sh", "busybox").unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn a_converted_layer_is_still_a_gzip_tar_with_the_same_files() {
        let mut blob = Vec::new();
        let c = convert(&layer()[..], &mut blob, 4096, &["etc/app.conf".into()]).unwrap();
        // An ordinary reader sees every file with its bytes (plus the landmark and TOC).
        let mut names = Vec::new();
        let mut a = tar::Archive::new(flate2::read::MultiGzDecoder::new(&blob[..]));
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            if name == "bin/big" {
                assert_eq!(data.len(), 10_000);
                assert!(data.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
            }
            names.push(name);
        }
        assert_eq!(
            names,
            [
                "etc/app.conf",
                PREFETCH_LANDMARK,
                "bin/",
                "bin/big",
                "bin/small",
                "bin/sh",
                TOC_NAME
            ]
        );
        assert!(c.diff_id.starts_with("sha256:"));

        // The TOC reads back, matches its digest, and indexes cleanly.
        let (toc, json, toc_offset) = read_toc(&blob, 1 << 20).unwrap();
        verify_toc_digest(&json, &c.toc_digest).unwrap();
        let index = Index::from_toc(&toc, toc_offset).unwrap();
        assert_eq!(index.prefetch, ["etc/app.conf"]);
        let Node::File { size, chunks } = &index.inodes["bin/big"].node else {
            panic!("bin/big is a file")
        };
        assert_eq!((*size, chunks.len()), (10_000, 3));
        // Each chunk's member decompresses on its own to data with the digest the TOC gives.
        for (i, ch) in chunks.iter().enumerate() {
            let mut d = flate2::read::GzDecoder::new(&blob[ch.blob_offset as usize..]);
            let mut bytes = Vec::new();
            d.read_to_end(&mut bytes).unwrap();
            let data = &bytes[..ch.size as usize];
            assert_eq!(
                format!("sha256:{:x}", Sha256::digest(data)),
                ch.digest,
                "chunk {i}"
            );
        }
    }

    /// Found by fuzzing (estargz_convert): an absolute name, which `set_path` refuses though it
    /// is short, panicked the converter; a link target over 100 bytes was cut in the tar.
    #[test]
    fn names_tar_headers_refuse_and_long_link_targets_are_carried_whole() {
        let mut raw = tar::Header::new_gnu();
        raw.set_entry_type(tar::EntryType::Regular);
        raw.set_mode(0o644);
        raw.set_size(2);
        let mut b = tar::Builder::new(Vec::new());
        // `append_data` would refuse these names: write the header fields directly.
        for name in ["/abs", "a/../b"] {
            let mut h = raw.clone();
            fill_field(&mut h.as_old_mut().name, name.as_bytes());
            h.set_cksum();
            b.append(&h, &b"hi"[..]).unwrap();
        }
        // A target written as it is, not normalized: kept byte for byte.
        let mut dot = tar::Header::new_gnu();
        dot.set_entry_type(tar::EntryType::Symlink);
        dot.set_size(0);
        fill_field(&mut dot.as_old_mut().name, b"dot");
        fill_field(&mut dot.as_old_mut().linkname, b"a/./b//c");
        dot.set_cksum();
        b.append(&dot, std::io::empty()).unwrap();
        let target = format!("/{}", "t".repeat(150));
        let mut l = tar::Header::new_gnu();
        l.set_entry_type(tar::EntryType::Symlink);
        l.set_size(0);
        b.append_link(&mut l, "link", &target).unwrap();
        let tar = b.into_inner().unwrap();

        let mut blob = Vec::new();
        let c = convert(&tar[..], &mut blob, 4096, &[]).unwrap();
        let (toc, json, toc_offset) = read_toc(&blob, 1 << 20).unwrap();
        verify_toc_digest(&json, &c.toc_digest).unwrap();
        let index = Index::from_toc(&toc, toc_offset).unwrap();
        assert!(
            index.inodes.contains_key("abs"),
            "{:?}",
            index.inodes.keys()
        );
        // An ordinary reader sees the names and the whole link target.
        let mut seen = Vec::new();
        let mut a = tar::Archive::new(flate2::read::MultiGzDecoder::new(&blob[..]));
        for e in a.entries().unwrap() {
            let e = e.unwrap();
            let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
            if name == "link" {
                assert_eq!(e.link_name_bytes().unwrap().as_ref(), target.as_bytes());
            }
            if name == "dot" {
                assert_eq!(e.header().link_name_bytes().unwrap().as_ref(), b"a/./b//c");
            }
            seen.push(name);
        }
        for name in ["/abs", "a/../b", "link", "dot"] {
            assert!(seen.iter().any(|s| s == name), "{name} in {seen:?}");
        }
    }

    /// Found by fuzzing (estargz_convert): a hard link to a file the layer does not have was
    /// converted into a blob whose TOC kite's reader refuses.
    #[test]
    fn a_layer_the_reader_would_refuse_is_not_converted() {
        let mut b = tar::Builder::new(Vec::new());
        let mut l = tar::Header::new_gnu();
        l.set_entry_type(tar::EntryType::Link);
        l.set_size(0);
        b.append_link(&mut l, "bin/cat", "bin/sh").unwrap();
        let tar = b.into_inner().unwrap();
        let e = convert(&tar[..], &mut Vec::new(), 4096, &[]).unwrap_err();
        assert!(
            e.to_string().contains("bin/cat") && e.to_string().contains("bin/sh"),
            "{e}"
        );
    }

    #[test]
    fn without_a_landmark_nothing_is_prefetched_and_file_times_are_kept() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(3);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, "a", &b"abc"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let mut blob = Vec::new();
        convert(&tar[..], &mut blob, 4096, &[]).unwrap();
        let (toc, _, toc_offset) = read_toc(&blob, 1 << 20).unwrap();
        let index = Index::from_toc(&toc, toc_offset).unwrap();
        assert!(index.prefetch.is_empty());
        assert_eq!(index.inodes["a"].mtime, 1_700_000_000);
    }

    #[test]
    fn a_prioritized_hard_link_brings_its_target_first() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o755);
        h.set_size(4);
        b.append_data(&mut h, "bin/busybox", &b"\x7fELF"[..])
            .unwrap();
        let mut l = tar::Header::new_ustar();
        l.set_entry_type(tar::EntryType::Link);
        l.set_size(0);
        b.append_link(&mut l, "bin/cat", "bin/busybox").unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(1);
        b.append_data(&mut h, "etc/x", &b"x"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let mut blob = Vec::new();
        convert(&tar[..], &mut blob, 4096, &["bin/cat".into()]).unwrap();
        let (toc, _, toc_offset) = read_toc(&blob, 1 << 20).unwrap();
        let index = Index::from_toc(&toc, toc_offset).expect("links follow their targets");
        assert_eq!(index.prefetch, ["bin/busybox"]);
        // An ordinary unpack of the result works too (the link after its target).
        let dir = tempfile::tempdir().unwrap();
        tar::Archive::new(flate2::read::MultiGzDecoder::new(&blob[..]))
            .unpack(dir.path())
            .unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("bin/cat")).unwrap(),
            b"\x7fELF"
        );
    }

    #[test]
    fn a_toc_over_the_limit_is_refused() {
        let mut blob = Vec::new();
        convert(&layer()[..], &mut blob, 4096, &[]).unwrap();
        let e = read_toc(&blob, 64).unwrap_err().to_string();
        assert!(e.contains("limit"), "{e}");
        let e = read_toc(&blob[..40], 1 << 20).unwrap_err().to_string();
        assert!(e.contains("footer"), "{e}");
    }
}
