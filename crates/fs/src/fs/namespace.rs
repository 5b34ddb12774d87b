//! The virtual namespace above the generations.
//!
//! ```text
//! /                      hosts (listed from the store on every opendir: new hosts appear)
//! /<host>/               generations, and `latest` → the newest (re-listed on every opendir)
//! /<host>/<generation>/  the generation's root directory: immutable from here down
//! /<host>/.history/      the history view ([`crate::fs::history`]): not listed, found by name
//! ```
//! These directories change while the mount runs, so they get a short TTL ([`SHORT_TTL`]) and
//! are listed afresh on each opendir. The last listing that succeeded is kept: a store outage
//! must not make the tree vanish (an `rsync --delete` mirror would delete everything), so what
//! was listed stays listed and the rest gives EIO.
//!
//! Listing costs one store LIST and nothing else: `/` is one listing of `snapshots/` by
//! delimiter, `/<host>/` one listing of the host's manifests, whose names are all a listing
//! needs (inode numbers hash host and name; the name carries the time). A host with a year of
//! nightly generations is thus listed without 365 manifest GETs. Each generation is listed as
//! a [`Node::Generation`], by name; its manifest and hardlink table are loaded ([`GenCtx`])
//! only when its attributes or contents are asked for (a lookup of it, a `stat`, a listing
//! inside it), and kept in an LRU of [`GENERATIONS_KEPT`]; an inode that still holds an
//! evicted one keeps it alive, and a later lookup loads it again (same inode numbers).
//!
//! The mount answers listings with readdirplus, which carries attributes with every item. A
//! generation whose manifest is loaded is listed with its root's attributes; one that is not
//! gets stand-ins (a read-only directory with the time of its name) valid for no time at all,
//! so the kernel asks again (LOOKUP or GETATTR, which load the manifest) before it shows or
//! uses them: `ls` of a host fetches no manifest, `ls -l` fetches each one it shows.

use super::error::{lock, Failures, FsError, Result};
use super::history::{node_of, HISTORY_DIR};
use super::inodes::{hash_ino, Attr, EntryAt, FileKind, Node};
use super::SHORT_TTL;
use backtree_core::manifest::{generation_time, is_generation_name, Manifest};
use backtree_core::Repository;
use lru::LruCache;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

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

    /// Attributes of a virtual node (root, host, `latest`), and the stand-ins of a generation
    /// root not loaded (valid for no time: see the module docs).
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
        if let Node::Generation { name, .. } = node {
            let t = generation_time(name).map_or(self.mounted, SystemTime::from);
            (a.atime, a.mtime, a.ctime) = (t, t, t);
            return (a, Duration::ZERO);
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
            Node::Host(host) if name_str == HISTORY_DIR => {
                Ok(node_of(host, Arc::from(&b""[..]), true))
            }
            Node::Host(host) => {
                if !is_generation_name(name_str) {
                    return Err(FsError::NotFound);
                }
                let g = self.generation(host, name_str).await?;
                Ok((g.ino, gen_root(g)))
            }
            Node::Latest(_) => Err(FsError::NotDir),
            _ => Err(FsError::Invalid),
        }
    }

    /// The items of a virtual directory, listed afresh (one store listing, no manifest):
    /// hosts, or a host's generations (oldest first) and `latest`.
    pub(super) async fn list(&self, dir: &Node) -> Result<Vec<(u64, Vec<u8>, Node)>> {
        match dir {
            Node::Root => Ok(self
                .hosts()
                .await?
                .into_iter()
                .map(|h| (host_ino(&h), h.as_bytes().to_vec(), Node::Host(h.into())))
                .collect()),
            Node::Host(host) => {
                // Oldest first (the repository sorts them). Generations already loaded are
                // listed with their root's attributes; the others by name only.
                let names = self.generations(host).await?;
                let mut out = Vec::with_capacity(names.len() + 1);
                let gens = lock(&self.gens);
                for name in names {
                    let node = match gens.peek(&(host.to_string(), name.clone())) {
                        Some(g) => gen_root(g.clone()),
                        None => Node::Generation {
                            host: host.clone(),
                            name: name.as_str().into(),
                        },
                    };
                    out.push((gen_ino(host, &name), name.into_bytes(), node));
                }
                drop(gens);
                out.push((
                    latest_ino(host),
                    b"latest".to_vec(),
                    Node::Latest(host.clone()),
                ));
                Ok(out)
            }
            Node::Latest(_) => Err(FsError::NotDir),
            _ => Err(FsError::Invalid),
        }
    }

    /// The root directory of generation `name` of `host`, its manifest loaded (a
    /// [`Node::Generation`] becomes this when used).
    pub(super) async fn root(&self, host: &str, name: &str) -> Result<Node> {
        Ok(gen_root(self.generation(host, name).await?))
    }

    /// The target of `host/latest`: the newest generation's name, from a listing (no
    /// manifest).
    pub(super) async fn latest(&self, host: &str) -> Result<Vec<u8>> {
        let gens = self.generations(host).await?;
        gens.last()
            .map(|g| g.as_bytes().to_vec())
            .ok_or(FsError::NotFound)
    }

    /// Generation `name` of `host`, its manifest and hardlink table loaded (kept in an LRU).
    pub(super) async fn generation(&self, host: &str, name: &str) -> Result<Arc<GenCtx>> {
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
            ino: gen_ino(host, name),
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

    /// The generations of `host`, oldest first, listed afresh (the last listing if the store
    /// cannot be reached).
    pub(super) async fn generations(&self, host: &str) -> Result<Vec<String>> {
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
                let old = lock(&self.listings).insert(key.clone(), v.clone());
                if let (false, Some(old)) = (key.is_empty(), old) {
                    // A generation gone from the listing (forgotten) is dropped from the loaded
                    // ones: were its name ever used again (`--time` of a night re-imported), its
                    // new manifest must be read, not the one kept.
                    let now: std::collections::HashSet<&String> = v.iter().collect();
                    let mut gens = lock(&self.gens);
                    for name in old.into_iter().filter(|n| !now.contains(n)) {
                        gens.pop(&(key.clone(), name));
                    }
                }
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

/// The inode of a generation's root: from host and name, whether its manifest is loaded or not.
fn gen_ino(host: &str, name: &str) -> u64 {
    hash_ino(&[b"gen", host.as_bytes(), name.as_bytes()])
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
