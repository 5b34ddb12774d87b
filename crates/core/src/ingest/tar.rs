//! A tar archive or stream as a generation's tree (`backtree ingest --tar FILE|-`).
//!
//! The input is read once, front to back, and never seeks: it may be a pipe, and a compressed
//! stream cannot seek anyway. Its compression is found from its first bytes, never from its
//! name: gzip `1f 8b` (flate2), zstd `28 b5 2f fd`, xz `fd 37 7a 58 5a 00` (liblzma, built from
//! its bundled source), or none; several gzip members or xz streams one after another are one
//! tar stream. The `tar` crate parses each header's fields (ustar, GNU, PAX).
//!
//! - **Data**: each regular member's bytes go through the writer's stream pipeline
//!   ([`super::read::read_stream`]) as the member streams by, so a file cut from a tar and the
//!   same file cut from a directory have the same chunks and deduplicate. A sparse member (old
//!   GNU type `S`, with its extension blocks; PAX `GNU.sparse.*` 0.0, 0.1 and 1.0, as GNU tar
//!   `--sparse` and bsdtar write them) goes through [`super::read::read_mapped`]: its map's gaps
//!   are holes, and its data regions are cut as a sparse file's, so it deduplicates with the file
//!   too.
//! - **Blocks** are read here, not by the `tar` crate's iterator (whose raw mode knows neither a
//!   PAX `size` nor sparse extension blocks, both of which decide where the next header is); the
//!   crate parses each header's fields.
//! - **Tree**: members may come in any order and repeat; the tree is built in memory as a map
//!   of path → entry (file data already chunked, so only metadata and chunk lists are held),
//!   the last member for a path wins, as when tar extracts. Directories that only appear as a
//!   deeper member's parent are *implied*: mode 0755, owner root:root (uid/gid 0), dated at
//!   the generation's time; a later member for that directory gives it its own metadata. When
//!   the archive ends, directories are written bottom-up as in a directory ingest.
//! - **Metadata**: mode (setuid, setgid, sticky included), uid/gid and user/group names as the
//!   archive gives them (never looked up locally), mtime, and PAX `mtime`/`atime`/`ctime` with
//!   their fractions (atime and ctime default to mtime), device numbers, PAX
//!   `SCHILY.xattr.NAME` as xattr NAME, and `SCHILY.acl.access`/`SCHILY.acl.default` (text)
//!   converted to the binary `system.posix_acl_access`/`_default` xattrs that a directory
//!   ingest reads from disk ([`acl_from_text`]). An access ACL sets the mode's permission bits
//!   as the kernel keeps them ([`mode_with_acl`]: group from `mask::`, where bsdtar's header
//!   has `group::`), and one that only repeats the mode ([`acl_is_minimal`]; GNU tar writes it
//!   for a directory with a default ACL) is no xattr, as on disk.
//! - **Hardlinks**: a link member shares the content and metadata of the earlier member it
//!   names; both get one link group, and the generation's link table counts the members.
//! - **Hostile members** are made safe and reported as skipped paths (so they appear in the
//!   manifest and the ingest's exit status says so): a leading `/` is removed, `.` components
//!   dropped, `..` resolved within the archive; a member whose `..` would climb above the root
//!   is left out, as is a hardlink whose target would, or names no earlier member. A symlink's
//!   target is data and is kept as it is: nothing ever follows it while the tree is built.
//! - **Errors**: a truncated or corrupt archive (or compression) fails the ingest with the byte
//!   offset reached in the input, before any manifest is written: nothing is published. A
//!   decoder's error names its compression (`xz: lzma data error`); every compressed stream is
//!   read to its end, so its checksum (gzip CRC-32, xz block check) is checked.
//! - **Extension headers** (PAX `x`, GNU `L`/`K`) are parsed here: the crate's PAX parser
//!   splits records at newlines, and GNU tar's ACL text holds newlines. A PAX `size` (members of
//!   8 GiB and more) is the member's size.
//!   `LIBARCHIVE.xattr.NAME` records (bsdtar: the name URL-encoded, the value base64) are xattrs
//!   as `SCHILY.xattr.NAME` are.
//! - **Tested** with the archives of GNU tar (gnu and pax formats; `--sparse`, `--xattrs`,
//!   `--acls`; plain, gzip, zstd, xz) and bsdtar (restricted pax and pax; plain, xz), in
//!   crates/core/tests/roundtrip.rs (against a directory ingest of the same tree) and
//!   crates/cli/tests/tar_mount.rs (devices, fifos, ACLs, sparse files… read back through the
//!   FUSE mount and compared with the tree).
//! - **Not supported yet**: other compressions (bzip2, lz4, lzip: decompress in the pipe), NFSv4
//!   ACLs (bsdtar's `SCHILY.acl.ace`), file flags, multi-volume archives.

use super::read::{read_mapped, read_some, read_stream};
use super::{lock, Counted, Walker};
use crate::chunklist::WrittenList;
use crate::error::{Error, Result};
use crate::tree::{Entry, Kind, Time, Xattr};
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A tar archive to ingest: a file or standard input.
pub struct TarSource<'a> {
    /// Where the archive comes from, for messages and the manifest's sources: its path, or
    /// `stdin`.
    pub origin: String,
    /// The archive's bytes, compressed or not; read once, to the end.
    pub reader: Box<dyn Read + Send + 'a>,
}

impl std::fmt::Debug for TarSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TarSource")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// Members deeper than this are left out: the tree is written recursively.
const MAX_DEPTH: usize = 4096;

/// What extension headers said about the next member.
#[derive(Default)]
struct Extensions {
    /// PAX records, in order.
    pax: Vec<(String, Vec<u8>)>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

/// The data of an extension header (at most 1 MiB).
fn read_small(data: &mut dyn Read, size: u64, fail: &dyn Fn(String) -> Error) -> Result<Vec<u8>> {
    if size > 1 << 20 {
        return Err(fail(format!("an extension header of {size} bytes")));
    }
    let mut out = Vec::with_capacity(size as usize);
    data.read_to_end(&mut out)
        .map_err(|e| fail(format!("extension header: {e}")))?;
    if (out.len() as u64) < size {
        return Err(fail("an extension header is cut short: truncated".into()));
    }
    Ok(out)
}

/// Reads as much of `buf` as the input holds: all of it, or less only at the input's end.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match read_some(r, &mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Checks a header block's checksum (unsigned sum of its bytes, the checksum field as spaces).
fn check_sum(h: &::tar::Header) -> std::result::Result<(), String> {
    let b = h.as_bytes();
    let sum: u32 = (b[..148].iter().chain(&b[156..]))
        .map(|&x| u32::from(x))
        .sum::<u32>()
        + 8 * 32;
    match h.cksum() {
        Ok(c) if c == sum => Ok(()),
        _ => Err("a header fails its checksum: corrupt".into()),
    }
}

/// Where a sparse member's data lies in the file it stands for: data regions `(start, end)`, in
/// order, and the file's size.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SparseMap {
    pub regions: Vec<(u64, u64)>,
    pub size: u64,
}

impl SparseMap {
    /// A map from `(offset, length)` pairs; empty regions dropped. Checks order and bounds.
    pub fn new(pairs: &[(u64, u64)], size: u64) -> std::result::Result<SparseMap, String> {
        let mut regions: Vec<(u64, u64)> = Vec::with_capacity(pairs.len());
        for &(off, len) in pairs {
            let end = off
                .checked_add(len)
                .filter(|&e| e <= size)
                .ok_or_else(|| format!("a sparse region {off}+{len} past the size {size}"))?;
            if regions.last().is_some_and(|&(_, prev)| off < prev) {
                return Err(format!("sparse regions out of order at {off}"));
            }
            if len > 0 {
                regions.push((off, end));
            }
        }
        Ok(SparseMap { regions, size })
    }

    /// Bytes of data the member holds for this map.
    pub fn data_bytes(&self) -> u64 {
        self.regions.iter().map(|(s, e)| e - s).sum()
    }
}

/// Parses a PAX sparse 1.0 map, the decimal lines at the start of the member's data (count,
/// then offset and length per region), padded to a 512-byte block. Returns the pairs and the
/// bytes of data the map took.
pub fn parse_sparse_1_0(
    data: &mut dyn Read,
) -> std::result::Result<(Vec<(u64, u64)>, u64), String> {
    let mut used = 0u64;
    let mut line = Vec::new();
    let mut next = |used: &mut u64| -> std::result::Result<u64, String> {
        line.clear();
        loop {
            let mut b = [0u8; 1];
            match data.read(&mut b) {
                Ok(1) => {}
                Ok(_) => return Err("the sparse map is cut short".into()),
                Err(e) => return Err(format!("sparse map: {e}")),
            }
            *used += 1;
            if b[0] == b'\n' {
                break;
            }
            if line.len() > 20 {
                return Err("a sparse map line is too long".into());
            }
            line.push(b[0]);
        }
        std::str::from_utf8(&line)
            .ok()
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| {
                format!(
                    "a bad number {:?} in the sparse map",
                    String::from_utf8_lossy(&line)
                )
            })
    };
    let count = next(&mut used)?;
    if count > 1 << 24 {
        return Err(format!("a sparse map of {count} regions"));
    }
    let mut pairs = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let off = next(&mut used)?;
        let len = next(&mut used)?;
        pairs.push((off, len));
    }
    let pad = (512 - used % 512) % 512;
    let mut skip = vec![0u8; pad as usize];
    let n = read_full(data, &mut skip).map_err(|e| format!("sparse map: {e}"))?;
    if n < skip.len() {
        return Err("the sparse map is cut short".into());
    }
    Ok((pairs, used + pad))
}

/// The sparse map of an old-GNU sparse member (type `S`): the four regions of its header, then
/// those of the extension blocks that follow the header (read from `input`).
fn gnu_sparse_map(
    h: &::tar::Header,
    input: &mut dyn Read,
) -> std::result::Result<SparseMap, String> {
    let gnu = h
        .as_gnu()
        .ok_or("a sparse member whose header is not GNU")?;
    let mut pairs = Vec::new();
    let mut add = |e: &::tar::GnuSparseHeader| -> std::result::Result<(), String> {
        if !e.is_empty() {
            let off = e.offset().map_err(|e| e.to_string())?;
            let len = e.length().map_err(|e| e.to_string())?;
            pairs.push((off, len));
        }
        Ok(())
    };
    for e in &gnu.sparse {
        add(e)?;
    }
    let mut extended = gnu.is_extended();
    let mut blocks = 0u32;
    while extended {
        let mut ext = ::tar::GnuExtSparseHeader::new();
        let n = read_full(input, ext.as_mut_bytes()).map_err(|e| e.to_string())?;
        if n < 512 {
            return Err("a sparse extension block is cut short: truncated".into());
        }
        for e in &ext.sparse {
            add(e)?;
        }
        extended = ext.is_extended();
        blocks += 1;
        if blocks > 1 << 20 {
            return Err("too many sparse extension blocks".into());
        }
    }
    let size = gnu.real_size().map_err(|e| e.to_string())?;
    SparseMap::new(&pairs, size)
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// Parses PAX extended header records (`LEN KEY=VALUE\n`, LEN counting the whole record), so
/// values may hold newlines.
pub fn parse_pax(mut data: &[u8]) -> std::result::Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        if data.iter().all(|&b| b == 0) {
            break;
        }
        let sp = data
            .iter()
            .position(|&b| b == b' ')
            .ok_or("a record without a length")?;
        let len: usize = std::str::from_utf8(&data[..sp])
            .ok()
            .and_then(|l| l.parse().ok())
            .ok_or("a record with a bad length")?;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err("a record whose length does not match".into());
        }
        let kv = &data[sp + 1..len - 1];
        let eq = kv
            .iter()
            .position(|&b| b == b'=')
            .ok_or("a record without '='")?;
        let key = String::from_utf8_lossy(&kv[..eq]).into_owned();
        out.push((key, kv[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(out)
}

/// Counts the bytes taken from the input, for error messages.
struct Offset<R> {
    inner: R,
    n: Arc<AtomicU64>,
}

impl<R: Read> Read for Offset<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// The compression of a stream starting with `head`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
    Xz,
}

/// Detects the compression from a stream's first bytes.
pub fn detect(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else if head.starts_with(&[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]) {
        Compression::Xz
    } else {
        Compression::None
    }
}

/// The archive's tar stream, decompressed as its first bytes say.
fn decompress<'a>(
    mut input: Box<dyn Read + Send + 'a>,
    fail: &dyn Fn(String) -> Error,
) -> Result<Box<dyn Read + Send + 'a>> {
    let mut head = Vec::with_capacity(6);
    while head.len() < 6 {
        let mut b = [0u8; 6];
        let want = 6 - head.len();
        match read_some(&mut input, &mut b[..want]).map_err(|e| fail(e.to_string()))? {
            0 => break,
            n => head.extend_from_slice(&b[..n]),
        }
    }
    if head.is_empty() {
        return Err(fail("the input is empty, not a tar archive".into()));
    }
    let kind = detect(&head);
    let whole: Box<dyn Read + Send + 'a> = Box::new(io::Cursor::new(head).chain(input));
    let (name, decoder): (&str, Box<dyn Read + Send + 'a>) = match kind {
        Compression::None => return Ok(whole),
        // Several members or streams one after another (pigz; `cat a.xz b.xz`, pixz) are one
        // tar stream.
        Compression::Gzip => ("gzip", Box::new(flate2::read::MultiGzDecoder::new(whole))),
        Compression::Zstd => (
            "zstd",
            Box::new(zstd::stream::read::Decoder::new(whole).map_err(|e| fail(e.to_string()))?),
        ),
        Compression::Xz => (
            "xz",
            Box::new(liblzma::read::XzDecoder::new_multi_decoder(whole)),
        ),
    };
    Ok(Box::new(Named {
        name,
        inner: decoder,
    }))
}

/// A decoder whose errors name its compression (`xz: lzma data error`), so a message tells a
/// corrupt compressed stream from a corrupt tar inside it.
struct Named<R> {
    name: &'static str,
    inner: R,
}

impl<R: Read> Read for Named<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::Interrupted {
                e
            } else {
                io::Error::new(e.kind(), format!("{}: {e}", self.name))
            }
        })
    }
}

/// One path of the tree being built.
struct Node {
    entry: Entry,
    /// A directory's children, by name.
    children: BTreeMap<Vec<u8>, Node>,
}

/// The tree being built from the members, and the hardlink groups handed out.
struct Builder {
    root: Node,
    time: Time,
    next_group: u64,
}

fn implied(name: &[u8], t: Time) -> Node {
    Node {
        entry: Entry::made_dir(name, t),
        children: BTreeMap::new(),
    }
}

/// Why a member's name cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub enum Unsafe {
    /// A `..` climbs above the archive's root.
    Escapes,
    /// Deeper than [`MAX_DEPTH`].
    TooDeep,
}

/// A member name as path components inside the archive's root: a leading `/` and `.`
/// components removed, `..` resolved. The flag says whether the name was changed in a way
/// worth a warning (absolute, or with `..`).
pub fn normalize(name: &[u8]) -> std::result::Result<(Vec<Vec<u8>>, bool), Unsafe> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut changed = name.starts_with(b"/");
    for c in name.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                changed = true;
                if out.pop().is_none() {
                    return Err(Unsafe::Escapes);
                }
            }
            c => out.push(c.to_vec()),
        }
        if out.len() > MAX_DEPTH {
            return Err(Unsafe::TooDeep);
        }
    }
    Ok((out, changed))
}

/// A PAX time (`1700000000.123456789`, possibly negative).
fn pax_time(v: &[u8]) -> Option<Time> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let nanos: u32 = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse().ok()?
    };
    Some(match (neg, nanos) {
        (false, n) => Time(secs, n),
        (true, 0) => Time(-secs, 0),
        (true, n) => Time(-secs - 1, 1_000_000_000 - n),
    })
}

/// ACL entry tags of the Linux xattr format (`<linux/posix_acl.h>`).
const ACL_USER_OBJ: u16 = 0x01;
const ACL_USER: u16 = 0x02;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_GROUP: u16 = 0x08;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;
const ACL_UNDEFINED_ID: u32 = u32::MAX;
const ACL_XATTR_VERSION: u32 = 2;

/// Converts a POSIX ACL in text form (as `acl_to_text` and tar's `SCHILY.acl.*` write it:
/// `user::rw-,user:bob:r--:1000,group::r--,mask::r--,other::r--`, entries separated by commas
/// or newlines, `#` comments allowed) to the binary value of `system.posix_acl_access` or
/// `_default`. A named user or group is taken from the star-style fourth field (its id) when
/// present, else from a numeric qualifier, else looked up with `lookup(is_user, name)`.
pub fn acl_from_text(
    text: &str,
    lookup: &dyn Fn(bool, &str) -> Option<u32>,
) -> std::result::Result<Vec<u8>, String> {
    let mut entries: Vec<(u16, u32, u16)> = Vec::new();
    for item in text.split([',', '\n']) {
        let item = item.split('#').next().unwrap_or("").trim();
        if item.is_empty() {
            continue;
        }
        let item = item
            .strip_prefix("default:")
            .or_else(|| item.strip_prefix("d:"))
            .unwrap_or(item);
        let f: Vec<&str> = item.split(':').collect();
        if f.len() < 3 || f.len() > 4 {
            return Err(format!("bad ACL entry {item:?}"));
        }
        let (tag, qual, perms) = (f[0], f[1], f[2]);
        let mut p = 0u16;
        for c in perms.chars() {
            p |= match c {
                'r' => 4,
                'w' => 2,
                'x' => 1,
                '-' => 0,
                _ => return Err(format!("bad permissions in ACL entry {item:?}")),
            };
        }
        let user = matches!(tag, "user" | "u");
        let (obj, named) = match tag {
            "user" | "u" => (ACL_USER_OBJ, ACL_USER),
            "group" | "g" => (ACL_GROUP_OBJ, ACL_GROUP),
            "mask" | "m" => (ACL_MASK, ACL_MASK),
            "other" | "o" => (ACL_OTHER, ACL_OTHER),
            _ => return Err(format!("bad tag in ACL entry {item:?}")),
        };
        let entry = if qual.is_empty() || obj == ACL_MASK || obj == ACL_OTHER {
            (obj, ACL_UNDEFINED_ID, p)
        } else {
            let id = f
                .get(3)
                .and_then(|s| s.parse::<u32>().ok())
                .or_else(|| qual.parse::<u32>().ok())
                .or_else(|| lookup(user, qual))
                .ok_or_else(|| format!("unknown {} {qual:?} in ACL", tag))?;
            (named, id, p)
        };
        entries.push(entry);
    }
    entries.sort_by_key(|&(tag, id, _)| (tag, id));
    let mut out = Vec::with_capacity(4 + entries.len() * 8);
    out.extend_from_slice(&ACL_XATTR_VERSION.to_le_bytes());
    for (tag, id, perm) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    Ok(out)
}

/// The entries `(tag, perm)` of a binary POSIX ACL (as [`acl_from_text`] makes it).
fn acl_entries(acl: &[u8]) -> impl Iterator<Item = (u16, u16)> + '_ {
    acl.get(4..).unwrap_or(&[]).chunks_exact(8).map(|e| {
        (
            u16::from_le_bytes([e[0], e[1]]),
            u16::from_le_bytes([e[2], e[3]]),
        )
    })
}

/// Whether an access ACL holds only the owner, group and other entries: the mode says as much,
/// and the kernel keeps no xattr for it (GNU tar writes one for a directory that has only a
/// default ACL).
pub fn acl_is_minimal(acl: &[u8]) -> bool {
    acl_entries(acl).all(|(tag, _)| matches!(tag, ACL_USER_OBJ | ACL_GROUP_OBJ | ACL_OTHER))
}

/// The mode with its permission bits from an access ACL, as the kernel keeps them in step when
/// the ACL is set: owner from `user::`, group from `mask::` (else `group::`), other from
/// `other::`. bsdtar's header mode has `group::` in its group bits even when a mask differs.
pub fn mode_with_acl(mode: u32, acl: &[u8]) -> u32 {
    let (mut group_obj, mut mask) = (None, None);
    let mut m = mode;
    for (tag, perm) in acl_entries(acl) {
        let p = u32::from(perm & 7);
        match tag {
            ACL_USER_OBJ => m = (m & !0o700) | p << 6,
            ACL_OTHER => m = (m & !0o007) | p,
            ACL_GROUP_OBJ => group_obj = Some(p),
            ACL_MASK => mask = Some(p),
            _ => {}
        }
    }
    match mask.or(group_obj) {
        Some(g) => (m & !0o070) | g << 3,
        None => m,
    }
}

/// Looks up a user's or group's id by name on this host.
fn local_id(user: bool, name: &str) -> Option<u32> {
    if user {
        nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    } else {
        nix::unistd::Group::from_name(name)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
    }
}

/// Builds the generation's root from a tar archive. `time`: the generation's.
pub(super) fn root(w: &Walker<'_>, src: TarSource<'_>, time: &DateTime<Utc>) -> Result<Entry> {
    let offset = Arc::new(AtomicU64::new(0));
    let origin = src.origin;
    let fail = |reason: String| Error::TarRead {
        archive: origin.clone(),
        offset: offset.load(Ordering::Relaxed),
        reason,
    };
    let input = Box::new(Offset {
        inner: src.reader,
        n: offset.clone(),
    });
    let mut reader = decompress(input, &fail)?;
    let t = Time(time.timestamp(), time.timestamp_subsec_nanos());
    let mut b = Builder {
        root: implied(b"", t),
        time: t,
        next_group: 1,
    };
    // The blocks are read here rather than by the `tar` crate's iterator: a PAX `size` (members
    // of 8 GiB and more) and the extension blocks of an old-GNU sparse member decide where the
    // next header is, and the crate's raw mode knows neither. Extension headers (PAX `x`, GNU
    // `L`/`K`) are parsed here too: the crate's PAX parser splits records at newlines, and a PAX
    // value may hold newlines (GNU tar's ACL text does).
    let (mut first_zero, mut ended_by_marker) = (false, false);
    let mut ext = Extensions::default();
    loop {
        let mut h = ::tar::Header::new_old();
        let n = read_full(&mut reader, h.as_mut_bytes()).map_err(|e| fail(e.to_string()))?;
        if n == 0 {
            break;
        }
        if n < 512 {
            return Err(fail("the archive ends inside a header: truncated".into()));
        }
        if h.as_bytes().iter().all(|&b| b == 0) {
            first_zero = true;
            break;
        }
        check_sum(&h).map_err(&fail)?;
        use ::tar::EntryType as T;
        let et = h.entry_type();
        let extension = matches!(
            et,
            T::XHeader | T::XGlobalHeader | T::GNULongName | T::GNULongLink
        );
        let mut size = h
            .entry_size()
            .map_err(|e| fail(format!("header size: {e}")))?;
        if let Some(v) = ext
            .pax
            .iter()
            .rev()
            .find(|(k, _)| k == "size")
            .map(|(_, v)| v)
        {
            if !extension {
                size = String::from_utf8_lossy(v).trim().parse().map_err(|_| {
                    fail(format!("a bad PAX size {:?}", String::from_utf8_lossy(v)))
                })?;
            }
        }
        let gnu_map = if et == T::GNUSparse {
            Some(gnu_sparse_map(&h, &mut reader).map_err(|e| fail(format!("sparse member: {e}")))?)
        } else {
            None
        };
        let mut data = (&mut reader).take(size);
        match et {
            T::XHeader => {
                let d = read_small(&mut data, size, &fail)?;
                ext.pax = parse_pax(&d).map_err(|e| fail(format!("PAX header: {e}")))?;
            }
            T::GNULongName => ext.long_name = Some(trim_nul(read_small(&mut data, size, &fail)?)),
            T::GNULongLink => ext.long_link = Some(trim_nul(read_small(&mut data, size, &fail)?)),
            T::XGlobalHeader => {}
            _ => {
                let e = std::mem::take(&mut ext);
                b.member(w, &h, &mut data, size, gnu_map, e, &fail)?;
            }
        }
        // What the member did not use, and the padding to the next block.
        io::copy(&mut data, &mut io::sink()).map_err(|e| fail(e.to_string()))?;
        let left = data.limit();
        let pad = (512 - size % 512) % 512;
        let mut padding = [0u8; 512];
        let got = read_full(&mut reader, &mut padding[..pad as usize])
            .map_err(|e| fail(e.to_string()))?;
        if left > 0 || got < pad as usize {
            let name = String::from_utf8_lossy(&h.path_bytes()).into_owned();
            return Err(fail(format!("member {name:?} is cut short: truncated")));
        }
    }
    // What follows the first zero block (the second one, padding) must still be read, for a
    // compressed stream's checksum to be checked and to tell a clean end from a cut one.
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match read_some(&mut reader, &mut buf).map_err(|e| fail(e.to_string()))? {
            0 => break,
            _ => ended_by_marker = first_zero,
        }
    }
    if !ended_by_marker {
        return Err(fail(
            "the archive ends without its end-of-archive blocks: truncated".into(),
        ));
    }
    b.finish(w)
}

impl Builder {
    /// Reports a member made safe or left out.
    fn warn(&self, w: &Walker<'_>, name: &[u8], why: impl std::fmt::Display) {
        w.skip(Path::new(OsStr::from_bytes(name)), why);
    }

    /// Adds one member to the tree.
    #[allow(clippy::too_many_arguments)]
    fn member(
        &mut self,
        w: &Walker<'_>,
        h: &::tar::Header,
        data: &mut (dyn Read + Send),
        size: u64,
        gnu_map: Option<SparseMap>,
        ext: Extensions,
        fail: &dyn Fn(String) -> Error,
    ) -> Result<()> {
        use ::tar::EntryType as T;
        let et = h.entry_type();
        let mut pax: HashMap<String, Vec<u8>> = HashMap::new();
        let mut xattrs: Vec<Xattr> = Vec::new();
        // PAX sparse 0.0: offset and length records, in pairs, in order.
        let (mut offsets, mut lengths) = (Vec::new(), Vec::new());
        for (key, value) in ext.pax {
            let xattr = match key.strip_prefix("SCHILY.xattr.") {
                Some(name) => Some((name.as_bytes().to_vec(), value)),
                None => match key.strip_prefix("LIBARCHIVE.xattr.") {
                    // bsdtar's form: the name URL-encoded, the value in base64.
                    Some(name) => match (url_decode(name), base64_decode(&value)) {
                        (Some(n), Some(v)) => Some((n, v)),
                        _ => None,
                    },
                    None => {
                        let num = || String::from_utf8_lossy(&value).trim().parse::<u64>().ok();
                        match key.as_str() {
                            "GNU.sparse.offset" => offsets.push(num()),
                            "GNU.sparse.numbytes" => lengths.push(num()),
                            _ => {}
                        }
                        pax.insert(key, value);
                        None
                    }
                },
            };
            if let Some((name, value)) = xattr {
                xattrs.retain(|x| x.name != name);
                xattrs.push(Xattr { name, value });
            }
        }
        let raw = match (pax.get("GNU.sparse.name").or(pax.get("path")).cloned()).or(ext.long_name)
        {
            Some(p) => p,
            None => h.path_bytes().into_owned(),
        };
        let link_name = match pax.get("linkpath").cloned().or(ext.long_link) {
            Some(l) => Some(l),
            None => h.link_name_bytes().map(|l| l.into_owned()),
        };
        let sparse = match gnu_map {
            Some(m) => Some(m),
            None => pax_sparse_map(&pax, &offsets, &lengths, data)
                .map_err(|e| fail(format!("member {}: sparse map: {e}", show(&raw))))?,
        };
        for (key, xname) in [
            ("SCHILY.acl.access", "system.posix_acl_access"),
            ("SCHILY.acl.default", "system.posix_acl_default"),
        ] {
            if let Some(text) = pax.get(key) {
                match acl_from_text(&String::from_utf8_lossy(text), &local_id) {
                    Ok(v) => {
                        xattrs.retain(|x| x.name != xname.as_bytes());
                        let empty = v.len() <= 4;
                        let minimal = key == "SCHILY.acl.access" && acl_is_minimal(&v);
                        if !empty && !minimal {
                            xattrs.push(Xattr {
                                name: xname.as_bytes().to_vec(),
                                value: v,
                            });
                        }
                    }
                    Err(why) => self.warn(w, &raw, format!("ACL not kept: {why}")),
                }
            }
        }
        xattrs.sort_by(|a, b| a.name.cmp(&b.name));

        let (comps, changed) = match normalize(&raw) {
            Ok(r) => r,
            Err(Unsafe::Escapes) => {
                self.warn(w, &raw, "left out: `..` leads outside the archive's root");
                return Ok(());
            }
            Err(Unsafe::TooDeep) => {
                self.warn(w, &raw, format!("left out: deeper than {MAX_DEPTH} levels"));
                return Ok(());
            }
        };
        if changed {
            let shown = String::from_utf8_lossy(&comps.join(&b'/')).into_owned();
            self.warn(w, &raw, format!("unsafe name, stored as {shown:?}"));
        }
        if excluded(w, &comps) {
            return Ok(());
        }
        let kind = match et {
            T::Regular | T::Continuous | T::GNUSparse => Kind::File,
            T::Directory => Kind::Dir,
            T::Symlink => Kind::Symlink,
            T::Char => Kind::Chardev,
            T::Block => Kind::Blockdev,
            T::Fifo => Kind::Fifo,
            T::Link => return self.hardlink(w, link_name, &raw, comps),
            other => {
                self.warn(
                    w,
                    &raw,
                    format!("left out: member type {other:?} not supported"),
                );
                return Ok(());
            }
        };
        let num = |r: io::Result<u64>, what: &str| -> Result<u32> {
            r.map_err(|e| fail(format!("member {}: {what}: {e}", show(&raw))))
                .and_then(|v| {
                    u32::try_from(v)
                        .map_err(|_| fail(format!("member {}: {what} {v} too large", show(&raw))))
                })
        };
        let mut mode = num(h.mode().map(u64::from), "mode")? & 0o7777;
        if let Some(acl) = xattrs.iter().find(|x| x.name == b"system.posix_acl_access") {
            mode = mode_with_acl(mode, &acl.value);
        }
        let pax_id = |key: &str| {
            pax.get(key)
                .and_then(|v| String::from_utf8_lossy(v).trim().parse::<u64>().ok())
        };
        let uid = num(pax_id("uid").map_or_else(|| h.uid(), Ok), "uid")?;
        let gid = num(pax_id("gid").map_or_else(|| h.gid(), Ok), "gid")?;
        let name_of = |key: &str, header: Option<&[u8]>| -> Option<String> {
            let v = pax.get(key).map(|v| v.as_slice()).or(header)?;
            (!v.is_empty()).then(|| String::from_utf8_lossy(v).into_owned())
        };
        let user = name_of("uname", h.username_bytes());
        let group = name_of("gname", h.groupname_bytes());
        let mtime = match pax.get("mtime").and_then(|v| pax_time(v)) {
            Some(t) => t,
            None => {
                let s = h
                    .mtime()
                    .map_err(|e| fail(format!("member {}: mtime: {e}", show(&raw))))?;
                Time(i64::try_from(s).unwrap_or(i64::MAX), 0)
            }
        };
        let atime = pax.get("atime").and_then(|v| pax_time(v)).unwrap_or(mtime);
        let ctime = pax.get("ctime").and_then(|v| pax_time(v)).unwrap_or(mtime);
        let rdev = if matches!(kind, Kind::Chardev | Kind::Blockdev) {
            let major = h.device_major().ok().flatten().unwrap_or(0);
            let minor = h.device_minor().ok().flatten().unwrap_or(0);
            Some(libc::makedev(major, minor))
        } else {
            None
        };
        let target = if kind == Kind::Symlink {
            match link_name {
                Some(t) if !t.is_empty() => Some(t),
                _ => {
                    self.warn(w, &raw, "left out: symlink without a target");
                    return Ok(());
                }
            }
        } else {
            None
        };
        let name = comps.last().cloned().unwrap_or_default();
        let mut e = Entry {
            kind,
            user,
            group,
            atime,
            rdev,
            xattrs,
            target,
            ..Entry::made_file(&name, mode, uid, gid, mtime, ctime)
        };
        match kind {
            Kind::Symlink => {
                // As a directory ingest records it (see `Walker::entry`).
                e.atime = e.mtime;
                e.size = e.target.as_ref().map_or(0, |t| t.len() as u64);
            }
            Kind::File => {
                let (list, read) = read_member(w, data, size, sparse, &raw, fail)?;
                e.size = list.size();
                e.holes = Some(list.hole_bytes()).filter(|&h| h > 0);
                w.stats.read.fetch_add(read, Ordering::Relaxed);
                w.progress.files.fetch_add(1, Ordering::Relaxed);
                w.set_chunks(&mut e, list)?;
                w.w.maybe_checkpoint()?;
            }
            _ => {}
        }
        self.place(w, &raw, comps, e);
        Ok(())
    }

    /// Puts an entry at `comps`, creating implied directories; the last member wins.
    fn place(&mut self, w: &Walker<'_>, raw: &[u8], comps: Vec<Vec<u8>>, mut e: Entry) {
        let Some((name, parents)) = comps.split_last() else {
            if e.kind == Kind::Dir {
                e.name = Vec::new();
                self.root.entry = e;
            } else {
                self.warn(
                    w,
                    raw,
                    "left out: only a directory can be the archive's root",
                );
            }
            return;
        };
        let t = self.time;
        let mut cur = &mut self.root;
        for c in parents {
            let child = cur
                .children
                .entry(c.clone())
                .or_insert_with(|| implied(c, t));
            if child.entry.kind != Kind::Dir {
                *child = implied(c, t);
            }
            cur = child;
        }
        e.name = name.clone();
        match cur.children.get_mut(name) {
            Some(old) if old.entry.kind == Kind::Dir && e.kind == Kind::Dir => old.entry = e,
            _ => {
                cur.children.insert(
                    name.clone(),
                    Node {
                        entry: e,
                        children: BTreeMap::new(),
                    },
                );
            }
        }
    }

    fn get_mut(&mut self, comps: &[Vec<u8>]) -> Option<&mut Node> {
        let mut cur = &mut self.root;
        for c in comps {
            cur = cur.children.get_mut(c)?;
        }
        Some(cur)
    }

    /// A hardlink member: a second name for an earlier member.
    fn hardlink(
        &mut self,
        w: &Walker<'_>,
        target: Option<Vec<u8>>,
        raw: &[u8],
        comps: Vec<Vec<u8>>,
    ) -> Result<()> {
        let Some(target) = target else {
            self.warn(w, raw, "left out: hardlink without a target");
            return Ok(());
        };
        let tcomps = match normalize(&target) {
            Ok((c, _)) => c,
            Err(_) => {
                self.warn(
                    w,
                    raw,
                    format!(
                        "left out: hardlink to {} leads outside the archive's root",
                        show(&target)
                    ),
                );
                return Ok(());
            }
        };
        let group = self.next_group;
        let e = match self.get_mut(&tcomps) {
            Some(n) if n.entry.kind != Kind::Dir && !tcomps.is_empty() => {
                if n.entry.kind == Kind::File && n.entry.link.is_none() {
                    n.entry.link = Some(group);
                }
                n.entry.clone()
            }
            _ => {
                self.warn(
                    w,
                    raw,
                    format!(
                        "left out: hardlink to {}, which is no earlier file of the archive",
                        show(&target)
                    ),
                );
                return Ok(());
            }
        };
        if e.link == Some(group) {
            self.next_group += 1;
        }
        if excluded(w, &comps) {
            return Ok(());
        }
        self.place(w, raw, comps, e);
        Ok(())
    }

    /// Writes the tree bottom-up and records the hardlink counts; returns the root.
    fn finish(self, w: &Walker<'_>) -> Result<Entry> {
        fn count(n: &Node, counts: &mut HashMap<u64, u32>) {
            if let Some(g) = n.entry.link {
                *counts.entry(g).or_insert(0) += 1;
            }
            for c in n.children.values() {
                count(c, counts);
            }
        }
        fn store(w: &Walker<'_>, n: Node, counts: &HashMap<u64, u32>) -> Result<Entry> {
            let mut e = n.entry;
            let s = &w.stats;
            match e.kind {
                Kind::Dir => {
                    let mut entries = Vec::with_capacity(n.children.len());
                    for (_, c) in n.children {
                        entries.push(store(w, c, counts)?);
                    }
                    s.dirs.fetch_add(1, Ordering::Relaxed);
                    e.tree = Some(w.store_dir(entries)?);
                }
                Kind::File => {
                    if e.link
                        .is_some_and(|g| counts.get(&g).copied().unwrap_or(0) < 2)
                    {
                        e.link = None;
                    }
                    s.files.fetch_add(1, Ordering::Relaxed);
                    s.logical.fetch_add(e.size, Ordering::Relaxed);
                }
                Kind::Symlink => {
                    s.symlinks.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    s.others.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(e)
        }
        let mut counts = HashMap::new();
        count(&self.root, &mut counts);
        counts.retain(|_, c| *c > 1);
        let root = store(w, self.root, &counts)?;
        lock(&w.links).counts.extend(counts);
        Ok(root)
    }
}

/// Whether the member at `comps`, or a directory above it, is excluded.
fn excluded(w: &Walker<'_>, comps: &[Vec<u8>]) -> bool {
    let mut rel = Vec::new();
    for c in comps {
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(c);
        if w.excludes.excluded(c, &rel) {
            return true;
        }
    }
    false
}

fn show(name: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(name))
}

/// Reads a regular member's data through the stream pipeline; a sparse member's through the
/// mapped one, its gaps as holes. A member cut short is found by the caller (its data reader
/// has bytes left).
fn read_member(
    w: &Walker<'_>,
    data: &mut (dyn Read + Send),
    size: u64,
    sparse: Option<SparseMap>,
    raw: &[u8],
    fail: &dyn Fn(String) -> Error,
) -> Result<(WrittenList, u64)> {
    let chunker = w.repo.config().chunker;
    let reader = Box::new(Counted {
        inner: data,
        bytes: &w.progress.bytes,
    });
    let result = match sparse {
        Some(m) => {
            if m.data_bytes() > size {
                return Err(fail(format!(
                    "member {}: its sparse map holds {} bytes of data, the member {size}",
                    show(raw),
                    m.data_bytes()
                )));
            }
            read_mapped(reader, m.regions, m.size, &chunker, w.w, &w.hashers)
        }
        None => read_stream(reader, &chunker, w.w, &w.hashers),
    };
    match result {
        Ok(r) => Ok(r),
        Err(e) => {
            // A failure of the repository side is reported as itself.
            w.w.check()?;
            Err(fail(format!("member {}: {e}", show(raw))))
        }
    }
}

/// The sparse map a PAX member's records give (GNU tar `--sparse`, formats 0.0, 0.1 and 1.0), if
/// any; for 1.0 the map is read from the start of `data`.
fn pax_sparse_map(
    pax: &HashMap<String, Vec<u8>>,
    offsets: &[Option<u64>],
    lengths: &[Option<u64>],
    data: &mut dyn Read,
) -> std::result::Result<Option<SparseMap>, String> {
    let num = |key: &str| -> std::result::Result<Option<u64>, String> {
        match pax.get(key) {
            None => Ok(None),
            Some(v) => String::from_utf8_lossy(v)
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| format!("a bad {key}")),
        }
    };
    let major = num("GNU.sparse.major")?;
    if major == Some(1) {
        let size = num("GNU.sparse.realsize")?.ok_or("no GNU.sparse.realsize")?;
        let (pairs, _) = parse_sparse_1_0(data)?;
        return SparseMap::new(&pairs, size).map(Some);
    }
    if let Some(m) = major {
        return Err(format!("sparse format {m}.x is not known"));
    }
    let Some(size) = num("GNU.sparse.size")? else {
        return Ok(None);
    };
    let pairs: Vec<(u64, u64)> = if let Some(map) = pax.get("GNU.sparse.map") {
        // 0.1: "offset,length,offset,length,…"
        let nums: Vec<u64> = String::from_utf8_lossy(map)
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .map_err(|_| "a bad GNU.sparse.map".to_string())
            })
            .collect::<std::result::Result<_, _>>()?;
        if !nums.len().is_multiple_of(2) {
            return Err("GNU.sparse.map has an odd count".into());
        }
        nums.chunks(2).map(|p| (p[0], p[1])).collect()
    } else {
        // 0.0: GNU.sparse.offset and GNU.sparse.numbytes records in pairs.
        if offsets.len() != lengths.len() {
            return Err("unpaired GNU.sparse.offset/numbytes records".into());
        }
        (offsets.iter().zip(lengths))
            .map(|(o, l)| {
                o.zip(*l)
                    .ok_or("a bad GNU.sparse.offset or numbytes".to_string())
            })
            .collect::<std::result::Result<_, _>>()?
    };
    SparseMap::new(&pairs, size).map(Some)
}

/// Decodes `%XX` escapes (bsdtar's `LIBARCHIVE.xattr.` names).
pub fn url_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Decodes standard base64, with or without `=` padding (bsdtar's `LIBARCHIVE.xattr.` values).
pub fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s: Vec<u8> = s.iter().copied().filter(|&c| c != b'=').collect();
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for group in s.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in group.iter().enumerate() {
            n |= val(c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..group.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_compression() {
        assert_eq!(detect(&[0x1f, 0x8b, 8, 0]), Compression::Gzip);
        assert_eq!(detect(&[0x28, 0xb5, 0x2f, 0xfd, 0]), Compression::Zstd);
        assert_eq!(detect(b"\xfd7zXZ\0"), Compression::Xz);
        assert_eq!(detect(b"etc/"), Compression::None);
    }

    #[test]
    fn normalizes_names() {
        let c = |s: &str| normalize(s.as_bytes());
        let v = |xs: &[&str]| xs.iter().map(|x| x.as_bytes().to_vec()).collect::<Vec<_>>();
        assert_eq!(c("./etc/hosts"), Ok((v(&["etc", "hosts"]), false)));
        assert_eq!(c("etc//./x/"), Ok((v(&["etc", "x"]), false)));
        assert_eq!(c("/etc/shadow"), Ok((v(&["etc", "shadow"]), true)));
        assert_eq!(c("a/../b"), Ok((v(&["b"]), true)));
        assert_eq!(c("./"), Ok((vec![], false)));
        assert_eq!(c("../x"), Err(Unsafe::Escapes));
        assert_eq!(c("a/../../x"), Err(Unsafe::Escapes));
        assert_eq!(c(&"a/".repeat(MAX_DEPTH + 1)), Err(Unsafe::TooDeep));
    }

    #[test]
    fn parses_pax_records_with_newlines() {
        let rec = |k: &str, v: &str| {
            let body = format!(" {k}={v}\n");
            let mut n = body.len() + 1;
            if (n.to_string().len() + body.len()) != n {
                n += 1;
            }
            format!("{n}{body}")
        };
        let acl = "user::rw-\nuser:12345:r--\nother::---\n";
        let data = format!("{}{}", rec("SCHILY.acl.access", acl), rec("path", "etc/x"));
        let p = parse_pax(data.as_bytes()).unwrap();
        assert_eq!(p[0], ("SCHILY.acl.access".into(), acl.as_bytes().to_vec()));
        assert_eq!(p[1], ("path".into(), b"etc/x".to_vec()));
        assert!(parse_pax(b"99 path=x\n").is_err());
        assert!(parse_pax(b"x path=x\n").is_err());
    }

    #[test]
    fn decodes_libarchive_xattrs_and_sparse_maps() {
        assert_eq!(url_decode("user.a%3Db%25").unwrap(), b"user.a=b%");
        assert!(url_decode("user.%zz").is_none());
        assert_eq!(base64_decode(b"ZnJvbSBlc3hpMQ==").unwrap(), b"from esxi1");
        assert_eq!(base64_decode(b"ZnJvbSBlc3hpMQ").unwrap(), b"from esxi1");
        assert_eq!(base64_decode(b"").unwrap(), b"");
        assert!(base64_decode(b"Zm!v").is_none());
        let mut data: &[u8] = b"2\n0\n10\n4096\n5\n";
        let mut padded = data.to_vec();
        padded.resize(512, 0);
        padded.extend_from_slice(b"DATA");
        data = &padded;
        let (pairs, used) = parse_sparse_1_0(&mut data).unwrap();
        assert_eq!((pairs.as_slice(), used), (&[(0, 10), (4096, 5)][..], 512));
        assert_eq!(data, b"DATA");
        let m = SparseMap::new(&pairs, 8192).unwrap();
        assert_eq!(m.regions, [(0, 10), (4096, 4101)]);
        assert!(SparseMap::new(&[(10, 5), (0, 1)], 100).is_err());
        assert!(SparseMap::new(&[(0, 101)], 100).is_err());
    }

    #[test]
    fn parses_pax_times() {
        assert_eq!(pax_time(b"1700000000"), Some(Time(1_700_000_000, 0)));
        assert_eq!(
            pax_time(b"1700000000.123456789"),
            Some(Time(1_700_000_000, 123_456_789))
        );
        assert_eq!(pax_time(b"12.5"), Some(Time(12, 500_000_000)));
        assert_eq!(pax_time(b"-1.25"), Some(Time(-2, 750_000_000)));
        assert_eq!(pax_time(b"x"), None);
    }

    #[test]
    fn converts_text_acls() {
        let none = |_: bool, _: &str| None;
        // What setfacl -m u:12345:r,g:54321:rw leaves on a 0640 file, as GNU tar stores it.
        let gnu = "user::rw-\nuser:12345:r--\ngroup::r--\ngroup:54321:rw-\nmask::rw-\nother::---\n";
        let star = "user::rw-,user:bob:r--:12345,group::r--,group:54321:rw-,mask::rw-,other::---";
        let a = acl_from_text(gnu, &none).unwrap();
        assert_eq!(acl_from_text(star, &none).unwrap(), a);
        let mut want = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (1u16, 6u16, u32::MAX),
            (2, 4, 12345),
            (4, 4, u32::MAX),
            (8, 6, 54321),
            (0x10, 6, u32::MAX),
            (0x20, 0, u32::MAX),
        ] {
            want.extend_from_slice(&tag.to_le_bytes());
            want.extend_from_slice(&perm.to_le_bytes());
            want.extend_from_slice(&id.to_le_bytes());
        }
        assert_eq!(a, want);
        // Names are looked up; comments and a `default:` prefix are ignored.
        let bob = |user: bool, n: &str| (user && n == "bob").then_some(7);
        let b = acl_from_text("default:user:bob:r-x #effective:r--\nother::r--", &bob).unwrap();
        assert_eq!(&b[4..12], &[2, 0, 5, 0, 7, 0, 0, 0]);
        assert!(acl_from_text("user:nobody-here:r--", &none).is_err());
        assert!(acl_from_text("wheel::r--", &none).is_err());
        assert!(acl_from_text("user::rwz", &none).is_err());
    }

    #[test]
    fn an_access_acl_sets_the_mode_and_a_minimal_one_is_no_acl() {
        let none = |_: bool, _: &str| None;
        // bsdtar's header mode for a file with this ACL is 0644 (group bits from `group::`);
        // the kernel's is 0664 (from `mask::`).
        let star =
            "user::rw-,group::r--,other::r--,user:1234:r--:1234,group:5678:rw-:5678,mask::rw-";
        let a = acl_from_text(star, &none).unwrap();
        assert!(!acl_is_minimal(&a));
        assert_eq!(mode_with_acl(0o100644, &a), 0o100664);
        assert_eq!(
            mode_with_acl(0o4644, &a),
            0o4664,
            "setuid and type bits stay"
        );
        // GNU tar's access ACL of a directory that has only a default ACL.
        let m = acl_from_text("user::rwx\ngroup::r-x\nother::r-x\n", &none).unwrap();
        assert!(acl_is_minimal(&m));
        assert_eq!(mode_with_acl(0o755, &m), 0o755);
    }
}
