//! Paged chunk lists: a large file's list of chunks as a tree of small blobs.
//!
//! A file of up to [`INLINE_CHUNKS`](crate::tree::INLINE_CHUNKS) pieces keeps its chunk list in
//! its entry, and one of up to a page ([`PAGE_CHUNKS`] pieces) in one chunk-list blob named by
//! the entry's `chunk_list`, as in every backtree version. A longer list (a 1 TB stream has about
//! a million chunks: one 40 MB blob otherwise) is cut into **pages** of [`PAGE_CHUNKS`] pieces,
//! each a tree-kind blob in the ordinary chunk-list encoding with offsets counted from the start
//! of the file, and the pages are listed by **index** blobs of up to [`PAGE_CHUNKS`] records
//! `(end offset of the child's last piece, child id)`; index blobs of index blobs follow until one
//! holds everything: the root, which `chunk_list` names. An index blob starts with
//! [`INDEX_MAGIC`], whose value as a little-endian u64 is above any file size, so it can never be
//! taken for the first `end` of a plain list; that is how a reader tells the two apart.
//!
//! Finding the piece holding an offset is a binary search in the root, then in the child that
//! covers it, down to a page: one verified fetch of at most ~170 KiB per level, and a million
//! chunks are two levels. A reader ([`FileChunks`]) keeps the root it opened and a few recently
//! used nodes ([`NODE_CACHE`]), never the whole list. The writer ([`ListBuilder`]) stores each
//! page as soon as it is full, so it holds one page plus one partial index per level.
//!
//! A repository whose writer may write such lists lists [`FEATURE`] in its config's
//! `mandatory_features`: a backtree that does not know paged lists would decode an index blob as
//! a plain list and misread the file, so it must refuse the repository instead.

use crate::error::{Error, Result};
use crate::id::Id;
use crate::repo::Repository;
use crate::tree::{ChunkList, ChunkRef};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// The mandatory feature of repositories whose files may have paged chunk lists.
pub const FEATURE: &str = "paged-chunk-lists";

/// Pieces per page and records per index blob. A page of data chunks is 4096 × 41 bytes =
/// 164 KiB (an index blob 4096 × 40 + 9), within the 64–256 KiB that one request fetches about
/// as fast as a tiny one; at the default ~1 MiB chunks a page covers ~4 GiB of file, so a 1 TB
/// stream is 245 pages under one root, and 16 PiB still fits two index levels.
pub const PAGE_CHUNKS: usize = 4096;

/// First bytes of an index blob. As a little-endian u64 it is ≥ 2^63, past any file size
/// (`off_t` is signed), so a plain chunk list, which starts with its first piece's end, never
/// begins with it.
pub const INDEX_MAGIC: [u8; 8] = *b"BTCLIX1\xff";

/// Parsed index and page nodes an open paged list keeps, least recently used dropped first:
/// the path from the root to a page plus the page before and after a sequential reader.
pub const NODE_CACHE: usize = 6;

/// One record of an index blob: a child's last end offset and its id.
pub type IndexRecord = (u64, Id);

/// Encodes an index blob: [`INDEX_MAGIC`], `level` (1: the children are pages; n > 1: index
/// blobs of level n − 1), then per child its end u64 LE and its 32-byte id.
pub fn encode_index(level: u8, records: &[IndexRecord]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + records.len() * 40);
    out.extend_from_slice(&INDEX_MAGIC);
    out.push(level);
    for (end, id) in records {
        out.extend_from_slice(&end.to_le_bytes());
        out.extend_from_slice(&id.0);
    }
    out
}

/// Whether a chunk-list blob's bytes are an index blob (a paged list's root).
pub fn is_index(raw: &[u8]) -> bool {
    raw.starts_with(&INDEX_MAGIC)
}

/// Decodes an index blob: its level and records (non-empty, ends strictly increasing).
pub fn decode_index(what: &str, raw: &[u8]) -> Result<(u8, Vec<IndexRecord>)> {
    let body = raw
        .strip_prefix(&INDEX_MAGIC)
        .ok_or_else(|| Error::corrupt(what, "not a chunk-list index"))?;
    let (&level, body) = body
        .split_first()
        .ok_or_else(|| Error::corrupt(what, "truncated chunk-list index"))?;
    if level == 0 || body.is_empty() || !body.len().is_multiple_of(40) {
        return Err(Error::corrupt(what, "bad chunk-list index"));
    }
    let mut records = Vec::with_capacity(body.len() / 40);
    let mut last = 0u64;
    for r in body.chunks_exact(40) {
        let end = u64::from_le_bytes(r[..8].try_into().unwrap_or([0; 8]));
        let id = Id::from_slice(&r[8..]).ok_or_else(|| Error::corrupt(what, "bad id"))?;
        if end <= last {
            return Err(Error::corrupt(what, "index offsets not increasing"));
        }
        last = end;
        records.push((end, id));
    }
    Ok((level, records))
}

/// A file's chunk list as the writer made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WrittenList {
    /// Short enough to keep whole (inline, or one chunk-list blob).
    Whole(ChunkList),
    /// Paged: the root index blob, already stored.
    Paged { root: Id, size: u64, holes: u64 },
}

impl WrittenList {
    /// Logical size of the file.
    pub fn size(&self) -> u64 {
        match self {
            WrittenList::Whole(l) => l.size(),
            WrittenList::Paged { size, .. } => *size,
        }
    }

    /// Bytes of holes.
    pub fn hole_bytes(&self) -> u64 {
        match self {
            WrittenList::Whole(l) => l.hole_bytes(),
            WrittenList::Paged { holes, .. } => *holes,
        }
    }
}

/// Builds a chunk list piece by piece, storing full pages (and full index blobs) as it goes
/// through the `store` function it is given (the writer's tree-blob store).
pub struct ListBuilder {
    /// Pieces per page; `None`: never page (a repository without [`FEATURE`]).
    page: Option<usize>,
    pending: Vec<ChunkRef>,
    /// Per level (0: records of pages), the records not yet in an index blob.
    levels: Vec<Vec<IndexRecord>>,
    size: u64,
    holes: u64,
}

/// Stores a tree-kind blob, returning its id.
pub type StoreFn<'a> = dyn FnMut(&[u8]) -> Result<Id> + 'a;

impl ListBuilder {
    /// A builder cutting pages of `page` pieces (at least 2), or none if `None`.
    pub fn new(page: Option<usize>) -> ListBuilder {
        ListBuilder {
            page: page.map(|p| p.max(2)),
            pending: Vec::new(),
            levels: Vec::new(),
            size: 0,
            holes: 0,
        }
    }

    /// Appends the next piece; its `end` must be past the previous one's.
    pub fn push(&mut self, c: ChunkRef, store: &mut StoreFn<'_>) -> Result<()> {
        if c.id.is_none() {
            self.holes += c.end.saturating_sub(self.size);
        }
        self.size = c.end;
        if let Some(page) = self.page {
            if self.pending.len() >= page {
                self.flush_page(store)?;
            }
        }
        self.pending.push(c);
        Ok(())
    }

    fn flush_page(&mut self, store: &mut StoreFn<'_>) -> Result<()> {
        let list = ChunkList(std::mem::take(&mut self.pending));
        let end = list.size();
        let id = store(&list.encode())?;
        self.add(0, (end, id), store)
    }

    /// Adds a record at `level`, first storing that level's records as an index blob if full.
    fn add(&mut self, level: usize, r: IndexRecord, store: &mut StoreFn<'_>) -> Result<()> {
        let fan = self.page.unwrap_or(usize::MAX);
        if self.levels.len() == level {
            self.levels.push(Vec::new());
        }
        if self.levels[level].len() >= fan {
            let records = std::mem::take(&mut self.levels[level]);
            let id = store(&encode_index(level as u8 + 1, &records))?;
            let end = records.last().map_or(0, |r| r.0);
            self.add(level + 1, (end, id), store)?;
        }
        self.levels[level].push(r);
        Ok(())
    }

    /// The finished list: whole if it fit one page, else the stored root's id.
    pub fn finish(mut self, store: &mut StoreFn<'_>) -> Result<WrittenList> {
        if self.levels.is_empty() {
            return Ok(WrittenList::Whole(ChunkList(self.pending)));
        }
        if !self.pending.is_empty() {
            self.flush_page(store)?;
        }
        let mut level = 0;
        loop {
            let records = std::mem::take(&mut self.levels[level]);
            let id = store(&encode_index(level as u8 + 1, &records))?;
            if level + 1 == self.levels.len() {
                return Ok(WrittenList::Paged {
                    root: id,
                    size: self.size,
                    holes: self.holes,
                });
            }
            let end = records.last().map_or(0, |r| r.0);
            self.add(level + 1, (end, id), store)?;
            level += 1;
        }
    }
}

/// A run of consecutive pieces of a file: a whole list (start 0) or one page of a paged list.
#[derive(Debug, Clone)]
pub struct Page {
    /// Offset where the first piece starts.
    pub first_start: u64,
    pub list: Arc<ChunkList>,
}

impl Page {
    /// Start offset of piece `i`.
    pub fn start(&self, i: usize) -> u64 {
        if i == 0 {
            self.first_start
        } else {
            self.list.0[i - 1].end
        }
    }

    /// Offset past the page's last piece.
    pub fn end(&self) -> u64 {
        self.list.size()
    }

    /// Whether the page holds byte `offset`.
    pub fn covers(&self, offset: u64) -> bool {
        offset >= self.first_start && offset < self.end()
    }

    /// Index of the piece holding `offset` (which the page must cover).
    pub fn find(&self, offset: u64) -> Option<usize> {
        if offset < self.first_start {
            return None;
        }
        self.list.find(offset)
    }
}

#[derive(Debug, Clone)]
enum Node {
    Index(u8, Arc<Vec<IndexRecord>>),
    Page(Arc<ChunkList>),
}

/// A paged list being read: its root, and a few recently used nodes.
#[derive(Debug)]
pub struct PagedList {
    root_id: Id,
    level: u8,
    root: Arc<Vec<IndexRecord>>,
    holes: Option<u64>,
    cache: Mutex<VecDeque<(Id, Node)>>,
}

/// A file's chunk list for reading: whole (inline or one blob), or paged and fetched as needed.
#[derive(Debug, Clone)]
pub enum FileChunks {
    Whole(Arc<ChunkList>),
    Paged(Arc<PagedList>),
}

impl FileChunks {
    /// From a chunk-list blob's verified bytes (`id` names it in errors); `holes`: the entry's.
    pub fn from_blob(id: &Id, raw: &[u8], holes: Option<u64>) -> Result<FileChunks> {
        if is_index(raw) {
            let (level, root) = decode_index(&format!("chunk-list index {id}"), raw)?;
            Ok(FileChunks::Paged(Arc::new(PagedList {
                root_id: *id,
                level,
                root: Arc::new(root),
                holes,
                cache: Mutex::new(VecDeque::new()),
            })))
        } else {
            let list = ChunkList::decode(&format!("chunk list {id}"), raw)?;
            Ok(FileChunks::Whole(Arc::new(list)))
        }
    }

    /// Logical size of the file.
    pub fn size(&self) -> u64 {
        match self {
            FileChunks::Whole(l) => l.size(),
            FileChunks::Paged(p) => p.root.last().map_or(0, |r| r.0),
        }
    }

    /// Upper bound of the memory this list can hold while being read, in bytes: a whole list's
    /// pieces; a paged list's root plus [`NODE_CACHE`] nodes of at most [`PAGE_CHUNKS`] records
    /// (a repository may page at another size; this is an estimate for a cache's budget).
    pub fn footprint(&self) -> usize {
        let piece = std::mem::size_of::<ChunkRef>();
        match self {
            FileChunks::Whole(l) => l.0.len() * piece,
            FileChunks::Paged(p) => {
                p.root.len() * std::mem::size_of::<IndexRecord>() + NODE_CACHE * PAGE_CHUNKS * piece
            }
        }
    }

    /// The whole list, if it is not paged (no fetch needed).
    pub fn whole(&self) -> Option<&Arc<ChunkList>> {
        match self {
            FileChunks::Whole(l) => Some(l),
            FileChunks::Paged(_) => None,
        }
    }

    /// The page holding byte `offset`, fetching the nodes on its path that are not cached;
    /// `None` at or past the end of the file.
    pub async fn page_at(&self, repo: &Repository, offset: u64) -> Result<Option<Page>> {
        let p = match self {
            FileChunks::Whole(l) => {
                return Ok((offset < l.size()).then(|| Page {
                    first_start: 0,
                    list: l.clone(),
                }))
            }
            FileChunks::Paged(p) => p,
        };
        if offset >= self.size() {
            return Ok(None);
        }
        let (mut level, mut records, mut start) = (p.level, p.root.clone(), 0u64);
        let mut parent = format!("chunk-list index {}", p.root_id);
        loop {
            let i = records.partition_point(|r| r.0 <= offset);
            let Some(&(end, id)) = records.get(i) else {
                return Err(Error::corrupt(parent, "offset not covered"));
            };
            let cstart = if i == 0 { start } else { records[i - 1].0 };
            match p.node(repo, &id, level - 1, cstart, end).await? {
                Node::Page(list) => {
                    return Ok(Some(Page {
                        first_start: cstart,
                        list,
                    }))
                }
                Node::Index(l, r) => {
                    (level, records, start) = (l, r, cstart);
                    parent = format!("chunk-list index {id}");
                }
            }
        }
    }

    /// The piece holding `offset` and its start offset; `None` at or past the end.
    pub async fn locate(&self, repo: &Repository, offset: u64) -> Result<Option<(ChunkRef, u64)>> {
        Ok(self
            .page_at(repo, offset)
            .await?
            .and_then(|p| p.find(offset).map(|i| (p.list.0[i], p.start(i)))))
    }

    /// `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)` as [`ChunkList::seek`], page by page. A paged
    /// file without holes is answered without a fetch.
    pub async fn seek(&self, repo: &Repository, from: u64, data: bool) -> Result<Option<u64>> {
        let size = self.size();
        match self {
            FileChunks::Whole(l) => return Ok(l.seek(from, data)),
            FileChunks::Paged(p) if p.holes.is_none() && from < size => {
                return Ok(Some(if data { from } else { size }))
            }
            FileChunks::Paged(_) => {}
        }
        if from >= size {
            return Ok(if data {
                None
            } else {
                Some(size).filter(|_| from == size)
            });
        }
        let mut pos = from;
        while let Some(page) = self.page_at(repo, pos).await? {
            let first = page.find(pos).unwrap_or(0);
            for i in first..page.list.0.len() {
                if page.list.0[i].id.is_some() == data {
                    return Ok(Some(page.start(i).max(from)));
                }
            }
            pos = page.end();
        }
        Ok(if data { None } else { Some(size) })
    }

    /// Every piece, fetching every page (for tools that need the whole list).
    pub async fn collect(&self, repo: &Repository) -> Result<ChunkList> {
        if let FileChunks::Whole(l) = self {
            return Ok((**l).clone());
        }
        let mut out = Vec::new();
        let mut pos = 0;
        while let Some(page) = self.page_at(repo, pos).await? {
            out.extend_from_slice(&page.list.0);
            pos = page.end();
        }
        Ok(ChunkList(out))
    }
}

impl PagedList {
    /// The node `id` (a page if `level` is 0, else an index of that level) covering
    /// `start..end`: from the cache, or read, verified against its id and checked.
    async fn node(
        &self,
        repo: &Repository,
        id: &Id,
        level: u8,
        start: u64,
        end: u64,
    ) -> Result<Node> {
        {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = cache.iter().position(|(k, _)| k == id) {
                let hit = cache.remove(i);
                if let Some(hit) = hit {
                    let node = hit.1.clone();
                    cache.push_back(hit);
                    return Ok(node);
                }
            }
        }
        let raw = repo.read_blob(id).await?;
        let node = if level == 0 {
            let what = format!("chunk-list page {id}");
            let list = ChunkList::decode(&what, &raw)?;
            let first_end = list.0.first().map_or(0, |c| c.end);
            if first_end <= start || list.size() != end {
                return Err(Error::corrupt(what, "offsets differ from its index"));
            }
            Node::Page(Arc::new(list))
        } else {
            let what = format!("chunk-list index {id}");
            let (l, records) = decode_index(&what, &raw)?;
            let first_end = records.first().map_or(0, |r| r.0);
            if l != level || first_end <= start || records.last().map(|r| r.0) != Some(end) {
                return Err(Error::corrupt(
                    what,
                    "level or offsets differ from its parent",
                ));
            }
            Node::Index(l, Arc::new(records))
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= NODE_CACHE {
            cache.pop_front();
        }
        cache.push_back((*id, node.clone()));
        Ok(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn pieces(n: u64) -> Vec<ChunkRef> {
        (1..=n)
            .map(|i| ChunkRef {
                end: i * 10,
                id: (i % 3 != 0).then(|| Id::of(&i.to_le_bytes())),
            })
            .collect()
    }

    fn build(page: Option<usize>, n: u64) -> (WrittenList, HashMap<Id, Vec<u8>>) {
        let mut blobs = HashMap::new();
        let mut store = |b: &[u8]| {
            let id = Id::of(b);
            blobs.insert(id, b.to_vec());
            Ok(id)
        };
        let mut b = ListBuilder::new(page);
        for c in pieces(n) {
            b.push(c, &mut store).unwrap();
        }
        (b.finish(&mut store).unwrap(), blobs)
    }

    /// Walks a written tree by hand: every page in order, concatenated.
    fn walk(blobs: &HashMap<Id, Vec<u8>>, id: &Id, out: &mut Vec<ChunkRef>) -> usize {
        let raw = &blobs[id];
        if is_index(raw) {
            let (_, records) = decode_index("t", raw).unwrap();
            1 + records
                .iter()
                .map(|r| walk(blobs, &r.1, out))
                .max()
                .unwrap()
        } else {
            out.extend(ChunkList::decode("t", raw).unwrap().0);
            0
        }
    }

    #[test]
    fn short_lists_and_unpaged_repositories_stay_whole() {
        for (page, n) in [(Some(4), 4), (None, 1000), (Some(4096), 4096)] {
            let (w, blobs) = build(page, n);
            assert_eq!(w, WrittenList::Whole(ChunkList(pieces(n))));
            assert!(blobs.is_empty());
        }
    }

    #[test]
    fn long_lists_are_pages_under_index_levels() {
        for (page, n, depth) in [
            (4, 5, 1),
            (4, 16, 1),
            (4, 17, 2),
            (4, 64, 2),
            (4, 65, 3),
            (3, 1000, 6),
        ] {
            let (w, blobs) = build(Some(page), n);
            let WrittenList::Paged { root, size, holes } = w else {
                panic!("{n} pieces in pages of {page} are paged");
            };
            assert_eq!(size, n * 10);
            assert_eq!(holes, ChunkList(pieces(n)).hole_bytes());
            let mut all = Vec::new();
            assert_eq!(walk(&blobs, &root, &mut all), depth, "{n} pieces / {page}");
            assert_eq!(all, pieces(n));
            for raw in blobs.values() {
                let records = if is_index(raw) {
                    decode_index("t", raw).unwrap().1.len()
                } else {
                    ChunkList::decode("t", raw).unwrap().0.len()
                };
                assert!(records <= page);
            }
        }
    }

    #[test]
    fn index_blobs_are_never_plain_lists_and_back() {
        let r = vec![(10, Id::of(b"a")), (20, Id::of(b"b"))];
        let raw = encode_index(2, &r);
        assert!(is_index(&raw));
        assert_eq!(decode_index("t", &raw).unwrap(), (2, r));
        assert!(u64::from_le_bytes(INDEX_MAGIC) > i64::MAX as u64);
        assert!(!is_index(&ChunkList(pieces(3)).encode()));
        assert!(decode_index("t", &raw[..20]).is_err());
        assert!(decode_index("t", &encode_index(0, &[(1, Id::of(b"x"))])).is_err());
        assert!(decode_index("t", &encode_index(1, &[])).is_err());
    }

    #[test]
    fn footprint_bounds_a_paged_list_by_its_node_cache() {
        let whole = FileChunks::Whole(Arc::new(ChunkList(pieces(10))));
        assert_eq!(whole.footprint(), 10 * std::mem::size_of::<ChunkRef>());
        let root: Vec<IndexRecord> = (1..=3).map(|i| (i * 100, Id([i as u8; 32]))).collect();
        let paged = FileChunks::from_blob(&Id([9; 32]), &encode_index(1, &root), None).unwrap();
        let nodes = NODE_CACHE * PAGE_CHUNKS * std::mem::size_of::<ChunkRef>();
        assert_eq!(
            paged.footprint(),
            3 * std::mem::size_of::<IndexRecord>() + nodes
        );
        assert!(
            paged.footprint() < 2 << 20,
            "a paged file is about 1 MiB at most"
        );
    }
}
