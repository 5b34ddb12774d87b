//! A repository in an S3 bucket (AWS S3 or a self-hosted store such as Garage or MinIO).
//!
//! # Layout
//! A store is named by `s3://BUCKET` or `s3://BUCKET/PREFIX`. Every repository key is stored
//! as `PREFIX/KEY`; listings strip the prefix back off, so callers see the same keys as on the
//! other backends. Listings follow continuation tokens, so any number of objects is listed.
//!
//! # Commit point
//! An S3 `PutObject` is atomic: readers see no object or the whole object, never a partial one,
//! and S3 (like Garage) gives read-after-write consistency. Objects above
//! [`DEFAULT_MULTIPART_THRESHOLD`] are sent as a multipart upload, which also becomes visible
//! only when `CompleteMultipartUpload` succeeds; a failed upload is aborted. An upload whose
//! process is killed stays invisible and is removed by the bucket's lifecycle rule for
//! incomplete uploads (configure one on AWS). The repository writer's commit point (packs,
//! then index, then the generation manifest) therefore carries over unchanged.
//!
//! # Conditional writes
//! [`ObjectStore::put_if_absent`] sends `If-None-Match: *`. AWS S3 refuses the write with 412
//! when the key exists; some S3-compatible stores ignore the header silently and overwrite
//! (Garage 2.5 does). So [`S3Store::honors_create_if_absent`] is `false` until
//! [`S3Store::probe_create_if_absent`] has shown, by writing one object twice, that the store
//! refuses the second write; `init` records that answer in the repository config. Until then
//! (and on stores that ignore the header) `put_if_absent` first checks with a HEAD request, which
//! narrows but cannot close the race between two writers. A store that answers the header with
//! 501 Not Implemented gets plain writes from then on.
//!
//! # Robustness
//! Requests go through the SDK's standard retry mode: exponential backoff with jitter on
//! throttling, 5xx answers, timeouts and dropped connections, up to [`DEFAULT_MAX_ATTEMPTS`]
//! attempts. Connecting is bounded by [`DEFAULT_CONNECT_TIMEOUT`], each attempt by
//! [`DEFAULT_ATTEMPT_TIMEOUT`] and each operation, retries included, by
//! [`DEFAULT_OPERATION_TIMEOUT`]; a body that stalls mid-transfer is cut by the SDK's stalled
//! stream protection, and a GET whose body fails is re-sent. All of these are settable in
//! [`S3Options`]. Errors name the key and say in one sentence what went wrong: not found, no
//! credentials, access denied (unknown key, wrong secret, expired token, missing permission),
//! no such bucket, endpoint unreachable.
//!
//! Request and response checksums are only computed where S3 requires them: every blob is
//! verified against its BLAKE3 id when read, and several S3-compatible stores reject the SDK's
//! default trailing checksums.
//!
//! Whole objects are collected into memory ([`Bytes`]); packs are at most a few tens of MiB.

use crate::{check_key, ObjectInfo, ObjectStore, Result, StoreError};
use async_trait::async_trait;
use aws_config::meta::region::RegionProviderChain;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;
use std::ops::Range;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Objects larger than this are sent as a multipart upload.
pub const DEFAULT_MULTIPART_THRESHOLD: u64 = 64 * 1024 * 1024;
/// Size of each part of a multipart upload.
pub const DEFAULT_PART_SIZE: u64 = 16 * 1024 * 1024;
/// S3's smallest part (all but the last); smaller settings are raised to it.
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// Time allowed to open a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for one attempt of a request, body included.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(120);
/// Time allowed for a whole operation, retries and backoff included.
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(600);
/// Attempts per request (the first one included).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 6;
/// First retry delay; it doubles (with jitter) up to [`MAX_BACKOFF`].
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Largest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(20);
/// Region used when neither the options, the environment nor a profile names one.
pub const DEFAULT_REGION: &str = "us-east-1";

/// S3 allows at most this many parts in one upload.
const MAX_PARTS: u64 = 10_000;
/// Parts of one multipart upload sent at the same time.
const PARTS_IN_FLIGHT: usize = 4;
/// Times a GET is sent when its body fails mid-transfer.
const BODY_ATTEMPTS: u32 = 3;

/// What is known about the store's handling of `If-None-Match: *`.
const COND_UNKNOWN: u8 = 0;
const COND_HONORED: u8 = 1;
const COND_IGNORED: u8 = 2;
const COND_REJECTED: u8 = 3;

/// How to reach the bucket. Every field is optional; `S3Options::default()` uses the standard
/// AWS configuration (environment, profile, instance or container role).
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// Endpoint URL of a self-hosted store, e.g. `http://127.0.0.1:3900`. Default: the SDK's
    /// (`AWS_ENDPOINT_URL`, the profile's `endpoint_url`, else AWS).
    pub endpoint: Option<String>,
    /// Region. Default: `AWS_REGION`, the profile, else [`DEFAULT_REGION`].
    pub region: Option<String>,
    /// Path-style addressing (`ENDPOINT/BUCKET/KEY`). Default: on when a custom endpoint is
    /// configured (self-hosted stores rarely have per-bucket DNS names), off for AWS.
    pub path_style: Option<bool>,
    /// Static credentials instead of the standard credential chain.
    pub credentials: Option<S3Credentials>,
    /// Default [`DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Option<Duration>,
    /// Default [`DEFAULT_ATTEMPT_TIMEOUT`].
    pub attempt_timeout: Option<Duration>,
    /// Default [`DEFAULT_OPERATION_TIMEOUT`].
    pub operation_timeout: Option<Duration>,
    /// Default [`DEFAULT_MAX_ATTEMPTS`]; 1 disables retries.
    pub max_attempts: Option<u32>,
    /// Default [`DEFAULT_INITIAL_BACKOFF`].
    pub initial_backoff: Option<Duration>,
    /// Default [`DEFAULT_MULTIPART_THRESHOLD`].
    pub multipart_threshold: Option<u64>,
    /// Default [`DEFAULT_PART_SIZE`]; at least [`MIN_PART_SIZE`].
    pub part_size: Option<u64>,
}

/// An access key and its secret.
#[derive(Clone)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

/// A store in an S3 bucket, below an optional prefix. Cheap to clone.
#[derive(Clone)]
pub struct S3Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for S3Store {
    // The SDK client's own Debug output is pages long; the location says what matters.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("url", &self.inner.url)
            .field("endpoint", &self.inner.endpoint)
            .field("honors_create_if_absent", &self.honors_create_if_absent())
            .finish()
    }
}

struct Inner {
    client: Client,
    bucket: String,
    /// `""` or the prefix with a trailing `/`.
    prefix: String,
    /// `s3://bucket[/prefix]`.
    url: String,
    /// The endpoint, for messages.
    endpoint: String,
    multipart_threshold: u64,
    part_size: u64,
    conditional: AtomicU8,
}

/// Outcome of a conditional write.
enum CondPut {
    Created,
    Refused,
    NotImplemented,
}

impl S3Store {
    /// Connects to `s3://BUCKET` or `s3://BUCKET/PREFIX`. No request is sent yet; a missing
    /// bucket or bad credentials show up with the first operation.
    pub async fn from_url(url: &str, opts: S3Options) -> Result<S3Store> {
        let (bucket, prefix) = parse_url(url)?;
        let region = RegionProviderChain::first_try(opts.region.clone().map(Region::new))
            .or_default_provider()
            .or_else(Region::new(DEFAULT_REGION));
        let retry = RetryConfig::standard()
            .with_max_attempts(opts.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS).max(1))
            .with_initial_backoff(opts.initial_backoff.unwrap_or(DEFAULT_INITIAL_BACKOFF))
            .with_max_backoff(MAX_BACKOFF);
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(opts.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT))
            .operation_attempt_timeout(opts.attempt_timeout.unwrap_or(DEFAULT_ATTEMPT_TIMEOUT))
            .operation_timeout(opts.operation_timeout.unwrap_or(DEFAULT_OPERATION_TIMEOUT))
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(region)
            .retry_config(retry)
            .timeout_config(timeouts)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(endpoint) = &opts.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some(c) = &opts.credentials {
            loader = loader.credentials_provider(Credentials::new(
                &c.access_key_id,
                &c.secret_access_key,
                None,
                None,
                "backtree-options",
            ));
        }
        let sdk = loader.load().await;
        let custom_endpoint = sdk.endpoint_url().map(str::to_owned);
        let path_style = opts.path_style.unwrap_or(custom_endpoint.is_some());
        let endpoint = custom_endpoint.unwrap_or_else(|| {
            let region = sdk.region().map_or(DEFAULT_REGION, |r| r.as_ref());
            format!("https://s3.{region}.amazonaws.com")
        });
        let conf = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(path_style)
            .build();
        let url = if prefix.is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{prefix}")
        };
        let prefix = if prefix.is_empty() {
            prefix
        } else {
            format!("{prefix}/")
        };
        let part_size = opts
            .part_size
            .unwrap_or(DEFAULT_PART_SIZE)
            .max(MIN_PART_SIZE);
        Ok(S3Store {
            inner: Arc::new(Inner {
                client: Client::from_conf(conf),
                bucket,
                prefix,
                url,
                endpoint,
                multipart_threshold: opts
                    .multipart_threshold
                    .unwrap_or(DEFAULT_MULTIPART_THRESHOLD),
                part_size,
                conditional: AtomicU8::new(COND_UNKNOWN),
            }),
        })
    }

    /// The bucket name.
    pub fn bucket(&self) -> &str {
        &self.inner.bucket
    }

    /// The key prefix, without a trailing `/` (empty for none).
    pub fn prefix(&self) -> &str {
        self.inner.prefix.trim_end_matches('/')
    }

    /// The endpoint requests go to.
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// Finds out whether the store honors `If-None-Match: *`: writes `key` twice with the
    /// header, reports whether the second write was refused, and deletes `key`. The answer is
    /// kept, and [`ObjectStore::honors_create_if_absent`] returns it from then on. `key` must
    /// not hold anything of value.
    pub async fn probe_create_if_absent(&self, key: &str) -> Result<bool> {
        check_key(key)?;
        let first = self
            .conditional_put(key, Bytes::from_static(b"backtree probe 1"), true)
            .await?;
        let state = match first {
            // A leftover probe object, and the store refused to overwrite it.
            CondPut::Refused => COND_HONORED,
            CondPut::NotImplemented => COND_REJECTED,
            CondPut::Created => {
                match self
                    .conditional_put(key, Bytes::from_static(b"backtree probe 2"), true)
                    .await?
                {
                    CondPut::Refused => COND_HONORED,
                    CondPut::Created => COND_IGNORED,
                    CondPut::NotImplemented => COND_REJECTED,
                }
            }
        };
        self.delete(key).await?;
        self.inner.conditional.store(state, Ordering::Relaxed);
        tracing::debug!(
            store = %self.inner.url,
            honored = state == COND_HONORED,
            "probed If-None-Match"
        );
        Ok(state == COND_HONORED)
    }

    fn full(&self, key: &str) -> String {
        format!("{}{}", self.inner.prefix, key)
    }

    /// The key named in errors about a listing.
    fn list_key(&self, prefix: &str) -> String {
        if prefix.is_empty() {
            self.inner.url.clone()
        } else {
            prefix.to_owned()
        }
    }

    /// A `PutObject`, with `If-None-Match: *` when `conditional`.
    async fn conditional_put(&self, key: &str, data: Bytes, conditional: bool) -> Result<CondPut> {
        let mut req = self
            .inner
            .client
            .put_object()
            .bucket(&self.inner.bucket)
            .key(self.full(key))
            .body(ByteStream::from(data));
        if conditional {
            req = req.if_none_match("*");
        }
        match req.send().await {
            Ok(_) => Ok(CondPut::Created),
            Err(e) => {
                let (status, code) = status_and_code(&e);
                if status == Some(412)
                    || status == Some(409)
                    || matches!(
                        code.as_deref(),
                        Some("PreconditionFailed") | Some("ConditionalRequestConflict")
                    )
                {
                    Ok(CondPut::Refused)
                } else if conditional
                    && (status == Some(501) || code.as_deref() == Some("NotImplemented"))
                {
                    Ok(CondPut::NotImplemented)
                } else {
                    Err(self.map_err(key, e))
                }
            }
        }
    }

    /// A GET of the whole object or of a `Range` header's bytes. `Ok(None)` when the store
    /// answered 416 (range not satisfiable). Also returns the `Content-Range` header.
    async fn get_object(
        &self,
        key: &str,
        range: Option<String>,
    ) -> Result<Option<(Bytes, Option<String>)>> {
        let mut attempt = 1;
        loop {
            let resp = self
                .inner
                .client
                .get_object()
                .bucket(&self.inner.bucket)
                .key(self.full(key))
                .set_range(range.clone())
                .send()
                .await;
            let resp = match resp {
                Ok(r) => r,
                Err(e) => {
                    let (status, code) = status_and_code(&e);
                    if range.is_some()
                        && (status == Some(416) || code.as_deref() == Some("InvalidRange"))
                    {
                        return Ok(None);
                    }
                    return Err(self.map_err(key, e));
                }
            };
            let content_range = resp.content_range().map(str::to_owned);
            match resp.body.collect().await {
                Ok(body) => return Ok(Some((body.into_bytes(), content_range))),
                Err(e) if attempt < BODY_ATTEMPTS => {
                    tracing::warn!(key, attempt, error = %e, "S3 body read failed; retrying");
                    attempt += 1;
                }
                Err(e) => {
                    return Err(StoreError::Unavailable {
                        key: key.to_owned(),
                        message: format!(
                            "reading it from {} failed {BODY_ATTEMPTS} times: {}",
                            self.inner.endpoint,
                            innermost(&e)
                        ),
                    })
                }
            }
        }
    }

    /// The size of an object that must exist.
    async fn size_of(&self, key: &str) -> Result<u64> {
        self.head(key).await?.ok_or_else(|| StoreError::NotFound {
            key: key.to_owned(),
        })
    }

    async fn put_single(&self, key: &str, data: Bytes) -> Result<()> {
        self.inner
            .client
            .put_object()
            .bucket(&self.inner.bucket)
            .key(self.full(key))
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| self.map_err(key, e))?;
        Ok(())
    }

    async fn put_multipart(&self, key: &str, data: Bytes) -> Result<()> {
        let full = self.full(key);
        let created = self
            .inner
            .client
            .create_multipart_upload()
            .bucket(&self.inner.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| self.map_err(key, e))?;
        let Some(upload_id) = created.upload_id().map(str::to_owned) else {
            return Err(StoreError::Remote {
                key: key.to_owned(),
                message: "S3 started a multipart upload without an upload id".to_owned(),
            });
        };
        let res = match self.upload_parts(key, &full, &upload_id, data).await {
            Ok(parts) => self
                .inner
                .client
                .complete_multipart_upload()
                .bucket(&self.inner.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.map_err(key, e)),
            Err(e) => Err(e),
        };
        if res.is_err() {
            let abort = self
                .inner
                .client
                .abort_multipart_upload()
                .bucket(&self.inner.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .send()
                .await;
            if let Err(e) = abort {
                tracing::warn!(key, error = %self.map_err(key, e), "aborting a failed multipart upload failed");
            }
        }
        res
    }

    /// Sends the parts, a few at a time, and returns them in order.
    async fn upload_parts(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        data: Bytes,
    ) -> Result<Vec<CompletedPart>> {
        let len = data.len() as u64;
        let part_size = self.inner.part_size.max(len.div_ceil(MAX_PARTS));
        let mut tasks = tokio::task::JoinSet::new();
        let mut parts = Vec::new();
        let mut offset = 0u64;
        let mut number = 1i32;
        loop {
            while tasks.len() < PARTS_IN_FLIGHT && offset < len {
                let end = (offset + part_size).min(len);
                let body = data.slice(offset as usize..end as usize);
                let req = self
                    .inner
                    .client
                    .upload_part()
                    .bucket(&self.inner.bucket)
                    .key(full)
                    .upload_id(upload_id)
                    .part_number(number)
                    .body(ByteStream::from(body));
                let n = number;
                tasks.spawn(async move { (n, req.send().await) });
                offset = end;
                number += 1;
            }
            // Returning early drops `tasks`, which cancels the parts still in flight.
            let Some(joined) = tasks.join_next().await else {
                break;
            };
            let (n, res) = joined.map_err(|e| StoreError::Remote {
                key: key.to_owned(),
                message: format!("uploading a part failed: {e}"),
            })?;
            let out = res.map_err(|e| self.map_err(key, e))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(n)
                    .set_e_tag(out.e_tag().map(str::to_owned))
                    .build(),
            );
        }
        parts.sort_by_key(|p| p.part_number());
        Ok(parts)
    }

    /// Turns an SDK error into the store's error for `key`, in one sentence.
    fn map_err<E>(&self, key: &str, err: SdkError<E, HttpResponse>) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let key = key.to_owned();
        let endpoint = self.inner.endpoint.clone();
        let (status, code) = status_and_code(&err);
        match &err {
            SdkError::DispatchFailure(d) if d.is_timeout() => StoreError::Unavailable {
                key,
                message: format!("S3 endpoint {endpoint} did not answer in time"),
            },
            // Missing credentials surface as a dispatch or construction failure.
            SdkError::DispatchFailure(_) | SdkError::ConstructionFailure(_)
                if mentions_credentials(&err) =>
            {
                no_credentials(key, &innermost(&err))
            }
            SdkError::DispatchFailure(_) => StoreError::Unreachable {
                key,
                endpoint,
                reason: innermost(&err),
            },
            SdkError::TimeoutError(_) => StoreError::Unavailable {
                key,
                message: format!("the request to S3 endpoint {endpoint} timed out"),
            },
            SdkError::ConstructionFailure(_) => StoreError::Remote {
                key,
                message: format!("cannot build the S3 request: {}", innermost(&err)),
            },
            _ => {
                let message = err.message().map(str::to_owned);
                classify(key, &self.inner.bucket, &endpoint, status, code, message)
            }
        }
    }
}

/// The error for an answer of the store, by its HTTP status and S3 error code.
fn classify(
    key: String,
    bucket: &str,
    endpoint: &str,
    status: Option<u16>,
    code: Option<String>,
    message: Option<String>,
) -> StoreError {
    let code_str = code.as_deref().unwrap_or("");
    match code_str {
        "NoSuchKey" | "NotFound" => return StoreError::NotFound { key },
        "NoSuchBucket" => {
            return StoreError::NoBucket {
                key,
                bucket: bucket.to_owned(),
                endpoint: endpoint.to_owned(),
            }
        }
        "InvalidAccessKeyId" => {
            return StoreError::Denied {
                key,
                reason: "the access key id is unknown to the store".to_owned(),
            }
        }
        "SignatureDoesNotMatch" => {
            return StoreError::Denied {
                key,
                reason: "the secret access key does not match the access key id".to_owned(),
            }
        }
        "ExpiredToken" | "InvalidToken" | "TokenRefreshRequired" => {
            return StoreError::Denied {
                key,
                reason: "the session token is expired or invalid".to_owned(),
            }
        }
        "AccessDenied" | "AllAccessDisabled" | "Forbidden" => {
            // The store's own words say which check failed ("Forbidden: No such key: GK…").
            let reason = match message.as_deref().map(one_line) {
                Some(m) if !m.is_empty() => format!("{code_str}: {m}"),
                _ => code_str.to_owned(),
            };
            return StoreError::Denied { key, reason };
        }
        _ => {}
    }
    let what = match (&code, status) {
        (Some(c), Some(s)) => format!("{c} ({s})"),
        (Some(c), None) => c.clone(),
        (None, Some(s)) => format!("HTTP {s}"),
        (None, None) => "an unreadable answer".to_owned(),
    };
    match status {
        Some(404) => StoreError::NotFound { key },
        Some(401) | Some(403) => StoreError::Denied {
            key,
            reason: format!("the store answered {what}"),
        },
        Some(s) if s >= 500 || s == 429 || code_str == "SlowDown" => StoreError::Unavailable {
            key,
            message: format!("S3 endpoint {endpoint} kept answering {what}"),
        },
        _ => StoreError::Remote {
            key,
            message: match message.as_deref().map(one_line) {
                Some(m) if !m.is_empty() => format!("S3 refused the request: {what}: {m}"),
                _ => format!("S3 refused the request: {what}"),
            },
        },
    }
}

/// A server's message made fit for a one-line error: whitespace collapsed, at most 200
/// characters, no final period.
fn one_line(message: &str) -> String {
    let mut out = message.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some((cut, _)) = out.char_indices().nth(200) {
        out.truncate(cut);
        out.push('…');
    }
    out.trim_end_matches('.').to_owned()
}

fn no_credentials(key: String, reason: &str) -> StoreError {
    let reason = if reason.contains("no credentials found") {
        "none found in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), an AWS profile, \
         or an instance or container role"
            .to_owned()
    } else {
        reason.to_owned()
    };
    StoreError::NoCredentials { key, reason }
}

/// The HTTP status and S3 error code of an answer, if there was one.
fn status_and_code<E: ProvideErrorMetadata>(
    err: &SdkError<E, HttpResponse>,
) -> (Option<u16>, Option<String>) {
    let status = err.raw_response().map(|r| r.status().as_u16());
    (status, err.code().map(str::to_owned))
}

/// The message of the innermost error in a chain (e.g. "Connection refused (os error 111)"),
/// which is the informative part of the SDK's nested errors.
fn innermost(err: &(dyn std::error::Error + 'static)) -> String {
    let mut e = err;
    while let Some(next) = e.source() {
        e = next;
    }
    one_line(&e.to_string())
}

fn mentions_credentials(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut e = Some(err);
    while let Some(cur) = e {
        let text = cur.to_string();
        if text.contains("credentials") || text.contains("identity") {
            return true;
        }
        e = cur.source();
    }
    false
}

/// Splits `s3://BUCKET[/PREFIX]` into the bucket and the prefix (no leading or trailing `/`).
pub(crate) fn parse_url(url: &str) -> Result<(String, String)> {
    let bad = |reason: &str| StoreError::InvalidUrl {
        key: url.to_owned(),
        reason: reason.to_owned(),
    };
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| bad("it must start with s3://"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !bucket.starts_with(['-', '.'])
        && !bucket.ends_with(['-', '.']);
    if !bucket_ok {
        return Err(bad(
            "the bucket name must be 3 to 63 lowercase letters, digits, '-' or '.'",
        ));
    }
    let prefix = prefix.trim_matches('/');
    if !prefix.is_empty() && check_key(prefix).is_err() {
        return Err(bad("the prefix has an empty, '.' or '..' component"));
    }
    Ok((bucket.to_owned(), prefix.to_owned()))
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        check_key(key)?;
        if data.len() as u64 > self.inner.multipart_threshold {
            self.put_multipart(key, data).await
        } else {
            self.put_single(key, data).await
        }
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool> {
        check_key(key)?;
        let state = self.inner.conditional.load(Ordering::Relaxed);
        if state != COND_HONORED && self.head(key).await?.is_some() {
            return Ok(false);
        }
        match self
            .conditional_put(key, data.clone(), state != COND_REJECTED)
            .await?
        {
            CondPut::Created => Ok(true),
            CondPut::Refused => Ok(false),
            CondPut::NotImplemented => {
                self.inner
                    .conditional
                    .store(COND_REJECTED, Ordering::Relaxed);
                self.put_single(key, data).await?;
                Ok(true)
            }
        }
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        check_key(key)?;
        match self.get_object(key, None).await? {
            Some((data, _)) => Ok(data),
            // Only a ranged GET can be answered 416.
            None => Err(StoreError::Remote {
                key: key.to_owned(),
                message: "S3 answered a whole-object GET with 416".to_owned(),
            }),
        }
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        check_key(key)?;
        let bad_range = |size: u64| StoreError::BadRange {
            key: key.to_owned(),
            start: range.start,
            end: range.end,
            size,
        };
        // An empty range has no `Range` header; the object must still exist and hold it.
        if range.start >= range.end {
            let size = self.size_of(key).await?;
            return if range.start == range.end && range.end <= size {
                Ok(Bytes::new())
            } else {
                Err(bad_range(size))
            };
        }
        let header = format!("bytes={}-{}", range.start, range.end - 1);
        let Some((data, content_range)) = self.get_object(key, Some(header)).await? else {
            return Err(bad_range(self.size_of(key).await?));
        };
        let want = range.end - range.start;
        match content_range {
            // The store ignored the range and sent the whole object.
            None => crate::slice_range(key, &data, range.clone()),
            Some(_) if data.len() as u64 == want => Ok(data),
            // S3 shortens a range that runs past the end: `bytes 5-10/11`.
            Some(cr) => {
                let total = cr.rsplit('/').next().and_then(|t| t.parse::<u64>().ok());
                let size = match total {
                    Some(t) => t,
                    None => self.size_of(key).await?,
                };
                Err(bad_range(size))
            }
        }
    }

    async fn head(&self, key: &str) -> Result<Option<u64>> {
        check_key(key)?;
        let res = self
            .inner
            .client
            .head_object()
            .bucket(&self.inner.bucket)
            .key(self.full(key))
            .send()
            .await;
        match res {
            Ok(out) => Ok(Some(out.content_length().unwrap_or(0).max(0) as u64)),
            Err(e) => match self.map_err(key, e) {
                StoreError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let full = self.full(prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let resp = self
                .inner
                .client
                .list_objects_v2()
                .bucket(&self.inner.bucket)
                .prefix(&full)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.map_err(&self.list_key(prefix), e))?;
            for obj in resp.contents() {
                let Some(key) = obj.key().and_then(|k| k.strip_prefix(&self.inner.prefix)) else {
                    continue;
                };
                out.push(ObjectInfo {
                    key: key.to_owned(),
                    size: obj.size().unwrap_or(0).max(0) as u64,
                    modified: obj
                        .last_modified()
                        .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                });
            }
            match resp.next_continuation_token() {
                Some(t) if resp.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        let full = self.full(prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        let component = |k: &str| -> Option<String> {
            let rest = k.strip_prefix(full.as_str())?;
            let first = rest.split('/').next().unwrap_or(rest);
            (!first.is_empty()).then(|| first.to_owned())
        };
        loop {
            let resp = self
                .inner
                .client
                .list_objects_v2()
                .bucket(&self.inner.bucket)
                .prefix(&full)
                .delimiter("/")
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.map_err(&self.list_key(prefix), e))?;
            out.extend(
                resp.common_prefixes()
                    .iter()
                    .filter_map(|p| p.prefix())
                    .filter_map(component),
            );
            out.extend(
                resp.contents()
                    .iter()
                    .filter_map(|o| o.key())
                    .filter_map(component),
            );
            match resp.next_continuation_token() {
                Some(t) if resp.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        check_key(key)?;
        let res = self
            .inner
            .client
            .delete_object()
            .bucket(&self.inner.bucket)
            .key(self.full(key))
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) => match self.map_err(key, e) {
                StoreError::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }

    fn honors_create_if_absent(&self) -> bool {
        self.inner.conditional.load(Ordering::Relaxed) == COND_HONORED
    }

    fn location(&self) -> String {
        self.inner.url.clone()
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("s3://bucket").expect("plain"),
            ("bucket".to_owned(), String::new())
        );
        assert_eq!(
            parse_url("s3://bucket/").expect("slash"),
            ("bucket".to_owned(), String::new())
        );
        assert_eq!(
            parse_url("s3://my.bucket-1/a/b/").expect("prefix"),
            ("my.bucket-1".to_owned(), "a/b".to_owned())
        );
        for bad in [
            "bucket",
            "http://bucket",
            "s3://",
            "s3://ab",
            "s3://Bucket",
            "s3://-bucket",
            "s3://bucket/a//b",
            "s3://bucket/a/../b",
        ] {
            let err = parse_url(bad).expect_err(bad);
            assert!(matches!(err, StoreError::InvalidUrl { .. }), "{bad}: {err}");
            assert_eq!(err.key(), bad);
        }
    }

    #[test]
    fn classification() {
        let c = |status: Option<u16>, code: Option<&str>| {
            classify(
                "k".into(),
                "b",
                "http://e",
                status,
                code.map(str::to_owned),
                None,
            )
        };
        assert!(c(Some(404), Some("NoSuchKey")).is_not_found());
        assert!(c(Some(404), None).is_not_found());
        assert!(matches!(
            c(Some(404), Some("NoSuchBucket")),
            StoreError::NoBucket { .. }
        ));
        for code in [
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AccessDenied",
        ] {
            assert!(matches!(
                c(Some(403), Some(code)),
                StoreError::Denied { .. }
            ));
        }
        assert!(matches!(c(Some(403), None), StoreError::Denied { .. }));
        assert!(matches!(
            c(Some(503), Some("SlowDown")),
            StoreError::Unavailable { .. }
        ));
        assert_eq!(one_line("a\n  b.  "), "a b");
        assert_eq!(one_line(&"x".repeat(300)).chars().count(), 201);
        let e = c(Some(400), Some("InvalidArgument"));
        assert!(matches!(e, StoreError::Remote { .. }));
        assert_eq!(e.key(), "k");
        assert_eq!(
            e.to_string(),
            "object k: S3 refused the request: InvalidArgument (400)"
        );
    }
}
