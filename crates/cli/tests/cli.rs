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

/// Runs `backtree ingest --repo REPO ARGS…` with `data` written to its standard input through a
/// pipe (by a thread, as a producer writes), or with standard input from /dev/null.
fn ingest_piped(repo: &str, args: &[&str], data: Option<Vec<u8>>) -> Output {
    let mut child = bt()
        .args(["ingest", "--repo", repo])
        .args(args)
        .stdin(if data.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let writer = data.map(|d| {
        let mut stdin = child.stdin.take().unwrap();
        // An early exit of backtree closes the pipe: the write then fails, which is fine.
        std::thread::spawn(move || drop(std::io::Write::write_all(&mut stdin, &d)))
    });
    let o = child.wait_with_output().unwrap();
    if let Some(w) = writer {
        w.join().unwrap();
    }
    o
}

/// `--stdin NAME` stores a real pipe's bytes as one file, alone or beside a path, with the mode,
/// owner and mtime given (or the defaults); bad names and options are usage errors (exit 2), an
/// empty stream or a name clash is an error (exit 1), and neither commits anything.
#[test]
fn stdin_becomes_one_file_of_the_generation() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let r = repo.to_str().unwrap();
    let meta = dir.path().join("meta");
    std::fs::create_dir(&meta).unwrap();
    std::fs::write(meta.join("vm.cfg"), b"name = vm42\n").unwrap();
    assert!(run(&["init", "--repo", r]).status.success());
    let mut data = backtree_core::testing::texty_bytes(7, 2 << 20);
    data.extend_from_slice(&random_bytes(8, 1 << 20));

    let o = ingest_piped(
        r,
        &[
            "--host",
            "vcenter",
            "--stdin",
            "postgres.sql",
            "--stdin-mode",
            "0640",
            "--stdin-owner",
            "26:27",
            "--stdin-mtime",
            "2026-11-20T03:25:00Z",
        ],
        Some(data.clone()),
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("1 files"), "{}", text(&o.stdout));
    let o = run(&["ls", "--repo", r, "--json", "vcenter/latest"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let e = &v.as_array().unwrap()[..];
    assert_eq!(e.len(), 1, "{v}");
    assert_eq!(e[0]["name"], "postgres.sql");
    assert_eq!(e[0]["mode"], "0640");
    assert_eq!(
        (e[0]["uid"].as_u64(), e[0]["gid"].as_u64()),
        (Some(26), Some(27))
    );
    assert_eq!(e[0]["size"].as_u64(), Some(data.len() as u64));
    let mtime = chrono::DateTime::parse_from_rfc3339("2026-11-20T03:25:00Z").unwrap();
    assert_eq!(e[0]["mtime"].as_i64(), Some(mtime.timestamp()));

    // Beside a directory, with the defaults: mode 0600, the invoking user, the generation's
    // time.
    let o = ingest_piped(
        r,
        &[
            "--host",
            "vm42",
            "--time",
            "2026-11-21T01:00:00Z",
            "--stdin",
            "vm42.xva",
            meta.to_str().unwrap(),
        ],
        Some(data.clone()),
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let listing = text(&run(&["ls", "--repo", r, "vm42/latest"]).stdout);
    let line = listing.lines().find(|l| l.ends_with(" vm42.xva")).unwrap();
    assert!(
        line.starts_with("-rw-------") && line.contains("2026-11-21 01:00"),
        "{listing}"
    );
    assert!(listing.lines().any(|l| l.ends_with(" meta")), "{listing}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let repo = open(&repo).await;
        let g = repo.latest("vm42").await.unwrap().unwrap();
        let root = repo.manifest("vm42", &g).await.unwrap().root.tree.unwrap();
        let e = repo.resolve(&root, b"vm42.xva").await.unwrap().unwrap();
        assert_eq!(
            (e.uid, e.gid),
            (unsafe { libc::geteuid() }, unsafe { libc::getegid() })
        );
        let list = repo.chunk_list(&e).await.unwrap();
        assert!(repo.read_range(&list, 0, e.size).await.unwrap() == data);
    });

    // Usage errors, before anything is read: exit 2.
    for args in [
        &["--stdin", "a/b"][..],
        &["--stdin", ".."],
        &["--stdin", ""],
        &["--stdin", "x", "--stdin-mode", "999"],
        &["--stdin", "x", "--stdin-owner", "postgres"],
        &["--stdin", "x", "--stdin-mtime", "yesterday"],
        &["--stdin-mode", "0600"],
    ] {
        let mut all = vec!["--host", "bad"];
        all.extend_from_slice(args);
        let o = ingest_piped(r, &all, Some(b"data".to_vec()));
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o.stderr));
    }
    let o = ingest_piped(r, &["--host", "bad", "--stdin", "a/b"], None);
    assert!(
        text(&o.stderr).contains("without '/'"),
        "{}",
        text(&o.stderr)
    );

    // Errors: an empty stream, a clash with a path's name. Exit 1, nothing committed.
    let o = ingest_piped(r, &["--host", "bad", "--stdin", "dump.sql"], None);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o.stderr).trim(),
        "backtree: stdin gave no data for dump.sql; pass --allow-empty to store an empty file"
    );
    let o = ingest_piped(
        r,
        &["--host", "bad", "--stdin", "meta", meta.to_str().unwrap()],
        Some(data.clone()),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("\"meta\""), "{}", text(&o.stderr));
    rt.block_on(async {
        assert!(open(&repo)
            .await
            .generations("bad")
            .await
            .unwrap()
            .is_empty());
    });
    let o = ingest_piped(
        r,
        &["--host", "bad", "--stdin", "dump.sql", "--allow-empty"],
        None,
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
}

/// `backtree ls --json HOST/GEN/PATH` as parsed JSON, without the fields a tar cannot carry.
fn ls_json(r: &str, what: &str) -> serde_json::Value {
    let o = run(&["ls", "--repo", r, "--json", what]);
    assert!(o.status.success(), "ls {what}: {}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("ls --json")
}

/// `--tar FILE` and `--tar -` (gzip, and a `tar -r` repeat) give the same listing as the
/// directory; hostile members exit 3 with each named; a truncated .tgz exits 1 naming the byte
/// offset and commits nothing; `--tar` with paths is a usage error.
#[test]
fn tar_archives_expand_into_the_generation() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let r = repo.to_str().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("etc/vmware")).unwrap();
    std::fs::write(src.join("etc/vmware/esx.conf"), b"/adv/Net/x = \"1\"\n").unwrap();
    std::fs::write(src.join("etc/shadow"), b"root:*:19000::::::\n").unwrap();
    std::fs::set_permissions(
        src.join("etc/shadow"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(src.join("big"), random_bytes(9, 1_200_000)).unwrap();
    std::os::unix::fs::symlink("etc/shadow", src.join("link")).unwrap();
    assert!(run(&["init", "--repo", r]).status.success());
    let o = run(&[
        "ingest",
        "--repo",
        r,
        "--host",
        "dir",
        "--json",
        src.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let tgz = dir.path().join("configBundle.tgz");
    let tar = |args: &[&str]| {
        let ok = Command::new("tar")
            .args(["--format=pax", "-C", src.to_str().unwrap()])
            .args(args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "tar {args:?}");
    };
    tar(&["-czf", tgz.to_str().unwrap(), "."]);

    let o = run(&[
        "ingest",
        "--repo",
        r,
        "--host",
        "esxi1",
        "--json",
        "--tar",
        tgz.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let new = v["generation"]["stats"]["new_raw_bytes"].as_u64().unwrap();
    assert!(
        new < 20_000,
        "only trees are new, the files deduplicate: {new}"
    );
    for p in ["", "/etc", "/etc/vmware"] {
        assert_eq!(
            ls_json(r, &format!("dir/latest{p}")),
            ls_json(r, &format!("esxi1/latest{p}")),
            "{p}"
        );
    }

    // From standard input, with `big` appended again with new content: the last one wins.
    let plain = dir.path().join("a.tar");
    tar(&["-cf", plain.to_str().unwrap(), "."]);
    std::fs::write(src.join("big"), b"replaced\n").unwrap();
    tar(&["-rf", plain.to_str().unwrap(), "./big"]);
    let o = ingest_piped(
        r,
        &["--host", "esxi2", "--tar", "-"],
        Some(std::fs::read(&plain).unwrap()),
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let big = ls_json(r, "esxi2/latest/big");
    assert_eq!(big[0]["size"], 9, "{big}");

    // Hostile members: made safe, each named, exit 3.
    let mut b = ::tar::Builder::new(Vec::new());
    for (name, data) in [
        (&b"../../escape"[..], &b"x"[..]),
        (b"/etc/passwd", b"root\n"),
    ] {
        let mut h = ::tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    let o = ingest_piped(
        r,
        &["--host", "bad", "--tar", "-"],
        Some(b.into_inner().unwrap()),
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(err.contains("skipped ../../escape: left out"), "{err}");
    assert!(
        err.contains("skipped /etc/passwd: unsafe name, stored as \"etc/passwd\""),
        "{err}"
    );
    assert_eq!(ls_json(r, "bad/latest/etc/passwd")[0]["size"], 5);

    // Truncated: exit 1, the offset named, nothing committed.
    let bytes = std::fs::read(&tgz).unwrap();
    let cut = dir.path().join("cut.tgz");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let o = run(&[
        "ingest",
        "--repo",
        r,
        "--host",
        "cut",
        "--tar",
        cut.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(
        err.contains("reading tar archive") && err.contains("(at byte "),
        "{err}"
    );
    let hosts = text(&run(&["ls", "--repo", r]).stdout);
    assert!(!hosts.contains("cut"), "{hosts}");

    // Usage errors.
    for args in [
        &["--tar", "x.tar", "some/path"][..],
        &["--tar", "x.tar", "--stdin", "n"],
    ] {
        let o = ingest_piped(r, &[&["--host", "u"][..], args].concat(), None);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o.stderr));
    }
}
