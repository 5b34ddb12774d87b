//! A repository: the config, the lazily loaded index, and everything a reader needs.
//!
//! Reading is layered: a manifest names a root tree; a tree lists entries; a file entry holds a
//! chunk list; a chunk id is looked up in the index to find its pack, offset and length; the
//! stored bytes are fetched with one ranged read, decompressed and verified against the id.
//! Nothing is read before it is needed, so opening a repository costs one small GET.

use crate::blob;
use crate::chunklist::FileChunks;
use crate::config::{Config, CONFIG_KEY};
use crate::error::{Error, Result};
use crate::id::{BlobKind, Id};
use crate::index::{IndexOptions, IndexSet, Location};
use crate::manifest::{generation_sort_key, is_generation_name, Manifest, SNAPSHOTS_PREFIX};
use crate::tree::{decode_links, ChunkList, Entry, Kind, Tree};
use backtree_store::DynStore;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;

/// An open repository. Share it behind an `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct Repository {
    store: DynStore,
    config: Config,
    index: Arc<IndexSet>,
}

impl Repository {
    /// Creates a new repository in an empty store. Refuses a store that already holds one.
    pub async fn init(store: DynStore) -> Result<Repository> {
        let config = Config::new(store.honors_create_if_absent());
        Self::init_with(store, config).await
    }

    /// Creates a repository with explicit parameters (tests use small packs).
    pub async fn init_with(store: DynStore, config: Config) -> Result<Repository> {
        let location = store.location();
        if store.head(CONFIG_KEY).await?.is_some() {
            return Err(Error::AlreadyInitialized { location });
        }
        if !store.list("").await?.is_empty() {
            return Err(Error::NotEmpty { location });
        }
        let created = store
            .put_if_absent(CONFIG_KEY, Bytes::from(config.to_json()))
            .await?;
        if !created {
            return Err(Error::AlreadyInitialized { location });
        }
        let index = Arc::new(IndexSet::new(store.clone()));
        index.set_repository_id(&config.id);
        Ok(Repository {
            index,
            store,
            config,
        })
    }

    /// Opens an existing repository, checking its format version and features.
    pub async fn open(store: DynStore) -> Result<Repository> {
        Self::open_with(store, IndexOptions::default()).await
    }

    /// [`open`](Self::open) with the index's memory budget and local cache.
    pub async fn open_with(store: DynStore, index: IndexOptions) -> Result<Repository> {
        let location = store.location();
        let bytes = match store.get(CONFIG_KEY).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Err(Error::NotARepository { location }),
            Err(e) => return Err(e.into()),
        };
        let config = Config::parse(&location, &bytes)?;
        let index = Arc::new(IndexSet::with_options(store.clone(), index));
        index.set_repository_id(&config.id);
        Ok(Repository {
            index,
            store,
            config,
        })
    }

    pub fn store(&self) -> &DynStore {
        &self.store
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn index(&self) -> &IndexSet {
        &self.index
    }

    /// The index, shared (an ingest deduplicates through the same view and buckets).
    pub fn index_handle(&self) -> Arc<IndexSet> {
        self.index.clone()
    }

    /// Hosts with at least one generation, sorted.
    pub async fn hosts(&self) -> Result<Vec<String>> {
        Ok(self.store.list_dirs(SNAPSHOTS_PREFIX).await?)
    }

    /// A host's generation names, oldest first.
    pub async fn generations(&self, host: &str) -> Result<Vec<String>> {
        let prefix = format!("{SNAPSHOTS_PREFIX}{host}/");
        let mut names: Vec<String> = self
            .store
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|o| o.key.strip_prefix(&prefix).map(str::to_owned))
            .filter(|n| is_generation_name(n))
            .collect();
        names.sort_by_cached_key(|n| generation_sort_key(n));
        Ok(names)
    }

    /// Every host's generation names, oldest first, hosts sorted, from one flat listing of
    /// `snapshots/`: a few requests however many hosts there are (S3 returns 1 000 keys a
    /// page, so 1 000 hosts × 365 generations is 365 pages), where [`Repository::hosts`] and
    /// then [`Repository::generations`] of each would be one listing per host. Hosts without
    /// a generation (only a stale claim, say) are left out.
    pub async fn all_generations(&self) -> Result<Vec<(String, Vec<String>)>> {
        let mut hosts: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for o in self.store.list(SNAPSHOTS_PREFIX).await? {
            let Some((host, name)) = o
                .key
                .strip_prefix(SNAPSHOTS_PREFIX)
                .and_then(|rest| rest.split_once('/'))
            else {
                continue;
            };
            if is_generation_name(name) {
                match hosts.get_mut(host) {
                    Some(names) => names.push(name.to_owned()),
                    None => {
                        hosts.insert(host.to_owned(), vec![name.to_owned()]);
                    }
                }
            }
        }
        let mut out: Vec<_> = hosts.into_iter().collect();
        for (_, names) in &mut out {
            names.sort_by_cached_key(|n| generation_sort_key(n));
        }
        Ok(out)
    }

    /// A host's protected generations (`backtree protect`): names with a marker object.
    pub async fn protected(&self, host: &str) -> Result<std::collections::HashSet<String>> {
        let prefix = format!("{SNAPSHOTS_PREFIX}{host}/");
        Ok(self
            .store
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|o| {
                o.key
                    .strip_prefix(&prefix)?
                    .strip_suffix(crate::forget::PROTECT_SUFFIX)
                    .filter(|n| is_generation_name(n))
                    .map(str::to_owned)
            })
            .collect())
    }

    /// Protects a generation from every retention policy, or lifts the protection.
    pub async fn set_protected(&self, host: &str, name: &str, on: bool) -> Result<()> {
        // The generation must exist to be protected (a typo must not protect nothing).
        if on {
            self.manifest(host, name).await?;
        }
        let key = format!(
            "{}{}",
            Manifest::key(host, name),
            crate::forget::PROTECT_SUFFIX
        );
        if on {
            self.store.put(&key, Bytes::new()).await?;
        } else {
            self.store.delete(&key).await?;
        }
        Ok(())
    }

    /// Forgets a generation: deletes its manifest. Its data
    /// stays until a prune removes what no generation references.
    pub async fn forget(&self, host: &str, name: &str) -> Result<()> {
        self.store.delete(&Manifest::key(host, name)).await?;
        Ok(())
    }

    /// A host's newest generation, if any.
    pub async fn latest(&self, host: &str) -> Result<Option<String>> {
        Ok(self.generations(host).await?.pop())
    }

    pub async fn manifest(&self, host: &str, name: &str) -> Result<Manifest> {
        let key = Manifest::key(host, name);
        let bytes = match self.store.get(&key).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => {
                return Err(Error::NotFound {
                    what: format!("generation {host}/{name}"),
                })
            }
            Err(e) => return Err(e.into()),
        };
        Manifest::parse(&key, &bytes)
    }

    /// Where a blob is stored.
    pub async fn locate(&self, id: &Id) -> Result<Location> {
        self.index.lookup(id).await
    }

    /// Reads, decompresses and verifies one blob.
    pub async fn read_blob(&self, id: &Id) -> Result<Vec<u8>> {
        let loc = self.locate(id).await?;
        match self.read_blob_at(id, &loc).await {
            Err(e) if e.kind() == crate::ErrorKind::NotFound => {
                match self.index.relocate(id, &loc).await? {
                    Some(l) => self.read_blob_at(id, &l).await,
                    None => Err(e),
                }
            }
            r => r,
        }
    }

    /// Reads a blob whose location is already known ([`blob::fetch`], then
    /// [`blob::StoredBlob::decode`] on the blocking pool: decompression and hashing of up to
    /// 8 MiB is CPU work, kept off the async workers).
    pub async fn read_blob_at(&self, id: &Id, loc: &Location) -> Result<Vec<u8>> {
        let stored = blob::fetch(&self.store, id, loc).await?;
        stored.decode_blocking(*id, blob::describe(id, loc)).await
    }

    /// Reads and parses a tree blob.
    pub async fn tree(&self, id: &Id) -> Result<Tree> {
        let loc = self.locate(id).await?;
        if loc.kind != BlobKind::Tree {
            return Err(Error::corrupt(
                format!("tree {id}"),
                "indexed as a data blob",
            ));
        }
        let raw = self.read_blob(id).await?;
        Tree::decode(&format!("tree {id}"), &raw)
    }

    /// Every entry of a directory, in name order, following its pages.
    pub async fn dir_entries(&self, id: &Id) -> Result<Vec<Entry>> {
        let t = self.tree(id).await?;
        if !t.is_paged() {
            return Ok(t.entries);
        }
        let mut out = Vec::with_capacity(t.count() as usize);
        for p in &t.pages {
            out.extend(self.tree(&p.id).await?.entries);
        }
        Ok(out)
    }

    /// One entry of a directory by name, loading at most one page.
    pub async fn lookup(&self, dir: &Id, name: &[u8]) -> Result<Option<Entry>> {
        let t = self.tree(dir).await?;
        let entries = if t.is_paged() {
            match t.page_for(name) {
                Some(p) => self.tree(&p.id).await?.entries,
                None => return Ok(None),
            }
        } else {
            t.entries
        };
        Ok(entries
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .ok()
            .map(|i| entries[i].clone()))
    }

    /// Resolves a `/`-separated path below a root tree. The empty path is the root itself,
    /// returned as `None` (the root has no entry of its own).
    pub async fn resolve(&self, root: &Id, path: &[u8]) -> Result<Option<Entry>> {
        let mut dir = *root;
        let mut cur: Option<Entry> = None;
        for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            if let Some(e) = &cur {
                dir = match (e.kind, e.tree) {
                    (Kind::Dir, Some(t)) => t,
                    _ => {
                        return Err(Error::NotFound {
                            what: format!("{} (not a directory)", String::from_utf8_lossy(path)),
                        })
                    }
                };
            }
            cur = Some(
                self.lookup(&dir, comp)
                    .await?
                    .ok_or_else(|| Error::NotFound {
                        what: String::from_utf8_lossy(path).into_owned(),
                    })?,
            );
        }
        Ok(cur)
    }

    /// A file entry's whole chunk list, loading it if it is stored separately, every page of
    /// it if it is paged. Readers of one range use [`Repository::file_chunks`] instead.
    pub async fn chunk_list(&self, e: &Entry) -> Result<ChunkList> {
        if let Some(c) = &e.chunks {
            return Ok(c.clone());
        }
        self.file_chunks(e).await?.collect(self).await
    }

    /// A file entry's chunk list for reading ranges: an inline list without a fetch, a
    /// chunk-list blob with one, and of a paged list only its root (pages are fetched as
    /// [`FileChunks::page_at`] needs them).
    pub async fn file_chunks(&self, e: &Entry) -> Result<FileChunks> {
        self.chunks_of(e.chunks.as_ref(), e.chunk_list.as_ref(), e.holes)
            .await
    }

    /// [`Repository::file_chunks`] of content described by an inline list or a chunk-list
    /// blob (an entry's, or a gzip recipe's); neither: empty.
    pub async fn chunks_of(
        &self,
        chunks: Option<&ChunkList>,
        chunk_list: Option<&Id>,
        holes: Option<u64>,
    ) -> Result<FileChunks> {
        if let Some(c) = chunks {
            return Ok(FileChunks::Whole(Arc::new(c.clone())));
        }
        match chunk_list {
            Some(id) => {
                let raw = self.read_blob(id).await?;
                FileChunks::from_blob(id, &raw, holes)
            }
            None => Ok(FileChunks::Whole(Arc::new(ChunkList::default()))),
        }
    }

    /// Reads `len` bytes at `offset` of a file, holes as zeros, short at end of file, fetching
    /// only the pages of a paged list that cover the range.
    pub async fn read_file_range(
        &self,
        chunks: &FileChunks,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>> {
        let size = chunks.size();
        let end = offset.saturating_add(len).min(size);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut pos = offset;
        while pos < end {
            let page = chunks
                .page_at(self, pos)
                .await?
                .ok_or(Error::OffsetPastEnd { offset: pos, size })?;
            pos = self
                .read_page(page.first_start, &page.list, pos, end, &mut out)
                .await?;
        }
        Ok(out)
    }

    /// Appends `pos..` up to `end` or the page's end to `out`; returns where it stopped.
    /// (`list`: the page's pieces, the first starting at `first_start`).
    async fn read_page(
        &self,
        first_start: u64,
        list: &ChunkList,
        mut pos: u64,
        end: u64,
        out: &mut Vec<u8>,
    ) -> Result<u64> {
        let end = end.min(list.size());
        while pos < end {
            let i = list
                .find(pos)
                .filter(|_| pos >= first_start)
                .ok_or(Error::OffsetPastEnd {
                    offset: pos,
                    size: list.size(),
                })?;
            let cs = if i == 0 {
                first_start
            } else {
                list.0[i - 1].end
            };
            let ce = list.0[i].end;
            let take_end = ce.min(end);
            match &list.0[i].id {
                None => out.resize(out.len() + (take_end - pos) as usize, 0),
                Some(id) => {
                    let data = self.read_blob(id).await?;
                    if data.len() as u64 != ce - cs {
                        return Err(Error::corrupt(
                            format!("chunk {id}"),
                            "size differs from the file's chunk list",
                        ));
                    }
                    out.extend_from_slice(&data[(pos - cs) as usize..(take_end - cs) as usize]);
                }
            }
            pos = take_end;
        }
        Ok(pos)
    }

    /// Reads `len` bytes at `offset` of a file whose whole chunk list is at hand, holes as
    /// zeros. Short at end of file.
    pub async fn read_range(&self, chunks: &ChunkList, offset: u64, len: u64) -> Result<Vec<u8>> {
        let size = chunks.size();
        let end = offset.saturating_add(len).min(size);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        if offset < end {
            self.read_page(0, chunks, offset, end, &mut out).await?;
        }
        Ok(out)
    }

    /// The hardlink table of a generation: link group → number of entries.
    pub async fn links(&self, m: &Manifest) -> Result<HashMap<u64, u32>> {
        match &m.links {
            None => Ok(HashMap::new()),
            Some(id) => {
                let raw = self.read_blob(id).await?;
                Ok(decode_links(&format!("hardlink table {id}"), &raw)?
                    .into_iter()
                    .collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backtree_store::{CountingStore, MemoryStore, ObjectStore};

    /// Listing every host's generations is one store listing, whatever the number of hosts.
    #[tokio::test]
    async fn all_generations_is_one_listing_for_any_number_of_hosts() {
        let mem = Arc::new(MemoryStore::new());
        let counting = Arc::new(CountingStore::new(mem.clone()));
        let repo = Repository::init(counting.clone()).await.unwrap();
        for h in 0..50 {
            for name in [
                "2026-01-02T030405Z",
                "2026-01-01T000000Z",
                "2026-01-02T030405Z-2",
            ] {
                let key = Manifest::key(&format!("host{h:02}"), name);
                mem.put(&key, Bytes::from_static(b"{}")).await.unwrap();
            }
        }
        // Neither a claim object nor a host with nothing but one is a generation.
        let claim = crate::claim::claim_key(&Manifest::key("host00", "2026-02-01T000000Z"), "s");
        mem.put(&claim, Bytes::new()).await.unwrap();
        mem.put(
            &format!("{}ghost/x.claim-s", SNAPSHOTS_PREFIX),
            Bytes::new(),
        )
        .await
        .unwrap();
        counting.take();

        let all = repo.all_generations().await.unwrap();
        let asked = counting.take();
        assert_eq!(asked.lists(), 1, "{asked:?}");
        assert_eq!(asked.0.len(), 1, "{asked:?}");
        assert_eq!(all.len(), 50);
        assert_eq!(all[0].0, "host00");
        assert_eq!(
            all[0].1,
            [
                "2026-01-01T000000Z",
                "2026-01-02T030405Z",
                "2026-01-02T030405Z-2"
            ]
        );
        // The same as a listing per host.
        for (host, names) in &all {
            assert_eq!(&repo.generations(host).await.unwrap(), names);
        }
    }
}
