//! An in-memory store for tests: a sorted map behind a mutex.

use crate::{check_key, dirs_of, slice_range, ObjectInfo, ObjectStore, Result, StoreError};
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Mutex;
use std::time::SystemTime;

/// A store that keeps every object in memory. Cloning the handle is not supported; share it
/// through an `Arc`.
#[derive(Debug, Default)]
pub struct MemoryStore {
    objects: Mutex<BTreeMap<String, (Bytes, SystemTime)>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (Bytes, SystemTime)>> {
        // A panic while holding this lock cannot leave the map half-updated (every update is a
        // single insert or remove), so a poisoned lock is still consistent.
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces an object's bytes behind the repository's back (for corruption tests).
    pub fn tamper(&self, key: &str, data: Bytes) {
        self.map().insert(key.to_owned(), (data, SystemTime::now()));
    }

    /// Sets an object's modification time (for tests of age-based maintenance rules).
    pub fn set_modified(&self, key: &str, time: SystemTime) {
        if let Some(o) = self.map().get_mut(key) {
            o.1 = time;
        }
    }

    /// Number of objects held.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.map().is_empty()
    }
}

#[async_trait]
impl ObjectStore for MemoryStore {
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        check_key(key)?;
        self.map().insert(key.to_owned(), (data, SystemTime::now()));
        Ok(())
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool> {
        check_key(key)?;
        let mut map = self.map();
        if map.contains_key(key) {
            return Ok(false);
        }
        map.insert(key.to_owned(), (data, SystemTime::now()));
        Ok(true)
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        check_key(key)?;
        self.map()
            .get(key)
            .map(|o| o.0.clone())
            .ok_or_else(|| StoreError::NotFound {
                key: key.to_owned(),
            })
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let data = self.get(key).await?;
        slice_range(key, &data, range)
    }

    async fn head(&self, key: &str) -> Result<Option<u64>> {
        check_key(key)?;
        Ok(self.map().get(key).map(|d| d.0.len() as u64))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        Ok(self
            .map()
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ObjectInfo {
                key: k.clone(),
                size: v.0.len() as u64,
                modified: Some(v.1),
            })
            .collect())
    }

    async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        let keys: Vec<String> = self
            .list(prefix)
            .await?
            .into_iter()
            .map(|o| o.key)
            .collect();
        Ok(dirs_of(prefix, keys.into_iter()))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        check_key(key)?;
        self.map().remove(key);
        Ok(())
    }

    fn honors_create_if_absent(&self) -> bool {
        true
    }

    fn location(&self) -> String {
        "memory".to_owned()
    }
}
