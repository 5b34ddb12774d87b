//! The set of reachable blobs, in 8 bytes per blob.
//!
//! A prune must know, for every blob in the index, whether some generation references it. A
//! `HashSet<Id>` costs about 45 B per blob (32-byte ids, load factor, control bytes); at 10⁸
//! chunks that is 4.5 GB. [`Marks`] keeps only the first 64 bits of each id in a vector that is
//! sorted and deduplicated whenever it fills, so it costs 8 B per distinct blob (the vector is
//! reserved up front for the index's entry count, and grows only if more distinct blobs are
//! referenced than indexed). Two ids that share 64 bits are one mark: a blob may then be kept
//! that could have gone (probability about n²/2⁶⁵: 3 × 10⁻⁶ at 10⁷ blobs), never the reverse,
//! so the compression errs only on the safe side.
//!
//! Walking generations needs "was this tree already walked?" while marks are added: ids added
//! since the last sort are not searchable in the vector, so the trees (and chunk-list blobs)
//! among them are also kept in a small hash set, cleared at each sort.

use crate::id::Id;
use std::collections::HashSet;

/// First 64 bits of an id.
pub fn key(id: &Id) -> u64 {
    u64::from_le_bytes(id.0[..8].try_into().unwrap_or([0; 8]))
}

/// Entries in [`Marks::recent`] that force a sort (bounds the hash set to ~20 MB).
const RECENT_MAX: usize = 1 << 20;

/// A set of blob ids, 8 bytes each (see the module docs).
#[derive(Debug, Default)]
pub struct Marks {
    v: Vec<u64>,
    /// `v[..sorted]` is sorted and free of duplicates.
    sorted: usize,
    /// Walked blobs (trees, chunk lists) added since the last sort.
    recent: HashSet<u64>,
}

impl Marks {
    /// An empty set with room for `n` blobs.
    pub fn with_capacity(n: usize) -> Marks {
        Marks {
            v: Vec::with_capacity(n.max(1024)),
            ..Marks::default()
        }
    }

    fn push(&mut self, k: u64) {
        if self.v.len() == self.v.capacity() {
            self.sort();
            if self.v.len() * 10 > self.v.capacity() * 9 {
                // Still nearly full: more distinct blobs than expected. Grow by half.
                self.v.reserve_exact(self.v.capacity() / 2);
            }
        }
        self.v.push(k);
    }

    /// Adds a blob that is not walked further (file content).
    pub fn insert(&mut self, id: &Id) {
        self.push(key(id));
    }

    /// Adds a blob that is walked (a tree or chunk list); `false` if it was already added, so the
    /// caller skips it and everything below it.
    pub fn first_visit(&mut self, id: &Id) -> bool {
        let k = key(id);
        if self.v[..self.sorted].binary_search(&k).is_ok() || self.recent.contains(&k) {
            return false;
        }
        // After the push, which may sort and clear `recent`.
        self.push(k);
        self.recent.insert(k);
        if self.recent.len() >= RECENT_MAX {
            self.sort();
        }
        true
    }

    /// Sorts and deduplicates what was added since the last sort.
    pub fn sort(&mut self) {
        self.v.sort_unstable();
        self.v.dedup();
        self.sorted = self.v.len();
        self.recent = HashSet::new();
    }

    /// Sorts and gives back the unused reserve (after the mark: the referenced blobs are often
    /// far fewer than the index's entries the set was reserved for).
    pub fn finish(&mut self) {
        self.sort();
        self.v.shrink_to_fit();
    }

    /// Whether `id` was added. Call [`sort`](Self::sort) after the last addition.
    pub fn contains(&self, id: &Id) -> bool {
        let k = key(id);
        self.v[..self.sorted].binary_search(&k).is_ok() || self.recent.contains(&k)
    }

    /// Distinct blobs (after a sort).
    pub fn len(&self) -> usize {
        self.sorted
    }

    pub fn is_empty(&self) -> bool {
        self.v.is_empty()
    }

    /// Bytes held.
    pub fn memory(&self) -> usize {
        self.v.capacity() * 8 + self.recent.capacity() * 9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_deduplicate_within_their_reserve_and_remember_walks() {
        let mut m = Marks::with_capacity(1000);
        let cap = m.v.capacity();
        for round in 0..5 {
            for i in 0..1000u32 {
                m.insert(&Id::of(&i.to_le_bytes()));
            }
            assert!(m.first_visit(&Id::of(b"tree")) == (round == 0));
        }
        m.sort();
        assert_eq!(m.len(), 1001);
        // Duplicates never made it grow past one and a half times its reserve.
        assert!(m.v.capacity() <= cap * 3 / 2 + 1, "{}", m.v.capacity());
        assert!(m.contains(&Id::of(&7u32.to_le_bytes())));
        assert!(!m.contains(&Id::of(b"absent")));
        assert!(!m.first_visit(&Id::of(b"tree")));
        assert!(m.first_visit(&Id::of(b"tree2")));
        assert!(m.contains(&Id::of(b"tree2")));
    }
}
