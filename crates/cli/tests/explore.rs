//! `backtree ls --recursive`, `backtree diff` and `backtree find` on generations built with known
//! changes: exactly those changes, only the differing subtrees read, each version once.

mod common;

use backtree_core::testing::set_times;
use common::{bt, ok};
use std::path::Path;

fn ingest(repo: &Path, src: &Path, time: &str) {
    ok(bt()
        .args(["ingest", "--repo"])
        .arg(repo)
        .args(["--host", "h", "--time", time])
        .arg(src));
}

#[test]
fn ls_diff_find_on_known_changes() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    let src = t.path().join("src");
    for i in 0..10 {
        std::fs::create_dir_all(src.join(format!("d{i:02}/sub"))).unwrap();
        std::fs::write(src.join(format!("d{i:02}/sub/x")), format!("x{i}")).unwrap();
    }
    std::fs::create_dir_all(src.join("deep/a/b/c")).unwrap();
    let f = src.join("deep/a/b/c/f");
    std::fs::write(&f, b"version one").unwrap();
    set_times(&f, (1_700_000_000, 0), (1_700_000_000, 0));
    std::fs::write(src.join("deep/a/b/c/g"), b"g").unwrap();
    std::fs::write(src.join("content"), b"v1").unwrap();
    std::fs::write(src.join("mode"), b"m").unwrap();
    std::fs::write(src.join("gone"), b"gone").unwrap();
    ok(bt().args(["init", "--repo"]).arg(&repo));
    ingest(&repo, &src, "2026-01-01T00:00:00Z");

    std::fs::write(&f, b"version two, longer").unwrap();
    std::fs::write(src.join("content"), b"v2 is longer").unwrap();
    std::fs::set_permissions(
        src.join("mode"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::fs::remove_file(src.join("gone")).unwrap();
    std::fs::write(src.join("new"), b"new").unwrap();
    ingest(&repo, &src, "2026-01-02T00:00:00Z");

    // Back to the first version of f, content and mtime.
    std::fs::write(&f, b"version one").unwrap();
    set_times(&f, (1_700_000_000, 0), (1_700_000_000, 0));
    ingest(&repo, &src, "2026-01-03T00:00:00Z");

    let (g1, g2) = ("h/2026-01-01T000000Z", "h/2026-01-02T000000Z");

    // ls --recursive: every entry below, depth first, paths relative to the listed directory.
    let out = ok(bt()
        .args(["ls", "-R", "--repo"])
        .arg(&repo)
        .arg(format!("{g1}/deep")));
    let paths: Vec<&str> = out.lines().map(|l| l.rsplit(' ').next().unwrap()).collect();
    assert_eq!(paths, ["a", "a/b", "a/b/c", "a/b/c/f", "a/b/c/g"], "{out}");
    let out = ok(bt()
        .args(["ls", "--recursive", "--json", "--repo"])
        .arg(&repo)
        .arg(g1));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 10 * 3 + 6 + 3, "{out}");
    let f_json = arr.iter().find(|e| e["path"] == "deep/a/b/c/f").unwrap();
    assert_eq!(f_json["size"], 11);
    assert_eq!(f_json["type"], "file");
    assert_eq!(f_json["mtime"], 1_700_000_000);
    // Without --recursive, --json lists the directory with paths too.
    let out = ok(bt()
        .args(["ls", "--json", "--repo"])
        .arg(&repo)
        .arg(format!("{g1}/deep/a/b/c")));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["path"], "f");

    // diff: exactly the changes.
    let out = ok(bt().args(["diff", "--repo"]).arg(&repo).args([g1, g2]));
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["M content", "M deep/a/b/c/f", "- gone", "m mode", "+ new"],
        "{out}"
    );
    // Only the root and deep, a, b, c of each side read; the ten unchanged directories skipped.
    let out = ok(bt()
        .args(["diff", "--json", "--repo"])
        .arg(&repo)
        .args([g1, g2]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["changes"].as_array().unwrap().len(), 5, "{out}");
    assert_eq!(v["changes"][1]["change"], "content");
    assert_eq!(v["changes"][1]["old"]["size"], 11);
    assert_eq!(v["stats"]["trees_read"], 10, "{out}");
    assert_eq!(v["stats"]["trees_skipped"], 10, "{out}");
    // A path of both.
    let out = ok(bt()
        .args(["diff", "--repo"])
        .arg(&repo)
        .args([g1, g2, "deep/a"]));
    assert_eq!(out.trim(), "M deep/a/b/c/f");
    // The same generation: nothing.
    let out = ok(bt().args(["diff", "--repo"]).arg(&repo).args([g1, g1]));
    assert_eq!(out, "");

    // find: two versions of f, the first in generations 1 and 3.
    let out = ok(bt()
        .args(["find", "--json", "--repo"])
        .arg(&repo)
        .arg("deep/**/f"));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 2, "{out}");
    assert_eq!(arr[0]["path"], "deep/a/b/c/f");
    assert_eq!(arr[0]["host"], "h");
    assert_eq!(arr[0]["size"], 11);
    assert_eq!(
        arr[0]["generations"],
        serde_json::json!(["2026-01-01T000000Z", "2026-01-03T000000Z"])
    );
    assert_eq!(
        arr[1]["generations"],
        serde_json::json!(["2026-01-02T000000Z"])
    );
    let out = ok(bt()
        .args(["find", "--host", "h*", "--repo"])
        .arg(&repo)
        .arg("f"));
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(
        out.contains("in 2026-01-01T000000Z, 2026-01-03T000000Z (2 generations)"),
        "{out}"
    );
    let out = ok(bt()
        .args(["find", "--host", "other", "--repo"])
        .arg(&repo)
        .arg("f"));
    assert_eq!(out, "");
}
