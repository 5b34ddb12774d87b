//! Comparing two generations (`backtree diff`): added, removed and changed entries, reading only
//! the subtrees whose tree ids differ.
//!
//! Every directory is a tree blob named by its content (tree.rs), so two directories with the
//! same `Entry.tree` id hold the same entries all the way down: the walk skips them without
//! reading them. Where both ids differ, both directories are read and their entries merged by
//! name; of a paged directory only the pages whose ids the other side does not have are read
//! (a page held by both holds the same entries on both sides). Two generations of a million
//! files that differ in ten files therefore cost the trees along the paths of those ten files.
//!
//! A change is *content* (a regular file's chunks, chunk-list blob, size, holes or gzip origin
//! differ) or *metadata* (mode, owner, mtime, xattrs, symlink target, device number). The
//! access time, change time, inode number and hardlink group are not compared: they change
//! without anything a restore would write differently (an ingest's own reads move the atime; the
//! ctime follows every other change). [`same_version`] is this definition as a predicate, which
//! `find` uses to tell versions of a file apart. An entry whose type changed is reported removed
//! and added.
//!
//! The walk is depth first in name order, holding one directory's entries per level: memory
//! follows the tree's depth and width, not the generation's size, and changes come out sorted
//! by path.

use crate::error::Result;
use crate::id::Id;
use crate::repo::Repository;
use crate::tree::{Entry, Kind, Tree};
use futures_util::future::{BoxFuture, LocalBoxFuture};
use serde::Serialize;
use std::collections::HashSet;
use std::sync::Arc;

/// Where the walks of `diff`, `find` and `history` read directory trees: the repository, a
/// cache in front of it (the mount's history view), or a test's map. Trees come shared, so a
/// cache hands out what it keeps without copying; a walk that owns the only reference takes
/// the entries out ([`Arc::unwrap_or_clone`]).
pub trait TreeSource: Sync {
    /// The tree blob `id`, parsed.
    fn tree<'a>(&'a self, id: &'a Id) -> BoxFuture<'a, Result<Arc<Tree>>>;
}

impl TreeSource for Repository {
    fn tree<'a>(&'a self, id: &'a Id) -> BoxFuture<'a, Result<Arc<Tree>>> {
        Box::pin(async move { Repository::tree(self, id).await.map(Arc::new) })
    }
}

/// What happened to an entry between the two generations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Added,
    Removed,
    /// A regular file's content differs.
    Content,
    /// Only metadata differ (mode, owner, mtime, xattrs, link target, device).
    Metadata,
}

impl ChangeKind {
    /// The letter of `backtree diff`'s output: `+`, `-`, `M` (content), `m` (metadata).
    pub fn letter(self) -> char {
        match self {
            ChangeKind::Added => '+',
            ChangeKind::Removed => '-',
            ChangeKind::Content => 'M',
            ChangeKind::Metadata => 'm',
        }
    }
}

/// One change, with the entry on each side that has it.
#[derive(Debug, Clone)]
pub struct Change {
    pub kind: ChangeKind,
    /// The path inside the generation, without a leading `/`.
    pub path: String,
    pub old: Option<Entry>,
    pub new: Option<Entry>,
}

/// What a comparison read and skipped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DiffStats {
    /// Tree blobs read (directories, page lists and pages, both sides).
    pub trees_read: u64,
    /// Subdirectories present on both sides with the same tree id, not read.
    pub trees_skipped: u64,
    /// Pages of paged directories held by both sides, not read.
    pub pages_skipped: u64,
}

/// The entry with the fields a comparison ignores cleared (see the module docs).
pub(crate) fn normalized(e: &Entry) -> Entry {
    Entry {
        atime: Default::default(),
        ctime: Default::default(),
        ino: 0,
        link: None,
        ..e.clone()
    }
}

/// Whether two entries are the same version: nothing [`classify`] reports, same subtree.
pub fn same_version(a: &Entry, b: &Entry) -> bool {
    normalized(a) == normalized(b)
}

/// How two entries of the same name differ, if they do (a directory's own metadata only, not
/// what it holds). Entries of different types are [`ChangeKind::Content`].
pub fn classify(a: &Entry, b: &Entry) -> Option<ChangeKind> {
    if a.kind != b.kind {
        return Some(ChangeKind::Content);
    }
    if a.kind == Kind::File
        && (a.size != b.size
            || a.chunks != b.chunks
            || a.chunk_list != b.chunk_list
            || a.holes != b.holes
            || a.gzip != b.gzip)
    {
        return Some(ChangeKind::Content);
    }
    let meta = a.mode != b.mode
        || a.uid != b.uid
        || a.gid != b.gid
        || a.user != b.user
        || a.group != b.group
        || a.mtime != b.mtime
        || a.xattrs != b.xattrs
        || a.target != b.target
        || a.rdev != b.rdev;
    meta.then_some(ChangeKind::Metadata)
}

/// One level of the walk: the merged entries of a directory on both sides, and its path.
struct Frame {
    prefix: String,
    pairs: std::vec::IntoIter<(Option<Entry>, Option<Entry>)>,
}

/// The entries of directory `a` and of directory `b` (either absent: nothing), leaving out the
/// pages both hold, merged by name.
async fn merged(
    src: &dyn TreeSource,
    a: Option<&Id>,
    b: Option<&Id>,
    stats: &mut DiffStats,
) -> Result<Vec<(Option<Entry>, Option<Entry>)>> {
    let mut ta = None;
    let mut tb = None;
    if let Some(id) = a {
        stats.trees_read += 1;
        ta = Some(Arc::unwrap_or_clone(src.tree(id).await?));
    }
    if let Some(id) = b {
        stats.trees_read += 1;
        tb = Some(Arc::unwrap_or_clone(src.tree(id).await?));
    }
    let pages = |t: &Option<Tree>| -> HashSet<Id> {
        t.iter()
            .flat_map(|t| t.pages.iter().map(|p| p.id))
            .collect()
    };
    let (pa, pb) = (pages(&ta), pages(&tb));
    let mut sides = [Vec::new(), Vec::new()];
    for (i, (t, other)) in [(ta, &pb), (tb, &pa)].into_iter().enumerate() {
        let Some(t) = t else { continue };
        if !t.is_paged() {
            sides[i] = t.entries;
            continue;
        }
        for p in &t.pages {
            if other.contains(&p.id) {
                // Counted once, from one side.
                stats.pages_skipped += (i == 0) as u64;
                continue;
            }
            stats.trees_read += 1;
            sides[i].extend(Arc::unwrap_or_clone(src.tree(&p.id).await?).entries);
        }
    }
    let [ea, eb] = sides;
    let mut out = Vec::with_capacity(ea.len().max(eb.len()));
    let mut ia = ea.into_iter().peekable();
    let mut ib = eb.into_iter().peekable();
    loop {
        let ord = match (ia.peek(), ib.peek()) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(x), Some(y)) => x.name.cmp(&y.name),
        };
        out.push(match ord {
            std::cmp::Ordering::Less => (ia.next(), None),
            std::cmp::Ordering::Greater => (None, ib.next()),
            std::cmp::Ordering::Equal => (ia.next(), ib.next()),
        });
    }
    Ok(out)
}

/// Compares directory tree `a` with directory tree `b` (either absent: everything in the other
/// is added or removed), calling `on` for every change in path order. `prefix` is the
/// directories' path (`""` for a generation's root, else ending in `/`), put before every path.
pub async fn diff_trees(
    src: &dyn TreeSource,
    a: Option<&Id>,
    b: Option<&Id>,
    prefix: &str,
    on: &mut dyn FnMut(Change),
) -> Result<DiffStats> {
    let mut stats = DiffStats::default();
    if a.is_some() && a == b {
        stats.trees_skipped += 1;
        return Ok(stats);
    }
    let first = merged(src, a, b, &mut stats).await?;
    let mut stack = vec![Frame {
        prefix: prefix.to_owned(),
        pairs: first.into_iter(),
    }];
    while let Some(top) = stack.last_mut() {
        let Some(pair) = top.pairs.next() else {
            stack.pop();
            continue;
        };
        let name = match &pair {
            (Some(e), _) | (None, Some(e)) => String::from_utf8_lossy(&e.name).into_owned(),
            (None, None) => continue,
        };
        let path = format!("{}{name}", top.prefix);
        let dir = |e: &Option<Entry>| match e {
            Some(e) if e.kind == Kind::Dir => e.tree,
            _ => None,
        };
        let (old, new) = pair;
        let kind = match (&old, &new) {
            (Some(x), Some(y)) if x.kind == y.kind => classify(x, y),
            (Some(_), Some(_)) => {
                // Another type: the old one removed, the new one added.
                on(Change {
                    kind: ChangeKind::Removed,
                    path: path.clone(),
                    old: old.clone(),
                    new: None,
                });
                if let Some(t) = dir(&old) {
                    let sub =
                        diff_trees_boxed(src, Some(t), None, format!("{path}/"), &mut *on).await?;
                    add(&mut stats, &sub);
                }
                on(Change {
                    kind: ChangeKind::Added,
                    path: path.clone(),
                    old: None,
                    new: new.clone(),
                });
                if let Some(t) = dir(&new) {
                    let sub =
                        diff_trees_boxed(src, None, Some(t), format!("{path}/"), &mut *on).await?;
                    add(&mut stats, &sub);
                }
                continue;
            }
            (Some(_), None) => Some(ChangeKind::Removed),
            _ => Some(ChangeKind::Added),
        };
        let (ta, tb) = (dir(&old), dir(&new));
        if let Some(kind) = kind {
            on(Change {
                kind,
                path: path.clone(),
                old,
                new,
            });
        }
        if ta.is_none() && tb.is_none() {
            continue;
        }
        if ta == tb {
            stats.trees_skipped += 1;
            continue;
        }
        let pairs = merged(src, ta.as_ref(), tb.as_ref(), &mut stats).await?;
        stack.push(Frame {
            prefix: format!("{path}/"),
            pairs: pairs.into_iter(),
        });
    }
    Ok(stats)
}

fn add(s: &mut DiffStats, o: &DiffStats) {
    s.trees_read += o.trees_read;
    s.trees_skipped += o.trees_skipped;
    s.pages_skipped += o.pages_skipped;
}

fn diff_trees_boxed<'a>(
    src: &'a dyn TreeSource,
    a: Option<Id>,
    b: Option<Id>,
    prefix: String,
    on: &'a mut dyn FnMut(Change),
) -> LocalBoxFuture<'a, Result<DiffStats>> {
    Box::pin(async move { diff_trees(src, a.as_ref(), b.as_ref(), &prefix, on).await })
}

/// Compares the entries at one path of two generations (`None`: the path is absent there; a
/// generation's root is its manifest's root entry): the entry itself, then, for directories,
/// everything below. `path` is without a leading `/`, `""` for the root (whose own metadata
/// are not compared: every generation has its own root).
pub async fn diff_entries(
    src: &dyn TreeSource,
    a: Option<&Entry>,
    b: Option<&Entry>,
    path: &str,
    on: &mut dyn FnMut(Change),
) -> Result<DiffStats> {
    let dir = |e: Option<&Entry>| e.filter(|e| e.kind == Kind::Dir).and_then(|e| e.tree);
    let prefix = if path.is_empty() {
        String::new()
    } else {
        format!("{path}/")
    };
    if !path.is_empty() {
        let kind = match (a, b) {
            (Some(x), Some(y)) if x.kind != y.kind => {
                let mut stats = DiffStats::default();
                on(Change {
                    kind: ChangeKind::Removed,
                    path: path.into(),
                    old: Some(x.clone()),
                    new: None,
                });
                add(
                    &mut stats,
                    &diff_trees(src, dir(a).as_ref(), None, &prefix, on).await?,
                );
                on(Change {
                    kind: ChangeKind::Added,
                    path: path.into(),
                    old: None,
                    new: Some(y.clone()),
                });
                add(
                    &mut stats,
                    &diff_trees(src, None, dir(b).as_ref(), &prefix, on).await?,
                );
                return Ok(stats);
            }
            (Some(x), Some(y)) => classify(x, y),
            (Some(_), None) => Some(ChangeKind::Removed),
            (None, Some(_)) => Some(ChangeKind::Added),
            (None, None) => None,
        };
        if let Some(kind) = kind {
            on(Change {
                kind,
                path: path.into(),
                old: a.cloned(),
                new: b.cloned(),
            });
        }
    }
    let (ta, tb) = (dir(a), dir(b));
    if ta.is_none() && tb.is_none() {
        return Ok(DiffStats::default());
    }
    diff_trees(src, ta.as_ref(), tb.as_ref(), &prefix, on).await
}

#[cfg(test)]
pub(crate) mod tests;
