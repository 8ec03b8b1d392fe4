//! `GET /metrics` as operators scrape it: a known workload gives exact deltas, and the origin
//! byte and request counters agree with what the origin itself counted.

mod common;

use common::origin::Origin;
use common::proxy::{free_port, Proxy};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Samples of the text format: `name{labels}` (labels as exposed, sorted by name) → value.
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The sum of every sample of `name` whose labels contain all of `having` (`key="value"`).
fn sum(samples: &HashMap<String, f64>, name: &str, having: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(k, _)| {
            k.split_once('{').map_or(k.as_str(), |(n, _)| n) == name
                && having.iter().all(|h| k.contains(h))
        })
        .map(|(_, v)| v)
        .sum()
}

async fn scrape(proxy: &Proxy) -> (String, HashMap<String, f64>) {
    let text = proxy.metrics().await;
    let samples = parse(&text);
    (text, samples)
}

/// Scrape until `ready` holds (a request is counted once its response is complete, just after
/// the client has read it), for at most 10 s.
async fn scrape_until(
    proxy: &Proxy,
    ready: impl Fn(&HashMap<String, f64>) -> bool,
) -> (String, HashMap<String, f64>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (text, samples) = scrape(proxy).await;
        if ready(&samples) || Instant::now() > deadline {
            return (text, samples);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_workload_gives_exact_deltas() {
    let origin = Origin::start().await;
    let dead = format!("127.0.0.1:{}", free_port());
    let yaml = format!(
        "cache:\n  chunk_size: 1MiB\n  memory:\n    capacity: 16MiB\n\
         upstreams:\n  origin:\n    servers: [\"{o}\"]\n  \
         flaky:\n    servers: [\"{dead}\", \"{o}\"]\n    retry: {{attempts: 2, backoff: 1ms}}\n\
         routes:\n  - path_prefix: /download/\n    upstream: flaky\n    cache: false\n  - path_prefix: /\n    upstream: origin\n",
        o = origin.addr()
    );
    let proxy = Proxy::start(&yaml);
    let size: u64 = 3_000_000;
    let path = format!("/obj/{size}/a.bin");
    let get = |range: Option<&'static str>| {
        let mut r = common::client().get(proxy.url(&path));
        if let Some(range) = range {
            r = r.header("range", range);
        }
        async move {
            let resp = r.send().await.expect("request");
            let status = resp.status().as_u16();
            let cache = resp
                .headers()
                .get("cache-status")
                .map(|v| v.to_str().unwrap_or("").to_string());
            (
                status,
                cache,
                resp.bytes().await.expect("body").len() as u64,
            )
        }
    };
    // A miss (the whole object, 3 chunks), then two hits.
    assert_eq!(get(None).await.2, size);
    let (status, cache, n) = get(None).await;
    assert_eq!((status, n), (200, size));
    assert!(cache.unwrap_or_default().contains("hit"));
    let (status, _, n) = get(Some("bytes=0-99")).await;
    assert_eq!((status, n), (206, 100));
    // Four pass-through requests to a group whose first server refuses connections: round
    // robin sends some there first, and each of those is retried on the live one.
    for _ in 0..4 {
        let resp = common::client()
            .get(proxy.url("/download/5000"))
            .send()
            .await
            .expect("pass-through");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.bytes().await.expect("body").len(), 5000);
    }

    let route = "route=\"/\"";
    let (text, m) = scrape_until(&proxy, |m| {
        sum(m, "edgeslice_http_requests_total", &[]) >= 7.0
    })
    .await;
    let req = |route: &str, cache: &str, class: &str| {
        sum(
            &m,
            "edgeslice_http_requests_total",
            &[
                route,
                &format!("cache=\"{cache}\""),
                &format!("status_class=\"{class}\""),
                "method=\"GET\"",
            ],
        )
    };
    assert_eq!(req(route, "miss", "2xx"), 1.0, "{text}");
    assert_eq!(req(route, "hit", "2xx"), 2.0, "{text}");
    assert_eq!(req("route=\"/download/\"", "none", "2xx"), 4.0, "{text}");
    assert_eq!(sum(&m, "edgeslice_http_requests_total", &[]), 7.0);
    assert_eq!(
        sum(
            &m,
            "edgeslice_http_response_bytes_total",
            &[route, "cache=\"hit\""]
        ),
        (size + 100) as f64
    );
    assert_eq!(
        sum(
            &m,
            "edgeslice_http_response_bytes_total",
            &["route=\"/download/\""]
        ),
        20_000.0
    );
    assert_eq!(
        sum(
            &m,
            "edgeslice_http_request_duration_seconds_count",
            &[route, "cache=\"hit\""]
        ),
        2.0
    );
    assert_eq!(
        sum(
            &m,
            "edgeslice_http_request_duration_seconds_bucket",
            &[route, "cache=\"hit\"", "le=\"+Inf\""]
        ),
        2.0
    );

    // Origin figures agree with the origin's own counts (let its counters settle: it counts
    // after each write returns).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (text, m) = scrape(&proxy).await;
    let live = format!("server=\"{}\"", origin.addr());
    let dead_server = format!("server=\"{dead}\"");
    assert_eq!(
        sum(&m, "edgeslice_origin_requests_total", &[&live]),
        origin.requests() as f64,
        "{text}"
    );
    assert_eq!(
        sum(&m, "edgeslice_origin_response_bytes_total", &[&live]),
        origin.body_bytes_sent() as f64,
        "{text}"
    );
    assert_eq!(
        sum(
            &m,
            "edgeslice_origin_response_bytes_total",
            &[&live, "upstream=\"flaky\"", "outcome=\"2xx\""]
        ),
        20_000.0
    );
    let refused = sum(
        &m,
        "edgeslice_origin_requests_total",
        &[&dead_server, "outcome=\"connect\""],
    );
    assert!(
        refused >= 1.0,
        "round robin never tried the dead server:\n{text}"
    );
    assert_eq!(
        sum(
            &m,
            "edgeslice_origin_retries_total",
            &["upstream=\"flaky\""]
        ),
        refused,
        "every refused connection was retried once"
    );
    assert_eq!(
        sum(
            &m,
            "edgeslice_origin_requests_total",
            &["upstream=\"flaky\"", "outcome=\"2xx\""]
        ),
        4.0
    );
    assert_eq!(
        sum(
            &m,
            "edgeslice_origin_retries_total",
            &["upstream=\"origin\""]
        ),
        0.0
    );
    for server in [&live, &dead_server] {
        assert!(
            m.contains_key(&format!(
                "edgeslice_breaker_state{{{server},upstream=\"flaky\"}}"
            )),
            "{server} has no breaker state:\n{text}"
        );
    }
    // Each group's servers now, and the lookups of its names that failed (none: addresses).
    for (upstream, servers) in [("flaky", 2.0), ("origin", 1.0)] {
        let group = format!("upstream=\"{upstream}\"");
        assert_eq!(
            sum(&m, "edgeslice_upstream_servers", &[&group]),
            servers,
            "{text}"
        );
        assert!(
            m.contains_key(&format!(
                "edgeslice_upstream_resolve_failures_total{{{group}}}"
            )),
            "{text}"
        );
    }
    assert_eq!(
        sum(&m, "edgeslice_cache_capacity_bytes", &["tier=\"memory\""]),
        (16u64 << 20) as f64
    );
    assert!(sum(&m, "edgeslice_cache_bytes", &["tier=\"memory\""]) >= size as f64);
    assert_eq!(
        sum(&m, "edgeslice_connections_max", &["listener=\"admin\""]),
        edgeslice::server::ADMIN_MAX_CONNECTIONS as f64
    );
    assert!(
        sum(
            &m,
            "edgeslice_connections_accepted_total",
            &["listener=\"client\""]
        ) >= 1.0
    );
    // No label carries a URL or a client address.
    assert!(!text.contains("a.bin"), "{text}");
    assert!(
        !text.contains("127.0.0.1\""),
        "client address as a label? {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_readers_are_counted_as_coalesced() {
    let origin = Origin::start().await;
    let yaml = format!(
        "cache:\n  chunk_size: 1MiB\n  memory:\n    capacity: 32MiB\nupstreams:\n  origin:\n    servers: [\"{}\"]\nroutes:\n  - path_prefix: /\n    upstream: origin\n",
        origin.addr()
    );
    let proxy = Proxy::start(&yaml);
    // Slow the origin so the readers overlap its fetches.
    origin.set_fault(common::origin::Fault::Slow {
        bytes_per_sec: 8 << 20,
    });
    let size: u64 = 4 << 20;
    let url = proxy.url(&format!("/obj/{size}/c.bin"));
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let resp = common::client().get(url).send().await.expect("request");
                resp.bytes().await.expect("body").len() as u64
            })
        })
        .collect();
    for r in readers {
        assert_eq!(r.await.expect("reader"), size);
    }
    let (text, m) = scrape_until(&proxy, |m| {
        sum(m, "edgeslice_http_requests_total", &[]) >= 8.0
    })
    .await;
    assert!(
        sum(&m, "edgeslice_cache_coalesced_total", &[]) >= 1.0,
        "eight overlapping cold readers never joined a fetch:\n{text}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (text, m) = scrape(&proxy).await;
    assert_eq!(
        sum(&m, "edgeslice_origin_response_bytes_total", &[]),
        origin.body_bytes_sent() as f64,
        "{text}"
    );
    assert!(origin.body_bytes_sent() < 2 * size, "coalescing failed");
}
