//! Inodes and attributes.
//!
//! Inode numbers are derived by hashing, so they are the same on every mount: a host from its
//! name, a generation from host and name, an entry from its parent's inode and its name, and
//! every member of a hardlink group from its generation and group, so hardlinks share one
//! inode. The [`Inodes`] table maps an inode to its [`Node`] and holds only what the kernel
//! currently knows: entries are added when a lookup or readdirplus hands an inode to the kernel
//! and removed on `forget`, so its size follows the kernel's inode cache, not the repository.
//!
//! A node inside a generation holds where its entry is ([`EntryAt`]), not the entry: the kernel
//! keeps every inode it was given (54 k after an `rsync` of a 54 k-file tree), and a full entry
//! per inode was most of the daemon's memory. The entry is re-read from its parsed directory
//! page when needed ([`crate::fs::dirs`]). Only the versions of the history view hold their
//! entries ([`EntryAt::Held`]): a few per path asked.

use super::error::{lock, FsError, Result};
use super::namespace::GenCtx;
use super::ROOT_INO;
use backtree_core::tree::{Entry, Kind, Time, Tree};
use backtree_core::Id;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// File types as the filesystem reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
    Socket,
}

/// Attributes of an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: FileKind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub size: u64,
    pub blocks: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

/// What an inode is.
#[derive(Debug, Clone)]
pub enum Node {
    Root,
    Host(Arc<str>),
    Latest(Arc<str>),
    /// A generation's root directory known by its name only: listed from its host's
    /// directory, its manifest not loaded. Whatever needs its attributes or contents loads the
    /// manifest and uses the [`Node::Entry`] it becomes (same inode number).
    Generation {
        host: Arc<str>,
        name: Arc<str>,
    },
    /// A directory of a host's history view, `/<host>/.history/<path>` (empty path: the view
    /// itself), whose path is a directory in its newest version ([`crate::fs::history`]).
    History {
        host: Arc<str>,
        path: Arc<[u8]>,
    },
    /// The directory of a path's versions, `/<host>/.history/<path>`, for a path that is not a
    /// directory in its newest version. Its items are [`Node::Entry`] nodes of the generations.
    Versions {
        host: Arc<str>,
        path: Arc<[u8]>,
    },
    /// Anything inside a generation, including its root directory (empty path).
    Entry {
        gen: Arc<GenCtx>,
        path: Arc<[u8]>,
        at: EntryAt,
    },
}

/// Where a generation's entry is.
#[derive(Debug, Clone)]
pub enum EntryAt {
    /// The generation's root directory, in its manifest.
    Root,
    /// Entry `idx` of the directory page (tree blob) `page`.
    Page { page: Id, idx: u32 },
    /// Held by the node itself: a version in the history view, found by a walk across
    /// generations whose pages the mount's page cache does not hold (re-reading one page per
    /// version for every `stat` cost a store read each on S3). Few are held at a time.
    Held(Arc<Entry>),
}

/// An entry, kept alive by the page (or manifest) holding it.
pub enum EntryRef {
    Root(Arc<GenCtx>),
    /// Entry `.1` of the directory page `.0`, whose tree id is `.2`.
    Page(Arc<Tree>, u32, Id),
    Held(Arc<Entry>),
}

impl std::ops::Deref for EntryRef {
    type Target = Entry;
    fn deref(&self) -> &Entry {
        match self {
            EntryRef::Root(g) => &g.manifest.root,
            EntryRef::Page(t, i, _) => &t.entries[*i as usize],
            EntryRef::Held(e) => e,
        }
    }
}

struct NodeRec {
    node: Node,
    lookups: u64,
}

/// The inodes the kernel holds, with their lookup counts.
pub(super) struct Inodes {
    nodes: Mutex<HashMap<u64, NodeRec>>,
}

impl Inodes {
    /// A table that knows the root, which the kernel never forgets.
    pub(super) fn new() -> Self {
        let mut nodes = HashMap::new();
        let root = NodeRec {
            node: Node::Root,
            lookups: 1,
        };
        nodes.insert(ROOT_INO, root);
        Inodes {
            nodes: Mutex::new(nodes),
        }
    }

    pub(super) fn get(&self, ino: u64) -> Result<Node> {
        lock(&self.nodes)
            .get(&ino)
            .map(|r| r.node.clone())
            .ok_or(FsError::NotFound)
    }

    /// Records that the kernel received `ino` once more (lookup, readdirplus entry). A
    /// generation root held by name becomes the loaded one when a lookup hands that over.
    pub(super) fn remember(&self, ino: u64, node: &Node) {
        let mut nodes = lock(&self.nodes);
        let rec = nodes.entry(ino).or_insert_with(|| NodeRec {
            node: node.clone(),
            lookups: 0,
        });
        if matches!(rec.node, Node::Generation { .. }) && matches!(node, Node::Entry { .. }) {
            rec.node = node.clone();
        }
        rec.lookups += 1;
    }

    /// The kernel dropped `n` references to `ino`.
    pub(super) fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut nodes = lock(&self.nodes);
        if let Some(r) = nodes.get_mut(&ino) {
            r.lookups = r.lookups.saturating_sub(n);
            if r.lookups == 0 {
                nodes.remove(&ino);
            }
        }
    }
}

/// A stable inode number from parts: BLAKE3, 63 bits, never one of the reserved small numbers.
pub(super) fn hash_ino(parts: &[&[u8]]) -> u64 {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let b = h.finalize();
    let v = u64::from_le_bytes(b.as_bytes()[..8].try_into().unwrap_or([0; 8])) >> 1;
    if v < 16 {
        v + 16
    } else {
        v
    }
}

/// The inode of entry `e` of the directory `parent`: hardlinked files share one.
pub(super) fn entry_ino(parent: u64, gen: &GenCtx, e: &Entry) -> u64 {
    match e.link {
        Some(g) => hash_ino(&[b"link", &gen.ino.to_le_bytes(), &g.to_le_bytes()]),
        None => hash_ino(&[&parent.to_le_bytes(), &e.name]),
    }
}

/// The attributes of an entry of generation `gen`.
pub(super) fn entry_attr(ino: u64, gen: &GenCtx, e: &Entry) -> Attr {
    let kind = kind_of(e.kind);
    let nlink = match (e.kind, e.link) {
        (Kind::File, Some(g)) => gen.links.get(&g).copied().unwrap_or(1),
        // 1 tells find(1) not to use the leaf optimisation (as btrfs does).
        _ => 1,
    };
    let data = e.size.saturating_sub(e.holes.unwrap_or(0));
    Attr {
        ino,
        kind,
        perm: (e.mode & 0o7777) as u16,
        nlink,
        uid: e.uid,
        gid: e.gid,
        // The kernel's 32-bit device encoding is the low half of glibc's 64-bit one for every
        // major below 4096 and minor below 2^20.
        rdev: e.rdev.unwrap_or(0) as u32,
        size: e.size,
        blocks: if kind == FileKind::File {
            data.div_ceil(512)
        } else {
            0
        },
        atime: systime(e.atime),
        mtime: systime(e.mtime),
        ctime: systime(e.ctime),
    }
}

fn systime(t: Time) -> SystemTime {
    if t.0 >= 0 {
        UNIX_EPOCH + Duration::new(t.0 as u64, t.1.min(999_999_999))
    } else {
        UNIX_EPOCH - Duration::from_secs(t.0.unsigned_abs()) + Duration::from_nanos(t.1 as u64)
    }
}

fn kind_of(k: Kind) -> FileKind {
    match k {
        Kind::File => FileKind::File,
        Kind::Dir => FileKind::Dir,
        Kind::Symlink => FileKind::Symlink,
        Kind::Chardev => FileKind::CharDev,
        Kind::Blockdev => FileKind::BlockDev,
        Kind::Fifo => FileKind::Fifo,
        Kind::Socket => FileKind::Socket,
    }
}

/// The value of xattr `name` of `entry`; ENODATA when absent (and for virtual nodes).
pub(super) fn xattr_value(entry: Option<&Entry>, name: &[u8]) -> Result<Vec<u8>> {
    entry
        .and_then(|e| e.xattr(name))
        .map(<[u8]>::to_vec)
        .ok_or(FsError::NoData)
}

/// The xattr names of `entry`, each followed by a NUL byte.
pub(super) fn xattr_names(entry: Option<&Entry>) -> Vec<u8> {
    let mut out = Vec::new();
    for x in entry.map(|e| e.xattrs.as_slice()).unwrap_or_default() {
        out.extend_from_slice(&x.name);
        out.push(0);
    }
    out
}
