//! Packs: many blobs in one store object, with a trailer that lists them.
//!
//! ```text
//! "BTPACK01"                                   8-byte magic
//! blob bytes, back to back                     stored (compressed) form
//! trailer: one 46-byte record per blob         kind u8, flags u8, id [32], offset u32,
//!                                              stored_len u32, raw_len u32  (little-endian)
//! footer: count u32, reserved u32 (0), "BTPKEND1"
//! ```
//!
//! A pack is named by the BLAKE3 hash of its whole bytes and stored at
//! `packs/{data|tree}/<first two hex digits>/<hex id>`. The trailer makes every pack
//! self-describing, so the index can be rebuilt from packs alone. Packs are written whole and
//! never modified.
//!
//! This module is the only place that knows the pack layout. Writers use [`PackBuilder`];
//! readers use [`parse_pack`] on a whole pack in memory, or [`read_trailer`] to fetch and parse
//! just the trailer of a pack in a store (footer first, then the records it announces). The
//! resulting [`Trailer`] tells where the blob area ends, so a reader that fetches windows of a
//! pack (the mount) or checks every record (verify, index repair, GC) needs no offsets of its
//! own.

use crate::error::{Error, Result};
use crate::id::{BlobKind, Id};
use backtree_store::DynStore;
use std::ops::Range;

pub const MAGIC: &[u8; 8] = b"BTPACK01";
pub const END_MAGIC: &[u8; 8] = b"BTPKEND1";
/// Length of the pack header (the magic): the first blob starts here.
pub const HEADER_LEN: usize = MAGIC.len();
pub const RECORD_LEN: usize = 46;
/// Length of the footer: count u32, reserved u32, [`END_MAGIC`].
pub const FOOTER_LEN: usize = 8 + END_MAGIC.len();

/// One blob's place in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub kind: BlobKind,
    pub flags: u8,
    pub id: Id,
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
}

/// Accumulates blobs into a pack in memory.
#[derive(Debug)]
pub struct PackBuilder {
    kind: BlobKind,
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
    raw_bytes: u64,
}

/// A finished pack, ready to upload.
#[derive(Debug)]
pub struct FinishedPack {
    pub kind: BlobKind,
    pub id: Id,
    pub bytes: Vec<u8>,
    pub entries: Vec<PackEntry>,
    /// Sum of the blobs' uncompressed sizes.
    pub raw_bytes: u64,
}

impl PackBuilder {
    pub fn new(kind: BlobKind, capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity);
        buf.extend_from_slice(MAGIC);
        PackBuilder {
            kind,
            buf,
            entries: Vec::new(),
            raw_bytes: 0,
        }
    }

    /// Appends one blob's stored bytes.
    pub fn add(&mut self, id: Id, flags: u8, stored: &[u8], raw_len: u32) {
        let offset = self.buf.len() as u32;
        self.buf.extend_from_slice(stored);
        self.entries.push(PackEntry {
            kind: self.kind,
            flags,
            id,
            offset,
            stored_len: stored.len() as u32,
            raw_len,
        });
        self.raw_bytes += raw_len as u64;
    }

    /// Bytes accumulated so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends the trailer and footer and names the pack.
    pub fn finish(mut self) -> FinishedPack {
        for e in &self.entries {
            self.buf.push(e.kind as u8);
            self.buf.push(e.flags);
            self.buf.extend_from_slice(&e.id.0);
            self.buf.extend_from_slice(&e.offset.to_le_bytes());
            self.buf.extend_from_slice(&e.stored_len.to_le_bytes());
            self.buf.extend_from_slice(&e.raw_len.to_le_bytes());
        }
        self.buf
            .extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&0u32.to_le_bytes());
        self.buf.extend_from_slice(END_MAGIC);
        FinishedPack {
            kind: self.kind,
            id: Id::of(&self.buf),
            bytes: self.buf,
            entries: self.entries,
            raw_bytes: self.raw_bytes,
        }
    }
}

/// Parses the footer (the last [`FOOTER_LEN`] bytes of a pack): the number of trailer records.
pub fn parse_footer(what: &str, footer: &[u8]) -> Result<u32> {
    if footer.len() != FOOTER_LEN || &footer[FOOTER_LEN - END_MAGIC.len()..] != END_MAGIC {
        return Err(Error::corrupt(what, "pack footer missing or damaged"));
    }
    Ok(u32::from_le_bytes([
        footer[0], footer[1], footer[2], footer[3],
    ]))
}

/// Parses a pack's trailer records and checks them against the pack's size.
pub fn parse_trailer(what: &str, trailer: &[u8], pack_len: u64) -> Result<Vec<PackEntry>> {
    if !trailer.len().is_multiple_of(RECORD_LEN) {
        return Err(Error::corrupt(what, "pack trailer has a partial record"));
    }
    let data_end = pack_len.saturating_sub((trailer.len() + FOOTER_LEN) as u64);
    trailer
        .chunks_exact(RECORD_LEN)
        .map(|r| {
            let kind = BlobKind::from_u8(r[0])
                .ok_or_else(|| Error::corrupt(what, "unknown blob kind in trailer"))?;
            let u = |i: usize| u32::from_le_bytes([r[i], r[i + 1], r[i + 2], r[i + 3]]);
            let e = PackEntry {
                kind,
                flags: r[1],
                id: Id::from_slice(&r[2..34]).unwrap_or(Id([0; 32])),
                offset: u(34),
                stored_len: u(38),
                raw_len: u(42),
            };
            if (e.offset as u64) < HEADER_LEN as u64
                || e.offset as u64 + e.stored_len as u64 > data_end
            {
                return Err(Error::corrupt(
                    what,
                    "trailer record points outside the pack",
                ));
            }
            Ok(e)
        })
        .collect()
}

/// Where the trailer of a pack of `pack_len` bytes lies, given its footer's record count.
fn trailer_range(what: &str, pack_len: u64, count: u32) -> Result<Range<u64>> {
    let end = pack_len - FOOTER_LEN as u64;
    let len = count as u64 * RECORD_LEN as u64;
    if HEADER_LEN as u64 + len + FOOTER_LEN as u64 > pack_len {
        return Err(Error::corrupt(what, "trailer larger than the pack"));
    }
    Ok(end - len..end)
}

/// Parses a whole pack's trailer (for tests and index rebuilds).
pub fn parse_pack(what: &str, pack: &[u8]) -> Result<Vec<PackEntry>> {
    if pack.len() < HEADER_LEN + FOOTER_LEN || &pack[..HEADER_LEN] != MAGIC {
        return Err(Error::corrupt(what, "not a pack (bad magic)"));
    }
    let count = parse_footer(what, &pack[pack.len() - FOOTER_LEN..])?;
    let t = trailer_range(what, pack.len() as u64, count)?;
    parse_trailer(
        what,
        &pack[t.start as usize..t.end as usize],
        pack.len() as u64,
    )
}

/// A pack's parsed trailer and the pack's length: everything a reader needs to know about
/// where a pack's blobs lie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trailer {
    /// The blobs, in the order they are stored.
    pub entries: Vec<PackEntry>,
    /// Length of the whole pack in bytes.
    pub pack_len: u64,
}

impl Trailer {
    /// End of the blob area: where the trailer records start.
    pub fn data_end(&self) -> u64 {
        self.pack_len - FOOTER_LEN as u64 - (self.entries.len() * RECORD_LEN) as u64
    }

    /// The blob area: from the end of the header to the start of the trailer. Every entry's
    /// stored bytes lie inside it.
    pub fn blob_area(&self) -> Range<u64> {
        HEADER_LEN as u64..self.data_end()
    }
}

/// The blob area of a pack of `pack_len` bytes with `count` trailer records (as
/// [`Trailer::blob_area`], for a reader that keeps only the footer's numbers).
pub fn blob_area(pack_len: u64, count: u32) -> Range<u64> {
    HEADER_LEN as u64..pack_len - FOOTER_LEN as u64 - count as u64 * RECORD_LEN as u64
}

/// Fetches a pack's size and footer: `(pack_len, count)`, the number of its trailer records
/// (two requests). A reader of a pack with a very large trailer (a 16 MiB pack of tiny blobs has
/// hundreds of thousands of records) then reads only the records it needs with
/// [`read_records`]. Errors as [`read_trailer`].
pub async fn read_footer(store: &DynStore, key: &str) -> Result<(u64, u32)> {
    let pack_len = store.head(key).await?.ok_or_else(|| Error::NotFound {
        what: format!("pack {key}"),
    })?;
    if pack_len < (HEADER_LEN + FOOTER_LEN) as u64 {
        return Err(Error::corrupt(key, "too short to be a pack"));
    }
    let foot_at = pack_len - FOOTER_LEN as u64;
    let footer = store.get_range(key, foot_at..pack_len).await?;
    let count = parse_footer(key, &footer)?;
    trailer_range(key, pack_len, count)?;
    Ok((pack_len, count))
}

/// Records `records` (indices, clamped to `count`) of the trailer of the pack at `key`, of
/// `pack_len` bytes with `count` records: one ranged read, checked as [`parse_trailer`] checks a
/// whole trailer.
pub async fn read_records(
    store: &DynStore,
    key: &str,
    pack_len: u64,
    count: u32,
    records: Range<u32>,
) -> Result<Vec<PackEntry>> {
    let all = trailer_range(key, pack_len, count)?;
    let (a, b) = (records.start.min(count), records.end.min(count));
    if a >= b {
        return Ok(Vec::new());
    }
    let at = |i: u32| all.start + i as u64 * RECORD_LEN as u64;
    let bytes = store.get_range(key, at(a)..at(b)).await?;
    if bytes.len() as u64 != at(b) - at(a) {
        return Err(Error::corrupt(key, "pack trailer cut short"));
    }
    // parse_trailer places the blob area's end before the records it is given: tell it the
    // length the whole trailer has.
    let others = (count - (b - a)) as u64 * RECORD_LEN as u64;
    parse_trailer(key, &bytes, pack_len - others)
}

/// Fetches and parses the trailer of the pack at `key` in `store`: its size, then its footer,
/// then the records the footer announces (three requests; the pack's first bytes are not read,
/// so its magic is not checked). A missing pack is [`Error::NotFound`]; a pack too short to
/// hold a footer, with a damaged footer, or whose records point outside it is
/// [`Error::Corrupt`].
pub async fn read_trailer(store: &DynStore, key: &str) -> Result<Trailer> {
    let pack_len = store.head(key).await?.ok_or_else(|| Error::NotFound {
        what: format!("pack {key}"),
    })?;
    read_trailer_sized(store, key, pack_len).await
}

/// [`read_trailer`] for a pack whose length is already known (from a listing): one request
/// fewer.
pub async fn read_trailer_sized(store: &DynStore, key: &str, pack_len: u64) -> Result<Trailer> {
    if pack_len < (HEADER_LEN + FOOTER_LEN) as u64 {
        return Err(Error::corrupt(key, "too short to be a pack"));
    }
    let foot_at = pack_len - FOOTER_LEN as u64;
    let footer = store.get_range(key, foot_at..pack_len).await?;
    let count = parse_footer(key, &footer)?;
    let range = trailer_range(key, pack_len, count)?;
    let want = range.end - range.start;
    let records = if want == 0 {
        bytes::Bytes::new()
    } else {
        store.get_range(key, range).await?
    };
    if records.len() as u64 != want {
        return Err(Error::corrupt(key, "pack trailer cut short"));
    }
    Ok(Trailer {
        entries: parse_trailer(key, &records, pack_len)?,
        pack_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn pack_round_trip(blobs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20)) {
            let mut b = PackBuilder::new(BlobKind::Data, 0);
            for (i, blob) in blobs.iter().enumerate() {
                b.add(Id::of(blob), (i % 2) as u8, blob, blob.len() as u32 + 1);
            }
            let p = b.finish();
            prop_assert_eq!(Id::of(&p.bytes), p.id);
            let entries = parse_pack("p", &p.bytes).unwrap();
            prop_assert_eq!(&entries, &p.entries);
            for (e, blob) in entries.iter().zip(&blobs) {
                let s = e.offset as usize;
                prop_assert_eq!(&p.bytes[s..s + e.stored_len as usize], &blob[..]);
            }
        }

        #[test]
        fn corrupt_packs_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_pack("p", &bytes);
        }
    }

    fn pack_of(blobs: &[&[u8]]) -> FinishedPack {
        let mut b = PackBuilder::new(BlobKind::Data, 0);
        for blob in blobs {
            b.add(Id::of(blob), 0, blob, blob.len() as u32);
        }
        b.finish()
    }

    async fn store_with(key: &str, bytes: Vec<u8>) -> DynStore {
        let store: DynStore = std::sync::Arc::new(backtree_store::MemoryStore::new());
        store.put(key, bytes.into()).await.unwrap();
        store
    }

    #[tokio::test]
    async fn read_trailer_of_a_good_pack() {
        let p = pack_of(&[b"one", b"two blobs", b"three"]);
        let len = p.bytes.len() as u64;
        let store = store_with("packs/data/aa/p", p.bytes).await;
        let t = read_trailer(&store, "packs/data/aa/p").await.unwrap();
        assert_eq!(t.entries, p.entries);
        assert_eq!(t.pack_len, len);
        // The blob area is exactly the blobs, back to back after the header.
        assert_eq!(
            t.blob_area(),
            HEADER_LEN as u64..HEADER_LEN as u64 + 3 + 9 + 5
        );
        assert_eq!(
            t.data_end(),
            len - FOOTER_LEN as u64 - 3 * RECORD_LEN as u64
        );
        let last = t.entries.last().unwrap();
        assert_eq!(last.offset as u64 + last.stored_len as u64, t.data_end());
        let sized = read_trailer_sized(&store, "packs/data/aa/p", len).await;
        assert_eq!(sized.unwrap(), t);
    }

    #[tokio::test]
    async fn footer_and_records_read_any_slice_of_a_trailer() {
        let blobs: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; i as usize + 1]).collect();
        let refs: Vec<&[u8]> = blobs.iter().map(|b| b.as_slice()).collect();
        let p = pack_of(&refs);
        let len = p.bytes.len() as u64;
        let store = store_with("packs/data/aa/p", p.bytes).await;
        let (pack_len, count) = read_footer(&store, "packs/data/aa/p").await.unwrap();
        assert_eq!((pack_len, count), (len, 10));
        let whole = read_trailer(&store, "packs/data/aa/p").await.unwrap();
        assert_eq!(blob_area(pack_len, count), whole.blob_area());
        for (a, b) in [(0, 10), (0, 1), (3, 7), (9, 10), (5, 20), (7, 7), (12, 15)] {
            let got = read_records(&store, "packs/data/aa/p", pack_len, count, a..b).await;
            let want =
                &p.entries[(a as usize).min(10)..(b as usize).min(10).max(a.min(10) as usize)];
            assert_eq!(got.unwrap(), want, "{a}..{b}");
        }
        let missing = read_footer(&store, "packs/data/aa/q").await.unwrap_err();
        assert!(matches!(missing, Error::NotFound { .. }), "{missing}");
    }

    #[tokio::test]
    async fn read_trailer_of_a_missing_pack_is_not_found() {
        let store = store_with("other", vec![0; 40]).await;
        let err = read_trailer(&store, "packs/data/aa/p").await.unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("packs/data/aa/p"), "{err}");
    }

    #[tokio::test]
    async fn read_trailer_of_a_truncated_pack_is_corrupt() {
        let p = pack_of(&[b"one", b"two blobs", b"three"]);
        // Cut anywhere: the footer is gone, or (very short) there is no room for one.
        for cut in [1, FOOTER_LEN, FOOTER_LEN + RECORD_LEN, p.bytes.len() - 3] {
            let bytes = p.bytes[..p.bytes.len() - cut].to_vec();
            let store = store_with("packs/data/aa/p", bytes).await;
            let err = read_trailer(&store, "packs/data/aa/p").await.unwrap_err();
            assert!(matches!(err, Error::Corrupt { .. }), "cut {cut}: {err}");
            assert!(err.to_string().contains("packs/data/aa/p"), "{err}");
        }
    }

    #[tokio::test]
    async fn read_trailer_with_a_damaged_footer_is_corrupt() {
        let p = pack_of(&[b"one", b"two blobs"]);
        let n = p.bytes.len();
        // End magic damaged.
        let mut bad = p.bytes.clone();
        bad[n - 1] ^= 1;
        let store = store_with("k", bad).await;
        let err = read_trailer(&store, "k").await.unwrap_err();
        assert!(
            err.to_string().contains("pack footer missing or damaged"),
            "{err}"
        );
        // A count larger than the pack.
        let mut bad = p.bytes.clone();
        bad[n - FOOTER_LEN..n - FOOTER_LEN + 4].copy_from_slice(&1000u32.to_le_bytes());
        let store = store_with("k", bad).await;
        let err = read_trailer(&store, "k").await.unwrap_err();
        assert!(
            err.to_string().contains("trailer larger than the pack"),
            "{err}"
        );
        // A record pointing past the blob area (its offset field damaged).
        let mut bad = p.bytes.clone();
        let rec = n - FOOTER_LEN - RECORD_LEN;
        bad[rec + 34..rec + 38].copy_from_slice(&(n as u32).to_le_bytes());
        let store = store_with("k", bad).await;
        let err = read_trailer(&store, "k").await.unwrap_err();
        assert!(err.to_string().contains("points outside the pack"), "{err}");
    }

    #[test]
    fn damaged_footer_is_an_error() {
        let mut b = PackBuilder::new(BlobKind::Tree, 0);
        b.add(Id::of(b"x"), 0, b"x", 1);
        let mut p = b.finish().bytes;
        let n = p.len();
        p[n - 1] ^= 1;
        assert!(parse_pack("p", &p).is_err());
    }
}
