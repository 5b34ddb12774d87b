use super::*;
use crate::repair::damaged_generations;
use crate::verify::{verify, DataSubset, VerifyOptions, VerifyProgress};
use crate::walk::tests::{build_source, repo_with};
use backtree_store::ObjectStore;
use std::sync::Arc;

fn read_data() -> VerifyOptions {
    VerifyOptions {
        data: DataSubset::All,
        hosts: None,
    }
}

async fn report(repo: &Repository) -> Report {
    verify(repo, &read_data(), &VerifyProgress::default())
        .await
        .unwrap()
}

/// Flips a byte in the middle of blob `id` in its pack.
async fn corrupt(mem: &backtree_store::MemoryStore, repo: &Repository, id: &Id) {
    let loc = repo.locate(id).await.unwrap();
    let key = loc.pack_key();
    let mut bytes = mem.get(&key).await.unwrap().to_vec();
    bytes[loc.offset as usize + loc.stored_len as usize / 2] ^= 0xff;
    mem.tamper(&key, bytes.into());
}

async fn salvage(repo: &Arc<Repository>, rep: Report, dry_run: bool) -> Vec<Salvaged> {
    let gens = damaged_generations(&rep);
    let r = repo.clone();
    let h = Handle::current();
    let opts = SalvageOptions {
        dry_run,
        lease_time: None,
    };
    tokio::task::spawn_blocking(move || salvage_generations(&r, &h, &rep, &gens, &opts))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_salvage_keeps_what_reads_and_leaves_out_what_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    build_source(&src);
    let (mem, repo, gens) = repo_with(&src, 1).await;
    let old = &gens[0];
    let root = old.root.tree.unwrap();
    let sub = repo.resolve(&root, b"sub").await.unwrap().unwrap();
    let twin = repo.resolve(&root, b"twin1").await.unwrap().unwrap();
    let big = repo.resolve(&root, b"big.bin").await.unwrap().unwrap();
    // A chunk of the big file, and the subdirectory's own tree blob.
    let list = repo.chunk_list(&big).await.unwrap();
    corrupt(&mem, &repo, &list.0[3].id.unwrap()).await;
    corrupt(&mem, &repo, &sub.tree.unwrap()).await;
    let rep = report(&repo).await;
    assert_eq!(damaged_generations(&rep).len(), 1);

    // A dry run says what it would do and changes nothing.
    let before = mem.list("").await.unwrap().len();
    let dry = salvage(&repo, report(&repo).await, true).await;
    assert_eq!(dry.len(), 1);
    assert!(dry[0].ok(), "{dry:?}");
    assert!(!dry[0].removed);
    assert_eq!(dry[0].left_out, 2, "{dry:?}");
    assert_eq!(
        dry[0].new_generation.as_deref(),
        Some(format!("{}-2", old.name).as_str())
    );
    assert_eq!(mem.list("").await.unwrap().len(), before);

    let done = salvage(&repo, rep, false).await;
    let s = &done[0];
    assert!(s.ok() && s.removed, "{s:?}");
    let paths: Vec<&str> = s.paths.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["/big.bin", "/sub"], "{s:?}");
    assert_eq!(s.trees_written, dry[0].trees_written);
    assert!(s.trees_written >= 2, "root and the empty directory");

    let repo = Repository::open(repo.store().clone()).await.unwrap();
    let names = repo.generations("h").await.unwrap();
    let new_name = s.new_generation.clone().unwrap();
    assert_eq!(names, std::slice::from_ref(&new_name));
    let m = repo.manifest("h", &new_name).await.unwrap();
    assert_eq!(
        m.label.as_deref(),
        Some(format!("salvaged from {}", old.name).as_str())
    );
    assert_eq!(
        (m.time.as_str(), m.parent.as_ref()),
        (old.time.as_str(), None)
    );
    assert_eq!(m.stats.skipped, 2);
    assert_eq!(m.stats.files, old.stats.files - 1);
    assert_eq!(m.errors.len(), 2);
    assert!(m.errors[0].error.contains("content lost"), "{:?}", m.errors);
    assert_ne!(m.session, old.session);
    assert_eq!(m.links, old.links);
    let new_root = m.root.tree.unwrap();
    assert_ne!(new_root, root);
    // The intact subtree is referenced, not rewritten; the lost directory is empty.
    let twin2 = repo.resolve(&new_root, b"twin1").await.unwrap().unwrap();
    assert_eq!(twin2.tree, twin.tree);
    let sub2 = repo.resolve(&new_root, b"sub").await.unwrap().unwrap();
    assert_eq!((sub2.mode, sub2.mtime), (sub.mode, sub.mtime));
    assert!(repo
        .dir_entries(&sub2.tree.unwrap())
        .await
        .unwrap()
        .is_empty());
    let top = repo.dir_entries(&new_root).await.unwrap();
    assert!(!top.iter().any(|e| e.name == b"big.bin"));
    for name in ["a.txt", "a-link.txt", "twin1/same.txt", "twin2/same.txt"] {
        let e = repo
            .resolve(&new_root, name.as_bytes())
            .await
            .unwrap()
            .unwrap();
        let list = repo.chunk_list(&e).await.unwrap();
        let got = repo.read_range(&list, 0, e.size).await.unwrap();
        assert_eq!(got, std::fs::read(src.join(name)).unwrap(), "{name}");
    }
    // Everything the new generation references reads (the corrupt blobs stay in their packs,
    // referenced by nothing: a prune removes them).
    let after = report(&repo).await;
    assert!(
        damaged_generations(&after).is_empty(),
        "{:#?}",
        after.findings
    );
    // No lease left behind.
    assert!(mem.list("leases/").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_root_tree_leaves_an_empty_generation_and_a_lost_manifest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    build_source(&src);
    let (mem, repo, gens) = repo_with(&src, 1).await;
    corrupt(&mem, &repo, &gens[0].root.tree.unwrap()).await;
    let done = salvage(&repo, report(&repo).await, false).await;
    assert!(done[0].ok(), "{done:?}");
    assert_eq!(done[0].paths[0].path, "/");
    let repo = Arc::new(Repository::open(repo.store().clone()).await.unwrap());
    let name = done[0].new_generation.clone().unwrap();
    let m = repo.manifest("h", &name).await.unwrap();
    assert!(repo
        .dir_entries(&m.root.tree.unwrap())
        .await
        .unwrap()
        .is_empty());

    // A manifest that does not parse: nothing to salvage, nothing removed.
    let key = Manifest::key("h", &name);
    mem.tamper(&key, bytes::Bytes::from_static(b"{\"version\""));
    let done = salvage(&repo, report(&repo).await, false).await;
    assert!(!done[0].ok() && !done[0].removed, "{done:?}");
    assert!(mem.head(&key).await.unwrap().is_some());
}
