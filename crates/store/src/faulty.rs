//! A failure-injecting wrapper around another store.
//!
//! Tests use it to prove two properties without a real outage:
//! - the writer, "killed" after any number of successful writes (every later write fails), never
//!   leaves a visible partial generation, and the next writer reuses what was uploaded;
//! - the reader turns a failing or corrupt object into an error naming it, never wrong bytes.

use crate::{ObjectInfo, ObjectStore, Result, StoreError};
use async_trait::async_trait;
use bytes::Bytes;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Which failure to inject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Every write after this many successful ones fails (a writer that died, or a store that
    /// went away mid-ingest).
    FailWritesAfter(u64),
    /// Reads of keys containing this substring fail.
    FailReadsOf(String),
    /// Every operation fails.
    Offline,
    /// Create-if-absent overwrites an existing object and reports success, as Garage 2.5 does
    /// with `If-None-Match: *`; [`ObjectStore::honors_create_if_absent`] is then `false`.
    IgnoreCreateIfAbsent,
}

/// Wraps a store and injects [`Fault`]s.
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    faults: Mutex<Vec<Fault>>,
    writes: AtomicU64,
    tripped: AtomicBool,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self {
            inner,
            faults: Mutex::new(Vec::new()),
            writes: AtomicU64::new(0),
            tripped: AtomicBool::new(false),
        }
    }

    /// Adds a fault.
    pub fn inject(&self, fault: Fault) {
        self.faults().push(fault);
    }

    /// Removes every fault.
    pub fn heal(&self) {
        self.faults().clear();
        self.tripped.store(false, Ordering::SeqCst);
    }

    /// Number of successful writes so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// Whether a write fault has fired.
    pub fn tripped(&self) -> bool {
        self.tripped.load(Ordering::SeqCst)
    }

    fn ignores_condition(&self) -> bool {
        self.faults()
            .iter()
            .any(|f| matches!(f, Fault::IgnoreCreateIfAbsent))
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, Vec<Fault>> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(key: &str, what: &str) -> StoreError {
        StoreError::Unavailable {
            key: key.to_owned(),
            message: format!("injected fault: {what}"),
        }
    }

    fn check_read(&self, key: &str) -> Result<()> {
        for f in self.faults().iter() {
            match f {
                Fault::Offline => return Err(Self::fail(key, "store offline")),
                Fault::FailReadsOf(s) if key.contains(s.as_str()) => {
                    return Err(Self::fail(key, "read failure"))
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn check_write(&self, key: &str) -> Result<()> {
        for f in self.faults().iter() {
            match f {
                Fault::Offline => return Err(Self::fail(key, "store offline")),
                Fault::FailWritesAfter(n) => {
                    // Count this write atomically so concurrent writers cannot both slip in.
                    let prev = self.writes.fetch_add(1, Ordering::SeqCst);
                    if prev >= *n {
                        self.writes.fetch_sub(1, Ordering::SeqCst);
                        self.tripped.store(true, Ordering::SeqCst);
                        return Err(Self::fail(key, "write failure"));
                    }
                    return Ok(());
                }
                _ => {}
            }
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        self.check_write(key)?;
        self.inner.put(key, data).await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool> {
        self.check_write(key)?;
        if self.ignores_condition() {
            self.inner.put(key, data).await?;
            return Ok(true);
        }
        self.inner.put_if_absent(key, data).await
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        self.check_read(key)?;
        self.inner.get(key).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        self.check_read(key)?;
        self.inner.get_range(key, range).await
    }

    async fn head(&self, key: &str) -> Result<Option<u64>> {
        self.check_read(key)?;
        self.inner.head(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.check_read(prefix)?;
        self.inner.list(prefix).await
    }

    async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        self.check_read(prefix)?;
        self.inner.list_dirs(prefix).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.check_write(key)?;
        self.inner.delete(key).await
    }

    fn honors_create_if_absent(&self) -> bool {
        !self.ignores_condition() && self.inner.honors_create_if_absent()
    }

    fn location(&self) -> String {
        format!("faulty({})", self.inner.location())
    }
}
