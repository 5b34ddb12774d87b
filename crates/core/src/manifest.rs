//! Generation manifests: the one commit point of an ingest.
//!
//! A manifest is a small JSON object at `snapshots/<host>/<generation>`, written with
//! create-if-absent after every pack and index file it depends on is stored. Until it exists the
//! generation does not exist; a writer killed before that leaves only unreferenced packs and
//! index entries, which later ingests reuse and garbage collection eventually removes.
//!
//! Generation names are UTC timestamps `YYYY-MM-DDTHHMMSSZ`: sortable as strings, no `:` (they
//! become directory names on SMB shares and in URLs). A second generation of the same host in the
//! same second gets `-2`, `-3`, …; generations are ordered by [`generation_sort_key`]
//! (timestamp, then suffix as a number).

use crate::error::{Error, Result};
use crate::id::Id;
use crate::tree::Entry;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub const SNAPSHOTS_PREFIX: &str = "snapshots/";
pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub version: u32,
    pub host: String,
    /// The generation's name (also the last component of its key).
    pub name: String,
    /// The time the generation represents (RFC 3339, UTC): `--time`, or the ingest's start.
    pub time: String,
    pub started: String,
    pub finished: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The root directory: its own metadata, and in `tree` its contents.
    pub root: Entry,
    /// Hardlink table blob, if the generation has hardlinks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub links: Option<Id>,
    /// The source paths as given.
    pub sources: Vec<String>,
    /// The generation this one was compared against for unchanged files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub stats: Stats,
    /// Files skipped because they could not be read (first 100).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<SkippedPath>,
    /// Random id of the ingest session that wrote this generation.
    pub session: String,
    /// The tool that wrote it.
    pub tool: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub others: u64,
    /// Sum of regular files' logical sizes.
    pub logical_bytes: u64,
    /// Bytes actually read from the source (unchanged files are not read).
    pub read_bytes: u64,
    /// Files taken unchanged from the parent generation without reading them.
    pub unchanged_files: u64,
    /// Uncompressed bytes of chunks that were new to the repository.
    pub new_raw_bytes: u64,
    /// Bytes of new packs written (data and trees), i.e. what this generation added to storage.
    pub new_stored_bytes: u64,
    pub new_chunks: u64,
    pub skipped: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SkippedPath {
    pub path: String,
    pub error: String,
}

impl Manifest {
    pub fn key(host: &str, name: &str) -> String {
        format!("{SNAPSHOTS_PREFIX}{host}/{name}")
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    pub fn parse(key: &str, b: &[u8]) -> Result<Manifest> {
        let m: Manifest = serde_json::from_slice(b)
            .map_err(|e| Error::corrupt(key, format!("bad manifest: {e}")))?;
        if m.version != MANIFEST_VERSION {
            return Err(Error::corrupt(
                key,
                format!("manifest version {} unknown", m.version),
            ));
        }
        Ok(m)
    }

    /// The generation's time as a timestamp.
    pub fn datetime(&self) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(&self.time)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// The base generation name for a time.
pub fn generation_name(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H%M%SZ").to_string()
}

/// The `n`-th candidate name (n = 1 is the plain timestamp).
pub fn candidate_name(base: &str, n: u32) -> String {
    if n <= 1 {
        base.to_owned()
    } else {
        format!("{base}-{n}")
    }
}

/// Sort key of a generation name: timestamp, then the numeric suffix (so `-10` sorts after
/// `-9`, which plain string order would not do).
pub fn generation_sort_key(s: &str) -> (String, u32) {
    match s.split_once("Z-") {
        Some((ts, n)) => (format!("{ts}Z"), n.parse().unwrap_or(u32::MAX)),
        None => (s.to_owned(), 1),
    }
}

/// Whether `s` looks like a generation name.
pub fn is_generation_name(s: &str) -> bool {
    let (ts, suffix) = match s.split_once("Z-") {
        Some((ts, n)) => (format!("{ts}Z"), Some(n)),
        None => (s.to_owned(), None),
    };
    chrono::NaiveDateTime::parse_from_str(&ts, "%Y-%m-%dT%H%M%SZ").is_ok()
        && suffix.is_none_or(|n| n.parse::<u32>().is_ok_and(|n| n >= 2))
}

/// The time a generation name carries (its timestamp, to the second), or `None` if `s` is not
/// a generation name: what a listing shows without fetching the manifest.
pub fn generation_time(s: &str) -> Option<DateTime<Utc>> {
    if !is_generation_name(s) {
        return None;
    }
    let ts = s.split_once("Z-").map_or(s, |(ts, _)| ts);
    let ts = ts.strip_suffix('Z').unwrap_or(ts);
    chrono::NaiveDateTime::parse_from_str(ts, "%Y-%m-%dT%H%M%S")
        .ok()
        .map(|t| t.and_utc())
}

/// Checks a host name: it becomes a store key component and a directory name in the mount.
pub fn check_host(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidHost {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 128 {
        return bad("must be 1 to 128 characters");
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("must not start with '.' or '-'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
    {
        return bad("only letters, digits, '.', '-' and '_' are allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_names_carry_their_time() {
        let t = generation_time("2026-11-20T010203Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-20T01:02:03+00:00");
        assert_eq!(generation_time("2026-11-20T010203Z-3"), Some(t));
        assert_eq!(generation_time("2026-11-20T010203Z-1"), None);
        assert_eq!(generation_time("latest"), None);
    }

    #[test]
    fn names_sort_and_parse() {
        let t = DateTime::parse_from_rfc3339("2026-11-20T01:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let base = generation_name(&t);
        assert_eq!(base, "2026-11-20T010000Z");
        let mut names = vec![
            candidate_name(&base, 3),
            candidate_name(&base, 1),
            candidate_name(&base, 2),
        ];
        names.sort();
        assert_eq!(
            names,
            [
                "2026-11-20T010000Z",
                "2026-11-20T010000Z-2",
                "2026-11-20T010000Z-3"
            ]
        );
        assert!(names.iter().all(|n| is_generation_name(n)));
        let mut many: Vec<String> = (1..=11).map(|n| candidate_name(&base, n)).rev().collect();
        many.sort_by_key(|n| generation_sort_key(n));
        assert_eq!(many.last().unwrap(), "2026-11-20T010000Z-11");
        assert_eq!(many[9], "2026-11-20T010000Z-10");
        assert!(!is_generation_name("latest"));
        assert!(!is_generation_name("2026-11-20T010000Z-1"));
        assert!(check_host("web-1.example_x").is_ok());
        for bad in ["", ".x", "a/b", "a b", "-x", "é"] {
            assert!(check_host(bad).is_err(), "{bad}");
        }
    }
}
