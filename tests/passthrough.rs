//! Pass-through proxying: streaming both ways with bounded memory, forwarded and hop-by-hop
//! headers, request ids, and the errors clients see (404, 502, 504, 400).

mod common;

use common::origin::{content, Fault, Origin};
use common::proxy::{free_port, Proxy};
use futures::StreamExt;
use std::io::{Read, Write};
use std::time::Duration;

fn config(servers: &[String], read_timeout: &str) -> String {
    let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "upstreams:\n  origin:\n    servers: [{}]\n    connect_timeout: 500ms\n    read_timeout: {read_timeout}\nroutes:\n  - host: only.example\n    path_prefix: /\n    upstream: origin\n    cache: false\n  - path_prefix: /\n    upstream: origin\n    cache: false\n",
        list.join(", ")
    )
}

const MIB: u64 = 1 << 20;
/// Memory growth allowed while 200 MiB stream through: a fraction of the transfer, so any
/// whole-body buffering fails the test.
const RSS_GROWTH_LIMIT_KIB: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_200mib_streams_exact_bytes_in_bounded_memory() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&config(&[origin.addr().to_string()], "5s"));
    let size = 200 * MIB;
    let path = format!("/download/{size}");
    let base_rss = proxy.rss_kib();
    let resp = common::client().get(proxy.url(&path)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut offset = 0u64;
    let mut peak = 0;
    while let Some(piece) = stream.next().await {
        let piece = piece.expect("body piece");
        let want = content(&path, 0, offset..offset + piece.len() as u64);
        assert!(
            piece[..] == want[..],
            "byte mismatch in piece at offset {offset}"
        );
        offset += piece.len() as u64;
        peak = peak.max(proxy.rss_kib());
    }
    assert_eq!(offset, size);
    let growth = proxy.peak_rss_kib().max(peak).saturating_sub(base_rss);
    println!("download: base rss {base_rss} KiB, growth {growth} KiB over {size} bytes");
    assert!(
        growth < RSS_GROWTH_LIMIT_KIB,
        "proxy memory grew by {growth} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_200mib_streams_exact_bytes_in_bounded_memory() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&config(&[origin.addr().to_string()], "5s"));
    let size = 200 * MIB;
    let piece = 256 * 1024u64;
    let base_rss = proxy.rss_kib();
    let mut crc = crc32fast::Hasher::new();
    let mut pieces = Vec::new();
    let mut off = 0;
    while off < size {
        let end = (off + piece).min(size);
        let bytes = content("/upload", 0, off..end);
        crc.update(&bytes);
        pieces.push(off..end);
        off = end;
    }
    let want_crc = crc.finalize();
    let body = futures::stream::iter(pieces)
        .map(|r| Ok::<_, std::io::Error>(bytes::Bytes::from(content("/upload", 0, r))));
    let resp = common::client()
        .put(proxy.url("/upload"))
        .header("content-length", size.to_string())
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert_eq!(text.trim(), format!("len={size} crc={want_crc:08x}"));
    let growth = proxy.peak_rss_kib().saturating_sub(base_rss);
    println!("upload: base rss {base_rss} KiB, growth {growth} KiB over {size} bytes");
    assert!(
        growth < RSS_GROWTH_LIMIT_KIB,
        "proxy memory grew by {growth} KiB"
    );
    let rec = origin
        .log()
        .into_iter()
        .find(|r| r.method == "PUT")
        .expect("PUT reached origin");
    assert_eq!(rec.body_len, size);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_404_with_request_id() {
    let origin = Origin::start().await;
    // Only one route, for one host: any other host has no route.
    let yaml = format!(
        "upstreams:\n  origin:\n    servers: [\"{}\"]\nroutes:\n  - host: only.example\n    upstream: origin\n    cache: false\n",
        origin.addr()
    );
    let proxy = Proxy::start(&yaml);
    let resp = common::client()
        .get(proxy.url("/x"))
        .header("host", "other.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let body = resp.text().await.unwrap();
    assert!(body.starts_with("404 ") && body.contains(&rid), "{body}");
    assert_eq!(origin.requests(), 0);
    let resp = common::client()
        .get(proxy.url("/echo-headers"))
        .header("host", "only.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_502() {
    let dead = format!("127.0.0.1:{}", free_port());
    let proxy = Proxy::start(&config(&[dead], "5s"));
    let resp = common::client()
        .get(proxy.url("/download/10"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert!(resp.headers().contains_key("x-request-id"));
    let body = resp.text().await.unwrap();
    assert!(body.starts_with("502 "), "{body}");
    let rid = body
        .lines()
        .nth(1)
        .unwrap_or("")
        .trim_start_matches("request id: ")
        .to_string();
    assert!(
        proxy.log_contains(&rid),
        "the failure is logged with its request id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_upstream_is_504() {
    let origin = Origin::start().await;
    origin.set_fault(Fault::Hang);
    let proxy = Proxy::start(&config(&[origin.addr().to_string()], "300ms"));
    let started = std::time::Instant::now();
    let resp = common::client()
        .get(proxy.url("/download/10"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(30));
    let body = resp.text().await.unwrap();
    assert!(body.starts_with("504 "), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_is_kept_or_generated_and_propagated() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&config(&[origin.addr().to_string()], "5s"));
    let resp = common::client()
        .get(proxy.url("/echo-headers"))
        .header("x-request-id", "client-chosen-42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "client-chosen-42");
    let seen = origin.log().pop().unwrap();
    assert_eq!(seen.header("x-request-id"), Some("client-chosen-42"));

    let resp = common::client()
        .get(proxy.url("/echo-headers"))
        .send()
        .await
        .unwrap();
    let generated = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(generated.len(), 32, "{generated}");
    let seen = origin.log().pop().unwrap();
    assert_eq!(seen.header("x-request-id"), Some(generated.as_str()));
    assert!(
        proxy.log_contains(&format!("rid={generated}")),
        "access log names the request id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_added_and_hop_by_hop_removed() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&config(&[origin.addr().to_string()], "5s"));
    let resp = common::client()
        .get(proxy.url("/echo-headers"))
        .header("host", "media.example")
        .header("connection", "keep-alive, x-private-hop")
        .header("x-private-hop", "secret")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-end-to-end", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["via"]
        .to_str()
        .unwrap()
        .contains("1.1 edgeslice"));
    let seen = origin.log().pop().unwrap();
    assert_eq!(seen.header("host"), Some("media.example"));
    // The client is not a trusted proxy (`server.trusted_proxies`): its own X-Forwarded-For
    // claim is replaced by its address.
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("via"), Some("1.1 edgeslice"));
    assert_eq!(seen.header("x-end-to-end"), Some("kept"));
    for hop in ["x-private-hop", "keep-alive", "te"] {
        assert_eq!(seen.header(hop), None, "{hop} was forwarded");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_is_400_and_proxy_survives() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&config(&[origin.addr().to_string()], "5s"));
    for raw in [
        &b"GET / HTTP/1.1\r\nHost: a\r\nBad Header Line\r\n\r\n"[..],
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n",
    ] {
        let mut s = std::net::TcpStream::connect(proxy.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(raw).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        assert!(
            text.starts_with("HTTP/1.1 400"),
            "{:?} -> {text}",
            String::from_utf8_lossy(raw)
        );
    }
    let resp = common::client()
        .get(proxy.url("/echo-headers"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "proxy still serves after malformed input"
    );
    assert!(!proxy.log().contains("panicked"));
}
