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
pub const BATCH_BYTES: usize = 32 << 20;

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

/// Reads, chunks and stores a file. Returns its chunk list and the bytes read.
pub fn read_file(
    path: &Path,
    size: u64,
    chunker: &ChunkerParams,
    w: &BlobWriter,
) -> io::Result<(ChunkList, u64)> {
    let mut f = open_noatime(path)?;
    let mut chunks: Vec<ChunkRef> = Vec::new();
    let mut read = 0u64;
    let mut batch: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut batch_bytes = 0usize;
    let flush = |batch: &mut Vec<(u64, Vec<u8>)>, chunks: &mut Vec<ChunkRef>| -> io::Result<()> {
        let prepared: Vec<_> = batch.par_iter().map(|(_, d)| w.prepare(d)).collect();
        w.append_all(BlobKind::Data, &prepared)
            .map_err(io::Error::other)?;
        for ((end, _), p) in batch.iter().zip(&prepared) {
            chunks.push(ChunkRef {
                end: *end,
                id: Some(p.id),
            });
        }
        batch.clear();
        Ok(())
    };
    let mut pos = 0u64;
    let mut shrank = false;
    'regions: for (start, end) in data_regions(&f, size) {
        if start > pos {
            flush(&mut batch, &mut chunks)?;
            batch_bytes = 0;
            chunks.push(ChunkRef {
                end: start,
                id: None,
            });
        }
        f.seek(SeekFrom::Start(start))?;
        pos = start;
        let len = end - start;
        if len <= chunker.min as u64 {
            // Small region: one chunk, no chunker buffer needed.
            let mut buf = Vec::with_capacity(len as usize);
            (&mut f).take(len).read_to_end(&mut buf)?;
            pos += buf.len() as u64;
            read += buf.len() as u64;
            let short = (buf.len() as u64) < len;
            if !buf.is_empty() {
                batch_bytes += buf.len();
                batch.push((pos, buf));
            }
            if short {
                shrank = true; // the file shrank while we read it
                break 'regions;
            }
        } else {
            let source = (&mut f).take(len);
            let cdc = fastcdc::v2020::StreamCDC::new(source, chunker.min, chunker.avg, chunker.max);
            for c in cdc {
                let c = c.map_err(|e| match e {
                    fastcdc::v2020::Error::IoError(e) => e,
                    other => io::Error::other(other.to_string()),
                })?;
                pos += c.length as u64;
                read += c.length as u64;
                batch_bytes += c.length;
                batch.push((pos, c.data));
                if batch_bytes >= BATCH_BYTES {
                    flush(&mut batch, &mut chunks)?;
                    batch_bytes = 0;
                }
            }
            if pos < end {
                shrank = true; // the file shrank while we read it
                break 'regions;
            }
        }
        if batch_bytes >= BATCH_BYTES {
            flush(&mut batch, &mut chunks)?;
            batch_bytes = 0;
        }
    }
    flush(&mut batch, &mut chunks)?;
    // Everything after the last data region up to the size is a hole.
    if !shrank && pos < size {
        chunks.push(ChunkRef {
            end: size,
            id: None,
        });
    }
    Ok((ChunkList(chunks), read))
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
