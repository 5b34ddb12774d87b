//! The local index cache: index objects already downloaded, kept on this host so a second mount
//! or ingest starts without downloading them again.
//!
//! Layout: `<base>/<repository id>/<store key>[.head]`, base `--cache-dir`, else
//! `$BACKTREE_CACHE_DIR`, else `$XDG_CACHE_HOME/backtree`, else `~/.cache/backtree`. Only
//! immutable, content-named objects are cached (roots, deltas, filter bundles, table heads), and
//! a cached file is used only after the same verification as a downloaded one (its BLAKE3 must
//! match its name), so a damaged or foreign file is never trusted: it is removed, with a
//! warning naming it, and fetched again. Writes go to a temporary file renamed into place, so a
//! killed process leaves at most a stray `.tmp-*` file. Every cache error is non-fatal: the
//! store is the truth, the cache only saves downloads.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One repository's cache directory.
#[derive(Debug, Clone)]
pub struct LocalCache {
    dir: PathBuf,
}

/// The default cache base directory.
pub fn default_base() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("BACKTREE_CACHE_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("backtree"));
    }
    std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .map(|h| PathBuf::from(h).join(".cache").join("backtree"))
}

impl LocalCache {
    /// The cache of repository `repo_id` under `base`; `None` (with a warning) if it cannot be
    /// created.
    pub fn open(base: &Path, repo_id: &str) -> Option<LocalCache> {
        let dir = base.join(repo_id);
        match fs::create_dir_all(&dir) {
            Ok(()) => Some(LocalCache { dir }),
            Err(e) => {
                tracing::warn!(
                    "index cache {} unusable ({e}); going on without it",
                    dir.display()
                );
                None
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The cached bytes of `name`, if any.
    pub fn read(&self, name: &str) -> Option<Vec<u8>> {
        fs::read(self.path(name)).ok()
    }

    /// Stores `bytes` under `name`; failures are logged and otherwise ignored.
    pub fn write(&self, name: &str, bytes: &[u8]) {
        let path = self.path(name);
        let res = (|| -> std::io::Result<()> {
            let parent = path.parent().unwrap_or(&self.dir);
            fs::create_dir_all(parent)?;
            let tmp = parent.join(format!(
                ".tmp-{}-{:016x}",
                std::process::id(),
                rand::random::<u64>()
            ));
            let mut f = fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            drop(f);
            fs::rename(&tmp, &path).inspect_err(|_| {
                let _ = fs::remove_file(&tmp);
            })
        })();
        if let Err(e) = res {
            tracing::debug!("index cache: cannot write {}: {e}", path.display());
        }
    }

    /// Removes a cached file that failed verification, with a warning naming it.
    pub fn reject(&self, name: &str, why: &str) {
        let path = self.path(name);
        tracing::warn!(
            "index cache: {} is damaged ({why}); fetching it again",
            path.display()
        );
        let _ = fs::remove_file(path);
    }

    /// Removes cached files under the directory `prefix` (e.g. `index/deltas`) whose store key
    /// (the name without `.head`) `keep` rejects: objects deleted from the store.
    pub fn retain(&self, prefix: &str, keep: impl Fn(&str) -> bool) {
        let Ok(rd) = fs::read_dir(self.path(prefix)) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let key = format!("{prefix}/{}", name.trim_end_matches(".head"));
            if name.starts_with(".tmp-") || !keep(&key) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_reject_retain() {
        let t = tempfile::tempdir().unwrap();
        let c = LocalCache::open(t.path(), "abc").unwrap();
        c.write("index/deltas/00ff", b"hello");
        c.write("index/tables/11.head", b"head");
        assert_eq!(c.read("index/deltas/00ff").unwrap(), b"hello");
        c.reject("index/deltas/00ff", "test");
        assert!(c.read("index/deltas/00ff").is_none());
        c.write("index/deltas/a", b"1");
        c.write("index/deltas/b", b"2");
        c.retain("index/deltas", |k| k == "index/deltas/a");
        assert!(c.read("index/deltas/a").is_some());
        assert!(c.read("index/deltas/b").is_none());
        c.retain("index/tables", |k| k == "index/tables/11");
        assert!(c.read("index/tables/11.head").is_some());
    }
}
