//! The S3 backend against a real S3 server: Garage, started by scripts/garage.sh.
//!
//! `BACKTREE_TEST_S3` names the bucket (`s3://backtree-test`), and the AWS_* variables of the
//! server's `env` file say how to reach it; scripts/test.sh sets all of them. Without
//! `BACKTREE_TEST_S3` these tests are skipped with a note, except in CI (`CI` set), where they
//! fail. Each test works below its own random prefix, so runs never see each other's objects.
//! The unreachable-endpoint test needs no server and always runs.

use backtree_store::{conformance, ObjectStore, S3Credentials, S3Options, S3Store, StoreError};
use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The bucket URL of the test server, or `None` (after a note) when the tests are skipped.
fn server() -> Option<String> {
    match std::env::var("BACKTREE_TEST_S3") {
        Ok(url) if !url.is_empty() => Some(url.trim_end_matches('/').to_owned()),
        _ if std::env::var_os("CI").is_some() => panic!(
            "S3 tests need Garage: run scripts/garage.sh install, scripts/garage.sh start DIR and \
             `. DIR/env` before the tests (scripts/test.sh does this)"
        ),
        _ => {
            // Written past the test harness's capture, so the skip is visible.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "note: S3 test skipped: BACKTREE_TEST_S3 is not set (scripts/test.sh starts Garage and sets it)"
            );
            None
        }
    }
}

/// A store below a fresh random prefix of the test bucket.
async fn fresh(name: &str, opts: S3Options) -> Option<S3Store> {
    let base = server()?;
    let url = format!("{base}/{name}-{:016x}", rand::random::<u64>());
    Some(S3Store::from_url(&url, opts).await.expect("open S3 store"))
}

/// Deletes everything below the store's prefix.
async fn clean(store: &S3Store) {
    for obj in store.list("").await.expect("list for cleanup") {
        store.delete(&obj.key).await.expect("cleanup delete");
    }
}

fn one_sentence(e: &StoreError) -> String {
    let text = e.to_string();
    assert!(!text.contains('\n'), "multi-line error: {text:?}");
    assert!(text.len() < 400, "overlong error: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_conforms() {
    let Some(store) = fresh("conformance", S3Options::default()).await else {
        return;
    };
    assert!(!store.honors_create_if_absent(), "unknown until probed");
    let honored = store
        .probe_create_if_absent("probe")
        .await
        .expect("probe create-if-absent");
    eprintln!("{}: If-None-Match honored: {honored}", store.endpoint());
    assert_eq!(store.honors_create_if_absent(), honored);
    assert_eq!(store.head("probe").await.expect("head probe"), None);
    // The probe leaves the store empty, as the suite needs.
    assert!(store.list("").await.expect("list").is_empty());

    conformance::run(&store).await;

    // Keys come back without the store's prefix; the prefix is part of the location.
    assert!(store.location().starts_with("s3://"));
    assert!(store.location().ends_with(store.prefix()));
    let keys: Vec<String> = store
        .list("")
        .await
        .expect("list")
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert!(keys.contains(&"big".to_owned()), "{keys:?}");

    // Two stores on one bucket with different prefixes do not see each other.
    let other = fresh("conformance-other", S3Options::default())
        .await
        .expect("server");
    assert!(other.list("").await.expect("list other").is_empty());
    assert_eq!(other.head("big").await.expect("head other"), None);

    clean(&store).await;
    assert!(store.list("").await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_lists_past_one_page() {
    let Some(store) = fresh("pages", S3Options::default()).await else {
        return;
    };
    let store = Arc::new(store);
    // 1,050 entries below `many/`: even ones are objects, odd ones directories.
    const N: usize = 1050;
    let mut tasks: tokio::task::JoinSet<Result<(), StoreError>> = tokio::task::JoinSet::new();
    for i in 0..N {
        while tasks.len() >= 32 {
            tasks
                .join_next()
                .await
                .expect("task")
                .expect("join")
                .expect("put");
        }
        let s = store.clone();
        tasks.spawn(async move {
            let key = if i % 2 == 0 {
                format!("many/{i:05}")
            } else {
                format!("many/{i:05}/sub")
            };
            s.put(&key, Bytes::from(vec![1u8; i % 7])).await
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("join").expect("put");
    }

    let listed = store.list("many/").await.expect("list");
    assert_eq!(listed.len(), N);
    assert!(listed.windows(2).all(|w| w[0].key < w[1].key), "sorted");
    assert_eq!(listed[1].key, "many/00001/sub");
    assert_eq!(listed[3].size, 3);
    let dirs = store.list_dirs("many/").await.expect("dirs");
    assert_eq!(dirs.len(), N);
    assert_eq!(dirs[0], "00000");
    assert_eq!(dirs[N - 1], format!("{:05}", N - 1));
    assert_eq!(store.list_dirs("").await.expect("dirs"), ["many"]);

    clean(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_multipart_put() {
    let opts = S3Options {
        multipart_threshold: Some(1024 * 1024),
        part_size: Some(5 * 1024 * 1024),
        ..S3Options::default()
    };
    let Some(store) = fresh("multipart", opts).await else {
        return;
    };
    // Three parts: 5 MiB, 5 MiB, 1 MiB and a bit.
    let len = 11 * 1024 * 1024 + 123;
    let data: Vec<u8> = (0..len as u32)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect();
    store
        .put("packs/big", Bytes::from(data.clone()))
        .await
        .expect("multipart put");
    assert_eq!(
        store.head("packs/big").await.expect("head"),
        Some(len as u64)
    );
    assert_eq!(
        store.get("packs/big").await.expect("get").as_ref(),
        &data[..]
    );
    let across = 5 * 1024 * 1024 - 10..5 * 1024 * 1024 + 10;
    assert_eq!(
        store
            .get_range("packs/big", across.start as u64..across.end as u64)
            .await
            .expect("range across parts")
            .as_ref(),
        &data[across]
    );

    // The object really was sent in parts: S3 gives a multipart object an ETag ending in
    // "-<number of parts>".
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    let client = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(true)
            .build(),
    );
    let head = client
        .head_object()
        .bucket(store.bucket())
        .key(format!("{}/packs/big", store.prefix()))
        .send()
        .await
        .expect("sdk head");
    let etag = head.e_tag().unwrap_or_default().trim_matches('"');
    assert!(
        etag.ends_with("-3"),
        "ETag {etag:?} is not of a 3-part upload"
    );

    // Nothing is left half-uploaded.
    let uploads = client
        .list_multipart_uploads()
        .bucket(store.bucket())
        .prefix(store.prefix())
        .send()
        .await
        .expect("list uploads");
    assert!(uploads.uploads().is_empty(), "{:?}", uploads.uploads());

    clean(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_bad_credentials_are_one_sentence() {
    let Some(base) = server() else {
        return;
    };
    let url = format!("{base}/creds-{:016x}", rand::random::<u64>());
    let wrong_key = S3Options {
        credentials: Some(S3Credentials {
            access_key_id: "GK0123456789abcdef01234567".into(),
            secret_access_key: "00".repeat(32),
        }),
        ..S3Options::default()
    };
    let store = S3Store::from_url(&url, wrong_key).await.expect("open");
    let err = store.get("config").await.expect_err("unknown key id");
    let text = one_sentence(&err);
    assert!(matches!(err, StoreError::Denied { .. }), "{err:?}");
    assert_eq!(err.key(), "config");
    assert!(text.contains("access denied"), "{text}");
    eprintln!("unknown key: {text}");
    let err = store.list("").await.expect_err("list with unknown key id");
    assert!(matches!(err, StoreError::Denied { .. }), "{err:?}");

    // The right key id with a wrong secret.
    let key_id =
        std::env::var("AWS_ACCESS_KEY_ID").expect("AWS_ACCESS_KEY_ID is set with the server");
    let wrong_secret = S3Options {
        credentials: Some(S3Credentials {
            access_key_id: key_id,
            secret_access_key: "11".repeat(32),
        }),
        ..S3Options::default()
    };
    let store = S3Store::from_url(&url, wrong_secret).await.expect("open");
    let err = store
        .put("snapshots/h/1", Bytes::from_static(b"x"))
        .await
        .expect_err("wrong secret");
    let text = one_sentence(&err);
    assert!(matches!(err, StoreError::Denied { .. }), "{err:?}");
    assert_eq!(err.key(), "snapshots/h/1");
    eprintln!("wrong secret: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_missing_bucket_is_one_sentence() {
    if server().is_none() {
        return;
    }
    let bucket = format!("backtree-missing-{:08x}", rand::random::<u32>());
    let store = S3Store::from_url(&format!("s3://{bucket}/p"), S3Options::default())
        .await
        .expect("open");
    let err = store.get("config").await.expect_err("no bucket");
    let text = one_sentence(&err);
    assert!(matches!(err, StoreError::NoBucket { .. }), "{err:?}");
    assert_eq!(err.key(), "config");
    assert!(
        text.contains(&bucket) && text.contains("does not exist"),
        "{text}"
    );
    eprintln!("missing bucket: {text}");
    let err = store.list("").await.expect_err("list without bucket");
    assert!(matches!(err, StoreError::NoBucket { .. }), "{err:?}");
    let err = store
        .put("k", Bytes::from_static(b"x"))
        .await
        .expect_err("put without bucket");
    assert!(matches!(err, StoreError::NoBucket { .. }), "{err:?}");
}

/// Needs no server: a closed port on loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_unreachable_endpoint_fails_fast() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let opts = S3Options {
        endpoint: Some(endpoint.clone()),
        region: Some("garage".into()),
        credentials: Some(S3Credentials {
            access_key_id: "GK0123456789abcdef01234567".into(),
            secret_access_key: "00".repeat(32),
        }),
        connect_timeout: Some(Duration::from_secs(1)),
        max_attempts: Some(3),
        initial_backoff: Some(Duration::from_millis(50)),
        ..S3Options::default()
    };
    let store = S3Store::from_url("s3://backtree-test/x", opts)
        .await
        .expect("open");
    let start = Instant::now();
    let err = store.get("config").await.expect_err("closed port");
    let elapsed = start.elapsed();
    let text = one_sentence(&err);
    assert!(matches!(err, StoreError::Unreachable { .. }), "{err:?}");
    assert_eq!(err.key(), "config");
    assert!(
        text.contains(&format!("cannot reach S3 endpoint {endpoint}")),
        "{text}"
    );
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    eprintln!("unreachable ({elapsed:?}): {text}");
    let err = store.list("").await.expect_err("list on a closed port");
    assert!(matches!(err, StoreError::Unreachable { .. }), "{err:?}");
}
