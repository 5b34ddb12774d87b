//! Garbage collection (`backtree prune`): deletes packs that no generation references and
//! repacks packs that are mostly unreferenced, while ingests and mounts go on
//! (docs/concurrency.md, "Garbage collection", has the argument and the locking table).
//!
//! A prune runs in phases; only the last two delete anything:
//!
//! 1. **Lease.** It takes the *maintenance lease*: a renewed [`Lease`] object
//!    `locks/maintenance.claim-<session>`, stored before it lists the other claims; if another
//!    claim that has not expired is listed, it withdraws ([`Error::MaintenanceBusy`]). That is
//!    the claim protocol of [`crate::claim`], with expiry, so it needs no conditional write and a
//!    killed prune's claim simply expires. Its own lease is checked before every step that
//!    writes or deletes ([`Error::MaintenanceLapsed`]).
//! 2. **Mark.** Every generation is walked ([`crate::walk`]) into [`Marks`] (8 B per blob). A
//!    generation that cannot be walked whole (a missing or damaged tree or chunk list) stops
//!    the prune before anything is written: what lies below is unknown, so nothing may go.
//! 3. **Sweep and plan.** Every table of the index is read once (one at a time, so memory is
//!    the marks plus one table) to sum each pack's referenced and unreferenced bytes; with the
//!    store's listing of `packs/` (sizes and LastModified) the pure [`plan`] decides.
//!    `--dry-run` stops here.
//! 4. **Repack.** The referenced blobs of packs to repack are copied (verified) into new packs,
//!    indexed by a new delta, before anything is marked for deletion.
//! 5. **Tombstones.** For every index entry of a pack to delete, a tombstone (the entry with
//!    its `deleted` time) goes into deltas of their own. From then on every view of the index
//!    sees them (ordinary compactions never merge such deltas), so an ingest that starts now
//!    stores those blobs again instead of referencing the doomed copies.
//! 6. **Wait.** The leases (`leases/`) listed *after* the tombstones were stored are those of
//!    ingests that may have looked at the index before; the prune waits until each has ended
//!    or expired (an ingest whose lease lapsed never commits).
//! 7. **Re-check.** Generations committed meanwhile are walked (only what is new to the marks),
//!    and index entries written meanwhile are read (new deltas, and the tables compactions made
//!    of them, which are then new too): a pack one of them needs is kept.
//! 8. **Delete.** A fresh listing of `packs/` drops every pack that became young (re-uploaded
//!    with identical bytes), and every unindexed pack stored after a writer that is still
//!    running started (it may be that writer's, not yet indexed); the index is rewritten without the entries of the packs to delete
//!    and without tombstones ([`compact::Rewrite`]); then the packs are deleted. Expired leases
//!    and name claims older than the grace period are tidied.
//!
//! A prune killed at any point leaves a valid repository: before phase 8 it only added packs,
//! deltas and tombstones (blobs shadowed by a tombstone are merely stored again by ingests until
//! the next prune's rewrite revives or drops them); in phase 8 the index no longer names what
//! is deleted.

pub mod marks;
pub mod plan;

use crate::blob;
use crate::claim::{claims_prefix, session_id};
use crate::error::{Error, Result};
use crate::id::{parse_pack_key, BlobKind, Id};
use crate::index::compact::{self, Mode, Policy, Rewrite};
use crate::index::table::{Pieces, TableEntry, TableKind};
use crate::index::IndexBuilder;
use crate::lease::{Lease, LeaseBody, LEASES_PREFIX};
use crate::manifest::{Manifest, SNAPSHOTS_PREFIX};
use crate::pack::{self, PackBuilder};
use crate::repo::Repository;
use crate::walk::{self, Problem, Reference, Visitor};
use backtree_store::{DynStore, ObjectInfo};
use bytes::Bytes;
use futures_util::StreamExt;
pub use marks::Marks;
pub use plan::{plan, Action, Decision, Options, PackUse, Plan};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};
use tokio::runtime::Handle;

/// The key the maintenance lease's claims are made on.
pub const MAINTENANCE_KEY: &str = "locks/maintenance";

/// Default grace period: no pack younger than this is deleted. Longer than any lease (15 min)
/// plus the longest time an ingest may hold a pack before indexing it (a checkpoint every
/// 256 MiB of new packs), with a wide margin for clock skew.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Default repack threshold: a pack at least half unreferenced is rewritten.
pub const DEFAULT_REPACK_THRESHOLD: f64 = 0.5;

/// Tombstones per delta (about 5.5 MB).
const TOMBSTONES_PER_DELTA: usize = 64 << 10;

/// Store reads and deletions in flight.
const IN_FLIGHT: usize = 16;

/// Settings of a prune.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    pub plan: Options,
    pub dry_run: bool,
    /// How long the maintenance lease lasts without renewal.
    pub lease_time: Duration,
    /// Added to a writer lease's expiry before it counts as expired (clock skew between hosts).
    pub lease_margin: Duration,
    /// How often leases are looked at while waiting.
    pub poll: Duration,
    /// The index compaction policy of the final rewrite (its settle time).
    pub policy: Policy,
    /// Host name recorded in the maintenance lease.
    pub host: String,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            plan: Options {
                grace: DEFAULT_GRACE,
                repack_threshold: DEFAULT_REPACK_THRESHOLD,
            },
            dry_run: false,
            lease_time: crate::lease::LEASE_TIME,
            lease_margin: Duration::from_secs(60),
            poll: Duration::from_secs(5),
            policy: Policy::default(),
            host: String::new(),
        }
    }
}

/// What a prune found and did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub dry_run: bool,
    pub generations: usize,
    /// Distinct blobs referenced.
    pub referenced: usize,
    /// Live index entries swept.
    pub index_entries: u64,
    pub plan: Plan,
    /// Packs written by the repack and blobs copied.
    pub new_packs: usize,
    pub copied_blobs: u64,
    pub tombstones: u64,
    /// Leases waited for, and how long.
    pub waited_for: Vec<String>,
    pub waited_secs: f64,
    /// Generations committed while the prune ran, walked in the re-check.
    pub new_generations: usize,
    /// Packs kept after all because the re-check found them needed (or they became young).
    pub rescued: Vec<String>,
    pub deleted_packs: usize,
    pub deleted_bytes: u64,
    /// Packs whose deletion failed (key, error); the next prune tries again.
    pub failed: Vec<(String, String)>,
    pub tidied: usize,
    /// Bytes read from the store (manifests, trees, index, repacked packs).
    pub bytes_read: u64,
    /// Peak bytes held by the marks and the pack table.
    pub memory: usize,
    pub secs: f64,
}

/// Per-pack sums of the sweep.
#[derive(Debug, Clone, Copy, Default)]
struct Acc {
    entries: u64,
    blob_bytes: u64,
    used: u64,
    used_bytes: u64,
    kind: Option<BlobKind>,
}

/// Walks generations into the marks; collects problems and the blobs first referenced (for
/// the re-check).
struct Marker<'a, 'f> {
    generation: String,
    problems: &'a mut Vec<String>,
    fresh: Option<&'a mut (dyn FnMut(&Id) + 'f)>,
}

impl Visitor for Marker<'_, '_> {
    fn reference(&mut self, r: &Reference<'_>) {
        if r.first {
            if let Some(f) = self.fresh.as_mut() {
                f(r.id);
            }
        }
    }

    fn problem(&mut self, p: Problem) {
        if self.problems.len() < 20 {
            self.problems.push(format!(
                "{}: {} ({} {}): {}",
                self.generation, p.path, p.kind, p.id, p.error
            ));
        } else if self.problems.len() == 20 {
            self.problems.push("…".into());
        }
    }
}

impl walk::Seen for Marks {
    fn first_visit(&mut self, id: &Id) -> bool {
        Marks::first_visit(self, id)
    }
}

/// Holds the maintenance lease.
struct Maintenance {
    lease: Lease,
    session: String,
}

impl Maintenance {
    fn check(&self) -> Result<()> {
        self.lease.check().map_err(|e| match e {
            Error::LeaseLapsed { key, late, .. } => Error::MaintenanceLapsed {
                session: self.session.clone(),
                key,
                late,
            },
            e => e,
        })
    }
}

/// When a lease object stops counting: its stated expiry, or (unreadable) its LastModified plus
/// the default lease time, plus `margin`.
fn lease_end(body: Option<&LeaseBody>, o: &ObjectInfo, margin: Duration) -> Option<SystemTime> {
    let stated = body
        .and_then(|b| chrono::DateTime::parse_from_rfc3339(&b.expires).ok())
        .map(|t| SystemTime::from(t.with_timezone(&chrono::Utc)));
    let end = stated.or_else(|| o.modified.map(|m| m + crate::lease::LEASE_TIME))?;
    Some(end + margin)
}

async fn read_lease(store: &DynStore, key: &str) -> Result<Option<LeaseBody>> {
    match store.get(key).await {
        Ok(b) => Ok(serde_json::from_slice(&b).ok()),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Takes the maintenance lease (see the module docs).
async fn take_maintenance(store: &DynStore, opts: &PruneOptions) -> Result<Maintenance> {
    let session = session_id();
    let key = format!("{}{session}", claims_prefix(MAINTENANCE_KEY));
    let lease = Lease::take_at(
        store.clone(),
        key.clone(),
        &session,
        &opts.host,
        opts.lease_time,
        &Handle::current(),
    )
    .await?;
    let now = SystemTime::now();
    for o in store.list(&claims_prefix(MAINTENANCE_KEY)).await? {
        if o.key == key {
            continue;
        }
        let body = read_lease(store, &o.key).await?;
        let live = lease_end(body.as_ref(), &o, opts.lease_margin).is_none_or(|end| end > now);
        if live {
            lease.release().await;
            let b = body.unwrap_or(LeaseBody {
                session: String::new(),
                host: "?".into(),
                started: "?".into(),
                expires: "?".into(),
                tool: String::new(),
            });
            return Err(Error::MaintenanceBusy {
                key: o.key,
                host: b.host,
                started: b.started,
                expires: b.expires,
            });
        }
        // A killed prune's claim: expired, so it no longer counts; tidy it.
        let _ = store.delete(&o.key).await;
    }
    Ok(Maintenance { lease, session })
}

/// The tables of the index now: the uncovered deltas and the current root's tables (without
/// loading the deltas, as a view would).
async fn current_tables(store: &DynStore) -> Result<Vec<String>> {
    use crate::index::root::{self, Root, DELTAS_PREFIX, ROOTS_PREFIX};
    let (roots, deltas) =
        futures_util::future::try_join(store.list(ROOTS_PREFIX), store.list(DELTAS_PREFIX)).await?;
    let r = match root::current(roots.iter().map(|o| o.key.as_str())) {
        Some(k) => Root::parse(k, &store.get(k).await?)?,
        None => Root::empty(),
    };
    let covered: HashSet<&str> = r.covers.iter().map(String::as_str).collect();
    let mut keys: Vec<String> = deltas
        .into_iter()
        .map(|o| o.key)
        .filter(|k| !covered.contains(k.trim_start_matches(DELTAS_PREFIX)))
        .collect();
    keys.extend(r.tables().map(|t| t.key()));
    Ok(keys)
}

/// Calls `f` on every entry of every table in `keys`, a piece at a time; returns bytes read.
async fn sweep(store: &DynStore, keys: &[String], mut f: impl FnMut(&TableEntry)) -> Result<u64> {
    let mut bytes = 0u64;
    for k in keys {
        let mut t = Pieces::new(k);
        while let Some(es) = t.next(store).await? {
            es.iter().for_each(&mut f);
        }
        bytes += t.bytes;
    }
    Ok(bytes)
}

/// 128 bits of a manifest key's hash: what the re-check remembers of each generation marked
/// (16 B each, not the key: 365 000 generations of 1 000 hosts). A collision would skip a new
/// generation in the re-check, so this is not cut to 64 bits.
fn key_hash(key: &str) -> u128 {
    u128::from_le_bytes(Id::of(key.as_bytes()).0[..16].try_into().unwrap_or([0; 16]))
}

/// Every generation's manifest key whose hash is not in `skip`, as (host, name, key).
async fn generation_keys(
    repo: &Repository,
    skip: &HashSet<u128>,
) -> Result<Vec<(String, String, String)>> {
    let mut keys = Vec::new();
    for (host, names) in repo.all_generations().await? {
        for n in names {
            let k = Manifest::key(&host, &n);
            if !skip.contains(&key_hash(&k)) {
                keys.push((host.clone(), n, k));
            }
        }
    }
    Ok(keys)
}

/// Walks the generations `keys` into `marks`, fetching manifests [`IN_FLIGHT`] ahead of the
/// walk (never all at once: 365 000 manifests would be hundreds of MB); `fresh` sees every blob
/// walked for the first time. Returns the keys walked and the manifests' bytes. Fails on any
/// problem (nothing may be deleted while what a generation references is unknown).
async fn mark(
    repo: &Repository,
    keys: Vec<(String, String, String)>,
    marks: &mut Marks,
    mut fresh: Option<&mut dyn FnMut(&Id)>,
) -> Result<(Vec<String>, u64)> {
    let mut problems = Vec::new();
    let mut walked = Vec::with_capacity(keys.len());
    let mut bytes = 0u64;
    let mut ms = futures_util::stream::iter(keys.into_iter().map(|(h, n, k)| async move {
        match repo.manifest(&h, &n).await {
            Ok(m) => Ok(Some((k, m))),
            // Forgotten since the listing.
            Err(e) if e.kind() == crate::error::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }))
    .buffered(IN_FLIGHT);
    while let Some(got) = ms.next().await {
        let (k, m) = match got {
            Ok(Some(x)) => x,
            Ok(None) => continue,
            // A manifest that cannot be parsed: what it references is unknown.
            Err(e) => {
                return Err(Error::PruneRefused {
                    reason: format!("{e}; run `backtree verify`"),
                })
            }
        };
        bytes += m.to_json().len() as u64;
        let mut v = Marker {
            generation: format!("{}/{}", m.host, m.name),
            problems: &mut problems,
            fresh: fresh.as_deref_mut(),
        };
        walk::walk_generation(repo, &m, marks, &mut v).await;
        walked.push(k);
    }
    if problems.is_empty() {
        Ok((walked, bytes))
    } else {
        Err(Error::PruneRefused {
            reason: format!(
                "generations reference data that cannot be read, run `backtree verify`:\n  {}",
                problems.join("\n  ")
            ),
        })
    }
}

/// Runs a prune (see the module docs). `progress` receives one line per phase.
pub async fn run(
    repo: &Repository,
    opts: &PruneOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Report> {
    let started = Instant::now();
    let store = repo.store().clone();
    if !repo.config().collectable() {
        return Err(Error::PruneRefused {
            reason: format!(
                "the repository was created before garbage collection existed (its config does \
                 not list the {:?} feature), and older backtree versions reading it would \
                 misread what a prune writes",
                crate::config::GC_FEATURE
            ),
        });
    }
    let mut report = Report {
        dry_run: opts.dry_run,
        ..Report::default()
    };
    let maint = if opts.dry_run {
        None
    } else {
        Some(take_maintenance(&store, opts).await?)
    };
    let check = |m: &Option<Maintenance>| m.as_ref().map_or(Ok(()), Maintenance::check);
    let res = run_held(repo, opts, progress, &maint, &check, &mut report).await;
    if let Some(m) = maint {
        m.lease.release().await;
    }
    res?;
    report.secs = started.elapsed().as_secs_f64();
    Ok(report)
}

async fn run_held(
    repo: &Repository,
    opts: &PruneOptions,
    progress: &(dyn Fn(&str) + Sync),
    maint: &Option<Maintenance>,
    check: &dyn Fn(&Option<Maintenance>) -> Result<()>,
    report: &mut Report,
) -> Result<()> {
    let store = repo.store().clone();
    let stats = repo.index().stats_handle();
    let fetched0 = stats
        .fetched_bytes
        .load(std::sync::atomic::Ordering::Relaxed);

    // Merge every waiting delta and run into one base first (nothing to do when the index is
    // one base already; streamed shard by shard, like `maintain index`), so that the view, which
    // holds its uncovered deltas in memory, is small whatever the ingests left behind.
    if !opts.dry_run {
        // Only an economy: a failure (a compaction past its limit) is no reason to stop.
        if let Err(e) = compact::run(
            &store,
            &opts.policy,
            Mode::Full,
            false,
            repo.index().cache().as_ref(),
            None,
        )
        .await
        {
            tracing::warn!("prune: compacting the index first: {e}");
        }
    }
    // 2. Mark. The deltas listed before the view: every one of them is swept (uncovered in the
    // view, or merged into its tables); any other delta at the re-check is new.
    let (deltas_before, tables_before) = futures_util::future::try_join(
        store.list(crate::index::root::DELTAS_PREFIX),
        store.list(crate::index::root::TABLES_PREFIX),
    )
    .await?;
    let before: HashSet<String> = deltas_before
        .into_iter()
        .chain(tables_before)
        .map(|o| o.key)
        .collect();
    let view = repo.index().fresh_view().await?;
    let tables_keys = view.table_keys();
    let capacity = view.root.entries() as usize + view.uncovered().1 + 1024;
    let mut marks = Marks::with_capacity(capacity);
    let keys = generation_keys(repo, &HashSet::new()).await?;
    progress(&format!("marking {} generations", keys.len()));
    let (walked, manifest_bytes) = mark(repo, keys, &mut marks, None).await?;
    report.generations = walked.len();
    let marked: HashSet<u128> = walked.iter().map(|k| key_hash(k)).collect();
    drop(walked);
    marks.finish();
    report.referenced = marks.len();

    // 3. Sweep and plan.
    progress(&format!(
        "sweeping {} index tables ({} blobs referenced)",
        tables_keys.len(),
        marks.len()
    ));
    let listing = store.list("packs/").await?;
    let listed: HashSet<Id> = listing
        .iter()
        .filter_map(|o| parse_pack_key(&o.key).map(|(_, id)| id))
        .collect();
    let mut accs: HashMap<Id, Acc> = HashMap::new();
    let mut entries = 0u64;
    // Referenced blobs with a copy in a pack that is not in the store.
    let mut missing_refs: Vec<u64> = Vec::new();
    let mut index_bytes = sweep(&store, &tables_keys, |e| {
        // Tombstones left by an earlier prune that stopped are not copies; the copies they
        // doom still are (their packs exist until a prune deletes them), and count.
        if !e.is_live() {
            return;
        }
        entries += 1;
        let a = accs.entry(e.pack).or_default();
        a.kind = Some(e.kind);
        a.entries += 1;
        a.blob_bytes += e.stored_len as u64;
        if marks.contains(&e.id) {
            a.used += 1;
            a.used_bytes += e.stored_len as u64;
            if !listed.contains(&e.pack) {
                missing_refs.push(marks::key(&e.id));
            }
        }
    })
    .await?;
    report.index_entries = entries;
    let mut uses = Vec::with_capacity(listing.len());
    for o in &listing {
        let Some((kind, id)) = parse_pack_key(&o.key) else {
            continue;
        };
        let a = accs.get(&id).copied().unwrap_or_default();
        uses.push(PackUse {
            key: o.key.clone(),
            kind,
            id,
            size: o.size,
            modified: o.modified,
            entries: a.entries,
            blob_bytes: a.blob_bytes,
            used: a.used,
            used_bytes: a.used_bytes,
        });
    }
    // Packs the index names that are not in the store: a stale entry (its pack deleted by an
    // earlier prune, still named by a root a concurrent compaction published) is harmless when
    // the blob has another copy; a referenced blob with no copy in the store is damage.
    let missing: HashSet<Id> = accs
        .keys()
        .filter(|id| !listed.contains(id))
        .copied()
        .collect();
    if !missing_refs.is_empty() {
        missing_refs.sort_unstable();
        missing_refs.dedup();
        let mut found = vec![false; missing_refs.len()];
        index_bytes += sweep(&store, &tables_keys, |e| {
            if e.is_live() && listed.contains(&e.pack) {
                if let Ok(i) = missing_refs.binary_search(&marks::key(&e.id)) {
                    found[i] = true;
                }
            }
        })
        .await?;
        let lost = found.iter().filter(|f| !**f).count();
        if lost > 0 {
            let mut keys: Vec<String> = missing
                .iter()
                .map(|id| {
                    let kind = accs.get(id).and_then(|a| a.kind).unwrap_or(BlobKind::Data);
                    crate::id::pack_key(kind, id)
                })
                .collect();
            keys.sort();
            return Err(Error::PruneRefused {
                reason: format!(
                    "{lost} referenced blobs have no copy in the store: {} indexed packs are \
                     missing (first: {}); run `backtree verify`",
                    keys.len(),
                    keys.first().map_or("?", String::as_str)
                ),
            });
        }
    }
    let missing_unused = missing;
    report.memory = marks.memory() + accs.capacity() * (32 + std::mem::size_of::<Acc>() + 8);
    drop(accs);
    let now = SystemTime::now();
    let p = plan(&uses, now, &opts.plan);
    drop(uses);
    report.plan = p.clone();
    if opts.dry_run {
        report.bytes_read = manifest_bytes
            + stats
                .fetched_bytes
                .load(std::sync::atomic::Ordering::Relaxed)
            - fetched0
            + index_bytes;
        return Ok(());
    }
    let t = &p.totals;
    progress(&format!(
        "plan: delete {} unused and {} orphaned packs, repack {}, keep {} ({} younger than the grace period)",
        t.delete_unused, t.delete_orphan, t.repack, t.kept, t.kept_young
    ));

    // 4. Repack.
    check(maint)?;
    let mut repacked_bytes = 0u64;
    let repack: Vec<&Decision> = p
        .packs
        .iter()
        .filter(|d| d.action == Action::Repack)
        .collect();
    let mut kept_anyway: HashSet<Id> = HashSet::new();
    if !repack.is_empty() {
        progress(&format!("repacking {} packs", repack.len()));
        let pack_size = repo.config().pack_size as usize;
        let mut index = IndexBuilder::new();
        let mut builders: HashMap<BlobKind, PackBuilder> = HashMap::new();
        let mut copied: HashSet<Id> = HashSet::new();
        let mut reads = futures_util::stream::iter(repack.iter().map(|d| {
            let store = store.clone();
            async move { (d, store.get(&d.key).await) }
        }))
        // A pack being copied and the next one read: about 32 MB.
        .buffered(2);
        while let Some((d, got)) = reads.next().await {
            let bytes = match got {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!("prune: cannot read {} to repack it ({e}); kept", d.key);
                    kept_anyway.insert(d.id);
                    continue;
                }
            };
            repacked_bytes += bytes.len() as u64;
            let es = match pack::parse_pack(&d.key, &bytes) {
                Ok(es) => es,
                Err(e) => {
                    tracing::warn!("prune: {e}; {} kept", d.key);
                    kept_anyway.insert(d.id);
                    continue;
                }
            };
            let mut ok = true;
            let mut copies = Vec::new();
            // A blob with copies in several packs being repacked is copied once.
            for e in es
                .iter()
                .filter(|e| marks.contains(&e.id) && !copied.contains(&e.id))
            {
                let stored = &bytes[e.offset as usize..(e.offset + e.stored_len) as usize];
                let what = format!("blob {} in {}", e.id, d.key);
                if let Err(err) = blob::decode(&e.id, stored, e.flags, e.raw_len, &what) {
                    tracing::warn!("prune: {err}; {} kept, run `backtree verify`", d.key);
                    ok = false;
                    break;
                }
                copies.push((e, stored));
            }
            if !ok {
                kept_anyway.insert(d.id);
                continue;
            }
            for (e, stored) in copies {
                if !copied.insert(e.id) {
                    continue;
                }
                let b = builders
                    .entry(e.kind)
                    .or_insert_with(|| PackBuilder::new(e.kind, pack_size + (1 << 20)));
                b.add(e.id, e.flags, stored, e.raw_len);
                report.copied_blobs += 1;
                if b.len() >= pack_size {
                    let full =
                        std::mem::replace(b, PackBuilder::new(e.kind, pack_size + (1 << 20)));
                    write_pack(&store, full, &mut index).await?;
                    report.new_packs += 1;
                }
            }
        }
        for (_, b) in builders {
            if !b.is_empty() {
                write_pack(&store, b, &mut index).await?;
                report.new_packs += 1;
            }
        }
        if !index.is_empty() {
            check(maint)?;
            let (key, bytes) = index.encode();
            store.put(&key, Bytes::from(bytes)).await?;
        }
    }

    // 5. Tombstones.
    check(maint)?;
    let doomed: HashMap<Id, u32> = p
        .deletions()
        .filter(|d| d.action != Action::DeleteOrphan && !kept_anyway.contains(&d.id))
        .enumerate()
        .map(|(i, d)| (d.id, i as u32))
        .collect();
    let doomed_keys: Vec<&Decision> = p
        .deletions()
        .filter(|d| d.action != Action::DeleteOrphan && !kept_anyway.contains(&d.id))
        .collect();
    // (id prefix, index into doomed_keys) of every doomed copy: what the re-check looks up.
    let mut doomed_ids: Vec<(u64, u32)> = Vec::new();
    let minutes = (now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        / 60)
        .max(1) as u32;
    if !doomed.is_empty() {
        progress(&format!(
            "marking {} packs for deletion in the index",
            doomed.len()
        ));
        // Tombstone deltas are stored as they fill, so at most one is held.
        let mut batch: Vec<TableEntry> = Vec::new();
        for (n, k) in tables_keys.iter().enumerate() {
            let mut t = Pieces::new(k);
            loop {
                let piece = t.next(&store).await?;
                let done = piece.is_none();
                for e in piece.iter().flatten().filter(|e| e.is_live()) {
                    if let Some(&i) = doomed.get(&e.pack) {
                        doomed_ids.push((marks::key(&e.id), i));
                        batch.push(TableEntry {
                            deleted: minutes,
                            ..*e
                        });
                    }
                }
                let last = done && n + 1 == tables_keys.len();
                if batch.len() >= TOMBSTONES_PER_DELTA || (last && !batch.is_empty()) {
                    let b = std::mem::take(&mut batch);
                    report.tombstones += b.len() as u64;
                    check(maint)?;
                    let (name, bytes) = crate::index::table::encode(TableKind::Delta, 0, 0, b);
                    store
                        .put(
                            &format!("{}{}", crate::index::root::DELTAS_PREFIX, name.to_hex()),
                            Bytes::from(bytes),
                        )
                        .await?;
                }
                if done {
                    break;
                }
            }
            index_bytes += t.bytes;
        }
        doomed_ids.sort_unstable();
        doomed_ids.dedup();
    }
    report.memory = report
        .memory
        .max(marks.memory() + doomed_ids.capacity() * 16);

    // 6. Wait for the ingests that may have looked at the index before the tombstones.
    let waited = Instant::now();
    let leases = store.list(LEASES_PREFIX).await?;
    if !leases.is_empty() {
        progress(&format!(
            "waiting for {} running ingests to finish (or their leases to expire)",
            leases.len()
        ));
    }
    for o in &leases {
        report.waited_for.push(o.key.clone());
        // Look again soon, then less and less often (most ingests end within seconds).
        let mut pause = opts.poll.min(Duration::from_millis(100));
        loop {
            check(maint)?;
            if store.head(&o.key).await?.is_none() {
                break;
            }
            let body = read_lease(&store, &o.key).await?;
            let end = lease_end(body.as_ref(), o, opts.lease_margin);
            if end.is_some_and(|end| end <= SystemTime::now()) {
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(opts.poll);
        }
    }
    report.waited_secs = waited.elapsed().as_secs_f64();

    // 7. Re-check: generations and index deltas that appeared meanwhile.
    let mut rescued: HashSet<Id> = HashSet::new();
    let new_keys = generation_keys(repo, &marked).await?;
    if !new_keys.is_empty() {
        progress(&format!("re-checking {} new generations", new_keys.len()));
        let mut rescue = |id: &Id| {
            let k = marks::key(id);
            let lo = doomed_ids.partition_point(|&(x, _)| x < k);
            for &(_, i) in doomed_ids[lo..].iter().take_while(|&&(x, _)| x == k) {
                rescued.insert(doomed_keys[i as usize].id);
            }
        };
        let (walked, _) = mark(repo, new_keys, &mut marks, Some(&mut rescue)).await?;
        report.new_generations = walked.len();
    }
    drop(marks);
    // Index entries written since the start: in deltas, or already merged by a compaction into
    // tables (which are then newer than the start too). An unindexed pack that one of them
    // names belongs to an ingest that finished meanwhile.
    let new_tables: Vec<String> = current_tables(&store)
        .await?
        .into_iter()
        .filter(|k| !before.contains(k))
        .collect();
    // (Entries of indexed packs in new tables are mostly old facts a compaction merged again;
    // a pack to delete that an ingest stored again is caught by its new age below.)
    let orphans: HashSet<Id> = p
        .deletions()
        .filter(|d| d.action == Action::DeleteOrphan)
        .map(|d| d.id)
        .collect();
    index_bytes += sweep(&store, &new_tables, |e| {
        if e.is_live() && orphans.contains(&e.pack) {
            rescued.insert(e.pack);
        }
    })
    .await?;

    // 8. Delete: the packs still old enough, index entries first.
    let fresh: HashMap<Id, ObjectInfo> = store
        .list("packs/")
        .await?
        .into_iter()
        .filter_map(|o| parse_pack_key(&o.key).map(|(_, id)| (id, o)))
        .collect();
    let now = SystemTime::now();
    // An unindexed pack may belong to an ingest still running that has not yet written the
    // delta naming it (it checkpoints every 256 MiB of new packs, which a long ingest of
    // unchanged data may take hours to reach): it goes only if every live writer lease
    // started after it was stored.
    let mut oldest_writer: Option<SystemTime> = None;
    for o in store.list(LEASES_PREFIX).await? {
        let body = read_lease(&store, &o.key).await?;
        if lease_end(body.as_ref(), &o, opts.lease_margin).is_some_and(|end| end <= now) {
            continue;
        }
        let started = body
            .as_ref()
            .and_then(|b| chrono::DateTime::parse_from_rfc3339(&b.started).ok())
            .map(|t| SystemTime::from(t.with_timezone(&chrono::Utc)) - opts.lease_margin)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        oldest_writer = Some(oldest_writer.map_or(started, |w: SystemTime| w.min(started)));
    }
    let mut delete: Vec<&Decision> = Vec::new();
    for d in p.deletions() {
        let old_enough = fresh.get(&d.id).is_some_and(|o| {
            let aged = o
                .modified
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age >= opts.plan.grace);
            let unclaimed = d.action != Action::DeleteOrphan
                || o.modified
                    .is_some_and(|m| oldest_writer.is_none_or(|w| m < w));
            aged && unclaimed
        });
        if kept_anyway.contains(&d.id) {
            continue;
        }
        if rescued.contains(&d.id) || !old_enough {
            report.rescued.push(d.key.clone());
            continue;
        }
        delete.push(d);
    }
    report.rescued.sort();
    let mut drop_packs: HashSet<Id> = delete.iter().map(|d| d.id).collect();
    drop_packs.extend(missing_unused.iter().copied());
    check(maint)?;
    progress(&format!(
        "rewriting the index without {} packs",
        drop_packs.len()
    ));
    let rewrite = Rewrite { drop_packs };
    let cache = repo.index().cache();
    compact::run(
        &store,
        &opts.policy,
        Mode::Full,
        false,
        cache.as_ref(),
        Some(&rewrite),
    )
    .await?;
    check(maint)?;
    progress(&format!("deleting {} packs", delete.len()));
    let results: Vec<(
        &Decision,
        std::result::Result<(), backtree_store::StoreError>,
    )> = futures_util::stream::iter(delete.iter().map(|d| {
        let store = store.clone();
        async move { (*d, store.delete(&d.key).await) }
    }))
    .buffer_unordered(IN_FLIGHT)
    .collect()
    .await;
    for (d, r) in results {
        match r {
            Ok(()) => {
                report.deleted_packs += 1;
                report.deleted_bytes += d.size;
            }
            Err(e) => report.failed.push((d.key.clone(), e.to_string())),
        }
    }
    report.tidied = tidy(&store, opts).await?;
    report.bytes_read = manifest_bytes
        + stats
            .fetched_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
        - fetched0
        + index_bytes
        + repacked_bytes;
    Ok(())
}

async fn write_pack(store: &DynStore, b: PackBuilder, index: &mut IndexBuilder) -> Result<()> {
    let f = b.finish();
    index.add_pack(f.kind, f.id, &f.entries);
    store
        .put(&crate::id::pack_key(f.kind, &f.id), Bytes::from(f.bytes))
        .await?;
    Ok(())
}

/// Deletes writer leases long expired and generation-name claims older than the grace period
/// (left by killed writers; a live writer holds a claim for milliseconds).
async fn tidy(store: &DynStore, opts: &PruneOptions) -> Result<usize> {
    let now = SystemTime::now();
    let mut gone = Vec::new();
    for o in store.list(LEASES_PREFIX).await? {
        let body = read_lease(store, &o.key).await?;
        if lease_end(body.as_ref(), &o, opts.lease_margin)
            .is_some_and(|end| end + opts.lease_time <= now)
        {
            gone.push(o.key);
        }
    }
    for o in store.list(SNAPSHOTS_PREFIX).await? {
        let old = o
            .modified
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age >= opts.plan.grace);
        if old && o.key.contains(crate::claim::CLAIM_MARK) {
            gone.push(o.key);
        }
    }
    let mut n = 0;
    for k in gone {
        if store.delete(&k).await.is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests;
