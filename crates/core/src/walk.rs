//! The reference walker: every blob one generation references, with the path that references it.
//!
//! A generation references, from its manifest down (docs/format.md §7, §8):
//!
//! ```text
//! manifest ─root.tree─► tree ─pages─► page trees            (RefKind::Tree)
//!     │                   │ entry.tree ─► subtrees …        (RefKind::Tree)
//!     │                   │ entry.chunks ─► chunks          (RefKind::Data)
//!     │                   │ entry.chunk_list ─► chunk list  (RefKind::ChunkList: a plain list, or
//!     │                   │      a paged list's index blobs and pages) ─► chunks (RefKind::Data)
//!     │                   └ entry.gzip: the recipe's chunks / chunk list, the same way
//!     └─links─► hardlink table                              (RefKind::Links)
//! ```
//!
//! [`walk_generation`] reports every reference to a [`Visitor`] ([`Visitor::reference`]: the
//! blob, its kind, the path inside the generation, whether this walk sees it for the first time)
//! and fetches every tree-kind blob it has not seen (trees, pages, chunk lists and their
//! index blobs and pages, the hardlink table) to find what they reference in turn. Data chunks
//! are reported, never read: what a caller does with them (look them up in the index, mark them
//! reachable) is its business.
//!
//! **Seen set.** The caller passes a [`Seen`] set that lives across walks: a tree-kind blob
//! already seen (earlier in this generation, or in another generation walked with the same set)
//! is reported with `first: false` and not fetched again, since everything below it was
//! reported when it was first walked. An unchanged directory is one blob in every generation,
//! so walking a host's second generation costs only what changed. Data chunks go through the
//! set too (a prune marks them with it; verify checks each once). The set is a trait so that a
//! prune can use a compact set of id prefixes and verify a plain `HashSet<Id>`.
//!
//! **Concurrency.** Fetches run [`FETCHES_IN_FLIGHT`] at a time (a sequential walk costs a
//! round trip per directory, minutes on S3 for a large tree); the callbacks and the seen set
//! are used only from the walking task, so they need not be `Sync`. Pending work is a stack, so
//! the walk goes depth first and its memory follows the tree's depth and the width of the
//! directories in flight, not the size of the generation.
//!
//! **Errors.** A blob that cannot be read or decoded (not in the index, its pack missing, a
//! hash mismatch, a corrupt tree or list) is a [`Problem`] with the path that references it, the
//! blob and the error, plus the chain of tree-kind blobs above it ([`Problem::ancestors`]), so
//! a caller can tell which later generations reach it through shared subtrees. The walk then
//! goes on with everything else: one damaged directory hides only what is below it.

use crate::chunklist::{decode_index, is_index};
use crate::error::{Error, Result};
use crate::id::Id;
use crate::manifest::Manifest;
use crate::repo::Repository;
use crate::tree::{decode_links, ChunkList, Entry, Kind, Tree};
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::collections::HashSet;

/// Tree-kind blobs fetched at once by one walk.
pub const FETCHES_IN_FLIGHT: usize = 16;

/// The set of blobs already walked, shared across walks (see the module docs).
pub trait Seen {
    /// Records `id`; `true` if it was not in the set before (walk it), `false` if it was.
    fn first_visit(&mut self, id: &Id) -> bool;
}

impl Seen for HashSet<Id> {
    fn first_visit(&mut self, id: &Id) -> bool {
        self.insert(*id)
    }
}

/// What a reference names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefKind {
    /// A directory, one page of a paged directory, or a paged directory's page list.
    Tree,
    /// A file's (or gzip recipe's) chunk-list blob, or an index blob or page of a paged list.
    ChunkList,
    /// A file chunk.
    Data,
    /// The generation's hardlink table.
    Links,
}

impl RefKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RefKind::Tree => "tree",
            RefKind::ChunkList => "chunk-list",
            RefKind::Data => "data",
            RefKind::Links => "links",
        }
    }
}

impl std::fmt::Display for RefKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the walker reads tree-kind blobs: the repository (through its index), or a caller's
/// own view of the index (verify reads through the index it has loaded and checked).
pub trait BlobSource: Sync {
    /// The blob's verified bytes ([`crate::blob::decode`]).
    fn read_blob<'a>(&'a self, id: &'a Id) -> BoxFuture<'a, Result<Vec<u8>>>;
}

impl BlobSource for Repository {
    fn read_blob<'a>(&'a self, id: &'a Id) -> BoxFuture<'a, Result<Vec<u8>>> {
        Box::pin(Repository::read_blob(self, id))
    }
}

/// One reference found by the walk.
#[derive(Debug, Clone, Copy)]
pub struct Reference<'a> {
    pub id: &'a Id,
    pub kind: RefKind,
    /// The path inside the generation that references it (`/` is the root directory).
    pub path: &'a str,
    /// Whether the seen set did not hold it before (a tree-kind blob is then walked).
    pub first: bool,
    /// The tree-kind blobs above it, from the root tree down (not the blob itself).
    pub ancestors: &'a [Id],
}

/// A blob that could not be read or decoded.
#[derive(Debug)]
pub struct Problem {
    pub id: Id,
    pub kind: RefKind,
    /// The path that references it.
    pub path: String,
    /// The tree-kind blobs above it, from the root tree down.
    pub ancestors: Vec<Id>,
    pub error: Error,
}

/// What the walker reports to.
pub trait Visitor {
    /// Every reference, in no particular order (fetches complete out of order).
    fn reference(&mut self, r: &Reference<'_>);
    /// A blob that could not be read or decoded; the walk goes on without what is below it.
    fn problem(&mut self, p: Problem);
}

/// Counts of one walk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalkStats {
    /// Tree-kind blobs fetched.
    pub fetched: u64,
    /// References reported.
    pub references: u64,
    /// Problems reported.
    pub problems: u64,
}

/// What a fetched tree-kind blob is expected to be.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// A directory: a leaf, or a page list.
    Dir,
    /// One page of a paged directory.
    DirPage,
    /// A chunk list named by an entry: a plain list or a paged list's root index.
    ListRoot,
    /// A node of a paged chunk list: level 0 a page, n an index blob of level n.
    ListNode(u8),
    /// The hardlink table.
    Links,
}

struct Job {
    id: Id,
    expect: Expect,
    path: String,
    /// Tree-kind blobs above this one.
    ancestors: Vec<Id>,
}

impl Job {
    fn kind(&self) -> RefKind {
        match self.expect {
            Expect::Dir | Expect::DirPage => RefKind::Tree,
            Expect::ListRoot | Expect::ListNode(_) => RefKind::ChunkList,
            Expect::Links => RefKind::Links,
        }
    }
}

/// The walk's state: work not yet started, the seen set and the visitor.
struct Walk<'a> {
    stack: Vec<Job>,
    seen: &'a mut dyn Seen,
    visitor: &'a mut dyn Visitor,
    stats: WalkStats,
}

impl Walk<'_> {
    /// Reports a reference; queues a fetch of `expect` if it is tree-kind and first seen.
    fn refer(
        &mut self,
        id: &Id,
        kind: RefKind,
        path: &str,
        ancestors: &[Id],
        expect: Option<Expect>,
    ) {
        let first = self.seen.first_visit(id);
        self.stats.references += 1;
        self.visitor.reference(&Reference {
            id,
            kind,
            path,
            first,
            ancestors,
        });
        if let (true, Some(expect)) = (first, expect) {
            self.stack.push(Job {
                id: *id,
                expect,
                path: path.to_owned(),
                ancestors: ancestors.to_vec(),
            });
        }
    }

    fn chunks(&mut self, list: &ChunkList, path: &str, ancestors: &[Id]) {
        for id in list.0.iter().filter_map(|c| c.id.as_ref()) {
            self.refer(id, RefKind::Data, path, ancestors, None);
        }
    }

    /// An entry of a directory at `path` (the entry's own path).
    fn entry(&mut self, e: &Entry, path: &str, ancestors: &[Id]) {
        match e.kind {
            Kind::Dir => {
                if let Some(t) = &e.tree {
                    self.refer(t, RefKind::Tree, path, ancestors, Some(Expect::Dir));
                }
            }
            Kind::File => {
                if let Some(c) = &e.chunks {
                    self.chunks(c, path, ancestors);
                }
                if let Some(id) = &e.chunk_list {
                    let kind = RefKind::ChunkList;
                    self.refer(id, kind, path, ancestors, Some(Expect::ListRoot));
                }
                if let Some(g) = &e.gzip {
                    let recipe = format!("{path} (gzip recipe)");
                    if let Some(c) = &g.chunks {
                        self.chunks(c, &recipe, ancestors);
                    }
                    if let Some(id) = &g.chunk_list {
                        let kind = RefKind::ChunkList;
                        self.refer(id, kind, &recipe, ancestors, Some(Expect::ListRoot));
                    }
                }
            }
            _ => {}
        }
    }

    /// Decodes a fetched blob and reports (and queues) what it references.
    fn process(&mut self, job: &Job, raw: &[u8]) -> Result<()> {
        let mut here = job.ancestors.clone();
        here.push(job.id);
        let id = &job.id;
        match job.expect {
            Expect::Dir | Expect::DirPage => {
                let t = Tree::decode(&format!("tree {id}"), raw)?;
                if t.is_paged() && matches!(job.expect, Expect::DirPage) {
                    return Err(Error::corrupt(
                        format!("tree {id}"),
                        "a page of a directory is itself paged",
                    ));
                }
                for p in &t.pages {
                    self.refer(
                        &p.id,
                        RefKind::Tree,
                        &job.path,
                        &here,
                        Some(Expect::DirPage),
                    );
                }
                for e in &t.entries {
                    let name = String::from_utf8_lossy(&e.name);
                    let path = if job.path.ends_with('/') {
                        format!("{}{name}", job.path)
                    } else {
                        format!("{}/{name}", job.path)
                    };
                    self.entry(e, &path, &here);
                }
            }
            Expect::ListRoot | Expect::ListNode(_) => {
                let level = match job.expect {
                    Expect::ListNode(l) => Some(l),
                    _ => None,
                };
                if is_index(raw) {
                    let (l, records) = decode_index(&format!("chunk-list index {id}"), raw)?;
                    if level.is_some_and(|want| want != l) {
                        return Err(Error::corrupt(
                            format!("chunk-list index {id}"),
                            format!("level {l} where its parent expects {level:?}"),
                        ));
                    }
                    for (_, child) in &records {
                        let expect = Some(Expect::ListNode(l - 1));
                        self.refer(child, RefKind::ChunkList, &job.path, &here, expect);
                    }
                } else {
                    if level.is_some_and(|l| l != 0) {
                        return Err(Error::corrupt(
                            format!("chunk-list page {id}"),
                            "a page where its parent expects an index blob",
                        ));
                    }
                    let list = ChunkList::decode(&format!("chunk list {id}"), raw)?;
                    self.chunks(&list, &job.path, &here);
                }
            }
            Expect::Links => {
                decode_links(&format!("hardlink table {id}"), raw)?;
            }
        }
        Ok(())
    }
}

/// Walks generation `m`: reports every blob it references to `visitor`, fetching (from `src`,
/// [`FETCHES_IN_FLIGHT`] at a time) the tree-kind blobs `seen` does not hold yet. Never fails:
/// a blob that cannot be read or decoded is reported as a [`Problem`] and the walk goes on.
pub async fn walk_generation(
    src: &dyn BlobSource,
    m: &Manifest,
    seen: &mut dyn Seen,
    visitor: &mut dyn Visitor,
) -> WalkStats {
    let mut w = Walk {
        stack: Vec::new(),
        seen,
        visitor,
        stats: WalkStats::default(),
    };
    if let Some(links) = &m.links {
        w.refer(links, RefKind::Links, "/", &[], Some(Expect::Links));
    }
    // The root entry, as any directory entry (a root is always a directory; its `tree` names
    // the generation's top directory).
    w.entry(&m.root, "/", &[]);
    let mut in_flight = FuturesUnordered::new();
    loop {
        while in_flight.len() < FETCHES_IN_FLIGHT {
            let Some(job) = w.stack.pop() else { break };
            in_flight.push(async move {
                let r = src.read_blob(&job.id).await;
                (job, r)
            });
        }
        let Some((job, read)) = in_flight.next().await else {
            break;
        };
        w.stats.fetched += 1;
        let result = read.and_then(|raw| w.process(&job, &raw));
        if let Err(error) = result {
            w.stats.problems += 1;
            let kind = job.kind();
            w.visitor.problem(Problem {
                id: job.id,
                kind,
                path: job.path,
                ancestors: job.ancestors,
                error,
            });
        }
    }
    w.stats
}

#[cfg(test)]
pub(crate) mod tests;
