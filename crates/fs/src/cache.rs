//! The decompressed-chunk cache.
//!
//! Kernel reads are 128 KiB to 1 MiB while chunks average 1 MiB (up to 8 MiB), so without a cache
//! every chunk would be fetched and decompressed several times (one project's mount did 150× too
//! much work this way). Chunks are kept in an LRU bounded by bytes (`--cache-size`). Concurrent
//! misses of one chunk are merged: the first caller fetches, the others wait for its result.
//! An optional on-disk cache (`--cache-dir`) keeps fetched chunks across remounts; chunks read
//! back from it are verified against their id like any other ([`blob::verify`]).
//!
//! Errors stay typed ([`backtree_core::Error`], so a caller can tell a missing blob, a corrupt
//! one and an unreachable store apart with [`backtree_core::Error::kind`]); they are shared in
//! an `Arc` because one fetch's result goes to every caller that waited for it.

use backtree_core::{blob, Error, Id};
use bytes::Bytes;
use lru::LruCache;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;

/// The result of one chunk fetch, shared by every caller that waited for it.
pub type ChunkResult = Result<Bytes, Arc<Error>>;

type Shared = Arc<OnceCell<ChunkResult>>;

/// Chunk fetches in flight at once on a local store. Each holds a stored and a decoded chunk
/// (up to 2 × 8 MiB), so this bounds memory beyond the cache; 8 keeps two cores busy decoding
/// while reads of the next chunks are outstanding.
pub const MAX_FETCHES: usize = 8;
/// The same on S3, where a fetch mostly waits: bytes in flight must cover bandwidth × latency
/// (16 × 1 MiB chunks at 20 ms is 800 MB/s), still bounded by the prefetch window.
pub const MAX_FETCHES_REMOTE: usize = 16;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An LRU bounded by the bytes its values take (each value's size is given when it is put).
/// The chunk cache and the parsed directory pages use it.
pub struct SizedLru<V> {
    map: LruCache<Id, (V, usize)>,
    bytes: usize,
    limit: usize,
}

impl<V: Clone> SizedLru<V> {
    pub fn new(limit: usize) -> Self {
        SizedLru {
            map: LruCache::unbounded(),
            bytes: 0,
            limit,
        }
    }

    /// The value, marked as recently used.
    pub fn get(&mut self, id: &Id) -> Option<V> {
        self.map.get(id).map(|(v, _)| v.clone())
    }

    /// Removes and returns the value.
    pub fn pop(&mut self, id: &Id) -> Option<V> {
        let (v, size) = self.map.pop(id)?;
        self.bytes -= size;
        Some(v)
    }

    pub fn contains(&self, id: &Id) -> bool {
        self.map.contains(id)
    }

    /// Keeps `value`, which takes `size` bytes, evicting the least recently used until the
    /// bytes are within the limit again; a value larger than the limit is not kept.
    pub fn put(&mut self, id: Id, value: V, size: usize) {
        if size > self.limit {
            return;
        }
        self.bytes += size;
        if let Some((_, old)) = self.map.put(id, (value, size)) {
            self.bytes -= old;
        }
        while self.bytes > self.limit {
            match self.map.pop_lru() {
                Some((_, (_, n))) => self.bytes -= n,
                None => break,
            }
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Removes every value, returning them.
    pub fn clear(&mut self) -> Vec<V> {
        self.bytes = 0;
        let mut out = Vec::with_capacity(self.map.len());
        while let Some((_, (v, _))) = self.map.pop_lru() {
            out.push(v);
        }
        out
    }
}

/// A byte-bounded LRU of decompressed, verified chunks with merged concurrent misses.
pub struct ChunkCache {
    fetches: tokio::sync::Semaphore,
    lru: Mutex<SizedLru<Bytes>>,
    inflight: Mutex<HashMap<Id, Shared>>,
    disk: Option<PathBuf>,
}

impl ChunkCache {
    /// `fetches`: chunk fetches in flight at most ([`MAX_FETCHES`], [`MAX_FETCHES_REMOTE`]).
    pub fn new(limit: usize, fetches: usize, disk: Option<PathBuf>) -> Self {
        ChunkCache {
            fetches: tokio::sync::Semaphore::new(fetches.max(1)),
            lru: Mutex::new(SizedLru::new(limit)),
            inflight: Mutex::new(HashMap::new()),
            disk,
        }
    }

    /// A cached chunk, without fetching.
    pub fn peek(&self, id: &Id) -> Option<Bytes> {
        lock(&self.lru).get(id)
    }

    /// A cached chunk, removed from the cache: for a reader that consumes it whole, after which
    /// the kernel's page cache holds its bytes (a chunk decoded ahead need not stay twice).
    pub fn take(&self, id: &Id) -> Option<Bytes> {
        lock(&self.lru).pop(id)
    }

    /// Whether a chunk is cached or being fetched.
    pub fn present(&self, id: &Id) -> bool {
        lock(&self.lru).contains(id) || lock(&self.inflight).contains_key(id)
    }

    /// Keeps a verified chunk (also one decoded elsewhere: on the FUSE thread, from a pack
    /// window).
    pub fn put(&self, id: Id, data: Bytes) {
        let size = data.len();
        lock(&self.lru).put(id, data, size);
    }

    /// Bytes currently held.
    pub fn bytes(&self) -> usize {
        lock(&self.lru).bytes()
    }

    fn disk_path(&self, id: &Id) -> Option<PathBuf> {
        let hex = id.to_hex();
        self.disk.as_ref().map(|d| d.join(&hex[..2]).join(hex))
    }

    /// Returns the chunk: from memory, from the disk cache (verified), or from `fetch`, which
    /// must return the verified chunk. Errors are `fetch`'s, which should name the blob and its
    /// pack.
    /// `keep` false: a chunk that the caller consumes whole is not kept in memory (the kernel's
    /// page cache keeps the file's pages); keeping every small file of a restore would only
    /// churn the cache and fragment the heap.
    pub async fn get<F, Fut>(&self, id: &Id, keep: bool, fetch: F) -> ChunkResult
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = ChunkResult>,
    {
        if let Some(b) = self.peek(id) {
            return Ok(b);
        }
        let cell = lock(&self.inflight)
            .entry(*id)
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let res = cell
            .get_or_init(|| async {
                if let Some(b) = self.peek(id) {
                    return Ok(b);
                }
                let res = self.fetch(id, fetch).await;
                if let Ok(b) = &res {
                    if keep {
                        self.put(*id, b.clone());
                    }
                }
                res
            })
            .await
            .clone();
        lock(&self.inflight).remove(id);
        res
    }

    async fn fetch<F, Fut>(&self, id: &Id, fetch: F) -> ChunkResult
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = ChunkResult>,
    {
        let _slot = self.fetches.acquire().await.map_err(|e| {
            Arc::new(Error::TaskFailed {
                what: "chunk fetch",
                reason: e.to_string(),
            })
        })?;
        if let Some(p) = self.disk_path(id) {
            if let Ok(b) = tokio::fs::read(&p).await {
                let what = format!("cached chunk {}", p.display());
                if blob::verify(id, &b, &what).is_ok() {
                    return Ok(Bytes::from(b));
                }
                // A damaged cache file is simply fetched again.
                let _ = tokio::fs::remove_file(&p).await;
            }
        }
        let data = fetch().await?;
        if let Some(p) = self.disk_path(id) {
            let d = data.clone();
            // Best effort: a full or read-only cache directory only costs refetches.
            let _ = tokio::task::spawn_blocking(move || write_atomic(&p, &d)).await;
        }
        Ok(data)
    }
}

fn write_atomic(p: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = p.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> Id {
        Id([n; 32])
    }

    #[test]
    fn sized_lru_keeps_within_its_bytes_least_recently_used_first() {
        let mut l = SizedLru::new(100);
        l.put(id(1), "a", 40);
        l.put(id(2), "b", 40);
        assert_eq!(l.get(&id(1)), Some("a")); // 1 is now the most recently used
        l.put(id(3), "c", 40); // 120 > 100: 2 goes
        assert_eq!((l.get(&id(2)), l.bytes()), (None, 80));
        assert!(l.contains(&id(1)) && l.contains(&id(3)));
        // Replacing a value counts its new size only; a value over the limit is not kept.
        l.put(id(3), "c2", 10);
        assert_eq!(l.bytes(), 50);
        l.put(id(4), "huge", 101);
        assert_eq!((l.get(&id(4)), l.bytes()), (None, 50));
        assert_eq!(l.pop(&id(1)), Some("a"));
        assert_eq!(l.bytes(), 10);
        assert_eq!(l.clear(), vec!["c2"]);
        assert_eq!(l.bytes(), 0);
    }

    #[tokio::test]
    async fn errors_stay_typed_and_are_not_cached() {
        let cache = ChunkCache::new(1 << 20, 2, None);
        let unavailable = || async {
            Err(Arc::new(Error::Store(
                backtree_store::StoreError::Unavailable {
                    key: "packs/data/aa/bb".into(),
                    message: "injected".into(),
                },
            )))
        };
        let err = cache.get(&id(1), true, unavailable).await.unwrap_err();
        assert_eq!(err.kind(), backtree_core::ErrorKind::Unavailable);
        assert!(!cache.present(&id(1)));
        let data = Bytes::from_static(b"chunk");
        let got = cache.get(&id(1), true, || async { Ok(data.clone()) }).await;
        assert_eq!(got.unwrap(), data);
        assert_eq!(cache.peek(&id(1)), Some(data));
    }

    #[tokio::test]
    async fn disk_cache_files_are_verified() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::new(0, 2, Some(dir.path().to_owned()));
        let raw = Bytes::from_static(b"a chunk");
        let cid = Id::of(&raw);
        let fetched = cache.get(&cid, false, || async { Ok(raw.clone()) }).await;
        assert_eq!(fetched.unwrap(), raw);
        // Read back from disk: no fetch.
        let never = || async { Err(Arc::new(Error::BlobNotIndexed { id: Id([0; 32]) })) };
        assert_eq!(cache.get(&cid, false, never).await.unwrap(), raw);
        // A damaged file is fetched again.
        let p = cache.disk_path(&cid).unwrap();
        std::fs::write(&p, b"a chunK").unwrap();
        let err = cache.get(&cid, false, never).await.unwrap_err();
        assert_eq!(err.kind(), backtree_core::ErrorKind::NotFound);
    }
}
