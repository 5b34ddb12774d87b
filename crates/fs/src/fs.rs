//! The filesystem logic: plain async Rust returning `Result`, no FUSE types.
//!
//! # Tree
//! ```text
//! /                      hosts (listed from the store on every opendir: new hosts appear)
//! /<host>/               generations, and `latest` → the newest (re-listed on every opendir)
//! /<host>/<generation>/  the generation's root directory: immutable from here down
//! ```
//! Virtual directories get a short TTL ([`SHORT_TTL`]); everything inside a generation never
//! changes and gets [`LONG_TTL`].
//!
//! # Inodes
//! Inode numbers are derived by hashing, so they are the same on every mount: a host from its
//! name, a generation from host and name, an entry from its parent's inode and its name, and every
//! member of a hardlink group from its generation and group, so hardlinks share one inode. The
//! table from inode to node holds only what the kernel currently knows (entries are added when a
//! lookup or readdirplus hands an inode to the kernel and removed on `forget`), so its size
//! follows the kernel's inode cache, not the repository.
//!
//! # Reads
//! Files are read by inode, with no open handle (the kernel opens files without asking, see
//! `crate::fuse`): a file's read state, its chunk list and up to [`STREAMS`] sequential
//! streams, is kept in an LRU of [`OPEN_FILES`] files. A read finds its first chunk by binary
//! search, takes chunks from the [`ChunkCache`] (fetching, decompressing and verifying misses
//! with one ranged read each, small ones through pack windows, `crate::packwin`), and copies
//! the requested bytes; holes read as zeros. While a stream reads sequentially, a prefetch
//! window ahead of it is fetched by background tasks, and the window doubles each time the
//! reader moves on, up to [`MAX_WINDOW`] (bounded by half the cache). Reading a directory's
//! files in order reads ahead the next files, and the first files of the next directories
//! listed ([`BacktreeFs::dir_read_ahead`]).

use crate::cache::{ChunkCache, SizedLru};
use crate::packwin::PackReader;
use backtree_core::manifest::{generation_sort_key, is_generation_name, Manifest};
use backtree_core::tree::{ChunkList, Entry, Kind};
use backtree_core::{BlobKind, Id, Repository};
use bytes::Bytes;
use futures_util::StreamExt;
use lru::LruCache;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// TTL of the virtual directories (root, hosts, `latest`): new generations show within this.
pub const SHORT_TTL: Duration = Duration::from_secs(1);
/// TTL of generation contents, which never change.
pub const LONG_TTL: Duration = Duration::from_secs(24 * 3600);
/// First prefetch window: about one chunk plus one kernel read, as mountpoint-s3 starts.
pub const FIRST_WINDOW: u64 = (1 << 20) + (128 << 10);
/// Largest prefetch window.
pub const MAX_WINDOW: u64 = 64 << 20;
/// A read within this distance after the previous one still counts as sequential (the kernel
/// reorders readahead requests): +16 MiB / −1 MiB, as mountpoint-s3 tolerates.
const SEQ_FORWARD: u64 = 16 << 20;
const SEQ_BACKWARD: u64 = 1 << 20;
/// Files whose chunk lists are kept for reading (an LRU by inode). A file read after its list
/// was dropped gets it again from its entry or from the store.
const OPEN_FILES: usize = 256;
/// Sequential readers of one file told apart: concurrent readers of a file share its state.
const STREAMS: usize = 4;
/// A read further than this ahead of the nearest stream starts a new stream (while fewer than
/// [`STREAMS`] exist). The kernel keeps up to its readahead (4 MiB as `backtree mount` sets it,
/// [`crate::mount::READ_AHEAD_KB`]) of one reader's reads in flight, and two FUSE threads may
/// answer them out of order: twice that is still the same reader.
const NEW_STREAM: u64 = 8 << 20;
/// Bytes of parsed directory pages kept in memory ([`Tree::mem_size`], an LRU). A page of
/// 4096 entries takes about 1–2 MB parsed, a typical directory's a few KiB; an evicted page is
/// parsed again from the compressed tree cache when needed, on the FUSE thread if it is small
/// ([`INLINE_TREE`]). Bounded by bytes, not by count: 256 pages (the bound until 2026-12-01) were
/// 8 MB of an `rsync` restore's peak, and could have been far more with large directories.
///
/// [`Tree::mem_size`]: backtree_core::tree::Tree::mem_size
const PARSED_PAGE_BYTES: usize = 4 << 20;
/// Compressed tree blobs kept in memory, in windows of their packs (see [`crate::packwin`]): a
/// cold `find` then reads each tree pack once instead of making one small read per directory.
const TREE_BYTES: usize = 32 << 20;
/// Compressed small data blobs kept in memory in pack windows, at most: a restore of many small
/// files then makes one read per window, not one per file.
const DATA_WINDOW_BYTES: usize = 8 << 20;
/// A small blob found in a pack window is decoded on the FUSE thread if it decodes to at most
/// this much (about 50 µs of zstd and BLAKE3), which saves two thread hand-offs per file.
const INLINE_DECODE: u32 = 256 << 10;
/// A directory page evicted from the parsed pages is decoded and parsed again on the FUSE thread
/// if it decodes to at most this much: a few hundred entries, under 100 µs (parsing dominates).
/// Larger pages are parsed on a worker.
const INLINE_TREE: u32 = 64 << 10;
/// Directory read-ahead ([`BacktreeFs::dir_read_ahead`]): files looked at, windows and large
/// files' first chunks fetched at most per read-ahead, and read-aheads running at once.
const DIR_READ_AHEAD_FILES: usize = 32;
const DIR_READ_AHEAD_CHUNKS: usize = 2;
const MAX_DIR_READ_AHEADS: usize = 4;
/// Read-ahead into the next directories ([`BacktreeFs::next_dirs_read_ahead`]): directories
/// ahead, files of each, and listed directories remembered (about 350 bytes each).
const NEXT_DIRS: usize = 2;
const NEXT_DIR_FILES: usize = 8;
const LISTED_DIRS: usize = 1024;
/// Manifests fetched at once when a host directory is listed (latency-bound on S3).
const MANIFEST_FETCHES: usize = 16;
/// st_blksize: asks `cp` and friends for large reads.
pub const BLKSIZE: u32 = 1 << 20;

pub const ROOT_INO: u64 = 1;

/// Errors of filesystem operations; the FUSE adapter maps each to one errno.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such entry")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("no such attribute")]
    NoData,
    #[error("buffer too small")]
    Range,
    #[error("offset past the end")]
    NoXio,
    #[error("invalid argument")]
    Invalid,
    #[error("stale file handle")]
    BadHandle,
    /// A repository object is missing, corrupt or unreachable; already logged with context.
    #[error("I/O error: {0}")]
    Io(String),
}

pub type Result<T> = std::result::Result<T, FsError>;

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

/// One generation as seen by the mount.
#[derive(Debug)]
pub struct GenCtx {
    pub host: String,
    pub name: String,
    pub ino: u64,
    pub manifest: Manifest,
    pub links: HashMap<u64, u32>,
}

/// What an inode is.
#[derive(Debug, Clone)]
pub enum Node {
    Root,
    Host(Arc<str>),
    Latest(Arc<str>),
    /// Anything inside a generation, including its root directory (empty path). The node
    /// holds where its entry is, not the entry: the kernel keeps every inode it was given
    /// (54 k after an `rsync` of a 54 k-file tree), and a full entry per inode was most of the
    /// daemon's memory. The entry is re-read from its parsed directory page when needed.
    Entry {
        gen: Arc<GenCtx>,
        path: Arc<[u8]>,
        at: EntryAt,
    },
}

/// Where a generation's entry is.
#[derive(Debug, Clone, Copy)]
pub enum EntryAt {
    /// The generation's root directory, in its manifest.
    Root,
    /// Entry `idx` of the directory page (tree blob) `page`.
    Page { page: Id, idx: u32 },
}

/// An entry, kept alive by the page (or manifest) holding it.
pub enum EntryRef {
    Root(Arc<GenCtx>),
    /// Entry `.1` of the directory page `.0`, whose tree id is `.2`.
    Page(Arc<backtree_core::tree::Tree>, u32, Id),
}

impl std::ops::Deref for EntryRef {
    type Target = Entry;
    fn deref(&self) -> &Entry {
        match self {
            EntryRef::Root(g) => &g.manifest.root,
            EntryRef::Page(t, i, _) => &t.entries[*i as usize],
        }
    }
}

/// A directory listing item.
#[derive(Debug, Clone)]
pub struct DirItem {
    pub ino: u64,
    /// Offset of the *next* item (what the kernel passes back to continue).
    pub next: u64,
    pub name: Vec<u8>,
    pub attr: Attr,
    pub ttl: Duration,
    pub node: Node,
}

/// What reading a regular file needs, kept per inode (not per open: the kernel opens files
/// without asking this daemon, see [`crate::fuse`]) in a small LRU.
struct OpenFile {
    gen: Arc<GenCtx>,
    path: Arc<[u8]>,
    chunks: Arc<ChunkList>,
    /// Sequential-read streams, at most [`STREAMS`].
    seq: Mutex<Vec<SeqState>>,
}

/// One sequential reader's progress.
#[derive(Default, Clone, Copy)]
struct SeqState {
    next: u64,
    window: u64,
    prefetched_to: u64,
    /// When this stream was last used (a counter), for replacing the oldest.
    used: u64,
}

enum DirHandle {
    /// Root or host directory: a snapshot of names taken at opendir.
    Virtual(Vec<DirItem>),
    /// A generation directory, listed page by page.
    Gen {
        gen: Arc<GenCtx>,
        path: Arc<[u8]>,
        ino: u64,
        tree: Id,
    },
}

struct NodeRec {
    node: Node,
    lookups: u64,
}

/// Default `--cache-size` on S3: the prefetch window (half of it) must cover the bytes in
/// flight that hide the store's latency. Locally [`LOCAL_CACHE_SIZE`] reads as fast.
pub const REMOTE_CACHE_SIZE: usize = 64 << 20;
/// Default `--cache-size` for a local repository. Its prefetch window (6 MiB) stays ahead of the
/// kernel's 4 MiB readahead; a cold read of a 2 GiB disk image ran as fast with 12 as with 16
/// MiB (alternating single runs, 694–808 vs 688–796 MB/s), and the peak RSS of an `rsync -a`
/// restore of a 54 k-file tree fell by about 5 MiB (80–85 vs 86–90 MiB), which the 100 MB
/// target needed (docs/benchmarks-mount.md).
pub const LOCAL_CACHE_SIZE: usize = 12 << 20;

/// Locally a read costs a syscall and a thread hand-off (~30 µs), about as much as copying
/// 64 KiB from the page cache: smaller gaps are read over.
pub const LOCAL_GATHER_GAP: u64 = 64 << 10;
/// On S3 a request costs tens of milliseconds, in which megabytes arrive: a read-ahead reads
/// whole windows' spans.
pub const REMOTE_GATHER_GAP: u64 = crate::packwin::DATA_WINDOW;

/// Mount-time settings.
#[derive(Debug, Clone)]
pub struct FsOptions {
    /// Bytes of decompressed chunks kept in memory.
    pub cache_size: usize,
    /// Chunk fetches in flight at most (see [`crate::cache::MAX_FETCHES`]).
    pub fetches: usize,
    /// Directory for an on-disk chunk cache.
    pub cache_dir: Option<std::path::PathBuf>,
    /// Largest gap between two small blobs of a pack that a directory read-ahead reads over
    /// rather than making two reads ([`LOCAL_GATHER_GAP`], [`REMOTE_GATHER_GAP`]).
    pub gather_gap: u64,
    /// Owner of the virtual directories.
    pub uid: u32,
    pub gid: u32,
}

impl FsOptions {
    /// Defaults for a repository on S3: a larger cache, more fetches in flight, reads that
    /// span gaps (see [`REMOTE_CACHE_SIZE`], [`crate::cache::MAX_FETCHES_REMOTE`]).
    pub fn remote() -> Self {
        FsOptions {
            cache_size: REMOTE_CACHE_SIZE,
            fetches: crate::cache::MAX_FETCHES_REMOTE,
            gather_gap: REMOTE_GATHER_GAP,
            ..Default::default()
        }
    }
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            cache_size: LOCAL_CACHE_SIZE,
            fetches: crate::cache::MAX_FETCHES,
            cache_dir: None,
            gather_gap: LOCAL_GATHER_GAP,
            // SAFETY: getuid/getgid cannot fail.
            uid: unsafe { libc::getuid() },
            gid: unsafe { libc::getgid() },
        }
    }
}

/// The filesystem.
pub struct BacktreeFs {
    repo: Arc<Repository>,
    opts: FsOptions,
    mounted: SystemTime,
    nodes: Mutex<HashMap<u64, NodeRec>>,
    gens: Mutex<HashMap<(String, String), Arc<GenCtx>>>,
    /// The last listing of hosts (key "") and of each host's generations.
    listings: Mutex<HashMap<String, Vec<String>>>,
    trees: Mutex<SizedLru<Arc<backtree_core::tree::Tree>>>,
    packs: Arc<PackReader>,
    /// Directory read-aheads running.
    read_aheads: Arc<AtomicUsize>,
    /// How far the last directory read-ahead looked: (directory page, entry index).
    frontier: Mutex<(Id, usize)>,
    /// Directory pages in the order they were listed, with their first files' first chunks.
    listed: Mutex<std::collections::VecDeque<(Id, Vec<Id>)>>,
    cache: Arc<ChunkCache>,
    /// Files being read, by inode.
    files: Mutex<LruCache<u64, Arc<OpenFile>>>,
    /// Counts reads, to order sequential streams by last use.
    reads: AtomicU64,

    dirs: Mutex<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
    logged: Mutex<std::collections::HashSet<String>>,
    /// The runtime prefetch tasks run on (reads may arrive on FUSE threads outside it).
    rt: Option<tokio::runtime::Handle>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A stable inode number from parts: BLAKE3, 63 bits, never one of the reserved small numbers.
fn hash_ino(parts: &[&[u8]]) -> u64 {
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

fn systime(t: backtree_core::tree::Time) -> SystemTime {
    if t.0 >= 0 {
        UNIX_EPOCH + Duration::new(t.0 as u64, t.1.min(999_999_999))
    } else {
        UNIX_EPOCH - Duration::from_secs(t.0.unsigned_abs()) + Duration::from_nanos(t.1 as u64)
    }
}

/// A hole's bytes. Up to 1 MiB (every kernel read) they are a slice of one static zero page
/// run: no allocation and no zeroing per read of a sparse image's holes.
fn zeros(n: usize) -> Bytes {
    static ZEROS: [u8; 1 << 20] = [0; 1 << 20];
    match ZEROS.get(..n) {
        Some(z) => Bytes::from_static(z),
        None => Bytes::from(vec![0u8; n]),
    }
}

/// Joins the pieces of a read; a read within one chunk is a slice of it, with no copy.
fn concat(mut parts: Vec<Bytes>) -> Bytes {
    match parts.len() {
        0 => Bytes::new(),
        1 => parts.pop().unwrap_or_default(),
        _ => {
            let mut v = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
            for p in &parts {
                v.extend_from_slice(p);
            }
            Bytes::from(v)
        }
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

impl BacktreeFs {
    /// Creates the filesystem. Call inside a tokio runtime: prefetch tasks are spawned on it.
    pub fn new(repo: Arc<Repository>, opts: FsOptions) -> Self {
        let cache = Arc::new(ChunkCache::new(
            opts.cache_size,
            opts.fetches,
            opts.cache_dir.clone(),
        ));
        let packs = Arc::new(PackReader::new(
            repo.clone(),
            TREE_BYTES,
            DATA_WINDOW_BYTES.min(opts.cache_size / 4),
        ));
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT_INO,
            NodeRec {
                node: Node::Root,
                lookups: 1,
            },
        );
        BacktreeFs {
            repo,
            opts,
            mounted: SystemTime::now(),
            nodes: Mutex::new(nodes),
            gens: Mutex::new(HashMap::new()),
            listings: Mutex::new(HashMap::new()),
            trees: Mutex::new(SizedLru::new(PARSED_PAGE_BYTES)),
            cache,
            packs,
            read_aheads: Default::default(),
            frontier: Mutex::new((Id([0; 32]), 0)),
            listed: Mutex::new(Default::default()),
            files: Mutex::new(LruCache::new(
                NonZeroUsize::new(OPEN_FILES).unwrap_or(NonZeroUsize::MIN),
            )),
            reads: AtomicU64::new(0),

            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            logged: Mutex::new(Default::default()),
            rt: tokio::runtime::Handle::try_current().ok(),
        }
    }

    pub fn repo(&self) -> &Arc<Repository> {
        &self.repo
    }

    /// Bytes of decompressed chunks currently cached.
    pub fn cached_bytes(&self) -> usize {
        self.cache.bytes()
    }

    // ----- nodes and attributes -------------------------------------------------------------

    fn node(&self, ino: u64) -> Result<Node> {
        lock(&self.nodes)
            .get(&ino)
            .map(|r| r.node.clone())
            .ok_or(FsError::NotFound)
    }

    /// Records that the kernel received `ino` once more (lookup, readdirplus entry).
    pub fn remember(&self, ino: u64, node: &Node) {
        lock(&self.nodes)
            .entry(ino)
            .or_insert_with(|| NodeRec {
                node: node.clone(),
                lookups: 0,
            })
            .lookups += 1;
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
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

    fn virtual_dir_attr(&self, ino: u64) -> Attr {
        Attr {
            ino,
            kind: FileKind::Dir,
            perm: 0o555,
            nlink: 2,
            uid: self.opts.uid,
            gid: self.opts.gid,
            rdev: 0,
            size: 0,
            blocks: 0,
            atime: self.mounted,
            mtime: self.mounted,
            ctime: self.mounted,
        }
    }

    fn entry_ino(parent: u64, gen: &GenCtx, e: &Entry) -> u64 {
        match e.link {
            Some(g) => hash_ino(&[b"link", &gen.ino.to_le_bytes(), &g.to_le_bytes()]),
            None => hash_ino(&[&parent.to_le_bytes(), &e.name]),
        }
    }

    /// The inode, node and attributes of entry `idx` of directory page `page` (whose id is
    /// `page_id`) in the directory `parent` at `path`.
    fn child(
        parent: u64,
        gen: &Arc<GenCtx>,
        path: &[u8],
        page_id: Id,
        page: &backtree_core::tree::Tree,
        idx: usize,
    ) -> (u64, Node, Attr) {
        let e = &page.entries[idx];
        let cpath: Arc<[u8]> = if path.is_empty() {
            Arc::from(&e.name[..])
        } else {
            Arc::from([path, b"/", &e.name[..]].concat())
        };
        let node = Node::Entry {
            gen: gen.clone(),
            path: cpath,
            at: EntryAt::Page {
                page: page_id,
                idx: idx as u32,
            },
        };
        let ino = Self::entry_ino(parent, gen, e);
        (ino, node, Self::entry_attr(ino, gen, e))
    }

    /// A node's entry if it is at hand without fetching: `Some(None)` for virtual nodes,
    /// `None` if its directory page must be fetched (use [`entry`](Self::entry)).
    fn entry_cached(&self, node: &Node) -> Option<Option<EntryRef>> {
        match node {
            Node::Entry { gen, at, .. } => match *at {
                EntryAt::Root => Some(Some(EntryRef::Root(gen.clone()))),
                EntryAt::Page { page, idx } => {
                    let t = self.tree_cached(&page)?;
                    ((idx as usize) < t.entries.len()).then_some(Some(EntryRef::Page(t, idx, page)))
                }
            },
            _ => Some(None),
        }
    }

    /// A node's entry (`None` for virtual nodes), fetching its directory page if needed.
    async fn entry(&self, node: &Node) -> Result<Option<EntryRef>> {
        if let Some(e) = self.entry_cached(node) {
            return Ok(e);
        }
        let Node::Entry {
            gen,
            path,
            at: EntryAt::Page { page, idx },
        } = node
        else {
            return Ok(None);
        };
        let t = self.tree(gen, path, page).await?;
        if *idx as usize >= t.entries.len() {
            return Err(FsError::NotFound);
        }
        Ok(Some(EntryRef::Page(t, *idx, *page)))
    }

    /// A node and its entry, if that is at hand without fetching.
    fn resolve_cached(&self, ino: u64) -> Option<Result<(Node, Option<EntryRef>)>> {
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return Some(Err(e)),
        };
        let e = self.entry_cached(&node)?;
        Some(Ok((node, e)))
    }

    /// A node and its entry, fetching the entry's directory page if needed.
    async fn resolve(&self, ino: u64) -> Result<(Node, Option<EntryRef>)> {
        let node = self.node(ino)?;
        let e = self.entry(&node).await?;
        Ok((node, e))
    }

    fn entry_attr(ino: u64, gen: &GenCtx, e: &Entry) -> Attr {
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
            // The kernel's 32-bit device encoding is the low half of glibc's 64-bit one for
            // every major below 4096 and minor below 2^20.
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

    /// Attributes of a node; `entry` is its entry (for nodes inside a generation).
    fn attr_of(&self, ino: u64, node: &Node, entry: Option<&Entry>) -> (Attr, Duration) {
        match node {
            Node::Root | Node::Host(_) => (self.virtual_dir_attr(ino), SHORT_TTL),
            Node::Latest(_) => {
                let mut a = self.virtual_dir_attr(ino);
                a.kind = FileKind::Symlink;
                a.perm = 0o777;
                a.nlink = 1;
                a.size = 18; // a generation name's length; readlink gives the truth
                (a, SHORT_TTL)
            }
            Node::Entry { gen, .. } => match entry {
                Some(e) => (Self::entry_attr(ino, gen, e), LONG_TTL),
                // Not reached: callers resolve the entry of every generation node.
                None => (self.virtual_dir_attr(ino), SHORT_TTL),
            },
        }
    }

    /// [`getattr`](Self::getattr) without waiting, or `None` if that needs a fetch.
    pub fn getattr_cached(&self, ino: u64) -> Option<Result<(Attr, Duration)>> {
        Some(
            self.resolve_cached(ino)?
                .map(|(n, e)| self.attr_of(ino, &n, e.as_deref())),
        )
    }

    pub async fn getattr(&self, ino: u64) -> Result<(Attr, Duration)> {
        let (n, e) = self.resolve(ino).await?;
        Ok(self.attr_of(ino, &n, e.as_deref()))
    }

    // ----- repository access with context -------------------------------------------------

    /// Turns a repository error into EIO, logging it once with what was being read.
    fn io(&self, what: String, err: impl std::fmt::Display) -> FsError {
        let line = format!("{what}: {err}");
        if lock(&self.logged).insert(line.clone()) {
            tracing::error!("{line}");
        }
        FsError::Io(line)
    }

    /// A parsed directory page without waiting: a page parsed earlier, or one decoded and
    /// parsed here from its stored bytes when a tree window holds them. `None` if the page must
    /// be read from the store, or is too large to decode on the calling thread.
    ///
    /// This is what lets requests be answered on the FUSE thread after their page was evicted
    /// from the parsed pages: `rsync` lists directories up to a second before it reads their
    /// files, by which time hundreds of other pages have been parsed. Decoding a page of a few
    /// KiB (zstd, BLAKE3, CBOR) costs less than handing the request to another thread (~25 µs).
    /// A page that fails to decode is left to [`tree`](Self::tree), which reports it.
    fn tree_cached(&self, id: &Id) -> Option<Arc<backtree_core::tree::Tree>> {
        if let Some(t) = lock(&self.trees).get(id) {
            return Some(t);
        }
        let stored = self.packs.trees.get(id)?;
        if stored.raw_len > INLINE_TREE {
            return None;
        }
        let what = format!("tree {id}");
        let raw = stored.decode(id, &what).ok()?;
        let t = Arc::new(backtree_core::tree::Tree::decode(&what, &raw).ok()?);
        lock(&self.trees).put(*id, t.clone(), t.mem_size());
        Some(t)
    }

    async fn tree(
        &self,
        gen: &GenCtx,
        path: &[u8],
        id: &Id,
    ) -> Result<Arc<backtree_core::tree::Tree>> {
        if let Some(t) = self.tree_cached(id) {
            return Ok(t);
        }
        let t = self.load_tree(id).await.map_err(|e| {
            self.io(
                format!(
                    "{}/{}/{}: directory",
                    gen.host,
                    gen.name,
                    String::from_utf8_lossy(path)
                ),
                e,
            )
        })?;
        let t = Arc::new(t);
        lock(&self.trees).put(*id, t.clone(), t.mem_size());
        Ok(t)
    }

    /// Reads and parses a tree blob, fetching its pack's neighbourhood on a miss.
    async fn load_tree(&self, id: &Id) -> backtree_core::Result<backtree_core::tree::Tree> {
        let what = format!("tree {id}");
        let (stored, _) = self.packs.stored(id, BlobKind::Tree).await?;
        let raw = stored.decode(id, &format!("{what} ({} bytes stored)", stored.bytes.len()))?;
        backtree_core::tree::Tree::decode(&what, &raw)
    }

    async fn generation(&self, host: &str, name: &str) -> Result<Arc<GenCtx>> {
        let key = (host.to_owned(), name.to_owned());
        if let Some(g) = lock(&self.gens).get(&key).cloned() {
            return Ok(g);
        }
        let manifest = match self.repo.manifest(host, name).await {
            Ok(m) => m,
            Err(backtree_core::Error::NotFound { .. }) => return Err(FsError::NotFound),
            Err(e) => return Err(self.io(format!("{host}/{name}: manifest"), e)),
        };
        let links = self
            .repo
            .links(&manifest)
            .await
            .map_err(|e| self.io(format!("{host}/{name}: hardlink table"), e))?;
        let g = Arc::new(GenCtx {
            host: host.to_owned(),
            name: name.to_owned(),
            ino: hash_ino(&[b"gen", host.as_bytes(), name.as_bytes()]),
            manifest,
            links,
        });
        lock(&self.gens).insert(key, g.clone());
        Ok(g)
    }

    async fn hosts(&self) -> Result<Vec<String>> {
        self.listing(String::new(), "listing hosts".into(), self.repo.hosts())
            .await
    }

    async fn generations(&self, host: &str) -> Result<Vec<String>> {
        let what = format!("listing generations of {host}");
        self.listing(host.to_owned(), what, self.repo.generations(host))
            .await
    }

    /// A fresh listing of hosts (`key` "") or of a host's generations; if the store cannot be
    /// reached, the last listing that succeeded, so that a store outage does not make the tree
    /// vanish: what is cached stays readable and the rest gives EIO.
    async fn listing(
        &self,
        key: String,
        what: String,
        fresh: impl std::future::Future<Output = backtree_core::Result<Vec<String>>>,
    ) -> Result<Vec<String>> {
        match fresh.await {
            Ok(v) => {
                lock(&self.listings).insert(key, v.clone());
                Ok(v)
            }
            Err(e) => {
                let err = self.io(what, e);
                match lock(&self.listings).get(&key) {
                    Some(v) => Ok(v.clone()),
                    None => Err(err),
                }
            }
        }
    }

    // ----- lookup, readlink, xattrs -------------------------------------------------------

    /// Finds `name` in directory `parent`. The caller must [`remember`](Self::remember) the
    /// returned inode if it hands it to the kernel.
    pub async fn lookup(&self, parent: u64, name: &[u8]) -> Result<(u64, Node, Attr, Duration)> {
        let pnode = self.node(parent)?;
        let name_str = std::str::from_utf8(name).ok();
        let node = match &pnode {
            Node::Root => {
                let host = name_str.ok_or(FsError::NotFound)?;
                if !self.hosts().await?.iter().any(|h| h == host) {
                    return Err(FsError::NotFound);
                }
                (hash_ino(&[b"host", name]), Node::Host(host.into()))
            }
            Node::Host(host) => {
                let n = name_str.ok_or(FsError::NotFound)?;
                if n == "latest" {
                    (
                        hash_ino(&[b"latest", host.as_bytes()]),
                        Node::Latest(host.clone()),
                    )
                } else {
                    if !is_generation_name(n) {
                        return Err(FsError::NotFound);
                    }
                    let g = self.generation(host, n).await?;
                    (
                        g.ino,
                        Node::Entry {
                            gen: g,
                            path: Arc::from(&b""[..]),
                            at: EntryAt::Root,
                        },
                    )
                }
            }
            Node::Latest(_) => return Err(FsError::NotDir),
            Node::Entry { gen, path, .. } => {
                let tree = dir_tree(self.entry(&pnode).await?.as_deref())?;
                let t = self.tree(gen, path, &tree).await?;
                let (page_id, page) = if t.is_paged() {
                    match t.page_for(name) {
                        Some(p) => (p.id, self.tree(gen, path, &p.id).await?),
                        None => return Err(FsError::NotFound),
                    }
                } else {
                    (tree, t)
                };
                return Self::named(parent, gen, path, page_id, &page, name);
            }
        };
        let e = self.entry(&node.1).await?;
        let (attr, ttl) = self.attr_of(node.0, &node.1, e.as_deref());
        Ok((node.0, node.1, attr, ttl))
    }

    /// [`lookup`](Self::lookup) inside a generation, answered only from directory pages in
    /// memory ([`tree_cached`](Self::tree_cached)); `None` when that would need the repository.
    pub fn lookup_cached(
        &self,
        parent: u64,
        name: &[u8],
    ) -> Option<Result<(u64, Node, Attr, Duration)>> {
        let Ok((Node::Entry { gen, path, .. }, Some(entry))) = self.resolve_cached(parent)? else {
            return None;
        };
        let tree = match dir_tree(Some(&entry)) {
            Ok(t) => t,
            Err(e) => return Some(Err(e)),
        };
        let t = self.tree_cached(&tree)?;
        let (page_id, page) = if t.is_paged() {
            match t.page_for(name) {
                Some(p) => (p.id, self.tree_cached(&p.id)?),
                None => return Some(Err(FsError::NotFound)),
            }
        } else {
            (tree, t)
        };
        Some(Self::named(parent, &gen, &path, page_id, &page, name))
    }

    /// The entry `name` of directory page `page` (id `page_id`) of directory `parent`, as
    /// [`lookup`](Self::lookup) answers it.
    fn named(
        parent: u64,
        gen: &Arc<GenCtx>,
        path: &[u8],
        page_id: Id,
        page: &backtree_core::tree::Tree,
        name: &[u8],
    ) -> Result<(u64, Node, Attr, Duration)> {
        let i = page
            .entries
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .map_err(|_| FsError::NotFound)?;
        let (ino, node, attr) = Self::child(parent, gen, path, page_id, page, i);
        Ok((ino, node, attr, LONG_TTL))
    }

    pub async fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        match self.resolve(ino).await? {
            (Node::Latest(host), _) => {
                let gens = self.generations(&host).await?;
                gens.last()
                    .map(|g| g.as_bytes().to_vec())
                    .ok_or(FsError::NotFound)
            }
            (_, Some(e)) => e.target.clone().ok_or(FsError::Invalid),
            _ => Err(FsError::Invalid),
        }
    }

    /// The value of an extended attribute. ENODATA when absent, never ENOSYS.
    pub async fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        xattr_value(self.resolve(ino).await?.1.as_deref(), name)
    }

    /// [`getxattr`](Self::getxattr) without waiting, or `None` if that needs a fetch.
    pub fn getxattr_cached(&self, ino: u64, name: &[u8]) -> Option<Result<Vec<u8>>> {
        Some(
            self.resolve_cached(ino)?
                .and_then(|(_, e)| xattr_value(e.as_deref(), name)),
        )
    }

    /// Names of the extended attributes, each followed by a NUL byte.
    pub async fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        Ok(xattr_names(self.resolve(ino).await?.1.as_deref()))
    }

    /// [`listxattr`](Self::listxattr) without waiting, or `None` if that needs a fetch.
    pub fn listxattr_cached(&self, ino: u64) -> Option<Result<Vec<u8>>> {
        Some(
            self.resolve_cached(ino)?
                .map(|(_, e)| xattr_names(e.as_deref())),
        )
    }

    // ----- directories --------------------------------------------------------------------

    fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// Opens a directory. Returns the handle and whether its listing is immutable (inside a
    /// generation: the kernel may cache it) or not (root and host directories change).
    pub async fn opendir(&self, ino: u64) -> Result<(u64, bool)> {
        let node = self.node(ino)?;
        let handle = match &node {
            Node::Root => {
                let mut items = Vec::new();
                for h in self.hosts().await? {
                    let hino = hash_ino(&[b"host", h.as_bytes()]);
                    let n = Node::Host(h.as_str().into());
                    items.push((hino, h.into_bytes(), n));
                }
                DirHandle::Virtual(self.virtual_items(items))
            }
            Node::Host(host) => {
                let mut gens = self.generations(host).await?;
                gens.sort_by_cached_key(|g| generation_sort_key(g));
                let mut items = Vec::new();
                for g in gens {
                    let gino = hash_ino(&[b"gen", host.as_bytes(), g.as_bytes()]);
                    items.push((gino, g.into_bytes()));
                }
                let mut out = Vec::new();
                // Generation roots need their manifest for attributes: load them here (two
                // small GETs each, cached for the life of the mount), several at once, so that
                // a host with a year of nightly generations lists quickly on S3 too.
                let loaded: Vec<_> = futures_util::stream::iter(items)
                    .map(|(gino, name)| async move {
                        let n = String::from_utf8_lossy(&name).into_owned();
                        let g = self.generation(host, &n).await;
                        (gino, name, g)
                    })
                    .buffered(MANIFEST_FETCHES)
                    .collect()
                    .await;
                for (gino, name, g) in loaded {
                    match g {
                        Ok(g) => {
                            out.push((
                                gino,
                                name,
                                Node::Entry {
                                    gen: g,
                                    path: Arc::from(&b""[..]),
                                    at: EntryAt::Root,
                                },
                            ));
                        }
                        Err(FsError::NotFound) => {} // forgotten meanwhile
                        Err(e) => return Err(e),
                    }
                }
                out.push((
                    hash_ino(&[b"latest", host.as_bytes()]),
                    b"latest".to_vec(),
                    Node::Latest(host.clone()),
                ));
                DirHandle::Virtual(self.virtual_items(out))
            }
            Node::Latest(_) => return Err(FsError::NotDir),
            Node::Entry { gen, path, .. } => DirHandle::Gen {
                gen: gen.clone(),
                path: path.clone(),
                ino,
                tree: dir_tree(self.entry(&node).await?.as_deref())?,
            },
        };
        let immutable = matches!(handle, DirHandle::Gen { .. });
        let fh = self.new_fh();
        lock(&self.dirs).insert(fh, Arc::new(handle));
        Ok((fh, immutable))
    }

    fn virtual_items(&self, items: Vec<(u64, Vec<u8>, Node)>) -> Vec<DirItem> {
        items
            .into_iter()
            .enumerate()
            .map(|(i, (ino, name, node))| {
                let entry = match &node {
                    Node::Entry { gen, .. } => Some(&gen.manifest.root),
                    _ => None,
                };
                let (attr, ttl) = self.attr_of(ino, &node, entry);
                DirItem {
                    ino,
                    next: i as u64 + 1,
                    name,
                    attr,
                    ttl,
                    node,
                }
            })
            .collect()
    }

    /// Directory items from `offset` on (0 = start), at most `max`. `.` and `..` are left to
    /// the kernel's path walk and not listed.
    pub async fn readdir(&self, fh: u64, offset: u64, max: usize) -> Result<Vec<DirItem>> {
        let h = lock(&self.dirs)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        match &*h {
            DirHandle::Virtual(items) => Ok(items
                .iter()
                .skip(offset as usize)
                .take(max)
                .cloned()
                .collect()),
            DirHandle::Gen {
                gen,
                path,
                ino,
                tree,
            } => {
                let t = self.tree(gen, path, tree).await?;
                // Offsets: page index × PAGE_SPAN + index in page + 1, so a paged directory is
                // listed one page at a time without holding it all in memory.
                const PAGE_SPAN: u64 = 1 << 20;
                let mut out = Vec::new();
                let (mut page, mut idx) = (offset / PAGE_SPAN, offset % PAGE_SPAN);
                loop {
                    let (page_id, entries) = if t.is_paged() {
                        match t.pages.get(page as usize) {
                            Some(p) => (p.id, self.tree(gen, path, &p.id).await?),
                            None => break,
                        }
                    } else if page == 0 {
                        (*tree, t.clone())
                    } else {
                        break;
                    };
                    if offset == 0 {
                        self.note_listed(page_id, &entries);
                    }
                    for (i, e) in entries.entries.iter().enumerate().skip(idx as usize) {
                        if out.len() >= max {
                            return Ok(out);
                        }
                        let (cino, node, attr) = Self::child(*ino, gen, path, page_id, &entries, i);
                        out.push(DirItem {
                            ino: cino,
                            next: page * PAGE_SPAN + i as u64 + 1,
                            name: e.name.clone(),
                            attr,
                            ttl: LONG_TTL,
                            node,
                        });
                    }
                    page += 1;
                    idx = 0;
                    if !t.is_paged() {
                        break;
                    }
                }
                Ok(out)
            }
        }
    }

    pub fn releasedir(&self, fh: u64) {
        lock(&self.dirs).remove(&fh);
    }

    // ----- files --------------------------------------------------------------------------

    /// The file a resolved node names, for `open`.
    fn file_node(resolved: (Node, Option<EntryRef>)) -> Result<(Arc<GenCtx>, Arc<[u8]>, EntryRef)> {
        let (gen, path, entry) = match resolved {
            (Node::Entry { gen, path, .. }, Some(e)) => (gen, path, e),
            (Node::Latest(_), _) => return Err(FsError::Invalid),
            _ => return Err(FsError::IsDir),
        };
        match entry.kind {
            Kind::File => Ok((gen, path, entry)),
            Kind::Dir => Err(FsError::IsDir),
            _ => Err(FsError::Invalid),
        }
    }

    fn new_file(
        &self,
        ino: u64,
        gen: Arc<GenCtx>,
        path: Arc<[u8]>,
        chunks: ChunkList,
    ) -> Arc<OpenFile> {
        let f = Arc::new(OpenFile {
            gen,
            path,
            chunks: Arc::new(chunks),
            seq: Mutex::new(vec![SeqState::default()]),
        });
        lock(&self.files).put(ino, f.clone());
        f
    }

    /// A file's read state without waiting: kept, or made from an entry that carries its chunk
    /// list (files of up to 64 chunks). `None` if the list must be fetched (then
    /// [`file`](Self::file) is used). Making it starts a directory read-ahead.
    fn file_cached(&self, ino: u64) -> Option<Result<Arc<OpenFile>>> {
        if let Some(f) = lock(&self.files).get(&ino) {
            return Some(Ok(f.clone()));
        }
        let (gen, path, entry) = match self.resolve_cached(ino)?.and_then(Self::file_node) {
            Ok(v) => v,
            Err(e) => return Some(Err(e)),
        };
        if entry.chunks.is_none() && entry.chunk_list.is_some() {
            return None;
        }
        let chunks = entry.chunks.clone().unwrap_or_default();
        self.dir_read_ahead(&entry);
        Some(Ok(self.new_file(ino, gen, path, chunks)))
    }

    /// A file's read state, fetching its chunk list if need be.
    async fn file(&self, ino: u64) -> Result<Arc<OpenFile>> {
        if let Some(f) = self.file_cached(ino) {
            return f;
        }
        let (gen, path, entry) = Self::file_node(self.resolve(ino).await?)?;
        let chunks = self.repo.chunk_list(&entry).await.map_err(|e| {
            self.io(
                format!(
                    "{}/{}/{}: chunk list",
                    gen.host,
                    gen.name,
                    String::from_utf8_lossy(&path)
                ),
                e,
            )
        })?;
        self.dir_read_ahead(&entry);
        Ok(self.new_file(ino, gen, path, chunks))
    }

    /// Checks that `ino` is a regular file that can be read, without waiting; `None` if that
    /// needs the store (then [`open`](Self::open) is used). Reads need no open first.
    pub fn open_cached(&self, ino: u64) -> Option<Result<()>> {
        self.file_cached(ino).map(|r| r.map(|_| ()))
    }

    /// Checks that `ino` is a regular file that can be read, and prepares its reading.
    pub async fn open(&self, ino: u64) -> Result<()> {
        self.file(ino).await.map(|_| ())
    }

    /// Remembers that a directory page was listed, with its first files' first chunks: a
    /// restore reads directories in the order it listed them (see
    /// [`next_dirs_read_ahead`](Self::next_dirs_read_ahead)).
    fn note_listed(&self, page_id: Id, page: &backtree_core::tree::Tree) {
        let ids: Vec<Id> = files_first_chunks(&page.entries)
            .take(NEXT_DIR_FILES)
            .collect();
        let mut l = lock(&self.listed);
        if l.len() == LISTED_DIRS {
            l.pop_front();
        }
        l.push_back((page_id, ids));
    }

    /// Read-ahead into the next directories. `rsync` lists directories 0.1–1 s before it reads
    /// their files, and reads them in the order it listed them; so the first file of each
    /// directory was a miss, waiting for its window while nothing else was read. When a
    /// restore enters a directory (the first read of a file in another page than the last),
    /// the first [`NEXT_DIR_FILES`] files of the next [`NEXT_DIRS`] directories listed after it
    /// are read ahead. A `find` reads no files and triggers nothing; a walk that reads in
    /// another order (`cp -r` descends as it lists) finds nothing listed after the directory.
    fn next_dirs_read_ahead(&self, page_key: Id) {
        let (Some(rt), want) = (&self.rt, {
            let mut l = lock(&self.listed);
            let Some(at) = l.iter().position(|(k, _)| *k == page_key) else {
                return;
            };
            // This directory and those listed before it are done with (and a second call for
            // it finds nothing).
            l.drain(..=at);
            l.iter()
                .filter(|(_, ids)| !ids.is_empty())
                .take(NEXT_DIRS)
                .flat_map(|(_, ids)| ids.iter().copied())
                .filter(|id| !self.at_hand(id))
                .collect::<Vec<Id>>()
        }) else {
            return;
        };
        if want.is_empty() {
            return;
        }
        self.read_ahead(rt, want, None);
    }

    /// Read-ahead across a directory. A restore (`rsync`, `cp -r`, `tar`) reads a directory's
    /// files one after another in name order, which is the order of the directory page. So the
    /// data of the next [`DIR_READ_AHEAD_FILES`] files of the page is fetched in the background:
    /// the small files' blobs in a few ranged reads ([`PackReader::gather`]) and the first
    /// chunks of at most [`DIR_READ_AHEAD_CHUNKS`] large ones. Their opens and reads
    /// then find the data in memory instead of each waiting for the store in turn, which on S3
    /// is a round trip per window.
    ///
    /// A read-ahead starts at a file's first read when its data is not at hand, and again when
    /// the reader has consumed half of what the last one looked at (the *frontier*), so that a
    /// directory read in order keeps the next windows coming instead of missing once per few
    /// windows (the writer interleaves several directories' files in a pack, so a window holds
    /// only about ten files of one directory).
    fn dir_read_ahead(&self, entry: &EntryRef) {
        let (Some(rt), EntryRef::Page(page, idx, page_key)) = (&self.rt, entry) else {
            return;
        };
        let idx = *idx as usize;
        let own_missing = first_chunk(entry).is_some_and(|id| !self.at_hand(&id));
        let page_key = *page_key;
        let end = (idx + 1 + DIR_READ_AHEAD_FILES).min(page.entries.len());
        let (entered, far_enough) = {
            let f = lock(&self.frontier);
            (
                f.0 != page_key,
                f.0 == page_key && f.1 >= idx + DIR_READ_AHEAD_FILES / 2,
            )
        };
        if entered {
            self.next_dirs_read_ahead(page_key);
        }
        // Not a miss, and the last read-ahead of this page still reaches far enough.
        if !own_missing && far_enough {
            return;
        }
        // Not this file: its reader is fetching it (a window, which holds some of its
        // neighbours too).
        let want: Vec<Id> = files_first_chunks(&page.entries[idx + 1..end])
            .filter(|id| !self.at_hand(id))
            .collect();
        if want.is_empty() {
            *lock(&self.frontier) = (page_key, end);
            return;
        }
        if self.read_aheads.fetch_add(1, Ordering::Relaxed) >= MAX_DIR_READ_AHEADS {
            // Too many running: the next file's first read tries again.
            self.read_aheads.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        *lock(&self.frontier) = (page_key, end);
        self.read_ahead(rt, want, Some(self.read_aheads.clone()));
    }

    /// Whether a chunk is in memory or on its way: cached or being fetched, or its stored
    /// bytes in a pack window.
    fn at_hand(&self, id: &Id) -> bool {
        self.cache.present(id) || self.packs.data.contains(id)
    }

    /// Reads ahead, in a task, the small blobs among `want` ([`PackReader::gather`]) and the
    /// first chunks of at most [`DIR_READ_AHEAD_CHUNKS`] large ones (into the chunk cache);
    /// then decrements `running`, if given. Errors surface (and are logged) when a reader gets
    /// there.
    fn read_ahead(
        &self,
        rt: &tokio::runtime::Handle,
        want: Vec<Id>,
        running: Option<Arc<AtomicUsize>>,
    ) {
        let (packs, cache, gap) = (self.packs.clone(), self.cache.clone(), self.opts.gather_gap);
        // With --cache-dir, chunks go through the cache's fetch, which also writes them to disk.
        // A quarter of the cache at most, so that decoding ahead never pushes out the chunks a
        // large file's reader has prefetched.
        let decode_budget = match self.opts.cache_dir {
            None => self.opts.cache_size / 4,
            Some(_) => 0,
        };
        rt.spawn(async move {
            if let Ok(large) = packs.gather(&want, gap).await {
                decode_ahead(&packs, &cache, &want, decode_budget);
                let first_chunks = large.into_iter().filter(|id| !cache.present(id));
                for id in first_chunks.take(DIR_READ_AHEAD_CHUNKS) {
                    let (cache, packs) = (cache.clone(), packs.clone());
                    tokio::spawn(async move {
                        let _ = cache.get(&id, true, || fetch_chunk(&packs, id)).await;
                    });
                }
            }
            if let Some(running) = running {
                running.fetch_sub(1, Ordering::Relaxed);
            }
        });
    }

    /// Serves a read entirely from cached chunks, or `None` if any chunk is missing (then
    /// [`read`](Self::read) must be used). Cheap enough to run on the FUSE thread.
    pub fn read_cached(&self, ino: u64, offset: u64, size: u32) -> Option<Bytes> {
        let h = self.file_cached(ino)?.ok()?;
        let list = &h.chunks;
        let end = offset.saturating_add(size as u64).min(list.size());
        let mut parts: Vec<Bytes> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let i = list.find(pos)?;
            let (cs, ce) = (list.start(i), list.0[i].end);
            let take = ce.min(end);
            parts.push(match &list.0[i].id {
                None => zeros((take - pos) as usize),
                Some(id) => {
                    let whole = pos == cs && take == ce;
                    let cached = if whole {
                        self.cache.take(id)
                    } else {
                        self.cache.peek(id)
                    };
                    let data = cached.or_else(|| self.decode_inline(id, !whole))?;
                    if take - cs > data.len() as u64 {
                        return None;
                    }
                    data.slice((pos - cs) as usize..(take - cs) as usize)
                }
            });
            pos = take;
        }
        self.note_read(&h, offset, end);
        Some(concat(parts))
    }

    /// Reads `size` bytes at `offset` (short at end of file), fetching what is not cached.
    pub async fn read(self: &Arc<Self>, ino: u64, offset: u64, size: u32) -> Result<Bytes> {
        let h = self.file(ino).await?;
        let list = h.chunks.clone();
        let end = offset.saturating_add(size as u64).min(list.size());
        self.note_read(&h, offset, end);
        let mut parts: Vec<Bytes> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let i = list.find(pos).ok_or(FsError::Invalid)?;
            let (cs, ce) = (list.start(i), list.0[i].end);
            let take = ce.min(end);
            parts.push(match &list.0[i].id {
                None => zeros((take - pos) as usize),
                Some(id) => {
                    let data = self.chunk(&h, id, !(pos == cs && take == ce)).await?;
                    if data.len() as u64 != ce - cs {
                        return Err(self.io(
                            format!(
                                "{}/{}/{}: chunk {id}",
                                h.gen.host,
                                h.gen.name,
                                String::from_utf8_lossy(&h.path)
                            ),
                            "size differs from the file's chunk list",
                        ));
                    }
                    data.slice((pos - cs) as usize..(take - cs) as usize)
                }
            });
            pos = take;
        }
        Ok(concat(parts))
    }

    /// A small chunk whose stored bytes are in a pack window, decoded and verified here on the
    /// calling (FUSE) thread and cached; `None` if it is not there or too large to decode
    /// inline. A chunk that fails verification is left to [`read`](Self::read), which reports it.
    /// `keep`: whether to cache it (not when this read consumes it whole).
    fn decode_inline(&self, id: &Id, keep: bool) -> Option<Bytes> {
        // With --cache-dir, chunks go through the cache's fetch, which also writes them to disk.
        if self.opts.cache_dir.is_some() {
            return None;
        }
        let s = small_in_window(&self.packs, id)?;
        let data = Bytes::from(s.decode(id, "").ok()?);
        if keep {
            self.cache.put(*id, data.clone());
        }
        Some(data)
    }

    async fn chunk(&self, h: &OpenFile, id: &Id, keep: bool) -> Result<Bytes> {
        let packs = &self.packs;
        self.cache
            .get(id, keep, || fetch_chunk(packs, *id))
            .await
            .map_err(|e| {
                self.io(
                    format!(
                        "{}/{}/{}",
                        h.gen.host,
                        h.gen.name,
                        String::from_utf8_lossy(&h.path)
                    ),
                    e,
                )
            })
    }

    /// Sequential-read detection and prefetch scheduling. A read that continues one of the
    /// file's streams grows that stream's prefetch window; any other read starts a new stream
    /// (replacing the least recently used) and prefetches nothing.
    fn note_read(&self, h: &Arc<OpenFile>, offset: u64, end: u64) {
        let now = self.reads.fetch_add(1, Ordering::Relaxed);
        let (from, to) = {
            let mut streams = lock(&h.seq);
            let cap = (self.opts.cache_size as u64 / 2).max(1 << 20);
            // The stream this read continues most closely. A read far ahead of every stream
            // starts a new one while there is room: a second reader 10 MiB further on is
            // within SEQ_FORWARD of the first, but is not the first reader skipping ahead.
            let continuing = streams
                .iter()
                .enumerate()
                .filter(|(_, s)| offset + SEQ_BACKWARD >= s.next && offset <= s.next + SEQ_FORWARD)
                .min_by_key(|(_, s)| s.next.abs_diff(offset))
                .filter(|(_, s)| offset <= s.next + NEW_STREAM || streams.len() == STREAMS)
                .map(|(i, _)| i);
            let Some(i) = continuing else {
                // Random access: fetch only what is asked.
                let fresh = SeqState {
                    next: end,
                    window: 0,
                    prefetched_to: end,
                    used: now,
                };
                if streams.len() < STREAMS {
                    streams.push(fresh);
                } else if let Some(oldest) = streams.iter_mut().min_by_key(|s| s.used) {
                    *oldest = fresh;
                }
                return;
            };
            let s = &mut streams[i];
            s.used = now;
            s.window = if s.window == 0 {
                FIRST_WINDOW
            } else {
                s.window.saturating_mul(2)
            }
            .min(MAX_WINDOW)
            .min(cap);
            s.next = s.next.max(end);
            let target = end.saturating_add(s.window).min(h.chunks.size());
            let from = s.prefetched_to.max(end);
            if target <= from {
                return;
            }
            s.prefetched_to = target;
            (from, target)
        };
        self.prefetch(h, from, to);
    }

    fn prefetch(&self, h: &Arc<OpenFile>, from: u64, to: u64) {
        let Some(rt) = &self.rt else { return };
        let list = &h.chunks;
        let Some(mut i) = list.find(from) else { return };
        while i < list.0.len() && list.start(i) < to {
            if let Some(id) = list.0[i].id {
                if !self.cache.present(&id) {
                    let cache = self.cache.clone();
                    let packs = self.packs.clone();
                    // Errors surface (and are logged) when the reader gets there.
                    rt.spawn(async move {
                        let _ = cache.get(&id, true, || fetch_chunk(&packs, id)).await;
                    });
                }
            }
            i += 1;
        }
    }

    /// `lseek` with SEEK_DATA (3) or SEEK_HOLE (4), without waiting; `None` if the file's
    /// chunk list must be fetched (then [`lseek`](Self::lseek) is used).
    pub fn lseek_cached(&self, ino: u64, offset: i64, whence: i32) -> Option<Result<i64>> {
        Some(
            self.file_cached(ino)?
                .and_then(|h| Self::seek(&h, offset, whence)),
        )
    }

    /// `lseek` with SEEK_DATA (3) or SEEK_HOLE (4).
    pub async fn lseek(&self, ino: u64, offset: i64, whence: i32) -> Result<i64> {
        let h = self.file(ino).await?;
        Self::seek(&h, offset, whence)
    }

    fn seek(h: &OpenFile, offset: i64, whence: i32) -> Result<i64> {
        if offset < 0 {
            return Err(FsError::Invalid);
        }
        let data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return Err(FsError::Invalid),
        };
        h.chunks
            .seek(offset as u64, data)
            .map(|o| o as i64)
            .ok_or(FsError::NoXio)
    }

    pub fn statfs(&self) -> (u64, u64, u32) {
        (0, 0, 255)
    }

    /// Forgets every parsed directory page, as the LRU does on a large walk (tests). Returns
    /// them: a test that keeps them alive makes pages parsed again land at other addresses, as
    /// they do after a walk has parsed many others in between.
    #[cfg(test)]
    fn evict_parsed_pages(&self) -> Vec<Arc<backtree_core::tree::Tree>> {
        lock(&self.trees).clear()
    }
}

/// A data chunk's stored bytes, if a pack window holds them and the chunk is small enough
/// (≤ [`INLINE_DECODE`]) to be decoded on the thread at hand: a FUSE thread
/// ([`BacktreeFs::decode_inline`]) or a read-ahead's task ([`decode_ahead`]).
fn small_in_window(packs: &PackReader, id: &Id) -> Option<crate::packwin::Stored> {
    packs.data.get(id).filter(|s| s.raw_len <= INLINE_DECODE)
}

/// Decodes and verifies, into the chunk cache, the small chunks among `ids` (in their order,
/// up to `budget` decoded bytes) whose stored bytes a read-ahead has just brought into a pack
/// window. Their reads then only copy: decoding at the read put the zstd and BLAKE3 work of
/// every small file (~20–30 µs) into the reader's wait on the FUSE thread, while the
/// read-ahead's task runs beside the reader. A reader that consumes such a chunk whole takes it
/// out of the cache ([`ChunkCache::take`]): the kernel's page cache has it then. Only chunks
/// that [`BacktreeFs::decode_inline`] would decode (≤ [`INLINE_DECODE`]) are decoded here, so a
/// read-ahead of 32 files decodes well under a millisecond's worth and can stay on the async
/// worker. A chunk that fails verification is skipped; its reader reports it.
fn decode_ahead(packs: &PackReader, cache: &ChunkCache, ids: &[Id], mut budget: usize) {
    for id in ids {
        if cache.present(id) {
            continue;
        }
        let Some(stored) = small_in_window(packs, id) else {
            continue;
        };
        let len = stored.raw_len as usize;
        if len > budget {
            continue;
        }
        if let Ok(data) = stored.decode(id, "") {
            budget -= len;
            cache.put(*id, Bytes::from(data));
        }
    }
}

/// Fetches, decodes and verifies a data chunk. Decoding up to 8 MiB is CPU work: a large chunk
/// is decoded on the blocking pool, off the async workers. Errors name the blob and its pack.
async fn fetch_chunk(
    packs: &PackReader,
    id: Id,
) -> std::result::Result<Bytes, Arc<backtree_core::Error>> {
    let (stored, loc) = packs
        .stored(&id, BlobKind::Data)
        .await
        .map_err(|e| Arc::new(e.for_blob(&id)))?;
    let what = backtree_core::blob::describe(&id, &loc);
    let raw = if stored.raw_len <= INLINE_DECODE {
        stored.decode(&id, &what)
    } else {
        stored.decode_blocking(id, what).await
    };
    raw.map(Bytes::from).map_err(Arc::new)
}

/// The tree of a directory entry; ENOTDIR for anything else (and for virtual nodes).
/// The first chunks of the regular files among `entries` that carry their chunk list.
fn files_first_chunks(entries: &[Entry]) -> impl Iterator<Item = Id> + '_ {
    entries
        .iter()
        .filter(|e| e.kind == Kind::File)
        .filter_map(first_chunk)
}

/// The first chunk of a file whose entry carries its chunk list.
fn first_chunk(e: &Entry) -> Option<Id> {
    e.chunks
        .as_ref()
        .and_then(|c| c.0.first())
        .and_then(|c| c.id)
}

fn dir_tree(entry: Option<&Entry>) -> Result<Id> {
    match entry {
        Some(Entry {
            kind: Kind::Dir,
            tree: Some(t),
            ..
        }) => Ok(*t),
        _ => Err(FsError::NotDir),
    }
}

/// The value of xattr `name` of `entry`; ENODATA when absent (and for virtual nodes).
fn xattr_value(entry: Option<&Entry>, name: &[u8]) -> Result<Vec<u8>> {
    entry
        .and_then(|e| e.xattr(name))
        .map(<[u8]>::to_vec)
        .ok_or(FsError::NoData)
}

/// The xattr names of `entry`, each followed by a NUL byte.
fn xattr_names(entry: Option<&Entry>) -> Vec<u8> {
    let mut out = Vec::new();
    for x in entry.map(|e| e.xattrs.as_slice()).unwrap_or_default() {
        out.extend_from_slice(&x.name);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests;
