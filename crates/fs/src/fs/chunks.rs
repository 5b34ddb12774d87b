//! File data: verified chunks from the chunk cache, from pack windows, or from the store.
//!
//! [`Chunks::get`] is the one way a read obtains a chunk. In order of cost:
//! 1. the decompressed-chunk cache ([`ChunkCache`]): a copy;
//! 2. a small chunk whose stored bytes a pack window holds ([`crate::packwin`]): decoded and
//!    verified right here, on the calling (FUSE) thread, which saves two thread hand-offs per
//!    small file ([`INLINE_DECODE`]);
//! 3. a fetch through the cache, which merges concurrent misses of one chunk and bounds the
//!    fetches in flight; a large chunk is decoded on the blocking pool.
//!
//! A reader that consumes a chunk whole takes it out of the cache: the kernel's page cache
//! holds its bytes from then on, and keeping every small file of a restore would only churn the
//! cache.

use crate::cache::{ChunkCache, ChunkResult};
use crate::packwin::PackReader;
use backtree_core::blob::{self, StoredBlob};
use backtree_core::{BlobKind, Id};
use bytes::Bytes;
use std::sync::Arc;

/// A small chunk found in a pack window is decoded on the thread at hand if it decodes to at
/// most this much (about 50 µs of zstd and BLAKE3), which saves two thread hand-offs per file.
const INLINE_DECODE: u32 = 256 << 10;

/// The chunk cache and the pack windows, and how to fill them.
pub(super) struct Chunks {
    pub(super) packs: Arc<PackReader>,
    pub(super) cache: Arc<ChunkCache>,
    /// Whether small chunks may be decoded from windows directly. Not with an on-disk cache
    /// (`--cache-dir`): chunks then go through the cache's fetch, which also writes them to disk.
    inline: bool,
}

impl Chunks {
    pub(super) fn new(packs: Arc<PackReader>, cache: Arc<ChunkCache>, inline: bool) -> Self {
        Chunks {
            packs,
            cache,
            inline,
        }
    }

    /// The verified chunk `id`; `whole`: the caller consumes all of it (so it is not kept).
    pub(super) async fn get(&self, id: &Id, whole: bool) -> ChunkResult {
        let cached = if whole {
            self.cache.take(id)
        } else {
            self.cache.peek(id)
        };
        if let Some(data) = cached.or_else(|| self.decode_inline(id, !whole)) {
            return Ok(data);
        }
        let packs = &self.packs;
        self.cache.get(id, !whole, || fetch(packs, *id)).await
    }

    /// A small chunk whose stored bytes are in a pack window, decoded and verified here and
    /// cached if `keep`; `None` if it is not there or too large to decode inline. A chunk that
    /// fails verification is left to the fetch, which reports it.
    fn decode_inline(&self, id: &Id, keep: bool) -> Option<Bytes> {
        if !self.inline {
            return None;
        }
        let data = Bytes::from(self.small_in_window(id)?.decode(id, "").ok()?);
        if keep {
            self.cache.put(*id, data.clone());
        }
        Some(data)
    }

    /// A data chunk's stored bytes, if a pack window holds them and the chunk is small enough
    /// (≤ [`INLINE_DECODE`]) to be decoded on the thread at hand.
    fn small_in_window(&self, id: &Id) -> Option<StoredBlob> {
        self.packs
            .data
            .get(id)
            .filter(|s| s.raw_len <= INLINE_DECODE)
    }

    /// Whether a chunk is in memory or on its way: cached or being fetched, or its stored
    /// bytes in a pack window.
    pub(super) fn at_hand(&self, id: &Id) -> bool {
        self.cache.present(id) || self.packs.data.contains(id)
    }

    /// Decodes and verifies into the cache the small chunks among `ids` (in their order, up to
    /// `budget` decoded bytes) whose stored bytes a pack window holds. Only chunks that
    /// [`get`](Self::get) would decode inline are decoded, so this stays cheap enough for an
    /// async worker. A chunk that fails verification is skipped; its reader reports it.
    pub(super) fn decode_ahead(&self, ids: &[Id], mut budget: usize) {
        for id in ids {
            if self.cache.present(id) {
                continue;
            }
            let Some(stored) = self.small_in_window(id) else {
                continue;
            };
            let len = stored.raw_len as usize;
            if len > budget {
                continue;
            }
            if let Ok(data) = stored.decode(id, "") {
                budget -= len;
                self.cache.put(*id, Bytes::from(data));
            }
        }
    }

    /// Fetches a chunk into the cache in a task of `rt`, unless it is cached or on its way.
    /// Errors surface (and are logged) when a reader gets there.
    pub(super) fn fetch_in_background(self: &Arc<Self>, rt: &tokio::runtime::Handle, id: Id) {
        if self.cache.present(&id) {
            return;
        }
        let me = self.clone();
        rt.spawn(async move {
            let _ = me.cache.get(&id, true, || fetch(&me.packs, id)).await;
        });
    }
}

/// Fetches, decodes and verifies a data chunk. Decoding up to 8 MiB is CPU work: a large chunk
/// is decoded on the blocking pool, off the async workers. Errors name the blob and its pack.
async fn fetch(packs: &PackReader, id: Id) -> ChunkResult {
    let (stored, loc) = packs
        .stored(&id, BlobKind::Data)
        .await
        .map_err(|e| Arc::new(e.for_blob(&id)))?;
    let what = blob::describe(&id, &loc);
    let raw = if stored.raw_len <= INLINE_DECODE {
        stored.decode(&id, &what)
    } else {
        stored.decode_blocking(id, what).await
    };
    raw.map(Bytes::from).map_err(Arc::new)
}
