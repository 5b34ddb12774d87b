//! The filesystem logic: plain async Rust returning `Result`, no FUSE types.
//!
//! [`BacktreeFs`] only coordinates modules that each own their state:
//!
//! | module | owns | answers |
//! |---|---|---|
//! | [`inodes`] | the inode table the kernel holds; attributes | `forget`, attributes, xattrs |
//! | [`namespace`] | hosts, generations, `latest`, listings kept for outages | the virtual directories |
//! | [`history`] | versions of recently asked paths, generation roots | the history view `/<host>/.history/` |
//! | [`dirs`] | parsed directory pages, directory handles | lookups and listings in generations |
//! | [`read`] | the read state of files being read | reads, holes, `lseek` |
//! | [`chunks`] | the chunk cache and pack windows | verified chunks |
//! | [`readahead`] | every read-ahead policy's state | nothing: it fetches ahead of readers |
//! | [`error`] | the log of repository failures | the one error type |
//!
//! Every operation is one async function. The FUSE adapter polls it once on the FUSE thread
//! and replies there when it completes at once (everything it needs in memory, the common
//! case), and hands it to the runtime only when it has to wait: a thread hand-off costs about
//! 25 µs, while polling the async function instead of calling a synchronous twin costs
//! nothing measurable (docs/mount.md, `examples/answer_paths.rs`). Work that must not run on
//! the FUSE thread (parsing a large directory page, decoding a large chunk) is preceded by
//! [`hand_off`] or runs on the blocking pool.
//!
//! Virtual directories get a short TTL ([`SHORT_TTL`]); everything inside a generation never
//! changes and gets [`LONG_TTL`]. docs/mount.md states the semantics.

mod chunks;
mod dirs;
mod error;
mod history;
mod inodes;
mod namespace;
mod read;
mod readahead;

pub use dirs::DirItem;
pub use error::{FsError, Result};
pub use history::HISTORY_DIR;
pub use inodes::{Attr, EntryAt, EntryRef, FileKind, Node};
pub use namespace::GenCtx;
pub use readahead::{FIRST_WINDOW, MAX_WINDOW};

use crate::cache::ChunkCache;
use crate::packwin::PackReader;
use backtree_core::chunklist::FileChunks;
use backtree_core::tree::Kind;
use backtree_core::Repository;
use bytes::Bytes;
use chunks::Chunks;
use dirs::{dir_tree, DirHandle, Dirs};
use error::Failures;
use history::History;
use inodes::{entry_attr, xattr_names, xattr_value, Inodes};
use namespace::Namespace;
use read::{file_node, Files, OpenFile};
use readahead::{Budget, ReadAhead};
use std::sync::Arc;
use std::time::Duration;

/// TTL of the virtual directories (root, hosts, `latest`): new generations show within this.
pub const SHORT_TTL: Duration = Duration::from_secs(1);
/// TTL of generation contents, which never change.
pub const LONG_TTL: Duration = Duration::from_secs(24 * 3600);
/// st_blksize: asks `cp` and friends for large reads.
pub const BLKSIZE: u32 = 1 << 20;
pub const ROOT_INO: u64 = 1;

/// Compressed tree blobs kept in memory, in windows of their packs (see [`crate::packwin`]): a
/// cold `find` then reads each tree pack once instead of making one small read per directory.
const TREE_BYTES: usize = 32 << 20;
/// Compressed small data blobs kept in memory in pack windows, at most: a restore of many small
/// files then makes one read per window, not one per file.
const DATA_WINDOW_BYTES: usize = 8 << 20;

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

/// Where an operation leaves the FUSE thread: polled there once, it returns pending here, and
/// the FUSE adapter hands the rest of it to the runtime. Put before work too large for the
/// FUSE thread that would otherwise complete without waiting.
pub(crate) async fn hand_off() {
    tokio::task::yield_now().await;
}

/// An item of a virtual directory: inode, name, node.
type Listed = (u64, Vec<u8>, Node);

/// The filesystem: a coordinator over the modules that own its state (see the module docs).
pub struct BacktreeFs {
    repo: Arc<Repository>,
    inodes: Inodes,
    namespace: Namespace,
    history: History,
    dirs: Dirs,
    files: Files,
    chunks: Arc<Chunks>,
    read_ahead: ReadAhead,
    failures: Arc<Failures>,
}

impl BacktreeFs {
    /// Creates the filesystem. Call inside a tokio runtime: read-ahead tasks are spawned on it.
    pub fn new(repo: Arc<Repository>, opts: FsOptions) -> Self {
        let failures = Arc::new(Failures::default());
        let cache = ChunkCache::new(opts.cache_size, opts.fetches, opts.cache_dir.clone());
        let packs = Arc::new(PackReader::new(
            repo.clone(),
            TREE_BYTES,
            DATA_WINDOW_BYTES.min(opts.cache_size / 4),
        ));
        let inline = opts.cache_dir.is_none();
        let chunks = Arc::new(Chunks::new(packs.clone(), Arc::new(cache), inline));
        let budget = Budget {
            window: (opts.cache_size as u64 / 2).max(1 << 20),
            gather_gap: opts.gather_gap,
            // A quarter of the cache at most, so that decoding ahead never pushes out the
            // chunks a large file's reader has prefetched. With --cache-dir, chunks go through
            // the cache's fetch, which also writes them to disk.
            decode: if inline { opts.cache_size / 4 } else { 0 },
        };
        BacktreeFs {
            namespace: Namespace::new(repo.clone(), failures.clone(), opts.uid, opts.gid),
            history: History::new(repo.clone(), failures.clone()),
            dirs: Dirs::new(packs, failures.clone()),
            inodes: Inodes::new(),
            files: Files::new(),
            read_ahead: ReadAhead::new(chunks.clone(), budget),
            chunks,
            failures,
            repo,
        }
    }

    pub fn repo(&self) -> &Arc<Repository> {
        &self.repo
    }

    /// Bytes of decompressed chunks currently cached.
    pub fn cached_bytes(&self) -> usize {
        self.chunks.cache.bytes()
    }

    /// Records that the kernel received `ino` once more (lookup, readdirplus entry).
    pub fn remember(&self, ino: u64, node: &Node) {
        self.inodes.remember(ino, node)
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        self.inodes.forget(ino, n)
    }

    /// A node and its entry (for nodes inside a generation). A generation root held by name
    /// is loaded here: whoever resolves an inode needs its attributes or contents.
    async fn resolve(&self, ino: u64) -> Result<(Node, Option<EntryRef>)> {
        let node = match self.inodes.get(ino)? {
            Node::Generation { host, name } => self.namespace.root(&host, &name).await?,
            node => node,
        };
        let entry = self.dirs.entry(&node).await?;
        Ok((node, entry))
    }

    /// Attributes of a node; `entry` is its entry (for nodes inside a generation).
    fn attr_of(
        &self,
        ino: u64,
        node: &Node,
        entry: Option<&backtree_core::tree::Entry>,
    ) -> (Attr, Duration) {
        match (node, entry) {
            (Node::Entry { gen, .. }, Some(e)) => (entry_attr(ino, gen, e), LONG_TTL),
            _ => self.namespace.attr(ino, node),
        }
    }

    pub async fn getattr(&self, ino: u64) -> Result<(Attr, Duration)> {
        let (n, e) = self.resolve(ino).await?;
        Ok(self.attr_of(ino, &n, e.as_deref()))
    }

    /// Finds `name` in directory `parent`. The caller must [`remember`](Self::remember) the
    /// returned inode if it hands it to the kernel.
    pub async fn lookup(&self, parent: u64, name: &[u8]) -> Result<(u64, Node, Attr, Duration)> {
        let (pnode, pentry) = self.resolve(parent).await?;
        if let Node::Entry { gen, path, .. } = &pnode {
            let dir = dir_tree(pentry.as_deref())?;
            let (ino, node, attr) = self.dirs.lookup(parent, gen, path, &dir, name).await?;
            return Ok((ino, node, attr, LONG_TTL));
        }
        let (ino, node) = match &pnode {
            Node::History { host, path } => {
                let path = history::join(path, name);
                let versions = self.versions(host, &path).await?;
                history::path_node(host, path, &versions)?
            }
            Node::Versions { host, path } => {
                let versions = self.versions(host, path).await?;
                let v = (versions.iter())
                    .find(|v| v.first().as_bytes() == name)
                    .ok_or(FsError::NotFound)?;
                let gen = self.namespace.generation(host, v.first()).await?;
                let (ino, node, attr) = history::version_node(gen, path, v);
                return Ok((ino, node, attr, LONG_TTL));
            }
            _ => self.namespace.lookup(&pnode, name).await?,
        };
        let entry = self.dirs.entry(&node).await?;
        let (attr, ttl) = self.attr_of(ino, &node, entry.as_deref());
        Ok((ino, node, attr, ttl))
    }

    pub async fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        match self.resolve(ino).await? {
            (Node::Latest(host), _) => self.namespace.latest(&host).await,
            (_, Some(e)) => e.target.clone().ok_or(FsError::Invalid),
            _ => Err(FsError::Invalid),
        }
    }

    /// The value of an extended attribute. ENODATA when absent, never ENOSYS.
    pub async fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        xattr_value(self.resolve(ino).await?.1.as_deref(), name)
    }

    /// Names of the extended attributes, each followed by a NUL byte.
    pub async fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        Ok(xattr_names(self.resolve(ino).await?.1.as_deref()))
    }

    /// Opens a directory. Returns the handle and whether its listing is immutable (inside a
    /// generation: the kernel may cache it) or not (root and host directories change).
    pub async fn opendir(&self, ino: u64) -> Result<(u64, bool)> {
        let (node, entry) = self.resolve(ino).await?;
        let handle = match &node {
            Node::Entry { gen, path, .. } => DirHandle::Gen {
                gen: gen.clone(),
                path: path.clone(),
                ino,
                tree: dir_tree(entry.as_deref())?,
            },
            _ => {
                let items = match &node {
                    Node::History { host, path } => self.list_history(host, path).await?,
                    Node::Versions { host, path } => self.list_versions(host, path).await?,
                    _ => self.namespace.list(&node).await?,
                };
                let items = items.into_iter().enumerate().map(|(i, (ino, name, node))| {
                    // The entries a virtual directory lists are generation roots (in their
                    // manifests) and history versions (held by their nodes).
                    let entry = match &node {
                        Node::Entry {
                            at: EntryAt::Held(e),
                            ..
                        } => Some(&**e),
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
                });
                DirHandle::Virtual(items.collect())
            }
        };
        let immutable = matches!(handle, DirHandle::Gen { .. });
        Ok((self.dirs.open(handle), immutable))
    }

    /// Directory items from `offset` on (0 = start), at most `max`. `.` and `..` are left to
    /// the kernel's path walk and not listed.
    pub async fn readdir(&self, fh: u64, offset: u64, max: usize) -> Result<Vec<DirItem>> {
        let listed = |page, tree: &_| self.read_ahead.listed(page, tree);
        self.dirs.read(fh, offset, max, listed).await
    }

    /// The versions of `path` in `host`'s generations, listed afresh.
    async fn versions(
        &self,
        host: &str,
        path: &[u8],
    ) -> Result<Arc<Vec<backtree_core::history::Version>>> {
        let names = self.namespace.generations(host).await?;
        self.history.versions(host, &names, path).await
    }

    /// The items of a directory of the history view: the names `path` has had.
    async fn list_history(&self, host: &Arc<str>, path: &Arc<[u8]>) -> Result<Vec<Listed>> {
        let versions = self.versions(host, path).await?;
        let names = self.history.children(host, path, &versions).await?;
        let items = names.into_iter().map(|(name, kind)| {
            let (ino, node) = history::node_of(host, history::join(path, &name), kind == Kind::Dir);
            (ino, name, node)
        });
        Ok(items.collect())
    }

    /// The items of a directory of versions: each version's entry in its first generation.
    async fn list_versions(&self, host: &Arc<str>, path: &Arc<[u8]>) -> Result<Vec<Listed>> {
        let versions = self.versions(host, path).await?;
        let mut items = Vec::with_capacity(versions.len());
        // The versions' generations are loaded 16 at a time (a file changed every night has a
        // version per generation; on S3 each load is a GET).
        let mut ahead = versions.iter();
        let mut gens = futures_util::stream::FuturesOrdered::new();
        loop {
            while gens.len() < 16 {
                let Some(v) = ahead.next() else { break };
                let load = self.namespace.generation(host, v.first());
                gens.push_back(async move { (v, load.await) });
            }
            let Some((v, gen)) = futures_util::StreamExt::next(&mut gens).await else {
                break;
            };
            let gen = match gen {
                Ok(g) => g,
                // Forgotten since the listing.
                Err(FsError::NotFound) => continue,
                Err(e) => return Err(e),
            };
            let (ino, node, _) = history::version_node(gen, path, v);
            items.push((ino, v.first().as_bytes().to_vec(), node));
        }
        Ok(items)
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.release(fh)
    }

    /// A file's read state, made (from its entry, fetching its chunk list if it is stored on
    /// its own) at its first read, which starts a directory read-ahead.
    async fn file(&self, ino: u64) -> Result<Arc<OpenFile>> {
        if let Some(f) = self.files.get(ino) {
            return Ok(f);
        }
        let (gen, path, entry) = file_node(self.resolve(ino).await?)?;
        // Inline lists without a fetch; of a paged list only the root is read here.
        let chunks = match &entry.chunks {
            Some(c) => FileChunks::Whole(Arc::new(c.clone())),
            None => self.repo.file_chunks(&entry).await.map_err(|e| {
                self.failures
                    .fail(format!("{}: chunk list", gen.describe(&path)), e)
            })?,
        };
        self.read_ahead.opened(&entry);
        Ok(self.files.insert(ino, gen, path, chunks))
    }

    /// Checks that `ino` is a regular file that can be read, and prepares its reading. Reads
    /// need no open first.
    pub async fn open(&self, ino: u64) -> Result<()> {
        self.file(ino).await.map(|_| ())
    }

    /// Reads `size` bytes at `offset` (short at end of file), fetching what is not cached.
    pub async fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Bytes> {
        let h = self.file(ino).await?;
        let end = offset.saturating_add(size as u64).min(h.chunks.size());
        self.read_ahead
            .read(&h.streams, &h.chunks, &self.repo, offset, end);
        read::read(&h, &self.repo, &self.chunks, &self.failures, offset, end).await
    }

    /// `lseek` with SEEK_DATA (3) or SEEK_HOLE (4).
    pub async fn lseek(&self, ino: u64, offset: i64, whence: i32) -> Result<i64> {
        let h = self.file(ino).await?;
        read::seek(&h, &self.repo, &self.failures, offset, whence).await
    }

    pub fn statfs(&self) -> (u64, u64, u32) {
        (0, 0, 255)
    }

    /// Forgets every parsed directory page (tests; see [`Dirs::evict_parsed_pages`]).
    #[cfg(test)]
    fn evict_parsed_pages(&self) -> Vec<Arc<backtree_core::tree::Tree>> {
        self.dirs.evict_parsed_pages()
    }
}

#[cfg(test)]
mod tests;
