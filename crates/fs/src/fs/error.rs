//! Errors of filesystem operations, and the log of repository failures.
//!
//! Every operation returns [`FsError`]; the FUSE adapter turns each variant into one errno in one
//! place (`crate::fuse::errno`). A repository failure (a missing, corrupt or unreachable object)
//! is [`FsError::Io`], which keeps core's typed error, so "not found", "corrupt" and "store
//! unavailable" stay apart, together with what was being read: host, generation, path, and the
//! blob and pack the core error names. [`Failures`] logs each such failure once.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// Errors of filesystem operations; the FUSE adapter maps each to one errno.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such entry")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("no such attribute")]
    NoData,
    #[error("buffer too small")]
    Range,
    #[error("offset past the end")]
    NoXio,
    #[error("invalid argument")]
    Invalid,
    #[error("stale file handle")]
    BadHandle,
    /// A repository object is missing, corrupt or unreachable. `what` names what was being read
    /// (`host/generation/path`, and what of it); `source` names the object. Already logged.
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: Arc<backtree_core::Error>,
    },
}

pub type Result<T> = std::result::Result<T, FsError>;

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Repository failures met by the mount, each logged once: a damaged file is read again and
/// again by a restore, and one line per failure and object is what an administrator needs.
#[derive(Default)]
pub(super) struct Failures {
    logged: Mutex<HashSet<String>>,
}

impl Failures {
    /// Turns a repository error met while reading `what` into [`FsError::Io`], logging it the
    /// first time.
    pub(super) fn fail(&self, what: String, err: impl Into<Arc<backtree_core::Error>>) -> FsError {
        let source = err.into();
        let line = format!("{what}: {source}");
        if lock(&self.logged).insert(line.clone()) {
            tracing::error!("{line}");
        }
        FsError::Io { what, source }
    }
}
