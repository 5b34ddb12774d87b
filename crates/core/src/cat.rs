//! A file's content, or the gzip original it was stored from, written to a writer
//! (`backtree cat [--original]`).
//!
//! Both read the content sequentially in windows of [`WINDOW`] bytes through the repository's
//! verified read path ([`Repository::read_file_range`]: every chunk checked against its id), so
//! memory stays bounded whatever the file's size. [`write_original`] also reads the recipe the
//! same way and recreates the original with [`gzip::recreate`], then checks the size and the
//! BLAKE3 hash of what it wrote against those recorded at ingest: a difference is an error
//! ([`Error::OriginalMismatch`]), never a silent success. The bytes are written as they are
//! made, so on an error the output is incomplete or wrong: callers report the failure (the
//! command exits non-zero).

use crate::chunklist::FileChunks;
use crate::error::{Error, Result};
use crate::ingest::gzip;
use crate::repo::Repository;
use crate::tree::{Entry, Kind};
use std::io::{self, Read, Write};
use tokio::runtime::Handle;

/// Bytes read from the repository at a time: a few chunks.
pub const WINDOW: u64 = 8 << 20;

/// A file's (or a recipe's) content as a `Read`, fetched window by window. Must be used outside
/// the async runtime's worker threads (it blocks on `handle`). Repository errors come out as
/// `io::Error`s holding the [`Error`] (see [`repo_error`]).
pub struct ContentReader<'a> {
    repo: &'a Repository,
    handle: &'a Handle,
    chunks: FileChunks,
    pos: u64,
    buf: Vec<u8>,
    at: usize,
}

impl<'a> ContentReader<'a> {
    pub fn new(repo: &'a Repository, handle: &'a Handle, chunks: FileChunks) -> Self {
        ContentReader {
            repo,
            handle,
            chunks,
            pos: 0,
            buf: Vec::new(),
            at: 0,
        }
    }
}

impl Read for ContentReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.at == self.buf.len() {
            if self.pos >= self.chunks.size() {
                return Ok(0);
            }
            self.buf = self
                .handle
                .block_on(self.repo.read_file_range(&self.chunks, self.pos, WINDOW))
                .map_err(io::Error::other)?;
            self.at = 0;
            self.pos += self.buf.len() as u64;
            if self.buf.is_empty() {
                return Err(io::Error::other(Error::corrupt(
                    "chunk list",
                    "no data before the end of the file",
                )));
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The repository error inside an `io::Error` from a [`ContentReader`], if it holds one.
pub fn repo_error(e: io::Error) -> std::result::Result<Error, io::Error> {
    if e.get_ref().is_some_and(|i| i.is::<Error>()) {
        if let Some(inner) = e.into_inner() {
            if let Ok(err) = inner.downcast::<Error>() {
                return Ok(*err);
            }
            // Unreachable: checked above.
            return Err(io::Error::other("unexpected error type"));
        }
        return Err(io::Error::other("unexpected error type"));
    }
    Err(e)
}

fn check_file(e: &Entry, path: &str) -> Result<()> {
    if e.kind != Kind::File {
        return Err(Error::NotAFile { path: path.into() });
    }
    Ok(())
}

/// An error of writing to the output: `Error::Io` on "output" (a closed pipe keeps its
/// `BrokenPipe` kind for the caller).
fn output_error(e: io::Error) -> Error {
    Error::io("output", e)
}

/// Writes a regular file's content (holes as zeros) to `out`; returns the bytes written.
/// `path` names the file in errors.
pub fn write_content(
    repo: &Repository,
    handle: &Handle,
    e: &Entry,
    path: &str,
    out: &mut dyn Write,
) -> Result<u64> {
    check_file(e, path)?;
    let chunks = handle.block_on(repo.file_chunks(e))?;
    let mut r = ContentReader::new(repo, handle, chunks);
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(err) => return Err(repo_error(err).unwrap_or_else(|io| Error::io(path, io))),
        };
        out.write_all(&buf[..k]).map_err(output_error)?;
        n += k as u64;
    }
    out.flush().map_err(output_error)?;
    Ok(n)
}

/// Recreates the gzip original of a file stored decompressed and writes it to `out`; checks
/// its size and BLAKE3 hash against the recorded ones. Returns the bytes written.
pub fn write_original(
    repo: &Repository,
    handle: &Handle,
    e: &Entry,
    path: &str,
    out: &mut dyn Write,
) -> Result<u64> {
    check_file(e, path)?;
    let g = e
        .gzip
        .as_ref()
        .ok_or_else(|| Error::NoGzipOrigin { path: path.into() })?;
    let content = handle.block_on(repo.file_chunks(e))?;
    let recipe = handle.block_on(repo.chunks_of(g.chunks.as_ref(), g.chunk_list.as_ref(), None))?;
    if recipe.size() != g.recipe_size {
        return Err(Error::OriginalMismatch {
            path: path.into(),
            reason: format!(
                "the recipe has {} bytes, {} recorded",
                recipe.size(),
                g.recipe_size
            ),
        });
    }
    let mut plain = ContentReader::new(repo, handle, content);
    let mut recipe =
        io::BufReader::with_capacity(1 << 20, ContentReader::new(repo, handle, recipe));
    let mut hashing = Hashing {
        out,
        hasher: blake3::Hasher::new(),
        failed: None,
    };
    let made = gzip::recreate(&mut recipe, &mut plain, &mut hashing);
    if let Some(err) = hashing.failed.take() {
        return Err(output_error(err));
    }
    let n = match made {
        Ok(n) => n,
        Err(err) => {
            return Err(match repo_error(err) {
                Ok(repo_err) => repo_err,
                Err(other) => Error::OriginalMismatch {
                    path: path.into(),
                    reason: other.to_string(),
                },
            })
        }
    };
    let hash = hashing.hasher.finalize();
    if n != g.size || hash.as_bytes() != &g.hash.0 {
        return Err(Error::OriginalMismatch {
            path: path.into(),
            reason: format!(
                "recreated {n} bytes with BLAKE3 {}, expected {} bytes with {}",
                hash.to_hex(),
                g.size,
                g.hash
            ),
        });
    }
    Ok(n)
}

/// Hashes what it passes on; remembers a write error so it is reported as the output's.
struct Hashing<'a> {
    out: &'a mut dyn Write,
    hasher: blake3::Hasher,
    failed: Option<io::Error>,
}

impl Write for Hashing<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self.out.write(b) {
            Ok(n) => {
                self.hasher.update(&b[..n]);
                Ok(n)
            }
            Err(e) => {
                let kind = e.kind();
                self.failed = Some(e);
                Err(io::Error::new(kind, "output failed"))
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}
