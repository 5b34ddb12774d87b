//! Tar archives written by real tools (GNU tar in its gnu and pax formats, bsdtar in its default
//! and pax formats; plain, through a pipe, xz) of a tree with every special entry — character
//! and block devices, a fifo, symlinks, a hardlink pair, xattrs and POSIX ACLs, a sparse file,
//! long paths, odd bytes in a name, owners, setuid, times with nanoseconds — go through
//! `backtree ingest --tar` and come back through the real kernel FUSE mount as the tree they
//! were made from, entry by entry, in everything the archive's format carries. Needs root (for
//! mknod and chown: skipped, saying why, without), /dev/fuse, fusermount3, tar, bsdtar,
//! getfattr and getfacl (scripts/setup.sh installs them).

mod common;

use backtree_core::testing::{data_regions, random_bytes, set_times, texty_bytes};
use common::{bt, ok, Mounted};
use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn mknod(p: &Path, mode: libc::mode_t, dev: libc::dev_t) -> std::io::Result<()> {
    // SAFETY: a valid C string.
    match unsafe { libc::mknod(cstr(p).as_ptr(), mode, dev) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

fn lchown(p: &Path, uid: u32, gid: u32) {
    // SAFETY: a valid C string.
    let r = unsafe { libc::lchown(cstr(p).as_ptr(), uid, gid) };
    assert_eq!(r, 0, "lchown {}", p.display());
}

fn run_ok(c: &mut Command) {
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A directory name and a file name over 100 bytes: neither fits a ustar header.
fn long_path() -> PathBuf {
    Path::new("deep")
        .join("d".repeat(90))
        .join(format!("{}.conf", "long-file-name-".repeat(8)))
}

/// The odd name: bytes that are not UTF-8, a newline, a tab.
const ODD: &[u8] = b"odd \xff\xfe\nname\t";

/// Builds the source tree; says why not where device nodes cannot be made.
fn special_tree(src: &Path) -> Result<(), String> {
    std::fs::create_dir_all(src.join("dev")).unwrap();
    mknod(
        &src.join("dev/tty9"),
        libc::S_IFCHR | 0o620,
        libc::makedev(4, 9),
    )
    .map_err(|e| format!("mknod of a character device: {e}"))?;
    mknod(
        &src.join("dev/loop200"),
        libc::S_IFBLK | 0o660,
        libc::makedev(7, 200),
    )
    .map_err(|e| format!("mknod of a block device: {e}"))?;
    // A minor number over 255 (split across the dev_t's bits) and a major over 255.
    mknod(
        &src.join("dev/nvme"),
        libc::S_IFCHR | 0o600,
        libc::makedev(259, 70_000),
    )
    .map_err(|e| format!("mknod: {e}"))?;
    lchown(&src.join("dev/tty9"), 0, 5);
    lchown(&src.join("dev/loop200"), 0, 6);
    std::fs::create_dir(src.join("run")).unwrap();
    mknod(&src.join("run/initctl"), libc::S_IFIFO | 0o640, 0).unwrap();
    lchown(&src.join("run/initctl"), 1234, 5678);

    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::create_dir_all(src.join("backup")).unwrap();
    std::fs::write(src.join("etc/hosts"), texty_bytes(1, 20_000)).unwrap();
    std::fs::hard_link(src.join("etc/hosts"), src.join("backup/hosts.bak")).unwrap();
    std::os::unix::fs::symlink("hosts", src.join("etc/hosts.sym")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", src.join("abs.sym")).unwrap();
    std::os::unix::fs::symlink("nowhere/at/all", src.join("dangling")).unwrap();
    lchown(&src.join("abs.sym"), 42, 43);
    std::fs::write(src.join("etc/shadow"), b"root:*:19000::::::\n").unwrap();
    std::fs::set_permissions(
        src.join("etc/shadow"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    lchown(&src.join("etc/shadow"), 0, 42);
    xattr::set(src.join("etc/shadow"), "user.comment", b"kept").unwrap();
    xattr::set(
        src.join("etc/shadow"),
        "user.binary",
        &[0u8, 255, 1, 2, b'\n'],
    )
    .unwrap();
    run_ok(
        Command::new("setfacl")
            .args(["-m", "u:1234:r,g:5678:rw"])
            .arg(src.join("etc/shadow")),
    );
    // A default ACL on a directory, and a file inside that inherits it as its access ACL.
    std::fs::create_dir(src.join("shared")).unwrap();
    run_ok(
        Command::new("setfacl")
            .args(["-d", "-m", "u:1234:rwx,g:5678:rx"])
            .arg(src.join("shared")),
    );
    std::fs::write(src.join("shared/report"), b"quarterly\n").unwrap();
    xattr::set(src.join("shared"), "user.on-dir", b"yes").unwrap();

    // Sparse: 64 KiB of data at 0 and at 2 MiB, 4 MiB in all (a hole at the end).
    std::fs::create_dir(src.join("img")).unwrap();
    let f = std::fs::File::create(src.join("img/disk.img")).unwrap();
    f.write_all_at(&random_bytes(2, 64 << 10), 0).unwrap();
    f.write_all_at(&random_bytes(3, 64 << 10), 2 << 20).unwrap();
    f.set_len(4 << 20).unwrap();
    drop(f);

    let long = src.join(long_path());
    std::fs::create_dir_all(long.parent().unwrap()).unwrap();
    std::fs::write(&long, b"long\n").unwrap();
    std::fs::write(src.join(OsStr::from_bytes(ODD)), b"odd\n").unwrap();
    std::fs::write(src.join("empty"), b"").unwrap();
    std::fs::write(src.join("su"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(src.join("su"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::create_dir(src.join("secret")).unwrap();
    std::fs::write(src.join("secret/key"), random_bytes(4, 300)).unwrap();
    lchown(&src.join("secret"), 1234, 5678);
    std::fs::set_permissions(src.join("secret"), std::fs::Permissions::from_mode(0o2750)).unwrap();

    // Times last, children before their directory, each with its own nanoseconds.
    let mut all = Vec::new();
    post_order(src, &mut all);
    for (i, p) in all.iter().enumerate() {
        let i = i as i64;
        set_times(
            p,
            (1_400_000_000 + i, 7 * i),
            (1_300_000_000 + i, 11 * i + 1),
        );
    }
    set_times(src, (1_400_000_000, 5), (1_300_000_000, 3));
    Ok(())
}

fn names(dir: &Path) -> Vec<std::ffi::OsString> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    v.sort();
    v
}

fn post_order(dir: &Path, out: &mut Vec<PathBuf>) {
    for n in names(dir) {
        let p = dir.join(n);
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            post_order(&p, out);
        }
        out.push(p);
    }
}

/// What an archive carries, and so what is compared.
struct Carries {
    /// Nanoseconds of mtime (PAX `mtime` records), else whole seconds.
    ns: bool,
    /// xattrs and POSIX ACLs.
    xattrs: bool,
}

/// `tool -R` output (getfattr, getfacl) for the tree at `root`, run inside it so that both
/// trees' paths read the same: one block per entry, sorted (readdir orders differ).
fn attr_dump(root: &Path, tool: &str, args: &[&str]) -> Vec<String> {
    let o = Command::new(tool)
        .args(args)
        .arg(".")
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| panic!("{tool} (scripts/setup.sh installs it): {e}"));
    assert!(
        o.status.success(),
        "{tool} in {}: {}",
        root.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let text = String::from_utf8_lossy(&o.stdout);
    let mut blocks: Vec<String> = text
        .split("\n\n")
        .map(|b| b.trim().to_string())
        .filter(|b| !b.is_empty())
        .collect();
    blocks.sort();
    blocks
}

fn hash(p: &Path) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(p).unwrap()).unwrap();
    h.finalize()
}

/// Compares the tree at `mnt` (a generation on the mount) with `src`, entry by entry; returns
/// the differences.
fn compare(src: &Path, mnt: &Path, c: &Carries) -> Vec<String> {
    let mut diffs = Vec::new();
    // Source inode → mount inode, for hardlinks.
    let mut links: HashMap<u64, u64> = HashMap::new();
    let mut todo = vec![PathBuf::new()];
    let mut seen = 0;
    while let Some(rel) = todo.pop() {
        seen += 1;
        let (a, b) = (src.join(&rel), mnt.join(&rel));
        let ctx = format!("/{}", rel.display());
        let (sa, sb) = match (std::fs::symlink_metadata(&a), std::fs::symlink_metadata(&b)) {
            (Ok(x), Ok(y)) => (x, y),
            (_, Err(e)) => {
                diffs.push(format!("{ctx}: not on the mount: {e}"));
                continue;
            }
            (Err(e), _) => panic!("{ctx}: {e}"),
        };
        let mut d = |what: &str, x: String, y: String| {
            if x != y {
                diffs.push(format!("{ctx}: {what}: source {x}, mount {y}"));
            }
        };
        let (ta, tb) = (sa.file_type(), sb.file_type());
        d("type", format!("{ta:?}"), format!("{tb:?}"));
        d(
            "mode",
            format!("{:o}", sa.mode() & 0o7777),
            format!("{:o}", sb.mode() & 0o7777),
        );
        d(
            "owner",
            format!("{}:{}", sa.uid(), sa.gid()),
            format!("{}:{}", sb.uid(), sb.gid()),
        );
        d("mtime", sa.mtime().to_string(), sb.mtime().to_string());
        if c.ns {
            d(
                "mtime ns",
                sa.mtime_nsec().to_string(),
                sb.mtime_nsec().to_string(),
            );
        }
        if !ta.is_dir() {
            d("size", sa.len().to_string(), sb.len().to_string());
        }
        if ta.is_char_device() || ta.is_block_device() {
            d("rdev", sa.rdev().to_string(), sb.rdev().to_string());
        }
        if ta.is_symlink() {
            d(
                "target",
                format!("{:?}", std::fs::read_link(&a).ok()),
                format!("{:?}", std::fs::read_link(&b).ok()),
            );
        }
        if ta.is_file() && tb.is_file() {
            d("content", hash(&a).to_string(), hash(&b).to_string());
            if sa.nlink() > 1 {
                let first = *links.entry(sa.ino()).or_insert(sb.ino());
                d(
                    "hardlink (inode, links)",
                    format!("{first}, {}", sa.nlink()),
                    format!("{}, {}", sb.ino(), sb.nlink()),
                );
            }
            // Holes where the source has them (a filesystem that keeps none has no data
            // regions to compare), and st_blocks counting data only.
            let ra = data_regions(&a);
            if ra.len() > 1 {
                d(
                    "data regions",
                    format!("{ra:?}"),
                    format!("{:?}", data_regions(&b)),
                );
                let data: u64 = ra.iter().map(|(s, e)| e - s).sum();
                let blocks = sb.blocks() * 512;
                if blocks >= data + (64 << 10) {
                    diffs.push(format!(
                        "{ctx}: st_blocks {blocks} for {data} bytes of data"
                    ));
                }
            }
        }
        if ta.is_dir() && tb.is_dir() {
            let (na, nb) = (names(&a), names(&b));
            if na != nb {
                diffs.push(format!("{ctx}: names: source {na:?}, mount {nb:?}"));
                continue;
            }
            todo.extend(na.into_iter().map(|n| rel.join(n)));
        }
    }
    let mut all = Vec::new();
    post_order(src, &mut all);
    assert_eq!(seen, all.len() + 1, "every entry compared");
    if c.xattrs {
        // Every xattr of every entry, values in hex (ACLs in their binary form included), and
        // the ACLs as getfacl reads them (numeric ids).
        for (tool, args) in [
            (
                "getfattr",
                &["-R", "-P", "-h", "-d", "-m", "-", "-e", "hex"][..],
            ),
            ("getfacl", &["-R", "-P", "-n"][..]),
        ] {
            let (x, y) = (attr_dump(src, tool, args), attr_dump(mnt, tool, args));
            if x != y {
                diffs.push(format!("{tool}: source {x:#?}\nmount {y:#?}"));
            }
        }
    }
    diffs
}

/// One archive to make: the writer's command line (inside the source tree, writing to
/// standard output), what it carries, and whether it reaches `--tar` through a pipe.
struct Case {
    host: &'static str,
    argv: Vec<&'static str>,
    carries: Carries,
    pipe: bool,
}

#[test]
fn tar_archives_of_special_files_read_back_through_the_mount() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    if let Err(why) = special_tree(&src) {
        println!("skipped: {why} (device nodes need root)");
        return;
    }
    if data_regions(&src.join("img/disk.img")).len() < 2 {
        println!("note: this filesystem keeps no holes; holes are not compared");
    }
    let common = ["--xattrs", "--acls", "--numeric-owner"];
    let with = |tool: &'static str, more: &[&'static str]| {
        let mut v = vec![tool];
        v.extend(common);
        v.extend(more);
        v
    };
    let cases = [
        // GNU format: ustar headers with GNU long names and old-GNU sparse members; whole
        // seconds, and no xattrs or ACLs (GNU tar refuses --xattrs/--acls but in PAX), so
        // those are not compared.
        Case {
            host: "gnu",
            argv: vec![
                "tar",
                "--numeric-owner",
                "--format=gnu",
                "--sparse",
                "-cf",
                "-",
            ],
            carries: Carries {
                ns: false,
                xattrs: false,
            },
            pipe: false,
        },
        Case {
            host: "pax",
            argv: with("tar", &["--format=pax", "--sparse", "-cf", "-"]),
            carries: Carries {
                ns: true,
                xattrs: true,
            },
            pipe: true,
        },
        Case {
            host: "pax-xz",
            argv: with("tar", &["--format=pax", "--sparse", "-cJf", "-"]),
            carries: Carries {
                ns: true,
                xattrs: true,
            },
            pipe: false,
        },
        // bsdtar's default, restricted PAX: an entry gets PAX records (nanoseconds among them)
        // only when ustar cannot hold it, so times are compared to the second. Its ACLs are
        // SCHILY.acl.* in star's form (with the ids as a fourth field) and its header mode has
        // `group::` in the group bits, not the mask (the ingest takes the mode's bits from the
        // ACL, as the kernel does on extract); its xattrs are both LIBARCHIVE.xattr.* and
        // SCHILY.xattr.*; it finds holes by itself (GNU.sparse 1.0).
        Case {
            host: "bsdtar",
            argv: with("bsdtar", &["-cf", "-"]),
            carries: Carries {
                ns: false,
                xattrs: true,
            },
            pipe: false,
        },
        // Full PAX from bsdtar: every entry's times with nanoseconds; compressed by libarchive's
        // own xz writer.
        Case {
            host: "bsdtar-pax-xz",
            argv: with("bsdtar", &["--format=pax", "-cJf", "-"]),
            carries: Carries {
                ns: true,
                xattrs: true,
            },
            pipe: true,
        },
    ];
    let repo = dir.path().join("repo");
    ok(bt().args(["init", "--repo"]).arg(&repo));
    for c in &cases {
        let archive = dir.path().join(format!("{}.tar", c.host));
        let o = Command::new(c.argv[0])
            .args(&c.argv[1..])
            .arg(".")
            .current_dir(&src)
            .stdout(std::fs::File::create(&archive).unwrap())
            .stderr(Stdio::piped())
            .output()
            .unwrap_or_else(|e| panic!("{} (scripts/setup.sh installs it): {e}", c.argv[0]));
        assert!(
            o.status.success(),
            "{:?}: {}",
            c.argv,
            String::from_utf8_lossy(&o.stderr)
        );
        let mut cmd = bt();
        cmd.args(["ingest", "--host", c.host, "--repo"]).arg(&repo);
        if c.pipe {
            cmd.args(["--tar", "-"])
                .stdin(std::fs::File::open(&archive).unwrap());
        } else {
            cmd.arg("--tar").arg(&archive);
        }
        // Exit 0: no member was skipped or changed.
        ok(&mut cmd);
        if c.host == "pax-xz" {
            // Cut short, the xz stream fails the ingest: exit 1, the archive, the decoder and
            // the offset named; nothing published (no host `cut` on the mount below).
            let bytes = std::fs::read(&archive).unwrap();
            let cut = dir.path().join("cut.tar.xz");
            std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
            let o = bt()
                .args(["ingest", "--host", "cut", "--repo"])
                .arg(&repo)
                .arg("--tar")
                .arg(&cut)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{err}");
            assert!(
                err.contains(&format!("reading tar archive {}: ", cut.display()))
                    && err.contains("xz: ")
                    && err.contains("(at byte "),
                "{err}"
            );
            std::fs::remove_file(&cut).unwrap();
        }
        std::fs::remove_file(&archive).unwrap();
    }
    let m = Mounted::start(&repo, &dir.path().join("mnt"), &[]);
    assert!(
        !m.mnt.join("cut").exists(),
        "a failed ingest publishes nothing"
    );
    let mut failed = Vec::new();
    for c in &cases {
        let diffs = compare(&src, &m.mnt.join(c.host).join("latest"), &c.carries);
        if !diffs.is_empty() {
            failed.push(format!("{}:\n  {}", c.host, diffs.join("\n  ")));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    // The symlink to an absolute path is shown, not followed.
    let t = std::fs::read_link(m.mnt.join("gnu/latest/abs.sym")).unwrap();
    assert_eq!(t, Path::new("/etc/shadow"));
    let dev = std::fs::symlink_metadata(m.mnt.join("pax/latest/dev/nvme")).unwrap();
    assert_eq!(dev.rdev(), libc::makedev(259, 70_000));
}
