//! A stream of several GiB through `backtree ingest --stdin`, bounded in time: its size and
//! BLAKE3 read back from the repository equal the input's.
//!
//! The size is 3 GiB by default (12.5 s with a debug build on 2 cores: 7.6 s ingest, 4.4 s read);
//! `BACKTREE_TEST_STREAM_MIB` sets it in MiB, to go larger (or smaller on a slow machine).

mod common;

use backtree_core::testing::random_bytes;
use backtree_core::Repository;
use backtree_store::LocalStore;
use common::{bt, ok};
use std::io::Write;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;

/// The stream's MiB `i`: three of four are one of 32 slices of a random pool (they repeat, so
/// deduplicate), the fourth is a pool slice stamped with `i` every 64 KiB (new data).
fn mib(pool: &[u8], i: u64, out: &mut Vec<u8>) {
    const MIB: usize = 1 << 20;
    out.clear();
    let at = (i.wrapping_mul(7919) % 32) as usize * MIB;
    out.extend_from_slice(&pool[at..at + MIB]);
    if i % 4 == 3 {
        for stamp in (0..MIB).step_by(64 << 10) {
            out[stamp..stamp + 8].copy_from_slice(&i.to_le_bytes());
        }
    }
}

#[test]
fn a_several_gib_stream_reads_back_identical() {
    let mibs: u64 = std::env::var("BACKTREE_TEST_STREAM_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3 << 10);
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    ok(bt().args(["init", "--repo"]).arg(&repo));
    let pool = Arc::new(random_bytes(31, 33 << 20));

    let start = Instant::now();
    let mut child = bt()
        .args([
            "ingest", "--json", "--host", "db1", "--stdin", "dump.bin", "--repo",
        ])
        .arg(&repo)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let p = pool.clone();
    let writer = std::thread::spawn(move || {
        let mut h = blake3::Hasher::new();
        let mut buf = Vec::with_capacity(1 << 20);
        for i in 0..mibs {
            mib(&p, i, &mut buf);
            h.update(&buf);
            stdin.write_all(&buf).unwrap();
        }
        h.finalize()
    });
    let o = child.wait_with_output().unwrap();
    let want = writer.join().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ingest_s = start.elapsed().as_secs_f64();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let stats = &v["generation"]["stats"];
    let size = mibs << 20;
    assert_eq!(stats["logical_bytes"], size, "{stats}");
    assert_eq!(stats["read_bytes"], size, "{stats}");
    assert!(
        stats["new_raw_bytes"].as_u64().unwrap() < size / 2,
        "repeats deduplicate: {stats}"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let got = rt.block_on(async {
        let r = Repository::open(Arc::new(LocalStore::open(&repo).unwrap()))
            .await
            .unwrap();
        let gen = r.latest("db1").await.unwrap().unwrap();
        let m = r.manifest("db1", &gen).await.unwrap();
        let e = r
            .resolve(&m.root.tree.unwrap(), b"dump.bin")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(e.size, size);
        let list = r.chunk_list(&e).await.unwrap();
        let mut h = blake3::Hasher::new();
        let mut at = 0;
        while at < size {
            let piece = r.read_range(&list, at, 64 << 20).await.unwrap();
            assert!(!piece.is_empty(), "read ends early at {at}");
            at += piece.len() as u64;
            h.update(&piece);
        }
        assert_eq!(at, size);
        h.finalize()
    });
    assert_eq!(got, want, "BLAKE3 of what was read back");
    println!(
        "{mibs} MiB: ingest {ingest_s:.1} s, read back {:.1} s; {stats}",
        start.elapsed().as_secs_f64() - ingest_s
    );
}
