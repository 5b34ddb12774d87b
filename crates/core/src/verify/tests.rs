use super::*;
use crate::index::table::{self, TableKind};
use crate::walk::tests::{build_source, repo_with};
use backtree_store::ObjectStore;

fn all() -> VerifyOptions {
    VerifyOptions {
        data: DataSubset::All,
        hosts: None,
    }
}

fn structure() -> VerifyOptions {
    VerifyOptions {
        data: DataSubset::None,
        hosts: None,
    }
}

async fn run(repo: &Repository, o: &VerifyOptions) -> Report {
    verify(repo, o, &VerifyProgress::default()).await.unwrap()
}

/// The data pack holding the chunks of `path`, and one of them.
async fn data_pack_of(repo: &Repository, root: &Id, path: &[u8]) -> (Location, Id) {
    let e = repo.resolve(root, path).await.unwrap().unwrap();
    let list = repo.chunk_list(&e).await.unwrap();
    let id = list.0.iter().find_map(|c| c.id).unwrap();
    (repo.locate(&id).await.unwrap(), id)
}

#[test]
fn subsets_parse_and_split_the_packs() {
    assert_eq!(DataSubset::parse("10%"), Ok(DataSubset::Percent(10.0)));
    assert_eq!(
        DataSubset::parse("2/5"),
        Ok(DataSubset::Group { n: 2, m: 5 })
    );
    for bad in ["0%", "101%", "0/3", "4/3", "x", "1/0"] {
        assert!(DataSubset::parse(bad).is_err(), "{bad}");
    }
    let ids: Vec<Id> = (0..1000u32).map(|i| Id::of(&i.to_le_bytes())).collect();
    // The groups of M partition the packs.
    for id in &ids {
        let n = (1..=3)
            .filter(|n| DataSubset::Group { n: *n, m: 3 }.selects(id))
            .count();
        assert_eq!(n, 1);
    }
    let some = ids
        .iter()
        .filter(|id| DataSubset::Percent(10.0).selects(id))
        .count();
    assert!((50..150).contains(&some), "{some}");
    assert!(ids.iter().all(|id| DataSubset::Percent(100.0).selects(id)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sound_repository_has_no_findings() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    build_source(&src);
    let (_mem, repo, _) = repo_with(&src, 2).await;
    let r = run(&repo, &all()).await;
    assert!(r.findings.is_empty(), "{:#?}", r.findings);
    assert_eq!(r.counts.generations, 2);
    assert_eq!(r.counts.packs_read, r.counts.packs);
    assert!(r.counts.blobs_referenced > 50);
    assert_eq!(r.counts.unindexed_blobs, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_pack_names_every_generation_and_tombstones_excuse_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    build_source(&src);
    let (mem, repo, gens) = repo_with(&src, 2).await;
    let root = gens[0].root.tree.unwrap();
    let (loc, chunk) = data_pack_of(&repo, &root, b"sub/deeper/c.bin").await;
    mem.delete(&loc.pack_key()).await.unwrap();

    let r = run(&repo, &structure()).await;
    assert!(
        r.findings
            .iter()
            .any(|f| f.kind == FindingKind::MissingPack
                && f.object.as_deref() == Some(&*loc.pack_key())),
        "{:#?}",
        r.findings
    );
    let f = r
        .findings
        .iter()
        .find(|f| f.blob.as_deref() == Some(&*chunk.to_hex()))
        .expect("the chunk is a finding");
    assert_eq!(f.kind, FindingKind::Unavailable);
    assert_eq!(f.host.as_deref(), Some("h"));
    assert_eq!(f.generation.as_deref(), Some(&*gens[0].name));
    assert_eq!(f.path.as_deref(), Some("/sub/deeper/c.bin"));
    assert_eq!(f.other_generations, [format!("h/{}", gens[1].name)]);
    assert_eq!(r.counts.damaged_generations, 2);
    assert!(f.line().contains("also affects h/"), "{}", f.line());

    // A prune's tombstones for every entry of the pack: the missing pack is no problem, and
    // the chunks still referenced are warnings.
    let mut idx = LoadedIndex::load(&repo, &mut Vec::new(), &VerifyProgress::default())
        .await
        .unwrap();
    let tombs: Vec<TableEntry> = idx
        .entries
        .drain()
        .flat_map(|(_, v)| v)
        .filter(|e| e.pack == loc.pack)
        .map(|e| TableEntry { deleted: 1, ..e })
        .collect();
    let (name, bytes) = table::encode(TableKind::Delta, 0, 0, tombs);
    let key = format!("{DELTAS_PREFIX}{}", name.to_hex());
    mem.put(&key, bytes.into()).await.unwrap();
    let r = run(&repo, &structure()).await;
    assert_eq!(r.counts.problems, 0, "{:#?}", r.findings);
    assert!(r.counts.warnings > 0);
    assert!(r
        .findings
        .iter()
        .all(|f| f.kind == FindingKind::BeingPruned && f.severity == Severity::Warning));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_data_finds_a_flipped_byte_and_names_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    build_source(&src);
    let (mem, repo, gens) = repo_with(&src, 1).await;
    let root = gens[0].root.tree.unwrap();
    let (loc, chunk) = data_pack_of(&repo, &root, b"sub/deeper/c.bin").await;
    let key = loc.pack_key();
    let mut bytes = mem.get(&key).await.unwrap().to_vec();
    bytes[loc.offset as usize + 3] ^= 1;
    mem.tamper(&key, bytes.into());

    // The structure is intact.
    assert!(run(&repo, &structure()).await.findings.is_empty());
    let r = run(&repo, &all()).await;
    let f = r
        .findings
        .iter()
        .find(|f| f.kind == FindingKind::CorruptBlob)
        .expect("a corrupt blob");
    assert_eq!(f.blob.as_deref(), Some(&*chunk.to_hex()));
    assert_eq!(f.object.as_deref(), Some(&*key));
    assert_eq!(f.path.as_deref(), Some("/sub/deeper/c.bin"));
    // And the pack no longer hashes to its name.
    assert!(r
        .findings
        .iter()
        .any(|f| f.kind == FindingKind::Pack && f.object.as_deref() == Some(&*key)));
}
