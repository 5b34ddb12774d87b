//! The mount through the real kernel FUSE: `backtree mount` as a process, read with ordinary
//! tools (rsync, std::fs). Needs /dev/fuse and fusermount3 (scripts/setup.sh installs fuse3);
//! without them these tests fail rather than pass silently.

mod common;

use backtree_core::testing::{build_fixture, compare_dirs, data_regions, random_bytes};
use common::{bt, ok, repo_with, rsync_restore, Mounted};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn rsync_restore_from_the_mount_is_identical() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let info = build_fixture(&src, true);
    let repo = repo_with(dir.path(), "ve123", &src);
    let mut m = Mounted::start(&repo, &dir.path().join("mnt"), &[]);
    let latest = m.mnt.join("ve123/latest");

    let out = dir.path().join("restored");
    rsync_restore(&m, &latest, &out);
    let diffs = compare_dirs(&src, &out);
    assert!(diffs.is_empty(), "restored tree differs: {diffs:#?}");

    // What rsync does not restore, checked on the mount itself: atimes, holes, st_blocks,
    // device numbers, shared inodes with true link counts.
    // (The source's own atime has moved since: compare_dirs read it. The fixture set it.)
    let ms = std::fs::symlink_metadata(latest.join("small.txt")).unwrap();
    assert_eq!((ms.atime(), ms.atime_nsec()), (1_600_000_000, 123_456_789));
    if info.sparse {
        assert_eq!(
            data_regions(&latest.join("sparse.img")),
            data_regions(&src.join("sparse.img"))
        );
        let b = std::fs::metadata(latest.join("sparse.img"))
            .unwrap()
            .blocks();
        assert!(b * 512 < 1 << 20, "st_blocks reflects holes: {b}");
    }
    if info.devices {
        assert_eq!(
            std::fs::symlink_metadata(latest.join("null-dev"))
                .unwrap()
                .rdev(),
            libc::makedev(1, 3)
        );
    }
    let l1 = std::fs::metadata(latest.join("linked")).unwrap();
    let l3 = std::fs::metadata(latest.join("dir/sub/linked3")).unwrap();
    assert_eq!((l1.ino(), l1.nlink()), (l3.ino(), 3));
    // getxattr of a missing name is ENODATA (never ENOSYS).
    let err = xattr::get(latest.join("small.txt"), "user.missing").unwrap();
    assert!(err.is_none());
    let ino_before = std::fs::metadata(latest.join("dir/sub/random.bin"))
        .unwrap()
        .ino();
    assert!(m.stop().success());

    // Inode numbers stay the same across remounts.
    let m2 = Mounted::start(&repo, &dir.path().join("mnt"), &[]);
    assert_eq!(
        std::fs::metadata(m2.mnt.join("ve123/latest/dir/sub/random.bin"))
            .unwrap()
            .ino(),
        ino_before
    );
}

#[test]
fn new_generations_appear_without_remount() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a"), b"one").unwrap();
    let repo = repo_with(dir.path(), "live", &src);
    let m = Mounted::start(&repo, &dir.path().join("mnt"), &[]);
    let first = std::fs::read_link(m.mnt.join("live/latest")).unwrap();
    assert_eq!(std::fs::read(m.mnt.join("live/latest/a")).unwrap(), b"one");

    std::thread::sleep(Duration::from_millis(1100)); // a new second: a new generation name
    std::fs::write(src.join("a"), b"two").unwrap();
    ok(bt()
        .args(["ingest", "--host", "live", "--repo"])
        .arg(&repo)
        .arg(&src));
    ok(bt()
        .args(["ingest", "--host", "other", "--repo"])
        .arg(&repo)
        .arg(&src));
    let start = Instant::now();
    loop {
        let now = std::fs::read_link(m.mnt.join("live/latest")).unwrap();
        if now != first {
            assert_eq!(std::fs::read(m.mnt.join("live/latest/a")).unwrap(), b"two");
            assert_eq!(
                std::fs::read(m.mnt.join("live").join(&first).join("a")).unwrap(),
                b"one"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "latest did not move"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let gens = std::fs::read_dir(m.mnt.join("live")).unwrap().count();
    assert_eq!(gens, 3, "two generations and latest");
    assert!(m.mnt.join("other/latest/a").exists(), "a new host appears");

    // `fusermount3 -u` from outside ends the daemon cleanly too.
    let mut m = m;
    let st = Command::new("fusermount3")
        .arg("-u")
        .arg(&m.mnt)
        .status()
        .unwrap();
    assert!(st.success());
    let mut child = m.child.take().unwrap();
    let status = m.wait_for_exit(&mut child, "fusermount3 -u");
    assert!(status.success(), "{}", m.log_text());
}

#[test]
fn many_readers_at_once_get_every_byte_right() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..6u64 {
        std::fs::write(src.join(format!("f{i}")), random_bytes(100 + i, 3 << 20)).unwrap();
    }
    std::fs::write(src.join("big"), random_bytes(7, 40 << 20)).unwrap();
    let repo = repo_with(dir.path(), "c", &src);
    let m = Mounted::start(&repo, &dir.path().join("mnt"), &["--cache-size", "16M"]);
    let root = m.mnt.join("c/latest");
    let big = std::sync::Arc::new(std::fs::read(src.join("big")).unwrap());
    std::thread::scope(|s| {
        for i in 0..6u64 {
            let (root, src) = (&root, &src);
            s.spawn(move || {
                let name = format!("f{i}");
                let mut got = Vec::new();
                std::fs::File::open(root.join(&name))
                    .unwrap()
                    .read_to_end(&mut got)
                    .unwrap();
                assert!(
                    got == std::fs::read(src.join(&name)).unwrap(),
                    "{name} differs"
                );
            });
        }
        for t in 0..4u64 {
            let (root, big) = (&root, big.clone());
            s.spawn(move || {
                let f = std::fs::File::open(root.join("big")).unwrap();
                let r = random_bytes(t, 64 * 16);
                for k in 0..64 {
                    let v = u64::from_le_bytes(r[k * 16..k * 16 + 8].try_into().unwrap());
                    let len = 1
                        + (u64::from_le_bytes(r[k * 16 + 8..k * 16 + 16].try_into().unwrap())
                            % 300_000) as usize;
                    let off = (v % big.len() as u64) as usize;
                    let mut buf = vec![0u8; len];
                    let n = f.read_at(&mut buf, off as u64).unwrap();
                    assert_eq!(n, len.min(big.len() - off));
                    assert!(buf[..n] == big[off..off + n], "random read at {off}+{len}");
                }
            });
        }
    });
}

#[test]
fn corrupt_pack_gives_eio_for_that_file_only() {
    let dir = tempfile::tempdir().unwrap();
    let (sa, sb) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&sa).unwrap();
    std::fs::create_dir_all(&sb).unwrap();
    std::fs::write(sa.join("victim.bin"), random_bytes(1, 6 << 20)).unwrap();
    std::fs::write(sb.join("fine.bin"), random_bytes(2, 6 << 20)).unwrap();
    let repo = repo_with(dir.path(), "a", &sa);
    let packs_a: Vec<PathBuf> = backtree_core::testing::list_files(&repo.join("packs/data"));
    let repo = repo_with(dir.path(), "b", &sb);
    for p in &packs_a {
        let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        f.write_at(b"garbage!", 4096).unwrap();
    }
    let mut m = Mounted::start(&repo, &dir.path().join("mnt"), &[]);
    let err = std::fs::read(m.mnt.join("a/latest/victim.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(
        std::fs::read(m.mnt.join("b/latest/fine.bin")).unwrap(),
        std::fs::read(sb.join("fine.bin")).unwrap()
    );
    assert!(
        std::fs::read_dir(m.mnt.join("a/latest")).unwrap().count() == 1,
        "daemon still serving"
    );
    assert!(m.stop().success());
    let log = m.log_text();
    assert!(
        log.contains("a/") && log.contains("victim.bin") && log.contains("packs/data/"),
        "log names file and pack: {log}"
    );
}

#[test]
fn refuses_unsafe_or_impossible_mountpoints() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let repo = repo_with(dir.path(), "h", &src);
    let inside = repo.join("mnt");
    std::fs::create_dir(&inside).unwrap();
    let o = bt()
        .args(["mount", "--repo"])
        .arg(&repo)
        .arg(&inside)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("inside the repository"));
    let o = bt()
        .args(["mount", "--repo"])
        .arg(&repo)
        .arg(dir.path().join("nope"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not exist"));
    // A mountpoint that is already mounted is busy.
    let m = Mounted::start(&repo, &dir.path().join("mnt"), &[]);
    let o = bt()
        .args(["mount", "--repo"])
        .arg(&repo)
        .arg(&m.mnt)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already a mount point"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// SIGTERM while a file on the mount is open: the mount is detached at once (gone from the
/// mount table, so nothing stale is left), the open file still reads correctly, and the daemon
/// exits by itself once the file is closed.
#[test]
fn sigterm_with_an_open_file_detaches_and_serves_it_until_closed() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let data = random_bytes(5, 3 << 20);
    std::fs::write(src.join("big"), &data).unwrap();
    let repo = repo_with(dir.path(), "h", &src);
    let mut m = Mounted::start(&repo, &dir.path().join("mnt"), &[]);
    let f = std::fs::File::open(m.mnt.join("h/latest/big")).unwrap();
    let mut child = m.child.take().unwrap();
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    while common::is_mounted(&m.mnt) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still mounted: {}",
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(m.log_text().contains("detached"), "{}", m.log_text());
    assert!(
        child.try_wait().unwrap().is_none(),
        "the daemon serves the open file"
    );
    let mut back = vec![0u8; data.len()];
    f.read_exact_at(&mut back, 0).unwrap();
    assert!(
        back == data,
        "the open file reads its content after the detach"
    );
    drop(f);
    let status = m.wait_for_exit(&mut child, "the last file closed");
    assert!(status.success(), "{}", m.log_text());
}

/// The /etc/fstab form (docs/ops.md): `mount -t fuse.backtree REPO MNT -o ro,allow_other,_netdev`
/// runs `mount.fuse3`, which runs `backtree REPO MNT -o …`; it daemonizes once mounted, and
/// `umount` stops it. mount(8) finds `backtree` only in the standard PATH, so the test links
/// the built binary into /usr/local/bin for its duration when it can (as root, nothing there
/// yet), and otherwise runs `mount.fuse3` itself with the build directory in PATH.
#[test]
fn the_fstab_form_mounts_with_mount_and_stops_with_umount() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.txt"), b"from fstab\n").unwrap();
    let repo = repo_with(dir.path(), "h", &src);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_backtree"));
    let link = Path::new("/usr/local/bin/backtree");
    let linked = !link.exists() && std::os::unix::fs::symlink(&exe, link).is_ok();
    let path = format!(
        "{}:{}",
        exe.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let st = if linked {
        Command::new("mount")
            .args(["-t", "fuse.backtree", "-o", "ro,allow_other,_netdev"])
            .arg(&repo)
            .arg(&mnt)
            .status()
    } else {
        Command::new("mount.fuse3")
            .arg(&repo)
            .arg(&mnt)
            .args(["-t", "fuse.backtree", "-o", "ro,allow_other,_netdev"])
            .env("PATH", &path)
            .status()
    };
    if linked {
        let _ = std::fs::remove_file(link);
    }
    assert!(st.unwrap().success(), "mount failed");
    // Mounted when `mount` returned: the daemon reported it before its parent exited.
    assert!(common::is_mounted(&mnt));
    assert_eq!(
        std::fs::read(mnt.join("h/latest/a.txt")).unwrap(),
        b"from fstab\n"
    );
    let st = Command::new("umount").arg(&mnt).status().unwrap();
    assert!(st.success());
    assert!(!common::is_mounted(&mnt));
    // Bad options are refused in one sentence, before anything is mounted.
    let o = Command::new(&exe)
        .arg(&repo)
        .arg(&mnt)
        .args(["-o", "rw"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("read-only"));
    assert!(!common::is_mounted(&mnt));
}

#[test]
fn the_history_view_shows_each_version_of_a_file_once() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("etc/vmware")).unwrap();
    let repo = dir.path().join("repo");
    ok(bt().args(["init", "--repo"]).arg(&repo));
    // 100 nightly generations; the inventory changes at 0, 20, 40, 60 and 80 (5 versions, the
    // last one back to the first's size); a log file changes every night.
    let content = |i: usize| format!("<inventory version=\"{}\"/>\n", i / 20);
    let inv = src.join("etc/vmware/vmInventory.xml");
    for i in 0..100usize {
        if i % 20 == 0 {
            std::fs::write(&inv, content(i)).unwrap();
            backtree_core::testing::set_times(&inv, (5_000, 0), (1_700_000_000 + i as i64, 0));
        }
        std::fs::write(src.join("etc/log"), format!("night {i}\n")).unwrap();
        let time = format!("2026-{:02}-{:02}T02:00:00Z", 1 + i / 28, 1 + i % 28);
        ok(bt()
            .args([
                "ingest",
                "--no-compact",
                "--host",
                "esx",
                "--time",
                &time,
                "--repo",
            ])
            .arg(&repo)
            .arg(&src));
    }
    let m = Mounted::start(&repo, &dir.path().join("mnt"), &[]);
    let host = m.mnt.join("esx");
    let mut gens: Vec<String> = std::fs::read_dir(&host)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != "latest")
        .collect();
    gens.sort();
    assert_eq!(
        gens.len(),
        100,
        "the view is not listed among the generations"
    );

    let view = host.join(".history/etc/vmware/vmInventory.xml");
    let mut versions: Vec<String> = std::fs::read_dir(&view)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    versions.sort();
    let want: Vec<String> = (0..5).map(|v| gens[v * 20].clone()).collect();
    assert_eq!(versions, want);
    for (v, name) in versions.iter().enumerate() {
        let i = v * 20;
        let p = view.join(name);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), content(i), "{name}");
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(
            md.mtime(),
            1_700_000_000 + i as i64,
            "{name}: the version's time"
        );
        assert!(md.is_file());
    }
    // The directory above lists every name it had; the log has 100 versions.
    let etc: Vec<_> = std::fs::read_dir(host.join(".history/etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(etc.len(), 2, "{etc:?}");
    assert_eq!(
        std::fs::read_dir(host.join(".history/etc/log"))
            .unwrap()
            .count(),
        100
    );
    assert!(!host.join(".history/etc/none").exists());
    // A generation, as rsync copies it, holds no history.
    assert!(!host.join("latest/.history").exists());
    assert!(
        m.log_text().lines().all(|l| !l.contains("ERROR")),
        "{}",
        m.log_text()
    );
}
