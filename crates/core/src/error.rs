//! The core crate's error type. Every variant names the object, file or path it concerns and
//! says what happened; there is no catch-all variant.
//!
//! Callers that must react differently to a missing object, a damaged one and a store they
//! cannot reach (the mount: ENOENT-like, EIO and "try again", and later verify and repair) ask
//! [`Error::kind`] instead of matching every variant: the classification lives here, next to
//! the variants, so a new variant is classified where it is added.

use crate::id::Id;
use backtree_store::StoreError;
use std::path::PathBuf;
use std::sync::Arc;

/// What kind of failure an [`Error`] is, for callers that react by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A repository object or blob does not exist (or is not indexed).
    NotFound,
    /// An object or blob exists but is damaged: it fails to parse or to verify.
    Corrupt,
    /// The store could not be reached or refused the request (outage, network, I/O error,
    /// credentials, permissions): the repository itself may be fine, and retrying may help.
    Unavailable,
    /// Anything else: bad input, unsupported repository, a failed task.
    Other,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),

    /// A store error reading a blob's bytes from its pack (the error's key).
    #[error("blob {id} in pack {}: {source}", source.key())]
    BlobRead {
        id: Id,
        #[source]
        source: Box<StoreError>,
    },

    /// An error about one blob from a step that does not name it (an index lookup, say).
    #[error("blob {id}: {source}")]
    Blob {
        id: Id,
        #[source]
        source: Box<Error>,
    },

    #[error(
        "{location} is not a backtree repository (no config object); run `backtree init` first"
    )]
    NotARepository { location: String },

    #[error("{location} is already a backtree repository")]
    AlreadyInitialized { location: String },

    #[error("{location} is not empty and not a backtree repository; choose an empty location")]
    NotEmpty { location: String },

    #[error("repository {location} has format version {found}; this backtree understands version {supported}")]
    UnsupportedVersion {
        location: String,
        found: u32,
        supported: u32,
    },

    #[error("repository {location} requires feature {feature:?}, which this backtree does not support; upgrade backtree")]
    UnsupportedFeature { location: String, feature: String },

    #[error("corrupt object {object}: {reason}")]
    Corrupt { object: String, reason: String },

    #[error("blob {id} is not in the repository index")]
    BlobNotIndexed { id: Id },

    #[error("{what} not found")]
    NotFound { what: String },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("source path {} does not exist", path.display())]
    SourceMissing { path: PathBuf },

    #[error("sources {} and {} would both appear as {name:?} at the generation's root", first.display(), second.display())]
    NameClash {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },

    #[error("invalid host name {name:?}: {reason}")]
    InvalidHost { name: String, reason: &'static str },

    #[error("invalid exclude pattern {pattern:?}: {reason}")]
    InvalidExclude { pattern: String, reason: String },

    #[error("invalid pattern {pattern:?}: {reason}")]
    InvalidPattern { pattern: String, reason: String },

    #[error("nothing to ingest: no source path given")]
    NoSources,

    /// A stream's name that cannot be one file's name at the generation's root.
    #[error("invalid name {name:?} for the stream: {reason}")]
    InvalidStreamName { name: String, reason: &'static str },

    /// A stream ended before its first byte, and an empty file was not asked for.
    #[error("{origin} gave no data for {name}; pass --allow-empty to store an empty file")]
    EmptyStream { origin: String, name: String },

    /// Reading a stream failed: the ingest fails (a stream cannot be skipped like a file).
    #[error("reading {origin} for {name}: {source}")]
    StreamRead {
        origin: String,
        name: String,
        #[source]
        source: std::io::Error,
    },

    /// Reading a block device or fifo named with `--read-special` failed: the ingest fails (what
    /// was read cannot be read again, and a partial image is no backup).
    #[error("reading {} failed after {offset} bytes: {source}", path.display())]
    SpecialRead {
        path: PathBuf,
        /// Bytes read before the error.
        offset: u64,
        #[source]
        source: std::io::Error,
    },

    /// A tar archive that cannot be read to its end: truncated or corrupt (the tar stream or
    /// its compression). Nothing is published.
    #[error("reading tar archive {archive}: {reason} (at byte {offset} of the input)")]
    TarRead {
        archive: String,
        /// Bytes of the input (compressed, as given) consumed when the error was found.
        offset: u64,
        reason: String,
    },

    /// A gzip stream (`--stdin`) that cannot be read to its end: truncated, corrupt (a bad CRC32,
    /// bad deflate data) or not gzip after its magic. Nothing is published.
    #[error("reading {origin} for {name}: {reason} (at byte {offset} of the input)")]
    GzipRead {
        origin: String,
        name: String,
        /// Bytes of the input (compressed, as given) consumed when the error was found.
        offset: u64,
        reason: String,
    },

    /// `cat` of something that is not a regular file.
    #[error("{path} is not a regular file")]
    NotAFile { path: String },

    /// `cat --original` of a file that was not stored from gzip data.
    #[error("{path} was not stored from gzip data: it has no original to recreate")]
    NoGzipOrigin { path: String },

    /// A recreated original that is not what was ingested (a damaged recipe, or a preflate
    /// that recreates differently).
    #[error("the original of {path} cannot be recreated: {reason}")]
    OriginalMismatch { path: String, reason: String },

    /// A tar archive this version cannot take as asked (given together with paths).
    #[error("tar archive {archive}: {reason}")]
    TarUnsupported { archive: String, reason: String },

    #[error("{} has no name to use at the generation's root", path.display())]
    SourceUnnamed { path: PathBuf },

    #[error("no free generation name for {base}")]
    NoFreeName { base: String },

    /// The ingest's lease was not renewed in time (the process was paused or cut off from the
    /// store for longer than the lease): a garbage collection may have deleted data it relies
    /// on, so it commits nothing.
    #[error("ingest session {session}: its lease {key} lapsed {late:.0?} ago (the process was paused or could not reach the store); nothing was committed, run the ingest again")]
    LeaseLapsed {
        session: String,
        key: String,
        late: std::time::Duration,
    },

    /// An index compaction ran past its limit and did not publish (docs/concurrency.md).
    #[error("index compaction took {took:.0?}, longer than {limit:.0?} (a quarter of the settle time, BACKTREE_INDEX_SETTLE): its root was not published, and what it wrote will be removed later")]
    CompactionTooLong {
        took: std::time::Duration,
        limit: std::time::Duration,
    },

    /// Another maintenance job holds the maintenance lease.
    #[error("another maintenance job is running: {key} (host {host}, since {started}, until {expires} unless renewed); try again when it has finished")]
    MaintenanceBusy {
        key: String,
        host: String,
        started: String,
        expires: String,
    },

    /// A prune's own maintenance lease lapsed: it stops before deleting anything more.
    #[error("prune session {session}: its maintenance lease {key} lapsed {late:.0?} ago (the process was paused or could not reach the store); it stopped before deleting anything more, run it again")]
    MaintenanceLapsed {
        session: String,
        key: String,
        late: std::time::Duration,
    },

    /// Garbage collection found a problem that makes deleting unsafe.
    #[error("prune stopped before deleting anything: {reason}")]
    PruneRefused { reason: String },

    #[error("offset {offset} past end ({size} bytes)")]
    OffsetPastEnd { offset: u64, size: u64 },

    #[error("cannot start worker threads: {0}")]
    ThreadPool(#[from] rayon::ThreadPoolBuildError),

    /// A blocking or async task panicked or was cancelled, or its channel closed.
    #[error("{what} task failed: {reason}")]
    TaskFailed { what: &'static str, reason: String },

    /// One error reported to several callers (every waiter of a shared read, every later check
    /// of a failed upload). Displays, and classifies, as the error itself.
    #[error(transparent)]
    Shared(Arc<Error>),
}

impl Error {
    pub fn corrupt(object: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Corrupt {
            object: object.into(),
            reason: reason.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// What kind of failure this is (see [`ErrorKind`]).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Store(e) => store_kind(e),
            Error::BlobRead { source, .. } => store_kind(source),
            Error::Blob { source, .. } => source.kind(),
            Error::Shared(e) => e.kind(),
            Error::NotARepository { .. }
            | Error::BlobNotIndexed { .. }
            | Error::NotFound { .. } => ErrorKind::NotFound,
            Error::Corrupt { .. } | Error::OriginalMismatch { .. } => ErrorKind::Corrupt,
            Error::AlreadyInitialized { .. }
            | Error::NotEmpty { .. }
            | Error::UnsupportedVersion { .. }
            | Error::UnsupportedFeature { .. }
            | Error::Io { .. }
            | Error::SourceMissing { .. }
            | Error::NameClash { .. }
            | Error::InvalidHost { .. }
            | Error::InvalidExclude { .. }
            | Error::InvalidPattern { .. }
            | Error::NoSources
            | Error::InvalidStreamName { .. }
            | Error::EmptyStream { .. }
            | Error::StreamRead { .. }
            | Error::SpecialRead { .. }
            | Error::TarRead { .. }
            | Error::GzipRead { .. }
            | Error::NotAFile { .. }
            | Error::NoGzipOrigin { .. }
            | Error::TarUnsupported { .. }
            | Error::SourceUnnamed { .. }
            | Error::NoFreeName { .. }
            | Error::LeaseLapsed { .. }
            | Error::MaintenanceBusy { .. }
            | Error::CompactionTooLong { .. }
            | Error::MaintenanceLapsed { .. }
            | Error::PruneRefused { .. }
            | Error::OffsetPastEnd { .. }
            | Error::ThreadPool(_)
            | Error::TaskFailed { .. } => ErrorKind::Other,
        }
    }

    /// This error, unless it already names blob `id`; else wrapped in [`Error::Blob`].
    pub fn for_blob(self, id: &Id) -> Error {
        if self.to_string().contains(&id.to_hex()) {
            self
        } else {
            Error::Blob {
                id: *id,
                source: Box::new(self),
            }
        }
    }
}

/// The kind of a store error. Exhaustive on purpose: a new store error must be classified.
fn store_kind(e: &StoreError) -> ErrorKind {
    match e {
        StoreError::NotFound { .. } | StoreError::NoRepository { .. } => ErrorKind::NotFound,
        // The index or a trailer points past the end of an object.
        StoreError::BadRange { .. } => ErrorKind::Corrupt,
        StoreError::Io { .. }
        | StoreError::Unavailable { .. }
        | StoreError::Denied { .. }
        | StoreError::NoCredentials { .. }
        | StoreError::NoBucket { .. }
        | StoreError::Unreachable { .. }
        | StoreError::Remote { .. } => ErrorKind::Unavailable,
        StoreError::InvalidKey { .. } | StoreError::InvalidUrl { .. } => ErrorKind::Other,
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn store(e: StoreError) -> Error {
        Error::Store(e)
    }

    #[test]
    fn kinds_tell_missing_corrupt_and_unavailable_apart() {
        let key = || "packs/data/aa/bb".to_owned();
        let id = Id::of(b"x");
        assert_eq!(
            store(StoreError::NotFound { key: key() }).kind(),
            ErrorKind::NotFound
        );
        assert_eq!(Error::BlobNotIndexed { id }.kind(), ErrorKind::NotFound);
        assert_eq!(Error::corrupt("p", "bad").kind(), ErrorKind::Corrupt);
        for e in [
            StoreError::Unavailable {
                key: key(),
                message: "injected".into(),
            },
            StoreError::Unreachable {
                key: key(),
                endpoint: "http://s3".into(),
                reason: "refused".into(),
            },
            StoreError::Io {
                key: key(),
                source: std::io::Error::other("EIO"),
            },
            StoreError::NoCredentials {
                key: key(),
                reason: "none".into(),
            },
            StoreError::Denied {
                key: key(),
                reason: "403".into(),
            },
        ] {
            assert_eq!(store(e).kind(), ErrorKind::Unavailable);
        }
        assert_eq!(
            Error::TaskFailed {
                what: "upload",
                reason: "panicked".into()
            }
            .kind(),
            ErrorKind::Other
        );
        // Wrappers classify as what they wrap, and display it.
        let read = Error::BlobRead {
            id,
            source: Box::new(StoreError::Unavailable {
                key: key(),
                message: "injected".into(),
            }),
        };
        assert_eq!(read.kind(), ErrorKind::Unavailable);
        assert_eq!(
            read.to_string(),
            format!("blob {id} in pack packs/data/aa/bb: object packs/data/aa/bb: injected")
        );
        let shared = Error::Shared(Arc::new(Error::corrupt("p", "bad")));
        assert_eq!(shared.kind(), ErrorKind::Corrupt);
        assert_eq!(shared.to_string(), "corrupt object p: bad");
        let wrapped = store(StoreError::NotFound {
            key: "index/ab".into(),
        })
        .for_blob(&id);
        assert_eq!(wrapped.kind(), ErrorKind::NotFound);
        assert_eq!(
            wrapped.to_string(),
            format!("blob {id}: object index/ab not found")
        );
        // An error that already names the blob is left as it is.
        assert!(matches!(
            Error::BlobNotIndexed { id }.for_blob(&id),
            Error::BlobNotIndexed { .. }
        ));
    }

    #[test]
    fn messages_keep_their_wording() {
        let e = Error::NotEmpty {
            location: "/srv/x".into(),
        };
        assert_eq!(
            e.to_string(),
            "/srv/x is not empty and not a backtree repository; choose an empty location"
        );
        let e = Error::TaskFailed {
            what: "blob decoding",
            reason: "cancelled".into(),
        };
        assert_eq!(e.to_string(), "blob decoding task failed: cancelled");
        assert_eq!(
            Error::NoSources.to_string(),
            "nothing to ingest: no source path given"
        );
        let e = Error::GzipRead {
            origin: "stdin".into(),
            name: "db.sql.gz".into(),
            offset: 4096,
            reason: "truncated gzip stream (deflate data ends early)".into(),
        };
        assert_eq!(
            e.to_string(),
            "reading stdin for db.sql.gz: truncated gzip stream (deflate data ends early) (at byte \
             4096 of the input)"
        );
        assert_eq!(e.kind(), ErrorKind::Other);
        let e = Error::OriginalMismatch {
            path: "h/g/db.sql".into(),
            reason: "x".into(),
        };
        assert_eq!(e.kind(), ErrorKind::Corrupt);
    }
}
