//! Reading one regular file, or one stream, into chunks.
//!
//! Data regions are found with `lseek(SEEK_DATA/SEEK_HOLE)`, so holes of sparse files are
//! recorded as holes and never read. Each data region is cut with FastCDC; chunks are gathered
//! into batches of about [`BATCH_BYTES`], hashed and compressed in parallel (rayon), then
//! appended to packs in file order (see [`read_file`] for the pipeline). Files are opened with
//! `O_NOATIME` where permitted, so a backup does not change the source's access times.
//!
//! A stream that cannot seek (stdin, a pipe: [`read_stream`]) goes through the same pipeline as
//! one data region of unknown length, read until its end: it is cut as it arrives and never held
//! whole in memory.
//!
//! A stream may instead be split at its zero runs ([`read_stream_holes`]: `--stdin`,
//! `--read-special`): every aligned [`ZERO_BLOCK`] of zeros becomes part of a hole, and the bytes
//! between holes are data regions cut as a file's are. A disk image read from a device or a pipe
//! is then stored, and read back, as sparse as the same image copied to a file with its zero
//! blocks as holes (`cp --sparse=always`), with the same chunk list.

use super::writer::{BlobWriter, Prepared};
use crate::chunklist::{ListBuilder, WrittenList};
use crate::config::ChunkerParams;
use crate::id::BlobKind;
use crate::tree::ChunkRef;
use rayon::prelude::*;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;

/// Raw bytes gathered before a parallel hash+compress round: enough work for every core, small
/// enough to bound memory (two batches in flight per reading thread).
pub const BATCH_BYTES: usize = 16 << 20;

/// Opens a file for reading without updating its access time when allowed.
pub fn open_noatime(path: &Path) -> io::Result<File> {
    let open = |flags| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags | libc::O_NOFOLLOW)
            .open(path)
    };
    match open(libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0),
        r => r,
    }
}

/// Whether a source named on the command line is read as a file with `--read-special`: a block
/// device or a fifo, or a symlink to one (followed, so `/dev/vg0/snap` works). Returns the node's
/// path and metadata. A character device is not: a terminal or `/dev/zero` would never end.
pub fn special_source(path: &Path, m: &std::fs::Metadata) -> Option<(PathBuf, std::fs::Metadata)> {
    use std::os::unix::fs::FileTypeExt;
    let special =
        |m: &std::fs::Metadata| m.file_type().is_block_device() || m.file_type().is_fifo();
    if special(m) {
        return Some((path.to_path_buf(), m.clone()));
    }
    if !m.file_type().is_symlink() {
        return None;
    }
    let real = std::fs::canonicalize(path).ok()?;
    let m = std::fs::symlink_metadata(&real).ok()?;
    special(&m).then_some((real, m))
}

/// Data regions of an open file of `size` bytes, as `(start, end)` pairs.
fn data_regions(f: &File, size: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        // SAFETY: lseek on a valid descriptor has no memory-safety preconditions.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error().raw_os_error();
            if err == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return vec![(0, size)]; // SEEK_DATA unsupported: treat as fully dense
        }
        let data = data as u64;
        if data >= size {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            size
        } else {
            (hole as u64).min(size)
        };
        out.push((data, hole));
        pos = hole;
    }
    out
}

/// Zero runs of a stream ([`read_stream_holes`]) are found in blocks of this size, aligned to the
/// stream's start: the block size of common filesystems and the page size, the granularity at
/// which `cp --sparse=always`, `dd conv=sparse bs=4K` and `fallocate --dig-holes` make holes. So a
/// stream and such a sparse copy of it have the same holes, hence the same chunks. A partial block
/// at the end of the stream counts as a block.
pub const ZERO_BLOCK: usize = 4096;

/// The read-ahead of a [`ZeroSplit`].
const SPLIT_BUF: usize = 1 << 20;

/// Whether every byte of `b` is zero: compared with zeros by `memcmp`, which is vectorised and
/// stops at the first difference (fast in a debug build too).
pub fn is_zero(b: &[u8]) -> bool {
    static ZEROS: [u8; ZERO_BLOCK] = [0; ZERO_BLOCK];
    b.chunks(ZERO_BLOCK).all(|c| c == &ZEROS[..c.len()])
}

/// One `read` of `r` into `buf`, retried when interrupted by a signal (`EINTR`).
pub(crate) fn read_some<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// A stream split at its zero blocks. [`Read`] gives the bytes of the current data region and
/// ends (returns 0) where an all-zero [`ZERO_BLOCK`] starts, or at the stream's end;
/// [`ZeroSplit::next_data`] then skips the zero blocks and says where the next data region
/// starts. Blocks are aligned to the stream's start.
struct ZeroSplit<'a> {
    inner: Box<dyn Read + Send + 'a>,
    buf: Box<[u8]>,
    /// The unconsumed read-ahead is `buf[start..end]`.
    start: usize,
    end: usize,
    /// Bytes from `start` known to be data (whole non-zero blocks, or the stream's last partial
    /// block).
    data: usize,
    /// The stream offset of `buf[start]`.
    at: u64,
    eof: bool,
}

impl<'a> ZeroSplit<'a> {
    fn new(inner: Box<dyn Read + Send + 'a>) -> ZeroSplit<'a> {
        ZeroSplit {
            inner,
            buf: vec![0u8; SPLIT_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            data: 0,
            at: 0,
            eof: false,
        }
    }

    /// Reads ahead until a whole block follows `start`, or the stream ends.
    fn fill(&mut self) -> io::Result<()> {
        if self.end - self.start >= ZERO_BLOCK || self.eof {
            return Ok(());
        }
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        while self.end < ZERO_BLOCK && !self.eof {
            match read_some(&mut self.inner, &mut self.buf[self.end..])? {
                0 => self.eof = true,
                n => self.end += n,
            }
        }
        Ok(())
    }

    /// The length of the block at `start` (short only at the stream's end).
    fn block(&self) -> usize {
        ZERO_BLOCK.min(self.end - self.start)
    }

    /// Skips the zero blocks at the current position (which must be at the end of a data
    /// region). Returns the offset of the next data region, or `None` at the end of the stream
    /// (whose length is then [`ZeroSplit::at`]).
    fn next_data(&mut self) -> io::Result<Option<u64>> {
        loop {
            self.fill()?;
            let n = self.block();
            if n == 0 {
                return Ok(None);
            }
            if !is_zero(&self.buf[self.start..self.start + n]) {
                return Ok(Some(self.at));
            }
            self.start += n;
            self.at += n as u64;
        }
    }
}

impl Read for ZeroSplit<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.data == 0 {
            // Classify the blocks read ahead: data up to the first zero block.
            self.fill()?;
            let mut i = self.start;
            while i < self.end {
                let n = ZERO_BLOCK.min(self.end - i);
                if (n < ZERO_BLOCK && !self.eof) || is_zero(&self.buf[i..i + n]) {
                    break;
                }
                i += n;
            }
            self.data = i - self.start;
        }
        let n = out.len().min(self.data);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        self.data -= n;
        self.at += n as u64;
        Ok(n)
    }
}

/// Where a data region's bytes come from.
enum Source<'a> {
    /// A reader of its own: a file positioned at the region, or a whole stream.
    Reader(Box<dyn Read + Send + 'a>),
    /// The [`Pieces::split`] stream, up to its next zero block.
    Split,
    /// The [`Pieces::seq`] stream, which holds the data regions back to back.
    Seq,
}

/// One piece of a file as the reader produces it.
enum Piece {
    /// A chunk ending at this file offset, stored at this range of its batch's buffer.
    Data(u64, std::ops::Range<usize>),
    /// A hole ending at this offset.
    Hole(u64),
}

/// A batch of pieces and the buffer their data lies in.
struct Batch {
    buf: Vec<u8>,
    pieces: Vec<Piece>,
}

/// Produces a file's (or a stream's) pieces in order, batch by batch: data regions cut by
/// FastCDC, holes between them. Owns its file descriptors, so it can run on another thread than
/// the compressor.
///
/// The data of a batch is read into one buffer and cut there, so a chunk is never copied on its
/// way to the hasher and compressor. (The `fastcdc` crate's `StreamCDC` copies every chunk out
/// of an 8 MiB buffer and shifts the rest down, about 8 bytes moved per byte read: 7% of an
/// ingest's cycles.) A chunk is cut where `StreamCDC` would cut it (tested below): when at least
/// `max` bytes follow its start in the buffer, or the region ends, the cutter sees what
/// `StreamCDC` sees; with fewer (but at least `avg`) bytes, a cut the cutter finds before the
/// end of the buffer is the same cut, as the cutter looks no further than the cut it returns.
/// The bytes after the last cut are carried into the next batch's buffer: about half a chunk.
/// (Cutting only with `max` bytes ahead carried 7.5 MiB of every 16 MiB batch on average with
/// 8 MiB `max`, so half of every batch was copied twice and a batch held 8 MiB of chunks.)
struct Pieces<'a> {
    /// The file whose regions are read; `None` for a stream (its only region is `current`).
    file: Option<File>,
    regions: std::vec::IntoIter<(u64, u64)>,
    /// A stream split at its zero blocks: its data regions and holes, found as it is read.
    split: Option<ZeroSplit<'a>>,
    /// A stream of `regions`' data back to back (a sparse tar member).
    seq: Option<Box<dyn Read + Send + 'a>>,
    /// The data region being read: its reader (positioned) and the bytes it has left
    /// (`u64::MAX` for a stream: until its end).
    current: Option<(Source<'a>, u64)>,
    /// Region bytes read but not yet cut.
    carry: Vec<u8>,
    chunker: ChunkerParams,
    batch_bytes: usize,
    /// The file's size; `None` for a stream, whose length is known only at its end.
    size: Option<u64>,
    pos: u64,
    read: u64,
    shrank: bool,
    done: bool,
}

impl<'a> Pieces<'a> {
    /// No regions and no reader yet: what every constructor starts from.
    fn empty(chunker: ChunkerParams, batch_bytes: usize) -> Pieces<'a> {
        Pieces {
            file: None,
            regions: Vec::new().into_iter(),
            split: None,
            seq: None,
            current: None,
            carry: Vec::new(),
            chunker,
            // Room for at least one cut beyond the carried bytes.
            batch_bytes: batch_bytes.max(2 * chunker.max as usize),
            size: None,
            pos: 0,
            read: 0,
            shrank: false,
            done: false,
        }
    }

    fn new(file: File, size: u64, chunker: ChunkerParams, batch_bytes: usize) -> Pieces<'a> {
        Pieces {
            regions: data_regions(&file, size).into_iter(),
            file: Some(file),
            size: Some(size),
            ..Pieces::empty(chunker, batch_bytes)
        }
    }

    /// Pieces of a stream: one data region from its first byte to its end, no holes.
    fn stream(
        reader: Box<dyn Read + Send + 'a>,
        chunker: ChunkerParams,
        batch_bytes: usize,
    ) -> Pieces<'a> {
        Pieces {
            current: Some((Source::Reader(reader), u64::MAX)),
            ..Pieces::empty(chunker, batch_bytes)
        }
    }

    /// Pieces of a stream split at its zero blocks ([`ZeroSplit`]): holes where they are, data
    /// regions between them.
    fn stream_holes(
        reader: Box<dyn Read + Send + 'a>,
        chunker: ChunkerParams,
        batch_bytes: usize,
    ) -> Pieces<'a> {
        Pieces {
            split: Some(ZeroSplit::new(reader)),
            ..Pieces::empty(chunker, batch_bytes)
        }
    }

    /// Pieces of a file of `size` bytes whose data `regions` (in order, not overlapping) come
    /// back to back from `reader`; the rest is holes.
    fn mapped(
        reader: Box<dyn Read + Send + 'a>,
        regions: Vec<(u64, u64)>,
        size: u64,
        chunker: ChunkerParams,
        batch_bytes: usize,
    ) -> Pieces<'a> {
        Pieces {
            seq: Some(reader),
            regions: regions.into_iter(),
            size: Some(size),
            ..Pieces::empty(chunker, batch_bytes)
        }
    }

    /// The next pieces, about `batch_bytes` of data; empty at the end.
    fn next_batch(&mut self) -> io::Result<Batch> {
        // A small file gets a small buffer: its data is at most what lies past `pos`.
        let cap = match self.size {
            Some(size) => (self.batch_bytes as u64).min(size.saturating_sub(self.pos)),
            None => self.batch_bytes as u64,
        };
        let mut out = Batch {
            buf: Vec::with_capacity(cap as usize),
            pieces: Vec::new(),
        };
        while out.buf.len() < self.batch_bytes / 2 && !self.done {
            if let Some((src, left)) = &mut self.current {
                // Fill the buffer after what the last batch left over, then cut.
                let start = out.buf.len();
                out.buf.append(&mut self.carry);
                let want = (self.batch_bytes - out.buf.len()) as u64;
                let mut none = io::empty();
                let f: &mut dyn Read = match (src, &mut self.split, &mut self.seq) {
                    (Source::Reader(f), _, _) => f,
                    (Source::Split, Some(s), _) => s,
                    (Source::Seq, _, Some(s)) => s,
                    // Never: a split or mapped stream has its reader.
                    (Source::Split | Source::Seq, ..) => &mut none,
                };
                let n = f.take(want.min(*left)).read_to_end(&mut out.buf)? as u64;
                self.read += n;
                *left -= n;
                let ended = *left == 0 || n < want.min(*left + n);
                if ended && *left > 0 && self.size.is_some() {
                    self.shrank = true; // the file shrank while we read it
                    self.done = true;
                }
                let c = &self.chunker;
                let (min, avg, max) = (c.min as usize, c.avg as usize, c.max as usize);
                let mut at = start;
                while at < out.buf.len() {
                    let left = out.buf.len() - at;
                    // Short of `max` bytes, a cut is final only if the cutter found it before
                    // the end of the buffer and saw the same `avg` split point it would see
                    // with more data: only then would `StreamCDC` cut there too.
                    let complete = ended || left >= max;
                    if !complete && left < avg.max(min + 1) {
                        break;
                    }
                    let len = if left <= min {
                        left // the region's small tail: one chunk
                    } else {
                        let cdc = fastcdc::v2020::FastCDC::new(&out.buf[at..], c.min, c.avg, c.max);
                        cdc.cut(0, left).1
                    };
                    if !complete && len >= left {
                        break; // no cut in what was read: carry it into the next batch
                    }
                    self.pos += len as u64;
                    out.pieces.push(Piece::Data(self.pos, at..at + len));
                    at += len;
                }
                if ended {
                    self.current = None;
                } else {
                    self.carry = out.buf.split_off(at);
                }
                continue;
            }
            if let Some(split) = &mut self.split {
                // The zeros up to the next data region (or the end) are a hole; they were read.
                let next = split.next_data()?;
                let start = next.unwrap_or(split.at);
                if start > self.pos {
                    out.pieces.push(Piece::Hole(start));
                    self.read += start - self.pos;
                    self.pos = start;
                }
                match next {
                    Some(_) => self.current = Some((Source::Split, u64::MAX)),
                    None => self.done = true,
                }
                continue;
            }
            let Some((start, end)) = self.regions.next() else {
                // Everything after the last data region up to the size is a hole.
                if let Some(size) = self.size.filter(|&s| !self.shrank && self.pos < s) {
                    out.pieces.push(Piece::Hole(size));
                    self.pos = size;
                }
                self.done = true;
                break;
            };
            if start > self.pos {
                out.pieces.push(Piece::Hole(start));
            }
            self.pos = start;
            let Some(file) = &self.file else {
                if self.seq.is_some() {
                    self.current = Some((Source::Seq, end - start));
                    continue;
                }
                // A stream has no regions: it ended above.
                self.done = true;
                break;
            };
            let mut f = file.try_clone()?;
            f.seek(SeekFrom::Start(start))?;
            self.current = Some((Source::Reader(Box::new(f)), end - start));
        }
        Ok(out)
    }
}

/// Reads, chunks and stores a file. Returns its chunk list and the bytes read. A long list is
/// paged as it is built (see [`crate::chunklist`]): full pages are stored as they fill.
///
/// A file of one batch (almost every file) is hashed and compressed in parallel on the calling
/// thread's pool and appended. A larger file is pipelined: each batch's chunks are handed to
/// `hashers` as soon as the batch is read, and the calling thread then reads the next batch and
/// waits only for the batch before it. (The waiting must not happen on the pool that runs the
/// hashing: a walk thread blocked there holds chunks others could run, and with every walk
/// thread waiting the ingest deadlocks.) So `hashers` always has the next batch's chunks queued
/// when a batch's last chunk is being compressed; with a barrier per batch (read and compress,
/// wait for both) about a tenth of two cores stood idle on a single large file. At most two
/// batches are in memory per file, plus the one being read.
pub fn read_file(
    path: &Path,
    size: u64,
    chunker: &ChunkerParams,
    w: &Arc<BlobWriter>,
    hashers: &rayon::ThreadPool,
) -> io::Result<(WrittenList, u64)> {
    let f = open_noatime(path)?;
    read_pieces(Pieces::new(f, size, *chunker, BATCH_BYTES), w, hashers)
}

/// Reads, chunks and stores a stream that cannot seek (stdin, a pipe) to its end, in bounded
/// memory, through the pipeline of [`read_file`]. Returns its chunk list (no holes) and the
/// bytes read. The caller must treat it as a file larger than a batch (hold the walker's
/// large-file permit): its length is not known in advance.
pub fn read_stream(
    reader: Box<dyn Read + Send + '_>,
    chunker: &ChunkerParams,
    w: &Arc<BlobWriter>,
    hashers: &rayon::ThreadPool,
) -> io::Result<(WrittenList, u64)> {
    read_pieces(Pieces::stream(reader, *chunker, BATCH_BYTES), w, hashers)
}

/// [`read_stream`], with the stream's zero runs stored as holes: every aligned [`ZERO_BLOCK`]
/// of zeros (and a last partial block of zeros) is part of a hole, never hashed nor stored, and
/// the data between holes is cut region by region as a sparse file's is. The bytes read count
/// the zeros too.
pub fn read_stream_holes(
    reader: Box<dyn Read + Send + '_>,
    chunker: &ChunkerParams,
    w: &Arc<BlobWriter>,
    hashers: &rayon::ThreadPool,
) -> io::Result<(WrittenList, u64)> {
    let pieces = Pieces::stream_holes(reader, *chunker, BATCH_BYTES);
    read_pieces(pieces, w, hashers)
}

/// Reads, chunks and stores a sparse file of `size` bytes whose data `regions` (`(start, end)`,
/// in order, not overlapping, within `size`) come back to back from `reader`, as a sparse tar
/// member's do: the gaps are holes, and each region is cut as a sparse file's data region is, so
/// the member and the file it was made from have the same chunks. If `reader` ends early, the
/// list ends at the bytes read.
pub fn read_mapped(
    reader: Box<dyn Read + Send + '_>,
    regions: Vec<(u64, u64)>,
    size: u64,
    chunker: &ChunkerParams,
    w: &Arc<BlobWriter>,
    hashers: &rayon::ThreadPool,
) -> io::Result<(WrittenList, u64)> {
    let pieces = Pieces::mapped(reader, regions, size, *chunker, BATCH_BYTES);
    read_pieces(pieces, w, hashers)
}

/// The pipeline of [`read_file`] over any pieces.
fn read_pieces(
    mut src: Pieces<'_>,
    w: &Arc<BlobWriter>,
    hashers: &rayon::ThreadPool,
) -> io::Result<(WrittenList, u64)> {
    let mut chunks = w.list_builder();
    let first = src.next_batch()?;
    // Only a file known to fit one batch is hashed with a rayon wait: a larger one (it shrank
    // while read) or a stream holds the walker's large-file permit, and must not wait inside
    // rayon; it goes through the pipeline below, which waits on channels only.
    if src.done && src.size.is_some_and(|s| s <= BATCH_BYTES as u64) {
        let prep = |p: &Piece| match p {
            Piece::Data(_, r) => Some(w.prepare(&first.buf[r.clone()])),
            Piece::Hole(_) => None,
        };
        let prepared: Vec<_> = first.pieces.par_iter().map(prep).collect();
        store_batch(w, &first, prepared, &mut chunks)?;
        return Ok((finish(w, chunks)?, src.read));
    }
    // The hashing jobs own what they use (`spawn`, not a scope), so this thread waits on its
    // channels only: a rayon wait here could run other walk work and deadlock (see the walker).
    let mut pending: std::collections::VecDeque<(Arc<Batch>, Receiver<Ready>)> = Default::default();
    let mut batch = first;
    loop {
        if !batch.pieces.is_empty() {
            let batch = Arc::new(batch);
            let (tx, rx) = mpsc::channel();
            for (i, p) in batch.pieces.iter().enumerate() {
                if let Piece::Data(_, r) = p {
                    let (b, tx, r, w) = (batch.clone(), tx.clone(), r.clone(), w.clone());
                    // A send fails only if the reader gave up on an error: nothing to do.
                    hashers.spawn(move || drop(tx.send((i, w.prepare(&b.buf[r])))));
                }
            }
            pending.push_back((batch, rx));
        }
        let more = !src.done;
        while pending.len() > usize::from(more) {
            let Some((batch, rx)) = pending.pop_front() else {
                break;
            };
            // The channel ends when every job of the batch has finished (each holds a sender).
            let mut prepared: Vec<Option<Prepared>> = batch.pieces.iter().map(|_| None).collect();
            for (i, p) in rx {
                prepared[i] = Some(p);
            }
            let lost = (batch.pieces.iter().zip(&prepared))
                .any(|(piece, p)| matches!(piece, Piece::Data(..)) && p.is_none());
            if lost {
                // A hashing job panicked: never store a chunk as a hole.
                return Err(io::Error::other("a hashing task failed"));
            }
            store_batch(w, &batch, prepared, &mut chunks)?;
        }
        if !more {
            break;
        }
        batch = src.next_batch()?;
    }
    Ok((finish(w, chunks)?, src.read))
}

/// The finished list of a file, its last page and index blobs stored.
fn finish(w: &BlobWriter, chunks: ListBuilder) -> io::Result<WrittenList> {
    chunks
        .finish(&mut |b: &[u8]| w.store_tree(b))
        .map_err(io::Error::other)
}

/// A chunk prepared by the pool: its index in the batch and the result.
type Ready = (usize, Prepared);

/// Appends a batch's new chunks to the packs, in file order, and its pieces to the chunk list.
fn store_batch(
    w: &BlobWriter,
    batch: &Batch,
    prepared: Vec<Option<Prepared>>,
    chunks: &mut ListBuilder,
) -> io::Result<()> {
    let new: Vec<_> = prepared.iter().flatten().collect();
    w.append_refs(BlobKind::Data, &new)
        .map_err(io::Error::other)?;
    // Within large files and big directories too: after a crash or a store outage, at most
    // a checkpoint's worth of uploads is redone.
    w.maybe_checkpoint().map_err(io::Error::other)?;
    let mut store = |b: &[u8]| w.store_tree(b);
    for (piece, p) in batch.pieces.iter().zip(&prepared) {
        let c = match (piece, p) {
            (Piece::Data(end, _), Some(p)) => ChunkRef {
                end: *end,
                id: Some(p.id),
            },
            (Piece::Hole(end), _) | (Piece::Data(end, _), None) => ChunkRef {
                end: *end,
                id: None,
            },
        };
        chunks.push(c, &mut store).map_err(io::Error::other)?;
    }
    Ok(())
}

/// Lists a directory's entry names (without `.` and `..`), opening it with `O_NOATIME` where
/// permitted so the walk does not change the source's directory access times.
pub fn list_dir(path: &Path) -> io::Result<Vec<io::Result<std::ffi::OsString>>> {
    use nix::dir::Dir;
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    use std::os::unix::ffi::OsStrExt;
    let base = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    let dir = match Dir::open(path, base | OFlag::O_NOATIME, Mode::empty()) {
        Err(nix::errno::Errno::EPERM) => Dir::open(path, base, Mode::empty()),
        r => r,
    }
    .map_err(io::Error::from)?;
    let mut out = Vec::new();
    for item in dir {
        match item {
            Ok(e) => {
                let name = e.file_name().to_bytes();
                if name != b"." && name != b".." {
                    out.push(Ok(std::ffi::OsStr::from_bytes(name).to_owned()));
                }
            }
            Err(e) => {
                out.push(Err(io::Error::from(e)));
                break;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ChunkerAlgorithm;
    use std::io::Write;

    fn small_chunker() -> ChunkerParams {
        ChunkerParams {
            algorithm: ChunkerAlgorithm::Fastcdc2020,
            min: 4096,
            avg: 16384,
            max: 65536,
        }
    }

    /// Every piece `p` gives, as (end, is data), each chunk's bytes checked against `data` at
    /// its place, and the bytes it read.
    fn drain(mut p: Pieces<'_>, data: &[u8], what: &str) -> (Vec<(u64, bool)>, u64) {
        let mut out = Vec::new();
        loop {
            let b = p.next_batch().unwrap();
            if b.pieces.is_empty() {
                break;
            }
            for piece in &b.pieces {
                match piece {
                    Piece::Data(end, r) => {
                        let ok = b.buf[r.clone()] == data[(*end as usize - r.len())..*end as usize];
                        assert!(ok, "{what}: wrong bytes for the chunk ending at {end}");
                        out.push((*end, true));
                    }
                    Piece::Hole(end) => out.push((*end, false)),
                }
            }
        }
        assert!(p.done, "{what}");
        (out, p.read)
    }

    /// Chunk ends of a dense file or stream; panics on a hole.
    fn dense_ends(p: Pieces<'_>, data: &[u8], what: &str) -> Vec<u64> {
        let (pieces, read) = drain(p, data, what);
        assert_eq!(read, data.len() as u64, "{what}: bytes read");
        assert!(
            pieces.iter().all(|(_, d)| *d),
            "{what}: a hole in dense data"
        );
        pieces.into_iter().map(|(end, _)| end).collect()
    }

    /// Cut points over a batch buffer are those of `fastcdc`'s `StreamCDC` over the whole file,
    /// whatever the batch size, and holes and small regions are kept.
    #[test]
    fn batches_cut_where_the_stream_chunker_does() {
        let chunker = small_chunker();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut data = crate::testing::random_bytes(3, 3_000_000);
        // Some repetitive stretches, so cuts also fall at `max`.
        data[100_000..400_000].fill(7);
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&data)
            .unwrap();
        let stream: Vec<u64> =
            fastcdc::v2020::StreamCDC::new(&data[..], chunker.min, chunker.avg, chunker.max)
                .map(|c| {
                    let c = c.unwrap();
                    c.offset + c.length as u64
                })
                .collect();
        for batch in [1, 150_000, 200_000, 1 << 20, 16 << 20] {
            let f = std::fs::File::open(&path).unwrap();
            let p = Pieces::new(f, data.len() as u64, chunker, batch);
            let what = format!("file, batch size {batch}");
            assert_eq!(dense_ends(p, &data, &what), stream, "{what}");
        }
        // A stream (here one that gives at most 1000 bytes a read, as a pipe gives a few KiB)
        // is cut at the same points, without holes, and its length is found at its end.
        for batch in [1, 200_000, 1 << 20] {
            let trickle = Trickle(std::io::Cursor::new(data.clone()));
            let p = Pieces::stream(Box::new(trickle), chunker, batch);
            let what = format!("stream, batch size {batch}");
            assert_eq!(dense_ends(p, &data, &what), stream, "{what}");
        }
        let mut empty = Pieces::stream(Box::new(std::io::empty()), chunker, 1 << 20);
        assert!(empty.next_batch().unwrap().pieces.is_empty());
        assert!(empty.done);
    }

    /// A reader that returns at most 1000 bytes a call.
    struct Trickle(std::io::Cursor<Vec<u8>>);

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(1000);
            self.0.read(&mut buf[..n])
        }
    }

    #[test]
    fn is_zero_finds_any_nonzero_byte() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 4096]));
        for at in [0, 1, 511, 512, 4095] {
            let mut b = [0u8; 4096];
            b[at] = 1;
            assert!(!is_zero(&b), "byte {at}");
        }
    }

    /// The holes of a stream split at its zero blocks: `(start, end)` of each.
    fn holes_of(pieces: &[(u64, bool)]) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut start = 0;
        for &(end, data) in pieces {
            if !data {
                out.push((start, end));
            }
            start = end;
        }
        out
    }

    /// A stream split at its zero blocks: holes exactly at the aligned 4 KiB blocks of zeros
    /// (a short or unaligned zero run stays data; a last partial block of zeros is a hole),
    /// whatever the reads and batches; the same pieces as a sparse file with holes there.
    #[test]
    fn zero_blocks_of_a_stream_become_holes() {
        let chunker = small_chunker();
        let mut data = crate::testing::random_bytes(5, 3_000_000);
        data[8192..8192 + 3 * 4096].fill(0); // aligned: a hole
        data[50_000..53_000].fill(0); // no whole aligned block: data
        data[100_000..200_000].fill(0); // a hole from 102 400 to 196 608
        data[2_990_000..].fill(0); // a hole from 2 990 080 to the end (a partial last block)
        let want = vec![(8192, 20480), (102_400, 196_608), (2_990_080, 3_000_000)];
        let mut seen = None;
        for batch in [1, 150_000, 1 << 20, 16 << 20] {
            for trickle in [false, true] {
                let cursor = std::io::Cursor::new(data.clone());
                let reader: Box<dyn Read + Send> = if trickle {
                    Box::new(Trickle(cursor))
                } else {
                    Box::new(cursor)
                };
                let what = format!("batch {batch}, trickle {trickle}");
                let p = Pieces::stream_holes(reader, chunker, batch);
                let (pieces, read) = drain(p, &data, &what);
                assert_eq!(read, data.len() as u64, "{what}: zeros count as read");
                assert_eq!(holes_of(&pieces), want, "{what}");
                assert_eq!(pieces.last(), Some(&(3_000_000, false)), "{what}");
                match &seen {
                    None => seen = Some(pieces),
                    Some(s) => assert_eq!(&pieces, s, "{what}: same pieces"),
                }
            }
        }
        // A file on disk with holes at those blocks (data written, holes skipped) reads as the
        // same pieces, where the filesystem reports holes (SEEK_DATA) at block granularity.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let mut f = std::fs::File::create(&path).unwrap();
        let mut at = 0;
        for (start, end) in want.iter().copied().chain([(3_000_000, 3_000_000)]) {
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&data[at as usize..start as usize]).unwrap();
            at = end;
        }
        f.set_len(3_000_000).unwrap();
        drop(f);
        let f = std::fs::File::open(&path).unwrap();
        if data_regions(&f, 3_000_000).len() != 3 {
            println!("note: this filesystem does not report holes; file comparison skipped");
            return;
        }
        let p = Pieces::new(f, 3_000_000, chunker, 1 << 20);
        let (pieces, read) = drain(p, &data, "sparse file");
        let seen = seen.unwrap();
        assert_eq!(pieces, seen, "sparse file");
        // The same data regions back to back, as a sparse tar member holds them: the same.
        let regions = vec![(0, 8192), (20480, 102_400), (196_608, 2_990_080)];
        let packed: Vec<u8> = (regions.iter())
            .flat_map(|&(s, e)| data[s as usize..e as usize].to_vec())
            .collect();
        let cursor = Box::new(std::io::Cursor::new(packed));
        let p = Pieces::mapped(cursor, regions, 3_000_000, chunker, 1 << 20);
        assert_eq!(drain(p, &data, "mapped").0, seen, "mapped");
        // A file's holes are not read.
        let holes: u64 = want.iter().map(|(s, e)| e - s).sum();
        assert_eq!(read, 3_000_000 - holes);
    }

    /// Only zeros: one hole; zeros then data: a hole then data; nothing: no pieces.
    #[test]
    fn all_zero_and_empty_streams() {
        let chunker = small_chunker();
        let zeros = vec![0u8; 1 << 20];
        let p = Pieces::stream_holes(
            Box::new(std::io::Cursor::new(zeros.clone())),
            chunker,
            1 << 16,
        );
        assert_eq!(drain(p, &zeros, "zeros"), (vec![(1 << 20, false)], 1 << 20));
        let mut lead = vec![0u8; 10_000];
        lead.extend_from_slice(b"data");
        let p = Pieces::stream_holes(
            Box::new(std::io::Cursor::new(lead.clone())),
            chunker,
            1 << 16,
        );
        let want = vec![(8192, false), (10_004, true)];
        assert_eq!(drain(p, &lead, "lead"), (want, 10_004));
        let p = Pieces::stream_holes(Box::new(std::io::empty()), chunker, 1 << 16);
        assert_eq!(drain(p, &[], "empty"), (vec![], 0));
    }
}
