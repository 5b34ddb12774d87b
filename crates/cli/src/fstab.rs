//! `backtree SOURCE MOUNTPOINT [-o OPTIONS] [-f]`: the form `mount.fuse3` runs, so that a
//! recovery host mounts a repository from /etc/fstab or `mount -t fuse.backtree` (docs/ops.md):
//!
//! ```text
//! /srv/backtree  /mnt/backups  fuse.backtree  ro,allow_other,_netdev  0 0
//! ```
//!
//! `mount` runs `mount.fuse3`, which runs `backtree /srv/backtree /mnt/backups -o OPTIONS` and
//! waits for it to exit, as it does for every FUSE filesystem. So this form translates the
//! options into `backtree mount`'s and **daemonizes**: the process forks before anything else
//! starts (no threads exist yet, so the fork is safe), the child mounts, and the parent exits 0
//! once the child reports the filesystem mounted — or 1, after the child's error went to
//! standard error, if it could not mount. `-f` (or the option `foreground`) keeps it in the
//! foreground, for systemd services. `umount MOUNTPOINT` stops the daemon.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::Mutex;

/// What the fstab form asked for.
#[derive(Debug, PartialEq, Eq)]
pub struct Helper {
    /// The equivalent `backtree mount …` command line.
    pub args: Vec<OsString>,
    pub foreground: bool,
    /// Where the daemon's log goes once it is mounted (option `log=PATH`), else nowhere.
    pub log: Option<OsString>,
}

/// Mount options that say nothing to backtree (mount(8)'s and systemd's generic ones).
const IGNORED: &[&str] = &[
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "_netdev",
    "nofail",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "strictatime",
    "nodiratime",
    "sync",
    "async",
    "ro",
];

/// Recognizes the fstab form: the first argument is neither an option nor a subcommand, and
/// a mount point follows. `None`: an ordinary command line.
pub fn recognize(args: &[OsString], subcommands: &[String]) -> Option<Result<Helper, String>> {
    let first = args.get(1)?.to_str()?;
    if first.starts_with('-') || subcommands.iter().any(|s| s == first) || args.len() < 3 {
        return None;
    }
    Some(translate(args))
}

fn translate(args: &[OsString]) -> Result<Helper, String> {
    let (mut source, mut mountpoint, mut foreground, mut log) = (None, None, false, None);
    let mut opts: Vec<String> = Vec::new();
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("-o") => {
                let o = it.next().ok_or("-o needs options")?;
                let o = o.to_str().ok_or("mount options are not UTF-8")?;
                opts.extend(o.split(',').filter(|s| !s.is_empty()).map(str::to_owned));
            }
            Some(o) if o.starts_with("-o") => {
                opts.extend(
                    o[2..]
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned),
                );
            }
            Some("-f") => foreground = true,
            // mount(8) may pass these; they change nothing here.
            Some("-n" | "-s" | "-v") => {}
            _ if source.is_none() => source = Some(a.clone()),
            _ if mountpoint.is_none() => mountpoint = Some(a.clone()),
            _ => return Err(format!("unexpected argument {a:?}")),
        }
    }
    let source = source.ok_or("no repository given")?;
    // `backtree#/srv/repo` (the type `fuse` form) reaches us as `/srv/repo`; accept the
    // prefix too in case a caller passes it through.
    let source = match source.to_str().and_then(|s| s.strip_prefix("backtree#")) {
        Some(s) => OsString::from(s),
        None => source,
    };
    let mountpoint = mountpoint.ok_or("no mount point given")?;
    let mut out: Vec<OsString> = vec!["backtree".into(), "mount".into(), "--repo".into(), source];
    for o in &opts {
        let (k, v) = o
            .split_once('=')
            .map_or((o.as_str(), None), |(k, v)| (k, Some(v)));
        match (k, v) {
            ("allow_other", None) => out.push("--allow-other".into()),
            ("cache_size", Some(v)) => out.extend(["--cache-size".into(), v.into()]),
            ("cache_dir", Some(v)) => out.extend(["--cache-dir".into(), v.into()]),
            ("no_cache", None) => out.push("--no-cache".into()),
            ("s3_endpoint", Some(v)) => out.extend(["--s3-endpoint".into(), v.into()]),
            ("s3_region", Some(v)) => out.extend(["--s3-region".into(), v.into()]),
            ("s3_attempts", Some(v)) => out.extend(["--s3-attempts".into(), v.into()]),
            ("foreground", None) => foreground = true,
            ("log", Some(v)) => log = Some(OsString::from(v)),
            ("rw", None) => return Err("backtree mounts are read-only: use ro, not rw".into()),
            (k, _) if IGNORED.contains(&k) || k.starts_with("x-") || k == "comment" => {}
            _ => return Err(format!("unknown mount option {o:?}")),
        }
    }
    out.push(mountpoint);
    Ok(Helper {
        args: out,
        foreground,
        log,
    })
}

/// The write end of the pipe to the waiting parent, and where the log goes after that.
static READY: Mutex<Option<(std::fs::File, Option<OsString>)>> = Mutex::new(None);

/// Forks: the parent waits for [`mounted`] (exit 0) or for the child to end without it (exit 1)
/// and never returns; the child returns and goes on to mount. Call before any thread starts.
pub fn daemonize(log: Option<OsString>) {
    let mut fds = [0i32; 2];
    // SAFETY: a plain pipe(2) into a local array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        eprintln!(
            "backtree: cannot create a pipe: {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
    // SAFETY: no other thread exists yet (called first thing in main), so the child is a
    // faithful copy; both sides only use their own end of the pipe.
    match unsafe { libc::fork() } {
        -1 => {
            eprintln!("backtree: cannot fork: {}", std::io::Error::last_os_error());
            std::process::exit(1);
        }
        0 => {
            // SAFETY: closing the read end we do not use, and leaving the terminal's session.
            unsafe {
                libc::close(fds[0]);
                libc::setsid();
            }
            // SAFETY: fds[1] is ours and open.
            let w = unsafe { std::fs::File::from_raw_fd(fds[1]) };
            *READY.lock().unwrap_or_else(|e| e.into_inner()) = Some((w, log));
        }
        _ => {
            // SAFETY: closing the write end; reading our own end.
            unsafe { libc::close(fds[1]) };
            let mut r = unsafe { std::fs::File::from_raw_fd(fds[0]) };
            let mut b = [0u8; 1];
            let code = match r.read(&mut b) {
                Ok(1) => 0,
                _ => 1,
            };
            std::process::exit(code);
        }
    }
}

/// Tells the waiting parent that the filesystem is mounted, then detaches standard input,
/// output and error (to the `log=` file if one was given). No-op without [`daemonize`].
pub fn mounted() {
    let Some((mut w, log)) = READY.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    let _ = w.write_all(b"1");
    drop(w);
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null");
    let out = match &log {
        Some(p) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p),
        None => std::fs::OpenOptions::new().write(true).open("/dev/null"),
    };
    if let (Ok(null), Ok(out)) = (null, out) {
        let (n, o) = (null.into_raw_fd(), out.into_raw_fd());
        // SAFETY: duplicating descriptors we own onto 0, 1 and 2.
        unsafe {
            libc::dup2(n, 0);
            libc::dup2(o, 1);
            libc::dup2(o, 2);
            libc::close(n);
            libc::close(o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn fstab_options_become_mount_options() {
        let subs = vec!["mount".to_owned(), "ls".to_owned()];
        assert!(recognize(&v(&["backtree", "ls", "--repo", "/r"]), &subs).is_none());
        assert!(recognize(&v(&["backtree", "--help"]), &subs).is_none());
        let h = recognize(
            &v(&[
                "backtree",
                "/srv/b",
                "/mnt/b",
                "-o",
                "ro,allow_other,_netdev,dev,suid,cache_size=64M,log=/var/log/b.log",
            ]),
            &subs,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            h.args,
            v(&[
                "backtree",
                "mount",
                "--repo",
                "/srv/b",
                "--allow-other",
                "--cache-size",
                "64M",
                "/mnt/b"
            ])
        );
        assert!(!h.foreground);
        assert_eq!(h.log, Some("/var/log/b.log".into()));
        let h = recognize(&v(&["backtree", "backtree#s3://bk/p", "/m", "-f"]), &subs)
            .unwrap()
            .unwrap();
        assert!(h.foreground);
        assert_eq!(h.args[3], OsString::from("s3://bk/p"));
        let err = recognize(&v(&["backtree", "/r", "/m", "-o", "rw"]), &subs).unwrap();
        assert!(err.unwrap_err().contains("read-only"));
        let err = recognize(&v(&["backtree", "/r", "/m", "-o", "frob=1"]), &subs).unwrap();
        assert!(err.unwrap_err().contains("frob"));
    }
}
