//! `backtree verify`: checks that every generation can be read back, and says what is lost where.
//!
//! Phases, each reporting every problem it finds and going on:
//!
//! 1. **Listings**: `snapshots/` (the generations), `packs/` (every pack and its size).
//! 2. **Index** ([`LoadedIndex::load`]): the current root, every table and filter bundle it
//!    names and every delta it does not cover are fetched whole and verified as a reader
//!    verifies them (hash against the name, bucket checks, reserved bytes). Their entries are
//!    kept in memory (about 100 bytes per entry: verify is a maintenance command, and a lookup
//!    that cannot miss is what lets it check every blob without a re-listing per miss). Every
//!    entry's pack must be in the listing, and its bytes within the pack's size. **Tombstones**
//!    (`deleted` ≠ 0: a prune is deleting that (blob, pack)) excuse a missing pack: a tombstoned
//!    entry whose pack is gone, or a live entry with a tombstone for the same (blob, pack), is not
//!    a problem.
//! 3. **Packs** (`--read-data`, or a deterministic subset): each pack is read whole, its BLAKE3
//!    compared with its name, its trailer parsed, every blob decoded and verified against its
//!    id, and the index's entries for the pack compared with the trailer. A damaged blob is
//!    remembered, so that phase 4 names the paths that lose it.
//! 4. **Generations**: every manifest is read and parsed, then walked ([`crate::walk`]) with
//!    one seen set across all generations (a blob is checked once, an unchanged subtree walked
//!    once). Every referenced blob must have a live index entry whose pack exists and is not
//!    damaged; trees and chunk lists are read (through the loaded index) and decoded. A problem
//!    names the host, the generation and the path of its first reference; a later generation
//!    that reaches the same damage (through the blob itself or a shared subtree above it) is
//!    counted in [`Finding::other_generations`].
//!
//! A referenced blob whose only entries are tombstones is a **warning**: a prune is deleting
//! data a generation still needs. Warnings are reported but are not problems.

use crate::blob;
use crate::error::{Error, ErrorKind, Result};
use crate::id::{pack_key, BlobKind, Id};
use crate::index::filter::FilterBundle;
use crate::index::root::{self, name_of, Root, DELTAS_PREFIX, FILTERS_PREFIX, ROOTS_PREFIX};
use crate::index::table::{Table, TableEntry};
use crate::index::Location;
use crate::manifest::Manifest;
use crate::pack;
use crate::repo::Repository;
use crate::walk::{self, BlobSource, Problem, RefKind, Reference, Visitor};
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Index objects fetched at once.
const INDEX_FETCHES: usize = 16;
/// Whole packs read at once by `--read-data` (each up to ~16 MiB in memory).
const PACK_READS: usize = 4;

/// Which packs `--read-data` reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DataSubset {
    /// None: structure only.
    None,
    /// Every pack.
    All,
    /// About this percentage of the packs, chosen by pack id (the same ones every run).
    Percent(f64),
    /// Group `n` (1-based) of `m`: the packs whose id, as a number, is `n − 1` modulo `m`, so
    /// that runs with 1/m, 2/m, … m/m together read every pack once.
    Group { n: u32, m: u32 },
}

impl DataSubset {
    /// Parses `10%`, `2.5%` or `N/M` (1 ≤ N ≤ M).
    pub fn parse(s: &str) -> std::result::Result<DataSubset, String> {
        let bad = || format!("{s:?} is not a percentage such as 10% or a group N/M such as 2/5");
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(format!(
                    "{s:?}: the percentage must be above 0 and at most 100"
                ));
            }
            return Ok(DataSubset::Percent(p));
        }
        let (n, m) = s.split_once('/').ok_or_else(bad)?;
        let (n, m): (u32, u32) = (
            n.trim().parse().map_err(|_| bad())?,
            m.trim().parse().map_err(|_| bad())?,
        );
        if n == 0 || m == 0 || n > m {
            return Err(format!("{s:?}: a group N/M needs 1 <= N <= M"));
        }
        Ok(DataSubset::Group { n, m })
    }

    /// Whether the pack with this id is read.
    pub fn selects(&self, pack: &Id) -> bool {
        let x = u64::from_be_bytes(pack.0[..8].try_into().unwrap_or([0; 8]));
        match *self {
            DataSubset::None => false,
            DataSubset::All => true,
            DataSubset::Percent(p) => (x as f64) < p / 100.0 * (u64::MAX as f64 + 1.0),
            DataSubset::Group { n, m } => x % m as u64 == (n - 1) as u64,
        }
    }
}

/// Which hosts a run covers.
pub type HostFilter = Box<dyn Fn(&str) -> bool + Send + Sync>;

/// What to check.
pub struct VerifyOptions {
    pub data: DataSubset,
    /// Only generations of hosts this accepts (`None`: every host). The index and the packs are
    /// checked whole either way.
    pub hosts: Option<HostFilter>,
}

/// Live counters for a progress display.
#[derive(Debug, Default)]
pub struct VerifyProgress {
    /// What is being checked now.
    pub phase: Mutex<String>,
    pub done: AtomicU64,
    pub total: AtomicU64,
}

impl VerifyProgress {
    pub fn start(&self, phase: &str, total: u64) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase.to_owned();
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }

    pub fn tick(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Problem,
    Warning,
}

/// What kind of damage a finding is (docs/cli.md explains each and what to do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FindingKind {
    /// A manifest that cannot be read or parsed.
    Manifest,
    /// An index object (root, table, filter, delta) that is missing, or fails to parse or verify.
    Index,
    /// Index entries point to a pack that does not exist.
    MissingPack,
    /// An index entry that disagrees with its pack (outside it, or not in its trailer).
    IndexEntry,
    /// A pack that cannot be read whole, or whose bytes do not hash to its name, or whose
    /// trailer is damaged.
    Pack,
    /// A blob whose stored bytes do not decode to its id.
    CorruptBlob,
    /// A referenced blob that no index entry names.
    NotIndexed,
    /// A referenced blob whose packs are all missing or damaged.
    Unavailable,
    /// A referenced tree-kind blob that reads but does not decode (a bad tree or list).
    Undecodable,
    /// A referenced blob whose only index entries are tombstones (warning).
    BeingPruned,
    /// A store error (the store unreachable, access denied) reading something.
    Unreadable,
}

/// One problem (or warning), with what it affects.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub kind: FindingKind,
    /// The store key of the object concerned (a manifest, an index object, a pack).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// The blob concerned (hex).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blob: Option<String>,
    /// What references the blob: `tree`, `chunk-list`, `data`, `links`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blob_kind: Option<&'static str>,
    /// The first generation affected: its host, its name and the path inside it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Further generations that reach the same damage (`HOST/GENERATION`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub other_generations: Vec<String>,
    pub message: String,
}

impl Finding {
    fn new(severity: Severity, kind: FindingKind, message: impl Into<String>) -> Finding {
        Finding {
            severity,
            kind,
            object: None,
            blob: None,
            blob_kind: None,
            host: None,
            generation: None,
            path: None,
            other_generations: Vec::new(),
            message: message.into(),
        }
    }

    fn problem(kind: FindingKind, message: impl Into<String>) -> Finding {
        Finding::new(Severity::Problem, kind, message)
    }

    fn object(mut self, key: impl Into<String>) -> Finding {
        self.object = Some(key.into());
        self
    }

    fn blob(mut self, id: &Id) -> Finding {
        self.blob = Some(id.to_hex());
        self
    }

    /// Every generation it affects: the first, then the others (`HOST/GENERATION`).
    pub fn generations(&self) -> Vec<String> {
        let mut out: Vec<String> = match (&self.host, &self.generation) {
            (Some(h), Some(g)) => vec![format!("{h}/{g}")],
            _ => vec![],
        };
        out.extend(self.other_generations.iter().cloned());
        out
    }

    /// One line for a terminal.
    pub fn line(&self) -> String {
        let mut s = String::from(match self.severity {
            Severity::Problem => "problem",
            Severity::Warning => "warning",
        });
        if let (Some(h), Some(g)) = (&self.host, &self.generation) {
            s.push_str(&format!(" {h}/{g}"));
            if let Some(p) = &self.path {
                s.push_str(&format!(" {p}"));
            }
        }
        s.push_str(": ");
        s.push_str(&self.message);
        if let Some(b) = &self.blob {
            if !self.message.contains(b.as_str()) {
                s.push_str(&format!(" (blob {b})"));
            }
        }
        if let Some(o) = &self.object {
            if !self.message.contains(o.as_str()) {
                s.push_str(&format!(" [{o}]"));
            }
        }
        match self.other_generations.len() {
            0 => {}
            1 => s.push_str(&format!("; also affects {}", self.other_generations[0])),
            n => s.push_str(&format!("; also affects {n} other generations")),
        }
        s
    }
}

/// Counts of one verify run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    pub hosts: u64,
    pub generations: u64,
    /// Generations with at least one problem.
    pub damaged_generations: u64,
    pub index_objects: u64,
    pub index_entries: u64,
    pub packs: u64,
    pub packs_read: u64,
    pub blobs_read: u64,
    /// Blobs in the packs read that no index entry names (`repair index` adds them; harmless
    /// otherwise: what a crashed ingest left).
    pub unindexed_blobs: u64,
    pub blobs_referenced: u64,
    pub trees_read: u64,
    pub problems: u64,
    pub warnings: u64,
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
    pub counts: Counts,
}

impl Report {
    /// Generations with a problem (not only a warning), `HOST/GENERATION`, each with the
    /// problems that affect it (indices into `findings`).
    pub fn damaged(&self) -> Vec<(String, Vec<usize>)> {
        let mut out: Vec<(String, Vec<usize>)> = Vec::new();
        let mut at: HashMap<String, usize> = HashMap::new();
        for (i, f) in self.findings.iter().enumerate() {
            if f.severity != Severity::Problem {
                continue;
            }
            for g in f.generations() {
                let j = *at.entry(g.clone()).or_insert_with(|| {
                    out.push((g, Vec::new()));
                    out.len() - 1
                });
                out[j].1.push(i);
            }
        }
        out
    }
}

/// Every pack in the store: key → size.
pub async fn list_packs(repo: &Repository) -> Result<HashMap<String, u64>> {
    Ok(repo
        .store()
        .list("packs/")
        .await?
        .into_iter()
        .filter(|o| pack_of_key(&o.key).is_some())
        .map(|o| (o.key, o.size))
        .collect())
}

/// The kind and id of a pack key (`packs/data/xx/<hex>`), if it is one.
pub fn pack_of_key(key: &str) -> Option<(BlobKind, Id)> {
    let kind = if key.starts_with("packs/data/") {
        BlobKind::Data
    } else if key.starts_with("packs/tree/") {
        BlobKind::Tree
    } else {
        return None;
    };
    let id = name_of(key)?;
    (pack_key(kind, &id) == key).then_some((kind, id))
}

/// Every entry of the current index, loaded whole and verified.
#[derive(Debug, Default)]
pub struct LoadedIndex {
    /// Entries by blob id (identical entries from several objects kept once).
    pub entries: HashMap<Id, Vec<TableEntry>>,
    /// Index objects read.
    pub objects: u64,
}

impl LoadedIndex {
    /// Loads the current root, its tables and filters and the deltas it does not cover. Every
    /// object that is missing or fails to verify is a finding (`Index`); the rest is loaded.
    pub async fn load(
        repo: &Repository,
        findings: &mut Vec<Finding>,
        progress: &VerifyProgress,
    ) -> Result<LoadedIndex> {
        let store = repo.store();
        let (roots, deltas) =
            futures_util::future::try_join(store.list(ROOTS_PREFIX), store.list(DELTAS_PREFIX))
                .await?;
        let mut out = LoadedIndex::default();
        let mut root = Root::empty();
        if let Some(k) = root::current(roots.iter().map(|o| o.key.as_str())) {
            out.objects += 1;
            match store.get(k).await {
                Ok(b) => match Root::parse(k, &b) {
                    Ok(r) => root = r,
                    Err(e) => findings.push(index_finding(k, &e)),
                },
                Err(e) => findings.push(index_finding(k, &e.into())),
            }
        }
        let covered: HashSet<&str> = root.covers.iter().map(String::as_str).collect();
        // (key, expected id, is a table)
        let mut todo: Vec<(String, Option<Id>, bool)> = Vec::new();
        for t in root.tables() {
            todo.push((t.key(), t.id(), true));
        }
        for f in root.filters() {
            todo.push((format!("{FILTERS_PREFIX}{f}"), Id::from_hex(f), false));
        }
        for o in &deltas {
            let name = o.key.strip_prefix(DELTAS_PREFIX).unwrap_or_default();
            if name_of(&o.key).is_some() && !covered.contains(name) {
                todo.push((o.key.clone(), name_of(&o.key), true));
            }
        }
        progress.start("index", todo.len() as u64);
        let mut loaded =
            futures_util::stream::iter(todo.into_iter().map(|(key, id, table)| async move {
                let r = match store.get(&key).await {
                    Err(e) => Err(Error::from(e)),
                    Ok(b) if table => Table::parse(&key, &b, id.as_ref()).map(Some),
                    Ok(b) => FilterBundle::parse(&key, &b, id.as_ref()).map(|_| None),
                };
                (key, r)
            }))
            .buffer_unordered(INDEX_FETCHES);
        while let Some((key, r)) = loaded.next().await {
            progress.tick();
            out.objects += 1;
            match r {
                Ok(Some(t)) => {
                    for e in t.entries {
                        let v = out.entries.entry(e.id).or_default();
                        if !v.contains(&e) {
                            v.push(e);
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => findings.push(index_finding(&key, &e)),
            }
        }
        Ok(out)
    }

    /// Whether the index holds the entry (blob, pack), live or not.
    pub fn has(&self, id: &Id, pack: &Id) -> bool {
        self.entries
            .get(id)
            .is_some_and(|v| v.iter().any(|e| e.pack == *pack))
    }

    /// Number of entries.
    pub fn len(&self) -> u64 {
        self.entries.values().map(|v| v.len() as u64).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn index_finding(key: &str, e: &Error) -> Finding {
    let kind = match e.kind() {
        ErrorKind::Unavailable => FindingKind::Unreadable,
        _ => FindingKind::Index,
    };
    let msg = if e.kind() == ErrorKind::NotFound {
        format!("index object {key} is missing: {e}")
    } else {
        format!("index object {key}: {e}")
    };
    Finding::problem(kind, msg).object(key)
}

/// What the checks so far know about the repository's blobs.
struct State<'a> {
    repo: &'a Repository,
    index: LoadedIndex,
    packs: HashMap<String, u64>,
    /// (blob, pack) whose stored bytes were found damaged.
    bad: HashSet<(Id, Id)>,
    /// Packs that were found damaged whole (unreadable, bad trailer).
    bad_packs: HashSet<Id>,
}

impl State<'_> {
    fn pack_exists(&self, e: &TableEntry) -> bool {
        self.packs.contains_key(&pack_key(e.kind, &e.pack))
    }

    fn usable(&self, e: &TableEntry) -> bool {
        self.pack_exists(e)
            && !self.bad.contains(&(e.id, e.pack))
            && !self.bad_packs.contains(&e.pack)
    }

    /// A location to read `id` from: a live, usable entry first, then a tombstoned one.
    fn location(&self, id: &Id) -> Option<Location> {
        let v = self.index.entries.get(id)?;
        v.iter()
            .filter(|e| self.usable(e))
            .min_by_key(|e| !e.is_live())
            .map(Location::from)
    }

    /// Why a referenced blob cannot be read, if it cannot: (kind, severity, message, object).
    fn check(&self, id: &Id) -> Option<(FindingKind, Severity, String, Option<String>)> {
        let Some(v) = self.index.entries.get(id) else {
            return Some((
                FindingKind::NotIndexed,
                Severity::Problem,
                format!("blob {id} is not in the index"),
                None,
            ));
        };
        if v.iter().any(|e| e.is_live() && self.usable(e)) {
            return None;
        }
        // A live entry with a tombstone for the same (blob, pack) is being deleted too.
        let doomed = |e: &TableEntry| v.iter().any(|t| !t.is_live() && t.pack == e.pack);
        if v.iter().all(|e| !e.is_live() || doomed(e)) {
            let key = pack_key(v[0].kind, &v[0].pack);
            return Some((
                FindingKind::BeingPruned,
                Severity::Warning,
                format!(
                    "blob {id} is still referenced but its index entries are tombstones (a prune \
                     is deleting it)"
                ),
                Some(key),
            ));
        }
        let mut why = Vec::new();
        let mut corrupt = false;
        for e in v.iter().filter(|e| e.is_live()) {
            let key = pack_key(e.kind, &e.pack);
            if !self.pack_exists(e) {
                why.push(format!("pack {key} is missing"));
            } else {
                corrupt = true;
                why.push(format!("damaged in pack {key}"));
            }
        }
        let key = v
            .iter()
            .find(|e| e.is_live())
            .map(|e| pack_key(e.kind, &e.pack));
        let kind = if corrupt {
            FindingKind::CorruptBlob
        } else {
            FindingKind::Unavailable
        };
        Some((
            kind,
            Severity::Problem,
            format!("blob {id} cannot be read: {}", why.join(", ")),
            key,
        ))
    }
}

impl BlobSource for State<'_> {
    fn read_blob<'a>(&'a self, id: &'a Id) -> BoxFuture<'a, Result<Vec<u8>>> {
        Box::pin(async move {
            match self.location(id) {
                Some(loc) => self.repo.read_blob_at(id, &loc).await,
                None => Err(Error::BlobNotIndexed { id: *id }),
            }
        })
    }
}

/// Checks the index entries against the pack listing (phase 2).
fn check_entries(st: &State<'_>, findings: &mut Vec<Finding>) {
    // Per missing pack: entries that need it.
    let mut missing: HashMap<String, u64> = HashMap::new();
    for v in st.index.entries.values() {
        for e in v {
            let key = pack_key(e.kind, &e.pack);
            match st.packs.get(&key) {
                None => {
                    let excused =
                        !e.is_live() || v.iter().any(|t| !t.is_live() && t.pack == e.pack);
                    if !excused {
                        *missing.entry(key).or_default() += 1;
                    }
                }
                Some(&size) => {
                    let end = e.offset as u64 + e.stored_len as u64;
                    if (e.offset as usize) < pack::HEADER_LEN || end > size {
                        findings.push(
                            Finding::problem(
                                FindingKind::IndexEntry,
                                format!(
                                    "index entry of blob {} lies outside pack {key} (bytes {}..{end} of {size})",
                                    e.id, e.offset
                                ),
                            )
                            .object(key)
                            .blob(&e.id),
                        );
                    }
                }
            }
        }
    }
    let mut missing: Vec<_> = missing.into_iter().collect();
    missing.sort();
    for (key, n) in missing {
        findings.push(
            Finding::problem(
                FindingKind::MissingPack,
                format!("pack {key} is missing; {n} index entries point to it"),
            )
            .object(key),
        );
    }
}

/// What reading one pack found.
struct PackCheck {
    key: String,
    pack: Id,
    findings: Vec<Finding>,
    /// Blobs whose bytes are damaged.
    bad: Vec<Id>,
    /// The whole pack is unusable (unreadable, bad trailer).
    bad_pack: bool,
    blobs: u64,
    trailer: Vec<pack::PackEntry>,
}

/// Reads one pack whole and checks it (phase 3; CPU work on the blocking pool).
async fn read_pack(repo: &Repository, key: String, pack_id: Id) -> PackCheck {
    let mut c = PackCheck {
        key: key.clone(),
        pack: pack_id,
        findings: Vec::new(),
        bad: Vec::new(),
        bad_pack: false,
        blobs: 0,
        trailer: Vec::new(),
    };
    let bytes = match repo.store().get(&key).await {
        Ok(b) => b,
        Err(e) => {
            let kind = match Error::from(e) {
                e if e.kind() == ErrorKind::Unavailable => (FindingKind::Unreadable, e),
                e => (FindingKind::Pack, e),
            };
            c.findings.push(
                Finding::problem(kind.0, format!("cannot read pack {key}: {}", kind.1))
                    .object(&key),
            );
            c.bad_pack = true;
            return c;
        }
    };
    let joined = tokio::task::spawn_blocking(move || {
        if Id::of(&bytes) != c.pack {
            c.findings.push(
                Finding::problem(
                    FindingKind::Pack,
                    format!(
                        "pack {} does not hash to its name (its bytes changed)",
                        c.key
                    ),
                )
                .object(&c.key),
            );
        }
        match pack::parse_pack(&c.key, &bytes) {
            Err(e) => {
                c.findings
                    .push(Finding::problem(FindingKind::Pack, e.to_string()).object(&c.key));
                c.bad_pack = true;
            }
            Ok(entries) => {
                for e in &entries {
                    c.blobs += 1;
                    let s = e.offset as usize;
                    let stored = &bytes[s..s + e.stored_len as usize];
                    let what = format!("blob {} in pack {}", e.id, c.key);
                    if let Err(err) = blob::decode(&e.id, stored, e.flags, e.raw_len, &what) {
                        c.findings.push(
                            Finding::problem(FindingKind::CorruptBlob, err.to_string())
                                .object(&c.key)
                                .blob(&e.id),
                        );
                        c.bad.push(e.id);
                    }
                }
                c.trailer = entries;
            }
        }
        c
    });
    match joined.await {
        Ok(c) => c,
        Err(e) => PackCheck {
            findings: vec![Finding::problem(
                FindingKind::Pack,
                format!("checking pack {key} failed: {e}"),
            )
            .object(&key)],
            key,
            pack: pack_id,
            bad: Vec::new(),
            bad_pack: true,
            blobs: 0,
            trailer: Vec::new(),
        },
    }
}

/// Compares the index's entries for a pack with its trailer; `indexed`: the index's entries
/// naming this pack.
fn compare_trailer(
    st: &State<'_>,
    c: &PackCheck,
    indexed: u64,
    counts: &mut Counts,
    out: &mut Vec<Finding>,
) {
    let mut named = 0u64;
    for t in &c.trailer {
        let Some(v) = st.index.entries.get(&t.id) else {
            counts.unindexed_blobs += 1;
            continue;
        };
        let mut any = false;
        for e in v.iter().filter(|e| e.pack == c.pack) {
            any = true;
            named += 1;
            let same = e.offset == t.offset
                && e.stored_len == t.stored_len
                && e.raw_len == t.raw_len
                && e.flags == t.flags;
            if !same {
                out.push(
                    Finding::problem(
                        FindingKind::IndexEntry,
                        format!(
                            "the index places blob {} at bytes {}+{} of pack {}, its trailer at \
                             {}+{}",
                            t.id, e.offset, e.stored_len, c.key, t.offset, t.stored_len
                        ),
                    )
                    .object(&c.key)
                    .blob(&t.id),
                );
            }
        }
        if !any {
            counts.unindexed_blobs += 1;
        }
    }
    if !c.bad_pack && indexed > named {
        out.push(
            Finding::problem(
                FindingKind::IndexEntry,
                format!(
                    "{} index entries name pack {} for blobs its trailer does not list",
                    indexed - named,
                    c.key
                ),
            )
            .object(&c.key),
        );
    }
}

/// The walk's visitor: checks each referenced blob once and attributes damage to generations.
struct Checker<'s, 'a> {
    st: &'s State<'a>,
    findings: &'s mut Vec<Finding>,
    /// Blob → its finding.
    by_blob: HashMap<Id, usize>,
    /// Tree-kind blob (or the damaged blob itself) → findings below it.
    tainted: HashMap<Id, Vec<usize>>,
    host: String,
    generation: String,
    referenced: u64,
}

impl Checker<'_, '_> {
    fn here(&self) -> String {
        format!("{}/{}", self.host, self.generation)
    }

    /// Attributes finding `i` to this generation at `path` (first) or counts it.
    fn attribute(&mut self, i: usize, path: &str) {
        let here = self.here();
        let f = &mut self.findings[i];
        if f.host.is_none() {
            f.host = Some(self.host.clone());
            f.generation = Some(self.generation.clone());
            f.path = Some(path.to_owned());
        } else if f.generations().first() != Some(&here) && !f.other_generations.contains(&here) {
            f.other_generations.push(here);
        }
    }

    fn taint(&mut self, i: usize, id: &Id, ancestors: &[Id]) {
        for a in ancestors.iter().chain(std::iter::once(id)) {
            let v = self.tainted.entry(*a).or_default();
            if !v.contains(&i) {
                v.push(i);
            }
        }
    }

    fn record(&mut self, id: &Id, kind: RefKind, path: &str, ancestors: &[Id], f: Finding) {
        let i = match self.by_blob.get(id) {
            Some(&i) => i,
            None => {
                let mut f = f.blob(id);
                f.blob_kind = Some(kind.as_str());
                self.findings.push(f);
                self.by_blob.insert(*id, self.findings.len() - 1);
                self.findings.len() - 1
            }
        };
        self.attribute(i, path);
        self.taint(i, id, ancestors);
    }
}

impl Visitor for Checker<'_, '_> {
    fn reference(&mut self, r: &Reference<'_>) {
        if !r.first {
            if let Some(v) = self.tainted.get(r.id).cloned() {
                for i in v {
                    self.attribute(i, r.path);
                }
            }
            return;
        }
        self.referenced += 1;
        if let Some((kind, severity, msg, object)) = self.st.check(r.id) {
            let mut f = Finding::new(severity, kind, msg);
            f.object = object;
            self.record(r.id, r.kind, r.path, r.ancestors, f);
        }
    }

    fn problem(&mut self, p: Problem) {
        let kind = match p.error.kind() {
            ErrorKind::NotFound => FindingKind::Unavailable,
            ErrorKind::Corrupt => FindingKind::Undecodable,
            ErrorKind::Unavailable => FindingKind::Unreadable,
            ErrorKind::Other => FindingKind::Undecodable,
        };
        let object = self.st.location(&p.id).map(|l| l.pack_key());
        let mut f = Finding::problem(kind, format!("{} {}: {}", p.kind, p.id, p.error));
        f.object = object;
        self.record(&p.id, p.kind, &p.path, &p.ancestors, f);
    }
}

/// Runs every check (see the module docs). Fails only when the repository cannot be listed;
/// every problem found is in the report.
pub async fn verify(
    repo: &Repository,
    opts: &VerifyOptions,
    progress: &VerifyProgress,
) -> Result<Report> {
    let mut report = Report::default();
    let findings = &mut report.findings;
    let counts = &mut report.counts;

    // 1. Listings.
    progress.start("listing", 0);
    let gens: Vec<(String, Vec<String>)> = repo
        .all_generations()
        .await?
        .into_iter()
        .filter(|(h, _)| opts.hosts.as_ref().is_none_or(|f| f(h)))
        .collect();
    let packs = list_packs(repo).await?;
    counts.packs = packs.len() as u64;

    // 2. The index.
    let index = LoadedIndex::load(repo, findings, progress).await?;
    counts.index_objects = index.objects;
    counts.index_entries = index.len();
    let mut st = State {
        repo,
        index,
        packs,
        bad: HashSet::new(),
        bad_packs: HashSet::new(),
    };
    check_entries(&st, findings);

    // 3. Packs.
    if opts.data != DataSubset::None {
        let mut todo: Vec<(String, Id)> = st
            .packs
            .keys()
            .filter_map(|k| pack_of_key(k).map(|(_, id)| (k.clone(), id)))
            .filter(|(_, id)| opts.data.selects(id))
            .collect();
        todo.sort();
        progress.start("packs", todo.len() as u64);
        let mut checks =
            futures_util::stream::iter(todo.into_iter().map(|(key, id)| read_pack(repo, key, id)))
                .buffer_unordered(PACK_READS);
        let mut done = Vec::new();
        while let Some(c) = checks.next().await {
            progress.tick();
            counts.packs_read += 1;
            counts.blobs_read += c.blobs;
            done.push(c);
        }
        done.sort_by(|a, b| a.key.cmp(&b.key));
        for c in &done {
            for id in &c.bad {
                st.bad.insert((*id, c.pack));
            }
            if c.bad_pack {
                st.bad_packs.insert(c.pack);
            }
        }
        let mut per_pack: HashMap<Id, u64> = HashMap::new();
        for e in st.index.entries.values().flatten() {
            *per_pack.entry(e.pack).or_default() += 1;
        }
        for c in done {
            let indexed = per_pack.get(&c.pack).copied().unwrap_or(0);
            compare_trailer(&st, &c, indexed, counts, findings);
            findings.extend(c.findings);
        }
    }

    // 4. Generations.
    counts.hosts = gens.len() as u64;
    let total: u64 = gens.iter().map(|(_, g)| g.len() as u64).sum();
    progress.start("generations", total);
    let mut seen: HashSet<Id> = HashSet::new();
    let mut checker = Checker {
        st: &st,
        findings,
        by_blob: HashMap::new(),
        tainted: HashMap::new(),
        host: String::new(),
        generation: String::new(),
        referenced: 0,
    };
    // Blobs already found damaged in their packs: attributed to the paths that reference them.
    for (i, f) in checker.findings.iter().enumerate() {
        if f.kind == FindingKind::CorruptBlob {
            if let Some(id) = f.blob.as_deref().and_then(Id::from_hex) {
                checker.by_blob.entry(id).or_insert(i);
            }
        }
    }
    for (host, names) in &gens {
        for name in names {
            progress.tick();
            counts.generations += 1;
            let key = Manifest::key(host, name);
            let m = match repo.store().get(&key).await {
                Ok(b) => Manifest::parse(&key, &b),
                Err(e) => Err(e.into()),
            };
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    let kind = if e.kind() == ErrorKind::Unavailable {
                        FindingKind::Unreadable
                    } else {
                        FindingKind::Manifest
                    };
                    let mut f = Finding::problem(kind, format!("manifest: {e}")).object(&key);
                    f.host = Some(host.clone());
                    f.generation = Some(name.clone());
                    checker.findings.push(f);
                    continue;
                }
            };
            checker.host = host.clone();
            checker.generation = name.clone();
            let stats = walk::walk_generation(&st, &m, &mut seen, &mut checker).await;
            counts.trees_read += stats.fetched;
        }
    }
    counts.blobs_referenced = checker.referenced;
    drop(checker);

    let problems = report
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Problem)
        .count() as u64;
    report.counts.problems = problems;
    report.counts.warnings = report.findings.len() as u64 - problems;
    report.counts.damaged_generations = report.damaged().len() as u64;
    Ok(report)
}

#[cfg(test)]
mod tests;
