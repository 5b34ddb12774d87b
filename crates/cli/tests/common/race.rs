//! What the process race tests share (`index_race.rs`, `prune_race.rs`): a repository and the
//! environment of every process, deterministic changing sources of several hosts, ingests, and
//! checks of generations through a mount and with `cat`.

use super::{bt, Mounted};
use backtree_core::testing::random_bytes;
use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Settle time given to every process (seconds).
pub const SETTLE_SECS: u64 = 2;
/// Longest any one child process may run before the test kills it and fails.
pub const CHILD_LIMIT: Duration = Duration::from_secs(120);

/// A temporary repository and the environment every process of a test gets.
pub struct Env {
    pub dir: tempfile::TempDir,
    /// A local directory, or an `s3://` URL (as a path: it is only passed on).
    pub repo: PathBuf,
    pub cache: PathBuf,
    /// More environment for every process.
    pub vars: Vec<(String, String)>,
}

impl Env {
    pub fn new() -> Env {
        Env::with(None, &[])
    }

    /// A fresh repository at `repo` (default: a local one in the test's directory), every
    /// process getting `vars` too.
    pub fn with(repo: Option<String>, vars: &[(&str, &str)]) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo.map_or_else(|| dir.path().join("repo"), PathBuf::from);
        let cache = dir.path().join("cache");
        let vars = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let e = Env {
            dir,
            repo,
            cache,
            vars,
        };
        let o = run(e.cmd().arg("init").arg("--repo").arg(&e.repo));
        assert!(o.status.success(), "init: {}", text(&o.stderr));
        e
    }

    /// `backtree` with the test's settle time, compaction trigger and cache directory.
    pub fn cmd(&self) -> Command {
        let mut c = bt();
        c.env("BACKTREE_INDEX_SETTLE", SETTLE_SECS.to_string())
            .env("BACKTREE_INDEX_DUE", "2")
            .env("BACKTREE_CACHE_DIR", &self.cache)
            .env_remove("BACKTREE_LOG")
            .env_remove("RUST_LOG");
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c
    }

    /// `backtree SUB --repo R ARGS…`.
    pub fn sub(&self, sub: &[&str], args: &[&str]) -> Command {
        let mut c = self.cmd();
        c.args(sub).arg("--repo").arg(&self.repo).args(args);
        c
    }

    /// `backtree maintain index`, repeated while it only refuses to publish because it took too
    /// long (which a loaded machine may cause with a 2 s settle time).
    pub fn maintain(&self) -> String {
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

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a child to its end, killing it (and failing) after [`CHILD_LIMIT`].
pub fn run(c: &mut Command) -> Output {
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
pub struct StopOnDrop<'a>(pub &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

pub fn host_name(h: usize) -> String {
    format!("h{h}")
}

pub fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The files of host `h`'s source at iteration `i` (deterministic): some the same everywhere
/// and always, some shared by every host for a few iterations, some unique, of sizes from a
/// few bytes to a few hundred KB.
pub fn content(h: usize, i: u64) -> Vec<(String, Vec<u8>)> {
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

pub fn write_tree(dir: &Path, files: &[(String, Vec<u8>)]) {
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
pub fn walk(dir: &Path) -> std::io::Result<BTreeSet<String>> {
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
pub struct Gen {
    pub host: usize,
    pub name: String,
    pub iter: u64,
}

impl Gen {
    pub fn path(&self) -> String {
        format!("{}/{}", host_name(self.host), self.name)
    }
}

/// Ingests host `h`'s source at iteration `i`; returns the generation and the stderr.
pub fn ingest(env: &Env, src: &Path, h: usize, i: u64) -> (Gen, String) {
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
pub fn check_through_mount(m: &Mounted, g: &Gen, listing: bool) {
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
pub fn check_with_cat(env: &Env, g: &Gen, k: usize, no_cache: bool) {
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
