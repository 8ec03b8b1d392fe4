//! RFC 9111 conformance seen from outside: storage without validators, heuristic freshness,
//! uncacheable misses, status codes, broken origin answers, request directives,
//! `stale-while-revalidate`, `Vary`, response directives (RFC 9213 targeted fields) and 304
//! header updates.
//!
//! Every test runs the real binary against the in-process origin and asserts both the origin
//! requests made (from the origin's log, filtered by path) and the exact bytes served.

mod common;

use common::origin::{content, Fault, Origin, RequestRecord};
use common::proxy::Proxy;
use common::reply::{
    config, describe, get, get_range, get_whole, range, records_for, send, start, try_send,
    wait_records, within, Reply, CHUNK,
};
use reqwest::StatusCode;
use std::future::Future;
use std::time::{Duration, Instant};

/// Upper bound on every test.
const TEST_LIMIT: Duration = Duration::from_secs(40);
/// Long enough for a `max-age=1` response to be stale.
const EXPIRY_WAIT: Duration = Duration::from_millis(2000);

async fn bounded<F: Future<Output = ()>>(body: F) {
    within(TEST_LIMIT, body).await
}

fn is_conditional(r: &RequestRecord) -> bool {
    r.header("if-none-match").is_some() || r.header("if-modified-since").is_some()
}

/// Assert exactly `n` origin requests for `path`.
fn assert_origin(origin: &Origin, path: &str, n: usize, what: &str) {
    let recs = records_for(origin, path);
    assert_eq!(
        recs.len(),
        n,
        "{what}: origin requests for {path}: {:?}",
        describe(&recs)
    );
}

// ---------------------------------------------------------------------------------------------
// 1. Storage without validators
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validatorless_object_is_stored_and_hit() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_fault(Fault::NoValidators { size: None });
        let proxy = start(config(&origin, "")).await;
        let size = 3 * CHUNK;
        let path = format!("/obj/{size}/noval.bin");
        let r = get_whole(&proxy, &path, size, 0).await;
        assert!(r.header("etag").is_none() && r.header("last-modified").is_none());
        assert!(
            r.cache_status().contains("fwd=miss"),
            "first: {}",
            r.cache_status()
        );
        let r = get_whole(&proxy, &path, size, 0).await;
        assert_eq!(r.cache_status(), "edgeslice; hit");
        assert_origin(&origin, &path, 1, "validator-less object");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validatorless_multi_run_object_is_fetched_whole_once() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_fault(Fault::NoValidators { size: None });
        let proxy = start(config(&origin, "")).await;
        let size = 20 * CHUNK + 5;
        let path = format!("/obj/{size}/noval-big.bin");
        // A range of the first chunk: the 206 names no version, so the object is fetched
        // whole (no chunk of it is ever assembled from another fetch).
        get_range(&proxy, &path, 10, 109, 0).await;
        let recs = records_for(&origin, &path);
        assert_eq!(recs.len(), 2, "{:?}", describe(&recs));
        assert!(recs[1].header("range").is_none(), "{:?}", describe(&recs));
        // A chunk far beyond the first range: from that one fetch, no range request.
        let (a, b) = (18 * CHUNK + 3, 18 * CHUNK + 1003);
        get_range(&proxy, &path, a, b, 0).await;
        let r = get_range(&proxy, &path, a, b, 0).await;
        assert_eq!(
            r.cache_status(),
            "edgeslice; hit",
            "repeat of a later chunk"
        );
        let r = get_whole(&proxy, &path, size, 0).await;
        assert_eq!(r.cache_status(), "edgeslice; hit");
        assert_origin(&origin, &path, 2, "one whole fetch after the first range");
    })
    .await;
}

/// Check a reply is an error or exactly one version of the object (range `a..b` of a version
/// whose total size is `sizes[v]`).
fn one_version(
    what: &str,
    r: Result<Reply, String>,
    path: &str,
    a: u64,
    b: Option<u64>,
    sizes: [u64; 2],
) {
    let r = match r {
        Err(e) => {
            eprintln!("{what}: error (acceptable): {e}");
            return;
        }
        Ok(r) => r,
    };
    if r.status.is_server_error() {
        eprintln!(
            "{what}: {} (acceptable), cache-status {}",
            r.status,
            r.cache_status()
        );
        return;
    }
    let matched = (0..2u32).find(|&v| {
        let size = sizes[v as usize];
        let end = b.map_or(size, |b| (b + 1).min(size));
        r.body == content(path, v, a..end)
    });
    if let Some(v) = matched {
        eprintln!(
            "{what}: {} version {v}, cache-status {:?}",
            r.status,
            r.cache_status()
        );
    }
    let ok = matched.is_some();
    assert!(
        ok,
        "{what}: status {}, {} bytes, cache-status {:?}: bytes are neither version 0 ({} bytes) nor version 1 ({} bytes): mixed",
        r.status,
        r.body.len(),
        r.cache_status(),
        sizes[0],
        sizes[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validatorless_length_change_never_mixes_versions() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_fault(Fault::NoValidators { size: None });
        let proxy = start(config(&origin, "")).await;
        let size = 20 * CHUNK + 5;
        let new_size = size + 1000;
        let path = format!("/obj/{size}/noval-change.bin");
        get_range(&proxy, &path, 0, 99, 0).await;
        // The object changes (length and content) at the origin.
        origin.set_etag_version(1);
        origin.set_fault(Fault::NoValidators {
            size: Some(new_size),
        });
        let (a, b) = (18 * CHUNK, 18 * CHUNK + 999);
        let r = try_send(range(&proxy, &path, a, b)).await;
        one_version(
            "later range after change",
            r,
            &path,
            a,
            Some(b),
            [size, new_size],
        );
        let r = try_send(get(&proxy, &path)).await;
        if let Ok(r) = &r {
            if r.status == StatusCode::OK {
                assert!(
                    r.body.len() as u64 == size || r.body.len() as u64 == new_size,
                    "whole GET after change: {} bytes",
                    r.body.len()
                );
            }
        }
        one_version(
            "whole GET after change",
            r,
            &path,
            0,
            None,
            [size, new_size],
        );
        let r = try_send(get(&proxy, &path)).await;
        one_version(
            "second whole GET after change",
            r,
            &path,
            0,
            None,
            [size, new_size],
        );
        assert!(
            !records_for(&origin, &path).is_empty(),
            "the origin was asked"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validatorless_expiry_refetches_unconditionally() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_fault(Fault::NoValidators { size: None });
        origin.set_cache_control(Some("max-age=1"));
        let proxy = start(config(&origin, "")).await;
        let size = 2 * CHUNK + 17;
        let path = format!("/obj/{size}/noval-exp.bin");
        get_whole(&proxy, &path, size, 0).await;
        assert_origin(&origin, &path, 1, "fill");
        tokio::time::sleep(EXPIRY_WAIT).await;
        get_whole(&proxy, &path, size, 0).await;
        let recs = records_for(&origin, &path);
        assert_eq!(recs.len(), 2, "refetch: {:?}", describe(&recs));
        assert!(
            !is_conditional(&recs[1]),
            "no validator, yet the refetch is conditional: {:?}",
            describe(&recs)
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2. Heuristic freshness
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heuristic_freshness_from_last_modified() {
    bounded(async {
        let origin = Origin::start().await;
        // Last-Modified is in 2015: 10% of its age is far above heuristic_max (1 day).
        origin.set_cache_control(None);
        let proxy = start(config(&origin, "")).await;
        let size = 3 * CHUNK + 9;
        let path = format!("/obj/{size}/heur.bin");
        let r = get_range(&proxy, &path, 1000, 1999, 0).await;
        assert!(r.cache_status().contains("stored"), "{}", r.cache_status());
        let r = get_range(&proxy, &path, 1000, 1999, 0).await;
        assert_eq!(r.cache_status(), "edgeslice; hit");
        assert_origin(&origin, &path, 1, "heuristically fresh");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heuristic_fraction_zero_is_not_stored() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_cache_control(None);
        let proxy = start(config(&origin, "  heuristic_fraction: 0\n")).await;
        let size = 3 * CHUNK + 9;
        let path = format!("/obj/{size}/heur0.bin");
        get_range(&proxy, &path, 1000, 1999, 0).await;
        let r = get_range(&proxy, &path, 1000, 1999, 0).await;
        assert!(!r.cache_status().contains("hit"), "{}", r.cache_status());
        assert_origin(&origin, &path, 2, "heuristics off");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 3. Uncacheable misses: one origin request per run, no extra bytes
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_store_miss_costs_one_request_per_run() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_cache_control(Some("no-store"));
        let proxy = start(config(&origin, "")).await;
        let size = 20 * CHUNK;
        let path = format!("/obj/{size}/nostore.bin");
        get_whole(&proxy, &path, size, 0).await;
        assert_eq!(
            origin.body_bytes_sent(),
            size,
            "origin body bytes for one whole GET: {:?}",
            describe(&records_for(&origin, &path))
        );
        assert_origin(&origin, &path, 2, "whole no-store GET (16 chunks, then 4)");

        let path2 = format!("/obj/{size}/nostore-range.bin");
        let r = get_range(&proxy, &path2, 5 * CHUNK + 10, 5 * CHUNK + 4009, 0).await;
        assert!(!r.cache_status().contains("hit"), "{}", r.cache_status());
        assert_origin(&origin, &path2, 1, "range in one chunk");
        let r = get_range(&proxy, &path2, 5 * CHUNK + 10, 5 * CHUNK + 4009, 0).await;
        assert!(
            r.cache_status().contains("fwd=bypass"),
            "second request should be hit-for-pass, got {:?}",
            r.cache_status()
        );
        assert_origin(&origin, &path2, 2, "hit-for-pass range");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 4. Statuses
// ---------------------------------------------------------------------------------------------

async fn assert_status_stored(origin: &Origin, proxy: &Proxy, path: &str, code: u16) -> Reply {
    let first = send(get(proxy, path)).await;
    assert_eq!(first.status.as_u16(), code, "{path} first");
    let expected = format!("status {code} for {path}\n");
    assert_eq!(String::from_utf8_lossy(&first.body), expected);
    let second = send(get(proxy, path)).await;
    assert_eq!(second.status.as_u16(), code, "{path} second");
    assert_eq!(String::from_utf8_lossy(&second.body), expected);
    assert_eq!(
        second.cache_status(),
        "edgeslice; hit",
        "{path}: first cache-status {:?}",
        first.cache_status()
    );
    assert_origin(origin, path, 1, &format!("{code} with max-age"));
    second
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_and_redirect_statuses_with_freshness_are_stored() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_extra_header("Cache-Control", "max-age=60");
        let proxy = start(config(&origin, "")).await;
        assert_status_stored(&origin, &proxy, "/status/404/missing", 404).await;

        origin.set_extra_header("Location", "/elsewhere");
        let r = assert_status_stored(&origin, &proxy, "/status/301/moved", 301).await;
        assert_eq!(r.header("location"), Some("/elsewhere"));
        origin.remove_extra_header("Location");

        assert_status_stored(&origin, &proxy, "/status/500/explicit", 500).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_500_without_freshness_is_not_stored() {
    bounded(async {
        let origin = Origin::start().await;
        let proxy = start(config(&origin, "")).await;
        let path = "/status/500/plain";
        for i in 0..2 {
            let r = send(get(&proxy, path)).await;
            assert_eq!(r.status.as_u16(), 500, "#{i}");
            assert_eq!(
                String::from_utf8_lossy(&r.body),
                format!("status 500 for {path}\n")
            );
            assert!(!r.cache_status().contains("hit"), "{}", r.cache_status());
        }
        assert_origin(&origin, path, 2, "500 without freshness");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 5. Broken origin answers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_206_contradicting_content_range_is_502_and_not_stored() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_fault(Fault::Broken206);
        let proxy = start(config(&origin, "")).await;
        let size = 20 * CHUNK;
        let path = format!("/obj/{size}/broken206.bin");
        for (what, req) in [
            ("range", range(&proxy, &path, 0, 9999)),
            ("whole", get(&proxy, &path)),
        ] {
            match try_send(req).await {
                Err(e) => panic!("{what}: the client got a broken response: {e}"),
                Ok(r) if r.status == StatusCode::BAD_GATEWAY => {
                    eprintln!(
                        "broken 206, {what}: 502, cache-status {:?}",
                        r.cache_status()
                    );
                }
                Ok(r) => {
                    let expect = if what == "range" {
                        content(&path, 0, 0..10_000)
                    } else {
                        content(&path, 0, 0..size)
                    };
                    assert!(
                        r.body == expect,
                        "{what}: status {} with {} wrong bytes, cache-status {:?}",
                        r.status,
                        r.body.len(),
                        r.cache_status()
                    );
                }
            }
        }
        let before = records_for(&origin, &path).len();
        assert!(before >= 2, "{:?}", describe(&records_for(&origin, &path)));
        origin.clear_fault();
        get_range(&proxy, &path, 0, 9999, 0).await;
        assert!(
            records_for(&origin, &path).len() > before,
            "after a broken 206 the next request was answered from cache: {:?}",
            describe(&records_for(&origin, &path))
        );
    })
    .await;
}

/// The origin answers every GET with `206 bytes 0-99/<size>`, whatever was asked. A client
/// that sent no `Range` must never get that 206; it gets a 502, or a 200 whose bytes are all
/// correct (a 200 whose body is cut short is reported, not accepted). Afterwards, with a sane
/// origin, the object is served exactly: the 100 bytes kept did not poison the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrequested_206_is_never_relayed_as_is() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_fault(Fault::Always206);
        let proxy = start(config(&origin, "")).await;
        let size = 3 * CHUNK;
        let path = format!("/obj/{size}/always206.bin");
        let outcome = try_send(get(&proxy, &path)).await;
        let log = describe(&records_for(&origin, &path));
        origin.clear_fault();
        // Whatever happened, the cache is not poisoned.
        get_whole(&proxy, &path, size, 0).await;
        get_range(&proxy, &path, 50, 70_000, 0).await;
        match outcome {
            // The first answer (bytes 0-99 of the object) is a legal short partial answer,
            // so a 200 is under way when the later answers contradict it: the response is cut
            // off (the client sees an error), never completed with a wrong byte.
            Err(_) => {}
            Ok(r) => {
                assert_ne!(
                    r.status,
                    StatusCode::PARTIAL_CONTENT,
                    "a 206 answered a request without Range; cache-status {:?}; origin: {log:?}",
                    r.cache_status(),
                );
                if r.status == StatusCode::OK {
                    assert!(r.body == content(&path, 0, 0..size), "200 with wrong bytes");
                } else {
                    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.cache_status());
                }
            }
        }
        assert!(!log.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsolicited_304_is_502() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_fault(Fault::Status(304));
        let proxy = start(config(&origin, "")).await;
        let path = format!("/obj/{}/unsolicited304.bin", 3 * CHUNK);
        let r = send(get(&proxy, &path)).await;
        assert_eq!(
            r.status,
            StatusCode::BAD_GATEWAY,
            "cache-status {:?}; origin: {:?}",
            r.cache_status(),
            describe(&records_for(&origin, &path))
        );
        assert!(!records_for(&origin, &path).is_empty());
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 6. Request directives
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_if_cached() {
    bounded(async {
        let origin = Origin::start().await;
        let proxy = start(config(&origin, "")).await;
        let size = 2 * CHUNK + 1;
        let path = format!("/obj/{size}/oic.bin");
        let r = send(get(&proxy, &path).header("cache-control", "only-if-cached")).await;
        assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
        assert_origin(&origin, &path, 0, "only-if-cached on a cold object");
        get_whole(&proxy, &path, size, 0).await;
        assert_origin(&origin, &path, 1, "fill");
        let r = send(get(&proxy, &path).header("cache-control", "only-if-cached")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.body == content(&path, 0, 0..size));
        assert_eq!(r.cache_status(), "edgeslice; hit");
        assert_origin(&origin, &path, 1, "only-if-cached on a cached object");
    })
    .await;
}

/// `Cache-Control: max-age=0` on a fresh copy `age` old: revalidated with the origin, bytes
/// exact.
async fn max_age_zero_revalidates(name: &str, age: Duration) {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_cache_control(Some("max-age=60"));
        let proxy = start(config(&origin, "")).await;
        let size = 2 * CHUNK + 1;
        let path = format!("/obj/{size}/{name}");
        get_whole(&proxy, &path, size, 0).await;
        tokio::time::sleep(age).await;
        let r = send(get(&proxy, &path).header("cache-control", "max-age=0")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.body == content(&path, 0, 0..size));
        let recs = records_for(&origin, &path);
        assert!(
            r.cache_status().contains("fwd=request"),
            "request max-age=0 on a fresh object {age:?} old: cache-status {:?}, origin: {:?}",
            r.cache_status(),
            describe(&recs)
        );
        assert_eq!(recs.len(), 2, "{:?}", describe(&recs));
        assert!(
            recs[1].header("if-none-match").is_some(),
            "{:?}",
            describe(&recs)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_max_age_zero_revalidates() {
    max_age_zero_revalidates("reqmaxage.bin", Duration::ZERO).await;
}

/// The same with a copy at least one second old: `age > 0` even with whole-second ages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_max_age_zero_revalidates_one_second_old_copy() {
    max_age_zero_revalidates("reqmaxage-1s.bin", Duration::from_millis(1100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_min_fresh_revalidates() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_cache_control(Some("max-age=60"));
        let proxy = start(config(&origin, "")).await;
        let size = 2 * CHUNK + 1;
        let path = format!("/obj/{size}/minfresh.bin");
        get_whole(&proxy, &path, size, 0).await;
        let r = send(get(&proxy, &path).header("cache-control", "min-fresh=1000")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.body == content(&path, 0, 0..size));
        let recs = records_for(&origin, &path);
        assert_eq!(
            recs.len(),
            2,
            "min-fresh=1000 (cache-status {:?}): {:?}",
            r.cache_status(),
            describe(&recs)
        );
        assert!(is_conditional(&recs[1]), "{:?}", describe(&recs));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_max_stale_serves_expired_copy() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_cache_control(Some("max-age=1"));
        let proxy = start(config(&origin, "")).await;
        let size = 2 * CHUNK + 1;
        let path = format!("/obj/{size}/maxstale.bin");
        get_whole(&proxy, &path, size, 0).await;
        tokio::time::sleep(EXPIRY_WAIT).await;
        let r = send(get(&proxy, &path).header("cache-control", "max-stale=100")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.body == content(&path, 0, 0..size));
        assert_eq!(r.cache_status(), "edgeslice; hit; detail=max-stale");
        assert_origin(&origin, &path, 1, "max-stale");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 7. stale-while-revalidate
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_one_background_request() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_cache_control(Some("max-age=1, stale-while-revalidate=30"));
        let proxy = start(config(&origin, "")).await;
        let size = 2 * CHUNK + 1;
        let path = format!("/obj/{size}/swr.bin");
        let path5 = format!("/obj/{size}/swr5.bin");
        get_whole(&proxy, &path, size, 0).await;
        get_whole(&proxy, &path5, size, 0).await;
        tokio::time::sleep(EXPIRY_WAIT).await;

        let t = Instant::now();
        let r = get_whole(&proxy, &path, size, 0).await;
        assert_eq!(
            r.cache_status(),
            "edgeslice; hit; detail=stale-while-revalidate"
        );
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert!(
            wait_records(&origin, &path, 2, Duration::from_secs(3)).await,
            "no background revalidation: {:?}",
            describe(&records_for(&origin, &path))
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let recs = records_for(&origin, &path);
        assert_eq!(recs.len(), 2, "{:?}", describe(&recs));
        assert!(is_conditional(&recs[1]), "{:?}", describe(&recs));

        // Five at once: one background revalidation.
        let reqs: Vec<_> = (0..5).map(|_| send(get(&proxy, &path5))).collect();
        let replies = futures_join(reqs).await;
        for r in &replies {
            assert_eq!(r.status, StatusCode::OK);
            assert!(r.body == content(&path5, 0, 0..size));
            let cs = r.cache_status();
            assert!(
                cs == "edgeslice; hit; detail=stale-while-revalidate" || cs == "edgeslice; hit",
                "{cs}"
            );
        }
        assert!(
            replies
                .iter()
                .any(|r| r.cache_status().contains("stale-while-revalidate")),
            "none served stale"
        );
        wait_records(&origin, &path5, 2, Duration::from_secs(3)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let recs = records_for(&origin, &path5);
        assert_eq!(recs.len(), 2, "5 concurrent: {:?}", describe(&recs));
        assert!(is_conditional(&recs[1]), "{:?}", describe(&recs));
    })
    .await;
}

/// Run futures concurrently on the runtime and collect their outputs in order.
async fn futures_join<F>(futs: Vec<F>) -> Vec<Reply>
where
    F: Future<Output = Reply> + Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 8. Vary
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_selects_variants() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_extra_header("Vary", "X-Variant");
        let proxy = start(config(&origin, "")).await;
        let size = 2 * CHUNK + 1;
        let path = format!("/obj/{size}/vary.bin");
        let mut statuses = Vec::new();
        for v in ["a", "b", "a"] {
            let r = send(get(&proxy, &path).header("x-variant", v)).await;
            assert_eq!(r.status, StatusCode::OK);
            assert!(r.body == content(&path, 0, 0..size));
            statuses.push(r.cache_status().to_string());
        }
        assert!(statuses[0].contains("fwd=miss"), "{statuses:?}");
        assert!(statuses[1].contains("fwd=miss"), "{statuses:?}");
        assert_eq!(statuses[2], "edgeslice; hit", "{statuses:?}");
        let recs = records_for(&origin, &path);
        assert_eq!(recs.len(), 2, "{:?}", describe(&recs));
        assert_eq!(recs[0].header("x-variant"), Some("a"));
        assert_eq!(recs[1].header("x-variant"), Some("b"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_star_is_not_stored_and_vary_cookie_never_answers_a_cookie() {
    bounded(async {
        let origin = Origin::start().await;
        let proxy = start(config(&origin, "")).await;
        let size = 2 * CHUNK + 1;
        for (vary, name) in [("*", "star"), ("Cookie", "cookie")] {
            origin.set_extra_header("Vary", vary);
            let path = format!("/obj/{size}/vary-{name}.bin");
            for _ in 0..2 {
                let r = send(get(&proxy, &path).header("cookie", "s=1")).await;
                assert_eq!(r.status, StatusCode::OK);
                assert!(r.body == content(&path, 0, 0..size));
                assert!(
                    !r.cache_status().contains("hit"),
                    "Vary: {vary}: {}",
                    r.cache_status()
                );
            }
            // Each request with a cookie reached the origin with it. (The first `Vary: Cookie`
            // request also stored the cookieless variant: the fill that learnt the Vary.)
            let with_cookie = records_for(&origin, &path)
                .iter()
                .filter(|r| r.header("cookie") == Some("s=1"))
                .count();
            assert_eq!(with_cookie, 2, "Vary: {vary}");
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 9. Response Cache-Control
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s_maxage_wins_for_shared_cache_and_private_is_not_stored() {
    bounded(async {
        let origin = Origin::start().await;
        let proxy = start(config(&origin, "")).await;
        let size = 2 * CHUNK + 1;
        origin.set_cache_control(Some("s-maxage=60, max-age=0"));
        let path = format!("/obj/{size}/smaxage.bin");
        get_whole(&proxy, &path, size, 0).await;
        let r = get_whole(&proxy, &path, size, 0).await;
        assert_eq!(r.cache_status(), "edgeslice; hit");
        assert_origin(&origin, &path, 1, "s-maxage");

        origin.set_cache_control(Some("private, max-age=60"));
        let path = format!("/obj/{size}/private.bin");
        get_whole(&proxy, &path, size, 0).await;
        let r = get_whole(&proxy, &path, size, 0).await;
        assert!(!r.cache_status().contains("hit"), "{}", r.cache_status());
        assert_origin(&origin, &path, 2, "private");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_no_cache_is_revalidated_on_each_use() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_cache_control(Some("no-cache, max-age=60"));
        let proxy = start(config(&origin, "")).await;
        let size = 2 * CHUNK + 1;
        let path = format!("/obj/{size}/nocache.bin");
        get_whole(&proxy, &path, size, 0).await;
        for i in 0..2 {
            let r = get_whole(&proxy, &path, size, 0).await;
            assert!(
                r.cache_status().contains("fwd-status=304"),
                "use #{i}: {}",
                r.cache_status()
            );
        }
        let recs = records_for(&origin, &path);
        assert_eq!(recs.len(), 3, "{:?}", describe(&recs));
        assert!(!is_conditional(&recs[0]), "{:?}", describe(&recs));
        assert!(
            recs[1].header("if-none-match").is_some() && recs[2].header("if-none-match").is_some(),
            "{:?}",
            describe(&recs)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targeted_cache_control_fields() {
    bounded(async {
        let origin = Origin::start().await;
        let proxy = start(config(&origin, "")).await;
        let size = 2 * CHUNK + 1;

        // CDN-Cache-Control overrides Cache-Control: no-store.
        origin.set_cache_control(Some("no-store"));
        origin.set_extra_header("CDN-Cache-Control", "max-age=60");
        let path = format!("/obj/{size}/cdncc.bin");
        get_whole(&proxy, &path, size, 0).await;
        let r = get_whole(&proxy, &path, size, 0).await;
        assert_eq!(r.cache_status(), "edgeslice; hit");
        assert_origin(&origin, &path, 1, "CDN-Cache-Control: max-age=60");

        // Edgeslice-Cache-Control overrides CDN-Cache-Control.
        origin.set_cache_control(Some("max-age=3600"));
        origin.set_extra_header("Edgeslice-Cache-Control", "no-store");
        let path = format!("/obj/{size}/escc.bin");
        get_whole(&proxy, &path, size, 0).await;
        let r = get_whole(&proxy, &path, size, 0).await;
        assert!(!r.cache_status().contains("hit"), "{}", r.cache_status());
        assert_origin(&origin, &path, 2, "Edgeslice-Cache-Control: no-store");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 10. 304 updates stored headers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_modified_updates_stored_headers() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_cache_control(Some("max-age=1"));
        origin.set_extra_header("X-Extra", "1");
        let proxy = start(config(&origin, "")).await;
        let size = 2 * CHUNK + 1;
        let path = format!("/obj/{size}/update304.bin");
        let r = get_whole(&proxy, &path, size, 0).await;
        assert_eq!(r.header("x-extra"), Some("1"));
        origin.set_extra_header("X-Extra", "2");
        tokio::time::sleep(EXPIRY_WAIT).await;
        let r = get_whole(&proxy, &path, size, 0).await;
        assert!(
            r.cache_status().contains("fwd-status=304"),
            "{}",
            r.cache_status()
        );
        assert_eq!(r.header("x-extra"), Some("2"), "served after the 304");
        let recs = records_for(&origin, &path);
        assert_eq!(recs.len(), 2, "{:?}", describe(&recs));
        assert!(recs[1].header("if-none-match").is_some());
        let r = get_whole(&proxy, &path, size, 0).await;
        assert_eq!(r.cache_status(), "edgeslice; hit");
        assert_eq!(r.header("x-extra"), Some("2"), "hit after the 304");
        assert_origin(&origin, &path, 2, "hit after the 304");
    })
    .await;
}
