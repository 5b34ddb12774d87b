//! Directories: the parsed-page cache, lookups, directory handles and readdir.

use super::*;

impl BacktreeFs {
    /// A parsed directory page without waiting: a page parsed earlier, or one decoded and
    /// parsed here from its stored bytes when a tree window holds them. `None` if the page must
    /// be read from the store, or is too large to decode on the calling thread.
    ///
    /// This is what lets requests be answered on the FUSE thread after their page was evicted
    /// from the parsed pages: `rsync` lists directories up to a second before it reads their
    /// files, by which time hundreds of other pages have been parsed. Decoding a page of a few
    /// KiB (zstd, BLAKE3, CBOR) costs less than handing the request to another thread (~25 µs).
    /// A page that fails to decode is left to [`tree`](Self::tree), which reports it.
    pub(super) fn tree_cached(&self, id: &Id) -> Option<Arc<backtree_core::tree::Tree>> {
        if let Some(t) = lock(&self.trees).get(id) {
            return Some(t);
        }
        let stored = self.packs.trees.get(id)?;
        if stored.raw_len > INLINE_TREE {
            return None;
        }
        let what = format!("tree {id}");
        let raw = stored.decode(id, &what).ok()?;
        let t = Arc::new(backtree_core::tree::Tree::decode(&what, &raw).ok()?);
        lock(&self.trees).put(*id, t.clone(), t.mem_size());
        Some(t)
    }

    pub(super) async fn tree(
        &self,
        gen: &GenCtx,
        path: &[u8],
        id: &Id,
    ) -> Result<Arc<backtree_core::tree::Tree>> {
        if let Some(t) = self.tree_cached(id) {
            return Ok(t);
        }
        let t = self.load_tree(id).await.map_err(|e| {
            self.io(
                format!(
                    "{}/{}/{}: directory",
                    gen.host,
                    gen.name,
                    String::from_utf8_lossy(path)
                ),
                e,
            )
        })?;
        let t = Arc::new(t);
        lock(&self.trees).put(*id, t.clone(), t.mem_size());
        Ok(t)
    }

    /// Reads and parses a tree blob, fetching its pack's neighbourhood on a miss.
    pub(super) async fn load_tree(
        &self,
        id: &Id,
    ) -> backtree_core::Result<backtree_core::tree::Tree> {
        let what = format!("tree {id}");
        let (stored, _) = self.packs.stored(id, BlobKind::Tree).await?;
        let raw = stored.decode(id, &format!("{what} ({} bytes stored)", stored.bytes.len()))?;
        backtree_core::tree::Tree::decode(&what, &raw)
    }

    /// Finds `name` in directory `parent`. The caller must [`remember`](Self::remember) the
    /// returned inode if it hands it to the kernel.
    pub async fn lookup(&self, parent: u64, name: &[u8]) -> Result<(u64, Node, Attr, Duration)> {
        let pnode = self.node(parent)?;
        let name_str = std::str::from_utf8(name).ok();
        let node = match &pnode {
            Node::Root => {
                let host = name_str.ok_or(FsError::NotFound)?;
                if !self.hosts().await?.iter().any(|h| h == host) {
                    return Err(FsError::NotFound);
                }
                (hash_ino(&[b"host", name]), Node::Host(host.into()))
            }
            Node::Host(host) => {
                let n = name_str.ok_or(FsError::NotFound)?;
                if n == "latest" {
                    (
                        hash_ino(&[b"latest", host.as_bytes()]),
                        Node::Latest(host.clone()),
                    )
                } else {
                    if !is_generation_name(n) {
                        return Err(FsError::NotFound);
                    }
                    let g = self.generation(host, n).await?;
                    (
                        g.ino,
                        Node::Entry {
                            gen: g,
                            path: Arc::from(&b""[..]),
                            at: EntryAt::Root,
                        },
                    )
                }
            }
            Node::Latest(_) => return Err(FsError::NotDir),
            Node::Entry { gen, path, .. } => {
                let tree = dir_tree(self.entry(&pnode).await?.as_deref())?;
                let t = self.tree(gen, path, &tree).await?;
                let (page_id, page) = if t.is_paged() {
                    match t.page_for(name) {
                        Some(p) => (p.id, self.tree(gen, path, &p.id).await?),
                        None => return Err(FsError::NotFound),
                    }
                } else {
                    (tree, t)
                };
                return Self::named(parent, gen, path, page_id, &page, name);
            }
        };
        let e = self.entry(&node.1).await?;
        let (attr, ttl) = self.attr_of(node.0, &node.1, e.as_deref());
        Ok((node.0, node.1, attr, ttl))
    }

    /// [`lookup`](Self::lookup) inside a generation, answered only from directory pages in
    /// memory ([`tree_cached`](Self::tree_cached)); `None` when that would need the repository.
    pub fn lookup_cached(
        &self,
        parent: u64,
        name: &[u8],
    ) -> Option<Result<(u64, Node, Attr, Duration)>> {
        let Ok((Node::Entry { gen, path, .. }, Some(entry))) = self.resolve_cached(parent)? else {
            return None;
        };
        let tree = match dir_tree(Some(&entry)) {
            Ok(t) => t,
            Err(e) => return Some(Err(e)),
        };
        let t = self.tree_cached(&tree)?;
        let (page_id, page) = if t.is_paged() {
            match t.page_for(name) {
                Some(p) => (p.id, self.tree_cached(&p.id)?),
                None => return Some(Err(FsError::NotFound)),
            }
        } else {
            (tree, t)
        };
        Some(Self::named(parent, &gen, &path, page_id, &page, name))
    }

    /// The entry `name` of directory page `page` (id `page_id`) of directory `parent`, as
    /// [`lookup`](Self::lookup) answers it.
    pub(super) fn named(
        parent: u64,
        gen: &Arc<GenCtx>,
        path: &[u8],
        page_id: Id,
        page: &backtree_core::tree::Tree,
        name: &[u8],
    ) -> Result<(u64, Node, Attr, Duration)> {
        let i = page
            .entries
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .map_err(|_| FsError::NotFound)?;
        let (ino, node, attr) = Self::child(parent, gen, path, page_id, page, i);
        Ok((ino, node, attr, LONG_TTL))
    }

    pub(super) fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// Opens a directory. Returns the handle and whether its listing is immutable (inside a
    /// generation: the kernel may cache it) or not (root and host directories change).
    pub async fn opendir(&self, ino: u64) -> Result<(u64, bool)> {
        let node = self.node(ino)?;
        let handle = match &node {
            Node::Root => {
                let mut items = Vec::new();
                for h in self.hosts().await? {
                    let hino = hash_ino(&[b"host", h.as_bytes()]);
                    let n = Node::Host(h.as_str().into());
                    items.push((hino, h.into_bytes(), n));
                }
                DirHandle::Virtual(self.virtual_items(items))
            }
            Node::Host(host) => {
                let mut gens = self.generations(host).await?;
                gens.sort_by_cached_key(|g| generation_sort_key(g));
                let mut items = Vec::new();
                for g in gens {
                    let gino = hash_ino(&[b"gen", host.as_bytes(), g.as_bytes()]);
                    items.push((gino, g.into_bytes()));
                }
                let mut out = Vec::new();
                // Generation roots need their manifest for attributes: load them here (two
                // small GETs each, cached for the life of the mount), several at once, so that
                // a host with a year of nightly generations lists quickly on S3 too.
                let loaded: Vec<_> = futures_util::stream::iter(items)
                    .map(|(gino, name)| async move {
                        let n = String::from_utf8_lossy(&name).into_owned();
                        let g = self.generation(host, &n).await;
                        (gino, name, g)
                    })
                    .buffered(MANIFEST_FETCHES)
                    .collect()
                    .await;
                for (gino, name, g) in loaded {
                    match g {
                        Ok(g) => {
                            out.push((
                                gino,
                                name,
                                Node::Entry {
                                    gen: g,
                                    path: Arc::from(&b""[..]),
                                    at: EntryAt::Root,
                                },
                            ));
                        }
                        Err(FsError::NotFound) => {} // forgotten meanwhile
                        Err(e) => return Err(e),
                    }
                }
                out.push((
                    hash_ino(&[b"latest", host.as_bytes()]),
                    b"latest".to_vec(),
                    Node::Latest(host.clone()),
                ));
                DirHandle::Virtual(self.virtual_items(out))
            }
            Node::Latest(_) => return Err(FsError::NotDir),
            Node::Entry { gen, path, .. } => DirHandle::Gen {
                gen: gen.clone(),
                path: path.clone(),
                ino,
                tree: dir_tree(self.entry(&node).await?.as_deref())?,
            },
        };
        let immutable = matches!(handle, DirHandle::Gen { .. });
        let fh = self.new_fh();
        lock(&self.dirs).insert(fh, Arc::new(handle));
        Ok((fh, immutable))
    }

    pub(super) fn virtual_items(&self, items: Vec<(u64, Vec<u8>, Node)>) -> Vec<DirItem> {
        items
            .into_iter()
            .enumerate()
            .map(|(i, (ino, name, node))| {
                let entry = match &node {
                    Node::Entry { gen, .. } => Some(&gen.manifest.root),
                    _ => None,
                };
                let (attr, ttl) = self.attr_of(ino, &node, entry);
                DirItem {
                    ino,
                    next: i as u64 + 1,
                    name,
                    attr,
                    ttl,
                    node,
                }
            })
            .collect()
    }

    /// Directory items from `offset` on (0 = start), at most `max`. `.` and `..` are left to
    /// the kernel's path walk and not listed.
    pub async fn readdir(&self, fh: u64, offset: u64, max: usize) -> Result<Vec<DirItem>> {
        let h = lock(&self.dirs)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        match &*h {
            DirHandle::Virtual(items) => Ok(items
                .iter()
                .skip(offset as usize)
                .take(max)
                .cloned()
                .collect()),
            DirHandle::Gen {
                gen,
                path,
                ino,
                tree,
            } => {
                let t = self.tree(gen, path, tree).await?;
                // Offsets: page index × PAGE_SPAN + index in page + 1, so a paged directory is
                // listed one page at a time without holding it all in memory.
                const PAGE_SPAN: u64 = 1 << 20;
                let mut out = Vec::new();
                let (mut page, mut idx) = (offset / PAGE_SPAN, offset % PAGE_SPAN);
                loop {
                    let (page_id, entries) = if t.is_paged() {
                        match t.pages.get(page as usize) {
                            Some(p) => (p.id, self.tree(gen, path, &p.id).await?),
                            None => break,
                        }
                    } else if page == 0 {
                        (*tree, t.clone())
                    } else {
                        break;
                    };
                    if offset == 0 {
                        self.note_listed(page_id, &entries);
                    }
                    for (i, e) in entries.entries.iter().enumerate().skip(idx as usize) {
                        if out.len() >= max {
                            return Ok(out);
                        }
                        let (cino, node, attr) = Self::child(*ino, gen, path, page_id, &entries, i);
                        out.push(DirItem {
                            ino: cino,
                            next: page * PAGE_SPAN + i as u64 + 1,
                            name: e.name.clone(),
                            attr,
                            ttl: LONG_TTL,
                            node,
                        });
                    }
                    page += 1;
                    idx = 0;
                    if !t.is_paged() {
                        break;
                    }
                }
                Ok(out)
            }
        }
    }

    pub fn releasedir(&self, fh: u64) {
        lock(&self.dirs).remove(&fh);
    }

    /// Forgets every parsed directory page, as the LRU does on a large walk (tests). Returns
    /// them: a test that keeps them alive makes pages parsed again land at other addresses, as
    /// they do after a walk has parsed many others in between.
    #[cfg(test)]
    pub(super) fn evict_parsed_pages(&self) -> Vec<Arc<backtree_core::tree::Tree>> {
        lock(&self.trees).clear()
    }
}

pub(super) fn dir_tree(entry: Option<&Entry>) -> Result<Id> {
    match entry {
        Some(Entry {
            kind: Kind::Dir,
            tree: Some(t),
            ..
        }) => Ok(*t),
        _ => Err(FsError::NotDir),
    }
}
