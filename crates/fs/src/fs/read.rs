//! File reads: the read state kept per inode, reads, holes and `lseek`.

use super::*;

impl BacktreeFs {
    /// The file a resolved node names, for `open`.
    pub(super) fn file_node(
        resolved: (Node, Option<EntryRef>),
    ) -> Result<(Arc<GenCtx>, Arc<[u8]>, EntryRef)> {
        let (gen, path, entry) = match resolved {
            (Node::Entry { gen, path, .. }, Some(e)) => (gen, path, e),
            (Node::Latest(_), _) => return Err(FsError::Invalid),
            _ => return Err(FsError::IsDir),
        };
        match entry.kind {
            Kind::File => Ok((gen, path, entry)),
            Kind::Dir => Err(FsError::IsDir),
            _ => Err(FsError::Invalid),
        }
    }

    pub(super) fn new_file(
        &self,
        ino: u64,
        gen: Arc<GenCtx>,
        path: Arc<[u8]>,
        chunks: ChunkList,
    ) -> Arc<OpenFile> {
        let f = Arc::new(OpenFile {
            gen,
            path,
            chunks: Arc::new(chunks),
            seq: Mutex::new(vec![SeqState::default()]),
        });
        lock(&self.files).put(ino, f.clone());
        f
    }

    /// A file's read state without waiting: kept, or made from an entry that carries its chunk
    /// list (files of up to 64 chunks). `None` if the list must be fetched (then
    /// [`file`](Self::file) is used). Making it starts a directory read-ahead.
    pub(super) fn file_cached(&self, ino: u64) -> Option<Result<Arc<OpenFile>>> {
        if let Some(f) = lock(&self.files).get(&ino) {
            return Some(Ok(f.clone()));
        }
        let (gen, path, entry) = match self.resolve_cached(ino)?.and_then(Self::file_node) {
            Ok(v) => v,
            Err(e) => return Some(Err(e)),
        };
        if entry.chunks.is_none() && entry.chunk_list.is_some() {
            return None;
        }
        let chunks = entry.chunks.clone().unwrap_or_default();
        self.dir_read_ahead(&entry);
        Some(Ok(self.new_file(ino, gen, path, chunks)))
    }

    /// A file's read state, fetching its chunk list if need be.
    pub(super) async fn file(&self, ino: u64) -> Result<Arc<OpenFile>> {
        if let Some(f) = self.file_cached(ino) {
            return f;
        }
        let (gen, path, entry) = Self::file_node(self.resolve(ino).await?)?;
        let chunks = self.repo.chunk_list(&entry).await.map_err(|e| {
            self.io(
                format!(
                    "{}/{}/{}: chunk list",
                    gen.host,
                    gen.name,
                    String::from_utf8_lossy(&path)
                ),
                e,
            )
        })?;
        self.dir_read_ahead(&entry);
        Ok(self.new_file(ino, gen, path, chunks))
    }

    /// Checks that `ino` is a regular file that can be read, without waiting; `None` if that
    /// needs the store (then [`open`](Self::open) is used). Reads need no open first.
    pub fn open_cached(&self, ino: u64) -> Option<Result<()>> {
        self.file_cached(ino).map(|r| r.map(|_| ()))
    }

    /// Checks that `ino` is a regular file that can be read, and prepares its reading.
    pub async fn open(&self, ino: u64) -> Result<()> {
        self.file(ino).await.map(|_| ())
    }

    /// Serves a read entirely from cached chunks, or `None` if any chunk is missing (then
    /// [`read`](Self::read) must be used). Cheap enough to run on the FUSE thread.
    pub fn read_cached(&self, ino: u64, offset: u64, size: u32) -> Option<Bytes> {
        let h = self.file_cached(ino)?.ok()?;
        let list = &h.chunks;
        let end = offset.saturating_add(size as u64).min(list.size());
        let mut parts: Vec<Bytes> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let i = list.find(pos)?;
            let (cs, ce) = (list.start(i), list.0[i].end);
            let take = ce.min(end);
            parts.push(match &list.0[i].id {
                None => zeros((take - pos) as usize),
                Some(id) => {
                    let whole = pos == cs && take == ce;
                    let cached = if whole {
                        self.cache.take(id)
                    } else {
                        self.cache.peek(id)
                    };
                    let data = cached.or_else(|| self.decode_inline(id, !whole))?;
                    if take - cs > data.len() as u64 {
                        return None;
                    }
                    data.slice((pos - cs) as usize..(take - cs) as usize)
                }
            });
            pos = take;
        }
        self.note_read(&h, offset, end);
        Some(concat(parts))
    }

    /// Reads `size` bytes at `offset` (short at end of file), fetching what is not cached.
    pub async fn read(self: &Arc<Self>, ino: u64, offset: u64, size: u32) -> Result<Bytes> {
        let h = self.file(ino).await?;
        let list = h.chunks.clone();
        let end = offset.saturating_add(size as u64).min(list.size());
        self.note_read(&h, offset, end);
        let mut parts: Vec<Bytes> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let i = list.find(pos).ok_or(FsError::Invalid)?;
            let (cs, ce) = (list.start(i), list.0[i].end);
            let take = ce.min(end);
            parts.push(match &list.0[i].id {
                None => zeros((take - pos) as usize),
                Some(id) => {
                    let data = self.chunk(&h, id, !(pos == cs && take == ce)).await?;
                    if data.len() as u64 != ce - cs {
                        return Err(self.io(
                            format!(
                                "{}/{}/{}: chunk {id}",
                                h.gen.host,
                                h.gen.name,
                                String::from_utf8_lossy(&h.path)
                            ),
                            "size differs from the file's chunk list",
                        ));
                    }
                    data.slice((pos - cs) as usize..(take - cs) as usize)
                }
            });
            pos = take;
        }
        Ok(concat(parts))
    }

    /// A small chunk whose stored bytes are in a pack window, decoded and verified here on the
    /// calling (FUSE) thread and cached; `None` if it is not there or too large to decode
    /// inline. A chunk that fails verification is left to [`read`](Self::read), which reports it.
    /// `keep`: whether to cache it (not when this read consumes it whole).
    pub(super) fn decode_inline(&self, id: &Id, keep: bool) -> Option<Bytes> {
        // With --cache-dir, chunks go through the cache's fetch, which also writes them to disk.
        if self.opts.cache_dir.is_some() {
            return None;
        }
        let s = small_in_window(&self.packs, id)?;
        let data = Bytes::from(s.decode(id, "").ok()?);
        if keep {
            self.cache.put(*id, data.clone());
        }
        Some(data)
    }

    pub(super) async fn chunk(&self, h: &OpenFile, id: &Id, keep: bool) -> Result<Bytes> {
        let packs = &self.packs;
        self.cache
            .get(id, keep, || fetch_chunk(packs, *id))
            .await
            .map_err(|e| {
                self.io(
                    format!(
                        "{}/{}/{}",
                        h.gen.host,
                        h.gen.name,
                        String::from_utf8_lossy(&h.path)
                    ),
                    e,
                )
            })
    }

    /// `lseek` with SEEK_DATA (3) or SEEK_HOLE (4), without waiting; `None` if the file's
    /// chunk list must be fetched (then [`lseek`](Self::lseek) is used).
    pub fn lseek_cached(&self, ino: u64, offset: i64, whence: i32) -> Option<Result<i64>> {
        Some(
            self.file_cached(ino)?
                .and_then(|h| Self::seek(&h, offset, whence)),
        )
    }

    /// `lseek` with SEEK_DATA (3) or SEEK_HOLE (4).
    pub async fn lseek(&self, ino: u64, offset: i64, whence: i32) -> Result<i64> {
        let h = self.file(ino).await?;
        Self::seek(&h, offset, whence)
    }

    pub(super) fn seek(h: &OpenFile, offset: i64, whence: i32) -> Result<i64> {
        if offset < 0 {
            return Err(FsError::Invalid);
        }
        let data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return Err(FsError::Invalid),
        };
        h.chunks
            .seek(offset as u64, data)
            .map(|o| o as i64)
            .ok_or(FsError::NoXio)
    }

    pub fn statfs(&self) -> (u64, u64, u32) {
        (0, 0, 255)
    }
}

/// Fetches, decodes and verifies a data chunk. Decoding up to 8 MiB is CPU work: a large chunk
/// is decoded on the blocking pool, off the async workers. Errors name the blob and its pack.
pub(super) async fn fetch_chunk(packs: &PackReader, id: Id) -> std::result::Result<Bytes, String> {
    let (stored, loc) = packs
        .stored(&id, BlobKind::Data)
        .await
        .map_err(|e| with_blob(&id, e.to_string()))?;
    let what = format!("blob {id} in pack {}", loc.pack_key());
    let raw = if stored.raw_len <= INLINE_DECODE {
        stored.decode(&id, &what)
    } else {
        tokio::task::spawn_blocking(move || stored.decode(&id, &what))
            .await
            .map_err(|e| format!("blob {id}: decoding task failed: {e}"))?
    };
    raw.map(Bytes::from).map_err(|e| e.to_string())
}

/// An error message that names the blob it concerns.
pub(super) fn with_blob(id: &Id, msg: String) -> String {
    if msg.contains(&id.to_hex()) {
        msg
    } else {
        format!("blob {id}: {msg}")
    }
}
