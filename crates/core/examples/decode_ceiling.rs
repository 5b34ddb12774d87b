//! Benchmark helper: how fast this machine decompresses and verifies a local repository's file
//! data with no FUSE and no I/O, using `THREADS` threads (`decode_ceiling REPO THREADS`).
//!
//! A cold read through the mount must do both for every byte, so this is its ceiling on the
//! machine, next to the FUSE ceiling (which does neither). It reads every data pack into memory
//! first, then times [`blob::decode`] (zstd, then BLAKE3 against the blob's id) of every blob,
//! and prints `RAW_BYTES SECONDS`. scripts/bench-mount.sh runs it on the image repository, which
//! holds only the image's data, so RAW_BYTES / SECONDS is what decoding alone allows.
use backtree_core::{blob, pack};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn files(dir: &Path, out: &mut Vec<PathBuf>) -> Res<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            files(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

fn main() -> Res<()> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 3 {
        return Err("usage: decode_ceiling REPO THREADS".into());
    }
    let threads: usize = a[2].parse()?;
    let mut paths = Vec::new();
    files(&Path::new(&a[1]).join("packs/data"), &mut paths)?;
    let mut packs = Vec::new();
    let mut blobs = Vec::new();
    for p in &paths {
        let what = p.display().to_string();
        let bytes = std::fs::read(p).map_err(|e| format!("{what}: {e}"))?;
        let len = bytes.len();
        let foot = len
            .checked_sub(pack::FOOTER_LEN)
            .ok_or_else(|| format!("{what}: shorter than a pack footer"))?;
        let n = pack::parse_footer(&what, &bytes[foot..])? as usize;
        let start = foot
            .checked_sub(n * pack::RECORD_LEN)
            .ok_or_else(|| format!("{what}: trailer larger than the pack"))?;
        for e in pack::parse_trailer(&what, &bytes[start..foot], len as u64)? {
            blobs.push((packs.len(), e));
        }
        packs.push(bytes);
    }
    let next = AtomicUsize::new(0);
    let raw = AtomicUsize::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| -> Result<(), String> {
                    while let Some((p, e)) = blobs.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let at = e.offset as usize;
                        let stored = &packs[*p][at..at + e.stored_len as usize];
                        let data = blob::decode(&e.id, stored, e.flags, e.raw_len, "blob")
                            .map_err(|err| format!("blob {}: {err}", e.id))?;
                        raw.fetch_add(data.len(), Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .map_err(|_| "a decode thread panicked".to_string())?
        })
    })?;
    println!(
        "{} {:.3}",
        raw.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
