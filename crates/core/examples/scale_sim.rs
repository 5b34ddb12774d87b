//! Scale simulator (issue 13, item 5): builds a synthetic repository at *metadata* scale.
//!
//! ```text
//! cargo run --release -p backtree-core --example scale_sim -- \
//!     --repo DIR|s3://BUCKET[/PREFIX] --chunks N --hosts H --gens G [--files-per-gen F] \
//!     [--window W] [--jobs J] [--seed S]
//! ```
//!
//! `--repo` is opened as the command line opens a repository (`backtree_store::open_store`):
//! a local directory (created if missing) or an S3 URL, with the endpoint, region and
//! credentials from the environment (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`…,
//! as `scripts/garage.sh` writes them into its `env` file). Either must be empty.
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
//! `--window W` keeps only the newest `W` directories in a generation's root (`d<g-W+1>` …
//! `d<g>`): a host whose older files are deleted over time, so that forgetting old generations
//! frees their chunks (apart from the few the `log` file still references), as
//! `scripts/bench-prune.sh` needs. Default: every directory stays (nothing an old generation
//! references goes away with it).
//!
//! Memory stays flat as the repository grows: the writer is created with an empty set of known
//! ids (payloads are unique by construction), chunks are prepared and appended in batches of
//! [`BATCH`], and a host keeps between generations only its directories' entries (one per
//! generation) and a bounded sample of its chunks ([`SAMPLE_MAX`]) for the `log` file's
//! references to older chunks; within an ingest, only the entries of its new files (one per 8
//! chunks) are held until their directory is written. So one host with millions of chunks
//! (`--hosts 1`) and hundreds of generations per host (`--gens 365`) cost what their ingests
//! cost, not more.
//!
//! Ingests of different hosts run on `--jobs` threads (default: the number of cores for a local
//! repository, four times that on S3, where the threads mostly wait for the network); the
//! generations of one host are sequential. At the end it prints the objects, index files and
//! bytes of the repository (one listing of the store) and the seconds taken.
//! docs/benchmarks-index.md has the baseline measured with it; scripts/bench-scale.sh
//! (docs/benchmarks-scale.md) builds its repositories with it. Compacting the index (`backtree
//! maintain index`) is left to the caller.

use backtree_core::id::BlobKind;
use backtree_core::ingest::writer::{BlobWriter, Prepared};
use backtree_core::manifest::{generation_name, Manifest, Stats, MANIFEST_VERSION};
use backtree_core::tree::{paginate, ChunkList, ChunkRef, Entry, PageRef, Time, Tree};
use backtree_core::{Id, Repository};
use backtree_store::{open_store, DynStore, Location, OpenOptions, S3Options};
use bytes::Bytes;
use chrono::{DateTime, Duration, TimeZone, Utc};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

type Res<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// New chunks per simulated file.
const CHUNKS_PER_FILE: usize = 8;
/// Older chunks of the host referenced by each generation's `log` file.
const OLD_REFS: usize = 8;
/// Chunks prepared (hashed, compressed) and appended at a time: bounds the simulator's memory
/// however many chunks one ingest has.
const BATCH: usize = 8192;
/// Chunks of each generation added to its host's sample (the candidates for `log`).
const SAMPLE_PER_GEN: usize = 16;
/// Bound of a host's sample: past it, every other sampled chunk is dropped.
const SAMPLE_MAX: usize = 4096;

struct Args {
    repo: String,
    chunks: u64,
    hosts: usize,
    gens: usize,
    files_per_gen: Option<usize>,
    window: Option<usize>,
    jobs: Option<usize>,
    seed: u64,
}

fn usage() -> ! {
    eprintln!(
        "usage: scale_sim --repo DIR|s3://BUCKET[/PREFIX] --chunks N --hosts H --gens G \
         [--files-per-gen F] [--window W] [--jobs J] [--seed S]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        repo: String::new(),
        chunks: 0,
        hosts: 1,
        gens: 1,
        files_per_gen: None,
        window: None,
        jobs: None,
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
            "--repo" => a.repo = v,
            "--chunks" => a.chunks = num(&v),
            "--hosts" => a.hosts = num(&v) as usize,
            "--gens" => a.gens = num(&v) as usize,
            "--files-per-gen" => a.files_per_gen = Some(num(&v) as usize),
            "--window" => a.window = Some(num(&v) as usize),
            "--jobs" => a.jobs = Some(num(&v) as usize),
            "--seed" => a.seed = num(&v),
            _ => usage(),
        }
    }
    if a.repo.is_empty() || a.hosts == 0 || a.gens == 0 || a.jobs == Some(0) || a.window == Some(0)
    {
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

/// What a host keeps between its generations: O(generations + [`SAMPLE_MAX`]), whatever the
/// number of chunks.
#[derive(Default)]
struct HostState {
    /// The subdirectories `d<g>` written so far (their entries are reused unchanged).
    dirs: Vec<Entry>,
    /// A bounded sample of the host's data chunks, for references from later generations.
    sample: Vec<(Id, u32)>,
    /// Files in `dirs`.
    files: u64,
    /// Logical bytes of the files in `dirs`.
    logical: u64,
    parent: Option<String>,
}

impl HostState {
    /// Adds the first chunks of a generation to the sample, thinning it past [`SAMPLE_MAX`].
    fn sample_from(&mut self, first: &[(Id, u32)]) {
        self.sample
            .extend(first.iter().take(SAMPLE_PER_GEN).copied());
        if self.sample.len() > SAMPLE_MAX {
            let mut i = 0;
            self.sample.retain(|_| {
                i += 1;
                i % 2 == 1
            });
        }
    }
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
    // The generation's new files, in directory d<gen>, `per` chunks each; chunks are made in
    // batches of whole files.
    let files = cx
        .args
        .files_per_gen
        .unwrap_or(n.div_ceil(CHUNKS_PER_FILE))
        .max(1);
    let per = n.div_ceil(files).max(1);
    let batch = per * BATCH.div_ceil(per);
    let ino0 = ((host as u64) << 40) | ((gen as u64) << 20);
    let mut entries: Vec<Entry> = Vec::with_capacity(n.div_ceil(per));
    let mut first: Vec<(Id, u32)> = Vec::new();
    let mut new_bytes = 0u64;
    for start in (0..n).step_by(batch) {
        let prepared: Vec<Prepared> = (start..n.min(start + batch))
            .map(|i| w.prepare(&payload(cx.args.seed, host, gen, i)))
            .collect();
        w.append_all(BlobKind::Data, &prepared)?;
        let new: Vec<(Id, u32)> = prepared.iter().map(|p| (p.id, p.raw_len)).collect();
        drop(prepared);
        if first.is_empty() {
            first = new.iter().take(SAMPLE_PER_GEN).copied().collect();
        }
        new_bytes += new.iter().map(|c| c.1 as u64).sum::<u64>();
        for c in new.chunks(per) {
            let i = entries.len();
            entries.push(file_entry(
                format!("f{i:05}").as_bytes(),
                c,
                t,
                ino0 + i as u64 + 1,
            ));
        }
    }
    st.files += entries.len() as u64;
    let mut dir = Entry::made_dir(format!("d{gen:04}").as_bytes(), t);
    dir.tree = Some(store_dir(&w, entries)?);
    st.dirs.push(dir);

    // `log`: a few older chunks of the host and one new one, as a file appended to daily.
    let mut log: Vec<(Id, u32)> = Vec::new();
    if !st.sample.is_empty() {
        for k in 0..OLD_REFS {
            let i = (payload(cx.args.seed ^ 0x5eed, host, gen, k)[0] as usize * 7919 + k * 104729)
                % st.sample.len();
            log.push(st.sample[i]);
        }
    }
    log.extend(first.first().copied());
    let keep = cx.args.window.unwrap_or(usize::MAX).min(st.dirs.len());
    let mut root_entries = st.dirs[st.dirs.len() - keep..].to_vec();
    root_entries.push(file_entry(b"log", &log, t, ino0));
    st.sample_from(&first);
    st.logical += new_bytes;
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
            files: st.files + 1,
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

/// Objects and bytes of the whole store, and of its `index/` objects: one listing.
async fn du(store: &DynStore) -> Res<[(u64, u64); 2]> {
    let mut all = (0, 0);
    let mut index = (0, 0);
    for o in store.list("").await? {
        all = (all.0 + 1, all.1 + o.size);
        if o.key.starts_with("index/") {
            index = (index.0 + 1, index.1 + o.size);
        }
    }
    Ok([all, index])
}

fn main() -> Res<()> {
    let mut args = parse_args();
    let start = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    let remote = Location::parse(&args.repo)?.is_remote();
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let jobs = *args
        .jobs
        .get_or_insert(if remote { 4 * cores } else { cores });
    // As `backtree init` opens it (crates/cli/src/main.rs, `RepoArg::open`).
    let opts = OpenOptions {
        s3: S3Options {
            max_attempts: Some(6),
            ..Default::default()
        },
        create: true,
    };
    let store = handle.block_on(open_store(&args.repo, &opts))?;
    let repo = handle.block_on(Repository::init(store.clone()))?;
    let cfg = repo.config().clone();
    let ingests = args.hosts * args.gens;
    println!(
        "scale_sim: {} chunks over {} hosts × {} generations ({} ingests, ~{} new chunks each) \
         into {} ({jobs} threads)",
        args.chunks,
        args.hosts,
        args.gens,
        ingests,
        args.chunks / ingests as u64,
        args.repo
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
        let workers: Vec<_> = (0..jobs)
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
    let [(objects, bytes), (index_files, index_bytes)] = cx.handle.block_on(du(&cx.store))?;
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
