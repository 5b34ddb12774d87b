//! What a prune deletes and rewrites: a pure function of the packs' use (unit-tested; `prune
//! --dry-run` prints it), executed by [`super::run`].
//!
//! Per pack, in this order:
//! 1. younger than the **grace period** (by the store's LastModified; unknown age counts as
//!    young): kept, whatever it holds — an ingest may have just written it and not yet indexed
//!    or referenced what it holds;
//! 2. no live index entry (an *orphan*: left by a writer killed before its index delta): deleted;
//! 3. no blob any generation references: deleted;
//! 4. at least `repack_threshold` of its blob bytes unreferenced: **repacked** (the referenced
//!    blobs are copied into new packs, then the pack is deleted like an unused one);
//! 5. otherwise kept.

use crate::id::{BlobKind, Id};
use serde::Serialize;
use std::time::{Duration, SystemTime};

/// How one pack is used, from the store's listing and a sweep of the index.
#[derive(Debug, Clone, PartialEq)]
pub struct PackUse {
    pub key: String,
    pub kind: BlobKind,
    pub id: Id,
    /// Bytes of the pack object.
    pub size: u64,
    pub modified: Option<SystemTime>,
    /// Live index entries naming it (a blob indexed twice counts twice).
    pub entries: u64,
    /// Stored bytes of those entries.
    pub blob_bytes: u64,
    /// Entries of referenced blobs.
    pub used: u64,
    /// Stored bytes of referenced blobs.
    pub used_bytes: u64,
}

/// Settings of a prune.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    /// Packs younger than this are never touched.
    pub grace: Duration,
    /// A pack with at least this fraction (0–1) of its blob bytes unreferenced is repacked.
    pub repack_threshold: f64,
}

/// What happens to one pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Younger than the grace period.
    KeepYoung,
    /// Mostly referenced.
    Keep,
    /// Not indexed at all.
    DeleteOrphan,
    /// Indexed, but nothing in it is referenced.
    DeleteUnused,
    /// Referenced blobs are copied out, then the pack is deleted.
    Repack,
}

impl Action {
    pub fn deletes(self) -> bool {
        matches!(
            self,
            Action::DeleteOrphan | Action::DeleteUnused | Action::Repack
        )
    }
}

/// One pack's decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub key: String,
    #[serde(skip)]
    pub kind: BlobKind,
    #[serde(skip)]
    pub id: Id,
    pub action: Action,
    pub size: u64,
    /// Stored bytes of referenced blobs (what a repack copies).
    pub used_bytes: u64,
    /// Fraction of its blob bytes that nothing references.
    pub unused: f64,
}

/// Totals of a plan.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    pub packs: u64,
    pub bytes: u64,
    pub kept: u64,
    pub kept_young: u64,
    pub young_bytes: u64,
    pub delete_orphan: u64,
    pub delete_unused: u64,
    pub repack: u64,
    /// Bytes of the packs deleted (repacked ones included).
    pub delete_bytes: u64,
    /// Bytes a repack copies into new packs.
    pub repack_copy_bytes: u64,
}

/// A prune plan: every pack's decision and the totals.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Plan {
    pub packs: Vec<Decision>,
    pub totals: Totals,
}

impl Plan {
    /// Decisions that delete a pack (repacks included).
    pub fn deletions(&self) -> impl Iterator<Item = &Decision> {
        self.packs.iter().filter(|d| d.action.deletes())
    }

    /// Bytes the store holds less once the plan is done.
    pub fn freed(&self) -> u64 {
        self.totals
            .delete_bytes
            .saturating_sub(self.totals.repack_copy_bytes)
    }
}

fn young(p: &PackUse, now: SystemTime, grace: Duration) -> bool {
    p.modified
        .and_then(|m| now.duration_since(m).ok())
        .is_none_or(|age| age < grace)
}

/// Decides every pack's fate (pure: no I/O).
pub fn plan(packs: &[PackUse], now: SystemTime, opts: &Options) -> Plan {
    let mut out = Plan::default();
    for p in packs {
        let unused = if p.blob_bytes == 0 {
            1.0
        } else {
            1.0 - (p.used_bytes.min(p.blob_bytes) as f64 / p.blob_bytes as f64)
        };
        let action = if young(p, now, opts.grace) {
            Action::KeepYoung
        } else if p.entries == 0 {
            Action::DeleteOrphan
        } else if p.used == 0 {
            Action::DeleteUnused
        } else if unused > 0.0 && unused >= opts.repack_threshold && opts.repack_threshold < 1.0 {
            Action::Repack
        } else {
            Action::Keep
        };
        let t = &mut out.totals;
        t.packs += 1;
        t.bytes += p.size;
        match action {
            Action::KeepYoung => {
                t.kept_young += 1;
                t.young_bytes += p.size;
            }
            Action::Keep => t.kept += 1,
            Action::DeleteOrphan => t.delete_orphan += 1,
            Action::DeleteUnused => t.delete_unused += 1,
            Action::Repack => {
                t.repack += 1;
                t.repack_copy_bytes += p.used_bytes;
            }
        }
        if action.deletes() {
            t.delete_bytes += p.size;
        }
        out.packs.push(Decision {
            key: p.key.clone(),
            kind: p.kind,
            id: p.id,
            action,
            size: p.size,
            used_bytes: p.used_bytes,
            unused,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn pack(n: u8, age_h: Option<u64>, entries: u64, used: u64, used_bytes: u64) -> PackUse {
        let now = SystemTime::UNIX_EPOCH + 1000 * HOUR;
        PackUse {
            key: format!("packs/data/{n:02x}/x"),
            kind: BlobKind::Data,
            id: Id::of(&[n]),
            size: 1000 + 24,
            modified: age_h.map(|h| now - HOUR * h as u32),
            entries,
            blob_bytes: if entries > 0 { 1000 } else { 0 },
            used,
            used_bytes,
        }
    }

    #[test]
    fn every_rule_in_order() {
        let now = SystemTime::UNIX_EPOCH + 1000 * HOUR;
        let opts = Options {
            grace: 24 * HOUR,
            repack_threshold: 0.5,
        };
        let packs = vec![
            pack(0, Some(1), 0, 0, 0),       // young orphan: kept
            pack(1, None, 10, 0, 0),         // unknown age: kept
            pack(2, Some(48), 0, 0, 0),      // orphan
            pack(3, Some(48), 10, 0, 0),     // unused
            pack(4, Some(48), 10, 3, 300),   // 70 % unused: repack
            pack(5, Some(48), 10, 5, 500),   // exactly the threshold: repack
            pack(6, Some(48), 10, 9, 900),   // mostly used: kept
            pack(7, Some(23), 10, 0, 0),     // unused but young: kept
            pack(8, Some(48), 10, 10, 2000), // duplicates overcount: clamped, kept
        ];
        let p = plan(&packs, now, &opts);
        let actions: Vec<Action> = p.packs.iter().map(|d| d.action).collect();
        use Action::*;
        assert_eq!(
            actions,
            [
                KeepYoung,
                KeepYoung,
                DeleteOrphan,
                DeleteUnused,
                Repack,
                Repack,
                Keep,
                KeepYoung,
                Keep
            ]
        );
        let t = &p.totals;
        assert_eq!(
            (
                t.kept_young,
                t.kept,
                t.delete_orphan,
                t.delete_unused,
                t.repack
            ),
            (3, 2, 1, 1, 2)
        );
        assert_eq!(t.delete_bytes, 4 * 1024);
        assert_eq!(t.repack_copy_bytes, 800);
        assert_eq!(p.freed(), 4 * 1024 - 800);
        assert_eq!(p.deletions().count(), 4);
        // A threshold of 100 % never repacks; 0 % repacks anything not wholly used.
        let never = plan(
            &packs,
            now,
            &Options {
                repack_threshold: 1.0,
                ..opts
            },
        );
        assert_eq!(never.totals.repack, 0);
        let always = plan(
            &packs,
            now,
            &Options {
                repack_threshold: 0.0,
                ..opts
            },
        );
        assert_eq!(always.totals.repack, 3);
    }
}
