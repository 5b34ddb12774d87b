//! Finding files by a glob across every generation of a host (`backtree find`), each distinct
//! version once with the generations that hold it.
//!
//! A version is an entry at a path as [`crate::diff::same_version`] defines it: the same content
//! and metadata (access and change times, inode numbers and hardlink groups are not compared).
//!
//! Generations are walked oldest first, depth first. A directory is remembered by its path and
//! tree id together with the versions found below it; when a later generation has the same tree
//! id at the same path, that subtree is not read again: it holds the same entries, so the
//! generation is added to the versions remembered for it. A host's nightly generations thus
//! cost the first one's trees plus the trees that changed since. The memory is one small record
//! per distinct directory (path hash, tree id, the indices of the versions below it) and one per
//! version found.

use crate::diff::TreeSource;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::tree::{Entry, Kind};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;

/// A glob on paths inside a generation (no leading `/`). A pattern without `/` matches an
/// entry's name at any depth (`*.xml`, `vmInventory.xml`); with `/`, the whole path, where `*`
/// stays within one directory and `**` crosses them (`etc/**/vmInventory.xml`).
#[derive(Debug, Clone)]
pub struct Pattern {
    glob: globset::GlobMatcher,
    by_name: bool,
}

impl Pattern {
    pub fn new(pattern: &str) -> Result<Pattern> {
        let p = pattern.trim_start_matches('/');
        let glob = globset::GlobBuilder::new(p)
            .literal_separator(true)
            .build()
            .map_err(|e| Error::InvalidPattern {
                pattern: pattern.to_owned(),
                reason: e.to_string(),
            })?
            .compile_matcher();
        Ok(Pattern {
            glob,
            by_name: !p.contains('/'),
        })
    }

    /// Whether the entry at `path` (named `name`) matches.
    pub fn is_match(&self, path: &str, name: &str) -> bool {
        if self.by_name {
            self.glob.is_match(name)
        } else {
            self.glob.is_match(path)
        }
    }
}

/// One distinct version of a matching entry.
#[derive(Debug, Clone, Serialize)]
pub struct Version {
    pub path: String,
    #[serde(skip)]
    pub entry: Entry,
    /// The generations that hold it, oldest first.
    pub generations: Vec<String>,
}

/// What a search read and skipped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FindStats {
    /// Tree blobs read (directories, page lists and pages).
    pub trees_read: u64,
    /// Directories not read because the same tree was walked at the same path before.
    pub trees_skipped: u64,
}

/// The key of a version: the path and the entry with the fields versions ignore cleared.
fn version_key(path: &str, e: &Entry) -> (String, Id) {
    let mut raw = Vec::new();
    // Writing CBOR into a Vec only fails on serializer bugs.
    ciborium::into_writer(&crate::diff::normalized(e), &mut raw).expect("CBOR into memory");
    (path.to_owned(), Id::of(&raw))
}

struct Frame {
    prefix: String,
    /// (path hash, tree id) of the directory, remembered when it is done.
    key: Option<(Id, Id)>,
    entries: std::vec::IntoIter<Entry>,
    /// Versions found below it so far.
    found: Vec<u32>,
}

/// A search across the generations of one host.
pub struct Finder<'a> {
    src: &'a dyn TreeSource,
    pattern: &'a Pattern,
    versions: Vec<Version>,
    by_key: HashMap<(String, Id), u32>,
    walked: HashMap<(Id, Id), Vec<u32>>,
    pub stats: FindStats,
}

impl<'a> Finder<'a> {
    pub fn new(src: &'a dyn TreeSource, pattern: &'a Pattern) -> Self {
        Finder {
            src,
            pattern,
            versions: Vec::new(),
            by_key: HashMap::new(),
            walked: HashMap::new(),
            stats: FindStats::default(),
        }
    }

    /// Every entry of directory tree `id`, following its pages.
    async fn entries(&mut self, id: &Id) -> Result<Vec<Entry>> {
        self.stats.trees_read += 1;
        let t = Arc::unwrap_or_clone(self.src.tree(id).await?);
        if !t.is_paged() {
            return Ok(t.entries);
        }
        let mut out = Vec::with_capacity(t.count() as usize);
        for p in &t.pages {
            self.stats.trees_read += 1;
            out.extend(Arc::unwrap_or_clone(self.src.tree(&p.id).await?).entries);
        }
        Ok(out)
    }

    fn record(&mut self, idx: &[u32], generation: &str) {
        for &i in idx {
            self.versions[i as usize]
                .generations
                .push(generation.to_owned());
        }
    }

    /// Adds generation `generation` (call them oldest first), whose root entry is `root`.
    pub async fn generation(&mut self, generation: &str, root: &Entry) -> Result<()> {
        let Some(tree) = root.tree.filter(|_| root.kind == Kind::Dir) else {
            return Ok(());
        };
        let key = (Id::of(b""), tree);
        if let Some(idx) = self.walked.get(&key).cloned() {
            self.stats.trees_skipped += 1;
            self.record(&idx, generation);
            return Ok(());
        }
        let entries = self.entries(&tree).await?;
        let mut stack = vec![Frame {
            prefix: String::new(),
            key: Some(key),
            entries: entries.into_iter(),
            found: Vec::new(),
        }];
        while let Some(top) = stack.last_mut() {
            let Some(e) = top.entries.next() else {
                let done = stack.pop().expect("a frame");
                if let Some(k) = done.key {
                    self.walked.insert(k, done.found.clone());
                }
                if let Some(parent) = stack.last_mut() {
                    parent.found.extend(done.found);
                }
                continue;
            };
            let name = String::from_utf8_lossy(&e.name).into_owned();
            let path = format!("{}{name}", top.prefix);
            if self.pattern.is_match(&path, &name) {
                let key = version_key(&path, &e);
                let next = self.versions.len() as u32;
                let i = *self.by_key.entry(key).or_insert(next);
                if i == next {
                    self.versions.push(Version {
                        path: path.clone(),
                        entry: e.clone(),
                        generations: Vec::new(),
                    });
                }
                self.versions[i as usize]
                    .generations
                    .push(generation.to_owned());
                top.found.push(i);
            }
            let Some(t) = e.tree.filter(|_| e.kind == Kind::Dir) else {
                continue;
            };
            let key = (Id::of(path.as_bytes()), t);
            if let Some(idx) = self.walked.get(&key).cloned() {
                self.stats.trees_skipped += 1;
                self.record(&idx, generation);
                top.found.extend(idx);
                continue;
            }
            let entries = self.entries(&t).await?;
            stack.push(Frame {
                prefix: format!("{path}/"),
                key: Some(key),
                entries: entries.into_iter(),
                found: Vec::new(),
            });
        }
        Ok(())
    }

    /// The versions found, by path, then by their first generation.
    pub fn versions(self) -> Vec<Version> {
        let mut v = self.versions;
        v.sort_by(|a, b| a.path.cmp(&b.path));
        v
    }
}

#[cfg(test)]
mod tests;
