//! The filesystem logic without FUSE, against the in-memory and failure-injecting stores.

use super::*;
use backtree_core::ingest::{self, IngestOptions, Progress};
use backtree_core::testing::{build_fixture, random_bytes};
use backtree_store::{DynStore, Fault, FaultyStore, MemoryStore, ObjectStore};
use std::sync::Mutex;
use std::time::UNIX_EPOCH;

struct Setup {
    _dir: tempfile::TempDir,
    src: std::path::PathBuf,
    fs: Arc<BacktreeFs>,
    faulty: Arc<FaultyStore>,
    mem: Arc<MemoryStore>,
}

async fn setup() -> Setup {
    setup_with(|src| {
        build_fixture(src, true);
        std::fs::write(src.join("big.bin"), random_bytes(9, 20 << 20)).unwrap();
    })
    .await
}

/// A repository with one generation of host `h` ingested from what `build` makes.
async fn setup_with(build: impl FnOnce(&std::path::Path)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    build(&src);
    let mem = Arc::new(MemoryStore::new());
    let faulty = Arc::new(FaultyStore::new(mem.clone()));
    let store: DynStore = faulty.clone();
    let repo = Arc::new(Repository::init(store).await.unwrap());
    let (r, s) = (repo.clone(), src.clone());
    let h = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let o = IngestOptions {
            host: "h".into(),
            sources: vec![s],
            ..Default::default()
        };
        ingest::ingest(&r, &h, &o, &Progress::default(), &|_| {}).unwrap()
    })
    .await
    .unwrap();
    let fs = Arc::new(BacktreeFs::new(
        repo,
        FsOptions {
            cache_size: 16 << 20,
            ..Default::default()
        },
    ));
    Setup {
        _dir: dir,
        src,
        fs,
        faulty,
        mem,
    }
}

/// Looks up a `/`-separated path from the root, remembering each inode like the kernel would.
async fn walk(fs: &BacktreeFs, path: &str) -> Result<(u64, Attr)> {
    let mut ino = ROOT_INO;
    let mut attr = fs.getattr(ino).await?.0;
    for c in path.split('/').filter(|c| !c.is_empty()) {
        let (i, node, a, _) = fs.lookup(ino, c.as_bytes()).await?;
        fs.remember(i, &node);
        ino = i;
        attr = a;
    }
    Ok((ino, attr))
}

/// The name of host h's latest generation.
async fn latest_gen(fs: &Arc<BacktreeFs>) -> String {
    let (ino, _) = walk(fs, "h/latest").await.unwrap();
    String::from_utf8(fs.readlink(ino).await.unwrap()).unwrap()
}

/// A filesystem of its own over the setup's repository with a 64 MiB cache (room for what the
/// read-ahead tests fetch), and host h's latest generation.
async fn roomy_fs(s: &Setup) -> (Arc<BacktreeFs>, String) {
    let fs = Arc::new(BacktreeFs::new(
        s.fs.repo().clone(),
        FsOptions {
            cache_size: 64 << 20,
            ..Default::default()
        },
    ));
    let gen = latest_gen(&fs).await;
    (fs, gen)
}

/// Runs an operation as the FUSE adapter does, polled once on this thread: its result if it
/// completed without waiting (answered from memory), `None` if it had to wait (the rest then
/// runs on the runtime, as it would for the kernel).
fn at_once<T, F>(fs: &Arc<BacktreeFs>, op: impl FnOnce(Arc<BacktreeFs>) -> F) -> Option<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let got = Arc::new(Mutex::new(None));
    let put = got.clone();
    let here = crate::fuse::dispatch(
        &tokio::runtime::Handle::current(),
        op(fs.clone()),
        move |v| *put.lock().unwrap() = Some(v),
    );
    let v = got.lock().unwrap().take();
    here.then_some(v).flatten()
}

/// A read answered from memory, as [`at_once`]; `None` if it had to wait or failed.
fn read_now(fs: &Arc<BacktreeFs>, ino: u64, offset: u64, size: u32) -> Option<Bytes> {
    at_once(
        fs,
        move |fs| async move { fs.read(ino, offset, size).await },
    )
    .and_then(|r| r.ok())
}

async fn read_all(fs: &Arc<BacktreeFs>, ino: u64, size: u64) -> Result<Vec<u8>> {
    fs.open(ino).await?;
    let mut out = Vec::new();
    let mut off = 0;
    while off < size {
        let chunk = fs.read(ino, off, 128 << 10).await?;
        if chunk.is_empty() {
            break;
        }
        off += chunk.len() as u64;
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_attributes_and_contents() {
    let s = setup().await;
    let fs = &s.fs;
    // Root lists the host; the host lists its generation and `latest`.
    let root = fs.opendir(ROOT_INO).await.unwrap().0;
    let items = fs.readdir(root, 0, 100).await.unwrap();
    assert_eq!(
        items.iter().map(|i| i.name.clone()).collect::<Vec<_>>(),
        [b"h".to_vec()]
    );
    let (host, _) = walk(fs, "h").await.unwrap();
    let hd = fs.opendir(host).await.unwrap().0;
    let names: Vec<_> = fs
        .readdir(hd, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names.len(), 2);
    assert_eq!(names[1], b"latest");
    let gen = String::from_utf8(names[0].clone()).unwrap();
    let (latest, la) = walk(fs, "h/latest").await.unwrap();
    assert_eq!(la.kind, FileKind::Symlink);
    assert_eq!(fs.readlink(latest).await.unwrap(), gen.as_bytes());

    // Attributes match the source.
    for (p, kind) in [
        ("small.txt", FileKind::File),
        ("dir", FileKind::Dir),
        ("rel-link", FileKind::Symlink),
        ("fifo", FileKind::Fifo),
        ("socket", FileKind::Socket),
    ] {
        let (_, a) = walk(fs, &format!("h/{gen}/{p}")).await.unwrap();
        let m = std::fs::symlink_metadata(s.src.join(p)).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(a.kind, kind, "{p}");
        assert_eq!(a.perm as u32, m.mode() & 0o7777, "{p}");
        assert_eq!((a.uid, a.gid), (m.uid(), m.gid()), "{p}");
        assert_eq!(
            a.mtime,
            UNIX_EPOCH + Duration::new(m.mtime() as u64, m.mtime_nsec() as u32),
            "{p}"
        );
        if kind == FileKind::File {
            assert_eq!(a.size, m.len());
        }
    }

    // Contents, including a multi-chunk file read in 128 KiB pieces.
    let (ino, a) = walk(fs, &format!("h/{gen}/big.bin")).await.unwrap();
    let got = read_all(fs, ino, a.size).await.unwrap();
    assert!(
        got == std::fs::read(s.src.join("big.bin")).unwrap(),
        "big.bin"
    );
    let (ino, a) = walk(fs, &format!("h/{gen}/dir/sub/random.bin"))
        .await
        .unwrap();
    let got = read_all(fs, ino, a.size).await.unwrap();
    let want = std::fs::read(s.src.join("dir/sub/random.bin")).unwrap();
    assert!(got == want, "dir/sub/random.bin");

    // Hardlinks share one inode and report the true link count.
    let (a1, at1) = walk(fs, &format!("h/{gen}/linked")).await.unwrap();
    let (a2, _) = walk(fs, &format!("h/{gen}/dir/linked2")).await.unwrap();
    let (a3, _) = walk(fs, &format!("h/{gen}/dir/sub/linked3")).await.unwrap();
    assert!(a1 == a2 && a2 == a3);
    assert_eq!(at1.nlink, 3);

    // Sparse files: holes via lseek and st_blocks.
    let (ino, a) = walk(fs, &format!("h/{gen}/sparse.img")).await.unwrap();
    assert!(
        a.blocks * 512 < 1 << 20,
        "blocks reflect holes: {}",
        a.blocks
    );
    fs.open(ino).await.unwrap();
    assert_eq!(fs.lseek(ino, 0, libc::SEEK_HOLE).await.unwrap(), 4096);
    assert_eq!(
        fs.lseek(ino, 4096, libc::SEEK_DATA).await.unwrap(),
        10 << 20
    );
    assert!(matches!(
        fs.lseek(ino, 64 << 20, libc::SEEK_DATA).await,
        Err(FsError::NoXio)
    ));
    assert_eq!(fs.read(ino, 5000, 10).await.unwrap(), vec![0u8; 10]);

    // Xattrs: values, list, ENODATA for a missing name.
    let (ino, _) = walk(fs, &format!("h/{gen}/small.txt")).await.unwrap();
    assert_eq!(fs.getxattr(ino, b"user.comment").await.unwrap(), b"kept");
    assert!(matches!(
        fs.getxattr(ino, b"user.none").await,
        Err(FsError::NoData)
    ));
    let list = fs.listxattr(ino).await.unwrap();
    assert!(list.windows(13).any(|w| w == b"user.comment\0"));

    // Errors: missing names, files as directories.
    assert!(matches!(
        walk(fs, &format!("h/{gen}/nope")).await,
        Err(FsError::NotFound)
    ));
    assert!(matches!(walk(fs, "nohost").await, Err(FsError::NotFound)));
    assert!(matches!(
        walk(fs, &format!("h/{gen}/small.txt/x")).await,
        Err(FsError::NotDir)
    ));

    // The inline lookup agrees with the async one once the directory is cached.
    let (dir, _) = walk(fs, &format!("h/{gen}/dir")).await.unwrap();
    let (i_async, _, a_async, _) = fs.lookup(dir, b"linked2").await.unwrap();
    let (i_sync, _, a_sync, _) = at_once(fs, |fs| async move { fs.lookup(dir, b"linked2").await })
        .unwrap()
        .unwrap();
    assert_eq!((i_async, a_async), (i_sync, a_sync));
    assert!(matches!(
        at_once(fs, |fs| async move { fs.lookup(dir, b"nope").await }),
        Some(Err(FsError::NotFound))
    ));

    // Inode numbers are the same on a second filesystem over the same repository.
    let fs2 = Arc::new(BacktreeFs::new(fs.repo().clone(), FsOptions::default()));
    assert_eq!(
        walk(&fs2, &format!("h/{gen}/dir/linked2")).await.unwrap().0,
        a2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_directory_lists_in_pieces() {
    let s = setup().await;
    let fs = &s.fs;
    let gen = latest_gen(fs).await;
    let (d, _) = walk(fs, &format!("h/{gen}/big-dir")).await.unwrap();
    let fh = fs.opendir(d).await.unwrap().0;
    let mut names = Vec::new();
    let mut off = 0;
    loop {
        let items = fs.readdir(fh, off, 333).await.unwrap();
        let Some(last) = items.last() else { break };
        off = last.next;
        names.extend(items.into_iter().map(|i| i.name));
    }
    let mut expect: Vec<Vec<u8>> = std::fs::read_dir(s.src.join("big-dir"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_encoded_bytes())
        .collect();
    expect.sort();
    assert_eq!(names, expect);
    // Lookup in a paged directory loads only the page it needs.
    assert!(walk(fs, &format!("h/{gen}/big-dir/f04111")).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_missing_data_is_eio_and_the_rest_reads() {
    let s = setup().await;
    let fs = &s.fs;
    let gen = latest_gen(fs).await;
    let (big, ba) = walk(fs, &format!("h/{gen}/big.bin")).await.unwrap();

    // Corrupt one byte of every data pack: reads of data not yet cached fail with EIO.
    for o in s.mem.list("packs/data/").await.unwrap() {
        let mut b = s.mem.get(&o.key).await.unwrap().to_vec();
        let mid = b.len() / 2;
        b[mid] ^= 0xff;
        s.mem.tamper(&o.key, b.into());
    }
    let err = read_all(fs, big, ba.size).await.unwrap_err();
    assert!(
        matches!(err, FsError::Io { .. } if err.to_string().contains("big.bin") && err.to_string().contains("pack")),
        "{err:?}"
    );
    // Metadata still works; a store outage is EIO too, and the filesystem recovers after it.
    // (On a fresh mount: this one may already hold small.txt, read ahead after big.bin.)
    let fs = &Arc::new(BacktreeFs::new(fs.repo().clone(), FsOptions::default()));
    let (small, sa) = walk(fs, &format!("h/{gen}/small.txt")).await.unwrap();
    s.faulty.inject(Fault::FailReadsOf("packs/data".into()));
    assert!(matches!(
        read_all(fs, small, sa.size).await,
        Err(FsError::Io { .. })
    ));
    s.faulty.heal();
    assert!(walk(fs, &format!("h/{gen}/dir/sub")).await.is_ok());
    assert_eq!(
        read_all(fs, small, sa.size).await.unwrap(),
        b"hello backtree\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_reads_prefetch_ahead() {
    let s = setup().await;
    let fs = &s.fs;
    let gen = latest_gen(fs).await;
    let (big, _) = walk(fs, &format!("h/{gen}/big.bin")).await.unwrap();
    fs.open(big).await.unwrap();
    for i in 0..8u64 {
        fs.read(big, i * (128 << 10), 128 << 10).await.unwrap();
    }
    // Give the prefetch tasks a moment; then more than what was read is cached.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        fs.cached_bytes() > 2 << 20,
        "prefetched: {}",
        fs.cached_bytes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_cache_serves_repeated_restores_and_is_verified() {
    let s = setup().await;
    let cache_dir = s._dir.path().join("cache");
    let mk = || {
        Arc::new(BacktreeFs::new(
            s.fs.repo().clone(),
            FsOptions {
                cache_size: 4 << 20,
                cache_dir: Some(cache_dir.clone()),
                ..Default::default()
            },
        ))
    };
    let fs = mk();
    let gen = latest_gen(&fs).await;
    let path = format!("h/{gen}/dir/sub/random.bin");
    let (ino, a) = walk(&fs, &path).await.unwrap();
    let want = std::fs::read(s.src.join("dir/sub/random.bin")).unwrap();
    assert_eq!(read_all(&fs, ino, a.size).await.unwrap(), want);
    // A small file too (small files are read through pack windows).
    let small = format!("h/{gen}/small.txt");
    let (sino, sa) = walk(&fs, &small).await.unwrap();
    assert_eq!(
        read_all(&fs, sino, sa.size).await.unwrap(),
        b"hello backtree\n"
    );
    let cached: Vec<_> = std::fs::read_dir(&cache_dir).unwrap().collect();
    assert!(!cached.is_empty(), "chunks written to the disk cache");

    // Data packs unreachable: a new mount (empty memory cache) still reads from disk.
    s.faulty.inject(Fault::FailReadsOf("packs/data".into()));
    let fs2 = mk();
    let (ino, a) = walk(&fs2, &path).await.unwrap();
    assert_eq!(read_all(&fs2, ino, a.size).await.unwrap(), want);
    let (sino, sa) = walk(&fs2, &small).await.unwrap();
    assert_eq!(
        read_all(&fs2, sino, sa.size).await.unwrap(),
        b"hello backtree\n"
    );

    // A damaged cache file is not trusted: with the store unreachable the read fails (EIO)
    // instead of returning wrong bytes; once the store is back it is fetched again.
    for d in std::fs::read_dir(&cache_dir).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            let mut b = std::fs::read(&p).unwrap();
            b[0] ^= 1;
            std::fs::write(&p, b).unwrap();
        }
    }
    let fs3 = mk();
    let (ino, a) = walk(&fs3, &path).await.unwrap();
    assert!(matches!(
        read_all(&fs3, ino, a.size).await,
        Err(FsError::Io { .. })
    ));
    s.faulty.heal();
    assert_eq!(read_all(&fs3, ino, a.size).await.unwrap(), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_of_a_directory_come_from_one_pack_window() {
    // 200 small files (about 200 KiB in all): whatever order the parallel writer stored them
    // in, they share one pack window.
    let s = setup_with(|src| {
        for i in 0..200u64 {
            std::fs::write(src.join(format!("f{i:03}")), random_bytes(i, 1000)).unwrap();
        }
    })
    .await;
    let fs = &s.fs;
    let gen = latest_gen(fs).await;
    let mut files = Vec::new();
    for i in 0..200u64 {
        files.push(walk(fs, &format!("h/{gen}/f{i:03}")).await.unwrap().0);
    }
    // The first file read fetches a window of its pack, which holds the others too.
    let got = read_all(fs, files[0], 1000).await.unwrap();
    assert!(got == random_bytes(0, 1000), "f000");
    // With the store failing, the others are opened and read without waiting for it.
    s.faulty.inject(Fault::FailReadsOf("packs/data".into()));
    for (i, ino) in files.iter().enumerate().skip(1) {
        let ino = *ino;
        at_once(fs, move |fs| async move { fs.open(ino).await })
            .expect("chunk list inline")
            .unwrap();
        let got = read_now(fs, ino, 0, 4096);
        let want = random_bytes(i as u64, 1000);
        assert!(got.as_deref() == Some(&want[..]), "f{i:03} from the window");
    }
    s.faulty.heal();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_file_reads_ahead_the_next_files_of_its_directory() {
    // 40 files of 100 kB that do not compress: they span two 2 MiB pack windows, so no one
    // window read holds the next 32 of them.
    const N: usize = 40;
    let s = setup_with(|src| {
        for i in 0..N as u64 {
            let data = random_bytes(1000 + i, 100_000);
            std::fs::write(src.join(format!("f{i:02}")), data).unwrap();
        }
    })
    .await;
    let (fs, gen) = roomy_fs(&s).await;
    let mut files = Vec::new();
    for i in 0..N {
        files.push(walk(&fs, &format!("h/{gen}/f{i:02}")).await.unwrap().0);
    }
    let held = |fs: &Arc<BacktreeFs>, i: usize| {
        let got = read_now(fs, files[i], 0, 100_000);
        got.as_deref() == Some(&random_bytes(1000 + i as u64, 100_000)[..])
    };
    // Reading f00 starts a read-ahead of the next DIR_READ_AHEAD_FILES (32) files by name,
    // wherever the parallel writer put them.
    let got = fs.read(files[0], 0, 100_000).await.unwrap();
    assert!(got[..] == random_bytes(1000, 100_000)[..], "f00");
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.faulty.inject(Fault::FailReadsOf("packs/data".into()));
    for i in 1..=16 {
        assert!(held(&fs, i), "f{i:02} was read ahead");
    }
    s.faulty.heal();
    // Half-way through what it covered, the next read-ahead starts: f33.. arrive before the
    // reader gets there.
    for i in 17..=18 {
        assert!(held(&fs, i), "f{i:02} was read ahead");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.faulty.inject(Fault::FailReadsOf("packs/data".into()));
    for i in 19..N {
        assert!(held(&fs, i), "f{i:02} was read ahead");
    }
    s.faulty.heal();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_sequential_readers_of_one_file_each_prefetch() {
    // Without per-open handles, two readers of one file share its state: each must still be
    // seen as sequential, not reset the other's prefetch.
    let s = setup().await;
    let (fs, gen) = roomy_fs(&s).await;
    let (big, _) = walk(&fs, &format!("h/{gen}/big.bin")).await.unwrap();
    let want = std::fs::read(s.src.join("big.bin")).unwrap();
    let starts = [0usize, 10 << 20];
    for step in 0..4 {
        for st in starts {
            let off = st + step * (128 << 10);
            let got = fs.read(big, off as u64, 128 << 10).await.unwrap();
            assert!(got[..] == want[off..off + (128 << 10)], "read at {off}");
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.faulty.inject(Fault::FailReadsOf("packs/data".into()));
    for st in starts {
        let off = st + (3 << 20);
        let got = read_now(&fs, big, off as u64, 128 << 10);
        assert!(
            got.as_deref() == Some(&want[off..off + (128 << 10)]),
            "the reader at {st} was prefetched for"
        );
    }
    s.faulty.heal();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entering_a_directory_reads_ahead_the_next_listed_one() {
    next_listed_read_ahead(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_listed_read_ahead_survives_pages_parsed_again() {
    // rsync lists directories up to a second before it reads them; by then their parsed pages
    // may have been evicted and parsed again. The read-ahead must still know them (it used to
    // name a page by its address in memory, and read nothing ahead for such directories).
    next_listed_read_ahead(true).await;
}

/// A restore lists d1 and d2, then reads d1's first file: d2's first files are read ahead.
/// `reparse`: every parsed page is evicted between the listing and the read.
async fn next_listed_read_ahead(reparse: bool) {
    // Files of 200 kB that do not compress: d1's and d2's blobs fill several pack windows, so
    // reading d1 does not bring d2's files in by accident.
    let s = setup_with(|src| {
        for (dir, n) in [("d1", 12u64), ("d2", 8)] {
            std::fs::create_dir(src.join(dir)).unwrap();
            for i in 0..n {
                let data = random_bytes(dir.len() as u64 * 100 + n * 10 + i, 200_000);
                std::fs::write(src.join(dir).join(format!("f{i:02}")), data).unwrap();
            }
        }
    })
    .await;
    let (fs, gen) = roomy_fs(&s).await;
    // A restore lists d1, then d2, then reads d1's files.
    for (dir, n) in [("d1", 12), ("d2", 8)] {
        let (d, _) = walk(&fs, &format!("h/{gen}/{dir}")).await.unwrap();
        let fh = fs.opendir(d).await.unwrap().0;
        assert_eq!(fs.readdir(fh, 0, 100).await.unwrap().len(), n);
        fs.releasedir(fh);
    }
    let (a0, _) = walk(&fs, &format!("h/{gen}/d1/f00")).await.unwrap();
    let _evicted = reparse.then(|| fs.evict_parsed_pages());
    fs.read(a0, 0, 200_000).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.faulty.inject(Fault::FailReadsOf("packs/data".into()));
    for i in 0..8u64 {
        let (ino, _) = walk(&fs, &format!("h/{gen}/d2/f{i:02}")).await.unwrap();
        let got = read_now(&fs, ino, 0, 200_000);
        let want = random_bytes(2 * 100 + 8 * 10 + i, 200_000);
        assert!(
            got.as_deref() == Some(&want[..]),
            "d2/f{i:02} was read ahead"
        );
    }
    s.faulty.heal();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_directory_pages_are_parsed_again_from_memory() {
    // A directory whose parsed page was evicted (a large walk parses more than the LRU keeps)
    // is still answered without the store while its tree blob is in a tree window: lookups,
    // attributes and reads need no thread hand-off.
    let s = setup().await;
    let fs = &s.fs;
    let gen = latest_gen(fs).await;
    let (dir, _) = walk(fs, &format!("h/{gen}/dir")).await.unwrap();
    let (file, _) = walk(fs, &format!("h/{gen}/small.txt")).await.unwrap();
    let want = std::fs::read(s.src.join("small.txt")).unwrap();
    assert!(read_all(fs, file, want.len() as u64).await.unwrap() == want);
    let _ = fs.evict_parsed_pages();
    s.faulty.inject(Fault::FailReadsOf("packs/tree".into()));
    let names: Vec<Vec<u8>> = std::fs::read_dir(s.src.join("dir"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_encoded_bytes())
        .collect();
    assert!(!names.is_empty());
    for name in &names {
        let shown = String::from_utf8_lossy(name).into_owned();
        let name = name.clone();
        let found = at_once(fs, move |fs| async move { fs.lookup(dir, &name).await })
            .expect("answered from memory");
        assert!(found.is_ok(), "{shown}");
    }
    let _ = fs.evict_parsed_pages();
    let attr = at_once(fs, move |fs| async move { fs.getattr(file).await });
    assert!(attr.expect("from memory").is_ok());
    let _ = fs.evict_parsed_pages();
    let got = read_now(fs, file, 0, 4096).expect("from memory");
    assert!(got[..] == want[..]);
    s.faulty.heal();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_ahead_decodes_small_files_and_whole_reads_take_them() {
    // The read-ahead leaves the next files decoded and verified in the chunk cache, so their
    // reads only copy; a read that consumes a chunk whole takes it out (the page cache has it).
    const N: usize = 20;
    let s = setup_with(|src| {
        for i in 0..N as u64 {
            std::fs::write(src.join(format!("f{i:02}")), random_bytes(500 + i, 20_000)).unwrap();
        }
    })
    .await;
    let (fs, gen) = roomy_fs(&s).await;
    let mut files = Vec::new();
    for i in 0..N {
        files.push(walk(&fs, &format!("h/{gen}/f{i:02}")).await.unwrap().0);
    }
    fs.read(files[0], 0, 20_000).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut ids = Vec::new();
    for ino in &files[1..] {
        let f = fs.file(*ino).await.unwrap();
        ids.push(
            f.chunks.whole().expect("inline list").0[0]
                .id
                .expect("data"),
        );
    }
    for (i, id) in ids.iter().enumerate() {
        assert!(
            fs.chunks.cache.peek(id).is_some(),
            "f{:02} decoded ahead",
            i + 1
        );
    }
    for (i, ino) in files[1..].iter().enumerate() {
        let got = read_now(&fs, *ino, 0, 20_000).expect("in memory");
        assert!(got[..] == random_bytes(501 + i as u64, 20_000)[..]);
        assert!(
            fs.chunks.cache.peek(&ids[i]).is_none(),
            "f{:02} taken",
            i + 1
        );
    }
}

/// A file whose chunk list is paged (tiny chunks, pages of 4 pieces: several index levels) reads
/// byte-exact at every offset, holes included; lseek works; a corrupt page is EIO naming it,
/// only for the offsets it covers, and other files still read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_chunk_lists_read_seek_and_fail_alone() {
    use backtree_core::chunklist::{decode_index, is_index};
    use backtree_core::config::{ChunkerParams, Config};
    use std::io::{Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut data = vec![0u8; 1 << 20];
    let mut f = std::fs::File::create(src.join("sparse.img")).unwrap();
    f.set_len(data.len() as u64).unwrap();
    for (i, at) in [0usize, 400 << 10, 900 << 10].into_iter().enumerate() {
        let part = random_bytes(60 + i as u64, 100 << 10);
        data[at..at + part.len()].copy_from_slice(&part);
        f.seek(SeekFrom::Start(at as u64)).unwrap();
        f.write_all(&part).unwrap();
    }
    drop(f);
    std::fs::write(src.join("small.txt"), b"hello\n").unwrap();
    let mut c = Config::new(true);
    c.chunker = ChunkerParams {
        min: 64,
        avg: 256,
        max: 1024,
        ..ChunkerParams::default()
    };
    c.chunk_list_page = Some(4);
    let mem = Arc::new(MemoryStore::new());
    let store: DynStore = mem.clone();
    let repo = Arc::new(Repository::init_with(store, c).await.unwrap());
    let (r, s) = (repo.clone(), src.clone());
    let h = tokio::runtime::Handle::current();
    let report = tokio::task::spawn_blocking(move || {
        let o = IngestOptions {
            host: "h".into(),
            sources: vec![s],
            ..Default::default()
        };
        ingest::ingest(&r, &h, &o, &Progress::default(), &|_| {}).unwrap()
    })
    .await
    .unwrap();
    let new_fs = || Arc::new(BacktreeFs::new(repo.clone(), FsOptions::default()));
    let fs = &new_fs();
    let gen = latest_gen(fs).await;
    let (ino, attr) = walk(fs, &format!("h/{gen}/sparse.img")).await.unwrap();
    assert_eq!(attr.size, data.len() as u64);
    assert_eq!(read_all(fs, ino, attr.size).await.unwrap(), data);
    for (off, len) in [
        (0u64, 1u32),
        (409_500, 9_000),
        (1_048_000, 4096),
        (300_000, 200_000),
    ] {
        let got = fs.read(ino, off, len).await.unwrap();
        let end = ((off + len as u64) as usize).min(data.len());
        assert_eq!(&got[..], &data[off as usize..end], "{off}+{len}");
    }
    let whole = {
        let root = report.manifest.root.tree.unwrap();
        let e = repo.resolve(&root, b"sparse.img").await.unwrap().unwrap();
        repo.chunk_list(&e).await.unwrap()
    };
    for o in [0i64, 50_000, 102_400, 200_000, 409_600, 600_000, 1 << 20] {
        for (w, data) in [(libc::SEEK_DATA, true), (libc::SEEK_HOLE, false)] {
            let want = whole.seek(o as u64, data).map(|v| v as i64);
            match fs.lseek(ino, o, w).await {
                Ok(v) => assert_eq!(Some(v), want, "lseek {o} {w}"),
                Err(FsError::NoXio) => assert_eq!(want, None, "lseek {o} {w}"),
                Err(e) => panic!("lseek {o}: {e:?}"),
            }
        }
    }

    // Corrupt the page holding offset 950 000: reads there fail naming the page, others work.
    let root = report.manifest.root.tree.unwrap();
    let e = repo.resolve(&root, b"sparse.img").await.unwrap().unwrap();
    let mut id = e.chunk_list.unwrap();
    loop {
        let raw = repo.read_blob(&id).await.unwrap();
        if !is_index(&raw) {
            break;
        }
        let (_, records) = decode_index("t", &raw).unwrap();
        id = records[records.partition_point(|r| r.0 <= 950_000)].1;
    }
    let loc = repo.locate(&id).await.unwrap();
    let mut b = mem.get(&loc.pack_key()).await.unwrap().to_vec();
    b[(loc.offset + loc.stored_len / 2) as usize] ^= 0xff;
    mem.tamper(&loc.pack_key(), b.into());
    let fs = &new_fs();
    let (ino, _) = walk(fs, &format!("h/{gen}/sparse.img")).await.unwrap();
    let err = fs.read(ino, 950_000, 100).await.unwrap_err();
    assert!(
        matches!(err, FsError::Io { .. } if err.to_string().contains(&id.to_string())),
        "{err:?}"
    );
    assert_eq!(&fs.read(ino, 10, 100).await.unwrap()[..], &data[10..110]);
    let (small, sa) = walk(fs, &format!("h/{gen}/small.txt")).await.unwrap();
    assert_eq!(read_all(fs, small, sa.size).await.unwrap(), b"hello\n");
}

/// A repository whose host h has `n` generations (one ingested, the others copies of its
/// manifest under other names), behind a store that counts requests; and a filesystem on it.
async fn counted_generations(
    n: usize,
) -> (
    Setup,
    Arc<backtree_store::CountingStore>,
    Arc<BacktreeFs>,
    Vec<String>,
) {
    use backtree_core::manifest::Manifest;
    let s = setup_with(|src| {
        std::fs::write(src.join("small.txt"), b"hello").unwrap();
        std::fs::set_permissions(src, std::os::unix::fs::PermissionsExt::from_mode(0o710)).unwrap();
    })
    .await;
    let repo = s.fs.repo();
    let first = repo.generations("h").await.unwrap().remove(0);
    let m = repo.manifest("h", &first).await.unwrap();
    let mut names = vec![first];
    for i in 1..n {
        let mut copy = m.clone();
        copy.name = format!("2020-01-{:02}T000000Z", i);
        let key = Manifest::key("h", &copy.name);
        s.mem.put(&key, copy.to_json().into()).await.unwrap();
        names.push(copy.name);
    }
    names.sort_by_cached_key(|g| backtree_core::manifest::generation_sort_key(g));
    let counting = Arc::new(backtree_store::CountingStore::new(s.faulty.clone()));
    let repo = Repository::open(counting.clone()).await.unwrap();
    let fs = Arc::new(BacktreeFs::new(Arc::new(repo), FsOptions::default()));
    counting.take();
    (s, counting, fs, names)
}

/// Opens and lists a directory as `ls` does (readdirplus: the kernel is handed every item).
async fn list_dir(fs: &BacktreeFs, ino: u64) -> Vec<DirItem> {
    let fh = fs.opendir(ino).await.unwrap().0;
    let items = fs.readdir(fh, 0, 1000).await.unwrap();
    fs.releasedir(fh);
    for it in &items {
        fs.remember(it.ino, &it.node);
    }
    items
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_hosts_and_generations_is_one_listing_and_no_manifest() {
    let (_s, counting, fs, names) = counted_generations(20).await;
    let is_manifest = |op: backtree_store::Op, k: &str| op.is_read() && k.starts_with("snapshots/");

    // `/`: one listing.
    let hosts = list_dir(&fs, ROOT_INO).await;
    assert_eq!(hosts.len(), 1);
    let asked = counting.take();
    assert_eq!((asked.lists(), asked.0.len()), (1, 1), "{asked:?}");

    // `/h/`: one listing, no manifest; generations oldest first, then `latest`.
    let host = hosts[0].ino;
    let items = list_dir(&fs, host).await;
    let asked = counting.take();
    assert_eq!((asked.lists(), asked.0.len()), (1, 1), "{asked:?}");
    let listed: Vec<_> = items.iter().map(|i| i.name.clone()).collect();
    let mut want: Vec<_> = names.iter().map(|n| n.as_bytes().to_vec()).collect();
    want.push(b"latest".to_vec());
    assert_eq!(listed, want);
    for it in &items[..names.len()] {
        // Stand-in attributes the kernel must not keep: a stat asks again.
        assert_eq!(it.attr.kind, FileKind::Dir);
        assert_eq!(it.ttl, Duration::ZERO);
    }

    // `latest` resolves from the listing, without a manifest.
    let (latest, _, _, _) = fs.lookup(host, b"latest").await.unwrap();
    let target = fs.readlink(latest).await.unwrap();
    assert_eq!(target, names.last().unwrap().as_bytes());
    let asked = counting.take();
    assert_eq!(asked.count(is_manifest), 0, "{asked:?}");

    // A lookup inside one generation, through the inode the listing handed out, reads that
    // generation's manifest and no other.
    let gen = &items[3];
    let (_, _, a, _) = fs.lookup(gen.ino, b"small.txt").await.unwrap();
    assert_eq!(a.size, 5);
    let asked = counting.take();
    let manifests: Vec<_> = asked
        .0
        .iter()
        .filter(|(op, k)| is_manifest(*op, k))
        .collect();
    assert_eq!(manifests.len(), 1, "{asked:?}");
    assert_eq!(manifests[0].1, format!("snapshots/h/{}", names[3]));

    // Its real attributes, with the same inode, now without a request; and a lookup of the
    // generation by name gives the same inode and attributes.
    let (ga, ttl) = fs.getattr(gen.ino).await.unwrap();
    assert_eq!((ga.ino, ga.perm, ttl), (gen.ino, 0o710, LONG_TTL));
    let (ino, node, la, _) = fs.lookup(host, &gen.name).await.unwrap();
    assert_eq!((ino, la), (gen.ino, ga));
    fs.remember(ino, &node);
    assert!(counting.take().0.is_empty());

    // Listed again, the loaded generation comes with its attributes, the others still not.
    let again = list_dir(&fs, host).await;
    assert_eq!(
        (again[3].ino, again[3].attr, again[3].ttl),
        (gen.ino, ga, LONG_TTL)
    );
    assert_eq!(again[4].ttl, Duration::ZERO);
    assert_eq!(counting.take().lists(), 1);

    // `ls -l`: a stat of each generation loads each manifest once.
    for it in &again[..names.len()] {
        let (a, _) = fs.getattr(it.ino).await.unwrap();
        assert_eq!((a.ino, a.perm), (it.ino, 0o710));
    }
    let asked = counting.take();
    assert_eq!(asked.count(is_manifest), names.len() - 1, "{asked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_keeps_the_last_generation_listing() {
    let (s, _counting, fs, names) = counted_generations(3).await;
    let host = list_dir(&fs, ROOT_INO).await[0].ino;
    let items = list_dir(&fs, host).await;
    fs.getattr(items[0].ino).await.unwrap();

    s.faulty.inject(Fault::Offline);
    let kept = list_dir(&fs, host).await;
    assert_eq!(kept.len(), names.len() + 1);
    assert_eq!(list_dir(&fs, ROOT_INO).await.len(), 1);
    // A generation loaded before still answers; one never loaded is an I/O error, not gone.
    assert!(fs.getattr(items[0].ino).await.is_ok());
    assert!(matches!(
        fs.getattr(items[1].ino).await,
        Err(FsError::Io { .. })
    ));
    let (latest, _, _, _) = fs.lookup(host, b"latest").await.unwrap();
    assert_eq!(
        fs.readlink(latest).await.unwrap(),
        names.last().unwrap().as_bytes()
    );

    s.faulty.heal();
    assert_eq!(fs.getattr(items[1].ino).await.unwrap().0.ino, items[1].ino);
}

/// A pack of tiny blobs has a trailer of many records (one per file here, 46 bytes each on
/// disk, 48 parsed): the mount keeps only a sample of it, so its trailer budget is not spent
/// on one pack (5 such packs took the mount to 750 MB), and a window counts its blobs' slots
/// with its bytes, so a window of tiny blobs is not mostly uncounted slots. Reads stay right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_blobs_keep_pack_trailers_and_window_slots_within_budget() {
    const N: usize = 20_000;
    let s = setup_with(|src| {
        let d = src.join("many");
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..N {
            std::fs::write(d.join(format!("f{i:05}")), format!("tiny file {i}")).unwrap();
        }
    })
    .await;
    let gen = latest_gen(&s.fs).await;
    for i in [0, 7, 4321, 12_345, 19_999, 10_000, 8] {
        let (ino, attr) = walk(&s.fs, &format!("h/{gen}/many/f{i:05}")).await.unwrap();
        let got = read_all(&s.fs, ino, attr.size).await.unwrap();
        assert_eq!(got, format!("tiny file {i}").into_bytes());
    }
    let packs = &s.fs.chunks.packs;
    // Whole, the data pack's trailer alone would take N × 48 bytes (960 KB).
    assert!(
        packs.trailer_bytes() < 64 << 10,
        "{}",
        packs.trailer_bytes()
    );
    // Windows were read (the files came from them), and their slots are counted.
    assert!(packs.data.blobs() > 0);
    let slots = packs.data.blobs() * crate::packwin::SLOT_BYTES;
    assert!(
        slots <= packs.data.bytes(),
        "{slots} > {}",
        packs.data.bytes()
    );
}

/// Ingests `src` as a generation of host h at hour `i` of 2026-01-01.
async fn ingest_at(repo: &Arc<Repository>, src: &std::path::Path, i: usize) {
    let o = IngestOptions {
        host: "h".into(),
        sources: vec![src.to_path_buf()],
        time: Some(chrono::DateTime::from_timestamp(1_767_225_600 + i as i64 * 3600, 0).unwrap()),
        ..Default::default()
    };
    let (r, h) = (repo.clone(), tokio::runtime::Handle::current());
    tokio::task::spawn_blocking(move || ingest::ingest(&r, &h, &o, &Progress::default(), &|_| {}))
        .await
        .unwrap()
        .unwrap();
}

fn names_of(items: &[DirItem]) -> Vec<String> {
    (items.iter())
        .map(|i| String::from_utf8_lossy(&i.name).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_view_lists_each_version_once_and_reads_it() {
    use backtree_core::testing::set_times;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    let faulty = Arc::new(FaultyStore::new(Arc::new(MemoryStore::new())));
    let store: DynStore = faulty.clone();
    let repo = Arc::new(Repository::init(store).await.unwrap());
    // 10 generations: etc/inv.xml changes at 0, 3 and 7; etc/gone exists in 0..5; etc/d is a
    // directory throughout; noise changes every time.
    let content = |i: usize| match i {
        0..=2 => "first",
        3..=6 => "second version",
        _ => "third, the longest version",
    };
    for i in 0..10usize {
        let inv = src.join("etc/inv.xml");
        if i == 0 || content(i) != content(i - 1) {
            std::fs::write(&inv, content(i)).unwrap();
            set_times(&inv, (1000 + i as i64, 0), (1000 + i as i64, 0));
        }
        match i {
            0 => {
                std::fs::write(src.join("etc/gone"), "bye").unwrap();
                std::fs::create_dir_all(src.join("etc/d")).unwrap();
            }
            5 => std::fs::remove_file(src.join("etc/gone")).unwrap(),
            _ => {}
        }
        std::fs::write(src.join("noise"), format!("{i}")).unwrap();
        ingest_at(&repo, &src, i).await;
    }
    let gens = repo.generations("h").await.unwrap();
    let fs = Arc::new(BacktreeFs::new(repo.clone(), FsOptions::default()));

    // Not listed in the host's directory, found by name.
    let host = walk(&fs, "h").await.unwrap().0;
    assert!(!names_of(&list_dir(&fs, host).await).contains(&HISTORY_DIR.to_owned()));
    let (view, a) = walk(&fs, "h/.history").await.unwrap();
    assert_eq!((a.kind, a.perm), (FileKind::Dir, 0o555));
    assert_eq!(names_of(&list_dir(&fs, view).await), ["etc", "noise"]);

    // A directory lists every name it ever had; a directory in it is a directory of the view.
    let etc = walk(&fs, "h/.history/etc").await.unwrap().0;
    let items = list_dir(&fs, etc).await;
    assert_eq!(names_of(&items), ["d", "gone", "inv.xml"]);
    assert!(matches!(items[0].node, Node::History { .. }));
    assert!(matches!(items[1].node, Node::Versions { .. }));
    assert!(matches!(
        walk(&fs, "h/.history/etc/none").await,
        Err(FsError::NotFound)
    ));

    // A file: one entry per version, named by its first generation, with its times and content.
    let (inv, a) = walk(&fs, "h/.history/etc/inv.xml").await.unwrap();
    assert_eq!(a.kind, FileKind::Dir);
    let items = list_dir(&fs, inv).await;
    assert_eq!(
        names_of(&items),
        [gens[0].clone(), gens[3].clone(), gens[7].clone()]
    );
    for (it, i) in items.iter().zip([0, 3, 7]) {
        assert_eq!(it.attr.kind, FileKind::File);
        assert_eq!(
            it.attr.mtime,
            UNIX_EPOCH + Duration::from_secs(1000 + i as u64)
        );
        assert_eq!(
            read_all(&fs, it.ino, it.attr.size).await.unwrap(),
            content(i).as_bytes()
        );
        // A lookup by name gives the same inode and attributes; the generation's own file is
        // another inode (a version never aliases a generation's entry).
        let (ino, _, la, _) = fs.lookup(inv, &it.name).await.unwrap();
        assert_eq!((ino, la), (it.ino, it.attr));
        let own = walk(&fs, &format!("h/{}/etc/inv.xml", gens[i]))
            .await
            .unwrap();
        assert_ne!(own.0, it.ino);
        assert_eq!(own.1.mtime, it.attr.mtime);
    }
    assert!(matches!(
        fs.lookup(inv, gens[1].as_bytes()).await,
        Err(FsError::NotFound)
    ));
    let gone = walk(&fs, "h/.history/etc/gone").await.unwrap().0;
    assert_eq!(names_of(&list_dir(&fs, gone).await), [gens[0].clone()]);

    // A new generation with a new version shows at the next listing.
    std::fs::write(src.join("etc/inv.xml"), "fourth").unwrap();
    ingest_at(&repo, &src, 10).await;
    let gens = repo.generations("h").await.unwrap();
    let items = list_dir(&fs, inv).await;
    assert_eq!(
        names_of(&items),
        [
            gens[0].clone(),
            gens[3].clone(),
            gens[7].clone(),
            gens[10].clone()
        ]
    );
    assert_eq!(read_all(&fs, items[3].ino, 6).await.unwrap(), b"fourth");

    // A generation whose manifest cannot be read is left out (and logged), not the whole
    // history: the second version is then first seen in generation 4.
    faulty.inject(Fault::FailReadsOf(format!("snapshots/h/{}", gens[3])));
    let fs = Arc::new(BacktreeFs::new(repo.clone(), FsOptions::default()));
    let inv = walk(&fs, "h/.history/etc/inv.xml").await.unwrap().0;
    let items = list_dir(&fs, inv).await;
    assert_eq!(
        names_of(&items),
        [
            gens[0].clone(),
            gens[4].clone(),
            gens[7].clone(),
            gens[10].clone()
        ]
    );
    assert_eq!(
        read_all(&fs, items[1].ino, 14).await.unwrap(),
        b"second version"
    );
}
