//! The versions of one path across a host's generations (issue 15: the mount's history view
//! and `find` build on it).
//!
//! For every generation, oldest first, the path is resolved component by component from the
//! generation's root tree. Resolving stops early where a directory's tree id equals the one the
//! previous generation had at the same depth: everything below an unchanged tree is unchanged,
//! so the previous generation's answer is this one's too. An unchanged path costs one manifest
//! read per generation and no tree read; a path that changed costs the trees from the first
//! changed directory down. Memory is the path's tree ids for one generation plus the versions
//! found, not the generations' contents.
//!
//! A **version** is what [`crate::diff::same_version`] compares (the content and the metadata a
//! restore sets; not `atime`, `ctime`, the inode number or the hardlink group), so a file that
//! was only read, or copied back unchanged, is the same version, as `find` counts them. A version
//! is named by the first generation that has it; a file changed and changed back is one version
//! seen in two runs of generations.

use crate::diff::same_version;
use crate::error::Result;
use crate::id::Id;
use crate::repo::Repository;
use crate::tree::{Entry, Kind};
use futures_util::stream::{FuturesOrdered, StreamExt};
use std::collections::{BTreeMap, HashSet};

/// Manifests read ahead of the walk: on S3 each is a GET of tens of milliseconds, and a year
/// of nightly generations read one after the other would take seconds before the first tree.
const MANIFESTS_AHEAD: usize = 16;

/// One distinct version of a path.
#[derive(Debug, Clone)]
pub struct Version {
    /// The entry, as in [`Version::first`].
    pub entry: Entry,
    /// Where the entry is in the first generation: the directory page holding it and its index
    /// there (see [`Repository::lookup_at`]); `None` for the root directory, whose entry is in
    /// the manifest.
    pub at: Option<(Id, u32)>,
    /// The generations that have it, oldest first (the first names the version).
    pub generations: Vec<String>,
}

impl Version {
    pub fn first(&self) -> &str {
        &self.generations[0]
    }
}

/// The versions of `path` (`/`-separated, below the generation root) in `host`'s generations,
/// in the order they first appear. Generations where the path does not exist are skipped.
/// Returns also how many trees were read (for tests and statistics).
pub async fn versions(repo: &Repository, host: &str, path: &[u8]) -> Result<(Vec<Version>, u64)> {
    let names = repo.generations(host).await?;
    versions_with(repo, &names, path, |name| manifest_root(repo, host, name)).await
}

/// A generation's root entry, `None` if it was forgotten since it was listed.
async fn manifest_root(repo: &Repository, host: &str, name: &str) -> Result<Option<Entry>> {
    match repo.manifest(host, name).await {
        Ok(m) => Ok(Some(m.root)),
        Err(e) if e.kind() == crate::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// [`versions`] in the generations `names` (oldest first), whose root entries `root` gives
/// (`None` for a generation forgotten since it was listed): for a caller that has listed the
/// generations already and keeps their manifests, as the mount does.
pub async fn versions_with<'a, F, Fut>(
    repo: &Repository,
    names: &'a [String],
    path: &[u8],
    mut root: F,
) -> Result<(Vec<Version>, u64)>
where
    F: FnMut(&'a String) -> Fut,
    Fut: std::future::Future<Output = Result<Option<Entry>>>,
{
    let comps: Vec<&[u8]> = path
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .collect();
    let mut out: Vec<Version> = Vec::new();
    // The previous generation's tree ids along the path (index d: the directory holding
    // component d) and its answer with its place.
    let mut prev: Vec<Id> = Vec::new();
    let mut prev_answer: Option<(Entry, Option<(Id, u32)>)> = None;
    let mut reads = 0u64;
    // The roots in flight, in order (a queue rather than a `map(..).buffered(..)` stream: a
    // stream holding a closure over `root` is not `Send` for every lifetime, which a caller's
    // spawned future must be).
    let mut ahead = names.iter();
    let mut roots = FuturesOrdered::new();
    loop {
        while roots.len() < MANIFESTS_AHEAD {
            let Some(name) = ahead.next() else { break };
            let r = root(name);
            roots.push_back(async move { (name, r.await) });
        }
        let Some((name, r)) = roots.next().await else {
            break;
        };
        let Some(root) = r? else {
            continue;
        };
        let mut ids: Vec<Id> = Vec::with_capacity(comps.len());
        let mut answer = if comps.is_empty() {
            Some((root.clone(), None))
        } else {
            None
        };
        let mut dir = root.tree;
        for (d, comp) in comps.iter().enumerate() {
            let Some(t) = dir else {
                answer = None;
                break;
            };
            ids.push(t);
            if prev.get(d) == Some(&t) {
                // The previous generation resolved the rest of the path from this same tree:
                // its answer (and the answer's place) holds.
                answer = prev_answer.clone();
                ids = prev.clone();
                break;
            }
            reads += 1;
            let found = repo.lookup_at(&t, comp).await?;
            if d + 1 == comps.len() {
                answer = found.map(|(page, idx, e)| (e, Some((page, idx))));
            } else {
                dir = found
                    .filter(|(_, _, e)| e.kind == Kind::Dir)
                    .and_then(|(_, _, e)| e.tree);
                if dir.is_none() {
                    answer = None;
                    break;
                }
            }
        }
        if let Some((e, at)) = &answer {
            match out.iter_mut().find(|v| same_version(&v.entry, e)) {
                Some(v) => v.generations.push(name.clone()),
                None => out.push(Version {
                    entry: e.clone(),
                    at: *at,
                    generations: vec![name.clone()],
                }),
            }
        }
        prev = ids;
        prev_answer = answer;
    }
    Ok((out, reads))
}

/// The names a directory has had across its versions (`versions` of one directory, as
/// [`versions`] gives them), each with its kind in the newest version that has it: what a
/// history view lists, so that a file deleted since is still found. Each distinct tree is read
/// once; memory is the names, not the entries.
pub async fn children(repo: &Repository, versions: &[Version]) -> Result<BTreeMap<Vec<u8>, Kind>> {
    let mut out = BTreeMap::new();
    // Trees and pages already listed: versions differing only in metadata share their tree,
    // and the versions of a paged directory share every page that did not change.
    let mut seen: HashSet<Id> = HashSet::new();
    let add = |out: &mut BTreeMap<Vec<u8>, Kind>, entries: Vec<Entry>| {
        for e in entries {
            out.entry(e.name).or_insert(e.kind);
        }
    };
    // Newest first, so that the first kind recorded for a name is its newest.
    for v in versions.iter().rev() {
        let (Kind::Dir, Some(t)) = (v.entry.kind, v.entry.tree) else {
            continue;
        };
        if !seen.insert(t) {
            continue;
        }
        let tree = repo.tree(&t).await?;
        if !tree.is_paged() {
            add(&mut out, tree.entries);
            continue;
        }
        for p in &tree.pages {
            if seen.insert(p.id) {
                add(&mut out, repo.tree(&p.id).await?.entries);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::ingest::{self, IngestOptions, Progress};
    use backtree_store::{DynStore, MemoryStore};
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_over_many_generations_has_one_entry_per_version() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("etc/deep")).unwrap();
        std::fs::create_dir_all(src.join("other")).unwrap();
        let store: DynStore = Arc::new(MemoryStore::new());
        let repo = Arc::new(
            Repository::init_with(store, Config::new(true))
                .await
                .unwrap(),
        );
        // 30 generations; the file changes at 0, 7, 13 and 21, and at 25 goes back to the
        // content and mtime it had at 7; other files change every time.
        let contents = |i: usize| match i {
            0..=6 => "v1",
            7..=12 | 25.. => "v2",
            13..=20 => "v3",
            _ => "v4",
        };
        for i in 0..30usize {
            let f = src.join("etc/deep/inventory.xml");
            // Written only when it changes (a write changes its ctime, and so its directory).
            if i == 0 || contents(i) != contents(i - 1) {
                std::fs::write(&f, contents(i)).unwrap();
                let stamp = match contents(i) {
                    "v1" => 1_000,
                    "v2" => 2_000,
                    "v3" => 3_000,
                    _ => 4_000,
                };
                crate::testing::set_times(&f, (stamp, 0), (stamp, 0));
            }
            std::fs::write(src.join("other/noise"), format!("{i}")).unwrap();
            // A file deleted when the inventory first changes (so no extra directory changes).
            match i {
                0 => std::fs::write(src.join("etc/deep/old.conf"), "old").unwrap(),
                7 => std::fs::remove_file(src.join("etc/deep/old.conf")).unwrap(),
                _ => {}
            }
            let o = IngestOptions {
                host: "h".into(),
                sources: vec![src.clone()],
                time: Some(
                    chrono::DateTime::from_timestamp(1_767_225_600 + i as i64 * 3600, 0).unwrap(),
                ),
                ..Default::default()
            };
            let (r, h) = (repo.clone(), tokio::runtime::Handle::current());
            tokio::task::spawn_blocking(move || {
                ingest::ingest(&r, &h, &o, &Progress::default(), &|_| {})
            })
            .await
            .unwrap()
            .unwrap();
        }
        let (vs, reads) = versions(&repo, "h", b"etc/deep/inventory.xml")
            .await
            .unwrap();
        let runs: Vec<usize> = vs.iter().map(|v| v.generations.len()).collect();
        assert_eq!(runs, vec![7, 6 + 5, 8, 4], "{vs:?}");
        let gens = repo.generations("h").await.unwrap();
        assert_eq!(vs[1].first(), gens[7]);
        assert_eq!(
            vs[1].generations[6], gens[25],
            "the revert is the same version"
        );
        // Each version reads back as its content, and its place is its entry's.
        for v in &vs {
            let (page, idx) = v.at.unwrap();
            let t = repo.tree(&page).await.unwrap();
            assert_eq!(t.entries[idx as usize].name, b"inventory.xml");
            let m = repo.manifest("h", v.first()).await.unwrap();
            let e = repo
                .resolve(m.root.tree.as_ref().unwrap(), b"etc/deep/inventory.xml")
                .await
                .unwrap()
                .unwrap();
            let list = repo
                .file_chunks(&e)
                .await
                .unwrap()
                .collect(&repo)
                .await
                .unwrap();
            let bytes = repo.read_range(&list, 0, e.size).await.unwrap();
            assert_eq!(bytes.len() as u64, v.entry.size);
        }
        // `etc` is unchanged in the generations where the file is: only the root tree (which
        // changes every time, `other/noise`) and the changed directories are read.
        assert!(reads <= 5 * 3 + 25, "{reads} tree reads");
        // The directory's names across its versions: the file deleted at 7 is still there.
        let (dirs, _) = versions(&repo, "h", b"etc/deep").await.unwrap();
        let names = children(&repo, &dirs).await.unwrap();
        let names: Vec<&[u8]> = names.keys().map(Vec::as_slice).collect();
        assert_eq!(names, vec![&b"inventory.xml"[..], b"old.conf"]);
        let (root, _) = versions(&repo, "h", b"").await.unwrap();
        assert_eq!(root.len(), 30, "the root changes every time");
        assert!(root.iter().all(|v| v.at.is_none()));
        let kinds = children(&repo, &root).await.unwrap();
        assert_eq!(kinds.get(&b"etc"[..]), Some(&Kind::Dir));
        // A path that never existed: no versions.
        assert!(versions(&repo, "h", b"etc/none")
            .await
            .unwrap()
            .0
            .is_empty());
    }
}
