//! backtree's read-only filesystem: every host's generations as a directory tree.
//!
//! - [`fs`]: the filesystem logic, plain async Rust returning `Result`, testable without FUSE
//!   against any store (the tests use the in-memory and failure-injecting stores);
//! - [`cache`]: the decompressed-chunk cache with merged concurrent misses;
//! - [`fuse`]: the thin adapter to the `fuser` crate, which maps errors to errno in one place;
//! - [`mount`]: mounting with safe defaults and unmounting.
//!
//! docs/mount.md describes the semantics the mount guarantees.

pub mod cache;
pub mod fs;
pub mod fuse;
pub mod mount;
pub mod packwin;

pub use fs::{BacktreeFs, FsError, FsOptions};
