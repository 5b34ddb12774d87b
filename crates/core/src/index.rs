//! The index: blob id → (pack, offset, length), written as immutable per-ingest files.
//!
//! # File format (`index/<blake3 of the file, hex>`)
//! ```text
//! "BTIDX001"                       8-byte magic
//! pack_count u32, entry_count u32
//! fanout: 256 × u32                fanout[b] = number of entries whose id's first byte <= b
//! packs: pack_count × 33 bytes     kind u8, pack id [32]
//! entries: entry_count × 52 bytes  id [32], pack u32 (row in the pack table), offset u32,
//!                                  stored_len u32, raw_len u32, flags u8, 3 zero bytes
//! ```
//! Entries are sorted by id. All integers little-endian. Entries have a fixed size so a reader
//! can fetch exactly the entries of one id prefix ("bucket") with one ranged read, using the
//! fanout table, without reading the rest of the file.
//!
//! # Reading lazily
//! [`IndexSet`] is what readers (`ls`, the mount) use. It lists `index/` when first needed and
//! loads, per index file, only the header and then the buckets (1/256 of the id space) that
//! lookups actually touch. Reading one small file therefore costs, per index file, one ranged
//! read for one bucket (plus, the first time, one for the header and one for the pack table),
//! not the whole index of every host. A loaded entry costs about 60–70 bytes of memory (32-byte
//! id, 20-byte slot that names its pack by a row in a shared pack table, hash-table overhead).
//! When a lookup misses, the set lists `index/` again, so blobs of generations committed after
//! the mount started are found; an index file that vanished (merged by its writer or by
//! compaction) makes the set start over from a fresh listing.
//!
//! The writer instead wants every id (to deduplicate against the whole repository) and reads
//! each index file whole into a set of ids: about 40 bytes per chunk (1 TiB of unique data in
//! 1 MiB chunks ≈ 1 M chunks ≈ 40 MB).
//!
//! A small index file (at most [`WHOLE_FILE`], about 20 000 entries, one ingest of up to
//! about 20 GB of new data) is instead read whole with one request and all its entries are
//! loaded: on S3 every request costs a round trip (and some stores answer small ranged reads
//! slowly: Garage took 44 ms for any range under 64 KiB), and a cold sequential read touches
//! every bucket within its first few hundred chunks, so per-bucket reads of small files cost
//! 256 round trips, one after another, for a few hundred KB.
//!
//! Many index files make first lookups slower (one ranged read per file); a later `compact`
//! step merges them into sorted shards by id prefix. Entries are idempotent facts about
//! immutable packs, so duplicates across files are harmless and merging needs no lock.

use crate::error::{Error, Result};
use crate::id::{pack_key, BlobKind, Id};
use crate::pack::PackEntry;
use backtree_store::DynStore;
use std::collections::{HashMap, HashSet};
use tokio::sync::RwLock;

pub const MAGIC: &[u8; 8] = b"BTIDX001";
pub const INDEX_PREFIX: &str = "index/";
const HEADER_LEN: usize = 8 + 8 + 256 * 4;
const PACK_ROW: usize = 33;
const ENTRY_LEN: usize = 52;
/// Index files up to this size are read whole on first use (see the module docs).
pub const WHOLE_FILE: u64 = 1 << 20;

/// Where a blob lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub kind: BlobKind,
    pub pack: Id,
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
    pub flags: u8,
}

impl Location {
    /// The store key of the pack holding the blob.
    pub fn pack_key(&self) -> String {
        pack_key(self.kind, &self.pack)
    }
}

/// Builds one index file from the packs an ingest wrote.
#[derive(Debug, Default)]
pub struct IndexBuilder {
    packs: Vec<(BlobKind, Id)>,
    entries: Vec<(Id, u32, PackEntry)>,
}

impl IndexBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds every blob of one pack.
    pub fn add_pack(&mut self, kind: BlobKind, pack: Id, entries: &[PackEntry]) {
        let row = self.packs.len() as u32;
        self.packs.push((kind, pack));
        self.entries.extend(entries.iter().map(|e| (e.id, row, *e)));
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Encodes the file; returns its store key and bytes.
    pub fn encode(mut self) -> (String, Vec<u8>) {
        self.entries.sort_by_key(|e| e.0);
        self.entries.dedup_by(|a, b| a.0 == b.0);
        let mut fanout = [0u32; 256];
        for (id, _, _) in &self.entries {
            fanout[id.0[0] as usize] += 1;
        }
        for b in 1..256 {
            fanout[b] += fanout[b - 1];
        }
        let mut out = Vec::with_capacity(
            HEADER_LEN + self.packs.len() * PACK_ROW + self.entries.len() * ENTRY_LEN,
        );
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.packs.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for f in fanout {
            out.extend_from_slice(&f.to_le_bytes());
        }
        for (kind, id) in &self.packs {
            out.push(*kind as u8);
            out.extend_from_slice(&id.0);
        }
        for (id, row, e) in &self.entries {
            out.extend_from_slice(&id.0);
            out.extend_from_slice(&row.to_le_bytes());
            out.extend_from_slice(&e.offset.to_le_bytes());
            out.extend_from_slice(&e.stored_len.to_le_bytes());
            out.extend_from_slice(&e.raw_len.to_le_bytes());
            out.push(e.flags);
            out.extend_from_slice(&[0, 0, 0]);
        }
        let key = format!("{INDEX_PREFIX}{}", Id::of(&out).to_hex());
        (key, out)
    }
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// The parsed fixed-size head of an index file.
#[derive(Debug, Clone)]
struct Header {
    pack_count: u32,
    fanout: Vec<u32>,
}

impl Header {
    fn parse(key: &str, b: &[u8], file_len: u64) -> Result<Header> {
        if b.len() < HEADER_LEN || &b[..8] != MAGIC {
            return Err(Error::corrupt(key, "not an index file (bad magic)"));
        }
        let pack_count = u32_at(b, 8);
        let entry_count = u32_at(b, 12);
        let fanout: Vec<u32> = (0..256).map(|i| u32_at(b, 16 + 4 * i)).collect();
        let monotone = fanout.windows(2).all(|w| w[0] <= w[1]);
        let expected = HEADER_LEN as u64
            + pack_count as u64 * PACK_ROW as u64
            + entry_count as u64 * ENTRY_LEN as u64;
        if !monotone || fanout[255] != entry_count || expected != file_len {
            return Err(Error::corrupt(
                key,
                "index header inconsistent with its size",
            ));
        }
        Ok(Header { pack_count, fanout })
    }

    fn entries_start(&self) -> u64 {
        HEADER_LEN as u64 + self.pack_count as u64 * PACK_ROW as u64
    }

    fn bucket_range(&self, b: u8) -> (u64, u64) {
        let lo = if b == 0 {
            0
        } else {
            self.fanout[b as usize - 1]
        };
        let hi = self.fanout[b as usize];
        (lo as u64, hi as u64)
    }
}

fn parse_packs(key: &str, b: &[u8]) -> Result<Vec<(BlobKind, Id)>> {
    b.chunks_exact(PACK_ROW)
        .map(|r| {
            let kind = BlobKind::from_u8(r[0])
                .ok_or_else(|| Error::corrupt(key, "unknown pack kind in index"))?;
            Ok((kind, Id::from_slice(&r[1..]).unwrap_or(Id([0; 32]))))
        })
        .collect()
}

fn parse_entry(key: &str, r: &[u8], packs: &[(BlobKind, Id)]) -> Result<(Id, Location)> {
    let id = Id::from_slice(&r[..32]).unwrap_or(Id([0; 32]));
    let row = u32_at(r, 32) as usize;
    let (kind, pack) = *packs
        .get(row)
        .ok_or_else(|| Error::corrupt(key, "index entry names a pack outside its table"))?;
    Ok((
        id,
        Location {
            kind,
            pack,
            offset: u32_at(r, 36),
            stored_len: u32_at(r, 40),
            raw_len: u32_at(r, 44),
            flags: r[48],
        },
    ))
}

/// Parses a whole index file (used by the writer and by tests).
pub fn parse_file(key: &str, b: &[u8]) -> Result<Vec<(Id, Location)>> {
    let h = Header::parse(key, b, b.len() as u64)?;
    let ps = HEADER_LEN;
    let pe = ps + h.pack_count as usize * PACK_ROW;
    let packs = parse_packs(key, &b[ps..pe])?;
    b[pe..]
        .chunks_exact(ENTRY_LEN)
        .map(|r| parse_entry(key, r, &packs))
        .collect()
}

/// Reads every index file and returns the set of all indexed ids (what a writer needs to
/// deduplicate against the whole repository).
pub async fn load_all_ids(store: &DynStore) -> Result<HashSet<Id>> {
    let mut ids = HashSet::new();
    for obj in store.list(INDEX_PREFIX).await? {
        let bytes = store.get(&obj.key).await?;
        for (id, _) in parse_file(&obj.key, &bytes)? {
            ids.insert(id);
        }
    }
    Ok(ids)
}

#[derive(Debug)]
struct FileState {
    key: String,
    size: u64,
    header: Option<Header>,
    packs: Option<Vec<(BlobKind, Id)>>,
    /// Every entry of the file is loaded (a small file, read whole).
    all: bool,
}

/// A loaded entry: the location with its pack as a row of `State::packs`.
#[derive(Debug, Clone, Copy)]
struct Slot {
    pack: u32,
    offset: u32,
    stored_len: u32,
    raw_len: u32,
    flags: u8,
}

#[derive(Debug, Default)]
struct State {
    listed: bool,
    files: Vec<FileState>,
    buckets: HashMap<u8, HashMap<Id, Slot>>,
    /// Buckets loaded from every listed file (a bucket may hold entries of whole-read files
    /// before that).
    loaded: HashSet<u8>,
    packs: Vec<(BlobKind, Id)>,
    pack_rows: HashMap<Id, u32>,
}

impl State {
    fn insert(&mut self, id: Id, loc: Location) {
        let next = self.packs.len() as u32;
        let row = *self.pack_rows.entry(loc.pack).or_insert(next);
        if row == next {
            self.packs.push((loc.kind, loc.pack));
        }
        let slot = Slot {
            pack: row,
            offset: loc.offset,
            stored_len: loc.stored_len,
            raw_len: loc.raw_len,
            flags: loc.flags,
        };
        self.buckets.entry(id.0[0]).or_default().insert(id, slot);
    }

    fn get(&self, id: &Id) -> Option<Location> {
        let s = self.buckets.get(&id.0[0])?.get(id)?;
        let (kind, pack) = self.packs[s.pack as usize];
        Some(Location {
            kind,
            pack,
            offset: s.offset,
            stored_len: s.stored_len,
            raw_len: s.raw_len,
            flags: s.flags,
        })
    }
}

/// Lazily loaded view of every index file (see the module docs).
#[derive(Debug)]
pub struct IndexSet {
    store: DynStore,
    whole_file: u64,
    state: RwLock<State>,
}

impl IndexSet {
    pub fn new(store: DynStore) -> Self {
        IndexSet {
            store,
            whole_file: WHOLE_FILE,
            state: RwLock::new(State::default()),
        }
    }

    /// Index files up to `bytes` are read whole (default [`WHOLE_FILE`]); 0 reads every file
    /// bucket by bucket.
    pub fn whole_file_limit(mut self, bytes: u64) -> Self {
        self.whole_file = bytes;
        self
    }

    /// Finds a blob. Loads its bucket from every index file on first use; on a miss, looks
    /// for index files written since the last listing.
    pub async fn lookup(&self, id: &Id) -> Result<Location> {
        if let Some(loc) = self.state.read().await.get(id) {
            return Ok(loc);
        }
        let mut st = self.state.write().await;
        match self.lookup_locked(&mut st, id).await {
            Err(Error::Store(e)) if e.is_not_found() => {
                // An index file we had listed is gone (merged by its writer, or compacted): its
                // entries live on in another file. Start over from a fresh listing, once.
                *st = State::default();
                self.lookup_locked(&mut st, id).await
            }
            other => other,
        }
    }

    async fn lookup_locked(&self, st: &mut State, id: &Id) -> Result<Location> {
        let b = id.0[0];
        if !st.listed {
            self.refresh(st).await?;
        }
        if !st.loaded.contains(&b) {
            for i in 0..st.files.len() {
                self.load_bucket(st, i, b).await?;
            }
            st.loaded.insert(b);
        }
        if let Some(loc) = st.get(id) {
            return Ok(loc);
        }
        // Not found: maybe it was committed after we last listed.
        let before = st.files.len();
        self.refresh(st).await?;
        let loaded: Vec<u8> = st.loaded.iter().copied().collect();
        for i in before..st.files.len() {
            for &lb in &loaded {
                self.load_bucket(st, i, lb).await?;
            }
        }
        st.get(id).ok_or(Error::BlobNotIndexed { id: *id })
    }

    /// Number of entries loaded into memory.
    pub async fn loaded_entries(&self) -> usize {
        self.state
            .read()
            .await
            .buckets
            .values()
            .map(|m| m.len())
            .sum()
    }

    async fn refresh(&self, st: &mut State) -> Result<()> {
        let listing = self.store.list(INDEX_PREFIX).await?;
        let known: HashSet<&str> = st.files.iter().map(|f| f.key.as_str()).collect();
        let new: Vec<FileState> = listing
            .into_iter()
            .filter(|o| !known.contains(o.key.as_str()))
            .map(|o| FileState {
                key: o.key,
                size: o.size,
                header: None,
                packs: None,
                all: false,
            })
            .collect();
        st.files.extend(new);
        st.listed = true;
        Ok(())
    }

    /// Loads bucket `b` of file `fi` into `st.buckets[b]`; a small file is loaded whole.
    /// Loading twice only inserts the same entries again.
    async fn load_bucket(&self, st: &mut State, fi: usize, b: u8) -> Result<()> {
        let (key, size) = (st.files[fi].key.clone(), st.files[fi].size);
        if st.files[fi].all {
            return Ok(());
        }
        if size <= self.whole_file {
            let bytes = self.store.get(&key).await?;
            for (id, loc) in parse_file(&key, &bytes)? {
                st.insert(id, loc);
            }
            st.files[fi].all = true;
            return Ok(());
        }
        if st.files[fi].header.is_none() {
            let head = self
                .store
                .get_range(&key, 0..(HEADER_LEN as u64).min(size))
                .await?;
            st.files[fi].header = Some(Header::parse(&key, &head, size)?);
        }
        let h = st.files[fi].header.clone().expect("header loaded above");
        let (lo, hi) = h.bucket_range(b);
        if lo == hi {
            return Ok(());
        }
        if st.files[fi].packs.is_none() {
            let bytes = self
                .store
                .get_range(&key, HEADER_LEN as u64..h.entries_start())
                .await?;
            st.files[fi].packs = Some(parse_packs(&key, &bytes)?);
        }
        let es = h.entries_start();
        let bytes = self
            .store
            .get_range(&key, es + lo * ENTRY_LEN as u64..es + hi * ENTRY_LEN as u64)
            .await?;
        let packs = st.files[fi].packs.clone().unwrap_or_default();
        let mut parsed = Vec::with_capacity(bytes.len() / ENTRY_LEN);
        for r in bytes.chunks_exact(ENTRY_LEN) {
            let (id, loc) = parse_entry(&key, r, &packs)?;
            if id.0[0] != b {
                return Err(Error::corrupt(&key, "index entry in the wrong bucket"));
            }
            parsed.push((id, loc));
        }
        for (id, loc) in parsed {
            st.insert(id, loc);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::PackBuilder;
    use backtree_store::MemoryStore;
    use bytes::Bytes;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn pack_of(n: u32, salt: u8) -> crate::pack::FinishedPack {
        let mut b = PackBuilder::new(BlobKind::Data, 0);
        for i in 0..n {
            let data = [salt, (i >> 8) as u8, i as u8];
            b.add(Id::of(&data), 1, &data, 3);
        }
        b.finish()
    }

    #[tokio::test]
    async fn lazy_lookup_across_files_and_late_files() {
        let store: DynStore = Arc::new(MemoryStore::new());
        let p1 = pack_of(500, 1);
        let mut b = IndexBuilder::new();
        b.add_pack(p1.kind, p1.id, &p1.entries);
        let (k1, bytes1) = b.encode();
        store.put(&k1, Bytes::from(bytes1)).await.unwrap();

        let set = IndexSet::new(store.clone()).whole_file_limit(0);
        let e = p1.entries[17];
        let loc = set.lookup(&e.id).await.unwrap();
        assert_eq!(
            (loc.pack, loc.offset, loc.stored_len),
            (p1.id, e.offset, e.stored_len)
        );
        // Only one bucket was loaded, not the whole file.
        assert!(set.loaded_entries().await < 20);

        // A second index file written later is found on a miss.
        let p2 = pack_of(300, 2);
        let mut b = IndexBuilder::new();
        b.add_pack(p2.kind, p2.id, &p2.entries);
        let (k2, bytes2) = b.encode();
        store.put(&k2, Bytes::from(bytes2)).await.unwrap();
        for e in p2.entries.iter().chain(p1.entries.iter()) {
            assert_eq!(set.lookup(&e.id).await.unwrap().offset, e.offset);
        }
        assert!(matches!(
            set.lookup(&Id::of(b"absent")).await,
            Err(Error::BlobNotIndexed { .. })
        ));
        let all = load_all_ids(&store).await.unwrap();
        assert_eq!(all.len(), 800);

        // By default small files are read whole: one lookup loads every entry of both files,
        // and lookups in any bucket, old or new files, still find everything.
        let whole = IndexSet::new(store.clone());
        whole.lookup(&p1.entries[3].id).await.unwrap();
        assert_eq!(whole.loaded_entries().await, 800);
        for e in p1.entries.iter().chain(p2.entries.iter()) {
            assert_eq!(whole.lookup(&e.id).await.unwrap().offset, e.offset);
        }
        let p3 = pack_of(50, 3);
        let mut b = IndexBuilder::new();
        b.add_pack(p3.kind, p3.id, &p3.entries);
        let (k3, bytes3) = b.encode();
        store.put(&k3, Bytes::from(bytes3)).await.unwrap();
        for e in &p3.entries {
            assert_eq!(whole.lookup(&e.id).await.unwrap().offset, e.offset);
        }
    }

    proptest! {
        #[test]
        fn index_round_trip(n in 0u32..300, salt in any::<u8>()) {
            let p = pack_of(n, salt);
            let mut b = IndexBuilder::new();
            b.add_pack(p.kind, p.id, &p.entries);
            let (key, bytes) = b.encode();
            let parsed = parse_file(&key, &bytes).unwrap();
            prop_assert_eq!(parsed.len(), n as usize);
            for (id, loc) in parsed {
                let e = p.entries.iter().find(|e| e.id == id).unwrap();
                prop_assert_eq!(loc.offset, e.offset);
                prop_assert_eq!(loc.pack, p.id);
            }
        }

        #[test]
        fn corrupt_index_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = parse_file("i", &bytes);
        }
    }
}
