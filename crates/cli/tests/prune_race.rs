//! Garbage collection under concurrency, all as processes (issue 14): several writers ingesting
//! changing trees, a writer stopped (SIGSTOP) past its lease, `forget` and `prune` in a loop with
//! a grace period of one second, index compactions and a FUSE mount reading, on a local
//! repository and on Garage. At the end `verify --read-data` is clean and every generation left
//! reads byte for byte as its source; no paused writer committed. A second test pins down what
//! a reader of a generation pruned under it sees: EIO and a log line, never wrong bytes.
//!
//! The race runs `BACKTREE_TEST_PRUNE_SECS` seconds (default 20; 12 on S3). No timing is
//! asserted. Needs /dev/fuse (skipped with a note without it).

mod common;

use backtree_core::testing::random_bytes;
use common::race::*;
use common::Mounted;
use rand::Rng;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const HOSTS: usize = 3;
/// Lease time of every process (seconds); the paused writer is stopped for three times it.
const LEASE_SECS: f64 = 3.0;

fn env_for(repo: Option<String>) -> Env {
    Env::with(
        repo,
        &[
            ("BACKTREE_PRUNE_GRACE", "1"),
            ("BACKTREE_PRUNE_POLL", "0.1"),
            ("BACKTREE_LEASE_MARGIN", "0"),
            ("BACKTREE_LEASE_SECS", &LEASE_SECS.to_string()),
        ],
    )
}

fn fuse_available() -> bool {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("note: prune race test skipped: /dev/fuse is not available");
        return false;
    }
    true
}

/// The paused writer's dump at iteration `i`: a part shared by every iteration and a new part.
fn dump(i: u64) -> Vec<u8> {
    let mut d = random_bytes(9 << 40, 600_000);
    d.extend(random_bytes(10 << 40 | i, 600_000));
    d
}

const PAUSED: &str = "paused";

/// Generations listed now: (host, name).
fn listed(env: &Env) -> HashSet<(String, String)> {
    let o = run(&mut env.sub(&["ls"], &["--json"]));
    assert!(o.status.success(), "ls: {}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut out = HashSet::new();
    for h in v.as_array().unwrap() {
        let host = h["host"].as_str().unwrap();
        let o = run(&mut env.sub(&["ls"], &["--json", host]));
        assert!(o.status.success(), "ls {host}: {}", text(&o.stderr));
        let gs: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        for g in gs.as_array().unwrap() {
            out.insert((host.to_owned(), g["name"].as_str().unwrap().to_owned()));
        }
    }
    out
}

/// Whether a generation still exists (a reader's failure is fine only if it was forgotten).
fn exists(env: &Env, g: &Gen) -> bool {
    let o = run(&mut env.sub(&["ls"], &["--json", &host_name(g.host)]));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    v.as_array()
        .is_some_and(|a| a.iter().any(|x| x["name"] == g.name.as_str()))
}

/// Reads a generation through the mount: every file must be its source's bytes, unless the
/// generation was forgotten meanwhile (then reads may fail). `true` if it was read whole.
fn read_or_vanished(env: &Env, m: &Mounted, g: &Gen) -> bool {
    let root = m.mnt.join(g.path());
    for (p, bytes) in content(g.host, g.iter) {
        match std::fs::read(root.join(&p)) {
            Ok(got) => assert!(
                got == bytes,
                "{}/{p}: wrong bytes on the mount ({} bytes, expected {})",
                g.path(),
                got.len(),
                bytes.len()
            ),
            Err(e) => {
                assert!(
                    !exists(env, g),
                    "reading {}/{p} on the mount: {e}, but the generation exists\n{}",
                    g.path(),
                    m.log_text()
                );
                return false;
            }
        }
    }
    true
}

#[derive(Default)]
struct Counts {
    ingests: AtomicUsize,
    lapsed_writers: AtomicUsize,
    paused_lapsed: AtomicUsize,
    paused_committed: AtomicUsize,
    forgets: AtomicUsize,
    prunes: AtomicUsize,
    pruned_packs: AtomicUsize,
    repacked: AtomicUsize,
    waited: AtomicUsize,
    compactions: AtomicUsize,
    reads: AtomicUsize,
    vanished: AtomicUsize,
}

/// One ingest of the paused writer: `--stdin` fed in two parts, stopped between them for three
/// times its lease when `pause`. Returns the generation's name if it committed.
fn paused_ingest(env: &Env, i: u64, pause: bool) -> Option<String> {
    let mut child = env
        .sub(
            &["ingest"],
            &["--json", "--host", PAUSED, "--stdin", "dump.bin"],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let data = dump(i);
    let mut input = child.stdin.take().unwrap();
    input.write_all(&data[..700_000]).unwrap();
    if pause {
        // Let it take its lease and store what it has read so far.
        std::thread::sleep(Duration::from_millis(300));
        let pid = child.id() as i32;
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        std::thread::sleep(Duration::from_secs_f64(3.0 * LEASE_SECS));
        unsafe { libc::kill(pid, libc::SIGCONT) };
    }
    input.write_all(&data[700_000..]).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    if out.status.success() {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        return Some(v["generation"]["name"].as_str().unwrap().to_owned());
    }
    assert!(
        out.status.code() == Some(1) && err.contains("lapsed"),
        "paused ingest {i}: {:?}: {err}",
        out.status
    );
    None
}

fn race(env: &Env, secs: u64) {
    let srcs: Vec<PathBuf> = (0..HOSTS)
        .map(|h| env.dir.path().join(format!("src{h}")))
        .collect();
    let gens: Mutex<Vec<Gen>> =
        Mutex::new((0..HOSTS).map(|h| ingest(env, &srcs[h], h, 0).0).collect());
    let paused: Mutex<HashMap<String, u64>> = Mutex::new(HashMap::new());
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

    std::thread::scope(|s| {
        for (h, src) in srcs.iter().enumerate() {
            let (gens, stop, counts, running) = (&gens, &stop, &counts, &running);
            s.spawn(move || {
                let _g = StopOnDrop(stop);
                let mut i = 1;
                while running() {
                    write_tree(src, &content(h, i));
                    let o = run(env
                        .sub(&["ingest"], &["--json", "--host", &host_name(h)])
                        .arg(src));
                    let err = text(&o.stderr);
                    if o.status.success() {
                        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                        let name = v["generation"]["name"].as_str().unwrap().to_owned();
                        gens.lock().unwrap().push(Gen {
                            host: h,
                            name,
                            iter: i,
                        });
                        counts.ingests.fetch_add(1, Ordering::Relaxed);
                    } else {
                        // A loaded machine may starve a writer past its short lease: it must
                        // then commit nothing, which the final check confirms.
                        assert!(err.contains("lapsed"), "ingest h{h} {i}: {err}");
                        counts.lapsed_writers.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                }
            });
        }
        {
            let (paused, stop, counts, running) = (&paused, &stop, &counts, &running);
            s.spawn(move || {
                let _g = StopOnDrop(stop);
                let mut i = 0;
                while running() {
                    let pause = i % 2 == 0;
                    match paused_ingest(env, i, pause) {
                        Some(name) => {
                            if pause {
                                counts.paused_committed.fetch_add(1, Ordering::Relaxed);
                            }
                            paused.lock().unwrap().insert(name, i);
                        }
                        None => {
                            counts.paused_lapsed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    i += 1;
                }
            });
        }
        {
            let (stop, counts, running) = (&stop, &counts, &running);
            s.spawn(move || {
                let _g = StopOnDrop(stop);
                let mut rng = rand::thread_rng();
                while running() {
                    let keep = rng.gen_range(2..5).to_string();
                    let o = run(&mut env.sub(&["forget"], &["--keep-last", &keep]));
                    assert!(o.status.success(), "forget: {}", text(&o.stderr));
                    counts.forgets.fetch_add(1, Ordering::Relaxed);
                    let o = run(&mut env.sub(&["prune"], &["--json", "--repack-threshold", "30"]));
                    let err = text(&o.stderr);
                    if !o.status.success() {
                        // Only the index rewrite taking longer than the (tiny) settle time
                        // allows may fail; nothing was deleted then.
                        assert!(err.contains("longer than"), "prune: {:?}: {err}", o.status);
                        continue;
                    }
                    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                    counts.prunes.fetch_add(1, Ordering::Relaxed);
                    let n = |k: &str| v[k].as_u64().unwrap_or(0) as usize;
                    counts
                        .pruned_packs
                        .fetch_add(n("deleted_packs"), Ordering::Relaxed);
                    counts
                        .repacked
                        .fetch_add(n("copied_blobs"), Ordering::Relaxed);
                    let w = v["waited_for"].as_array().map_or(0, Vec::len);
                    counts.waited.fetch_add(w, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(rng.gen_range(0..500)));
                }
            });
        }
        {
            let (stop, counts, running) = (&stop, &counts, &running);
            s.spawn(move || {
                let _g = StopOnDrop(stop);
                while running() {
                    let o = run(&mut env.sub(&["maintain", "index"], &[]));
                    let err = text(&o.stderr);
                    assert!(
                        o.status.success() || err.contains("longer than"),
                        "maintain index: {err}"
                    );
                    counts.compactions.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(700));
                }
            });
        }
        {
            let (m, gens, stop, counts, running) = (&m, &gens, &stop, &counts, &running);
            s.spawn(move || {
                let _g = StopOnDrop(stop);
                let mut rng = rand::thread_rng();
                while running() {
                    let g = {
                        let g = gens.lock().unwrap();
                        g[rng.gen_range(g.len().saturating_sub(4 * HOSTS)..g.len())].clone()
                    };
                    if read_or_vanished(env, m, &g) {
                        counts.reads.fetch_add(1, Ordering::Relaxed);
                    } else {
                        counts.vanished.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let mut m = m;
    let log = m.log_text();
    assert!(m.stop().success(), "mount exit: {log}");
    let c = &counts;
    let l = |a: &AtomicUsize| a.load(Ordering::Relaxed);
    eprintln!(
        "prune race of {secs} s: {} ingests ({} lapsed under load); paused writer: {} lapsed, \
         {} paused and committed anyway; {} forgets, {} prunes deleting {} packs and repacking \
         {} blobs, waiting for {} leases; {} compactions; {} generations read through the \
         mount, {} vanished while read",
        l(&c.ingests),
        l(&c.lapsed_writers),
        l(&c.paused_lapsed),
        l(&c.paused_committed),
        l(&c.forgets),
        l(&c.prunes),
        l(&c.pruned_packs),
        l(&c.repacked),
        l(&c.waited),
        l(&c.compactions),
        l(&c.reads),
        l(&c.vanished),
    );
    assert_eq!(
        l(&c.paused_committed),
        0,
        "a writer paused past its lease committed"
    );
    assert!(
        l(&c.prunes) > 0 && l(&c.pruned_packs) > 0,
        "prune deleted nothing"
    );

    // Quiet: a last forget and prune; then the repository is sound and every generation left
    // reads as its source.
    let o = run(&mut env.sub(&["forget"], &["--keep-last", "3"]));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = run(&mut env.sub(&["prune"], &[]));
    assert!(o.status.success(), "final prune: {}", text(&o.stderr));
    eprintln!("{}", text(&o.stdout).trim());
    let o = run(&mut env.sub(&["verify"], &["--read-data"]));
    assert!(
        o.status.success(),
        "verify --read-data after the race:\n{}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    eprintln!("{}", text(&o.stdout).trim());
    let left = listed(env);
    let gens = gens.into_inner().unwrap();
    let by_name: HashMap<(String, String), &Gen> = gens
        .iter()
        .map(|g| ((host_name(g.host), g.name.clone()), g))
        .collect();
    let paused = paused.into_inner().unwrap();
    let m = Mounted::start(&env.repo, &env.dir.path().join("mnt2"), &[]);
    let mut checked = 0;
    for (host, name) in &left {
        if host == PAUSED {
            let i = paused
                .get(name)
                .unwrap_or_else(|| panic!("{host}/{name}: a paused writer's generation"));
            let got = std::fs::read(m.mnt.join(host).join(name).join("dump.bin")).unwrap();
            assert!(got == dump(*i), "{host}/{name}/dump.bin differs");
        } else {
            let g = by_name
                .get(&(host.clone(), name.clone()))
                .unwrap_or_else(|| panic!("{host}/{name}: not committed by a writer"));
            assert!(read_or_vanished(env, &m, g), "{host}/{name} unreadable");
            let got = walk(&m.mnt.join(g.path())).unwrap();
            let want: BTreeSet<String> = content(g.host, g.iter)
                .into_iter()
                .map(|(p, _)| p)
                .collect();
            assert_eq!(got, want, "files of {host}/{name}");
        }
        checked += 1;
    }
    eprintln!("{checked} generations left, each read whole through a fresh mount");
    let mut m = m;
    assert!(m.stop().success());
}

#[test]
fn prune_races_writers_paused_writers_forget_and_a_mount() {
    if !fuse_available() {
        return;
    }
    let secs = std::env::var("BACKTREE_TEST_PRUNE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    race(&env_for(None), secs);
}

#[test]
fn prune_races_on_s3() {
    if !fuse_available() {
        return;
    }
    let base = match std::env::var("BACKTREE_TEST_S3") {
        Ok(u) if !u.is_empty() => u,
        _ if std::env::var_os("CI").is_some() => {
            panic!("S3 tests need Garage: run scripts/test.sh, which starts one")
        }
        _ => {
            eprintln!("skipped: BACKTREE_TEST_S3 is not set (scripts/test.sh starts Garage)");
            return;
        }
    };
    let secs = std::env::var("BACKTREE_TEST_PRUNE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let repo = format!("{base}/prune-race-{:016x}", rand::random::<u64>());
    race(&env_for(Some(repo)), secs);
}

/// A file read through the mount while its generation is forgotten and pruned: the next read
/// of data that was not fetched yet gives EIO with a log line naming what is gone; the
/// generation disappears from the host's directory; the generation kept reads intact.
#[test]
fn a_file_pruned_under_a_reader_gives_eio_never_wrong_bytes() {
    if !fuse_available() {
        return;
    }
    let env = env_for(None);
    let src = env.dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let big = random_bytes(77, 24 << 20);
    std::fs::write(src.join("big.bin"), &big).unwrap();
    let o = run(env.sub(&["ingest"], &["--json", "--host", "h"]).arg(&src));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let old = v["generation"]["name"].as_str().unwrap().to_owned();
    std::fs::remove_file(src.join("big.bin")).unwrap();
    std::fs::write(src.join("small.txt"), b"kept\n").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let o = run(env.sub(&["ingest"], &["--host", "h"]).arg(&src));
    assert!(o.status.success(), "{}", text(&o.stderr));

    let m = Mounted::start(
        &env.repo,
        &env.dir.path().join("mnt"),
        &["--cache-size", "2M"],
    );
    let f = std::fs::File::open(m.mnt.join("h").join(&old).join("big.bin")).unwrap();
    let mut head = vec![0u8; 4096];
    f.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, big[..4096]);

    let o = run(&mut env.sub(&["forget"], &["--keep-last", "1"]));
    assert!(o.status.success(), "{}", text(&o.stderr));
    std::thread::sleep(Duration::from_millis(1100));
    let o = run(&mut env.sub(&["prune"], &["--json"]));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r["deleted_packs"].as_u64().unwrap() > 0, "{r}");

    // Far from what was read: not cached, its pack is gone.
    let mut buf = vec![0u8; 65536];
    let err = f.read_exact_at(&mut buf, 20 << 20).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let log = m.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("packs/data/") && l.contains("big.bin")),
        "no log line names the pack and the file:\n{log}"
    );
    // The forgotten generation is gone from the listing; the kept one reads.
    let names: Vec<String> = std::fs::read_dir(m.mnt.join("h"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.contains(&old), "{names:?}");
    assert_eq!(
        std::fs::read(m.mnt.join("h/latest/small.txt")).unwrap(),
        b"kept\n"
    );
    drop(f);
    let mut m = m;
    assert!(m.stop().success());
}
