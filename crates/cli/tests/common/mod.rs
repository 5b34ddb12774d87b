//! Helpers shared by the integration tests that run `backtree` as a process.
#![allow(dead_code)]

pub mod race;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn bt() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_backtree"));
    c.env_remove("BACKTREE_REPO");
    c
}

pub fn ok(c: &mut Command) -> String {
    let o = c.output().expect("run");
    assert!(
        o.status.success(),
        "{:?}: {}",
        c,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `DIR/repo` (created on first use) with one more generation of `src` for `host`.
pub fn repo_with(dir: &Path, host: &str, src: &Path) -> PathBuf {
    let repo = dir.join("repo");
    if !repo.exists() {
        ok(bt().args(["init", "--repo"]).arg(&repo));
    }
    ok(bt()
        .args(["ingest", "--host", host, "--repo"])
        .arg(&repo)
        .arg(src));
    repo
}

pub fn is_mounted(mnt: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let m = mnt.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&m))
}

/// A running `backtree mount`; unmounts (SIGTERM) when dropped.
pub struct Mounted {
    pub child: Option<Child>,
    pub mnt: PathBuf,
    log: PathBuf,
}

impl Mounted {
    pub fn start(repo: impl AsRef<std::ffi::OsStr>, mnt: &Path, extra: &[&str]) -> Mounted {
        std::fs::create_dir_all(mnt).unwrap();
        let mnt = std::fs::canonicalize(mnt).unwrap();
        let log = mnt.with_extension("log");
        let child = bt()
            .arg("mount")
            .arg("--repo")
            .arg(repo)
            .args(extra)
            .arg(&mnt)
            .env("BACKTREE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let m = Mounted {
            child: Some(child),
            mnt,
            log,
        };
        let start = Instant::now();
        while !is_mounted(&m.mnt) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "not mounted: {}",
                m.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                assert!(!is_mounted(&self.mnt), "still mounted after exit");
                return st;
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = Command::new("fusermount3")
                    .arg("-uz")
                    .arg(&self.mnt)
                    .status();
                panic!("mount did not exit on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Mounted {
    /// Waits up to 10 s for the daemon, already taken out of `child`, to exit by itself; panics
    /// with `why` and the daemon's log if it does not.
    pub fn wait_for_exit(&self, child: &mut Child, why: &str) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "daemon did not exit after {why}: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: as above.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            while c.try_wait().ok().flatten().is_none() && start.elapsed() < Duration::from_secs(5)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            if is_mounted(&self.mnt) {
                let _ = Command::new("fusermount3")
                    .arg("-uz")
                    .arg(&self.mnt)
                    .status();
            }
        }
    }
}

/// `rsync -aHAX --numeric-ids FROM/ TO/`, as an administrator restores from the mount; panics
/// with the daemon's log if it fails.
pub fn rsync_restore(m: &Mounted, from: &Path, to: &Path) {
    let st = Command::new("rsync")
        .args(["-aHAX", "--numeric-ids"])
        .arg(format!("{}/", from.display()))
        .arg(format!("{}/", to.display()))
        .status()
        .expect("rsync (scripts/setup.sh installs it)");
    assert!(st.success(), "rsync failed: {}", m.log_text());
}
