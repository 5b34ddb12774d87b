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
/// Returns also how many trees were read (for tests and statistics).
pub async fn versions(repo: &Repository, host: &str, path: &[u8]) -> Result<(Vec<Version>, u64)> {
    let comps: Vec<&[u8]> = path
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .collect();
    let mut out: Vec<Version> = Vec::new();
    // The previous generation's tree ids along the path (index d: the directory holding
    // component d) and its answer.
    let mut prev: Vec<Id> = Vec::new();
    let mut prev_answer: Option<Entry> = None;
    let mut reads = 0u64;
    for name in repo.generations(host).await? {
        let m = match repo.manifest(host, &name).await {
            Ok(m) => m,
            // Forgotten since the listing.
            Err(e) if e.kind() == crate::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut ids: Vec<Id> = Vec::with_capacity(comps.len());
        let mut answer: Option<Entry> = if comps.is_empty() {
            Some(m.root.clone())
        } else {
            None
        };
        let mut dir = m.root.tree;
        for (d, comp) in comps.iter().enumerate() {
            let Some(t) = dir else {
                answer = None;
                break;
            };
            ids.push(t);
            if prev.get(d) == Some(&t) {
                // The previous generation resolved the rest of the path from this same tree:
                // its answer holds.
                answer = prev_answer.clone();
                ids = prev.clone();
                break;
            }
            reads += 1;
            let e = repo.lookup(&t, comp).await?;
            if d + 1 == comps.len() {
                answer = e;
            } else {
                dir = e.filter(|e| e.kind == Kind::Dir).and_then(|e| e.tree);
                if dir.is_none() {
                    answer = None;
                    break;
                }
            }
        }
        if let Some(e) = &answer {
            match out.iter_mut().find(|v| same_version(&v.entry, e)) {
                Some(v) => v.generations.push(name.clone()),
                None => out.push(Version {
                    entry: e.clone(),
                    generations: vec![name.clone()],
                }),
            }
        }
        prev = ids;
        prev_answer = answer;
    }
    Ok((out, reads))
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
        // A path that never existed: no versions.
        assert!(versions(&repo, "h", b"etc/none")
            .await
            .unwrap()
            .0
            .is_empty());
    }
}
