//! `backtree prune` through the CLI: the dry run lists and changes nothing, a prune deletes
//! what forgotten generations alone referenced and leaves a sound repository, one prune at a
//! time, the grace period, and a refusal on damage. (Concurrency: prune_race.rs.)

mod common;

use backtree_core::testing::random_bytes;
use common::{bt, ok};
use std::path::Path;
use std::process::Command;

fn packs(repo: &Path) -> usize {
    backtree_core::testing::list_files(&repo.join("packs")).len()
}

fn prune(repo: &Path) -> Command {
    let mut c = bt();
    c.args(["prune", "--repo"])
        .arg(repo)
        .env("BACKTREE_PRUNE_GRACE", "0")
        .env("BACKTREE_INDEX_SETTLE", "0");
    c
}

#[test]
fn dry_run_prune_verify_and_refusals() {
    let t = tempfile::tempdir().unwrap();
    let (repo, src) = (t.path().join("repo"), t.path().join("src"));
    std::fs::create_dir_all(&src).unwrap();
    ok(bt().args(["init", "--repo"]).arg(&repo));
    std::fs::write(src.join("kept.bin"), random_bytes(1, 3 << 20)).unwrap();
    std::fs::write(src.join("gone.bin"), random_bytes(2, 2 << 20)).unwrap();
    ok(bt()
        .args(["ingest", "--repo"])
        .arg(&repo)
        .args(["--host", "h", "--time", "2026-01-01T00:00:00Z"])
        .arg(&src));
    std::fs::remove_file(src.join("gone.bin")).unwrap();
    ok(bt()
        .args(["ingest", "--repo"])
        .arg(&repo)
        .args(["--host", "h", "--time", "2026-01-02T00:00:00Z"])
        .arg(&src));
    ok(bt()
        .args(["forget", "--repo"])
        .arg(&repo)
        .args(["--keep-last", "1"]));

    // Young packs: nothing to do with the default grace period of a day.
    let out = ok(bt().args(["prune", "--dry-run", "--repo"]).arg(&repo));
    assert!(
        out.contains("delete 0 unreferenced") && out.contains("younger than the grace period"),
        "{out}"
    );

    let before = packs(&repo);
    let out = ok(prune(&repo).args(["--dry-run", "--repack-threshold", "20"]));
    assert!(
        out.contains("dry run: nothing was written or deleted"),
        "{out}"
    );
    assert!(
        out.contains("repack (") || out.contains("delete (unreferenced)"),
        "{out}"
    );
    assert_eq!(packs(&repo), before);

    let out = ok(prune(&repo).args(["--json", "--repack-threshold", "20"]));
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(r["deleted_packs"].as_u64().unwrap() > 0, "{r}");
    assert!(r["deleted_bytes"].as_u64().unwrap() >= 2 << 20, "{r}");
    let got = bt()
        .args(["cat", "--repo"])
        .arg(&repo)
        .arg("h/latest/kept.bin")
        .output()
        .unwrap();
    assert!(got.status.success());
    assert!(
        got.stdout == random_bytes(1, 3 << 20),
        "kept.bin differs after the prune"
    );
    ok(bt().args(["verify", "--read-data", "--repo"]).arg(&repo));
    // Nothing left to do.
    let r: serde_json::Value = serde_json::from_str(&ok(prune(&repo).arg("--json"))).unwrap();
    assert_eq!(r["deleted_packs"], 0, "{r}");

    // Another prune holds the maintenance lease: refused, naming it.
    let lease = repo.join("locks/maintenance.claim-00000000feedface");
    std::fs::create_dir_all(lease.parent().unwrap()).unwrap();
    let expires = (chrono::Utc::now() + chrono::Duration::minutes(5)).to_rfc3339();
    std::fs::write(
        &lease,
        format!(r#"{{"session":"00000000feedface","host":"other-host","started":"x","expires":"{expires}","tool":"t"}}"#),
    )
    .unwrap();
    let o = prune(&repo).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("another maintenance job") && err.contains("other-host"),
        "{err}"
    );
    std::fs::remove_file(&lease).unwrap();

    // Damage: the kept file's data pack is gone. Nothing is deleted, and the reason is given.
    for p in backtree_core::testing::list_files(&repo.join("packs/data")) {
        std::fs::remove_file(p).unwrap();
    }
    let n = packs(&repo);
    let o = prune(&repo).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("prune stopped before deleting anything") && err.contains("verify"),
        "{err}"
    );
    assert_eq!(packs(&repo), n);
}
