//! `backtree forget` against `restic forget` on the same generation times: for each policy both
//! keep the same set (restic 0.14's rules are the reference the planner follows; both in UTC).
//! The times cross ISO week 2020-W53 (to 2021-01-03) and the leap day 2024-02-29, and lie in the
//! past (restic 0.14 keeps every snapshot dated after now under `--keep-within`).
//! Skipped, with a note, where restic is not installed.

mod common;

use common::{bt, ok};
use std::collections::BTreeSet;
use std::process::Command;

const TIMES: &[&str] = &[
    "2020-12-20T10:00:00",
    "2020-12-28T09:00:00",
    "2020-12-29T09:00:00",
    "2021-01-02T09:00:00",
    "2021-01-02T18:00:00",
    "2021-01-04T09:00:00",
    "2021-02-27T23:30:00",
    "2021-02-28T00:30:00",
    "2021-03-01T09:00:00",
    "2024-02-28T09:00:00",
    "2024-02-29T09:00:00",
    "2024-02-29T09:40:00",
    "2024-03-01T08:00:00",
    "2024-03-01T08:30:00",
];

const POLICIES: &[&[&str]] = &[
    &["--keep-last", "3"],
    &["--keep-hourly", "3"],
    &["--keep-daily", "4"],
    &["--keep-weekly", "4"],
    &["--keep-monthly", "3"],
    &["--keep-yearly", "2"],
    &["--keep-within", "10d"],
    &[
        "--keep-daily",
        "2",
        "--keep-weekly",
        "2",
        "--keep-monthly",
        "2",
    ],
];

fn restic(repo: &std::path::Path) -> Command {
    let mut c = Command::new("restic");
    c.arg("--repo")
        .arg(repo)
        .args(["--no-cache", "--quiet"])
        .env("RESTIC_PASSWORD", "test")
        .env("TZ", "UTC");
    c
}

#[test]
fn forget_keeps_what_restic_keeps() {
    if Command::new("restic").arg("version").output().is_err() {
        eprintln!("skipped: restic is not installed");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (repo, rrepo, src) = (
        t.path().join("bt"),
        t.path().join("restic"),
        t.path().join("src"),
    );
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), b"x").unwrap();
    ok(bt().args(["init", "--repo"]).arg(&repo));
    ok(restic(&rrepo).arg("init"));
    for time in TIMES {
        ok(bt()
            .args(["ingest", "--repo"])
            .arg(&repo)
            .args(["--host", "h", "--time", &format!("{time}Z")])
            .arg(&src));
        ok(restic(&rrepo)
            .args(["backup", "--host", "h", "--time", &time.replace('T', " ")])
            .arg(&src));
    }
    for policy in POLICIES {
        let js = ok(restic(&rrepo)
            .args(["forget", "--dry-run", "--json"])
            .args(*policy));
        let v: serde_json::Value = serde_json::from_str(js.trim()).unwrap();
        let restic_keep: BTreeSet<String> = v[0]["keep"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["time"].as_str().unwrap()[..19].to_owned())
            .collect();
        let js = ok(bt()
            .args(["forget", "--dry-run", "--json", "--repo"])
            .arg(&repo)
            .args(*policy));
        let v: serde_json::Value = serde_json::from_str(&js).unwrap();
        let ours: BTreeSet<String> = v["hosts"][0]["generations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["keep"].as_bool().unwrap())
            .map(|g| g["time"].as_str().unwrap()[..19].to_owned())
            .collect();
        assert_eq!(ours, restic_keep, "policy {policy:?}");
    }
}
