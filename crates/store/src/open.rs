//! Opening the store of a repository from the string a user gives (`--repo`).
//!
//! A repository location is either a local directory (`/srv/backup`, `backup`) or an S3 URL
//! (`s3://BUCKET` or `s3://BUCKET/PREFIX`). [`Location`] tells the two apart and checks an S3
//! URL; [`open_store`] turns a location into a [`DynStore`], the one way every command opens a
//! repository's store:
//!
//! - a local repository must exist, unless [`OpenOptions::create`] (then the directory and its
//!   parents are created): a mistyped path gives [`StoreError::NoRepository`], which says how
//!   to create one, rather than an empty repository in a surprising place;
//! - an S3 store is connected with [`OpenOptions::s3`]; with `create`, it is also probed once for
//!   whether it honors `If-None-Match: *` ([`S3Store::probe_create_if_absent`]), so that
//!   `init` can record the answer in the repository's config (see docs/concurrency.md).
//!
//! Whether the location holds a backtree repository (a `config` object) is for the caller to
//! find out: this module knows only stores.

use crate::s3::parse_url;
use crate::{DynStore, LocalStore, Result, S3Options, S3Store, StoreError};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The scheme that makes a location an S3 URL.
const S3_SCHEME: &str = "s3://";

/// Where a repository lives, parsed from a location string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A directory on a local or network filesystem.
    Local(PathBuf),
    /// A bucket, and optionally a prefix in it: `s3://BUCKET[/PREFIX]`, as given.
    S3 { url: String },
}

impl Location {
    /// Parses `s3://BUCKET[/PREFIX]` (the bucket name and prefix are checked, as
    /// [`S3Store::from_url`] does) or, for anything else, a local path.
    pub fn parse(location: &str) -> Result<Location> {
        if location.starts_with(S3_SCHEME) {
            parse_url(location)?;
            Ok(Location::S3 {
                url: location.to_owned(),
            })
        } else {
            Ok(Location::Local(PathBuf::from(location)))
        }
    }

    /// True for a store reached over the network (S3), false for a local directory.
    pub fn is_remote(&self) -> bool {
        matches!(self, Location::S3 { .. })
    }

    /// The directory of a local repository; `None` for a remote one.
    pub fn local_path(&self) -> Option<&Path> {
        match self {
            Location::Local(path) => Some(path),
            Location::S3 { .. } => None,
        }
    }
}

impl std::str::FromStr for Location {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Location> {
        Location::parse(s)
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Local(path) => write!(f, "{}", path.display()),
            Location::S3 { url } => f.write_str(url),
        }
    }
}

/// How to open a store.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// How to reach an S3 store (endpoint, region, retries…); unused for a local one.
    pub s3: S3Options,
    /// Creating a repository (`init`): create a local directory that does not exist, and probe
    /// an S3 store's handling of conditional writes.
    pub create: bool,
}

/// Opens the store of the repository at `location` (a local path or `s3://BUCKET[/PREFIX]`).
///
/// Errors: [`StoreError::InvalidUrl`] for a malformed S3 URL, [`StoreError::NoRepository`] for
/// a local directory that does not exist (unless `create`), [`StoreError::Io`] for one that
/// cannot be created or is not a directory, and the S3 store's errors (credentials, bucket,
/// endpoint) from the creation probe.
pub async fn open_store(location: &str, opts: &OpenOptions) -> Result<DynStore> {
    match Location::parse(location)? {
        Location::S3 { url } => {
            let store = S3Store::from_url(&url, opts.s3.clone()).await?;
            if opts.create {
                // The answer is kept in the store (`honors_create_if_absent`), where `init`
                // reads it to record in the config. The probe key is random and deleted after.
                let probe = format!("probe-{:016x}", rand::random::<u64>());
                store.probe_create_if_absent(&probe).await?;
            }
            Ok(Arc::new(store))
        }
        Location::Local(path) => {
            let store = if opts.create {
                LocalStore::create(path)?
            } else if !path.exists() {
                return Err(StoreError::NoRepository {
                    location: location.to_owned(),
                });
            } else {
                LocalStore::open(path)?
            };
            Ok(Arc::new(store))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(create: bool) -> OpenOptions {
        OpenOptions {
            create,
            ..Default::default()
        }
    }

    #[test]
    fn parses_local_paths() {
        for s in [
            "/srv/backup",
            "backup",
            "./s3:/x",
            "S3://bucket",
            "s3:bucket",
        ] {
            let l = Location::parse(s).expect(s);
            assert_eq!(l, Location::Local(PathBuf::from(s)), "{s}");
            assert!(!l.is_remote());
            assert_eq!(l.local_path(), Some(Path::new(s)));
            assert_eq!(l.to_string(), s);
        }
    }

    #[test]
    fn parses_s3_urls() {
        for s in ["s3://bucket", "s3://bucket/", "s3://my.bucket-1/a/b"] {
            let l: Location = s.parse().expect(s);
            assert_eq!(l, Location::S3 { url: s.to_owned() }, "{s}");
            assert!(l.is_remote());
            assert_eq!(l.local_path(), None);
            assert_eq!(l.to_string(), s);
        }
    }

    #[test]
    fn rejects_bad_s3_urls_naming_them() {
        for s in ["s3://", "s3://B", "s3://bucket/a//b", "s3://bucket/../x"] {
            match Location::parse(s) {
                Err(e @ StoreError::InvalidUrl { .. }) => {
                    assert_eq!(e.key(), s);
                    assert!(e.to_string().contains(s), "{e}");
                }
                other => panic!("{s}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_missing_local_repository_is_not_created_unless_asked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("a/repo");
        let location = missing.to_str().expect("utf-8 path");
        let err = open_store(location, &local(false))
            .await
            .expect_err("missing");
        assert!(matches!(err, StoreError::NoRepository { .. }), "{err:?}");
        assert_eq!(err.key(), location);
        assert_eq!(
            err.to_string(),
            format!(
                "repository {location} does not exist; create it with \
                 `backtree init --repo {location}`"
            )
        );
        assert!(!missing.exists());

        let store = open_store(location, &local(true)).await.expect("create");
        assert!(missing.is_dir());
        assert_eq!(store.location(), location);
        // Now it exists, opening without `create` works and sees the same objects.
        store
            .put("config", bytes::Bytes::from_static(b"c"))
            .await
            .expect("put");
        let again = open_store(location, &local(false)).await.expect("open");
        assert_eq!(again.get("config").await.expect("get"), "c".as_bytes());
    }

    #[tokio::test]
    async fn a_local_file_is_not_a_repository() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").expect("write");
        let location = file.to_str().expect("utf-8 path");
        let err = open_store(location, &local(false))
            .await
            .expect_err("a file");
        assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
        assert_eq!(err.key(), location);
    }

    #[tokio::test]
    async fn a_bad_s3_url_fails_before_any_request() {
        let err = open_store("s3://x", &OpenOptions::default())
            .await
            .expect_err("bad url");
        assert!(matches!(err, StoreError::InvalidUrl { .. }), "{err:?}");
    }
}
