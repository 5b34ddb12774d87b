//! The index under concurrency, all as processes (issue 13): compactions racing ingests, a
//! mount and each other must leave every generation readable byte for byte, and no lookup may
//! fail for a blob that exists; damaged or newer index objects are refused with a clear error.
//!
//! The race runs `BACKTREE_TEST_RACE_SECS` seconds (default 20) with a settle time of 2 s and
//! auto-compaction after every 2 uncovered deltas. Writers never pause, so roots are published
//! far more often than the settle time: deletion must keep pace anyway (the newest *settled*
//! root decides), and superseded objects are deleted many times while the mount holds older
//! views. No timing is asserted. Needs /dev/fuse and
//! fusermount3 (skipped with a note without /dev/fuse).

mod common;

use backtree_core::testing::random_bytes;
use common::{bt, Mounted};
use rand::Rng;
use std::collections::{BTreeSet, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Settle time given to every process (seconds).
const SETTLE_SECS: u64 = 2;
/// Longest any one child process may run before the test kills it and fails.
const CHILD_LIMIT: Duration = Duration::from_secs(120);
const HOSTS: usize = 3;

/// A temporary repository and the environment every process of a test gets.
struct Env {
    dir: tempfile::TempDir,
    repo: PathBuf,
    cache: PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        let cache = dir.path().join("cache");
        let e = Env { dir, repo, cache };
        let o = run(e.cmd().arg("init").arg("--repo").arg(&e.repo));
        assert!(o.status.success(), "init: {}", text(&o.stderr));
        e
    }

    /// `backtree` with the test's settle time, compaction trigger and cache directory.
    fn cmd(&self) -> Command {
        let mut c = bt();
        c.env("BACKTREE_INDEX_SETTLE", SETTLE_SECS.to_string())
            .env("BACKTREE_INDEX_DUE", "2")
            .env("BACKTREE_CACHE_DIR", &self.cache)
            .env_remove("BACKTREE_LOG")
            .env_remove("RUST_LOG");
        c
    }

    /// `backtree SUB --repo R ARGS…`.
    fn sub(&self, sub: &[&str], args: &[&str]) -> Command {
        let mut c = self.cmd();
        c.args(sub).arg("--repo").arg(&self.repo).args(args);
        c
    }

    /// `backtree maintain index`, repeated while it only refuses to publish because it took too
    /// long (which a loaded machine may cause with a 2 s settle time).
    fn maintain(&self) -> String {
        for _ in 0..10 {
            let o = run(&mut self.sub(&["maintain", "index"], &[]));
            if o.status.success() {
                return text(&o.stdout);
            }
            let err = text(&o.stderr);
            assert!(err.contains("longer than"), "maintain index failed: {err}");
        }
        panic!("maintain index took too long ten times in a row");
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a child to its end, killing it (and failing) after [`CHILD_LIMIT`].
fn run(c: &mut Command) -> Output {
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn backtree");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let t_err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > CHILD_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{c:?} still running after {CHILD_LIMIT:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// Sets the flag when dropped: a panicking thread stops the others.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

fn host_name(h: usize) -> String {
    format!("h{h}")
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The files of host `h`'s source at iteration `i` (deterministic): some the same everywhere
/// and always, some shared by every host for a few iterations, some unique, of sizes from a
/// few bytes to a few hundred KB.
fn content(h: usize, i: u64) -> Vec<(String, Vec<u8>)> {
    let hu = h as u64;
    let r = mix(hu << 40 | i);
    let mut v = vec![
        ("static.bin".to_owned(), random_bytes(7, 150_000)),
        (
            "notes.txt".to_owned(),
            format!("host {h} iteration {i}\n")
                .repeat(1 + (i % 50) as usize)
                .into_bytes(),
        ),
        (
            "dir/unique.bin".to_owned(),
            random_bytes(1 << 40 | hu << 32 | i, 4_000 + (r % 300_000) as usize),
        ),
        (
            // Changes every other iteration: older generations' blobs are found again.
            "dir/sub/older.bin".to_owned(),
            random_bytes(
                2 << 40 | hu << 32 | (i / 2),
                60_000 + (r % 5) as usize * 7_000,
            ),
        ),
        (
            "dir/sub/log.txt".to_owned(),
            (0..(200 + r % 3000))
                .map(|k| format!("{k:06} host {h} iteration {i} value {}\n", mix(k ^ r) % 997))
                .collect::<String>()
                .into_bytes(),
        ),
    ];
    // Shared by every host, new every third iteration: cross-host deduplication of new data.
    for k in 0..2u64 {
        v.push((
            format!("shared/s{k}.bin"),
            random_bytes(3 << 40 | (i / 3) << 8 | k, 20_000 + k as usize * 90_000),
        ));
    }
    // Small unique files: many index entries per ingest.
    for k in 0..(4 + r % 6) {
        v.push((
            format!("many/f{k}"),
            random_bytes(
                4 << 40 | hu << 32 | i << 8 | k,
                1_000 + (mix(r ^ k) % 3_000) as usize,
            ),
        ));
    }
    v
}

fn write_tree(dir: &Path, files: &[(String, Vec<u8>)]) {
    if dir.exists() {
        std::fs::remove_dir_all(dir).unwrap();
    }
    for (p, b) in files {
        let p = dir.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b).unwrap();
    }
}

/// Relative paths of the regular files below `dir`.
fn walk(dir: &Path) -> std::io::Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        for e in std::fs::read_dir(dir.join(&rel))? {
            let e = e?;
            let r = rel.join(e.file_name());
            if e.file_type()?.is_dir() {
                todo.push(r);
            } else {
                out.insert(r.to_string_lossy().into_owned());
            }
        }
    }
    Ok(out)
}

/// A committed generation: whose, its name, and the iteration its content came from.
#[derive(Debug, Clone)]
struct Gen {
    host: usize,
    name: String,
    iter: u64,
}

impl Gen {
    fn path(&self) -> String {
        format!("{}/{}", host_name(self.host), self.name)
    }
}

/// Ingests host `h`'s source at iteration `i`; returns the generation and the stderr.
fn ingest(env: &Env, src: &Path, h: usize, i: u64) -> (Gen, String) {
    write_tree(src, &content(h, i));
    let o = run(env
        .sub(&["ingest"], &["--json", "--host", &host_name(h)])
        .arg(src));
    let err = text(&o.stderr);
    assert!(
        o.status.success(),
        "ingest h{h} iteration {i}: {:?}: {err}",
        o.status
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("ingest --json");
    let name = v["generation"]["name"].as_str().expect("name").to_owned();
    (
        Gen {
            host: h,
            name,
            iter: i,
        },
        err,
    )
}

/// Reads a whole generation through the mount and compares it with what was ingested.
fn check_through_mount(m: &Mounted, g: &Gen, listing: bool) {
    let root = m.mnt.join(g.path());
    let want = content(g.host, g.iter);
    if listing {
        let got = walk(&root)
            .unwrap_or_else(|e| panic!("listing {} on the mount: {e}\n{}", g.path(), m.log_text()));
        let expect: BTreeSet<String> = want.iter().map(|(p, _)| p.clone()).collect();
        assert_eq!(got, expect, "files of {}", g.path());
    }
    for (p, bytes) in &want {
        let got = std::fs::read(root.join(p)).unwrap_or_else(|e| {
            panic!(
                "reading {}/{p} on the mount: {e}\nmount log:\n{}",
                g.path(),
                m.log_text()
            )
        });
        assert!(
            got == *bytes,
            "{}/{p} differs on the mount ({} bytes, expected {})",
            g.path(),
            got.len(),
            bytes.len()
        );
    }
}

/// Reads one file with `backtree cat` and compares it.
fn check_with_cat(env: &Env, g: &Gen, k: usize, no_cache: bool) {
    let want = content(g.host, g.iter);
    let (p, bytes) = &want[k % want.len()];
    let what = format!("{}/{p}", g.path());
    let mut c = env.sub(&["cat"], &[]);
    if no_cache {
        c.arg("--no-cache");
    }
    let o = run(c.arg(&what));
    assert!(
        o.status.success(),
        "cat {what}: {:?}: {}",
        o.status,
        text(&o.stderr)
    );
    assert!(
        o.stdout == *bytes,
        "cat {what} differs ({} bytes, expected {})",
        o.stdout.len(),
        bytes.len()
    );
}

/// Files under `R/index/<dir>/` (names only).
fn index_objects(repo: &Path, dir: &str) -> Vec<String> {
    backtree_core::testing::list_files(&repo.join("index").join(dir))
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// The current root (highest key) of a local repository, as JSON.
fn current_root(repo: &Path) -> (String, serde_json::Value) {
    let name = index_objects(repo, "roots")
        .into_iter()
        .max()
        .expect("a root");
    let b = std::fs::read(repo.join("index/roots").join(&name)).unwrap();
    (name, serde_json::from_slice(&b).expect("root JSON"))
}

fn fuse_available() -> bool {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("note: index race test skipped: /dev/fuse is not available");
        return false;
    }
    true
}

/// `N` of maintain's "N superseded objects deleted".
fn deleted(out: &str) -> usize {
    out.split_once(" superseded objects deleted")
        .and_then(|(before, _)| before.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[derive(Default)]
struct Counts {
    ingests: AtomicUsize,
    ingest_compaction_warnings: AtomicUsize,
    compactions: AtomicUsize,
    compactions_too_long: AtomicUsize,
    /// Superseded objects the compactors deleted during the race.
    deleted: AtomicUsize,
    mount_reads: AtomicUsize,
    cat_reads: AtomicUsize,
}

#[test]
fn compaction_races_ingests_mounts_and_compaction() {
    if !fuse_available() {
        return;
    }
    let secs: u64 = std::env::var("BACKTREE_TEST_RACE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let env = Env::new();
    let srcs: Vec<PathBuf> = (0..HOSTS)
        .map(|h| env.dir.path().join(format!("src{h}")))
        .collect();
    // One generation per host first, so that every host exists when the mount starts.
    let gens: Mutex<Vec<Gen>> =
        Mutex::new((0..HOSTS).map(|h| ingest(&env, &srcs[h], h, 0).0).collect());
    let cache_arg = env.cache.to_str().unwrap().to_owned();
    let m = Mounted::start(
        &env.repo,
        &env.dir.path().join("mnt"),
        &["--cache-dir", &cache_arg],
    );
    let stop = AtomicBool::new(false);
    let counts = Counts::default();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let running = || !stop.load(Ordering::SeqCst) && Instant::now() < deadline;
    let pick = |rng: &mut rand::rngs::ThreadRng| -> Gen {
        let g = gens.lock().unwrap();
        // Half the time one of the newest: their blobs are in deltas and fresh runs.
        let lo = if rng.gen_bool(0.5) {
            g.len().saturating_sub(2 * HOSTS)
        } else {
            0
        };
        g[rng.gen_range(lo..g.len())].clone()
    };

    std::thread::scope(|s| {
        for (h, src) in srcs.iter().enumerate() {
            let (env, gens, stop, counts, running) = (&env, &gens, &stop, &counts, &running);
            s.spawn(move || {
                let _g = StopOnDrop(stop);
                let mut i = 1;
                while running() {
                    let (g, err) = ingest(env, src, h, i);
                    if err.contains("compaction after the commit failed") {
                        // Only a compaction that took too long may fail beside the commit.
                        assert!(err.contains("longer than"), "ingest of h{h}: {err}");
                        counts
                            .ingest_compaction_warnings
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    gens.lock().unwrap().push(g);
                    counts.ingests.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            });
        }
        for _ in 0..2 {
            let (env, stop, counts, running) = (&env, &stop, &counts, &running);
            s.spawn(move || {
                let _g = StopOnDrop(stop);
                let mut rng = rand::thread_rng();
                while running() {
                    let o = run(&mut env.sub(&["maintain", "index"], &[]));
                    if o.status.success() {
                        counts.compactions.fetch_add(1, Ordering::Relaxed);
                        counts
                            .deleted
                            .fetch_add(deleted(&text(&o.stdout)), Ordering::Relaxed);
                    } else {
                        let err = text(&o.stderr);
                        assert!(
                            o.status.code() == Some(1) && err.contains("longer than"),
                            "maintain index: {:?}: {err}",
                            o.status
                        );
                        counts.compactions_too_long.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
                }
            });
        }
        {
            let (m, stop, counts, running, pick) = (&m, &stop, &counts, &running, &pick);
            s.spawn(move || {
                let _g = StopOnDrop(stop);
                let mut rng = rand::thread_rng();
                while running() {
                    let g = pick(&mut rng);
                    check_through_mount(m, &g, rng.gen_bool(0.2));
                    counts.mount_reads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        {
            let (env, stop, counts, running, pick) = (&env, &stop, &counts, &running, &pick);
            s.spawn(move || {
                let _g = StopOnDrop(stop);
                let mut rng = rand::thread_rng();
                while running() {
                    let g = pick(&mut rng);
                    check_with_cat(env, &g, rng.gen_range(0..64), rng.gen_bool(0.3));
                    counts.cat_reads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let mut m = m;
    let log = m.log_text();
    assert!(m.stop().success(), "mount exit: {log}");
    let gens = gens.into_inner().unwrap();
    let c = &counts;
    eprintln!(
        "race of {secs} s: {} generations ({} ingests; {} compactions after an ingest took too \
         long); maintain index: {} published or nothing to do, {} took too long, {} superseded \
         objects deleted; {} generations read through the mount, {} files with cat",
        gens.len(),
        c.ingests.load(Ordering::Relaxed),
        c.ingest_compaction_warnings.load(Ordering::Relaxed),
        c.compactions.load(Ordering::Relaxed),
        c.compactions_too_long.load(Ordering::Relaxed),
        c.deleted.load(Ordering::Relaxed),
        c.mount_reads.load(Ordering::Relaxed),
        c.cat_reads.load(Ordering::Relaxed),
    );
    let problems: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("not in the repository index"))
        .collect();
    assert!(
        problems.is_empty(),
        "the mount logged errors:\n{}",
        problems.join("\n")
    );
    let count = |what: &str| index_objects(&env.repo, what).len();
    eprintln!(
        "after the race: {} roots, {} deltas, {} tables, {} filters",
        count("roots"),
        count("deltas"),
        count("tables"),
        count("filters")
    );

    // Quiet now: one compaction merges everything, and once its root has settled the next one
    // deletes everything else.
    eprintln!("{}", env.maintain().trim());
    std::thread::sleep(Duration::from_secs(SETTLE_SECS) + Duration::from_millis(1500));
    eprintln!("{}", env.maintain().trim());
    let (root_name, root) = current_root(&env.repo);
    let covers: HashSet<&str> = root["covers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let deltas = index_objects(&env.repo, "deltas");
    let uncovered = deltas
        .iter()
        .filter(|d| !covers.contains(d.as_str()))
        .count();
    let shards = root["base"]["shards"].as_array().map_or(0, Vec::len);
    let runs = root["runs"].as_array().map_or(0, Vec::len);
    let (roots, tables, filters) = (count("roots"), count("tables"), count("filters"));
    eprintln!(
        "after the final compactions: {roots} roots, {} deltas ({uncovered} uncovered), \
         {tables} tables ({shards} shards and {runs} runs in root {root_name}), {filters} filters",
        deltas.len(),
    );
    assert_eq!(uncovered, 0, "a full compaction covers every delta");
    assert_eq!(runs, 0, "a full compaction leaves no run");
    assert_eq!(roots, 1, "superseded roots are deleted once settled");
    assert_eq!(deltas.len(), 0, "covered deltas are deleted once settled");
    assert_eq!(tables, shards, "only the current base's shards are left");
    assert_eq!(filters, 1, "only the current base's filter bundle is left");

    // Every generation is listed, and readable in full through a fresh mount.
    for h in 0..HOSTS {
        let o = run(&mut env.sub(&["ls"], &["--json", &host_name(h)]));
        assert!(o.status.success(), "ls: {}", text(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let listed: HashSet<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].as_str().unwrap())
            .collect();
        for g in gens.iter().filter(|g| g.host == h) {
            assert!(listed.contains(g.name.as_str()), "{} not listed", g.path());
        }
    }
    let m = Mounted::start(
        &env.repo,
        &env.dir.path().join("mnt2"),
        &["--cache-dir", &cache_arg],
    );
    for g in &gens {
        check_through_mount(&m, g, true);
    }
    // And with cat, from the cache and without it, a sample of generations and files.
    let step = (gens.len() / 24).max(1);
    for (k, g) in gens.iter().step_by(step).enumerate() {
        check_with_cat(&env, g, k, k % 2 == 1);
    }
    eprintln!("all {} generations read back byte for byte", gens.len());
}

#[test]
fn damaged_or_newer_index_objects_are_refused_clearly() {
    let env = Env::new();
    let src = env.dir.path().join("src");
    let (g, _) = ingest(&env, &src, 0, 1);
    let want = content(0, 1);
    let deltas = index_objects(&env.repo, "deltas");
    assert!(!deltas.is_empty(), "the ingest wrote a delta");
    // A fresh process each time, without the local cache (which would still hold the
    // undamaged object).
    let fails = |args: &[&str]| -> String {
        let o = run(&mut env.sub(args, &["--no-cache"]));
        assert!(!o.status.success(), "{args:?} succeeded");
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        text(&o.stderr)
    };
    let latest = format!("{}/latest", host_name(0));
    let file = format!("{}/{}", g.path(), want[0].0);

    // (a) A reserved byte of a delta's head set: refused, naming the object.
    let key = format!("index/deltas/{}", deltas[0]);
    let path = env.repo.join(&key);
    let good = std::fs::read(&path).unwrap();
    let mut bad = good.clone();
    bad[29] = 1;
    std::fs::write(&path, &bad).unwrap();
    for args in [&["ls", latest.as_str()][..], &["cat", file.as_str()]] {
        let err = fails(args);
        assert!(
            err.contains(&key) && err.contains("reserved"),
            "{args:?}: {err}"
        );
    }
    // So does a compaction, which neither publishes nor deletes anything.
    let err = fails(&["maintain", "index"]);
    assert!(err.contains(&key) && err.contains("reserved"), "{err}");
    assert!(index_objects(&env.repo, "roots").is_empty());

    // (b) Restored, compacted: readable again.
    std::fs::write(&path, &good).unwrap();
    env.maintain();
    let o = run(&mut env.sub(&["cat"], &["--no-cache", &file]));
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(o.stdout, want[0].1);

    // A root from a newer version (a feature this one does not know), with a higher seq:
    // refused with a request to upgrade, never read as if the feature did not exist.
    let (_, mut root) = current_root(&env.repo);
    let seq = root["seq"].as_u64().unwrap() + 1;
    root["seq"] = seq.into();
    root["features"] = serde_json::json!(["something-new"]);
    let body = serde_json::to_vec_pretty(&root).unwrap();
    let newer = format!(
        "index/roots/{seq:016x}-{}",
        blake3::hash(&body).to_hex().as_str()
    );
    std::fs::write(env.repo.join(&newer), &body).unwrap();
    for args in [
        &["ls", latest.as_str()][..],
        &["cat", file.as_str()],
        &["maintain", "index"],
    ] {
        let err = fails(args);
        assert!(
            err.contains(&newer) && err.contains("upgrade") && err.contains("something-new"),
            "{args:?}: {err}"
        );
    }
    assert!(
        env.repo.join(&newer).exists(),
        "the newer root is left alone"
    );
    let roots = index_objects(&env.repo, "roots");
    assert_eq!(roots.len(), 2, "no root published over the newer one");
}
