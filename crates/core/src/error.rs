//! The core crate's error type. Every variant names the object, file or path it concerns.

use crate::id::Id;
use backtree_store::StoreError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),

    #[error(
        "{location} is not a backtree repository (no config object); run `backtree init` first"
    )]
    NotARepository { location: String },

    #[error("{location} is already a backtree repository")]
    AlreadyInitialized { location: String },

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

    #[error("{0}")]
    Invalid(String),
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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
