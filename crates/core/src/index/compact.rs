//! Index compaction: merging deltas into runs and runs into a sharded base, without locks and
//! without conditional writes (docs/format.md §6.4, docs/concurrency.md).
//!
//! A compaction lists the index, takes the current root, decides what to merge with the pure
//! [`plan`] (unit-tested; `--dry-run` prints it), writes the merged tables and their filters,
//! and publishes a new root with `seq + 1` — the only step that changes what readers see, and
//! it adds an object instead of changing one. Everything it writes before the root is
//! unreferenced until the root exists, so a compaction killed at any point leaves the previous
//! root, with everything it references, intact.
//!
//! Deleting what a root superseded is where readers could be hurt, so it follows one rule. The
//! **protected roots** are every root younger than the **settle time** (default one hour) and the
//! newest root older than it. Only objects older than the settle time are deleted, and only
//! these: roots that are not protected, deltas that every protected root covers, and tables and
//! filters that no protected root uses. A compaction refuses to publish a root more than a
//! quarter of the settle time after its listing, so every compaction that can still publish
//! listed after the newest settled root existed and builds on it or on a younger root: all of
//! them protected, their tables kept, the deltas they do not cover kept. Readers that took their
//! view from an older root and find an object gone take a new view (see
//! [`IndexSet`](super::IndexSet)). Because the rule looks at the newest *settled* root, not at the
//! current one, deletion keeps pace even when roots are published more often than the settle
//! time (a busy repository compacting every few minutes).
//!
//! Two compactions at once are harmless: both publish roots built from the same current root,
//! readers take the greater, and the deltas only the other one merged stay uncovered (and are
//! read as deltas) until the next compaction.
//!
//! What is merged when ([`Policy`]): an ingest compacts *when due* (`deltas_due` uncovered
//! deltas or `delta_entries_due` entries in them): a whole rewrite into a new base while the
//! index is small (`full_limit` entries), otherwise the deltas and the smaller runs into one run
//! (size-tiered: a run absorbs runs up to twice its size, within `merge_limit` entries), so an
//! ingest's extra work is bounded. `backtree maintain index` rewrites everything into a new
//! sharded base, streaming one shard at a time (memory: a few shards plus the new filters,
//! about 1.1 B per entry).

use super::cache::LocalCache;
use super::filter::{key_of, FilterBundle, IdFilter};
use super::root::{
    self, name_of, Base, Root, TableRef, DELTAS_PREFIX, FILTERS_PREFIX, ROOTS_PREFIX, TABLES_PREFIX,
};
use super::table::{self, id_bits, Head, Table, TableEntry, TableKind, ENTRY_LEN};
use crate::error::{Error, Result};
use backtree_store::{DynStore, ObjectInfo};
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// When and how much to compact.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Uncovered deltas that make a compaction due.
    pub deltas_due: usize,
    /// Entries in uncovered deltas that make a compaction due.
    pub delta_entries_due: u64,
    /// An ingest rewrites the whole index while it has at most this many entries.
    pub full_limit: u64,
    /// Entries an ingest merges into one run at most.
    pub merge_limit: u64,
    /// Entries per shard of a base.
    pub shard_target: u64,
    /// How long a root must have been current before what it superseded is deleted.
    pub settle: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            // 32 deltas of a few hundred KB each keep a fresh view to a few MB to download.
            deltas_due: 32,
            delta_entries_due: 128 << 10,
            // 256 Ki entries: a 21 MB rewrite, under a second, about 25 MB of memory in the
            // ingest that does it; beyond it runs take over.
            full_limit: 256 << 10,
            // A run merge holds its entries in memory: 256 Ki entries are about 23 MB.
            merge_limit: 256 << 10,
            // 128 Ki entries: 10.5 MB shards, 1 024 of them at 10⁸ chunks.
            shard_target: 128 << 10,
            settle: Duration::from_secs(3600),
        }
    }
}

impl Policy {
    /// The default policy, with `BACKTREE_INDEX_SETTLE` (seconds) and `BACKTREE_INDEX_DUE`
    /// (deltas) overrides for tests.
    pub fn from_env() -> Policy {
        let mut p = Policy::default();
        if let Some(s) = std::env::var("BACKTREE_INDEX_SETTLE")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
        {
            p.settle = Duration::from_secs_f64(s.max(0.0));
        }
        if let Some(n) = std::env::var("BACKTREE_INDEX_DUE")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            p.deltas_due = n;
        }
        p
    }

    /// A compaction that took longer than this does not publish its root: a quarter of the
    /// settle time, and at least one second (so a settle time under four seconds, which only
    /// tests use, does not give the guarantee of the module docs).
    pub fn max_duration(&self) -> Duration {
        (self.settle / 4).max(Duration::from_secs(1))
    }
}

/// What to compact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// What an ingest does: only when due, bounded work.
    Auto,
    /// Everything into a new base (`backtree maintain index`).
    Full,
}

/// The index objects in the store.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub roots: Vec<ObjectInfo>,
    pub deltas: Vec<ObjectInfo>,
    pub tables: Vec<ObjectInfo>,
    pub filters: Vec<ObjectInfo>,
}

impl Listing {
    pub async fn take(store: &DynStore) -> Result<Listing> {
        let (roots, deltas, tables, filters) = futures_util::future::try_join4(
            store.list(ROOTS_PREFIX),
            store.list(DELTAS_PREFIX),
            store.list(TABLES_PREFIX),
            store.list(FILTERS_PREFIX),
        )
        .await?;
        Ok(Listing {
            roots,
            deltas,
            tables,
            filters,
        })
    }

    fn all(&self) -> impl Iterator<Item = &ObjectInfo> {
        self.roots
            .iter()
            .chain(&self.deltas)
            .chain(&self.tables)
            .chain(&self.filters)
    }
}

/// The merge a plan makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Nothing,
    /// These deltas (keys) and runs (indices into the root's runs) into one new run.
    Run {
        deltas: Vec<String>,
        runs: Vec<usize>,
    },
    /// These deltas, every run and the base into a new base.
    Full {
        deltas: Vec<String>,
    },
}

/// A compaction plan: a merge and the deletions that are safe now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub step: Step,
    /// Keys to delete (superseded and settled).
    pub delete: Vec<String>,
    /// One line on why.
    pub why: String,
}

/// Estimated entries of a delta from its size (its head is a small fraction).
fn est_entries(size: u64) -> u64 {
    size / ENTRY_LEN as u64
}

fn aged(o: &ObjectInfo, now: SystemTime, settle: Duration) -> bool {
    o.modified
        .and_then(|m| now.duration_since(m).ok())
        .is_some_and(|age| age >= settle)
}

/// Decides what to merge and what to delete (pure: no I/O).
/// `protected` holds the bodies of [`protected_roots`] (deletions need them; the merge needs
/// only the current root).
pub fn plan(
    listing: &Listing,
    root: &Root,
    protected: &[(String, Root)],
    now: SystemTime,
    policy: &Policy,
    mode: Mode,
) -> Plan {
    let covered: HashSet<&str> = root.covers.iter().map(String::as_str).collect();
    let uncovered: Vec<&ObjectInfo> = listing
        .deltas
        .iter()
        .filter(|o| {
            name_of(&o.key).is_some() && !covered.contains(o.key.trim_start_matches(DELTAS_PREFIX))
        })
        .collect();
    let est: u64 = uncovered.iter().map(|o| est_entries(o.size)).sum();
    let keys = || uncovered.iter().map(|o| o.key.clone()).collect::<Vec<_>>();
    let (step, why) = match mode {
        Mode::Full if uncovered.is_empty() && root.runs.is_empty() => {
            (Step::Nothing, "the index is one base already".to_owned())
        }
        Mode::Full => (
            Step::Full { deltas: keys() },
            format!(
                "rewrite {} deltas, {} runs and the base ({} entries) into a new base",
                uncovered.len(),
                root.runs.len(),
                root.entries() + est
            ),
        ),
        Mode::Auto if uncovered.len() < policy.deltas_due && est < policy.delta_entries_due => (
            Step::Nothing,
            format!(
                "not due: {} uncovered deltas, ~{est} entries",
                uncovered.len()
            ),
        ),
        Mode::Auto if root.entries() + est <= policy.full_limit => (
            Step::Full { deltas: keys() },
            format!(
                "due: {} deltas; the index is small ({} entries): rewrite it into a new base",
                uncovered.len(),
                root.entries() + est
            ),
        ),
        Mode::Auto => {
            let mut acc = est;
            let mut by_size: Vec<(usize, u64)> = root
                .runs
                .iter()
                .enumerate()
                .map(|(i, r)| (i, r.entries))
                .collect();
            by_size.sort_by_key(|&(i, n)| (n, i));
            let mut runs = Vec::new();
            for (i, n) in by_size {
                if n <= 2 * acc.max(1) && acc + n <= policy.merge_limit {
                    acc += n;
                    runs.push(i);
                } else {
                    break;
                }
            }
            runs.sort_unstable();
            (
                Step::Run {
                    deltas: keys(),
                    runs: runs.clone(),
                },
                format!(
                    "due: {} deltas and {} runs into one run of ~{acc} entries",
                    uncovered.len(),
                    runs.len()
                ),
            )
        }
    };
    Plan {
        step,
        delete: deletions(listing, protected, now, policy.settle),
        why,
    }
}

/// The roots a reader or a compaction may still use (see the module docs): every root younger
/// than the settle time (or of unknown age), and the newest root older than it.
pub fn protected_roots(listing: &Listing, now: SystemTime, settle: Duration) -> Vec<String> {
    let settled = root::current(
        listing
            .roots
            .iter()
            .filter(|o| aged(o, now, settle))
            .map(|o| o.key.as_str()),
    );
    listing
        .roots
        .iter()
        .filter(|o| !aged(o, now, settle) || Some(o.key.as_str()) == settled)
        .filter(|o| root::parse_key(&o.key).is_some())
        .map(|o| o.key.clone())
        .collect()
}

/// What no protected root uses any more, and is older than the settle time.
fn deletions(
    listing: &Listing,
    protected: &[(String, Root)],
    now: SystemTime,
    settle: Duration,
) -> Vec<String> {
    if protected.is_empty() {
        return vec![];
    }
    let keep: HashSet<&str> = protected.iter().map(|(k, _)| k.as_str()).collect();
    let tables: HashSet<String> = protected
        .iter()
        .flat_map(|(_, r)| r.tables().map(TableRef::key))
        .collect();
    let filters: HashSet<String> = protected
        .iter()
        .flat_map(|(_, r)| r.filters().map(|f| format!("{FILTERS_PREFIX}{f}")))
        .collect();
    let covers: Vec<HashSet<&str>> = protected
        .iter()
        .map(|(_, r)| r.covers.iter().map(String::as_str).collect())
        .collect();
    let mut out = Vec::new();
    for o in &listing.roots {
        if !keep.contains(o.key.as_str()) && aged(o, now, settle) {
            out.push(o.key.clone());
        }
    }
    for o in &listing.deltas {
        let name = o.key.trim_start_matches(DELTAS_PREFIX);
        if aged(o, now, settle) && covers.iter().all(|c| c.contains(name)) {
            out.push(o.key.clone());
        }
    }
    for o in &listing.tables {
        if !tables.contains(&o.key) && aged(o, now, settle) {
            out.push(o.key.clone());
        }
    }
    for o in &listing.filters {
        if !filters.contains(&o.key) && aged(o, now, settle) {
            out.push(o.key.clone());
        }
    }
    out
}

/// What a compaction did.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub plan: Option<Plan>,
    /// Key of the root it published.
    pub root: Option<String>,
    pub merged_deltas: usize,
    pub merged_runs: usize,
    /// Entries in the tables written.
    pub entries: u64,
    pub tables_written: usize,
    pub bytes_written: u64,
    pub deleted: usize,
    /// Runs in the current root afterwards.
    pub runs_after: usize,
}

async fn read_table(store: &DynStore, key: &str) -> Result<Table> {
    let b = store.get(key).await?;
    Table::parse(key, &b, name_of(key).as_ref())
}

/// Deltas read at once (on S3 each GET is a round trip).
const READS_IN_FLIGHT: usize = 16;

/// What a prune's index rewrite removes (docs/concurrency.md, "Garbage collection").
#[derive(Debug, Clone, Default)]
pub struct Rewrite {
    /// Packs being deleted: every entry naming one is left out.
    pub drop_packs: HashSet<crate::id::Id>,
}

impl Rewrite {
    fn keeps(&self, e: &TableEntry) -> bool {
        e.is_live() && !self.drop_packs.contains(&e.pack)
    }
}

/// The entries of several deltas, read [`READS_IN_FLIGHT`] at a time, and the keys of those
/// merged. Deltas holding tombstones are a prune's: an ordinary compaction leaves them
/// uncovered (every view must keep seeing them) and only a prune's `rewrite` merges them,
/// dropping the tombstones and the entries of the packs it deletes.
async fn read_entries(
    store: &DynStore,
    keys: &[&String],
    rewrite: Option<&Rewrite>,
) -> Result<(Vec<TableEntry>, Vec<String>)> {
    let tables: Vec<Result<(String, Table)>> = futures_util::stream::iter(
        keys.iter()
            .map(|k| async move { Ok(((*k).clone(), read_table(store, k).await?)) }),
    )
    .buffer_unordered(READS_IN_FLIGHT)
    .collect()
    .await;
    let mut es = Vec::new();
    let mut merged = Vec::new();
    for t in tables {
        let (k, t) = t?;
        match rewrite {
            None if t.entries.iter().any(|e| !e.is_live()) => continue,
            None => es.extend(t.entries),
            Some(r) => es.extend(t.entries.into_iter().filter(|e| r.keeps(e))),
        }
        merged.push(k);
    }
    Ok((es, merged))
}

async fn read_head(store: &DynStore, t: &TableRef) -> Result<Head> {
    let key = t.key();
    let b = store
        .get_range(&key, 0..Head::len_for(t.fanout_bits) as u64)
        .await?;
    Head::parse(&key, &b, t.id().as_ref())
}

/// Buckets of a table holding ids with the `k`-bit prefix `i`.
fn bucket_span(h: &Head, k: u8, i: u32) -> Option<(usize, usize)> {
    let p = h.prefix_bits;
    let nb = h.bucket_count();
    if p >= k {
        return ((h.prefix >> (p - k)) == i).then_some((0, nb));
    }
    let d = k - p;
    if (i >> d) != h.prefix {
        return None;
    }
    let sub = i & ((1u32 << d) - 1);
    let f = h.fanout_bits;
    if f >= d {
        let lo = (sub as usize) << (f - d);
        Some((lo, lo + (1usize << (f - d))))
    } else {
        let b = (sub >> (d - f)) as usize;
        Some((b, b + 1))
    }
}

struct Writer<'a> {
    store: &'a DynStore,
    tables: usize,
    bytes: u64,
}

impl Writer<'_> {
    async fn table(
        &mut self,
        kind: TableKind,
        p: u8,
        prefix: u32,
        es: Vec<TableEntry>,
    ) -> Result<(TableRef, IdFilter)> {
        let live: Vec<u64> = es
            .iter()
            .filter(|e| e.is_live())
            .map(|e| key_of(&e.id))
            .collect();
        let (name, bytes) = table::encode(kind, p, prefix, es);
        let key = format!("{TABLES_PREFIX}{}", name.to_hex());
        let (_, _, f, _, entries) = Head::fixed(&key, &bytes)?;
        self.bytes += bytes.len() as u64;
        self.tables += 1;
        self.store.put(&key, Bytes::from(bytes)).await?;
        Ok((
            TableRef {
                table: name.to_hex(),
                fanout_bits: f,
                entries: entries as u64,
                filter: None,
            },
            IdFilter::build(p, prefix, live),
        ))
    }

    async fn filter(&mut self, filters: Vec<IdFilter>) -> Result<String> {
        let (name, bytes) = FilterBundle::new(filters).encode();
        self.bytes += bytes.len() as u64;
        self.store
            .put(
                &format!("{FILTERS_PREFIX}{}", name.to_hex()),
                Bytes::from(bytes),
            )
            .await?;
        Ok(name.to_hex())
    }
}

/// Shards to write at once in a full rewrite.
const SHARDS_IN_FLIGHT: usize = 4;

/// Lists, plans and (unless `dry_run`) executes one compaction, then deletes what is settled.
/// With `rewrite` (a prune), everything is rewritten into a new base without what it drops.
pub async fn run(
    store: &DynStore,
    policy: &Policy,
    mode: Mode,
    dry_run: bool,
    cache: Option<&LocalCache>,
    rewrite: Option<&Rewrite>,
) -> Result<Outcome> {
    let started = Instant::now();
    let listing = Listing::take(store).await?;
    let root_key = root::current(listing.roots.iter().map(|o| o.key.as_str())).map(str::to_owned);
    let old = match &root_key {
        Some(k) => {
            let b = store.get(k).await?;
            Root::parse(k, &b)?
        }
        None => Root::empty(),
    };
    let now = SystemTime::now();
    let mut protected = Vec::new();
    for k in protected_roots(&listing, now, policy.settle) {
        if Some(&k) == root_key.as_ref() {
            protected.push((k, old.clone()));
            continue;
        }
        match store.get(&k).await {
            Ok(b) => protected.push((k.clone(), Root::parse(&k, &b)?)),
            // Deleted meanwhile by another compaction: it was not needed.
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut p = plan(&listing, &old, &protected, now, policy, mode);
    if rewrite.is_some() && p.step == Step::Nothing {
        p.step = Step::Full { deltas: vec![] };
        p.why = "rewrite the base without what the prune deletes".into();
    }
    let mut out = Outcome {
        plan: Some(p.clone()),
        runs_after: old.runs.len(),
        ..Outcome::default()
    };
    if dry_run {
        return Ok(out);
    }
    let mut w = Writer {
        store,
        tables: 0,
        bytes: 0,
    };
    let listed: HashSet<&str> = listing
        .deltas
        .iter()
        .map(|o| o.key.trim_start_matches(DELTAS_PREFIX))
        .collect();
    let new_root = match &p.step {
        Step::Nothing => None,
        Step::Run { deltas, runs } => {
            let (mut es, deltas) =
                read_entries(store, &deltas.iter().collect::<Vec<_>>(), rewrite).await?;
            for &i in runs {
                let t = read_table(store, &old.runs[i].key()).await?;
                es.extend(
                    t.entries
                        .into_iter()
                        .filter(|e| rewrite.is_none_or(|r| r.keeps(e))),
                );
            }
            out.entries = es.len() as u64;
            let (mut tref, f) = w.table(TableKind::Run, 0, 0, es).await?;
            tref.filter = Some(w.filter(vec![f]).await?);
            let mut r = old.clone();
            r.runs = std::iter::once(tref)
                .chain(
                    old.runs
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| !runs.contains(i))
                        .map(|(_, t)| t.clone()),
                )
                .collect();
            out.merged_deltas = deltas.len();
            out.merged_runs = runs.len();
            Some(covering(r, &old, &deltas, &listed))
        }
        Step::Full { deltas } => {
            // Deltas are read whole. More than `merge_limit` entries of them (a repository that
            // was not compacted for long) are first written as intermediate runs of at most that
            // size, read back shard by shard like every table: memory stays bounded. The
            // intermediate runs are used by no root and go with the next settled deletion.
            let sizes: std::collections::HashMap<&str, u64> = listing
                .deltas
                .iter()
                .map(|o| (o.key.as_str(), est_entries(o.size)))
                .collect();
            // A delta too large to hold (one ingest of millions of chunks) is read like a
            // table instead, by bucket spans per shard, after a piecewise check that it holds no
            // tombstone (an ordinary compaction leaves a prune's deltas alone).
            let mut large: Vec<(String, Head)> = Vec::new();
            let mut skip: HashSet<&str> = HashSet::new();
            let mut merged = Vec::new();
            for d in deltas {
                let n = sizes.get(d.as_str()).copied().unwrap_or(0);
                if n <= policy.merge_limit / 2 {
                    continue;
                }
                if rewrite.is_none() {
                    let mut pieces = table::Pieces::new(d);
                    let mut tombstones = false;
                    while let Some(es) = pieces.next(store).await? {
                        tombstones |= es.iter().any(|e| !e.is_live());
                    }
                    if tombstones {
                        // Left out, uncovered: merged by the next prune.
                        skip.insert(d.as_str());
                        continue;
                    }
                }
                let b = store.get_range(d, 0..table::FIXED_LEN as u64).await?;
                let (_, _, f, _, _) = Head::fixed(d, &b)?;
                let b = store.get_range(d, 0..Head::len_for(f) as u64).await?;
                large.push((d.clone(), Head::parse(d, &b, name_of(d).as_ref())?));
                merged.push(d.clone());
            }
            let is_large: HashSet<&str> = large.iter().map(|(k, _)| k.as_str()).collect();
            let mut groups: Vec<Vec<&String>> = vec![vec![]];
            let mut acc = 0;
            for d in deltas
                .iter()
                .filter(|d| !is_large.contains(d.as_str()) && !skip.contains(d.as_str()))
            {
                let n = sizes.get(d.as_str()).copied().unwrap_or(0);
                if acc + n > policy.merge_limit && !groups.last().is_some_and(|g| g.is_empty()) {
                    groups.push(vec![]);
                    acc = 0;
                }
                acc += n;
                if let Some(g) = groups.last_mut() {
                    g.push(d);
                }
            }
            let mut delta_entries = Vec::new();
            let mut staged: Vec<TableRef> = Vec::new();
            for g in &groups {
                let (es, m) = read_entries(store, g, rewrite).await?;
                merged.extend(m);
                if groups.len() == 1 {
                    delta_entries = es;
                } else if !es.is_empty() {
                    staged.push(w.table(TableKind::Run, 0, 0, es).await?.0);
                }
            }
            delta_entries.sort_by_key(|e| e.id);
            let total = old.entries()
                + delta_entries.len() as u64
                + staged.iter().map(|t| t.entries).sum::<u64>()
                + large.iter().map(|(_, h)| h.entry_count as u64).sum::<u64>();
            let mut k = 0u8;
            while (total >> k) > policy.shard_target && k < table::MAX_PREFIX_BITS {
                k += 1;
            }
            let tables: Vec<TableRef> = old.tables().cloned().chain(staged).collect();
            let mut inputs: Vec<(String, Head)> = Vec::with_capacity(tables.len() + large.len());
            for t in &tables {
                inputs.push((t.key(), read_head(store, t).await?));
            }
            inputs.extend(large);
            let inputs = Arc::new(inputs);
            let delta_entries = Arc::new(delta_entries);
            // Shards are written as they come: at most SHARDS_IN_FLIGHT of them are held.
            let mut shards = std::pin::pin!(futures_util::stream::iter((0..1u32 << k).map(|i| {
                let inputs = inputs.clone();
                let de = delta_entries.clone();
                async move {
                    let mut es: Vec<TableEntry> = de
                        .iter()
                        .filter(|e| id_bits(&e.id, 0, k) == i)
                        .copied()
                        .collect();
                    for (key, h) in inputs.iter() {
                        let Some((lo, hi)) = bucket_span(h, k, i) else {
                            continue;
                        };
                        let range = h.buckets_range(lo, hi);
                        if range.is_empty() {
                            continue;
                        }
                        let b = store.get_range(key, range).await?;
                        es.extend(h.decode_buckets(key, lo, hi, &b)?.into_iter().filter(|e| {
                            id_bits(&e.id, 0, k) == i && rewrite.is_none_or(|r| r.keeps(e))
                        }));
                    }
                    Ok::<_, Error>((i, es))
                }
            }))
            .buffered(SHARDS_IN_FLIGHT));
            let mut refs = Vec::with_capacity(1usize << k);
            let mut filters = Vec::with_capacity(1usize << k);
            let mut entries = 0;
            while let Some(s) = shards.next().await {
                let (i, es): (u32, Vec<TableEntry>) = s?;
                let (t, f) = w.table(TableKind::Shard, k, i, es).await?;
                entries += t.entries;
                refs.push(t);
                filters.push(f);
            }
            out.entries = entries;
            let filter = w.filter(filters).await?;
            let mut r = old.clone();
            r.base = Some(Base {
                shard_bits: k,
                shards: refs,
                filter,
                entries,
            });
            r.runs.clear();
            out.merged_deltas = merged.len();
            out.merged_runs = old.runs.len();
            Some(covering(r, &old, &merged, &listed))
        }
    };
    out.tables_written = w.tables;
    out.bytes_written = w.bytes;
    if let Some(mut r) = new_root {
        if started.elapsed() > policy.max_duration() {
            return Err(Error::CompactionTooLong {
                took: started.elapsed(),
                limit: policy.max_duration(),
            });
        }
        r.seq = old.seq + 1;
        r.created = chrono::Utc::now().to_rfc3339();
        out.runs_after = r.runs.len();
        let (key, body) = r.encode();
        out.bytes_written += body.len() as u64;
        store.put(&key, Bytes::from(body)).await?;
        out.root = Some(key);
    }
    // Deletions: roots first (so no reader takes a view of what goes next), then deltas, then
    // tables and filters. Failures are logged; the next compaction tries again.
    for k in &p.delete {
        match store.delete(k).await {
            Ok(()) => out.deleted += 1,
            Err(e) if e.is_not_found() => {}
            Err(e) => tracing::warn!("index compaction: cannot delete {k}: {e}"),
        }
    }
    if let Some(c) = cache {
        let gone: HashSet<&str> = p.delete.iter().map(String::as_str).collect();
        let present: HashSet<&str> = listing
            .all()
            .map(|o| o.key.as_str())
            .filter(|k| !gone.contains(k))
            .collect();
        for dir in [
            "index/roots",
            "index/deltas",
            "index/tables",
            "index/filters",
        ] {
            c.retain(dir, |k| present.contains(k));
        }
    }
    Ok(out)
}

/// `r` with `covers` = what `old` covered plus `merged`, limited to deltas still listed.
fn covering(mut r: Root, old: &Root, merged: &[String], listed: &HashSet<&str>) -> Root {
    let mut covers: Vec<String> = old
        .covers
        .iter()
        .map(String::as_str)
        .chain(merged.iter().map(|d| d.trim_start_matches(DELTAS_PREFIX)))
        .filter(|d| listed.contains(d))
        .map(str::to_owned)
        .collect();
    covers.sort();
    covers.dedup();
    r.covers = covers;
    r
}

#[cfg(test)]
mod tests;
