//! Writer leases (issue 14; docs/concurrency.md): every ingest holds `leases/<session>` while it
//! runs, so that a garbage collection can tell which writers may still reference blobs it is
//! about to delete, and a writer that was paused past its lease never commits.
//!
//! The lease object is small JSON (`session`, `host`, `started`, `expires`, `tool`) written with
//! a plain PUT at the start of the ingest and again every third of the lease time by a background
//! task ([`LEASE_TIME`], 15 minutes: a renewal may fail twice before the lease lapses). The
//! writer keeps its own deadline by the local monotonic clock, measured from *before* each
//! renewal was sent and extended only by a renewal stored before the previous deadline (a lapsed
//! lease is never renewed: others may already have treated it as gone), and [`Lease::check`]
//! refuses once that deadline has passed:
//! a process stopped (SIGSTOP, a suspended VM) or cut off from the store for longer than the
//! lease commits nothing, whatever the store says. The lease is deleted when the ingest ends;
//! one left by a killed writer simply expires (maintenance removes expired leases).

use crate::error::{Error, Result};
use backtree_store::DynStore;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

pub const LEASES_PREFIX: &str = "leases/";
/// How long a lease lasts without renewal.
pub const LEASE_TIME: Duration = Duration::from_secs(15 * 60);

/// The stored lease.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseBody {
    pub session: String,
    pub host: String,
    /// RFC 3339.
    pub started: String,
    /// RFC 3339: the writer will not commit after this time unless it renewed the lease.
    pub expires: String,
    pub tool: String,
}

/// A held lease; renewed in the background until [`release`](Lease::release)d or dropped.
pub struct Lease {
    store: DynStore,
    key: String,
    session: String,
    deadline: Arc<Mutex<Instant>>,
    renewer: JoinHandle<()>,
}

fn body(session: &str, host: &str, started: &str, time: Duration) -> Bytes {
    let expires =
        chrono::Utc::now() + chrono::Duration::from_std(time).unwrap_or(chrono::Duration::MAX);
    let b = LeaseBody {
        session: session.to_owned(),
        host: host.to_owned(),
        started: started.to_owned(),
        expires: expires.to_rfc3339(),
        tool: format!("backtree {}", env!("CARGO_PKG_VERSION")),
    };
    let mut v = serde_json::to_vec_pretty(&b).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

impl Lease {
    /// Takes the lease of `session` for `time` (default [`LEASE_TIME`]) and starts renewing it.
    pub async fn take(
        store: DynStore,
        session: &str,
        host: &str,
        time: Duration,
        handle: &Handle,
    ) -> Result<Lease> {
        let key = format!("{LEASES_PREFIX}{session}");
        Lease::take_at(store, key, session, host, time, handle).await
    }

    /// [`take`](Self::take) with the lease object at `key` (the maintenance lease lives under
    /// `locks/`, see [`crate::prune`]).
    pub async fn take_at(
        store: DynStore,
        key: String,
        session: &str,
        host: &str,
        time: Duration,
        handle: &Handle,
    ) -> Result<Lease> {
        let started = chrono::Utc::now().to_rfc3339();
        let sent = Instant::now();
        store.put(&key, body(session, host, &started, time)).await?;
        let deadline = Arc::new(Mutex::new(sent + time));
        let renewer = {
            let (store, key, d) = (store.clone(), key.clone(), deadline.clone());
            let (session, host) = (session.to_owned(), host.to_owned());
            handle.spawn(async move {
                loop {
                    tokio::time::sleep(time / 3).await;
                    let old = *d.lock().unwrap_or_else(|e| e.into_inner());
                    let sent = Instant::now();
                    if sent >= old {
                        // Lapsed (the process was stopped, or renewals failed): a lapsed lease
                        // is never renewed, since others may already have treated it as gone.
                        tracing::warn!("the lease {key} lapsed; its holder will stop");
                        return;
                    }
                    match store.put(&key, body(&session, &host, &started, time)).await {
                        // Only a renewal stored before the old deadline extends it.
                        Ok(()) if Instant::now() < old => {
                            *d.lock().unwrap_or_else(|e| e.into_inner()) = sent + time;
                        }
                        Ok(()) => {}
                        Err(e) => tracing::warn!("cannot renew the lease {key}: {e}"),
                    }
                }
            })
        };
        Ok(Lease {
            store,
            key,
            session: session.to_owned(),
            deadline,
            renewer,
        })
    }

    /// The lease object's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// `Ok` while the lease holds; [`Error::LeaseLapsed`] once it lapsed.
    pub fn check(&self) -> Result<()> {
        let deadline = *self.deadline.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now < deadline {
            Ok(())
        } else {
            Err(Error::LeaseLapsed {
                session: self.session.clone(),
                key: self.key.clone(),
                late: now - deadline,
            })
        }
    }

    /// Stops renewing and deletes the lease object (a failure is logged: it only expires).
    pub async fn release(self) {
        self.renewer.abort();
        if let Err(e) = self.store.delete(&self.key).await {
            tracing::warn!("cannot remove the lease {}: {e}", self.key);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// Releases a lease when dropped, from synchronous code outside the runtime (the ingest): a
/// failed ingest removes its lease as a committed one does.
pub struct LeaseGuard {
    lease: Option<Lease>,
    handle: Handle,
}

impl LeaseGuard {
    pub fn new(lease: Lease, handle: Handle) -> LeaseGuard {
        LeaseGuard {
            lease: Some(lease),
            handle,
        }
    }

    /// See [`Lease::check`].
    pub fn check(&self) -> Result<()> {
        self.lease.as_ref().map_or(Ok(()), Lease::check)
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some(l) = self.lease.take() {
            self.handle.block_on(l.release());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backtree_store::MemoryStore;

    #[tokio::test]
    async fn renewed_while_held_refused_after_lapse_removed_on_release() {
        let store: DynStore = Arc::new(MemoryStore::new());
        let h = Handle::current();
        let l = Lease::take(store.clone(), "s1", "web1", Duration::from_millis(300), &h)
            .await
            .unwrap();
        let b: LeaseBody = serde_json::from_slice(&store.get("leases/s1").await.unwrap()).unwrap();
        assert_eq!((b.session.as_str(), b.host.as_str()), ("s1", "web1"));
        // Renewals keep it alive past its first expiry.
        tokio::time::sleep(Duration::from_millis(500)).await;
        l.check().unwrap();
        l.release().await;
        assert!(store.head("leases/s1").await.unwrap().is_none());

        // A lease that cannot be renewed in time (here: never renewed) lapses.
        let l = Lease::take(store.clone(), "s2", "web1", Duration::from_millis(30), &h)
            .await
            .unwrap();
        l.renewer.abort();
        tokio::time::sleep(Duration::from_millis(60)).await;
        let err = l.check().unwrap_err().to_string();
        assert!(err.contains("lapsed") && err.contains("leases/s2"), "{err}");
    }
}
