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

use crate::error::{Error, Result};
use crate::id::{BlobKind, Id};

pub const MAGIC: &[u8; 8] = b"BTPACK01";
pub const END_MAGIC: &[u8; 8] = b"BTPKEND1";
pub const RECORD_LEN: usize = 46;
pub const FOOTER_LEN: usize = 16;

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
    if footer.len() != FOOTER_LEN || &footer[8..] != END_MAGIC {
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
            if (e.offset as u64) < MAGIC.len() as u64
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

/// Parses a whole pack's trailer (for tests and index rebuilds).
pub fn parse_pack(what: &str, pack: &[u8]) -> Result<Vec<PackEntry>> {
    if pack.len() < MAGIC.len() + FOOTER_LEN || &pack[..8] != MAGIC {
        return Err(Error::corrupt(what, "not a pack (bad magic)"));
    }
    let count = parse_footer(what, &pack[pack.len() - FOOTER_LEN..])? as usize;
    let tlen = count
        .checked_mul(RECORD_LEN)
        .filter(|t| t + FOOTER_LEN + MAGIC.len() <= pack.len())
        .ok_or_else(|| Error::corrupt(what, "trailer larger than the pack"))?;
    let start = pack.len() - FOOTER_LEN - tlen;
    parse_trailer(
        what,
        &pack[start..pack.len() - FOOTER_LEN],
        pack.len() as u64,
    )
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
