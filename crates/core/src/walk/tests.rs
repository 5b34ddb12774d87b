use super::*;
use crate::config::{ChunkerParams, Config};
use crate::ingest::{self, IngestOptions, Progress};
use crate::pack::parse_pack;
use crate::testing::random_bytes;
use backtree_store::{DynStore, MemoryStore, ObjectStore};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Tiny chunks and paged chunk lists of 8 pieces, so a small tree has a chunk-list blob, a
/// paged list with two index levels, and many packs.
pub(crate) fn tiny_config() -> Config {
    let mut c = Config::new(true);
    c.chunker = ChunkerParams {
        min: 64,
        avg: 256,
        max: 1024,
        ..ChunkerParams::default()
    };
    c.pack_size = 16 * 1024;
    c.chunk_list_page = Some(8);
    c
}

/// A small source: files, a subdirectory, the same directory twice (one tree blob), a hardlink,
/// a file of about 40 chunks (a plain chunk-list blob is not written for fewer than 65 pieces:
/// paged at 8 a page) and a symlink.
pub(crate) fn build_source(src: &Path) {
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    std::fs::create_dir_all(src.join("twin1")).unwrap();
    std::fs::create_dir_all(src.join("twin2")).unwrap();
    std::fs::write(src.join("a.txt"), b"hello").unwrap();
    std::fs::write(src.join("sub/b.txt"), b"below").unwrap();
    std::fs::write(src.join("sub/deeper/c.bin"), random_bytes(3, 3000)).unwrap();
    std::fs::write(src.join("big.bin"), random_bytes(1, 100_000)).unwrap();
    // One inode in both (a tree blob holds its entries' inode numbers).
    std::fs::write(src.join("twin1/same.txt"), b"same").unwrap();
    std::fs::hard_link(src.join("twin1/same.txt"), src.join("twin2/same.txt")).unwrap();
    std::fs::hard_link(src.join("a.txt"), src.join("a-link.txt")).unwrap();
    std::os::unix::fs::symlink("a.txt", src.join("sym")).unwrap();
}

/// A repository in memory with one generation of [`build_source`] (`gens` of them).
pub(crate) async fn repo_with(
    src: &Path,
    gens: usize,
) -> (Arc<MemoryStore>, Arc<Repository>, Vec<Manifest>) {
    let mem = Arc::new(MemoryStore::new());
    let store: DynStore = mem.clone();
    let repo = Arc::new(Repository::init_with(store, tiny_config()).await.unwrap());
    let mut out = Vec::new();
    for i in 0..gens {
        let o = IngestOptions {
            host: "h".into(),
            sources: vec![src.to_path_buf()],
            time: Some(
                chrono::DateTime::parse_from_rfc3339(&format!("2026-01-0{}T00:00:00Z", i + 1))
                    .unwrap()
                    .with_timezone(&chrono::Utc),
            ),
            ..Default::default()
        };
        let r = repo.clone();
        let h = tokio::runtime::Handle::current();
        let rep = tokio::task::spawn_blocking(move || {
            ingest::ingest(&r, &h, &o, &Progress::default(), &|_| {})
        })
        .await
        .unwrap()
        .unwrap();
        out.push(rep.manifest);
    }
    (mem, repo, out)
}

/// Every blob in every pack: id → (kind of reference expected, pack key).
pub(crate) async fn all_blobs(store: &MemoryStore) -> HashMap<Id, (crate::BlobKind, String)> {
    let mut out = HashMap::new();
    for o in store.list("packs/").await.unwrap() {
        let bytes = store.get(&o.key).await.unwrap();
        for e in parse_pack(&o.key, &bytes).unwrap() {
            out.insert(e.id, (e.kind, o.key.clone()));
        }
    }
    out
}

#[derive(Default)]
struct Collect {
    refs: Vec<(Id, RefKind, String, bool)>,
    problems: Vec<Problem>,
}

impl Visitor for Collect {
    fn reference(&mut self, r: &Reference<'_>) {
        self.refs.push((*r.id, r.kind, r.path.to_owned(), r.first));
    }
    fn problem(&mut self, p: Problem) {
        self.problems.push(p);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_walk_reaches_every_stored_blob_and_skips_what_it_has_seen() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    build_source(&src);
    let (mem, repo, gens) = repo_with(&src, 2).await;
    let mut seen = HashSet::new();
    let mut c = Collect::default();
    let stats = walk_generation(&*repo, &gens[0], &mut seen, &mut c).await;
    assert!(c.problems.is_empty(), "{:?}", c.problems);
    // Nothing but this generation is stored, so every blob of every pack is referenced, and
    // data blobs as data, tree-kind blobs as something else.
    let all = all_blobs(&mem).await;
    let referenced: HashMap<Id, RefKind> = c.refs.iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(referenced.len(), all.len());
    for (id, (kind, key)) in &all {
        let r = referenced
            .get(id)
            .unwrap_or_else(|| panic!("{id} in {key}"));
        assert_eq!(*kind == crate::BlobKind::Data, *r == RefKind::Data, "{id}");
    }
    let kinds: HashSet<RefKind> = referenced.values().copied().collect();
    assert_eq!(
        kinds.len(),
        4,
        "trees, chunk lists, data and links: {kinds:?}"
    );
    // The paged list: its root, index blobs and pages, all named by the file's path.
    let lists = c
        .refs
        .iter()
        .filter(|r| r.1 == RefKind::ChunkList && r.2 == "/big.bin")
        .count();
    assert!(lists > 8, "{lists}");
    assert!(c.refs.iter().any(|r| r.2 == "/sub/deeper/c.bin"));
    // The twin directories are one blob: walked once, referenced twice.
    let twins: Vec<_> = c.refs.iter().filter(|r| r.2.starts_with("/twin")).collect();
    assert!(
        twins.iter().any(|r| r.1 == RefKind::Tree && !r.3),
        "{twins:?}"
    );
    assert_eq!(
        stats.fetched as usize,
        all.len()
            - c.refs
                .iter()
                .filter(|r| r.1 == RefKind::Data && r.3)
                .count()
    );

    // The second generation of the unchanged source: only its root is referenced again, and
    // nothing is fetched.
    let mut c2 = Collect::default();
    let stats = walk_generation(&*repo, &gens[1], &mut seen, &mut c2).await;
    assert_eq!(stats.fetched, 0, "{:?}", c2.refs);
    assert!(c2.refs.iter().all(|r| !r.3));
}

/// A source that fails for some ids as if they were not indexed.
struct Without<'a> {
    repo: &'a Repository,
    missing: HashSet<Id>,
}

impl BlobSource for Without<'_> {
    fn read_blob<'a>(&'a self, id: &'a Id) -> BoxFuture<'a, Result<Vec<u8>>> {
        if self.missing.contains(id) {
            return Box::pin(async move { Err(Error::BlobNotIndexed { id: *id }) });
        }
        Box::pin(self.repo.read_blob(id))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn problems_name_the_path_and_the_walk_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    build_source(&src);
    let (mem, repo, gens) = repo_with(&src, 1).await;
    let root = gens[0].root.tree.unwrap();
    let sub = repo.resolve(&root, b"sub").await.unwrap().unwrap();
    let big = repo.resolve(&root, b"big.bin").await.unwrap().unwrap();

    // Corrupt the subdirectory's tree blob in its pack: one byte flipped.
    let loc = repo.locate(&sub.tree.unwrap()).await.unwrap();
    let key = loc.pack_key();
    let mut bytes = mem.get(&key).await.unwrap().to_vec();
    bytes[loc.offset as usize + loc.stored_len as usize / 2] ^= 0xff;
    mem.tamper(&key, bytes.into());
    // And the big file's chunk list is "not indexed".
    let src = Without {
        repo: &repo,
        missing: [big.chunk_list.unwrap()].into(),
    };
    let mut c = Collect::default();
    let stats = walk_generation(&src, &gens[0], &mut HashSet::new(), &mut c).await;
    assert_eq!(stats.problems, 2);
    let mut got: Vec<_> = c
        .problems
        .iter()
        .map(|p| (p.path.as_str(), p.kind, p.error.kind()))
        .collect();
    got.sort_by_key(|g| g.0);
    assert_eq!(
        got,
        [
            ("/big.bin", RefKind::ChunkList, crate::ErrorKind::NotFound),
            ("/sub", RefKind::Tree, crate::ErrorKind::Corrupt),
        ]
    );
    for p in &c.problems {
        assert_eq!(p.ancestors, [root], "{p:?}");
        assert!(p.error.to_string().contains(&p.id.to_hex()) || p.error.to_string().contains(&key));
    }
    // Everything else was walked: the twins, a.txt, the hardlink table.
    assert!(c.refs.iter().any(|r| r.2.ends_with("/same.txt")));
    assert!(c.refs.iter().any(|r| r.1 == RefKind::Links));
    assert!(!c.refs.iter().any(|r| r.2.starts_with("/sub/")));
}
