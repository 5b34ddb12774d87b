//! Reading blobs in windows of their pack.
//!
//! A pack holds many blobs back to back, and the writer puts a directory's small files (and a
//! generation's directory trees) next to each other. Fetching each small blob with its own
//! ranged read costs one store round trip per blob — one `pread` and two thread hand-offs
//! locally, one HTTP request of latency on S3 — which dominates a restore of many small files.
//! So a miss on a small blob reads a *window* of its pack (the blob and what follows it) with one
//! ranged read, and keeps every blob of the same kind that lies wholly inside the window in its
//! stored (compressed) form. The next small files of the directory are then decoded from memory,
//! synchronously, on the FUSE thread.
//!
//! Which blobs lie in a window is known from the pack's trailer, read once per pack with
//! [`pack::read_trailer`] and kept in a small LRU; core owns the pack layout, so windows are
//! placed within the trailer's [`Trailer::blob_area`] without offsets of their own. Tree packs hold only trees and are
//! read as a whole (or [`TREE_WINDOW`] around the blob); data packs in aligned windows of
//! [`DATA_WINDOW`]. Windows are evicted whole, so the bytes counted are the bytes held.
//!
//! A directory read-ahead knows which blobs it wants (the next files of a directory), so it does
//! not read windows: [`PackReader::gather`] reads just those blobs, merging neighbours of one pack
//! into one read when the gap between them is small. Windows read for a read-ahead carried about
//! ten times the bytes used, because the parallel writer interleaves several directories' files.
//!
//! Stored bytes are not trusted: every blob taken from a window is a [`StoredBlob`], decoded and
//! verified against its id like any other ([`StoredBlob::decode`]); a blob read on its own is
//! read with [`blob::fetch`], as the repository reads it.

use backtree_core::blob::{self, StoredBlob};
use backtree_core::index::Location;
use backtree_core::pack::{self, PackEntry, Trailer};
use backtree_core::{BlobKind, Error, Id, Repository};
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use lru::LruCache;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

/// Largest read of a tree pack at once. Tree packs are small (a 54 k-entry generation has about
/// 2 MB of trees), so a cold `find` reads each once.
pub const TREE_WINDOW: u64 = 16 << 20;
/// A data window: a directory's worth of small files. Local reads of this size cost about as
/// much as one small read plus a copy; on S3 it is still one request.
pub const DATA_WINDOW: u64 = 2 << 20;
/// Data blobs stored at most this large are read through windows; larger ones are a read of
/// their own (a window would hold little besides them).
pub const SMALL_BLOB: u32 = 256 << 10;
/// Reads of one read-ahead in flight at once: the blobs of a directory lie in several places.
const GATHER_READS: usize = 8;
/// Pack trailers kept (a 16 MiB pack of small files has a few hundred 46-byte records).
const TRAILERS: usize = 64;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Window {
    bytes: Bytes,
    ids: Vec<Id>,
}

struct Slot {
    window: u64,
    start: u32,
    len: u32,
    flags: u8,
    raw_len: u32,
}

/// Windows of stored blobs of one kind, bounded by bytes, evicted least recently used first.
pub struct Windows {
    limit: usize,
    inner: Mutex<WindowsInner>,
}

struct WindowsInner {
    windows: LruCache<u64, Window>,
    slots: HashMap<Id, Slot>,
    bytes: usize,
    next: u64,
}

impl Windows {
    pub fn new(limit: usize) -> Self {
        Windows {
            limit,
            inner: Mutex::new(WindowsInner {
                windows: LruCache::unbounded(),
                slots: HashMap::new(),
                bytes: 0,
                next: 0,
            }),
        }
    }

    /// A blob held in a window, if any.
    pub fn get(&self, id: &Id) -> Option<StoredBlob> {
        let mut g = lock(&self.inner);
        let inner = &mut *g;
        let s = inner.slots.get(id)?;
        let w = inner.windows.get(&s.window)?;
        let (a, b) = (s.start as usize, s.start as usize + s.len as usize);
        Some(StoredBlob {
            bytes: w.bytes.slice(a..b),
            flags: s.flags,
            raw_len: s.raw_len,
        })
    }

    /// Keeps `bytes` (read at pack offset `start`) with the blobs of `entries` that lie wholly
    /// inside it.
    fn insert(&self, bytes: Bytes, start: u64, entries: &[&PackEntry]) {
        if bytes.len() > self.limit {
            return;
        }
        let end = start + bytes.len() as u64;
        let mut g = lock(&self.inner);
        let inner = &mut *g;
        let no = inner.next;
        inner.next += 1;
        let mut ids = Vec::with_capacity(entries.len());
        for e in entries {
            let (a, b) = (e.offset as u64, e.offset as u64 + e.stored_len as u64);
            if a >= start && b <= end {
                inner.slots.insert(
                    e.id,
                    Slot {
                        window: no,
                        start: (a - start) as u32,
                        len: e.stored_len,
                        flags: e.flags,
                        raw_len: e.raw_len,
                    },
                );
                ids.push(e.id);
            }
        }
        inner.bytes += bytes.len();
        inner.windows.put(no, Window { bytes, ids });
        while inner.bytes > self.limit {
            let Some((old, w)) = inner.windows.pop_lru() else {
                break;
            };
            inner.bytes -= w.bytes.len();
            for id in w.ids {
                if inner.slots.get(&id).is_some_and(|s| s.window == old) {
                    inner.slots.remove(&id);
                }
            }
        }
    }

    /// Whether a blob is held.
    pub fn contains(&self, id: &Id) -> bool {
        lock(&self.inner).slots.contains_key(id)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        lock(&self.inner).bytes
    }
}

/// A window read in flight; every blob that needs the window waits for the one read.
type WindowRead = Arc<tokio::sync::OnceCell<Bytes>>;

/// Reads blobs through windows of their packs (see the module docs).
pub struct PackReader {
    repo: Arc<Repository>,
    trailers: Mutex<LruCache<Id, Arc<Trailer>>>,
    /// Window reads in flight, by pack and start.
    inflight: Mutex<HashMap<(Id, u64), WindowRead>>,
    /// Read-ahead reads in flight ([`PackReader::gather`]), by the blobs they will hold.
    gathering: Mutex<HashMap<Id, WindowRead>>,
    pub trees: Windows,
    pub data: Windows,
}

impl PackReader {
    /// `tree_bytes` and `data_bytes` bound the stored bytes kept of each kind.
    pub fn new(repo: Arc<Repository>, tree_bytes: usize, data_bytes: usize) -> Self {
        PackReader {
            repo,
            trailers: Mutex::new(LruCache::new(
                NonZeroUsize::new(TRAILERS).unwrap_or(NonZeroUsize::MIN),
            )),
            inflight: Mutex::new(HashMap::new()),
            gathering: Mutex::new(HashMap::new()),
            trees: Windows::new(tree_bytes),
            data: Windows::new(data_bytes),
        }
    }

    fn windows(&self, kind: BlobKind) -> &Windows {
        match kind {
            BlobKind::Tree => &self.trees,
            BlobKind::Data => &self.data,
        }
    }

    /// A stored blob of `kind`: from a window, or by reading a new window around it.
    pub async fn stored(
        &self,
        id: &Id,
        kind: BlobKind,
    ) -> backtree_core::Result<(StoredBlob, Location)> {
        let loc = self.repo.locate(id).await?;
        if loc.kind != kind {
            return Err(Error::corrupt(
                format!("blob {id}"),
                format!("indexed as a {:?} blob, expected {kind:?}", loc.kind),
            ));
        }
        if let Some(s) = self.windows(kind).get(id) {
            return Ok((s, loc));
        }
        // Being read ahead: wait for that read rather than reading a window of its own.
        let pending = lock(&self.gathering).get(id).cloned();
        if let Some(cell) = pending {
            let done = cell.get_or_try_init(|| async { Err(()) }).await.is_ok();
            if let Some(s) = done.then(|| self.windows(kind).get(id)).flatten() {
                return Ok((s, loc));
            }
        }
        if kind == BlobKind::Tree || loc.stored_len <= SMALL_BLOB {
            match self.read_window(id, &loc).await {
                Ok(s) => return Ok((s, loc)),
                // A damaged trailer must not make the pack's intact blobs unreadable: read
                // the blob on its own (which reports the store error again if that was it).
                Err(e) => tracing::debug!("pack window for blob {id}: {e}"),
            }
        }
        Ok((blob::fetch(self.repo.store(), id, &loc).await?, loc))
    }

    /// Reads ahead the small data blobs among `ids` that are not held yet, with as few ranged
    /// reads as their places allow: blobs of one pack are read together when the gap between
    /// them is at most `gap` bytes and the read stays within [`DATA_WINDOW`]. Unlike a window,
    /// this reads (nearly) only the blobs wanted: the writer interleaves several directories'
    /// files in a pack, and aligned windows read for a directory read-ahead carried about ten
    /// times the bytes used. Returns the ids that are not small data blobs (not read here).
    pub async fn gather(&self, ids: &[Id], gap: u64) -> backtree_core::Result<Vec<Id>> {
        let mut other = Vec::new();
        let mut by_pack: HashMap<Id, Vec<PackEntry>> = HashMap::new();
        for id in ids {
            if self.data.contains(id) {
                continue;
            }
            let loc = self.repo.locate(id).await?;
            if loc.kind != BlobKind::Data || loc.stored_len > SMALL_BLOB {
                other.push(*id);
                continue;
            }
            by_pack.entry(loc.pack).or_default().push(PackEntry {
                kind: loc.kind,
                flags: loc.flags,
                id: *id,
                offset: loc.offset,
                stored_len: loc.stored_len,
                raw_len: loc.raw_len,
            });
        }
        let mut reads = Vec::new();
        for (pack, mut blobs) in by_pack {
            blobs.sort_by_key(|e| e.offset);
            blobs.dedup_by_key(|e| e.offset);
            let mut run: Vec<PackEntry> = Vec::new();
            for e in blobs {
                let end = |e: &PackEntry| e.offset as u64 + e.stored_len as u64;
                if let (Some(first), Some(last)) = (run.first(), run.last()) {
                    let joins = e.offset as u64 <= end(last) + gap
                        && end(&e) - first.offset as u64 <= DATA_WINDOW;
                    if !joins {
                        reads.push((pack, std::mem::take(&mut run)));
                    }
                }
                run.push(e);
            }
            if !run.is_empty() {
                reads.push((pack, run));
            }
        }
        // Announced before reading, so that a reader who gets there first waits for the read.
        let reads: Vec<_> = reads
            .into_iter()
            .map(|(pack, run)| {
                let cell = WindowRead::default();
                let mut g = lock(&self.gathering);
                for e in &run {
                    g.insert(e.id, cell.clone());
                }
                (pack, run, cell)
            })
            .collect();
        let results: Vec<backtree_core::Result<()>> = stream::iter(reads)
            .map(|(pack, run, cell)| async move {
                let (start, end) = match (run.first(), run.last()) {
                    (Some(a), Some(b)) => (a.offset as u64, b.offset as u64 + b.stored_len as u64),
                    _ => return Ok(()),
                };
                let key = backtree_core::id::pack_key(BlobKind::Data, &pack);
                let res = cell
                    .get_or_try_init(|| async {
                        let bytes = self.repo.store().get_range(&key, start..end).await?;
                        let entries: Vec<&PackEntry> = run.iter().collect();
                        self.data.insert(bytes.clone(), start, &entries);
                        Ok::<_, Error>(bytes)
                    })
                    .await
                    .map(|_| ());
                let mut g = lock(&self.gathering);
                for e in &run {
                    g.remove(&e.id);
                }
                res
            })
            .buffer_unordered(GATHER_READS)
            .collect()
            .await;
        results.into_iter().collect::<backtree_core::Result<()>>()?;
        Ok(other)
    }

    async fn trailer(&self, loc: &Location) -> backtree_core::Result<Arc<Trailer>> {
        if let Some(t) = lock(&self.trailers).get(&loc.pack).cloned() {
            return Ok(t);
        }
        let t = Arc::new(pack::read_trailer(self.repo.store(), &loc.pack_key()).await?);
        lock(&self.trailers).put(loc.pack, t.clone());
        Ok(t)
    }

    async fn read_window(&self, id: &Id, loc: &Location) -> backtree_core::Result<StoredBlob> {
        let trailer = self.trailer(loc).await?;
        let key = loc.pack_key();
        let area = trailer.blob_area();
        let (lo, hi) = (loc.offset as u64, loc.offset as u64 + loc.stored_len as u64);
        let (start, end) = match loc.kind {
            // The whole blob area if it fits, else a window centred on the blob.
            BlobKind::Tree if area.end - area.start <= TREE_WINDOW => {
                (area.start, area.end.max(hi))
            }
            BlobKind::Tree => {
                let start = lo.saturating_sub(TREE_WINDOW / 2).max(area.start);
                (start, (start + TREE_WINDOW).min(area.end).max(hi))
            }
            // The writer stores a directory's files close together, though not in name order
            // (it reads them in parallel): an aligned window around the blob.
            BlobKind::Data => {
                let start = (lo - lo % DATA_WINDOW).max(area.start);
                (start, (start + DATA_WINDOW).min(area.end).max(hi))
            }
        };
        // Concurrent misses in one window (a read and the directory read-ahead, or parallel
        // readers of one directory) share one read.
        let cell = lock(&self.inflight)
            .entry((loc.pack, start))
            .or_default()
            .clone();
        let res = cell
            .get_or_try_init(|| async {
                let bytes = self.repo.store().get_range(&key, start..end).await?;
                let same_kind: Vec<&PackEntry> = trailer
                    .entries
                    .iter()
                    .filter(|e| e.kind == loc.kind)
                    .collect();
                self.windows(loc.kind)
                    .insert(bytes.clone(), start, &same_kind);
                Ok::<_, Error>(bytes)
            })
            .await
            .cloned();
        lock(&self.inflight).remove(&(loc.pack, start));
        let bytes = res?;
        if hi <= start + bytes.len() as u64 {
            let own = bytes.slice((lo - start) as usize..(hi - start) as usize);
            Ok(StoredBlob::new(own, loc))
        } else {
            // A window read for another blob that ended before this one does.
            blob::fetch(self.repo.store(), id, loc).await
        }
    }
}
