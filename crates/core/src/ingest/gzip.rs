//! gzip inputs stored decompressed, with a recipe that recreates the original byte for byte.
//!
//! A nightly `pg_dump | gzip` never deduplicates: a change near the start of the dump changes
//! every compressed byte after it. So a gzip file (`--gunzip`) or stream (`--stdin`, when the
//! data starts with the gzip magic) is stored **decompressed**, under its name without `.gz`
//! (`x.tgz` becomes `x.tar`), and beside the content its entry keeps a **recipe** (the tree
//! entry's `gzip` key, [`GzipOrigin`](crate::tree::GzipOrigin)) from which `backtree cat
//! --original` recreates the exact original bytes.
//!
//! **Two decoders in step.** [`Gunzip`] parses the gzip container itself (RFC 1952: header with
//! its optional fields, raw deflate, CRC32 and ISIZE trailer; several members in a row; anything
//! after the last member is kept as trailing data) and inflates each member with flate2: that
//! plaintext is what the chunker stores, and the trailer's CRC32 and length are checked against
//! it. Every byte it consumes goes, in pieces of [`PIECE`], to a worker thread ([`Worker`]),
//! which runs `preflate-rs` over the same deflate bytes: preflate parses the deflate stream,
//! predicts how a zlib-like compressor would have encoded it, and returns the *corrections*
//! (usually under 1% of the compressed size) that turn its prediction into the exact bytes. With
//! `verify_compression` each segment is recompressed from plaintext and corrections and compared
//! with the original before it is accepted: that is the byte-exact guarantee.
//!
//! **The recipe** (docs/format.md §7.7, [`RecipeWriter`], [`recreate`]) is a byte stream of
//! records: `literal` bytes (headers, trailers, trailing data), `deflate` (a new deflate stream
//! starts), `segment` (so many bytes of plaintext and their corrections recreate the next
//! compressed bytes) and `skip` (plaintext already covered by a literal). Where preflate fails
//! partway (`NoCompressionCandidates`, a mismatch, a panic), the rest of that member's deflate
//! bytes become a literal and its plaintext a skip: the original stays exact and the decompressed
//! file complete, only that part does not deduplicate. The recipe is written to a temporary
//! file (the compressed bytes of a literal can be large) and then stored like file content.
//!
//! **Segments are large, on purpose.** preflate-rs 0.7.6 can continue a deflate stream in
//! pieces, but for the lazy-matching levels of zlib (gzip -4 … -9, pigz's default) a
//! continuation fails with `MatchNotFound` at the first piece after the first (measured on a
//! 50 MB SQL dump, pieces of 64 KiB to 4 MiB; gzip -1 continues fine). So a deflate stream is
//! analysed in segments of [`SEGMENT_PLAIN`] bytes of plaintext (one segment for any dump up to
//! that size), and memory is bounded by that segment: about 4.5 times its plaintext at the peak
//! (236 MB measured for a 50 MB segment). A longer stream's later segments usually fall back to
//! literals. `BACKTREE_GZIP_SEGMENT` (CLI) changes the size.
//!
//! **When the original cannot be recreated** at all (no deflate segment was accepted), the file
//! is stored as it was, under its own name, with a warning: the recipe then holds every original
//! byte as literals, which are re-chunked as the file's content (so a stream needs no second
//! read). Data that is not valid gzip is an error naming the input and the byte offset
//! ([`GzipError`]); the caller decides (a stream fails the ingest, a file is stored as it is).

use super::read::read_some;
use crate::id::Id;
use flate2::{Crc, Decompress, FlushDecompress, Status};
use preflate_rs::{ExitCode, PreflateConfig, PreflateStreamProcessor, RecreateStreamProcessor};
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

/// The gzip magic: the first two bytes of every member (RFC 1952).
pub const MAGIC: [u8; 2] = [0x1f, 0x8b];

/// First bytes of a recipe: "BTGZRCP" and the recipe version 1.
pub const RECIPE_MAGIC: [u8; 8] = *b"BTGZRCP\x01";

/// Record tags of a recipe (docs/format.md §7.7).
pub const TAG_END: u8 = 0;
pub const TAG_LITERAL: u8 = 1;
pub const TAG_DEFLATE: u8 = 2;
pub const TAG_SEGMENT: u8 = 3;
pub const TAG_SKIP: u8 = 4;
pub const TAG_CORRECTIONS: u8 = 5;

/// Corrections per `corrections` record. The records of a segment come before its `segment`
/// record, all of this size but the last, so that two recipes whose corrections begin alike are
/// alike byte for byte up to the first difference (and deduplicate): nothing that depends on the
/// whole segment (its lengths) precedes them.
pub const CORRECTIONS_PIECE: usize = 64 << 10;

/// Plaintext per preflate segment, by default: one segment covers a 256 MiB dump whole, which
/// matters because preflate-rs cannot continue most deflate streams (see the module doc). The
/// peak memory of the analysis is about 4.5 times this.
pub const SEGMENT_PLAIN: usize = 256 << 20;

/// Compressed bytes handed to the worker at a time, and the reader's buffer.
const PIECE: usize = 1 << 20;

/// Pieces in flight between the reader and the worker: while preflate works on a segment the
/// reader may run this far ahead, then waits (bounded memory).
const IN_FLIGHT: usize = 64;

/// Plaintext past a segment's limit before the worker starts it: the segment ends at a block
/// boundary past the limit, so the blocks that reach past it must be there whole. A zlib block
/// holds at most 16 Ki (memLevel 8) or 32 Ki (memLevel 9) symbols of up to 258 bytes: 8.4 MB.
const SEGMENT_MARGIN: u64 = 9 << 20;

/// The chunker of recipes: the repository's, scaled down 8 times (64 KiB on average for the
/// default 512 KiB), at least 4 KiB. A recipe's corrections are incompressible and, from the
/// first change in the content on, new every night; the prefix before it deduplicates only in
/// whole chunks, so what a night adds is about one recipe chunk: with the content's chunks, a
/// 200 MB dump's 2 MB recipe cost a whole new 0.5–1 MiB chunk a night. Readers take chunks of any
/// size (a chunk list holds their ends).
pub fn recipe_chunker(c: &crate::config::ChunkerParams) -> crate::config::ChunkerParams {
    crate::config::ChunkerParams {
        min: (c.min / 8).max(4096),
        avg: (c.avg / 8).max(4096),
        max: (c.max / 8).max(16384),
        ..*c
    }
}

/// The preflate search depth: zlib's `-9` uses 4096 (preflate's default).
const MAX_CHAIN: u32 = 4096;

/// A gzip stream that cannot be read: truncated, corrupt, or not gzip at all. `offset` is the
/// byte of the input (as given, compressed) where the problem was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GzipError {
    pub offset: u64,
    pub reason: String,
}

impl std::fmt::Display for GzipError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (at byte {} of the input)", self.reason, self.offset)
    }
}

impl std::error::Error for GzipError {}

fn bad(offset: u64, reason: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        GzipError {
            offset,
            reason: reason.into(),
        },
    )
}

/// The gzip error inside an I/O error from [`Gunzip`], if that is what it is.
pub fn gzip_error(e: &io::Error) -> Option<&GzipError> {
    e.get_ref().and_then(|i| i.downcast_ref::<GzipError>())
}

/// The name a gzip file is stored under: `x.gz` → `x`, `x.tgz` → `x.tar`; `None` for other
/// names (and for `.gz` alone, which would leave nothing).
pub fn stripped_name(name: &[u8]) -> Option<Vec<u8>> {
    if let Some(base) = name.strip_suffix(b".gz").filter(|b| !b.is_empty()) {
        return Some(base.to_vec());
    }
    if let Some(base) = name.strip_suffix(b".tgz").filter(|b| !b.is_empty()) {
        return Some([base, b".tar"].concat());
    }
    None
}

/// Which of a directory's names are stored decompressed, and as what: index → stored name.
/// A name is left as it is when its stripped name is already in the directory, or when two
/// names strip to the same one (`a.tar.gz` and `a.tgz`): never two entries with one name.
pub fn plan_names(names: &[&[u8]]) -> std::collections::HashMap<usize, Vec<u8>> {
    use std::collections::{HashMap, HashSet};
    let all: HashSet<&[u8]> = names.iter().copied().collect();
    let mut count: HashMap<Vec<u8>, usize> = HashMap::new();
    let stripped: Vec<Option<Vec<u8>>> = names.iter().map(|n| stripped_name(n)).collect();
    for s in stripped.iter().flatten() {
        *count.entry(s.clone()).or_default() += 1;
    }
    stripped
        .into_iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let s = s?;
            (!all.contains(s.as_slice()) && count.get(&s) == Some(&1)).then_some((i, s))
        })
        .collect()
}

/// Writes a recipe's records (docs/format.md §7.7).
pub struct RecipeWriter<W: Write> {
    out: W,
    len: u64,
}

impl<W: Write> RecipeWriter<W> {
    /// Starts a recipe: [`RECIPE_MAGIC`] and a flags byte (0: no flags are defined).
    pub fn new(out: W) -> io::Result<RecipeWriter<W>> {
        let mut w = RecipeWriter { out, len: 0 };
        w.put(&RECIPE_MAGIC)?;
        w.put(&[0])?;
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.len += b.len() as u64;
        self.out.write_all(b)
    }

    /// Original bytes as they are; long runs become several records.
    pub fn literal(&mut self, mut b: &[u8]) -> io::Result<()> {
        // A record's length is a u32; 1 GiB pieces keep well inside it.
        while !b.is_empty() {
            let n = b.len().min(1 << 30);
            self.put(&[TAG_LITERAL])?;
            self.put(&(n as u32).to_le_bytes())?;
            self.put(&b[..n])?;
            b = &b[n..];
        }
        Ok(())
    }

    /// A new deflate stream starts (a member's deflate data).
    pub fn deflate(&mut self) -> io::Result<()> {
        self.put(&[TAG_DEFLATE])
    }

    /// The next `plain` bytes of plaintext and these corrections recreate the next deflate
    /// bytes of the current stream.
    pub fn segment(&mut self, plain: u64, corrections: &[u8]) -> io::Result<()> {
        for piece in corrections.chunks(CORRECTIONS_PIECE) {
            self.put(&[TAG_CORRECTIONS])?;
            self.put(&(piece.len() as u32).to_le_bytes())?;
            self.put(piece)?;
        }
        self.put(&[TAG_SEGMENT])?;
        self.put(&plain.to_le_bytes())
    }

    /// The next `plain` bytes of plaintext produce no output (a literal already holds their
    /// compressed form).
    pub fn skip(&mut self, plain: u64) -> io::Result<()> {
        self.put(&[TAG_SKIP])?;
        self.put(&plain.to_le_bytes())
    }

    /// Ends the recipe; returns the writer and the recipe's length.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.put(&[TAG_END])?;
        self.out.flush()?;
        Ok((self.out, self.len))
    }
}

/// One record of a recipe, as [`RecipeReader`] returns it (a literal's and a segment's bytes
/// are read separately: a literal may be large).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Literal(u32),
    Deflate,
    Segment { plain: u64, corrections: Vec<u8> },
    Skip(u64),
    End,
}

/// Reads a recipe's records; every malformed recipe is an error, never a panic.
pub struct RecipeReader<R: Read> {
    r: R,
    ended: bool,
}

fn corrupt(reason: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("corrupt gzip recipe: {}", reason.into()),
    )
}

impl<R: Read> RecipeReader<R> {
    /// Checks the magic (version) and the flags byte.
    pub fn new(mut r: R) -> io::Result<RecipeReader<R>> {
        let mut head = [0u8; 9];
        r.read_exact(&mut head)
            .map_err(|_| corrupt("shorter than its header"))?;
        if head[..8] != RECIPE_MAGIC {
            return Err(corrupt("unknown magic or version"));
        }
        if head[8] != 0 {
            return Err(corrupt(format!("reserved flags {:#04x} set", head[8])));
        }
        Ok(RecipeReader { r, ended: false })
    }

    fn exact<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|_| corrupt("truncated record"))?;
        Ok(b)
    }

    /// The next record (a segment with its corrections gathered); after a literal, its bytes
    /// must be read with [`Self::literal`] first.
    pub fn record(&mut self) -> io::Result<Record> {
        if self.ended {
            return Err(corrupt("read past its end"));
        }
        let mut corrections = Vec::new();
        let mut tag = self.exact::<1>()?[0];
        while tag == TAG_CORRECTIONS {
            let len = u32::from_le_bytes(self.exact()?) as u64;
            if len == 0 || len > CORRECTIONS_PIECE as u64 {
                return Err(corrupt(format!("corrections record of {len} bytes")));
            }
            if (&mut self.r).take(len).read_to_end(&mut corrections)? as u64 != len {
                return Err(corrupt("truncated corrections"));
            }
            tag = self.exact::<1>()?[0];
            if tag != TAG_CORRECTIONS && tag != TAG_SEGMENT {
                return Err(corrupt("corrections not followed by their segment"));
            }
        }
        Ok(match tag {
            TAG_END => {
                let mut extra = [0u8; 1];
                if self.r.read(&mut extra)? != 0 {
                    return Err(corrupt("bytes after the end record"));
                }
                self.ended = true;
                Record::End
            }
            TAG_LITERAL => Record::Literal(u32::from_le_bytes(self.exact()?)),
            TAG_DEFLATE => Record::Deflate,
            TAG_SEGMENT => Record::Segment {
                plain: u64::from_le_bytes(self.exact()?),
                corrections,
            },
            TAG_SKIP => Record::Skip(u64::from_le_bytes(self.exact()?)),
            t => return Err(corrupt(format!("unknown record tag {t}"))),
        })
    }

    /// Copies a literal's `len` bytes to `out`.
    pub fn literal(&mut self, len: u32, out: &mut dyn Write) -> io::Result<()> {
        let n = io::copy(&mut (&mut self.r).take(len as u64), out)?;
        if n != len as u64 {
            return Err(corrupt("truncated literal"));
        }
        Ok(())
    }
}

/// Recreates the original from its recipe and its decompressed content, streaming: memory is
/// one segment's plaintext and output. Returns the bytes written. Panics inside preflate are
/// errors.
pub fn recreate(
    recipe: &mut dyn Read,
    plain: &mut dyn Read,
    out: &mut dyn Write,
) -> io::Result<u64> {
    let mut out = Counting { inner: out, n: 0 };
    let mut r = RecipeReader::new(recipe)?;
    let mut stream: Option<RecreateStreamProcessor> = None;
    loop {
        match r.record()? {
            Record::End => break,
            Record::Literal(len) => r.literal(len, &mut out)?,
            Record::Deflate => stream = Some(RecreateStreamProcessor::new()),
            Record::Segment {
                plain: n,
                corrections,
            } => {
                let p = stream
                    .as_mut()
                    .ok_or_else(|| corrupt("segment outside a deflate stream"))?;
                let mut text = Vec::new();
                if plain.take(n).read_to_end(&mut text)? as u64 != n {
                    return Err(corrupt("content shorter than the recipe needs"));
                }
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    p.recompress(&mut io::Cursor::new(&text), &corrections)
                }));
                match run {
                    Ok(Ok((bytes, _))) => out.write_all(&bytes)?,
                    Ok(Err(e)) => return Err(io::Error::other(format!("preflate: {e:?}"))),
                    Err(_) => return Err(io::Error::other("preflate panicked")),
                }
            }
            Record::Skip(n) => {
                if io::copy(&mut plain.take(n), &mut io::sink())? != n {
                    return Err(corrupt("content shorter than the recipe needs"));
                }
            }
        }
    }
    let mut extra = [0u8; 1];
    if plain.read(&mut extra)? != 0 {
        return Err(corrupt("content longer than the recipe uses"));
    }
    out.flush()?;
    Ok(out.n)
}

struct Counting<'a> {
    inner: &'a mut dyn Write,
    n: u64,
}

impl Write for Counting<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What the reader tells the worker, in input order.
enum Msg {
    /// Bytes kept as they are (a header, a trailer, trailing data).
    Literal(Vec<u8>),
    /// A member's deflate data starts.
    DeflateStart,
    /// Deflate bytes, and the plaintext flate2 made of them.
    Deflate(Vec<u8>, u64),
    /// The deflate data ended; the member's plaintext length.
    DeflateEnd(u64),
}

/// The original as the reader saw it: its size and BLAKE3 hash, once read to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Original {
    pub size: u64,
    pub hash: Id,
}

/// A gzip stream's plaintext, as a `Read` for the chunker (see the module doc). Its errors are
/// [`GzipError`]s inside `io::Error` (or the source's own read errors).
pub struct Gunzip<'a> {
    src: Box<dyn Read + Send + 'a>,
    buf: Box<[u8]>,
    lo: usize,
    hi: usize,
    eof: bool,
    offset: u64,
    hasher: blake3::Hasher,
    state: State,
    inflate: Decompress,
    crc: Crc,
    member_plain: u64,
    pending: Vec<u8>,
    pending_plain: u64,
    tx: Option<SyncSender<Msg>>,
    done: Arc<Mutex<Option<Original>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Deflate,
    Trailer,
    Next,
    Tail,
    Done,
}

/// Starts reading `src` as gzip: returns the plaintext reader, and the worker that writes the
/// recipe (join it after the reader reached its end). `segment`: plaintext per preflate
/// segment (default [`SEGMENT_PLAIN`]).
pub fn start<'a>(
    src: Box<dyn Read + Send + 'a>,
    segment: Option<usize>,
) -> io::Result<(Gunzip<'a>, Worker)> {
    let (tx, rx) = sync_channel(IN_FLIGHT);
    let file = tempfile::tempfile()?;
    let segment = segment.unwrap_or(SEGMENT_PLAIN).max(1 << 20);
    let done = Arc::new(Mutex::new(None));
    let thread = std::thread::Builder::new()
        .name("backtree-preflate".into())
        .spawn(move || build(rx, file, segment))?;
    Ok((
        Gunzip {
            src,
            buf: vec![0; PIECE].into_boxed_slice(),
            lo: 0,
            hi: 0,
            eof: false,
            offset: 0,
            hasher: blake3::Hasher::new(),
            state: State::Header,
            inflate: Decompress::new(false),
            crc: Crc::new(),
            member_plain: 0,
            pending: Vec::with_capacity(PIECE),
            pending_plain: 0,
            tx: Some(tx),
            done: done.clone(),
        },
        Worker { thread, done },
    ))
}

impl Gunzip<'_> {
    fn fill(&mut self) -> io::Result<()> {
        while self.lo == self.hi && !self.eof {
            match read_some(&mut self.src, &mut self.buf)? {
                0 => self.eof = true,
                n => {
                    self.lo = 0;
                    self.hi = n;
                }
            }
        }
        Ok(())
    }

    /// Makes at least `n` bytes available unless the input ends first (keeping the bytes not
    /// yet consumed at the front of the buffer).
    fn ensure(&mut self, n: usize) -> io::Result<()> {
        while self.hi - self.lo < n && !self.eof {
            self.buf.copy_within(self.lo..self.hi, 0);
            self.hi -= self.lo;
            self.lo = 0;
            match read_some(&mut self.src, &mut self.buf[self.hi..])? {
                0 => self.eof = true,
                k => self.hi += k,
            }
        }
        Ok(())
    }

    fn consume(&mut self, n: usize) {
        self.hasher.update(&self.buf[self.lo..self.lo + n]);
        self.lo += n;
        self.offset += n as u64;
    }

    fn send(&mut self, m: Msg) {
        // The worker stopped only on an error of its own, which joining it reports.
        if let Some(tx) = &self.tx {
            if tx.send(m).is_err() {
                self.tx = None;
            }
        }
    }

    /// One byte of the header, appended to `kept`.
    fn byte(&mut self, kept: &mut Vec<u8>, what: &str) -> io::Result<u8> {
        self.fill()?;
        if self.lo == self.hi {
            return Err(bad(self.offset, format!("truncated gzip {what}")));
        }
        let b = self.buf[self.lo];
        self.consume(1);
        kept.push(b);
        Ok(b)
    }

    fn header(&mut self) -> io::Result<()> {
        let start = self.offset;
        let mut h = Vec::with_capacity(16);
        for _ in 0..10 {
            self.byte(&mut h, "header")?;
        }
        if h[..2] != MAGIC {
            return Err(bad(start, "not gzip data (no gzip magic)"));
        }
        if h[2] != 8 {
            return Err(bad(
                start + 2,
                format!("unknown gzip compression method {}", h[2]),
            ));
        }
        let flags = h[3];
        if flags & 0xe0 != 0 {
            return Err(bad(
                start + 3,
                format!("reserved gzip header flags {flags:#04x}"),
            ));
        }
        if flags & 4 != 0 {
            let lo = self.byte(&mut h, "header")?;
            let hi = self.byte(&mut h, "header")?;
            for _ in 0..u16::from_le_bytes([lo, hi]) {
                self.byte(&mut h, "header")?;
            }
        }
        for bit in [8, 16] {
            if flags & bit != 0 {
                while self.byte(&mut h, "header")? != 0 {}
            }
        }
        if flags & 2 != 0 {
            self.byte(&mut h, "header")?;
            self.byte(&mut h, "header")?;
        }
        self.send(Msg::Literal(h));
        self.send(Msg::DeflateStart);
        self.inflate.reset(false);
        self.crc.reset();
        self.member_plain = 0;
        Ok(())
    }

    fn flush_pending(&mut self) {
        if !self.pending.is_empty() {
            let p = std::mem::replace(&mut self.pending, Vec::with_capacity(PIECE));
            let plain = std::mem::take(&mut self.pending_plain);
            self.send(Msg::Deflate(p, plain));
        }
    }

    /// Inflates into `out`; returns the plaintext bytes written (0 only at the stream's end).
    fn inflate_into(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            self.fill()?;
            let (in0, out0) = (self.inflate.total_in(), self.inflate.total_out());
            let status = self
                .inflate
                .decompress(&self.buf[self.lo..self.hi], out, FlushDecompress::None)
                .map_err(|e| {
                    // Where the decoder stopped: within a few bytes of the damage.
                    let at = self.offset + (self.inflate.total_in() - in0);
                    bad(at, format!("corrupt deflate data: {e}"))
                })?;
            let used = (self.inflate.total_in() - in0) as usize;
            let made = (self.inflate.total_out() - out0) as usize;
            self.pending
                .extend_from_slice(&self.buf[self.lo..self.lo + used]);
            self.pending_plain += made as u64;
            self.consume(used);
            self.crc.update(&out[..made]);
            self.member_plain += made as u64;
            if self.pending.len() >= PIECE {
                self.flush_pending();
            }
            if status == Status::StreamEnd {
                self.flush_pending();
                self.send(Msg::DeflateEnd(self.member_plain));
                self.state = State::Trailer;
                return Ok(made);
            }
            if made > 0 {
                return Ok(made);
            }
            if used == 0 && self.lo == self.hi && self.eof {
                return Err(bad(
                    self.offset,
                    "truncated gzip stream (deflate data ends early)",
                ));
            }
            if used == 0 && self.lo < self.hi {
                // Neither input taken nor output made with both available: cannot happen with
                // a non-empty `out`; refuse to spin.
                return Err(bad(self.offset, "deflate decoder made no progress"));
            }
        }
    }

    fn trailer(&mut self) -> io::Result<()> {
        let at = self.offset;
        let mut t = Vec::with_capacity(8);
        for _ in 0..8 {
            self.byte(&mut t, "trailer")?;
        }
        let crc = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
        let isize = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
        if crc != self.crc.sum() {
            return Err(bad(
                at,
                format!(
                    "gzip CRC32 mismatch: stored {crc:08x}, data {:08x}",
                    self.crc.sum()
                ),
            ));
        }
        // ISIZE is the length modulo 2^32.
        if isize != self.member_plain as u32 {
            return Err(bad(at + 4, "gzip length (ISIZE) differs from the data"));
        }
        self.send(Msg::Literal(t));
        Ok(())
    }
}

impl Read for Gunzip<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            match self.state {
                State::Header => {
                    self.header()?;
                    self.state = State::Deflate;
                }
                State::Deflate => {
                    let n = self.inflate_into(out)?;
                    if n > 0 {
                        return Ok(n);
                    }
                }
                State::Trailer => {
                    self.trailer()?;
                    self.state = State::Next;
                }
                State::Next => {
                    // Another member follows if the next bytes are the magic (gzip -d reads
                    // concatenated members as one stream); anything else is trailing data.
                    self.fill()?;
                    if self.lo == self.hi {
                        self.state = State::Done;
                        continue;
                    }
                    let first = self.buf[self.lo];
                    if first != MAGIC[0] {
                        self.state = State::Tail;
                        continue;
                    }
                    self.ensure(2)?;
                    self.state = if self.hi - self.lo >= 2 && self.buf[self.lo + 1] == MAGIC[1] {
                        State::Header
                    } else {
                        State::Tail
                    };
                }
                State::Tail => {
                    self.fill()?;
                    if self.lo == self.hi {
                        self.state = State::Done;
                        continue;
                    }
                    let t = self.buf[self.lo..self.hi].to_vec();
                    self.consume(t.len());
                    self.send(Msg::Literal(t));
                }
                State::Done => {
                    if let Some(tx) = self.tx.take() {
                        drop(tx);
                        let hash = std::mem::take(&mut self.hasher).finalize();
                        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(Original {
                            size: self.offset,
                            hash: Id(*hash.as_bytes()),
                        });
                    }
                    return Ok(0);
                }
            }
        }
    }
}

/// The recipe worker of one gzip input.
pub struct Worker {
    thread: std::thread::JoinHandle<io::Result<Built>>,
    done: Arc<Mutex<Option<Original>>>,
}

/// A finished recipe.
#[derive(Debug)]
pub struct Built {
    /// The recipe, positioned at its start.
    pub file: File,
    pub len: u64,
    /// Deflate streams (members) and the segments preflate accepted.
    pub streams: u64,
    pub segments: u64,
    /// Deflate streams (or their ends) kept as literals because preflate failed.
    pub fallbacks: u64,
}

impl Worker {
    /// Waits for the recipe; `None` for the original if the reader did not reach its end.
    pub fn join(self) -> io::Result<(Built, Option<Original>)> {
        let built = self
            .thread
            .join()
            .map_err(|_| io::Error::other("the preflate worker panicked"))??;
        let original = *self.done.lock().unwrap_or_else(|e| e.into_inner());
        Ok((built, original))
    }
}

/// The worker's state for the deflate stream being analysed.
struct Builder {
    out: RecipeWriter<BufWriter<File>>,
    segment: usize,
    proc: Option<PreflateStreamProcessor>,
    /// Deflate bytes received and not yet in a segment, and roughly their plaintext.
    buf: Vec<u8>,
    buf_plain: u64,
    /// Plaintext of this stream covered by segments.
    produced: u64,
    failed: bool,
    streams: u64,
    segments: u64,
    fallbacks: u64,
}

fn build(rx: Receiver<Msg>, file: File, segment: usize) -> io::Result<Built> {
    let mut b = Builder {
        out: RecipeWriter::new(BufWriter::with_capacity(PIECE, file))?,
        segment,
        proc: None,
        buf: Vec::new(),
        buf_plain: 0,
        produced: 0,
        failed: false,
        streams: 0,
        segments: 0,
        fallbacks: 0,
    };
    for m in rx {
        match m {
            Msg::Literal(l) => b.out.literal(&l)?,
            Msg::DeflateStart => {
                b.streams += 1;
                b.out.deflate()?;
                b.proc = Some(PreflateStreamProcessor::new(&PreflateConfig {
                    max_chain_length: MAX_CHAIN,
                    plain_text_limit: segment,
                    verify_compression: true,
                }));
                b.buf.clear();
                b.buf_plain = 0;
                b.produced = 0;
                b.failed = false;
            }
            Msg::Deflate(bytes, plain) => {
                if b.failed {
                    b.out.literal(&bytes)?;
                } else {
                    b.buf.extend_from_slice(&bytes);
                    b.buf_plain += plain;
                    if b.buf_plain >= b.segment as u64 + SEGMENT_MARGIN {
                        b.process(false)?;
                    }
                }
            }
            Msg::DeflateEnd(total) => {
                if !b.failed {
                    b.process(true)?;
                }
                if b.produced < total {
                    b.out.skip(total - b.produced)?;
                } else if b.produced > total {
                    return Err(io::Error::other("preflate made more plaintext than flate2"));
                }
                b.proc = None;
            }
        }
    }
    let (w, len) = b.out.finish()?;
    let mut file = w.into_inner().map_err(|e| e.into_error())?;
    file.rewind()?;
    Ok(Built {
        file,
        len,
        streams: b.streams,
        segments: b.segments,
        fallbacks: b.fallbacks,
    })
}

impl Builder {
    /// Runs preflate over the buffered deflate bytes: segments while it succeeds; at the
    /// stream's `end`, until they are all used.
    fn process(&mut self, end: bool) -> io::Result<()> {
        while !self.buf.is_empty() {
            let Some(p) = self.proc.as_mut() else {
                return Err(io::Error::other("deflate data outside a deflate stream"));
            };
            let run =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.decompress(&self.buf)));
            match run {
                Ok(Ok(r)) if r.compressed_size > 0 && r.compressed_size <= self.buf.len() => {
                    let plain = p.plain_text().len() as u64;
                    p.shrink_to_dictionary();
                    let done = p.is_done();
                    self.out.segment(plain, &r.corrections)?;
                    self.segments += 1;
                    self.produced += plain;
                    self.buf.drain(..r.compressed_size);
                    self.buf_plain = self.buf_plain.saturating_sub(plain);
                    if done && !self.buf.is_empty() {
                        return self.fall_back("bytes after the end of the deflate stream");
                    }
                    if !end && self.buf_plain < self.segment as u64 + SEGMENT_MARGIN {
                        return Ok(());
                    }
                }
                Ok(Err(e)) if e.exit_code() == ExitCode::ShortRead && !end => return Ok(()),
                Ok(Err(e)) => return self.fall_back(&format!("{:?}", e.exit_code())),
                Ok(Ok(_)) => return self.fall_back("no progress"),
                Err(_) => return self.fall_back("panic"),
            }
        }
        Ok(())
    }

    /// preflate cannot go on with this stream: the rest of its deflate bytes are literals.
    fn fall_back(&mut self, why: &str) -> io::Result<()> {
        tracing::debug!(
            "preflate stops after {} bytes of plaintext ({why}); the rest of this deflate \
             stream is kept compressed",
            self.produced
        );
        self.failed = true;
        self.fallbacks += 1;
        self.out.literal(&self.buf)?;
        self.buf = Vec::new();
        self.buf_plain = 0;
        Ok(())
    }
}

/// The original bytes of a recipe made only of literals and skips (no segment was accepted):
/// its literals in order. Used to store such an input as it was without reading it again.
pub struct Literals<R: Read> {
    r: RecipeReader<R>,
    left: u32,
}

impl<R: Read> Literals<R> {
    pub fn new(recipe: R) -> io::Result<Literals<R>> {
        Ok(Literals {
            r: RecipeReader::new(recipe)?,
            left: 0,
        })
    }
}

impl<R: Read> Read for Literals<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.left == 0 {
            match self.r.record()? {
                Record::End => return Ok(0),
                Record::Literal(n) => self.left = n,
                Record::Deflate | Record::Skip(_) => {}
                Record::Segment { .. } => {
                    return Err(io::Error::other(
                        "a recipe with segments is not all literals",
                    ))
                }
            }
        }
        let want = out.len().min(self.left as usize);
        let n = self.r.r.read(&mut out[..want])?;
        if n == 0 {
            return Err(corrupt("truncated literal"));
        }
        self.left -= n as u32;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stripped_once_and_never_clash() {
        assert_eq!(stripped_name(b"db.sql.gz").as_deref(), Some(&b"db.sql"[..]));
        assert_eq!(stripped_name(b"src.tgz").as_deref(), Some(&b"src.tar"[..]));
        assert_eq!(stripped_name(b".gz"), None);
        assert_eq!(stripped_name(b"a.gzip"), None);
        assert_eq!(stripped_name(b"notes"), None);
        let names: Vec<&[u8]> = vec![b"a.gz", b"a", b"b.gz", b"c.tar.gz", b"c.tgz", b"d.tgz"];
        let plan = plan_names(&names);
        let mut got: Vec<_> = plan.into_iter().collect();
        got.sort();
        // a.gz: "a" exists; c.tar.gz and c.tgz both become c.tar: all kept as they are.
        assert_eq!(got, vec![(2, b"b".to_vec()), (5, b"d.tar".to_vec())]);
    }

    fn recipe(f: impl FnOnce(&mut RecipeWriter<Vec<u8>>)) -> Vec<u8> {
        let mut w = RecipeWriter::new(Vec::new()).unwrap();
        f(&mut w);
        let (out, len) = w.finish().unwrap();
        assert_eq!(len, out.len() as u64);
        out
    }

    #[test]
    fn recipe_records_round_trip_and_bad_ones_are_refused() {
        let r = recipe(|w| {
            w.literal(b"head").unwrap();
            w.deflate().unwrap();
            w.segment(5, b"corr").unwrap();
            w.skip(7).unwrap();
        });
        assert_eq!(&r[..9], b"BTGZRCP\x01\x00");
        assert_eq!(r[9], TAG_LITERAL);
        assert_eq!(&r[10..14], &4u32.to_le_bytes());
        let mut rd = RecipeReader::new(&r[..]).unwrap();
        assert_eq!(rd.record().unwrap(), Record::Literal(4));
        let mut lit = Vec::new();
        rd.literal(4, &mut lit).unwrap();
        assert_eq!(lit, b"head");
        assert_eq!(rd.record().unwrap(), Record::Deflate);
        assert_eq!(
            rd.record().unwrap(),
            Record::Segment {
                plain: 5,
                corrections: b"corr".to_vec()
            }
        );
        assert_eq!(rd.record().unwrap(), Record::Skip(7));
        assert_eq!(rd.record().unwrap(), Record::End);
        assert!(rd.record().is_err());

        let mut flags = r.clone();
        flags[8] = 1;
        assert!(RecipeReader::new(&flags[..]).is_err());
        let mut version = r.clone();
        version[7] = 2;
        assert!(RecipeReader::new(&version[..]).is_err());
        let mut tag = r.clone();
        tag[9] = 9;
        let mut rd = RecipeReader::new(&tag[..]).unwrap();
        assert!(rd.record().is_err());
        let mut extra = r.clone();
        extra.push(0);
        let mut rd = RecipeReader::new(&extra[..]).unwrap();
        let err = loop {
            match rd.record() {
                Ok(Record::Literal(n)) => rd.literal(n, &mut io::sink()).unwrap(),
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("after the end"), "{err}");
        for cut in 0..r.len() {
            let mut rd = match RecipeReader::new(&r[..cut]) {
                Ok(rd) => rd,
                Err(_) => continue,
            };
            let failed = loop {
                match rd.record() {
                    Ok(Record::End) => break false,
                    Ok(Record::Literal(n)) => {
                        if rd.literal(n, &mut io::sink()).is_err() {
                            break true;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break true,
                }
            };
            assert!(failed, "a recipe cut at {cut} is refused");
        }
    }

    fn text(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        let mut out = Vec::with_capacity(n);
        let words = ["alpha ", "beta ", "gamma ", "delta\n", "42 ", "epsilon "];
        while out.len() < n {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            out.extend_from_slice(words[(x >> 60) as usize % words.len()].as_bytes());
            out.extend_from_slice(format!("{} ", (x >> 40) % 1000).as_bytes());
        }
        out.truncate(n);
        out
    }

    fn gz(data: &[u8], level: u32) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// Runs the reader and the worker over `input`; returns plaintext, recipe and counts.
    fn run(input: Vec<u8>, segment: Option<usize>) -> io::Result<(Vec<u8>, Built, Original)> {
        let (mut g, worker) = start(Box::new(io::Cursor::new(input)), segment)?;
        let mut plain = Vec::new();
        let r = g.read_to_end(&mut plain);
        drop(g);
        let joined = worker.join();
        r?;
        let (built, original) = joined?;
        Ok((plain, built, original.expect("read to the end")))
    }

    fn round_trip(input: &[u8], expect_plain: &[u8], segment: Option<usize>) -> Built {
        let (plain, mut built, original) = run(input.to_vec(), segment).unwrap();
        assert_eq!(plain, expect_plain);
        assert_eq!(original.size, input.len() as u64);
        assert_eq!(original.hash, Id(*blake3::hash(input).as_bytes()));
        let mut out = Vec::new();
        let n = recreate(&mut built.file, &mut &plain[..], &mut out).unwrap();
        assert_eq!(n, input.len() as u64);
        assert!(out == input, "recreated bytes differ");
        built
    }

    #[test]
    fn members_trailing_data_and_levels_recreate_exactly() {
        let a = text(300_000, 1);
        let b = text(100_000, 2);
        for level in [1, 6, 9] {
            let built = round_trip(&gz(&a, level), &a, None);
            assert_eq!((built.streams, built.fallbacks), (1, 0), "level {level}");
        }
        // Two members, then zero padding: plaintext is both members, the padding is kept.
        let mut two = gz(&a, 6);
        two.extend(gz(&b, 1));
        two.extend([0u8; 100]);
        let both = [a.clone(), b.clone()].concat();
        let built = round_trip(&two, &both, None);
        assert_eq!(built.streams, 2);
        // An empty member.
        round_trip(&gz(b"", 6), b"", None);
    }

    #[test]
    fn preflate_failures_fall_back_to_literals_and_stay_exact() {
        // Small segments: continuations fail for lazy levels; the rest is a literal.
        let a = text(6_000_000, 3);
        let built = round_trip(&gz(&a, 6), &a, Some(1 << 20));
        assert!(built.segments >= 1);
        // Stored deflate blocks (level 0) are fine too.
        round_trip(&gz(&a[..100_000], 0), &a[..100_000], None);
    }

    #[test]
    fn truncated_and_corrupt_streams_name_the_offset() {
        let a = text(200_000, 4);
        let g = gz(&a, 6);
        let cut = g[..g.len() / 2].to_vec();
        let e = run(cut, None).expect_err("truncated");
        let ge = gzip_error(&e).expect("a gzip error");
        assert!(ge.reason.contains("truncated"), "{ge}");
        assert!(ge.offset > 0 && ge.offset <= (g.len() / 2) as u64, "{ge}");
        // A flipped byte in the trailer's CRC.
        let mut crc = g.clone();
        let n = crc.len();
        crc[n - 6] ^= 0xff;
        let e = run(crc, None).expect_err("bad crc");
        let ge = gzip_error(&e).expect("a gzip error");
        assert!(ge.reason.contains("CRC32"), "{ge}");
        assert_eq!(ge.offset, (n - 8) as u64);
        // Not gzip.
        let e = run(b"plain text".to_vec(), None).expect_err("not gzip");
        assert_eq!(gzip_error(&e).unwrap().offset, 0);
        // Only a header.
        let e = run(g[..10].to_vec(), None).expect_err("header only");
        assert!(gzip_error(&e).unwrap().reason.contains("truncated"));
    }

    #[test]
    fn a_recipe_of_literals_gives_back_the_original() {
        let r = recipe(|w| {
            w.literal(b"ab").unwrap();
            w.deflate().unwrap();
            w.literal(b"cd").unwrap();
            w.skip(10).unwrap();
        });
        let mut out = Vec::new();
        Literals::new(&r[..])
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"abcd");
    }
}
