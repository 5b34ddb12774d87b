//! `backtree repair generations --salvage`: for each damaged generation, a new generation of the
//! same host that keeps everything still readable and leaves out what is lost.
//!
//! **Finding the damage.** The generation is walked ([`walk_generation`], its own seen set) and
//! every blob it references is classified:
//! - *lost*: a blob the verify report names as damaged (a missing pack, a corrupt blob found
//!   with `--read-data`, not indexed), a tree-kind blob that cannot be read or decoded now
//!   (not found, corrupt), or a data chunk or chunk list with no live index entry that no prune
//!   is deleting (the index's [`Dedup::contains`], the same rule an ingest uses before it
//!   references a blob: a copy doomed by a tombstone does not count);
//! - *to store again*: a directory (or directory page) that reads fine but whose every copy is
//!   doomed: it is rewritten (same bytes, a new copy) rather than referenced;
//! - fine: everything else.
//!
//! A store failure (unreachable, denied) while walking stops the salvage of that generation: a
//! blob that merely could not be fetched is never taken for lost.
//!
//! **Rebuilding.** Only along the damaged paths: a tree is *tainted* when something below it is
//! lost or to be stored again (the walk's ancestors, closed over shared subtrees). A directory
//! that is not tainted keeps its tree id; a tainted one is read, its entries rebuilt and stored
//! as an ingest stores a directory ([`paginate`], [`Tree::encode`], through the ingest's
//! [`BlobWriter`]: tree packs, then an index delta). A file whose content (a chunk, its chunk
//! list or a node of a paged list, its gzip recipe) is lost is left out; a directory whose own
//! tree blob is lost becomes an empty directory with the metadata its parent's entry gives it;
//! a lost page of a paged directory loses the entries on it. The hardlink table is kept if it
//! can be read (its counts lowered for hardlinked files left out), else dropped. Every left-out path is a [`SkippedPath`] in the new manifest.
//!
//! **Committing.** Like an ingest (docs/concurrency.md): a writer lease is taken before the
//! index view, packs and the delta are stored before the manifest, the lease is checked before
//! the commit ([`Error::LeaseLapsed`] if it lapsed), and the manifest takes the first free name
//! for the damaged generation's time ([`crate::ingest::commit`]: create-if-absent or the claim
//! protocol). The damaged manifest is deleted only after the new one is stored.

use super::DamagedGeneration;
use crate::error::{Error, ErrorKind, Result};
use crate::id::Id;
use crate::index::dedup::Dedup;
use crate::ingest::writer::{BlobWriter, CHECKPOINT_BYTES};
use crate::lease::{Lease, LeaseGuard, LEASE_TIME};
use crate::manifest::{candidate_name, generation_name, Manifest, SkippedPath, Stats};
use crate::repo::Repository;
use crate::tree::{decode_links, encode_links, paginate, Entry, Kind, PageRef, Tree};
use crate::verify::{Report, Severity};
use crate::walk::{walk_generation, Problem, RefKind, Reference, Visitor};
use chrono::Utc;
use futures_util::StreamExt;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::runtime::Handle;

/// Left-out paths kept in a manifest's `errors` (as an ingest keeps skipped paths).
pub const ERRORS_LISTED: usize = 100;
/// Index confirmations in flight while classifying a generation's blobs.
const CHECKS_IN_FLIGHT: usize = 32;

/// Options of [`salvage_generations`].
#[derive(Debug, Clone, Default)]
pub struct SalvageOptions {
    /// Say what would be done; write and delete nothing (no lease either).
    pub dry_run: bool,
    /// Lease time (default [`LEASE_TIME`]; tests shorten it).
    pub lease_time: Option<Duration>,
}

/// What the salvage of one damaged generation did (or would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Salvaged {
    pub host: String,
    /// The damaged generation.
    pub generation: String,
    /// The generation written (with `dry_run`, the name it would most likely get).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_generation: Option<String>,
    /// Paths left out (files lost, directories emptied, entries of lost directory pages).
    pub left_out: u64,
    /// The first [`ERRORS_LISTED`] of them, with why.
    pub paths: Vec<SkippedPath>,
    /// The hardlink table could not be read and was dropped.
    pub links_dropped: bool,
    /// Tree blobs written (or that would be): rebuilt directories and their pages.
    pub trees_written: u64,
    /// The damaged manifest was deleted.
    pub removed: bool,
    /// Why the generation was not salvaged (nothing was written for it, it was not removed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Salvaged {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// Blobs the verify report names as damaged (problems only), with the report's message.
pub fn damaged_blobs(report: &Report) -> HashMap<Id, String> {
    let mut out = HashMap::new();
    for f in &report.findings {
        if f.severity != Severity::Problem {
            continue;
        }
        if let Some(id) = f.blob.as_deref().and_then(Id::from_hex) {
            out.entry(id).or_insert_with(|| f.message.clone());
        }
    }
    out
}

/// Salvages each of `gens` (see the module docs). Synchronous: call it from outside the
/// runtime of `handle` (as [`crate::ingest::ingest`]). One result per generation, in order;
/// a generation whose manifest cannot be read is not salvaged (its `error` says so).
pub fn salvage_generations(
    repo: &Repository,
    handle: &Handle,
    report: &Report,
    gens: &[DamagedGeneration],
    opts: &SalvageOptions,
) -> Vec<Salvaged> {
    let bad = damaged_blobs(report);
    gens.iter()
        .map(|g| {
            let mut out = Salvaged {
                host: g.host.clone(),
                generation: g.generation.clone(),
                ..Salvaged::default()
            };
            let r = if g.manifest_damaged {
                Err(Error::corrupt(
                    Manifest::key(&g.host, &g.generation),
                    "the manifest cannot be read: nothing to salvage (`--remove` deletes it)",
                ))
            } else {
                salvage_one(repo, handle, &bad, &mut out, opts)
            };
            if let Err(e) = r {
                out.error = Some(e.to_string());
            }
            out
        })
        .collect()
}

fn salvage_one(
    repo: &Repository,
    handle: &Handle,
    reported: &HashMap<Id, String>,
    out: &mut Salvaged,
    opts: &SalvageOptions,
) -> Result<()> {
    let m = handle.block_on(repo.manifest(&out.host, &out.generation))?;
    let time = m.datetime().ok_or_else(|| {
        Error::corrupt(
            Manifest::key(&m.host, &m.name),
            format!("time {:?} is not RFC 3339", m.time),
        )
    })?;
    let started = Utc::now();
    // The lease comes before the index view, as an ingest's (docs/concurrency.md): a prune
    // that dooms a copy after the view was taken waits for this lease.
    let session = hex::encode(rand::random::<[u8; 16]>());
    let lease = if opts.dry_run {
        None
    } else {
        Some(LeaseGuard::new(
            handle.block_on(Lease::take(
                repo.store().clone(),
                &session,
                &m.host,
                opts.lease_time.unwrap_or(LEASE_TIME),
                handle,
            ))?,
            handle.clone(),
        ))
    };
    let known = handle.block_on(Dedup::load(repo.index_handle()))?;
    let damage = handle.block_on(find_damage(repo, &m, reported, &known))?;
    let root_lost = m.root.tree.is_some_and(|t| damage.lost.contains_key(&t));
    let links_lost = m.links.is_some_and(|l| damage.lost.contains_key(&l));
    if damage.tainted.is_empty() && !root_lost && !links_lost {
        return Err(Error::corrupt(
            Manifest::key(&m.host, &m.name),
            "a fresh look finds no lost data in it: nothing to salvage (run verify again)",
        ));
    }

    let cfg = repo.config();
    let writer = (!opts.dry_run).then(|| {
        BlobWriter::new(
            repo.store().clone(),
            handle.clone(),
            cfg.compression.level,
            cfg.pack_size as usize,
            known,
            CHECKPOINT_BYTES,
        )
        .with_list_page(cfg.list_page())
    });
    let mut rb = Rebuild {
        repo,
        handle,
        writer: writer.as_ref(),
        damage: &damage,
        skipped: Vec::new(),
        left_out: 0,
        files_lost: 0,
        bytes_lost: 0,
        trees_written: 0,
        empty: None,
        unlinked: HashMap::new(),
    };
    let root = rb
        .entry(m.root.clone(), "/")?
        .unwrap_or_else(|| m.root.clone());
    // Hardlinked files left out: their groups count fewer members (the true `st_nlink`).
    let links = match m.links.filter(|_| !links_lost) {
        Some(l) if !rb.unlinked.is_empty() => {
            let raw = handle.block_on(repo.read_blob(&l))?;
            let mut table = decode_links(&format!("hardlink table {l}"), &raw)?;
            for (g, c) in table.iter_mut() {
                *c = c.saturating_sub(rb.unlinked.get(g).copied().unwrap_or(0));
            }
            table.retain(|(_, c)| *c > 0);
            match table.is_empty() {
                true => None,
                false => Some(rb.store_raw(&encode_links(&table))?),
            }
        }
        other => other,
    };
    out.left_out = rb.left_out;
    out.trees_written = rb.trees_written;
    out.links_dropped = links_lost;
    let mut skipped = std::mem::take(&mut rb.skipped);
    if links_lost {
        skipped.push(SkippedPath {
            path: "/".into(),
            error: "the hardlink table cannot be read: dropped (hardlinked files now read as \
                    separate files)"
                .into(),
        });
    }
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    out.paths = skipped.iter().take(ERRORS_LISTED).cloned().collect();
    let (files_lost, bytes_lost, left_out) = (rb.files_lost, rb.bytes_lost, rb.left_out);
    drop(rb);

    let Some(w) = writer else {
        // Dry run: the name the commit would most likely take.
        let existing = handle.block_on(repo.generations(&m.host))?;
        let base = generation_name(&time);
        out.new_generation = (1..)
            .map(|n| candidate_name(&base, n))
            .find(|n| !existing.contains(n));
        return Ok(());
    };
    // Packs, then the delta (both in `finish`), then the manifest.
    w.finish()?;
    let ws = &w.stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let stats = Stats {
        files: m.stats.files.saturating_sub(files_lost),
        logical_bytes: m.stats.logical_bytes.saturating_sub(bytes_lost),
        read_bytes: 0,
        unchanged_files: 0,
        new_raw_bytes: load(&ws.new_raw_bytes),
        new_stored_bytes: load(&ws.new_stored_bytes),
        new_chunks: load(&ws.new_chunks),
        skipped: left_out + u64::from(links_lost),
        ..m.stats.clone()
    };
    let salvaged = format!("salvaged from {}", m.name);
    let mut new = Manifest {
        name: String::new(),
        started: started.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        finished: String::new(),
        label: Some(match &m.label {
            Some(l) if !l.is_empty() => format!("{l}; {salvaged}"),
            _ => salvaged,
        }),
        root,
        links,
        parent: None,
        stats,
        errors: out.paths.clone(),
        session,
        tool: format!("backtree {}", env!("CARGO_PKG_VERSION")),
        ..m.clone()
    };
    // A salvage paused past its lease commits nothing: data it relies on may be gone.
    if let Some(l) = &lease {
        l.check()?;
    }
    handle.block_on(crate::ingest::commit(repo, &mut new, &time))?;
    drop(lease);
    out.new_generation = Some(new.name.clone());
    handle.block_on(repo.forget(&m.host, &m.name))?;
    out.removed = true;
    Ok(())
}

/// What is lost in one generation and which trees lead to it.
#[derive(Debug, Default)]
struct Damage {
    /// Lost blobs, with why.
    lost: HashMap<Id, String>,
    /// Tree-kind blobs with something lost or to be stored again below them (and directories
    /// to store again themselves).
    tainted: HashSet<Id>,
}

/// The walk's visitor: classifies references against the lost set.
struct Classify<'a> {
    lost: &'a HashMap<Id, String>,
    /// Directories to store again (read fine, every copy doomed).
    again: &'a HashSet<Id>,
    found: HashMap<Id, String>,
    tainted: HashSet<Id>,
    /// Tree-kind blob → the tree-kind blobs that reference it (for subtrees the walk does not
    /// descend twice).
    parents: HashMap<Id, HashSet<Id>>,
    /// Every blob first seen, with its kind (to confirm in the index).
    seen: Option<HashMap<Id, RefKind>>,
    /// A store failure: the salvage stops.
    failed: Option<Error>,
}

impl Visitor for Classify<'_> {
    fn reference(&mut self, r: &Reference<'_>) {
        if r.kind != RefKind::Data {
            if let Some(p) = r.ancestors.last() {
                self.parents.entry(*r.id).or_default().insert(*p);
            }
        }
        if let (Some(seen), true) = (&mut self.seen, r.first) {
            seen.insert(*r.id, r.kind);
        }
        let again = self.again.contains(r.id);
        if self.lost.contains_key(r.id) || again {
            self.tainted.extend(r.ancestors.iter().copied());
        }
        if again {
            self.tainted.insert(*r.id);
        }
    }

    fn problem(&mut self, p: Problem) {
        match p.error.kind() {
            ErrorKind::NotFound | ErrorKind::Corrupt => {
                self.tainted.extend(p.ancestors.iter().copied());
                self.found.insert(p.id, p.error.to_string());
            }
            _ => {
                self.failed.get_or_insert(p.error);
            }
        }
    }
}

/// What one walk found.
struct Walked {
    found: HashMap<Id, String>,
    tainted: HashSet<Id>,
    parents: HashMap<Id, HashSet<Id>>,
    seen: Option<HashMap<Id, RefKind>>,
}

async fn walk(
    repo: &Repository,
    m: &Manifest,
    lost: &HashMap<Id, String>,
    again: &HashSet<Id>,
    collect: bool,
) -> Result<Walked> {
    let mut v = Classify {
        lost,
        again,
        found: HashMap::new(),
        tainted: HashSet::new(),
        parents: HashMap::new(),
        seen: collect.then(HashMap::new),
        failed: None,
    };
    let mut seen = HashSet::new();
    walk_generation(repo, m, &mut seen, &mut v).await;
    if let Some(e) = v.failed {
        return Err(e);
    }
    Ok(Walked {
        found: v.found,
        tainted: v.tainted,
        parents: v.parents,
        seen: v.seen,
    })
}

/// Walks `m` and finds what is lost in it (see the module docs).
async fn find_damage(
    repo: &Repository,
    m: &Manifest,
    reported: &HashMap<Id, String>,
    known: &Dedup,
) -> Result<Damage> {
    let mut lost = reported.clone();
    let none = HashSet::new();
    let first = walk(repo, m, &lost, &none, true).await?;
    lost.extend(first.found);
    // Confirm every other blob in the index as a writer would before referencing it.
    let seen = first.seen.unwrap_or_default();
    let to_check: Vec<(Id, RefKind)> = seen
        .into_iter()
        .filter(|(id, _)| !lost.contains_key(id))
        .collect();
    let mut checks = futures_util::stream::iter(
        to_check
            .into_iter()
            .map(|(id, kind)| async move { (id, kind, known.contains(&id).await) }),
    )
    .buffer_unordered(CHECKS_IN_FLIGHT);
    let mut unknown: Vec<(Id, RefKind)> = Vec::new();
    while let Some((id, kind, ok)) = checks.next().await {
        if !ok? {
            unknown.push((id, kind));
        }
    }
    drop(checks);
    let (mut tainted, mut parents) = (first.tainted, first.parents);
    if !unknown.is_empty() {
        let mut again = HashSet::new();
        for (id, kind) in unknown {
            if kind == RefKind::Tree {
                again.insert(id);
            } else {
                let why = format!(
                    "blob {id} has no live index entry that no prune is deleting (not indexed, \
                     or every copy is being pruned)"
                );
                lost.insert(id, why);
            }
        }
        let second = walk(repo, m, &lost, &again, false).await?;
        lost.extend(second.found);
        tainted = second.tainted;
        parents = second.parents;
    }
    // A subtree referenced twice is walked once: whatever references a tainted or lost tree
    // is tainted too.
    let mut stack: Vec<Id> = tainted
        .iter()
        .copied()
        .chain(lost.keys().copied())
        .collect();
    while let Some(id) = stack.pop() {
        for p in parents.get(&id).into_iter().flatten() {
            if tainted.insert(*p) {
                stack.push(*p);
            }
        }
    }
    Ok(Damage { lost, tainted })
}

/// The bottom-up rebuild of the tainted trees of one generation.
struct Rebuild<'a> {
    repo: &'a Repository,
    handle: &'a Handle,
    /// `None`: dry run (tree ids are computed, nothing is stored).
    writer: Option<&'a BlobWriter>,
    damage: &'a Damage,
    skipped: Vec<SkippedPath>,
    left_out: u64,
    files_lost: u64,
    bytes_lost: u64,
    trees_written: u64,
    empty: Option<Id>,
    /// Hardlink group → members left out.
    unlinked: HashMap<u64, u32>,
}

impl Rebuild<'_> {
    fn store_tree(&mut self, t: &Tree) -> Result<Id> {
        self.store_raw(&t.encode())
    }

    fn store_raw(&mut self, raw: &[u8]) -> Result<Id> {
        self.trees_written += 1;
        match self.writer {
            Some(w) => w.store_tree(raw),
            None => Ok(Id::of(raw)),
        }
    }

    fn skip(&mut self, path: &str, error: String, count: u64) {
        self.left_out += count;
        self.skipped.push(SkippedPath {
            path: path.to_owned(),
            error,
        });
    }

    /// An entry of a rebuilt directory (the root at `/`); `None` if it is left out.
    fn entry(&mut self, mut e: Entry, path: &str) -> Result<Option<Entry>> {
        match e.kind {
            Kind::Dir => {
                let Some(t) = e.tree else { return Ok(Some(e)) };
                if let Some(why) = self.damage.lost.get(&t) {
                    let why = format!("directory contents lost: {why}");
                    self.skip(path, why, 1);
                    let empty = match self.empty {
                        Some(id) => id,
                        None => {
                            let id = self.store_tree(&Tree::leaf(Vec::new()))?;
                            self.empty = Some(id);
                            id
                        }
                    };
                    e.tree = Some(empty);
                } else if self.damage.tainted.contains(&t) {
                    e.tree = Some(self.dir(&t, path)?);
                }
                Ok(Some(e))
            }
            Kind::File => match self.file_loss(&e) {
                Some(why) => {
                    self.skip(path, why, 1);
                    self.files_lost += 1;
                    self.bytes_lost += e.size;
                    if let Some(g) = e.link {
                        *self.unlinked.entry(g).or_insert(0) += 1;
                    }
                    Ok(None)
                }
                None => Ok(Some(e)),
            },
            _ => Ok(Some(e)),
        }
    }

    /// Why a file's content is lost, if it is.
    fn file_loss(&self, e: &Entry) -> Option<String> {
        let lists = [
            e.chunks.as_ref(),
            e.gzip.as_ref().and_then(|g| g.chunks.as_ref()),
        ];
        let blobs = [e.chunk_list, e.gzip.as_ref().and_then(|g| g.chunk_list)];
        let ids = lists
            .into_iter()
            .flatten()
            .flat_map(|l| l.0.iter().filter_map(|c| c.id))
            .chain(blobs.into_iter().flatten());
        for id in ids {
            if let Some(why) = self.damage.lost.get(&id) {
                return Some(format!("content lost: {why}"));
            }
            if self.damage.tainted.contains(&id) {
                return Some(format!(
                    "content lost: chunk list {id} references lost data"
                ));
            }
        }
        None
    }

    /// Rebuilds a tainted directory; returns its new tree id.
    fn dir(&mut self, id: &Id, path: &str) -> Result<Id> {
        let t = self.handle.block_on(self.repo.tree(id))?;
        let mut entries = Vec::new();
        if t.is_paged() {
            for p in &t.pages {
                if let Some(why) = self.damage.lost.get(&p.id) {
                    let why = format!(
                        "{} entries from {:?} on lost directory page: {why}",
                        p.count,
                        String::from_utf8_lossy(&p.first)
                    );
                    self.skip(path, why, p.count);
                    continue;
                }
                let page = self.handle.block_on(self.repo.tree(&p.id))?;
                entries.extend(page.entries);
            }
        } else {
            entries = t.entries;
        }
        let mut kept = Vec::with_capacity(entries.len());
        for e in entries {
            let name = String::from_utf8_lossy(&e.name);
            let child = if path.ends_with('/') {
                format!("{path}{name}")
            } else {
                format!("{path}/{name}")
            };
            if let Some(e) = self.entry(e, &child)? {
                kept.push(e);
            }
        }
        self.store_dir(kept)
    }

    /// Stores a directory as an ingest does (`ingest::Walker::store_dir`).
    fn store_dir(&mut self, mut entries: Vec<Entry>) -> Result<Id> {
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let mut pages = paginate(entries);
        if pages.len() == 1 {
            let page = pages.pop().unwrap_or_default();
            return self.store_tree(&Tree::leaf(page));
        }
        let mut refs = Vec::with_capacity(pages.len());
        for page in pages {
            let first = page.first().map(|e| e.name.clone()).unwrap_or_default();
            let count = page.len() as u64;
            let id = self.store_tree(&Tree::leaf(page))?;
            refs.push(PageRef { first, id, count });
        }
        self.store_tree(&Tree::paged(refs))
    }
}

#[cfg(test)]
mod tests;
