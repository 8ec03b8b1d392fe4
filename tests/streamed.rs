//! Origins that stream: chunked bodies without a length, as application servers send and
//! nginx with `gzip on` does (issue 21, points 1, 5 and 6).
//!
//! - A streamed body cut by its origin is detectably short for every client: chunked framing
//!   without its last chunk for HTTP/1.1 (curl: exit 18), a reset for HTTP/1.0; nothing of it
//!   is stored.
//! - A chunked origin that ignores Range keeps working once chunks are evicted: the refetch is
//!   a whole 200 without a length of the same version, and is used.
//! - A fill of an endless chunked body that its client abandons stops, keeps nothing, flushes
//!   nothing, and another client gets its first byte promptly.
//!
//! Every byte a client receives is checked against the true content; bounded in time.

mod common;

use common::origin::{content, Fault, Origin};
use common::proxy::Proxy;
use futures::StreamExt;
use std::process::Command;
use std::time::{Duration, Instant};

const CHUNK: u64 = 64 * 1024;
/// How old the nginx docroot files look.
const OLD: Duration = Duration::from_secs(30 * 86_400);

/// One route to one origin, memory tier of `memory`, no disk.
fn config(origin: &Origin, memory: &str) -> String {
    format!(
        "cache:\n  chunk_size: 64KiB\n  memory:\n    capacity: {memory}\nupstreams:\n  origin:\n    servers: [\"{}\"]\n    connect_timeout: 500ms\n    read_timeout: 5s\nroutes:\n  - path_prefix: /\n    upstream: origin\n    cache: true\n",
        origin.addr()
    )
}

fn cache_status(h: &reqwest::header::HeaderMap) -> String {
    common::header_text(h, "cache-status")
}

/// What curl got: exit code, status, response head, body.
struct Curl {
    exit: i32,
    status: u16,
    head: String,
    body: Vec<u8>,
}

fn curl(url: &str, extra: &[&str]) -> Curl {
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body");
    let head = dir.path().join("head");
    let out = Command::new("curl")
        .args(["-s", "--max-time", "30", "-o"])
        .arg(&body)
        .arg("-D")
        .arg(&head)
        .args(["-w", "%{http_code}"])
        .args(extra)
        .arg(url)
        .output()
        .expect("curl");
    Curl {
        exit: out.status.code().unwrap_or(-1),
        status: String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0),
        head: std::fs::read_to_string(&head)
            .unwrap_or_default()
            .to_ascii_lowercase(),
        body: std::fs::read(&body).unwrap_or_default(),
    }
}

/// Assert `got` is a strict, correct prefix of the object at `path`.
fn assert_short_prefix(got: &[u8], path: &str, size: u64, what: &str) {
    assert!(
        (got.len() as u64) < size,
        "{what}: {} bytes of {size}",
        got.len()
    );
    assert!(
        got == &content(path, 0, 0..got.len() as u64)[..],
        "{what}: a wrong byte"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_cut_by_its_origin_is_detectably_short() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&config(&origin, "64MiB"));
    let size = 1_000_000u64;
    origin.set_fault(Fault::ChunkedCut { after: 300_000 });

    // HTTP/1.1: chunked framing, no last chunk: curl exit 18 (partial file).
    let path = format!("/obj/{size}/cut11.bin");
    let r = curl(&proxy.url(&path), &[]);
    assert_eq!(r.status, 200);
    assert!(r.head.contains("transfer-encoding: chunked"), "{}", r.head);
    assert!(!r.head.contains("content-length"), "{}", r.head);
    assert_eq!(r.exit, 18, "curl must see the body cut short");
    assert_short_prefix(&r.body, &path, size, "HTTP/1.1");

    // HTTP/1.0: close-delimited with `Connection: close`, and a reset instead of a clean
    // close (curl: exit 56, receive failure).
    let path = format!("/obj/{size}/cut10.bin");
    let r = curl(&proxy.url(&path), &["-0"]);
    assert_eq!(r.status, 200);
    assert!(r.head.contains("connection: close"), "{}", r.head);
    assert!(!r.head.contains("content-length"), "{}", r.head);
    assert!(!r.head.contains("transfer-encoding"), "{}", r.head);
    assert_ne!(r.exit, 0, "an HTTP/1.0 client must see the break");
    assert_short_prefix(&r.body, &path, size, "HTTP/1.0");

    // An uncacheable streamed answer (relayed as it is) is framed the same way.
    origin.set_cache_control(Some("no-store"));
    let path = format!("/obj/{size}/cut-relay.bin");
    let r = curl(&proxy.url(&path), &[]);
    assert_eq!(r.status, 200);
    assert!(r.head.contains("transfer-encoding: chunked"), "{}", r.head);
    assert_eq!(r.exit, 18, "a relayed chunked body cut short");
    assert_short_prefix(&r.body, &path, size, "relay");
    let r = curl(&proxy.url(&path), &["-0"]);
    assert!(r.head.contains("connection: close"), "{}", r.head);
    assert_ne!(r.exit, 0, "a relayed close-delimited body cut short");
    assert_short_prefix(&r.body, &path, size, "relay, HTTP/1.0");
    origin.set_cache_control(None);

    // Nothing of a cut body was stored: the next request asks the origin again, gets the
    // whole body (chunked, complete), and the one after is a hit.
    origin.set_fault(Fault::ChunkedNoLength);
    let path = format!("/obj/{size}/cut11.bin");
    let before = origin.requests();
    for round in 0..2 {
        let r = curl(&proxy.url(&path), &[]);
        assert_eq!((r.exit, r.status), (0, 200), "round {round}");
        assert!(r.body == content(&path, 0, 0..size), "round {round}");
    }
    assert_eq!(origin.requests(), before + 1);
    // Both clients get a complete answer from the cache now, with a length.
    for extra in [&[][..], &["-0"][..]] {
        let r = curl(&proxy.url(&path), extra);
        assert_eq!((r.exit, r.status), (0, 200), "{extra:?}");
        assert!(r.head.contains(&format!("content-length: {size}")));
        assert!(r.body == content(&path, 0, 0..size));
    }
    assert_eq!(origin.requests(), before + 1);

    // HEAD of a cold streamed object: the header, no body, and it does not hang the next GET.
    let path = format!("/obj/{size}/head.bin");
    let r = curl(&proxy.url(&path), &["-I"]);
    assert_eq!((r.exit, r.status), (0, 200));
    let r = curl(&proxy.url(&path), &[]);
    assert_eq!((r.exit, r.status), (0, 200));
    assert!(r.body == content(&path, 0, 0..size));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_origin_ignoring_range_keeps_working_after_evictions() {
    let origin = Origin::start().await;
    origin.set_fault(Fault::ChunkedNoLength);
    // 16 MiB tier: a 3,000,000-byte object is staged (budget 4 MiB) and stored; other
    // objects then push some of its chunks out.
    let proxy = Proxy::start(&config(&origin, "16MiB"));
    let size = 3_000_000u64;
    let path = format!("/obj/{size}/gz.bin");
    let whole = content(&path, 0, 0..size);
    let get = |range: Option<String>| {
        let mut req = common::client().get(proxy.url(&path));
        if let Some(r) = range {
            req = req.header("range", r);
        }
        async move {
            let resp = req.send().await.expect("request");
            let status = resp.status().as_u16();
            let h = resp.headers().clone();
            (status, h, resp.bytes().await.map(|b| b.to_vec()))
        }
    };
    let (s, _, b) = get(None).await;
    assert_eq!(s, 200);
    assert!(b.unwrap() == whole, "cold");
    let (s, h, b) = get(None).await;
    assert_eq!((s, cache_status(&h).as_str()), (200, "edgeslice; hit"));
    assert!(b.unwrap() == whole, "warm");
    assert_eq!(origin.requests(), 1);

    for round in 0..6u64 {
        // 16 MiB of other objects, so that the big one loses chunks.
        for i in 0..16 {
            let other = format!("/obj/{}/other-{round}-{i}.bin", 1 << 20);
            let resp = common::client()
                .get(proxy.url(&other))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            let b = resp.bytes().await.unwrap();
            assert!(b[..] == content(&other, 0, 0..1 << 20)[..], "{other}");
        }
        let before = origin.requests();
        // Alternate whole and ranged requests: every one is complete and exact.
        let range = (round % 2 == 1).then(|| format!("bytes={}-{}", 5 * CHUNK + 7, size - 2));
        let (s, h, b) = get(range.clone()).await;
        let b = b.expect("a complete body");
        match range {
            None => {
                assert_eq!(s, 200, "round {round}: {}", cache_status(&h));
                assert!(b == whole, "round {round}: the whole object, exact");
            }
            Some(_) => {
                assert_eq!(s, 206, "round {round}: {}", cache_status(&h));
                assert!(b[..] == whole[(5 * CHUNK + 7) as usize..(size - 1) as usize]);
            }
        }
        let refetched = origin.requests() - before;
        let log: Vec<String> = origin
            .log()
            .iter()
            .rev()
            .take(refetched as usize)
            .map(|r| {
                format!(
                    "{} {:?} {:?}",
                    r.path,
                    r.header("range"),
                    r.header("if-range")
                )
            })
            .collect();
        // One request per stretch of missing chunks at most (a tier this tight also evicts
        // the object's own chunks while it is refetched), never one per chunk (46).
        assert!(
            (1..=8).contains(&refetched),
            "round {round}: {refetched} origin requests: {log:?}"
        );
        // Refetched once: the same request again is a hit, exact.
        let (s2, h, b2) = get(range.clone()).await;
        assert_eq!(
            (s2, cache_status(&h).as_str()),
            (s, "edgeslice; hit"),
            "round {round}"
        );
        assert!(b2.unwrap() == b, "round {round}: hit after the refetch");
        assert_eq!(origin.requests(), before + refetched);
    }
}

/// Time to the first body byte of `path`, after checking the bytes it brought.
async fn first_byte(proxy: &Proxy, path: &str) -> Duration {
    let started = Instant::now();
    let resp = common::client().get(proxy.url(path)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.expect("a first piece").expect("body");
    let took = started.elapsed();
    assert!(first[..] == content(path, 0, 0..first.len() as u64)[..]);
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_endless_stream_flushes_nothing_and_blocks_nobody() {
    let chunked = Origin::start().await;
    chunked.set_fault(Fault::ChunkedNoLength);
    // 16 MiB memory tier (streamed objects are staged up to 4 MiB) and a disk tier.
    let proxy = Proxy::start(&config(&chunked, "16MiB").replace(
        "\nupstreams:",
        "\n  disk:\n    path: {DIR}/cache\n    capacity: 64MiB\nupstreams:",
    ));
    // 100 cached objects (6.4 MiB), each a hit.
    let objects: Vec<String> = (0..100)
        .map(|i| format!("/obj/{CHUNK}/kept-{i}.bin"))
        .collect();
    for round in 0..2 {
        for p in &objects {
            let resp = common::client().get(proxy.url(p)).send().await.unwrap();
            if round == 1 {
                assert_eq!(cache_status(resp.headers()), "edgeslice; hit", "{p}");
            }
            assert!(resp.bytes().await.unwrap()[..] == content(p, 0, 0..CHUNK)[..]);
        }
    }
    assert_eq!(chunked.requests(), 100);

    // An endless chunked body (100 GB): the client reads 1 MiB and leaves.
    let endless = "/obj/100000000000/endless.bin";
    let resp = common::client()
        .get(proxy.url(endless))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut got = Vec::new();
    while got.len() < 1 << 20 {
        got.extend_from_slice(&stream.next().await.expect("more").expect("body"));
    }
    assert!(got == content(endless, 0, 0..got.len() as u64));
    drop(stream);

    // Another client is not held behind the abandoned fill.
    let took = first_byte(&proxy, endless).await;
    assert!(took < Duration::from_secs(10), "first byte after {took:?}");
    // The abandoned fill stopped: the origin sent what the staging bound (4 MiB) and the
    // buffers on the way allow, not the object (before: up to max_object_size, 1 GiB).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = chunked.body_bytes_sent();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(chunked.body_bytes_sent(), sent, "a fill is still pulling");
    assert!(sent < 48 << 20, "the origin sent {sent} bytes");

    // The 100 objects are still hits, exact, without asking the origin.
    for p in &objects {
        let resp = common::client().get(proxy.url(p)).send().await.unwrap();
        assert_eq!(cache_status(resp.headers()), "edgeslice; hit", "{p}");
        assert!(resp.bytes().await.unwrap()[..] == content(p, 0, 0..CHUNK)[..]);
    }
    // The origin saw the 100 objects once each, then the endless one twice (its abandoned
    // fill and the second client's request, passed through since it is not kept).
    assert_eq!(chunked.requests(), 102);
    eprintln!(
        "endless stream: second client's first byte after {took:?}, origin sent {sent} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_client_is_not_held_by_a_stalled_streamed_fill() {
    let chunked = Origin::start().await;
    chunked.set_fault(Fault::ChunkedNoLength);
    let proxy = Proxy::start(&config(&chunked, "64MiB"));
    // A 14 MiB streamed object (storable: staged up to 16 MiB) whose first client reads a
    // little and then stalls without leaving: once the socket buffers on the way are full,
    // its fill waits for it, holding the object.
    let size = 14u64 << 20;
    let path = format!("/obj/{size}/stalled.bin");
    let resp = common::client().get(proxy.url(&path)).send().await.unwrap();
    let mut stalled = resp.bytes_stream();
    let first = stalled.next().await.expect("a piece").expect("body");
    assert!(first[..] == content(&path, 0, 0..first.len() as u64)[..]);
    // A second client gets its first byte within a bounded wait (5 s lock hold), not after
    // the stalled one.
    let took = first_byte(&proxy, &path).await;
    assert!(took < Duration::from_secs(10), "first byte after {took:?}");
    eprintln!("stalled streamed fill: second client's first byte after {took:?}");
    // The whole body, exact, for a third client; the stalled one then reads on, exact too.
    let resp = common::client().get(proxy.url(&path)).send().await.unwrap();
    assert!(resp.bytes().await.unwrap()[..] == content(&path, 0, 0..size)[..]);
    let mut rest = first.to_vec();
    while let Some(p) = stalled.next().await {
        rest.extend_from_slice(&p.unwrap());
    }
    assert!(rest == content(&path, 0, 0..size));
    assert!(
        chunked.requests() <= 3,
        "{} origin requests",
        chunked.requests()
    );
}

/// `size` bytes of text that compresses about 3:1 (words from a deterministic sequence).
fn text(size: usize) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "edge", "slice", "chunk", "cache", "origin", "range", "stream", "gzip", "nginx", "byte",
        "proxy", "fill", "stale", "fresh", "etag", "vary",
    ];
    let mut out = Vec::with_capacity(size + 16);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut line = 0u64;
    while out.len() < size {
        out.extend_from_slice(format!("{line:08} ").as_bytes());
        for _ in 0..10 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(WORDS[(x % 16) as usize].as_bytes());
            out.push(b' ');
        }
        out.push(b'\n');
        line += 1;
    }
    out.truncate(size);
    out
}

async fn fetch(
    url: String,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    // No automatic decompression: the bytes as sent.
    let client = reqwest::Client::builder()
        .no_proxy()
        .no_gzip()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut req = client.get(url);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    (
        status,
        h,
        resp.bytes().await.expect("a complete body").to_vec(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_with_gzip_through_the_cache_gives_nginx_bytes() {
    use common::nginx::Nginx;
    let nginx = Nginx::start_with(
        "types { text/plain txt; }\n  gzip on;\n  gzip_proxied any;\n  gzip_types text/plain;",
    );
    let size = 3_000_000;
    let plain_text = text(size);
    nginx.put_bytes("/big.txt", &plain_text);
    // Old files: cacheable by heuristic freshness (nginx sends no Cache-Control).
    nginx.age_file("/big.txt", OLD);
    let direct = format!("http://{}/big.txt", nginx.addr);
    let gz = [("accept-encoding", "gzip")];
    // What nginx sends directly: gzip, chunked (no length).
    let (s, h, gzip) = fetch(direct.clone(), &gz).await;
    assert_eq!(s, 200);
    assert_eq!(common::header_text(&h, "content-encoding"), "gzip");
    assert!(h.get("content-length").is_none());
    assert!(gzip.len() < size / 2, "gzip made {} bytes", gzip.len());
    let (_, _, again) = fetch(direct.clone(), &gz).await;
    assert!(again == gzip, "nginx's gzip bytes are deterministic");
    nginx.settle(Duration::from_secs(5));
    let before = nginx.requests();

    // 16 MiB tier (streamed objects staged up to 4 MiB), no disk: evictions are real.
    let yaml = format!(
        "cache:\n  chunk_size: 64KiB\n  memory:\n    capacity: 16MiB\nupstreams:\n  origin:\n    servers: [\"{}\"]\n    connect_timeout: 500ms\n    read_timeout: 5s\nroutes:\n  - path_prefix: /\n    upstream: origin\n    cache: true\n",
        nginx.addr
    );
    let proxy = Proxy::start(&yaml);
    let url = proxy.url("/big.txt");
    // Cold, then warm: nginx's gzip bytes exactly, one origin request.
    let (s, h, b) = fetch(url.clone(), &gz).await;
    assert_eq!(
        (s, common::header_text(&h, "content-encoding").as_str()),
        (200, "gzip")
    );
    assert!(
        b == gzip,
        "cold: {} bytes, nginx sent {}",
        b.len(),
        gzip.len()
    );
    let (s, h, b) = fetch(url.clone(), &gz).await;
    assert_eq!((s, cache_status(&h).as_str()), (200, "edgeslice; hit"));
    assert!(b == gzip, "warm");
    assert_eq!(
        h["content-length"].to_str().unwrap(),
        gzip.len().to_string()
    );
    nginx.settle(Duration::from_secs(5));
    assert_eq!(nginx.requests(), before + 1);

    // A range of the encoded bytes, from the cache.
    let (a, z) = (100_000usize, 400_000usize.min(gzip.len() - 1));
    let range = format!("bytes={a}-{z}");
    let (s, _, b) = fetch(url.clone(), &[gz[0], ("range", &range)]).await;
    assert_eq!(s, 206);
    assert!(b[..] == gzip[a..=z], "a range of nginx's gzip bytes");

    // A client that does not accept gzip gets the plain text, never the gzip bytes.
    for round in 0..2 {
        let (s, h, b) = fetch(url.clone(), &[]).await;
        assert_eq!(s, 200, "round {round}");
        assert!(h.get("content-encoding").is_none(), "round {round}");
        assert!(b == plain_text, "round {round}: the identity bytes");
    }
    let (s, _, b) = fetch(url.clone(), &[("range", "bytes=5-99")]).await;
    assert_eq!(s, 206);
    assert!(b[..] == plain_text[5..100]);

    // Evictions: 20 MiB of other files through the 16 MiB tier, then the gzip object again,
    // whole and by range, refetched at most once each time and exact.
    for round in 0..3 {
        for i in 0..20 {
            let p = format!("/fill-{round}-{i}.bin");
            let data = nginx.put_file(&p, 1 << 20);
            nginx.age_file(&p, OLD);
            let (s, _, b) = fetch(proxy.url(&p), &gz).await;
            assert_eq!(s, 200);
            assert!(b == data, "{p}");
        }
        nginx.settle(Duration::from_secs(5));
        let before = nginx.requests();
        let (s, _, b) = fetch(url.clone(), &gz).await;
        assert_eq!(s, 200, "round {round}");
        assert!(b == gzip, "round {round}: after an eviction");
        let (s, _, b) = fetch(url.clone(), &[gz[0], ("range", &range)]).await;
        assert_eq!(s, 206);
        assert!(
            b[..] == gzip[a..=z],
            "round {round}: a range after an eviction"
        );
        let (s, h, b) = fetch(url.clone(), &gz).await;
        assert_eq!((s, cache_status(&h).as_str()), (200, "edgeslice; hit"));
        assert!(b == gzip);
        nginx.settle(Duration::from_secs(5));
        let refetched = nginx.requests() - before;
        assert!(refetched <= 2, "round {round}: {refetched} origin requests");
    }
}
