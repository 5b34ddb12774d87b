//! Restoring a generation (or a subtree, or one file) to a local directory
//! (`backtree restore`), with the fidelity of `rsync -aHAX --numeric-ids` from the mount.
//!
//! # Design
//!
//! * **One walker, a pool of file workers.** The walker reads directory pages through the reader
//!   API ([`Repository::dir_entries`]) depth first, creates directories, symlinks, fifos, devices
//!   and sockets itself (a few system calls each), and hands every regular file to a bounded
//!   channel read by [`RestoreOptions::jobs`] worker threads. A worker fetches its file's data
//!   pieces in ranges of up to [`RANGE`] bytes, [`RANGES_IN_FLIGHT`] ranges at a time
//!   ([`Repository::read_range`]: every chunk verified against its id), and writes each with
//!   `pwrite` at its offset. Holes are never written: the worker skips hole pieces and sets the
//!   file's length at the end, so holes stay holes.
//! * **Never through a symlink.** Everything below TARGET is reached relative to directory
//!   descriptors (`openat`, `mkdirat`, `mknodat`, `symlinkat`, `linkat`, `unlinkat`,
//!   `fchownat`/`utimensat` with `AT_SYMLINK_NOFOLLOW`), and every open has `O_NOFOLLOW`. An
//!   entry in the way whose type differs from the generation's (an existing `TARGET/etc ->
//!   /etc` where the generation has a directory, or a crafted tree that names a symlink and a
//!   directory alike) is removed, never followed. Names are checked: `.`, `..`, empty names and
//!   names with `/` or NUL are refused. Extended attributes of symlinks and special files are
//!   set through `/proc/self/fd/DIRFD/NAME` with the non-following `l*xattr` calls.
//! * **Metadata order.** Content first, then owner (`fchown`: it clears setuid bits), then mode,
//!   then extended attributes (ACLs are the `system.posix_acl_*` attributes; a capability
//!   survives only if set after the owner), then times. Directories get theirs at the end,
//!   deepest first, after all their contents (which change their mtime). Ownership is set only
//!   when running as root, as rsync does.
//! * **Hardlinks.** The first entry of a link group (`Entry::link`) in walk order is restored
//!   as a file; the others are hard links to it, made after all files are written.
//! * **Into an existing tree only what differs.** A regular file whose size and mtime match is
//!   not rewritten; with [`RestoreOptions::checksum`], one of the same size is hashed piece by
//!   piece along the stored chunk boundaries (BLAKE3 is the chunk id; a hole must read as
//!   zeros), which reads nothing from the store but the chunk list. A regular file that
//!   differs is updated in place the same way: each piece is compared with the local bytes at
//!   its offset and only the pieces that differ are fetched and written (a hole that does not
//!   read as zeros is punched), then the length is set; so a touched mtime fetches nothing
//!   and 1% changed in a disk image fetches the chunks holding that 1%. A file with other hard
//!   links (or one that cannot be opened for writing) is replaced by a new file instead, so
//!   the other names keep their content. Metadata are always reapplied (cheap, and fixes any
//!   difference without rewriting content). [`RestoreOptions::delete`] removes entries the
//!   generation does not have.
//! * **Partial failures.** An entry that cannot be restored (an unreadable chunk, a device
//!   node without privilege) is listed in [`RestoreReport::failures`] with its path and the
//!   rest is restored; only failures to start (no such generation, TARGET unusable) are errors.

use crate::error::Error as RepoError;
use crate::id::Id;
use crate::repo::Repository;
use crate::tree::{ChunkList, Entry, Kind, Time};
use futures_util::StreamExt;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::runtime::Handle;

/// Bytes fetched per read of a file: contiguous data pieces up to this size.
pub const RANGE: u64 = 8 << 20;
/// Ranges of one file fetched at once.
pub const RANGES_IN_FLIGHT: usize = 4;

/// Errors that stop a restore before it starts. Failures of single entries are not errors:
/// they are listed in [`RestoreReport::failures`].
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("{}: {source}", path.display())]
    Target {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("host {host:?} has no generations in this repository")]
    NoGenerations { host: String },
}

/// How to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Compare existing files of the same size by content against the stored chunk ids instead
    /// of by size and mtime.
    pub checksum: bool,
    /// Remove entries under the target that the generation does not have.
    pub delete: bool,
    /// Files restored at once.
    pub jobs: usize,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            checksum: false,
            delete: false,
            jobs: 8,
        }
    }
}

/// Counters a progress display may read while the restore runs.
#[derive(Debug, Default)]
pub struct RestoreProgress {
    /// Entries restored or checked.
    pub entries: AtomicU64,
    /// Regular files whose content was written.
    pub files_written: AtomicU64,
    /// Bytes of data fetched from the repository (decompressed).
    pub bytes_fetched: AtomicU64,
}

/// An entry that could not be restored.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub path: String,
    pub error: String,
}

/// What a restore did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreReport {
    /// `HOST/GENERATION` restored.
    pub generation: String,
    /// Entries restored or checked (every type).
    pub entries: u64,
    /// Regular files whose content was written.
    pub files_written: u64,
    /// Regular files whose content was left as it was (same size and mtime, or same content).
    pub files_unchanged: u64,
    /// Logical size of the files written (holes included).
    pub bytes_written: u64,
    /// Bytes of data fetched from the repository (decompressed chunks).
    pub bytes_fetched: u64,
    /// Entries removed from the target (`--delete`, or in the way of another type).
    pub removed: u64,
    /// Entries that could not be restored; the rest was.
    pub failures: Vec<Failure>,
    pub seconds: f64,
}

/// What to restore: `HOST/GENERATION[/PATH]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub host: String,
    /// A generation's name, or `latest`.
    pub generation: String,
    /// `/`-separated below the generation's root; empty for all of it.
    pub path: String,
}

impl Selection {
    /// Parses `HOST/GENERATION[/PATH]`; `None` without a generation.
    pub fn parse(s: &str) -> Option<Selection> {
        let mut parts = s.trim_matches('/').splitn(3, '/');
        let host = parts.next().filter(|h| !h.is_empty())?;
        let generation = parts.next().filter(|g| !g.is_empty())?;
        Some(Selection {
            host: host.into(),
            generation: generation.into(),
            path: parts.next().unwrap_or_default().trim_matches('/').into(),
        })
    }
}

/// The name of a generation: `latest` becomes the host's newest.
pub async fn resolve_generation(
    repo: &Repository,
    host: &str,
    gen: &str,
) -> Result<String, RestoreError> {
    if gen == "latest" {
        repo.latest(host)
            .await?
            .ok_or_else(|| RestoreError::NoGenerations { host: host.into() })
    } else {
        Ok(gen.to_owned())
    }
}

/// Restores `HOST/GENERATION` (`latest` allowed), or the entry at its PATH, to `target`: a
/// directory's contents (and its metadata) go into `target`; a single non-directory goes to
/// `target/NAME`. `target` is created if missing. Blocks: call it outside the runtime's worker
/// threads (it uses `handle`).
pub fn restore(
    repo: &Repository,
    handle: &Handle,
    what: &Selection,
    target: &Path,
    opts: &RestoreOptions,
    progress: &RestoreProgress,
) -> Result<RestoreReport, RestoreError> {
    let start = Instant::now();
    let (host, gen, path) = (&what.host, &what.generation, &what.path);
    let gen = handle.block_on(resolve_generation(repo, host, gen))?;
    let m = handle.block_on(repo.manifest(host, &gen))?;
    let path = path.trim_matches('/');
    let entry = match (path.is_empty(), m.root.tree) {
        (true, _) | (false, None) => m.root.clone(),
        (false, Some(root)) => handle
            .block_on(repo.resolve(&root, path.as_bytes()))?
            .unwrap_or_else(|| m.root.clone()),
    };
    let terr = |source| RestoreError::Target {
        path: target.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(target).map_err(terr)?;
    let root = File::open(target).map_err(terr)?;
    if !root.metadata().map_err(terr)?.is_dir() {
        return Err(terr(io::Error::from_raw_os_error(libc::ENOTDIR)));
    }
    let root: Arc<OwnedFd> = Arc::new(root.into());
    let prefix = format!("{host}/{gen}/{path}");
    let ctx = Ctx {
        repo,
        handle,
        opts,
        progress,
        root: root.clone(),
        prefix: prefix.trim_end_matches('/').to_owned(),
        is_root: unsafe_geteuid() == 0,
        report: Mutex::new(RestoreReport {
            generation: format!("{host}/{gen}"),
            ..Default::default()
        }),
        links: Mutex::new(HashMap::new()),
    };
    let (tx, rx) = std::sync::mpsc::sync_channel::<FileJob>(256);
    let rx = Mutex::new(rx);
    let mut deferred = Vec::new();
    let mut dirs = Vec::new();
    std::thread::scope(|scope| {
        for _ in 0..opts.jobs.max(1) {
            scope.spawn(|| loop {
                let job = match rx.lock().map(|r| r.recv()) {
                    Ok(Ok(j)) => j,
                    _ => break,
                };
                if let Err(e) = ctx.restore_file(&job) {
                    ctx.fail(&job.path, e);
                }
                ctx.progress.entries.fetch_add(1, Ordering::Relaxed);
            });
        }
        if entry.kind == Kind::Dir {
            ctx.walk(&entry, &tx, &mut deferred, &mut dirs);
        } else {
            let name = entry.name.clone();
            ctx.child(&root, &[], &name, &entry, &tx, &mut deferred);
        }
        drop(tx);
    });
    for l in deferred {
        if let Err(e) = ctx.hardlink(&l) {
            ctx.fail(&l.path, e);
        }
    }
    // Directories' metadata, deepest first (reverse pre-order), then the root's.
    for (rel, e) in dirs.iter().rev() {
        let p = ctx.path_of(rel);
        if let Err(e) = ctx
            .open_rel(rel)
            .and_then(|fd| ctx.apply_fd(&File::from(fd), e))
        {
            ctx.fail(&p, e);
        }
    }
    if entry.kind == Kind::Dir {
        let f = File::from(root.try_clone().map_err(terr)?);
        if let Err(e) = ctx.apply_fd(&f, &entry) {
            ctx.fail(&ctx.prefix, e);
        }
    }
    let mut r = ctx.report.into_inner().unwrap_or_else(|p| p.into_inner());
    r.entries = progress.entries.load(Ordering::Relaxed);
    r.files_written = progress.files_written.load(Ordering::Relaxed);
    r.bytes_fetched = progress.bytes_fetched.load(Ordering::Relaxed);
    r.seconds = start.elapsed().as_secs_f64();
    Ok(r)
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// A regular file for a worker.
struct FileJob {
    dir: Arc<OwnedFd>,
    name: CString,
    path: String,
    entry: Entry,
}

/// A hard link made after all files: `rel` is linked to the group's first entry.
struct Deferred {
    group: u64,
    rel: Vec<Vec<u8>>,
    path: String,
}

struct Ctx<'a> {
    repo: &'a Repository,
    handle: &'a Handle,
    opts: &'a RestoreOptions,
    progress: &'a RestoreProgress,
    root: Arc<OwnedFd>,
    prefix: String,
    is_root: bool,
    report: Mutex<RestoreReport>,
    /// Link group → the first entry's path components (below the target).
    links: Mutex<HashMap<u64, Vec<Vec<u8>>>>,
}

impl Ctx<'_> {
    fn fail(&self, path: &str, e: impl std::fmt::Display) {
        if let Ok(mut r) = self.report.lock() {
            r.failures.push(Failure {
                path: path.to_owned(),
                error: e.to_string(),
            });
        }
    }

    fn count(&self, f: impl FnOnce(&mut RestoreReport)) {
        if let Ok(mut r) = self.report.lock() {
            f(&mut r);
        }
    }

    fn path_of(&self, rel: &[Vec<u8>]) -> String {
        let mut p = self.prefix.clone();
        for c in rel {
            p.push('/');
            p.push_str(&String::from_utf8_lossy(c));
        }
        p
    }

    /// The directory at `rel` below the target, opened component by component without
    /// following symlinks.
    fn open_rel(&self, rel: &[Vec<u8>]) -> io::Result<OwnedFd> {
        let mut fd = self.root.try_clone()?;
        for c in rel {
            fd = openat(&fd, &cname(c)?, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        }
        Ok(fd)
    }

    /// Depth first from the directory `top` (the target itself).
    fn walk(
        &self,
        top: &Entry,
        tx: &std::sync::mpsc::SyncSender<FileJob>,
        deferred: &mut Vec<Deferred>,
        dirs: &mut Vec<(Vec<Vec<u8>>, Entry)>,
    ) {
        // (where to make the directory: its parent's descriptor and its name, none for the
        // target itself; its components; its entry). A directory is opened only when its turn
        // comes, so open descriptors stay bounded by the depth, not by the width.
        type Pending = (Option<(Arc<OwnedFd>, CString)>, Vec<Vec<u8>>, Entry);
        let mut stack: Vec<Pending> = vec![(None, Vec::new(), top.clone())];
        while let Some((parent, rel, e)) = stack.pop() {
            let path = self.path_of(&rel);
            let fd = match parent {
                None => self.root.clone(),
                Some((pfd, name)) => match ensure_dir(&pfd, &name, self) {
                    Ok(fd) => {
                        self.progress.entries.fetch_add(1, Ordering::Relaxed);
                        dirs.push((rel.clone(), e.clone()));
                        Arc::new(fd)
                    }
                    Err(err) => {
                        self.fail(&path, err);
                        continue;
                    }
                },
            };
            let entries = match e.tree {
                Some(t) => match self.handle.block_on(self.repo.dir_entries(&t)) {
                    Ok(es) => es,
                    Err(err) => {
                        self.fail(&path, err);
                        continue;
                    }
                },
                None => Vec::new(),
            };
            if self.opts.delete {
                if let Err(err) = self.delete_extra(&fd, &entries) {
                    self.fail(&path, err);
                }
            }
            let mut subdirs = Vec::new();
            for c in &entries {
                if c.kind == Kind::Dir {
                    let mut r = rel.clone();
                    r.push(c.name.clone());
                    match check_name(&c.name) {
                        Ok(n) => subdirs.push((Some((fd.clone(), n)), r, c.clone())),
                        Err(err) => self.fail(&self.path_of(&r), err),
                    }
                } else {
                    self.child(&fd, &rel, &c.name, c, tx, deferred);
                }
            }
            // Name order: push in reverse so the first subdirectory is walked first.
            stack.extend(subdirs.into_iter().rev());
        }
    }

    /// A non-directory entry `name` in the directory `fd` (at `rel`).
    fn child(
        &self,
        fd: &Arc<OwnedFd>,
        rel: &[Vec<u8>],
        name: &[u8],
        e: &Entry,
        tx: &std::sync::mpsc::SyncSender<FileJob>,
        deferred: &mut Vec<Deferred>,
    ) {
        let mut r = rel.to_vec();
        r.push(name.to_vec());
        let path = self.path_of(&r);
        let cn = match check_name(name) {
            Ok(n) => n,
            Err(err) => return self.fail(&path, err),
        };
        match e.kind {
            Kind::Dir => {}
            Kind::File => {
                if let Some(g) = e.link {
                    let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
                    if links.contains_key(&g) {
                        self.progress.entries.fetch_add(1, Ordering::Relaxed);
                        deferred.push(Deferred {
                            group: g,
                            rel: r,
                            path,
                        });
                        return;
                    }
                    links.insert(g, r.clone());
                }
                let job = FileJob {
                    dir: fd.clone(),
                    name: cn,
                    path,
                    entry: e.clone(),
                };
                if let Err(std::sync::mpsc::SendError(job)) = tx.send(job) {
                    self.fail(&job.path, "no worker left to restore it");
                }
            }
            _ => {
                if let Err(err) = self.special(fd, &cn, e) {
                    self.fail(&path, err);
                }
                self.progress.entries.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Removes what `dir` holds that `entries` does not name.
    fn delete_extra(&self, dir: &OwnedFd, entries: &[Entry]) -> io::Result<()> {
        let keep: HashSet<&[u8]> = entries.iter().map(|e| e.name.as_slice()).collect();
        for n in list_names(dir)? {
            if !keep.contains(n.as_bytes()) {
                remove_at(dir, &n)?;
                self.count(|r| r.removed += 1);
            }
        }
        Ok(())
    }

    /// Removes whatever is at `name` (recursively, never following a symlink).
    fn remove(&self, dir: &OwnedFd, name: &CStr) -> io::Result<()> {
        remove_at(dir, name)?;
        self.count(|r| r.removed += 1);
        Ok(())
    }

    /// A symlink, fifo, device or socket.
    fn special(&self, dir: &OwnedFd, name: &CStr, e: &Entry) -> io::Result<()> {
        let fmt = match e.kind {
            Kind::Symlink => libc::S_IFLNK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Chardev => libc::S_IFCHR,
            Kind::Blockdev => libc::S_IFBLK,
            Kind::Socket => libc::S_IFSOCK,
            Kind::File | Kind::Dir => return Ok(()),
        };
        let rdev = e.rdev.unwrap_or(0);
        let target = e.target.clone().unwrap_or_default();
        let same = match fstatat(dir, name)? {
            None => false,
            Some(st) if st.st_mode & libc::S_IFMT != fmt => {
                self.remove(dir, name)?;
                false
            }
            Some(st) => {
                let same = match e.kind {
                    Kind::Symlink => readlinkat(dir, name)? == target,
                    Kind::Chardev | Kind::Blockdev => st.st_rdev == rdev,
                    _ => true,
                };
                if !same {
                    self.remove(dir, name)?;
                }
                same
            }
        };
        if !same {
            if e.kind == Kind::Symlink {
                let t = CString::new(target).map_err(|_| invalid("symlink target with NUL"))?;
                // SAFETY: valid C strings and an open directory descriptor.
                cvt(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })?;
            } else {
                // SAFETY: as above.
                cvt(unsafe {
                    libc::mknodat(dir.as_raw_fd(), name.as_ptr(), fmt | 0o600, rdev as _)
                })?;
            }
        }
        // Owner, mode, xattrs, times, all without following the entry.
        if self.is_root {
            // SAFETY: as above.
            cvt(unsafe {
                libc::fchownat(
                    dir.as_raw_fd(),
                    name.as_ptr(),
                    e.uid,
                    e.gid,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        if e.kind != Kind::Symlink {
            let p = openat(dir, name, libc::O_PATH, 0)?;
            let proc = CString::new(format!("/proc/self/fd/{}", p.as_raw_fd()))
                .map_err(|_| invalid("path"))?;
            // SAFETY: valid C string; the magic link names the inode just opened.
            cvt(unsafe { libc::chmod(proc.as_ptr(), e.mode as libc::mode_t) })?;
        }
        let mut xp = OsString::from(format!("/proc/self/fd/{}/", dir.as_raw_fd()));
        xp.push(OsStr::from_bytes(name.to_bytes()));
        sync_xattrs(&PathXattrs(PathBuf::from(xp)), e)?;
        utimensat(dir, name, e)
    }

    /// A regular file (a worker's job).
    fn restore_file(&self, job: &FileJob) -> io::Result<()> {
        let (dir, name, e) = (&job.dir, job.name.as_c_str(), &job.entry);
        // The length of an existing regular file that differs and is updated in place.
        let mut update = None;
        match fstatat(dir, name)? {
            None => {}
            Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => {
                let unchanged = st.st_size as u64 == e.size
                    && if self.opts.checksum {
                        let f = File::from(openat(dir, name, libc::O_RDONLY, 0)?);
                        let list = self.block(self.repo.chunk_list(e))?;
                        same_content(&f, &list)?
                    } else {
                        (st.st_mtime, st.st_mtime_nsec as u32) == (e.mtime.0, e.mtime.1)
                    };
                if unchanged {
                    self.count(|r| r.files_unchanged += 1);
                    return self.apply_fd(&File::from(openat(dir, name, libc::O_RDONLY, 0)?), e);
                }
                // Another hard link to it (outside the generation's link group) must not
                // change: replace this name with a new file instead.
                if st.st_nlink == 1 {
                    update = Some(st.st_size as u64);
                } else {
                    self.remove(dir, name)?;
                }
            }
            Some(_) => self.remove(dir, name)?,
        }
        if let Some(old) = update {
            match openat(dir, name, libc::O_RDWR, 0) {
                Ok(fd) => {
                    let f = File::from(fd);
                    if self.update_content(&f, e, old)? {
                        self.progress.files_written.fetch_add(1, Ordering::Relaxed);
                        self.count(|r| r.bytes_written += e.size);
                    } else {
                        self.count(|r| r.files_unchanged += 1);
                    }
                    return self.apply_fd(&f, e);
                }
                // Not writable (not root, mode without w): replace it.
                Err(_) => self.remove(dir, name)?,
            }
        }
        let f = File::from(openat(
            dir,
            name,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            0o600,
        )?);
        self.write_content(&f, e)?;
        self.progress.files_written.fetch_add(1, Ordering::Relaxed);
        self.count(|r| r.bytes_written += e.size);
        self.apply_fd(&f, e)
    }

    fn block<T>(&self, f: impl std::future::Future<Output = crate::Result<T>>) -> io::Result<T> {
        self.handle.block_on(f).map_err(io::Error::other)
    }

    /// Writes a file's data pieces at their offsets, skipping holes, then sets its length.
    fn write_content(&self, f: &File, e: &Entry) -> io::Result<()> {
        let list = self.block(self.repo.chunk_list(e))?;
        let mut ranges = Vec::new();
        for (i, c) in list.0.iter().enumerate() {
            if c.id.is_some() {
                add_range(&mut ranges, list.start(i), c.end);
            }
        }
        self.fetch_into(f, &list, ranges)?;
        f.set_len(e.size)
    }

    /// Brings an existing file of `old` bytes to `e`'s content in place: a data piece is
    /// fetched and written only if the file's bytes at its offset do not hash to its chunk id,
    /// a hole piece is punched (or zeroed) only if those bytes are not zeros; then the length
    /// is set. Reads the local file once; returns whether anything was written.
    fn update_content(&self, f: &File, e: &Entry, old: u64) -> io::Result<bool> {
        let list = self.block(self.repo.chunk_list(e))?;
        let (mut ranges, mut wrote, mut buf) = (Vec::new(), false, Vec::new());
        for (i, c) in list.0.iter().enumerate() {
            let s = list.start(i);
            match &c.id {
                Some(id) => {
                    let same = c.end <= old && {
                        buf.resize((c.end - s) as usize, 0);
                        f.read_exact_at(&mut buf, s)?;
                        Id::of(&buf) == *id
                    };
                    if !same {
                        add_range(&mut ranges, s, c.end);
                    }
                }
                // Past the old end the final set_len leaves zeros (a hole).
                None if s < old => {
                    let end = c.end.min(old);
                    if !reads_as_zeros(f, s, end)? {
                        punch_hole(f, s, end)?;
                        wrote = true;
                    }
                }
                None => {}
            }
        }
        wrote |= !ranges.is_empty() || old != e.size;
        self.fetch_into(f, &list, ranges)?;
        f.set_len(e.size)?;
        Ok(wrote)
    }

    /// Fetches the byte ranges of `list` ([`RANGES_IN_FLIGHT`] at a time) and writes each at
    /// its offset in `f`.
    fn fetch_into(&self, f: &File, list: &ChunkList, ranges: Vec<(u64, u64)>) -> io::Result<()> {
        let repo = self.repo;
        self.handle.block_on(async {
            let mut fetches = futures_util::stream::iter(ranges)
                .map(|(s, end)| async move { (s, repo.read_range(list, s, end - s).await) })
                .buffered(RANGES_IN_FLIGHT);
            while let Some((s, data)) = fetches.next().await {
                let data = data.map_err(io::Error::other)?;
                self.progress
                    .bytes_fetched
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                f.write_all_at(&data, s)?;
            }
            io::Result::Ok(())
        })
    }

    /// Owner, mode, xattrs and times of an open file or directory.
    fn apply_fd(&self, f: &File, e: &Entry) -> io::Result<()> {
        if self.is_root {
            std::os::unix::fs::fchown(f, Some(e.uid), Some(e.gid))?;
        }
        f.set_permissions(std::fs::Permissions::from_mode(e.mode))?;
        sync_xattrs(f, e)?;
        let ts = timespecs(e.atime, e.mtime);
        // SAFETY: an open descriptor and a two-element timespec array.
        cvt(unsafe { libc::futimens(f.as_raw_fd(), ts.as_ptr()) })?;
        Ok(())
    }

    /// A later entry of a hardlink group: a link to the group's first.
    fn hardlink(&self, l: &Deferred) -> io::Result<()> {
        let first = self
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&l.group)
            .cloned()
            .ok_or_else(|| invalid("hardlink group without a first entry"))?;
        let (fdir, fname) = first.split_at(first.len() - 1);
        let (ldir, lname) = l.rel.split_at(l.rel.len() - 1);
        let (fdir, ldir) = (self.open_rel(fdir)?, self.open_rel(ldir)?);
        let (fname, lname) = (cname(&fname[0])?, cname(&lname[0])?);
        let fst = fstatat(&fdir, &fname)?
            .filter(|s| s.st_mode & libc::S_IFMT == libc::S_IFREG)
            .ok_or_else(|| invalid("the first entry of its hardlink group was not restored"))?;
        if let Some(st) = fstatat(&ldir, &lname)? {
            if (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino) {
                return Ok(());
            }
            self.remove(&ldir, &lname)?;
        }
        // SAFETY: open directory descriptors and valid C strings; flags 0: no following.
        cvt(unsafe {
            libc::linkat(
                fdir.as_raw_fd(),
                fname.as_ptr(),
                ldir.as_raw_fd(),
                lname.as_ptr(),
                0,
            )
        })?;
        Ok(())
    }
}

/// Whether `f` holds the content of `list`: each data piece's BLAKE3 is its chunk id, each
/// hole reads as zeros.
pub fn same_content(f: &File, list: &ChunkList) -> io::Result<bool> {
    let mut buf = Vec::new();
    for (i, c) in list.0.iter().enumerate() {
        let s = list.start(i);
        let ok = match &c.id {
            Some(id) => {
                buf.resize((c.end - s) as usize, 0);
                f.read_exact_at(&mut buf, s)?;
                Id::of(&buf) == *id
            }
            // Read in bounded blocks, holes skipped: a hole piece may be gigabytes.
            None => reads_as_zeros(f, s, c.end)?,
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Adds the piece `s..end` to `ranges`, merged with the last range if contiguous and the
/// result stays within [`RANGE`].
fn add_range(ranges: &mut Vec<(u64, u64)>, s: u64, end: u64) {
    match ranges.last_mut() {
        Some(last) if last.1 == s && end - last.0 <= RANGE => last.1 = end,
        _ => ranges.push((s, end)),
    }
}

/// Whether `f`'s bytes `s..end` are all zeros; holes (`SEEK_DATA`) are skipped unread.
fn reads_as_zeros(f: &File, mut s: u64, end: u64) -> io::Result<bool> {
    let mut buf = vec![0u8; 1 << 20];
    while s < end {
        // SAFETY: an open descriptor.
        let d = unsafe { libc::lseek(f.as_raw_fd(), s as libc::off_t, libc::SEEK_DATA) };
        if d < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                return Ok(true); // no data from s to the end of the file
            }
            return Err(err);
        }
        s = s.max(d as u64);
        if s >= end {
            break;
        }
        let n = (end - s).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], s)?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        s += n as u64;
    }
    Ok(true)
}

/// Makes `f`'s bytes `s..end` zeros: a punched hole, or written zeros where the filesystem
/// cannot punch.
fn punch_hole(f: &File, s: u64, end: u64) -> io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: an open descriptor.
    if unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            mode,
            s as libc::off_t,
            (end - s) as libc::off_t,
        )
    } == 0
    {
        return Ok(());
    }
    let zeros = vec![0u8; 1 << 20];
    let mut at = s;
    while at < end {
        let n = (end - at).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// A directory `name` in `dir`, created if missing; anything else there is removed first.
fn ensure_dir(dir: &OwnedFd, name: &CStr, ctx: &Ctx) -> io::Result<OwnedFd> {
    match fstatat(dir, name)? {
        Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {}
        other => {
            if other.is_some() {
                ctx.remove(dir, name)?;
            }
            // SAFETY: an open directory descriptor and a valid C string.
            cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o700) })?;
        }
    }
    openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// A name from a generation as a C string, refusing what could leave its directory.
fn check_name(name: &[u8]) -> io::Result<CString> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(invalid("unsafe file name in the generation; not restored"));
    }
    cname(name)
}

fn cname(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| invalid("file name with NUL"))
}

fn cvt(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `openat` with `O_NOFOLLOW | O_CLOEXEC` added.
fn openat(
    dir: &OwnedFd,
    name: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    // SAFETY: an open directory descriptor and a valid C string.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor we just opened and own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `lstat` of `name` in `dir`; `None` if absent.
fn fstatat(dir: &OwnedFd, name: &CStr) -> io::Result<Option<libc::stat>> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid pointers; the buffer is initialised on success.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOENT) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    // SAFETY: fstatat succeeded.
    Ok(Some(unsafe { st.assume_init() }))
}

fn readlinkat(dir: &OwnedFd, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid pointers and the buffer's length.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn timespecs(atime: Time, mtime: Time) -> [libc::timespec; 2] {
    let t = |t: Time| libc::timespec {
        tv_sec: t.0 as libc::time_t,
        tv_nsec: t.1 as _,
    };
    [t(atime), t(mtime)]
}

fn utimensat(dir: &OwnedFd, name: &CStr, e: &Entry) -> io::Result<()> {
    let ts = timespecs(e.atime, e.mtime);
    // SAFETY: valid pointers; a two-element timespec array.
    cvt(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

/// The names in a directory (without `.` and `..`).
fn list_names(dir: &OwnedFd) -> io::Result<Vec<CString>> {
    let fd: RawFd = {
        let own = openat(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        std::os::fd::IntoRawFd::into_raw_fd(own)
    };
    // SAFETY: fdopendir takes over the descriptor we own; closed by closedir below (or here).
    let d = unsafe { libc::fdopendir(fd) };
    if d.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: still ours since fdopendir failed.
        unsafe { libc::close(fd) };
        return Err(e);
    }
    let mut out = Vec::new();
    loop {
        // SAFETY: a valid DIR stream; the entry is read before the next readdir.
        let ent = unsafe { libc::readdir(d) };
        if ent.is_null() {
            break;
        }
        // SAFETY: d_name is NUL-terminated.
        let n = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
        if n != c"." && n != c".." {
            out.push(n.to_owned());
        }
    }
    // SAFETY: the stream opened above.
    unsafe { libc::closedir(d) };
    Ok(out)
}

/// Removes `name` in `dir`, a directory with all it holds; symlinks are removed, not followed.
fn remove_at(dir: &OwnedFd, name: &CStr) -> io::Result<()> {
    let Some(st) = fstatat(dir, name)? else {
        return Ok(());
    };
    let flags = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        let sub = openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        for n in list_names(&sub)? {
            remove_at(&sub, &n)?;
        }
        libc::AT_REMOVEDIR
    } else {
        0
    };
    // SAFETY: an open directory descriptor and a valid C string.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })
}

/// Extended attributes of something: an open file, or a path read without following its last
/// component.
trait Xattrs {
    fn names(&self) -> io::Result<Vec<OsString>>;
    fn set(&self, name: &OsStr, value: &[u8]) -> io::Result<()>;
    fn remove(&self, name: &OsStr) -> io::Result<()>;
}

impl Xattrs for File {
    fn names(&self) -> io::Result<Vec<OsString>> {
        Ok(xattr::FileExt::list_xattr(self)?.collect())
    }
    fn set(&self, name: &OsStr, value: &[u8]) -> io::Result<()> {
        xattr::FileExt::set_xattr(self, name, value)
    }
    fn remove(&self, name: &OsStr) -> io::Result<()> {
        xattr::FileExt::remove_xattr(self, name)
    }
}

struct PathXattrs(PathBuf);

impl Xattrs for PathXattrs {
    fn names(&self) -> io::Result<Vec<OsString>> {
        Ok(xattr::list(&self.0)?.collect())
    }
    fn set(&self, name: &OsStr, value: &[u8]) -> io::Result<()> {
        xattr::set(&self.0, name, value)
    }
    fn remove(&self, name: &OsStr) -> io::Result<()> {
        xattr::remove(&self.0, name)
    }
}

/// Makes the extended attributes exactly the entry's.
fn sync_xattrs(x: &dyn Xattrs, e: &Entry) -> io::Result<()> {
    let want: HashSet<&[u8]> = e.xattrs.iter().map(|a| a.name.as_slice()).collect();
    let have = match x.names() {
        Ok(n) => n,
        // A filesystem without xattrs: fine if the entry has none.
        Err(err) if err.raw_os_error() == Some(libc::ENOTSUP) && e.xattrs.is_empty() => {
            return Ok(())
        }
        Err(err) => return Err(err),
    };
    for n in have {
        if !want.contains(n.as_bytes()) {
            x.remove(&n)?;
        }
    }
    for a in &e.xattrs {
        x.set(OsStr::from_bytes(&a.name), &a.value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use backtree_store::MemoryStore;

    /// A crafted generation whose directory names a symlink `a -> OUTSIDE` and also a directory
    /// `a` (in another page, either order) never makes the restore write outside the target.
    #[test]
    fn a_symlink_and_a_directory_of_one_name_never_lead_outside() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let repo = rt
            .block_on(Repository::init(Arc::new(MemoryStore::new())))
            .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let (outside, target) = (tmp.path().join("outside"), tmp.path().join("t"));
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::create_dir_all(&target).unwrap();
        let root: Arc<OwnedFd> = Arc::new(File::open(&target).unwrap().into());
        let (opts, progress) = (RestoreOptions::default(), RestoreProgress::default());
        let ctx = Ctx {
            repo: &repo,
            handle: rt.handle(),
            opts: &opts,
            progress: &progress,
            root: root.clone(),
            prefix: "h/g".into(),
            is_root: false,
            report: Mutex::new(RestoreReport::default()),
            links: Mutex::new(HashMap::new()),
        };
        let mut link = Entry::made_file(b"a", 0o777, 0, 0, Time(1, 0), Time(1, 0));
        link.kind = Kind::Symlink;
        link.target = Some(outside.as_os_str().as_bytes().to_vec());
        let file = Entry::made_file(b"passwd", 0o644, 0, 0, Time(1, 0), Time(1, 0));
        let put = |dir: OwnedFd| {
            ctx.restore_file(&FileJob {
                dir: Arc::new(dir),
                name: c"passwd".into(),
                path: "h/g/a/passwd".into(),
                entry: file.clone(),
            })
        };

        // Symlink first, then the directory and a file in it.
        ctx.special(&root, c"a", &link).unwrap();
        assert!(std::fs::symlink_metadata(target.join("a"))
            .unwrap()
            .file_type()
            .is_symlink());
        let a = ensure_dir(&root, c"a", &ctx).unwrap();
        put(a).unwrap();
        assert!(target.join("a/passwd").is_file());
        // Then the symlink again, and a file into `a` through a fresh lookup: refused.
        ctx.special(&root, c"a", &link).unwrap();
        assert!(openat(&root, c"a", libc::O_RDONLY | libc::O_DIRECTORY, 0).is_err());
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());

        // Names that could leave their directory are refused.
        for bad in [&b".."[..], b".", b"", b"x/y", b"a\0b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
