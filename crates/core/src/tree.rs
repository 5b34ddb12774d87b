//! Directory trees: entries, chunk lists and directory pages.
//!
//! Every directory is its own tree blob, addressed by content, so a directory whose contents
//! and metadata did not change is the same blob in every generation and is stored once.
//! Tree blobs are CBOR (RFC 8949) maps with short keys (see docs/format.md); unknown keys are
//! ignored by readers, so fields can be added without a format break.
//!
//! A directory with more than [`PAGE_ENTRIES`] entries is split into name-sorted pages: the
//! directory blob then lists the pages (first name, blob id, count), and a lookup loads the one
//! page whose range holds the name. Listing never needs more than that directory's pages.
//!
//! A regular file's content is a [`ChunkList`]: for each chunk its cumulative end offset and its
//! id, or no id for a hole of a sparse file. The chunk holding a byte offset is found by binary
//! search over the end offsets. Lists longer than [`INLINE_CHUNKS`] are stored as a blob of their
//! own, so listing a directory of VM images does not load millions of chunk ids.

use crate::error::{Error, Result};
use crate::id::Id;
use serde::{Deserialize, Serialize};

/// Entries per directory page. A page of typical entries is 50–150 KB of CBOR before
/// compression: small enough to fetch in one request, large enough that a directory of a
/// million files is 250 pages.
pub const PAGE_ENTRIES: usize = 4096;

/// Chunk lists up to this many chunks (files up to about 64 MiB) are kept in the entry.
pub const INLINE_CHUNKS: usize = 64;

/// Tree blob format version, stored in every tree blob.
pub const TREE_VERSION: u32 = 1;

/// File types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Chardev,
    Blockdev,
    Fifo,
    Socket,
}

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, PartialOrd, Ord)]
pub struct Time(pub i64, pub u32);

/// An extended attribute (including `system.posix_acl_access` and `_default`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    #[serde(rename = "n", with = "serde_bytes")]
    pub name: Vec<u8>,
    #[serde(rename = "v", with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// One directory entry with all the metadata needed for an exact restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// File name, raw bytes (need not be UTF-8).
    #[serde(rename = "name", with = "serde_bytes")]
    pub name: Vec<u8>,
    #[serde(rename = "type")]
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub mtime: Time,
    pub atime: Time,
    pub ctime: Time,
    /// Logical size in bytes (regular files; symlink target length; 0 otherwise).
    pub size: u64,
    /// Inode number in the source filesystem (for incremental change detection).
    pub ino: u64,
    /// Hardlink group within the generation; entries with the same group are one file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<u64>,
    /// Device number of character and block devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdev: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<Xattr>,
    /// Subdirectory tree (directories).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree: Option<Id>,
    /// Symlink target, raw bytes.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_bytes")]
    pub target: Option<Vec<u8>>,
    /// Regular file content, inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<ChunkList>,
    /// Regular file content, as a separate chunk-list blob (long lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_list: Option<Id>,
    /// Bytes of holes in a sparse regular file (absent when there are none), so `st_blocks`
    /// can be reported without loading a separate chunk list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holes: Option<u64>,
    /// A regular file stored decompressed from a gzip original (`--gunzip`): what recreates the
    /// original byte for byte (see [`crate::ingest::gzip`]). Readers that do not know it ignore
    /// it and read the decompressed content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gzip: Option<GzipOrigin>,
}

/// Where a regular file came from when it was stored decompressed from gzip data: the
/// original's name, size and BLAKE3 hash, and the recipe that recreates it from the stored
/// content (docs/format.md §7.7), itself stored like file content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GzipOrigin {
    /// The original file's name (`dump.sql.gz`), raw bytes.
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    /// The original's size in bytes.
    pub size: u64,
    /// BLAKE3 hash of the original's bytes: what a recreation must produce.
    pub hash: Id,
    /// Size of the recipe in bytes.
    pub recipe_size: u64,
    /// The recipe's chunk list, inline (as an entry's `chunks`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<ChunkList>,
    /// The recipe's chunk-list blob (as an entry's `chunk_list`, paged when large).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_list: Option<Id>,
}

mod opt_bytes {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_bytes(b),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Ok(Option::<serde_bytes::ByteBuf>::deserialize(d)?.map(|b| b.into_vec()))
    }
}

impl Entry {
    /// A directory that has no source of its own (the root of a generation made of several
    /// sources, a directory a tar archive only implies): mode 0755, owned by root, dated `t`.
    /// Its `tree` is for the caller to set.
    pub fn made_dir(name: &[u8], t: Time) -> Entry {
        Entry {
            kind: Kind::Dir,
            user: Some("root".into()),
            group: Some("root".into()),
            ..Entry::made_file(name, 0o755, 0, 0, t, t)
        }
    }

    /// A regular file whose metadata come from elsewhere than an `lstat` (a stream, a tar
    /// member): `mode`, owner `uid:gid` (no names), modified and accessed at `mtime`, changed at
    /// `ctime`, no inode number, empty. The caller sets the rest (names, content, another kind).
    pub fn made_file(
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
        mtime: Time,
        ctime: Time,
    ) -> Entry {
        Entry {
            name: name.to_vec(),
            kind: Kind::File,
            mode,
            uid,
            gid,
            user: None,
            group: None,
            mtime,
            atime: mtime,
            ctime,
            size: 0,
            ino: 0,
            link: None,
            rdev: None,
            xattrs: Vec::new(),
            tree: None,
            target: None,
            chunks: None,
            chunk_list: None,
            holes: None,
            gzip: None,
        }
    }

    /// The xattr of that name, if present.
    pub fn xattr(&self, name: &[u8]) -> Option<&[u8]> {
        self.xattrs
            .iter()
            .find(|x| x.name == name)
            .map(|x| x.value.as_slice())
    }
}

/// One piece of a file: a chunk, or a hole (no id) that reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// Offset one past this piece's last byte.
    pub end: u64,
    /// The chunk's id; `None` for a hole.
    pub id: Option<Id>,
}

/// A file's content: pieces in order with cumulative end offsets.
///
/// Binary encoding (also the body of a chunk-list blob): per piece, `end` as u64 little-endian,
/// then a tag byte (1 = chunk followed by its 32-byte id, 0 = hole).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChunkList(pub Vec<ChunkRef>);

impl ChunkList {
    /// Logical size of the file.
    pub fn size(&self) -> u64 {
        self.0.last().map(|c| c.end).unwrap_or(0)
    }

    /// Start offset of piece `i`.
    pub fn start(&self, i: usize) -> u64 {
        if i == 0 {
            0
        } else {
            self.0[i - 1].end
        }
    }

    /// Index of the piece holding byte `offset`, by binary search; `None` at or past the end.
    pub fn find(&self, offset: u64) -> Option<usize> {
        let i = self.0.partition_point(|c| c.end <= offset);
        (i < self.0.len()).then_some(i)
    }

    /// Bytes of holes.
    pub fn hole_bytes(&self) -> u64 {
        (0..self.0.len())
            .filter(|&i| self.0[i].id.is_none())
            .map(|i| self.0[i].end - self.start(i))
            .sum()
    }

    /// `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)`: the first offset `>= from` that is data (or a
    /// hole). The end of the file counts as a hole. `None` means ENXIO.
    pub fn seek(&self, from: u64, data: bool) -> Option<u64> {
        let size = self.size();
        if from >= size {
            return if data {
                None
            } else {
                Some(size).filter(|_| from == size)
            };
        }
        let first = self.find(from)?;
        for i in first..self.0.len() {
            if self.0[i].id.is_some() == data {
                return Some(self.start(i).max(from));
            }
        }
        if data {
            None
        } else {
            Some(size)
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() * 41);
        for c in &self.0 {
            out.extend_from_slice(&c.end.to_le_bytes());
            match &c.id {
                Some(id) => {
                    out.push(1);
                    out.extend_from_slice(&id.0);
                }
                None => out.push(0),
            }
        }
        out
    }

    pub fn decode(what: &str, mut b: &[u8]) -> Result<ChunkList> {
        let mut v = Vec::new();
        let mut last = 0u64;
        while !b.is_empty() {
            if b.len() < 9 {
                return Err(Error::corrupt(what, "truncated chunk list"));
            }
            let end = u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8]));
            let tag = b[8];
            b = &b[9..];
            let id = match tag {
                0 => None,
                1 if b.len() >= 32 => {
                    let id = Id::from_slice(&b[..32]);
                    b = &b[32..];
                    id
                }
                _ => return Err(Error::corrupt(what, "bad chunk list record")),
            };
            if end <= last {
                return Err(Error::corrupt(what, "chunk list offsets not increasing"));
            }
            last = end;
            v.push(ChunkRef { end, id });
        }
        Ok(ChunkList(v))
    }
}

impl Serialize for ChunkList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.encode())
    }
}

impl<'de> Deserialize<'de> for ChunkList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let b = serde_bytes::ByteBuf::deserialize(d)?;
        ChunkList::decode("inline chunk list", &b).map_err(serde::de::Error::custom)
    }
}

/// A reference from a paged directory to one of its pages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRef {
    /// Name of the page's first entry.
    #[serde(with = "serde_bytes")]
    pub first: Vec<u8>,
    pub id: Id,
    pub count: u64,
}

/// A tree blob: a directory (or one page of it) with its entries sorted by name, or the page
/// list of a large directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    pub v: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<Entry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pages: Vec<PageRef>,
}

impl Tree {
    pub fn leaf(entries: Vec<Entry>) -> Tree {
        Tree {
            v: TREE_VERSION,
            entries,
            pages: Vec::new(),
        }
    }

    pub fn paged(pages: Vec<PageRef>) -> Tree {
        Tree {
            v: TREE_VERSION,
            entries: Vec::new(),
            pages,
        }
    }

    pub fn is_paged(&self) -> bool {
        !self.pages.is_empty()
    }

    /// Bytes this tree takes in memory once parsed, about (its vectors' capacities and every
    /// entry's own allocations): what a cache of parsed trees counts against its budget.
    pub fn mem_size(&self) -> usize {
        use std::mem::size_of;
        let entries: usize = self
            .entries
            .iter()
            .map(|e| {
                e.name.capacity()
                    + e.user.as_ref().map_or(0, String::capacity)
                    + e.group.as_ref().map_or(0, String::capacity)
                    + e.target.as_ref().map_or(0, Vec::capacity)
                    + e.xattrs.capacity() * size_of::<Xattr>()
                    + e.xattrs
                        .iter()
                        .map(|x| x.name.capacity() + x.value.capacity())
                        .sum::<usize>()
                    + e.chunks
                        .as_ref()
                        .map_or(0, |c| c.0.capacity() * size_of::<ChunkRef>())
                    + e.gzip.as_ref().map_or(0, |g| {
                        size_of::<GzipOrigin>()
                            + g.name.capacity()
                            + g.chunks
                                .as_ref()
                                .map_or(0, |c| c.0.capacity() * size_of::<ChunkRef>())
                    })
            })
            .sum();
        size_of::<Tree>()
            + self.entries.capacity() * size_of::<Entry>()
            + entries
            + self.pages.capacity() * size_of::<PageRef>()
            + self.pages.iter().map(|p| p.first.capacity()).sum::<usize>()
    }

    /// Number of entries in the directory (all pages).
    pub fn count(&self) -> u64 {
        if self.is_paged() {
            self.pages.iter().map(|p| p.count).sum()
        } else {
            self.entries.len() as u64
        }
    }

    /// The page that would hold `name` in a paged directory.
    pub fn page_for(&self, name: &[u8]) -> Option<&PageRef> {
        let i = self.pages.partition_point(|p| p.first.as_slice() <= name);
        i.checked_sub(1).map(|i| &self.pages[i])
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing CBOR into a Vec only fails on serializer bugs, which tests would catch.
        ciborium::into_writer(self, &mut out).expect("CBOR encoding into memory");
        out
    }

    pub fn decode(what: &str, b: &[u8]) -> Result<Tree> {
        let t: Tree =
            ciborium::from_reader(b).map_err(|e| Error::corrupt(what, format!("bad tree: {e}")))?;
        if t.v != TREE_VERSION {
            return Err(Error::corrupt(
                what,
                format!("tree version {} unknown", t.v),
            ));
        }
        let sorted = t.entries.windows(2).all(|w| w[0].name < w[1].name)
            && t.pages.windows(2).all(|w| w[0].first < w[1].first);
        if !sorted {
            return Err(Error::corrupt(what, "entries not sorted by name"));
        }
        Ok(t)
    }
}

/// Splits sorted entries into pages when there are too many for one tree blob.
pub fn paginate(entries: Vec<Entry>) -> Vec<Vec<Entry>> {
    if entries.len() <= PAGE_ENTRIES {
        return vec![entries];
    }
    let mut pages = Vec::new();
    let mut it = entries.into_iter().peekable();
    while it.peek().is_some() {
        pages.push(it.by_ref().take(PAGE_ENTRIES).collect());
    }
    pages
}

/// The hardlink table of a generation: for each link group, how many entries of the generation
/// belong to it (the true `st_nlink` to report). Stored as a tree-kind blob of
/// `(group u64, count u32)` little-endian records, sorted by group.
pub fn encode_links(links: &[(u64, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(links.len() * 12);
    for (g, c) in links {
        out.extend_from_slice(&g.to_le_bytes());
        out.extend_from_slice(&c.to_le_bytes());
    }
    out
}

pub fn decode_links(what: &str, b: &[u8]) -> Result<Vec<(u64, u32)>> {
    if !b.len().is_multiple_of(12) {
        return Err(Error::corrupt(what, "bad hardlink table"));
    }
    Ok(b.chunks_exact(12)
        .map(|r| {
            (
                u64::from_le_bytes(r[..8].try_into().unwrap_or([0; 8])),
                u32::from_le_bytes(r[8..].try_into().unwrap_or([0; 4])),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_entry() -> impl Strategy<Value = Entry> {
        (
            proptest::collection::vec(any::<u8>(), 1..20),
            0u32..0o10000,
            any::<u32>(),
            any::<(i64, u32)>(),
            proptest::collection::vec((1u64..1000, any::<bool>()), 0..80),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..30)),
            proptest::collection::vec(
                (
                    proptest::collection::vec(any::<u8>(), 1..10),
                    proptest::collection::vec(any::<u8>(), 0..10),
                ),
                0..3,
            ),
        )
            .prop_map(|(name, mode, uid, t, pieces, target, xattrs)| {
                let mut end = 0;
                let chunks = ChunkList(
                    pieces
                        .into_iter()
                        .map(|(len, data)| {
                            end += len;
                            ChunkRef {
                                end,
                                id: data.then(|| Id::of(&end.to_le_bytes())),
                            }
                        })
                        .collect(),
                );
                Entry {
                    name,
                    kind: Kind::File,
                    mode,
                    uid,
                    gid: uid / 2,
                    user: Some("root".into()),
                    group: None,
                    mtime: Time(t.0, t.1),
                    atime: Time(t.0 / 2, 0),
                    ctime: Time(t.0, t.1 / 3),
                    size: chunks.size(),
                    ino: 42,
                    link: Some(3),
                    rdev: None,
                    xattrs: xattrs
                        .into_iter()
                        .map(|(name, value)| Xattr { name, value })
                        .collect(),
                    tree: None,
                    target,
                    chunks: Some(chunks),
                    chunk_list: None,
                    holes: None,
                    gzip: (uid % 3 == 0).then(|| GzipOrigin {
                        name: b"x.gz".to_vec(),
                        size: u64::from(uid),
                        hash: Id::of(b"x"),
                        recipe_size: 12,
                        chunks: None,
                        chunk_list: Some(Id::of(b"r")),
                    }),
                }
            })
    }

    proptest! {
        #[test]
        fn mem_size_counts_entries_and_what_they_hold(mut entries in proptest::collection::vec(arb_entry(), 1..30)) {
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            entries.dedup_by(|a, b| a.name == b.name);
            let n = entries.len();
            let held: usize = entries
                .iter()
                .map(|e| e.name.len() + e.chunks.as_ref().map_or(0, |c| c.0.len() * std::mem::size_of::<ChunkRef>()))
                .sum();
            let t = Tree::leaf(entries);
            prop_assert!(t.mem_size() >= n * std::mem::size_of::<Entry>() + held);
            // A tree parsed from its encoding counts about the same (capacities may differ).
            let back = Tree::decode("t", &t.encode()).unwrap();
            prop_assert!(back.mem_size() >= n * std::mem::size_of::<Entry>() + held);
        }

        #[test]
        fn tree_round_trip(mut entries in proptest::collection::vec(arb_entry(), 0..20)) {
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            entries.dedup_by(|a, b| a.name == b.name);
            let t = Tree::leaf(entries);
            let back = Tree::decode("t", &t.encode()).unwrap();
            prop_assert_eq!(back, t);
        }

        #[test]
        fn corrupt_trees_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..500)) {
            let _ = Tree::decode("t", &bytes);
            let _ = ChunkList::decode("c", &bytes);
            let _ = decode_links("l", &bytes);
        }

        #[test]
        fn find_matches_linear_scan(lens in proptest::collection::vec(1u64..100, 1..50), off in 0u64..6000) {
            let mut end = 0;
            let list = ChunkList(lens.iter().map(|l| { end += l; ChunkRef { end, id: None } }).collect());
            let linear = list.0.iter().position(|c| c.end > off);
            prop_assert_eq!(list.find(off), linear);
        }
    }

    #[test]
    fn seek_data_and_hole() {
        let id = Some(Id::of(b"x"));
        let l = ChunkList(vec![
            ChunkRef { end: 10, id: None },
            ChunkRef { end: 20, id },
            ChunkRef { end: 30, id: None },
            ChunkRef { end: 40, id },
        ]);
        assert_eq!(l.seek(0, true), Some(10));
        assert_eq!(l.seek(15, true), Some(15));
        assert_eq!(l.seek(21, true), Some(30));
        assert_eq!(l.seek(0, false), Some(0));
        assert_eq!(l.seek(12, false), Some(20));
        assert_eq!(l.seek(35, false), Some(40));
        assert_eq!(l.seek(40, true), None);
        assert_eq!(l.seek(40, false), Some(40));
        assert_eq!(l.seek(41, false), None);
        assert_eq!(l.hole_bytes(), 20);
    }

    #[test]
    fn pages_are_found_by_name() {
        let t = Tree::paged(vec![
            PageRef {
                first: b"a".to_vec(),
                id: Id::of(b"1"),
                count: 2,
            },
            PageRef {
                first: b"m".to_vec(),
                id: Id::of(b"2"),
                count: 2,
            },
        ]);
        assert_eq!(t.page_for(b"b").unwrap().first, b"a");
        assert_eq!(t.page_for(b"m").unwrap().first, b"m");
        assert_eq!(t.page_for(b"z").unwrap().first, b"m");
        assert!(t.page_for(b"0").is_none());
        assert_eq!(t.count(), 4);
    }
}
