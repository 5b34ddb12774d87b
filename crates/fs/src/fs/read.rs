//! File reads: the read state kept per inode, reads, holes and `lseek`.
//!
//! Files are read by inode, with no open handle: the kernel opens files without asking
//! (FUSE_NO_OPEN_SUPPORT, see `crate::fuse`). A file's read state ([`OpenFile`]: its chunk
//! list and its sequential streams) is kept in an LRU of at most [`OPEN_FILES`] files and
//! [`OPEN_FILES_BYTES`] of chunk lists; a file read after its state was dropped gets it again from its entry or from the store. A read finds
//! its first chunk by binary search over the chunk list's end offsets, takes each chunk from
//! [`Chunks`] and copies the requested bytes; holes read as zeros.
//!
//! A paged chunk list ([`backtree_core::chunklist`]) is never loaded whole: the read state holds
//! its root, the list keeps the few pages and index nodes last used, and a read asks it for the
//! page covering each offset (a binary search per level, fetching only nodes not at hand). An
//! inline list or a single chunk-list blob is one page that is always at hand.

use super::chunks::Chunks;
use super::error::{lock, Failures, FsError, Result};
use super::inodes::{EntryRef, Node};
use super::namespace::GenCtx;
use super::readahead::Streams;
use backtree_core::chunklist::{FileChunks, Page};
use backtree_core::tree::Kind;
use backtree_core::{Error, Repository};
use bytes::Bytes;
use lru::LruCache;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

/// Files whose read state is kept at most (an LRU by inode).
const OPEN_FILES: usize = 256;

/// Bytes of chunk lists the kept read states may hold ([`FileChunks::footprint`]): 64 MiB is
/// about 80 paged files with full node caches (each ~1 MiB at most), or one unpaged list of
/// 1.4 M pieces (a 1.4 TB file written before paged lists). A state over the budget is used for
/// its read and not kept.
const OPEN_FILES_BYTES: usize = 64 << 20;

/// What reading a regular file needs, kept per inode (not per open).
pub(super) struct OpenFile {
    pub(super) gen: Arc<GenCtx>,
    pub(super) path: Arc<[u8]>,
    pub(super) chunks: FileChunks,
    pub(super) streams: Streams,
}

/// The files being read, by inode, within [`OPEN_FILES`] and [`OPEN_FILES_BYTES`].
pub(super) struct Files {
    open: Mutex<Kept>,
}

struct Kept {
    lru: LruCache<u64, (Arc<OpenFile>, usize)>,
    bytes: usize,
}

impl Files {
    pub(super) fn new() -> Self {
        let n = NonZeroUsize::new(OPEN_FILES).unwrap_or(NonZeroUsize::MIN);
        Files {
            open: Mutex::new(Kept {
                lru: LruCache::new(n),
                bytes: 0,
            }),
        }
    }

    pub(super) fn get(&self, ino: u64) -> Option<Arc<OpenFile>> {
        lock(&self.open).lru.get(&ino).map(|(f, _)| f.clone())
    }

    pub(super) fn insert(
        &self,
        ino: u64,
        gen: Arc<GenCtx>,
        path: Arc<[u8]>,
        chunks: FileChunks,
    ) -> Arc<OpenFile> {
        let size = chunks.footprint();
        let f = Arc::new(OpenFile {
            gen,
            path,
            chunks,
            streams: Streams::default(),
        });
        if size <= OPEN_FILES_BYTES {
            let mut kept = lock(&self.open);
            kept.bytes += size;
            if let Some((_, (_, old))) = kept.lru.push(ino, (f.clone(), size)) {
                kept.bytes -= old;
            }
            while kept.bytes > OPEN_FILES_BYTES {
                match kept.lru.pop_lru() {
                    Some((_, (_, old))) => kept.bytes -= old,
                    None => break,
                }
            }
        }
        f
    }
}

/// The regular file a resolved node names; the error its open would get otherwise.
pub(super) fn file_node(
    resolved: (Node, Option<EntryRef>),
) -> Result<(Arc<GenCtx>, Arc<[u8]>, EntryRef)> {
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

/// Reads `offset..end` of the file `h` (`end` within the file).
pub(super) async fn read(
    h: &OpenFile,
    repo: &Repository,
    chunks: &Chunks,
    failures: &Failures,
    offset: u64,
    end: u64,
) -> Result<Bytes> {
    let what = || h.gen.describe(&h.path);
    let mut parts: Vec<Bytes> = Vec::new();
    let mut pos = offset;
    let mut page: Option<Page> = None;
    while pos < end {
        let list = match page.take().filter(|p| p.covers(pos)) {
            Some(p) => p,
            None => h
                .chunks
                .page_at(repo, pos)
                .await
                .map_err(|e| failures.fail(format!("{}: chunk list", what()), e))?
                .ok_or(FsError::Invalid)?,
        };
        let i = list.find(pos).ok_or(FsError::Invalid)?;
        let (cs, ce) = (list.start(i), list.list.0[i].end);
        let take = ce.min(end);
        let id = list.list.0[i].id;
        page = Some(list);
        parts.push(match &id {
            None => zeros((take - pos) as usize),
            Some(id) => {
                let whole = pos == cs && take == ce;
                let data = chunks
                    .get(id, whole)
                    .await
                    .map_err(|e| failures.fail(what(), e))?;
                if data.len() as u64 != ce - cs {
                    let e = Error::corrupt(
                        format!("chunk {id}"),
                        "size differs from the file's chunk list",
                    );
                    return Err(failures.fail(what(), e));
                }
                data.slice((pos - cs) as usize..(take - cs) as usize)
            }
        });
        pos = take;
    }
    Ok(concat(parts))
}

/// `lseek` with SEEK_DATA or SEEK_HOLE (over a paged list, page by page).
pub(super) async fn seek(
    h: &OpenFile,
    repo: &Repository,
    failures: &Failures,
    offset: i64,
    whence: i32,
) -> Result<i64> {
    if offset < 0 {
        return Err(FsError::Invalid);
    }
    let data = match whence {
        libc::SEEK_DATA => true,
        libc::SEEK_HOLE => false,
        _ => return Err(FsError::Invalid),
    };
    h.chunks
        .seek(repo, offset as u64, data)
        .await
        .map_err(|e| failures.fail(format!("{}: chunk list", h.gen.describe(&h.path)), e))?
        .map(|o| o as i64)
        .ok_or(FsError::NoXio)
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
