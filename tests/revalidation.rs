//! Revalidation under load (issue 21, points 7 and 8): `stale-while-revalidate` hides a slow
//! revalidation, slow revalidations do not convoy, and an origin whose clock is behind (every
//! response stale on receipt) does not turn requests into one conditional request each, one
//! at a time.
//!
//! The origin misbehaves as reported: conditional requests answered 2 s (or 50 ms) late with a
//! `Date` taken when the request arrived, or a `Date` 5 s behind. Every test checks every byte
//! each client receives, the origin requests (conditional and not, and how many conditional
//! ones were in flight at once), and latency as a COUNT of requests that waited longer than a
//! generous bound the old behaviour clearly exceeded (never a speed ratio).

mod common;

use common::origin::{content, Origin, RequestRecord};
use common::proxy::Proxy;
use common::reply::{
    describe, get, get_whole, records_for, start, try_send, wait_records, within, CHUNK,
};
use reqwest::StatusCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Upper bound on every test.
const TEST_LIMIT: Duration = Duration::from_secs(60);
/// The slow revalidation of points 7 and 8.
const SLOW_REVALIDATION: Duration = Duration::from_secs(2);

/// The suites' config ([`common::reply::config`]) with a read timeout the 2 s revalidation
/// stays well within.
fn config(origin: &Origin, extra_cache: &str) -> String {
    let yaml = common::reply::config(origin, extra_cache);
    assert!(yaml.contains("read_timeout: 2s"));
    yaml.replace("read_timeout: 2s", "read_timeout: 6s")
}

fn is_conditional(r: &RequestRecord) -> bool {
    r.header("if-none-match").is_some() || r.header("if-modified-since").is_some()
}

fn conditional_count(origin: &Origin, path: &str) -> usize {
    records_for(origin, path)
        .iter()
        .filter(|r| is_conditional(r))
        .count()
}

/// One client request as seen by the client.
struct Seen {
    waited: Duration,
    cache_status: String,
}

/// GET `path` and check every byte against version 0 of the object; a short or failed body
/// fails the test.
async fn timed_get(proxy: &Proxy, path: &str, size: u64) -> Seen {
    let t = Instant::now();
    let r = match try_send(get(proxy, path)).await {
        Ok(r) => r,
        Err(e) => panic!("GET {path}: {e}"),
    };
    let waited = t.elapsed();
    assert_eq!(r.status, StatusCode::OK, "GET {path}: {}", r.cache_status());
    assert_eq!(r.body.len() as u64, size, "GET {path}: length");
    assert!(
        r.body == content(path, 0, 0..size),
        "GET {path}: bytes differ from the object ({})",
        r.cache_status()
    );
    Seen {
        waited,
        cache_status: r.cache_status().to_string(),
    }
}

/// `clients` concurrent clients each GETting `path` one request after another for `run`;
/// every reply checked byte for byte.
async fn load(
    proxy: &Arc<Proxy>,
    path: &str,
    size: u64,
    clients: usize,
    run: Duration,
) -> Vec<Seen> {
    let until = Instant::now() + run;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (proxy, path) = (proxy.clone(), path.to_string());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while Instant::now() < until {
                    seen.push(timed_get(&proxy, &path, size).await);
                }
                seen
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    all
}

fn waited_at_least(seen: &[Seen], bound: Duration) -> usize {
    seen.iter().filter(|s| s.waited >= bound).count()
}

fn slowest(seen: &[Seen]) -> Duration {
    seen.iter().map(|s| s.waited).max().unwrap_or_default()
}

/// Point 7: within `stale-while-revalidate`, 60 concurrent requests for an expired object are
/// answered stale at once while ONE background revalidation (2 s) runs. Before, the first
/// started it and the other 59 queued on the object's lock for its 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_while_revalidate_hides_a_slow_revalidation() {
    within(TEST_LIMIT, async {
        let origin = Origin::start().await;
        origin.set_cache_control(Some("max-age=1, stale-while-revalidate=30"));
        let proxy = Arc::new(start(config(&origin, "")).await);
        let size = 3 * CHUNK + 17;
        let path = format!("/obj/{size}/swr-slow.bin");
        timed_get(&proxy, &path, size).await;
        origin.set_conditional_delay(SLOW_REVALIDATION);
        tokio::time::sleep(Duration::from_millis(2100)).await;

        let tasks: Vec<_> = (0..60)
            .map(|_| {
                let (proxy, path) = (proxy.clone(), path.clone());
                tokio::spawn(async move { timed_get(&proxy, &path, size).await })
            })
            .collect();
        let mut seen = Vec::new();
        for t in tasks {
            seen.push(t.await.expect("client task"));
        }
        let slow = waited_at_least(&seen, Duration::from_millis(1500));
        eprintln!(
            "swr: 60 requests, {slow} waited >= 1.5 s, slowest {:?}",
            slowest(&seen)
        );
        assert_eq!(
            slow,
            0,
            "of 60 requests within stale-while-revalidate, {slow} waited >= 1.5 s (slowest {:?})",
            slowest(&seen)
        );
        for s in &seen {
            assert!(
                s.cache_status == "edgeslice; hit; detail=stale-while-revalidate"
                    || s.cache_status == "edgeslice; hit",
                "{}",
                s.cache_status
            );
        }
        // One revalidation, in the background: the first request's.
        assert!(wait_records(&origin, &path, 2, Duration::from_secs(5)).await);
        assert_eq!(
            origin.peak_conditional_in_flight(),
            1,
            "{:?}",
            describe(&records_for(&origin, &path))
        );
        let recs = records_for(&origin, &path);
        assert!(is_conditional(&recs[1]), "{:?}", describe(&recs));
        assert_eq!(
            recs.len(),
            2,
            "60 requests: one discovery and one revalidation: {:?}",
            describe(&recs)
        );

        // What is stored after it: the same bytes, from the cache.
        tokio::time::sleep(SLOW_REVALIDATION).await;
        let later = timed_get(&proxy, &path, size).await;
        assert!(
            later.cache_status.starts_with("edgeslice; hit"),
            "{}",
            later.cache_status
        );
        let recs = records_for(&origin, &path);
        assert!(
            recs.iter().skip(1).all(is_conditional),
            "only revalidations after the discovery: {:?}",
            describe(&recs)
        );
    })
    .await;
}

/// Point 7, second half: `max-age=1`, no `stale-while-revalidate`, revalidation answered 2 s
/// late with its `Date` taken on arrival (so the 304 is already stale on receipt). Eight
/// clients in a loop: requests that find a revalidation in flight wait on that one and take
/// its answer; they never queue revalidations of their own. Before, they ran one after
/// another in the foreground (p99 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_revalidations_do_not_convoy() {
    within(TEST_LIMIT, async {
        let origin = Origin::start().await;
        origin.set_cache_control(Some("max-age=1"));
        let proxy = Arc::new(start(config(&origin, "")).await);
        let size = 2 * CHUNK + 5;
        let path = format!("/obj/{size}/convoy.bin");
        timed_get(&proxy, &path, size).await;
        origin.set_conditional_delay(SLOW_REVALIDATION);
        tokio::time::sleep(Duration::from_millis(1100)).await;

        let run = Duration::from_secs(7);
        let t = Instant::now();
        let seen = load(&proxy, &path, size, 8, run).await;
        let elapsed = t.elapsed();

        eprintln!(
            "convoy: {} requests in {elapsed:?}, {} conditional, peak in flight {}, slowest {:?}",
            seen.len(),
            conditional_count(&origin, &path),
            origin.peak_conditional_in_flight(),
            slowest(&seen)
        );
        assert_eq!(
            origin.peak_conditional_in_flight(),
            1,
            "more than one revalidation of one object in flight"
        );
        // A request waits for at most the revalidation in flight when it arrived, or its own.
        let bound = SLOW_REVALIDATION + Duration::from_millis(1500);
        let slow = waited_at_least(&seen, bound);
        assert_eq!(
            slow,
            0,
            "{slow} of {} requests waited >= {bound:?} (slowest {:?})",
            seen.len(),
            slowest(&seen)
        );
        // One revalidation at a time, each 2 s long: no more than the run holds.
        let conditional = conditional_count(&origin, &path);
        let rounds = (elapsed.as_millis() / SLOW_REVALIDATION.as_millis()) as usize + 1;
        assert!(
            conditional <= rounds,
            "{conditional} conditional requests in {elapsed:?} ({rounds} rounds at most), for {} client requests",
            seen.len()
        );
        assert!(
            seen.iter().any(|s| s.cache_status == "edgeslice; fwd=stale; collapsed"),
            "no request took the answer of a revalidation it waited on"
        );
        let recs = records_for(&origin, &path);
        assert_eq!(
            recs.iter().filter(|r| !is_conditional(r)).count(),
            1,
            "one unconditional request (the discovery): {:?}",
            describe(&recs)
        );

        // What is stored: the same bytes.
        origin.set_conditional_delay(Duration::ZERO);
        timed_get(&proxy, &path, size).await;
    })
    .await;
}

/// Point 8: the origin's `Date` 5 s behind with `max-age=3`: every response is stale on
/// receipt (RFC 9111 §4.2.3, kept). 32 clients in a loop against a 50 ms revalidation: the
/// revalidations of the object coalesce (one in flight) and the requests waiting on one share
/// its answer, so there are far fewer conditional requests than client requests. Before,
/// every client request made its own conditional request, one at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn origin_clock_behind_does_not_serialize_requests() {
    within(TEST_LIMIT, async {
        let origin = Origin::start().await;
        origin.set_cache_control(Some("max-age=3"));
        origin.set_date_offset(-5);
        let revalidation = Duration::from_millis(50);
        origin.set_conditional_delay(revalidation);
        let proxy = Arc::new(start(config(&origin, "")).await);
        let size = CHUNK + 100;
        let path = format!("/obj/{size}/skew.bin");
        let first = get_whole(&proxy, &path, size, 0).await;
        let age = first.age().unwrap_or(0);
        assert!(age >= 4, "age of a response dated 5 s ago: {age}");

        let t = Instant::now();
        let seen = load(&proxy, &path, size, 32, Duration::from_secs(4)).await;
        let elapsed = t.elapsed();

        let requests = seen.len();
        let conditional = conditional_count(&origin, &path);
        let mut waits: Vec<Duration> = seen.iter().map(|s| s.waited).collect();
        waits.sort();
        eprintln!(
            "skew: {requests} requests in {elapsed:?}, {conditional} conditional, peak in flight {}, p50 {:?}, slowest {:?}",
            origin.peak_conditional_in_flight(),
            waits.get(waits.len() / 2).copied().unwrap_or_default(),
            slowest(&seen)
        );
        assert_eq!(
            origin.peak_conditional_in_flight(),
            1,
            "revalidations of one object must coalesce"
        );
        // Coalesced rounds each last at least the origin's 50 ms.
        let rounds = (elapsed.as_millis() / revalidation.as_millis()) as usize + 1;
        assert!(
            conditional <= rounds,
            "{conditional} conditional requests in {elapsed:?}: more than {rounds} rounds"
        );
        assert!(
            conditional * 4 <= requests,
            "{conditional} conditional requests for {requests} client requests"
        );
        let slow = waited_at_least(&seen, Duration::from_millis(1500));
        assert_eq!(
            slow,
            0,
            "{slow} of {requests} requests waited >= 1.5 s (slowest {:?})",
            slowest(&seen)
        );
        let recs = records_for(&origin, &path);
        assert_eq!(
            recs.iter().filter(|r| !is_conditional(r)).count(),
            1,
            "one unconditional request (the discovery)"
        );
        // Stored: a later request gets the same bytes, the age still RFC-correct.
        let later = get_whole(&proxy, &path, size, 0).await;
        assert!(later.age().unwrap_or(0) >= 4, "{:?}", later.age());
    })
    .await;
}

/// A background revalidation holds a fill slot: with `cache.max_concurrent_fills: 2`, six
/// objects expired within `stale-while-revalidate` are all answered stale at once, and no
/// more than two background revalidations run at a time (the table of them is bounded).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn background_revalidations_are_bounded_by_fill_slots() {
    within(TEST_LIMIT, async {
        let origin = Origin::start().await;
        origin.set_cache_control(Some("max-age=1, stale-while-revalidate=60"));
        let proxy = Arc::new(start(config(&origin, "  max_concurrent_fills: 2\n")).await);
        let size = CHUNK + 3;
        let paths: Vec<String> = (0..6)
            .map(|i| format!("/obj/{size}/bound-{i}.bin"))
            .collect();
        for p in &paths {
            timed_get(&proxy, p, size).await;
        }
        origin.set_conditional_delay(SLOW_REVALIDATION);
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let tasks: Vec<_> = paths
            .iter()
            .map(|p| {
                let (proxy, p) = (proxy.clone(), p.clone());
                tokio::spawn(async move { timed_get(&proxy, &p, size).await })
            })
            .collect();
        let mut seen = Vec::new();
        for t in tasks {
            seen.push(t.await.expect("client task"));
        }
        assert_eq!(
            waited_at_least(&seen, Duration::from_millis(1500)),
            0,
            "slowest {:?}",
            slowest(&seen)
        );
        for s in &seen {
            assert_eq!(
                s.cache_status, "edgeslice; hit; detail=stale-while-revalidate",
                "every object is served stale"
            );
        }
        tokio::time::sleep(SLOW_REVALIDATION + Duration::from_millis(500)).await;
        let peak = origin.peak_conditional_in_flight();
        assert!(
            (1..=2).contains(&peak),
            "background revalidations at once: {peak}"
        );
    })
    .await;
}
