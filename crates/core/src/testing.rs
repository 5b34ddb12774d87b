//! Test support shared by this crate's tests, the CLI's tests and the mount's tests: a source
//! tree with every file type and edge case, and a checker that compares a generation with its
//! source field by field. Not part of the stable API.

use crate::repo::Repository;
use crate::tree::{Entry, Kind};
use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Deterministic pseudo-random bytes (BLAKE3 in XOF mode: fast even in debug builds).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// Pseudo-random but compressible bytes (text-like).
pub fn texty_bytes(seed: u64, len: usize) -> Vec<u8> {
    let words = [
        &b"backup "[..],
        b"tree ",
        b"chunk ",
        b"generation ",
        b"host\n",
        b"restore ",
    ];
    let r = random_bytes(seed, len / 4 + 1);
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(words[r[i % r.len()] as usize % words.len()]);
        i += 1;
    }
    out.truncate(len);
    out
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

/// Sets atime and mtime with nanoseconds without following symlinks.
pub fn set_times(p: &Path, atime: (i64, i64), mtime: (i64, i64)) {
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    let c = cstr(p);
    // SAFETY: valid C string and a two-element timespec array, as utimensat requires.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}", p.display());
}

fn mknod(p: &Path, mode: libc::mode_t, dev: libc::dev_t) -> bool {
    let c = cstr(p);
    // SAFETY: valid C string.
    unsafe { libc::mknod(c.as_ptr(), mode, dev) == 0 }
}

fn lchown(p: &Path, uid: u32, gid: u32) -> bool {
    let c = cstr(p);
    // SAFETY: valid C string.
    unsafe { libc::lchown(c.as_ptr(), uid, gid) == 0 }
}

/// A POSIX ACL in the kernel's xattr format (version 2): user::rw-, user:1000:r--,
/// group::r--, mask::r--, other::r--.
pub fn sample_acl() -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (1u16, 6u16, u32::MAX),
        (2, 4, 1000),
        (4, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 4, u32::MAX),
    ] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// What the fixture could create on this machine (device nodes and ownership need root).
#[derive(Debug, Default)]
pub struct FixtureInfo {
    pub devices: bool,
    pub acls: bool,
    pub capability: bool,
    pub sparse: bool,
}

/// Builds a tree under `root` with every file type and edge case backtree must keep.
/// `big_dir` adds a directory with more entries than one tree page holds.
pub fn build_fixture(root: &Path, big_dir: bool) -> FixtureInfo {
    let mut info = FixtureInfo::default();
    let w = |p: &Path, data: &[u8]| fs::write(p, data).expect("write fixture file");
    fs::create_dir_all(root.join("dir/sub/deeper")).expect("mkdir");
    w(&root.join("empty"), b"");
    w(&root.join("small.txt"), b"hello backtree\n");
    w(&root.join("dir/text"), &texty_bytes(1, 300_000));
    w(
        &root.join("dir/sub/random.bin"),
        &random_bytes(2, 3_000_000),
    );
    w(&root.join("multi.bin"), &texty_bytes(3, 6_000_000));

    // Sparse: data, a hole, data, and a trailing hole; and a file that is one hole.
    {
        let mut f = File::create(root.join("sparse.img")).expect("sparse");
        f.write_all(&random_bytes(4, 4096)).expect("w");
        f.seek(SeekFrom::Start(10 << 20)).expect("seek");
        f.write_all(&texty_bytes(5, 100_000)).expect("w");
        f.set_len(64 << 20).expect("set_len");
        File::create(root.join("allhole"))
            .expect("h")
            .set_len(1 << 20)
            .expect("set_len");
        let m = fs::metadata(root.join("sparse.img")).expect("stat");
        info.sparse = m.blocks() * 512 < m.len() / 2;
    }

    // Hardlinks: one group of three across directories, one of two in the same directory.
    w(&root.join("linked"), &texty_bytes(6, 50_000));
    fs::hard_link(root.join("linked"), root.join("dir/linked2")).expect("link");
    fs::hard_link(root.join("linked"), root.join("dir/sub/linked3")).expect("link");
    w(&root.join("dir/pair-a"), b"pair");
    fs::hard_link(root.join("dir/pair-a"), root.join("dir/pair-b")).expect("link");

    // Symlinks: relative, absolute, dangling, to a directory.
    std::os::unix::fs::symlink("small.txt", root.join("rel-link")).expect("symlink");
    std::os::unix::fs::symlink("/etc/hostname", root.join("abs-link")).expect("symlink");
    std::os::unix::fs::symlink("nowhere/at/all", root.join("dangling")).expect("symlink");
    std::os::unix::fs::symlink("dir/sub", root.join("dir-link")).expect("symlink");

    // Special files.
    assert!(
        mknod(&root.join("fifo"), libc::S_IFIFO | 0o640, 0),
        "mkfifo"
    );
    info.devices = mknod(
        &root.join("null-dev"),
        libc::S_IFCHR | 0o666,
        libc::makedev(1, 3),
    ) && mknod(
        &root.join("block-dev"),
        libc::S_IFBLK | 0o660,
        libc::makedev(8, 1),
    );
    let sock = std::os::unix::net::UnixListener::bind(root.join("socket")).expect("socket");
    drop(sock);

    // Modes: setuid, setgid, sticky, unusual permissions.
    w(&root.join("setuid"), b"#!/bin/sh\n");
    fs::set_permissions(root.join("setuid"), fs::Permissions::from_mode(0o4755)).expect("chmod");
    fs::create_dir(root.join("setgid-dir")).expect("mkdir");
    fs::set_permissions(root.join("setgid-dir"), fs::Permissions::from_mode(0o2775))
        .expect("chmod");
    fs::create_dir(root.join("sticky")).expect("mkdir");
    fs::set_permissions(root.join("sticky"), fs::Permissions::from_mode(0o1777)).expect("chmod");
    w(&root.join("secret"), b"shadow-like\n");
    fs::set_permissions(root.join("secret"), fs::Permissions::from_mode(0o600)).expect("chmod");

    // Ownership (only root can give files away).
    lchown(&root.join("secret"), 1234, 5678);
    lchown(&root.join("rel-link"), 42, 43);

    // Extended attributes, ACLs and a file capability.
    let _ = xattr::set(root.join("small.txt"), "user.comment", b"kept");
    let _ = xattr::set(root.join("small.txt"), "user.binary", &[0u8, 255, 1, 2]);
    let _ = xattr::set(root.join("dir"), "user.on-dir", b"yes");
    info.acls = xattr::set(
        root.join("secret"),
        "system.posix_acl_access",
        &sample_acl(),
    )
    .is_ok()
        && xattr::set(
            root.join("setgid-dir"),
            "system.posix_acl_default",
            &sample_acl(),
        )
        .is_ok();
    // VFS_CAP_REVISION_2 with CAP_NET_BIND_SERVICE (bit 10) permitted and effective.
    let mut cap = (0x0200_0000u32 | 1).to_le_bytes().to_vec();
    for v in [1u32 << 10, 0, 0, 0] {
        cap.extend_from_slice(&v.to_le_bytes());
    }
    info.capability = xattr::set(root.join("setuid"), "security.capability", &cap).is_ok();

    // Odd names.
    for name in [
        &b"non-utf8-\xff\xfe"[..],
        b"with space",
        b"new\nline",
        b"colon:name",
        "ünïcödé".as_bytes(),
        &[b'L'; 255][..],
    ] {
        w(&root.join(OsStr::from_bytes(name)), name);
    }

    if big_dir {
        let d = root.join("big-dir");
        fs::create_dir(&d).expect("mkdir");
        for i in 0..(crate::tree::PAGE_ENTRIES + 200) {
            w(&d.join(format!("f{i:05}")), format!("{i}").as_bytes());
        }
    }

    // Times with nanoseconds, set last (creating entries changes directory times). Every entry
    // gets a time in the past first: rsync (3.5.0 here) leaves the creation time on a restored
    // symlink, device, fifo, socket or directory whose source mtime falls in the same second as
    // the restore, so "now" times made the rsync fidelity test fail whenever fixture and restore
    // shared a second. Real backups are not restored within a second of being taken.
    let mut all = Vec::new();
    collect_post_order(root, &mut all);
    for (i, p) in all.iter().enumerate() {
        let i = i as i64;
        set_times(p, (1_400_000_000 + i, 7 * i), (1_300_000_000 + i, 11 * i));
    }
    set_times(root, (1_400_000_000, 5), (1_300_000_000, 3));
    set_times(
        &root.join("small.txt"),
        (1_600_000_000, 123_456_789),
        (1_500_000_000, 987_654_321),
    );
    set_times(
        &root.join("rel-link"),
        (1_600_000_001, 1),
        (1_500_000_001, 2),
    );
    set_times(
        &root.join("dir/sub"),
        (1_600_000_002, 3),
        (1_500_000_002, 4),
    );
    info
}

/// Every path under `dir` (not `dir` itself), children before their directory.
fn collect_post_order(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut names: Vec<_> = fs::read_dir(dir)
        .expect("read fixture dir")
        .map(|e| e.expect("fixture entry").path())
        .collect();
    names.sort();
    for p in names {
        let is_dir = fs::symlink_metadata(&p).expect("lstat").is_dir();
        if is_dir {
            collect_post_order(&p, out);
        }
        out.push(p);
    }
}

/// Walks `src` and the generation `host/gen` side by side and returns every difference found
/// (empty when the generation reproduces the source exactly).
pub async fn compare(repo: &Repository, host: &str, gen: &str, src: &Path) -> Vec<String> {
    let mut diffs = Vec::new();
    let m = match repo.manifest(host, gen).await {
        Ok(m) => m,
        Err(e) => return vec![format!("manifest: {e}")],
    };
    let links = match repo.links(&m).await {
        Ok(l) => l,
        Err(e) => return vec![format!("hardlink table: {e}")],
    };
    let mut groups: HashMap<u64, u64> = HashMap::new(); // source inode -> group
    let mut seen: HashMap<u64, u32> = HashMap::new(); // group -> entries
    let mut stack: Vec<(PathBuf, Entry)> = vec![(src.to_path_buf(), m.root.clone())];
    while let Some((path, e)) = stack.pop() {
        let ctx = path.display().to_string();
        let st = match fs::symlink_metadata(&path) {
            Ok(s) => s,
            Err(err) => {
                diffs.push(format!("{ctx}: {err}"));
                continue;
            }
        };
        check_meta(&ctx, &st, &e, &mut diffs);
        let mut x: Vec<_> = crate::ingest::meta_xattrs(&path).unwrap_or_default();
        x.sort_by(|a, b| a.name.cmp(&b.name));
        if x != e.xattrs {
            diffs.push(format!("{ctx}: xattrs differ"));
        }
        match e.kind {
            Kind::Dir => {
                let Some(t) = e.tree else {
                    diffs.push(format!("{ctx}: directory without tree"));
                    continue;
                };
                let entries = match repo.dir_entries(&t).await {
                    Ok(es) => es,
                    Err(err) => {
                        diffs.push(format!("{ctx}: {err}"));
                        continue;
                    }
                };
                // Read without touching access times, so comparing twice gives the same answer.
                let mut names: Vec<Vec<u8>> = crate::ingest::read::list_dir(&path)
                    .map(|v| {
                        v.into_iter()
                            .filter_map(|n| n.ok())
                            .map(|n| n.as_bytes().to_vec())
                            .collect()
                    })
                    .unwrap_or_default();
                names.sort();
                let got: Vec<Vec<u8>> = entries.iter().map(|e| e.name.clone()).collect();
                if names != got {
                    diffs.push(format!(
                        "{ctx}: names differ: source {} entries, generation {}",
                        names.len(),
                        got.len()
                    ));
                }
                for c in entries {
                    stack.push((path.join(OsStr::from_bytes(&c.name)), c));
                }
            }
            Kind::Symlink => {
                let t = fs::read_link(&path)
                    .map(|t| t.as_os_str().as_bytes().to_vec())
                    .ok();
                if t != e.target {
                    diffs.push(format!("{ctx}: symlink target differs"));
                }
            }
            Kind::File => {
                if let Some(g) = e.link {
                    let prev = groups.insert(st.ino(), g);
                    if prev.is_some_and(|p| p != g) {
                        diffs.push(format!("{ctx}: hardlink group split"));
                    }
                    *seen.entry(g).or_insert(0) += 1;
                } else if st.nlink() > 1 {
                    diffs.push(format!("{ctx}: hardlink not recorded"));
                }
                let list = match repo.chunk_list(&e).await {
                    Ok(l) => l,
                    Err(err) => {
                        diffs.push(format!("{ctx}: {err}"));
                        continue;
                    }
                };
                match repo.read_range(&list, 0, e.size).await {
                    Ok(data) => {
                        let mut src_data = Vec::new();
                        let read = crate::ingest::read::open_noatime(&path)
                            .and_then(|mut f| std::io::Read::read_to_end(&mut f, &mut src_data));
                        if read.is_err() || src_data != data {
                            diffs.push(format!("{ctx}: content differs"));
                        }
                    }
                    Err(err) => diffs.push(format!("{ctx}: {err}")),
                }
                // Holes: the generation's holes must be holes in the source too.
                if st.blocks() * 512 < st.len() && list.hole_bytes() == 0 && st.len() > 1 << 20 {
                    diffs.push(format!("{ctx}: sparse source stored without holes"));
                }
            }
            _ => {}
        }
    }
    for (g, n) in &seen {
        if links.get(g) != Some(n) {
            diffs.push(format!(
                "hardlink group {g}: {n} entries, table says {:?}",
                links.get(g)
            ));
        }
    }
    diffs
}

fn check_meta(ctx: &str, st: &fs::Metadata, e: &Entry, diffs: &mut Vec<String>) {
    let kind = crate::ingest::meta_kind(st);
    let mut d = |what: &str, ok: bool| {
        if !ok {
            diffs.push(format!("{ctx}: {what} differs"));
        }
    };
    d("type", kind == e.kind);
    d("mode", st.mode() & 0o7777 == e.mode);
    d("uid", st.uid() == e.uid);
    d("gid", st.gid() == e.gid);
    d(
        "mtime",
        (st.mtime(), st.mtime_nsec() as u32) == (e.mtime.0, e.mtime.1),
    );
    // Symlinks: backtree records mtime as atime (see docs/format.md).
    if kind != Kind::Symlink {
        d(
            "atime",
            (st.atime(), st.atime_nsec() as u32) == (e.atime.0, e.atime.1),
        );
    } else {
        d("atime", e.atime == e.mtime);
    }
    d(
        "ctime",
        (st.ctime(), st.ctime_nsec() as u32) == (e.ctime.0, e.ctime.1),
    );
    if kind == Kind::File || kind == Kind::Symlink {
        d("size", st.len() == e.size);
    }
    if matches!(kind, Kind::Chardev | Kind::Blockdev) {
        d("rdev", Some(st.rdev()) == e.rdev);
    }
}

/// Compares two directory trees entry by entry with what `rsync -aHAX --numeric-ids` restores:
/// type, mode, owner, mtime with nanoseconds, size, device numbers, symlink targets, every
/// xattr (ACLs and capabilities included), content, and hardlink groups. Returns differences.
pub fn compare_dirs(a: &Path, b: &Path) -> Vec<String> {
    let mut diffs = Vec::new();
    let mut links_a: HashMap<u64, PathBuf> = HashMap::new();
    let mut links_b: HashMap<u64, PathBuf> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let (pa, pb) = (a.join(&rel), b.join(&rel));
        let ctx = format!("/{}", rel.display());
        let (ma, mb) = match (fs::symlink_metadata(&pa), fs::symlink_metadata(&pb)) {
            (Ok(x), Ok(y)) => (x, y),
            (x, y) => {
                diffs.push(format!("{ctx}: present {} / {}", x.is_ok(), y.is_ok()));
                continue;
            }
        };
        let mut d = |what: &str, ok: bool| {
            if !ok {
                diffs.push(format!("{ctx}: {what} differs"));
            }
        };
        d("type", ma.file_type() == mb.file_type());
        d("mode", ma.mode() == mb.mode());
        d("owner", (ma.uid(), ma.gid()) == (mb.uid(), mb.gid()));
        d(
            "mtime",
            (ma.mtime(), ma.mtime_nsec()) == (mb.mtime(), mb.mtime_nsec()),
        );
        if !ma.is_dir() {
            d("size", ma.len() == mb.len());
        }
        d("rdev", ma.rdev() == mb.rdev());
        let xa = crate::ingest::meta_xattrs(&pa).unwrap_or_default();
        let xb = crate::ingest::meta_xattrs(&pb).unwrap_or_default();
        d("xattrs", xa == xb);
        if ma.is_file() {
            if ma.nlink() > 1 || mb.nlink() > 1 {
                let fa = links_a
                    .entry(ma.ino())
                    .or_insert_with(|| rel.clone())
                    .clone();
                let fb = links_b
                    .entry(mb.ino())
                    .or_insert_with(|| rel.clone())
                    .clone();
                d("hardlink group", fa == fb && ma.nlink() == mb.nlink());
            }
            d("content", fs::read(&pa).ok() == fs::read(&pb).ok());
        } else if ma.file_type().is_symlink() {
            d("target", fs::read_link(&pa).ok() == fs::read_link(&pb).ok());
        } else if ma.is_dir() {
            let names = |p: &Path| -> Vec<std::ffi::OsString> {
                let mut v: Vec<_> = fs::read_dir(p)
                    .map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
                    .unwrap_or_default();
                v.sort();
                v
            };
            let (na, nb) = (names(&pa), names(&pb));
            if na != nb {
                diffs.push(format!(
                    "{ctx}: entries differ ({} / {})",
                    na.len(),
                    nb.len()
                ));
            }
            for n in na {
                stack.push(rel.join(n));
            }
        }
    }
    diffs
}

/// Every regular file (and other non-directory) below `dir`, recursively.
pub fn list_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(list_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Data regions of a file as `(start, end)` pairs, via SEEK_DATA/SEEK_HOLE.
pub fn data_regions(p: &Path) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let Ok(f) = File::open(p) else {
        return Vec::new();
    };
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0i64;
    while (pos as u64) < size {
        // SAFETY: lseek on an open descriptor.
        let d = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if d < 0 {
            break;
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        if h <= d {
            break;
        }
        out.push((d as u64, h as u64));
        pos = h;
    }
    out
}

/// Entries that differ between two generations' trees, as `path: field differences` lines
/// (for diagnosing why an unchanged tree did not deduplicate).
pub async fn diff_generations(repo: &Repository, a: &Entry, b: &Entry) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![(String::new(), a.clone(), b.clone())];
    while let Some((path, x, y)) = stack.pop() {
        let mut xs = x.clone();
        let mut ys = y.clone();
        xs.tree = None;
        ys.tree = None;
        if xs != ys {
            out.push(format!("{path}: {xs:?}\n  vs {ys:?}"));
        }
        if let (Some(tx), Some(ty)) = (x.tree, y.tree) {
            if tx == ty {
                continue;
            }
            let (Ok(ex), Ok(ey)) = (repo.dir_entries(&tx).await, repo.dir_entries(&ty).await)
            else {
                continue;
            };
            let my: HashMap<Vec<u8>, Entry> = ey.into_iter().map(|e| (e.name.clone(), e)).collect();
            for e in ex {
                match my.get(&e.name) {
                    Some(f) => stack.push((
                        format!("{path}/{}", String::from_utf8_lossy(&e.name)),
                        e.clone(),
                        f.clone(),
                    )),
                    None => out.push(format!(
                        "{path}/{}: only in first",
                        String::from_utf8_lossy(&e.name)
                    )),
                }
            }
        }
    }
    out
}
