//! Version and length guards (issue 21, points 2-4), seen from outside: an origin that answers
//! a revalidation with a 304 naming another version, one that sends a 206 longer than its
//! `Content-Range`, and objects without any validator changing under concurrent clients.
//!
//! Every test runs the real binary against the in-process origin; every byte a client gets is
//! checked against one version of the object, what is stored is checked by a later hit, and
//! the origin requests are counted from its log.

mod common;

use common::origin::{content, Fault, Origin};
use common::reply::{
    config, describe, get, get_range, get_whole, range, records_for, start, try_send, within, CHUNK,
};
use reqwest::StatusCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const TEST_LIMIT: Duration = Duration::from_secs(60);

/// Point 2: a revalidation answered by a 304 that carries the new version's ETag. RFC 9111
/// §4.3.4: it selects no stored response, so nothing is merged: the object is fetched again,
/// unconditionally, and the client (and every later hit) gets the new version whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_304_naming_another_version_is_not_merged_into_the_stored_one() {
    within(TEST_LIMIT, async {
        let origin = Origin::start().await;
        origin.set_cache_control(Some("max-age=1"));
        let proxy = start(config(&origin, "")).await;
        let size = 16 * CHUNK;
        let path = format!("/obj/{size}/flip304.bin");
        // GET and HEAD revalidate the same way.
        let head_path = format!("/obj/{size}/flip304-head.bin");
        get_whole(&proxy, &path, size, 0).await;
        get_whole(&proxy, &head_path, size, 0).await;
        let first = records_for(&origin, &path).len();
        assert_eq!(first, 1, "{:?}", describe(&records_for(&origin, &path)));

        // The origin changes to version 1 and answers every conditional with a 304 carrying
        // version 1's ETag.
        origin.set_etag_version(1);
        origin.set_fault(Fault::NotModifiedAnyway);
        tokio::time::sleep(Duration::from_millis(2100)).await;
        // Both stored objects are stale now. What the refetch stores stays fresh for the
        // checks below however long they take on a loaded machine (with max-age=1 a slow run
        // saw the new version stale again: `fwd=stale` where a hit was checked).
        origin.set_cache_control(Some("max-age=3600"));

        let r = get_whole(&proxy, &path, size, 1).await;
        assert_eq!(
            r.header("etag"),
            Some(common::origin::etag(&path, 1).as_str())
        );
        let recs = records_for(&origin, &path);
        assert_eq!(recs.len(), 3, "fill, 304, refetch: {:?}", describe(&recs));
        assert!(
            recs[1].header("if-none-match").is_some(),
            "{:?}",
            describe(&recs)
        );
        assert!(
            recs[2].header("if-none-match").is_none()
                && recs[2].header("if-modified-since").is_none(),
            "the refetch is unconditional: {:?}",
            describe(&recs)
        );
        // What is stored is version 1, whole.
        let r = get_whole(&proxy, &path, size, 1).await;
        assert_eq!(r.cache_status(), "edgeslice; hit");
        let r = get_range(&proxy, &path, 5 * CHUNK + 7, 9 * CHUNK, 1).await;
        assert_eq!(r.cache_status(), "edgeslice; hit");
        assert_eq!(records_for(&origin, &path).len(), 3);

        // HEAD: the same 304 drops the old version; the answer names the new one.
        let r = common::reply::send(common::reply::client().head(proxy.url(&head_path))).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.header("etag"),
            Some(common::origin::etag(&head_path, 1).as_str()),
            "HEAD after a 304 for another version"
        );
        get_whole(&proxy, &head_path, size, 1).await;
    })
    .await;
}

/// Point 3: a 206 whose body (chunked, no Content-Length) is longer than its Content-Range:
/// the whole object from byte 0 for a range further on. The fill fails, the client gets no
/// wrong byte, nothing of it is stored: once the origin behaves, the right bytes are served
/// and kept. On discovery and on a later chunk fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_206_longer_than_its_range_is_neither_served_nor_kept() {
    within(TEST_LIMIT, async {
        let origin = Origin::start().await;
        let proxy = start(config(&origin, "")).await;
        let size = 16 * CHUNK;
        for known in [false, true] {
            let path = format!("/obj/{size}/overlong-{known}.bin");
            if known {
                // The object is known (its chunk 0 stored) before the origin misbehaves.
                get_range(&proxy, &path, 0, 99, 0).await;
            }
            origin.set_fault(Fault::Overlong206);
            let (a, b) = (5 * CHUNK + 100, 5 * CHUNK + 1100);
            let before = records_for(&origin, &path).len();
            match try_send(range(&proxy, &path, a, b)).await {
                Err(e) => eprintln!("known {known}: aborted (expected): {e}"),
                Ok(r) => assert!(
                    r.status.is_server_error(),
                    "known {known}: {} with {} bytes, equal to the object's: {}",
                    r.status,
                    r.body.len(),
                    r.body == content(&path, 0, a..b + 1)
                ),
            }
            assert_eq!(records_for(&origin, &path).len(), before + 1);
            origin.clear_fault();
            // Nothing of it was kept: the right bytes now, from the origin, then a hit.
            get_range(&proxy, &path, a, b, 0).await;
            let r = get_range(&proxy, &path, a, b, 0).await;
            assert_eq!(r.cache_status(), "edgeslice; hit", "known {known}");
            get_whole(&proxy, &path, size, 0).await;
        }
    })
    .await;
}

/// Point 4: an object without ETag or Last-Modified whose content flips between two versions
/// of the same length while many clients fetch ranges of it (max-age=1, so it is fetched
/// again and again). Such an object is fetched whole and served from that one fetch: no
/// response mixes versions, and neither does what is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validatorless_objects_never_mix_versions_under_concurrent_changes() {
    within(TEST_LIMIT, async {
        let origin = Arc::new(Origin::start().await);
        origin.set_fault(Fault::NoValidators { size: None });
        origin.set_cache_control(Some("max-age=1"));
        let proxy = Arc::new(start(config(&origin, "")).await);
        let size = 40 * CHUNK + 123;
        let path = format!("/obj/{size}/noval-flip.bin");
        let stop = Arc::new(AtomicBool::new(false));
        let flipper = {
            let (origin, stop) = (origin.clone(), stop.clone());
            tokio::spawn(async move {
                let mut v = 0;
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(37)).await;
                    v = 1 - v;
                    origin.set_etag_version(v);
                }
            })
        };
        let (checked, mixed, failed) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let mut clients = Vec::new();
        for c in 0..12u64 {
            let (proxy, path) = (proxy.clone(), path.clone());
            let (checked, mixed, failed) = (checked.clone(), mixed.clone(), failed.clone());
            clients.push(tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                let mut i = c;
                while tokio::time::Instant::now() < deadline {
                    i = i
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    let a = (i >> 20) % size;
                    let b = (a + (i >> 40) % (6 * CHUNK)).min(size - 1);
                    match try_send(range(&proxy, &path, a, b)).await {
                        Ok(r) if r.status == StatusCode::PARTIAL_CONTENT => {
                            checked.fetch_add(1, Ordering::Relaxed);
                            let one = (0..2).any(|v| r.body == content(&path, v, a..b + 1));
                            if !one {
                                mixed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        for c in clients {
            c.await.unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        flipper.await.unwrap();
        let (checked, mixed, failed) = (
            checked.load(Ordering::Relaxed),
            mixed.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
        );
        eprintln!(
            "{checked} ranges checked, {mixed} mixed, {failed} failed; {} origin requests",
            records_for(&origin, &path).len()
        );
        assert!(checked >= 100, "too few responses checked: {checked}");
        assert_eq!(mixed, 0, "responses mixing two versions");
        assert!(failed * 20 <= checked, "failures: {failed} of {checked}");

        // What is stored is one version: whole GETs until one is a hit, each one version.
        let mut hit = false;
        for _ in 0..3 {
            let r = try_send(get(&proxy, &path)).await.expect("whole GET");
            assert_eq!(r.status, StatusCode::OK);
            let one = (0..2).any(|v| r.body == content(&path, v, 0..size));
            assert!(
                one,
                "a stored object mixing versions ({})",
                r.cache_status()
            );
            hit |= r.cache_status() == "edgeslice; hit";
            if hit {
                break;
            }
        }
        assert!(hit, "the whole object is served from the cache");
    })
    .await;
}
