//! Writer leases through the CLI: an ingest holds `leases/<session>` while it runs and removes
//! it after the commit; an ingest stopped (SIGSTOP) for longer than its lease commits nothing.

mod common;

use common::{bt, ok};
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

fn leases(repo: &std::path::Path) -> usize {
    std::fs::read_dir(repo.join("leases")).map_or(0, |d| d.count())
}

#[test]
fn a_writer_paused_past_its_lease_commits_nothing() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    ok(bt().args(["init", "--repo"]).arg(&repo));
    for (pause, commits) in [(Duration::ZERO, true), (Duration::from_secs(3), false)] {
        let mut child = bt()
            .args(["ingest", "--repo"])
            .arg(&repo)
            .args(["--host", "h", "--stdin", "dump.sql"])
            .env("BACKTREE_LEASE_SECS", "1.5")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(&vec![7u8; 1 << 20]).unwrap();
        // The lease exists while the ingest runs.
        let t0 = std::time::Instant::now();
        while leases(&repo) == 0 && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(leases(&repo), 1, "no lease while the ingest runs");
        if !pause.is_zero() {
            let pid = child.id() as i32;
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
            std::thread::sleep(pause);
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
        input.write_all(b"the end\n").unwrap();
        drop(input);
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let listed = ok(bt().args(["ls", "--repo"]).arg(&repo).arg("h"));
        if commits {
            assert!(out.status.success(), "{stderr}");
            assert_eq!(leases(&repo), 0, "the lease is removed after the commit");
        } else {
            assert_eq!(out.status.code(), Some(1), "{stderr}");
            assert!(stderr.contains("lapsed"), "{stderr}");
            // Still one generation: the paused writer's is not there.
            assert_eq!(
                listed.lines().filter(|l| l.starts_with("20")).count(),
                1,
                "{listed}"
            );
        }
    }
}
