//! Content identifiers.
//!
//! Every blob (a file chunk or a tree object) is named by the BLAKE3 hash of its plaintext,
//! uncompressed bytes. With client-side encryption (a later feature flag) the hash becomes a
//! keyed BLAKE3 under a per-repository id key, so ids reveal nothing about content; the id type
//! and every structure that holds ids stay the same.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A 32-byte content identifier.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(pub [u8; 32]);

impl Id {
    pub const LEN: usize = 32;

    /// The id of `data` under the unkeyed scheme.
    pub fn of(data: &[u8]) -> Id {
        Id(*blake3::hash(data).as_bytes())
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<Id> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Id(out))
    }

    /// A short form for messages (first 12 hex characters).
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }

    pub fn from_slice(b: &[u8]) -> Option<Id> {
        Some(Id(b.try_into().ok()?))
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id({})", self.short())
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Hex in human-readable formats (JSON manifests), raw bytes in binary ones (CBOR trees).
impl Serialize for Id {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_hex())
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Id, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Id;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a 32-byte id as bytes or 64 hex characters")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Id, E> {
                Id::from_hex(v).ok_or_else(|| E::custom("bad hex id"))
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Id, E> {
                Id::from_slice(v).ok_or_else(|| E::custom("id is not 32 bytes"))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Id, E> {
                self.visit_bytes(&v)
            }
        }
        if d.is_human_readable() {
            d.deserialize_str(V)
        } else {
            d.deserialize_bytes(V)
        }
    }
}

/// What a blob holds; decides which packs it goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlobKind {
    /// File content.
    Data = 0,
    /// Metadata: directory pages, chunk lists, hardlink tables.
    Tree = 1,
}

impl BlobKind {
    pub fn from_u8(v: u8) -> Option<BlobKind> {
        match v {
            0 => Some(BlobKind::Data),
            1 => Some(BlobKind::Tree),
            _ => None,
        }
    }

    /// The store prefix of packs of this kind.
    pub fn pack_dir(self) -> &'static str {
        match self {
            BlobKind::Data => "packs/data",
            BlobKind::Tree => "packs/tree",
        }
    }
}

/// The store key of a pack.
pub fn pack_key(kind: BlobKind, pack: &Id) -> String {
    let hex = pack.to_hex();
    format!("{}/{}/{}", kind.pack_dir(), &hex[..2], hex)
}

/// The kind and id of the pack stored at `key`, if `key` is a pack key ([`pack_key`]).
pub fn parse_pack_key(key: &str) -> Option<(BlobKind, Id)> {
    let (kind, rest) = if let Some(r) = key.strip_prefix("packs/data/") {
        (BlobKind::Data, r)
    } else {
        (BlobKind::Tree, key.strip_prefix("packs/tree/")?)
    };
    let (dir, hex) = rest.split_once('/')?;
    let id = Id::from_hex(hex)?;
    (hex.len() == 64 && dir == &hex[..2]).then_some((kind, id))
}
