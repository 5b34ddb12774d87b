//! Filters: about 1.13 bytes per id that answer "certainly not in the index" or "maybe"
//! (binary fuse filters with 8-bit fingerprints, false-positive rate ≈ 1/256).
//!
//! A compaction writes one filter *bundle* per output (a run: one filter; a sharded base: one
//! filter per shard), so an ingest can deduplicate against the whole repository with ~1.1 B of
//! memory per chunk instead of holding every id (docs/format.md §6.3). A "maybe" is always
//! confirmed by reading the id's bucket from its table: a filter never decides that a blob
//! exists.
//!
//! ```text
//! "BTFLT001"                       magic
//! flags u8                         bit 0: sealed (not supported by this version); others 0
//! reserved [3]                     zero
//! count u32                        filters in the bundle
//! nonce [8]                        random (every bundle written is unique, see table.rs)
//! count × (prefix_bits u8, reserved [3], prefix u32, keys u32, len u32)
//! filters, back to back: len bytes each; empty (len 0) when the table has no live entry,
//!   else seed u64, segment_length u32, segment_length_mask u32, segment_count_length u32,
//!   fingerprints [len - 20]
//! ```
//! The key of an id is bytes 24..32 of the id, little-endian (ids are uniform hashes, and
//! these bytes are independent of the prefix and bucket bits). The filter construction and
//! lookup are those of `xorf` 0.13's `BinaryFuse8` (murmur3 `mix64` of key + seed), pinned
//! exactly in Cargo.toml because stored filters depend on them. The bundle's key is
//! `index/filters/<hex BLAKE3 of the bytes>`.

use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::table::id_bits;
use bytes::Bytes;
use xorf::{BinaryFuse8, BinaryFuse8Ref, Filter as _, FilterRef as _};

pub const MAGIC: &[u8; 8] = b"BTFLT001";
const HEADER: usize = 24;
const ROW: usize = 16;
const DESCRIPTOR: usize = 20;

/// The filter key of an id.
pub fn key_of(id: &Id) -> u64 {
    u64::from_le_bytes([
        id.0[24], id.0[25], id.0[26], id.0[27], id.0[28], id.0[29], id.0[30], id.0[31],
    ])
}

/// One table's filter. It keeps its encoded bytes (descriptor and fingerprints, a zero-copy
/// slice of the bundle it was read from) and looks them up in place, so a loaded filter costs
/// its size once, not twice.
#[derive(Debug, Clone)]
pub struct IdFilter {
    prefix_bits: u8,
    prefix: u32,
    keys: u32,
    /// Descriptor (20 bytes) then fingerprints; `None`: no keys.
    data: Option<Bytes>,
}

fn encode_fuse(f: &BinaryFuse8) -> Bytes {
    let mut out = Vec::with_capacity(DESCRIPTOR + f.fingerprints.len());
    out.extend_from_slice(&f.descriptor.seed.to_le_bytes());
    out.extend_from_slice(&f.descriptor.segment_length.to_le_bytes());
    out.extend_from_slice(&f.descriptor.segment_length_mask.to_le_bytes());
    out.extend_from_slice(&f.descriptor.segment_count_length.to_le_bytes());
    out.extend_from_slice(&f.fingerprints);
    Bytes::from(out)
}

impl IdFilter {
    /// Builds the filter of the ids of one table (prefix as in its head).
    pub fn build(prefix_bits: u8, prefix: u32, mut keys: Vec<u64>) -> IdFilter {
        keys.sort_unstable();
        keys.dedup();
        let n = keys.len() as u32;
        // The construction only fails for duplicate keys (removed above) or after 1 000
        // unlucky seeds, which does not happen for distinct keys.
        let data = (!keys.is_empty())
            .then(|| BinaryFuse8::try_from(&keys).ok())
            .flatten()
            .map(|f| encode_fuse(&f));
        IdFilter {
            prefix_bits,
            prefix,
            keys: if data.is_some() { n } else { 0 },
            data,
        }
    }

    /// `false`: the id is certainly not in the table. `true`: it may be.
    pub fn may_contain(&self, id: &Id) -> bool {
        match &self.data {
            // Parsed and checked when the bundle was read: the fingerprints are exactly as long
            // as the descriptor's lookups need.
            Some(d) => {
                BinaryFuse8Ref::from_dma(&d[..DESCRIPTOR], &d[DESCRIPTOR..]).contains(&key_of(id))
            }
            None => false,
        }
    }

    /// Bytes held in memory.
    pub fn memory(&self) -> usize {
        self.data.as_ref().map_or(0, |d| d.len()) + 64
    }

    fn encoded_len(&self) -> usize {
        self.data.as_ref().map_or(0, |d| d.len())
    }
}

/// The filters of one compaction output, by prefix.
#[derive(Debug, Clone, Default)]
pub struct FilterBundle {
    filters: Vec<IdFilter>,
}

impl FilterBundle {
    pub fn new(filters: Vec<IdFilter>) -> FilterBundle {
        FilterBundle { filters }
    }

    /// `false`: the id is certainly in none of the bundle's tables.
    pub fn may_contain(&self, id: &Id) -> bool {
        // Shards have one prefix length: the filter of the id's shard is found by index.
        if let Some(f) = self.filters.first() {
            let i = id_bits(id, 0, f.prefix_bits) as usize;
            if let Some(g) = self.filters.get(i) {
                if g.prefix_bits == f.prefix_bits && g.prefix as usize == i {
                    return g.may_contain(id);
                }
            }
        }
        self.filters
            .iter()
            .any(|f| id_bits(id, 0, f.prefix_bits) == f.prefix && f.may_contain(id))
    }

    pub fn memory(&self) -> usize {
        self.filters.iter().map(IdFilter::memory).sum()
    }

    /// Encodes the bundle; returns its name (BLAKE3 of the bytes) and bytes.
    pub fn encode(&self) -> (Id, Vec<u8>) {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[0u8; 4]);
        out.extend_from_slice(&(self.filters.len() as u32).to_le_bytes());
        out.extend_from_slice(&rand::random::<[u8; 8]>());
        for f in &self.filters {
            out.push(f.prefix_bits);
            out.extend_from_slice(&[0u8; 3]);
            out.extend_from_slice(&f.prefix.to_le_bytes());
            out.extend_from_slice(&f.keys.to_le_bytes());
            out.extend_from_slice(&(f.encoded_len() as u32).to_le_bytes());
        }
        for f in &self.filters {
            if let Some(d) = &f.data {
                out.extend_from_slice(d);
            }
        }
        (Id::of(&out), out)
    }

    /// Parses and verifies a bundle (`expect`: the id in its key). The filters keep slices of
    /// `bytes`: nothing is copied.
    pub fn parse(key: &str, bytes: &Bytes, expect: Option<&Id>) -> Result<FilterBundle> {
        let b: &[u8] = bytes;
        let bad = |why: &str| Error::corrupt(key, why.to_owned());
        if b.len() < HEADER || &b[..8] != MAGIC {
            return Err(bad("not an index filter (bad magic)"));
        }
        if let Some(e) = expect {
            if Id::of(b) != *e {
                return Err(bad("index filter does not match its name (damaged object)"));
            }
        }
        if b[8] & 1 != 0 {
            return Err(bad(
                "the index filter is sealed (encrypted); this version of backtree cannot read it",
            ));
        }
        if b[8..12].iter().any(|&x| x != 0) {
            return Err(bad(
                "reserved bytes of the index filter are not zero (written by a newer version?)",
            ));
        }
        let count = u32_at(b, 12) as usize;
        let rows_end = HEADER
            .checked_add(
                count
                    .checked_mul(ROW)
                    .ok_or_else(|| bad("filter count too large"))?,
            )
            .filter(|&e| e <= b.len())
            .ok_or_else(|| bad("index filter shorter than its header says"))?;
        let mut pos = rows_end;
        let mut filters = Vec::with_capacity(count);
        for r in b[HEADER..rows_end].chunks_exact(ROW) {
            let (pb, prefix, keys, len) =
                (r[0], u32_at(r, 4), u32_at(r, 8), u32_at(r, 12) as usize);
            if r[1..4].iter().any(|&x| x != 0) {
                return Err(bad("reserved bytes of an index filter row are not zero"));
            }
            if pb > crate::index::table::MAX_PREFIX_BITS || (prefix as u64) >> pb != 0 {
                return Err(bad("index filter prefix out of range"));
            }
            let body = b
                .get(pos..pos + len)
                .ok_or_else(|| bad("index filter shorter than its rows say"))?;
            pos += len;
            let data = if len == 0 {
                None
            } else {
                if len < DESCRIPTOR {
                    return Err(bad("index filter too short"));
                }
                let seg_len = u32_at(body, 8);
                let mask = u32_at(body, 12);
                let seg_count_len = u32_at(body, 16);
                let fp = &body[DESCRIPTOR..];
                // What `contains` indexes with: h0 < segment_count_length, h1 and h2 within two
                // segments after it. Anything else would index out of bounds.
                let ok = seg_len.is_power_of_two()
                    && mask == seg_len - 1
                    && seg_count_len.is_multiple_of(seg_len)
                    && fp.len() as u64 == seg_count_len as u64 + 2 * seg_len as u64;
                if !ok {
                    return Err(bad("index filter parameters are inconsistent"));
                }
                Some(bytes.slice(pos - len..pos))
            };
            filters.push(IdFilter {
                prefix_bits: pb,
                prefix,
                keys,
                data,
            });
        }
        if pos != b.len() {
            return Err(bad("index filter has trailing bytes"));
        }
        Ok(FilterBundle { filters })
    }
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids(n: u32, salt: u8) -> Vec<Id> {
        (0..n)
            .map(|i| Id::of(&[&i.to_le_bytes()[..], &[salt]].concat()))
            .collect()
    }

    #[test]
    fn no_false_negatives_few_false_positives_round_trip() {
        let present = ids(20_000, 1);
        let f = IdFilter::build(0, 0, present.iter().map(key_of).collect());
        let (name, bytes) = FilterBundle::new(vec![f]).encode();
        let b = FilterBundle::parse("f", &Bytes::from(bytes.clone()), Some(&name)).unwrap();
        assert!(present.iter().all(|id| b.may_contain(id)));
        let fp = ids(20_000, 2).iter().filter(|id| b.may_contain(id)).count();
        assert!(fp < 200, "{fp} false positives of 20 000");
        assert!(
            bytes.len() < 20_000 * 13 / 10 + 200,
            "{} bytes",
            bytes.len()
        );
    }

    #[test]
    fn sharded_bundles_and_small_or_empty_tables() {
        let all = ids(5_000, 3);
        let mut filters = Vec::new();
        for p in 0..4u32 {
            let keys: Vec<u64> = all
                .iter()
                .filter(|id| id_bits(id, 0, 2) == p)
                .map(key_of)
                .collect();
            filters.push(IdFilter::build(2, p, if p == 2 { vec![] } else { keys }));
        }
        let (name, bytes) = FilterBundle::new(filters).encode();
        let b = FilterBundle::parse("f", &Bytes::from(bytes.clone()), Some(&name)).unwrap();
        for id in &all {
            assert_eq!(
                b.may_contain(id),
                id_bits(id, 0, 2) != 2 || b.may_contain(id)
            );
            if id_bits(id, 0, 2) != 2 {
                assert!(b.may_contain(id));
            }
        }
        for n in [1u32, 2, 3, 10] {
            let few = ids(n, 9);
            let f = IdFilter::build(0, 0, few.iter().map(key_of).collect());
            assert!(few.iter().all(|id| f.may_contain(id)), "{n} keys");
        }
        assert!(!IdFilter::build(0, 0, vec![]).may_contain(&all[0]));
    }

    #[test]
    fn damage_and_reserved_bytes_are_refused() {
        let f = IdFilter::build(0, 0, ids(100, 4).iter().map(key_of).collect());
        let (name, bytes) = FilterBundle::new(vec![f]).encode();
        let mut b = bytes.clone();
        b[40] ^= 1;
        assert!(FilterBundle::parse("f", &Bytes::from(b), Some(&name)).is_err());
        let mut b = bytes.clone();
        b[10] = 1;
        let err = FilterBundle::parse("f", &Bytes::from(b), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("reserved"), "{err}");
        let mut b = bytes;
        b[8] = 1;
        let err = FilterBundle::parse("f", &Bytes::from(b), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("sealed"), "{err}");
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(b) = FilterBundle::parse("x", &Bytes::from(bytes.clone()), None) {
                let _ = b.may_contain(&Id::of(&bytes));
            }
        }
    }
}
