//! A repository in a local directory.
//!
//! Keys map to paths below the root (`packs/data/ab/ab12…` → `ROOT/packs/data/ab/ab12…`).
//! Writes go to a temporary file in `ROOT/.tmp/`, are flushed with `fsync`, and are then moved
//! into place with `rename` (plain put) or `link` (create-if-absent, which fails atomically if
//! the target exists), followed by an `fsync` of the parent directory. A reader therefore sees
//! either no object or the whole object, and a writer killed at any moment leaves at most a
//! stray file in `.tmp/`, which is never listed. Stray files older than any running write (a
//! day, say) may be deleted; deleting a younger one can fail a write in progress.
//!
//! Blocking filesystem calls run on tokio's blocking pool.

use crate::{check_key, ObjectInfo, ObjectStore, Result, StoreError};
use async_trait::async_trait;
use bytes::Bytes;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Name of the directory below the root that holds files being written.
const TMP_DIR: &str = ".tmp";

/// A store in a local directory. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LocalStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    counter: AtomicU64,
}

impl LocalStore {
    /// Opens a store rooted at `root`. The directory must exist.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        let meta = fs::metadata(&root).map_err(|source| StoreError::Io {
            key: root.display().to_string(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(StoreError::Io {
                key: root.display().to_string(),
                source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        Ok(Self {
            inner: Arc::new(Inner {
                root,
                counter: AtomicU64::new(0),
            }),
        })
    }

    /// Creates the root directory (and parents) if needed, then opens it.
    pub fn create(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|source| StoreError::Io {
            key: root.display().to_string(),
            source,
        })?;
        Self::open(root)
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    async fn blocking<T, F>(&self, key: &str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> io::Result<T> + Send + 'static,
    {
        check_key(key)?;
        let inner = self.inner.clone();
        let owned = key.to_owned();
        let res = tokio::task::spawn_blocking(move || f(&inner)).await;
        match res {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => {
                Err(StoreError::NotFound { key: owned })
            }
            Ok(Err(source)) => Err(StoreError::Io { key: owned, source }),
            Err(join) => Err(StoreError::Io {
                key: owned,
                source: io::Error::other(join.to_string()),
            }),
        }
    }
}

impl Inner {
    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Writes `data` to a fresh temporary file and returns its path.
    fn write_tmp(&self, data: &[u8]) -> io::Result<PathBuf> {
        let dir = self.root.join(TMP_DIR);
        fs::create_dir_all(&dir)?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{}-{}-{:016x}",
            std::process::id(),
            n,
            rand::random::<u64>()
        );
        let tmp = dir.join(name);
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        let res = f.write_all(data).and_then(|_| f.sync_all());
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(tmp)
    }

    fn ensure_parent(&self, path: &Path) -> io::Result<()> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        Ok(())
    }

    fn sync_parent(path: &Path) -> io::Result<()> {
        if let Some(parent) = path.parent() {
            File::open(parent)?.sync_all()?;
        }
        Ok(())
    }

    fn put(&self, key: &str, data: &[u8]) -> io::Result<()> {
        let dst = self.path(key);
        self.ensure_parent(&dst)?;
        let tmp = self.write_tmp(data)?;
        if let Err(e) = fs::rename(&tmp, &dst) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Self::sync_parent(&dst)
    }

    fn put_if_absent(&self, key: &str, data: &[u8]) -> io::Result<bool> {
        let dst = self.path(key);
        if dst.symlink_metadata().is_ok() {
            return Ok(false);
        }
        self.ensure_parent(&dst)?;
        let tmp = self.write_tmp(data)?;
        let res = fs::hard_link(&tmp, &dst);
        let _ = fs::remove_file(&tmp);
        match res {
            Ok(()) => {
                Self::sync_parent(&dst)?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>> {
        // Split the prefix into the directory to read and the name prefix within it.
        let (dir, name_prefix) = match prefix.rfind('/') {
            Some(i) => (&prefix[..i], &prefix[i + 1..]),
            None => ("", prefix),
        };
        let mut out = Vec::new();
        let base = if dir.is_empty() {
            self.root.clone()
        } else {
            self.root.join(dir)
        };
        let entries = match fs::read_dir(&base) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.starts_with(name_prefix) || (dir.is_empty() && name == TMP_DIR) {
                continue;
            }
            let key = if dir.is_empty() {
                name.to_owned()
            } else {
                format!("{dir}/{name}")
            };
            Self::walk(&entry.path(), key, &mut out)?;
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn walk(path: &Path, key: String, out: &mut Vec<ObjectInfo>) -> io::Result<()> {
        let meta = match fs::symlink_metadata(path) {
            Ok(m) => m,
            // Deleted while we were listing: it is simply not there.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if meta.is_dir() {
            let entries = match fs::read_dir(path) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = entry?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                Self::walk(&entry.path(), format!("{key}/{name}"), out)?;
            }
        } else if meta.is_file() {
            out.push(ObjectInfo {
                key,
                size: meta.len(),
                modified: meta.modified().ok(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let k = key.to_owned();
        self.blocking(key, move |s| s.put(&k, &data)).await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool> {
        let k = key.to_owned();
        self.blocking(key, move |s| s.put_if_absent(&k, &data))
            .await
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        let k = key.to_owned();
        self.blocking(key, move |s| fs::read(s.path(&k)).map(Bytes::from))
            .await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let k = key.to_owned();
        let r = range.clone();
        let res = self
            .blocking(key, move |s| {
                let mut f = File::open(s.path(&k))?;
                let len = r.end.saturating_sub(r.start);
                // Read into spare capacity: no zeroing of a buffer about to be overwritten
                // (zeroing 2 MiB pack windows was 2% of a restore's CPU).
                let mut buf = Vec::with_capacity(len as usize);
                if r.start <= r.end {
                    f.seek(SeekFrom::Start(r.start))?;
                    Read::take(&mut f, len).read_to_end(&mut buf)?;
                }
                if r.start > r.end || buf.len() as u64 != len {
                    return Ok(Err(f.metadata()?.len()));
                }
                Ok(Ok(Bytes::from(buf)))
            })
            .await?;
        res.map_err(|size| StoreError::BadRange {
            key: key.to_owned(),
            start: range.start,
            end: range.end,
            size,
        })
    }

    async fn head(&self, key: &str) -> Result<Option<u64>> {
        let k = key.to_owned();
        self.blocking(key, move |s| match fs::metadata(s.path(&k)) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let inner = self.inner.clone();
        let p = prefix.to_owned();
        tokio::task::spawn_blocking(move || inner.list(&p))
            .await
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|r| r)
            .map_err(|source| StoreError::Io {
                key: prefix.to_owned(),
                source,
            })
    }

    async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        // A directory listing of one level is what a filesystem does natively.
        let inner = self.inner.clone();
        let p = prefix.to_owned();
        let res = tokio::task::spawn_blocking(move || -> io::Result<Vec<String>> {
            let dir = inner.root.join(p.trim_end_matches('/'));
            let mut out = Vec::new();
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = entry?;
                if let Some(name) = entry.file_name().to_str() {
                    if !(p.is_empty() && name == TMP_DIR) {
                        out.push(name.to_owned());
                    }
                }
            }
            out.sort();
            Ok(out)
        })
        .await
        .map_err(|e| io::Error::other(e.to_string()))
        .and_then(|r| r);
        res.map_err(|source| StoreError::Io {
            key: prefix.to_owned(),
            source,
        })
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let k = key.to_owned();
        self.blocking(key, move |s| match fs::remove_file(s.path(&k)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        })
        .await
    }

    fn honors_create_if_absent(&self) -> bool {
        true
    }

    fn location(&self) -> String {
        self.inner.root.display().to_string()
    }
}
