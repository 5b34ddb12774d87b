//! The decompressed-chunk cache.
//!
//! Kernel reads are 128 KiB to 1 MiB while chunks average 1 MiB (up to 8 MiB), so without a cache
//! every chunk would be fetched and decompressed several times (one project's mount did 150× too
//! much work this way). Chunks are kept in an LRU bounded by bytes (`--cache-size`). Concurrent
//! misses of one chunk are merged: the first caller fetches, the others wait for its result.
//! An optional on-disk cache (`--cache-dir`) keeps fetched chunks across remounts; chunks read
//! back from it are verified against their id like any other.

use backtree_core::Id;
use bytes::Bytes;
use lru::LruCache;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;

type Shared = Arc<OnceCell<Result<Bytes, String>>>;

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

struct Lru {
    map: LruCache<Id, Bytes>,
    bytes: usize,
}

/// A byte-bounded LRU of decompressed, verified chunks with merged concurrent misses.
pub struct ChunkCache {
    limit: usize,
    fetches: tokio::sync::Semaphore,
    lru: Mutex<Lru>,
    inflight: Mutex<HashMap<Id, Shared>>,
    disk: Option<PathBuf>,
}

impl ChunkCache {
    /// `fetches`: chunk fetches in flight at most ([`MAX_FETCHES`], [`MAX_FETCHES_REMOTE`]).
    pub fn new(limit: usize, fetches: usize, disk: Option<PathBuf>) -> Self {
        ChunkCache {
            limit,
            fetches: tokio::sync::Semaphore::new(fetches.max(1)),
            lru: Mutex::new(Lru {
                map: LruCache::unbounded(),
                bytes: 0,
            }),
            inflight: Mutex::new(HashMap::new()),
            disk,
        }
    }

    /// A cached chunk, without fetching.
    pub fn peek(&self, id: &Id) -> Option<Bytes> {
        lock(&self.lru).map.get(id).cloned()
    }

    /// A cached chunk, removed from the cache: for a reader that consumes it whole, after which
    /// the kernel's page cache holds its bytes (a chunk decoded ahead need not stay twice).
    pub fn take(&self, id: &Id) -> Option<Bytes> {
        let mut l = lock(&self.lru);
        let data = l.map.pop(id)?;
        l.bytes -= data.len();
        Some(data)
    }

    /// Whether a chunk is cached or being fetched.
    pub fn present(&self, id: &Id) -> bool {
        lock(&self.lru).map.contains(id) || lock(&self.inflight).contains_key(id)
    }

    /// Keeps a verified chunk (also one decoded elsewhere: on the FUSE thread, from a pack
    /// window).
    pub fn put(&self, id: Id, data: Bytes) {
        let mut l = lock(&self.lru);
        if data.len() > self.limit {
            return;
        }
        l.bytes += data.len();
        if let Some(old) = l.map.put(id, data) {
            l.bytes -= old.len();
        }
        while l.bytes > self.limit {
            match l.map.pop_lru() {
                Some((_, v)) => l.bytes -= v.len(),
                None => break,
            }
        }
    }

    /// Bytes currently held.
    pub fn bytes(&self) -> usize {
        lock(&self.lru).bytes
    }

    fn disk_path(&self, id: &Id) -> Option<PathBuf> {
        let hex = id.to_hex();
        self.disk.as_ref().map(|d| d.join(&hex[..2]).join(hex))
    }

    /// Returns the chunk: from memory, from the disk cache (verified), or from `fetch`, which
    /// must return the verified chunk. Errors are messages that name the blob and its pack.
    /// `keep` false: a chunk that the caller consumes whole is not kept in memory (the kernel's
    /// page cache keeps the file's pages); keeping every small file of a restore would only
    /// churn the cache and fragment the heap.
    pub async fn get<F, Fut>(&self, id: &Id, keep: bool, fetch: F) -> Result<Bytes, String>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, String>>,
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

    async fn fetch<F, Fut>(&self, id: &Id, fetch: F) -> Result<Bytes, String>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, String>>,
    {
        let _slot = self.fetches.acquire().await.map_err(|e| e.to_string())?;
        if let Some(p) = self.disk_path(id) {
            if let Ok(b) = tokio::fs::read(&p).await {
                if Id::of(&b) == *id {
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
