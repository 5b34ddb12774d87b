//! End-to-end tests of the `backtree` binary: exit codes, error sentences, skipped paths,
//! SIGKILL of a running ingest, and `ls` output.

use backtree_core::testing::{build_fixture, compare, random_bytes};
use backtree_core::Repository;
use backtree_store::LocalStore;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

fn bt() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_backtree"));
    c.env_remove("BACKTREE_REPO");
    c
}

fn run(args: &[&str]) -> Output {
    bt().args(args).output().expect("run backtree")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn count_files(dir: &Path) -> usize {
    backtree_core::testing::list_files(dir).len()
}

async fn open(repo: &Path) -> Repository {
    Repository::open(Arc::new(LocalStore::open(repo).unwrap()))
        .await
        .unwrap()
}

#[test]
fn clear_errors_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let repo_s = repo.to_str().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), b"data").unwrap();

    // No repository yet.
    let o = run(&[
        "ingest",
        "--repo",
        repo_s,
        "--host",
        "h",
        src.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(
        err.contains("does not exist") && err.contains("backtree init"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one sentence: {err}");

    // An existing directory that is not a repository.
    std::fs::create_dir(&repo).unwrap();
    let o = run(&["ls", "--repo", repo_s]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("is not a backtree repository"),
        "{}",
        text(&o.stderr)
    );

    let o = run(&["init", "--repo", repo_s]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = run(&["init", "--repo", repo_s]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("already a backtree repository"));

    // Missing source: one sentence, nothing written.
    let before = count_files(&repo);
    let o = run(&[
        "ingest",
        "--repo",
        repo_s,
        "--host",
        "h",
        "/nonexistent/path",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("/nonexistent/path does not exist"),
        "{}",
        text(&o.stderr)
    );
    assert_eq!(count_files(&repo), before, "nothing written");

    // Usage errors are exit code 2.
    assert_eq!(run(&["ingest", "--repo", repo_s]).status.code(), Some(2));
    let o = run(&[
        "ingest",
        "--repo",
        repo_s,
        "--host",
        "h",
        "--time",
        "yesterday",
        src.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("RFC 3339"));

    // BACKTREE_REPO stands in for --repo.
    let o = bt()
        .env("BACKTREE_REPO", repo_s)
        .args(["ingest", "--host", "h", src.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let line = text(&o.stdout);
    assert!(
        line.starts_with("h/") && line.contains("1 files"),
        "summary: {line}"
    );

    // A repository of another format version is refused before anything is read or written.
    let cfg = repo.join("config");
    let original = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, original.replace("\"version\": 1", "\"version\": 2")).unwrap();
    let before = count_files(&repo);
    let o = run(&[
        "ingest",
        "--repo",
        repo_s,
        "--host",
        "h",
        src.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(
        err.contains("format version 2") && err.contains("version 1"),
        "{err}"
    );
    assert_eq!(count_files(&repo), before);
    std::fs::write(&cfg, original).unwrap();

    // --help exists for every command.
    for cmd in ["init", "ingest", "ls"] {
        let o = run(&[cmd, "--help"]);
        assert!(
            o.status.success() && text(&o.stdout).contains("--repo"),
            "{cmd} --help"
        );
    }
}

/// Unreadable files and directories are reported with their path and skipped; the generation
/// is committed and the exit code is 3. Runs the binary as `nobody`, since root reads anything.
#[test]
fn unreadable_paths_are_skipped_with_exit_code_3() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run the binary as another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let repo = dir.path().join("repo");
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("private")).unwrap();
    std::fs::write(src.join("ok.txt"), b"fine").unwrap();
    std::fs::write(src.join("secret"), b"no").unwrap();
    std::fs::write(src.join("private/inner"), b"no").unwrap();
    std::fs::set_permissions(src.join("secret"), std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::set_permissions(src.join("private"), std::fs::Permissions::from_mode(0o000)).unwrap();
    assert!(run(&["init", "--repo", repo.to_str().unwrap()])
        .status
        .success());
    let chown = Command::new("chown")
        .args(["-R", "65534:65534", repo.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(chown.success());

    let o = bt()
        .uid(65534)
        .gid(65534)
        .args([
            "ingest",
            "--repo",
            repo.to_str().unwrap(),
            "--host",
            "h",
            src.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "stderr: {err}");
    assert!(
        err.contains(&format!("{}", src.join("secret").display())),
        "{err}"
    );
    assert!(
        err.contains(&format!("{}", src.join("private").display())),
        "{err}"
    );
    assert!(
        text(&o.stdout).contains("2 paths skipped"),
        "{}",
        text(&o.stdout)
    );

    let o = run(&["ls", "--repo", repo.to_str().unwrap(), "h/latest"]);
    let listing = text(&o.stdout);
    assert!(
        listing.contains("ok.txt") && !listing.contains("secret"),
        "{listing}"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let m = rt.block_on(async {
        let r = open(&repo).await;
        let g = r.latest("h").await.unwrap().unwrap();
        r.manifest("h", &g).await.unwrap()
    });
    assert_eq!(m.stats.skipped, 2);
    assert_eq!(m.errors.len(), 2);
}

/// SIGKILL of the writer at several moments: no partial generation is ever visible, and the
/// next ingest completes with an exact result.
#[test]
fn sigkill_during_ingest_leaves_no_partial_generation() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let repo_s = repo.to_str().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    for i in 0..40u64 {
        std::fs::write(
            src.join("sub").join(format!("f{i}")),
            random_bytes(i, 3 << 20),
        )
        .unwrap();
    }
    build_fixture(&src.join("fixture"), false);
    assert!(run(&["init", "--repo", repo_s]).status.success());

    let mut committed = 0;
    for delay_ms in [5u64, 40, 120, 250, 500, 900] {
        let mut child = bt()
            .args([
                "ingest",
                "--repo",
                repo_s,
                "--host",
                "k",
                src.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let status = child.wait().unwrap();
        if status.success() {
            committed += 1; // it finished before the kill
        }
        let o = run(&["ls", "--repo", repo_s, "--json"]);
        assert!(
            o.status.success(),
            "repository readable after kill at {delay_ms} ms"
        );
        let hosts: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let gens = hosts
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["generations"].as_u64().unwrap())
            .sum::<u64>();
        // A kill that lands between the manifest's commit and the process's exit leaves a
        // complete generation; every generation is compared with the source at the end.
        assert!(
            gens == committed || gens == committed + 1,
            "after a kill at {delay_ms} ms: {gens} generations, {committed} completed runs"
        );
        committed = gens;
    }
    let o = run(&[
        "ingest",
        "--repo",
        repo_s,
        "--host",
        "k",
        src.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let r = open(&repo).await;
        for g in r.generations("k").await.unwrap() {
            let diffs = compare(&r, "k", &g, &src).await;
            assert!(diffs.is_empty(), "{g}: {diffs:?}");
        }
    });
}

#[test]
fn ls_shows_hosts_generations_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let r = repo.to_str().unwrap();
    let src = dir.path().join("src");
    build_fixture(&src, false);
    assert!(run(&["init", "--repo", r]).status.success());
    let o = run(&[
        "ingest",
        "--repo",
        r,
        "--host",
        "web1",
        "--label",
        "first",
        "--time",
        "2026-11-20T01:00:00Z",
        src.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = run(&[
        "ingest",
        "--repo",
        r,
        "--host",
        "web1",
        "--json",
        src.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("ingest --json");
    assert_eq!(v["generation"]["stats"]["read_bytes"], 0);
    assert!(v["generation"]["name"].as_str().unwrap().ends_with('Z'));

    let hosts = text(&run(&["ls", "--repo", r]).stdout);
    assert!(hosts.contains("web1") && hosts.contains(" 2 "), "{hosts}");
    let gens = text(&run(&["ls", "--repo", r, "web1"]).stdout);
    assert!(
        gens.contains("2026-11-20T010000Z") && gens.contains("first"),
        "{gens}"
    );
    let files = text(&run(&["ls", "--repo", r, "web1/2026-11-20T010000Z"]).stdout);
    assert!(
        files.contains("-rwsr-xr-x") && files.contains("setuid"),
        "{files}"
    );
    assert!(files.contains("rel-link -> small.txt"), "{files}");
    assert!(
        files.contains("drwxrwxrwt") && files.contains("sticky"),
        "{files}"
    );
    let sub = text(&run(&["ls", "--repo", r, "web1/latest/dir/sub"]).stdout);
    assert!(
        sub.contains("random.bin") && sub.contains("3000000"),
        "{sub}"
    );
    let missing = run(&["ls", "--repo", r, "web1/latest/nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        text(&missing.stderr).contains("nope not found"),
        "{}",
        text(&missing.stderr)
    );
}
