//! Scale simulator (issue 13, item 5): builds a synthetic repository at *metadata* scale.
//!
//! ```text
//! cargo run --release -p backtree-core --example scale_sim -- \
//!     --repo DIR --chunks N --hosts H --gens G [--files-per-gen F] [--jobs J] [--seed S]
//! ```
//!
//! Every host gets `G` generations; each generation is one simulated ingest through the real
//! [`BlobWriter`]: about `N / (H × G)` new unique data blobs of 16–64 pseudo-random bytes (so
//! ids are uniformly distributed, as BLAKE3 ids of real chunks are), packed and indexed exactly
//! as an ingest does it (one data pack and one tree pack per ingest at these sizes, one index
//! file per ingest under `index/`), then a manifest under `snapshots/<host>/<generation>` with a
//! realistic time (one generation per day from 2026-01-01, hosts a few seconds apart).
//!
//! The tree of generation `g` of a host: the root directory holds `d0000` … `d<g>` (the
//! directories of earlier generations are reused unchanged, by tree id, as an incremental ingest
//! reuses unchanged subtrees) and a file `log` rewritten every generation whose inline chunk
//! list references a few of the host's older chunks and one new one. `d<g>` holds the
//! generation's new files `f00000` …, each with an inline list of up to 8 new chunks (or
//! `--files-per-gen` files sharing the new chunks evenly). So `backtree ls`, `backtree mount`
//! and `backtree ingest` work on the result as on a real repository, e.g.
//! `cat MNT/host7/latest/d0000/f00000`.
//!
//! The writer is created with an empty set of known ids (payloads are unique by construction),
//! so the simulator's memory does not grow with the repository. Ingests of different hosts run
//! on `--jobs` threads (default: the number of cores). At the end it prints the objects, index
//! files and bytes of the repository and the seconds taken. docs/benchmarks-index.md has the
//! baseline measured with it.

use backtree_core::id::BlobKind;
use backtree_core::ingest::writer::{BlobWriter, Prepared};
use backtree_core::manifest::{generation_name, Manifest, Stats, MANIFEST_VERSION};
use backtree_core::tree::{paginate, ChunkList, ChunkRef, Entry, PageRef, Time, Tree};
use backtree_core::{Id, Repository};
use backtree_store::{DynStore, LocalStore};
use bytes::Bytes;
use chrono::{DateTime, Duration, TimeZone, Utc};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

type Res<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// New chunks per simulated file.
const CHUNKS_PER_FILE: usize = 8;
/// Older chunks of the host referenced by each generation's `log` file.
const OLD_REFS: usize = 8;

struct Args {
    repo: PathBuf,
    chunks: u64,
    hosts: usize,
    gens: usize,
    files_per_gen: Option<usize>,
    jobs: usize,
    seed: u64,
}

fn usage() -> ! {
    eprintln!(
        "usage: scale_sim --repo DIR --chunks N --hosts H --gens G [--files-per-gen F] \
         [--jobs J] [--seed S]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        repo: PathBuf::new(),
        chunks: 0,
        hosts: 1,
        gens: 1,
        files_per_gen: None,
        jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
        seed: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| usage());
        let num = |v: &str| {
            v.replace('_', "")
                .parse::<u64>()
                .unwrap_or_else(|_| usage())
        };
        match k.as_str() {
            "--repo" => a.repo = PathBuf::from(v),
            "--chunks" => a.chunks = num(&v),
            "--hosts" => a.hosts = num(&v) as usize,
            "--gens" => a.gens = num(&v) as usize,
            "--files-per-gen" => a.files_per_gen = Some(num(&v) as usize),
            "--jobs" => a.jobs = num(&v) as usize,
            "--seed" => a.seed = num(&v),
            _ => usage(),
        }
    }
    if a.repo.as_os_str().is_empty() || a.hosts == 0 || a.gens == 0 || a.jobs == 0 {
        usage()
    }
    a
}

/// Deterministic pseudo-random payload of 16–64 bytes for chunk `n` of `(host, gen)`.
fn payload(seed: u64, host: usize, gen: usize, n: usize) -> Vec<u8> {
    let mut h = blake3::Hasher::new();
    h.update(b"backtree scale_sim");
    for x in [seed, host as u64, gen as u64, n as u64] {
        h.update(&x.to_le_bytes());
    }
    let mut out = [0u8; 65];
    h.finalize_xof().fill(&mut out);
    let len = 16 + (out[64] as usize % 49);
    out[..len].to_vec()
}

/// Stores a directory as an ingest does (`Walker::store_dir`): sorted, paginated when large.
fn store_dir(w: &BlobWriter, mut entries: Vec<Entry>) -> Res<Id> {
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let mut pages = paginate(entries);
    if pages.len() == 1 {
        let page = pages.pop().unwrap_or_default();
        return Ok(w.store_tree(&Tree::leaf(page).encode())?);
    }
    let mut refs = Vec::with_capacity(pages.len());
    for page in pages {
        let first = page.first().map(|e| e.name.clone()).unwrap_or_default();
        let count = page.len() as u64;
        let id = w.store_tree(&Tree::leaf(page).encode())?;
        refs.push(PageRef { first, id, count });
    }
    Ok(w.store_tree(&Tree::paged(refs).encode())?)
}

fn file_entry(name: &[u8], refs: &[(Id, u32)], t: Time, ino: u64) -> Entry {
    let mut end = 0u64;
    let list = refs
        .iter()
        .map(|(id, len)| {
            end += *len as u64;
            ChunkRef { end, id: Some(*id) }
        })
        .collect();
    let mut e = Entry::made_file(name, 0o644, 1000, 1000, t, t);
    e.size = end;
    e.ino = ino;
    e.chunks = Some(ChunkList(list));
    e
}

/// What a host keeps between its generations.
#[derive(Default)]
struct HostState {
    /// The subdirectories `d<g>` written so far (their entries are reused unchanged).
    dirs: Vec<Entry>,
    /// Every data chunk of the host, for references from later generations.
    chunks: Vec<(Id, u32)>,
    /// Logical bytes of the files in `dirs`.
    logical: u64,
    parent: Option<String>,
}

struct Ctx {
    store: DynStore,
    handle: tokio::runtime::Handle,
    level: i32,
    pack_size: usize,
    args: Args,
    base: DateTime<Utc>,
    written_chunks: AtomicU64,
    stored_bytes: AtomicU64,
    done: AtomicUsize,
}

/// One simulated ingest: generation `gen` of host `host` with `n` new chunks.
fn ingest(cx: &Ctx, st: &mut HostState, host: usize, gen: usize, n: usize) -> Res<()> {
    let name = format!("host{host}");
    let started = Utc::now();
    let time = cx.base + Duration::days(gen as i64) + Duration::seconds(host as i64 * 7);
    let t = Time(time.timestamp(), 0);
    let w = BlobWriter::new(
        cx.store.clone(),
        cx.handle.clone(),
        cx.level,
        cx.pack_size,
        HashSet::new(),
        u64::MAX,
    );
    let prepared: Vec<Prepared> = (0..n)
        .map(|i| w.prepare(&payload(cx.args.seed, host, gen, i)))
        .collect();
    w.append_all(BlobKind::Data, &prepared)?;
    let new: Vec<(Id, u32)> = prepared.iter().map(|p| (p.id, p.raw_len)).collect();

    // The generation's new files, in directory d<gen>.
    let files = cx
        .args
        .files_per_gen
        .unwrap_or(n.div_ceil(CHUNKS_PER_FILE))
        .max(1);
    let per = n.div_ceil(files).max(1);
    let ino0 = ((host as u64) << 40) | ((gen as u64) << 20);
    let entries: Vec<Entry> = new
        .chunks(per)
        .enumerate()
        .map(|(i, c)| file_entry(format!("f{i:05}").as_bytes(), c, t, ino0 + i as u64 + 1))
        .collect();
    let mut dir = Entry::made_dir(format!("d{gen:04}").as_bytes(), t);
    dir.tree = Some(store_dir(&w, entries)?);
    st.dirs.push(dir);

    // `log`: a few older chunks of the host and one new one, as a file appended to daily.
    let mut log: Vec<(Id, u32)> = Vec::new();
    if !st.chunks.is_empty() {
        for k in 0..OLD_REFS {
            let i = (payload(cx.args.seed ^ 0x5eed, host, gen, k)[0] as usize * 7919 + k * 104729)
                % st.chunks.len();
            log.push(st.chunks[i]);
        }
    }
    log.extend(new.first().copied());
    let mut root_entries = st.dirs.clone();
    root_entries.push(file_entry(b"log", &log, t, ino0));
    st.chunks.extend_from_slice(&new);
    st.logical += new.iter().map(|c| c.1 as u64).sum::<u64>();
    let logical = st.logical + log.iter().map(|c| c.1 as u64).sum::<u64>();
    let mut root = Entry::made_dir(b"", t);
    root.tree = Some(store_dir(&w, root_entries)?);
    w.finish()?;

    let ws = &w.stats;
    let stored = ws.new_stored_bytes.load(Ordering::Relaxed);
    let gen_name = generation_name(&time);
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        host: name.clone(),
        name: gen_name.clone(),
        time: time.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        started: started.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        finished: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        label: Some("scale_sim".into()),
        root,
        links: None,
        sources: vec![format!("scale_sim:{name}")],
        parent: st.parent.replace(gen_name.clone()),
        stats: Stats {
            files: (st.chunks.len().div_ceil(per) + 1) as u64,
            dirs: st.dirs.len() as u64 + 1,
            logical_bytes: logical,
            new_raw_bytes: ws.new_raw_bytes.load(Ordering::Relaxed),
            new_stored_bytes: stored,
            new_chunks: ws.new_chunks.load(Ordering::Relaxed),
            ..Stats::default()
        },
        errors: Vec::new(),
        session: hex::encode(rand::random::<[u8; 16]>()),
        tool: format!("backtree scale_sim {}", env!("CARGO_PKG_VERSION")),
    };
    let key = Manifest::key(&name, &gen_name);
    let created = cx.handle.block_on(
        cx.store
            .put_if_absent(&key, Bytes::from(manifest.to_json())),
    )?;
    if !created {
        return Err(format!("{key} exists already (use an empty --repo)").into());
    }
    cx.written_chunks.fetch_add(n as u64, Ordering::Relaxed);
    cx.stored_bytes.fetch_add(stored, Ordering::Relaxed);
    Ok(())
}

/// Files and bytes under `dir`, and files directly under `dir/index`.
fn du(dir: &Path) -> (u64, u64) {
    let mut files = 0;
    let mut bytes = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => {
                    files += 1;
                    bytes += m.len();
                }
                Err(_) => {}
            }
        }
    }
    (files, bytes)
}

fn main() -> Res<()> {
    let args = parse_args();
    let start = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    let local = LocalStore::create(&args.repo)?;
    let store: DynStore = Arc::new(local);
    let repo = handle.block_on(Repository::init(store.clone()))?;
    let cfg = repo.config().clone();
    let ingests = args.hosts * args.gens;
    println!(
        "scale_sim: {} chunks over {} hosts × {} generations ({} ingests, ~{} new chunks each) \
         into {}",
        args.chunks,
        args.hosts,
        args.gens,
        ingests,
        args.chunks / ingests as u64,
        args.repo.display()
    );
    let cx = Ctx {
        store,
        handle,
        level: cfg.compression.level,
        pack_size: cfg.pack_size as usize,
        base: Utc
            .with_ymd_and_hms(2026, 1, 1, 2, 0, 0)
            .single()
            .ok_or("bad base time")?,
        written_chunks: AtomicU64::new(0),
        stored_bytes: AtomicU64::new(0),
        done: AtomicUsize::new(0),
        args,
    };
    let next_host = AtomicUsize::new(0);
    let step = (ingests / 20).max(1);
    let result: Res<()> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..cx.args.jobs)
            .map(|_| {
                s.spawn(|| -> Res<()> {
                    loop {
                        let h = next_host.fetch_add(1, Ordering::Relaxed);
                        if h >= cx.args.hosts {
                            return Ok(());
                        }
                        let mut st = HostState::default();
                        for g in 0..cx.args.gens {
                            // Spread N over the ingests, the remainder over the first ones.
                            let i = (h * cx.args.gens + g) as u64;
                            let n = cx.args.chunks / ingests as u64
                                + u64::from(i < cx.args.chunks % ingests as u64);
                            ingest(&cx, &mut st, h, g, n as usize)?;
                            let d = cx.done.fetch_add(1, Ordering::Relaxed) + 1;
                            if d.is_multiple_of(step) || d == ingests {
                                println!(
                                    "  {d}/{ingests} ingests, {} chunks, {:.1} s",
                                    cx.written_chunks.load(Ordering::Relaxed),
                                    start.elapsed().as_secs_f64()
                                );
                            }
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| "worker panicked")??;
        }
        Ok(())
    });
    result?;
    let (objects, bytes) = du(&cx.args.repo);
    let (index_files, index_bytes) = du(&cx.args.repo.join("index"));
    println!(
        "done: {} chunks, {} ingests; {objects} objects, {bytes} bytes ({} bytes of packs \
         written); {index_files} index files, {index_bytes} index bytes; {:.1} s",
        cx.written_chunks.load(Ordering::Relaxed),
        ingests,
        cx.stored_bytes.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64()
    );
    drop(repo);
    drop(cx);
    rt.shutdown_background();
    Ok(())
}
