//! A lazy layer as a read-only FUSE filesystem: the tree comes from the validated TOC index,
//! file data from the [`LayerReader`] (cache first, the registry on a miss).
//!
//! The tree is what containerd's unpacker would have written: directories, files, symlinks,
//! hard links (one inode, several names), device nodes and fifos; whiteouts are overlay
//! whiteouts (character device 0:0) and opaque directories carry `trusted.overlay.opaque`, so
//! an overlay over lazy layers sees exactly what it would over unpacked ones.
//!
//! The mount is made here (open `/dev/fuse`, mount(2) with its fd) rather than through
//! fusermount, which is not installed on the node and is not needed by root.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry,
    ReplyOpen, ReplyXattr, Request,
};
use tracing::{debug, warn};

use crate::lazy::layer::LayerReader;
use kite_estargz::{Chunk, Index, Node};

/// The layer never changes: the kernel may cache names and attributes for long.
const TTL: Duration = Duration::from_secs(3600);
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

struct TreeNode {
    attr: FileAttr,
    parent: u64,
    children: BTreeMap<OsString, u64>,
    symlink: Option<OsString>,
    xattrs: BTreeMap<OsString, Vec<u8>>,
    /// For regular files: the index path holding its chunks.
    file: Option<String>,
}

/// The inode tree of a layer (inode numbers are positions; 1 is the root).
pub struct LayerTree {
    nodes: Vec<TreeNode>,
}

fn attr(ino: u64, kind: FileType, perm: u32, size: u64) -> FileAttr {
    FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm: (perm & 0o7777) as u16,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl LayerTree {
    pub fn build(index: &Index) -> LayerTree {
        let dir_node = |ino, parent, perm| TreeNode {
            attr: FileAttr {
                nlink: 2,
                ..attr(ino, FileType::Directory, perm, 0)
            },
            parent,
            children: BTreeMap::new(),
            symlink: None,
            xattrs: BTreeMap::new(),
            file: None,
        };
        let mut nodes = vec![dir_node(0, 0, 0), dir_node(1, 1, 0o755)];
        let mut by_path: HashMap<String, u64> = HashMap::from([(String::new(), 1)]);
        for (path, inode) in &index.inodes {
            let (parent_path, name) = match path.rsplit_once('/') {
                Some((p, n)) => (p, n),
                None => ("", path.as_str()),
            };
            let ino = if path.is_empty() {
                1
            } else {
                // Directories a TOC leaves out exist implicitly (as tar unpacking makes them).
                let mut parent = 1u64;
                let mut walked = String::new();
                let mut ok = true;
                for part in parent_path.split('/').filter(|p| !p.is_empty()) {
                    if !walked.is_empty() {
                        walked.push('/');
                    }
                    walked.push_str(part);
                    parent = match by_path.get(&walked) {
                        Some(i) if nodes[*i as usize].attr.kind == FileType::Directory => *i,
                        Some(_) => {
                            ok = false;
                            break;
                        }
                        None => {
                            let i = nodes.len() as u64;
                            nodes.push(dir_node(i, parent, 0o755));
                            nodes[parent as usize]
                                .children
                                .insert(OsString::from(part), i);
                            nodes[parent as usize].attr.nlink += 1;
                            by_path.insert(walked.clone(), i);
                            i
                        }
                    };
                }
                if !ok {
                    warn!(%path, "a TOC entry under a non-directory is left out");
                    continue;
                }
                if let Node::Hardlink { target } = &inode.node {
                    if let Some(&t) = by_path.get(target) {
                        nodes[t as usize].attr.nlink += 1;
                        nodes[parent as usize]
                            .children
                            .insert(OsString::from(name), t);
                        by_path.insert(path.clone(), t);
                    }
                    continue;
                }
                let i = nodes.len() as u64;
                nodes.push(dir_node(i, parent, 0o755));
                if let Some(old) = nodes[parent as usize]
                    .children
                    .insert(OsString::from(name), i)
                {
                    if nodes[old as usize].attr.kind == FileType::Directory {
                        nodes[parent as usize].attr.nlink -= 1;
                    }
                }
                by_path.insert(path.clone(), i);
                i
            };
            let n = &mut nodes[ino as usize];
            let (kind, size, rdev) = match &inode.node {
                Node::Dir { opaque } => {
                    if *opaque {
                        n.xattrs.insert(OPAQUE_XATTR.into(), b"y".to_vec());
                    }
                    (FileType::Directory, 0, 0)
                }
                Node::File { size, .. } => {
                    n.file = Some(path.clone());
                    (FileType::RegularFile, *size, 0)
                }
                Node::Symlink { target } => {
                    n.symlink = Some(OsString::from(target));
                    (FileType::Symlink, target.len() as u64, 0)
                }
                Node::Device { kind, major, minor } => {
                    let k = if kind == "block" {
                        FileType::BlockDevice
                    } else {
                        FileType::CharDevice
                    };
                    (k, 0, libc::makedev(*major, *minor) as u32)
                }
                Node::Fifo => (FileType::NamedPipe, 0, 0),
                Node::Whiteout => (FileType::CharDevice, 0, 0),
                Node::Hardlink { .. } => unreachable!("handled above"),
            };
            let nlink = n.attr.nlink;
            // Times before the epoch are shown as the epoch.
            let mtime = UNIX_EPOCH + Duration::from_secs(u64::try_from(inode.mtime).unwrap_or(0));
            n.attr = FileAttr {
                mtime,
                ctime: mtime,
                atime: mtime,
                uid: inode.uid,
                gid: inode.gid,
                rdev,
                nlink: if kind == FileType::Directory {
                    nlink
                } else {
                    1
                },
                ..attr(
                    ino,
                    kind,
                    if matches!(inode.node, Node::Whiteout) {
                        0
                    } else {
                        inode.mode
                    },
                    size,
                )
            };
            for (k, v) in &inode.xattrs {
                // The TOC carries xattr values base64-encoded (Go's []byte in JSON).
                use base64::Engine;
                let value = base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .unwrap_or_else(|_| v.as_bytes().to_vec());
                n.xattrs.insert(OsString::from(k), value);
            }
        }
        LayerTree { nodes }
    }

    fn node(&self, ino: u64) -> Option<&TreeNode> {
        if ino == 0 {
            return None;
        }
        self.nodes.get(ino as usize)
    }

    /// The inode of `path` (relative to the layer root), for tests and tools.
    pub fn lookup_path(&self, path: &str) -> Option<u64> {
        let mut ino = 1;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            ino = *self.node(ino)?.children.get(OsStr::new(part))?;
        }
        Some(ino)
    }

    pub fn len(&self) -> usize {
        self.nodes.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The chunks of `chunks` that overlap file bytes `range`.
fn overlapping(chunks: &[Chunk], range: &std::ops::Range<u64>) -> Vec<Chunk> {
    let first = chunks.partition_point(|c| c.file_offset + c.size <= range.start);
    chunks[first..]
        .iter()
        .take_while(|c| c.file_offset < range.end)
        .cloned()
        .collect()
}

pub struct LazyFs {
    tree: LayerTree,
    reader: Arc<LayerReader>,
    rt: tokio::runtime::Handle,
}

impl LazyFs {
    pub fn new(reader: Arc<LayerReader>, rt: tokio::runtime::Handle) -> LazyFs {
        LazyFs {
            tree: LayerTree::build(&reader.index),
            reader,
            rt,
        }
    }
}

impl Filesystem for LazyFs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.add_capabilities(fuser::consts::FUSE_CACHE_SYMLINKS);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        match self
            .tree
            .node(parent)
            .and_then(|p| p.children.get(name))
            .and_then(|i| self.tree.node(*i))
        {
            Some(n) => reply.entry(&TTL, &n.attr, 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.tree.node(ino) {
            Some(n) => reply.attr(&TTL, &n.attr),
            None => reply.error(libc::ENOENT),
        }
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        match self.tree.node(ino).and_then(|n| n.symlink.as_ref()) {
            Some(t) => reply.data(t.as_bytes()),
            None => reply.error(libc::EINVAL),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(libc::EROFS);
        }
        match self.tree.node(ino) {
            // The data never changes: keep the page cache across opens.
            Some(_) => reply.opened(0, fuser::consts::FOPEN_KEEP_CACHE),
            None => reply.error(libc::ENOENT),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyData,
    ) {
        let Some(path) = self.tree.node(ino).and_then(|n| n.file.as_ref()) else {
            return reply.error(libc::EISDIR);
        };
        let Some((file_size, chunks)) = self.reader.index.file(path) else {
            return reply.error(libc::EIO);
        };
        let start = u64::try_from(offset).unwrap_or(0).min(file_size);
        let end = start.saturating_add(u64::from(size)).min(file_size);
        if start == end {
            return reply.data(&[]);
        }
        let range = start..end;
        let needed = overlapping(chunks, &range);
        if let Some(data) = self.reader.read_cached(&needed, range.clone()) {
            return reply.data(&data);
        }
        // A miss: fetch off the FUSE thread, so other reads (cached ones) go on meanwhile.
        let reader = self.reader.clone();
        let rt = self.rt.clone();
        let path = path.clone();
        self.rt.spawn_blocking(move || {
            let refs: Vec<&Chunk> = needed.iter().collect();
            match rt.block_on(reader.ensure(&refs)) {
                Ok(()) => match reader.read_cached(&needed, range.clone()) {
                    Some(data) => reply.data(&data),
                    None => {
                        warn!(%path, ?range, "fetched chunks are not in the cache (too small?)");
                        reply.error(libc::EIO)
                    }
                },
                Err(e) => {
                    warn!(%path, ?range, error = %kite_protocol::errors::error_chain(&e), "read failed");
                    reply.error(libc::EIO)
                }
            }
        });
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let Some(n) = self.tree.node(ino) else {
            return reply.error(libc::ENOENT);
        };
        if n.attr.kind != FileType::Directory {
            return reply.error(libc::ENOTDIR);
        }
        let dots = [
            (ino, FileType::Directory, OsStr::new(".")),
            (n.parent, FileType::Directory, OsStr::new("..")),
        ];
        let children = n.children.iter().map(|(name, i)| {
            let kind = self.tree.nodes[*i as usize].attr.kind;
            (*i, kind, name.as_os_str())
        });
        for (k, (i, kind, name)) in dots
            .into_iter()
            .chain(children)
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(0))
        {
            if reply.add(i, i64::try_from(k + 1).unwrap_or(i64::MAX), kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        size: u32,
        reply: ReplyXattr,
    ) {
        let Some(n) = self.tree.node(ino) else {
            return reply.error(libc::ENOENT);
        };
        match n.xattrs.get(name) {
            None => reply.error(libc::ENODATA),
            Some(v) if size == 0 => reply.size(v.len() as u32),
            Some(v) if v.len() > size as usize => reply.error(libc::ERANGE),
            Some(v) => reply.data(v),
        }
    }

    fn listxattr(&mut self, _req: &Request<'_>, ino: u64, size: u32, reply: ReplyXattr) {
        let Some(n) = self.tree.node(ino) else {
            return reply.error(libc::ENOENT);
        };
        let mut list = Vec::new();
        for k in n.xattrs.keys() {
            list.extend_from_slice(k.as_bytes());
            list.push(0);
        }
        if size == 0 {
            reply.size(list.len() as u32)
        } else if list.len() > size as usize {
            reply.error(libc::ERANGE)
        } else {
            reply.data(&list)
        }
    }
}

/// A mounted lazy layer; dropping it does not unmount (see [`unmount`]).
pub struct LazyMount {
    _session: fuser::BackgroundSession,
}

/// Mounts `fs` read-only at `mountpoint`.
pub fn mount(mountpoint: &Path, fs: LazyFs) -> std::io::Result<LazyMount> {
    use nix::mount::MsFlags;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let fd: OwnedFd = dev.into();
    let options = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions",
        fd.as_raw_fd()
    );
    nix::mount::mount(
        Some("kite-lazy"),
        mountpoint,
        Some("fuse.kite"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOATIME,
        Some(options.as_str()),
    )
    .map_err(std::io::Error::from)?;
    let session = fuser::Session::from_fd(fs, fd, fuser::SessionACL::All);
    match session.spawn() {
        Ok(s) => {
            debug!(mountpoint = %mountpoint.display(), "lazy layer mounted");
            Ok(LazyMount { _session: s })
        }
        Err(e) => {
            let _ = unmount(mountpoint);
            Err(e)
        }
    }
}

/// Detaches the FUSE mount at `mountpoint` (its serving thread ends when the kernel lets go).
/// Not mounted is not an error.
pub fn unmount(mountpoint: &Path) -> std::io::Result<()> {
    match nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Whether `path` is a live mount point of a kite lazy layer (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.display().to_string();
    info.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.len() > 4 && f[4] == want && l.contains(" - fuse.kite ")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kite_estargz::Toc;

    const D: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn the_tree_is_what_an_unpack_would_make() {
        let toc: Toc = serde_json::from_value(serde_json::json!({"version": 1, "entries": [
            {"name": "bin/", "type": "dir", "mode": 493},
            {"name": "bin/app", "type": "reg", "size": 10, "offset": 100, "chunkDigest": D, "mode": 493,
             "modtime": "2023-11-14T22:13:20Z"},
            {"name": "bin/app2", "type": "hardlink", "linkName": "bin/app"},
            {"name": "usr/lib/x.so", "type": "reg", "size": 0},
            {"name": "etc/", "type": "dir", "mode": 493},
            {"name": "etc/.wh..wh..opq", "type": "reg"},
            {"name": "etc/.wh.old", "type": "reg"},
            {"name": "sh", "type": "symlink", "linkName": "bin/app"},
            {"name": "dev/null", "type": "char", "devMajor": 1, "devMinor": 3, "mode": 438}
        ]}))
        .unwrap();
        let index = Index::from_toc(&toc, 1000).unwrap();
        let t = LayerTree::build(&index);
        let n = |p| &t.nodes[t.lookup_path(p).unwrap() as usize];
        assert_eq!(n("bin/app").attr.size, 10);
        assert_eq!(n("bin/app").attr.perm, 0o755);
        assert_eq!(
            n("bin/app").attr.mtime,
            UNIX_EPOCH + Duration::from_secs(1_700_000_000)
        );
        assert_eq!(t.lookup_path("bin/app"), t.lookup_path("bin/app2"));
        assert_eq!(n("bin/app").attr.nlink, 2);
        // usr/ and usr/lib/ were implicit.
        assert_eq!(n("usr/lib").attr.kind, FileType::Directory);
        assert_eq!(n("etc").xattrs[OsStr::new(OPAQUE_XATTR)], b"y");
        let wh = n("etc/old");
        assert_eq!((wh.attr.kind, wh.attr.rdev), (FileType::CharDevice, 0));
        assert_eq!(n("sh").symlink.as_deref(), Some(OsStr::new("bin/app")));
        assert_eq!(n("dev/null").attr.rdev, libc::makedev(1, 3) as u32);
        assert!(t.lookup_path("etc/.wh.old").is_none());
    }

    #[test]
    fn reads_touch_only_the_chunks_they_overlap() {
        let c = |o, s| Chunk {
            file_offset: o,
            size: s,
            blob_offset: o,
            digest: D.into(),
        };
        let chunks = [c(0, 10), c(10, 10), c(20, 5)];
        let o = |r| {
            overlapping(&chunks, &r)
                .iter()
                .map(|c| c.file_offset)
                .collect::<Vec<_>>()
        };
        assert_eq!(o(0..5), [0]);
        assert_eq!(o(5..15), [0, 10]);
        assert_eq!(o(10..25), [10, 20]);
        assert_eq!(o(24..25), [20]);
    }
}
