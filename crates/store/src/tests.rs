//! The conformance suite against the local and in-memory stores, and the fault wrapper.

use super::*;

#[tokio::test]
async fn memory_conforms() {
    conformance::run(&MemoryStore::new()).await;
}

#[tokio::test]
async fn local_conforms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::open(dir.path()).expect("open");
    conformance::run(&store).await;
    // Nothing is left behind in the temporary directory.
    let tmp: Vec<_> = std::fs::read_dir(dir.path().join(".tmp"))
        .expect("tmp")
        .collect();
    assert!(tmp.is_empty());
}

#[tokio::test]
async fn faulty_passes_through_and_fails_on_demand() {
    let store = FaultyStore::new(Arc::new(MemoryStore::new()));
    conformance::run(&store).await;
    store.heal();
    let before = store.writes();
    store.inject(Fault::FailWritesAfter(before + 1));
    store
        .put("k1", Bytes::from_static(b"1"))
        .await
        .expect("first write passes");
    let err = store
        .put("k2", Bytes::from_static(b"2"))
        .await
        .expect_err("second fails");
    assert_eq!(err.key(), "k2");
    assert!(store.tripped());
    store.heal();
    store.inject(Fault::FailReadsOf("k1".into()));
    assert!(store.get("k1").await.is_err());
    store.inject(Fault::Offline);
    assert!(store.list("").await.is_err());
}
