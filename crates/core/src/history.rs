//! The versions of one path across a host's generations (issue 15: the mount's history view
//! builds on it).
//!
//! The path is resolved in every generation at once, one component (one level) at a time.
//! At each level the generations' directory tree ids are gathered and each *distinct* id is
//! looked up once: generations in which a directory did not change share its tree id, so they
//! share the lookup and everything below it. An unchanged path costs one manifest read per
//! generation and the lookups in the distinct root trees (a root changes whenever anything
//! does); a path that changed costs the trees from the first changed directory down, once per
//! distinct tree. Lookups and manifests are [`IN_FLIGHT`] at a time, so on S3 a year of nightly
//! generations costs a few seconds, not 365 round trips one after the other. Memory is one
//! tree id and one result per generation plus the versions found, not the generations'
//! contents.
//!
//! A **version** is what [`crate::diff::same_version`] compares (the content and the metadata a
//! restore sets; not `atime`, `ctime`, the inode number or the hardlink group), so a file that
//! was only read, or copied back unchanged, is the same version, as `find` counts them. A version
//! is named by the first generation that has it; a file changed and changed back is one version
//! seen in two runs of generations.

use crate::diff::{same_version, TreeSource};
use crate::error::Result;
use crate::id::Id;
use crate::repo::Repository;
use crate::tree::{Entry, Kind};
use futures_util::stream::{FuturesOrdered, StreamExt};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;

/// Manifests and tree lookups in flight: on S3 each is a request of tens of milliseconds.
const IN_FLIGHT: usize = 16;

/// One distinct version of a path.
#[derive(Debug, Clone)]
pub struct Version {
    /// The entry, as in [`Version::first`].
    pub entry: Entry,
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
/// Returns also how many directory lookups were made (for tests and statistics).
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

/// Runs `f` on each item, [`IN_FLIGHT`] at a time, returning the results in order.
async fn in_order<'a, T: 'a, R, Fut>(
    items: impl IntoIterator<Item = &'a T>,
    mut f: impl FnMut(&'a T) -> Fut,
) -> Result<Vec<R>>
where
    Fut: Future<Output = Result<R>>,
{
    // A queue rather than a `map(..).buffered(..)` stream: a stream holding a closure is not
    // `Send` for every lifetime, which a caller's spawned future must be.
    let mut ahead = items.into_iter();
    let mut pending = FuturesOrdered::new();
    let mut out = Vec::new();
    loop {
        while pending.len() < IN_FLIGHT {
            let Some(item) = ahead.next() else { break };
            pending.push_back(f(item));
        }
        match pending.next().await {
            Some(r) => out.push(r?),
            None => return Ok(out),
        }
    }
}

/// [`versions`] in the generations `names` (oldest first), whose root entries `root` gives
/// (`None` for a generation forgotten since it was listed), reading trees from `src`: for a
/// caller that has listed the generations already and keeps their roots and trees, as the
/// mount does.
pub async fn versions_with<'a, F, Fut>(
    src: &dyn TreeSource,
    names: &'a [String],
    path: &[u8],
    root: F,
) -> Result<(Vec<Version>, u64)>
where
    F: FnMut(&'a String) -> Fut,
    Fut: Future<Output = Result<Option<Entry>>>,
{
    let comps: Vec<&[u8]> = path
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .collect();
    let roots = in_order(names, root).await?;
    let mut lookups = 0u64;
    // Per generation: where the path stands (the directory to look the next component up in,
    // or the answer once the last one is found).
    let mut answers: Vec<Option<Entry>> = Vec::new();
    let mut dirs: Vec<Option<Id>> = Vec::new();
    if comps.is_empty() {
        answers = roots;
    } else {
        dirs = (roots.iter())
            .map(|r| {
                r.as_ref()
                    .filter(|e| e.kind == Kind::Dir)
                    .and_then(|e| e.tree)
            })
            .collect();
    }
    for (d, comp) in comps.iter().enumerate() {
        let mut distinct: Vec<Id> = Vec::new();
        let mut seen = HashSet::new();
        for t in dirs.iter().flatten() {
            if seen.insert(*t) {
                distinct.push(*t);
            }
        }
        lookups += distinct.len() as u64;
        let found = in_order(&distinct, |t| lookup(src, t, comp)).await?;
        let found: HashMap<Id, Option<Entry>> = distinct.into_iter().zip(found).collect();
        let last = d + 1 == comps.len();
        for dir in dirs.iter_mut() {
            let f = dir.and_then(|t| found.get(&t).cloned().flatten());
            if last {
                answers.push(f);
            } else {
                *dir = f.filter(|e| e.kind == Kind::Dir).and_then(|e| e.tree);
            }
        }
    }
    let mut out: Vec<Version> = Vec::new();
    for (name, answer) in names.iter().zip(answers) {
        let Some(e) = answer else { continue };
        match out.iter_mut().find(|v| same_version(&v.entry, &e)) {
            Some(v) => v.generations.push(name.clone()),
            None => out.push(Version {
                entry: e,
                generations: vec![name.clone()],
            }),
        }
    }
    Ok((out, lookups))
}

/// One entry of directory `dir` by name (as [`Repository::lookup`], through `src`).
async fn lookup(src: &dyn TreeSource, dir: &Id, name: &[u8]) -> Result<Option<Entry>> {
    let t = src.tree(dir).await?;
    let t = if t.is_paged() {
        match t.page_for(name) {
            Some(p) => src.tree(&p.id).await?,
            None => return Ok(None),
        }
    } else {
        t
    };
    Ok(t.entries
        .binary_search_by(|e| e.name.as_slice().cmp(name))
        .ok()
        .map(|i| t.entries[i].clone()))
}

/// The names a directory has had across its versions (`versions` of one directory, as
/// [`versions`] gives them), each with its kind in the newest version that has it: what a
/// history view lists, so that a file deleted since is still found. Each distinct tree, and
/// each distinct page of a paged directory, is read once, [`IN_FLIGHT`] at a time; memory is
/// the names, not the entries.
pub async fn children(
    src: &dyn TreeSource,
    versions: &[Version],
) -> Result<BTreeMap<Vec<u8>, Kind>> {
    // Newest first, so that the first kind recorded for a name is its newest. Versions
    // differing only in metadata share their tree; the versions of a paged directory share
    // every page that did not change.
    let mut seen = HashSet::new();
    let trees: Vec<Id> = (versions.iter().rev())
        .filter_map(|v| {
            (v.entry.kind == Kind::Dir)
                .then_some(v.entry.tree)
                .flatten()
        })
        .filter(|t| seen.insert(*t))
        .collect();
    let tops = in_order(&trees, |t| src.tree(t)).await?;
    let mut out = BTreeMap::new();
    let mut add = |entries: &[Entry]| {
        for e in entries {
            if !out.contains_key(&e.name) {
                out.insert(e.name.clone(), e.kind);
            }
        }
    };
    for t in &tops {
        if !t.is_paged() {
            add(&t.entries);
            continue;
        }
        let pages: Vec<Id> = (t.pages.iter())
            .map(|p| p.id)
            .filter(|p| seen.insert(*p))
            .collect();
        for page in in_order(&pages, |p| src.tree(p)).await? {
            add(&page.entries);
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
        // Each version reads back as its content.
        for v in &vs {
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
        let names = children(&*repo, &dirs).await.unwrap();
        let names: Vec<&[u8]> = names.keys().map(Vec::as_slice).collect();
        assert_eq!(names, vec![&b"inventory.xml"[..], b"old.conf"]);
        let (root, _) = versions(&repo, "h", b"").await.unwrap();
        assert_eq!(root.len(), 30, "the root changes every time");
        let kinds = children(&*repo, &root).await.unwrap();
        assert_eq!(kinds.get(&b"etc"[..]), Some(&Kind::Dir));
        // A path that never existed: no versions.
        assert!(versions(&repo, "h", b"etc/none")
            .await
            .unwrap()
            .0
            .is_empty());
    }
}
