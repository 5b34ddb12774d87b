//! A request-counting wrapper around another store.
//!
//! Tests use it to pin down what an operation costs in store requests, the unit S3 bills and
//! waits on: listing a host directory of the mount makes one LIST and no manifest GET,
//! `backtree ls` of every host makes one LIST whatever the number of hosts. Every request is
//! recorded as its [`Op`] and key (the prefix, for listings), in order; [`CountingStore::take`]
//! hands them over and starts afresh.

use crate::{ObjectInfo, ObjectStore, Result};
use async_trait::async_trait;
use bytes::Bytes;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// A kind of store request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Put,
    PutIfAbsent,
    Get,
    GetRange,
    Head,
    /// A flat listing ([`ObjectStore::list`]).
    List,
    /// A listing of one level ([`ObjectStore::list_dirs`]).
    ListDirs,
    Delete,
}

impl Op {
    /// Whether this is a listing of either kind.
    pub fn is_list(self) -> bool {
        matches!(self, Op::List | Op::ListDirs)
    }

    /// Whether this reads an object's bytes (whole or a range).
    pub fn is_read(self) -> bool {
        matches!(self, Op::Get | Op::GetRange)
    }
}

/// The requests made so far: each one's kind and key (or listed prefix), in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requests(pub Vec<(Op, String)>);

impl Requests {
    /// How many requests match `f`.
    pub fn count(&self, f: impl Fn(Op, &str) -> bool) -> usize {
        self.0.iter().filter(|(op, k)| f(*op, k)).count()
    }

    /// Listings of either kind.
    pub fn lists(&self) -> usize {
        self.count(|op, _| op.is_list())
    }

    /// Reads (whole or ranged) of keys starting with `prefix`.
    pub fn reads_under(&self, prefix: &str) -> usize {
        self.count(|op, k| op.is_read() && k.starts_with(prefix))
    }
}

/// Wraps a store and records every request made through it.
#[derive(Debug)]
pub struct CountingStore {
    inner: Arc<dyn ObjectStore>,
    log: Mutex<Vec<(Op, String)>>,
}

impl CountingStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self {
            inner,
            log: Mutex::new(Vec::new()),
        }
    }

    /// The requests made since the last `take` (or since creation), forgetting them.
    pub fn take(&self) -> Requests {
        Requests(std::mem::take(&mut *self.log()))
    }

    /// The requests made since the last `take`, keeping them.
    pub fn requests(&self) -> Requests {
        Requests(self.log().clone())
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Vec<(Op, String)>> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, op: Op, key: &str) {
        self.log().push((op, key.to_owned()));
    }
}

#[async_trait]
impl ObjectStore for CountingStore {
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        self.record(Op::Put, key);
        self.inner.put(key, data).await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool> {
        self.record(Op::PutIfAbsent, key);
        self.inner.put_if_absent(key, data).await
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        self.record(Op::Get, key);
        self.inner.get(key).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        self.record(Op::GetRange, key);
        self.inner.get_range(key, range).await
    }

    async fn head(&self, key: &str) -> Result<Option<u64>> {
        self.record(Op::Head, key);
        self.inner.head(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.record(Op::List, prefix);
        self.inner.list(prefix).await
    }

    async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        self.record(Op::ListDirs, prefix);
        self.inner.list_dirs(prefix).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.record(Op::Delete, key);
        self.inner.delete(key).await
    }

    fn honors_create_if_absent(&self) -> bool {
        self.inner.honors_create_if_absent()
    }

    fn location(&self) -> String {
        self.inner.location()
    }
}
