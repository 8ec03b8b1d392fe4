//! Origin resilience under injected faults: dead, failing, resetting and hanging servers;
//! circuit breakers, retries, resumed transfers, stale-if-error, POST safety, load balancing
//! and health checks. Two (or three) in-process origins serve the same content.

mod common;

use common::origin::{content, Fault, Origin};
use common::proxy::{free_port, Proxy};
use reqwest::StatusCode;
use std::time::{Duration, Instant};

const CHUNK: u64 = 64 * 1024;

/// A group over `servers` with tight per-try timeouts, a breaker that trips after 3 failures,
/// and a generous retry budget; `extra` is appended to the group (e.g. `balance:`).
fn config(servers: &[String], extra: &str, cache: bool) -> String {
    let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "cache:\n  chunk_size: 64KiB\n  memory:\n    capacity: 64MiB\n  stale_if_error: 1h\nupstreams:\n  origin:\n    servers: [{}]\n    connect_timeout: 300ms\n    read_timeout: 400ms\n    deadline: 5s\n    circuit_breaker:\n      failure_threshold: 3\n      open_for: 700ms\n      max_open_for: 5s\n      half_open_probes: 1\n    retry:\n      attempts: 3\n      backoff: 10ms\n      max_backoff: 50ms\n      budget: 100\n{extra}routes:\n  - path_prefix: /\n    upstream: origin\n    cache: {cache}\n",
        list.join(", ")
    )
}

async fn get(proxy: &Proxy, path: &str) -> (StatusCode, Vec<u8>, String) {
    let resp = common::client()
        .get(proxy.url(path))
        .send()
        .await
        .expect("request");
    let status = resp.status();
    let cs = common::header_text(resp.headers(), "cache-status");
    (
        status,
        resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default(),
        cs,
    )
}

/// An ejection of a steady 1.5 s (no growth), long enough that a slow machine still sends the
/// whole batch of requests while the failing origin is ejected.
fn steady_breaker(yaml: &str) -> String {
    let steady = yaml.replace(
        "open_for: 700ms\n      max_open_for: 5s",
        "open_for: 1500ms\n      max_open_for: 1500ms",
    );
    assert_ne!(steady, yaml);
    steady
}

fn dead_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_server_in_the_group_is_invisible_to_clients() {
    let live = Origin::start().await;
    for cache in [true, false] {
        let proxy = Proxy::start(&config(&[dead_addr(), live.addr().to_string()], "", cache));
        for i in 0..20 {
            let path = if cache {
                format!("/obj/{}/dead-{i}.bin", 3 * CHUNK)
            } else {
                format!("/download/{}", 1000 + i)
            };
            let (status, body, _) = get(&proxy, &path).await;
            assert_eq!(status, 200, "request {i} (cache: {cache})");
            let want = if cache {
                content(&path, 0, 0..3 * CHUNK)
            } else {
                content(&path, 0, 0..1000 + i)
            };
            assert!(body == want, "request {i} (cache: {cache}): wrong bytes");
        }
        let s = proxy.stats().await;
        assert!(
            s["origin_breaker_opened"] >= 1,
            "the dead server was ejected: {s:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_origin_is_held_back_by_its_breaker_then_probed_back() {
    let bad = Origin::start().await;
    let good = Origin::start().await;
    bad.set_fault(Fault::Status(503));
    let proxy = Proxy::start(&steady_breaker(&config(
        &[bad.addr().to_string(), good.addr().to_string()],
        "",
        false,
    )));
    let n = 40;
    for i in 0..n {
        let path = format!("/download/{}", 5000 + i);
        let (status, body, _) = get(&proxy, &path).await;
        assert_eq!(status, 200, "request {i}");
        assert!(body == content(&path, 0, 0..5000 + i));
    }
    let bad_hits = bad.requests();
    println!("503 origin saw {bad_hits} of {n} requests");
    assert!(bad_hits <= 4, "the breaker should hold the failing origin to a handful, not its round-robin share: {bad_hits}");
    let s = proxy.stats().await;
    assert!(s["origin_breaker_opened"] >= 1, "{s:?}");
    assert!(s["origin_retries"] >= 1, "{s:?}");
    // Healthy again: after open_for it is probed and takes traffic again.
    bad.clear_fault();
    tokio::time::sleep(Duration::from_millis(1700)).await;
    bad.reset_stats();
    for i in 0..20 {
        let path = format!("/download/{}", 7000 + i);
        let (status, body, _) = get(&proxy, &path).await;
        assert_eq!(status, 200);
        assert!(body == content(&path, 0, 0..7000 + i));
    }
    assert!(
        bad.requests() >= 5,
        "the recovered origin serves again: {} requests",
        bad.requests()
    );
    let s = proxy.stats().await;
    assert!(s["origin_breaker_closed"] >= 1, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_fetches_survive_a_503_origin_with_exact_bytes() {
    let bad = Origin::start().await;
    let good = Origin::start().await;
    bad.set_fault(Fault::Status(503));
    let proxy = Proxy::start(&steady_breaker(&config(
        &[bad.addr().to_string(), good.addr().to_string()],
        "",
        true,
    )));
    for i in 0..12 {
        let size = 5 * CHUNK + i;
        let path = format!("/obj/{size}/c503-{i}.bin");
        let (status, body, _) = get(&proxy, &path).await;
        assert_eq!(status, 200, "object {i}");
        assert!(body == content(&path, 0, 0..size), "object {i}");
    }
    assert!(
        bad.requests() <= 4,
        "breaker: {} requests reached the failing origin",
        bad.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_reset_mid_body_resumes_on_another_origin() {
    let flaky = Origin::start().await;
    let good = Origin::start().await;
    flaky.set_fault(Fault::ResetMidBody { after: 100_000 });
    // A breaker that never trips keeps the flaky origin in rotation for the whole test.
    let yaml = config(
        &[flaky.addr().to_string(), good.addr().to_string()],
        "",
        true,
    )
    .replace("failure_threshold: 3", "failure_threshold: 1000");
    let proxy = Proxy::start(&yaml);
    for i in 0..6 {
        let size = 8 * CHUNK + 17;
        let path = format!("/obj/{size}/reset-{i}.bin");
        let (status, body, _) = get(&proxy, &path).await;
        assert_eq!(status, 200, "object {i}");
        assert!(
            body == content(&path, 0, 0..size),
            "object {i}: bytes differ after a resume"
        );
    }
    assert!(flaky.requests() >= 1, "the flaky origin took part");
    let s = proxy.stats().await;
    assert!(s["origin_resumes"] >= 1, "{s:?}");
    // Discovery covers these 8-chunk objects in one request, so every request carrying
    // If-Range is a resume. Each asks for the bytes after the break, mid-chunk, not a refetch
    // of what was already received.
    let resumed: Vec<u64> = good
        .log()
        .into_iter()
        .filter(|r| r.header("if-range").is_some())
        .map(|r| {
            r.header("range")
                .unwrap_or("")
                .trim_start_matches("bytes=")
                .split('-')
                .next()
                .unwrap_or("0")
                .parse()
                .unwrap_or(0)
        })
        .collect();
    assert!(
        !resumed.is_empty(),
        "a resume request reached the good origin"
    );
    // The flaky origin delivered exactly 100 000 bytes of a request that started at byte 0.
    assert!(
        resumed.iter().all(|s| *s == 100_000),
        "resumed exactly at the break: {resumed:?}"
    );
}

/// Issue 21 (smaller): a resume after a mid-body break prefers the other servers, but the
/// server that broke stays a candidate: when the only other server answers 503, the resume
/// goes back to the broken one (which serves now), and the body is whole, not cut short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_returns_to_the_broken_server_when_the_other_answers_503() {
    let flaky = Origin::start().await;
    let gateway = Origin::start().await;
    gateway.set_fault(Fault::Status(503));
    let yaml = config(
        &[flaky.addr().to_string(), gateway.addr().to_string()],
        "",
        true,
    )
    .replace("failure_threshold: 3", "failure_threshold: 1000");
    let proxy = Proxy::start(&yaml);
    let size = 8 * CHUNK + 17;
    for i in 0..4 {
        let path = format!("/obj/{size}/back-{i}.bin");
        // The flaky server breaks its next answer after 100,000 bytes, then serves normally.
        flaky.set_fault_times(Fault::ResetMidBody { after: 100_000 }, 1);
        flaky.reset_stats();
        let (status, body, _) = get(&proxy, &path).await;
        assert_eq!(status, 200, "object {i}");
        assert_eq!(body.len() as u64, size, "object {i}: cut short");
        assert!(
            body == content(&path, 0, 0..size),
            "object {i}: wrong bytes"
        );
        // Two requests reached the flaky server: the one that broke and the resume, asking
        // (If-Range) for exactly the bytes after the break.
        let log = flaky.log();
        assert_eq!(log.len(), 2, "object {i}: {log:?}");
        assert_eq!(
            log[1].header("range"),
            Some("bytes=100000-524304"),
            "object {i}"
        );
        assert!(log[1].header("if-range").is_some(), "object {i}");
        // Stored whole: a hit costs no origin request and has every byte right.
        let before = (flaky.requests(), gateway.requests());
        let (status, body, _) = get(&proxy, &path).await;
        assert_eq!(status, 200);
        assert!(
            body == content(&path, 0, 0..size),
            "object {i}: hit has wrong bytes"
        );
        assert_eq!(
            (flaky.requests(), gateway.requests()),
            before,
            "object {i}: not a hit"
        );
    }
    assert!(
        gateway.requests() >= 4,
        "the 503 server was asked each resume first"
    );
    let s = proxy.stats().await;
    assert!(s["origin_resumes"] >= 4, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_origin_times_out_per_try_and_is_retried_elsewhere() {
    let hung = Origin::start().await;
    let good = Origin::start().await;
    hung.set_fault(Fault::Hang);
    for cache in [true, false] {
        let proxy = Proxy::start(&config(
            &[hung.addr().to_string(), good.addr().to_string()],
            "",
            cache,
        ));
        for i in 0..6 {
            let path = if cache {
                format!("/obj/{}/hang-{i}.bin", 2 * CHUNK)
            } else {
                format!("/download/{}", 300 + i)
            };
            let started = Instant::now();
            let (status, body, _) = get(&proxy, &path).await;
            let took = started.elapsed();
            assert_eq!(status, 200, "request {i} (cache: {cache})");
            let len = if cache { 2 * CHUNK } else { 300 + i };
            assert!(body == content(&path, 0, 0..len));
            // Bounded by the per-try timeout plus backoff, far below the 5 s deadline.
            assert!(took < Duration::from_secs(4), "request {i} took {took:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_origins_down_serves_stale_or_fails_fast() {
    let origin = Origin::start().await;
    origin.set_cache_control(Some("max-age=1"));
    let proxy = Proxy::start(&config(&[origin.addr().to_string()], "", true));
    let path = format!("/obj/{}/stale.bin", 3 * CHUNK);
    let (status, body, cs) = get(&proxy, &path).await;
    assert_eq!(status, 200);
    assert!(cs.contains("fwd=miss"), "{cs}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Down for good: new connections refused, pooled ones answered with 503.
    origin.refuse().await;
    origin.set_fault(Fault::Status(503));
    let (status, body2, cs) = get(&proxy, &path).await;
    assert_eq!(status, 200, "an expired cached object is served stale");
    assert!(body2 == body);
    assert!(
        cs.contains("stale-if-error"),
        "marked in Cache-Status: {cs}"
    );
    let s = proxy.stats().await;
    assert_eq!(s["cache_stale_served"], 1, "{s:?}");
    // Nothing cached: a 5xx, fast.
    let started = Instant::now();
    let (status, _, _) = get(&proxy, &format!("/obj/{}/never.bin", CHUNK)).await;
    assert!(status.is_server_error(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "within the deadline: {:?}",
        started.elapsed()
    );
    origin.resume().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_respects_must_revalidate_and_zero_window() {
    let origin = Origin::start().await;
    origin.set_cache_control(Some("max-age=1, must-revalidate"));
    let proxy = Proxy::start(&config(&[origin.addr().to_string()], "", true));
    let path = format!("/obj/{}/strict.bin", CHUNK);
    assert_eq!(get(&proxy, &path).await.0, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    origin.refuse().await;
    origin.set_fault(Fault::Status(503));
    let (status, _, _) = get(&proxy, &path).await;
    assert!(
        status.is_server_error(),
        "must-revalidate forbids stale serving: {status}"
    );
    origin.resume().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_that_reached_an_origin_is_never_sent_twice() {
    let a = Origin::start().await;
    let b = Origin::start().await;
    let post = |proxy: &Proxy| {
        common::client()
            .post(proxy.url("/submit"))
            .body("order=42")
            .send()
    };
    // The origin answers 503: the POST reached it, so it must not be replayed on b.
    a.set_fault(Fault::Status(503));
    b.set_fault(Fault::Status(503));
    let proxy = Proxy::start(&config(
        &[a.addr().to_string(), b.addr().to_string()],
        "",
        false,
    ));
    let resp = post(&proxy).await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(a.requests() + b.requests(), 1, "the POST was sent once");
    // A hanging origin: the POST may have been processed; it is not replayed.
    a.set_fault(Fault::Hang);
    b.set_fault(Fault::Hang);
    a.reset_stats();
    b.reset_stats();
    let resp = post(&proxy).await.unwrap();
    assert_eq!(resp.status(), 504);
    assert_eq!(a.requests() + b.requests(), 1, "the POST was sent once");
    // A refused connection never reached anyone: that POST may go elsewhere.
    let proxy = Proxy::start(&config(&[dead_addr(), b.addr().to_string()], "", false));
    b.clear_fault();
    b.reset_stats();
    for _ in 0..4 {
        let resp = post(&proxy).await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(b.log().iter().filter(|r| r.method == "POST").count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_an_object_on_one_origin_and_weights_share_traffic() {
    let origins = [
        Origin::start().await,
        Origin::start().await,
        Origin::start().await,
    ];
    let addrs: Vec<String> = origins.iter().map(|o| o.addr().to_string()).collect();
    let proxy = Proxy::start(&config(&addrs, "    balance: consistent_hash\n", false));
    for obj in 0..12 {
        for o in &origins {
            o.reset_stats();
        }
        let path = format!("/download/{}", 100 + obj);
        for _ in 0..5 {
            assert_eq!(get(&proxy, &path).await.0, 200);
        }
        let hit: Vec<u64> = origins.iter().map(|o| o.requests()).collect();
        assert_eq!(
            hit.iter().filter(|n| **n > 0).count(),
            1,
            "object {obj} went to one origin: {hit:?}"
        );
    }

    // Weighted round robin: 3:1.
    for o in &origins {
        o.reset_stats();
    }
    let weighted = config(
        &[format!("{} weight=3", addrs[0]), addrs[1].clone()],
        "",
        false,
    );
    let proxy = Proxy::start(&weighted);
    for i in 0..40 {
        assert_eq!(get(&proxy, &format!("/download/{}", 10 + i)).await.0, 200);
    }
    let (heavy, light) = (origins[0].requests(), origins[1].requests());
    assert_eq!(heavy + light, 40);
    assert!(
        heavy >= 25 && light >= 5,
        "weights 3:1 gave {heavy}:{light}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_take_a_failing_server_out_of_rotation() {
    let sick = Origin::start().await;
    let well = Origin::start().await;
    sick.set_fault(Fault::Status(500));
    let hc = "    health_check:\n      path: /obj/1/health\n      interval: 100ms\n      timeout: 200ms\n      healthy_after: 1\n      unhealthy_after: 1\n";
    // Breaker effectively off, so only the health check can take the sick server out.
    let yaml = config(
        &[sick.addr().to_string(), well.addr().to_string()],
        hc,
        false,
    )
    .replace("failure_threshold: 3", "failure_threshold: 1000");
    let proxy = Proxy::start(&yaml);
    assert!(
        sick.wait_requests(2, Duration::from_secs(5)).await,
        "the health check probes the server"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = sick
        .log()
        .iter()
        .filter(|r| r.path.starts_with("/download"))
        .count();
    for i in 0..10 {
        let path = format!("/download/{}", 900 + i);
        let (status, body, _) = get(&proxy, &path).await;
        assert_eq!(status, 200);
        assert!(body == content(&path, 0, 0..900 + i));
    }
    let after = sick
        .log()
        .iter()
        .filter(|r| r.path.starts_with("/download"))
        .count();
    assert_eq!(
        after, before,
        "no client request went to the unhealthy server"
    );
    let probe = sick
        .log()
        .into_iter()
        .find(|r| r.path == "/obj/1/health")
        .expect("a health probe");
    assert_eq!(probe.method, "GET");
}

// ---------------------------------------------------------------------------------------------
// Attribution: failures are charged to whoever caused them (README, "Origin resilience").
// ---------------------------------------------------------------------------------------------

/// Requests of `path` the origin saw.
fn seen(o: &Origin, path: &str) -> usize {
    o.log().iter().filter(|r| r.path == path).count()
}

/// Sixty requests to a URL answering 500 and sixty to one answering 503, with good URLs in
/// between and afterwards: every good URL gets 200 and exact bytes, the failing URLs their own
/// status, each 500 reaches an origin exactly once, and no breaker opens.
async fn one_bad_url_never_takes_the_group_down(origins: &[&Origin], cache: bool) {
    let servers: Vec<String> = origins.iter().map(|o| o.addr().to_string()).collect();
    let proxy = Proxy::start(&config(&servers, "", cache));
    let good = |i: u64| {
        if cache {
            format!("/obj/{}/good-{i}.bin", CHUNK + i)
        } else {
            format!("/download/{}", 1000 + i)
        }
    };
    let want = |i: u64| {
        if cache {
            content(&good(i), 0, 0..CHUNK + i)
        } else {
            content(&good(i), 0, 0..1000 + i)
        }
    };
    for i in 0..60u64 {
        let (status, body, _) = get(&proxy, "/status/500/app-error").await;
        assert_eq!(
            status, 500,
            "request {i}: the origin's own 500 (cache: {cache})"
        );
        assert_eq!(body, b"status 500 for /status/500/app-error\n");
        let (status, body, _) = get(&proxy, "/status/503/overloaded").await;
        assert_eq!(
            status, 503,
            "request {i}: the origin's own 503 (cache: {cache})"
        );
        assert_eq!(body, b"status 503 for /status/503/overloaded\n");
        let (status, body, _) = get(&proxy, &good(i)).await;
        assert_eq!(status, 200, "good URL {i} (cache: {cache})");
        assert!(body == want(i), "good URL {i}: wrong bytes");
    }
    for i in 60..80u64 {
        let (status, body, _) = get(&proxy, &good(i)).await;
        assert_eq!(status, 200, "good URL {i} afterwards (cache: {cache})");
        assert!(body == want(i));
    }
    let five_hundreds: usize = origins
        .iter()
        .map(|o| seen(o, "/status/500/app-error"))
        .sum();
    assert_eq!(
        five_hundreds, 60,
        "each 500 reaches an origin once (cache: {cache})"
    );
    let s = proxy.stats().await;
    assert_eq!(s["origin_breaker_opened"], 0, "cache {cache}: {s:?}");
    assert_eq!(s["origin_failures_gateway_status"], 0, "{s:?}");
    assert!(s["origin_gateway_uncharged"] >= 60, "{s:?}");
    for o in origins {
        o.reset_stats();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_url_never_ejects_a_lone_server() {
    let origin = Origin::start().await;
    for cache in [true, false] {
        one_bad_url_never_takes_the_group_down(&[&origin], cache).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_failing_on_both_servers_ejects_neither() {
    let a = Origin::start().await;
    let b = Origin::start().await;
    for cache in [true, false] {
        one_bad_url_never_takes_the_group_down(&[&a, &b], cache).await;
    }
}

/// A raw HTTP/1.1 exchange: send `head`, then `body`, read what comes back within `wait`.
async fn raw(proxy: &Proxy, request: &[u8], wait: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = proxy.url("").trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("send");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_abort_time_out_or_send_garbage_never_open_a_breaker() {
    let origin = Origin::start().await;
    for cache in [false, true] {
        let proxy = Proxy::start(&config(&[origin.addr().to_string()], "", cache));
        // Five downloads aborted mid-body.
        for i in 0..5 {
            let path = if cache {
                format!("/obj/{}/abort-{i}.bin", 64 * CHUNK)
            } else {
                format!("/download/{}", 50_000_000 + i)
            };
            let mut resp = common::client()
                .get(proxy.url(&path))
                .send()
                .await
                .expect("request");
            assert_eq!(resp.status(), 200);
            let first = resp.chunk().await.expect("first piece");
            assert!(first.is_some());
            drop(resp);
        }
        // Five malformed chunked request bodies.
        for _ in 0..5 {
            let answer = raw(
                &proxy,
                b"POST /submit HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
                Duration::from_secs(3),
            )
            .await;
            assert!(
                answer.is_empty()
                    || answer.starts_with("HTTP/1.1 4")
                    || answer.starts_with("HTTP/1.1 5"),
                "a malformed body gets an error or a close: {answer:?}"
            );
        }
        // Five clients that stall halfway through their request body until timeouts fire.
        for _ in 0..5 {
            let _ = raw(
                &proxy,
                b"POST /submit HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nonly a few bytes",
                Duration::from_millis(1200),
            )
            .await;
        }
        let s = proxy.stats().await;
        assert_eq!(s["origin_breaker_opened"], 0, "cache {cache}: {s:?}");
        for class in ["connect", "read_timeout", "reset", "framing", "too_slow"] {
            assert_eq!(s[&format!("origin_failures_{class}")], 0, "{class}: {s:?}");
        }
        // And the group serves on.
        let path = format!("/download/{}", 1234);
        let (status, body, _) = get(&proxy, &path).await;
        assert_eq!(status, 200);
        assert!(body == content(&path, 0, 0..1234));
    }
}

/// Read a response whole: the status, the bytes that arrived, and whether the body was complete.
async fn get_to_end(proxy: &Proxy, path: &str) -> (StatusCode, Vec<u8>, bool) {
    let mut resp = common::client()
        .get(proxy.url(path))
        .send()
        .await
        .expect("request");
    let status = resp.status();
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(piece)) => body.extend_from_slice(&piece),
            Ok(None) => return (status, body, true),
            Err(_) => return (status, body, false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_origin_is_abandoned_and_the_fetch_resumes_on_its_peer() {
    let slow = Origin::start().await;
    let good = Origin::start().await;
    slow.set_fault(Fault::Slow { bytes_per_sec: 100 });
    // read_timeout 400ms judges the rate; min_rate defaults to 16KiB/s; deadline 5s.
    let proxy = Proxy::start(&config(
        &[slow.addr().to_string(), good.addr().to_string()],
        "",
        true,
    ));
    let bound = Duration::from_secs(5) + Duration::from_secs(2);
    for i in 0..4 {
        let path = format!("/obj/{}/trickle-{i}.bin", 3 * CHUNK);
        let started = Instant::now();
        let (status, body, complete) = get_to_end(&proxy, &path).await;
        assert_eq!(status, 200, "object {i}");
        assert!(complete, "object {i}: a complete body");
        assert!(
            body == content(&path, 0, 0..3 * CHUNK),
            "object {i}: exact bytes"
        );
        assert!(
            started.elapsed() < bound,
            "object {i} within deadline plus a chunk's transfer: {:?}",
            started.elapsed()
        );
    }
    let s = proxy.stats().await;
    assert!(s["origin_failures_too_slow"] >= 1, "{s:?}");
    assert!(s["origin_resumes"] >= 1, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_server_trickles_the_client_gets_a_clean_error_in_time() {
    let a = Origin::start().await;
    let b = Origin::start().await;
    a.set_fault(Fault::Slow { bytes_per_sec: 100 });
    b.set_fault(Fault::Slow { bytes_per_sec: 100 });
    let proxy = Proxy::start(&config(
        &[a.addr().to_string(), b.addr().to_string()],
        "",
        true,
    ));
    let path = format!("/obj/{}/all-slow.bin", 3 * CHUNK);
    let started = Instant::now();
    let (status, body, complete) = get_to_end(&proxy, &path).await;
    let took = started.elapsed();
    assert!(
        status.is_server_error() || !complete,
        "an error, not a complete answer: {status}, {} bytes",
        body.len()
    );
    if status == 200 {
        assert!(
            (body.len() as u64) < 3 * CHUNK,
            "cut short, never completed wrongly"
        );
        assert!(
            body == content(&path, 0, 0..body.len() as u64),
            "what arrived is exact"
        );
    }
    // deadline (5s) + read_timeout (0.4s) + slack for a loaded machine.
    assert!(
        took < Duration::from_secs(7),
        "ended within the bound: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_refusing_gives_a_quick_502_or_the_stale_copy() {
    for cache in [false, true] {
        let yaml = config(&[dead_addr(), dead_addr()], "", cache)
            .replace("connect_timeout: 300ms", "connect_timeout: 1s");
        let proxy = Proxy::start(&yaml);
        for i in 0..8 {
            let started = Instant::now();
            let path = if cache {
                format!("/obj/{CHUNK}/refused-{i}.bin")
            } else {
                format!("/download/{}", 100 + i)
            };
            let (status, _, _) = get(&proxy, &path).await;
            assert_eq!(status, 502, "request {i} (cache: {cache})");
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "within the connect timeout: {:?}",
                started.elapsed()
            );
        }
        let s = proxy.stats().await;
        // Servers that refuse connections are down, not outliers: both are ejected (the
        // ejection cap is for outliers), and requests are still routed to one (panic routing).
        assert_eq!(s["origin_breaker_opened"], 2, "both ejected: {s:?}");
        assert_eq!(s["origin_ejections_capped"], 0, "{s:?}");
        assert!(s["origin_all_ejected"] >= 1, "panic-routed: {s:?}");
        assert!(s["origin_failures_connect"] >= 8, "{s:?}");
        // The trip says which server, why, and for which request.
        assert!(
            proxy.log_contains("-> Open after connect failure"),
            "{}",
            proxy.log()
        );
        assert!(proxy
            .log()
            .lines()
            .any(|l| l.contains("circuit breaker of 127.0.0.1:") && l.contains("rid=")));
    }

    // With a stale copy: served when every try fails (refused, and 503 on pooled connections).
    let origin = Origin::start().await;
    origin.set_cache_control(Some("max-age=1"));
    let proxy = Proxy::start(&config(&[origin.addr().to_string(), dead_addr()], "", true));
    let path = format!("/obj/{}/keep.bin", 2 * CHUNK);
    let (status, body, _) = get(&proxy, &path).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    origin.refuse().await;
    origin.set_fault(Fault::Status(503));
    for i in 0..4 {
        let (status, stale, cs) = get(&proxy, &path).await;
        assert_eq!(status, 200, "stale copy {i}");
        assert!(stale == body);
        assert!(cs.contains("stale-if-error"), "{cs}");
    }
    origin.resume().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_copy_is_served_at_once_while_the_whole_group_is_failing() {
    let a = Origin::start().await;
    let b = Origin::start().await;
    for o in [&a, &b] {
        o.set_cache_control(Some("max-age=1"));
    }
    let proxy = Proxy::start(&config(
        &[a.addr().to_string(), b.addr().to_string()],
        "",
        true,
    ));
    let path = format!("/obj/{}/hung-group.bin", 2 * CHUNK);
    let (status, body, _) = get(&proxy, &path).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Both servers accept and never answer: each try costs read_timeout.
    a.set_fault(Fault::Hang);
    b.set_fault(Fault::Hang);
    let mut served = 0;
    let mut quiet = 0;
    for i in 0..8 {
        let before = a.requests() + b.requests();
        let (status, stale, cs) = get(&proxy, &path).await;
        assert_eq!(status, 200, "stale copy {i}");
        assert!(stale == body);
        assert!(cs.contains("stale-if-error"), "{cs}");
        served += 1;
        if a.requests() + b.requests() == before {
            quiet += 1;
        }
    }
    assert_eq!(served, 8);
    // Once both servers are ejected or failing, the stale copy goes out without asking them.
    assert!(
        quiet >= 5,
        "served without waiting on the failing group: {quiet} of 8"
    );
    let s = proxy.stats().await;
    assert!(s["origin_failures_read_timeout"] >= 3, "{s:?}");
    assert_eq!(s["origin_breaker_opened"], 1, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_server_ejected_requests_still_reach_a_server() {
    for cache in [false, true] {
        let origin = Origin::start().await;
        origin.refuse().await;
        // A long ejection: the server stays Open for the whole test.
        let yaml = config(&[origin.addr().to_string()], "", cache).replace(
            "open_for: 700ms\n      max_open_for: 5s",
            "open_for: 60s\n      max_open_for: 60s",
        );
        let proxy = Proxy::start(&yaml);
        for i in 0..3 {
            let (status, _, _) = get(&proxy, &format!("/download/{}", 10 + i)).await;
            assert_eq!(status, 502, "refused (cache: {cache})");
        }
        let s = proxy.stats().await;
        assert_eq!(s["origin_breaker_opened"], 1, "ejected: {s:?}");
        // The server is back, its breaker still open: requests reach it anyway.
        origin.resume().await;
        for i in 0..5 {
            let path = if cache {
                format!("/obj/{CHUNK}/back-{i}.bin")
            } else {
                format!("/download/{}", 2000 + i)
            };
            let (status, body, _) = get(&proxy, &path).await;
            assert_eq!(status, 200, "request {i} (cache: {cache}): no made-up 503");
            let len = if cache { CHUNK } else { 2000 + i };
            assert!(body == content(&path, 0, 0..len));
        }
        let s = proxy.stats().await;
        assert!(s["origin_all_ejected"] >= 5, "panic-routed: {s:?}");
        assert!(origin.requests() >= 5);
    }
}

/// An origin that sends an interim answer (`103 Early Hints`, `100 Continue`) before its final
/// one: the interim answer is skipped, never a panic. Through the cache the client gets the
/// object with exact bytes and it is stored (the second request is a hit); passed through, the
/// client gets the 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_1xx_answers_before_the_final_one_are_skipped() {
    for code in [103, 100] {
        let origin = Origin::start().await;
        origin.set_fault(Fault::Interim(code));
        let proxy = Proxy::start(&config(&[origin.addr().to_string()], "", true));
        let size = 3 * CHUNK + 17;
        let path = format!("/obj/{size}/hints-{code}.bin");
        let (status, body, _) = get(&proxy, &path).await;
        assert_eq!(status, 200, "{code}: {}", proxy.log());
        assert!(body == content(&path, 0, 0..size), "{code}: wrong bytes");
        let asked = origin.requests();
        assert!(asked >= 1);
        let (status, again, cs) = get(&proxy, &path).await;
        assert_eq!(status, 200);
        assert!(again == body, "{code}: the hit has the same bytes");
        assert!(cs.contains("hit"), "{code}: a cache hit: {cs}");
        assert_eq!(origin.requests(), asked, "{code}: served from the cache");
        // A range of it, from the cache too.
        let resp = common::client()
            .get(proxy.url(&path))
            .header("range", "bytes=100-199")
            .send()
            .await
            .expect("range request");
        assert_eq!(resp.status(), 206);
        let part = resp.bytes().await.expect("range body");
        assert!(part[..] == content(&path, 0, 100..200)[..]);
        assert_eq!(origin.requests(), asked);

        let pass = Proxy::start(&config(&[origin.addr().to_string()], "", false));
        for i in 0..3 {
            let path = format!("/download/{}", 4000 + i);
            let (status, body, _) = get(&pass, &path).await;
            assert_eq!(status, 200, "{code} pass-through {i}: {}", pass.log());
            assert!(
                body == content(&path, 0, 0..4000 + i),
                "{code}: wrong bytes"
            );
        }
        for p in [&proxy, &pass] {
            assert!(!p.log_contains("panicked"), "{code}: {}", p.log());
        }
        let s = proxy.stats().await;
        assert_eq!(s["origin_failures_framing"], 0, "{code}: {s:?}");
    }
}

/// A 502/503/504 answer to a cache fill is retried only on a server that has not seen the
/// request: a lone server answering 503 is asked once and the client gets its 503; in a pair,
/// the other server serves the object and the failing one sees each request at most once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_answer_to_a_fill_is_retried_only_on_another_server() {
    let lone = Origin::start().await;
    lone.set_fault(Fault::Status(503));
    let proxy = Proxy::start(&config(&[lone.addr().to_string()], "", true));
    for i in 0..3 {
        let path = format!("/obj/{}/lone-503-{i}.bin", 2 * CHUNK);
        let (status, body, _) = get(&proxy, &path).await;
        assert_eq!(status, 503, "request {i}: the origin's own answer");
        assert_eq!(body, b"fault status 503\n");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(seen(&lone, &path), 1, "request {i}: one origin request");
    }
    assert_eq!(lone.requests(), 3, "{:?}", lone.log());
    let s = proxy.stats().await;
    assert_eq!(
        s["origin_breaker_opened"], 0,
        "a lone server is never charged: {s:?}"
    );

    let bad = Origin::start().await;
    let good = Origin::start().await;
    bad.set_fault(Fault::Status(503));
    let proxy = Proxy::start(&config(
        &[bad.addr().to_string(), good.addr().to_string()],
        "",
        true,
    ));
    for i in 0..6 {
        let size = 2 * CHUNK + i;
        let path = format!("/obj/{size}/pair-503-{i}.bin");
        let (status, body, _) = get(&proxy, &path).await;
        assert_eq!(status, 200, "object {i}: from the other server");
        assert!(
            body == content(&path, 0, 0..size),
            "object {i}: wrong bytes"
        );
        assert!(seen(&bad, &path) <= 1, "object {i}: {:?}", bad.log());
    }
    assert!(bad.requests() >= 1, "the 503 server was tried");
    let s = proxy.stats().await;
    assert!(s["origin_retries"] >= 1, "{s:?}");
}

/// A failure is logged once, by edgeslice, with its request id: an origin that breaks every
/// transfer mid-body (cached: each resume breaks too; passed through) aborts the responses, and
/// the log has a warning for each and no ERROR line (Pingora's own "Fail to filter request" /
/// "Fail to proxy" line said it a second time, at ERROR: 2,021 of them in the soak).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_failure_is_logged_once_as_a_warning_never_as_an_error() {
    let origin = Origin::start().await;
    origin.set_fault(Fault::ResetMidBody { after: 100_000 });
    for cache in [true, false] {
        let proxy = Proxy::start(&config(&[origin.addr().to_string()], "", cache));
        let size = 8 * CHUNK;
        for i in 0..3 {
            let path = format!("/obj/{size}/broken-{cache}-{i}.bin");
            let (_, body, complete) = get_to_end(&proxy, &path).await;
            assert!(
                !complete,
                "cache: {cache}: a broken transfer looked complete"
            );
            assert!(
                body.len() < size as usize && body == content(&path, 0, 0..body.len() as u64),
                "cache: {cache}: wrong bytes before the abort"
            );
        }
        // The log is written by a thread: give it a moment.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let log = proxy.log();
        let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
        assert!(errors.is_empty(), "cache: {cache}: {errors:#?}");
        let warned = log
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("request failed"))
            .count();
        assert_eq!(
            warned, 3,
            "cache: {cache}: one warning per failed request:\n{log}"
        );
    }
}
