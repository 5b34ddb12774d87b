//! The planner on hand-made listings, and a compaction crashed at every store write.

use super::*;
use crate::index::tests::{delta, small_policy};
use crate::index::{IndexOptions, IndexSet};
use crate::pack::FinishedPack;
use backtree_store::{Fault, FaultyStore, MemoryStore};

fn obj(key: &str, size: u64, age_secs: u64) -> ObjectInfo {
    ObjectInfo {
        key: key.to_owned(),
        size,
        modified: Some(SystemTime::now() - Duration::from_secs(age_secs)),
    }
}

fn hex(n: u8) -> String {
    crate::id::Id::of(&[n]).to_hex()
}

/// The plan for a listing and root without protected roots (no deletions), now.
fn plan_now(l: &Listing, root: &Root, mode: Mode) -> Plan {
    plan(l, root, &[], SystemTime::now(), &policy(), mode)
}

fn policy() -> Policy {
    Policy {
        settle: Duration::from_secs(100),
        ..Policy::default()
    }
}

#[test]
fn nothing_is_due_until_enough_deltas() {
    let mut l = Listing::default();
    for i in 0..31 {
        l.deltas
            .push(obj(&format!("{DELTAS_PREFIX}{}", hex(i)), 10_000, 5));
    }
    let p = plan_now(&l, &Root::empty(), Mode::Auto);
    assert_eq!(p.step, Step::Nothing);
    l.deltas
        .push(obj(&format!("{DELTAS_PREFIX}{}", hex(99)), 10_000, 5));
    let p = plan_now(&l, &Root::empty(), Mode::Auto);
    assert!(
        matches!(&p.step, Step::Full { deltas } if deltas.len() == 32),
        "{p:?}"
    );
    // One big delta is due by its entries alone.
    let mut one = Listing::default();
    one.deltas
        .push(obj(&format!("{DELTAS_PREFIX}{}", hex(1)), 84 * 200_000, 5));
    let p = plan_now(&one, &Root::empty(), Mode::Auto);
    assert!(matches!(p.step, Step::Full { .. }));
    // `maintain index` on a repository that is one base already does nothing.
    let p = plan_now(&Listing::default(), &Root::empty(), Mode::Full);
    assert_eq!(p.step, Step::Nothing);
}

fn big_root(runs: &[u64]) -> Root {
    let mut r = Root::empty();
    r.seq = 3;
    r.base = Some(Base {
        shard_bits: 0,
        shards: vec![TableRef {
            table: hex(200),
            fanout_bits: 10,
            entries: 50_000_000,
            filter: None,
        }],
        filter: hex(201),
        entries: 50_000_000,
    });
    r.runs = runs
        .iter()
        .enumerate()
        .map(|(i, &n)| TableRef {
            table: hex(100 + i as u8),
            fanout_bits: 4,
            entries: n,
            filter: Some(hex(150 + i as u8)),
        })
        .collect();
    r
}

#[test]
fn a_large_index_merges_deltas_into_size_tiered_runs() {
    let mut l = Listing::default();
    for i in 0..40 {
        // ~1 000 entries each: 40 000 entries of new deltas.
        l.deltas
            .push(obj(&format!("{DELTAS_PREFIX}{}", hex(i)), 84_000, 5));
    }
    // Runs of 30 000 and 70 000 join (each at most twice what was gathered so far); the run of
    // 400 000 does not (too big for this merge), nor the one of 2 000 000.
    let root = big_root(&[2_000_000, 70_000, 400_000, 30_000]);
    let p = plan_now(&l, &root, Mode::Auto);
    assert_eq!(
        p.step,
        Step::Run {
            deltas: l.deltas.iter().map(|o| o.key.clone()).collect(),
            runs: vec![1, 3]
        },
        "{}",
        p.why
    );
    // `maintain index` rewrites everything.
    let p = plan_now(&l, &root, Mode::Full);
    assert!(matches!(p.step, Step::Full { .. }));
}

/// The protected roots' bodies, as `run` reads them.
fn protected(l: &Listing, bodies: &[(&str, &Root)]) -> Vec<(String, Root)> {
    protected_roots(l, SystemTime::now(), policy().settle)
        .into_iter()
        .map(|k| {
            let r = bodies.iter().find(|(b, _)| *b == k).unwrap().1.clone();
            (k, r)
        })
        .collect()
}

#[test]
fn deletions_wait_for_a_settled_root_and_keep_pace_with_new_ones() {
    // R1 (seq 2) used table 7 and filter 9; R2 (seq 3) uses tables 200, 100 and covers delta 1.
    let mut r1 = big_root(&[]);
    r1.seq = 2;
    r1.base.as_mut().unwrap().shards[0].table = hex(7);
    r1.base.as_mut().unwrap().filter = hex(9);
    let (k1, _) = r1.encode();
    let mut r2 = big_root(&[10]);
    r2.covers = vec![hex(1)];
    let (k2, _) = r2.encode();
    let mut l = Listing {
        deltas: vec![
            obj(&format!("{DELTAS_PREFIX}{}", hex(1)), 10, 500),
            obj(&format!("{DELTAS_PREFIX}{}", hex(2)), 10, 500),
        ],
        tables: vec![
            obj(&format!("{TABLES_PREFIX}{}", hex(200)), 10, 500),
            obj(&format!("{TABLES_PREFIX}{}", hex(100)), 10, 500),
            obj(&format!("{TABLES_PREFIX}{}", hex(7)), 10, 500),
            obj(&format!("{TABLES_PREFIX}{}", hex(8)), 10, 50),
        ],
        filters: vec![
            obj(&format!("{FILTERS_PREFIX}{}", hex(201)), 10, 500),
            obj(&format!("{FILTERS_PREFIX}{}", hex(150)), 10, 500),
            obj(&format!("{FILTERS_PREFIX}{}", hex(9)), 10, 500),
        ],
        roots: vec![obj(&k1, 10, 500), obj(&k2, 10, 50)],
    };
    let bodies = [(k1.as_str(), &r1), (k2.as_str(), &r2)];
    let del = |l: &Listing, bodies: &[(&str, &Root)], current: &Root| {
        let mut d = plan(
            l,
            current,
            &protected(l, bodies),
            SystemTime::now(),
            &policy(),
            Mode::Auto,
        )
        .delete;
        d.sort();
        d
    };
    // R2 is 50 s old, the settle time 100 s: R1 (the newest settled root) and R2 are protected,
    // so nothing either uses goes, and delta 1 stays (R1 does not cover it).
    assert_eq!(del(&l, &bodies, &r2), Vec::<String>::new());
    // R2 settled: R1, the delta R2 covers, R1's table and filter go; the uncovered delta, R2's
    // own objects and the young table (a compaction in flight) stay.
    l.roots[1] = obj(&k2, 10, 150);
    let mut want = vec![
        k1.clone(),
        format!("{DELTAS_PREFIX}{}", hex(1)),
        format!("{TABLES_PREFIX}{}", hex(7)),
        format!("{FILTERS_PREFIX}{}", hex(9)),
    ];
    want.sort();
    assert_eq!(del(&l, &bodies, &r2), want);
    // A root newer than R2 published 10 s ago (roots come faster than the settle time): the same
    // deletions go ahead, and what the young root uses or does not cover stays.
    let mut r3 = big_root(&[10, 20]);
    r3.seq = 4;
    r3.runs[1].table = hex(8);
    r3.covers = vec![hex(1), hex(2)];
    let (k3, _) = r3.encode();
    l.roots.push(obj(&k3, 10, 10));
    let bodies3 = [(k1.as_str(), &r1), (k2.as_str(), &r2), (k3.as_str(), &r3)];
    assert_eq!(del(&l, &bodies3, &r3), want);
    // Objects of unknown age count as young.
    l.tables[2].modified = None;
    assert!(!del(&l, &bodies3, &r3).iter().any(|k| k.ends_with(&hex(7))));
}

async fn check_all(store: &DynStore, packs: &[FinishedPack]) {
    let set = IndexSet::with_options(
        store.clone(),
        IndexOptions {
            relist: Duration::from_millis(1),
            ..IndexOptions::default()
        },
    );
    for p in packs {
        for e in &p.entries {
            let loc = set
                .lookup(&e.id)
                .await
                .unwrap_or_else(|err| panic!("{err}"));
            assert_eq!((loc.pack, loc.offset), (p.id, e.offset));
        }
    }
}

/// A compaction (with deletions) crashed after every possible number of writes leaves an index
/// that finds every blob, and the next compaction completes.
#[tokio::test]
async fn a_crash_at_every_write_leaves_a_valid_index() {
    let mut n = 0;
    loop {
        let mem: DynStore = Arc::new(MemoryStore::new());
        let mut packs = Vec::new();
        for i in 0..5 {
            packs.push(delta(&mem, 200, i).await);
        }
        let pol = small_policy();
        run(&mem, &pol, Mode::Full, false, None, None)
            .await
            .unwrap();
        for i in 5..10 {
            packs.push(delta(&mem, 200, i).await);
        }
        let faulty = Arc::new(FaultyStore::new(mem.clone()));
        faulty.inject(Fault::FailWritesAfter(n));
        let store: DynStore = faulty.clone();
        let res = run(&store, &pol, Mode::Full, false, None, None).await;
        check_all(&mem, &packs).await;
        if !faulty.tripped() {
            res.unwrap();
            assert!(n > 5, "the compaction wrote only {n} objects");
            break;
        }
        // Either the compaction failed, or (a crash among its deletions, which are logged and
        // retried by the next compaction) it published its root.
        assert!(res.is_err() || res.is_ok_and(|o| o.root.is_some()));
        // The next compaction completes and the index is still whole.
        run(&mem, &pol, Mode::Full, false, None, None)
            .await
            .unwrap();
        check_all(&mem, &packs).await;
        n += 1;
    }
}

/// Many uncovered deltas are staged as intermediate runs (bounded memory) and end up in the
/// base like the others.
#[tokio::test]
async fn a_full_rewrite_stages_many_deltas_as_runs() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let mut packs = Vec::new();
    for i in 0..7 {
        packs.push(delta(&store, 300, i).await);
    }
    let pol = Policy {
        merge_limit: 700,
        ..small_policy()
    };
    let o = run(&store, &pol, Mode::Full, false, None, None)
        .await
        .unwrap();
    // 7 deltas of 300 in groups of at most 700 entries: 4 staged runs, then the shards.
    let shards = 1u64 << 3; // 2 100 entries, 500 per shard at most: 8 shards
    assert_eq!(o.tables_written as u64, 4 + shards, "{o:?}");
    assert_eq!(o.entries, 2_100);
    check_all(&store, &packs).await;
    // The staged runs are used by no root: the next settled deletion removes them.
    let o = run(&store, &pol, Mode::Full, false, None, None)
        .await
        .unwrap();
    assert!(o.deleted >= 4 + 7, "{o:?}");
    check_all(&store, &packs).await;
}

/// A delta too large to hold is read by bucket spans like a table (not staged, not held), and a
/// large delta holding tombstones is left to a prune.
#[tokio::test]
async fn a_full_rewrite_reads_large_deltas_like_tables() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let mut packs = Vec::new();
    for (i, n) in [(0, 900), (1, 100), (2, 800)] {
        packs.push(delta(&store, n, i).await);
    }
    let pol = Policy {
        merge_limit: 700,
        ..small_policy()
    };
    let o = run(&store, &pol, Mode::Full, false, None, None)
        .await
        .unwrap();
    // No staging: the 100-entry delta is held, the two large ones read per shard.
    assert_eq!(o.entries, 1_800);
    assert_eq!(o.merged_deltas, 3, "{o:?}");
    assert_eq!(o.tables_written, 4, "{o:?}"); // 1 800 entries, 500 per shard: 4 shards
    check_all(&store, &packs).await;

    // A large delta of tombstones is not merged by an ordinary compaction.
    let mut es = Vec::new();
    for e in &packs[0].entries {
        es.push(TableEntry {
            id: e.id,
            pack: packs[0].id,
            kind: packs[0].kind,
            offset: e.offset,
            stored_len: e.stored_len,
            raw_len: e.raw_len,
            flags: e.flags,
            deleted: 1,
        });
    }
    let (name, bytes) = table::encode(TableKind::Delta, 0, 0, es);
    let key = format!("{DELTAS_PREFIX}{}", name.to_hex());
    store.put(&key, Bytes::from(bytes)).await.unwrap();
    let o = run(&store, &pol, Mode::Full, false, None, None)
        .await
        .unwrap();
    assert_eq!(o.merged_deltas, 0, "{o:?}");
    assert!(store.head(&key).await.unwrap().is_some());
}
