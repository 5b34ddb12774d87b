//! backtree's core: the repository format, chunking, packs, trees, the index, the reader API
//! and the writer.
//!
//! ```text
//! config                         format version, features, chunker and codec   (config)
//! snapshots/<host>/<generation>  manifest: the commit point of one ingest       (manifest)
//! index/<hash>                   blob id → pack, offset, length                 (index)
//! packs/data/<xx>/<hash>         file chunks, zstd, with a trailer              (pack, blob)
//! packs/tree/<xx>/<hash>         directory pages, chunk lists, hardlink tables  (tree)
//! ```
//!
//! [`repo::Repository`] reads; [`ingest::ingest`] writes. Both sit on a
//! [`backtree_store::ObjectStore`]. docs/format.md specifies every object byte for byte, and
//! docs/concurrency.md states who may write what while others read.

pub mod blob;
pub mod cat;
pub mod chunklist;
pub mod claim;
pub mod config;
pub mod diff;
pub mod error;
pub mod find;
pub mod forget;
pub mod history;
pub mod id;
pub mod index;
pub mod ingest;
pub mod lease;
pub mod manifest;
pub mod pack;
pub mod prune;
pub mod repair;
pub mod repo;
pub mod restore;
#[doc(hidden)]
pub mod testing;
pub mod tree;
pub mod verify;
pub mod walk;

pub use error::{Error, ErrorKind, Result};
pub use id::{BlobKind, Id};
pub use repo::Repository;
