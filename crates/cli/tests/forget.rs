//! `backtree forget` and `backtree protect` through the CLI: the dry run changes nothing and
//! says why each generation is kept, the real run deletes exactly the removed manifests,
//! protection wins over every policy, and host globs pick the hosts.

mod common;

use common::{bt, ok};

fn ingest(repo: &std::path::Path, src: &std::path::Path, host: &str, time: &str) {
    ok(bt()
        .args(["ingest", "--repo"])
        .arg(repo)
        .args(["--host", host, "--time", time])
        .arg(src));
}

fn names(repo: &std::path::Path, host: &str) -> Vec<String> {
    let out = ok(bt().args(["ls", "--json", "--repo"]).arg(repo).arg(host));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let arr = v
        .as_array()
        .cloned()
        .unwrap_or_else(|| v["generations"].as_array().cloned().unwrap_or_default());
    arr.iter()
        .map(|g| g["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn forget_by_policy_with_protection_and_host_globs() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), b"data").unwrap();
    ok(bt().args(["init", "--repo"]).arg(&repo));
    let days = [
        "2026-11-01",
        "2026-11-02",
        "2026-11-03",
        "2026-11-04",
        "2026-11-05",
    ];
    for d in days {
        ingest(&repo, &src, "web-1", &format!("{d}T01:00:00Z"));
        ingest(&repo, &src, "db-1", &format!("{d}T01:00:00Z"));
    }
    // Two a day on the last day.
    ingest(&repo, &src, "web-1", "2026-11-05T13:00:00Z");
    assert_eq!(names(&repo, "web-1").len(), 6);

    // Protect the oldest web-1 generation.
    ok(bt()
        .args(["protect", "--repo"])
        .arg(&repo)
        .arg("web-1/2026-11-01T010000Z"));
    // A typo is refused.
    let out = bt()
        .args(["protect", "--repo"])
        .arg(&repo)
        .arg("web-1/2026-11-09T010000Z")
        .output()
        .unwrap();
    assert!(!out.status.success());

    // Dry run: nothing changes, every generation is listed with its reasons.
    let plan = ok(bt().args(["forget", "--repo"]).arg(&repo).args([
        "--host",
        "web-*",
        "--keep-daily",
        "2",
        "--dry-run",
    ]));
    assert!(plan.contains("web-1: keep 3, would remove 3"), "{plan}");
    assert!(
        plan.contains("keep   2026-11-05T130000Z  daily 1 (2026-11-05)"),
        "{plan}"
    );
    assert!(
        plan.contains("keep   2026-11-01T010000Z  protected"),
        "{plan}"
    );
    assert!(plan.contains("remove 2026-11-05T010000Z"), "{plan}");
    assert!(!plan.contains("db-1"), "{plan}");
    assert_eq!(names(&repo, "web-1").len(), 6);

    // JSON of the same plan.
    let js = ok(bt().args(["forget", "--repo"]).arg(&repo).args([
        "--host",
        "web-*",
        "--keep-daily",
        "2",
        "--dry-run",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&js).unwrap();
    assert_eq!(v["hosts"][0]["host"], "web-1");
    assert_eq!(v["hosts"][0]["generations"].as_array().unwrap().len(), 6);

    // The real run removes exactly those; db-1 is untouched.
    ok(bt()
        .args(["forget", "--repo"])
        .arg(&repo)
        .args(["--host", "web-*", "--keep-daily", "2"]));
    assert_eq!(
        names(&repo, "web-1"),
        [
            "2026-11-01T010000Z",
            "2026-11-04T010000Z",
            "2026-11-05T130000Z"
        ]
    );
    assert_eq!(names(&repo, "db-1").len(), 5);
    // The kept generations still read.
    ok(bt()
        .args(["cat", "--repo"])
        .arg(&repo)
        .arg("web-1/2026-11-04T010000Z/f"));

    // No policy: refused, nothing removed.
    let out = bt().args(["forget", "--repo"]).arg(&repo).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--keep-"));
    // Lifting the protection lets the policy remove it.
    ok(bt()
        .args(["protect", "--remove", "--repo"])
        .arg(&repo)
        .arg("web-1/2026-11-01T010000Z"));
    ok(bt()
        .args(["forget", "--repo"])
        .arg(&repo)
        .args(["--host", "web-1", "--keep-last", "2"]));
    assert_eq!(
        names(&repo, "web-1"),
        ["2026-11-04T010000Z", "2026-11-05T130000Z"]
    );
}
