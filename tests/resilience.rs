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
    let cs = resp
        .headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
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
