//! `backtree repair`: putting a damaged repository back into a state every reader accepts.
//!
//! **Index** ([`repair_index`]): every pack describes itself in its trailer (docs/format.md §5),
//! so the index can always be rebuilt from the packs. The repair lists `packs/`, reads each
//! pack's trailer (three ranged reads at most, [`TRAILER_READS`] packs at a time), and writes
//! new deltas ([`IndexBuilder`], at most [`DELTA_ENTRIES`] entries each) holding every
//! (blob, pack) of a trailer that the current index lacks, live or tombstoned: a lost or
//! damaged delta is recovered, and a blob a prune has tombstoned is not brought back to life.
//! Index entries are facts about immutable packs, so an entry written twice is harmless and
//! the repair is safe beside ingests, mounts and compactions (it only adds deltas). A pack whose
//! trailer is damaged is reported and skipped: its blobs stay unindexed. Live entries whose
//! pack is gone get a **tombstone** (a delta of tombstones only, as a prune writes): writers
//! then store those blobs again instead of referencing them, and verify no longer reports the
//! pack as missing.
//!
//! **Generations** ([`damaged_generations`], [`remove_generations`]): which generations
//! reference missing or damaged data, from a [`verify`](crate::verify) report, and deleting
//! their manifests; and [`salvage_generations`]: for each, a new generation of the same host
//! that keeps what is readable and leaves out what is lost (see [`salvage`]).

use crate::error::Result;
use crate::id::pack_key;
use crate::index::root::DELTAS_PREFIX;
use crate::index::table::{self, TableEntry, TableKind};
use crate::index::IndexBuilder;
use crate::pack;
use crate::repo::Repository;
use crate::verify::{
    list_packs, pack_of_key, Finding, FindingKind, LoadedIndex, Report, VerifyProgress,
};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Serialize;

pub mod salvage;
pub use salvage::{salvage_generations, SalvageOptions, Salvaged};

/// Pack trailers read at once.
pub const TRAILER_READS: usize = 16;
/// Entries per delta written by a repair (as a compaction's `full_limit`).
pub const DELTA_ENTRIES: usize = 256 << 10;

/// What [`repair_index`] did (or would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct IndexRepair {
    pub dry_run: bool,
    /// Packs whose trailers were read.
    pub packs: u64,
    /// Packs with blobs the index lacked.
    pub packs_added: u64,
    /// Entries added (or that would be).
    pub entries_added: u64,
    /// Tombstones written for live entries whose pack is missing.
    pub tombstones_added: u64,
    /// Deltas written.
    pub deltas: Vec<String>,
    /// Packs skipped: key and why.
    pub damaged_packs: Vec<(String, String)>,
    /// Index objects that are missing or damaged (as verify reports them).
    pub index_problems: Vec<String>,
}

/// Rebuilds what the index lacks from the pack trailers (see the module docs).
pub async fn repair_index(
    repo: &Repository,
    dry_run: bool,
    progress: &VerifyProgress,
) -> Result<IndexRepair> {
    let mut out = IndexRepair {
        dry_run,
        ..IndexRepair::default()
    };
    let packs = list_packs(repo).await?;
    let mut findings: Vec<Finding> = Vec::new();
    let index = LoadedIndex::load(repo, &mut findings, progress).await?;
    out.index_problems = findings.iter().map(|f| f.line()).collect();
    let packs_listed: std::collections::HashSet<String> = packs.keys().cloned().collect();
    let mut keys: Vec<(String, u64)> = packs.into_iter().collect();
    keys.sort();
    progress.start("pack trailers", keys.len() as u64);
    let store = repo.store();
    let mut trailers = futures_util::stream::iter(keys.into_iter().map(|(key, size)| async move {
        let t = pack::read_trailer_sized(store, &key, size).await;
        (key, t)
    }))
    .buffer_unordered(TRAILER_READS);
    let mut builder = IndexBuilder::new();
    while let Some((key, t)) = trailers.next().await {
        progress.tick();
        out.packs += 1;
        let Some((kind, pack_id)) = pack_of_key(&key) else {
            continue;
        };
        let t = match t {
            Ok(t) => t,
            Err(e) => {
                out.damaged_packs.push((key, e.to_string()));
                continue;
            }
        };
        if let Some(e) = t.entries.iter().find(|e| e.kind != kind) {
            let why = format!("its trailer lists blob {} of another kind", e.id);
            out.damaged_packs.push((key, why));
            continue;
        }
        let lacking: Vec<pack::PackEntry> = t
            .entries
            .into_iter()
            .filter(|e| !index.has(&e.id, &pack_id))
            .collect();
        if lacking.is_empty() {
            continue;
        }
        out.packs_added += 1;
        out.entries_added += lacking.len() as u64;
        for part in lacking.chunks(DELTA_ENTRIES) {
            if builder.len() + part.len() > DELTA_ENTRIES {
                flush(repo, &mut builder, dry_run, &mut out).await?;
            }
            builder.add_pack(kind, pack_id, part);
        }
    }
    flush(repo, &mut builder, dry_run, &mut out).await?;
    out.damaged_packs.sort();

    // Live entries whose pack is gone (and no tombstone says so yet): tombstones, as a prune
    // writes them, so that writers store those blobs again instead of referencing them.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| (d.as_secs() / 60).max(1) as u32);
    let mut tombs: Vec<TableEntry> = Vec::new();
    for v in index.entries.values() {
        for e in v.iter().filter(|e| e.is_live()) {
            let gone = !packs_listed.contains(&pack_key(e.kind, &e.pack));
            let marked = v.iter().any(|t| !t.is_live() && t.pack == e.pack);
            if gone && !marked {
                tombs.push(TableEntry { deleted: now, ..*e });
            }
        }
    }
    out.tombstones_added = tombs.len() as u64;
    // One delta holds at most one entry per id: ids with several gone packs take several.
    tombs.sort_by_key(|e| (e.id, e.pack));
    while !tombs.is_empty() {
        let mut batch = Vec::new();
        let mut rest = Vec::new();
        for e in tombs {
            if batch.len() < DELTA_ENTRIES && batch.last().is_none_or(|b: &TableEntry| b.id != e.id)
            {
                batch.push(e);
            } else {
                rest.push(e);
            }
        }
        tombs = rest;
        let (name, bytes) = table::encode(TableKind::Delta, 0, 0, batch);
        let key = format!("{DELTAS_PREFIX}{}", name.to_hex());
        if !dry_run {
            repo.store().put(&key, Bytes::from(bytes)).await?;
        }
        out.deltas.push(key);
    }
    Ok(out)
}

async fn flush(
    repo: &Repository,
    builder: &mut IndexBuilder,
    dry_run: bool,
    out: &mut IndexRepair,
) -> Result<()> {
    if builder.is_empty() {
        return Ok(());
    }
    let (key, bytes) = std::mem::take(builder).encode();
    if !dry_run {
        repo.store().put(&key, Bytes::from(bytes)).await?;
    }
    out.deltas.push(key);
    Ok(())
}

/// A generation that references missing or damaged data.
#[derive(Debug, Clone, Serialize)]
pub struct DamagedGeneration {
    pub host: String,
    pub generation: String,
    /// Its manifest itself cannot be read.
    pub manifest_damaged: bool,
    /// Problems that affect it.
    pub problems: usize,
    /// Damaged blobs it references.
    pub blobs: usize,
    /// The first paths that lose data (those where the damage was first found; a generation
    /// that reaches damage another one reported first has none of its own listed).
    pub paths: Vec<String>,
}

/// Paths listed per damaged generation.
const PATHS_LISTED: usize = 10;

/// The generations a verify report finds damaged, in the report's order.
pub fn damaged_generations(report: &Report) -> Vec<DamagedGeneration> {
    report
        .damaged()
        .into_iter()
        .filter_map(|(g, found)| {
            let (host, generation) = g.split_once('/')?;
            let mut d = DamagedGeneration {
                host: host.to_owned(),
                generation: generation.to_owned(),
                manifest_damaged: false,
                problems: found.len(),
                blobs: 0,
                paths: Vec::new(),
            };
            for f in found.iter().map(|&i| &report.findings[i]) {
                if f.kind == FindingKind::Manifest {
                    d.manifest_damaged = true;
                }
                if f.blob.is_some() {
                    d.blobs += 1;
                }
                let first =
                    f.host.as_deref() == Some(host) && f.generation.as_deref() == Some(generation);
                if let (true, Some(p)) = (first, &f.path) {
                    if d.paths.len() < PATHS_LISTED && !d.paths.contains(p) {
                        d.paths.push(p.clone());
                    }
                }
            }
            d.paths.sort();
            Some(d)
        })
        .collect()
}

/// Deletes the manifests of `gens`; returns the errors (`HOST/GENERATION: error`), one per
/// manifest that could not be deleted.
pub async fn remove_generations(repo: &Repository, gens: &[DamagedGeneration]) -> Vec<String> {
    let mut errors = Vec::new();
    for g in gens {
        if let Err(e) = repo.forget(&g.host, &g.generation).await {
            errors.push(format!("{}/{}: {e}", g.host, g.generation));
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::{verify, DataSubset, VerifyOptions};
    use crate::walk::tests::{build_source, repo_with};
    use backtree_store::ObjectStore;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_delta_is_rebuilt_from_the_trailers() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        build_source(&src);
        let (mem, repo, gens) = repo_with(&src, 1).await;
        let deltas = mem.list("index/deltas/").await.unwrap();
        assert_eq!(deltas.len(), 1);
        mem.delete(&deltas[0].key).await.unwrap();

        let p = VerifyProgress::default();
        let o = VerifyOptions {
            data: DataSubset::None,
            hosts: None,
        };
        let before = verify(&repo, &o, &p).await.unwrap();
        assert!(before.counts.problems > 0);
        let dry = repair_index(&repo, true, &p).await.unwrap();
        assert!(
            dry.entries_added > 50 && dry.damaged_packs.is_empty(),
            "{dry:?}"
        );
        assert_eq!(mem.list("index/deltas/").await.unwrap().len(), 0);
        let done = repair_index(&repo, false, &p).await.unwrap();
        assert_eq!(done.entries_added, dry.entries_added);
        assert_eq!(done.deltas.len(), 1);
        // A fresh handle (the old one's view predates the repair) reads everything back.
        let repo = Repository::open(repo.store().clone()).await.unwrap();
        let after = verify(&repo, &o, &p).await.unwrap();
        assert!(after.findings.is_empty(), "{:#?}", after.findings);
        let again = repair_index(&repo, false, &p).await.unwrap();
        assert_eq!(again.entries_added, 0);
        assert!(again.deltas.is_empty());
        let d = damaged_generations(&before);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].generation, gens[0].name);
        assert_eq!(d[0].paths, ["/"]);
    }
}
