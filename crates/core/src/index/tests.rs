//! Reader tests: lookups across deltas, runs and a sharded base; late deltas; objects that
//! vanish under a reader; the memory budget; the local cache; ingest deduplication.

use super::compact::{self, Mode, Policy};
use super::dedup::Dedup;
use super::*;
use crate::pack::{FinishedPack, PackBuilder};
use backtree_store::MemoryStore;
use std::time::SystemTime;

pub(crate) fn pack_of(n: u32, salt: u32) -> FinishedPack {
    let mut b = PackBuilder::new(BlobKind::Data, 0);
    for i in 0..n {
        let data = [&salt.to_le_bytes()[..], &i.to_le_bytes()[..]].concat();
        b.add(Id::of(&data), 1, &data, 8);
    }
    b.finish()
}

/// Stores one delta for a pack of `n` blobs; returns the pack.
pub(crate) async fn delta(store: &DynStore, n: u32, salt: u32) -> FinishedPack {
    let p = pack_of(n, salt);
    let mut b = IndexBuilder::new();
    b.add_pack(p.kind, p.id, &p.entries);
    let (k, bytes) = b.encode();
    store.put(&k, Bytes::from(bytes)).await.unwrap();
    p
}

fn quick() -> IndexOptions {
    IndexOptions {
        relist: Duration::from_millis(5),
        ..IndexOptions::default()
    }
}

pub(crate) fn small_policy() -> Policy {
    Policy {
        deltas_due: 4,
        delta_entries_due: 1 << 30,
        full_limit: 3_000,
        merge_limit: 100_000,
        shard_target: 500,
        settle: Duration::ZERO,
    }
}

async fn all_found(set: &IndexSet, packs: &[FinishedPack]) {
    for p in packs {
        for e in &p.entries {
            let loc = set.lookup(&e.id).await.unwrap();
            assert_eq!(
                (loc.pack, loc.offset, loc.stored_len),
                (p.id, e.offset, e.stored_len)
            );
        }
    }
}

#[tokio::test]
async fn deltas_late_deltas_and_misses() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let p1 = delta(&store, 500, 1).await;
    let set = IndexSet::with_options(store.clone(), quick());
    all_found(&set, std::slice::from_ref(&p1)).await;
    // A delta written after the view was taken is found on a miss.
    let p2 = delta(&store, 300, 2).await;
    all_found(&set, &[p1, p2]).await;
    assert!(matches!(
        set.lookup(&Id::of(b"absent")).await,
        Err(Error::BlobNotIndexed { .. })
    ));
}

#[tokio::test]
async fn misses_relist_at_most_once_per_interval() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let p = delta(&store, 10, 1).await;
    let set = IndexSet::with_options(
        store.clone(),
        IndexOptions {
            relist: Duration::from_millis(200),
            ..IndexOptions::default()
        },
    );
    all_found(&set, std::slice::from_ref(&p)).await;
    let t = Instant::now();
    let misses = (0..20u32).map(|i| {
        let set = &set;
        async move { set.lookup(&Id::of(&i.to_le_bytes())).await }
    });
    let res = futures_util::future::join_all(misses).await;
    assert!(res.iter().all(|r| r.is_err()));
    // Twenty concurrent misses: one view at start, then one or two re-listings (two LISTs each),
    // and the misses waited for the interval instead of listing more often.
    let lists = set.stats().listings.load(Ordering::Relaxed);
    assert!(lists <= 6, "{lists} listings");
    assert!(t.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn compacted_base_and_runs_find_everything_within_the_budget() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let mut packs = Vec::new();
    for i in 0..6 {
        packs.push(delta(&store, 400, i).await);
    }
    let pol = small_policy();
    let o = compact::run(&store, &pol, Mode::Full, false, None, None)
        .await
        .unwrap();
    assert_eq!(o.merged_deltas, 6);
    assert!(o.root.is_some());
    // Then more deltas merge into runs (the index is above `full_limit` now).
    for i in 6..10 {
        packs.push(delta(&store, 400, i).await);
    }
    let o = compact::run(&store, &pol, Mode::Auto, false, None, None)
        .await
        .unwrap();
    assert_eq!((o.merged_deltas, o.runs_after), (4, 1), "{o:?}");
    // Covered deltas are deleted once the root settled (settle 0 here: at the next run).
    for i in 10..14 {
        packs.push(delta(&store, 100, i).await);
    }
    let o = compact::run(&store, &pol, Mode::Auto, false, None, None)
        .await
        .unwrap();
    assert!(o.deleted > 0, "{o:?}");
    let budget = 64 << 10;
    let set = IndexSet::with_options(store.clone(), IndexOptions { budget, ..quick() });
    all_found(&set, &packs).await;
    let v = set.view().await.unwrap();
    assert!(v.root.base.as_ref().unwrap().shard_bits >= 2);
    assert_eq!(v.uncovered().0, 0);
    assert!(
        set.loaded_bytes() <= budget,
        "{} > {budget}",
        set.loaded_bytes()
    );
    // Every compaction published a root; the full rewrite joins all of them into one base.
    let o = compact::run(&store, &pol, Mode::Full, false, None, None)
        .await
        .unwrap();
    assert_eq!(o.runs_after, 0);
    let fresh = IndexSet::with_options(store.clone(), quick());
    all_found(&fresh, &packs).await;
    // The old reader's objects are gone (settle 0): it takes a new view and still finds all.
    let o = compact::run(&store, &pol, Mode::Full, false, None, None)
        .await
        .unwrap();
    assert!(o.deleted > 0, "{o:?}");
    all_found(&set, &packs).await;
}

#[tokio::test]
async fn a_second_reader_starts_from_the_local_cache() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let mut packs = Vec::new();
    for i in 0..5 {
        packs.push(delta(&store, 200, i).await);
    }
    compact::run(&store, &small_policy(), Mode::Full, false, None, None)
        .await
        .unwrap();
    packs.push(delta(&store, 50, 99).await);
    let dir = tempfile::tempdir().unwrap();
    let opts = IndexOptions {
        cache_dir: Some(dir.path().to_owned()),
        ..quick()
    };
    let first = IndexSet::with_options(store.clone(), opts.clone());
    first.set_repository_id("r1");
    all_found(&first, &packs).await;
    let second = IndexSet::with_options(store.clone(), opts.clone());
    second.set_repository_id("r1");
    let v = second.view().await.unwrap();
    assert_eq!(v.uncovered().0, 1);
    // Root and delta came from the cache: nothing downloaded for the view.
    assert_eq!(second.stats().fetched_objects.load(Ordering::Relaxed), 0);
    assert_eq!(second.stats().cache_hits.load(Ordering::Relaxed), 2);
    all_found(&second, &packs).await;
    // A damaged cache file is refused and fetched again.
    let cached = dir.path().join("r1").join(v.root_key.as_deref().unwrap());
    std::fs::write(&cached, b"{}").unwrap();
    let third = IndexSet::with_options(store.clone(), opts);
    third.set_repository_id("r1");
    all_found(&third, &packs).await;
    assert!(third.stats().fetched_objects.load(Ordering::Relaxed) >= 1);
    assert_ne!(std::fs::read(&cached).unwrap(), b"{}");
}

#[tokio::test]
async fn dedup_confirms_filter_hits() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let mut packs = Vec::new();
    for i in 0..5 {
        packs.push(delta(&store, 300, i).await);
    }
    compact::run(&store, &small_policy(), Mode::Full, false, None, None)
        .await
        .unwrap();
    packs.push(delta(&store, 20, 77).await);
    let d = Dedup::load(Arc::new(IndexSet::new(store.clone())))
        .await
        .unwrap();
    for p in &packs {
        for e in &p.entries {
            assert!(d.maybe(&e.id));
            assert!(d.contains(&e.id).await.unwrap());
        }
    }
    let mut maybes = 0;
    for i in 0..2000u32 {
        let id = Id::of(&(i + 1_000_000).to_le_bytes());
        maybes += d.maybe(&id) as usize;
        assert!(!d.contains(&id).await.unwrap());
    }
    assert!(maybes < 40, "{maybes} false positives of 2000");
    assert!(d.memory() < 16 << 10, "{}", d.memory());
}

#[tokio::test]
async fn tombstones_are_not_known_to_writers() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let p = pack_of(3, 5);
    let mut es: Vec<TableEntry> = p
        .entries
        .iter()
        .map(|e| TableEntry {
            id: e.id,
            pack: p.id,
            kind: p.kind,
            offset: e.offset,
            stored_len: e.stored_len,
            raw_len: e.raw_len,
            flags: e.flags,
            deleted: 0,
        })
        .collect();
    es[0].deleted = 29_000_000;
    let (name, bytes) = table::encode(TableKind::Delta, 0, 0, es);
    store
        .put(
            &format!("{DELTAS_PREFIX}{}", name.to_hex()),
            Bytes::from(bytes),
        )
        .await
        .unwrap();
    let d = Dedup::load(Arc::new(IndexSet::new(store.clone())))
        .await
        .unwrap();
    assert!(!d.contains(&p.entries[0].id).await.unwrap());
    assert!(d.contains(&p.entries[1].id).await.unwrap());
    // Readers still find the location (the pack may still be there).
    let set = IndexSet::new(store);
    assert!(set.lookup(&p.entries[0].id).await.is_ok());
    let _ = SystemTime::now();
}
