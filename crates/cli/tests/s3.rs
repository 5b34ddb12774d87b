//! `backtree` against a real S3 server: the single-node Garage that scripts/test.sh starts
//! (scripts/garage.sh) and describes in `BACKTREE_TEST_S3`, the AWS_* variables and
//! `BACKTREE_TEST_GARAGE_DIR`. Init, ingest, ls, mount, read and an rsync restore; then a store
//! outage in the middle of an ingest and during reads through the mount.
//!
//! Under CI a missing server is a failure; elsewhere these tests say they were skipped. The
//! tests share one server and one of them stops it, so they run one at a time.

mod common;

use backtree_core::testing::{build_fixture, compare_dirs, random_bytes};
use common::{bt, ok, rsync_restore, Mounted};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

/// The test bucket's URL, or `None` (skip) outside CI when no server is configured.
fn s3_base() -> Option<String> {
    match std::env::var("BACKTREE_TEST_S3") {
        Ok(u) if !u.is_empty() => Some(u),
        _ if std::env::var_os("CI").is_some() => {
            panic!(
                "S3 tests need Garage: run scripts/test.sh, which starts one (scripts/garage.sh)"
            )
        }
        _ => {
            eprintln!("skipped: BACKTREE_TEST_S3 is not set (scripts/test.sh starts Garage)");
            None
        }
    }
}

/// A fresh repository URL under the test bucket.
fn fresh_repo(base: &str, what: &str) -> String {
    format!("{base}/cli-{what}-{:016x}", rand::random::<u64>())
}

fn garage(action: &str) {
    let dir = std::env::var("BACKTREE_TEST_GARAGE_DIR")
        .expect("BACKTREE_TEST_GARAGE_DIR (set by scripts/test.sh) names the Garage to stop");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/garage.sh");
    let st = Command::new("bash")
        .arg(script)
        .arg(action)
        .arg(&dir)
        .stdout(Stdio::null())
        .status()
        .expect("run scripts/garage.sh");
    assert!(st.success(), "scripts/garage.sh {action} {dir} failed");
}

fn generations(repo: &str, host: &str) -> usize {
    let out = ok(bt().args(["ls", "--json", "--repo", repo]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("ls --json");
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|h| h["host"] == host)
        .map(|h| h["generations"].as_u64().unwrap_or(0) as usize)
        .sum()
}

fn ingest_json(repo: &str, host: &str, src: &Path, env: &[(&str, &str)]) -> serde_json::Value {
    let mut c = bt();
    c.args(["ingest", "--json", "--repo", repo, "--host", host])
        .arg(src);
    for (k, v) in env {
        c.env(k, v);
    }
    serde_json::from_str(&ok(&mut c)).expect("ingest --json")
}

#[test]
fn ingest_ls_mount_and_rsync_restore_on_s3() {
    let Some(base) = s3_base() else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    build_fixture(&src, true);
    let repo = fresh_repo(&base, "restore");

    let init = bt().args(["init", "--repo", &repo]).output().unwrap();
    assert!(init.status.success());
    let said = String::from_utf8_lossy(&init.stderr);
    assert!(said.contains("ignores conditional writes"), "{said}");
    // A second init is refused in one sentence, without the note meant for a new repository.
    let again = bt().args(["init", "--repo", &repo]).output().unwrap();
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && said.contains("already"),
        "{said}"
    );
    assert!(!said.contains("conditional"), "{said}");
    let first = ingest_json(&repo, "ve123", &src, &[]);
    assert!(
        first["generation"]["stats"]["new_stored_bytes"]
            .as_u64()
            .unwrap()
            > 0
    );
    // An unchanged second ingest stores nothing new.
    let second = ingest_json(&repo, "ve123", &src, &[]);
    assert_eq!(second["generation"]["stats"]["new_stored_bytes"], 0);
    assert_eq!(generations(&repo, "ve123"), 2);
    let listing = ok(bt().args(["ls", "--repo", &repo, "ve123/latest"]));
    assert!(listing.contains("small.txt"), "{listing}");

    let mut m = Mounted::start(&repo, &dir.path().join("mnt"), &[]);
    let latest = m.mnt.join("ve123/latest");
    let out = dir.path().join("restored");
    rsync_restore(&m, &latest, &out);
    let diffs = compare_dirs(&src, &out);
    assert!(diffs.is_empty(), "restored tree differs: {diffs:#?}");
    assert!(m.stop().success(), "{}", m.log_text());
}

#[test]
fn store_outage_during_ingest_and_reads() {
    let Some(base) = s3_base() else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    const FILES: u64 = 24;
    const SIZE: usize = 8 << 20;
    for i in 0..FILES {
        std::fs::write(src.join(format!("part{i:02}")), random_bytes(100 + i, SIZE)).unwrap();
    }
    let repo = fresh_repo(&base, "outage");
    ok(bt().args(["init", "--repo", &repo]));

    // Garage goes away while the ingest uploads: a clear error, no generation.
    let fast = [
        ("BACKTREE_S3_ATTEMPTS", "2"),
        ("BACKTREE_CHECKPOINT", "16M"),
    ];
    let child = bt()
        .args(["ingest", "--repo", &repo, "--host", "db1"])
        .arg(&src)
        .envs(fast)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ingest");
    wait_for_packs(&repo, 4);
    garage("kill"); // at once, like a crash: the ingest is surely still uploading
    let out = wait_output(child, Duration::from_secs(120));
    garage("start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(
        err.contains("cannot reach S3 endpoint"),
        "the error names the unreachable store: {err}"
    );
    assert_eq!(
        generations(&repo, "db1"),
        0,
        "no generation after a failed ingest"
    );

    // Back: the next ingest succeeds and does not upload again what was checkpointed.
    let done = ingest_json(&repo, "db1", &src, &fast);
    let stats = &done["generation"]["stats"];
    let raw = stats["new_raw_bytes"].as_u64().unwrap();
    let total = FILES * SIZE as u64;
    assert!(raw < total, "reused uploads: new {raw} of {total} bytes");
    assert_eq!(generations(&repo, "db1"), 1);

    // Reads through the mount: EIO during an outage (after bounded retries), fine after it.
    let mut m = Mounted::start(&repo, &dir.path().join("mnt"), &["--s3-attempts", "2"]);
    let gen = m.mnt.join("db1/latest");
    assert_eq!(
        std::fs::read(gen.join("part00")).unwrap(),
        random_bytes(100, SIZE)
    );
    let mut f = std::fs::File::open(gen.join("part01")).unwrap();
    garage("stop");
    // The tree stays browsable from what the mount has seen (its last listings)...
    std::thread::sleep(Duration::from_millis(1100)); // past the virtual directories' TTL
    assert!(gen.join("part02").exists());
    // ...and a read that needs the store is EIO after bounded retries.
    let t = Instant::now();
    let mut buf = Vec::new();
    let e = std::io::Read::read_to_end(&mut f, &mut buf).expect_err("no store: EIO");
    let waited = t.elapsed();
    garage("start");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        waited < Duration::from_secs(60),
        "bounded retries: {waited:?}"
    );
    assert!(m.log_text().contains("db1/"), "{}", m.log_text());
    assert!(m.log_text().contains("part01"), "{}", m.log_text());
    // The same open file reads fine once the store is back.
    let mut again = vec![0u8; SIZE];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut again, 0).unwrap();
    assert!(again == random_bytes(101, SIZE), "reads work again");
    drop(f);
    assert!(m.stop().success(), "{}", m.log_text());
}

/// Waits until the repository holds at least `n` data packs (the ingest is under way).
fn wait_for_packs(repo: &str, n: usize) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt
        .block_on(backtree_store::S3Store::from_url(repo, Default::default()))
        .unwrap();
    let start = Instant::now();
    loop {
        let packs = rt
            .block_on(backtree_store::ObjectStore::list(&store, "packs/data/"))
            .map(|v| v.len())
            .unwrap_or(0);
        if packs >= n {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the ingest stored no packs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_output(mut child: std::process::Child, limit: Duration) -> std::process::Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("ingest did not stop within {limit:?} of the outage");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}
