//! Index tables: the one file format of every index object that maps blob ids to locations
//! (ingest deltas, compacted runs and shards; docs/format.md §6.1).
//!
//! ```text
//! head (hashed: the table's key is BLAKE3 of these bytes)
//!   0  magic "BTIDX002"
//!   8  kind u8          0 delta, 1 run, 2 shard
//!   9  flags u8         bit 0: sealed (encrypted; not supported by this version); others 0
//!  10  prefix_bits u8   p: every id in the table starts with the p-bit `prefix` (0..=16)
//!  11  fanout_bits u8   f: buckets on id bits [p, p+f) (0..=20, p+f <= 24)
//!  12  prefix u32       < 2^p
//!  16  entry_count u32
//!  20  nonce [8]        random, chosen by the writer
//!  28  reserved [4]     zero
//!  32  buckets: 2^f × (end u32, check [16])
//!                       end: entries in buckets 0..=b; check: first 16 bytes of BLAKE3 of
//!                       the bucket's entry bytes
//! entries: entry_count × ENTRY_LEN, sorted by (id, pack), no (id, pack) twice
//! ```
//!
//! Why this shape: a reader that needs one id reads the head (verified against the key,
//! because the key *is* its hash) and then exactly one bucket (verified against its check), with
//! two ranged reads, however large the table; a reader that loads a whole small table verifies
//! it the same way. The head commits to every entry through the checks, so the key still names
//! the whole content and two writers of one table write the same bytes. Each entry names its
//! pack in full, so a bucket is self-contained (no pack table to fetch first: in a compacted
//! shard almost every entry comes from a different pack anyway).
//!
//! The nonce makes every table written unique, even two with the same entries: maintenance
//! deletes tables that no root uses, and must never remove one that another writer has just
//! written again with the same bytes (a compaction retried after a crash).
//!
//! Every reserved byte and unknown bit must be zero, and the reader refuses the table otherwise
//! (a newer writer's meaning is never silently ignored).

use crate::error::{Error, Result};
use crate::id::{BlobKind, Id};

pub const MAGIC: &[u8; 8] = b"BTIDX002";
/// Fixed part of the head.
pub const FIXED_LEN: usize = 32;
/// One bucket row of the head: end u32 + check [16].
pub const BUCKET_ROW: usize = 20;
/// One entry.
pub const ENTRY_LEN: usize = 84;
/// Bytes of a bucket check.
const CHECK_LEN: usize = 16;
pub const MAX_PREFIX_BITS: u8 = 16;
pub const MAX_FANOUT_BITS: u8 = 20;
/// Entries per bucket a writer aims at: a bucket read is then about 5 KB.
pub const BUCKET_TARGET: u64 = 64;

/// What produced a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    /// Written by an ingest (its checkpoints and its final index).
    Delta = 0,
    /// A compaction's merge of deltas (and smaller runs).
    Run = 1,
    /// One prefix range of a compacted base.
    Shard = 2,
}

/// A table entry: where one blob lives, or (tombstone) that it is being deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableEntry {
    pub id: Id,
    pub pack: Id,
    pub kind: BlobKind,
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
    pub flags: u8,
    /// 0: live. Otherwise the entry is a tombstone: a prune scheduled this copy (this id in
    /// this pack) for deletion at this time, in minutes since the Unix epoch; it dooms every
    /// live entry of the same id and pack (docs/format.md §6.1). Readers may still read through
    /// it (the pack may be gone); writers must not reference it.
    pub deleted: u32,
}

impl TableEntry {
    pub fn is_live(&self) -> bool {
        self.deleted == 0
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&self.pack.0);
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.stored_len.to_le_bytes());
        out.extend_from_slice(&self.raw_len.to_le_bytes());
        out.push(self.kind as u8);
        out.push(self.flags);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.deleted.to_le_bytes());
    }

    fn decode(key: &str, r: &[u8]) -> Result<TableEntry> {
        let kind = BlobKind::from_u8(r[76])
            .ok_or_else(|| Error::corrupt(key, format!("unknown pack kind {} in entry", r[76])))?;
        if r[78] != 0 || r[79] != 0 {
            return Err(Error::corrupt(
                key,
                "reserved bytes of an entry are not zero",
            ));
        }
        Ok(TableEntry {
            id: id_at(r, 0),
            pack: id_at(r, 32),
            offset: u32_at(r, 64),
            stored_len: u32_at(r, 68),
            raw_len: u32_at(r, 72),
            kind,
            flags: r[77],
            deleted: u32_at(r, 80),
        })
    }
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn id_at(b: &[u8], i: usize) -> Id {
    let mut a = [0u8; 32];
    a.copy_from_slice(&b[i..i + 32]);
    Id(a)
}

/// The first `bits` bits of an id, as a number (`bits` <= 32).
pub fn id_bits(id: &Id, start: u8, bits: u8) -> u32 {
    if bits == 0 {
        return 0;
    }
    let w = u64::from_be_bytes([
        id.0[0], id.0[1], id.0[2], id.0[3], id.0[4], id.0[5], id.0[6], id.0[7],
    ]);
    ((w << start) >> (64 - bits as u32)) as u32
}

/// Fanout bits for a table of `entries` entries under a `prefix_bits` prefix: buckets of about
/// [`BUCKET_TARGET`] entries.
pub fn fanout_for(entries: u64, prefix_bits: u8) -> u8 {
    let mut f = 0u8;
    while (entries >> f) > BUCKET_TARGET && f < MAX_FANOUT_BITS && prefix_bits + f < 24 {
        f += 1;
    }
    f
}

/// The parsed head of a table.
#[derive(Debug, Clone)]
pub struct Head {
    pub kind: TableKind,
    pub prefix_bits: u8,
    pub fanout_bits: u8,
    pub prefix: u32,
    pub entry_count: u32,
    /// Per bucket: (end, check).
    buckets: Vec<(u32, [u8; CHECK_LEN])>,
}

impl Head {
    /// Length of the head of a table with `fanout_bits`.
    pub fn len_for(fanout_bits: u8) -> usize {
        FIXED_LEN + BUCKET_ROW * (1usize << fanout_bits)
    }

    #[allow(clippy::len_without_is_empty)] // a head is never empty
    pub fn len(&self) -> usize {
        Head::len_for(self.fanout_bits)
    }

    /// Length of the whole table.
    pub fn table_len(&self) -> u64 {
        self.len() as u64 + self.entry_count as u64 * ENTRY_LEN as u64
    }

    /// Reads the fixed part only: what a reader needs to know the head's length.
    pub fn fixed(key: &str, b: &[u8]) -> Result<(TableKind, u8, u8, u32, u32)> {
        if b.len() < FIXED_LEN || &b[..8] != MAGIC {
            return Err(Error::corrupt(key, "not an index table (bad magic)"));
        }
        let kind = match b[8] {
            0 => TableKind::Delta,
            1 => TableKind::Run,
            2 => TableKind::Shard,
            k => return Err(Error::corrupt(key, format!("unknown index table kind {k}"))),
        };
        if b[9] & 1 != 0 {
            return Err(Error::corrupt(
                key,
                "the index table is sealed (encrypted); this version of backtree cannot read it",
            ));
        }
        if b[9] != 0 || b[28..32].iter().any(|&x| x != 0) {
            return Err(Error::corrupt(
                key,
                "reserved bytes of the index table head are not zero (written by a newer version?)",
            ));
        }
        let (p, f) = (b[10], b[11]);
        let prefix = u32_at(b, 12);
        if p > MAX_PREFIX_BITS || f > MAX_FANOUT_BITS || p + f > 24 || (prefix as u64) >> p != 0 {
            return Err(Error::corrupt(
                key,
                "index table prefix or fanout out of range",
            ));
        }
        Ok((kind, p, f, prefix, u32_at(b, 16)))
    }

    /// Parses and verifies a head: `b` must be exactly the head, and hash to `expect` (the id
    /// in the table's key) when given.
    pub fn parse(key: &str, b: &[u8], expect: Option<&Id>) -> Result<Head> {
        let (kind, prefix_bits, fanout_bits, prefix, entry_count) = Head::fixed(key, b)?;
        if b.len() != Head::len_for(fanout_bits) {
            return Err(Error::corrupt(key, "index table head has the wrong length"));
        }
        if let Some(e) = expect {
            if Id::of(b) != *e {
                return Err(Error::corrupt(
                    key,
                    "index table head does not match its name (damaged object)",
                ));
            }
        }
        let mut buckets = Vec::with_capacity(1 << fanout_bits);
        let mut prev = 0u32;
        for row in b[FIXED_LEN..].chunks_exact(BUCKET_ROW) {
            let end = u32_at(row, 0);
            if end < prev {
                return Err(Error::corrupt(key, "index table bucket ends decrease"));
            }
            prev = end;
            let mut c = [0u8; CHECK_LEN];
            c.copy_from_slice(&row[4..]);
            buckets.push((end, c));
        }
        if prev != entry_count {
            return Err(Error::corrupt(
                key,
                "index table bucket ends do not match the count",
            ));
        }
        Ok(Head {
            kind,
            prefix_bits,
            fanout_bits,
            prefix,
            entry_count,
            buckets,
        })
    }

    /// Whether ids with this prefix can be in the table.
    pub fn covers(&self, id: &Id) -> bool {
        id_bits(id, 0, self.prefix_bits) == self.prefix
    }

    /// The bucket of an id (the table must cover it).
    pub fn bucket_of(&self, id: &Id) -> usize {
        id_bits(id, self.prefix_bits, self.fanout_bits) as usize
    }

    pub fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    /// Entry index range of bucket `b`.
    pub fn bucket_entries(&self, b: usize) -> (u64, u64) {
        let lo = if b == 0 { 0 } else { self.buckets[b - 1].0 };
        (lo as u64, self.buckets[b].0 as u64)
    }

    /// Byte range of bucket `b` within the table.
    pub fn bucket_range(&self, b: usize) -> std::ops::Range<u64> {
        let (lo, hi) = self.bucket_entries(b);
        let s = self.len() as u64;
        s + lo * ENTRY_LEN as u64..s + hi * ENTRY_LEN as u64
    }

    /// Byte range of buckets `lo..hi` (contiguous) within the table.
    pub fn buckets_range(&self, lo: usize, hi: usize) -> std::ops::Range<u64> {
        if lo >= hi {
            return 0..0;
        }
        self.bucket_range(lo).start..self.bucket_range(hi - 1).end
    }

    /// Verifies and decodes bucket `b` from its bytes.
    pub fn decode_bucket(&self, key: &str, b: usize, bytes: &[u8]) -> Result<Vec<TableEntry>> {
        let (lo, hi) = self.bucket_entries(b);
        if bytes.len() as u64 != (hi - lo) * ENTRY_LEN as u64 {
            return Err(Error::corrupt(
                key,
                format!("index bucket {b} has the wrong length"),
            ));
        }
        if blake3::hash(bytes).as_bytes()[..CHECK_LEN] != self.buckets[b].1 {
            return Err(Error::corrupt(
                key,
                format!("index bucket {b} does not match its check (damaged object)"),
            ));
        }
        let mut out = Vec::with_capacity((hi - lo) as usize);
        let mut prev: Option<(Id, Id)> = None;
        for r in bytes.chunks_exact(ENTRY_LEN) {
            let e = TableEntry::decode(key, r)?;
            if !self.covers(&e.id) || self.bucket_of(&e.id) != b {
                return Err(Error::corrupt(key, "index entry in the wrong bucket"));
            }
            if prev.is_some_and(|p| p >= (e.id, e.pack)) {
                return Err(Error::corrupt(key, "index entries out of order"));
            }
            prev = Some((e.id, e.pack));
            out.push(e);
        }
        Ok(out)
    }

    /// Verifies and decodes buckets `lo..hi` from their contiguous bytes.
    pub fn decode_buckets(
        &self,
        key: &str,
        lo: usize,
        hi: usize,
        bytes: &[u8],
    ) -> Result<Vec<TableEntry>> {
        let base = self.buckets_range(lo, hi).start;
        let mut out = Vec::new();
        for b in lo..hi {
            let r = self.bucket_range(b);
            let (s, e) = ((r.start - base) as usize, (r.end - base) as usize);
            let part = bytes
                .get(s..e)
                .ok_or_else(|| Error::corrupt(key, "index table shorter than its head says"))?;
            out.extend(self.decode_bucket(key, b, part)?);
        }
        Ok(out)
    }
}

/// A table decoded whole.
#[derive(Debug, Clone)]
pub struct Table {
    pub head: Head,
    pub entries: Vec<TableEntry>,
}

impl Table {
    /// Parses and verifies a whole table; `expect` is the id in its key.
    pub fn parse(key: &str, b: &[u8], expect: Option<&Id>) -> Result<Table> {
        let (_, _, f, _, count) = Head::fixed(key, b)?;
        let hl = Head::len_for(f);
        if b.len() as u64 != hl as u64 + count as u64 * ENTRY_LEN as u64 {
            return Err(Error::corrupt(
                key,
                "index table length does not match its head",
            ));
        }
        let head = Head::parse(key, &b[..hl], expect)?;
        let entries = head.decode_buckets(key, 0, head.bucket_count(), &b[hl..])?;
        Ok(Table { head, entries })
    }
}

/// Encodes a table. `entries` must all lie under the prefix; they are sorted by id and pack,
/// and duplicates (same id and pack) are reduced to one, a tombstone preferred over a live entry
/// (it says the copy is being deleted). Copies of one blob in different packs are all kept:
/// each is a fact, and a reader may need the one a prune is not deleting. Returns the head's
/// BLAKE3 (the table's name) and the bytes.
pub fn encode(
    kind: TableKind,
    prefix_bits: u8,
    prefix: u32,
    mut entries: Vec<TableEntry>,
) -> (Id, Vec<u8>) {
    entries.sort_by(|a, b| {
        (a.id, a.pack)
            .cmp(&(b.id, b.pack))
            .then(b.deleted.cmp(&a.deleted))
    });
    entries.dedup_by(|a, b| a.id == b.id && a.pack == b.pack);
    let f = fanout_for(entries.len() as u64, prefix_bits);
    let nb = 1usize << f;
    let mut body = Vec::with_capacity(entries.len() * ENTRY_LEN);
    let mut rows = Vec::with_capacity(nb * BUCKET_ROW);
    let mut i = 0;
    for b in 0..nb {
        let start = body.len();
        while i < entries.len() && id_bits(&entries[i].id, prefix_bits, f) as usize == b {
            debug_assert_eq!(id_bits(&entries[i].id, 0, prefix_bits), prefix);
            entries[i].encode(&mut body);
            i += 1;
        }
        rows.extend_from_slice(&(i as u32).to_le_bytes());
        rows.extend_from_slice(&blake3::hash(&body[start..]).as_bytes()[..CHECK_LEN]);
    }
    let mut out = Vec::with_capacity(FIXED_LEN + rows.len() + body.len());
    out.extend_from_slice(MAGIC);
    out.push(kind as u8);
    out.push(0);
    out.push(prefix_bits);
    out.push(f);
    out.extend_from_slice(&prefix.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.extend_from_slice(&rand::random::<[u8; 8]>());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&rows);
    let name = Id::of(&out);
    out.extend_from_slice(&body);
    (name, out)
}

/// Entries decoded at once when a table is swept: about 2.7 MB, whatever the table's size.
pub const PIECE_ENTRIES: u64 = 32 << 10;

/// Reads one index table piecewise: its head (verified against the table's name), then runs of
/// whole buckets of about [`PIECE_ENTRIES`] entries, each bucket verified against its check, so
/// a sweep holds one piece of one table however large the tables are.
pub struct Pieces {
    key: String,
    head: Option<Head>,
    next: usize,
    /// Bytes read so far.
    pub bytes: u64,
}

impl Pieces {
    pub fn new(key: &str) -> Pieces {
        Pieces {
            key: key.to_owned(),
            head: None,
            next: 0,
            bytes: 0,
        }
    }

    /// The next piece; `None` at the end, or if the table is gone (a delta covered and deleted
    /// by a compaction meanwhile: its entries are in the tables of a newer root, which hold
    /// nothing a sweep needs that it did not see).
    pub async fn next(
        &mut self,
        store: &backtree_store::DynStore,
    ) -> Result<Option<Vec<TableEntry>>> {
        if self.head.is_none() {
            let gone = |e: &backtree_store::StoreError| e.is_not_found();
            let fixed = match store.get_range(&self.key, 0..FIXED_LEN as u64).await {
                Ok(b) => b,
                Err(e) if gone(&e) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let (_, _, fanout, _, _) = Head::fixed(&self.key, &fixed)?;
            let b = match store
                .get_range(&self.key, 0..Head::len_for(fanout) as u64)
                .await
            {
                Ok(b) => b,
                Err(e) if gone(&e) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            self.bytes += b.len() as u64;
            self.head = Some(Head::parse(
                &self.key,
                &b,
                super::root::name_of(&self.key).as_ref(),
            )?);
        }
        let Some(head) = &self.head else {
            return Ok(None);
        };
        let nb = head.bucket_count();
        while self.next < nb {
            let lo = self.next;
            let start = head.bucket_entries(lo).0;
            let mut hi = lo + 1;
            while hi < nb && head.bucket_entries(hi).1 - start <= PIECE_ENTRIES {
                hi += 1;
            }
            self.next = hi;
            let range = head.buckets_range(lo, hi);
            if range.is_empty() {
                continue;
            }
            let b = match store.get_range(&self.key, range).await {
                Ok(b) => b,
                Err(e) if e.is_not_found() => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            self.bytes += b.len() as u64;
            return Ok(Some(head.decode_buckets(&self.key, lo, hi, &b)?));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn entry(n: u32) -> TableEntry {
        TableEntry {
            id: Id::of(&n.to_le_bytes()),
            pack: Id::of(&(n / 7).to_be_bytes()),
            kind: if n.is_multiple_of(3) {
                BlobKind::Tree
            } else {
                BlobKind::Data
            },
            offset: 8 + n,
            stored_len: n % 1000 + 1,
            raw_len: n % 2000 + 1,
            flags: (n % 2) as u8,
            deleted: 0,
        }
    }

    #[test]
    fn round_trip_and_bucket_reads() {
        let es: Vec<_> = (0..1000).map(entry).collect();
        let (name, bytes) = encode(TableKind::Run, 0, 0, es.clone());
        let t = Table::parse("t", &bytes, Some(&name)).unwrap();
        assert_eq!(t.entries.len(), 1000);
        assert_eq!(t.head.fanout_bits, 4);
        for e in &es {
            let b = t.head.bucket_of(&e.id);
            let r = t.head.bucket_range(b);
            let got = t
                .head
                .decode_bucket("t", b, &bytes[r.start as usize..r.end as usize])
                .unwrap();
            assert!(got.contains(e));
        }
    }

    #[test]
    fn shard_prefix_is_checked() {
        let es: Vec<_> = (0..500)
            .map(entry)
            .filter(|e| id_bits(&e.id, 0, 2) == 3)
            .collect();
        let (name, bytes) = encode(TableKind::Shard, 2, 3, es.clone());
        let t = Table::parse("s", &bytes, Some(&name)).unwrap();
        assert_eq!(t.entries.len(), es.len());
        // The same entries claimed for another prefix are refused.
        let mut other = bytes.clone();
        other[12] = 2;
        let h = Id::of(&other[..Head::len_for(other[11])]);
        assert!(Table::parse("s", &other, Some(&h)).is_err());
    }

    #[test]
    fn damage_and_reserved_bytes_are_refused() {
        let es: Vec<_> = (0..300).map(entry).collect();
        let (name, bytes) = encode(TableKind::Delta, 0, 0, es);
        // A flipped byte anywhere: the head no longer hashes to the name, or a bucket fails
        // its check.
        for pos in [0, 9, 20, 40, bytes.len() - 1, bytes.len() / 2] {
            let mut b = bytes.clone();
            b[pos] ^= 1;
            assert!(Table::parse("d", &b, Some(&name)).is_err(), "byte {pos}");
        }
        // Non-zero reserved bytes are refused even when the head is otherwise consistent.
        for pos in [9usize, 29] {
            let mut b = bytes.clone();
            b[pos] = 2;
            let err = Table::parse("d", &b, None).unwrap_err().to_string();
            assert!(err.contains("reserved"), "{err}");
        }
        let mut b = bytes.clone();
        b[9] = 1;
        let err = Table::parse("d", &b, None).unwrap_err().to_string();
        assert!(err.contains("sealed"), "{err}");
        // Entry reserved bytes: rebuild the check so only the reserved byte is wrong.
        let mut e = entry(5);
        e.id = Id([0; 32]);
        let (_, mut b) = encode(TableKind::Delta, 0, 0, vec![e]);
        let hl = Head::len_for(0);
        b[hl + 78] = 1;
        let c = blake3::hash(&b[hl..]);
        b[FIXED_LEN + 4..FIXED_LEN + 20].copy_from_slice(&c.as_bytes()[..16]);
        let err = Table::parse("d", &b, None).unwrap_err().to_string();
        assert!(err.contains("reserved"), "{err}");
    }

    #[test]
    fn copies_in_other_packs_stay_and_a_tombstone_wins_in_its_pack() {
        let mut dead = entry(1);
        dead.deleted = 5;
        let live = entry(1);
        let mut elsewhere = entry(1);
        elsewhere.pack = Id::of(b"another pack");
        let (_, bytes) = encode(TableKind::Run, 0, 0, vec![live, elsewhere, dead, live]);
        let t = Table::parse("r", &bytes, None).unwrap();
        let mut want = vec![dead, elsewhere];
        want.sort_by_key(|e| e.pack);
        assert_eq!(t.entries, want);
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let _ = Table::parse("x", &bytes, None);
        }

        #[test]
        fn any_size_round_trips(n in 0u32..2000) {
            let es: Vec<_> = (0..n).map(entry).collect();
            let (name, bytes) = encode(TableKind::Run, 0, 0, es);
            let t = Table::parse("r", &bytes, Some(&name)).unwrap();
            prop_assert_eq!(t.entries.len(), n as usize);
        }
    }
}
