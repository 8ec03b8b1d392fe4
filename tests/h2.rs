//! HTTP/2 toward clients, on an `h2c` listener (prior-knowledge cleartext HTTP/2 beside
//! HTTP/1.1), against the real binary: real clients (curl `--http2-prior-knowledge`, nghttp,
//! h2load), the `h2` crate's client for many streams on one connection, and a raw-frame client
//! for what well-behaved clients never do (rapid reset, CONTINUATION floods, streams past the
//! limit).
//!
//! Every body is checked byte for byte against the origin's content, and a later hit's bytes
//! against it too.

mod common;

use bytes::Bytes;
use common::multipart_parts;
use common::origin::{content, Fault, Origin};
use common::proxy::Proxy;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KIB: u64 = 1024;

/// A cached route `/obj/` on `origin` (256 KiB chunks), and a pass-through `/download/`.
fn config(origin: &Origin) -> String {
    format!(
        "cache:\n  chunk_size: 256KiB\n  memory:\n    capacity: 64MiB\nupstreams:\n  origin:\n    servers: [\"{}\"]\nroutes:\n  - path_prefix: /obj/\n    upstream: origin\n  - path_prefix: /download/\n    upstream: origin\n    cache: false\n",
        origin.addr()
    )
}

/// An HTTP/2 connection by the `h2` crate's client (prior knowledge).
async fn h2_connect(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// One GET on `send`'s connection: status, headers and the whole body.
async fn h2_get(
    send: &h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    path: &str,
    range: Option<&str>,
) -> (u16, http::HeaderMap, Vec<u8>) {
    let mut send = send.clone().ready().await.expect("ready");
    let mut req = http::Request::get(format!("http://{addr}{path}"));
    if let Some(r) = range {
        req = req.header("range", r);
    }
    let (resp, _) = send
        .send_request(req.body(()).expect("request"), true)
        .expect("send");
    let resp = tokio::time::timeout(Duration::from_secs(30), resp)
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
    (parts.status.as_u16(), parts.headers, out)
}

// ---- raw frames --------------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const ENHANCE_YOUR_CALM: u32 = 0xb;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A literal header field without indexing, its name taken from the static table at `index`
/// (values under 128 bytes).
fn literal(index: u8, value: &str) -> Vec<u8> {
    assert!(index < 16 && value.len() < 127);
    let mut out = vec![index, value.len() as u8];
    out.extend_from_slice(value.as_bytes());
    out
}

/// An HPACK header block for `GET http://<authority><path>`.
fn get_block(authority: &str, path: &str) -> Vec<u8> {
    // :method GET (2), :scheme http (6), then :path (4) and :authority (1) as literals.
    let mut b = vec![0x82, 0x86];
    b.extend(literal(4, path));
    b.extend(literal(1, authority));
    b
}

/// A frame read from the server: (type, flags, stream id, payload).
type Frame = (u8, u8, u32, Vec<u8>);

async fn read_frame(r: &mut (impl AsyncReadExt + Unpin)) -> Option<Frame> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await.ok()?;
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], stream, payload))
}

/// A raw client connected: preface and an empty SETTINGS sent.
async fn raw_connect(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&[PREFACE, &frame(SETTINGS, 0, 0, &[])].concat())
        .await
        .expect("preface");
    s
}

/// Everything the server sends on `r` until it closes (or `limit` passes): the frames, and
/// whether it closed. SETTINGS are acknowledged on `w`.
async fn read_until_closed(
    mut r: tokio::net::tcp::OwnedReadHalf,
    w: std::sync::Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>,
    limit: Duration,
) -> (Vec<Frame>, bool) {
    let mut frames = Vec::new();
    let closed = tokio::time::timeout(limit, async {
        while let Some(f) = read_frame(&mut r).await {
            if f.0 == SETTINGS && f.1 & ACK == 0 {
                let _ = w
                    .lock()
                    .await
                    .write_all(&frame(SETTINGS, ACK, 0, &[]))
                    .await;
            }
            frames.push(f);
        }
    })
    .await
    .is_ok();
    (frames, closed)
}

fn goaway_code(frames: &[Frame]) -> Option<u32> {
    frames.iter().find(|f| f.0 == GOAWAY).map(|f| {
        let p = &f.3;
        u32::from_be_bytes([p[4], p[5], p[6], p[7]])
    })
}

/// The server's SETTINGS values (identifier, value).
fn settings_of(frames: &[Frame]) -> Vec<(u16, u32)> {
    frames
        .iter()
        .filter(|f| f.0 == SETTINGS && f.1 & ACK == 0)
        .flat_map(|f| {
            f.3.chunks_exact(6)
                .map(|c| {
                    (
                        u16::from_be_bytes([c[0], c[1]]),
                        u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn curl_h2c(url: &str, range: Option<&str>) -> (String, Vec<u8>) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "--http2-prior-knowledge",
        "--max-time",
        "30",
        "-w",
        "\n%{http_version} %{http_code}",
    ]);
    if let Some(r) = range {
        cmd.args(["-H", &format!("Range: {r}")]);
    }
    let out = cmd.arg(url).output().expect("run curl");
    let mut body = out.stdout;
    let at = body
        .iter()
        .rposition(|&b| b == b'\n')
        .expect("curl -w line");
    let tail = String::from_utf8_lossy(&body[at + 1..]).to_string();
    body.truncate(at);
    (tail, body)
}

// ---- tests -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_h2c_whole_objects_and_ranges_cold_and_warm_beside_http1() {
    let origin = Origin::start().await;
    let proxy = Proxy::start_h2c(&config(&origin), "");
    let size = 700 * KIB;
    let path = "/obj/716800/curl";
    let url = proxy.url(path);
    let cases: [(Option<&str>, std::ops::Range<u64>, &str); 4] = [
        (None, 0..size, "2 200"),
        (Some("bytes=1000-299999"), 1000..300_000, "2 206"),
        (Some("bytes=-5000"), size - 5000..size, "2 206"),
        (None, 0..size, "2 200"),
    ];
    let mut after_cold = 0;
    for round in ["cold", "warm"] {
        if round == "warm" {
            after_cold = origin.requests();
            // At most one origin request per 256 KiB chunk.
            assert!((1..=3).contains(&after_cold), "{after_cold}");
        }
        for (range, want, status) in &cases {
            let (tail, body) = curl_h2c(&url, *range);
            assert_eq!(tail, *status, "{round} {range:?}");
            assert!(
                body == content(path, 0, want.clone()),
                "{round} {range:?}: {} bytes, not the object's",
                body.len()
            );
        }
    }
    // The warm round was served from the cache.
    assert_eq!(origin.requests(), after_cold);
    // HTTP/1.1 on the same listener: still served, the same bytes (a hit).
    let out = Command::new("curl")
        .args(["-s", "--http1.1", "-w", "\n%{http_version}", &url])
        .output()
        .unwrap();
    let mut body = out.stdout;
    let at = body.iter().rposition(|&b| b == b'\n').unwrap();
    assert_eq!(&body[at + 1..], b"1.1");
    body.truncate(at);
    assert!(body == content(path, 0, 0..size));
    assert_eq!(origin.requests(), after_cold);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_on_one_connection_get_exact_bytes_cold_and_warm() {
    let origin = Origin::start().await;
    let proxy = Proxy::start_h2c(&config(&origin), "  http2_max_streams: 16\n");
    let send = h2_connect(proxy.addr).await;
    let addr = proxy.addr;
    // One request first: the client then has the server's SETTINGS (16 streams) and queues
    // past them, rather than racing them (streams opened before the SETTINGS arrive may be
    // refused, as RFC 9113 §5.1.2 allows).
    let (status, _, body) = h2_get(&send, addr, "/obj/100/settings", None).await;
    assert_eq!(status, 200);
    assert!(body == content("/obj/100/settings", 0, 0..100));
    origin.reset_stats();
    // 8 objects × (whole, two ranges) = 24 streams at once on one connection, twice.
    let mut after_cold = 0;
    for round in ["cold", "warm"] {
        if round == "warm" {
            after_cold = origin.requests();
            // At most one origin request per chunk (two per object), despite the streams.
            assert!((8..=16).contains(&after_cold), "{after_cold}");
        }
        let mut tasks = Vec::new();
        for i in 0..8u64 {
            let size = 300 * KIB + i * 7919;
            let path = format!("/obj/{size}/many-{i}");
            for (range, want) in [
                (None, 0..size),
                (
                    Some(format!("bytes={}-{}", i * 1000, 270_000)),
                    i * 1000..270_001,
                ),
                (Some(format!("bytes={}-", size - 333)), size - 333..size),
            ] {
                let send = send.clone();
                let path = path.clone();
                tasks.push(tokio::spawn(async move {
                    let (status, _, body) = h2_get(&send, addr, &path, range.as_deref()).await;
                    let want_status = if range.is_some() { 206 } else { 200 };
                    assert_eq!(status, want_status, "{path} {range:?}");
                    assert!(
                        body == content(&path, 0, want.clone()),
                        "{path} {range:?}: {} bytes not the object's",
                        body.len()
                    );
                }));
            }
        }
        for t in tasks {
            t.await.unwrap_or_else(|e| panic!("{round}: {e}"));
        }
    }
    assert_eq!(origin.requests(), after_cold, "the warm round was all hits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_range_over_h2_is_an_exact_multipart_body() {
    let origin = Origin::start().await;
    let proxy = Proxy::start_h2c(&config(&origin), "");
    let send = h2_connect(proxy.addr).await;
    let size = 600 * KIB;
    let path = "/obj/614400/multi";
    // Warm it (a multi-range request on an object not yet kept is answered whole).
    let (status, _, body) = h2_get(&send, proxy.addr, path, None).await;
    assert_eq!(status, 200);
    assert!(body == content(path, 0, 0..size));
    let warmed = origin.requests();
    let ranges = [(0u64, 99u64), (200_000, 299_999), (size - 10, size - 1)];
    let header = format!(
        "bytes={}",
        ranges
            .iter()
            .map(|(a, b)| format!("{a}-{b}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    for round in 0..2 {
        let (status, headers, body) = h2_get(&send, proxy.addr, path, Some(&header)).await;
        assert_eq!(status, 206, "round {round}");
        let ct = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .expect("content-type")
            .to_string();
        let boundary = ct
            .split("boundary=")
            .nth(1)
            .expect("multipart/byteranges boundary")
            .trim_matches('"')
            .to_string();
        assert!(ct.starts_with("multipart/byteranges"), "{ct}");
        let parts = multipart_parts(&body, &boundary);
        assert_eq!(parts.len(), ranges.len());
        for ((range, data), (a, b)) in parts.iter().zip(ranges) {
            assert_eq!(range, &format!("bytes {a}-{b}/{size}"));
            assert!(*data == content(path, 0, a..b + 1), "part {range}");
        }
    }
    assert_eq!(
        origin.requests(),
        warmed,
        "the multi-range answers were hits"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_max_streams_is_advertised_and_excess_streams_are_refused() {
    let origin = Origin::start().await;
    let proxy = Proxy::start_h2c(&config(&origin), "  http2_max_streams: 8\n");
    // nghttp sees the value in the server's SETTINGS.
    let out = Command::new("nghttp")
        .args(["-nv", "-t", "20", &proxy.url("/obj/1000/nghttp")])
        .output()
        .expect("run nghttp");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("SETTINGS_MAX_CONCURRENT_STREAMS(0x03):8"),
        "{text}"
    );
    assert!(text.contains(":status: 200"), "{text}");

    // A raw client opening 12 streams at once on hanging requests: 8 are taken, the 4 past
    // the limit are refused (RST_STREAM REFUSED_STREAM).
    origin.set_fault(Fault::DelayHeaders(Duration::from_secs(3)));
    let s = raw_connect(proxy.addr).await;
    let (r, w) = s.into_split();
    let w = std::sync::Arc::new(tokio::sync::Mutex::new(w));
    let authority = proxy.addr.to_string();
    {
        let mut w = w.lock().await;
        for i in 0..12u32 {
            let block = get_block(&authority, &format!("/download/{}/s{i}", 100 + i));
            w.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1 + 2 * i, &block))
                .await
                .unwrap();
        }
    }
    let reader = tokio::spawn(read_until_closed(r, w.clone(), Duration::from_secs(6)));
    let (frames, _) = reader.await.unwrap();
    let settings = settings_of(&frames);
    assert!(settings.contains(&(0x3, 8)), "{settings:?}");
    let refused: Vec<u32> = frames
        .iter()
        .filter(|f| {
            f.0 == RST_STREAM
                && u32::from_be_bytes([f.3[0], f.3[1], f.3[2], f.3[3]]) == REFUSED_STREAM
        })
        .map(|f| f.2)
        .collect();
    assert_eq!(refused, vec![17, 19, 21, 23], "the four past the limit");
    // The eight taken were answered (after the origin's delay), completely.
    let answered: std::collections::BTreeSet<u32> = frames
        .iter()
        .filter(|f| f.0 == DATA && f.1 & END_STREAM != 0)
        .map(|f| f.2)
        .collect();
    assert_eq!(answered.len(), 8, "{answered:?}");
    assert_eq!(origin.requests(), 1 + 8, "nghttp's and the eight taken");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_client_gets_goaway_while_another_client_is_served() {
    let origin = Origin::start().await;
    let proxy = Proxy::start_h2c(&config(&origin), "  http2_max_streams: 16\n");
    // Every origin answer is slow: a stream reset after it was accepted leaves work behind.
    origin.set_fault(Fault::DelayHeaders(Duration::from_millis(1500)));
    let s = raw_connect(proxy.addr).await;
    let (r, mut w) = s.into_split();
    let authority = proxy.addr.to_string();
    let reader = tokio::spawn(async move {
        let mut r = r;
        let mut frames = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(f) = read_frame(&mut r).await {
                frames.push(f);
            }
        })
        .await
        .is_ok();
        (frames, closed)
    });
    // Open and reset streams in a loop, each on a distinct URL (no single flight to hide the
    // cost), as fast as the connection takes them; a pause now and then lets the server
    // accept each stream before its reset arrives (resets of streams not yet accepted are h2's
    // own limit).
    let attacker = tokio::spawn(async move {
        let mut sent = 0u32;
        for i in 0..5_000u32 {
            let id = 1 + 2 * i;
            let block = get_block(&authority, &format!("/download/{}/rr{i}", 1000 + i));
            if w.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, id, &block))
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
            if w.write_all(&frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()))
                .await
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        sent
    });
    // Meanwhile a well-behaved client on its own connection.
    let path = "/obj/300000/normal";
    let (tail, body) = tokio::task::spawn_blocking({
        let url = proxy.url(path);
        move || curl_h2c(&url, None)
    })
    .await
    .unwrap();
    assert_eq!(tail, "2 200");
    assert!(body == content(path, 0, 0..300_000));

    let (frames, closed) = reader.await.unwrap();
    let sent = attacker.await.unwrap();
    assert_eq!(
        goaway_code(&frames),
        Some(ENHANCE_YOUR_CALM),
        "GOAWAY ENHANCE_YOUR_CALM after {sent} open+reset streams"
    );
    assert!(closed, "the connection was closed");
    assert!(sent < 2_000, "cut off early: {sent} streams sent");
    assert!(proxy.log_contains("ENHANCE_YOUR_CALM"));
    // The work it started is bounded: at most twice the stream limit in flight, plus the
    // abandoned allowance, plus the normal client's two chunks.
    let requests = origin.requests();
    assert!(
        requests <= 2 * 16 + 100 + 2 + 2,
        "{requests} origin requests"
    );
    // And the proxy still serves, over h2c, exactly (a hit now).
    origin.clear_fault();
    let (tail, body) = curl_h2c(&proxy.url(path), None);
    assert_eq!(tail, "2 200");
    assert!(body == content(path, 0, 0..300_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_is_closed() {
    let origin = Origin::start().await;
    let proxy = Proxy::start_h2c(&config(&origin), "");
    let s = raw_connect(proxy.addr).await;
    let (r, w) = s.into_split();
    let w = std::sync::Arc::new(tokio::sync::Mutex::new(w));
    let reader = tokio::spawn(read_until_closed(r, w.clone(), Duration::from_secs(15)));
    let authority = proxy.addr.to_string();
    // HEADERS without END_HEADERS, then CONTINUATION frames of small header fields, without
    // end: the header block never completes.
    let mut sent = 0usize;
    {
        let mut w = w.lock().await;
        let block = get_block(&authority, "/obj/1000/flood");
        if w.write_all(&frame(HEADERS, END_STREAM, 1, &block))
            .await
            .is_ok()
        {
            let field = [literal(0, "").as_slice()].concat();
            // A literal with a new name: "x-f: v" (8 bytes), many per frame.
            let mut one = vec![0x00, 3];
            one.extend_from_slice(b"x-f");
            one.push(1);
            one.push(b'v');
            let _ = field;
            let payload: Vec<u8> = one.iter().copied().cycle().take(one.len() * 100).collect();
            for _ in 0..100_000 {
                if w.write_all(&frame(CONTINUATION, 0, 1, &payload))
                    .await
                    .is_err()
                {
                    break;
                }
                sent += 1;
            }
        }
    }
    let (frames, closed) = reader.await.unwrap();
    assert!(closed, "closed (after {sent} CONTINUATION frames)");
    let code = goaway_code(&frames);
    assert!(
        code == Some(ENHANCE_YOUR_CALM) || code == Some(0x1) || code == Some(0x9),
        "GOAWAY {code:?}"
    );
    assert!(sent < 100_000, "cut off before the flood ended: {sent}");
    assert_eq!(origin.requests(), 0, "the request never reached the origin");
    // The proxy still serves.
    let (tail, body) = curl_h2c(&proxy.url("/obj/1000/after"), None);
    assert_eq!(tail, "2 200");
    assert!(body == content("/obj/1000/after", 0, 0..1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_streams_of_one_client_share_its_rate() {
    let origin = Origin::start().await;
    let yaml = format!(
        "cache:\n  chunk_size: 256KiB\n  memory:\n    capacity: 64MiB\nupstreams:\n  origin:\n    servers: [\"{}\"]\nshaping:\n  classes:\n    standard:\n      rate: 256KiB/s\n      burst: 64KiB\nroutes:\n  - path_prefix: /obj/\n    upstream: origin\n    shaping: standard\n  - path_prefix: /download/\n    upstream: origin\n    cache: false\n    shaping: standard\n",
        origin.addr()
    );
    let proxy = Proxy::start_h2c(&yaml, "");
    let size = 384 * KIB;
    let send = h2_connect(proxy.addr).await;
    let addr = proxy.addr;
    // Cached and pass-through, each as two streams of one client on one connection: 768 KiB
    // at a shared 256 KiB/s takes ~2.75 s; with a rate each it would take ~1.25 s.
    for prefix in ["/obj", "/download"] {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..2 {
            let send = send.clone();
            let path = format!("{prefix}/{size}/shaped-{i}");
            tasks.push(tokio::spawn(async move {
                let (status, _, body) = h2_get(&send, addr, &path, None).await;
                assert_eq!(status, 200);
                assert!(body == content(&path, 0, 0..size), "{path}");
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(2000),
            "{prefix}: two streams took {took:?}: not sharing one rate"
        );
        assert!(took < Duration::from_secs(20), "{prefix}: {took:?}");
    }
    // A warm hit is shaped too, and exact.
    let path = format!("/obj/{size}/shaped-0");
    let started = Instant::now();
    let (status, _, body) = h2_get(&send, addr, &path, None).await;
    assert_eq!(status, 200);
    assert!(body == content(&path, 0, 0..size));
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "shaped at all"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_and_metrics_name_the_protocol() {
    let origin = Origin::start().await;
    let proxy = Proxy::start_h2c(
        &config(&origin),
        "  access_log_format: json\n  access_log_path: {DIR}/access.log\n",
    );
    let path = "/obj/5000/proto";
    let (tail, body) = curl_h2c(&proxy.url(path), None);
    assert_eq!(tail, "2 200");
    assert!(body == content(path, 0, 0..5000));
    let out = Command::new("curl")
        .args(["-s", "--http1.1", &proxy.url(path)])
        .output()
        .unwrap();
    assert!(out.stdout == content(path, 0, 0..5000));
    let log_path = proxy.dir.join("access.log");
    let deadline = Instant::now() + Duration::from_secs(5);
    let lines = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if lines.len() >= 2 || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let protocols: Vec<&str> = lines
        .iter()
        .filter(|v| v["path"] == path)
        .map(|v| v["protocol"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(protocols, vec!["h2", "http1"], "{lines:?}");
    let metrics = proxy.metrics().await;
    for protocol in ["h2", "http1"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("edgeslice_http_requests_total{")
                    && l.contains(&format!("protocol=\"{protocol}\""))
                    && l.ends_with(" 1")),
            "{protocol}: {metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_h2_connections_are_reclaimed_at_the_cap_and_after_keepalive() {
    let origin = Origin::start().await;
    let proxy = Proxy::start_h2c(
        &config(&origin),
        "  max_connections: 3\n  keepalive_timeout: 30s\n",
    );
    // Three h2 connections, each served one request, then idle: the cap is full.
    let mut idle = Vec::new();
    for i in 0..3 {
        let s = raw_connect(proxy.addr).await;
        let (r, w) = s.into_split();
        let w = std::sync::Arc::new(tokio::sync::Mutex::new(w));
        let block = get_block(&proxy.addr.to_string(), &format!("/obj/100/idle{i}"));
        w.lock()
            .await
            .write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &block))
            .await
            .unwrap();
        idle.push(tokio::spawn(read_until_closed(
            r,
            w,
            Duration::from_secs(10),
        )));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A new client is admitted: the idle h2 connections make room (GOAWAY, closed).
    let path = "/obj/2000/newcomer";
    let (tail, body) = curl_h2c(&proxy.url(path), None);
    assert_eq!(tail, "2 200");
    assert!(body == content(path, 0, 0..2000));
    let mut reclaimed = 0;
    for t in idle {
        let (frames, closed) = t.await.unwrap();
        // Each got its answer first, exactly.
        let data: Vec<u8> = frames
            .iter()
            .filter(|f| f.0 == DATA)
            .flat_map(|f| f.3.clone())
            .collect();
        assert_eq!(data.len(), 100);
        if closed {
            assert_eq!(goaway_code(&frames), Some(0), "GOAWAY NO_ERROR");
            reclaimed += 1;
        }
    }
    assert!(reclaimed >= 1, "an idle h2 connection made room");
    let stats = proxy.stats().await;
    assert!(
        stats
            .get("client_connections_reclaimed")
            .copied()
            .unwrap_or(0)
            >= 1,
        "{stats:?}"
    );

    // keepalive_timeout ends an idle h2 connection (GOAWAY), timed generously.
    let proxy = Proxy::start_h2c(&config(&origin), "  keepalive_timeout: 1s\n");
    let s = raw_connect(proxy.addr).await;
    let (r, w) = s.into_split();
    let w = std::sync::Arc::new(tokio::sync::Mutex::new(w));
    let block = get_block(&proxy.addr.to_string(), "/obj/100/idle-ka");
    w.lock()
        .await
        .write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &block))
        .await
        .unwrap();
    let (frames, closed) = read_until_closed(r, w, Duration::from_secs(10)).await;
    assert!(closed, "closed after keepalive_timeout");
    assert_eq!(goaway_code(&frames), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_many_streams_all_succeed() {
    let origin = Origin::start().await;
    let proxy = Proxy::start_h2c(&config(&origin), "  http2_max_streams: 32\n");
    let out = Command::new("h2load")
        .args(["-n", "400", "-c", "2", "-m", "32", "-t", "1"])
        .arg(proxy.url("/obj/20000/h2load"))
        .output()
        .expect("run h2load");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("400 succeeded, 0 failed, 0 errored"),
        "{text}"
    );
    assert!(text.contains("400 2xx"), "{text}");
    assert_eq!(origin.requests(), 1, "one fill, 399 hits");
}

/// The `:status` of a response header block as h2 writes it: a literal with the static name
/// `:status` (index 8), its value Huffman-coded digits (RFC 7541 Appendix B: `0`-`2` are five
/// bits, `00000`-`00010`; `3`-`9` six, `011001`-`011111`) or plain.
fn status_of(block: &[u8]) -> Option<u16> {
    let (&first, rest) = block.split_first()?;
    if first & 0x0f != 8 || first & 0xf0 == 0x80 {
        return None;
    }
    let (&len, rest) = rest.split_first()?;
    let value = &rest[..usize::from(len & 0x7f)];
    if len & 0x80 == 0 {
        return std::str::from_utf8(value).ok()?.parse().ok();
    }
    let bits: Vec<u8> = value
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let mut digits = String::new();
    let mut at = 0;
    while digits.len() < 3 {
        let take = |n: usize| bits[at..at + n].iter().fold(0u8, |v, b| v << 1 | b);
        let five = take(5);
        if five <= 2 {
            digits.push(char::from(b'0' + five));
            at += 5;
        } else {
            let six = take(6);
            digits.push(char::from(b'0' + six - 0x19 + 3));
            at += 6;
        }
    }
    digits.parse().ok()
}

/// An HPACK integer with an `n`-bit prefix whose other bits are `flags`.
fn hpack_int(flags: u8, n: u32, mut v: usize) -> Vec<u8> {
    let max = (1usize << n) - 1;
    if v < max {
        return vec![flags | v as u8];
    }
    let mut out = vec![flags | max as u8];
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_limits_hold_per_stream() {
    let origin = Origin::start().await;
    let proxy = Proxy::start_h2c(
        &config(&origin),
        "  max_header_size: 8KiB\n  max_uri_size: 1KiB\n",
    );
    // The server says its limit.
    let s = raw_connect(proxy.addr).await;
    let (r, w) = s.into_split();
    let w = std::sync::Arc::new(tokio::sync::Mutex::new(w));
    // Stream 1: a header field of 9,000 bytes (over max_header_size); stream 3: a fine request
    // on the same connection, which is served.
    let mut big = get_block(&proxy.addr.to_string(), "/obj/100/big-header");
    big.extend([0x00]);
    big.extend(hpack_int(0, 7, 5));
    big.extend_from_slice(b"x-big");
    big.extend(hpack_int(0, 7, 9000));
    big.extend(std::iter::repeat_n(b'a', 9000));
    let fine = get_block(&proxy.addr.to_string(), "/obj/100/fine");
    {
        let mut w = w.lock().await;
        w.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &big))
            .await
            .unwrap();
        w.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 3, &fine))
            .await
            .unwrap();
    }
    let reader = tokio::spawn(read_until_closed(r, w.clone(), Duration::from_secs(3)));
    let (frames, _) = reader.await.unwrap();
    assert!(
        settings_of(&frames).contains(&(0x6, 8192)),
        "SETTINGS_MAX_HEADER_LIST_SIZE"
    );
    // Stream 1 is answered 431 by h2 itself, and ends there.
    let first: Vec<&Frame> = frames.iter().filter(|f| f.2 == 1).collect();
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].0, HEADERS);
    assert!(first[0].1 & END_STREAM != 0);
    assert_eq!(status_of(&first[0].3), Some(431), "{first:?}");
    let data: Vec<u8> = frames
        .iter()
        .filter(|f| f.0 == DATA && f.2 == 3)
        .flat_map(|f| f.3.clone())
        .collect();
    assert!(
        data == content("/obj/100/fine", 0, 0..100),
        "stream 3 served"
    );
    assert_eq!(origin.requests(), 1, "only the fine request");

    // A :path over max_uri_size: 414, as over HTTP/1.1.
    let send = h2_connect(proxy.addr).await;
    let long = format!("/obj/100/{}", "u".repeat(1100));
    let (status, _, _) = h2_get(&send, proxy.addr, &long, None).await;
    assert_eq!(status, 414);
    let (status, _, body) = h2_get(&send, proxy.addr, "/obj/100/fine", None).await;
    assert_eq!(status, 200, "the connection goes on");
    assert!(body == content("/obj/100/fine", 0, 0..100));
    assert_eq!(origin.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_abandoning_more_streams_than_it_completes_gets_goaway() {
    let origin = Origin::start().await;
    // The default 128 streams: few in flight at once here, so only the abandoned count trips.
    let proxy = Proxy::start_h2c(&config(&origin), "");
    origin.set_fault(Fault::DelayHeaders(Duration::from_millis(300)));
    let s = raw_connect(proxy.addr).await;
    let (r, mut w) = s.into_split();
    let authority = proxy.addr.to_string();
    let reader = tokio::spawn(async move {
        let mut r = r;
        let mut frames = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(f) = read_frame(&mut r).await {
                frames.push(f);
            }
        })
        .await
        .is_ok();
        (frames, closed)
    });
    // Each stream is reset 20 ms after it opened, long before its answer: ~15 in flight.
    let mut sent = 0u32;
    for i in 0..1_000u32 {
        let id = 1 + 2 * i;
        let block = get_block(&authority, &format!("/download/{}/ab{i}", 1000 + i));
        if w.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, id, &block))
            .await
            .is_err()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        if w.write_all(&frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()))
            .await
            .is_err()
        {
            break;
        }
        sent += 1;
    }
    let (frames, closed) = reader.await.unwrap();
    assert_eq!(
        goaway_code(&frames),
        Some(ENHANCE_YOUR_CALM),
        "after {sent} abandoned streams"
    );
    assert!(closed);
    assert!(
        (101..400).contains(&sent),
        "closed once 100 more were abandoned than completed: {sent}"
    );
    assert!(proxy.log_contains("HTTP/2 streams abandoned, 0 completed: GOAWAY ENHANCE_YOUR_CALM"));
    let requests = origin.requests();
    assert!(requests <= 101 + 40, "{requests} origin requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_stream_ends_its_paced_wait_at_once() {
    let origin = Origin::start().await;
    // 8 KiB/s: after the 16 KiB burst, each 16 KiB part waits two seconds.
    let yaml = format!(
        "cache:\n  chunk_size: 256KiB\n  memory:\n    capacity: 64MiB\nupstreams:\n  origin:\n    servers: [\"{}\"]\nshaping:\n  classes:\n    standard:\n      rate: 8KiB/s\n      burst: 16KiB\n      max_downloads: 1\nroutes:\n  - path_prefix: /obj/\n    upstream: origin\n    shaping: standard\n",
        origin.addr()
    );
    let proxy = Proxy::start_h2c(&yaml, "");
    let send = h2_connect(proxy.addr).await;
    let path = "/obj/200000/paced";
    let mut ready = send.clone().ready().await.unwrap();
    let (resp, _) = ready
        .send_request(
            http::Request::get(format!("http://{}{path}", proxy.addr))
                .body(())
                .unwrap(),
            true,
        )
        .unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while got.len() < 16 * 1024 {
        let piece = body.data().await.expect("burst bytes").unwrap();
        let _ = body.flow_control().release_capacity(piece.len());
        got.extend_from_slice(&piece);
    }
    assert!(got == content(path, 0, 0..got.len() as u64), "exact so far");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The client gives up mid-wait: the stream is reset (CANCEL).
    drop(body);
    let reset_at = Instant::now();
    // Its one download (max_downloads: 1) is freed at once, not after the two-second wait.
    let status = loop {
        let (status, _, body) = h2_get(&send, proxy.addr, "/obj/1000/next", None).await;
        if status == 200 {
            assert!(body == content("/obj/1000/next", 0, 0..1000));
            break status;
        }
        assert_eq!(status, 429);
        if reset_at.elapsed() > Duration::from_secs(3) {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 200);
    assert!(
        reset_at.elapsed() < Duration::from_millis(1200),
        "download freed {:?} after the reset",
        reset_at.elapsed()
    );
}
