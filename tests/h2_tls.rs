//! HTTP/2 on a TLS listener (`h2` chosen by ALPN), against the real binary: curl `--http2`
//! for whole objects, ranges and multi-range, cold and warm; the `h2` crate's client over
//! OpenSSL for what a browser never does (rapid reset) and for connections left idle at the
//! cap. tests/h2.rs covers the same HTTP/2 serving on h2c in more depth (the code past the
//! handshake is one); this file shows the TLS listener hands its HTTP/2 connections to it.

mod common;

use bytes::Bytes;
use common::multipart_parts;
use common::origin::{content, Fault, Origin};
use common::proxy::Proxy;
use common::tls::{CertFiles, Got, TestCa};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A cached route `/obj/` (256 KiB chunks) and a pass-through `/download/`.
fn config(origin: &Origin) -> String {
    format!(
        "cache:\n  chunk_size: 256KiB\n  memory:\n    capacity: 64MiB\nupstreams:\n  origin:\n    servers: [\"{}\"]\n    read_timeout: 5s\nroutes:\n  - path_prefix: /obj/\n    upstream: origin\n  - path_prefix: /download/\n    upstream: origin\n    cache: false\n",
        origin.addr()
    )
}

/// A TLS `listen` entry's lines after its address; `http2` left to its default unless given.
fn tls_entry(cert: &CertFiles, extra: &str) -> String {
    format!(
        "    tls:\n      certificates:\n        - {{cert: {}, key: {}}}\n{extra}",
        cert.cert.display(),
        cert.key.display()
    )
}

/// `curl --http2 --cacert CA https://localhost:PORT{path}` with `extra` args.
fn curl(ca: &Path, tls: SocketAddr, path: &str, extra: &[&str]) -> Got {
    common::tls::curl(ca, tls, "localhost", path, true, extra).expect("curl")
}

async fn curl_async(ca: &Path, tls: SocketAddr, path: &str, extra: &[&str]) -> Got {
    let ca = ca.to_path_buf();
    let path = path.to_string();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        curl(&ca, tls, &path, &extra)
    })
    .await
    .expect("curl task")
}

/// An HTTP/2 connection by the `h2` crate's client over TLS (ALPN `h2`), its connection task
/// returned to watch how it ends.
async fn h2_tls_connect(
    ca: &Path,
    tls: SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let mut b = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls()).unwrap();
    b.set_ca_file(ca).unwrap();
    b.set_alpn_protos(b"\x02h2").unwrap();
    let ssl = b
        .build()
        .configure()
        .unwrap()
        .into_ssl("localhost")
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(tls).await.expect("connect");
    let mut stream = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
    std::pin::Pin::new(&mut stream)
        .connect()
        .await
        .expect("TLS handshake");
    assert_eq!(
        stream.ssl().selected_alpn_protocol(),
        Some(&b"h2"[..]),
        "ALPN chose h2"
    );
    let (send, conn) = h2::client::handshake(stream).await.expect("h2 handshake");
    (send, tokio::spawn(conn))
}

/// One GET on `send`'s connection: status and the whole body.
async fn h2_get(
    send: &h2::client::SendRequest<Bytes>,
    tls: SocketAddr,
    path: &str,
) -> (u16, Vec<u8>) {
    let mut send = send.clone().ready().await.expect("ready");
    let req = http::Request::get(format!("https://localhost:{}{path}", tls.port()))
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true).expect("send");
    let resp = tokio::time::timeout(Duration::from_secs(20), resp)
        .await
        .expect("answered in time")
        .expect("response");
    let (parts, mut body) = resp.into_parts();
    let mut out = Vec::new();
    while let Some(piece) = body.data().await {
        let piece = piece.expect("body piece");
        let _ = body.flow_control().release_capacity(piece.len());
        out.extend_from_slice(&piece);
    }
    (parts.status.as_u16(), out)
}

fn ca_and_site() -> (TestCa, CertFiles, PathBuf) {
    let mut ca = TestCa::new("edgeslice h2 test CA");
    let site = ca.issue(&["localhost"], 90);
    let ca_path = ca.ca_path().to_path_buf();
    (ca, site, ca_path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_by_alpn_objects_ranges_and_multi_range_are_byte_exact_cold_and_warm() {
    let origin = Origin::start().await;
    let (_ca, site, ca) = ca_and_site();
    let proxy = Proxy::start_tls(&config(&origin), "", &tls_entry(&site, ""));
    let tls = proxy.tls_addr.unwrap();
    let size: u64 = 1_500_000;

    // Whole object, cold then warm: one fill, then hits.
    let path = format!("/obj/{size}/whole");
    let want = content(&path, 0, 0..size);
    for round in ["cold", "warm"] {
        let got = curl_async(&ca, tls, &path, &[]).await;
        assert_eq!(got.version, "2", "{round}: HTTP/2 by ALPN");
        assert_eq!(got.status, 200, "{round}: {}", got.headers);
        assert!(got.body == want, "{round}: {} bytes differ", got.body.len());
    }
    let fills = origin.requests();
    assert!(fills >= 1);

    // Single ranges across chunk boundaries, a tail, a suffix; cold then warm.
    let rpath = format!("/obj/{size}/ranges");
    let rwant = content(&rpath, 0, 0..size);
    for round in ["cold", "warm"] {
        for (range, from, to) in [
            ("0-0", 0u64, 1u64),
            ("262140-262150", 262_140, 262_151),
            ("1000000-", 1_000_000, size),
            ("-700", size - 700, size),
        ] {
            let got = curl_async(&ca, tls, &rpath, &["-r", range]).await;
            assert_eq!(got.version, "2");
            assert_eq!(got.status, 206, "{round} {range}: {}", got.headers);
            assert!(
                got.body == rwant[from as usize..to as usize],
                "{round} {range}: body differs"
            );
            let cr = format!("content-range: bytes {from}-{}/{size}", to - 1);
            assert!(
                got.headers.to_ascii_lowercase().contains(&cr),
                "{round} {range}: {}",
                got.headers
            );
        }
        // Multi-range: a multipart/byteranges body whose parts are exact, in order.
        let got = curl_async(&ca, tls, &rpath, &["-r", "10-19,300000-300099,1499990-"]).await;
        assert_eq!(got.version, "2");
        assert_eq!(got.status, 206, "{round}: {}", got.headers);
        let boundary = got
            .headers
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-type")
                    .then(|| v.trim().strip_prefix("multipart/byteranges; boundary="))?
            })
            .map(|b| b.trim().to_string())
            .unwrap_or_else(|| panic!("{round}: not multipart: {}", got.headers));
        let parts = multipart_parts(&got.body, &boundary);
        let want_parts = [
            (10usize, 20usize),
            (300_000, 300_100),
            (1_499_990, size as usize),
        ];
        assert_eq!(parts.len(), want_parts.len(), "{round}");
        for ((cr, data), (from, to)) in parts.iter().zip(want_parts) {
            assert_eq!(cr, &format!("bytes {from}-{}/{size}", to - 1));
            assert!(data[..] == rwant[from..to], "{round}: part {from}-{to}");
        }
    }
    let after_cold = origin.requests();
    // Warm: nothing more from the origin for either object.
    let got = curl_async(&ca, tls, &path, &["-r", "5-5000"]).await;
    assert_eq!(got.status, 206);
    assert!(got.body == want[5..5001]);
    assert_eq!(
        origin.requests(),
        after_cold,
        "a warm request reached the origin"
    );

    // The metrics and the access log name the protocol.
    let m = proxy.metrics().await;
    assert!(
        m.lines().any(
            |l| l.starts_with("edgeslice_http_requests_total") && l.contains("protocol=\"h2\"")
        ),
        "no h2-labelled request counter"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_false_offers_http1_only() {
    let origin = Origin::start().await;
    let (_ca, site, ca) = ca_and_site();
    let proxy = Proxy::start_tls(
        &config(&origin),
        "",
        &tls_entry(&site, "    http2: false\n"),
    );
    let tls = proxy.tls_addr.unwrap();
    let path = "/obj/5000/h1";
    let got = curl_async(&ca, tls, path, &[]).await;
    assert_eq!(got.version, "1.1", "ALPN chose http/1.1");
    assert_eq!(got.status, 200);
    assert!(got.body == content(path, 0, 0..5000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_client_over_tls_gets_goaway_while_another_is_served() {
    let origin = Origin::start().await;
    let (_ca, site, ca) = ca_and_site();
    let proxy = Proxy::start_tls(
        &config(&origin),
        "  http2_max_streams: 16\n",
        &tls_entry(&site, ""),
    );
    let tls = proxy.tls_addr.unwrap();
    // Every origin answer is slow: a stream reset after it was accepted leaves work behind.
    origin.set_fault(Fault::DelayHeaders(Duration::from_millis(1500)));
    let (send, conn) = h2_tls_connect(&ca, tls).await;
    // Open a stream, let the server take it, drop it (RST_STREAM CANCEL); again, each on a
    // distinct URL, until the server ends the connection.
    let attacker = tokio::spawn(async move {
        let mut sent = 0u32;
        for i in 0..5_000u32 {
            let Ok(mut s) = send.clone().ready().await else {
                break;
            };
            let req = http::Request::get(format!(
                "https://localhost:{}/download/{}/rr{i}",
                tls.port(),
                1000 + i
            ))
            .body(())
            .unwrap();
            let Ok((resp, _)) = s.send_request(req, true) else {
                break;
            };
            tokio::time::sleep(Duration::from_millis(2)).await;
            drop(resp);
            sent += 1;
        }
        sent
    });
    // Meanwhile a well-behaved client on its own connection.
    let path = "/obj/300000/normal";
    let got = curl_async(&ca, tls, path, &[]).await;
    assert_eq!((got.version.as_str(), got.status), ("2", 200));
    assert!(got.body == content(path, 0, 0..300_000));

    let ended = tokio::time::timeout(Duration::from_secs(30), conn)
        .await
        .expect("the connection ended")
        .unwrap();
    let sent = attacker.await.unwrap();
    let e = ended.expect_err("ended by the server's GOAWAY");
    assert!(e.is_go_away(), "{e}");
    assert_eq!(
        e.reason(),
        Some(h2::Reason::ENHANCE_YOUR_CALM),
        "{e} after {sent} streams"
    );
    assert!(sent < 2_000, "cut off early: {sent} streams");
    assert!(proxy.log_contains("ENHANCE_YOUR_CALM"));
    let requests = origin.requests();
    assert!(
        requests <= 2 * 16 + 100 + 2 + 2,
        "{requests} origin requests"
    );
    origin.clear_fault();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_h2_tls_connections_are_reclaimed_at_the_cap() {
    let origin = Origin::start().await;
    let (_ca, site, ca) = ca_and_site();
    let proxy = Proxy::start_tls(
        &config(&origin),
        "  max_connections: 4\n  keepalive_timeout: 60s\n",
        &tls_entry(&site, ""),
    );
    let tls = proxy.tls_addr.unwrap();
    // Four HTTP/2 connections, each served one request, then idle: the cap is full.
    let mut idle = Vec::new();
    for i in 0..4 {
        let (send, conn) = h2_tls_connect(&ca, tls).await;
        let path = format!("/obj/100/idle{i}");
        let (status, body) = h2_get(&send, tls, &path).await;
        assert_eq!(status, 200);
        assert!(body == content(&path, 0, 0..100));
        idle.push((send, conn));
        // Distinct idle-since times (the table's clock counts milliseconds).
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A newcomer is admitted: the idle connections make room (a reclaim closes up to 16).
    let path = "/obj/2000/newcomer";
    let got = curl_async(&ca, tls, path, &[]).await;
    assert_eq!((got.version.as_str(), got.status), ("2", 200));
    assert!(got.body == content(path, 0, 0..2000));
    let stats = proxy.stats().await;
    assert!(stats["client_connections_reclaimed"] >= 1, "{stats:?}");
    assert_eq!(stats["client_connections_refused"], 0, "{stats:?}");
    // Each idle connection ended by the server's GOAWAY NO_ERROR (the client still holds it
    // open: its handle is alive), the h2 client ending cleanly on it.
    let mut ended = 0;
    for (i, (send, conn)) in idle.into_iter().enumerate() {
        let r = tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .unwrap_or_else(|_| panic!("connection {i} still open"))
            .unwrap();
        assert!(
            r.as_ref()
                .map_or_else(|e| e.reason() == Some(h2::Reason::NO_ERROR), |_| true),
            "connection {i}: {r:?}"
        );
        drop(send);
        ended += 1;
    }
    assert_eq!(ended, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_h2_streams_hold_memory_bounded_by_configuration() {
    let origin = Origin::start().await;
    let (_ca, site, ca) = ca_and_site();
    let proxy = Proxy::start_tls(
        &config(&origin),
        "  http2_max_streams: 64\n",
        &tls_entry(&site, ""),
    );
    let tls = proxy.tls_addr.unwrap();
    // One response first, so that what every connection and stream shares is in place.
    let got = curl_async(&ca, tls, "/download/100000/warm", &[]).await;
    assert_eq!((got.version.as_str(), got.status), ("2", 200));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = proxy.rss_kib();
    // 4 connections × 64 streams of 4 MB pass-through responses, none of them read: each
    // stream's window (64 KiB) fills and the proxy must stop there, holding at most its send
    // buffer and one piece from the origin per stream, not the 1 GB the responses add up to.
    let (conns, streams, size) = (4usize, 64usize, 4_000_000u64);
    let mut held = Vec::new();
    let mut kept = Vec::new();
    for c in 0..conns {
        let (send, conn) = h2_tls_connect(&ca, tls).await;
        for s in 0..streams {
            let mut ready = send.clone().ready().await.expect("ready");
            let req = http::Request::get(format!(
                "https://localhost:{}/download/{size}/stall-{c}-{s}",
                tls.port()
            ))
            .body(())
            .unwrap();
            let (resp, _) = ready.send_request(req, true).expect("send");
            held.push(resp);
        }
        kept.push((send, conn));
    }
    // Let every stream fill its window; the responses' heads arrive meanwhile. Then the
    // proxy holds steady: what it holds is bounded, not growing with the bodies' length.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let settled = proxy.rss_kib();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = proxy.rss_kib();
    let grown = after.saturating_sub(before);
    let n = (conns * streams) as u64;
    eprintln!(
        "RSS {before} KiB -> {settled} KiB (3 s) -> {after} KiB (6 s): {} KiB per stalled h2 stream over TLS (pass-through, each with its origin connection)",
        grown / n
    );
    assert!(
        after <= settled + settled / 20,
        "RSS still growing with stalled streams: {settled} KiB then {after} KiB"
    );
    // Per stream: its 64 KiB send buffer, the origin connection's read buffer and pieces,
    // the stream's and the proxy session's state; far below the 4 MB each body holds.
    let allowed = n * 320;
    assert!(
        grown <= allowed,
        "stalled streams grew RSS by {grown} KiB (allowed {allowed} KiB)"
    );
    assert!(
        origin.requests() >= (conns * streams) as u64,
        "every stream reached the origin: {}",
        origin.requests()
    );
    drop(held);
    drop(kept);
}
