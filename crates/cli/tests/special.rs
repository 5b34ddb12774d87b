//! `backtree ingest --read-special`: a fifo (and, where `losetup` works, a loop block device)
//! named on the command line is stored as a regular file, its zero blocks as holes, and reads
//! back through the real kernel FUSE mount byte for byte and as sparse. Needs /dev/fuse and
//! fusermount3 (scripts/setup.sh).

mod common;

use backtree_core::testing::{data_regions, random_bytes};
use common::{bt, ok, Mounted};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A disk-like image: data, aligned zero runs (holes), a short zero run that stays data, and
/// zeros to the end (a partial last block). Returns it and its data regions.
fn image() -> (Vec<u8>, Vec<(u64, u64)>) {
    let mut data = random_bytes(21, 12_000_000);
    data[1 << 20..9 << 20].fill(0); // 8 MiB of zeros: a hole
    data[9_500_000..9_502_000].fill(0); // no whole aligned 4 KiB block: data
    data[10_000_000..].fill(0); // a hole from 10 002 432 to the end
    let regions = vec![(0, 1 << 20), (9 << 20, 10_002_432)];
    (data, regions)
}

/// Writes `data` into the fifo at `path` from a thread (its open waits for the reader).
fn feed(path: &Path, data: Vec<u8>) -> std::thread::JoinHandle<()> {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        for piece in data.chunks(100_000) {
            std::io::Write::write_all(&mut f, piece).unwrap();
        }
    })
}

fn ingest_json(repo: &Path, args: &[&str], paths: &[&Path]) -> serde_json::Value {
    let out = ok(bt()
        .args(["ingest", "--json", "--repo"])
        .arg(repo)
        .args(args)
        .args(paths));
    serde_json::from_str(&out).unwrap()
}

/// Reads `file` on the mount: its bytes, its data regions, its st_blocks; and a `cp` of it is
/// sparse too.
fn check_on_mount(file: &Path, data: &[u8], regions: &[(u64, u64)], scratch: &Path) {
    assert_eq!(std::fs::read(file).unwrap(), data, "{}", file.display());
    assert_eq!(
        data_regions(file),
        regions,
        "SEEK_DATA/SEEK_HOLE on the mount"
    );
    let data_bytes: u64 = regions.iter().map(|(s, e)| e - s).sum();
    let blocks = std::fs::metadata(file).unwrap().blocks() * 512;
    assert!(
        blocks < data_bytes + (64 << 10),
        "st_blocks counts only data: {blocks} for {data_bytes} bytes of data"
    );
    let copy = scratch.join("copy");
    let st = Command::new("cp").arg(file).arg(&copy).status().unwrap();
    assert!(st.success());
    assert_eq!(std::fs::read(&copy).unwrap(), data);
    let copied = std::fs::metadata(&copy).unwrap().blocks() * 512;
    if data_regions(&copy).len() > 1 {
        assert!(
            copied < data_bytes + (1 << 20),
            "cp kept the holes: {copied}"
        );
    } else {
        println!("note: this filesystem keeps no holes; the copy's size on disk not checked");
    }
}

/// A fifo named with `--read-special` becomes a regular file with the fifo's name, mode and
/// owner, its aligned zero runs as holes; read through the mount it is byte-exact and sparse.
/// A sparse file with holes at the same places, ingested from a directory, deduplicates with it
/// completely. Without the flag, the fifo is stored as a fifo (and not opened).
#[test]
fn a_fifo_read_with_read_special_is_a_sparse_file_in_the_mount() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    ok(bt().args(["init", "--repo"]).arg(&repo));
    let fifo = dir.path().join("disk.img");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    std::fs::set_permissions(&fifo, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (data, regions) = image();

    let writer = feed(&fifo, data.clone());
    let v = ingest_json(&repo, &["--host", "esx1", "--read-special"], &[&fifo]);
    writer.join().unwrap();
    let stats = &v["generation"]["stats"];
    assert_eq!(stats["files"], 1, "{v}");
    assert_eq!(stats["logical_bytes"], data.len() as u64);
    assert_eq!(stats["read_bytes"], data.len() as u64, "zeros are read too");
    let data_bytes: u64 = regions.iter().map(|(s, e)| e - s).sum();
    assert!(
        stats["new_raw_bytes"].as_u64().unwrap() < data_bytes + (64 << 10),
        "zeros are not stored: {stats}"
    );

    // The same image as a sparse file in a directory: all its chunks are there already.
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let sparse = src.join("disk.img");
    {
        let f = std::fs::File::create(&sparse).unwrap();
        for (s, e) in &regions {
            std::os::unix::fs::FileExt::write_all_at(&f, &data[*s as usize..*e as usize], *s)
                .unwrap();
        }
        f.set_len(data.len() as u64).unwrap();
    }
    let dense_fs = data_regions(&sparse) != regions;
    let v = ingest_json(&repo, &["--host", "copy"], &[&src]);
    let new = v["generation"]["stats"]["new_raw_bytes"].as_u64().unwrap();
    if dense_fs {
        println!("note: this filesystem does not report the copy's holes; dedup not checked");
    } else {
        assert!(new < 20_000, "only tree blobs are new: {new}");
    }

    // Without --read-special the fifo is a fifo, and nobody needs to write to it.
    let v = ingest_json(&repo, &["--host", "plain"], &[&fifo]);
    assert_eq!(v["generation"]["stats"]["others"], 1, "{v}");

    let m = Mounted::start(&repo, &dir.path().join("mnt"), &[]);
    let file = m.mnt.join("esx1/latest/disk.img");
    let meta = std::fs::symlink_metadata(&file).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(meta.mode() & 0o7777, 0o640);
    assert_eq!(meta.len(), data.len() as u64);
    check_on_mount(&file, &data, &regions, dir.path());
    let plain = std::fs::symlink_metadata(m.mnt.join("plain/latest/disk.img")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&plain.file_type()));
}

/// A loop device over an image file, detached when dropped.
struct Loop(PathBuf);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Attaches `img` to a free loop device, or says why it cannot.
fn attach(img: &Path) -> Result<Loop, String> {
    let o = Command::new("losetup")
        .args(["--find", "--show", "--read-only"])
        .arg(img)
        .output()
        .map_err(|e| format!("losetup: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "losetup failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    let dev = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    match std::fs::metadata(&dev) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()) => Ok(Loop(dev)),
        _ => {
            let l = Loop(dev);
            Err(format!("{} is not a block device here", l.0.display()))
        }
    }
}

/// A block device (a loop device over an image), named through a symlink as an LVM snapshot
/// is (`/dev/vg0/snap`), is stored under the symlink's name as a sparse regular file. Skips,
/// saying why, where loop devices cannot be set up (no root, no loop module, a container).
#[test]
fn a_loop_block_device_read_with_read_special() {
    let dir = tempfile::tempdir().unwrap();
    let (data, regions) = image();
    // A block device's size is a multiple of 512: pad the image with zeros.
    let mut data = data;
    data.resize(data.len().div_ceil(512) * 512, 0);
    let img = dir.path().join("backing.img");
    std::fs::write(&img, &data).unwrap();
    let dev = match attach(&img) {
        Ok(d) => d,
        Err(why) => {
            println!("skipped: no loop device ({why})");
            return;
        }
    };
    let snap = dir.path().join("snap");
    std::os::unix::fs::symlink(&dev.0, &snap).unwrap();
    let repo = dir.path().join("repo");
    ok(bt().args(["init", "--repo"]).arg(&repo));
    let v = ingest_json(&repo, &["--host", "lvm1", "--read-special"], &[&snap]);
    assert_eq!(v["generation"]["stats"]["logical_bytes"], data.len() as u64);
    drop(dev);
    let m = Mounted::start(&repo, &dir.path().join("mnt"), &[]);
    let file = m.mnt.join("lvm1/latest/snap");
    check_on_mount(&file, &data, &regions, dir.path());
}
