//! The thin FUSE adapter: turns kernel requests into calls of [`BacktreeFs`] and results into
//! replies. Errors become errno values in exactly one place, [`errno`].
//!
//! Every request is dispatched the same way ([`FuseAdapter::run`]): its async operation is
//! polled once on the FUSE thread and replies there if it completes, which it does whenever
//! what it needs is in memory (a parsed directory page, a cached chunk); otherwise the started
//! operation moves to the tokio runtime and replies from there (fuser's reply objects are
//! `Send`), so a slow fetch never blocks the FUSE threads and a fast answer pays no thread
//! hand-off (~25 µs).
//!
//! Files are opened by the kernel without a request (FUSE_NO_OPEN_SUPPORT, see `init`): the
//! filesystem keeps what reading needs per inode, so a file's reads arrive with its inode and no
//! handle.

use crate::fs::{Attr, BacktreeFs, FileKind, FsError, BLKSIZE};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use std::ffi::OsStr;
use std::future::Future;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::runtime::Handle;

/// Kernel readahead we ask for. The kernel caps it at what it offers (128 KiB on this kernel
/// unless the mount's `read_ahead_kb` is raised, which `backtree mount` does as root).
const MAX_READAHEAD: u32 = 1 << 20;
/// Background requests in flight (fuser's default is 16): more readahead in flight.
const MAX_BACKGROUND: u16 = 64;

/// The one place where filesystem errors become errno values.
pub fn errno(e: &FsError) -> Errno {
    match e {
        FsError::NotFound => Errno::ENOENT,
        FsError::NotDir => Errno::ENOTDIR,
        FsError::IsDir => Errno::EISDIR,
        FsError::NoData => Errno::ENODATA,
        FsError::Range => Errno::ERANGE,
        FsError::NoXio => Errno::ENXIO,
        FsError::Invalid => Errno::EINVAL,
        FsError::BadHandle => Errno::EBADF,
        FsError::Io { .. } => Errno::EIO,
    }
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        flags: 0,
        blksize: BLKSIZE,
    }
}

/// Replies to an xattr request of `size` with `data` (size query, value, or ERANGE).
fn xattr_reply(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(errno(&FsError::Range));
    } else {
        reply.data(data);
    }
}

/// The fuser `Filesystem` over a [`BacktreeFs`].
pub struct FuseAdapter {
    fs: Arc<BacktreeFs>,
    rt: Handle,
    /// The kernel opens files without asking (FUSE_NO_OPEN_SUPPORT): OPEN is answered ENOSYS.
    no_open: bool,
}

impl FuseAdapter {
    pub fn new(fs: Arc<BacktreeFs>, rt: Handle) -> Self {
        FuseAdapter {
            fs,
            rt,
            no_open: false,
        }
    }
}

impl FuseAdapter {
    /// Answers a request: see [`dispatch`].
    fn run<T>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
        done: impl FnOnce(T) + Send + 'static,
    ) {
        dispatch(&self.rt, fut, done);
    }
}

/// Runs `fut` on the calling (FUSE) thread until it first has to wait. When everything it
/// needs is in memory it completes there, and `done` replies without a thread hand-off
/// (~25 µs); otherwise the started future moves to `rt` and `done` runs there. Polling it there
/// registers the runtime's waker (a future must only wake the waker of its latest poll).
/// Returns whether it completed on the calling thread.
pub(crate) fn dispatch<T>(
    rt: &Handle,
    fut: impl Future<Output = T> + Send + 'static,
    done: impl FnOnce(T) + Send + 'static,
) -> bool {
    let mut fut = Box::pin(fut);
    // Inside the runtime's context, so that the future may spawn and use tokio's timers.
    let _guard = rt.enter();
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(v) => {
            done(v);
            true
        }
        Poll::Pending => {
            rt.spawn(async move { done(fut.await) });
            false
        }
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Zero-message opens: a file's reads need nothing from its open, and an OPEN plus a
        // RELEASE per file were two of the three requests per small file of a restore. The
        // kernel then opens with FOPEN_KEEP_CACHE, which generation contents want anyway.
        self.no_open = config
            .capabilities()
            .contains(InitFlags::FUSE_NO_OPEN_SUPPORT);
        let _ = config
            .set_max_readahead(MAX_READAHEAD)
            .or_else(|max| config.set_max_readahead(max));
        let _ = config.set_max_background(MAX_BACKGROUND);
        // Each capability separately: an older kernel lacking one should not lose the others.
        // Not FUSE_CACHE_SYMLINKS: `latest` changes, and the kernel would keep its old target.
        // Not FUSE_READDIRPLUS_AUTO: with it the kernel uses readdirplus only for a directory's
        // first buffer, and `find` or `rsync` then pay one LOOKUP per later entry.
        for cap in [
            InitFlags::FUSE_ASYNC_READ,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_POSIX_ACL,
            InitFlags::FUSE_MAX_PAGES,
        ] {
            let _ = config.add_capabilities(cap);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.as_bytes().to_vec();
        let fs = self.fs.clone();
        let asked = fs.clone();
        self.run(
            async move { asked.lookup(parent.0, &name).await },
            move |res| match res {
                Ok((ino, node, attr, ttl)) => {
                    // The kernel now holds a reference to this inode.
                    fs.remember(ino, &node);
                    reply.entry(&ttl, &file_attr(&attr), Generation(0));
                }
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let fs = self.fs.clone();
        self.run(async move { fs.getattr(ino.0).await }, |res| match res {
            Ok((attr, ttl)) => reply.attr(&ttl, &file_attr(&attr)),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let fs = self.fs.clone();
        self.run(async move { fs.readlink(ino.0).await }, |res| match res {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            reply.error(Errno::EROFS);
            return;
        }
        if self.no_open {
            // "Opened, and do not ask again" (see init). A read of something that is not a
            // readable file then gets the error its open would have got.
            reply.error(Errno::ENOSYS);
            return;
        }
        // Files of up to 64 chunks carry their chunk list: usually opened here, no hand-off.
        let fs = self.fs.clone();
        self.run(async move { fs.open(ino.0).await }, |res| match res {
            // Contents never change: keep the page cache across opens. Reads go by inode.
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let fs = self.fs.clone();
        self.run(
            async move { fs.read(ino.0, offset, size).await },
            |res| match res {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is ever written, so there is nothing to flush. ENOSYS (not "ok") makes the
        // kernel stop sending FLUSH at all: without it every close() waited for a round trip to
        // this daemon, one of the ~5 requests per file of an `rsync -a` restore.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Reads go by inode; nothing is held per open.
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fs = self.fs.clone();
        self.run(async move { fs.opendir(ino.0).await }, |res| {
            match res {
                // Generation directories never change: let the kernel cache their listings.
                // Root and host directories must be listed afresh so new generations appear.
                Ok((fh, true)) => reply.opened(
                    FileHandle(fh),
                    FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
                ),
                Ok((fh, false)) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let fs = self.fs.clone();
        let listed = fs.clone();
        self.run(
            async move { listed.readdir(fh.0, offset, 512).await },
            move |res| match res {
                Ok(items) => {
                    for it in items {
                        if reply.add(
                            INodeNo(it.ino),
                            it.next,
                            file_type(it.attr.kind),
                            OsStr::from_bytes(&it.name),
                        ) {
                            break;
                        }
                    }
                    reply.ok();
                }
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let fs = self.fs.clone();
        let listed = fs.clone();
        self.run(
            async move { listed.readdir(fh.0, offset, 256).await },
            move |res| {
                match res {
                    Ok(items) => {
                        for it in items {
                            let full = reply.add(
                                INodeNo(it.ino),
                                it.next,
                                OsStr::from_bytes(&it.name),
                                &it.ttl,
                                &file_attr(&it.attr),
                                Generation(0),
                            );
                            if full {
                                break;
                            }
                            // The kernel now holds a reference to this inode.
                            fs.remember(it.ino, &it.node);
                        }
                        reply.ok();
                    }
                    Err(e) => reply.error(errno(&e)),
                }
            },
        );
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (blocks, files, namelen) = self.fs.statfs();
        reply.statfs(blocks, 0, 0, files, 0, BLKSIZE, namelen, BLKSIZE);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = name.as_bytes().to_vec();
        let fs = self.fs.clone();
        self.run(
            async move { fs.getxattr(ino.0, &name).await },
            move |res| match res {
                Ok(v) => xattr_reply(reply, size, &v),
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let fs = self.fs.clone();
        self.run(
            async move { fs.listxattr(ino.0).await },
            move |res| match res {
                Ok(v) => xattr_reply(reply, size, &v),
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let fs = self.fs.clone();
        self.run(
            async move { fs.lseek(ino.0, offset, whence).await },
            |res| match res {
                Ok(o) => reply.offset(o),
                Err(e) => reply.error(errno(&e)),
            },
        );
    }
}
