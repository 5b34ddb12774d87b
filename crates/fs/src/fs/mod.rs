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

    /// Turns a repository error into EIO, logging it once with what was being read.
    fn io(&self, what: String, err: impl std::fmt::Display) -> FsError {
        let line = format!("{what}: {err}");
        if lock(&self.logged).insert(line.clone()) {
            tracing::error!("{line}");
        }
        FsError::Io(line)
    }
}

mod dirs;
mod inodes;
mod namespace;
mod read;
mod readahead;

use read::fetch_chunk;
use readahead::small_in_window;

#[cfg(test)]
mod tests;
