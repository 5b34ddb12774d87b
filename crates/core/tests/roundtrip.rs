//! Library-level tests of the writer and reader: exact round trips, deduplication, and crash
//! safety with a failure-injecting store.

use backtree_core::config::{ChunkerParams, Config};
use backtree_core::ingest::{self, IngestOptions, Progress};
use backtree_core::testing::{build_fixture, compare, random_bytes, texty_bytes};
use backtree_core::Repository;
use backtree_store::{DynStore, Fault, FaultyStore, MemoryStore, ObjectStore};
use std::path::Path;
use std::sync::Arc;
use tokio::runtime::Handle;

/// A config with small chunks and packs, so small test trees exercise many chunks, separate
/// chunk-list blobs and many packs.
fn small_config() -> Config {
    let mut c = Config::new(true);
    c.chunker = ChunkerParams {
        min: 16 * 1024,
        avg: 64 * 1024,
        max: 256 * 1024,
        ..ChunkerParams::default()
    };
    c.pack_size = 256 * 1024;
    c
}

fn opts(host: &str, src: &Path) -> IngestOptions {
    IngestOptions {
        host: host.into(),
        sources: vec![src.to_path_buf()],
        ..Default::default()
    }
}

async fn run(
    repo: &Arc<Repository>,
    o: IngestOptions,
) -> backtree_core::Result<ingest::IngestReport> {
    let repo = repo.clone();
    let h = Handle::current();
    tokio::task::spawn_blocking(move || {
        ingest::ingest(&repo, &h, &o, &Progress::default(), &|_| {})
    })
    .await
    .expect("ingest thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_every_file_type_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let info = build_fixture(&src, true);
    let store: DynStore = Arc::new(MemoryStore::new());
    let repo = Arc::new(Repository::init_with(store, small_config()).await.unwrap());
    let r = run(&repo, opts("host1", &src)).await.unwrap();
    assert!(r.skipped.is_empty(), "skipped: {:?}", r.skipped);
    let diffs = compare(&repo, "host1", &r.manifest.name, &src).await;
    assert!(diffs.is_empty(), "differences: {diffs:#?}");

    // Spot checks of what the comparison relies on.
    let root = r.manifest.root.tree.unwrap();
    let e = repo.resolve(&root, b"multi.bin").await.unwrap().unwrap();
    assert!(
        e.chunk_list.is_some(),
        "a long chunk list is stored as its own blob"
    );
    let big = repo.resolve(&root, b"big-dir").await.unwrap().unwrap();
    assert!(
        repo.tree(&big.tree.unwrap()).await.unwrap().is_paged(),
        "large directories are paged"
    );
    let f = repo
        .resolve(&root, b"big-dir/f04200")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(f.size, 4);
    if info.sparse {
        let s = repo.resolve(&root, b"sparse.img").await.unwrap().unwrap();
        let list = repo.chunk_list(&s).await.unwrap();
        assert!(list.hole_bytes() >= 60 << 20, "holes recorded, not stored");
        assert_eq!(list.seek(0, false), Some(4096));
        assert_eq!(list.seek(4096, true), Some(10 << 20));
    }
    let small = repo.resolve(&root, b"small.txt").await.unwrap().unwrap();
    assert_eq!(small.xattr(b"user.comment"), Some(&b"kept"[..]));
    if info.acls {
        let s = repo.resolve(&root, b"secret").await.unwrap().unwrap();
        assert!(s.xattr(b"system.posix_acl_access").is_some());
        assert_eq!((s.uid, s.gid), (1234, 5678));
    }
    if info.capability {
        let s = repo.resolve(&root, b"setuid").await.unwrap().unwrap();
        assert!(s.xattr(b"security.capability").is_some());
        assert_eq!(s.mode, 0o4755);
    }
    let links = repo.links(&r.manifest).await.unwrap();
    let l = repo
        .resolve(&root, b"dir/sub/linked3")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(links.get(&l.link.unwrap()), Some(&3));

    // Random ranges read back exactly.
    // Read without touching the source's atime: the second ingest below must see it unchanged.
    let mut data = Vec::new();
    std::io::Read::read_to_end(
        &mut backtree_core::ingest::read::open_noatime(&src.join("multi.bin")).unwrap(),
        &mut data,
    )
    .unwrap();
    let list = repo.chunk_list(&e).await.unwrap();
    for (off, len) in [
        (0u64, 1u64),
        (65_535, 70_000),
        (5_999_990, 100),
        (1_234_567, 2_000_000),
    ] {
        let got = repo.read_range(&list, off, len).await.unwrap();
        let end = ((off + len) as usize).min(data.len());
        assert_eq!(got, &data[off as usize..end], "range {off}+{len}");
    }

    // A second, unchanged ingest reads nothing and stores (almost) nothing; the result is
    // still exact.
    let r2 = run(&repo, opts("host1", &src)).await.unwrap();
    let s = &r2.manifest.stats;
    assert_eq!(s.read_bytes, 0);
    assert!(s.new_stored_bytes * 100 < s.logical_bytes, "{s:?}");
    assert_eq!(
        r2.manifest.parent.as_deref(),
        Some(r.manifest.name.as_str())
    );
    // Deterministic trees: hardlink groups, pages and metadata encode identically, so the whole
    // unchanged tree (hardlinks included) is the same root blob.
    let d =
        backtree_core::testing::diff_generations(&repo, &r.manifest.root, &r2.manifest.root).await;
    assert!(d.is_empty(), "unchanged tree encoded differently: {d:#?}");
    assert_eq!(r2.manifest.root.tree, r.manifest.root.tree);
    let diffs = compare(&repo, "host1", &r2.manifest.name, &src).await;
    assert!(diffs.is_empty(), "differences: {diffs:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_sources_and_errors_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    std::fs::create_dir_all(a.join("etc")).unwrap();
    std::fs::create_dir_all(b.join("etc")).unwrap();
    std::fs::write(a.join("etc/x"), b"x").unwrap();
    std::fs::write(dir.path().join("dump.sql"), b"select 1;").unwrap();
    let mem = Arc::new(MemoryStore::new());
    let repo = Arc::new(Repository::init(mem.clone()).await.unwrap());
    let objects = mem.len();

    // A clash of names and a missing path are errors before anything is written.
    let mut o = opts("h", &a.join("etc"));
    o.sources.push(b.join("etc"));
    let err = run(&repo, o).await.unwrap_err().to_string();
    assert!(err.contains("\"etc\""), "{err}");
    let err = run(&repo, opts("h", &dir.path().join("missing")))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not exist") && err.contains("missing"),
        "{err}"
    );
    let err = run(&repo, opts("bad/host", &a))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid host name"), "{err}");
    assert_eq!(mem.len(), objects, "nothing written");

    // Several paths appear at the root under their names; excludes apply.
    let mut o = opts("h", &a.join("etc"));
    o.sources.push(dir.path().join("dump.sql"));
    o.label = Some("nightly".into());
    let r = run(&repo, o).await.unwrap();
    let root = r.manifest.root.tree.unwrap();
    let names = dir_names(&repo, &root).await;
    assert_eq!(names, [b"dump.sql".to_vec(), b"etc".to_vec()]);
    assert_eq!(r.manifest.label.as_deref(), Some("nightly"));

    let mut o = opts("h2", &a);
    o.excludes = vec!["x".into()];
    let r = run(&repo, o).await.unwrap();
    let e = repo
        .resolve(&r.manifest.root.tree.unwrap(), b"etc")
        .await
        .unwrap()
        .unwrap();
    assert!(
        repo.dir_entries(&e.tree.unwrap()).await.unwrap().is_empty(),
        "excluded by name"
    );
    let mut o = opts("h2", &a);
    o.excludes = vec!["etc/*".into()];
    let r = run(&repo, o).await.unwrap();
    let e = repo
        .resolve(&r.manifest.root.tree.unwrap(), b"etc")
        .await
        .unwrap()
        .unwrap();
    assert!(
        repo.dir_entries(&e.tree.unwrap()).await.unwrap().is_empty(),
        "excluded by path"
    );
    assert!(run(&repo, {
        let mut o = opts("h2", &a);
        o.excludes = vec!["[".into()];
        o
    })
    .await
    .is_err());

    // Two ingests of one host within the same second both become generations.
    let t = chrono::DateTime::parse_from_rfc3339("2026-11-20T01:00:00Z")
        .unwrap()
        .to_utc();
    for _ in 0..3 {
        let mut o = opts("same", &a);
        o.time = Some(t);
        run(&repo, o).await.unwrap();
    }
    assert_eq!(
        repo.generations("same").await.unwrap(),
        [
            "2026-11-20T010000Z",
            "2026-11-20T010000Z-2",
            "2026-11-20T010000Z-3"
        ]
    );
    // A name forgotten a moment ago is not taken again within its second: readers (a mount)
    // know a generation by its name.
    repo.forget("same", "2026-11-20T010000Z").await.unwrap();
    let mut o = opts("same", &a);
    o.time = Some(t);
    run(&repo, o).await.unwrap();
    assert_eq!(
        repo.generations("same").await.unwrap(),
        [
            "2026-11-20T010000Z-2",
            "2026-11-20T010000Z-3",
            "2026-11-20T010000Z-4"
        ]
    );
    assert_eq!(repo.hosts().await.unwrap(), ["h", "h2", "same"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_changed_byte_in_a_1gb_file_stores_about_one_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("vm");
    std::fs::create_dir(&src).unwrap();
    let img = src.join("disk.img");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&img).unwrap();
        for i in 0..64 {
            f.write_all(&random_bytes(i, 16 << 20)).unwrap();
        }
    }
    let store: DynStore = Arc::new(MemoryStore::new());
    let repo = Arc::new(Repository::init(store).await.unwrap());
    let first = run(&repo, opts("vm", &src)).await.unwrap().manifest.stats;
    assert_eq!(first.read_bytes, 1 << 30);

    let unchanged = run(&repo, opts("vm", &src)).await.unwrap().manifest.stats;
    assert!(unchanged.new_stored_bytes * 100 < unchanged.logical_bytes);

    // Change one byte in the middle; the file's mtime changes with it.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&[0x42], 500_000_000).unwrap();
    }
    backtree_core::testing::set_times(&img, (1_700_000_000, 0), (1_700_000_000, 0));
    let r = run(&repo, opts("vm", &src)).await.unwrap();
    let s = &r.manifest.stats;
    assert_eq!(s.read_bytes, 1 << 30, "the changed file is read again");
    // One data chunk (plus possibly its neighbour if the boundary moved), a chunk list and a
    // directory: at most a few chunks, at most 2 × 8 MiB of data.
    assert!(s.new_chunks <= 5, "{s:?}");
    assert!(s.new_raw_bytes <= 16 << 20, "{s:?}");
    let diffs = compare(&repo, "vm", &r.manifest.name, &src).await;
    assert!(diffs.is_empty(), "{diffs:?}");
}

/// Kills the writer after every possible number of successful writes: no generation appears,
/// the repository stays readable, and the next ingest completes and reuses what was stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_killed_at_any_write_leaves_no_generation() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    build_fixture(&src, false);
    let mut o = opts("crash", &src);
    o.checkpoint_bytes = Some(512 * 1024);

    // Count the writes of a clean ingest.
    let clean_faulty = Arc::new(FaultyStore::new(Arc::new(MemoryStore::new())));
    let repo = Arc::new(
        Repository::init_with(clean_faulty.clone(), small_config())
            .await
            .unwrap(),
    );
    let base = clean_faulty.writes();
    let full = run(&repo, o.clone())
        .await
        .unwrap()
        .manifest
        .stats
        .new_stored_bytes;
    let total = clean_faulty.writes() - base;
    assert!(total > 10, "expected many writes, got {total}");

    let mut reused_somewhere = false;
    let mut failures = 0;
    for k in 0..total {
        let mem = Arc::new(MemoryStore::new());
        let faulty = Arc::new(FaultyStore::new(mem.clone()));
        let repo = Arc::new(
            Repository::init_with(faulty.clone(), small_config())
                .await
                .unwrap(),
        );
        faulty.inject(Fault::FailWritesAfter(faulty.writes() + k));
        // The number of writes varies a little between runs (index checkpoints depend on timing
        // in the parallel walk, and a failed checkpoint delete is tolerated on purpose), so the
        // invariant is: a failed ingest leaves no generation; a successful one is exact.
        match run(&repo, o.clone()).await {
            Err(_) => {
                failures += 1;
                assert!(
                    repo.hosts().await.unwrap().is_empty(),
                    "no generation after a failure at write {k}"
                );
            }
            Ok(r) => {
                let diffs = compare(&repo, "crash", &r.manifest.name, &src).await;
                assert!(
                    diffs.is_empty(),
                    "survived a failure at write {k}: {diffs:?}"
                );
                continue;
            }
        }
        // Every index entry that was written points at a stored pack.
        for obj in mem.list("index/deltas/").await.unwrap() {
            let bytes = mem.get(&obj.key).await.unwrap();
            for (_, loc) in backtree_core::index::parse_file(&obj.key, &bytes).unwrap() {
                assert!(
                    mem.head(&loc.pack_key()).await.unwrap().is_some(),
                    "index names a missing pack"
                );
            }
        }
        // A fresh writer (a new process) completes and produces an exact generation.
        faulty.heal();
        let repo = Arc::new(Repository::open(faulty.clone()).await.unwrap());
        let r = run(&repo, o.clone()).await.unwrap();
        if r.manifest.stats.new_stored_bytes < full {
            reused_somewhere = true;
        }
        let diffs = compare(&repo, "crash", &r.manifest.name, &src).await;
        assert!(diffs.is_empty(), "after failure at write {k}: {diffs:?}");
    }
    assert!(
        reused_somewhere,
        "a retry after a late failure reuses checkpointed packs"
    );
    assert!(
        failures * 4 >= total * 3,
        "most injected failures must fail the ingest: {failures} of {total}"
    );
}

/// On a store that ignores create-if-absent (as Garage does), ingests of one host committing
/// in the same second all become generations: none overwrites another's manifest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_second_ingests_on_a_store_ignoring_conditions_all_commit() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"x").unwrap();
    let faulty = Arc::new(FaultyStore::new(Arc::new(MemoryStore::new())));
    faulty.inject(Fault::IgnoreCreateIfAbsent);
    let store: DynStore = faulty.clone();
    let repo = Arc::new(Repository::init(store).await.unwrap());
    assert!(!repo.config().store_create_if_absent);
    let time = chrono::DateTime::parse_from_rfc3339("2026-11-20T01:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    for round in 0..5 {
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let mut o = opts("web1", &src);
            o.time = Some(time);
            tasks.push(tokio::spawn({
                let repo = repo.clone();
                async move { run(&repo, o).await.unwrap().manifest.name }
            }));
        }
        let mut names = Vec::new();
        for t in tasks {
            names.push(t.await.unwrap());
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 6, "round {round}: {names:?}");
        let gens = repo.generations("web1").await.unwrap();
        assert_eq!(gens.len(), 6 * (round + 1), "round {round}: {gens:?}");
    }
    // No claims are left behind.
    let left: Vec<_> = faulty
        .list("snapshots/web1/")
        .await
        .unwrap()
        .into_iter()
        .filter(|o| o.key.contains(".claim-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Files larger than a read batch (16 MiB) between small files, with one walk thread and with
/// more walk threads than large-file permits: the walk finishes. Two deadlocks this guards
/// against: hashing on the walk pool while a walk thread blocks for the results (with one walk
/// thread, always), and waiting for hashing jobs inside a rayon scope, where the waiting thread
/// ran another large file's walk job, which blocked for a permit held by a waiting thread
/// (seen on /usr, not reproduced deterministically here; `read_file` now never waits inside
/// rayon while it holds a permit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_large_files_in_parallel_do_not_deadlock() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    for d in 0..4u64 {
        let sub = src.join(format!("d{d}"));
        std::fs::create_dir_all(&sub).unwrap();
        for i in 0..3u64 {
            let big = random_bytes(d * 10 + i, (16 << 20) + 4096);
            std::fs::write(sub.join(format!("big{i}")), big).unwrap();
        }
        for i in 0..50u64 {
            std::fs::write(sub.join(format!("small{i}")), random_bytes(i, 1000)).unwrap();
        }
    }
    for threads in [1, 8] {
        let store: DynStore = Arc::new(MemoryStore::new());
        let repo = Arc::new(Repository::init(store).await.unwrap());
        let mut o = opts("h", &src);
        o.threads = Some(threads);
        let r = tokio::time::timeout(std::time::Duration::from_secs(300), run(&repo, o))
            .await
            .expect("the ingest finishes")
            .unwrap();
        let diffs = compare(&repo, "h", &r.manifest.name, &src).await;
        assert!(diffs.is_empty(), "{threads} threads: {diffs:?}");
    }
}

/// Ingests `o` plus `stream`, as the CLI's `--stdin` does.
async fn run_stream(
    repo: &Arc<Repository>,
    o: IngestOptions,
    stream: ingest::Stream<'static>,
) -> backtree_core::Result<ingest::IngestReport> {
    let repo = repo.clone();
    let h = Handle::current();
    tokio::task::spawn_blocking(move || {
        ingest::ingest_with(&repo, &h, &o, Some(stream), &Progress::default(), &|_| {})
    })
    .await
    .expect("ingest thread")
}

fn no_sources(host: &str) -> IngestOptions {
    IngestOptions {
        host: host.into(),
        ..Default::default()
    }
}

/// A real pipe fed by a thread in pieces of 100 000 bytes, as a producer writes. (An ingest
/// that fails before reading closes the pipe: the writer then stops.)
fn piped(data: Vec<u8>) -> Box<dyn std::io::Read + Send> {
    let (reader, mut writer) = std::io::pipe().unwrap();
    std::thread::spawn(move || {
        for piece in data.chunks(100_000) {
            if std::io::Write::write_all(&mut writer, piece).is_err() {
                return;
            }
        }
    });
    Box::new(reader)
}

/// About 40 MiB of dump-like content: text, a block repeated three times, random data.
fn dump_bytes() -> Vec<u8> {
    let block = texty_bytes(11, 6 << 20);
    let mut data = texty_bytes(10, 10 << 20);
    for _ in 0..3 {
        data.extend_from_slice(&block);
    }
    data.extend_from_slice(&random_bytes(12, 12 << 20));
    data
}

async fn read_whole(repo: &Repository, root: &backtree_core::id::Id, path: &[u8]) -> Vec<u8> {
    let e = repo.resolve(root, path).await.unwrap().unwrap();
    let list = repo.chunk_list(&e).await.unwrap();
    let data = repo.read_range(&list, 0, e.size).await.unwrap();
    assert_eq!(data.len() as u64, e.size);
    data
}

/// A stream is stored as one file, byte-exact, alone or beside a directory; a second night's
/// stream with 1% changed stores little; its metadata are the given or the defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_round_trip_alone_beside_a_directory_and_deduplicated() {
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("meta");
    std::fs::create_dir_all(meta.join("DISK-xvda")).unwrap();
    std::fs::write(meta.join("vm.cfg"), b"name = vm42\n").unwrap();
    std::fs::write(meta.join("DISK-xvda/vbd.cfg"), b"bootable = true\n").unwrap();
    let store: DynStore = Arc::new(MemoryStore::new());
    let repo = Arc::new(Repository::init_with(store, small_config()).await.unwrap());
    let data = dump_bytes();

    // Alone: the root holds just the file, with the default metadata.
    let time = chrono::DateTime::parse_from_rfc3339("2026-11-20T03:25:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let mut o = no_sources("vcenter");
    o.time = Some(time);
    let r = run_stream(
        &repo,
        o,
        ingest::Stream::new("postgres.sql", "stdin", piped(data.clone())),
    )
    .await
    .unwrap();
    let root = r.manifest.root.tree.unwrap();
    let entries = repo.dir_entries(&root).await.unwrap();
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!(e.name, b"postgres.sql");
    assert_eq!(e.kind, backtree_core::tree::Kind::File);
    assert_eq!(e.mode, 0o600);
    assert_eq!(
        (e.uid, e.gid),
        (unsafe { libc::geteuid() }, unsafe { libc::getegid() })
    );
    assert_eq!(e.mtime.0, time.timestamp());
    assert_eq!(e.size, data.len() as u64);
    assert!(e.chunk_list.is_some(), "a long chunk list is its own blob");
    assert!(read_whole(&repo, &root, b"postgres.sql").await == data);
    let s = &r.manifest.stats;
    assert_eq!((s.files, s.dirs), (1, 0));
    assert_eq!(s.logical_bytes, data.len() as u64);
    assert_eq!(s.read_bytes, data.len() as u64);
    // The repeated block is stored once.
    assert!(s.new_raw_bytes < data.len() as u64 - (10 << 20), "{s:?}");
    assert_eq!(r.manifest.sources, ["stdin:postgres.sql"]);

    // The next night: 1% changed in four places. Little is new, and the result is exact.
    let mut night2 = data.clone();
    for at in [1 << 20, 9 << 20, 20 << 20, 35 << 20] {
        night2[at..at + 100_000].copy_from_slice(&random_bytes(at as u64, 100_000));
    }
    let r2 = run_stream(
        &repo,
        no_sources("vcenter"),
        ingest::Stream::new(
            "postgres.sql",
            "stdin",
            Box::new(std::io::Cursor::new(night2.clone())),
        ),
    )
    .await
    .unwrap();
    let s = &r2.manifest.stats;
    assert_eq!(s.read_bytes, night2.len() as u64, "a stream is always read");
    assert!(
        s.new_raw_bytes < 3 << 20,
        "1% changed, {} new",
        s.new_raw_bytes
    );
    let root2 = r2.manifest.root.tree.unwrap();
    assert!(read_whole(&repo, &root2, b"postgres.sql").await == night2);

    // Beside a directory, with given metadata: the directory appears under its own name.
    let mtime = chrono::DateTime::parse_from_rfc3339("2026-11-19T22:00:00.5Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let mut stream = ingest::Stream::new("vm42.xva", "stdin", piped(data.clone()));
    stream.mode = 0o640;
    stream.owner = Some((26, 27));
    stream.mtime = Some(mtime);
    let r3 = run_stream(&repo, opts("vm42", &meta), stream)
        .await
        .unwrap();
    let root3 = r3.manifest.root.tree.unwrap();
    let names = dir_names(&repo, &root3).await;
    assert_eq!(names, [b"meta".to_vec(), b"vm42.xva".to_vec()]);
    let e = repo.resolve(&root3, b"vm42.xva").await.unwrap().unwrap();
    assert_eq!((e.mode, e.uid, e.gid), (0o640, 26, 27));
    assert_eq!((e.mtime.0, e.mtime.1), (mtime.timestamp(), 500_000_000));
    assert!(read_whole(&repo, &root3, b"vm42.xva").await == data);
    assert_eq!(
        read_whole(&repo, &root3, b"meta/DISK-xvda/vbd.cfg").await,
        b"bootable = true\n"
    );
    let s = &r3.manifest.stats;
    assert_eq!(s.files, 3);
    assert_eq!(s.logical_bytes, data.len() as u64 + 12 + 16);
    assert!(s.new_raw_bytes < 1 << 20, "the same stream again: {s:?}");
}

/// An empty stream, a bad name, a clash with a path's name and a read error fail the ingest,
/// and nothing is committed; `allow_empty` stores an empty file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_errors_commit_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("meta")).unwrap();
    std::fs::write(dir.path().join("meta/vm42.xva"), b"x").unwrap();
    let mem = Arc::new(MemoryStore::new());
    let repo = Arc::new(Repository::init(mem.clone()).await.unwrap());
    let objects = mem.len();
    let empty = || Box::new(std::io::empty()) as Box<dyn std::io::Read + Send>;

    let err = run_stream(
        &repo,
        no_sources("h"),
        ingest::Stream::new("db.sql", "stdin", empty()),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "stdin gave no data for db.sql; pass --allow-empty to store an empty file"
    );
    for bad in ["", ".", "..", "a/b", "/etc", "a\0b"] {
        let err = run_stream(
            &repo,
            no_sources("h"),
            ingest::Stream::new(bad, "stdin", piped(b"data".to_vec())),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, backtree_core::Error::InvalidStreamName { .. }),
            "{bad:?}: {err}"
        );
    }
    // The stream's name against a path's name (the directory's files are not at the root).
    let clash = |name: &str| ingest::Stream::new(name, "stdin", piped(b"data".to_vec()));
    let mut o = opts("h", &dir.path().join("meta/vm42.xva"));
    o.sources.push(dir.path().join("meta"));
    let err = run_stream(&repo, o, clash("meta"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"meta\"") && err.contains("stdin"), "{err}");
    let err = run_stream(
        &repo,
        opts("h", &dir.path().join("meta/vm42.xva")),
        clash("vm42.xva"),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("\"vm42.xva\""), "{err}");

    assert_eq!(mem.len(), objects, "nothing written");

    // A read error after some data (EIO on stdin).
    struct Failing(u64);
    impl std::io::Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 >= 20 << 20 {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            let n = buf.len().min(1 << 16);
            buf[..n].fill(self.0 as u8);
            self.0 += n as u64;
            Ok(n)
        }
    }
    let err = run_stream(
        &repo,
        no_sources("h"),
        ingest::Stream::new("vm.xva", "stdin", Box::new(Failing(0))),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("reading stdin for vm.xva: ") && err.contains("Input/output error"),
        "{err}"
    );
    assert!(
        repo.generations("h").await.unwrap().is_empty(),
        "nothing committed"
    );

    let mut s = ingest::Stream::new("db.sql", "stdin", empty());
    s.allow_empty = true;
    let r = run_stream(&repo, no_sources("h"), s).await.unwrap();
    let e = repo
        .resolve(&r.manifest.root.tree.unwrap(), b"db.sql")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.size, 0);
    assert_eq!(r.manifest.stats.files, 1);
}

/// The names in a directory, in order.
async fn dir_names(repo: &Repository, dir: &backtree_core::id::Id) -> Vec<Vec<u8>> {
    repo.dir_entries(dir)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect()
}

/// Tiny chunks and pages of 4 pieces, so a few hundred KB make hundreds of pages under several
/// index levels; `paged`: whether the repository has the `paged-chunk-lists` feature.
fn tiny_config(paged: bool) -> Config {
    let mut c = Config::new(true);
    c.chunker = ChunkerParams {
        min: 64,
        avg: 256,
        max: 1024,
        ..ChunkerParams::default()
    };
    c.chunk_list_page = Some(4);
    if !paged {
        c.mandatory_features.clear();
    }
    c
}

/// A sparse file: data, a hole, data, a hole, data (holes only where the filesystem keeps them).
fn write_sparse(path: &Path) -> Vec<u8> {
    use std::io::{Seek, SeekFrom, Write};
    let mut data = vec![0u8; 1 << 20];
    for (i, at) in [0usize, 400 << 10, 900 << 10].into_iter().enumerate() {
        let part = backtree_core::testing::random_bytes(40 + i as u64, 100 << 10);
        data[at..at + part.len()].copy_from_slice(&part);
    }
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(data.len() as u64).unwrap();
    for at in [0usize, 400 << 10, 900 << 10] {
        f.seek(SeekFrom::Start(at as u64)).unwrap();
        f.write_all(&data[at..at + (100 << 10)]).unwrap();
    }
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_chunk_lists_read_every_range_and_old_repositories_stay_whole() {
    use backtree_core::chunklist::{decode_index, is_index, FileChunks};
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let dense = backtree_core::testing::random_bytes(7, 300 << 10);
    std::fs::write(src.join("dense.bin"), &dense).unwrap();
    let sparse = write_sparse(&src.join("sparse.img"));
    for paged in [true, false] {
        let store: DynStore = Arc::new(MemoryStore::new());
        let repo = Arc::new(
            Repository::init_with(store, tiny_config(paged))
                .await
                .unwrap(),
        );
        let r = run(&repo, opts("h", &src)).await.unwrap();
        assert!(r.skipped.is_empty(), "skipped: {:?}", r.skipped);
        let diffs = compare(&repo, "h", &r.manifest.name, &src).await;
        assert!(diffs.is_empty(), "differences: {diffs:#?}");
        let root = r.manifest.root.tree.unwrap();
        for (name, data) in [(&b"dense.bin"[..], &dense), (b"sparse.img", &sparse)] {
            let e = repo.resolve(&root, name).await.unwrap().unwrap();
            let list_id = e.chunk_list.expect("a long list is not inline");
            let raw = repo.read_blob(&list_id).await.unwrap();
            assert_eq!(is_index(&raw), paged, "paged only with the feature");
            if paged {
                let (level, records) = decode_index("root", &raw).unwrap();
                assert!(level >= 3, "several index levels: {level}");
                assert!(records.len() <= 4);
            }
            let whole = repo.chunk_list(&e).await.unwrap();
            assert!(whole.0.len() > 300, "{} pieces", whole.0.len());
            let file = repo.file_chunks(&e).await.unwrap();
            assert_eq!(matches!(file, FileChunks::Paged(_)), paged);
            assert_eq!(file.size(), data.len() as u64);
            // Every byte through ranges of several lengths, and each piece's edges.
            for len in [1u64, 777, 4096, 65_536] {
                let mut off = 0;
                while off < data.len() as u64 {
                    let got = repo.read_file_range(&file, off, len).await.unwrap();
                    let end = ((off + len) as usize).min(data.len());
                    assert_eq!(got, &data[off as usize..end], "{paged} range {off}+{len}");
                    off += if len == 1 { 1009 } else { len };
                }
            }
            for i in (0..whole.0.len()).step_by(7) {
                let (s, e) = (whole.start(i), whole.0[i].end);
                let from = s.saturating_sub(3);
                let got = repo.read_file_range(&file, from, e + 3 - from).await;
                let end = (e as usize + 3).min(data.len());
                assert_eq!(got.unwrap(), &data[from as usize..end]);
                let (c, start) = file.locate(&repo, s).await.unwrap().unwrap();
                assert_eq!((c, start), (whole.0[i], s));
            }
            assert!(file
                .locate(&repo, data.len() as u64)
                .await
                .unwrap()
                .is_none());
            // lseek agrees with the whole list's, from every piece's start and middle.
            for i in 0..whole.0.len() {
                for o in [whole.start(i), (whole.start(i) + whole.0[i].end) / 2] {
                    for want in [true, false] {
                        let got = file.seek(&repo, o, want).await.unwrap();
                        assert_eq!(got, whole.seek(o, want), "seek {o} data={want}");
                    }
                }
            }
            let size = data.len() as u64;
            assert_eq!(file.seek(&repo, size, false).await.unwrap(), Some(size));
            assert_eq!(file.seek(&repo, size, true).await.unwrap(), None);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_stream_keeps_bounded_pages() {
    use backtree_core::chunklist::{decode_index, is_index};
    let store: DynStore = Arc::new(MemoryStore::new());
    let repo = Arc::new(
        Repository::init_with(store, tiny_config(true))
            .await
            .unwrap(),
    );
    let data = backtree_core::testing::random_bytes(11, 200 << 10);
    let stream = ingest::Stream::new("s.bin", "stdin", piped(data.clone()));
    let r = run_stream(&repo, no_sources("h"), stream).await.unwrap();
    let root = r.manifest.root.tree.unwrap();
    let e = repo.resolve(&root, b"s.bin").await.unwrap().unwrap();
    // Every node of the tree holds at most a page of records.
    let mut todo = vec![e.chunk_list.unwrap()];
    let mut nodes = 0;
    while let Some(id) = todo.pop() {
        nodes += 1;
        let raw = repo.read_blob(&id).await.unwrap();
        if is_index(&raw) {
            let (_, records) = decode_index("t", &raw).unwrap();
            assert!(records.len() <= 4);
            todo.extend(records.iter().map(|r| r.1));
        } else {
            assert!(raw.len() <= 4 * 41);
        }
    }
    assert!(nodes > 100, "{nodes} nodes");
    assert_eq!(read_whole(&repo, &root, b"s.bin").await, data);
}

// ---- tar archives (`--tar`) ----

/// Ingests a tar archive, as the CLI's `--tar` does.
async fn run_tar(
    repo: &Arc<Repository>,
    o: IngestOptions,
    origin: &str,
    reader: Box<dyn std::io::Read + Send>,
) -> backtree_core::Result<ingest::IngestReport> {
    let repo = repo.clone();
    let h = Handle::current();
    let t = ingest::TarSource {
        origin: origin.into(),
        reader,
    };
    tokio::task::spawn_blocking(move || {
        ingest::ingest_tar(&repo, &h, &o, t, &Progress::default(), &|_| {})
    })
    .await
    .expect("ingest thread")
}

fn have(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success())
}

/// A small tree with every entry type GNU tar archives; returns whether an ACL was set.
fn tar_fixture(src: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(src.join("etc/ssl")).unwrap();
    std::fs::write(src.join("etc/hosts"), b"127.0.0.1 localhost\n").unwrap();
    std::fs::write(src.join("etc/empty"), b"").unwrap();
    std::fs::write(src.join("etc/ssl/big.bin"), texty_bytes(3, 1_500_000)).unwrap();
    std::fs::write(src.join("etc/shadow"), b"root:*:19000:0:99999:7:::\n").unwrap();
    std::fs::set_permissions(
        src.join("etc/shadow"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(src.join("suid"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(src.join("suid"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::hard_link(src.join("etc/hosts"), src.join("hosts.link")).unwrap();
    std::os::unix::fs::symlink("etc/hosts", src.join("hosts.sym")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", src.join("abs.sym")).unwrap();
    nix::unistd::mkfifo(
        &src.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    if let Err(e) = xattr::set(src.join("etc/hosts"), "user.comment", b"from esxi1") {
        println!("note: no user xattrs here ({e}); xattrs not covered");
    }
    let acl = have("setfacl")
        && std::process::Command::new("setfacl")
            .args(["-m", "u:12345:r,g:54321:rw"])
            .arg(src.join("etc/shadow"))
            .status()
            .is_ok_and(|s| s.success());
    if !acl {
        println!("note: setfacl unavailable or refused; ACLs not covered");
    }
    acl
}

/// Every entry under `a` (recursively) equals the one under `b` at the same path in what a
/// tar can hold: type, mode, owner ids and names, mtime (`exact`: with nanoseconds, else
/// seconds), size, content chunks, symlink target, device, xattrs (when `xattrs`), and
/// whether it is hardlinked. Returns the paths compared.
async fn same_tree(
    repo: &Repository,
    a: backtree_core::id::Id,
    b: backtree_core::id::Id,
    exact: bool,
    xattrs: bool,
) -> Vec<String> {
    let mut seen = Vec::new();
    let mut todo = vec![(String::new(), a, b)];
    while let Some((path, ta, tb)) = todo.pop() {
        let ea = repo.dir_entries(&ta).await.unwrap();
        let eb = repo.dir_entries(&tb).await.unwrap();
        let names = |es: &[backtree_core::tree::Entry]| {
            es.iter()
                .map(|e| String::from_utf8_lossy(&e.name).into_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&ea), names(&eb), "names in {path:?}");
        for (x, y) in ea.iter().zip(&eb) {
            let p = format!("{path}/{}", String::from_utf8_lossy(&x.name));
            assert_eq!(x.kind, y.kind, "{p}");
            assert_eq!(x.mode, y.mode, "{p}");
            assert_eq!((x.uid, x.gid), (y.uid, y.gid), "{p}");
            assert_eq!((&x.user, &x.group), (&y.user, &y.group), "{p}");
            if exact {
                assert_eq!(x.mtime, y.mtime, "{p}");
            } else {
                assert_eq!(x.mtime.0, y.mtime.0, "{p}");
            }
            assert_eq!(x.size, y.size, "{p}");
            assert_eq!(x.target, y.target, "{p}");
            assert_eq!(x.rdev, y.rdev, "{p}");
            assert_eq!(x.link.is_some(), y.link.is_some(), "{p}");
            if xattrs {
                assert_eq!(x.xattrs, y.xattrs, "{p}");
            }
            if x.kind == backtree_core::tree::Kind::File {
                let (la, lb) = (
                    repo.chunk_list(x).await.unwrap(),
                    repo.chunk_list(y).await.unwrap(),
                );
                assert_eq!(la, lb, "{p}: same chunks (a file from a tar dedupes)");
            }
            if let (Some(sa), Some(sb)) = (x.tree, y.tree) {
                todo.push((p.clone(), sa, sb));
            }
            seen.push(p);
        }
    }
    seen
}

/// GNU tar archives (pax and gnu formats; plain, gzip, zstd, xz; a file and a pipe) of a tree with
/// every entry type ingest to the same tree as the directory, with the same chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tar_round_trip_matches_directory_ingest() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let acl = tar_fixture(&src);
    let store: DynStore = Arc::new(MemoryStore::new());
    let repo = Arc::new(Repository::init_with(store, small_config()).await.unwrap());
    let d = run(&repo, opts("fromdir", &src)).await.unwrap();
    let droot = d.manifest.root.tree.unwrap();
    if acl {
        let e = repo.resolve(&droot, b"etc/shadow").await.unwrap().unwrap();
        assert!(e.xattr(b"system.posix_acl_access").is_some());
    }
    let mut cases = vec![("pax", ""), ("gnu", ""), ("pax", "-z")];
    for (tool, flag) in [("zstd", "--zstd"), ("xz", "-J")] {
        if have(tool) {
            cases.push(("pax", flag));
        } else {
            println!("note: {tool} not installed; {tool} archives not covered");
        }
    }
    for (i, (format, compress)) in cases.into_iter().enumerate() {
        let archive = dir.path().join(format!("a{i}.tar"));
        let mut cmd = std::process::Command::new("tar");
        if format == "pax" {
            // GNU tar keeps xattrs and ACLs in PAX archives only.
            cmd.args(["--xattrs", "--acls"]);
        }
        cmd.arg(format!("--format={format}"))
            .arg("-C")
            .arg(&src)
            .arg("-cf")
            .arg(&archive);
        if !compress.is_empty() {
            cmd.arg(compress);
        }
        assert!(cmd.arg(".").status().unwrap().success());
        // The last case comes through a pipe, as `--tar -` reads it.
        let reader: Box<dyn std::io::Read + Send> = if i == 2 {
            piped(std::fs::read(&archive).unwrap())
        } else {
            Box::new(std::fs::File::open(&archive).unwrap())
        };
        let mut o = no_sources("fromtar");
        o.time = Some(chrono::Utc::now() + chrono::Duration::seconds(i as i64 + 1));
        let r = run_tar(&repo, o, "a.tar", reader).await.unwrap();
        assert!(r.skipped.is_empty(), "{format} {compress}: {:?}", r.skipped);
        let root = r.manifest.root.tree.unwrap();
        let pax = format == "pax";
        let seen = same_tree(&repo, droot, root, pax, pax).await;
        assert_eq!(seen.len(), 11, "{seen:?}");
        assert_eq!(r.manifest.sources, ["tar:a.tar"]);
        // The root is the archive's `./`.
        assert_eq!(r.manifest.root.mode, d.manifest.root.mode);
        let links = repo.links(&r.manifest).await.unwrap();
        assert_eq!(links.values().copied().collect::<Vec<_>>(), [2]);
        // Only tree blobs are new (entries from a tar have no inode numbers, other atimes).
        assert!(
            r.manifest.stats.new_raw_bytes < 20_000,
            "{format} {compress}: deduplicated"
        );
    }
}

/// Builds a tar with raw member names (the `tar` crate refuses `..` and absolute names).
/// A member for [`raw_tar`]: name, type, link name, data.
type RawMember<'a> = (&'a [u8], tar::EntryType, &'a [u8], &'a [u8]);

fn raw_tar(members: &[RawMember<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, link, data) in members {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_entry_type(*kind);
        h.set_mode(if *kind == tar::EntryType::Directory {
            0o750
        } else {
            0o640
        });
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Hostile names are made safe or left out, each reported; a symlink's target is kept.
/// Repeated members: the last wins; implied directories get the documented defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tar_hostile_members_repeats_and_implied_dirs() {
    use tar::EntryType as T;
    let store: DynStore = Arc::new(MemoryStore::new());
    let repo = Arc::new(Repository::init_with(store, small_config()).await.unwrap());
    let data = raw_tar(&[
        (b"../evil", T::Regular, b"", b"x"),
        (b"/etc/passwd", T::Regular, b"", b"root:x:0:0\n"),
        (b"a/../b", T::Regular, b"", b"b"),
        (b"shadow", T::Symlink, b"/etc/shadow", b""),
        (b"hl", T::Link, b"../x", b""),
        (b"hl2", T::Link, b"missing", b""),
        (b"deep/er/f", T::Regular, b"", b"first"),
        (b"deep/er/f", T::Regular, b"", b"second"),
        (b"deep/er", T::Directory, b"", b""),
        (b"same", T::Link, b"deep/er/f", b""),
    ]);
    let mut o = no_sources("esxi1");
    o.time = Some(chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap());
    let r = run_tar(&repo, o, "bad.tar", piped(data)).await.unwrap();
    let skipped: Vec<&str> = r.skipped.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(skipped, ["../evil", "/etc/passwd", "a/../b", "hl", "hl2"]);
    assert!(r.skipped[0].error.contains("outside"), "{:?}", r.skipped);
    assert!(
        r.skipped[1].error.contains("\"etc/passwd\""),
        "{:?}",
        r.skipped
    );
    assert_eq!(r.manifest.errors.len(), 5);
    let root = r.manifest.root.tree.unwrap();
    let names: Vec<_> = repo
        .dir_entries(&root)
        .await
        .unwrap()
        .into_iter()
        .map(|e| String::from_utf8(e.name).unwrap())
        .collect();
    assert_eq!(names, ["b", "deep", "etc", "same", "shadow"]);
    assert_eq!(
        read_whole(&repo, &root, b"etc/passwd").await,
        b"root:x:0:0\n"
    );
    let s = repo.resolve(&root, b"shadow").await.unwrap().unwrap();
    assert_eq!(s.target.as_deref(), Some(&b"/etc/shadow"[..]));
    // Last wins; the hardlink took the content it named when it came.
    assert_eq!(read_whole(&repo, &root, b"deep/er/f").await, b"second");
    assert_eq!(read_whole(&repo, &root, b"same").await, b"second");
    let links = repo.links(&r.manifest).await.unwrap();
    assert_eq!(links.values().copied().collect::<Vec<_>>(), [2]);
    // `deep` is implied; `deep/er` got its member's metadata.
    let deep = repo.resolve(&root, b"deep").await.unwrap().unwrap();
    assert_eq!((deep.mode, deep.uid, deep.gid), (0o755, 0, 0));
    assert_eq!(deep.mtime.0, 1_800_000_000);
    let er = repo.resolve(&root, b"deep/er").await.unwrap().unwrap();
    assert_eq!((er.mode, er.uid, er.mtime.0), (0o750, 1000, 1_700_000_000));
    assert_eq!(r.manifest.root.mode, 0o755);
}

/// `bytes` compressed by the `xz` command (as `tar -J` runs it), or by liblzma where the
/// command is missing.
fn xz_of(bytes: &[u8]) -> Vec<u8> {
    if !have("xz") {
        println!("note: xz not installed; the xz stream comes from liblzma");
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
        std::io::Write::write_all(&mut e, bytes).unwrap();
        return e.finish().unwrap();
    }
    let mut c = std::process::Command::new("xz")
        .args(["-1", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    let data = bytes.to_vec();
    let feeder = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
    let out = c.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// A truncated or corrupt archive (tar, gzip, xz) fails with the input offset, and nothing is
/// published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tar_truncated_or_corrupt_commits_nothing() {
    use tar::EntryType as T;
    let store: DynStore = Arc::new(MemoryStore::new());
    let repo = Arc::new(Repository::init_with(store, small_config()).await.unwrap());
    let big = random_bytes(5, 300_000);
    let plain = raw_tar(&[
        (b"etc/a", T::Regular, b"", b"a"),
        (b"etc/big", T::Regular, b"", &big),
    ]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &plain).unwrap();
    let gz = gz.finish().unwrap();
    let mut corrupt = plain.clone();
    corrupt[512 + 512 + 100] ^= 0xff; // inside etc/big's header
    let xz = xz_of(&plain);
    let mut xz_corrupt = xz.clone();
    let mid = xz.len() / 2;
    xz_corrupt[mid] ^= 0x55; // inside the LZMA2 data of etc/big (random: stored as is)
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("tgz cut in half", gz[..gz.len() / 2].to_vec()),
        ("tgz without its trailer", gz[..gz.len() - 4].to_vec()),
        ("tar cut inside a member", plain[..2048].to_vec()),
        (
            "tar cut before its end blocks",
            plain[..1024 + 512 + 300_032].to_vec(),
        ),
        ("corrupt header", corrupt),
        ("empty", Vec::new()),
        ("xz header only", b"\xfd7zXZ\0rest".to_vec()),
        ("txz cut in half", xz[..mid].to_vec()),
        (
            "txz without its stream footer",
            xz[..xz.len() - 12].to_vec(),
        ),
        ("txz with a flipped byte", xz_corrupt),
    ];
    for (what, bytes) in cases {
        let err = run_tar(&repo, no_sources("esxi1"), "cfg.tgz", piped(bytes))
            .await
            .unwrap_err()
            .to_string();
        println!("{what}: {err}");
        assert!(
            err.starts_with("reading tar archive cfg.tgz: ") && err.contains("(at byte "),
            "{what}: {err}"
        );
        if what.contains("xz") {
            assert!(err.contains(": xz: "), "the compression is named: {err}");
        }
    }
    assert!(repo.generations("esxi1").await.unwrap().is_empty());
    // The whole xz stream, and two xz streams one after another (`cat a.xz b.xz`, as pixz or
    // a concatenation writes) holding one tar, are fine.
    let half = 1024 + 512 + 300_032;
    let mut two = xz_of(&plain[..half]);
    two.extend(xz_of(&plain[half..]));
    for (i, bytes) in [xz, two].into_iter().enumerate() {
        let mut o = no_sources("xz");
        o.time = Some(chrono::Utc::now() + chrono::Duration::seconds(i as i64));
        let r = run_tar(&repo, o, "cfg.txz", piped(bytes)).await.unwrap();
        assert_eq!(
            read_whole(&repo, &r.manifest.root.tree.unwrap(), b"etc/big").await,
            big
        );
    }
    // The whole archive is fine.
    let r = run_tar(&repo, no_sources("esxi1"), "cfg.tgz", piped(gz))
        .await
        .unwrap();
    assert_eq!(
        read_whole(&repo, &r.manifest.root.tree.unwrap(), b"etc/big").await,
        big
    );
}

/// A sparse file with more than four data regions (an old-GNU sparse member then needs
/// extension blocks), in a tree beside a plain file; returns whether this filesystem keeps the
/// holes.
fn sparse_fixture(src: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    std::fs::create_dir_all(src).unwrap();
    std::fs::write(src.join("plain"), texty_bytes(8, 300_000)).unwrap();
    let f = std::fs::File::create(src.join("disk.img")).unwrap();
    for i in 0..7u64 {
        f.write_all_at(&random_bytes(20 + i, 100_000), i * (1 << 20))
            .unwrap();
    }
    f.set_len(8 << 20).unwrap();
    backtree_core::testing::data_regions(&src.join("disk.img")).len() >= 7
}

/// Sparse members written by GNU tar (`--sparse`, gnu format: type S with extension blocks;
/// pax format: GNU.sparse 1.0) and by bsdtar (pax) ingest to the same tree as the directory,
/// with the same holes and chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tar_sparse_members_keep_their_holes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    if !sparse_fixture(&src) {
        println!("skipped: this filesystem keeps no holes");
        return;
    }
    let store: DynStore = Arc::new(MemoryStore::new());
    let repo = Arc::new(Repository::init_with(store, small_config()).await.unwrap());
    let d = run(&repo, opts("fromdir", &src)).await.unwrap();
    let droot = d.manifest.root.tree.unwrap();
    let mut cases: Vec<Vec<&str>> = vec![
        vec!["tar", "--sparse", "--format=gnu"],
        vec!["tar", "--sparse", "--format=pax"],
        vec!["tar", "--sparse", "--format=pax", "--sparse-version=0.1"],
        vec!["tar", "--sparse", "--format=pax", "--sparse-version=0.0"],
    ];
    if have("bsdtar") {
        cases.push(vec!["bsdtar", "--format=pax"]);
    } else {
        println!("note: bsdtar not installed (scripts/setup.sh installs it); not covered");
    }
    for (i, cmd) in cases.iter().enumerate() {
        let archive = dir.path().join(format!("s{i}.tar"));
        let ok = std::process::Command::new(cmd[0])
            .args(&cmd[1..])
            .arg("-C")
            .arg(&src)
            .arg("-cf")
            .arg(&archive)
            .args(["disk.img", "plain"])
            .status()
            .unwrap()
            .success();
        assert!(ok, "{cmd:?}");
        let size = std::fs::metadata(&archive).unwrap().len();
        assert!(
            size < 2 << 20,
            "{cmd:?}: the archive is sparse ({size} bytes)"
        );
        let mut o = no_sources("fromtar");
        o.time = Some(chrono::Utc::now() + chrono::Duration::seconds(i as i64 + 1));
        let reader = Box::new(std::fs::File::open(&archive).unwrap());
        let r = run_tar(&repo, o, "s.tar", reader).await.unwrap();
        assert!(r.skipped.is_empty(), "{cmd:?}: {:?}", r.skipped);
        let root = r.manifest.root.tree.unwrap();
        // Compared with the directory's entries below the root (a tar of two files has no
        // `./` member: its root is implied).
        let seen = same_tree(&repo, droot, root, false, false).await;
        assert_eq!(seen.len(), 2, "{cmd:?}: {seen:?}");
        let e = repo.resolve(&root, b"disk.img").await.unwrap().unwrap();
        let want = repo.resolve(&droot, b"disk.img").await.unwrap().unwrap();
        assert!(want.holes.unwrap() > 7 << 20);
        assert_eq!(e.holes, want.holes, "{cmd:?}");
    }
}

/// A member of more than 8 GiB, whose size only a PAX `size` record holds (the header's is 0,
/// as GNU tar writes it), is read whole and the next member is found after it. Bounded: the
/// member is zeros, made as the archive streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tar_pax_size_over_8_gib() {
    use std::io::Read;
    let big: u64 = (8 << 30) + 12_345;
    let pax = |recs: &[(&str, String)]| {
        let mut out = Vec::new();
        for (k, v) in recs {
            let body = format!(" {k}={v}\n");
            let mut n = body.len() + 1;
            while n.to_string().len() + body.len() != n {
                n += 1;
            }
            out.extend_from_slice(format!("{n}{body}").as_bytes());
        }
        out
    };
    let header = |name: &str, kind: tar::EntryType, size: u64| {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        h.as_bytes().to_vec()
    };
    let pad = |n: u64| vec![0u8; ((512 - n % 512) % 512) as usize];
    let recs = pax(&[("size", big.to_string())]);
    let mut head = header(
        "PaxHeaders/huge",
        tar::EntryType::XHeader,
        recs.len() as u64,
    );
    head.extend_from_slice(&recs);
    head.extend(pad(recs.len() as u64));
    head.extend(header("huge", tar::EntryType::Regular, 0));
    let mut tail = pad(big);
    tail.extend(header("after", tar::EntryType::Regular, 5));
    tail.extend_from_slice(b"after");
    tail.extend(pad(5));
    tail.extend(vec![0u8; 1024]);
    let reader = std::io::Cursor::new(head)
        .chain(std::io::repeat(0).take(big))
        .chain(std::io::Cursor::new(tail));
    let store: DynStore = Arc::new(MemoryStore::new());
    let repo = Arc::new(Repository::init(store).await.unwrap());
    let r = run_tar(&repo, no_sources("big"), "big.tar", Box::new(reader))
        .await
        .unwrap();
    let root = r.manifest.root.tree.unwrap();
    let e = repo.resolve(&root, b"huge").await.unwrap().unwrap();
    assert_eq!(e.size, big);
    assert_eq!(read_whole(&repo, &root, b"after").await, b"after");
}
