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
//! Which blobs lie in a window is known from the pack's trailer, read once per pack (its footer
//! with [`pack::read_footer`], its records with [`pack::read_records`]) and kept in an LRU
//! bounded by bytes ([`TRAILER_BYTES`]); core owns the pack layout, so windows are placed within
//! the pack's [`pack::blob_area`] without offsets of their own. A trailer of many records (a
//! 16 MiB pack of tiny files has hundreds of thousands, 46 bytes each; the scale simulator's
//! packs of 10⁷ chunks two million) is not kept whole: only one record's offset in
//! [`SPARSE_STEP`], and a window reads the records it spans with one more ranged read. Tree packs hold only trees and are
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

use crate::cache::SizedLru;
use backtree_core::blob::{self, StoredBlob};
use backtree_core::index::Location;
use backtree_core::pack::{self, PackEntry};
use backtree_core::{BlobKind, Error, Id, Repository};
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use lru::LruCache;
use std::collections::HashMap;
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
/// Blobs a window holds at most. Each takes a slot (about [`SLOT_BYTES`]), counted with the
/// window's bytes: a 2 MiB window of 50-byte blobs would hold 40 000 slots (4 MB, twice its
/// bytes, and 18 MB of uncounted slots in all before 2026-12-02), so a window of tiny blobs is
/// cut to the blob asked for and the blobs after it, this many in all.
const WINDOW_BLOBS: usize = 4096;
/// Memory one blob of a window takes besides its bytes: its id in the window's list, its slot
/// and the hash table's overhead.
pub(crate) const SLOT_BYTES: usize =
    2 * std::mem::size_of::<Id>() + std::mem::size_of::<Slot>() + 16;
/// Bytes of pack trailers kept ([`PackMap::mem_size`], an LRU). They were 64 trailers whatever
/// their size until 2026-12-02: a pack of tiny blobs has a trailer of megabytes (2 M records,
/// 96 MB parsed, in the scale simulator's packs of 10⁷ chunks), and random reads across five
/// such packs took the mount to 750 MB. A pack of 16 MiB of 4 KiB files has 4096 records
/// (200 KB), so this keeps about 40 of those whole.
const TRAILER_BYTES: usize = 8 << 20;
/// A trailer of more records than this (768 KiB parsed) is kept sparse.
const FULL_RECORDS: u32 = 16 << 10;
/// A sparse trailer keeps the offset of one record in this many: a window then reads the
/// records it spans plus at most this many on each side.
const SPARSE_STEP: u32 = 64;
/// Records read at once when a large trailer is first read (3 MB; a multiple of
/// [`SPARSE_STEP`]), so that reading it never holds all of it.
const RECORDS_READ: u32 = 64 << 10;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Window {
    bytes: Bytes,
    ids: Vec<Id>,
    /// Bytes counted: the window's and its slots' ([`SLOT_BYTES`] each).
    cost: usize,
}

struct Slot {
    window: u64,
    start: u32,
    len: u32,
    flags: u8,
    raw_len: u32,
}

/// Windows of stored blobs of one kind, bounded by bytes (theirs and their slots'), evicted
/// least recently used first.
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
        let end = start + bytes.len() as u64;
        let inside = |e: &PackEntry| {
            let (a, b) = (e.offset as u64, e.offset as u64 + e.stored_len as u64);
            a >= start && b <= end
        };
        let cost = bytes.len() + entries.iter().filter(|e| inside(e)).count() * SLOT_BYTES;
        if cost > self.limit {
            return;
        }
        let mut g = lock(&self.inner);
        let inner = &mut *g;
        let no = inner.next;
        inner.next += 1;
        let mut ids = Vec::with_capacity(entries.len());
        for e in entries {
            let a = e.offset as u64;
            if inside(e) {
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
        inner.bytes += cost;
        inner.windows.put(no, Window { bytes, ids, cost });
        while inner.bytes > self.limit {
            let Some((old, w)) = inner.windows.pop_lru() else {
                break;
            };
            inner.bytes -= w.cost;
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

    /// Blobs held (tests).
    #[cfg(test)]
    pub fn blobs(&self) -> usize {
        lock(&self.inner).slots.len()
    }

    /// Bytes held, with their slots'.
    pub fn bytes(&self) -> usize {
        lock(&self.inner).bytes
    }
}

/// What the mount keeps of a pack's trailer.
struct PackMap {
    pack_len: u64,
    count: u32,
    records: Records,
}

enum Records {
    /// Every record (at most [`FULL_RECORDS`]).
    Full(Vec<PackEntry>),
    /// The offsets of records 0, [`SPARSE_STEP`], 2 × [`SPARSE_STEP`], …
    Sparse(Vec<u32>),
}

impl PackMap {
    /// Bytes this takes in memory, about: what the trailer LRU counts.
    fn mem_size(&self) -> usize {
        std::mem::size_of::<Self>()
            + match &self.records {
                Records::Full(v) => v.capacity() * std::mem::size_of::<PackEntry>(),
                Records::Sparse(v) => v.capacity() * std::mem::size_of::<u32>(),
            }
    }
}

/// A window read in flight; every blob that needs the window waits for the one read.
type WindowRead = Arc<tokio::sync::OnceCell<Bytes>>;

/// Reads blobs through windows of their packs (see the module docs).
pub struct PackReader {
    repo: Arc<Repository>,
    trailers: Mutex<SizedLru<Arc<PackMap>>>,
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
            trailers: Mutex::new(SizedLru::new(TRAILER_BYTES)),
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

    /// A stored blob of `kind`: from a window, or by reading a new window around it. If its
    /// pack has vanished (a prune repacked it), the index is asked again for another copy.
    pub async fn stored(
        &self,
        id: &Id,
        kind: BlobKind,
    ) -> backtree_core::Result<(StoredBlob, Location)> {
        let loc = self.repo.locate(id).await?;
        match self.stored_at(id, kind, loc).await {
            Err(e) if e.kind() == backtree_core::ErrorKind::NotFound => {
                match self.repo.index().relocate(id, &loc).await? {
                    Some(l) => {
                        tracing::debug!(
                            "blob {id}: {} is gone, reading it from {}",
                            loc.pack_key(),
                            l.pack_key()
                        );
                        self.stored_at(id, kind, l).await
                    }
                    None => Err(e),
                }
            }
            r => r,
        }
    }

    async fn stored_at(
        &self,
        id: &Id,
        kind: BlobKind,
        loc: Location,
    ) -> backtree_core::Result<(StoredBlob, Location)> {
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

    /// Bytes of pack trailers kept.
    pub fn trailer_bytes(&self) -> usize {
        lock(&self.trailers).bytes()
    }

    /// What is kept of the trailer of `loc`'s pack, read on a miss: whole if it is small, else
    /// sparse (see the module docs), read in pieces of [`RECORDS_READ`].
    async fn trailer(&self, loc: &Location) -> backtree_core::Result<Arc<PackMap>> {
        if let Some(t) = lock(&self.trailers).get(&loc.pack) {
            return Ok(t);
        }
        let (store, key) = (self.repo.store(), loc.pack_key());
        let (pack_len, count) = pack::read_footer(store, &key).await?;
        let records = if count <= FULL_RECORDS {
            Records::Full(pack::read_records(store, &key, pack_len, count, 0..count).await?)
        } else {
            let mut offsets = Vec::with_capacity(count.div_ceil(SPARSE_STEP) as usize);
            let mut at = 0;
            while at < count {
                let end = at.saturating_add(RECORDS_READ).min(count);
                let part = pack::read_records(store, &key, pack_len, count, at..end).await?;
                offsets.extend(part.iter().step_by(SPARSE_STEP as usize).map(|e| e.offset));
                at = end;
            }
            Records::Sparse(offsets)
        };
        let t = Arc::new(PackMap {
            pack_len,
            count,
            records,
        });
        lock(&self.trailers).put(loc.pack, t.clone(), t.mem_size());
        Ok(t)
    }

    /// The records of `loc`'s pack (of kind `loc.kind`) whose blobs may lie in `start..end`:
    /// filtered from a whole trailer, or read (one ranged read) around them for a sparse one.
    /// Records are in stored order, so the sparse offsets are sorted; a pack whose records are
    /// not only gets fewer blobs in its windows (each blob is still read and verified alone).
    async fn records_in(
        &self,
        t: &PackMap,
        loc: &Location,
        start: u64,
        end: u64,
    ) -> backtree_core::Result<Vec<PackEntry>> {
        let inside = |e: &PackEntry| {
            e.kind == loc.kind && e.offset as u64 >= start && (e.offset as u64) < end
        };
        match &t.records {
            Records::Full(v) => Ok(v.iter().filter(|e| inside(e)).copied().collect()),
            Records::Sparse(offsets) => {
                let first = offsets.partition_point(|&o| (o as u64) < start);
                let last = offsets.partition_point(|&o| (o as u64) < end);
                let a = first.saturating_sub(1) as u32 * SPARSE_STEP;
                let b = (last as u32).saturating_mul(SPARSE_STEP).min(t.count);
                let (store, key) = (self.repo.store(), loc.pack_key());
                let mut v = pack::read_records(store, &key, t.pack_len, t.count, a..b).await?;
                v.retain(inside);
                Ok(v)
            }
        }
    }

    async fn read_window(&self, id: &Id, loc: &Location) -> backtree_core::Result<StoredBlob> {
        let trailer = self.trailer(loc).await?;
        let key = loc.pack_key();
        let area = pack::blob_area(trailer.pack_len, trailer.count);
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
        let mut records = self.records_in(&trailer, loc, start, end).await?;
        let (start, end) = if records.len() > WINDOW_BLOBS {
            // Tiny blobs: the blob and those after it, WINDOW_BLOBS in all.
            records.retain(|e| e.offset as u64 >= lo);
            records.truncate(WINDOW_BLOBS);
            let last = records
                .last()
                .map(|e| e.offset as u64 + e.stored_len as u64);
            (lo, last.unwrap_or(hi).max(hi))
        } else {
            (start, end)
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
                let same_kind: Vec<&PackEntry> = records.iter().collect();
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
