//! Capturing a source file's metadata exactly: type, mode with setuid/setgid/sticky, owner ids
//! and names, nanosecond times, device numbers and every extended attribute (ACLs included:
//! `system.posix_acl_access` and `system.posix_acl_default` are read as the xattrs they are).

use crate::tree::{Entry, Kind, Time, Xattr};
use std::collections::HashMap;
use std::fs::Metadata;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Mutex;

/// The file type of `lstat` metadata.
pub fn kind_of(m: &Metadata) -> Kind {
    let t = m.file_type();
    if t.is_dir() {
        Kind::Dir
    } else if t.is_symlink() {
        Kind::Symlink
    } else if t.is_char_device() {
        Kind::Chardev
    } else if t.is_block_device() {
        Kind::Blockdev
    } else if t.is_fifo() {
        Kind::Fifo
    } else if t.is_socket() {
        Kind::Socket
    } else {
        Kind::File
    }
}

/// Caches uid → user name and gid → group name lookups (NSS calls are slow).
#[derive(Default)]
pub struct Names {
    users: Mutex<HashMap<u32, Option<String>>>,
    groups: Mutex<HashMap<u32, Option<String>>>,
}

impl Names {
    pub fn user(&self, uid: u32) -> Option<String> {
        let mut m = self.users.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| u.name)
            })
            .clone()
    }

    pub fn group(&self, gid: u32) -> Option<String> {
        let mut m = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(gid)
            .or_insert_with(|| {
                nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
                    .ok()
                    .flatten()
                    .map(|g| g.name)
            })
            .clone()
    }
}

/// Reads every extended attribute of `path` without following a symlink. A filesystem without
/// xattr support yields none.
pub fn xattrs(path: &Path) -> io::Result<Vec<Xattr>> {
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in names {
        match xattr::get(path, &name) {
            Ok(Some(value)) => out.push(Xattr {
                name: name.as_bytes().to_vec(),
                value,
            }),
            // Removed between list and get.
            Ok(None) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(e),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// An entry with the metadata of `m` and no content yet.
pub fn entry(name: &[u8], m: &Metadata, names: &Names, xattrs: Vec<Xattr>) -> Entry {
    let kind = kind_of(m);
    Entry {
        name: name.to_vec(),
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        user: names.user(m.uid()),
        group: names.group(m.gid()),
        mtime: Time(m.mtime(), m.mtime_nsec() as u32),
        atime: Time(m.atime(), m.atime_nsec() as u32),
        ctime: Time(m.ctime(), m.ctime_nsec() as u32),
        size: if kind == Kind::File || kind == Kind::Symlink {
            m.size()
        } else {
            0
        },
        ino: m.ino(),
        link: None,
        rdev: matches!(kind, Kind::Chardev | Kind::Blockdev).then(|| m.rdev()),
        xattrs,
        tree: None,
        target: None,
        chunks: None,
        chunk_list: None,
        holes: None,
        gzip: None,
    }
}
