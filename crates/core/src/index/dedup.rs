//! What an ingest knows about the repository's blobs, in memory independent of other hosts'
//! history: the filters of the current root's base and runs (about 1.1 B per chunk), the ids of
//! the uncovered deltas (a bounded few, see [compaction](super::compact)), and bucket reads to
//! confirm every "maybe" (a filter never decides that a blob exists: a false positive would
//! leave a generation pointing at a blob nobody stored).

use super::filter::FilterBundle;
use super::{IndexSet, View};
use crate::error::Result;
use crate::id::Id;
use std::sync::Arc;
use tokio::runtime::Handle;

/// The ingest's view of the index (see the module docs).
pub struct Dedup {
    set: Arc<IndexSet>,
    view: Arc<View>,
    base: Option<Arc<FilterBundle>>,
    handle: Handle,
}

impl Dedup {
    /// Takes a view of the index (the repository's own, so the ingest lists and loads it once)
    /// and loads the base's filter. Must run inside the runtime whose handle later
    /// confirmations use.
    pub async fn load(set: Arc<IndexSet>) -> Result<Dedup> {
        let view = set.fresh_view().await?;
        let base = match &view.root.base {
            Some(b) => Some(set.filter_bundle(&b.filter).await?),
            None => None,
        };
        Ok(Dedup {
            set,
            view,
            base,
            handle: Handle::current(),
        })
    }

    /// The index set used (for its statistics).
    pub fn index(&self) -> &IndexSet {
        &self.set
    }

    /// Memory held by filters and delta ids (bytes, approximate).
    pub fn memory(&self) -> usize {
        self.base.as_ref().map_or(0, |b| b.memory())
            + self
                .view
                .run_filters
                .iter()
                .map(|f| f.memory())
                .sum::<usize>()
            + self.view.deltas.len() * 128
    }

    /// Whether the blob may be in the repository (no false negatives; used where a committed
    /// generation already references the blob).
    /// A blob with a tombstone (a prune is deleting a copy of it) counts as unknown, unless an
    /// uncovered delta has a copy that is not doomed: it is stored again rather than trusted.
    pub fn maybe(&self, id: &Id) -> bool {
        let v = &self.view;
        if v.has_tombstone(id) {
            return v.deltas.get(id).is_some_and(|e| !v.doomed(e));
        }
        v.deltas.contains_key(id)
            || self.base.as_ref().is_some_and(|b| b.may_contain(id))
            || v.run_filters.iter().any(|f| f.may_contain(id))
    }

    /// Whether the repository has a live entry for the blob that no prune is deleting,
    /// confirmed by reading its bucket.
    pub async fn contains(&self, id: &Id) -> Result<bool> {
        let base = self.base.as_deref();
        let v = &self.view;
        let found = self.set.find_in(v, id, base, |e| !v.doomed(e));
        Ok(found.await?.is_some())
    }

    /// [`contains`](Self::contains) from a thread outside the runtime. A failed confirmation
    /// counts as "not known": the blob is stored again, which only costs space.
    pub fn contains_blocking(&self, id: &Id) -> bool {
        if !self.maybe(id) {
            return false;
        }
        match self.handle.block_on(self.contains(id)) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(
                    "index lookup of {} failed ({e}); storing it again",
                    id.short()
                );
                false
            }
        }
    }
}
