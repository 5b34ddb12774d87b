//! The history view: `/<host>/.history/<path>`, every distinct version of a path across the
//! host's generations (docs/mount.md, "History").
//!
//! ```text
//! /<host>/.history/                     the root directory's names across all generations
//! /<host>/.history/etc/                 a directory (in its newest version): its names, ever
//! /<host>/.history/etc/passwd/          a file: one entry per distinct version of it,
//! /<host>/.history/etc/passwd/2026-11-02T020000Z   named by the first generation that has it
//! ```
//! Nothing is built at mount time. A path's versions are found when the path is asked for
//! ([`backtree_core::history::versions_with`]): its generations are listed (one store listing)
//! and, for each, the path is resolved from the generation's root, stopping where a directory's
//! tree id equals the previous generation's, so a path that did not change costs no tree read.
//! What is kept is bounded: the versions of the last [`PATHS_KEPT`] paths (each stamped with
//! the generation listing it was computed from, and computed again when that changes), the
//! root entries of the last [`ROOTS_KEPT`] generations (the walk's only per-generation need, so
//! walking into `.history/var/lib/…` reads each manifest once, not once per component) and
//! [`TREE_BYTES_KEPT`] of the trees walked (each path's walk starts in the same root trees).
//!
//! A directory of the view lists the names its path has had in any version (a file deleted
//! since is still there), each a directory of the view again if it is a directory in its newest
//! version, else a directory of versions. A version is the generation's own entry, under an
//! inode number of its own (so a directory version never aliases the generation's directory):
//! reading it reads the generation's file, with its size, mode, owners and times. The view is
//! not listed in `/<host>/` (as ZFS hides `.zfs`): an `rsync` or `find` of the host directory
//! does not walk every path's history; it is there for whoever names it.

use super::error::{lock, Failures, FsError, Result};
use super::inodes::{entry_attr, hash_ino, Attr, EntryAt, Node};
use super::namespace::GenCtx;
use crate::cache::SizedLru;
use backtree_core::diff::TreeSource;
use backtree_core::history::{self, Version};
use backtree_core::tree::{Entry, Kind, Tree};
use backtree_core::Id;
use backtree_core::Repository;
use futures_util::future::BoxFuture;
use lru::LruCache;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

/// The name of the view in a host's directory.
pub const HISTORY_DIR: &str = ".history";

/// Paths whose versions are kept. A `cd` into `.history/a/b/c` asks for each component and the
/// shell and `ls` ask again; 64 covers that with room, and each is a few hundred bytes per
/// version.
const PATHS_KEPT: usize = 64;
/// Generation root entries kept (about 200 bytes each): a year of nightly generations of a few
/// dozen hosts.
const ROOTS_KEPT: usize = 16_384;
/// Bytes of parsed trees kept for history walks ([`Tree::mem_size`]): a host's root directory
/// is typically a few KB parsed, so a year of them fits many times over.
const TREE_BYTES_KEPT: usize = 16 << 20;

type Versions = Arc<Vec<Version>>;
/// A path's versions with the stamp of the generation listing they were computed from.
type Stamped = (u64, Versions);

/// The history view's state: the versions of recently asked paths, generation roots.
pub(super) struct History {
    repo: Arc<Repository>,
    failures: Arc<Failures>,
    roots: Roots,
    trees: Trees,
    paths: Mutex<LruCache<(String, Vec<u8>), Stamped>>,
}

impl History {
    pub(super) fn new(repo: Arc<Repository>, failures: Arc<Failures>) -> Self {
        let cap = |n| NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN);
        History {
            repo: repo.clone(),
            failures,
            roots: Mutex::new(LruCache::new(cap(ROOTS_KEPT))),
            trees: Trees {
                repo,
                kept: Mutex::new(SizedLru::new(TREE_BYTES_KEPT)),
            },
            paths: Mutex::new(LruCache::new(cap(PATHS_KEPT))),
        }
    }

    /// The versions of `path` in `host`'s generations `names` (a fresh listing, oldest first).
    pub(super) async fn versions(
        &self,
        host: &str,
        names: &[String],
        path: &[u8],
    ) -> Result<Versions> {
        let key = (host.to_owned(), path.to_vec());
        let stamp = listing_stamp(names);
        if let Some((s, v)) = lock(&self.paths).get(&key) {
            if *s == stamp {
                return Ok(v.clone());
            }
        }
        let (vs, _) = history::versions_with(&self.trees, names, path, |name| {
            root(&self.repo, &self.roots, &self.failures, host, name)
        })
        .await
        .map_err(|e| self.failures.fail(describe(host, path), e))?;
        let vs = Arc::new(vs);
        lock(&self.paths).put(key, (stamp, vs.clone()));
        Ok(vs)
    }

    /// The names the directory at `path` has had (its `versions`), with their newest kinds.
    pub(super) async fn children(
        &self,
        host: &str,
        path: &[u8],
        versions: &[Version],
    ) -> Result<BTreeMap<Vec<u8>, Kind>> {
        history::children(&self.trees, versions)
            .await
            .map_err(|e| self.failures.fail(describe(host, path), e))
    }
}

/// The view's node for `path` of `host`, whose versions are `versions`: a directory to walk into
/// if the newest version is a directory, else the directory of its versions. `NotFound` if no
/// generation has the path.
pub(super) fn path_node(
    host: &Arc<str>,
    path: Arc<[u8]>,
    versions: &[Version],
) -> Result<(u64, Node)> {
    let newest = versions.last().ok_or(FsError::NotFound)?;
    Ok(node_of(host, path, newest.entry.kind == Kind::Dir))
}

/// The view's node for `path` of `host`: a directory of the view (`dir`) or of versions.
pub(super) fn node_of(host: &Arc<str>, path: Arc<[u8]>, dir: bool) -> (u64, Node) {
    let host = host.clone();
    if dir {
        let ino = hash_ino(&[b"history", host.as_bytes(), &path]);
        (ino, Node::History { host, path })
    } else {
        let ino = hash_ino(&[b"versions", host.as_bytes(), &path]);
        (ino, Node::Versions { host, path })
    }
}

/// The entry of version `v` of `path`, in its first generation `gen`: the generation's entry
/// under an inode number of its own, held by the node (its page is not in the mount's cache).
pub(super) fn version_node(gen: Arc<GenCtx>, path: &Arc<[u8]>, v: &Version) -> (u64, Node, Attr) {
    let ino = hash_ino(&[b"version", gen.host.as_bytes(), path, gen.name.as_bytes()]);
    let attr = entry_attr(ino, &gen, &v.entry);
    let node = Node::Entry {
        gen,
        path: path.clone(),
        at: EntryAt::Held(Arc::new(v.entry.clone())),
    };
    (ino, node, attr)
}

/// Generation root entries by host and name.
type Roots = Mutex<LruCache<(String, String), Entry>>;

/// The trees history walks read, kept by bytes: every path's walk starts in the same root
/// trees (one per generation that changed anything), so the next path asked reads none of
/// them again. Read by ranged reads of single blobs, not through the mount's pack windows: a
/// walk needs one directory of each generation, whose tree pack holds all the others.
struct Trees {
    repo: Arc<Repository>,
    kept: Mutex<SizedLru<Arc<Tree>>>,
}

impl TreeSource for Trees {
    fn tree<'a>(&'a self, id: &'a Id) -> BoxFuture<'a, backtree_core::Result<Arc<Tree>>> {
        Box::pin(async move {
            if let Some(t) = lock(&self.kept).get(id) {
                return Ok(t);
            }
            let t = Arc::new(self.repo.tree(id).await?);
            lock(&self.kept).put(*id, t.clone(), t.mem_size());
            Ok(t)
        })
    }
}

/// A generation's root entry; `None` if it was forgotten since it was listed, or if its
/// manifest cannot be read (logged): one damaged generation must not hide every other version.
async fn root(
    repo: &Repository,
    roots: &Roots,
    failures: &Failures,
    host: &str,
    name: &str,
) -> backtree_core::Result<Option<Entry>> {
    let key = (host.to_owned(), name.to_owned());
    if let Some(e) = lock(roots).get(&key) {
        return Ok(Some(e.clone()));
    }
    match repo.manifest(&key.0, &key.1).await {
        Ok(m) => {
            lock(roots).put(key, m.root.clone());
            Ok(Some(m.root))
        }
        Err(e) if e.kind() == backtree_core::ErrorKind::NotFound => Ok(None),
        Err(e) => {
            let what = format!("{host}/{name}: manifest (left out of {HISTORY_DIR})");
            failures.fail(what, e);
            Ok(None)
        }
    }
}

/// `path/name` (`name` alone below the root).
pub(super) fn join(path: &[u8], name: &[u8]) -> Arc<[u8]> {
    if path.is_empty() {
        Arc::from(name)
    } else {
        Arc::from([path, b"/", name].concat())
    }
}

/// `host/.history/path`, for log lines.
fn describe(host: &str, path: &[u8]) -> String {
    format!("{host}/{HISTORY_DIR}/{}", String::from_utf8_lossy(path))
}

/// What identifies a generation listing: versions computed from another are computed again.
fn listing_stamp(names: &[String]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    names.hash(&mut h);
    h.finish()
}
