//! The blob writer: deduplication, packing, uploads and index files for one ingest session.
//!
//! Callers hash and compress chunks on their own threads ([`BlobWriter::prepare`]), then append
//! each batch (up to 16 MiB of a file) in file order under one lock
//! ([`BlobWriter::append_all`]), so a file's new chunks lie contiguous in packs (at batch
//! granularity when several files are read in parallel) and a sequential restore reads
//! contiguous ranges. Data and tree blobs go to separate
//! packs. A full pack is uploaded by a task on the tokio runtime; at most
//! [`MAX_UPLOADS_IN_FLIGHT`] packs are in flight, which bounds memory to about that many packs.
//!
//! Crash safety: packs are uploaded first; index files that describe them are written only
//! after the packs are stored; the manifest (written by the caller) comes last. To bound the work
//! lost when a writer is killed, an index checkpoint is written every [`CHECKPOINT_BYTES`] of new
//! packs; a later ingest then finds those blobs in the index and does not upload them again. At
//! the end the session's checkpoints are merged into one index file and deleted (duplicates in
//! between are harmless: index entries are facts about immutable packs).

use crate::blob;
use crate::error::{Error, Result};
use crate::id::{pack_key, BlobKind, Id};
use crate::index::IndexBuilder;
use crate::pack::{FinishedPack, PackBuilder, PackEntry};
use backtree_store::DynStore;
use bytes::Bytes;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// Packs uploading at once. Each holds up to one pack (16 MiB by default) in memory.
pub const MAX_UPLOADS_IN_FLIGHT: usize = 4;

/// New pack bytes between index checkpoints: at most this much upload is redone after a crash.
/// 256 MiB: one small index object per 256 MiB stored, and after a crash or a store outage
/// at most that much is uploaded again.
pub const CHECKPOINT_BYTES: u64 = 256 << 20;

/// A chunk hashed (and, if new, compressed) and ready to append.
#[derive(Debug)]
pub struct Prepared {
    pub id: Id,
    pub raw_len: u32,
    /// Stored bytes and flags if this session claimed the chunk as new; `None` if the repository
    /// or this session already has it.
    pub new: Option<(Vec<u8>, u8)>,
}

type Uploaded = Vec<(BlobKind, Id, Vec<PackEntry>)>;

/// Lock a mutex whose data stays consistent even if a holder panicked (every critical section
/// here is a single push, insert or swap).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Default)]
pub struct WriterStats {
    pub new_chunks: AtomicU64,
    pub new_raw_bytes: AtomicU64,
    pub new_stored_bytes: AtomicU64,
}

/// What the repository held when a session started.
pub trait Known: Send + Sync {
    /// The repository has a live index entry for the blob (confirmed, never a guess: the
    /// writer skips storing what this says).
    fn contains(&self, id: &Id) -> bool;
    /// The repository may have the blob (no false negatives). Used for blobs that a committed
    /// generation references (the incremental rule), where a false positive costs nothing.
    fn maybe(&self, id: &Id) -> bool {
        self.contains(id)
    }
}

impl Known for HashSet<Id> {
    fn contains(&self, id: &Id) -> bool {
        HashSet::contains(self, id)
    }
}

impl Known for crate::index::dedup::Dedup {
    fn contains(&self, id: &Id) -> bool {
        self.contains_blocking(id)
    }
    fn maybe(&self, id: &Id) -> bool {
        crate::index::dedup::Dedup::maybe(self, id)
    }
}

pub struct BlobWriter {
    store: DynStore,
    handle: Handle,
    level: i32,
    pack_size: usize,
    known: Box<dyn Known>,
    claimed: Mutex<HashSet<Id>>,
    data: Mutex<PackBuilder>,
    tree: Mutex<PackBuilder>,
    uploads: Mutex<Vec<JoinHandle<()>>>,
    permits: Arc<Semaphore>,
    uploaded: Arc<Mutex<Uploaded>>,
    checkpointed: Mutex<(usize, u64, Vec<String>)>,
    failure: Arc<Mutex<Option<Error>>>,
    checkpoint_bytes: u64,
    checkpointing: Mutex<()>,
    /// Pieces per chunk-list page (`Config::list_page`); `None`: lists are written whole.
    list_page: Option<usize>,
    pub stats: Arc<WriterStats>,
}

impl BlobWriter {
    pub fn new(
        store: DynStore,
        handle: Handle,
        level: i32,
        pack_size: usize,
        known: impl Known + 'static,
        checkpoint_bytes: u64,
    ) -> Self {
        BlobWriter {
            store,
            handle,
            level,
            pack_size,
            known: Box::new(known),
            claimed: Mutex::new(HashSet::new()),
            data: Mutex::new(PackBuilder::new(BlobKind::Data, pack_size + (1 << 20))),
            tree: Mutex::new(PackBuilder::new(BlobKind::Tree, 0)),
            uploads: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(MAX_UPLOADS_IN_FLIGHT)),
            uploaded: Arc::new(Mutex::new(Vec::new())),
            checkpointed: Mutex::new((0, 0, Vec::new())),
            failure: Arc::new(Mutex::new(None)),
            checkpoint_bytes,
            checkpointing: Mutex::new(()),
            list_page: None,
            stats: Arc::new(WriterStats::default()),
        }
    }

    /// Sets the pieces per page of the chunk lists written (`None`: whole lists).
    pub fn with_list_page(mut self, page: Option<usize>) -> Self {
        self.list_page = page;
        self
    }

    /// A builder for one file's chunk list, paging as this writer's repository allows.
    pub fn list_builder(&self) -> crate::chunklist::ListBuilder {
        crate::chunklist::ListBuilder::new(self.list_page)
    }

    /// Whether the repository (before this session, or through this session) has the blob.
    pub fn has(&self, id: &Id) -> bool {
        let claimed = lock(&self.claimed).contains(id);
        claimed || self.known.contains(id)
    }

    /// Whether the repository may have had the blob when this session started (no false
    /// negatives; for blobs a committed generation references, see [`Known::maybe`]).
    pub fn known(&self, id: &Id) -> bool {
        self.known.maybe(id)
    }

    /// Hashes a chunk and, if nobody has it yet, claims and compresses it. Thread-safe; meant to
    /// run on many threads at once.
    pub fn prepare(&self, raw: &[u8]) -> Prepared {
        let id = Id::of(raw);
        // The claim set is not held while the index is asked (that may read a bucket).
        let claimed = lock(&self.claimed).contains(&id);
        let new = !claimed && !self.known.contains(&id) && lock(&self.claimed).insert(id);
        Prepared {
            id,
            raw_len: raw.len() as u32,
            new: new.then(|| blob::encode(raw, self.level)),
        }
    }

    /// Appends a prepared blob to the current pack of its kind (no-op if it was not new).
    pub fn append(&self, kind: BlobKind, p: &Prepared) -> Result<()> {
        self.append_all(kind, std::slice::from_ref(p))
    }

    /// Appends prepared blobs in order, holding the pack lock across the whole batch so that
    /// chunks of one file stay contiguous even while other files are read in parallel.
    pub fn append_all(&self, kind: BlobKind, ps: &[Prepared]) -> Result<()> {
        self.append_refs(kind, &ps.iter().collect::<Vec<_>>())
    }

    /// [`append_all`](Self::append_all) over references.
    pub fn append_refs(&self, kind: BlobKind, ps: &[&Prepared]) -> Result<()> {
        let mut full = Vec::new();
        {
            let mut b = lock(self.builder(kind));
            for p in ps {
                let Some((stored, flags)) = &p.new else {
                    continue;
                };
                self.stats.new_chunks.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .new_raw_bytes
                    .fetch_add(p.raw_len as u64, Ordering::Relaxed);
                b.add(p.id, *flags, stored, p.raw_len);
                if b.len() >= self.pack_size {
                    let cap = if kind == BlobKind::Data {
                        self.pack_size + (1 << 20)
                    } else {
                        0
                    };
                    full.push(std::mem::replace(&mut *b, PackBuilder::new(kind, cap)));
                }
            }
        }
        for b in full {
            self.upload(b.finish())?;
        }
        self.check()
    }

    /// Stores a tree-kind blob (directory page, chunk list, hardlink table); returns its id.
    pub fn store_tree(&self, raw: &[u8]) -> Result<Id> {
        let p = self.prepare(raw);
        self.append(BlobKind::Tree, &p)?;
        Ok(p.id)
    }

    fn builder(&self, kind: BlobKind) -> &Mutex<PackBuilder> {
        match kind {
            BlobKind::Data => &self.data,
            BlobKind::Tree => &self.tree,
        }
    }

    /// Returns the first upload error, if any occurred.
    pub fn check(&self) -> Result<()> {
        let mut failure = lock(&self.failure);
        match failure.take() {
            Some(e) => {
                // Keep failing: later checks report the same error.
                let e = match e {
                    Error::Shared(e) => e,
                    e => std::sync::Arc::new(e),
                };
                *failure = Some(Error::Shared(e.clone()));
                Err(Error::Shared(e))
            }
            None => Ok(()),
        }
    }

    fn upload(&self, pack: FinishedPack) -> Result<()> {
        // Wait for a slot: this is the back-pressure that bounds memory.
        let permit = self
            .handle
            .block_on(self.permits.clone().acquire_owned())
            .map_err(|_| Error::TaskFailed {
                what: "upload",
                reason: "upload slots closed".into(),
            })?;
        let store = self.store.clone();
        let uploaded = self.uploaded.clone();
        let failure = self.failure.clone();
        let stats = self.stats.clone();
        let key = pack_key(pack.kind, &pack.id);
        let task = self.handle.spawn(async move {
            let len = pack.bytes.len() as u64;
            let res = store.put(&key, Bytes::from(pack.bytes)).await;
            drop(permit);
            match res {
                Ok(()) => {
                    stats.new_stored_bytes.fetch_add(len, Ordering::Relaxed);
                    lock(&uploaded).push((pack.kind, pack.id, pack.entries));
                }
                Err(e) => {
                    lock(&failure).get_or_insert(e.into());
                }
            }
        });
        lock(&self.uploads).push(task);
        Ok(())
    }

    /// Writes an index checkpoint if enough new packs were stored since the last one.
    pub fn maybe_checkpoint(&self) -> Result<()> {
        let stored = self.stats.new_stored_bytes.load(Ordering::Relaxed);
        let since = stored.saturating_sub(lock(&self.checkpointed).1);
        if since < self.checkpoint_bytes {
            return Ok(());
        }
        // One checkpoint at a time; a thread that finds one being written skips its turn.
        let Ok(_one) = self.checkpointing.try_lock() else {
            return Ok(());
        };
        let (packs, upto) = {
            let up = lock(&self.uploaded);
            let cp = lock(&self.checkpointed);
            (up[cp.0..].to_vec(), up.len())
        };
        let key = self.write_index(&packs)?;
        let mut cp = lock(&self.checkpointed);
        cp.0 = upto;
        cp.1 = stored;
        cp.2.push(key);
        Ok(())
    }

    /// Writes one index file describing `packs`; returns its key.
    fn write_index(&self, packs: &[(BlobKind, Id, Vec<PackEntry>)]) -> Result<String> {
        let mut ib = IndexBuilder::new();
        for (kind, id, entries) in packs {
            ib.add_pack(*kind, *id, entries);
        }
        let (key, bytes) = ib.encode();
        self.handle
            .block_on(self.store.put(&key, Bytes::from(bytes)))?;
        Ok(key)
    }

    /// Flushes the open packs, waits for every upload, writes the session's index file and
    /// removes its checkpoints. Returns the index key (if anything new was written).
    pub fn finish(&self) -> Result<Option<String>> {
        for kind in [BlobKind::Data, BlobKind::Tree] {
            let b = std::mem::replace(&mut *lock(self.builder(kind)), PackBuilder::new(kind, 0));
            if !b.is_empty() {
                self.upload(b.finish())?;
            }
        }
        let tasks = std::mem::take(&mut *lock(&self.uploads));
        for t in tasks {
            self.handle.block_on(t).map_err(|e| Error::TaskFailed {
                what: "upload",
                reason: e.to_string(),
            })?;
        }
        self.check()?;
        let packs = std::mem::take(&mut *lock(&self.uploaded));
        if packs.is_empty() {
            return Ok(None);
        }
        let key = self.write_index(&packs)?;
        let partials = std::mem::take(&mut lock(&self.checkpointed).2);
        for p in partials.iter().filter(|p| **p != key) {
            // A leftover checkpoint only duplicates entries; failing to delete it is harmless.
            if let Err(e) = self.handle.block_on(self.store.delete(p)) {
                tracing::warn!("could not remove index checkpoint {p}: {e}");
            }
        }
        Ok(Some(key))
    }
}
