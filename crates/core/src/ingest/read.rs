//! Reading one regular file into chunks.
//!
//! Data regions are found with `lseek(SEEK_DATA/SEEK_HOLE)`, so holes of sparse files are
//! recorded as holes and never read. Each data region is cut with FastCDC; chunks are gathered
//! into batches of about [`BATCH_BYTES`], hashed and compressed in parallel (rayon), then
//! appended to packs in file order. Files are opened with `O_NOATIME` where permitted, so a
//! backup does not change the source's access times.

use super::writer::BlobWriter;
use crate::config::ChunkerParams;
use crate::id::BlobKind;
use crate::tree::{ChunkList, ChunkRef};
use rayon::prelude::*;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

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

/// One piece of a file as the reader produces it.
enum Piece {
    /// A chunk ending at this offset.
    Data(u64, Vec<u8>),
    /// A hole ending at this offset.
    Hole(u64),
}

/// Produces a file's pieces in order, batch by batch: data regions cut by FastCDC, holes between
/// them. Owns its file descriptors, so it can run on another thread than the compressor.
struct Pieces {
    file: File,
    regions: std::vec::IntoIter<(u64, u64)>,
    current: Option<(u64, fastcdc::v2020::StreamCDC<io::Take<File>>)>,
    chunker: ChunkerParams,
    size: u64,
    pos: u64,
    read: u64,
    shrank: bool,
    done: bool,
}

impl Pieces {
    fn new(file: File, size: u64, chunker: ChunkerParams) -> Pieces {
        let regions = data_regions(&file, size).into_iter();
        Pieces {
            file,
            regions,
            current: None,
            chunker,
            size,
            pos: 0,
            read: 0,
            shrank: false,
            done: false,
        }
    }

    /// The next pieces, about `BATCH_BYTES` of data; empty at the end.
    fn next_batch(&mut self) -> io::Result<Vec<Piece>> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while bytes < BATCH_BYTES && !self.done {
            if let Some((end, cdc)) = &mut self.current {
                let end = *end;
                match cdc.next() {
                    Some(c) => {
                        let c = c.map_err(|e| match e {
                            fastcdc::v2020::Error::IoError(e) => e,
                            other => io::Error::other(other.to_string()),
                        })?;
                        self.pos += c.length as u64;
                        self.read += c.length as u64;
                        bytes += c.length;
                        out.push(Piece::Data(self.pos, c.data));
                    }
                    None => {
                        self.current = None;
                        if self.pos < end {
                            self.shrank = true; // the file shrank while we read it
                            self.done = true;
                        }
                    }
                }
                continue;
            }
            let Some((start, end)) = self.regions.next() else {
                // Everything after the last data region up to the size is a hole.
                if !self.shrank && self.pos < self.size {
                    out.push(Piece::Hole(self.size));
                    self.pos = self.size;
                }
                self.done = true;
                break;
            };
            if start > self.pos {
                out.push(Piece::Hole(start));
            }
            self.pos = start;
            let len = end - start;
            let mut f = self.file.try_clone()?;
            f.seek(SeekFrom::Start(start))?;
            if len <= self.chunker.min as u64 {
                // Small region: one chunk, no chunker buffer needed.
                let mut buf = Vec::with_capacity(len as usize);
                f.take(len).read_to_end(&mut buf)?;
                let n = buf.len() as u64;
                self.pos += n;
                self.read += n;
                bytes += buf.len();
                if n > 0 {
                    out.push(Piece::Data(self.pos, buf));
                }
                if n < len {
                    self.shrank = true;
                    self.done = true;
                }
            } else {
                let c = &self.chunker;
                self.current = Some((
                    end,
                    fastcdc::v2020::StreamCDC::new(f.take(len), c.min, c.avg, c.max),
                ));
            }
        }
        Ok(out)
    }
}

/// Reads, chunks and stores a file. Returns its chunk list and the bytes read.
///
/// Reading and chunking the next batch runs while the previous batch is hashed and compressed
/// on the other cores (`rayon::join`), so neither the disk nor the CPUs wait for each other;
/// at most two batches are in memory per file.
pub fn read_file(
    path: &Path,
    size: u64,
    chunker: &ChunkerParams,
    w: &BlobWriter,
) -> io::Result<(ChunkList, u64)> {
    let f = open_noatime(path)?;
    let mut src = Pieces::new(f, size, *chunker);
    let mut chunks: Vec<ChunkRef> = Vec::new();
    let mut batch = src.next_batch()?;
    while !batch.is_empty() {
        let (prepared, next) = rayon::join(
            || {
                batch
                    .par_iter()
                    .map(|p| match p {
                        Piece::Data(_, d) => Some(w.prepare(d)),
                        Piece::Hole(_) => None,
                    })
                    .collect::<Vec<_>>()
            },
            || src.next_batch(),
        );
        let new: Vec<_> = prepared.iter().flatten().collect();
        w.append_refs(BlobKind::Data, &new)
            .map_err(io::Error::other)?;
        // Within large files and big directories too: after a crash or a store outage, at most
        // a checkpoint's worth of uploads is redone.
        w.maybe_checkpoint().map_err(io::Error::other)?;
        for (piece, p) in batch.iter().zip(&prepared) {
            chunks.push(match (piece, p) {
                (Piece::Data(end, _), Some(p)) => ChunkRef {
                    end: *end,
                    id: Some(p.id),
                },
                (Piece::Hole(end), _) | (Piece::Data(end, _), None) => ChunkRef {
                    end: *end,
                    id: None,
                },
            });
        }
        batch = next?;
    }
    Ok((ChunkList(chunks), src.read))
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
