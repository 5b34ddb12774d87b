//! Directories inside generations: the parsed-page cache, lookups, directory handles and
//! readdir.
//!
//! A directory is a tree blob; a large one is split into pages sorted by name
//! (docs/format.md), so a lookup parses one page and a listing one page at a time. Parsed pages
//! are kept in an LRU bounded by bytes ([`PARSED_PAGE_BYTES`]); their stored (compressed) bytes
//! stay longer in the tree windows of [`PackReader`], so an evicted page is decoded and parsed
//! again from memory, on the calling (FUSE) thread when it is small ([`INLINE_TREE`]). `rsync`
//! lists directories up to a second before it reads their files, by which time hundreds of
//! other pages have been parsed, so this is what lets its requests be answered without a thread
//! hand-off.

use super::error::{lock, Failures, FsError, Result};
use super::inodes::{entry_attr, entry_ino, Attr, EntryAt, EntryRef, Node};
use super::namespace::GenCtx;
use super::{hand_off, LONG_TTL};
use crate::cache::SizedLru;
use crate::packwin::PackReader;
use backtree_core::tree::{Entry, Kind, Tree};
use backtree_core::{BlobKind, Id};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Bytes of parsed directory pages kept in memory ([`Tree::mem_size`], an LRU). A page of
/// 4096 entries takes about 1–2 MB parsed, a typical directory's a few KiB. Bounded by bytes,
/// not by count: 256 pages (the bound until 2026-12-01) were 8 MB of an `rsync` restore's
/// peak, and could have been far more with large directories.
const PARSED_PAGE_BYTES: usize = 4 << 20;
/// A directory page not parsed yet (or evicted) is decoded and parsed on the calling thread if
/// it decodes to at most this much: a few hundred entries, under 100 µs (parsing dominates),
/// less than a hand-off to another thread. Larger pages are parsed on a worker.
const INLINE_TREE: u32 = 64 << 10;
/// Listing offsets: page index × `PAGE_SPAN` + index in the page + 1, so a paged directory is
/// listed one page at a time without holding it all in memory.
const PAGE_SPAN: u64 = 1 << 20;

/// A directory listing item.
#[derive(Debug, Clone)]
pub struct DirItem {
    pub ino: u64,
    /// Offset of the *next* item (what the kernel passes back to continue).
    pub next: u64,
    pub name: Vec<u8>,
    pub attr: Attr,
    pub ttl: Duration,
    pub node: Node,
}

/// An open directory.
pub(super) enum DirHandle {
    /// Root or host directory: a snapshot of its items taken at opendir.
    Virtual(Vec<DirItem>),
    /// A generation directory, listed page by page.
    Gen {
        gen: Arc<GenCtx>,
        path: Arc<[u8]>,
        ino: u64,
        tree: Id,
    },
}

/// Parsed directory pages and open directory handles.
pub(super) struct Dirs {
    packs: Arc<PackReader>,
    failures: Arc<Failures>,
    pages: Mutex<SizedLru<Arc<Tree>>>,
    handles: Mutex<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
}

impl Dirs {
    pub(super) fn new(packs: Arc<PackReader>, failures: Arc<Failures>) -> Self {
        Dirs {
            packs,
            failures,
            pages: Mutex::new(SizedLru::new(PARSED_PAGE_BYTES)),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    /// A parsed directory page without waiting: parsed earlier, or small and decoded here from
    /// a tree window. A page that fails to decode is left to [`page`](Self::page), which
    /// reports it.
    fn page_at_hand(&self, id: &Id) -> Option<Arc<Tree>> {
        if let Some(t) = lock(&self.pages).get(id) {
            return Some(t);
        }
        let stored = self.packs.trees.get(id)?;
        if stored.raw_len > INLINE_TREE {
            return None;
        }
        let what = format!("tree {id}");
        let raw = stored.decode(id, &what).ok()?;
        let t = Arc::new(Tree::decode(&what, &raw).ok()?);
        lock(&self.pages).put(*id, t.clone(), t.mem_size());
        Some(t)
    }

    /// The parsed directory page `id` of the directory at `path` (named in errors).
    pub(super) async fn page(&self, gen: &GenCtx, path: &[u8], id: &Id) -> Result<Arc<Tree>> {
        if let Some(t) = self.page_at_hand(id) {
            return Ok(t);
        }
        // A large page is parsed, and a missing one fetched, off the FUSE thread.
        hand_off().await;
        let t = self.load(id).await.map_err(|e| {
            self.failures
                .fail(format!("{}: directory", gen.describe(path)), e)
        })?;
        let t = Arc::new(t);
        lock(&self.pages).put(*id, t.clone(), t.mem_size());
        Ok(t)
    }

    /// Reads and parses a tree blob, fetching its pack's neighbourhood on a miss.
    async fn load(&self, id: &Id) -> backtree_core::Result<Tree> {
        let what = format!("tree {id}");
        let (stored, _) = self.packs.stored(id, BlobKind::Tree).await?;
        let raw = stored.decode(id, &format!("{what} ({} bytes stored)", stored.bytes.len()))?;
        Tree::decode(&what, &raw)
    }

    /// A node's entry (`None` for virtual nodes), parsing its directory page if needed.
    pub(super) async fn entry(&self, node: &Node) -> Result<Option<EntryRef>> {
        let Node::Entry { gen, path, at } = node else {
            return Ok(None);
        };
        match *at {
            EntryAt::Root => Ok(Some(EntryRef::Root(gen.clone()))),
            EntryAt::Held(ref e) => Ok(Some(EntryRef::Held(e.clone()))),
            EntryAt::Page { page, idx } => {
                let t = self.page(gen, path, &page).await?;
                if idx as usize >= t.entries.len() {
                    return Err(FsError::NotFound);
                }
                Ok(Some(EntryRef::Page(t, idx, page)))
            }
        }
    }

    /// Finds `name` in the directory `parent` (at `path` of `gen`, with tree `dir`): at most
    /// one page is parsed.
    pub(super) async fn lookup(
        &self,
        parent: u64,
        gen: &Arc<GenCtx>,
        path: &[u8],
        dir: &Id,
        name: &[u8],
    ) -> Result<(u64, Node, Attr)> {
        let t = self.page(gen, path, dir).await?;
        let (page_id, page) = if t.is_paged() {
            match t.page_for(name) {
                Some(p) => (p.id, self.page(gen, path, &p.id).await?),
                None => return Err(FsError::NotFound),
            }
        } else {
            (*dir, t)
        };
        let i = page
            .entries
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .map_err(|_| FsError::NotFound)?;
        Ok(child(parent, gen, path, page_id, &page, i))
    }

    /// Opens a directory handle.
    pub(super) fn open(&self, handle: DirHandle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, Arc::new(handle));
        fh
    }

    pub(super) fn release(&self, fh: u64) {
        lock(&self.handles).remove(&fh);
    }

    /// Items of the directory `fh` from `offset` on (0 = start), at most `max`. `listed` is
    /// told of each page a listing from the start goes through (for the read-ahead).
    pub(super) async fn read(
        &self,
        fh: u64,
        offset: u64,
        max: usize,
        listed: impl Fn(Id, &Tree),
    ) -> Result<Vec<DirItem>> {
        let h = lock(&self.handles)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        let (gen, path, ino, tree) = match &*h {
            DirHandle::Virtual(items) => {
                let rest = items.iter().skip(offset as usize).take(max);
                return Ok(rest.cloned().collect());
            }
            DirHandle::Gen {
                gen,
                path,
                ino,
                tree,
            } => (gen, path, *ino, tree),
        };
        let t = self.page(gen, path, tree).await?;
        let mut out = Vec::new();
        let (mut page, mut idx) = (offset / PAGE_SPAN, offset % PAGE_SPAN);
        loop {
            let (page_id, entries) = if t.is_paged() {
                match t.pages.get(page as usize) {
                    Some(p) => (p.id, self.page(gen, path, &p.id).await?),
                    None => break,
                }
            } else if page == 0 {
                (*tree, t.clone())
            } else {
                break;
            };
            if offset == 0 {
                listed(page_id, &entries);
            }
            for (i, e) in entries.entries.iter().enumerate().skip(idx as usize) {
                if out.len() >= max {
                    return Ok(out);
                }
                let (cino, node, attr) = child(ino, gen, path, page_id, &entries, i);
                out.push(DirItem {
                    ino: cino,
                    next: page * PAGE_SPAN + i as u64 + 1,
                    name: e.name.clone(),
                    attr,
                    ttl: LONG_TTL,
                    node,
                });
            }
            page += 1;
            idx = 0;
            if !t.is_paged() {
                break;
            }
        }
        Ok(out)
    }

    /// Forgets every parsed page, as the LRU does on a large walk (tests). Returns them: a test
    /// that keeps them alive makes pages parsed again land at other addresses, as they do after
    /// a walk has parsed many others in between.
    #[cfg(test)]
    pub(super) fn evict_parsed_pages(&self) -> Vec<Arc<Tree>> {
        lock(&self.pages).clear()
    }
}

/// The inode, node and attributes of entry `idx` of directory page `page` (whose id is
/// `page_id`) in the directory `parent` at `path`.
fn child(
    parent: u64,
    gen: &Arc<GenCtx>,
    path: &[u8],
    page_id: Id,
    page: &Tree,
    idx: usize,
) -> (u64, Node, Attr) {
    let e = &page.entries[idx];
    let cpath: Arc<[u8]> = if path.is_empty() {
        Arc::from(&e.name[..])
    } else {
        Arc::from([path, b"/", &e.name[..]].concat())
    };
    let node = Node::Entry {
        gen: gen.clone(),
        path: cpath,
        at: EntryAt::Page {
            page: page_id,
            idx: idx as u32,
        },
    };
    let ino = entry_ino(parent, gen, e);
    (ino, node, entry_attr(ino, gen, e))
}

/// The tree of a directory entry; ENOTDIR for anything else (and for virtual nodes).
pub(super) fn dir_tree(entry: Option<&Entry>) -> Result<Id> {
    match entry {
        Some(Entry {
            kind: Kind::Dir,
            tree: Some(t),
            ..
        }) => Ok(*t),
        _ => Err(FsError::NotDir),
    }
}
