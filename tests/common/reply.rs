//! Requests to the proxy and what came back, for the RFC 9111 suites (tests/freshness.rs,
//! tests/rfc9111.rs): a config with 64 KiB chunks, whole-object and range GETs checked against
//! the origin's deterministic bytes, and the origin's log filtered by path.

use super::origin::{content, Origin, RequestRecord};
use super::proxy::Proxy;
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use std::future::Future;
use std::time::{Duration, Instant};

/// The chunk size of [`config`].
pub const CHUNK: u64 = 64 * 1024;

/// Run a test body, failing it if it takes longer than `limit`.
pub async fn within<F: Future<Output = ()>>(limit: Duration, body: F) {
    tokio::time::timeout(limit, body)
        .await
        .expect("test exceeded its time limit");
}

/// One caching route to `origin`, 64 KiB chunks, memory and disk tiers; `extra_cache` is
/// inserted under `cache:` (e.g. `"  default_ttl: 60s\n"`).
pub fn config(origin: &Origin, extra_cache: &str) -> String {
    format!(
        "cache:\n  chunk_size: 64KiB\n{extra_cache}  memory:\n    capacity: 64MiB\n  disk:\n    path: {{DIR}}/cache\n    capacity: 64MiB\nupstreams:\n  origin:\n    servers: [\"{}\"]\n    connect_timeout: 500ms\n    read_timeout: 2s\nroutes:\n  - path_prefix: /\n    upstream: origin\n    cache: true\n",
        origin.addr()
    )
}

/// Start the proxy off the async threads, so the test's time limit also covers the start.
pub async fn start(yaml: String) -> Proxy {
    tokio::task::spawn_blocking(move || Proxy::start(&yaml))
        .await
        .expect("proxy start")
}

/// A client that never follows redirects (so a 301 is seen as it is).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .expect("reqwest client")
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn cache_status(&self) -> &str {
        self.header("cache-status").unwrap_or("")
    }

    pub fn age(&self) -> Option<u64> {
        self.header("age").and_then(|v| v.trim().parse().ok())
    }
}

/// Send, returning an error when the response or its body failed (e.g. a truncated body); the
/// error names the status, Content-Length, Cache-Status and how many body bytes arrived.
pub async fn try_send(req: reqwest::RequestBuilder) -> Result<Reply, String> {
    let mut resp = req.send().await.map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => body.extend_from_slice(&c),
            Ok(None) => break,
            Err(e) => {
                let h = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_string()
                };
                return Err(format!(
                    "body of {status} (content-length {}, content-range {}, cache-status {:?}) failed after {} bytes: {e}",
                    h("content-length"),
                    h("content-range"),
                    h("cache-status"),
                    body.len()
                ));
            }
        }
    }
    Ok(Reply {
        status,
        headers,
        body,
    })
}

pub async fn send(req: reqwest::RequestBuilder) -> Reply {
    try_send(req).await.expect("request failed")
}

pub fn get(proxy: &Proxy, path: &str) -> reqwest::RequestBuilder {
    client().get(proxy.url(path))
}

pub fn range(proxy: &Proxy, path: &str, a: u64, b: u64) -> reqwest::RequestBuilder {
    get(proxy, path).header("range", format!("bytes={a}-{b}"))
}

/// GET the whole object and check it is exactly version `version` of `path`.
pub async fn get_whole(proxy: &Proxy, path: &str, size: u64, version: u32) -> Reply {
    let r = send(get(proxy, path)).await;
    assert_eq!(r.status, StatusCode::OK, "GET {path}");
    assert_eq!(r.body.len() as u64, size, "GET {path}: length");
    assert!(
        r.body == content(path, version, 0..size),
        "GET {path}: bytes differ from version {version}"
    );
    r
}

/// GET `bytes=a-b` (inclusive) and check it is a 206 with exactly those bytes.
pub async fn get_range(proxy: &Proxy, path: &str, a: u64, b: u64, version: u32) -> Reply {
    let r = send(range(proxy, path, a, b)).await;
    assert_eq!(
        r.status,
        StatusCode::PARTIAL_CONTENT,
        "GET {path} bytes={a}-{b}"
    );
    assert!(
        r.body == content(path, version, a..b + 1),
        "GET {path} bytes={a}-{b}: bytes differ from version {version}"
    );
    r
}

/// Requests the origin logged for `path` (query included in the record's path).
pub fn records_for(origin: &Origin, path: &str) -> Vec<RequestRecord> {
    origin
        .log()
        .into_iter()
        .filter(|r| r.path == path)
        .collect()
}

/// Origin requests as one line each, with the headers that tell fills apart.
pub fn describe(log: &[RequestRecord]) -> Vec<String> {
    log.iter()
        .map(|r| {
            let mut s = format!("{} {}", r.method, r.path);
            for n in [
                "range",
                "if-none-match",
                "if-modified-since",
                "if-range",
                "cache-control",
                "authorization",
                "x-variant",
            ] {
                if let Some(v) = r.header(n) {
                    s.push_str(&format!(" [{n}: {v}]"));
                }
            }
            s
        })
        .collect()
}

/// Poll until `path` has at least `n` origin requests, for at most `within`.
pub async fn wait_records(origin: &Origin, path: &str, n: usize, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if records_for(origin, path).len() >= n {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
