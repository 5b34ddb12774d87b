//! The repository `config` object: what a tool must understand before touching a repository.
//!
//! Written once by `init` with create-if-absent and never changed. A tool refuses a repository
//! whose `version` differs from its own or that lists a `mandatory` feature it does not know,
//! so an older backtree can neither misread nor prune a newer repository.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// The repository format version this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// The store key of the config object.
pub const CONFIG_KEY: &str = "config";

/// Mandatory features this version understands (`encryption-v1` will be one):
/// [`crate::chunklist::FEATURE`], files whose chunk lists may be paged, [`INDEX_FEATURE`] and
/// [`GC_FEATURE`].
pub const KNOWN_FEATURES: &[&str] = &[crate::chunklist::FEATURE, INDEX_FEATURE, GC_FEATURE];

/// Garbage collection (docs/format.md §6.6, docs/concurrency.md): the index may hold
/// *tombstones* (entries a prune is deleting, in deltas of their own) and several copies of a
/// blob in different packs. A backtree that did not know them would deduplicate against a copy
/// being deleted, so every repository `init` writes lists it, and `prune` refuses a repository
/// without it (made before garbage collection existed).
pub const GC_FEATURE: &str = "gc-v1";

/// The index of tables, roots and filters (docs/format.md §6). Every repository this version
/// writes lists it; one without it has the first index format, which this version no longer
/// reads (no such repository exists outside the tests of earlier versions).
pub const INDEX_FEATURE: &str = "index-v2";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Config {
    /// Always "backtree".
    pub format: String,
    pub version: u32,
    /// Random 32-byte repository id, hex.
    pub id: String,
    /// Features a reader or writer must implement to use this repository.
    #[serde(default)]
    pub mandatory_features: Vec<String>,
    /// Features that may be ignored safely.
    #[serde(default)]
    pub optional_features: Vec<String>,
    pub chunker: ChunkerParams,
    pub compression: Compression,
    /// Target size of packs, bytes.
    pub pack_size: u64,
    /// How chunk ids are computed: "blake3" (plain) or, with encryption, "blake3-keyed".
    pub id_hash: String,
    /// Client-side encryption; `None` means plaintext repository.
    #[serde(default)]
    pub encryption: Option<Encryption>,
    /// Whether the store was found to honor create-if-absent when the repository was created.
    #[serde(default)]
    pub store_create_if_absent: bool,
    /// RFC 3339 creation time.
    pub created: String,
    /// Pieces per page of a paged chunk list that writers cut (absent:
    /// [`crate::chunklist::PAGE_CHUNKS`]). Readers do not need it; tests set it small.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_list_page: Option<u32>,
}

/// FastCDC parameters. Fixed for the life of a repository so identical content chunks the same
/// way on every host.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct ChunkerParams {
    pub algorithm: ChunkerAlgorithm,
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub enum ChunkerAlgorithm {
    /// `fastcdc` crate, `v2020` module, normalization level 1.
    Fastcdc2020,
}

impl Default for ChunkerParams {
    /// Chunks of about 1 MiB on average (512 KiB min, 8 MiB max): restic's and borg's balance
    /// of dedup granularity against the number of objects and requests. FastCDC skips `min`
    /// bytes before it looks for a cut, so its mean chunk lands near `min + avg`: `avg` is
    /// 512 KiB to make the mean 1 MiB (measured: avg 1 MiB gave a 1.49 MB mean).
    fn default() -> Self {
        ChunkerParams {
            algorithm: ChunkerAlgorithm::Fastcdc2020,
            min: 512 * 1024,
            avg: 512 * 1024,
            max: 8 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Compression {
    /// "zstd". Blobs that do not shrink are stored raw (flag in the index).
    pub codec: Codec,
    pub level: i32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    Zstd,
}

impl Default for Compression {
    /// zstd level 3: ~300 MB/s per core compressing, ~1.5 GB/s decompressing, better ratio
    /// than gzip -6 (measured, see docs/benchmarks.md).
    fn default() -> Self {
        Compression {
            codec: Codec::Zstd,
            level: 3,
        }
    }
}

/// Room for client-side encryption: a per-repository master key wrapped by a passphrase-derived
/// key, and authenticated encryption per blob. Declared now so adding it is not a format break;
/// a repository using it lists `encryption-v1` in `mandatory_features`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Encryption {
    /// e.g. "xchacha20poly1305".
    pub cipher: String,
    /// Key derivation for the wrapping key, e.g. "argon2id".
    pub kdf: String,
    /// Store keys of the wrapped master key objects (`keys/<id>`).
    pub key_objects: Vec<String>,
}

impl Config {
    /// A new config with default parameters.
    pub fn new(store_create_if_absent: bool) -> Config {
        Config {
            format: "backtree".into(),
            version: FORMAT_VERSION,
            id: hex::encode(rand::random::<[u8; 32]>()),
            mandatory_features: vec![
                crate::chunklist::FEATURE.into(),
                INDEX_FEATURE.into(),
                GC_FEATURE.into(),
            ],
            optional_features: Vec::new(),
            chunker: ChunkerParams::default(),
            compression: Compression::default(),
            pack_size: 16 * 1024 * 1024,
            id_hash: "blake3".into(),
            encryption: None,
            store_create_if_absent,
            created: chrono::Utc::now().to_rfc3339(),
            chunk_list_page: None,
        }
    }

    /// Pieces per page of the chunk lists a writer may page; `None` (write every list whole,
    /// as before) unless the repository lists [`crate::chunklist::FEATURE`].
    pub fn list_page(&self) -> Option<usize> {
        let paged = self
            .mandatory_features
            .iter()
            .any(|f| f == crate::chunklist::FEATURE);
        paged.then(|| {
            self.chunk_list_page
                .map_or(crate::chunklist::PAGE_CHUNKS, |p| p as usize)
                .max(2)
        })
    }

    /// Whether garbage collection may run on this repository ([`GC_FEATURE`]).
    pub fn collectable(&self) -> bool {
        self.mandatory_features.iter().any(|f| f == GC_FEATURE)
    }

    /// Parses and checks a config object read from `location`.
    pub fn parse(location: &str, bytes: &[u8]) -> Result<Config> {
        // Check format and version before the full schema, so a future version with other fields
        // still gets the clear "unsupported version" sentence.
        #[derive(Deserialize)]
        struct Probe {
            format: Option<String>,
            version: Option<u32>,
            #[serde(default)]
            mandatory_features: Vec<String>,
        }
        let probe: Probe = serde_json::from_slice(bytes)
            .map_err(|e| Error::corrupt(CONFIG_KEY, format!("not valid JSON: {e}")))?;
        if probe.format.as_deref() != Some("backtree") {
            return Err(Error::NotARepository {
                location: location.to_owned(),
            });
        }
        let found = probe.version.unwrap_or(0);
        if found != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                location: location.to_owned(),
                found,
                supported: FORMAT_VERSION,
            });
        }
        // Unknown mandatory features before the full schema: a newer repository may use values
        // this version cannot even parse, and deserves the "upgrade" sentence.
        for f in &probe.mandatory_features {
            if !KNOWN_FEATURES.contains(&f.as_str()) {
                return Err(Error::UnsupportedFeature {
                    location: location.to_owned(),
                    feature: f.clone(),
                });
            }
        }
        if !probe.mandatory_features.iter().any(|f| f == INDEX_FEATURE) {
            return Err(Error::corrupt(
                CONFIG_KEY,
                format!(
                    "repository {location} has the first index format (no {INDEX_FEATURE:?} feature), \
                     which this version of backtree does not read"
                ),
            ));
        }
        let cfg: Config = serde_json::from_slice(bytes)
            .map_err(|e| Error::corrupt(CONFIG_KEY, format!("bad config: {e}")))?;
        if cfg.id_hash != "blake3" || cfg.encryption.is_some() {
            return Err(Error::UnsupportedFeature {
                location: location.to_owned(),
                feature: format!("id hash {:?} / encryption", cfg.id_hash),
            });
        }
        // The limits of the `fastcdc` v2020 chunker, which panics outside them.
        let c = &cfg.chunker;
        let ok = (64..=1 << 20).contains(&c.min)
            && (256..=4 << 20).contains(&c.avg)
            && (1024..=16 << 20).contains(&c.max)
            && c.min <= c.avg
            && c.avg <= c.max;
        if !ok {
            return Err(Error::corrupt(
                CONFIG_KEY,
                "chunker parameters out of range",
            ));
        }
        Ok(cfg)
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serializing a plain struct of strings and numbers cannot fail.
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_repositories_page_and_unknown_features_are_refused() {
        let c = Config::new(true);
        assert_eq!(
            c.mandatory_features,
            vec![crate::chunklist::FEATURE, INDEX_FEATURE, GC_FEATURE]
        );
        assert_eq!(c.list_page(), Some(crate::chunklist::PAGE_CHUNKS));
        let back = Config::parse("here", &c.to_json()).unwrap();
        assert_eq!(back, c);
        // A repository made before the feature: lists are written whole.
        let mut old = c.clone();
        old.mandatory_features.retain(|f| f == INDEX_FEATURE);
        assert_eq!(
            Config::parse("here", &old.to_json()).unwrap().list_page(),
            None
        );
        // A repository with the first index format is refused with a sentence saying so.
        old.mandatory_features.clear();
        let err = Config::parse("here", &old.to_json())
            .unwrap_err()
            .to_string();
        assert!(err.contains("first index format"), "{err}");
        // A feature this version does not know.
        let mut newer = c;
        newer.mandatory_features.push("frobnicated-v9".into());
        let err = Config::parse("here", &newer.to_json()).unwrap_err();
        assert!(
            matches!(&err, Error::UnsupportedFeature { feature, .. } if feature == "frobnicated-v9"),
            "{err:?}"
        );
    }
}
