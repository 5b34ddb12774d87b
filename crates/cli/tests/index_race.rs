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

use common::race::*;
use common::Mounted;
use rand::Rng;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const HOSTS: usize = 3;

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
