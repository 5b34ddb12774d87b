//! A tar archive or stream as a generation's tree (`backtree ingest --tar FILE|-`).
//!
//! The input is read once, front to back, and never seeks: it may be a pipe, and a compressed
//! stream cannot seek anyway. Its compression is found from its first bytes (gzip `1f 8b`,
//! zstd `28 b5 2f fd`; xz `fd 37 7a 58 5a 00` is recognised and refused as unsupported), then
//! the `tar` crate parses the members (ustar, GNU long names and links, PAX headers).
//!
//! - **Data**: each regular member's bytes go through the writer's stream pipeline
//!   ([`super::read::read_stream`]) as the member streams by, so a file cut from a tar and the
//!   same file cut from a directory have the same chunks and deduplicate. The `tar` crate's
//!   member readers borrow the archive and are not `Send`, so a member up to one batch is read
//!   into memory first, and a larger one is handed to the pipeline through a bounded channel
//!   from a scoped thread.
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
//!   ingest reads from disk ([`acl_from_text`]).
//! - **Hardlinks**: a link member shares the content and metadata of the earlier member it
//!   names; both get one link group, and the generation's link table counts the members.
//! - **Hostile members** are made safe and reported as skipped paths (so they appear in the
//!   manifest and the ingest's exit status says so): a leading `/` is removed, `.` components
//!   dropped, `..` resolved within the archive; a member whose `..` would climb above the root
//!   is left out, as is a hardlink whose target would, or names no earlier member. A symlink's
//!   target is data and is kept as it is: nothing ever follows it while the tree is built.
//! - **Errors**: a truncated or corrupt archive (or compression) fails the ingest with the byte
//!   offset reached in the input, before any manifest is written: nothing is published.
//! - **Extension headers** (PAX `x`, GNU `L`/`K`) are read here, with the crate in raw mode:
//!   its own PAX parser splits records at newlines, and GNU tar's ACL text holds newlines.
//! - **Not supported yet**: sparse members (GNU `S`, PAX `GNU.sparse.*`) are left out with a
//!   warning (an old-GNU sparse member with more than four holes has extension blocks that make
//!   the archive fail as corrupt); a PAX `size` that differs from the header's (members of
//!   8 GiB and more in PAX archives) fails the ingest; `LIBARCHIVE.xattr.*` records (bsdtar
//!   also writes the `SCHILY.xattr.*` form, which is used) and NFSv4 ACLs are ignored.

use super::read::{read_stream, BATCH_BYTES};
use super::{lock, Walker};
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
use std::sync::{mpsc, Arc};

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
fn read_small<R: Read>(
    m: &mut ::tar::Entry<'_, R>,
    fail: &dyn Fn(String) -> Error,
) -> Result<Vec<u8>> {
    let size = m.size();
    if size > 1 << 20 {
        return Err(fail(format!("an extension header of {size} bytes")));
    }
    let mut data = Vec::with_capacity(size as usize);
    m.read_to_end(&mut data)
        .map_err(|e| fail(format!("extension header: {e}")))?;
    if (data.len() as u64) < size {
        return Err(fail("an extension header is cut short: truncated".into()));
    }
    Ok(data)
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
    origin: &str,
    fail: &dyn Fn(String) -> Error,
) -> Result<Box<dyn Read + Send + 'a>> {
    let mut head = Vec::with_capacity(6);
    while head.len() < 6 {
        let mut b = [0u8; 6];
        let want = 6 - head.len();
        match input.read(&mut b[..want]) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail(e.to_string())),
        }
    }
    if head.is_empty() {
        return Err(fail("the input is empty, not a tar archive".into()));
    }
    let kind = detect(&head);
    let whole: Box<dyn Read + Send + 'a> = Box::new(io::Cursor::new(head).chain(input));
    Ok(match kind {
        Compression::None => whole,
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(whole)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(whole).map_err(|e| fail(e.to_string()))?)
        }
        Compression::Xz => {
            return Err(Error::TarUnsupported {
                archive: origin.to_string(),
                reason: "xz compression is not supported yet; decompress it first \
                         (`xz -dc FILE | backtree ingest … --tar -`)"
                    .into(),
            })
        }
    })
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

/// A reader over the blocks a member's copier sends.
struct ChanReader {
    rx: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChanReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(b) => {
                    self.buf = b;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
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
    let reader = decompress(input, &origin, &fail)?;
    let mut archive = ::tar::Archive::new(reader);
    let t = Time(time.timestamp(), time.timestamp_subsec_nanos());
    let mut b = Builder {
        root: implied(b"", t),
        time: t,
        next_group: 1,
    };
    let mut ended_by_marker = false;
    {
        // Raw: extension headers come to us as members and are parsed here, because the
        // crate's PAX parser splits records at newlines, and a PAX value may hold newlines
        // (GNU tar's ACL text does).
        let entries = archive
            .entries()
            .map_err(|e| fail(e.to_string()))?
            .raw(true);
        let mut ext = Extensions::default();
        for item in entries {
            let mut m = item.map_err(|e| fail(e.to_string()))?;
            use ::tar::EntryType as T;
            match m.header().entry_type() {
                T::XHeader => {
                    let data = read_small(&mut m, &fail)?;
                    ext.pax = parse_pax(&data).map_err(|e| fail(format!("PAX header: {e}")))?;
                }
                T::GNULongName => ext.long_name = Some(trim_nul(read_small(&mut m, &fail)?)),
                T::GNULongLink => ext.long_link = Some(trim_nul(read_small(&mut m, &fail)?)),
                T::XGlobalHeader => {}
                _ => b.member(w, &mut m, std::mem::take(&mut ext), &fail)?,
            }
        }
    }
    // The crate stops at the first zero block, or at the end of the input: what follows the
    // first zero block (the second one, padding) must still be read, for a compressed stream's
    // checksum to be checked and to tell a clean end from a cut one.
    let mut rest = archive.into_inner();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match rest.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => ended_by_marker = true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail(e.to_string())),
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
    fn member<R: Read>(
        &mut self,
        w: &Walker<'_>,
        m: &mut ::tar::Entry<'_, R>,
        ext: Extensions,
        fail: &dyn Fn(String) -> Error,
    ) -> Result<()> {
        use ::tar::EntryType as T;
        let et = m.header().entry_type();
        let mut pax: HashMap<String, Vec<u8>> = HashMap::new();
        let mut xattrs: Vec<Xattr> = Vec::new();
        for (key, value) in ext.pax {
            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                xattrs.retain(|x| x.name != name.as_bytes());
                xattrs.push(Xattr {
                    name: name.as_bytes().to_vec(),
                    value,
                });
            } else {
                pax.insert(key, value);
            }
        }
        let raw = match pax.get("path").cloned().or(ext.long_name) {
            Some(p) => p,
            None => m.path_bytes().into_owned(),
        };
        let link_name = match pax.get("linkpath").cloned().or(ext.long_link) {
            Some(l) => Some(l),
            None => m.link_name_bytes().map(|l| l.into_owned()),
        };
        if let Some(size) = pax.get("size") {
            let size = String::from_utf8_lossy(size);
            if size.trim().parse::<u64>().ok() != Some(m.size()) {
                return Err(fail(format!(
                    "member {}: a PAX size ({size}) other than the header's is not supported yet",
                    show(&raw)
                )));
            }
        }
        for (key, xname) in [
            ("SCHILY.acl.access", "system.posix_acl_access"),
            ("SCHILY.acl.default", "system.posix_acl_default"),
        ] {
            if let Some(text) = pax.get(key) {
                match acl_from_text(&String::from_utf8_lossy(text), &local_id) {
                    Ok(v) => {
                        xattrs.retain(|x| x.name != xname.as_bytes());
                        xattrs.push(Xattr {
                            name: xname.as_bytes().to_vec(),
                            value: v,
                        });
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
        if et == T::GNUSparse || pax.keys().any(|k| k.starts_with("GNU.sparse.")) {
            self.warn(w, &raw, "left out: sparse members are not supported yet");
            return Ok(());
        }

        let h = m.header();
        let kind = match et {
            T::Regular | T::Continuous => Kind::File,
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
        let mode = num(h.mode().map(u64::from), "mode")? & 0o7777;
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
            name,
            kind,
            mode,
            uid,
            gid,
            user,
            group,
            mtime,
            atime,
            ctime,
            size: 0,
            ino: 0,
            link: None,
            rdev,
            xattrs,
            tree: None,
            target,
            chunks: None,
            chunk_list: None,
            holes: None,
            gzip: None,
        };
        match kind {
            Kind::Symlink => {
                // As a directory ingest records it (see `Walker::entry`).
                e.atime = e.mtime;
                e.size = e.target.as_ref().map_or(0, |t| t.len() as u64);
            }
            Kind::File => {
                let size = m.size();
                let (list, read) = read_member(w, m, size, &raw, fail)?;
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

/// Reads a regular member's data through the stream pipeline.
fn read_member<R: Read>(
    w: &Walker<'_>,
    m: &mut ::tar::Entry<'_, R>,
    size: u64,
    raw: &[u8],
    fail: &dyn Fn(String) -> Error,
) -> Result<(WrittenList, u64)> {
    let chunker = w.repo.config().chunker;
    let short = |got: u64| {
        fail(format!(
            "member {} ends after {got} of its {size} bytes: truncated",
            show(raw)
        ))
    };
    let result = if size <= BATCH_BYTES as u64 {
        let mut data = Vec::with_capacity(size as usize);
        m.read_to_end(&mut data)
            .map_err(|e| fail(format!("member {}: {e}", show(raw))))?;
        if (data.len() as u64) < size {
            return Err(short(data.len() as u64));
        }
        w.progress
            .bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        read_stream(Box::new(io::Cursor::new(data)), &chunker, w.w, &w.hashers)
    } else {
        // The member's reader is not `Send`: copy its blocks to the pipeline on a thread.
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(4);
        std::thread::scope(|s| -> Result<io::Result<(WrittenList, u64)>> {
            let reader = ChanReader {
                rx,
                buf: Vec::new(),
                pos: 0,
            };
            let chunker = &chunker;
            let job = s.spawn(move || read_stream(Box::new(reader), chunker, w.w, &w.hashers));
            let mut got = 0u64;
            let copied = loop {
                let mut block = vec![0u8; 1 << 20];
                match m.read(&mut block) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        block.truncate(n);
                        got += n as u64;
                        w.progress.bytes.fetch_add(n as u64, Ordering::Relaxed);
                        if tx.send(block).is_err() {
                            break Ok(()); // the pipeline failed: its error is below
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(fail(format!("member {}: {e}", show(raw)))),
                }
            };
            drop(tx);
            let r = job.join().map_err(|_| Error::TaskFailed {
                what: "reading a tar member",
                reason: "the chunking thread panicked".into(),
            })?;
            copied?;
            if got < size {
                return Err(short(got));
            }
            Ok(r)
        })?
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
}
