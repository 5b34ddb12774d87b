//! Inodes and attributes: the table of inodes the kernel holds, entries resolved from their
//! directory pages, attributes, symlinks and extended attributes.

use super::*;

impl BacktreeFs {
    pub(super) fn node(&self, ino: u64) -> Result<Node> {
        lock(&self.nodes)
            .get(&ino)
            .map(|r| r.node.clone())
            .ok_or(FsError::NotFound)
    }

    /// Records that the kernel received `ino` once more (lookup, readdirplus entry).
    pub fn remember(&self, ino: u64, node: &Node) {
        lock(&self.nodes)
            .entry(ino)
            .or_insert_with(|| NodeRec {
                node: node.clone(),
                lookups: 0,
            })
            .lookups += 1;
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut nodes = lock(&self.nodes);
        if let Some(r) = nodes.get_mut(&ino) {
            r.lookups = r.lookups.saturating_sub(n);
            if r.lookups == 0 {
                nodes.remove(&ino);
            }
        }
    }

    pub(super) fn virtual_dir_attr(&self, ino: u64) -> Attr {
        Attr {
            ino,
            kind: FileKind::Dir,
            perm: 0o555,
            nlink: 2,
            uid: self.opts.uid,
            gid: self.opts.gid,
            rdev: 0,
            size: 0,
            blocks: 0,
            atime: self.mounted,
            mtime: self.mounted,
            ctime: self.mounted,
        }
    }

    pub(super) fn entry_ino(parent: u64, gen: &GenCtx, e: &Entry) -> u64 {
        match e.link {
            Some(g) => hash_ino(&[b"link", &gen.ino.to_le_bytes(), &g.to_le_bytes()]),
            None => hash_ino(&[&parent.to_le_bytes(), &e.name]),
        }
    }

    /// The inode, node and attributes of entry `idx` of directory page `page` (whose id is
    /// `page_id`) in the directory `parent` at `path`.
    pub(super) fn child(
        parent: u64,
        gen: &Arc<GenCtx>,
        path: &[u8],
        page_id: Id,
        page: &backtree_core::tree::Tree,
        idx: usize,
    ) -> (u64, Node, Attr) {
        let e = &page.entries[idx];
        let cpath: Arc<[u8]> = if path.is_empty() {
            Arc::from(&e.name[..])
        } else {
            Arc::from([path, b"/", &e.name[..]].concat())
        };
        let node = Node::Entry {
            gen: gen.clone(),
            path: cpath,
            at: EntryAt::Page {
                page: page_id,
                idx: idx as u32,
            },
        };
        let ino = Self::entry_ino(parent, gen, e);
        (ino, node, Self::entry_attr(ino, gen, e))
    }

    /// A node's entry if it is at hand without fetching: `Some(None)` for virtual nodes,
    /// `None` if its directory page must be fetched (use [`entry`](Self::entry)).
    pub(super) fn entry_cached(&self, node: &Node) -> Option<Option<EntryRef>> {
        match node {
            Node::Entry { gen, at, .. } => match *at {
                EntryAt::Root => Some(Some(EntryRef::Root(gen.clone()))),
                EntryAt::Page { page, idx } => {
                    let t = self.tree_cached(&page)?;
                    ((idx as usize) < t.entries.len()).then_some(Some(EntryRef::Page(t, idx, page)))
                }
            },
            _ => Some(None),
        }
    }

    /// A node's entry (`None` for virtual nodes), fetching its directory page if needed.
    pub(super) async fn entry(&self, node: &Node) -> Result<Option<EntryRef>> {
        if let Some(e) = self.entry_cached(node) {
            return Ok(e);
        }
        let Node::Entry {
            gen,
            path,
            at: EntryAt::Page { page, idx },
        } = node
        else {
            return Ok(None);
        };
        let t = self.tree(gen, path, page).await?;
        if *idx as usize >= t.entries.len() {
            return Err(FsError::NotFound);
        }
        Ok(Some(EntryRef::Page(t, *idx, *page)))
    }

    /// A node and its entry, if that is at hand without fetching.
    pub(super) fn resolve_cached(&self, ino: u64) -> Option<Result<(Node, Option<EntryRef>)>> {
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return Some(Err(e)),
        };
        let e = self.entry_cached(&node)?;
        Some(Ok((node, e)))
    }

    /// A node and its entry, fetching the entry's directory page if needed.
    pub(super) async fn resolve(&self, ino: u64) -> Result<(Node, Option<EntryRef>)> {
        let node = self.node(ino)?;
        let e = self.entry(&node).await?;
        Ok((node, e))
    }

    pub(super) fn entry_attr(ino: u64, gen: &GenCtx, e: &Entry) -> Attr {
        let kind = kind_of(e.kind);
        let nlink = match (e.kind, e.link) {
            (Kind::File, Some(g)) => gen.links.get(&g).copied().unwrap_or(1),
            // 1 tells find(1) not to use the leaf optimisation (as btrfs does).
            _ => 1,
        };
        let data = e.size.saturating_sub(e.holes.unwrap_or(0));
        Attr {
            ino,
            kind,
            perm: (e.mode & 0o7777) as u16,
            nlink,
            uid: e.uid,
            gid: e.gid,
            // The kernel's 32-bit device encoding is the low half of glibc's 64-bit one for
            // every major below 4096 and minor below 2^20.
            rdev: e.rdev.unwrap_or(0) as u32,
            size: e.size,
            blocks: if kind == FileKind::File {
                data.div_ceil(512)
            } else {
                0
            },
            atime: systime(e.atime),
            mtime: systime(e.mtime),
            ctime: systime(e.ctime),
        }
    }

    /// Attributes of a node; `entry` is its entry (for nodes inside a generation).
    pub(super) fn attr_of(&self, ino: u64, node: &Node, entry: Option<&Entry>) -> (Attr, Duration) {
        match node {
            Node::Root | Node::Host(_) => (self.virtual_dir_attr(ino), SHORT_TTL),
            Node::Latest(_) => {
                let mut a = self.virtual_dir_attr(ino);
                a.kind = FileKind::Symlink;
                a.perm = 0o777;
                a.nlink = 1;
                a.size = 18; // a generation name's length; readlink gives the truth
                (a, SHORT_TTL)
            }
            Node::Entry { gen, .. } => match entry {
                Some(e) => (Self::entry_attr(ino, gen, e), LONG_TTL),
                // Not reached: callers resolve the entry of every generation node.
                None => (self.virtual_dir_attr(ino), SHORT_TTL),
            },
        }
    }

    /// [`getattr`](Self::getattr) without waiting, or `None` if that needs a fetch.
    pub fn getattr_cached(&self, ino: u64) -> Option<Result<(Attr, Duration)>> {
        Some(
            self.resolve_cached(ino)?
                .map(|(n, e)| self.attr_of(ino, &n, e.as_deref())),
        )
    }

    pub async fn getattr(&self, ino: u64) -> Result<(Attr, Duration)> {
        let (n, e) = self.resolve(ino).await?;
        Ok(self.attr_of(ino, &n, e.as_deref()))
    }

    pub async fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        match self.resolve(ino).await? {
            (Node::Latest(host), _) => {
                let gens = self.generations(&host).await?;
                gens.last()
                    .map(|g| g.as_bytes().to_vec())
                    .ok_or(FsError::NotFound)
            }
            (_, Some(e)) => e.target.clone().ok_or(FsError::Invalid),
            _ => Err(FsError::Invalid),
        }
    }

    /// The value of an extended attribute. ENODATA when absent, never ENOSYS.
    pub async fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        xattr_value(self.resolve(ino).await?.1.as_deref(), name)
    }

    /// [`getxattr`](Self::getxattr) without waiting, or `None` if that needs a fetch.
    pub fn getxattr_cached(&self, ino: u64, name: &[u8]) -> Option<Result<Vec<u8>>> {
        Some(
            self.resolve_cached(ino)?
                .and_then(|(_, e)| xattr_value(e.as_deref(), name)),
        )
    }

    /// Names of the extended attributes, each followed by a NUL byte.
    pub async fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        Ok(xattr_names(self.resolve(ino).await?.1.as_deref()))
    }

    /// [`listxattr`](Self::listxattr) without waiting, or `None` if that needs a fetch.
    pub fn listxattr_cached(&self, ino: u64) -> Option<Result<Vec<u8>>> {
        Some(
            self.resolve_cached(ino)?
                .map(|(_, e)| xattr_names(e.as_deref())),
        )
    }
}

/// The value of xattr `name` of `entry`; ENODATA when absent (and for virtual nodes).
pub(super) fn xattr_value(entry: Option<&Entry>, name: &[u8]) -> Result<Vec<u8>> {
    entry
        .and_then(|e| e.xattr(name))
        .map(<[u8]>::to_vec)
        .ok_or(FsError::NoData)
}

/// The xattr names of `entry`, each followed by a NUL byte.
pub(super) fn xattr_names(entry: Option<&Entry>) -> Vec<u8> {
    let mut out = Vec::new();
    for x in entry.map(|e| e.xattrs.as_slice()).unwrap_or_default() {
        out.extend_from_slice(&x.name);
        out.push(0);
    }
    out
}
