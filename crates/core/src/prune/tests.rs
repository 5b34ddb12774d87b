//! Prune tests on a memory store: what stays is exactly what generations reference, young
//! packs and a held maintenance lease are respected, and an ingest running during a prune
//! never loses what it references.

use super::*;
use crate::config::{ChunkerParams, Config};
use crate::ingest::{self, IngestOptions, Progress};
use crate::pack::parse_pack;
use crate::testing::random_bytes;
use backtree_store::{MemoryStore, ObjectStore};
use std::path::Path;
use std::sync::{Arc, Mutex};

const DAY: Duration = Duration::from_secs(24 * 3600);

fn config() -> Config {
    let mut c = Config::new(true);
    c.chunker = ChunkerParams {
        min: 64,
        avg: 256,
        max: 1024,
        ..ChunkerParams::default()
    };
    c.pack_size = 8 * 1024;
    c
}

/// Generation `i`'s source: a file shared by all, one that changes every generation, one per
/// parity, and a directory that comes and goes.
fn source(dir: &Path, i: u64) -> std::path::PathBuf {
    let s = dir.join(format!("src{i}"));
    std::fs::create_dir_all(s.join("d")).unwrap();
    std::fs::write(s.join("shared.bin"), random_bytes(1, 20_000)).unwrap();
    std::fs::write(s.join("d/changing.bin"), random_bytes(100 + i, 10_000)).unwrap();
    std::fs::write(s.join("parity.bin"), random_bytes(i % 2, 5_000)).unwrap();
    if i.is_multiple_of(3) {
        std::fs::create_dir_all(s.join("sometimes")).unwrap();
        std::fs::write(s.join("sometimes/x"), random_bytes(50 + i, 3_000)).unwrap();
    }
    s
}

async fn ingest_at(repo: &Arc<Repository>, host: &str, src: &Path, day: u64) -> Manifest {
    let o = IngestOptions {
        host: host.into(),
        sources: vec![src.to_path_buf()],
        time: Some(
            chrono::DateTime::from_timestamp(1_767_225_600 + day as i64 * 86_400, 0).unwrap(),
        ),
        ..Default::default()
    };
    let r = repo.clone();
    let h = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || ingest::ingest(&r, &h, &o, &Progress::default(), &|_| {}))
        .await
        .unwrap()
        .unwrap()
        .manifest
}

async fn age_everything(mem: &MemoryStore, by: Duration) {
    let then = SystemTime::now() - by;
    for k in mem.list("").await.unwrap().into_iter().map(|o| o.key) {
        mem.set_modified(&k, then);
    }
}

fn opts() -> PruneOptions {
    let mut o = PruneOptions::default();
    o.plan.grace = DAY;
    o.plan.repack_threshold = 0.3;
    o.poll = Duration::from_millis(20);
    o.lease_margin = Duration::ZERO;
    o.policy.settle = Duration::ZERO;
    o
}

/// Blob id → pack keys holding it.
async fn stored_blobs(mem: &MemoryStore) -> HashMap<Id, Vec<String>> {
    let mut out: HashMap<Id, Vec<String>> = HashMap::new();
    for o in mem.list("packs/").await.unwrap() {
        let b = mem.get(&o.key).await.unwrap();
        for e in parse_pack(&o.key, &b).unwrap() {
            out.entry(e.id).or_default().push(o.key.clone());
        }
    }
    out
}

/// Every blob the repository's generations reference, each read and verified.
async fn referenced(repo: &Repository) -> HashSet<Id> {
    let mut seen: HashSet<Id> = HashSet::new();
    struct Fail(Vec<String>);
    impl Visitor for Fail {
        fn reference(&mut self, _: &Reference<'_>) {}
        fn problem(&mut self, p: Problem) {
            self.0.push(format!("{}: {}", p.path, p.error));
        }
    }
    for (host, names) in repo.all_generations().await.unwrap() {
        for n in names {
            let m = repo.manifest(&host, &n).await.unwrap();
            let mut f = Fail(vec![]);
            walk::walk_generation(repo, &m, &mut seen, &mut f).await;
            assert!(f.0.is_empty(), "{host}/{n}: {:?}", f.0);
        }
    }
    for id in &seen {
        repo.read_blob(id)
            .await
            .unwrap_or_else(|e| panic!("{id}: {e}"));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_stays_is_what_generations_reference() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemoryStore::new());
    let store: DynStore = mem.clone();
    let repo = Arc::new(
        Repository::init_with(store.clone(), config())
            .await
            .unwrap(),
    );
    let mut gens = Vec::new();
    for i in 0..6 {
        for host in ["a", "b"] {
            let src = source(dir.path(), i + if host == "b" { 10 } else { 0 });
            gens.push((ingest_at(&repo, host, &src, i).await, src));
        }
    }
    // Forget the first four generations of each host; compact the index, so that most deltas
    // are covered by a root (still listed until the settle time has passed).
    for (m, _) in gens.iter().take(8) {
        repo.forget(&m.host, &m.name).await.unwrap();
    }
    compact::run(&store, &Policy::default(), Mode::Full, false, None, None)
        .await
        .unwrap();
    age_everything(&mem, 2 * DAY).await;
    let before = stored_blobs(&mem).await;
    let want = referenced(&repo).await;
    assert!(before.len() > want.len() + 20, "the test forgets something");

    let dry = run(
        &repo,
        &PruneOptions {
            dry_run: true,
            ..opts()
        },
        &|_| {},
    )
    .await
    .unwrap();
    assert_eq!(
        stored_blobs(&mem).await.len(),
        before.len(),
        "a dry run changes nothing"
    );
    assert!(
        dry.plan.totals.delete_unused > 0 && dry.plan.totals.repack > 0,
        "{:?}",
        dry.plan.totals
    );

    let r = run(&repo, &opts(), &|_| {}).await.unwrap();
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    assert!(
        r.rescued.is_empty(),
        "nothing happened meanwhile: {:?}",
        r.rescued
    );
    assert_eq!(r.deleted_packs as u64, dry.plan.deletions().count() as u64);
    assert!(r.copied_blobs > 0 && r.tombstones > 0);
    // Every referenced blob is still readable (through a fresh repository handle too), and
    // every kept generation still reads as its source.
    assert_eq!(referenced(&repo).await, want);
    let fresh = Repository::open(store.clone()).await.unwrap();
    assert_eq!(referenced(&fresh).await, want);
    for (m, src) in gens.iter().skip(8) {
        let diff = crate::testing::compare(&fresh, &m.host, &m.name, src).await;
        assert!(diff.is_empty(), "{}/{}: {diff:?}", m.host, m.name);
    }
    // What is left: the referenced blobs, plus the unreferenced ones in packs used enough.
    let after = stored_blobs(&mem).await;
    assert!(want.iter().all(|id| after.contains_key(id)));
    let unreferenced = after.keys().filter(|id| !want.contains(id)).count();
    assert!(
        unreferenced * 4 < after.len(),
        "{unreferenced} of {}",
        after.len()
    );
    // The repacked copies are young: a second prune within the grace period keeps them, and
    // finds nothing else to do.
    let again = run(&repo, &opts(), &|_| {}).await.unwrap();
    assert_eq!(again.deleted_packs, 0, "{:?}", again.plan.totals);
    // Later, with everything old: nothing referenced goes.
    age_everything(&mem, 2 * DAY).await;
    run(&repo, &opts(), &|_| {}).await.unwrap();
    assert_eq!(
        referenced(&Repository::open(store).await.unwrap()).await,
        want
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn young_packs_stay_and_one_prune_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemoryStore::new());
    let store: DynStore = mem.clone();
    let repo = Arc::new(
        Repository::init_with(store.clone(), config())
            .await
            .unwrap(),
    );
    let m0 = ingest_at(&repo, "a", &source(dir.path(), 0), 0).await;
    ingest_at(&repo, "a", &source(dir.path(), 1), 1).await;
    repo.forget("a", &m0.name).await.unwrap();
    // Everything is young: nothing is deleted.
    let before = mem.list("packs/").await.unwrap().len();
    let r = run(&repo, &opts(), &|_| {}).await.unwrap();
    assert_eq!(
        (r.deleted_packs, r.plan.totals.kept_young as usize),
        (0, before)
    );
    assert_eq!(mem.list("packs/").await.unwrap().len(), before);

    // A live maintenance claim of another prune: refused, naming it.
    let other = format!("{}feedfacefeedface", claims_prefix(MAINTENANCE_KEY));
    let body = LeaseBody {
        session: "feedfacefeedface".into(),
        host: "elsewhere".into(),
        started: chrono::Utc::now().to_rfc3339(),
        expires: (chrono::Utc::now() + chrono::Duration::minutes(10)).to_rfc3339(),
        tool: "test".into(),
    };
    store
        .put(&other, Bytes::from(serde_json::to_vec(&body).unwrap()))
        .await
        .unwrap();
    let err = run(&repo, &opts(), &|_| {}).await.unwrap_err().to_string();
    assert!(
        err.contains("another maintenance job") && err.contains("elsewhere"),
        "{err}"
    );
    assert_eq!(
        mem.list("locks/").await.unwrap().len(),
        1,
        "the loser removed its claim"
    );
    // The same claim, expired (its prune was killed): ignored and tidied.
    let expired = LeaseBody {
        expires: (chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339(),
        ..body.clone()
    };
    store
        .put(&other, Bytes::from(serde_json::to_vec(&expired).unwrap()))
        .await
        .unwrap();
    run(&repo, &opts(), &|_| {}).await.unwrap();
    assert!(mem.list("locks/").await.unwrap().is_empty());
    // A dry run takes no lease.
    store
        .put(&other, Bytes::from(serde_json::to_vec(&body).unwrap()))
        .await
        .unwrap();
    run(
        &repo,
        &PruneOptions {
            dry_run: true,
            ..opts()
        },
        &|_| {},
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingests_during_a_prune_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemoryStore::new());
    let store: DynStore = mem.clone();
    let repo = Arc::new(
        Repository::init_with(store.clone(), config())
            .await
            .unwrap(),
    );
    let src0 = source(dir.path(), 3);
    let m0 = ingest_at(&repo, "a", &src0, 0).await;
    let src1 = source(dir.path(), 4);
    ingest_at(&repo, "a", &src1, 1).await;
    repo.forget("a", &m0.name).await.unwrap();
    age_everything(&mem, 2 * DAY).await;

    // An ingest that looked at the index before the prune marked anything: its lease is live.
    let lease = "leases/0123456789abcdef";
    let body = LeaseBody {
        session: "0123456789abcdef".into(),
        host: "a".into(),
        started: chrono::Utc::now().to_rfc3339(),
        expires: (chrono::Utc::now() + chrono::Duration::minutes(10)).to_rfc3339(),
        tool: "test".into(),
    };
    store
        .put(lease, Bytes::from(serde_json::to_vec(&body).unwrap()))
        .await
        .unwrap();

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let tx = Mutex::new(tx);
    let progress = move |l: &str| {
        let _ = tx.lock().unwrap().send(l.to_owned());
    };
    let o = opts();
    let pruning = run(&repo, &o, &progress);
    let meanwhile = async {
        while let Some(l) = rx.recv().await {
            if l.starts_with("waiting") {
                break;
            }
        }
        // While the prune waits: (1) that ingest commits a generation referencing the
        // forgotten generation's blobs, as it saw them before the tombstones (a copy of its
        // manifest);
        let mut late = m0.clone();
        late.name = "2026-01-05T000000Z".into();
        store
            .put(&Manifest::key("a", &late.name), Bytes::from(late.to_json()))
            .await
            .unwrap();
        // (2) a new ingest of the forgotten source, which sees the tombstones: it stores the
        // doomed blobs again instead of referencing them.
        let m2 = ingest_at(&repo, "b", &src0, 2).await;
        assert!(m2.stats.new_chunks > 0, "doomed blobs are stored again");
        // The first ingest ends.
        store.delete(lease).await.unwrap();
        (late, m2)
    };
    let (r, (late, m2)) = tokio::join!(pruning, meanwhile);
    let r = r.unwrap();
    assert_eq!(r.waited_for, vec![lease.to_owned()]);
    assert_eq!(r.new_generations, 2);
    assert!(!r.rescued.is_empty(), "{r:?}");
    // Every generation reads as its source, through a fresh handle.
    let fresh = Repository::open(store.clone()).await.unwrap();
    referenced(&fresh).await;
    for (host, name, src) in [("a", &late.name, &src0), ("b", &m2.name, &src0)] {
        let diff = crate::testing::compare(&fresh, host, name, src).await;
        assert!(diff.is_empty(), "{host}/{name}: {diff:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_generation_stops_the_prune_before_anything_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemoryStore::new());
    let store: DynStore = mem.clone();
    let repo = Arc::new(
        Repository::init_with(store.clone(), config())
            .await
            .unwrap(),
    );
    let m0 = ingest_at(&repo, "a", &source(dir.path(), 0), 0).await;
    ingest_at(&repo, "a", &source(dir.path(), 1), 1).await;
    repo.forget("a", &m0.name).await.unwrap();
    age_everything(&mem, 2 * DAY).await;
    // The tree packs go missing.
    for o in mem.list("packs/tree/").await.unwrap() {
        mem.delete(&o.key).await.unwrap();
    }
    let packs = mem.list("packs/").await.unwrap().len();
    let err = run(&repo, &opts(), &|_| {}).await.unwrap_err().to_string();
    assert!(
        err.contains("prune stopped before deleting anything") && err.contains("verify"),
        "{err}"
    );
    assert_eq!(mem.list("packs/").await.unwrap().len(), packs);
    assert!(
        mem.list("locks/").await.unwrap().is_empty(),
        "the lease is released"
    );
}
