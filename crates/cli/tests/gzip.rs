//! gzip inputs stored decompressed (`--gunzip`, gzip data on `--stdin`) and recreated byte for
//! byte by `backtree cat --original`, with the real tools: gzip -1 … -9, pigz, Python's gzip
//! module, a multi-member file; corrupt and truncated streams; and thirty nights of dumps.

mod common;

use common::{bt, ok};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Writes `nights` SQL dumps of about `mb` MB into `dir` (scripts/lib/gen-dump.py).
fn dumps(dir: &Path, nights: u32, mb: f64) -> Vec<PathBuf> {
    let st = Command::new("python3")
        .arg(root().join("scripts/lib/gen-dump.py"))
        .arg(dir)
        .arg(nights.to_string())
        .arg(mb.to_string())
        .status()
        .expect("python3");
    assert!(st.success());
    (1..=nights)
        .map(|n| dir.join(format!("night-{n:02}.sql")))
        .collect()
}

/// The output of a shell command (`sh -c`), which must succeed.
fn sh(cmd: &str) -> Vec<u8> {
    let o = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

fn ingest_stdin(repo: &str, host: &str, name: &str, data: &[u8], extra: &[&str]) -> Output {
    let mut child = bt()
        .args(["ingest", "--repo", repo, "--host", host, "--stdin", name])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let d = data.to_vec();
    let w = std::thread::spawn(move || drop(stdin.write_all(&d)));
    let o = child.wait_with_output().unwrap();
    w.join().unwrap();
    o
}

fn cat(repo: &str, what: &str, original: bool) -> Output {
    let mut c = bt();
    c.args(["cat", "--repo", repo, what]);
    if original {
        c.arg("--original");
    }
    c.output().unwrap()
}

fn hash(b: &[u8]) -> String {
    blake3_hex(b)
}

fn blake3_hex(b: &[u8]) -> String {
    // The test compares bytes; a short digest keeps failure messages readable.
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    format!("{:016x}/{}", h.finish(), b.len())
}

/// Every compressor's output, by `--stdin` and by `--gunzip` on a directory, is stored
/// decompressed under the name without `.gz` and recreated exactly by `cat --original`.
#[test]
fn gzip_from_every_tool_is_stored_decompressed_and_recreated_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let r = repo.to_str().unwrap();
    ok(bt().args(["init", "--repo", r]));
    let plain = dumps(&d.join("dumps"), 2, 1.5);
    let (a, b) = (plain[0].display(), plain[1].display());
    let src = d.join("src");
    std::fs::create_dir(&src).unwrap();
    let mut cases: Vec<(String, String)> = (1..=9)
        .map(|l| (format!("gzip{l}.sql.gz"), format!("gzip -{l} -c {a}")))
        .collect();
    cases.push(("named.sql.gz".into(), format!("gzip -c {a}")));
    cases.push(("pigz.sql.gz".into(), format!("pigz -c {a}")));
    cases.push(("pigz11.sql.gz".into(), format!("pigz -11 -c {a}")));
    cases.push((
        "python.sql.gz".into(),
        format!(
            "python3 -c 'import gzip,sys; sys.stdout.buffer.write(gzip.compress(open(\"{a}\",\"rb\").read()))'"
        ),
    ));
    cases.push((
        "multi.sql.gz".into(),
        format!("gzip -6 -c {a}; gzip -1 -c {b}; printf '\\0\\0\\0\\0'"),
    ));
    cases.push(("archive.tgz".into(), format!("gzip -9 -c {a}")));
    let content = |name: &str| -> Vec<u8> {
        let mut c = std::fs::read(&plain[0]).unwrap();
        if name.starts_with("multi") {
            c.extend(std::fs::read(&plain[1]).unwrap());
        }
        c
    };
    for (i, (name, cmd)) in cases.iter().enumerate() {
        let gz = sh(cmd);
        std::fs::write(src.join(name), &gz).unwrap();
        // By --stdin: stored as the name without .gz.
        let host = format!("s{i}");
        let o = ingest_stdin(r, &host, name, &gz, &[]);
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let stored = gunzipped(name);
        let got = cat(r, &format!("{host}/latest/{stored}"), false);
        assert!(got.status.success(), "{name}");
        assert!(
            got.stdout == content(name),
            "{name}: decompressed content differs"
        );
        let orig = cat(r, &format!("{host}/latest/{stored}"), true);
        assert!(
            orig.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&orig.stderr)
        );
        assert_eq!(hash(&orig.stdout), hash(&gz), "{name}: original differs");
    }
    // A file whose stripped name exists is kept as it is; so is a .gz that is not gzip.
    std::fs::write(src.join("both"), b"x").unwrap();
    std::fs::write(src.join("both.gz"), sh(&format!("gzip -c {a}"))).unwrap();
    std::fs::write(src.join("fake.gz"), b"not gzip").unwrap();
    std::fs::write(src.join("trunc.gz"), &sh(&format!("gzip -c {a}"))[..5000]).unwrap();
    let o = bt()
        .args(["ingest", "--repo", r, "--host", "dir", "--gunzip"])
        .arg(&src)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let warn = String::from_utf8_lossy(&o.stderr);
    assert!(
        warn.contains("fake.gz") && warn.contains("trunc.gz"),
        "{warn}"
    );
    assert!(warn.contains("at byte 5000"), "{warn}");
    for (name, _) in &cases {
        let stored = gunzipped(name);
        let got = cat(r, &format!("dir/latest/{stored}"), false);
        assert!(
            got.stdout == content(name),
            "dir {name}: decompressed content differs"
        );
        let orig = cat(r, &format!("dir/latest/{stored}"), true);
        assert!(
            orig.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&orig.stderr)
        );
        let gz = std::fs::read(src.join(name)).unwrap();
        assert_eq!(
            hash(&orig.stdout),
            hash(&gz),
            "dir {name}: original differs"
        );
    }
    for kept in ["both", "both.gz", "fake.gz", "trunc.gz"] {
        let got = cat(r, &format!("dir/latest/{kept}"), false);
        assert!(got.status.success(), "{kept} kept as it is");
        assert_eq!(got.stdout, std::fs::read(src.join(kept)).unwrap(), "{kept}");
    }
    // An unchanged gzip file is not read again in the next generation.
    let o = bt()
        .args(["ingest", "--repo", r, "--host", "dir", "--gunzip", "--json"])
        .arg(&src)
        .output()
        .unwrap();
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("clean JSON on stdout");
    let stats = &v["generation"]["stats"];
    assert_eq!(stats["unchanged_files"], stats["files"], "{stats}");
    let again = cat(r, "dir/latest/multi.sql", true);
    assert_eq!(
        hash(&again.stdout),
        hash(&std::fs::read(src.join("multi.sql.gz")).unwrap())
    );
    // --no-gunzip keeps the stream as it comes; cat --original of it is an error.
    let gz = std::fs::read(src.join("gzip6.sql.gz")).unwrap();
    let o = ingest_stdin(r, "raw", "raw.sql.gz", &gz, &["--no-gunzip"]);
    assert!(o.status.success());
    assert_eq!(cat(r, "raw/latest/raw.sql.gz", false).stdout, gz);
    let o = cat(r, "raw/latest/raw.sql.gz", true);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not stored from gzip"));
    // cat of a directory or of a missing path: an error naming it.
    let o = cat(r, "dir/latest/nothing", false);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nothing"));
}

fn gunzipped(name: &str) -> String {
    match name.strip_suffix(".tgz") {
        Some(b) => format!("{b}.tar"),
        None => name.trim_end_matches(".gz").to_owned(),
    }
}

/// A corrupt or truncated gzip stream on --stdin fails with the byte offset, and publishes
/// nothing.
#[test]
fn corrupt_and_truncated_streams_fail_and_publish_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let r = repo.to_str().unwrap();
    ok(bt().args(["init", "--repo", r]));
    let plain = dumps(&d.join("dumps"), 1, 0.5);
    let gz = sh(&format!("gzip -6 -c {}", plain[0].display()));
    let cut = &gz[..gz.len() / 2];
    let o = ingest_stdin(r, "h", "db.sql.gz", cut, &[]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("truncated") && err.contains(&format!("at byte {}", cut.len())),
        "{err}"
    );
    let mut bad = gz.clone();
    let n = bad.len();
    bad[n - 7] ^= 0x55; // inside the CRC32
    let o = ingest_stdin(r, "h", "db.sql.gz", &bad, &[]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("CRC32") && err.contains(&format!("at byte {}", n - 8)),
        "{err}"
    );
    let mut bad = gz.clone();
    for b in &mut bad[2000..2100] {
        *b = !*b;
    }
    let o = ingest_stdin(r, "h", "db.sql.gz", &bad, &[]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    // Damaged deflate data is found where it starts or later (at worst by the CRC32).
    let at: u64 = err
        .split("at byte ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no offset in {err}"));
    assert!((2000..=n as u64).contains(&at), "{err}");
    eprintln!("damage at 2000..2100 reported: {err}");
    // A reserved block type in the first deflate block header: invalid deflate data, found at
    // once (the header has the file's name: the deflate data starts after its NUL).
    let mut bad = gz.clone();
    let start = 10 + bad[10..].iter().position(|&b| b == 0).unwrap() + 1;
    bad[start] |= 0b110;
    let o = ingest_stdin(r, "h", "db.sql.gz", &bad, &[]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("corrupt deflate data"), "{err}");
    assert!(
        err.contains(&format!("at byte {}", start + 1))
            || err.contains(&format!("at byte {start}")),
        "{err}"
    );
    let ls = bt().args(["ls", "--repo", r]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&ls.stdout).contains("\nh "),
        "nothing published"
    );
    assert!(!repo.join("snapshots/h").exists());
}

/// Thirty nights of a dump changing ~1% a night, ingested as `.sql.gz` files: every night's
/// original comes back exact, and the repository costs about what the same dumps uncompressed
/// cost (the recipes are a few percent on top), far from the thirty `.gz` files themselves.
///
/// BACKTREE_THIRTY_NIGHTS_MB sizes the dumps (default 3, for CI; the benchmark's is 200, see
/// scripts/bench-gzip.sh). The repository's chunks are scaled with the dumps (512 KiB chunks for
/// 200 MB dumps, as `init` makes them), so that a night changes as many chunks as at full size.
/// From 100 MB up the test also asserts the target for its ~200 MB dumps, a repository
/// under twice one night's `.gz` (measured at 20 MB: 2.12x, the same dumps uncompressed 1.78x).
/// At the CI size it cannot hold, with or without gzip: chunks of a few KiB compress a third
/// worse than gzip -6 (zstd -3 on 8 KiB chunks of the dump: 1.31x the `.gz`), and a night's
/// changes (the last 1% of the rows updated, 0.5% appended) plus chunk boundaries are ~2.7% of
/// the stored dump; the plain dumps alone reach ~2.3x the `.gz` at 3 MB.
#[test]
fn thirty_nights_of_gzip_dumps_deduplicate() {
    let mb: f64 = std::env::var("BACKTREE_THIRTY_NIGHTS_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let r = repo.to_str().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cfg = backtree_core::config::Config::new(true);
    let scale = (mb / 200.0).min(1.0);
    let avg = (((512 << 10) as f64 * scale) as u32)
        .next_power_of_two()
        .max(4096);
    cfg.chunker.min = avg;
    cfg.chunker.avg = avg;
    cfg.chunker.max = avg * 16;
    // The same dumps uncompressed, in a repository alike: what deduplication can reach.
    let plain_repo = d.join("plain-repo");
    for p in [&repo, &plain_repo] {
        std::fs::create_dir(p).unwrap();
        rt.block_on(backtree_core::Repository::init_with(
            std::sync::Arc::new(backtree_store::LocalStore::open(p).unwrap()),
            cfg.clone(),
        ))
        .unwrap();
    }
    let nights = dumps(&d.join("dumps"), 30, mb);
    let src = d.join("src");
    let plain_src = d.join("plain-src");
    std::fs::create_dir(&src).unwrap();
    std::fs::create_dir(&plain_src).unwrap();
    let (mut first_gz, mut first_repo) = (0u64, 0u64);
    for (i, night) in nights.iter().enumerate() {
        // Each night's dump replaces the last one, as a nightly `pg_dump | gzip` leaves it.
        let gz = sh(&format!("gzip -6 -n -c {}", night.display()));
        std::fs::write(src.join("db.sql.gz"), &gz).unwrap();
        ok(bt()
            .args(["ingest", "--repo", r, "--host", "db", "--gunzip"])
            .arg(&src)
            .args(["--time", &format!("2026-11-{:02}T01:00:00Z", i + 1)]));
        std::fs::copy(night, plain_src.join("db.sql")).unwrap();
        ok(bt()
            .args([
                "ingest",
                "--repo",
                plain_repo.to_str().unwrap(),
                "--host",
                "db",
            ])
            .arg(&plain_src)
            .args(["--time", &format!("2026-11-{:02}T01:00:00Z", i + 1)]));
        let orig = cat(r, "db/latest/db.sql", true);
        assert!(
            orig.status.success(),
            "night {}: {}",
            i + 1,
            String::from_utf8_lossy(&orig.stderr)
        );
        assert!(orig.stdout == gz, "night {}: original differs", i + 1);
        if i == 0 {
            first_gz = gz.len() as u64;
            first_repo = walk(&repo);
        }
    }
    let size: u64 = walk(&repo);
    let plain = walk(&plain_repo);
    eprintln!(
        "thirty nights of {mb} MB dumps (chunks {avg} bytes): repository {size} bytes ({:.2}x \
         one night's gzip -6 of {first_gz} bytes; {first_repo} after the first night), the plain \
         dumps' {plain} ({:.2}x)",
        size as f64 / first_gz as f64,
        plain as f64 / first_gz as f64
    );
    assert!(
        size * 4 < plain * 5,
        "gzip dumps cost {size} bytes, over 1.25 x the plain dumps' {plain}"
    );
    assert!(
        size * 4 < 30 * first_gz,
        "{size} bytes: over a quarter of the thirty .gz files as they are"
    );
    if mb >= 100.0 {
        assert!(
            size < 2 * first_gz,
            "repository {size} bytes ≥ 2 × {first_gz}"
        );
    }
}

fn walk(p: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        n += if m.is_dir() { walk(&e.path()) } else { m.len() };
    }
    n
}
