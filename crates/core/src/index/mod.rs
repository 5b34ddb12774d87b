//! The index: blob id → (pack, offset, length), built so that its cost to readers and writers
//! does not grow with the repository's history (docs/format.md §6, docs/concurrency.md).
//!
//! Three kinds of immutable objects, all [tables](table) of one format:
//! - **deltas** (`index/deltas/<hex>`): what one ingest stored (its checkpoints and its final
//!   table), written by [`IndexBuilder`];
//! - **runs** and a sharded **base** (`index/tables/<hex>`): merges written by
//!   [compaction](compact), each with a [filter] bundle (`index/filters/<hex>`);
//! - **roots** (`index/roots/<seq>-<hex>`): which base and runs make up the index and which
//!   deltas they cover.
//!
//! The index is the current root's tables plus the deltas it does not cover; compaction keeps
//! those few (a trigger merges deltas every few dozen ingests), so a lookup touches a constant
//! number of objects: the uncovered deltas (small, loaded whole), one bucket of the id's base
//! shard, and a bucket of a run only when the run's filter says the id may be there.
//!
//! # Reading ([`IndexSet`])
//! A reader lists `index/roots/` and `index/deltas/` once (a *view*), loads the root, the
//! uncovered deltas and the runs' filters, and then per lookup reads one bucket (about 5 KB,
//! verified against its head, whose hash is the table's name) with a ranged GET. Buckets and
//! heads are kept in an LRU within a byte budget ([`IndexOptions::budget`]); lookups run in
//! parallel and never hold a lock across a request. A miss re-lists, at most once per
//! [`IndexOptions::relist`] (a lookup that misses sooner waits for that moment: a generation
//! committed after the view was taken becomes readable, and a storm of misses costs one LIST);
//! an object that vanished (compaction removed it) makes the reader take a new view at once.
//! Downloaded roots, deltas, filters and heads are kept in the [local cache](cache).
//!
//! # Writing
//! An ingest deduplicates through [`Dedup`](dedup::Dedup): the base's and runs' filters (about
//! 1.1 B per chunk of the repository) plus the uncovered deltas' ids, with every "maybe"
//! confirmed by a bucket read, so its memory does not depend on other hosts' history.

pub mod cache;
pub mod compact;
pub mod dedup;
pub mod filter;
pub mod root;
pub mod table;

use crate::error::{Error, Result};
use crate::id::{pack_key, BlobKind, Id};
use crate::pack::PackEntry;
use backtree_store::DynStore;
use bytes::Bytes;
use cache::LocalCache;
use filter::FilterBundle;
use root::{name_of, Root, TableRef, DELTAS_PREFIX, ROOTS_PREFIX};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use table::{Head, Table, TableEntry, TableKind};

pub use root::INDEX_PREFIX;

/// Default byte budget for loaded buckets and heads.
pub const DEFAULT_BUDGET: usize = 32 << 20;
/// Default minimum time between two listings caused by misses.
pub const DEFAULT_RELIST: Duration = Duration::from_secs(3);

/// Where a blob lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub kind: BlobKind,
    pub pack: Id,
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
    pub flags: u8,
}

impl Location {
    /// The store key of the pack holding the blob.
    pub fn pack_key(&self) -> String {
        pack_key(self.kind, &self.pack)
    }
}

impl From<&TableEntry> for Location {
    fn from(e: &TableEntry) -> Location {
        Location {
            kind: e.kind,
            pack: e.pack,
            offset: e.offset,
            stored_len: e.stored_len,
            raw_len: e.raw_len,
            flags: e.flags,
        }
    }
}

/// Builds one delta from the packs an ingest wrote.
#[derive(Debug, Default)]
pub struct IndexBuilder {
    entries: Vec<TableEntry>,
}

impl IndexBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds every blob of one pack.
    pub fn add_pack(&mut self, kind: BlobKind, pack: Id, entries: &[PackEntry]) {
        self.entries.extend(entries.iter().map(|e| TableEntry {
            id: e.id,
            pack,
            kind,
            offset: e.offset,
            stored_len: e.stored_len,
            raw_len: e.raw_len,
            flags: e.flags,
            deleted: 0,
        }));
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Encodes the delta; returns its store key and bytes.
    pub fn encode(self) -> (String, Vec<u8>) {
        let (name, bytes) = table::encode(TableKind::Delta, 0, 0, self.entries);
        (format!("{DELTAS_PREFIX}{}", name.to_hex()), bytes)
    }
}

/// Parses a whole index table (a delta, run or shard), verified against its key's name.
pub fn parse_file(key: &str, b: &[u8]) -> Result<Vec<(Id, Location)>> {
    let t = Table::parse(key, b, name_of(key).as_ref())?;
    Ok(t.entries
        .iter()
        .map(|e| (e.id, Location::from(e)))
        .collect())
}

/// How a reader uses memory, the local cache and the store.
#[derive(Debug, Clone)]
pub struct IndexOptions {
    /// Bytes of buckets and table heads kept in memory.
    pub budget: usize,
    /// Local cache base directory (`None`: no cache).
    pub cache_dir: Option<PathBuf>,
    /// Minimum time between two listings caused by misses.
    pub relist: Duration,
}

impl Default for IndexOptions {
    fn default() -> Self {
        IndexOptions {
            budget: DEFAULT_BUDGET,
            cache_dir: None,
            relist: DEFAULT_RELIST,
        }
    }
}

/// What a reader downloaded.
#[derive(Debug, Default)]
pub struct IndexStats {
    pub fetched_bytes: AtomicU64,
    pub fetched_objects: AtomicU64,
    pub cache_hits: AtomicU64,
    pub listings: AtomicU64,
}

impl IndexStats {
    /// `index: fetched N bytes in K objects (C from the local cache)`.
    pub fn summary(&self) -> String {
        format!(
            "index: fetched {} bytes in {} objects ({} from the local cache), {} listings",
            self.fetched_bytes.load(Ordering::Relaxed),
            self.fetched_objects.load(Ordering::Relaxed),
            self.cache_hits.load(Ordering::Relaxed),
            self.listings.load(Ordering::Relaxed),
        )
    }
}

/// One consistent view of the index: a root and the deltas it does not cover.
#[derive(Debug, Default)]
pub struct View {
    pub root_key: Option<String>,
    pub root: Arc<Root>,
    /// Live entries of the uncovered deltas (one per id, one whose pack is not doomed where
    /// there is a choice).
    deltas: HashMap<Id, TableEntry>,
    /// Tombstones of the uncovered deltas: id → packs whose copy of it a prune is deleting.
    /// Only prune writes tombstones, always in deltas of their own that ordinary compactions
    /// never merge (docs/concurrency.md "Garbage collection"), so every view sees all of them.
    /// Sorted by (id, pack), without repeats: 88 B each, no hashing overhead (a prune of 10⁶
    /// blobs puts 10⁶ of them in every view while it runs).
    tombstones: Vec<TableEntry>,
    /// Keys of the uncovered deltas.
    delta_keys: HashSet<String>,
    /// Filter bundle of each run (same order as `root.runs`).
    run_filters: Vec<Arc<FilterBundle>>,
    /// When its listing was started.
    taken: Option<Instant>,
}

impl View {
    /// Whether a prune has scheduled this entry's copy of its blob for deletion (a tombstone
    /// for the same id and pack), or the entry is itself a tombstone. Writers must not
    /// reference such a copy; readers may still read it while its pack exists.
    pub fn doomed(&self, e: &TableEntry) -> bool {
        !e.is_live()
            || self
                .tombstones
                .binary_search_by(|t| (t.id, t.pack).cmp(&(e.id, e.pack)))
                .is_ok()
    }

    /// The tombstones of `id`.
    fn tombstones_of(&self, id: &Id) -> &[TableEntry] {
        let lo = self.tombstones.partition_point(|t| t.id < *id);
        let n = self.tombstones[lo..].partition_point(|t| t.id == *id);
        &self.tombstones[lo..lo + n]
    }

    /// Whether any copy of `id` is doomed.
    pub fn has_tombstone(&self, id: &Id) -> bool {
        !self.tombstones_of(id).is_empty()
    }

    /// Tombstones in the uncovered deltas.
    pub fn tombstone_count(&self) -> usize {
        self.tombstones.len()
    }

    /// Keys of the uncovered deltas.
    pub fn delta_keys(&self) -> impl Iterator<Item = &String> {
        self.delta_keys.iter()
    }

    /// Keys of every table of the view: the uncovered deltas, the base's shards and the runs.
    pub fn table_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.delta_keys.iter().cloned().collect();
        keys.sort();
        keys.extend(self.root.tables().map(TableRef::key));
        keys
    }

    /// Number of uncovered deltas and their entries.
    pub fn uncovered(&self) -> (usize, usize) {
        (self.delta_keys.len(), self.deltas.len())
    }
}

/// Weight of a cached value in the budget.
trait Weight {
    fn weight(&self) -> usize;
}

impl Weight for Head {
    fn weight(&self) -> usize {
        self.len() + 64
    }
}

impl Weight for Vec<TableEntry> {
    fn weight(&self) -> usize {
        self.len() * std::mem::size_of::<TableEntry>() + 64
    }
}

/// An LRU of heads and buckets within a byte budget.
struct Budgeted {
    heads: lru::LruCache<String, Arc<Head>>,
    buckets: lru::LruCache<(String, u32), Arc<Vec<TableEntry>>>,
    bytes: usize,
    budget: usize,
}

impl Budgeted {
    fn trim(&mut self) {
        while self.bytes > self.budget {
            // Buckets go first: a head is needed for every bucket of its table.
            if let Some((_, v)) = self.buckets.pop_lru() {
                self.bytes -= v.weight();
            } else if let Some((_, v)) = self.heads.pop_lru() {
                self.bytes -= v.weight();
            } else {
                break;
            }
        }
    }
}

/// Lazily loaded view of the whole index (see the module docs).
pub struct IndexSet {
    store: DynStore,
    opts: IndexOptions,
    /// Set once the repository's id is known ([`IndexSet::set_repository_id`]).
    cache: Mutex<Option<LocalCache>>,
    view: Mutex<Option<Arc<View>>>,
    /// Serializes view refreshes; holds when the last one finished.
    refresh: tokio::sync::Mutex<Option<Instant>>,
    lru: Mutex<Budgeted>,
    stats: Arc<IndexStats>,
}

impl std::fmt::Debug for IndexSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexSet")
            .field("store", &self.store.location())
            .field("opts", &self.opts)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_not_found(e: &Error) -> bool {
    matches!(e, Error::Store(s) if s.is_not_found())
}

impl IndexSet {
    pub fn new(store: DynStore) -> Self {
        Self::with_options(store, IndexOptions::default())
    }

    pub fn with_options(store: DynStore, opts: IndexOptions) -> Self {
        IndexSet {
            lru: Mutex::new(Budgeted {
                heads: lru::LruCache::unbounded(),
                buckets: lru::LruCache::unbounded(),
                bytes: 0,
                budget: opts.budget,
            }),
            store,
            opts,
            cache: Mutex::new(None),
            view: Mutex::new(None),
            refresh: tokio::sync::Mutex::new(None),
            stats: Arc::new(IndexStats::default()),
        }
    }

    pub fn options(&self) -> &IndexOptions {
        &self.opts
    }

    pub fn stats(&self) -> &IndexStats {
        &self.stats
    }

    /// The statistics, shared (they outlive the set).
    pub fn stats_handle(&self) -> Arc<IndexStats> {
        self.stats.clone()
    }

    /// Enables the local cache for repository `repo_id` (called by `Repository::open`).
    pub fn set_repository_id(&self, repo_id: &str) {
        *lock(&self.cache) = self
            .opts
            .cache_dir
            .as_deref()
            .and_then(|d| LocalCache::open(d, repo_id));
    }

    pub fn cache(&self) -> Option<LocalCache> {
        lock(&self.cache).clone()
    }

    /// Bytes of buckets and heads held in memory.
    pub fn loaded_bytes(&self) -> usize {
        lock(&self.lru).bytes
    }

    /// Fetches an object (or a range of it) through the local cache, verified by `parse`.
    async fn fetch<T>(
        &self,
        key: &str,
        cache_name: Option<&str>,
        range: Option<std::ops::Range<u64>>,
        parse: impl Fn(&Bytes) -> Result<T>,
    ) -> Result<T> {
        let cache = if cache_name.is_some() {
            self.cache()
        } else {
            None
        };
        if let (Some(c), Some(n)) = (&cache, cache_name) {
            if let Some(b) = c.read(n) {
                match parse(&Bytes::from(b)) {
                    Ok(v) => {
                        self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                        return Ok(v);
                    }
                    Err(e) => c.reject(n, &e.to_string()),
                }
            }
        }
        let bytes: Bytes = match range {
            Some(r) => self.store.get_range(key, r).await?,
            None => self.store.get(key).await?,
        };
        self.stats
            .fetched_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.stats.fetched_objects.fetch_add(1, Ordering::Relaxed);
        let v = parse(&bytes)?;
        if let (Some(c), Some(n)) = (&cache, cache_name) {
            c.write(n, &bytes);
        }
        Ok(v)
    }

    /// The current view, taking one if there is none.
    pub async fn view(&self) -> Result<Arc<View>> {
        if let Some(v) = lock(&self.view).clone() {
            return Ok(v);
        }
        let mut last = self.refresh.lock().await;
        if let Some(v) = lock(&self.view).clone() {
            return Ok(v);
        }
        self.take_view(&mut last).await
    }

    /// A view listed now (what an ingest starts from: the view a long-lived repository handle
    /// holds may predate generations committed since), reusing what the old view loaded.
    pub async fn fresh_view(&self) -> Result<Arc<View>> {
        let mut last = self.refresh.lock().await;
        self.take_view(&mut last).await
    }

    /// Lists the index and builds a new view (under the refresh lock), reusing what the old
    /// view loaded. An object that vanishes meanwhile (compaction) makes it list again.
    async fn take_view(&self, last: &mut Option<Instant>) -> Result<Arc<View>> {
        let old = lock(&self.view).clone();
        let mut attempt = 0;
        let v = loop {
            match self.build_view(old.as_deref()).await {
                Ok(v) => break v,
                Err(e) if is_not_found(&e) && attempt < 5 => attempt += 1,
                Err(e) => return Err(e),
            }
        };
        let v = Arc::new(v);
        *lock(&self.view) = Some(v.clone());
        *last = Some(Instant::now());
        Ok(v)
    }

    async fn build_view(&self, old: Option<&View>) -> Result<View> {
        let taken = Instant::now();
        self.stats.listings.fetch_add(2, Ordering::Relaxed);
        let (roots, deltas) = futures_util::future::try_join(
            self.store.list(ROOTS_PREFIX),
            self.store.list(DELTAS_PREFIX),
        )
        .await?;
        let root_key = root::current(roots.iter().map(|o| o.key.as_str())).map(str::to_owned);
        let root: Arc<Root> = match (&root_key, old) {
            (Some(k), Some(o)) if o.root_key.as_deref() == Some(k) => o.root.clone(),
            (Some(k), _) => Arc::new(self.fetch(k, Some(k), None, |b| Root::parse(k, b)).await?),
            (None, _) => Arc::new(Root::empty()),
        };
        let covered: HashSet<&str> = root.covers.iter().map(String::as_str).collect();
        let mut view = View {
            root_key: root_key.clone(),
            root: root.clone(),
            taken: Some(taken),
            ..View::default()
        };
        // Deltas: keep what the old view loaded, load the new ones (in parallel).
        let mut todo = Vec::new();
        for o in &deltas {
            let Some(name) = o.key.strip_prefix(DELTAS_PREFIX) else {
                continue;
            };
            if covered.contains(name) || name_of(&o.key).is_none() {
                continue;
            }
            view.delta_keys.insert(o.key.clone());
            if old.is_some_and(|v| v.delta_keys.contains(&o.key)) {
                continue;
            }
            todo.push(o.key.clone());
        }
        if let Some(o) = old {
            if o.root_key == root_key {
                // Entries of deltas still uncovered; a covered one's entries are in the tables.
                view.deltas = o.deltas.clone();
                view.tombstones = o.tombstones.clone();
            } else {
                todo = view.delta_keys.iter().cloned().collect();
            }
        }
        use futures_util::StreamExt;
        let loaded: Vec<Result<Table>> =
            futures_util::stream::iter(todo.into_iter().map(|k| async move {
                let name = name_of(&k);
                self.fetch(&k, Some(&k), None, |b| Table::parse(&k, b, name.as_ref()))
                    .await
            }))
            .buffer_unordered(16)
            .collect()
            .await;
        let loaded = loaded.into_iter().collect::<Result<Vec<Table>>>()?;
        // Tombstones first, so that a live entry can be chosen over a doomed copy.
        view.tombstones.extend(
            loaded
                .iter()
                .flat_map(|t| &t.entries)
                .filter(|e| !e.is_live())
                .copied(),
        );
        view.tombstones.sort_unstable_by_key(|t| (t.id, t.pack));
        view.tombstones.dedup_by_key(|t| (t.id, t.pack));
        view.tombstones.shrink_to_fit();
        for e in loaded.into_iter().flat_map(|t| t.entries) {
            if !e.is_live() {
                continue;
            }
            let doomed = view.doomed(&e);
            match view.deltas.get(&e.id) {
                Some(x) if doomed || !view.doomed(x) => {}
                _ => {
                    view.deltas.insert(e.id, e);
                }
            }
        }
        // Run filters (kept from the old view when the root did not change).
        if let Some(o) = old.filter(|o| o.root_key == root_key) {
            view.run_filters = o.run_filters.clone();
        } else {
            for r in &root.runs {
                let f = match &r.filter {
                    Some(f) => self.filter_bundle(f).await?,
                    None => Arc::new(FilterBundle::default()),
                };
                view.run_filters.push(f);
            }
        }
        Ok(view)
    }

    /// Loads a filter bundle by hex name.
    pub async fn filter_bundle(&self, name: &str) -> Result<Arc<FilterBundle>> {
        let key = format!("{}{name}", root::FILTERS_PREFIX);
        let id = Id::from_hex(name);
        Ok(Arc::new(
            self.fetch(&key, Some(&key), None, |b| {
                FilterBundle::parse(&key, b, id.as_ref())
            })
            .await?,
        ))
    }

    /// The head of a table.
    async fn head(&self, t: &TableRef) -> Result<Arc<Head>> {
        let key = t.key();
        if let Some(h) = lock(&self.lru).heads.get(&key).cloned() {
            return Ok(h);
        }
        let len = Head::len_for(t.fanout_bits) as u64;
        let id = t.id();
        let cname = format!("{key}.head");
        let h = Arc::new(
            self.fetch(&key, Some(&cname), Some(0..len), |b| {
                Head::parse(&key, b, id.as_ref())
            })
            .await?,
        );
        let mut l = lock(&self.lru);
        if l.heads.put(key, h.clone()).is_none() {
            l.bytes += h.weight();
        }
        l.trim();
        Ok(h)
    }

    /// The first entry of `id` in table `t` that `accept` takes, if any (a table may hold
    /// several copies of a blob, in different packs).
    pub async fn table_lookup(
        &self,
        t: &TableRef,
        id: &Id,
        accept: impl Fn(&TableEntry) -> bool,
    ) -> Result<Option<TableEntry>> {
        let head = self.head(t).await?;
        if !head.covers(id) {
            return Ok(None);
        }
        let b = head.bucket_of(id);
        let (lo, hi) = head.bucket_entries(b);
        if lo == hi {
            return Ok(None);
        }
        let key = t.key();
        let ck = (key.clone(), b as u32);
        let cached = lock(&self.lru).buckets.get(&ck).cloned();
        let bucket = match cached {
            Some(v) => v,
            None => {
                let v = Arc::new(
                    self.fetch(&key, None, Some(head.bucket_range(b)), |bytes| {
                        head.decode_bucket(&key, b, bytes)
                    })
                    .await?,
                );
                let mut l = lock(&self.lru);
                if l.buckets.put(ck, v.clone()).is_none() {
                    l.bytes += v.weight();
                }
                l.trim();
                v
            }
        };
        let first = bucket.partition_point(|e| e.id < *id);
        Ok(bucket[first..]
            .iter()
            .take_while(|e| e.id == *id)
            .find(|e| accept(e))
            .copied())
    }

    /// Finds `id` in one view: uncovered deltas, the base shard (skipped when `base_filter`
    /// rules the id out), then runs whose filter admits it; the first entry `accept` takes.
    pub async fn find_in(
        &self,
        view: &View,
        id: &Id,
        base_filter: Option<&FilterBundle>,
        accept: impl Fn(&TableEntry) -> bool,
    ) -> Result<Option<TableEntry>> {
        if let Some(e) = view.deltas.get(id).filter(|e| accept(e)) {
            return Ok(Some(*e));
        }
        if let Some(base) = &view.root.base {
            let i = table::id_bits(id, 0, base.shard_bits) as usize;
            if let Some(t) = base
                .shards
                .get(i)
                .filter(|_| base_filter.is_none_or(|f| f.may_contain(id)))
            {
                if let Some(e) = self.table_lookup(t, id, &accept).await? {
                    return Ok(Some(e));
                }
            }
        }
        for (i, r) in view.root.runs.iter().enumerate() {
            if view.run_filters.get(i).is_some_and(|f| !f.may_contain(id)) {
                continue;
            }
            if let Some(e) = self.table_lookup(r, id, &accept).await? {
                return Ok(Some(e));
            }
        }
        Ok(None)
    }

    /// Finds a blob (see the module docs for what a miss costs).
    pub async fn lookup(&self, id: &Id) -> Result<Location> {
        let start = Instant::now();
        let mut view = self.view().await?;
        for _ in 0..4 {
            // A copy no prune is deleting; else any (its pack may still be there).
            let found = match self.find_in(&view, id, None, |e| !view.doomed(e)).await {
                Ok(None) => match self.find_in(&view, id, None, |_| true).await {
                    Ok(None) => Ok(view.tombstones_of(id).first().copied()),
                    r => r,
                },
                r => r,
            };
            match found {
                Ok(Some(e)) => return Ok(Location::from(&e)),
                Ok(None) => match self.after_miss(&view, start).await? {
                    Some(v) => view = v,
                    None => break,
                },
                Err(e) if is_not_found(&e) => {
                    // A table or delta of this view is gone: a compaction replaced it.
                    view = self.refresh_now(&view).await?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::BlobNotIndexed { id: *id })
    }

    /// Where `id` lives now, when the pack of `was` has vanished (a prune repacked or deleted
    /// it): a new view is taken (shared with other tasks that noticed the same), and the blob's
    /// new location returned if it differs; `None` if it has none other (it was pruned).
    pub async fn relocate(&self, id: &Id, was: &Location) -> Result<Option<Location>> {
        let seen = self.view().await?;
        let view = self.refresh_now(&seen).await?;
        let found = self
            .find_in(&view, id, None, |e| e.pack != was.pack && !view.doomed(e))
            .await?;
        Ok(found.map(|e| Location::from(&e)))
    }

    /// After a miss in `seen` by a lookup that started at `start`: a view to try next, or
    /// `None` when a listing made after `start` has been searched (the blob is not indexed).
    /// A new listing is taken no sooner than `relist` after the previous one, so a storm of
    /// misses costs one LIST.
    async fn after_miss(&self, seen: &Arc<View>, start: Instant) -> Result<Option<Arc<View>>> {
        let mut last = self.refresh.lock().await;
        if let Some(c) = lock(&self.view).clone() {
            if c.taken.is_some_and(|t| t >= start) {
                // Listed after the lookup began: try it if not yet, else the miss is final.
                return Ok((!Arc::ptr_eq(&c, seen)).then_some(c));
            }
            if !Arc::ptr_eq(&c, seen) {
                return Ok(Some(c));
            }
        }
        if let Some(t) = *last {
            let next = t + self.opts.relist;
            let now = Instant::now();
            if next > now {
                tokio::time::sleep(next - now).await;
            }
        }
        let v = self.take_view(&mut last).await?;
        let changed = v.root_key != seen.root_key || v.delta_keys != seen.delta_keys;
        Ok(changed.then_some(v))
    }

    /// A new view now (an object of `seen` vanished), unless another task already took one.
    async fn refresh_now(&self, seen: &Arc<View>) -> Result<Arc<View>> {
        let mut last = self.refresh.lock().await;
        if let Some(c) = lock(&self.view).clone().filter(|c| !Arc::ptr_eq(c, seen)) {
            return Ok(c);
        }
        self.take_view(&mut last).await
    }
}

#[cfg(test)]
mod tests;
