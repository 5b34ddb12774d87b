//! `backtree verify` and `backtree repair` on damaged repositories, through the CLI: each
//! fixture is a small ingested tree whose store directory is then damaged by hand (a pack
//! deleted, a byte flipped, an index delta deleted, a manifest truncated, a manifest naming a
//! root tree that does not exist). verify must exit 1 and name the object and the
//! host/generation/path it affects; the repair must do what it says, and verify afterwards must
//! say what is expected.

mod common;

use common::{bt, ok};
use std::path::{Path, PathBuf};
use std::process::Output;

struct Fixture {
    _t: tempfile::TempDir,
    repo: PathBuf,
    cache: PathBuf,
    gens: Vec<String>,
}

impl Fixture {
    /// Two generations of a tree with a few files, a subdirectory and a file of several chunks.
    fn new() -> Fixture {
        let t = tempfile::tempdir().unwrap();
        let repo = t.path().join("repo");
        let cache = t.path().join("cache");
        let src = t.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("a.txt"), b"hello").unwrap();
        std::fs::write(src.join("sub/b.txt"), b"below").unwrap();
        // Random data: about 3 chunks at the default chunker.
        let big: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(src.join("sub/big.bin"), big).unwrap();
        let mut f = Fixture {
            _t: t,
            repo,
            cache,
            gens: Vec::new(),
        };
        ok(f.bt().args(["init", "--repo"]).arg(&f.repo));
        for time in ["2026-11-01T01:00:00Z", "2026-11-02T01:00:00Z"] {
            ok(f.bt()
                .args(["ingest", "--host", "web1", "--time", time, "--repo"])
                .arg(&f.repo)
                .arg(&src));
        }
        f.gens = ["2026-11-01T010000Z", "2026-11-02T010000Z"]
            .map(String::from)
            .to_vec();
        f
    }

    fn bt(&self) -> std::process::Command {
        let mut c = bt();
        c.env("BACKTREE_CACHE_DIR", &self.cache);
        c
    }

    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let o: Output = self
            .bt()
            .args(args)
            .arg("--repo")
            .arg(&self.repo)
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    /// `verify ARGS`: its exit code and stdout, checking the summary line.
    fn verify(&self, args: &[&str]) -> (i32, String) {
        let mut a = vec!["verify"];
        a.extend_from_slice(args);
        let (code, out, err) = self.run(&a);
        assert!(code == 0 || code == 1, "{code}: {out}{err}");
        assert!(
            out.lines().last().unwrap_or("").contains(" problem"),
            "{out}"
        );
        (code, out)
    }

    fn files(&self, under: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut todo = vec![self.repo.join(under)];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().unwrap().is_dir() {
                    todo.push(e.path());
                } else {
                    out.push(e.path());
                }
            }
        }
        out.sort();
        out
    }

    /// The data pack (there is one: small tree, 16 MiB packs).
    fn data_pack(&self) -> PathBuf {
        let p = self.files("packs/data");
        assert_eq!(p.len(), 1, "{p:?}");
        p[0].clone()
    }

    fn key(&self, p: &Path) -> String {
        p.strip_prefix(&self.repo)
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }

    fn cat(&self, what: &str) -> (i32, Vec<u8>) {
        let o = self
            .bt()
            .args(["cat", "--repo"])
            .arg(&self.repo)
            .arg(what)
            .output()
            .unwrap();
        (o.status.code().unwrap_or(-1), o.stdout)
    }
}

#[test]
fn a_sound_repository_verifies_and_json_parses() {
    let f = Fixture::new();
    let (code, out) = f.verify(&["--read-data"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("0 problems in 0 generations (2 generations checked"),
        "{out}"
    );
    let (code, json, _) = f.run(&["verify", "--json", "--read-data-subset", "1/2"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["sound"], true);
    assert_eq!(v["problems"].as_array().unwrap().len(), 0);
    assert_eq!(v["counts"]["generations"], 2);
    // A repository that is not there: could not run.
    let (code, _, err) = f.run(&["verify", "--repo", "/nonexistent/backtree-repo"]);
    assert_eq!(code, 2, "{err}");
    // Unknown host glob: nothing to check, sound.
    let (code, out) = f.verify(&["--host", "db*"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("(0 generations checked"), "{out}");
}

#[test]
fn a_missing_pack_names_the_paths_and_repair_cleans_up() {
    let f = Fixture::new();
    let pack = f.data_pack();
    std::fs::remove_file(&pack).unwrap();
    let (code, out) = f.verify(&[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("pack {} is missing", f.key(&pack))),
        "{out}"
    );
    let first = format!("problem web1/{} /sub/big.bin: blob ", f.gens[0]);
    assert!(out.contains(&first), "{out}");
    assert!(
        out.contains(&format!("also affects web1/{}", f.gens[1])),
        "{out}"
    );
    assert!(out.contains("/a.txt"), "{out}");
    assert!(
        out.lines().last().unwrap().contains(" in 2 generations"),
        "{out}"
    );
    // JSON carries the same.
    let (_, json, _) = f.run(&["verify", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["sound"], false);
    let probs = v["problems"].as_array().unwrap();
    assert!(probs
        .iter()
        .any(|p| p["kind"] == "missing-pack" && p["object"] == f.key(&pack).as_str()));
    assert!(probs.iter().any(|p| p["kind"] == "unavailable"
        && p["host"] == "web1"
        && p["path"] == "/sub/big.bin"
        && p["blob"].is_string()));

    // List, then remove the damaged generations; tombstone the lost pack's entries.
    let (code, out, _) = f.run(&["repair", "generations"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("damaged web1/{}", f.gens[0])),
        "{out}"
    );
    assert!(out.contains("2 damaged generations"), "{out}");
    let (code, out, _) = f.run(&["repair", "generations", "--remove", "--dry-run"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("would remove"), "{out}");
    let (code, out, err) = f.run(&["repair", "generations", "--remove"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = f.run(&["repair", "index"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("tombstones for entries of missing packs"),
        "{out}"
    );
    let (code, out) = f.verify(&[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("(0 generations checked"), "{out}");
}

#[test]
fn read_data_finds_a_flipped_byte() {
    let f = Fixture::new();
    let pack = f.data_pack();
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[100] ^= 0x55; // inside the first blob
    std::fs::write(&pack, &bytes).unwrap();
    // The structure is intact: plain verify does not read data.
    let (code, out) = f.verify(&[]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = f.verify(&["--read-data"]);
    assert_eq!(code, 1, "{out}");
    let key = f.key(&pack);
    assert!(out.contains("does not hash to its name"), "{out}");
    let line = out
        .lines()
        .find(|l| l.contains(&format!("in pack {key}")) && l.contains("content does not match"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains(&format!("web1/{}", f.gens[0])), "{line}");
    assert!(
        line.contains("/sub/big.bin") || line.contains("/a.txt") || line.contains("/sub/b.txt"),
        "{line}"
    );
    let (code, out, _) = f.run(&["repair", "generations", "--read-data", "--remove"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("removed web1/"), "{out}");
    // What is left is the damaged pack itself, which no generation needs now.
    let (code, out) = f.verify(&[]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn a_lost_index_delta_is_rebuilt() {
    let f = Fixture::new();
    for d in f.files("index/deltas") {
        std::fs::remove_file(d).unwrap();
    }
    let (code, out) = f.verify(&[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("is not in the index"), "{out}");
    assert!(
        out.contains(&format!("problem web1/{} /:", f.gens[0])),
        "{out}"
    );
    let (code, out, _) = f.run(&["repair", "index", "--dry-run"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("would add "), "{out}");
    assert!(f.files("index/deltas").is_empty());
    let (code, out, _) = f.run(&["repair", "index", "--json"]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["entries_added"].as_u64().unwrap() >= 5, "{out}");
    let (code, out) = f.verify(&["--read-data"]);
    assert_eq!(code, 0, "{out}");
    let (code, data) = f.cat(&format!("web1/{}/sub/b.txt", f.gens[1]));
    assert_eq!((code, data.as_slice()), (0, &b"below"[..]));
    let (code, data) = f.cat(&format!("web1/{}/sub/big.bin", f.gens[0]));
    assert_eq!((code, data.len()), (0, 3_000_000));
}

#[test]
fn a_truncated_manifest_is_named_and_removed() {
    let f = Fixture::new();
    let m = f.repo.join("snapshots/web1").join(&f.gens[1]);
    let bytes = std::fs::read(&m).unwrap();
    std::fs::write(&m, &bytes[..bytes.len() / 2]).unwrap();
    let (code, out) = f.verify(&[]);
    assert_eq!(code, 1, "{out}");
    let key = format!("snapshots/web1/{}", f.gens[1]);
    assert!(
        out.contains(&format!("problem web1/{}: manifest: ", f.gens[1])),
        "{out}"
    );
    assert!(out.contains(&key), "{out}");
    assert!(
        out.lines()
            .last()
            .unwrap()
            .starts_with("1 problem in 1 generation"),
        "{out}"
    );
    let (code, out, _) = f.run(&["repair", "generations", "--remove"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("manifest unreadable"), "{out}");
    assert!(!m.exists());
    let (code, out) = f.verify(&[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("(1 generation checked"), "{out}");
}

#[test]
fn a_dangling_root_tree_is_named_and_removed() {
    let f = Fixture::new();
    // A third generation whose manifest names a root tree that does not exist.
    let m = f.repo.join("snapshots/web1").join(&f.gens[1]);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap();
    let bogus = "ab".repeat(32);
    v["root"]["tree"] = bogus.clone().into();
    v["name"] = "2026-11-03T010000Z".into();
    let crafted = f.repo.join("snapshots/web1/2026-11-03T010000Z");
    std::fs::write(&crafted, serde_json::to_vec(&v).unwrap()).unwrap();
    let (code, out) = f.verify(&[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "problem web1/2026-11-03T010000Z /: blob {bogus} is not in the index"
        )),
        "{out}"
    );
    assert!(
        out.lines()
            .last()
            .unwrap()
            .starts_with("1 problem in 1 generation"),
        "{out}"
    );
    let (code, out, _) = f.run(&["repair", "generations", "--remove"]);
    assert_eq!(code, 0, "{out}");
    assert!(!crafted.exists());
    // The tree pack deleted: every generation loses its root.
    for p in f.files("packs/tree") {
        std::fs::remove_file(p).unwrap();
    }
    let (code, out) = f.verify(&[]);
    assert_eq!(code, 1, "{out}");
    let line = format!("problem web1/{} /: blob ", f.gens[0]);
    assert!(out.contains(&line), "{out}");
    assert!(
        out.contains(&format!("also affects web1/{}", f.gens[1])),
        "{out}"
    );
    assert!(out.contains("packs/tree/"), "{out}");
}
