//! Claims: mutual exclusion on a key with nothing but plain PUT, LIST, HEAD and DELETE.
//!
//! Some S3-compatible stores accept `If-None-Match: *` and overwrite anyway (Garage 2.5 answers
//! `200`), and a store that silently ignores the condition cannot be told from one that honors
//! it until two writers collide. Where two writers must never both write one key, a writer
//! therefore first *claims* the key with this protocol, which needs no conditional write:
//!
//! 1. PUT `KEY.claim-SESSION`, an empty object that only this writer ever writes (`SESSION` is
//!    64 random bits from [`session_id`]);
//! 2. LIST `KEY.claim-` and HEAD `KEY`;
//! 3. if its own claim is the only one listed and `KEY` does not exist, the writer holds the
//!    claim ([`claim`] returns a [`Claim`]): it writes `KEY`, then [`Claim::release`]s the
//!    claim. Otherwise its claim is deleted at once and [`claim`] returns `None`; the caller
//!    waits a little ([`back_off`]) and tries another key, or gives up.
//!
//! **Why two writers A and B cannot both hold a claim on `KEY`.** Suppose both went on. A's
//! listing showed no claim of B, so B's claim was stored after A's listing, hence after A's own
//! claim. B listed after storing its claim, so later still, and its listing showed A's claim:
//! B did not go on. A contradiction. A writer that already finished wrote `KEY` *before*
//! releasing its claim, so a later writer either lists that claim or finds `KEY` with its HEAD.
//! This relies only on read-after-write consistent LIST and HEAD, which AWS S3, Garage and local
//! filesystems give.
//!
//! **What it costs.** Two writers that overlap may both lose the round (each lists the other's
//! claim); neither writes, both move on, and the random back-off makes a second collision
//! unlikely. A writer killed between its claim and its release leaves the claim object behind:
//! nobody can claim that key any more, so for a generation name the name is simply skipped.
//! Readers ignore claim objects (`.claim-` never occurs in a generation name or a content hash).
//!
//! **Users.** The ingest claims a generation's manifest key `snapshots/<host>/<name>` when the
//! store has not proven create-if-absent (`ingest::commit`); the six-way race of
//! `same_second_ingests_on_a_store_ignoring_conditions_all_commit` loses generations without it.
//! Garbage collection takes its exclusive *maintenance lease* the same way, with an expiry
//! (`locks/maintenance.claim-SESSION`, a renewed lease object; list; go on only if no other
//! unexpired claim is listed: [`crate::prune`]), so this module knows nothing about manifests.

use crate::error::Result;
use backtree_store::DynStore;
use bytes::Bytes;

/// What separates a claimed key from the session in a claim object's key.
pub const CLAIM_MARK: &str = ".claim-";

/// The longest [`back_off`] waits, in milliseconds.
const BACK_OFF_MS: u64 = 50;

/// A fresh session identifier: 64 random bits as 16 lowercase hex digits. A writer uses one for
/// all its claims.
pub fn session_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The prefix under which every claim on `key` is stored: `KEY.claim-`.
pub fn claims_prefix(key: &str) -> String {
    format!("{key}{CLAIM_MARK}")
}

/// The key of `session`'s claim on `key`: `KEY.claim-SESSION`.
pub fn claim_key(key: &str, session: &str) -> String {
    format!("{key}{CLAIM_MARK}{session}")
}

/// A claim held on a key: this session alone may write the key until it releases the claim.
///
/// Dropping a `Claim` without [`Claim::release`] leaves its object in the store, which only
/// keeps anyone from claiming that key again (as a crash would).
#[derive(Debug)]
#[must_use = "a claim should be released after the claimed key is written"]
pub struct Claim {
    store: DynStore,
    key: String,
    object: String,
}

impl Claim {
    /// The claimed key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The key of the claim object itself (`KEY.claim-SESSION`).
    pub fn object(&self) -> &str {
        &self.object
    }

    /// Deletes the claim object. Call it after the claimed key is written: a writer that comes
    /// later then finds the key itself.
    pub async fn release(self) -> Result<()> {
        self.store.delete(&self.object).await?;
        Ok(())
    }
}

/// Claims `key` for `session` (see the module documentation). Returns the [`Claim`] if this
/// session may write `key`, `None` if `key` exists or another session claims it too (this
/// session's claim object is then already deleted). Errors are the store's; a claim object
/// stored before the error may be left behind.
pub async fn claim(store: &DynStore, key: &str, session: &str) -> Result<Option<Claim>> {
    let prefix = claims_prefix(key);
    let mine = claim_key(key, session);
    store.put(&mine, Bytes::new()).await?;
    let contended = store.list(&prefix).await?.iter().any(|o| o.key != mine);
    if contended || store.head(key).await?.is_some() {
        // Only tidiness: a claim left behind makes later writers skip this key.
        let _ = store.delete(&mine).await;
        return Ok(None);
    }
    Ok(Some(Claim {
        store: store.clone(),
        key: key.to_owned(),
        object: mine,
    }))
}

/// Waits a random 0–50 ms after a lost claim, so that two writers that saw each other's claims
/// do not collide again on their next attempt.
pub async fn back_off() {
    let ms = rand::random::<u64>() % BACK_OFF_MS;
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use backtree_store::MemoryStore;
    use std::sync::Arc;

    const KEY: &str = "snapshots/web1/2026-11-20T010000Z";

    fn store() -> DynStore {
        Arc::new(MemoryStore::new())
    }

    async fn claims_on(store: &DynStore, key: &str) -> Vec<String> {
        let listed = store.list(&claims_prefix(key)).await.expect("list");
        listed.into_iter().map(|o| o.key).collect()
    }

    #[test]
    fn session_ids_are_16_hex_digits_and_differ() {
        let a = session_id();
        let b = session_id();
        assert_eq!(a.len(), 16);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
        assert_eq!(claim_key("k", &a), format!("k.claim-{a}"));
        assert!(claim_key("k", &a).starts_with(&claims_prefix("k")));
    }

    #[tokio::test]
    async fn a_lone_claim_is_granted_and_release_deletes_it() {
        let s = store();
        let c = claim(&s, KEY, "aaaa")
            .await
            .expect("claim")
            .expect("granted");
        assert_eq!(c.key(), KEY);
        assert_eq!(c.object(), claim_key(KEY, "aaaa"));
        assert_eq!(claims_on(&s, KEY).await, vec![claim_key(KEY, "aaaa")]);
        c.release().await.expect("release");
        assert!(claims_on(&s, KEY).await.is_empty());
        assert_eq!(s.head(KEY).await.expect("head"), None);
    }

    #[tokio::test]
    async fn a_second_session_is_refused_while_the_first_holds_the_claim() {
        let s = store();
        let a = claim(&s, KEY, "aaaa")
            .await
            .expect("claim")
            .expect("granted");
        assert!(claim(&s, KEY, "bbbb").await.expect("claim").is_none());
        // The loser's claim is gone, the holder's stays.
        assert_eq!(claims_on(&s, KEY).await, vec![claim_key(KEY, "aaaa")]);
        // The holder writes the key, then releases: a later session finds the key.
        s.put(KEY, Bytes::from_static(b"{}")).await.expect("put");
        a.release().await.expect("release");
        assert!(claim(&s, KEY, "cccc").await.expect("claim").is_none());
        assert!(claims_on(&s, KEY).await.is_empty());
    }

    #[tokio::test]
    async fn overlapping_claims_let_neither_proceed() {
        // B has stored its claim but not listed yet when A claims: A sees B's claim and backs
        // out. B then lists and sees only its own claim: at most one proceeds.
        let s = store();
        s.put(&claim_key(KEY, "bbbb"), Bytes::new())
            .await
            .expect("put");
        assert!(claim(&s, KEY, "aaaa").await.expect("claim").is_none());
        assert_eq!(claims_on(&s, KEY).await, vec![claim_key(KEY, "bbbb")]);
        // A claim left behind (a writer killed after claiming) keeps the key from everyone.
        assert!(claim(&s, KEY, "cccc").await.expect("claim").is_none());
    }

    #[tokio::test]
    async fn an_existing_key_is_not_claimed() {
        let s = store();
        s.put(KEY, Bytes::from_static(b"{}")).await.expect("put");
        assert!(claim(&s, KEY, "aaaa").await.expect("claim").is_none());
        assert!(claims_on(&s, KEY).await.is_empty());
    }

    #[tokio::test]
    async fn claims_on_other_keys_do_not_interfere() {
        let s = store();
        let other = format!("{KEY}-2");
        let a = claim(&s, KEY, "aaaa")
            .await
            .expect("claim")
            .expect("granted");
        let b = claim(&s, &other, "bbbb")
            .await
            .expect("claim")
            .expect("granted");
        a.release().await.expect("release");
        b.release().await.expect("release");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn racing_sessions_never_both_hold_a_claim() {
        let s = store();
        for round in 0..50 {
            let key = format!("{KEY}-{round}");
            let tasks: Vec<_> = (0..8)
                .map(|i| {
                    let s = s.clone();
                    let key = key.clone();
                    tokio::spawn(async move {
                        claim(&s, &key, &format!("{i:016x}")).await.expect("claim")
                    })
                })
                .collect();
            let mut held = Vec::new();
            for t in tasks {
                if let Some(c) = t.await.expect("task") {
                    held.push(c);
                }
            }
            assert!(held.len() <= 1, "round {round}: {held:?}");
            for c in held {
                c.release().await.expect("release");
            }
            assert!(claims_on(&s, &key).await.is_empty(), "round {round}");
        }
    }
}
