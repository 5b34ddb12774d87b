//! Blob encoding: compression on the way in, decompression and hash verification on the way out.
//!
//! A blob's stored bytes are either a single zstd frame or the raw bytes (when compression does
//! not save at least 1/32 of the size, e.g. for already-compressed content). Which one is
//! recorded in the pack trailer and the index (`FLAG_ZSTD`). Every decoded blob is checked
//! against its id before anyone sees it: wrong bytes are an error, never data.

use crate::error::{Error, Result};
use crate::id::Id;
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
    if Id::of(&raw) != *id {
        return Err(Error::corrupt(what, "content does not match its hash"));
    }
    Ok(raw)
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
}
