//! The bound on whole-file reads ([`MAX_CONCURRENT_READS`]), beside the disk tier so the
//! production file does not grow.

use super::*;

/// 200 gets at once on a store whose reads are slow: never more than the bound run at once,
/// the bound is reached (the permits are used, not serialised), and every get returns its
/// own bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_never_exceed_the_bound_and_each_returns_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path(), 64 << 20).unwrap();
    let store = Arc::new(store);
    let body = |i: usize| Bytes::from(format!("entry {i} ").repeat(100 + i));
    for i in 0..200 {
        store.put(&format!("obj/{i}"), Some("v1"), body(i)).await;
    }
    store.read_watch.delay_ms.store(20, Ordering::SeqCst);
    let gets: Vec<_> = (0..200)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { (i, store.get(&format!("obj/{i}"), Some("v1")).await) })
        })
        .collect();
    for g in gets {
        let (i, got) = g.await.unwrap();
        assert_eq!(got, Some(body(i)), "obj/{i}");
    }
    let peak = store.read_watch.peak.load(Ordering::SeqCst);
    assert!(
        peak <= MAX_CONCURRENT_READS,
        "{peak} reads ran at once, over the bound of {MAX_CONCURRENT_READS}"
    );
    // 200 reads of 20 ms each overlap: the bound is what held them back, not luck.
    assert!(peak > 1, "reads ran one at a time (peak {peak})");
    assert_eq!(store.read_watch.running.load(Ordering::SeqCst), 0);
    assert_eq!(store.reads.available_permits(), MAX_CONCURRENT_READS);
}

/// A get dropped while its read runs (a client gone) keeps its permit until the read ends:
/// the bound counts the blocking threads, not the futures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_get_holds_its_permit_until_its_read_ends() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path(), 1 << 20).unwrap();
    let store = Arc::new(store);
    store
        .put("a", Some("v"), Bytes::from_static(b"bytes"))
        .await;
    store.read_watch.gate.set(true);
    let get = tokio::spawn({
        let store = store.clone();
        async move { store.get("a", Some("v")).await }
    });
    while store.read_watch.running.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    get.abort();
    let _ = get.await;
    assert_eq!(
        store.reads.available_permits(),
        MAX_CONCURRENT_READS - 1,
        "the read still runs: its permit is held"
    );
    store.read_watch.gate.set(false);
    while store.read_watch.running.load(Ordering::SeqCst) > 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The permit goes with the read's end (just after the counter): wait for it.
    while store.reads.available_permits() < MAX_CONCURRENT_READS {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        store.get("a", Some("v")).await.as_deref(),
        Some(&b"bytes"[..])
    );
}
