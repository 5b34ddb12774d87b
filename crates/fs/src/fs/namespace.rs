//! The virtual namespace above generations: hosts, their generations and `latest`, with the
//! last listings kept for store outages and each generation's manifest cached.

use super::*;

impl BacktreeFs {
    pub(super) async fn generation(&self, host: &str, name: &str) -> Result<Arc<GenCtx>> {
        let key = (host.to_owned(), name.to_owned());
        if let Some(g) = lock(&self.gens).get(&key).cloned() {
            return Ok(g);
        }
        let manifest = match self.repo.manifest(host, name).await {
            Ok(m) => m,
            Err(backtree_core::Error::NotFound { .. }) => return Err(FsError::NotFound),
            Err(e) => return Err(self.io(format!("{host}/{name}: manifest"), e)),
        };
        let links = self
            .repo
            .links(&manifest)
            .await
            .map_err(|e| self.io(format!("{host}/{name}: hardlink table"), e))?;
        let g = Arc::new(GenCtx {
            host: host.to_owned(),
            name: name.to_owned(),
            ino: hash_ino(&[b"gen", host.as_bytes(), name.as_bytes()]),
            manifest,
            links,
        });
        lock(&self.gens).insert(key, g.clone());
        Ok(g)
    }

    pub(super) async fn hosts(&self) -> Result<Vec<String>> {
        self.listing(String::new(), "listing hosts".into(), self.repo.hosts())
            .await
    }

    pub(super) async fn generations(&self, host: &str) -> Result<Vec<String>> {
        let what = format!("listing generations of {host}");
        self.listing(host.to_owned(), what, self.repo.generations(host))
            .await
    }

    /// A fresh listing of hosts (`key` "") or of a host's generations; if the store cannot be
    /// reached, the last listing that succeeded, so that a store outage does not make the tree
    /// vanish: what is cached stays readable and the rest gives EIO.
    pub(super) async fn listing(
        &self,
        key: String,
        what: String,
        fresh: impl std::future::Future<Output = backtree_core::Result<Vec<String>>>,
    ) -> Result<Vec<String>> {
        match fresh.await {
            Ok(v) => {
                lock(&self.listings).insert(key, v.clone());
                Ok(v)
            }
            Err(e) => {
                let err = self.io(what, e);
                match lock(&self.listings).get(&key) {
                    Some(v) => Ok(v.clone()),
                    None => Err(err),
                }
            }
        }
    }
}
