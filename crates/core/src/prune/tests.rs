//! Prune tests: the whole run on a memory store.
