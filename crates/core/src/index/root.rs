//! Index roots: which compacted tables make up the index, and which deltas they cover
//! (docs/format.md §6.2).
//!
//! A root is a small JSON object stored under `index/roots/<seq, 16 hex digits>-<hex BLAKE3
//! of the bytes>`. Readers list `index/roots/` and take the *current* root: the highest `seq`,
//! ties broken by the greater key. The index is then the current root's tables (a sharded base
//! and a few runs) plus every delta under `index/deltas/` that the root does not cover. Roots,
//! like every index object, are immutable; a compaction publishes a new one with `seq + 1`.

use crate::error::{Error, Result};
use crate::id::Id;
use serde::{Deserialize, Serialize};

pub const INDEX_PREFIX: &str = "index/";
pub const ROOTS_PREFIX: &str = "index/roots/";
pub const DELTAS_PREFIX: &str = "index/deltas/";
pub const TABLES_PREFIX: &str = "index/tables/";
pub const FILTERS_PREFIX: &str = "index/filters/";
/// `version` of the roots this code writes and reads.
pub const ROOT_VERSION: u32 = 1;

/// A table the root uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRef {
    /// Hex id: the table is `index/tables/<table>` (BLAKE3 of its head).
    pub table: String,
    /// Fanout bits of the table's head (so its head is read with one request).
    pub fanout_bits: u8,
    /// Entries in the table.
    pub entries: u64,
    /// Filter bundle of a run (`index/filters/<filter>`); absent for shards (the base has one
    /// bundle for all of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
}

impl TableRef {
    pub fn key(&self) -> String {
        format!("{TABLES_PREFIX}{}", self.table)
    }

    pub fn id(&self) -> Option<Id> {
        Id::from_hex(&self.table)
    }
}

/// The sharded base: `2^shard_bits` shards, shard `i` holding the ids whose first
/// `shard_bits` bits are `i`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Base {
    pub shard_bits: u8,
    pub shards: Vec<TableRef>,
    /// Filter bundle with one filter per shard.
    pub filter: String,
    pub entries: u64,
}

/// One index root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Root {
    pub version: u32,
    /// Features a reader must implement to use this root; this version knows none, so any
    /// entry makes the root (and the repository's index) unreadable rather than misread.
    #[serde(default)]
    pub features: Vec<String>,
    /// Reserved for client-side encryption: sealed roots are refused by this version.
    #[serde(default)]
    pub sealed: bool,
    pub seq: u64,
    /// RFC 3339, informational (age decisions use the store's modification time).
    pub created: String,
    pub base: Option<Base>,
    /// Runs, newest first.
    #[serde(default)]
    pub runs: Vec<TableRef>,
    /// Hex ids of the deltas whose entries are in the base or a run.
    #[serde(default)]
    pub covers: Vec<String>,
}

impl Default for Root {
    fn default() -> Root {
        Root::empty()
    }
}

impl Root {
    pub fn empty() -> Root {
        Root {
            version: ROOT_VERSION,
            features: vec![],
            sealed: false,
            seq: 0,
            created: String::new(),
            base: None,
            runs: vec![],
            covers: vec![],
        }
    }

    /// Every table (base shards, then runs).
    pub fn tables(&self) -> impl Iterator<Item = &TableRef> {
        self.base
            .iter()
            .flat_map(|b| b.shards.iter())
            .chain(self.runs.iter())
    }

    /// Every filter bundle.
    pub fn filters(&self) -> impl Iterator<Item = &str> {
        self.base
            .iter()
            .map(|b| b.filter.as_str())
            .chain(self.runs.iter().filter_map(|r| r.filter.as_deref()))
    }

    /// Entries in all tables (duplicates across tables counted twice).
    pub fn entries(&self) -> u64 {
        self.base.as_ref().map_or(0, |b| b.entries)
            + self.runs.iter().map(|r| r.entries).sum::<u64>()
    }

    /// Encodes the root; returns its key and bytes.
    pub fn encode(&self) -> (String, Vec<u8>) {
        let mut body = serde_json::to_vec_pretty(self).unwrap_or_default();
        body.push(b'\n');
        let key = format!("{ROOTS_PREFIX}{:016x}-{}", self.seq, Id::of(&body).to_hex());
        (key, body)
    }

    /// Parses and verifies a root: its bytes must hash to the id in its key, and its `seq`
    /// match the key's.
    pub fn parse(key: &str, b: &[u8]) -> Result<Root> {
        let (seq, id) =
            parse_key(key).ok_or_else(|| Error::corrupt(key, "not an index root name"))?;
        if Id::of(b) != id {
            return Err(Error::corrupt(
                key,
                "index root does not match its name (damaged object)",
            ));
        }
        let r: Root = serde_json::from_slice(b)
            .map_err(|e| Error::corrupt(key, format!("index root is not valid: {e}")))?;
        if r.version != ROOT_VERSION {
            return Err(Error::corrupt(
                key,
                format!(
                    "index root version {} is not supported; upgrade backtree",
                    r.version
                ),
            ));
        }
        if let Some(f) = r.features.first() {
            return Err(Error::corrupt(
                key,
                format!("index root requires feature {f:?}; upgrade backtree"),
            ));
        }
        if r.sealed {
            return Err(Error::corrupt(
                key,
                "index root is sealed (encrypted); this version of backtree cannot read it",
            ));
        }
        if r.seq != seq {
            return Err(Error::corrupt(
                key,
                "index root sequence differs from its name",
            ));
        }
        if let Some(b) = &r.base {
            if b.shard_bits > crate::index::table::MAX_PREFIX_BITS
                || b.shards.len() != 1usize << b.shard_bits
                || Id::from_hex(&b.filter).is_none()
            {
                return Err(Error::corrupt(key, "index root's base is inconsistent"));
            }
        }
        for t in r.tables() {
            if t.id().is_none()
                || t.fanout_bits > crate::index::table::MAX_FANOUT_BITS
                || t.filter
                    .as_deref()
                    .is_some_and(|f| Id::from_hex(f).is_none())
            {
                return Err(Error::corrupt(key, "index root names an invalid table"));
            }
        }
        if r.covers.iter().any(|c| Id::from_hex(c).is_none()) {
            return Err(Error::corrupt(
                key,
                "index root covers an invalid delta name",
            ));
        }
        Ok(r)
    }
}

/// `(seq, id)` of a root key.
pub fn parse_key(key: &str) -> Option<(u64, Id)> {
    let name = key.strip_prefix(ROOTS_PREFIX)?;
    let (seq, id) = name.split_once('-')?;
    if seq.len() != 16 {
        return None;
    }
    Some((u64::from_str_radix(seq, 16).ok()?, Id::from_hex(id)?))
}

/// The current root among listed keys: highest seq, then greatest key.
pub fn current<'a>(keys: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    keys.filter_map(|k| parse_key(k).map(|(s, _)| (s, k)))
        .max()
        .map(|(_, k)| k)
}

/// The hex id of a content-named index object (`index/deltas/<hex>` …).
pub fn name_of(key: &str) -> Option<Id> {
    Id::from_hex(key.rsplit('/').next()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_choice_and_refusals() {
        let mut r = Root::empty();
        r.seq = 7;
        r.covers = vec![Id::of(b"d").to_hex()];
        let (k, b) = r.encode();
        assert_eq!(Root::parse(&k, &b).unwrap(), r);
        let mut r2 = r.clone();
        r2.seq = 8;
        let (k2, _) = r2.encode();
        assert_eq!(
            current([k.as_str(), k2.as_str(), "index/roots/junk"].into_iter()),
            Some(k2.as_str())
        );
        // Damage, unknown features, sealed roots and other versions are refused.
        let mut bad = b.clone();
        bad[5] ^= 1;
        assert!(Root::parse(&k, &bad).is_err());
        for (field, val) in [
            ("features", "[\"gc-v9\"]"),
            ("sealed", "true"),
            ("version", "2"),
        ] {
            let mut v: serde_json::Value = serde_json::from_slice(&b).unwrap();
            v[field] = serde_json::from_str(val).unwrap();
            let body = serde_json::to_vec(&v).unwrap();
            let key = format!("{ROOTS_PREFIX}{:016x}-{}", 7, Id::of(&body).to_hex());
            let err = Root::parse(&key, &body).unwrap_err().to_string();
            assert!(err.contains("upgrade") || err.contains("sealed"), "{err}");
        }
    }
}
