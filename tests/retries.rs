//! Who retries, and what retries cost (README, "Origin resilience"): a failure the client caused
//! is never retried nor charged to anyone.

mod common;

use common::origin::Origin;
use common::proxy::Proxy;
use std::time::Duration;

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
