//! Blob encoding: compression on the way in, decompression and hash verification on the way out.
//!
//! A blob's stored bytes are either a single zstd frame or the raw bytes (when compression does
//! not save at least 1/32 of the size, e.g. for already-compressed content). Which one is
//! recorded in the pack trailer and the index (`FLAG_ZSTD`). Every decoded blob is checked
//! against its id before anyone sees it: wrong bytes are an error, never data.
//!
//! # One reading path
//! Every reader of blobs goes the same way, so that what is checked (and, later, decrypted) is
//! checked in one place:
//!
//! 1. **range**: [`fetch`] reads a blob's stored bytes from its pack, given its index
//!    [`Location`], into a [`StoredBlob`] (a reader that fetched a larger window of a pack, like
//!    the mount, builds the [`StoredBlob`] from a slice of the window instead);
//! 2. **decode**: [`StoredBlob::decode`] decompresses, checks the length, and
//! 3. **verify**: [`verify`] checks that the bytes hash to the blob's id. Besides the writer's
//!    hashing this is the only place that computes a blob's id; a cache that keeps decoded
//!    blobs elsewhere (the mount's disk cache) calls it on what it reads back.
//!
//! Errors name the blob and its pack ([`describe`]).

use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::Location;
use backtree_store::DynStore;
use bytes::Bytes;
use std::cell::RefCell;

/// Blob flag: the stored bytes are a zstd frame.
pub const FLAG_ZSTD: u8 = 1;

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    /// One decompression context per thread: creating one per blob cost about 3% of a
    /// many-small-files restore (measured with perf).
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// zstd's tables for level 3 on inputs over 256 KiB: hashLog 17 and chainLog 16, 768 KiB in
/// all, more than a core's L2 cache. Blobs are chunks of 1 MiB on average, and with tables of
/// half that size (hashLog 16, chainLog 15) the compressor ran 17% faster on /usr data cut in
/// 1 MiB blocks (`zstd -b3 -B1048576 --zstd=…`) for 0.9% more bytes, and an ingest of the
/// benchmark's disk image stored 1% more. Only the writer sees these parameters: any zstd
/// decoder reads the frames.
const LEVEL3_TABLES: (u32, u32) = (16, 15);

/// A compressor for `level`, with [`LEVEL3_TABLES`] at level 3.
fn compressor(level: i32) -> Option<zstd::bulk::Compressor<'static>> {
    let mut z = zstd::bulk::Compressor::new(level).ok()?;
    if level == 3 {
        use zstd::stream::raw::CParameter;
        z.set_parameter(CParameter::HashLog(LEVEL3_TABLES.0)).ok()?;
        z.set_parameter(CParameter::ChainLog(LEVEL3_TABLES.1))
            .ok()?;
    }
    Some(z)
}

/// Compresses `raw` with zstd at `level`, keeping the result only if it is smaller by at least
/// 1/32. Returns the stored bytes and their flags.
pub fn encode(raw: &[u8], level: i32) -> (Vec<u8>, u8) {
    let compressed = COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().map(|(l, _)| *l) != Some(level) {
            *c = compressor(level).map(|z| (level, z));
        }
        c.as_mut().and_then(|(_, z)| z.compress(raw).ok())
    });
    match compressed {
        Some(z) if z.len() + raw.len() / 32 < raw.len() => (z, FLAG_ZSTD),
        _ => (raw.to_vec(), 0),
    }
}

/// Decodes stored bytes into the raw blob and verifies it hashes to `id`. `what` names the blob
/// and its pack for error messages.
pub fn decode(id: &Id, stored: &[u8], flags: u8, raw_len: u32, what: &str) -> Result<Vec<u8>> {
    let raw = if flags & FLAG_ZSTD != 0 {
        DECOMPRESSOR
            .with(|d| {
                let mut d = d.borrow_mut();
                if d.is_none() {
                    *d = Some(zstd::bulk::Decompressor::new()?);
                }
                match d.as_mut() {
                    Some(z) => z.decompress(stored, raw_len as usize),
                    None => zstd::bulk::decompress(stored, raw_len as usize),
                }
            })
            .map_err(|e| Error::corrupt(what, format!("cannot decompress: {e}")))?
    } else {
        stored.to_vec()
    };
    if raw.len() != raw_len as usize {
        return Err(Error::corrupt(
            what,
            format!("decoded to {} bytes, index says {raw_len}", raw.len()),
        ));
    }
    verify(id, &raw, what)?;
    Ok(raw)
}

/// Checks that decoded bytes are the blob `id`: a corruption error naming `what` otherwise.
pub fn verify(id: &Id, raw: &[u8], what: &str) -> Result<()> {
    if Id::of(raw) != *id {
        return Err(Error::corrupt(what, "content does not match its hash"));
    }
    Ok(())
}

/// How errors name a blob: `blob <id> in pack <key>`.
pub fn describe(id: &Id, loc: &Location) -> String {
    format!("blob {id} in pack {}", loc.pack_key())
}

/// A blob as stored in its pack, with what decoding it needs.
#[derive(Debug, Clone)]
pub struct StoredBlob {
    /// The stored (possibly compressed) bytes.
    pub bytes: Bytes,
    /// The blob's flags ([`FLAG_ZSTD`]).
    pub flags: u8,
    /// The decoded length.
    pub raw_len: u32,
}

/// Largest decoded blob that [`StoredBlob::decode_blocking`] decodes on the calling task: 64 KiB
/// decompress and hash in about 20–60 µs, about what a hand-off to another thread costs.
pub const INLINE_DECODE: u32 = 64 << 10;

impl StoredBlob {
    /// The stored bytes of the blob at `loc` (its bytes taken from a window of its pack, say).
    pub fn new(bytes: Bytes, loc: &Location) -> StoredBlob {
        StoredBlob {
            bytes,
            flags: loc.flags,
            raw_len: loc.raw_len,
        }
    }

    /// Decompresses and verifies the blob ([`decode`]). `what` names it in errors.
    pub fn decode(&self, id: &Id, what: &str) -> Result<Vec<u8>> {
        decode(id, &self.bytes, self.flags, self.raw_len, what)
    }

    /// [`StoredBlob::decode`] on the blocking pool: decompressing and hashing up to 8 MiB is CPU
    /// work that must not hold up an async worker. A decoding task that panicked or was
    /// cancelled is [`Error::TaskFailed`] (wrapped in [`Error::Blob`], which names the blob).
    ///
    /// A blob of at most [`INLINE_DECODE`] bytes is decoded on the calling task instead: that
    /// takes tens of microseconds, less than the hand-off to the blocking pool and back (two
    /// thread wake-ups, a futex each), which was most of the system time of a restore of many
    /// small files (docs/benchmarks-restore.md).
    pub async fn decode_blocking(self, id: Id, what: String) -> Result<Vec<u8>> {
        if self.raw_len <= INLINE_DECODE {
            return self.decode(&id, &what);
        }
        tokio::task::spawn_blocking(move || self.decode(&id, &what))
            .await
            .map_err(|e| Error::Blob {
                id,
                source: Box::new(Error::TaskFailed {
                    what: "blob decoding",
                    reason: e.to_string(),
                }),
            })?
    }
}

/// Reads the stored bytes of blob `id` from its pack at `loc` with one ranged read. Store
/// errors name the blob and its pack ([`Error::BlobRead`]); a read that returns other than
/// `stored_len` bytes is corruption.
pub async fn fetch(store: &DynStore, id: &Id, loc: &Location) -> Result<StoredBlob> {
    let key = loc.pack_key();
    let start = loc.offset as u64;
    let bytes = store
        .get_range(&key, start..start + loc.stored_len as u64)
        .await
        .map_err(|source| Error::BlobRead {
            id: *id,
            source: Box::new(source),
        })?;
    if bytes.len() != loc.stored_len as usize {
        return Err(Error::corrupt(
            describe(id, loc),
            format!("read {} bytes, index says {}", bytes.len(), loc.stored_len),
        ));
    }
    Ok(StoredBlob::new(bytes, loc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_verification() {
        let text = b"abcabcabcabcabcabcabcabcabcabcabcabcabcabcabcabc".repeat(100);
        let (stored, flags) = encode(&text, 3);
        assert_eq!(flags, FLAG_ZSTD);
        assert!(stored.len() < text.len());
        let id = Id::of(&text);
        assert_eq!(
            decode(&id, &stored, flags, text.len() as u32, "t").unwrap(),
            text
        );
        // Wrong id, wrong length, garbage: errors.
        assert!(decode(&Id::of(b"x"), &stored, flags, text.len() as u32, "t").is_err());
        assert!(decode(&id, &stored, flags, 7, "t").is_err());
        assert!(decode(&id, b"garbage", FLAG_ZSTD, 10, "t").is_err());
        // Incompressible data is stored raw.
        let noise = crate::testing::random_bytes(7, 4096);
        let (stored, flags) = encode(&noise, 3);
        assert_eq!(flags, 0);
        assert_eq!(stored, noise);
    }

    #[test]
    fn verify_checks_the_hash_and_names_the_blob() {
        let id = Id::of(b"some bytes");
        assert!(verify(&id, b"some bytes", "blob x").is_ok());
        let err = verify(&id, b"some bytez", "blob x in pack p").unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
        assert_eq!(
            err.to_string(),
            "corrupt object blob x in pack p: content does not match its hash"
        );
    }

    #[tokio::test]
    async fn fetch_reads_one_blob_of_a_pack() {
        use crate::id::BlobKind;
        use crate::pack::PackBuilder;
        let blobs: [&[u8]; 3] = [b"first", &[7u8; 5000], b"third"];
        let mut b = PackBuilder::new(BlobKind::Data, 0);
        for raw in blobs {
            let (stored, flags) = encode(raw, 3);
            b.add(Id::of(raw), flags, &stored, raw.len() as u32);
        }
        let p = b.finish();
        let store: DynStore = std::sync::Arc::new(backtree_store::MemoryStore::new());
        let loc = |e: &crate::pack::PackEntry| Location {
            kind: e.kind,
            pack: p.id,
            offset: e.offset,
            stored_len: e.stored_len,
            raw_len: e.raw_len,
            flags: e.flags,
        };
        let second = loc(&p.entries[1]);
        // Before the pack is stored: an error naming the blob and its pack, of kind NotFound.
        let err = fetch(&store, &p.entries[1].id, &second).await.unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::NotFound);
        let msg = err.to_string();
        assert!(msg.contains(&p.entries[1].id.to_hex()) && msg.contains("in pack packs/data/"));

        store
            .put(&second.pack_key(), p.bytes.clone().into())
            .await
            .unwrap();
        for (e, raw) in p.entries.iter().zip(blobs) {
            let s = fetch(&store, &e.id, &loc(e)).await.unwrap();
            assert_eq!(s.flags, e.flags);
            assert_eq!(s.decode(&e.id, "t").unwrap(), raw);
            let what = describe(&e.id, &loc(e));
            assert_eq!(s.decode_blocking(e.id, what).await.unwrap(), raw);
        }
        // Stored bytes that decode to the wrong blob are an error, never data.
        let wrong = fetch(&store, &p.entries[0].id, &second).await.unwrap();
        let err = wrong.decode(&p.entries[0].id, "w").unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
    }
}
