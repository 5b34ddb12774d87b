//! What answering a request costs when everything it needs is in memory: each operation's
//! async function polled once on the calling thread, as the FUSE adapter does
//! (`backtree_fs::fuse`). Issue 11 measured this against the synchronous `*_cached` twins the
//! operations had until 2026-12-02 (40–100 ns more per request, against about 5.5 µs of kernel
//! round trip per FUSE request) before folding them into one path; docs/mount.md has the
//! figures.
//!
//! ```text
//! cargo run --release -p backtree-fs --example answer_paths
//! ```

use backtree_core::ingest::{self, IngestOptions, Progress};
use backtree_core::testing::build_fixture;
use backtree_core::Repository;
use backtree_fs::{BacktreeFs, FsOptions};
use backtree_store::{DynStore, MemoryStore};
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

const ROUNDS: u32 = 200_000;

/// Polls `fut` once, as the FUSE adapter does; the fixture keeps everything in memory, so a
/// pending future is a failure of the measurement.
fn poll_once<T>(rt: &tokio::runtime::Handle, fut: impl Future<Output = T> + Send) -> T {
    let mut fut = Box::pin(fut);
    let _guard = rt.enter();
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("not answered from memory"),
    }
}

/// Nanoseconds per call of `f`, after a warm-up.
fn time(mut f: impl FnMut()) -> f64 {
    for _ in 0..ROUNDS / 10 {
        f();
    }
    let t = Instant::now();
    for _ in 0..ROUNDS {
        f();
    }
    t.elapsed().as_nanos() as f64 / ROUNDS as f64
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let h = rt.handle().clone();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    build_fixture(&src, true);
    let fs = rt.block_on(async {
        let store: DynStore = Arc::new(MemoryStore::new());
        let repo = Arc::new(Repository::init(store).await.expect("init"));
        let (r, s, h2) = (repo.clone(), src.clone(), h.clone());
        tokio::task::spawn_blocking(move || {
            let o = IngestOptions {
                host: "h".into(),
                sources: vec![s],
                ..Default::default()
            };
            ingest::ingest(&r, &h2, &o, &Progress::default(), &|_| {}).expect("ingest")
        })
        .await
        .expect("ingest task");
        Arc::new(BacktreeFs::new(repo, FsOptions::default()))
    });
    // Walk to h/<generation>/dir and its file `text` (300 kB, one chunk), warming everything.
    let (dir_ino, file_ino) = rt.block_on(async {
        let (host, node, ..) = fs.lookup(1, b"h").await.expect("host");
        fs.remember(host, &node);
        let (latest, node, ..) = fs.lookup(host, b"latest").await.expect("latest");
        fs.remember(latest, &node);
        let gen = fs.readlink(latest).await.expect("readlink");
        let (g, node, ..) = fs.lookup(host, &gen).await.expect("generation");
        fs.remember(g, &node);
        let (d, node, ..) = fs.lookup(g, b"dir").await.expect("dir");
        fs.remember(d, &node);
        let (f, node, ..) = fs.lookup(d, b"text").await.expect("text");
        fs.remember(f, &node);
        fs.open(f).await.expect("open");
        fs.read(f, 0, 4096).await.expect("read");
        (d, f)
    });
    println!("| request, polled once | ns |");
    println!("|---|---|");
    let row = |what: &str, ns: f64| println!("| {what} | {ns:.0} |");
    row(
        "lookup",
        time(|| {
            poll_once(&h, fs.lookup(dir_ino, b"text")).expect("found");
        }),
    );
    row(
        "getattr",
        time(|| {
            poll_once(&h, fs.getattr(file_ino)).expect("attr");
        }),
    );
    row(
        "getxattr (absent)",
        time(|| {
            let _ = poll_once(&h, fs.getxattr(file_ino, b"user.none"));
        }),
    );
    row(
        "read 4 KiB of a cached chunk",
        time(|| {
            poll_once(&h, fs.read(file_ino, 8192, 4096)).expect("read");
        }),
    );
}
