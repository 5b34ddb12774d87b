//! Object stores that hold a backtree repository.
//!
//! A repository is a flat namespace of immutable objects addressed by `/`-separated keys
//! (`config`, `packs/data/ab/ab12…`, `snapshots/web1/2026-11-20T010000Z`, …). Everything above
//! this crate talks to an [`ObjectStore`]; the backends are:
//!
//! - [`LocalStore`]: a directory on a local or network filesystem, the embedded default;
//! - [`S3Store`]: a bucket (and optional prefix) on AWS S3 or an S3-compatible store;
//! - [`MemoryStore`]: a map in memory, for tests;
//! - [`FaultyStore`]: a wrapper that injects failures (and can "crash" after N writes), so the
//!   writer's crash safety and the reader's error paths can be tested without a real outage;
//! - [`CountingStore`]: a wrapper that records every request, so tests can bound what an
//!   operation costs in requests (one LIST, no manifest GET, …).
//!
//! [`open_store`] opens the store of a repository location as a user writes it (a local path or
//! `s3://BUCKET[/PREFIX]`, see [`Location`]).
//!
//! The trait is shaped after what S3 offers, so an S3 backend fits without changing callers:
//! whole-object put and get, ranged get, listing by prefix (flat, or one level with a `/`
//! delimiter), delete, and create-if-absent. Objects are never modified after they are written:
//! packs and index files are named by the hash of their content, so writing one twice writes the
//! same bytes. The one exception is a generation manifest, whose name is a timestamp; it is
//! written with create-if-absent, and stores that ignore that condition need the extra care
//! described in docs/concurrency.md.
//!
//! Every error carries the key it concerns, so a log line can always name the object.

pub mod conformance;
mod counting;
mod faulty;
mod local;
mod memory;
mod open;
pub mod s3;

pub use counting::{CountingStore, Op, Requests};
pub use faulty::{Fault, FaultyStore};
pub use local::LocalStore;
pub use memory::MemoryStore;
pub use open::{open_store, Location, OpenOptions};
pub use s3::{S3Credentials, S3Options, S3Store};

use async_trait::async_trait;
use bytes::Bytes;
use std::ops::Range;
use std::sync::Arc;

/// What a listing returns for each object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The full key, including the prefix that was listed.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// When the object was stored, by the store's clock (S3 `LastModified`, a file's mtime),
    /// if the store reports it. Maintenance judges an object's age by it ("never delete what
    /// is younger than the grace period"); `None` means unknown, which counts as young.
    pub modified: Option<std::time::SystemTime>,
}

/// Errors of a store operation. Each names the key (or the store) it concerns.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist.
    #[error("object {key} not found")]
    NotFound { key: String },
    /// A ranged read asked for bytes past the end of the object.
    #[error("object {key}: range {start}..{end} is past its end ({size} bytes)")]
    BadRange {
        key: String,
        start: u64,
        end: u64,
        size: u64,
    },
    /// The key is not acceptable to this store (empty component, `..`, absolute).
    #[error("invalid object key {key:?}")]
    InvalidKey { key: String },
    /// An I/O error from the backing medium.
    #[error("object {key}: {source}")]
    Io {
        key: String,
        #[source]
        source: std::io::Error,
    },
    /// An injected or remote failure that may succeed when retried.
    #[error("object {key}: {message}")]
    Unavailable { key: String, message: String },
    /// The store refused the credentials or the permission (wrong key or secret, expired
    /// token, missing grant).
    #[error("object {key}: access denied by the store ({reason}); check the credentials and the bucket's permissions")]
    Denied { key: String, reason: String },
    /// No credentials could be found or obtained for the store.
    #[error("object {key}: cannot get S3 credentials: {reason}")]
    NoCredentials { key: String, reason: String },
    /// The bucket does not exist.
    #[error("object {key}: bucket {bucket} does not exist at {endpoint}")]
    NoBucket {
        key: String,
        bucket: String,
        endpoint: String,
    },
    /// No connection to the store's endpoint could be made.
    #[error("object {key}: cannot reach S3 endpoint {endpoint} ({reason})")]
    Unreachable {
        key: String,
        endpoint: String,
        reason: String,
    },
    /// The store refused a request for a reason retrying will not fix.
    #[error("object {key}: {message}")]
    Remote { key: String, message: String },
    /// A store location that cannot be parsed; `key` is the location.
    #[error("{key} is not a valid S3 URL: {reason}")]
    InvalidUrl { key: String, reason: String },
    /// A local repository location that does not exist (and was not to be created).
    #[error(
        "repository {location} does not exist; create it with `backtree init --repo {location}`"
    )]
    NoRepository { location: String },
}

impl StoreError {
    /// The key this error is about.
    pub fn key(&self) -> &str {
        match self {
            StoreError::NotFound { key }
            | StoreError::BadRange { key, .. }
            | StoreError::InvalidKey { key }
            | StoreError::Io { key, .. }
            | StoreError::Unavailable { key, .. }
            | StoreError::Denied { key, .. }
            | StoreError::NoCredentials { key, .. }
            | StoreError::NoBucket { key, .. }
            | StoreError::Unreachable { key, .. }
            | StoreError::Remote { key, .. }
            | StoreError::InvalidUrl { key, .. } => key,
            StoreError::NoRepository { location } => location,
        }
    }

    /// True when the object simply does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// An object store holding one repository. Implementations must be safe to share between
/// threads and tasks; every method may be called concurrently.
#[async_trait]
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// Writes an object, replacing any object of that key. Readers never see a partial object.
    async fn put(&self, key: &str, data: Bytes) -> Result<()>;

    /// Writes an object only if no object of that key exists. Returns `true` if this call created
    /// it, `false` if it already existed (and was left untouched).
    ///
    /// Some S3-compatible stores ignore the condition; [`ObjectStore::honors_create_if_absent`]
    /// says whether this store is known to honor it.
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool>;

    /// Reads a whole object.
    async fn get(&self, key: &str) -> Result<Bytes>;

    /// Reads the bytes `range` of an object. The range must lie within the object.
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes>;

    /// Size of an object, or `None` if it does not exist.
    async fn head(&self, key: &str) -> Result<Option<u64>>;

    /// Lists every object whose key starts with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;

    /// Lists the distinct next path components below `prefix` (which should end in `/`), like
    /// an S3 listing with delimiter `/`: for keys `a/x/1`, `a/y`, `list_dirs("a/")` returns
    /// `["x", "y"]`. Sorted.
    async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>>;

    /// Deletes an object. Deleting a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<()>;

    /// Whether [`ObjectStore::put_if_absent`] is atomic on this store.
    fn honors_create_if_absent(&self) -> bool;

    /// A short description for messages, such as `/srv/backup` or `s3://bucket/prefix`.
    fn location(&self) -> String;
}

/// A shared, dynamically typed store.
pub type DynStore = Arc<dyn ObjectStore>;

/// Rejects keys that could escape a directory or are otherwise malformed.
pub(crate) fn check_key(key: &str) -> Result<()> {
    let bad = key.is_empty()
        || key.starts_with('/')
        || key.ends_with('/')
        || key
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        || key.contains('\0');
    if bad {
        Err(StoreError::InvalidKey {
            key: key.to_owned(),
        })
    } else {
        Ok(())
    }
}

/// Applies a range to a whole object's bytes, with the store's error on a bad range.
pub(crate) fn slice_range(key: &str, data: &Bytes, range: Range<u64>) -> Result<Bytes> {
    let size = data.len() as u64;
    if range.start > range.end || range.end > size {
        return Err(StoreError::BadRange {
            key: key.to_owned(),
            start: range.start,
            end: range.end,
            size,
        });
    }
    Ok(data.slice(range.start as usize..range.end as usize))
}

/// Computes `list_dirs` from a flat listing (used by stores without a native delimiter).
pub(crate) fn dirs_of(prefix: &str, keys: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = keys
        .filter_map(|k| {
            let rest = k.strip_prefix(prefix)?;
            Some(rest.split('/').next().unwrap_or(rest).to_owned())
        })
        .filter(|c| !c.is_empty())
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests;
