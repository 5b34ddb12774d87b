//! The virtual namespace above the generations.
//!
//! ```text
//! /                      hosts (listed from the store on every opendir: new hosts appear)
//! /<host>/               generations, and `latest` → the newest (re-listed on every opendir)
//! /<host>/<generation>/  the generation's root directory: immutable from here down
//! ```
//! These directories change while the mount runs, so they get a short TTL ([`SHORT_TTL`]) and
//! are listed afresh on each opendir. The last listing that succeeded is kept: a store outage
//! must not make the tree vanish (an `rsync --delete` mirror would delete everything), so what
//! was listed stays listed and the rest gives EIO. A generation's manifest and hardlink table
//! are loaded once ([`GenCtx`]) and kept in an LRU of [`GENERATIONS_KEPT`]; an inode that still
//! holds an evicted one keeps it alive, and a later lookup loads it again (same inode numbers).

use super::error::{lock, Failures, FsError, Result};
use super::inodes::{hash_ino, Attr, EntryAt, FileKind, Node};
use super::SHORT_TTL;
use backtree_core::manifest::{generation_sort_key, is_generation_name, Manifest};
use backtree_core::Repository;
use futures_util::StreamExt;
use lru::LruCache;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Manifests fetched at once when a host directory is listed (latency-bound on S3).
const MANIFEST_FETCHES: usize = 16;

/// Generations whose manifest and hardlink table are kept (an LRU by host and name). A
/// manifest with its root entry and stats is about 1–2 KB, so 4096 is a few MB, while 1 000
/// hosts × 365 nightly generations listed once would be some 500 MB kept for the mount's life.
const GENERATIONS_KEPT: usize = 4096;

/// One generation as seen by the mount.
#[derive(Debug)]
pub struct GenCtx {
    pub host: String,
    pub name: String,
    pub ino: u64,
    pub manifest: Manifest,
    pub links: HashMap<u64, u32>,
}

impl GenCtx {
    /// `host/generation/path`, for log lines.
    pub(super) fn describe(&self, path: &[u8]) -> String {
        format!(
            "{}/{}/{}",
            self.host,
            self.name,
            String::from_utf8_lossy(path)
        )
    }
}

/// Hosts, generations and `latest`.
pub(super) struct Namespace {
    repo: Arc<Repository>,
    failures: Arc<Failures>,
    /// Owner of the virtual directories, and their times.
    uid: u32,
    gid: u32,
    mounted: SystemTime,
    gens: Mutex<LruCache<(String, String), Arc<GenCtx>>>,
    /// The last listing of hosts (key "") and of each host's generations.
    listings: Mutex<HashMap<String, Vec<String>>>,
}

impl Namespace {
    pub(super) fn new(repo: Arc<Repository>, failures: Arc<Failures>, uid: u32, gid: u32) -> Self {
        Namespace {
            repo,
            failures,
            uid,
            gid,
            mounted: SystemTime::now(),
            gens: Mutex::new(LruCache::new(
                NonZeroUsize::new(GENERATIONS_KEPT).unwrap_or(NonZeroUsize::MIN),
            )),
            listings: Mutex::new(HashMap::new()),
        }
    }

    /// Attributes of a virtual node (root, host, `latest`).
    pub(super) fn attr(&self, ino: u64, node: &Node) -> (Attr, Duration) {
        let mut a = Attr {
            ino,
            kind: FileKind::Dir,
            perm: 0o555,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            size: 0,
            blocks: 0,
            atime: self.mounted,
            mtime: self.mounted,
            ctime: self.mounted,
        };
        if let Node::Latest(_) = node {
            a.kind = FileKind::Symlink;
            a.perm = 0o777;
            a.nlink = 1;
            a.size = 18; // a generation name's length; readlink gives the truth
        }
        (a, SHORT_TTL)
    }

    /// The child `name` of a virtual directory: a host of the root, a generation or `latest`
    /// of a host.
    pub(super) async fn lookup(&self, parent: &Node, name: &[u8]) -> Result<(u64, Node)> {
        let name_str = std::str::from_utf8(name).map_err(|_| FsError::NotFound)?;
        match parent {
            Node::Root => {
                if !self.hosts().await?.iter().any(|h| h == name_str) {
                    return Err(FsError::NotFound);
                }
                Ok((host_ino(name_str), Node::Host(name_str.into())))
            }
            Node::Host(host) if name_str == "latest" => {
                Ok((latest_ino(host), Node::Latest(host.clone())))
            }
            Node::Host(host) => {
                if !is_generation_name(name_str) {
                    return Err(FsError::NotFound);
                }
                let g = self.generation(host, name_str).await?;
                Ok((g.ino, gen_root(g)))
            }
            Node::Latest(_) => Err(FsError::NotDir),
            Node::Entry { .. } => Err(FsError::Invalid),
        }
    }

    /// The items of a virtual directory, listed afresh: hosts, or a host's generations (oldest
    /// first) and `latest`.
    pub(super) async fn list(&self, dir: &Node) -> Result<Vec<(u64, Vec<u8>, Node)>> {
        match dir {
            Node::Root => Ok(self
                .hosts()
                .await?
                .into_iter()
                .map(|h| (host_ino(&h), h.as_bytes().to_vec(), Node::Host(h.into())))
                .collect()),
            Node::Host(host) => {
                let mut names = self.generations(host).await?;
                names.sort_by_cached_key(|g| generation_sort_key(g));
                // Generation roots need their manifest for attributes: load them here (two
                // small GETs each, cached for the life of the mount), several at once, so that
                // a host with a year of nightly generations lists quickly on S3 too.
                let loaded: Vec<_> = futures_util::stream::iter(names)
                    .map(|n| async move {
                        let g = self.generation(host, &n).await;
                        (n, g)
                    })
                    .buffered(MANIFEST_FETCHES)
                    .collect()
                    .await;
                let mut out = Vec::with_capacity(loaded.len() + 1);
                for (name, g) in loaded {
                    match g {
                        Ok(g) => out.push((g.ino, name.into_bytes(), gen_root(g))),
                        Err(FsError::NotFound) => {} // forgotten meanwhile
                        Err(e) => return Err(e),
                    }
                }
                out.push((
                    latest_ino(host),
                    b"latest".to_vec(),
                    Node::Latest(host.clone()),
                ));
                Ok(out)
            }
            Node::Latest(_) => Err(FsError::NotDir),
            Node::Entry { .. } => Err(FsError::Invalid),
        }
    }

    /// The target of `host/latest`: the newest generation's name.
    pub(super) async fn latest(&self, host: &str) -> Result<Vec<u8>> {
        let gens = self.generations(host).await?;
        gens.last()
            .map(|g| g.as_bytes().to_vec())
            .ok_or(FsError::NotFound)
    }

    async fn generation(&self, host: &str, name: &str) -> Result<Arc<GenCtx>> {
        let key = (host.to_owned(), name.to_owned());
        if let Some(g) = lock(&self.gens).get(&key).cloned() {
            return Ok(g);
        }
        let manifest = match self.repo.manifest(host, name).await {
            Ok(m) => m,
            Err(backtree_core::Error::NotFound { .. }) => return Err(FsError::NotFound),
            Err(e) => return Err(self.failures.fail(format!("{host}/{name}: manifest"), e)),
        };
        let links = self.repo.links(&manifest).await.map_err(|e| {
            self.failures
                .fail(format!("{host}/{name}: hardlink table"), e)
        })?;
        let g = Arc::new(GenCtx {
            host: host.to_owned(),
            name: name.to_owned(),
            ino: hash_ino(&[b"gen", host.as_bytes(), name.as_bytes()]),
            manifest,
            links,
        });
        lock(&self.gens).put(key, g.clone());
        Ok(g)
    }

    async fn hosts(&self) -> Result<Vec<String>> {
        self.listing(String::new(), "listing hosts".into(), self.repo.hosts())
            .await
    }

    async fn generations(&self, host: &str) -> Result<Vec<String>> {
        let what = format!("listing generations of {host}");
        self.listing(host.to_owned(), what, self.repo.generations(host))
            .await
    }

    /// A fresh listing of hosts (`key` "") or of a host's generations; if the store cannot be
    /// reached, the last listing that succeeded.
    async fn listing(
        &self,
        key: String,
        what: String,
        fresh: impl std::future::Future<Output = backtree_core::Result<Vec<String>>>,
    ) -> Result<Vec<String>> {
        match fresh.await {
            Ok(v) => {
                lock(&self.listings).insert(key, v.clone());
                Ok(v)
            }
            Err(e) => {
                let err = self.failures.fail(what, e);
                match lock(&self.listings).get(&key) {
                    Some(v) => Ok(v.clone()),
                    None => Err(err),
                }
            }
        }
    }
}

fn host_ino(host: &str) -> u64 {
    hash_ino(&[b"host", host.as_bytes()])
}

fn latest_ino(host: &str) -> u64 {
    hash_ino(&[b"latest", host.as_bytes()])
}

/// The node of a generation's root directory.
fn gen_root(gen: Arc<GenCtx>) -> Node {
    Node::Entry {
        gen,
        path: Arc::from(&b""[..]),
        at: EntryAt::Root,
    }
}
