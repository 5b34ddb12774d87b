//! The writer: turns directory trees into a generation.
//!
//! An ingest walks its sources depth-first in name order. Per directory it `lstat`s every
//! entry, reads the regular files (several at once, via rayon), recurses into subdirectories,
//! and finally stores the directory as a tree blob; so trees are written bottom-up and each
//! directory is finished before its parent. Memory is bounded by the depth of the tree times the
//! size of a directory's entries, plus the packs in flight.
//!
//! - **Incremental**: a file whose size, mtime, ctime and inode match the same path in the
//!   host's newest generation, and whose chunks the repository still indexes, is not read again.
//! - **Hardlinks**: files with `st_nlink > 1` are grouped by (device, inode); each group is read
//!   once and gets a group number; the generation's hardlink table records how many entries
//!   each group has within the generation (the true link count to show in the mount).
//! - **Bad input**: an entry that cannot be read or vanishes is reported through the callback
//!   with its path, recorded in the manifest and left out; the generation still completes and
//!   the report says how many were skipped. A missing source or a repository problem is an
//!   error before anything is written.
//! - **Commit**: packs, then the index file, then the manifest with create-if-absent (see
//!   `writer` and `manifest`).
//! - **A stream** ([`Stream`], `backtree ingest --stdin NAME`) becomes one regular file at the
//!   generation's root, beside the sources' own names; it is read while the sources are walked,
//!   through the same pipeline as a large file ([`read::read_stream`]), and always read whole
//!   (there is nothing to compare with the previous generation). A stream that cannot be read
//!   fails the ingest: unlike a file, it cannot be left out.
//! - **A tar archive** ([`TarSource`], `backtree ingest --tar FILE|-`) becomes the generation's
//!   whole tree instead of sources: see [`tar`](self::tar) for how members become entries.

pub mod gzip;
mod meta;
pub mod read;
pub mod tar;
pub mod writer;

pub use self::tar::TarSource;

pub use meta::{kind_of as meta_kind, xattrs as meta_xattrs};

use crate::chunklist::WrittenList;
use crate::claim;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::compact::{self, Mode, Policy};
use crate::index::dedup::Dedup;

use crate::manifest::{
    candidate_name, check_host, generation_name, Manifest, SkippedPath, Stats, MANIFEST_VERSION,
};
use crate::repo::Repository;
use crate::tree::{
    encode_links, paginate, ChunkList, Entry, GzipOrigin, Kind, PageRef, Time, Tree, INLINE_CHUNKS,
};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use rayon::prelude::*;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::runtime::Handle;
use writer::BlobWriter;

/// What to ingest and how to name it.
#[derive(Debug, Clone, Default)]
pub struct IngestOptions {
    pub host: String,
    /// One directory becomes the generation's root; several paths (or one non-directory)
    /// appear at the root under their own names.
    pub sources: Vec<PathBuf>,
    /// The time the generation represents; default: now.
    pub time: Option<DateTime<Utc>>,
    pub label: Option<String>,
    /// Glob patterns. A pattern without `/` matches an entry's name at any depth; a pattern with
    /// `/` matches the path relative to the source root (`**` crosses directories).
    pub excludes: Vec<String>,
    /// Directories never to enter, by (device, inode): the repository itself when it lies inside
    /// a source.
    pub skip_dirs: Vec<(u64, u64)>,
    /// New pack bytes between index checkpoints (default [`writer::CHECKPOINT_BYTES`]).
    pub checkpoint_bytes: Option<u64>,
    /// Worker threads reading and compressing (default [`default_threads`]).
    pub threads: Option<usize>,
    /// Read block devices and fifos named in `sources` (not those found inside a directory) to
    /// their end and store them as regular files, zero runs as holes (`--read-special`, see
    /// [`read::special_source`]).
    pub read_special: bool,
    /// Store `*.gz` / `*.tgz` regular files that hold gzip data decompressed, with a recipe
    /// that recreates the original (see [`gzip`](self::gzip)).
    pub gunzip: bool,
    /// Plaintext per preflate segment (default [`gzip::SEGMENT_PLAIN`]).
    pub gzip_segment: Option<usize>,
    /// Do not compact the index after the commit, even when due (`--no-compact`).
    pub no_compact: bool,
    /// Lease time of the session (default [`crate::lease::LEASE_TIME`]; tests shorten it).
    pub lease_time: Option<std::time::Duration>,
}

/// The default mode of a stream's file: readable by its owner only. A stream is typically a
/// database dump or a VM image (password hashes, personal data, keys), and nothing says who else
/// may read it; widen it with [`Stream::mode`] when others must.
pub const STREAM_MODE: u32 = 0o600;

/// One stream stored as one regular file at the generation's root (`--stdin NAME`).
pub struct Stream<'a> {
    /// The file's name at the root (see [`check_stream_name`]).
    pub name: String,
    /// Where the bytes come from, for messages and the manifest's sources: `stdin`.
    pub origin: String,
    /// The bytes; read once, to the end.
    pub reader: Box<dyn Read + Send + 'a>,
    /// Permission bits, setuid/setgid/sticky included (default [`STREAM_MODE`]).
    pub mode: u32,
    /// Owner and group ids; `None`: this process's effective ids.
    pub owner: Option<(u32, u32)>,
    /// The file's mtime (and atime); `None`: the generation's time.
    pub mtime: Option<DateTime<Utc>>,
    /// Store an empty file when the stream gives no data, instead of failing.
    pub allow_empty: bool,
    /// Store gzip data (it starts with the gzip magic) decompressed, under the name without
    /// `.gz`, with a recipe that recreates the original (default: on).
    pub gunzip: bool,
}

impl<'a> Stream<'a> {
    /// A stream named `name` with the defaults: mode [`STREAM_MODE`], owned by this process,
    /// dated at the generation's time, refused when empty.
    pub fn new(
        name: impl Into<String>,
        origin: impl Into<String>,
        reader: Box<dyn Read + Send + 'a>,
    ) -> Stream<'a> {
        Stream {
            name: name.into(),
            origin: origin.into(),
            reader,
            mode: STREAM_MODE,
            owner: None,
            mtime: None,
            allow_empty: false,
            gunzip: true,
        }
    }
}

impl std::fmt::Debug for Stream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("name", &self.name)
            .field("origin", &self.origin)
            .field("mode", &format_args!("{:o}", self.mode))
            .field("owner", &self.owner)
            .field("mtime", &self.mtime)
            .field("allow_empty", &self.allow_empty)
            .field("gunzip", &self.gunzip)
            .finish_non_exhaustive()
    }
}

/// Whether `name` can name a stream's file at the generation's root: one path component, not
/// `.` or `..`, no NUL, at most 255 bytes (the longest name Linux shows in a directory).
/// Returns why not.
pub fn check_stream_name(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        Err("a file name cannot be empty")
    } else if name == "." || name == ".." {
        Err("`.` and `..` are not file names")
    } else if name.contains('/') {
        Err("it must be one file name at the generation's root, without '/'")
    } else if name.contains('\0') {
        Err("a file name cannot contain a NUL byte")
    } else if name.len() > 255 {
        Err("a file name is at most 255 bytes")
    } else {
        Ok(())
    }
}

/// Four times the cores: most of a walk is waiting, for `lstat`, `listxattr` and the cold read
/// of a small file, and the more such requests are in flight the better the disk queue is used
/// (a cold ingest of the benchmark's 54 591 files under /usr took 7.3–7.6 s with 2 threads per
/// core and 6.2–6.3 s with 4). Memory stays bounded because only [`cores`] files larger than a
/// batch are read at once (see [`Walker::large`]).
pub fn default_threads() -> usize {
    cores() * 4
}

/// The cores this process may use.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Live counters for a progress display.
#[derive(Debug, Default)]
pub struct Progress {
    pub files: AtomicU64,
    pub bytes: AtomicU64,
    pub skipped: AtomicU64,
}

/// The outcome of a successful ingest.
#[derive(Debug, Clone)]
pub struct IngestReport {
    pub manifest: Manifest,
    /// Every skipped path (the manifest keeps the first 100).
    pub skipped: Vec<SkippedPath>,
    pub seconds: f64,
    /// What deduplication downloaded of the index ([`IndexStats::summary`]).
    pub index: String,
    /// The index compaction run after the commit, if one was due; its error, if it failed
    /// (the generation is committed either way).
    pub compaction: Option<std::result::Result<compact::Outcome, String>>,
}

/// Called for each skipped path as it happens.
pub type OnSkip<'a> = &'a (dyn Fn(&SkippedPath) + Sync);

/// Ingests from async code: runs [`ingest`] on a blocking thread.
pub async fn ingest_async(repo: Arc<Repository>, opts: IngestOptions) -> Result<IngestReport> {
    let handle = Handle::current();
    tokio::task::spawn_blocking(move || {
        ingest(&repo, &handle, &opts, &Progress::default(), &|_| {})
    })
    .await
    .map_err(|e| Error::TaskFailed {
        what: "ingest",
        reason: e.to_string(),
    })?
}

/// Ingests `opts.sources` as a new generation of `opts.host`. Must run outside the async
/// runtime's worker threads (it blocks on `handle`).
pub fn ingest(
    repo: &Repository,
    handle: &Handle,
    opts: &IngestOptions,
    progress: &Progress,
    on_skip: OnSkip<'_>,
) -> Result<IngestReport> {
    ingest_with(repo, handle, opts, None, progress, on_skip)
}

/// [`ingest`], plus `stream` (if any) stored as one regular file at the generation's root. With
/// a stream, every source appears at the root under its own name, even a single directory; with
/// a stream alone, `opts.sources` may be empty and the root holds just the stream's file.
pub fn ingest_with(
    repo: &Repository,
    handle: &Handle,
    opts: &IngestOptions,
    stream: Option<Stream<'_>>,
    progress: &Progress,
    on_skip: OnSkip<'_>,
) -> Result<IngestReport> {
    run(repo, handle, opts, stream, None, progress, on_skip)
}

/// Ingests a tar archive as a new generation of `opts.host`: the archive's root becomes the
/// generation's root (see [`tar`](self::tar)). `opts.sources` must be empty; excludes apply to
/// the members' paths. Must run outside the async runtime's worker threads.
pub fn ingest_tar(
    repo: &Repository,
    handle: &Handle,
    opts: &IngestOptions,
    tar: TarSource<'_>,
    progress: &Progress,
    on_skip: OnSkip<'_>,
) -> Result<IngestReport> {
    if !opts.sources.is_empty() {
        return Err(Error::TarUnsupported {
            archive: tar.origin,
            reason: "a tar archive is the whole generation; it cannot be combined with paths"
                .into(),
        });
    }
    run(repo, handle, opts, None, Some(tar), progress, on_skip)
}

fn run(
    repo: &Repository,
    handle: &Handle,
    opts: &IngestOptions,
    stream: Option<Stream<'_>>,
    tar: Option<TarSource<'_>>,
    progress: &Progress,
    on_skip: OnSkip<'_>,
) -> Result<IngestReport> {
    let started = Instant::now();
    let started_at = Utc::now();
    check_host(&opts.host)?;
    if let Some(s) = &stream {
        check_stream_name(&s.name).map_err(|reason| Error::InvalidStreamName {
            name: s.name.clone(),
            reason,
        })?;
    }
    let excludes = Excludes::new(&opts.excludes)?;
    let mut sources: Vec<String> = opts
        .sources
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    if let Some(s) = &stream {
        sources.push(format!("{}:{}", s.origin, s.name));
    }
    // A gzip stream is stored under its name without `.gz`: known before the layout is checked.
    let (stream, stream_gz) = match stream {
        Some(s) if s.gunzip => {
            let (s, gz) = sniff_gzip(s)?;
            (Some(s), gz)
        }
        other => (other, None),
    };
    let layout = match &tar {
        Some(_) => Layout::Tar,
        None => Layout::of(&opts.sources, stream.as_ref())?,
    };
    let time = opts.time.unwrap_or(started_at);
    if let Some(t) = &tar {
        sources.push(format!("tar:{}", t.origin));
    }

    let store = repo.store().clone();
    // The session's lease, held until the commit (docs/concurrency.md): taken before anything
    // is stored, so a garbage collection sees this writer from its first pack on.
    let session = hex::encode(rand::random::<[u8; 16]>());
    let lease = crate::lease::LeaseGuard::new(
        handle.block_on(crate::lease::Lease::take(
            store.clone(),
            &session,
            &opts.host,
            opts.lease_time.unwrap_or(crate::lease::LEASE_TIME),
            handle,
        ))?,
        handle.clone(),
    );
    let known = handle.block_on(Dedup::load(repo.index_handle()))?;
    let known_stats = known.index().stats_handle();
    let parent = handle.block_on(previous(repo, &opts.host));
    let cfg = repo.config();
    let w = Arc::new(
        BlobWriter::new(
            store.clone(),
            handle.clone(),
            cfg.compression.level,
            cfg.pack_size as usize,
            known,
            opts.checkpoint_bytes.unwrap_or(writer::CHECKPOINT_BYTES),
        )
        .with_list_page(cfg.list_page()),
    );
    let walker = Walker {
        repo,
        handle,
        w: &w,
        large: tokio::sync::Semaphore::new(cores()),
        hashers: rayon::ThreadPoolBuilder::new()
            .num_threads(cores())
            .thread_name(|i| format!("backtree-hash-{i}"))
            .build()
            .map_err(Error::ThreadPool)?,
        excludes,
        skip_dirs: opts.skip_dirs.clone(),
        names: meta::Names::default(),
        links: Mutex::new(Links::default()),
        stats: Counters::default(),
        skipped: Mutex::new(Vec::new()),
        progress,
        on_skip,
        gunzip: opts.gunzip,
        gzip_segment: opts.gzip_segment,
    };

    let parent_root = parent.as_ref().and_then(|m| m.root.tree);
    // A pool of our own: the walk recurses inside rayon tasks, so give its threads deep stacks.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.unwrap_or_else(default_threads))
        .stack_size(32 << 20)
        .thread_name(|i| format!("backtree-ingest-{i}"))
        .build()
        .map_err(Error::ThreadPool)?;
    let stream_name = stream.as_ref().map(|s| s.name.clone());
    let root = pool.install(|| -> Result<Entry> {
        Ok(match &layout {
            Layout::Tar => match tar {
                Some(t) => self::tar::root(&walker, t, &time)?,
                None => return Err(Error::NoSources),
            },
            Layout::Dir(path) => {
                let m = std::fs::symlink_metadata(path).map_err(|e| Error::io(path, e))?;
                let xattrs = meta::xattrs(path).map_err(|e| Error::io(path, e))?;
                let mut root = meta::entry(b"", &m, &walker.names, xattrs);
                root.tree = Some(walker.dir(path, b"", parent_root, true)?);
                root
            }
            Layout::Many(items) => {
                // The stream is read while the sources are walked: its producer (a dump, an
                // export) need not wait for the walk, nor the walk for the producer.
                let (from_stream, from_paths) = rayon::join(
                    || {
                        stream
                            .map(|s| walker.stream_entry(s, &time, stream_gz.clone()))
                            .transpose()
                    },
                    || -> Result<Vec<Entry>> {
                        let mut prev = match parent_root {
                            Some(t) => walker.prev_entries(Some(t)),
                            None => HashMap::new(),
                        };
                        let mut entries = Vec::new();
                        let mut taken: Vec<&[u8]> =
                            items.iter().map(|(n, _)| n.as_bytes()).collect();
                        if let Some(s) = &stream_name {
                            taken.push(s.as_bytes());
                        }
                        let plan = walker.plan(taken.iter().copied());
                        for (i, (name, path)) in items.iter().enumerate() {
                            let m = match std::fs::symlink_metadata(path) {
                                Ok(m) => m,
                                Err(e) => return Err(Error::io(path, e)),
                            };
                            let special = opts.read_special.then(|| read::special_source(path, &m));
                            if let Some((real, m)) = special.flatten() {
                                prev.remove(name.as_bytes());
                                entries.push(walker.special_entry(path, &real, name, &m)?);
                                continue;
                            }
                            let gz = plan.get(&i).filter(|_| gunzippable(&m)).cloned();
                            let p = gz
                                .as_ref()
                                .and_then(|g| prev.remove(g.as_slice()))
                                .or_else(|| prev.remove(name.as_bytes()));
                            if let Some(e) = walker.entry(
                                path,
                                name.as_bytes(),
                                name.as_bytes(),
                                m,
                                p.as_ref(),
                                gz,
                            )? {
                                entries.push(e);
                            }
                        }
                        Ok(entries)
                    },
                );
                let stream_entry = from_stream?;
                let mut entries = from_paths?;
                walker.resolve_hardlinks(&mut entries);
                entries.extend(stream_entry);
                entries.sort_by(|a, b| a.name.cmp(&b.name));
                let t = Time(time.timestamp(), time.timestamp_subsec_nanos());
                Entry {
                    tree: Some(walker.store_dir(entries)?),
                    ..Entry::made_dir(b"", t)
                }
            }
        })
    })?;

    let links_id = {
        let links = lock(&walker.links);
        let mut table: Vec<(u64, u32)> = links.counts.iter().map(|(g, c)| (*g, *c)).collect();
        table.sort_unstable();
        if table.is_empty() {
            None
        } else {
            Some(w.store_tree(&encode_links(&table))?)
        }
    };
    w.finish()?;

    let mut skipped = std::mem::take(&mut *lock(&walker.skipped));
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    let c = &walker.stats;
    let ws = &w.stats;
    let stats = Stats {
        files: c.files.load(Ordering::Relaxed),
        dirs: c.dirs.load(Ordering::Relaxed),
        symlinks: c.symlinks.load(Ordering::Relaxed),
        others: c.others.load(Ordering::Relaxed),
        logical_bytes: c.logical.load(Ordering::Relaxed),
        read_bytes: c.read.load(Ordering::Relaxed),
        unchanged_files: c.unchanged.load(Ordering::Relaxed),
        new_raw_bytes: ws.new_raw_bytes.load(Ordering::Relaxed),
        new_stored_bytes: ws.new_stored_bytes.load(Ordering::Relaxed),
        new_chunks: ws.new_chunks.load(Ordering::Relaxed),
        skipped: skipped.len() as u64,
    };
    let mut manifest = Manifest {
        version: MANIFEST_VERSION,
        host: opts.host.clone(),
        name: String::new(),
        time: time.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        started: started_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        finished: String::new(),
        label: opts.label.clone(),
        root,
        links: links_id,
        sources,
        parent: parent.map(|m| m.name),
        stats,
        errors: skipped.iter().take(100).cloned().collect(),
        session: session.clone(),
        tool: format!("backtree {}", env!("CARGO_PKG_VERSION")),
    };
    // A writer paused past its lease commits nothing: data it relies on may be gone.
    lease.check()?;
    handle.block_on(commit(repo, &mut manifest, &time))?;
    drop(lease);
    let index = known_stats.summary();
    // Compaction after the commit: it never delays or endangers the generation.
    let compaction = (!opts.no_compact).then(|| {
        let cache = repo.index().cache();
        handle
            .block_on(compact::run(
                &store,
                &Policy::from_env(),
                Mode::Auto,
                false,
                cache.as_ref(),
                None,
            ))
            .map_err(|e| e.to_string())
    });
    Ok(IngestReport {
        manifest,
        skipped,
        seconds: started.elapsed().as_secs_f64(),
        index,
        compaction,
    })
}

/// Writes the manifest under the first free name for its time: the commit point.
///
/// On a store that refuses to overwrite (create-if-absent honored, recorded in the config at
/// `init`) the conditional write alone decides who gets a name. Otherwise (Garage ignores
/// `If-None-Match`) a writer first *claims* the name, see [`crate::claim`]: two writers can then
/// never write the same manifest key, so neither generation is lost.
pub(crate) async fn commit(
    repo: &Repository,
    m: &mut Manifest,
    time: &DateTime<Utc>,
) -> Result<()> {
    let base = generation_name(time);
    let existing = repo.generations(&m.host).await?;
    let conditional =
        repo.config().store_create_if_absent && repo.store().honors_create_if_absent();
    let session = claim::session_id();
    // Never below a name of the same second that exists: a generation forgotten a moment ago
    // (`forget --keep-last` between two ingests of one second) must not have its name taken
    // again, since readers treat a generation's name as its identity (a mount keeps what it
    // read of `host/name`, the kernel caches its files by inode numbers derived from it).
    let mut n = (existing.iter())
        .filter_map(|e| same_second_suffix(e, &base))
        .max()
        .map_or(1, |k| k + 1);
    loop {
        if n > 10_000 {
            return Err(Error::NoFreeName { base });
        }
        let name = candidate_name(&base, n);
        n += 1;
        if existing.contains(&name) {
            continue;
        }
        m.name = name.clone();
        m.finished = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let key = Manifest::key(&m.host, &name);
        let claimed = if conditional {
            None
        } else {
            match claim::claim(repo.store(), &key, &session).await? {
                Some(c) => Some(c),
                None => {
                    // Lost to another writer: back off a little, so that two writers that
                    // saw each other's claims do not collide again on the next name.
                    claim::back_off().await;
                    continue;
                }
            }
        };
        let stored = repo
            .store()
            .put_if_absent(&key, Bytes::from(m.to_json()))
            .await;
        if let Some(c) = claimed {
            // Only tidiness: a claim left behind makes later writers skip its name.
            let _ = c.release().await;
        }
        if stored? {
            return Ok(());
        }
    }
}

/// `n` if `name` is [`candidate_name`]`(base, n)`.
fn same_second_suffix(name: &str, base: &str) -> Option<u32> {
    let rest = name.strip_prefix(base)?;
    if rest.is_empty() {
        return Some(1);
    }
    rest.strip_prefix('-')?.parse().ok().filter(|&k| k >= 2)
}

/// The host's newest generation, if it can be read (otherwise the ingest simply reads all).
async fn previous(repo: &Repository, host: &str) -> Option<Manifest> {
    let name = repo.latest(host).await.ok()??;
    match repo.manifest(host, &name).await {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(
                "cannot read previous generation {host}/{name}, reading everything: {e}"
            );
            None
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How the sources map onto the generation's root.
enum Layout {
    /// A tar archive's tree.
    Tar,
    Dir(PathBuf),
    Many(Vec<(std::ffi::OsString, PathBuf)>),
}

impl Layout {
    /// The layout of `sources` and, beside them, `stream`; checked before anything is read.
    fn of(sources: &[PathBuf], stream: Option<&Stream<'_>>) -> Result<Layout> {
        if sources.is_empty() && stream.is_none() {
            return Err(Error::NoSources);
        }
        let mut metas = Vec::new();
        for s in sources {
            match std::fs::symlink_metadata(s) {
                Ok(m) => metas.push(m),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Error::SourceMissing { path: s.clone() })
                }
                Err(e) => return Err(Error::io(s, e)),
            }
        }
        if sources.len() == 1 && metas[0].is_dir() && stream.is_none() {
            return Ok(Layout::Dir(sources[0].clone()));
        }
        let mut seen: HashMap<std::ffi::OsString, PathBuf> = HashMap::new();
        let mut items = Vec::new();
        for s in sources {
            // The name as given (a symlink's own name), else where it leads (`.`, `..`).
            let name = (s.file_name().map(|n| n.to_owned()))
                .or_else(|| {
                    std::fs::canonicalize(s)
                        .ok()?
                        .file_name()
                        .map(|n| n.to_owned())
                })
                .ok_or_else(|| Error::SourceUnnamed { path: s.clone() })?;
            if let Some(first) = seen.get(&name) {
                return Err(Error::NameClash {
                    name: name.to_string_lossy().into_owned(),
                    first: first.clone(),
                    second: s.clone(),
                });
            }
            seen.insert(name.clone(), s.clone());
            items.push((name, s.clone()));
        }
        if let Some(s) = stream {
            if let Some(first) = seen.get(OsStr::new(&s.name)) {
                return Err(Error::NameClash {
                    name: s.name.clone(),
                    first: first.clone(),
                    second: PathBuf::from(&s.origin),
                });
            }
        }
        Ok(Layout::Many(items))
    }
}

/// Compiled exclude patterns.
struct Excludes {
    names: GlobSet,
    paths: GlobSet,
}

impl Excludes {
    fn new(patterns: &[String]) -> Result<Excludes> {
        let mut names = GlobSetBuilder::new();
        let mut paths = GlobSetBuilder::new();
        for p in patterns {
            let pat = p.trim_start_matches('/');
            let glob = GlobBuilder::new(pat)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| Error::InvalidExclude {
                    pattern: p.clone(),
                    reason: e.kind().to_string(),
                })?;
            if p.contains('/') {
                paths.add(glob);
            } else {
                names.add(glob);
            }
        }
        let build = |b: GlobSetBuilder| {
            b.build().map_err(|e| Error::InvalidExclude {
                pattern: patterns.join(" "),
                reason: e.to_string(),
            })
        };
        Ok(Excludes {
            names: build(names)?,
            paths: build(paths)?,
        })
    }

    fn excluded(&self, name: &[u8], rel: &[u8]) -> bool {
        self.names.is_match(Path::new(OsStr::from_bytes(name)))
            || self.paths.is_match(Path::new(OsStr::from_bytes(rel)))
    }
}

#[derive(Default)]
struct Counters {
    files: AtomicU64,
    dirs: AtomicU64,
    symlinks: AtomicU64,
    others: AtomicU64,
    logical: AtomicU64,
    read: AtomicU64,
    unchanged: AtomicU64,
}

/// A regular file's content fields: inline list, list blob, hole bytes.
type Content = (Option<ChunkList>, Option<Id>, Option<u64>);

/// Hardlink bookkeeping.
#[derive(Default)]
struct Links {
    /// (device, inode) → group.
    groups: HashMap<(u64, u64), u64>,
    /// Groups in use.
    used: std::collections::HashSet<u64>,
    /// group → entries seen in this generation.
    counts: HashMap<u64, u32>,
    /// group → content of the first member read.
    content: HashMap<u64, Content>,
}

impl Links {
    /// The group of a source inode. The group number is the inode number itself, so it is the
    /// same in every generation whatever order files are read in, and directories holding
    /// hardlinks stay identical (and deduplicated) when nothing changed. Only when two sources
    /// on different filesystems share an inode number does a later one get a shifted number.
    fn group(&mut self, dev: u64, ino: u64) -> u64 {
        if let Some(g) = self.groups.get(&(dev, ino)) {
            return *g;
        }
        let mut g = ino;
        while !self.used.insert(g) {
            g = g.wrapping_add(1 << 56);
        }
        self.groups.insert((dev, ino), g);
        g
    }
}

struct Walker<'a> {
    repo: &'a Repository,
    handle: &'a Handle,
    w: &'a Arc<BlobWriter>,
    /// Hashes and compresses the chunks of files larger than one batch (see
    /// [`read::read_file`]); its threads never block, so walk threads may wait for them.
    hashers: rayon::ThreadPool,
    /// Files larger than a batch being read, at most one per core. Each holds two or three
    /// batches of memory; the hashers can keep only that many busy anyway.
    large: tokio::sync::Semaphore,
    excludes: Excludes,
    skip_dirs: Vec<(u64, u64)>,
    names: meta::Names,
    links: Mutex<Links>,
    stats: Counters,
    skipped: Mutex<Vec<SkippedPath>>,
    progress: &'a Progress,
    on_skip: OnSkip<'a>,
    /// `--gunzip`: gzip files are stored decompressed.
    gunzip: bool,
    gzip_segment: Option<usize>,
}

/// Whether a file may be stored decompressed: a regular file without other hard links (a
/// hardlinked file is stored as it is: its links share one content, and a link's name may not
/// end in `.gz`).
fn gunzippable(m: &std::fs::Metadata) -> bool {
    m.file_type().is_file() && m.nlink() == 1
}

/// Reads the first bytes of a stream to see whether it is gzip; returns the stream (those
/// bytes put back in front, its name the one to store it under) and, for gzip, its original
/// name.
fn sniff_gzip(mut s: Stream<'_>) -> Result<(Stream<'_>, Option<String>)> {
    let mut head = Vec::with_capacity(2);
    let read = (&mut s.reader).take(2).read_to_end(&mut head);
    // One more read for a pipe that gave a single byte.
    let read = match read {
        Ok(1) => (&mut s.reader).take(1).read_to_end(&mut head),
        r => r,
    };
    if let Err(source) = read {
        return Err(Error::StreamRead {
            origin: s.origin,
            name: s.name,
            source,
        });
    }
    let is_gz = head == gzip::MAGIC;
    s.reader = Box::new(std::io::Cursor::new(head).chain(s.reader));
    if !is_gz {
        return Ok((s, None));
    }
    let original = s.name.clone();
    if let Some(n) = gzip::stripped_name(original.as_bytes()) {
        // `.gz` stripped from a valid name leaves a valid name (UTF-8 too: ASCII suffix).
        s.name = String::from_utf8(n).unwrap_or(original.clone());
    }
    Ok((s, Some(original)))
}

/// What came of reading gzip data.
enum Gunzipped {
    /// Decompressed content, and what recreates the original (its `name` left empty).
    Stored(WrittenList, GzipOrigin),
    /// preflate could recreate none of it: the original bytes as they were.
    Raw(WrittenList),
}

fn join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    if rel.is_empty() {
        name.to_vec()
    } else {
        [rel, b"/", name].concat()
    }
}

impl Walker<'_> {
    /// Which of a directory's names are stored decompressed (none without `--gunzip`).
    fn plan<'n>(&self, names: impl IntoIterator<Item = &'n [u8]>) -> HashMap<usize, Vec<u8>> {
        if self.gunzip {
            gzip::plan_names(&names.into_iter().collect::<Vec<_>>())
        } else {
            HashMap::new()
        }
    }

    /// Reads gzip data: its plaintext through the chunker, its recipe from the worker, then the
    /// recipe through the chunker too. Errors are the reader's (a [`gzip::GzipError`] inside
    /// for bad gzip data) or the repository's.
    fn gunzip(&self, reader: Box<dyn Read + Send + '_>) -> std::io::Result<Gunzipped> {
        let chunker = self.repo.config().chunker;
        let (g, worker) = gzip::start(reader, self.gzip_segment)?;
        let content = read::read_stream(Box::new(g), &chunker, self.w, &self.hashers);
        let joined = worker.join();
        let (list, _) = content?;
        let (built, original) = joined?;
        let original =
            original.ok_or_else(|| std::io::Error::other("gzip reader stopped early"))?;
        if built.segments == 0 {
            let raw = gzip::Literals::new(built.file)?;
            let (list, _) = read::read_stream(Box::new(raw), &chunker, self.w, &self.hashers)?;
            if list.size() != original.size {
                return Err(std::io::Error::other("gzip literals differ from the input"));
            }
            return Ok(Gunzipped::Raw(list));
        }
        tracing::debug!(
            "gzip: {} deflate streams, {} segments, {} kept compressed; recipe {} bytes",
            built.streams,
            built.segments,
            built.fallbacks,
            built.len
        );
        let small = gzip::recipe_chunker(&chunker);
        let (recipe, _) = read::read_stream(Box::new(built.file), &small, self.w, &self.hashers)?;
        let (chunks, chunk_list) = self.list_fields(recipe).map_err(std::io::Error::other)?;
        Ok(Gunzipped::Stored(
            list,
            GzipOrigin {
                name: Vec::new(),
                size: original.size,
                hash: original.hash,
                recipe_size: built.len,
                chunks,
                chunk_list,
            },
        ))
    }

    /// Reads a gzip file (`--gunzip`) into its entry: decompressed under `stored` with its
    /// origin, or as it is when it is not gzip or cannot be recreated (with a warning).
    /// Returns false if the file was skipped.
    fn read_gzip_file(
        &self,
        path: &Path,
        e: &mut Entry,
        m: &std::fs::Metadata,
        prev: Option<&Entry>,
        stored: Vec<u8>,
    ) -> Result<bool> {
        // Unchanged since the previous generation: the source's stat against the original's.
        if let Some(p) = prev.filter(|p| {
            p.kind == Kind::File
                && p.mtime == e.mtime
                && p.ctime == e.ctime
                && p.ino == e.ino
                && p.gzip
                    .as_ref()
                    .is_some_and(|g| g.size == e.size && g.name == e.name)
        }) {
            let known = |c: &Option<ChunkList>, l: &Option<Id>| {
                c.as_ref()
                    .is_none_or(|c| c.0.iter().all(|r| r.id.is_none_or(|id| self.w.known(&id))))
                    && l.is_none_or(|id| self.w.known(&id))
            };
            if let Some(g) = p
                .gzip
                .as_ref()
                .filter(|g| known(&p.chunks, &p.chunk_list) && known(&g.chunks, &g.chunk_list))
            {
                e.name = stored;
                e.size = p.size;
                e.chunks = p.chunks.clone();
                e.chunk_list = p.chunk_list;
                e.holes = p.holes;
                e.gzip = Some(g.clone());
                self.count_file(e, 0, true);
                return Ok(true);
            }
        }
        // Unchanged and stored as it was last time (not gzip, or not valid gzip): the same.
        if let Some(p) = prev.filter(|p| p.name == e.name && p.gzip.is_none() && unchanged(p, e)) {
            return self.read_content(path, e, m, Some(p));
        }
        let mut f = match read::open_noatime(path) {
            Ok(f) => f,
            Err(err) => {
                self.skip(path, err);
                return Ok(false);
            }
        };
        let mut head = Vec::with_capacity(2);
        if let Err(err) = (&mut f).take(2).read_to_end(&mut head) {
            self.skip(path, err);
            return Ok(false);
        }
        if head != gzip::MAGIC {
            tracing::warn!(
                "{}: not gzip data (no gzip magic); stored as it is",
                path.display()
            );
            return self.read_content(path, e, m, prev.filter(|p| p.name == e.name));
        }
        let mut f = match read::open_noatime(path) {
            Ok(f) => f,
            Err(err) => {
                self.skip(path, err);
                return Ok(false);
            }
        };
        // The plaintext's length is unknown: a large file (see `read_content`).
        let permit = self.handle.block_on(self.large.acquire()).ok();
        let read = Box::new(Counted {
            inner: std::io::BufReader::with_capacity(1 << 20, &mut f),
            bytes: &self.progress.bytes,
        });
        let result = self.gunzip(read);
        drop(permit);
        match result {
            Ok(Gunzipped::Stored(list, mut origin)) => {
                origin.name = std::mem::replace(&mut e.name, stored);
                e.size = list.size();
                e.holes = None;
                self.count_file(e, origin.size, false);
                self.set_chunks(e, list)?;
                e.gzip = Some(origin);
                Ok(true)
            }
            Ok(Gunzipped::Raw(list)) => {
                tracing::warn!(
                    "{}: its gzip data cannot be recreated exactly from the decompressed                      content; stored as it is",
                    path.display()
                );
                e.size = list.size();
                e.holes = None;
                self.count_file(e, list.size(), false);
                self.set_chunks(e, list)?;
                Ok(true)
            }
            Err(err) => {
                self.w.check()?;
                if let Some(ge) = gzip::gzip_error(&err) {
                    // The file is what it is: keep it, as it is.
                    tracing::warn!(
                        "{}: not valid gzip data: {ge}; stored as it is",
                        path.display()
                    );
                    return self.read_content(path, e, m, prev.filter(|p| p.name == e.name));
                }
                self.skip(path, err);
                Ok(false)
            }
        }
    }

    fn skip(&self, path: &Path, err: impl std::fmt::Display) {
        let s = SkippedPath {
            path: path.display().to_string(),
            error: err.to_string(),
        };
        (self.on_skip)(&s);
        self.progress.skipped.fetch_add(1, Ordering::Relaxed);
        lock(&self.skipped).push(s);
    }

    /// The previous generation's entries of a directory, by name.
    fn prev_entries(&self, tree: Option<Id>) -> HashMap<Vec<u8>, Entry> {
        let Some(t) = tree else { return HashMap::new() };
        match self.handle.block_on(self.repo.dir_entries(&t)) {
            Ok(es) => es.into_iter().map(|e| (e.name.clone(), e)).collect(),
            Err(e) => {
                tracing::warn!(
                    "previous generation's directory {t} unreadable, reading its files again: {e}"
                );
                HashMap::new()
            }
        }
    }

    /// Walks one directory and stores it; returns its tree id. `is_root`: errors reading the
    /// directory itself are fatal (the source is unreadable) rather than a skipped entry.
    fn dir(&self, path: &Path, rel: &[u8], prev: Option<Id>, is_root: bool) -> Result<Id> {
        let mut names: Vec<std::ffi::OsString> = Vec::new();
        for item in read::list_dir(path).map_err(|e| Error::io(path, e))? {
            match item {
                Ok(n) => names.push(n),
                Err(e) if is_root => return Err(Error::io(path, e)),
                Err(e) => {
                    self.skip(path, format!("error while listing: {e}"));
                    break;
                }
            }
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let mut prev = self.prev_entries(prev);
        self.stats.dirs.fetch_add(1, Ordering::Relaxed);
        let plan = self.plan(names.iter().map(|n| n.as_bytes()));

        // lstat everything first; then read regular files in parallel; then recurse.
        let mut items = Vec::with_capacity(names.len());
        for (i, name) in names.into_iter().enumerate() {
            let child = path.join(&name);
            let crel = join(rel, name.as_bytes());
            if self.excludes.excluded(name.as_bytes(), &crel) {
                continue;
            }
            match std::fs::symlink_metadata(&child) {
                Ok(m) => {
                    // A gzip file is looked up in the previous generation by its stored name.
                    let gz = plan.get(&i).filter(|_| gunzippable(&m)).cloned();
                    let p = gz
                        .as_ref()
                        .and_then(|g| prev.remove(g.as_slice()))
                        .or_else(|| prev.remove(name.as_bytes()));
                    items.push((name, child, crel, m, p, gz));
                }
                Err(e) => self.skip(&child, e),
            }
        }
        // Files and subdirectories alike, several at once: the trees are content-addressed, so
        // the result does not depend on the order in which work finishes.
        let mut entries: Vec<Entry> = items
            .par_iter()
            .map(|(name, child, crel, m, p, gz)| {
                self.entry(
                    child,
                    name.as_bytes(),
                    crel,
                    m.clone(),
                    p.as_ref(),
                    gz.clone(),
                )
            })
            .collect::<Result<Vec<Option<Entry>>>>()?
            .into_iter()
            .flatten()
            .collect();
        self.w.maybe_checkpoint()?;
        self.resolve_hardlinks(&mut entries);
        self.store_dir(entries)
    }

    /// Builds the entry for one path (any type); `None` if it was skipped. `gz`: the name to
    /// store a gzip file under, decompressed (see [`Walker::plan`]).
    fn entry(
        &self,
        path: &Path,
        name: &[u8],
        rel: &[u8],
        m: std::fs::Metadata,
        prev: Option<&Entry>,
        gz: Option<Vec<u8>>,
    ) -> Result<Option<Entry>> {
        let xattrs = match meta::xattrs(path) {
            Ok(x) => x,
            Err(e) => {
                self.skip(path, format!("cannot read extended attributes: {e}"));
                return Ok(None);
            }
        };
        let mut e = meta::entry(name, &m, &self.names, xattrs);
        match e.kind {
            Kind::Dir => {
                if self.skip_dirs.contains(&(m.dev(), m.ino())) {
                    return Ok(None);
                }
                let prev_tree = prev.filter(|p| p.kind == Kind::Dir).and_then(|p| p.tree);
                match self.dir(path, rel, prev_tree, false) {
                    Ok(t) => e.tree = Some(t),
                    Err(Error::Io { path, source }) => {
                        self.skip(&path, source);
                        return Ok(None);
                    }
                    Err(other) => return Err(other),
                }
            }
            Kind::Symlink => {
                match std::fs::read_link(path) {
                    Ok(t) => {
                        // Every readlink (ours included) may move a link's atime and no flag
                        // prevents it, and no tool restores it: record mtime instead, so an
                        // unchanged directory encodes identically in every generation.
                        e.atime = e.mtime;
                        e.size = t.as_os_str().len() as u64;
                        e.target = Some(t.as_os_str().as_bytes().to_vec());
                    }
                    Err(err) => {
                        self.skip(path, err);
                        return Ok(None);
                    }
                }
                self.stats.symlinks.fetch_add(1, Ordering::Relaxed);
            }
            Kind::File if gz.is_some() => {
                if !self.read_gzip_file(path, &mut e, &m, prev, gz.unwrap_or_default())? {
                    return Ok(None);
                }
            }
            Kind::File => {
                if m.nlink() > 1 {
                    let mut links = lock(&self.links);
                    let g = links.group(m.dev(), m.ino());
                    e.link = Some(g);
                    if let Some((c, l, h)) = links.content.get(&g) {
                        e.chunks = c.clone();
                        e.chunk_list = *l;
                        e.holes = *h;
                        drop(links);
                        self.count_file(&e, 0, false);
                        return Ok(Some(e));
                    }
                }
                if !self.read_content(path, &mut e, &m, prev)? {
                    return Ok(None);
                }
                if let Some(g) = e.link {
                    lock(&self.links).content.entry(g).or_insert((
                        e.chunks.clone(),
                        e.chunk_list,
                        e.holes,
                    ));
                }
            }
            _ => {
                self.stats.others.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(Some(e))
    }

    fn count_file(&self, e: &Entry, read: u64, unchanged: bool) {
        self.stats.files.fetch_add(1, Ordering::Relaxed);
        self.stats.logical.fetch_add(e.size, Ordering::Relaxed);
        self.stats.read.fetch_add(read, Ordering::Relaxed);
        if unchanged {
            self.stats.unchanged.fetch_add(1, Ordering::Relaxed);
        }
        self.progress.files.fetch_add(1, Ordering::Relaxed);
        self.progress.bytes.fetch_add(e.size, Ordering::Relaxed);
    }

    /// Fills a regular file's content, from the previous generation when unchanged. Returns
    /// false if the file was skipped.
    fn read_content(
        &self,
        path: &Path,
        e: &mut Entry,
        m: &std::fs::Metadata,
        prev: Option<&Entry>,
    ) -> Result<bool> {
        if let Some(p) = prev.filter(|p| unchanged(p, e)) {
            let inline_known = p
                .chunks
                .as_ref()
                .is_none_or(|c| c.0.iter().all(|r| r.id.is_none_or(|id| self.w.known(&id))));
            let list_known = p.chunk_list.is_none_or(|id| self.w.known(&id));
            if inline_known && list_known {
                e.chunks = p.chunks.clone();
                e.chunk_list = p.chunk_list;
                e.holes = p.holes;
                self.count_file(e, 0, true);
                return Ok(true);
            }
        }
        let chunker = self.repo.config().chunker;
        // While it holds a permit, a thread must never wait inside rayon (a join, a scope): a
        // waiting rayon thread runs other queued work, which may be another large file waiting
        // for a permit, and with every permit held that way the walk deadlocks. `read_file`
        // therefore reads a large file without rayon waits.
        let _large = if m.len() > read::BATCH_BYTES as u64 {
            // Closed never: the semaphore lives as long as the walker.
            self.handle.block_on(self.large.acquire()).ok()
        } else {
            None
        };
        match read::read_file(path, m.len(), &chunker, self.w, &self.hashers) {
            Ok((list, read)) => {
                e.size = list.size();
                e.holes = Some(list.hole_bytes()).filter(|&h| h > 0);
                self.count_file(e, read, false);
                self.set_chunks(e, list)?;
                Ok(true)
            }
            Err(err) => {
                // A failure of the repository side is fatal; a source read error skips the file.
                self.w.check()?;
                self.skip(path, err);
                Ok(false)
            }
        }
    }

    /// Records a file's chunk list in its entry: inline if short, else as a blob of its own
    /// (a paged list's pages are stored already: the entry names its root).
    fn set_chunks(&self, e: &mut Entry, list: WrittenList) -> Result<()> {
        (e.chunks, e.chunk_list) = self.list_fields(list)?;
        Ok(())
    }

    /// A written chunk list as an entry's `chunks` and `chunk_list`.
    fn list_fields(&self, list: WrittenList) -> Result<(Option<ChunkList>, Option<Id>)> {
        let list = match list {
            WrittenList::Paged { root, .. } => return Ok((None, Some(root))),
            WrittenList::Whole(list) => list,
        };
        Ok(if list.0.len() > INLINE_CHUNKS {
            (None, Some(self.w.store_tree(&list.encode())?))
        } else if !list.0.is_empty() {
            (Some(list), None)
        } else {
            (None, None)
        })
    }

    /// Reads a stream to its end and builds its file's entry. `time`: the generation's.
    /// `gz`: the stream is gzip data and this its original name (`s.name` is the stored one).
    fn stream_entry(
        &self,
        s: Stream<'_>,
        time: &DateTime<Utc>,
        gz: Option<String>,
    ) -> Result<Entry> {
        let chunker = self.repo.config().chunker;
        // A stream's length is unknown: it counts as a large file (see `read_content`).
        let _large = self.handle.block_on(self.large.acquire()).ok();
        let reader = Box::new(Counted {
            inner: s.reader,
            bytes: &self.progress.bytes,
        });
        let mut name = s.name;
        let mut origin_of = None;
        let result = match gz {
            None => read::read_stream_holes(reader, &chunker, self.w, &self.hashers),
            Some(original) => match self.gunzip(reader) {
                Ok(Gunzipped::Stored(list, mut origin)) => {
                    let read = origin.size;
                    origin.name = original.into_bytes();
                    origin_of = Some(origin);
                    Ok((list, read))
                }
                Ok(Gunzipped::Raw(list)) => {
                    tracing::warn!(
                        "{}: its gzip data cannot be recreated exactly from the decompressed \
                         content; stored as it is, as {original}",
                        s.origin
                    );
                    name = original;
                    let read = list.size();
                    Ok((list, read))
                }
                Err(e) => {
                    self.w.check()?;
                    if let Some(ge) = gzip::gzip_error(&e) {
                        return Err(Error::GzipRead {
                            origin: s.origin,
                            name: original,
                            offset: ge.offset,
                            reason: ge.reason.clone(),
                        });
                    }
                    Err(e)
                }
            },
        };
        let (list, read) = match result {
            Ok(r) => r,
            Err(source) => {
                // A failure of the repository side is reported as itself.
                self.w.check()?;
                return Err(Error::StreamRead {
                    origin: s.origin,
                    name,
                    source,
                });
            }
        };
        if list.size() == 0 && !s.allow_empty && origin_of.is_none() {
            return Err(Error::EmptyStream {
                origin: s.origin,
                name,
            });
        }
        let (uid, gid) = s.owner.unwrap_or_else(|| {
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )
        });
        let at = |t: &DateTime<Utc>| Time(t.timestamp(), t.timestamp_subsec_nanos());
        let mtime = at(s.mtime.as_ref().unwrap_or(time));
        // Its ctime: when backtree made the file, the generation's time.
        let mut e = Entry {
            user: self.names.user(uid),
            group: self.names.group(gid),
            ..Entry::made_file(name.as_bytes(), s.mode & 0o7777, uid, gid, mtime, at(time))
        };
        self.stored_stream(&mut e, list, read)?;
        e.gzip = origin_of;
        Ok(e)
    }

    /// Records a stream's content in its entry and counts it; its bytes were counted in
    /// `progress` as they were read.
    fn stored_stream(&self, e: &mut Entry, list: WrittenList, read: u64) -> Result<()> {
        e.size = list.size();
        e.holes = Some(list.hole_bytes()).filter(|&h| h > 0);
        self.stats.files.fetch_add(1, Ordering::Relaxed);
        self.stats.logical.fetch_add(e.size, Ordering::Relaxed);
        self.stats.read.fetch_add(read, Ordering::Relaxed);
        self.progress.files.fetch_add(1, Ordering::Relaxed);
        self.set_chunks(e, list)
    }

    /// Reads a block device or fifo named as a source (`--read-special`) to its end and builds
    /// a regular file's entry for it: the node's mode, owner, times and xattrs, zero runs as
    /// holes. `given`: the source as given; `real`: the node (where a symlink led); `m`: its
    /// metadata. A read error fails the ingest.
    fn special_entry(
        &self,
        given: &Path,
        real: &Path,
        name: &OsStr,
        m: &std::fs::Metadata,
    ) -> Result<Entry> {
        let xattrs = meta::xattrs(real).map_err(|e| Error::io(given, e))?;
        let mut e = meta::entry(name.as_bytes(), m, &self.names, xattrs);
        e.kind = Kind::File;
        e.rdev = None;
        // Never "unchanged": a device's times do not follow its content.
        e.ino = 0;
        let chunker = self.repo.config().chunker;
        // Its length is unknown until its end: it counts as a large file (see `read_content`).
        let _large = self.handle.block_on(self.large.acquire()).ok();
        let f = read::open_noatime(real).map_err(|e| Error::io(given, e))?;
        let offset = AtomicU64::new(0);
        let reader = Box::new(Counted {
            inner: Counted {
                inner: f,
                bytes: &offset,
            },
            bytes: &self.progress.bytes,
        });
        match read::read_stream_holes(reader, &chunker, self.w, &self.hashers) {
            Ok((list, read)) => {
                self.stored_stream(&mut e, list, read)?;
                Ok(e)
            }
            Err(source) => {
                self.w.check()?;
                Err(Error::SpecialRead {
                    path: given.to_path_buf(),
                    offset: offset.load(Ordering::Relaxed),
                    source,
                })
            }
        }
    }

    /// Counts hardlink members and fills the content of members processed (in parallel) before
    /// their group's first member finished.
    fn resolve_hardlinks(&self, entries: &mut [Entry]) {
        let mut links = lock(&self.links);
        for e in entries.iter_mut() {
            if let Some(g) = e.link {
                *links.counts.entry(g).or_insert(0) += 1;
                if e.chunks.is_none() && e.chunk_list.is_none() && e.size > 0 {
                    if let Some((c, l, h)) = links.content.get(&g) {
                        e.chunks = c.clone();
                        e.chunk_list = *l;
                        e.holes = *h;
                    }
                }
            }
        }
    }

    /// Stores a directory's entries (sorted by name), paginating large ones; returns its id.
    fn store_dir(&self, mut entries: Vec<Entry>) -> Result<Id> {
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let mut pages = paginate(entries);
        if pages.len() == 1 {
            let page = pages.pop().unwrap_or_default();
            return self.w.store_tree(&Tree::leaf(page).encode());
        }
        let mut refs = Vec::with_capacity(pages.len());
        for page in pages {
            let first = page.first().map(|e| e.name.clone()).unwrap_or_default();
            let count = page.len() as u64;
            let id = self.w.store_tree(&Tree::leaf(page).encode())?;
            refs.push(PageRef { first, id, count });
        }
        self.w.store_tree(&Tree::paged(refs).encode())
    }
}

/// A reader that adds what it reads to a progress counter as it goes, so a long stream shows
/// progress before it ends.
struct Counted<'a, R> {
    inner: R,
    bytes: &'a AtomicU64,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Whether a file is unchanged since the previous generation: same type, size, mtime, ctime
/// and inode (the same test rsync and restic use, plus ctime and inode to catch `touch -r`).
fn unchanged(prev: &Entry, now: &Entry) -> bool {
    prev.kind == Kind::File
        && prev.size == now.size
        && prev.mtime == now.mtime
        && prev.ctime == now.ctime
        && prev.ino == now.ino
}
