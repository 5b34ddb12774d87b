//! Read-ahead: every policy that fetches data before it is asked for.

use super::*;

impl BacktreeFs {
    /// Remembers that a directory page was listed, with its first files' first chunks: a
    /// restore reads directories in the order it listed them (see
    /// [`next_dirs_read_ahead`](Self::next_dirs_read_ahead)).
    pub(super) fn note_listed(&self, page_id: Id, page: &backtree_core::tree::Tree) {
        let ids: Vec<Id> = files_first_chunks(&page.entries)
            .take(NEXT_DIR_FILES)
            .collect();
        let mut l = lock(&self.listed);
        if l.len() == LISTED_DIRS {
            l.pop_front();
        }
        l.push_back((page_id, ids));
    }

    /// Read-ahead into the next directories. `rsync` lists directories 0.1–1 s before it reads
    /// their files, and reads them in the order it listed them; so the first file of each
    /// directory was a miss, waiting for its window while nothing else was read. When a
    /// restore enters a directory (the first read of a file in another page than the last),
    /// the first [`NEXT_DIR_FILES`] files of the next [`NEXT_DIRS`] directories listed after it
    /// are read ahead. A `find` reads no files and triggers nothing; a walk that reads in
    /// another order (`cp -r` descends as it lists) finds nothing listed after the directory.
    pub(super) fn next_dirs_read_ahead(&self, page_key: Id) {
        let (Some(rt), want) = (&self.rt, {
            let mut l = lock(&self.listed);
            let Some(at) = l.iter().position(|(k, _)| *k == page_key) else {
                return;
            };
            // This directory and those listed before it are done with (and a second call for
            // it finds nothing).
            l.drain(..=at);
            l.iter()
                .filter(|(_, ids)| !ids.is_empty())
                .take(NEXT_DIRS)
                .flat_map(|(_, ids)| ids.iter().copied())
                .filter(|id| !self.at_hand(id))
                .collect::<Vec<Id>>()
        }) else {
            return;
        };
        if want.is_empty() {
            return;
        }
        self.read_ahead(rt, want, None);
    }

    /// Read-ahead across a directory. A restore (`rsync`, `cp -r`, `tar`) reads a directory's
    /// files one after another in name order, which is the order of the directory page. So the
    /// data of the next [`DIR_READ_AHEAD_FILES`] files of the page is fetched in the background:
    /// the small files' blobs in a few ranged reads ([`PackReader::gather`]) and the first
    /// chunks of at most [`DIR_READ_AHEAD_CHUNKS`] large ones. Their opens and reads
    /// then find the data in memory instead of each waiting for the store in turn, which on S3
    /// is a round trip per window.
    ///
    /// A read-ahead starts at a file's first read when its data is not at hand, and again when
    /// the reader has consumed half of what the last one looked at (the *frontier*), so that a
    /// directory read in order keeps the next windows coming instead of missing once per few
    /// windows (the writer interleaves several directories' files in a pack, so a window holds
    /// only about ten files of one directory).
    pub(super) fn dir_read_ahead(&self, entry: &EntryRef) {
        let (Some(rt), EntryRef::Page(page, idx, page_key)) = (&self.rt, entry) else {
            return;
        };
        let idx = *idx as usize;
        let own_missing = first_chunk(entry).is_some_and(|id| !self.at_hand(&id));
        let page_key = *page_key;
        let end = (idx + 1 + DIR_READ_AHEAD_FILES).min(page.entries.len());
        let (entered, far_enough) = {
            let f = lock(&self.frontier);
            (
                f.0 != page_key,
                f.0 == page_key && f.1 >= idx + DIR_READ_AHEAD_FILES / 2,
            )
        };
        if entered {
            self.next_dirs_read_ahead(page_key);
        }
        // Not a miss, and the last read-ahead of this page still reaches far enough.
        if !own_missing && far_enough {
            return;
        }
        // Not this file: its reader is fetching it (a window, which holds some of its
        // neighbours too).
        let want: Vec<Id> = files_first_chunks(&page.entries[idx + 1..end])
            .filter(|id| !self.at_hand(id))
            .collect();
        if want.is_empty() {
            *lock(&self.frontier) = (page_key, end);
            return;
        }
        if self.read_aheads.fetch_add(1, Ordering::Relaxed) >= MAX_DIR_READ_AHEADS {
            // Too many running: the next file's first read tries again.
            self.read_aheads.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        *lock(&self.frontier) = (page_key, end);
        self.read_ahead(rt, want, Some(self.read_aheads.clone()));
    }

    /// Whether a chunk is in memory or on its way: cached or being fetched, or its stored
    /// bytes in a pack window.
    pub(super) fn at_hand(&self, id: &Id) -> bool {
        self.cache.present(id) || self.packs.data.contains(id)
    }

    /// Reads ahead, in a task, the small blobs among `want` ([`PackReader::gather`]) and the
    /// first chunks of at most [`DIR_READ_AHEAD_CHUNKS`] large ones (into the chunk cache);
    /// then decrements `running`, if given. Errors surface (and are logged) when a reader gets
    /// there.
    pub(super) fn read_ahead(
        &self,
        rt: &tokio::runtime::Handle,
        want: Vec<Id>,
        running: Option<Arc<AtomicUsize>>,
    ) {
        let (packs, cache, gap) = (self.packs.clone(), self.cache.clone(), self.opts.gather_gap);
        // With --cache-dir, chunks go through the cache's fetch, which also writes them to disk.
        // A quarter of the cache at most, so that decoding ahead never pushes out the chunks a
        // large file's reader has prefetched.
        let decode_budget = match self.opts.cache_dir {
            None => self.opts.cache_size / 4,
            Some(_) => 0,
        };
        rt.spawn(async move {
            if let Ok(large) = packs.gather(&want, gap).await {
                decode_ahead(&packs, &cache, &want, decode_budget);
                let first_chunks = large.into_iter().filter(|id| !cache.present(id));
                for id in first_chunks.take(DIR_READ_AHEAD_CHUNKS) {
                    let (cache, packs) = (cache.clone(), packs.clone());
                    tokio::spawn(async move {
                        let _ = cache.get(&id, true, || fetch_chunk(&packs, id)).await;
                    });
                }
            }
            if let Some(running) = running {
                running.fetch_sub(1, Ordering::Relaxed);
            }
        });
    }

    /// Sequential-read detection and prefetch scheduling. A read that continues one of the
    /// file's streams grows that stream's prefetch window; any other read starts a new stream
    /// (replacing the least recently used) and prefetches nothing.
    pub(super) fn note_read(&self, h: &Arc<OpenFile>, offset: u64, end: u64) {
        let now = self.reads.fetch_add(1, Ordering::Relaxed);
        let (from, to) = {
            let mut streams = lock(&h.seq);
            let cap = (self.opts.cache_size as u64 / 2).max(1 << 20);
            // The stream this read continues most closely. A read far ahead of every stream
            // starts a new one while there is room: a second reader 10 MiB further on is
            // within SEQ_FORWARD of the first, but is not the first reader skipping ahead.
            let continuing = streams
                .iter()
                .enumerate()
                .filter(|(_, s)| offset + SEQ_BACKWARD >= s.next && offset <= s.next + SEQ_FORWARD)
                .min_by_key(|(_, s)| s.next.abs_diff(offset))
                .filter(|(_, s)| offset <= s.next + NEW_STREAM || streams.len() == STREAMS)
                .map(|(i, _)| i);
            let Some(i) = continuing else {
                // Random access: fetch only what is asked.
                let fresh = SeqState {
                    next: end,
                    window: 0,
                    prefetched_to: end,
                    used: now,
                };
                if streams.len() < STREAMS {
                    streams.push(fresh);
                } else if let Some(oldest) = streams.iter_mut().min_by_key(|s| s.used) {
                    *oldest = fresh;
                }
                return;
            };
            let s = &mut streams[i];
            s.used = now;
            s.window = if s.window == 0 {
                FIRST_WINDOW
            } else {
                s.window.saturating_mul(2)
            }
            .min(MAX_WINDOW)
            .min(cap);
            s.next = s.next.max(end);
            let target = end.saturating_add(s.window).min(h.chunks.size());
            let from = s.prefetched_to.max(end);
            if target <= from {
                return;
            }
            s.prefetched_to = target;
            (from, target)
        };
        self.prefetch(h, from, to);
    }

    pub(super) fn prefetch(&self, h: &Arc<OpenFile>, from: u64, to: u64) {
        let Some(rt) = &self.rt else { return };
        let list = &h.chunks;
        let Some(mut i) = list.find(from) else { return };
        while i < list.0.len() && list.start(i) < to {
            if let Some(id) = list.0[i].id {
                if !self.cache.present(&id) {
                    let cache = self.cache.clone();
                    let packs = self.packs.clone();
                    // Errors surface (and are logged) when the reader gets there.
                    rt.spawn(async move {
                        let _ = cache.get(&id, true, || fetch_chunk(&packs, id)).await;
                    });
                }
            }
            i += 1;
        }
    }
}

/// A data chunk's stored bytes, if a pack window holds them and the chunk is small enough
/// (≤ [`INLINE_DECODE`]) to be decoded on the thread at hand: a FUSE thread
/// ([`BacktreeFs::decode_inline`]) or a read-ahead's task ([`decode_ahead`]).
pub(super) fn small_in_window(packs: &PackReader, id: &Id) -> Option<crate::packwin::Stored> {
    packs.data.get(id).filter(|s| s.raw_len <= INLINE_DECODE)
}

/// Decodes and verifies, into the chunk cache, the small chunks among `ids` (in their order,
/// up to `budget` decoded bytes) whose stored bytes a read-ahead has just brought into a pack
/// window. Their reads then only copy: decoding at the read put the zstd and BLAKE3 work of
/// every small file (~20–30 µs) into the reader's wait on the FUSE thread, while the
/// read-ahead's task runs beside the reader. A reader that consumes such a chunk whole takes it
/// out of the cache ([`ChunkCache::take`]): the kernel's page cache has it then. Only chunks
/// that [`BacktreeFs::decode_inline`] would decode (≤ [`INLINE_DECODE`]) are decoded here, so a
/// read-ahead of 32 files decodes well under a millisecond's worth and can stay on the async
/// worker. A chunk that fails verification is skipped; its reader reports it.
pub(super) fn decode_ahead(packs: &PackReader, cache: &ChunkCache, ids: &[Id], mut budget: usize) {
    for id in ids {
        if cache.present(id) {
            continue;
        }
        let Some(stored) = small_in_window(packs, id) else {
            continue;
        };
        let len = stored.raw_len as usize;
        if len > budget {
            continue;
        }
        if let Ok(data) = stored.decode(id, "") {
            budget -= len;
            cache.put(*id, Bytes::from(data));
        }
    }
}

/// The tree of a directory entry; ENOTDIR for anything else (and for virtual nodes).
/// The first chunks of the regular files among `entries` that carry their chunk list.
pub(super) fn files_first_chunks(entries: &[Entry]) -> impl Iterator<Item = Id> + '_ {
    entries
        .iter()
        .filter(|e| e.kind == Kind::File)
        .filter_map(first_chunk)
}

/// The first chunk of a file whose entry carries its chunk list.
pub(super) fn first_chunk(e: &Entry) -> Option<Id> {
    e.chunks
        .as_ref()
        .and_then(|c| c.0.first())
        .and_then(|c| c.id)
}
