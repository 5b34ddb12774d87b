//! Read-ahead: every policy that fetches data before a reader asks for it.
//!
//! A restore reads in patterns the mount can predict, and each policy below hides the store's
//! latency (one `pread` and two thread hand-offs locally, an HTTP round trip on S3) for one of
//! them. All of them only fill the chunk cache or the pack windows ([`Chunks`]); errors are
//! left to the reader who gets there, which reports them.
//!
//! 1. **Sequential streams within a file** ([`ReadAhead::read`]). Each file keeps up to
//!    [`STREAMS`] sequential readers apart. A read that continues a stream grows its prefetch
//!    window, starting at [`FIRST_WINDOW`] and doubling each time the reader moves on, up to
//!    [`MAX_WINDOW`] and half the cache; the chunks in the window are fetched by background
//!    tasks. A read within +[`SEQ_FORWARD`]/−[`SEQ_BACKWARD`] of a stream still continues it
//!    (the kernel reorders readahead), as mountpoint-s3 tolerates; any other read is random
//!    access and prefetches nothing.
//! 2. **Across a directory** ([`ReadAhead::opened`]). `rsync`, `cp -r` and `tar` read a
//!    directory's files one after another in name order, the order of its page. When a file is
//!    first read and its data is not at hand, or the reader has consumed half of what the last
//!    read-ahead looked at (the *frontier*), the next [`DIR_READ_AHEAD_FILES`] files' data is
//!    fetched: the small files' blobs in a few ranged reads ([`PackReader::gather`]), decoded
//!    ahead into the cache within a quarter of it, and the first chunks of at most
//!    [`DIR_READ_AHEAD_CHUNKS`] large files.
//! 3. **Into the next listed directories** ([`ReadAhead::listed`]). `rsync` lists directories
//!    0.1–1 s before it reads their files, and reads them in the order it listed them. When a
//!    restore enters a directory, the first [`NEXT_DIR_FILES`] files of the next [`NEXT_DIRS`]
//!    directories listed after it are read ahead as in 2. A `find` reads no files and triggers
//!    nothing.
//!
//! Below these, the pack windows read a small blob's neighbours with it
//! ([`crate::packwin`]), and the kernel's own readahead (`read_ahead_kb`, set by
//! [`crate::mount`]) keeps several 1 MiB reads of one file in flight.
//!
//! [`PackReader::gather`]: crate::packwin::PackReader::gather

use super::chunks::Chunks;
use super::error::lock;
use super::inodes::EntryRef;
use backtree_core::chunklist::FileChunks;
use backtree_core::tree::{Entry, Kind, Tree};
use backtree_core::Id;
use backtree_core::Repository;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// First prefetch window: about one chunk plus one kernel read, as mountpoint-s3 starts.
pub const FIRST_WINDOW: u64 = (1 << 20) + (128 << 10);
/// Largest prefetch window.
pub const MAX_WINDOW: u64 = 64 << 20;
/// A read within this distance after the previous one still counts as sequential (the kernel
/// reorders readahead requests): +16 MiB / −1 MiB, as mountpoint-s3 tolerates.
const SEQ_FORWARD: u64 = 16 << 20;
const SEQ_BACKWARD: u64 = 1 << 20;
/// Sequential readers of one file told apart: concurrent readers of a file share its state.
const STREAMS: usize = 4;
/// A read further than this ahead of the nearest stream starts a new stream (while fewer than
/// [`STREAMS`] exist). The kernel keeps up to its readahead (4 MiB as `backtree mount` sets it,
/// [`crate::mount::READ_AHEAD_KB`]) of one reader's reads in flight, and two FUSE threads may
/// answer them out of order: twice that is still the same reader.
const NEW_STREAM: u64 = 8 << 20;
/// Directory read-ahead: files looked at, large files' first chunks fetched at most per
/// read-ahead, and read-aheads running at once.
const DIR_READ_AHEAD_FILES: usize = 32;
const DIR_READ_AHEAD_CHUNKS: usize = 2;
const MAX_DIR_READ_AHEADS: usize = 4;
/// Read-ahead into the next directories: directories ahead, files of each, and listed
/// directories remembered (about 350 bytes each).
const NEXT_DIRS: usize = 2;
const NEXT_DIR_FILES: usize = 8;
const LISTED_DIRS: usize = 1024;

/// One sequential reader's progress.
#[derive(Default, Clone, Copy)]
struct SeqState {
    next: u64,
    window: u64,
    prefetched_to: u64,
    /// When this stream was last used (a counter), for replacing the oldest.
    used: u64,
}

/// A file's sequential readers, at most [`STREAMS`].
pub(super) struct Streams(Mutex<Vec<SeqState>>);

impl Default for Streams {
    fn default() -> Self {
        Streams(Mutex::new(vec![SeqState::default()]))
    }
}

/// Settings of the read-ahead, from the mount's options.
pub(super) struct Budget {
    /// Largest prefetch window of one stream: half the chunk cache, at least 1 MiB.
    pub(super) window: u64,
    /// Largest gap between two small blobs of a pack that one read spans.
    pub(super) gather_gap: u64,
    /// Bytes a directory read-ahead may decode into the cache (0: none).
    pub(super) decode: usize,
}

/// The read-ahead policies' state (see the module docs).
pub(super) struct ReadAhead {
    /// The runtime read-ahead tasks run on (requests may arrive on FUSE threads outside it).
    rt: Option<tokio::runtime::Handle>,
    chunks: Arc<Chunks>,
    budget: Budget,
    /// Directory read-aheads running.
    running: Arc<AtomicUsize>,
    /// How far the last directory read-ahead looked: (directory page, entry index).
    frontier: Mutex<(Id, usize)>,
    /// Directory pages in the order they were listed, with their first files' first chunks.
    listed: Mutex<VecDeque<(Id, Vec<Id>)>>,
    /// Counts reads, to order sequential streams by last use.
    reads: AtomicU64,
}

impl ReadAhead {
    pub(super) fn new(chunks: Arc<Chunks>, budget: Budget) -> Self {
        ReadAhead {
            rt: tokio::runtime::Handle::try_current().ok(),
            chunks,
            budget,
            running: Default::default(),
            frontier: Mutex::new((Id([0; 32]), 0)),
            listed: Mutex::new(Default::default()),
            reads: AtomicU64::new(0),
        }
    }

    /// Policy 1: a read of `offset..end` of a file with chunk list `list` and streams
    /// `streams`. A read that continues a stream grows its window and prefetches it; any other
    /// read starts a new stream (replacing the least recently used) and prefetches nothing.
    /// A paged list's pieces in the window are found by a background task that fetches the
    /// pages it needs (the next page ahead of the reader, usually) through the list's own cache.
    pub(super) fn read(
        &self,
        streams: &Streams,
        file: &FileChunks,
        repo: &Arc<Repository>,
        offset: u64,
        end: u64,
    ) {
        let now = self.reads.fetch_add(1, Ordering::Relaxed);
        let (from, to) = {
            let mut streams = lock(&streams.0);
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
            .min(self.budget.window);
            s.next = s.next.max(end);
            let target = end.saturating_add(s.window).min(file.size());
            let from = s.prefetched_to.max(end);
            if target <= from {
                return;
            }
            s.prefetched_to = target;
            (from, target)
        };
        let Some(rt) = &self.rt else { return };
        let list = match file {
            FileChunks::Whole(list) => list,
            FileChunks::Paged(_) => {
                let (file, repo, chunks, rt2) =
                    (file.clone(), repo.clone(), self.chunks.clone(), rt.clone());
                rt.spawn(async move {
                    let mut pos = from;
                    while pos < to {
                        // A page that fails is reported by the read that needs it.
                        let Ok(Some(page)) = file.page_at(&repo, pos).await else {
                            return;
                        };
                        let Some(mut i) = page.find(pos) else { return };
                        while i < page.list.0.len() && page.start(i) < to {
                            if let Some(id) = page.list.0[i].id {
                                chunks.fetch_in_background(&rt2, id);
                            }
                            i += 1;
                        }
                        pos = page.end();
                    }
                });
                return;
            }
        };
        let Some(mut i) = list.find(from) else { return };
        while i < list.0.len() && list.start(i) < to {
            if let Some(id) = list.0[i].id {
                self.chunks.fetch_in_background(rt, id);
            }
            i += 1;
        }
    }

    /// Policy 2 (and the trigger of 3): a file's read state was just made, for its first read.
    pub(super) fn opened(&self, entry: &EntryRef) {
        let (Some(rt), EntryRef::Page(page, idx, page_key)) = (&self.rt, entry) else {
            return;
        };
        let idx = *idx as usize;
        let own_missing = first_chunk(entry).is_some_and(|id| !self.chunks.at_hand(&id));
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
            self.next_dirs(rt, page_key);
        }
        // Not a miss, and the last read-ahead of this page still reaches far enough.
        if !own_missing && far_enough {
            return;
        }
        // Not this file: its reader is fetching it (a window, which holds some of its
        // neighbours too).
        let want: Vec<Id> = files_first_chunks(&page.entries[idx + 1..end])
            .filter(|id| !self.chunks.at_hand(id))
            .collect();
        if want.is_empty() {
            *lock(&self.frontier) = (page_key, end);
            return;
        }
        if self.running.fetch_add(1, Ordering::Relaxed) >= MAX_DIR_READ_AHEADS {
            // Too many running: the next file's first read tries again.
            self.running.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        *lock(&self.frontier) = (page_key, end);
        self.fetch(rt, want, Some(self.running.clone()));
    }

    /// Policy 3, first half: a directory page was listed, with these first files.
    pub(super) fn listed(&self, page_id: Id, page: &Tree) {
        let ids: Vec<Id> = files_first_chunks(&page.entries)
            .take(NEXT_DIR_FILES)
            .collect();
        let mut l = lock(&self.listed);
        if l.len() == LISTED_DIRS {
            l.pop_front();
        }
        l.push_back((page_id, ids));
    }

    /// Policy 3, second half: a restore entered the directory page `page_key`; reads ahead the
    /// first files of the next directories listed after it. A walk that reads in another
    /// order (`cp -r` descends as it lists) finds nothing listed after the directory.
    fn next_dirs(&self, rt: &tokio::runtime::Handle, page_key: Id) {
        let want: Vec<Id> = {
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
                .filter(|id| !self.chunks.at_hand(id))
                .collect()
        };
        if !want.is_empty() {
            self.fetch(rt, want, None);
        }
    }

    /// Reads ahead, in a task, the small blobs among `want` ([`PackReader::gather`]), decodes
    /// them into the cache, and fetches the first chunks of at most [`DIR_READ_AHEAD_CHUNKS`]
    /// large ones; then decrements `running`, if given.
    ///
    /// [`PackReader::gather`]: crate::packwin::PackReader::gather
    fn fetch(&self, rt: &tokio::runtime::Handle, want: Vec<Id>, running: Option<Arc<AtomicUsize>>) {
        let (chunks, gap, budget) = (
            self.chunks.clone(),
            self.budget.gather_gap,
            self.budget.decode,
        );
        let handle = rt.clone();
        rt.spawn(async move {
            if let Ok(large) = chunks.packs.gather(&want, gap).await {
                chunks.decode_ahead(&want, budget);
                let first_chunks = large.into_iter().filter(|id| !chunks.cache.present(id));
                for id in first_chunks.take(DIR_READ_AHEAD_CHUNKS) {
                    chunks.fetch_in_background(&handle, id);
                }
            }
            if let Some(running) = running {
                running.fetch_sub(1, Ordering::Relaxed);
            }
        });
    }
}

/// The first chunks of the regular files among `entries` that carry their chunk list.
fn files_first_chunks(entries: &[Entry]) -> impl Iterator<Item = Id> + '_ {
    entries
        .iter()
        .filter(|e| e.kind == Kind::File)
        .filter_map(first_chunk)
}

/// The first chunk of a file whose entry carries its chunk list.
fn first_chunk(e: &Entry) -> Option<Id> {
    e.chunks
        .as_ref()
        .and_then(|c| c.0.first())
        .and_then(|c| c.id)
}
