//! `backtree restore`: fidelity on the edge-case tree (as the mount test checks rsync from the
//! mount), a subtree and a single file, restoring over an existing tree (only what differs is
//! written, a changed file in place, only its changed chunks: counted in bytes fetched from the
//! store), `--checksum`, `--delete`, and never writing through a symlink found in the target.

mod common;

use backtree_core::testing::{build_fixture, compare_dirs, data_regions, set_times};
use common::{bt, ok, repo_with};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

/// `backtree restore --json`: the summary.
fn restore(repo: &Path, what: &str, target: &Path, extra: &[&str]) -> serde_json::Value {
    let out = ok(bt()
        .args(["restore", "--json", "--repo"])
        .arg(repo)
        .args(extra)
        .arg(what)
        .arg(target));
    serde_json::from_str(&out).expect("json summary")
}

fn n(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"))
}

#[test]
fn restore_is_identical_and_incremental() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let info = build_fixture(&src, true);
    let repo = repo_with(dir.path(), "h", &src);

    // Fidelity: the whole generation.
    let out = dir.path().join("out");
    let r = restore(&repo, "h/latest", &out, &[]);
    assert!(r["failures"].as_array().unwrap().is_empty(), "{r}");
    // What compare_dirs does not check (before it reads the files): atimes, holes, true
    // hardlink counts.
    let ms = std::fs::symlink_metadata(out.join("small.txt")).unwrap();
    assert_eq!((ms.atime(), ms.atime_nsec()), (1_600_000_000, 123_456_789));
    let diffs = compare_dirs(&src, &out);
    assert!(diffs.is_empty(), "restored tree differs: {diffs:#?}");
    if info.sparse {
        assert_eq!(
            data_regions(&out.join("sparse.img")),
            data_regions(&src.join("sparse.img"))
        );
        let b = std::fs::metadata(out.join("sparse.img")).unwrap().blocks();
        assert!(b * 512 < 1 << 20, "holes written as holes: {b} blocks");
    }
    let l1 = std::fs::metadata(out.join("linked")).unwrap();
    let l3 = std::fs::metadata(out.join("dir/sub/linked3")).unwrap();
    assert_eq!((l1.ino(), l1.nlink()), (l3.ino(), 3));

    // A subtree, and a single file.
    let sub = dir.path().join("sub");
    restore(&repo, "h/latest/dir", &sub, &[]);
    let diffs = compare_dirs(&src.join("dir"), &sub);
    // Hardlinks reaching outside the subtree are not links within it (rsync of the subtree
    // from the mount gives the same).
    let diffs: Vec<_> = diffs.iter().filter(|d| !d.contains("linked")).collect();
    assert!(diffs.is_empty(), "restored subtree differs: {diffs:#?}");
    let one = dir.path().join("one");
    restore(&repo, "h/latest/dir/sub/random.bin", &one, &[]);
    assert_eq!(
        std::fs::read(one.join("random.bin")).unwrap(),
        std::fs::read(src.join("dir/sub/random.bin")).unwrap()
    );

    // Incremental: again over an unchanged tree: nothing fetched, nothing written.
    let r = restore(&repo, "h/latest", &out, &[]);
    assert_eq!(
        (n(&r, "files_written"), n(&r, "bytes_fetched")),
        (0, 0),
        "{r}"
    );

    // Change three files: content (same size, new mtime), mtime only, removed.
    std::fs::write(out.join("dir/text"), vec![b'x'; 300_000]).unwrap();
    set_times(&out.join("multi.bin"), (1, 0), (2, 0));
    std::fs::remove_file(out.join("dir/sub/random.bin")).unwrap();
    let r = restore(&repo, "h/latest", &out, &[]);
    assert_eq!(
        (n(&r, "files_written"), n(&r, "files_unchanged") > 0),
        (2, true),
        "the mtime-only change rewrites nothing: {r}"
    );
    assert_eq!(
        n(&r, "bytes_fetched"),
        300_000 + 3_000_000,
        "only the changed content is read: {r}"
    );
    let diffs = compare_dirs(&src, &out);
    assert!(
        diffs.is_empty(),
        "after the incremental restore: {diffs:#?}"
    );

    // In place: a few bytes changed in the middle of the 6 MB file: only the chunk holding
    // them is fetched; junk written into a hole of the sparse file is punched out again.
    std::fs::OpenOptions::new()
        .write(true)
        .open(out.join("multi.bin"))
        .unwrap()
        .write_all_at(b"CHANGED", 3_000_000)
        .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(out.join("sparse.img"))
        .unwrap()
        .write_all_at(b"junk", 20 << 20)
        .unwrap();
    let r = restore(&repo, "h/latest", &out, &[]);
    assert_eq!(n(&r, "files_written"), 2, "{r}");
    let fetched = n(&r, "bytes_fetched");
    assert!(
        fetched > 0 && fetched < 3_000_000,
        "only the changed chunk is fetched: {r}"
    );
    let diffs = compare_dirs(&src, &out);
    assert!(diffs.is_empty(), "after the in-place update: {diffs:#?}");
    if info.sparse {
        assert_eq!(
            data_regions(&out.join("sparse.img")),
            data_regions(&src.join("sparse.img")),
            "the hole is a hole again"
        );
    }

    // --checksum: same size and mtime, different content.
    let m = std::fs::metadata(out.join("small.txt")).unwrap();
    std::fs::write(out.join("small.txt"), b"HELLO BACKTREE\n").unwrap();
    set_times(
        &out.join("small.txt"),
        (m.atime(), m.atime_nsec()),
        (m.mtime(), m.mtime_nsec()),
    );
    let r = restore(&repo, "h/latest", &out, &[]);
    assert_eq!(n(&r, "files_written"), 0, "size and mtime match: {r}");
    let r = restore(&repo, "h/latest", &out, &["--checksum"]);
    assert_eq!(n(&r, "files_written"), 1, "{r}");
    assert_eq!(n(&r, "bytes_fetched"), 15, "{r}");
    assert_eq!(
        std::fs::read(out.join("small.txt")).unwrap(),
        b"hello backtree\n"
    );

    // --delete: an extra file and an extra directory.
    std::fs::write(out.join("extra"), b"x").unwrap();
    std::fs::create_dir_all(out.join("dir/extra-dir/deep")).unwrap();
    std::fs::write(out.join("dir/extra-dir/deep/f"), b"y").unwrap();
    restore(&repo, "h/latest", &out, &[]);
    assert!(out.join("extra").exists(), "kept without --delete");
    let r = restore(&repo, "h/latest", &out, &["--delete"]);
    assert_eq!(n(&r, "removed"), 2, "{r}");
    let diffs = compare_dirs(&src, &out);
    assert!(diffs.is_empty(), "after --delete: {diffs:#?}");
}

#[test]
fn restore_never_writes_through_a_symlink_in_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("etc/ssh")).unwrap();
    std::fs::write(src.join("etc/passwd"), b"root:x:0:0\n").unwrap();
    std::fs::write(src.join("etc/ssh/config"), b"Host *\n").unwrap();
    std::fs::write(src.join("file"), b"content\n").unwrap();
    let repo = repo_with(dir.path(), "h", &src);

    let outside = dir.path().join("outside");
    std::fs::create_dir_all(outside.join("ssh")).unwrap();
    std::fs::write(outside.join("keep"), b"mine").unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"victim").unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::os::unix::fs::symlink(&outside, out.join("etc")).unwrap();
    std::os::unix::fs::symlink(&victim, out.join("file")).unwrap();

    let r = restore(&repo, "h/latest", &out, &[]);
    assert!(r["failures"].as_array().unwrap().is_empty(), "{r}");
    // Nothing outside changed; the symlinks were replaced.
    let mut names: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["keep", "ssh"]);
    assert!(std::fs::read_dir(outside.join("ssh"))
        .unwrap()
        .next()
        .is_none());
    assert_eq!(std::fs::read(&victim).unwrap(), b"victim");
    assert!(std::fs::symlink_metadata(out.join("etc")).unwrap().is_dir());
    assert!(std::fs::symlink_metadata(out.join("file"))
        .unwrap()
        .is_file());
    let diffs = compare_dirs(&src, &out);
    assert!(diffs.is_empty(), "{diffs:#?}");
}

#[test]
fn unreadable_data_is_listed_the_rest_restored_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a"), b"some content\n").unwrap();
    std::os::unix::fs::symlink("a", src.join("link")).unwrap();
    let repo = repo_with(dir.path(), "h", &src);
    // Lose every data pack: trees stay readable, file content does not.
    let data = repo.join("packs/data");
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::create_dir_all(&data).unwrap();
    let out = dir.path().join("out");
    let o = bt()
        .args(["restore", "--repo"])
        .arg(&repo)
        .arg("h/latest")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("not restored: h/") && err.contains("/a:"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_link(out.join("link")).unwrap(),
        Path::new("a")
    );
}
