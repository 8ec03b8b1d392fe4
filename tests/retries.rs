//! Who retries, and what retries cost (README, "Origin resilience"): a failure the client caused
//! is never retried nor charged to anyone; a retry that an untried server answers costs the
//! retry budget nothing, so a dead server and a 503 server beside a healthy one cost clients
//! nothing; a URL failing on every server stops being retried for a while; and when most of
//! the group fails the budget still caps the retries.

mod common;

use common::origin::{content, Fault, Origin};
use common::proxy::{free_port, Proxy};
use std::time::Duration;

const CHUNK: u64 = 64 * 1024;

/// A group over `servers` with the default breaker and retry settings (`failure_threshold: 5`,
/// `max_ejected_percent: 50`, `attempts: 3`, `budget: 20`) unless `upstream_extra` (lines of
/// the group, indented four spaces) says otherwise.
fn config(servers: &[String], upstream_extra: &str, cache: bool) -> String {
    let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "cache:\n  chunk_size: 64KiB\n  memory:\n    capacity: 64MiB\nupstreams:\n  origin:\n    servers: [{}]\n    connect_timeout: 500ms\n    read_timeout: 2s\n    deadline: 10s\n{upstream_extra}routes:\n  - path_prefix: /\n    upstream: origin\n    cache: {cache}\n",
        list.join(", ")
    )
}

/// A server answering 503 to everything, and a healthy one.
async fn failing_and_healthy() -> (Origin, Origin) {
    let failing = Origin::start().await;
    failing.set_fault(Fault::Status(503));
    (failing, Origin::start().await)
}

/// The group of issue 20, point 14: a server refusing connections (a fresh address each
/// call), `failing` and `healthy`.
fn dead_failing_healthy(failing: &Origin, healthy: &Origin) -> [String; 3] {
    [
        dead_addr(),
        failing.addr().to_string(),
        healthy.addr().to_string(),
    ]
}

fn dead_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// One metric sample's value (`name` with its labels, as printed), 0 when absent.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// The sum of every sample of the family `family` (any labels).
fn family_sum(metrics: &str, family: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A raw HTTP/1.1 exchange on a new connection: the status line of what came back within `wait`
/// (empty when the proxy closed without answering).
async fn raw_status(proxy: &Proxy, request: &[u8], wait: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = proxy.url("").trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("send");
    let mut out = Vec::new();
    let read_head = async {
        let mut buf = [0u8; 4096];
        while !out.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(wait, read_head).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    text.lines().next().unwrap_or("").to_string()
}

/// GET `path` with `range` (inclusive): the status and the body.
async fn get_range(proxy: &Proxy, path: &str, range: (u64, u64)) -> (u16, Vec<u8>) {
    let resp = common::client()
        .get(proxy.url(path))
        .header("range", format!("bytes={}-{}", range.0, range.1))
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    (
        status,
        resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default(),
    )
}

async fn get(proxy: &Proxy, path: &str) -> (u16, Vec<u8>) {
    let resp = common::client()
        .get(proxy.url(path))
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    (
        status,
        resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default(),
    )
}

// ---------------------------------------------------------------------------------------------
// 13. Client-side failures are never retried.
// ---------------------------------------------------------------------------------------------

/// Requests the proxy or Pingora refuses because of what the client sent: `Connection`
/// nominating a field the proxy needs (Host, X-Forwarded-*), a pseudo-header, too many or
/// malformed nominations; an idempotent upload whose chunked body is malformed, that stops
/// short, or that stalls until the origin's read timeout. None is retried, none counts as an origin retry or failure, and the retry budget
/// never hears of the refused ones: they did not reach an origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_side_failures_are_never_retried_nor_counted() {
    let a = Origin::start().await;
    let b = Origin::start().await;
    for cache in [false, true] {
        // budget 50: 30 requests failing on both servers may retry max(10, 50 % of 30) = 15
        // times; were the 60 refused requests counted as requests, that would be 30.
        let proxy = Proxy::start(&config(
            &[a.addr().to_string(), b.addr().to_string()],
            "    retry:\n      budget: 50\n",
            cache,
        ));
        let refused: [&[u8]; 6] = [
            b"GET /obj/1000/h HTTP/1.1\r\nHost: x\r\nConnection: Host\r\n\r\n",
            b"GET /obj/1000/h HTTP/1.1\r\nHost: x\r\nConnection: close, X-Forwarded-For\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
            b"GET /obj/1000/h HTTP/1.1\r\nHost: x\r\nConnection: x-forwarded-proto\r\n\r\n",
            b"GET /obj/1000/h HTTP/1.1\r\nHost: x\r\nConnection: :authority\r\n\r\n",
            b"GET /obj/1000/h HTTP/1.1\r\nHost: x\r\nConnection: a, b, c, d, e, f, g, h, i, j, k\r\n\r\n",
            b"GET /obj/1000/h HTTP/1.1\r\nHost: x\r\nConnection: \"x-y\"\r\n\r\n",
        ];
        for round in 0..10 {
            for (i, req) in refused.iter().enumerate() {
                let status = raw_status(&proxy, req, Duration::from_secs(5)).await;
                // On a cached route the cache answers a GET itself (it forwards no hop-by-hop
                // field); passed through, Pingora refuses it.
                let ok = if cache {
                    status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.1 4")
                } else {
                    status.starts_with("HTTP/1.1 400")
                };
                assert!(
                    ok,
                    "round {round}, request {i} (cache: {cache}): {status:?}"
                );
            }
        }
        if !cache {
            assert_eq!(
                a.requests() + b.requests(),
                0,
                "a refused request reached an origin"
            );
        }
        let s = proxy.stats().await;
        assert_eq!(
            s["origin_retries"],
            0,
            "cache {cache}: refused requests were retried: {s:?}\n{}",
            proxy.log()
        );
        assert_eq!(s["origin_retries_over_budget"], 0, "{s:?}");

        if !cache {
            // The budget never heard of them.
            for i in 0..30 {
                let (status, _) = get(&proxy, &format!("/status/503/budget-{i}")).await;
                assert_eq!(status, 503);
            }
            let s = proxy.stats().await;
            assert_eq!(s["origin_retries"], 15, "retries the budget allowed: {s:?}");
            assert!(s["origin_retries_over_budget"] >= 15, "{s:?}");
        }
        let before = proxy.stats().await;

        // Idempotent uploads the client breaks: a malformed chunked body, a body cut short.
        for _ in 0..5 {
            let status = raw_status(
                &proxy,
                b"PUT /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
                Duration::from_secs(5),
            )
            .await;
            assert!(
                status.is_empty() || status.starts_with("HTTP/1.1 4"),
                "a malformed body gets an error or a close: {status:?}"
            );
            let status = raw_status(
                &proxy,
                b"PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nonly a few bytes",
                Duration::from_millis(300),
            )
            .await;
            assert!(!status.starts_with("HTTP/1.1 2"), "{status:?}");
        }
        // An upload that stalls mid-body past the group's read_timeout (2 s): the origin is
        // waiting on the client, not failing.
        let status = raw_status(
            &proxy,
            b"PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nstalled",
            Duration::from_secs(3),
        )
        .await;
        assert!(!status.starts_with("HTTP/1.1 2"), "{status:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = proxy.stats().await;
        for key in ["origin_retries", "origin_retries_over_budget"] {
            assert_eq!(s[key], before[key], "cache {cache}: {key}: {s:?}");
        }
        let puts = a
            .log()
            .iter()
            .chain(b.log().iter())
            .filter(|r| r.method == "PUT")
            .count();
        assert!(
            puts <= 11,
            "each broken upload reached an origin at most once: {puts}"
        );
        let m = proxy.metrics().await;
        assert_eq!(
            sample(&m, "edgeslice_origin_retries_total{upstream=\"origin\"}"),
            s["origin_retries"] as f64
        );
        assert_eq!(
            family_sum(&m, "edgeslice_origin_failures_charged_total"),
            0.0,
            "nothing charged to a server: {m}"
        );
        assert_eq!(s["origin_breaker_opened"], 0, "{s:?}");
        a.reset_stats();
        b.reset_stats();
    }
}

// ---------------------------------------------------------------------------------------------
// 14. A dead server and a 503 server beside a healthy one cost clients nothing.
// ---------------------------------------------------------------------------------------------

/// The group of the issue: one server refusing connections, one answering 503 to everything,
/// one healthy, with the default breaker and retry settings. Sixty cold range GETs all succeed
/// byte-exact, through the cache and passed through; the 503 server is ejected although the
/// dead one is too (a server that refuses connections is down, not an outlier: it does not fill
/// `max_ejected_percent`), and no retry is refused by the budget (each retry an untried server
/// answered is given back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_and_a_503_server_beside_a_healthy_one_cost_no_request() {
    let (failing, healthy) = failing_and_healthy().await;
    for cache in [true, false] {
        let servers = dead_failing_healthy(&failing, &healthy);
        let proxy = Proxy::start(&config(&servers, "", cache));
        for i in 0..60u64 {
            let size = 4 * CHUNK + i;
            let path = format!("/obj/{size}/trio-{cache}-{i}.bin");
            let range = (1000 + i * 7, CHUNK + 5000 + i * 11);
            let (status, body) = get_range(&proxy, &path, range).await;
            assert_eq!(status, 206, "request {i} (cache: {cache})");
            assert!(
                body == content(&path, 0, range.0..range.1 + 1),
                "request {i} (cache: {cache}): wrong bytes"
            );
        }
        let s = proxy.stats().await;
        println!(
            "cache {cache}: the 503 server saw {} requests; {s:?}",
            failing.requests()
        );
        assert_eq!(s["origin_retries_over_budget"], 0, "cache {cache}: {s:?}");
        // Every request was answered in the end: each retry was given back to the budget.
        assert!(s["origin_retries"] >= 2, "{s:?}");
        assert_eq!(s["origin_retries_given_back"], s["origin_retries"], "{s:?}");
        assert!(
            s["origin_breaker_opened"] >= 2,
            "both the dead and the 503 server ejected (cache: {cache}): {s:?}"
        );
        assert_eq!(s["origin_ejections_capped"], 0, "{s:?}");
        // Ejected within its failure threshold (5) and a few requests in flight around it.
        assert!(
            failing.requests() <= 8,
            "the 503 server saw {} requests (cache: {cache})",
            failing.requests()
        );
        failing.reset_stats();
        healthy.reset_stats();
    }
}

/// Neighbours on `max_ejected_percent`: with 0 % (one ejection allowed) the 503 server is
/// still ejected beside the dead one; a dead server that times out instead of refusing
/// (`connect_timeout`) is down too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_server_never_fills_the_ejection_cap() {
    let (failing, healthy) = failing_and_healthy().await;
    for extra in [
        "    circuit_breaker:\n      max_ejected_percent: 0\n",
        "    circuit_breaker:\n      max_ejected_percent: 100\n",
    ] {
        let servers = dead_failing_healthy(&failing, &healthy);
        let proxy = Proxy::start(&config(&servers, extra, false));
        for i in 0..30u64 {
            let path = format!("/obj/{}/cap-{i}.bin", 3 * CHUNK);
            let (status, body) = get_range(&proxy, &path, (10, 20_000)).await;
            assert_eq!(status, 206, "request {i} ({extra})");
            assert!(body == content(&path, 0, 10..20_001));
        }
        let s = proxy.stats().await;
        assert!(s["origin_breaker_opened"] >= 2, "{extra}: {s:?}");
        assert_eq!(s["origin_retries_over_budget"], 0, "{extra}: {s:?}");
        failing.reset_stats();
    }
}

/// The budget still caps retries when most of the group fails: every server answers 503 to
/// everything. Sixty cold requests for distinct URLs each get the origin's 503; their retries
/// (each wasted: the next server failed too) stay within max(10, 20 % of 60) = 12 per 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_server_fails_the_budget_caps_retries() {
    let origins = [
        Origin::start().await,
        Origin::start().await,
        Origin::start().await,
    ];
    for o in &origins {
        o.set_fault(Fault::Status(503));
    }
    let servers: Vec<String> = origins.iter().map(|o| o.addr().to_string()).collect();
    for cache in [true, false] {
        let proxy = Proxy::start(&config(&servers, "", cache));
        let started = std::time::Instant::now();
        for i in 0..60u64 {
            let path = format!("/obj/{}/all-503-{cache}-{i}.bin", 2 * CHUNK);
            let (status, _) = get_range(&proxy, &path, (0, 999)).await;
            assert_eq!(status, 503, "request {i} (cache: {cache})");
        }
        let took = started.elapsed();
        let s = proxy.stats().await;
        let seen: u64 = origins.iter().map(|o| o.requests()).sum();
        println!("cache {cache}: {seen} origin requests, {s:?} in {took:?}");
        // Each window of 10 s allows max(10, 20 % of its requests) retries.
        let windows = took.as_secs() / 10 + 1;
        let bound = windows * 12;
        assert!(
            s["origin_retries"] <= bound,
            "cache {cache}: {} retries (bound {bound}): {s:?}",
            s["origin_retries"]
        );
        assert!(s["origin_retries"] >= 10, "the floor is spent: {s:?}");
        assert_eq!(
            seen,
            60 + s["origin_retries"],
            "one origin request per try (cache: {cache})"
        );
        assert!(s["origin_retries_over_budget"] >= 40, "{s:?}");
        assert_eq!(
            s["origin_breaker_opened"], 0,
            "a URL failing everywhere ejects nobody"
        );
        for o in &origins {
            o.reset_stats();
        }
    }
}

/// The neighbouring case: one hot URL answering 503 on every server beside good URLs, with a
/// 503 server that keeps being probed back (short ejections). The hot URL stops being retried
/// once it has failed on every server, so it never spends the budget the good URLs' retries
/// need: every good request gets its bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_url_failing_everywhere_never_makes_good_urls_fail() {
    let (failing, healthy) = failing_and_healthy().await;
    for cache in [false, true] {
        let servers = dead_failing_healthy(&failing, &healthy);
        // Ejections of 200 ms that never grow: the 503 server is probed with real requests
        // all through the test, and each probe that meets a good URL needs a retry.
        let extra = "    circuit_breaker:\n      open_for: 200ms\n      max_open_for: 200ms\n";
        let proxy = std::sync::Arc::new(Proxy::start(&config(&servers, extra, cache)));
        let mut tasks = Vec::new();
        for t in 0..4u64 {
            let proxy = proxy.clone();
            tasks.push(tokio::spawn(async move {
                let mut failed = Vec::new();
                for i in 0..60u64 {
                    for _ in 0..3 {
                        // The origins' 503, or a 502 when the last try met the dead server.
                        let (status, _) = get(&proxy, "/status/503/hot").await;
                        assert!(status == 503 || status == 502, "hot URL: {status}");
                    }
                    let size = 2 * CHUNK + t * 1000 + i;
                    let path = format!("/obj/{size}/good-{cache}-{t}-{i}.bin");
                    let (status, body) = get_range(&proxy, &path, (5, 70_000)).await;
                    if status != 206 || body != content(&path, 0, 5..70_001) {
                        failed.push((i, status));
                    }
                    if i % 10 == 0 {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                failed
            }));
        }
        let mut failed = Vec::new();
        for t in tasks {
            failed.extend(t.await.expect("client task"));
        }
        let s = proxy.stats().await;
        assert!(
            failed.is_empty(),
            "cache {cache}: good URLs failed: {failed:?}; {s:?}"
        );
        let hot: usize = [&failing, &healthy]
            .iter()
            .map(|o| {
                o.log()
                    .iter()
                    .filter(|r| r.path == "/status/503/hot")
                    .count()
            })
            .sum();
        println!("cache {cache}: hot URL reached origins {hot} times for 720 requests; {s:?}");
        // Without the memory each hot request would reach both live servers.
        assert!(hot < 800, "the hot URL kept being retried: {hot}");
        assert!(s["origin_retries_skipped_failing_url"] >= 600, "{s:?}");
        failing.reset_stats();
        healthy.reset_stats();
    }
}
