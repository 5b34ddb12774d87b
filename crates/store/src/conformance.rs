//! One conformance suite for every [`ObjectStore`] backend.
//!
//! Each backend's tests call [`run`] on a fresh, empty store. The suite checks exactly the
//! properties the repository format relies on: whole and ranged reads, listings in key order
//! with and without delimiter, create-if-absent, idempotent delete, and errors that name the key.

use crate::{ObjectStore, StoreError};
use bytes::Bytes;

/// Runs every check against `store`, which must be empty. Panics on the first violation, with
/// a message naming the check (this is test support code).
pub async fn run(store: &dyn ObjectStore) {
    // Whole-object put and get.
    store
        .put("a/b/one", Bytes::from_static(b"hello world"))
        .await
        .expect("put");
    assert_eq!(
        store.get("a/b/one").await.expect("get").as_ref(),
        b"hello world"
    );
    assert_eq!(store.head("a/b/one").await.expect("head"), Some(11));
    assert_eq!(store.head("a/b/none").await.expect("head missing"), None);

    // Overwrite by plain put.
    store
        .put("a/b/one", Bytes::from_static(b"HELLO world"))
        .await
        .expect("overwrite");
    assert_eq!(
        store.get("a/b/one").await.expect("get").as_ref(),
        b"HELLO world"
    );

    // Ranged reads, including empty and whole ranges; out-of-range is an error.
    assert_eq!(
        store
            .get_range("a/b/one", 6..11)
            .await
            .expect("range")
            .as_ref(),
        b"world"
    );
    assert_eq!(
        store
            .get_range("a/b/one", 0..11)
            .await
            .expect("range")
            .as_ref(),
        b"HELLO world"
    );
    assert!(store
        .get_range("a/b/one", 5..5)
        .await
        .expect("empty range")
        .is_empty());
    assert!(
        store.get_range("a/b/one", 5..20).await.is_err(),
        "range past end must fail"
    );

    // Missing objects: NotFound naming the key.
    match store.get("a/missing").await {
        Err(e @ StoreError::NotFound { .. }) => assert_eq!(e.key(), "a/missing"),
        other => panic!("get of a missing object: {other:?}"),
    }
    assert!(store.get_range("a/missing", 0..1).await.is_err());

    // Create-if-absent.
    if store.honors_create_if_absent() {
        assert!(store
            .put_if_absent("c/x", Bytes::from_static(b"1"))
            .await
            .expect("pia"));
        assert!(!store
            .put_if_absent("c/x", Bytes::from_static(b"2"))
            .await
            .expect("pia 2"));
        assert_eq!(store.get("c/x").await.expect("get").as_ref(), b"1");
    } else {
        assert!(store
            .put_if_absent("c/x", Bytes::from_static(b"1"))
            .await
            .expect("pia"));
    }

    // Listing: sorted, by prefix, including partial component prefixes.
    store
        .put("a/b/two", Bytes::from_static(b"22"))
        .await
        .expect("put");
    store
        .put("a/c", Bytes::from_static(b"333"))
        .await
        .expect("put");
    store
        .put("ab/d", Bytes::from_static(b"4"))
        .await
        .expect("put");
    let keys = |v: Vec<crate::ObjectInfo>| v.into_iter().map(|o| o.key).collect::<Vec<_>>();
    assert_eq!(
        keys(store.list("a/").await.expect("list")),
        ["a/b/one", "a/b/two", "a/c"]
    );
    assert_eq!(keys(store.list("a/b/t").await.expect("list")), ["a/b/two"]);
    assert_eq!(
        keys(store.list("a").await.expect("list")),
        ["a/b/one", "a/b/two", "a/c", "ab/d"]
    );
    assert!(store.list("zz/").await.expect("list empty").is_empty());
    let sizes: Vec<u64> = store
        .list("a/")
        .await
        .expect("list")
        .iter()
        .map(|o| o.size)
        .collect();
    assert_eq!(sizes, [11, 2, 3]);

    // One level with a delimiter.
    assert_eq!(store.list_dirs("a/").await.expect("dirs"), ["b", "c"]);
    assert_eq!(store.list_dirs("").await.expect("dirs"), ["a", "ab", "c"]);
    assert!(store.list_dirs("nothing/").await.expect("dirs").is_empty());

    // Delete, idempotently.
    store.delete("a/c").await.expect("delete");
    store.delete("a/c").await.expect("delete again");
    assert_eq!(store.head("a/c").await.expect("head"), None);

    // Keys that could escape the store are refused.
    for bad in ["", "/abs", "a/../b", "a//b", "a/"] {
        assert!(
            store.put(bad, Bytes::new()).await.is_err(),
            "key {bad:?} accepted"
        );
    }

    // Large objects survive intact.
    let big: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
    store
        .put("big", Bytes::from(big.clone()))
        .await
        .expect("put big");
    assert_eq!(store.get("big").await.expect("get big").as_ref(), &big[..]);
    assert_eq!(
        store
            .get_range("big", 4_000_000..4_000_100)
            .await
            .expect("range big")
            .as_ref(),
        &big[4_000_000..4_000_100]
    );
}
