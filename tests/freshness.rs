//! HTTP caching semantics seen from outside (RFC 9111, RFC 9211 `Cache-Status`): freshness from
//! `max-age` / `Expires` / `cache.default_ttl`, revalidation of stale objects with
//! `If-None-Match` (304 keeps the chunks, a changed object is fetched anew), `Age`, responses
//! that must not be stored, requests with `Authorization` or `Cache-Control: no-cache`,
//! pass-through of unsafe methods on a caching route, and HEAD on a cold object.
//!
//! Every test runs the real binary against the in-process origin on loopback, with
//! `chunk_size: 64KiB`, and compares every body with the origin's deterministic bytes.

mod common;

use common::origin::{content, etag, http_date, Origin};
use common::proxy::Proxy;
use common::reply::{config, describe, get, get_whole, records_for, send, start, within, CHUNK};
use reqwest::StatusCode;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Upper bound on every test.
const TEST_LIMIT: Duration = Duration::from_secs(30);
/// Long enough for a `max-age=1` response to be stale.
const EXPIRY_WAIT: Duration = Duration::from_millis(1500);

/// Run a test body, failing it if it takes longer than [`TEST_LIMIT`].
async fn bounded<F: Future<Output = ()>>(body: F) {
    within(TEST_LIMIT, body).await
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Request `path` (whole, then a range, alternately) `times` times and check every request
/// reaches the origin, the bytes are exact and the response does not claim to be a hit or
/// stored.
async fn assert_not_stored(origin: &Origin, proxy: &Proxy, path: &str, size: u64, times: usize) {
    for i in 0..times {
        let before = origin.requests();
        let r = if i % 2 == 0 {
            get_whole(proxy, path, size, 0).await
        } else {
            let (a, b) = (CHUNK + 10, 2 * CHUNK + 9);
            let r = send(get(proxy, path).header("range", format!("bytes={a}-{b}"))).await;
            assert_eq!(r.status, StatusCode::PARTIAL_CONTENT, "{path} #{i}");
            assert!(
                r.body == content(path, 0, a..b + 1),
                "{path} #{i}: range bytes"
            );
            r
        };
        assert!(
            origin.requests() > before,
            "{path} request #{i} was answered without reaching the origin (cache-status {:?}); origin log: {:?}",
            r.cache_status(),
            describe(&origin.log())
        );
        let cs = r.cache_status();
        assert!(
            !cs.contains("hit") && !cs.contains("stored"),
            "{path} #{i}: a response that is not stored has cache-status {cs:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 1. max-age: hits while fresh, revalidation with If-None-Match after expiry
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_object_is_a_hit_without_origin_request() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_cache_control(Some("max-age=60"));
        let proxy = start(config(&origin, "")).await;
        let size = 3 * CHUNK + 77;
        let path = format!("/obj/{size}/fresh.bin");
        get_whole(&proxy, &path, size, 0).await;
        let after_fill = origin.requests();
        assert!(after_fill >= 1);
        for _ in 0..3 {
            let r = get_whole(&proxy, &path, size, 0).await;
            assert_eq!(r.cache_status(), "edgeslice; hit");
            assert_eq!(r.header("cache-control"), Some("max-age=60"));
            assert!(r.age().is_some(), "a hit carries Age");
        }
        let r = send(get(&proxy, &path).header("range", "bytes=100-199")).await;
        assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
        assert!(r.body == content(&path, 0, 100..200));
        assert_eq!(r.cache_status(), "edgeslice; hit");
        assert_eq!(
            origin.requests(),
            after_fill,
            "fresh repeats reached the origin: {:?}",
            describe(&origin.log())
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_object_is_revalidated_with_if_none_match_and_304_keeps_chunks() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_cache_control(Some("max-age=1"));
        let proxy = start(config(&origin, "")).await;
        let size = 3 * CHUNK + 1234;
        let path = format!("/obj/{size}/revalidate.bin");
        let first = get_whole(&proxy, &path, size, 0).await;
        assert_eq!(first.cache_status(), "edgeslice; fwd=miss; stored");
        // A second object, fresh for longer, shows Age growing while it sits in the cache.
        origin.set_cache_control(Some("max-age=60"));
        let long = format!("/obj/{size}/revalidate-long.bin");
        get_whole(&proxy, &long, size, 0).await;
        tokio::time::sleep(EXPIRY_WAIT).await;
        let r = get_whole(&proxy, &long, size, 0).await;
        assert_eq!(r.cache_status(), "edgeslice; hit");
        let age = r.age().expect("Age on a hit");
        assert!(age >= 1, "Age {age} after 1.5 s in the cache");

        // The origin's 304 carries a longer max-age: the refreshed TTL comes from it.
        origin.reset_stats();
        let r = get_whole(&proxy, &path, size, 0).await;
        let log = origin.log();
        assert_eq!(
            log.len(),
            1,
            "one revalidation request: {:?}",
            describe(&log)
        );
        let tag = etag(&path, 0);
        assert_eq!(
            log[0].header("if-none-match"),
            Some(tag.as_str()),
            "revalidation is conditional on the stored ETag: {:?}",
            describe(&log)
        );
        assert!(
            origin.body_bytes_sent() <= 1,
            "a 304 keeps the chunks; origin sent {} body bytes",
            origin.body_bytes_sent()
        );
        assert!(
            r.cache_status().contains("fwd=stale; fwd-status=304"),
            "cache-status after revalidation: {:?}",
            r.cache_status()
        );
        assert_eq!(r.header("etag"), Some(tag.as_str()));
        assert_eq!(
            r.header("cache-control"),
            Some("max-age=60"),
            "the 304's Cache-Control replaces the stored one"
        );

        // The TTL was refreshed: an immediate repeat is a hit and costs nothing.
        let r = get_whole(&proxy, &path, size, 0).await;
        assert_eq!(r.cache_status(), "edgeslice; hit");
        let r = send(get(&proxy, &path).header("range", format!("bytes={}-", 2 * CHUNK))).await;
        assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
        assert!(r.body == content(&path, 0, 2 * CHUNK..size));
        assert_eq!(r.cache_status(), "edgeslice; hit");
        assert_eq!(origin.requests(), 1, "{:?}", describe(&origin.log()));
        assert!(origin.body_bytes_sent() <= 1);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2. A changed object after expiry
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_object_changed_at_origin_is_served_whole_in_new_version() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_cache_control(Some("max-age=1"));
        let proxy = start(config(&origin, "")).await;
        let size = 5 * CHUNK + 999;
        let path = format!("/obj/{size}/changed.bin");
        get_whole(&proxy, &path, size, 0).await;
        tokio::time::sleep(EXPIRY_WAIT).await;

        origin.set_etag_version(1);
        origin.set_cache_control(Some("max-age=60"));
        origin.reset_stats();
        let r = get_whole(&proxy, &path, size, 1).await;
        assert_eq!(r.header("etag"), Some(etag(&path, 1).as_str()));
        let log = origin.log();
        let old = etag(&path, 0);
        assert!(
            log.iter()
                .any(|x| x.header("if-none-match") == Some(old.as_str())),
            "the stale copy was revalidated first: {:?}",
            describe(&log)
        );
        assert!(!r.cache_status().contains("hit"), "{:?}", r.cache_status());

        // The new version is now cached: whole and ranges, exact, without the origin.
        let before = origin.requests();
        let r = get_whole(&proxy, &path, size, 1).await;
        assert_eq!(r.cache_status(), "edgeslice; hit");
        let (a, b) = (CHUNK - 5, 4 * CHUNK + 5);
        let r = send(get(&proxy, &path).header("range", format!("bytes={a}-{b}"))).await;
        assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
        assert!(r.body == content(&path, 1, a..b + 1));
        assert_eq!(origin.requests(), before, "{:?}", describe(&origin.log()));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 3. Age
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn age_is_sent_on_hits_and_includes_the_origin_age() {
    bounded(async {
        let origin = Origin::start().await;
        let proxy = start(config(&origin, "")).await;
        let size = 2 * CHUNK + 5;

        // Without an origin Age, hits still carry one.
        let plain = format!("/obj/{size}/age-plain.bin");
        get_whole(&proxy, &plain, size, 0).await;
        let r = get_whole(&proxy, &plain, size, 0).await;
        assert_eq!(r.cache_status(), "edgeslice; hit");
        assert!(r.age().is_some(), "hit without Age: {:?}", r.headers);

        origin.set_extra_header("Age", "100");
        let path = format!("/obj/{size}/age-100.bin");
        let r = get_whole(&proxy, &path, size, 0).await;
        let age = r.age().expect("Age on the first response");
        assert!(age >= 100, "Age {age} < origin's 100");
        let before = origin.requests();
        for _ in 0..2 {
            let r = get_whole(&proxy, &path, size, 0).await;
            assert_eq!(r.cache_status(), "edgeslice; hit");
            assert_eq!(r.headers.get_all("age").iter().count(), 1, "one Age field");
            let age = r.age().expect("Age on a hit");
            assert!(age >= 100, "Age {age} on a hit < origin's 100");
        }
        assert_eq!(origin.requests(), before);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_age_beyond_max_age_is_never_a_hit() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_cache_control(Some("max-age=60"));
        origin.set_extra_header("Age", "100");
        let proxy = start(config(&origin, "")).await;
        let size = CHUNK + 3;
        let path = format!("/obj/{size}/too-old.bin");
        for i in 0..3 {
            let before = origin.requests();
            let r = get_whole(&proxy, &path, size, 0).await;
            assert!(
                origin.requests() > before,
                "#{i}: a response already older than its max-age was served from cache ({:?})",
                r.cache_status()
            );
            assert_ne!(r.cache_status(), "edgeslice; hit");
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 4. Responses that must not be stored (and Vary: Accept-Encoding, which may)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_store_response_is_not_stored() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_cache_control(Some("max-age=60, no-store"));
        let proxy = start(config(&origin, "")).await;
        let size = 3 * CHUNK + 1;
        let path = format!("/obj/{size}/no-store.bin");
        assert_not_stored(&origin, &proxy, &path, size, 4).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_response_is_not_stored() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_cache_control(Some("private, max-age=60"));
        let proxy = start(config(&origin, "")).await;
        let size = 3 * CHUNK + 2;
        let path = format!("/obj/{size}/private.bin");
        assert_not_stored(&origin, &proxy, &path, size, 4).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_cookie_response_is_not_stored_and_cookie_reaches_client() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_cache_control(Some("public, max-age=60"));
        origin.set_extra_header("Set-Cookie", "session=abc123; Path=/");
        let proxy = start(config(&origin, "")).await;
        let size = 3 * CHUNK + 3;
        let path = format!("/obj/{size}/cookie.bin");
        assert_not_stored(&origin, &proxy, &path, size, 4).await;
        let r = get_whole(&proxy, &path, size, 0).await;
        assert_eq!(r.header("set-cookie"), Some("session=abc123; Path=/"));
    })
    .await;
}

/// `Vary: Cookie`: fills never carry cookies, so what they store is the variant for requests
/// without one, and only those are answered from it; a request with a cookie always reaches
/// the origin with it (issue 20: a logged-in user never gets the anonymous answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_cookie_stores_the_cookieless_variant_only() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_extra_header("Vary", "Cookie");
        let proxy = start(config(&origin, "")).await;
        let size = 3 * CHUNK + 4;
        let path = format!("/obj/{size}/vary-cookie.bin");
        let r = get_whole(&proxy, &path, size, 0).await;
        assert_eq!(r.cache_status(), "edgeslice; fwd=miss; stored");
        let r = get_whole(&proxy, &path, size, 0).await;
        assert_eq!(r.cache_status(), "edgeslice; hit");
        for i in 0..3 {
            let before = origin.requests();
            let r = send(get(&proxy, &path).header("cookie", "s=1")).await;
            assert_eq!(r.status, StatusCode::OK);
            assert!(r.body == content(&path, 0, 0..size), "#{i}: bytes");
            assert!(
                !r.cache_status().contains("hit"),
                "#{i}: {}",
                r.cache_status()
            );
            assert_eq!(origin.requests(), before + 1, "#{i}: one origin request");
            let last = origin.log().pop().expect("logged");
            assert_eq!(last.header("cookie"), Some("s=1"), "#{i}: cookie forwarded");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_accept_encoding_is_stored_per_variant() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_extra_header("Vary", "Accept-Encoding");
        let proxy = start(config(&origin, "")).await;
        let size = 3 * CHUNK + 5;
        let path = format!("/obj/{size}/vary-ae.bin");
        // (request's Accept-Encoding, expected Cache-Status): a variant per normalised value.
        let steps = [
            (Some("gzip, br"), "edgeslice; fwd=miss; stored"),
            (Some("br, GZIP"), "edgeslice; hit"),
            (None, "edgeslice; fwd=miss; stored"),
            (None, "edgeslice; hit"),
            (Some("identity"), "edgeslice; fwd=miss; stored"),
            (Some("gzip, br"), "edgeslice; hit"),
        ];
        for (ae, expected) in steps {
            let mut req = get(&proxy, &path);
            if let Some(v) = ae {
                req = req.header("accept-encoding", v);
            }
            let r = send(req).await;
            assert_eq!(r.status, StatusCode::OK);
            assert!(r.body == content(&path, 0, 0..size), "{ae:?}");
            assert_eq!(r.cache_status(), expected, "{ae:?}");
            assert_eq!(r.header("vary"), Some("Accept-Encoding"));
        }
        // Each variant's fill carried the client's own Accept-Encoding.
        let sent: Vec<Option<String>> = records_for(&origin, &path)
            .iter()
            .map(|rec| rec.header("accept-encoding").map(str::to_string))
            .collect();
        assert_eq!(
            sent,
            [
                Some("gzip, br".to_string()),
                None,
                Some("identity".to_string())
            ],
            "one fill per variant, each with the client's field"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_without_freshness_is_not_stored_without_default_ttl_or_heuristics() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_cache_control(None);
        // The origin sends Last-Modified: heuristic freshness would store it (the default).
        let proxy = start(config(&origin, "  heuristic_fraction: 0\n")).await;
        let size = 3 * CHUNK + 6;
        let path = format!("/obj/{size}/no-freshness.bin");
        assert_not_stored(&origin, &proxy, &path, size, 4).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_without_freshness_is_stored_with_default_ttl() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_cache_control(None);
        let proxy = start(config(&origin, "  default_ttl: 60s\n")).await;
        let size = 3 * CHUNK + 7;
        let path = format!("/obj/{size}/default-ttl.bin");
        let r = get_whole(&proxy, &path, size, 0).await;
        assert_eq!(r.cache_status(), "edgeslice; fwd=miss; stored");
        let before = origin.requests();
        for _ in 0..3 {
            let r = get_whole(&proxy, &path, size, 0).await;
            assert_eq!(r.cache_status(), "edgeslice; hit");
        }
        assert_eq!(origin.requests(), before, "{:?}", describe(&origin.log()));

        // default_ttl never overrides what the origin forbids.
        origin.set_cache_control(Some("no-store"));
        let path = format!("/obj/{size}/default-ttl-no-store.bin");
        assert_not_stored(&origin, &proxy, &path, size, 3).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 5. Expires in the past
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expires_in_the_past_is_never_a_hit() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_cache_control(None);
        origin.set_extra_header("Expires", &http_date(now_secs() - 3600));
        // Expires beats default_ttl.
        for extra in ["", "  default_ttl: 60s\n"] {
            let proxy = start(config(&origin, extra)).await;
            let size = 2 * CHUNK + 8;
            let path = format!("/obj/{size}/expired.bin");
            for i in 0..4 {
                let before = origin.requests();
                let r = get_whole(&proxy, &path, size, 0).await;
                assert!(
                    origin.requests() > before,
                    "[{extra:?}] #{i}: an expired response was served without contacting the origin ({:?})",
                    r.cache_status()
                );
                assert_ne!(r.cache_status(), "edgeslice; hit", "[{extra:?}] #{i}");
            }
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 6. Authorization
// ---------------------------------------------------------------------------------------------

const AUTH: &str = "Bearer edgeslice-test-secret";

fn auth_requests(origin: &Origin, path: &str) -> usize {
    records_for(origin, path)
        .iter()
        .filter(|r| r.header("authorization") == Some(AUTH))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorized_request_is_not_answered_from_cache_without_public() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_cache_control(Some("max-age=60"));
        let proxy = start(config(&origin, "")).await;
        let size = 2 * CHUNK + 9;

        // Cold object: every authorized request is forwarded with its credentials.
        let cold = format!("/obj/{size}/auth-cold.bin");
        for i in 0..3 {
            let r = send(get(&proxy, &cold).header("authorization", AUTH)).await;
            assert_eq!(r.status, StatusCode::OK);
            assert!(r.body == content(&cold, 0, 0..size));
            assert_eq!(
                auth_requests(&origin, &cold),
                i + 1,
                "authorized request #{i} did not reach the origin: {:?}",
                describe(&origin.log())
            );
            assert_ne!(r.cache_status(), "edgeslice; hit");
        }

        // Object cached by an anonymous request: authorized requests still go to the origin.
        let warm = format!("/obj/{size}/auth-warm.bin");
        get_whole(&proxy, &warm, size, 0).await;
        assert_eq!(
            get_whole(&proxy, &warm, size, 0).await.cache_status(),
            "edgeslice; hit"
        );
        for i in 0..2 {
            let r = send(get(&proxy, &warm).header("authorization", AUTH)).await;
            assert_eq!(r.status, StatusCode::OK);
            assert!(r.body == content(&warm, 0, 0..size));
            assert_eq!(
                auth_requests(&origin, &warm),
                i + 1,
                "authorized request #{i} was answered from cache: {:?}",
                describe(&origin.log())
            );
            assert_ne!(r.cache_status(), "edgeslice; hit");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorized_request_is_answered_from_cache_when_public() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_cache_control(Some("public, max-age=60"));
        let proxy = start(config(&origin, "")).await;
        let size = 2 * CHUNK + 10;
        let path = format!("/obj/{size}/auth-public.bin");
        let r = send(get(&proxy, &path).header("authorization", AUTH)).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.body == content(&path, 0, 0..size));
        let before = origin.requests();
        for _ in 0..2 {
            let r = send(get(&proxy, &path).header("authorization", AUTH)).await;
            assert_eq!(r.status, StatusCode::OK);
            assert!(r.body == content(&path, 0, 0..size));
            assert_eq!(r.cache_status(), "edgeslice; hit");
        }
        let r = get_whole(&proxy, &path, size, 0).await;
        assert_eq!(r.cache_status(), "edgeslice; hit");
        assert_eq!(origin.requests(), before, "{:?}", describe(&origin.log()));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 7. Request Cache-Control: no-cache (and Pragma: no-cache)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_no_cache_revalidates_a_fresh_object() {
    bounded(async {
        let origin = Origin::start().await;
        let proxy = start(config(&origin, "")).await;
        let size = 3 * CHUNK + 11;
        let path = format!("/obj/{size}/req-no-cache.bin");
        get_whole(&proxy, &path, size, 0).await;
        assert_eq!(
            get_whole(&proxy, &path, size, 0).await.cache_status(),
            "edgeslice; hit"
        );
        let tag = etag(&path, 0);
        for (name, value) in [("cache-control", "no-cache"), ("pragma", "no-cache")] {
            origin.reset_stats();
            let r = send(get(&proxy, &path).header(name, value)).await;
            assert_eq!(r.status, StatusCode::OK, "{name}");
            assert!(r.body == content(&path, 0, 0..size), "{name}");
            let log = origin.log();
            assert!(
                log.iter()
                    .any(|x| x.header("if-none-match") == Some(tag.as_str())),
                "{name}: {value} did not make the proxy revalidate: {:?}",
                describe(&log)
            );
            assert!(
                origin.body_bytes_sent() <= 1,
                "{name}: revalidation re-downloaded {} bytes",
                origin.body_bytes_sent()
            );
            assert_ne!(r.cache_status(), "edgeslice; hit", "{name}");
        }
        // Without the directive it is a hit again.
        origin.reset_stats();
        let r = get_whole(&proxy, &path, size, 0).await;
        assert_eq!(r.cache_status(), "edgeslice; hit");
        assert_eq!(origin.requests(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_no_cache_is_revalidated_on_every_use() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_cache_control(Some("no-cache, max-age=60"));
        let proxy = start(config(&origin, "")).await;
        let size = 2 * CHUNK + 12;
        let path = format!("/obj/{size}/resp-no-cache.bin");
        get_whole(&proxy, &path, size, 0).await;
        let tag = etag(&path, 0);
        for i in 0..3 {
            origin.reset_stats();
            let r = get_whole(&proxy, &path, size, 0).await;
            let log = origin.log();
            assert!(
                log.iter()
                    .any(|x| x.header("if-none-match") == Some(tag.as_str())),
                "#{i}: a no-cache response was reused without revalidation: {:?}",
                describe(&log)
            );
            assert_ne!(r.cache_status(), "edgeslice; hit");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s_maxage_overrides_max_age_in_a_shared_cache() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_cache_control(Some("max-age=0, s-maxage=60"));
        let proxy = start(config(&origin, "")).await;
        let size = 2 * CHUNK + 13;
        let path = format!("/obj/{size}/s-maxage.bin");
        get_whole(&proxy, &path, size, 0).await;
        let before = origin.requests();
        let r = get_whole(&proxy, &path, size, 0).await;
        assert_eq!(r.cache_status(), "edgeslice; hit");
        assert_eq!(origin.requests(), before);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 8. Pass-through of unsafe methods on a caching route
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_post_delete_pass_through_unchanged_on_a_cache_route() {
    bounded(async {
        use futures::StreamExt;
        let origin = Origin::start().await;
        let proxy = start(config(&origin, "")).await;
        let path = "/obj/4096/upload.bin";

        // PUT with Content-Length.
        let put_len = 5 * CHUNK + 321;
        let put_body = content("/put-body", 0, 0..put_len);
        let put_crc = crc32fast::hash(&put_body);
        let r = send(common::client().put(proxy.url(path)).body(put_body)).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            String::from_utf8_lossy(&r.body),
            format!("len={put_len} crc={put_crc:08x}")
        );
        assert_eq!(r.header("cache-control"), Some("no-store"));
        let rec = origin.log().pop().expect("PUT logged");
        assert_eq!((rec.method.as_str(), rec.path.as_str()), ("PUT", path));
        assert_eq!((rec.body_len, rec.body_crc), (put_len, put_crc));

        // POST with a chunked (streamed) body, twice: never answered from cache.
        let post_len = 3 * CHUNK + 17;
        let post_crc = crc32fast::hash(&content("/post-body", 0, 0..post_len));
        for i in 0..2 {
            let before = origin.requests();
            let pieces: Vec<std::ops::Range<u64>> = (0..post_len)
                .step_by(50_000)
                .map(|a| a..(a + 50_000).min(post_len))
                .collect();
            let stream = futures::stream::iter(pieces)
                .map(|r| Ok::<_, std::io::Error>(bytes::Bytes::from(content("/post-body", 0, r))));
            let r = send(
                common::client()
                    .post(proxy.url(path))
                    .body(reqwest::Body::wrap_stream(stream)),
            )
            .await;
            assert_eq!(r.status, StatusCode::OK, "POST #{i}");
            assert_eq!(
                String::from_utf8_lossy(&r.body),
                format!("len={post_len} crc={post_crc:08x}"),
                "POST #{i}"
            );
            assert_eq!(origin.requests(), before + 1, "POST #{i}");
            let rec = origin.log().pop().expect("POST logged");
            assert_eq!((rec.method.as_str(), rec.path.as_str()), ("POST", path));
            assert_eq!((rec.body_len, rec.body_crc), (post_len, post_crc));
        }

        // DELETE: the origin's 405 comes back as it is.
        let before = origin.requests();
        let r = send(common::client().delete(proxy.url(path))).await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.header("allow"), Some("GET, HEAD, POST, PUT"));
        assert_eq!(r.body, b"method not allowed\n");
        assert_eq!(origin.requests(), before + 1);
        let rec = origin.log().pop().expect("DELETE logged");
        assert_eq!(
            (rec.method.as_str(), rec.path.as_str(), rec.body_len),
            ("DELETE", path, 0)
        );

        // None of that disturbed GET through the cache.
        get_whole(&proxy, path, 4096, 0).await;
        assert_eq!(
            get_whole(&proxy, path, 4096, 0).await.cache_status(),
            "edgeslice; hit"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 9. Cache-Status values
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_status_miss_stored_then_hit_and_bypass() {
    bounded(async {
        let origin = Origin::start().await;
        let proxy = start(config(&origin, "")).await;
        let size = 2 * CHUNK + 14;
        let path = format!("/obj/{size}/status.bin");
        let r = get_whole(&proxy, &path, size, 0).await;
        assert_eq!(r.cache_status(), "edgeslice; fwd=miss; stored");
        let r = get_whole(&proxy, &path, size, 0).await;
        assert_eq!(r.cache_status(), "edgeslice; hit");
        let r = send(get(&proxy, &path).header("range", "bytes=-100")).await;
        assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
        assert!(r.body == content(&path, 0, size - 100..size));
        assert_eq!(r.cache_status(), "edgeslice; hit");

        origin.set_cache_control(Some("no-store"));
        let path = format!("/obj/{size}/status-no-store.bin");
        for i in 0..2 {
            let r = get_whole(&proxy, &path, size, 0).await;
            assert!(
                r.cache_status().starts_with("edgeslice;")
                    && r.cache_status().contains("fwd=bypass"),
                "#{i}: {:?}",
                r.cache_status()
            );
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 10. HEAD on a cold object, then GET
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_on_cold_object_then_get() {
    bounded(async {
        let origin = Origin::start().await;
        let proxy = start(config(&origin, "")).await;
        let size = 4 * CHUNK + 15;
        let path = format!("/obj/{size}/head.bin");
        let r = send(common::client().head(proxy.url(&path))).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("content-length"), Some(size.to_string().as_str()));
        assert_eq!(r.header("etag"), Some(etag(&path, 0).as_str()));
        assert_eq!(r.header("accept-ranges"), Some("bytes"));
        assert!(r.body.is_empty());
        assert!(r.cache_status().starts_with("edgeslice;"));

        let r = get_whole(&proxy, &path, size, 0).await;
        assert_eq!(r.header("content-length"), Some(size.to_string().as_str()));
        assert_eq!(r.header("etag"), Some(etag(&path, 0).as_str()));
        let (a, b) = (3 * CHUNK - 1, 4 * CHUNK);
        let r = send(get(&proxy, &path).header("range", format!("bytes={a}-{b}"))).await;
        assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
        assert!(r.body == content(&path, 0, a..b + 1));

        // Everything is cached now: HEAD and GET are hits.
        let before = origin.requests();
        let r = send(common::client().head(proxy.url(&path))).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("content-length"), Some(size.to_string().as_str()));
        assert_eq!(r.cache_status(), "edgeslice; hit");
        let r = get_whole(&proxy, &path, size, 0).await;
        assert_eq!(r.cache_status(), "edgeslice; hit");
        assert_eq!(origin.requests(), before);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Further RFC 9111 / RFC 9211 requirements
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expires_in_the_future_without_max_age_is_fresh() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_cache_control(None);
        origin.set_extra_header("Expires", &http_date(now_secs() + 3600));
        let proxy = start(config(&origin, "")).await;
        let size = 2 * CHUNK + 16;
        let path = format!("/obj/{size}/expires-future.bin");
        let r = get_whole(&proxy, &path, size, 0).await;
        assert_eq!(r.cache_status(), "edgeslice; fwd=miss; stored");
        let before = origin.requests();
        let r = get_whole(&proxy, &path, size, 0).await;
        assert_eq!(r.cache_status(), "edgeslice; hit");
        assert_eq!(origin.requests(), before);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorized_request_is_answered_from_cache_with_must_revalidate_or_s_maxage() {
    bounded(async {
        let origin = Origin::start().await;
        let proxy = start(config(&origin, "")).await;
        let size = CHUNK + 17;
        for (i, cc) in ["must-revalidate, max-age=60", "s-maxage=60"]
            .into_iter()
            .enumerate()
        {
            origin.set_cache_control(Some(cc));
            let path = format!("/obj/{size}/auth-{i}.bin");
            let r = send(get(&proxy, &path).header("authorization", AUTH)).await;
            assert_eq!(r.status, StatusCode::OK, "{cc}");
            assert!(r.body == content(&path, 0, 0..size), "{cc}");
            let before = origin.requests();
            let r = send(get(&proxy, &path).header("authorization", AUTH)).await;
            assert!(r.body == content(&path, 0, 0..size), "{cc}");
            assert_eq!(r.cache_status(), "edgeslice; hit", "{cc}");
            assert_eq!(origin.requests(), before, "{cc}");
        }
    })
    .await;
}

/// RFC 9111 §5.2.1.5: "a cache MUST NOT store any part of either this request or any response
/// to it".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn request_no_store_response_is_not_stored() {
    bounded(async {
        let origin = Origin::start().await;
        let proxy = start(config(&origin, "")).await;
        let size = 2 * CHUNK + 18;
        let path = format!("/obj/{size}/req-no-store.bin");
        let first = send(get(&proxy, &path).header("cache-control", "no-store")).await;
        assert_eq!(first.status, StatusCode::OK);
        assert!(first.body == content(&path, 0, 0..size));
        let before = origin.requests();
        let r = get_whole(&proxy, &path, size, 0).await;
        assert!(
            origin.requests() > before,
            "the response to a no-store request was stored and served as {:?}",
            r.cache_status()
        );
        assert!(
            !first.cache_status().contains("stored"),
            "the response to a no-store request says {:?}",
            first.cache_status()
        );
    })
    .await;
}

/// RFC 9111 §4.4: "A cache MUST invalidate the target URI when it receives a non-error status
/// code in response to an unsafe request method".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn successful_unsafe_request_invalidates_the_stored_response() {
    bounded(async {
        let origin = Origin::start().await;
        let proxy = start(config(&origin, "")).await;
        let size = 2 * CHUNK + 19;
        for method in [reqwest::Method::PUT, reqwest::Method::POST] {
            let path = format!("/obj/{size}/invalidate-{method}.bin");
            get_whole(&proxy, &path, size, 0).await;
            assert_eq!(
                get_whole(&proxy, &path, size, 0).await.cache_status(),
                "edgeslice; hit"
            );
            let r = send(
                common::client()
                    .request(method.clone(), proxy.url(&path))
                    .body(b"new contents".to_vec()),
            )
            .await;
            assert_eq!(r.status, StatusCode::OK, "{method}");
            let before = origin.requests();
            let r = get_whole(&proxy, &path, size, 0).await;
            assert!(
                origin.requests() > before,
                "after a 200 to {method}, GET was still answered from the old stored response ({:?})",
                r.cache_status()
            );
            assert_ne!(r.cache_status(), "edgeslice; hit", "{method}");
        }
    })
    .await;
}

/// RFC 9211 §2.2: `fwd=request` when a fresh stored response could not be used because of the
/// request; `fwd=stale` means the stored response was stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn request_no_cache_on_fresh_object_reports_fwd_request() {
    bounded(async {
        let origin = Origin::start().await;
        let proxy = start(config(&origin, "")).await;
        let size = CHUNK + 20;
        let path = format!("/obj/{size}/fwd-request.bin");
        get_whole(&proxy, &path, size, 0).await;
        let r = send(get(&proxy, &path).header("cache-control", "no-cache")).await;
        assert!(r.body == content(&path, 0, 0..size));
        assert!(
            r.cache_status().contains("fwd=request"),
            "Cache-Status {:?}",
            r.cache_status()
        );
        assert!(!r.cache_status().contains("fwd=stale"));
    })
    .await;
}

/// A request that may not use the cache (Authorization, no public) revalidates a stale object
/// and gets a 304 for it; that must not throw the stored object away for everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn authorized_request_on_stale_object_keeps_its_chunks() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_cache_control(Some("max-age=1"));
        let proxy = start(config(&origin, "")).await;
        let size = 4 * CHUNK + 21;
        let path = format!("/obj/{size}/auth-stale.bin");
        get_whole(&proxy, &path, size, 0).await;
        tokio::time::sleep(EXPIRY_WAIT).await;
        origin.set_cache_control(Some("max-age=60"));
        let r = send(get(&proxy, &path).header("authorization", AUTH)).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.body == content(&path, 0, 0..size));
        assert_eq!(
            auth_requests(&origin, &path),
            1,
            "{:?}",
            describe(&origin.log())
        );

        origin.reset_stats();
        let r = get_whole(&proxy, &path, size, 0).await;
        assert!(
            origin.body_bytes_sent() <= 1,
            "the anonymous GET after an authorized one downloaded {} bytes again ({:?}): {:?}",
            origin.body_bytes_sent(),
            r.cache_status(),
            describe(&origin.log())
        );
    })
    .await;
}
