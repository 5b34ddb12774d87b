//! `backtree repair generations --salvage` on a repository with a lost data pack (one file's
//! chunks) and a corrupt directory tree: the damaged generations are replaced by salvaged ones
//! that keep every intact file byte for byte, leave out the lost file, keep the lost directory
//! as an empty one, and name what they left out.

mod common;

use backtree_core::Repository;
use backtree_store::LocalStore;
use common::{bt, ok};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn run(repo: &Path, cache: &Path, args: &[&str]) -> (i32, String, String) {
    let o = bt()
        .env("BACKTREE_CACHE_DIR", cache)
        .args(args)
        .arg("--repo")
        .arg(repo)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            } else {
                out.push((e.path(), e.metadata().unwrap().len()));
            }
        }
    }
    out.sort();
    out
}

fn open(repo: &Path) -> (tokio::runtime::Runtime, Repository) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r = rt
        .block_on(Repository::open(Arc::new(LocalStore::open(repo).unwrap())))
        .unwrap();
    (rt, r)
}

#[test]
fn salvage_keeps_what_reads_and_leaves_out_what_is_lost() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    let cache = t.path().join("cache");
    let src = t.path().join("src");
    for d in ["keep/deep", "lostdir", "data"] {
        std::fs::create_dir_all(src.join(d)).unwrap();
    }
    std::fs::write(src.join("a.txt"), b"hello").unwrap();
    std::fs::write(src.join("keep/x.txt"), b"kept").unwrap();
    std::fs::write(src.join("keep/deep/y.txt"), b"deep and kept").unwrap();
    std::fs::write(src.join("lostdir/z.txt"), b"lost with its directory").unwrap();
    ok(bt().args(["init", "--repo"]).arg(&repo));
    let ingest = |time: &str| {
        ok(bt()
            .env("BACKTREE_CACHE_DIR", &cache)
            .args(["ingest", "--host", "web1", "--time", time, "--repo"])
            .arg(&repo)
            .arg(&src));
    };
    ingest("2026-11-01T01:00:00Z");
    let packs_before: Vec<PathBuf> = files(&repo.join("packs/data"))
        .into_iter()
        .map(|f| f.0)
        .collect();
    // The second generation adds a file of several chunks: its data pack holds only them.
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(src.join("data/big.bin"), &big).unwrap();
    std::fs::write(src.join("data/small.txt"), b"hello").unwrap(); // deduplicated: a.txt
    ingest("2026-11-02T01:00:00Z");
    let (g1, g2) = ("2026-11-01T010000Z", "2026-11-02T010000Z");
    let new_pack: Vec<PathBuf> = files(&repo.join("packs/data"))
        .into_iter()
        .map(|f| f.0)
        .filter(|p| !packs_before.contains(p))
        .collect();
    assert_eq!(new_pack.len(), 1, "{new_pack:?}");
    std::fs::remove_file(&new_pack[0]).unwrap();
    // Corrupt the tree blob of `lostdir` (shared by both generations) in its pack.
    let (rt, r) = open(&repo);
    let m1 = rt.block_on(r.manifest("web1", g1)).unwrap();
    let root = m1.root.tree.unwrap();
    let lostdir = rt.block_on(r.resolve(&root, b"lostdir")).unwrap().unwrap();
    let keep = rt.block_on(r.resolve(&root, b"keep")).unwrap().unwrap();
    let loc = rt.block_on(r.locate(&lostdir.tree.unwrap())).unwrap();
    let pack = repo.join(loc.pack_key());
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[loc.offset as usize + loc.stored_len as usize / 2] ^= 0xff;
    std::fs::write(&pack, &bytes).unwrap();
    drop(r);

    let (code, out, _) = run(&repo, &cache, &["repair", "generations"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("2 damaged generations"), "{out}");

    // A dry run says what it would do and changes nothing.
    let before = files(&repo);
    let (code, out, err) = run(
        &repo,
        &cache,
        &["repair", "generations", "--salvage", "--dry-run"],
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains(&format!(
            "would salvage web1/{g2} as web1/{g2}-2: 2 paths left out (first: /data/big.bin: "
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "would salvage web1/{g1} as web1/{g1}-2: 1 paths left out (first: /lostdir: "
        )),
        "{out}"
    );
    assert_eq!(files(&repo), before);

    let (code, out, err) = run(&repo, &cache, &["repair", "generations", "--salvage"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "salvaged web1/{g2} as web1/{g2}-2: 2 paths left out"
        )),
        "{out}"
    );
    assert!(out.contains("2 of 2 damaged generations salvaged"), "{out}");

    let (rt, r) = open(&repo);
    let gens = rt.block_on(r.generations("web1")).unwrap();
    assert_eq!(gens, [format!("{g1}-2"), format!("{g2}-2")]);
    let m = rt.block_on(r.manifest("web1", &format!("{g2}-2"))).unwrap();
    assert_eq!(
        m.label.as_deref(),
        Some(format!("salvaged from {g2}").as_str())
    );
    assert_eq!(m.time, "2026-11-02T01:00:00Z".replace("Z", ".000000000Z"));
    let lost: Vec<&str> = m.errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(lost, ["/data/big.bin", "/lostdir"]);
    assert_eq!(m.stats.skipped, 2);
    let root = m.root.tree.unwrap();
    // The intact subtree is referenced as it was; the lost directory is there, empty.
    let keep2 = rt.block_on(r.resolve(&root, b"keep")).unwrap().unwrap();
    assert_eq!(keep2.tree, keep.tree);
    let lost2 = rt.block_on(r.resolve(&root, b"lostdir")).unwrap().unwrap();
    assert_eq!((lost2.mode, lost2.mtime), (lostdir.mode, lostdir.mtime));
    let inside = rt.block_on(r.dir_entries(&lost2.tree.unwrap())).unwrap();
    assert!(inside.is_empty(), "{inside:?}");
    let data = rt.block_on(r.dir_entries(&root)).unwrap();
    assert!(data.iter().any(|e| e.name == b"data"));
    drop(r);

    for (g, file) in [
        (g2, "a.txt"),
        (g2, "keep/x.txt"),
        (g2, "keep/deep/y.txt"),
        (g2, "data/small.txt"),
        (g1, "keep/deep/y.txt"),
    ] {
        let o = bt()
            .env("BACKTREE_CACHE_DIR", &cache)
            .args(["cat", "--repo"])
            .arg(&repo)
            .arg(format!("web1/{g}-2/{file}"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{file}");
        assert_eq!(o.stdout, std::fs::read(src.join(file)).unwrap(), "{file}");
    }
    let (code, _, _) = run(
        &repo,
        &cache,
        &["cat", &format!("web1/{g2}-2/data/big.bin")],
    );
    assert_ne!(code, 0);

    // No generation references lost data; `repair index` tombstones the lost pack's entries
    // and verify is clean.
    let (code, out, _) = run(&repo, &cache, &["repair", "generations"]);
    assert_eq!(code, 0, "{out}");
    let (code, out, err) = run(&repo, &cache, &["repair", "index"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = run(&repo, &cache, &["verify"]);
    assert_eq!(code, 0, "{out}");
    assert!(files(&repo.join("leases")).is_empty());
    // Nothing left to salvage.
    let (code, out, _) = run(
        &repo,
        &cache,
        &["repair", "generations", "--salvage", "--json"],
    );
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["salvaged"].as_array().unwrap().len(), 0);

    // A manifest that does not parse has nothing to salvage; with --remove it is deleted.
    let m = repo.join("snapshots/web1").join(format!("{g1}-2"));
    let bytes = std::fs::read(&m).unwrap();
    std::fs::write(&m, &bytes[..bytes.len() / 2]).unwrap();
    let (code, out, _) = run(&repo, &cache, &["repair", "generations", "--salvage"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("cannot salvage web1/{g1}-2: ")),
        "{out}"
    );
    assert!(m.exists());
    let (code, out, _) = run(
        &repo,
        &cache,
        &["repair", "generations", "--salvage", "--remove"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("removed web1/{g1}-2: manifest unreadable")),
        "{out}"
    );
    assert!(!m.exists());
}
