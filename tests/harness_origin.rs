//! Tests of the in-process test origin (`tests/common/origin.rs`) itself: deterministic
//! content, ranges and conditionals, every fault, uploads, keep-alive, the log and counters.

#[path = "common/origin.rs"]
mod origin;

use futures::StreamExt;
use origin::{
    content, content_byte, content_crc, etag, fill_content, http_date, parse_http_date, Fault,
    Origin,
};
use std::future::Future;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TEST_LIMIT: Duration = Duration::from_secs(20);

async fn bounded(f: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .expect("test did not finish within its time limit");
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn hdr(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

/// Send `raw` on a new connection and read until EOF (bounded).
async fn raw_exchange(origin: &Origin, raw: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(origin.addr()).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("server closed the connection")
        .unwrap();
    out
}

/// Split a raw response into (head, body) at the first blank line.
fn split_head(raw: &[u8]) -> (String, &[u8]) {
    let i = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("complete head");
    (
        String::from_utf8_lossy(&raw[..i]).into_owned(),
        &raw[i + 4..],
    )
}

/// Read exactly one response with a Content-Length body from a kept-alive connection.
async fn read_one_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> (String, Vec<u8>) {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            while buf.len() < i + 4 + len {
                let mut tmp = [0u8; 65536];
                let n = s.read(&mut tmp).await.unwrap();
                assert!(n > 0, "EOF inside a body");
                buf.extend_from_slice(&tmp[..n]);
            }
            let body = buf[i + 4..i + 4 + len].to_vec();
            buf.drain(..i + 4 + len);
            return (head, body);
        }
        let mut tmp = [0u8; 65536];
        let n = s.read(&mut tmp).await.unwrap();
        assert!(n > 0, "EOF before a response head");
        buf.extend_from_slice(&tmp[..n]);
    }
}

#[test]
fn content_is_deterministic_and_position_dependent() {
    let p = "/obj/1000/a.bin";
    let all = content(p, 0, 0..1000);
    assert_eq!(all.len(), 1000);
    for (i, b) in all.iter().enumerate() {
        assert_eq!(*b, content_byte(p, 0, i as u64));
    }
    // Any sub-range, aligned or not, agrees with the whole.
    for (a, b) in [(0, 1), (3, 17), (8, 16), (7, 999), (500, 1000), (999, 1000)] {
        assert_eq!(content(p, 0, a..b), all[a as usize..b as usize]);
        let mut buf = vec![0u8; (b - a) as usize];
        fill_content(p, 0, a, &mut buf);
        assert_eq!(buf, all[a as usize..b as usize]);
    }
    // A shift by any amount is visible.
    for shift in 1..=16 {
        assert_ne!(all[shift..shift + 64], all[..64], "shift {shift}");
    }
    // Path and version both change the content; large offsets work.
    assert_ne!(content(p, 1, 0..64), all[..64]);
    assert_ne!(content("/obj/1000/b.bin", 0, 0..64), all[..64]);
    let far = 5u64 << 30;
    assert_eq!(
        content(p, 0, far..far + 3),
        vec![
            content_byte(p, 0, far),
            content_byte(p, 0, far + 1),
            content_byte(p, 0, far + 2)
        ]
    );
    // content_crc agrees with crc32 of content across piece boundaries.
    let big = content(p, 0, 5..200_005);
    assert_eq!(content_crc(p, 0, 5..200_005), crc32fast::hash(&big));
    // Dates.
    assert_eq!(http_date(1_445_412_480), "Wed, 21 Oct 2015 07:28:00 GMT");
    assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
    assert_eq!(http_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
    for t in [0u64, 951_782_400, 1_445_412_480, 4_102_444_800 + 86_399] {
        assert_eq!(parse_http_date(&http_date(t)), Some(t));
    }
    assert_eq!(parse_http_date("garbage"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_object_with_headers() {
    bounded(async {
        let origin = Origin::start().await;
        let path = "/obj/300000/a.bin";
        let resp = client()
            .get(origin.url(&format!("{path}?ignored=1")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(hdr(&resp, "content-length").as_deref(), Some("300000"));
        assert_eq!(
            hdr(&resp, "content-type").as_deref(),
            Some("application/octet-stream")
        );
        assert_eq!(hdr(&resp, "etag"), Some(etag(path, 0)));
        assert!(hdr(&resp, "etag").unwrap().starts_with("\"v0-"));
        assert_eq!(
            hdr(&resp, "last-modified").as_deref(),
            Some("Wed, 21 Oct 2015 07:28:00 GMT")
        );
        assert_eq!(hdr(&resp, "cache-control").as_deref(), Some("max-age=3600"));
        assert_eq!(hdr(&resp, "accept-ranges").as_deref(), Some("bytes"));
        assert!(parse_http_date(&hdr(&resp, "date").unwrap()).is_some());
        let body = resp.bytes().await.unwrap();
        assert_eq!(&body[..], &content(path, 0, 0..300_000)[..]);
        assert_eq!(origin.requests(), 1);
        assert_eq!(origin.body_bytes_sent(), 300_000);

        // HEAD: same headers, no body.
        let resp = client().head(origin.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(hdr(&resp, "content-length").as_deref(), Some("300000"));
        assert!(resp.bytes().await.unwrap().is_empty());
        assert_eq!(origin.body_bytes_sent(), 300_000);

        // Empty object.
        let resp = client()
            .get(origin.url("/obj/0/empty"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.bytes().await.unwrap().is_empty());

        // Unknown paths.
        for p in ["/missing", "/obj/abc/x", "/obj/", "/download/x"] {
            let resp = client().get(origin.url(p)).send().await.unwrap();
            assert_eq!(resp.status(), 404, "{p}");
            assert_eq!(resp.text().await.unwrap(), "not found\n");
        }
        let resp = client().delete(origin.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 405);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_206_416_and_200() {
    bounded(async {
        let origin = Origin::start().await;
        let path = "/obj/1000/r.bin";
        let get = |range: &'static str| {
            let url = origin.url(path);
            async move {
                client()
                    .get(url)
                    .header("range", range)
                    .send()
                    .await
                    .unwrap()
            }
        };
        for (range, a, b) in [
            ("bytes=10-19", 10u64, 20u64),
            ("bytes=0-0", 0, 1),
            ("bytes=990-", 990, 1000),
            ("bytes=-10", 990, 1000),
            ("bytes=-5000", 0, 1000),
            ("bytes=500-99999", 500, 1000),
            ("bytes=999-999", 999, 1000),
            ("bytes=7-8", 7, 9),
        ] {
            let resp = get(range).await;
            assert_eq!(resp.status(), 206, "{range}");
            assert_eq!(
                hdr(&resp, "content-range"),
                Some(format!("bytes {a}-{}/1000", b - 1)),
                "{range}"
            );
            assert_eq!(hdr(&resp, "content-length"), Some((b - a).to_string()));
            assert_eq!(
                resp.bytes().await.unwrap().to_vec(),
                content(path, 0, a..b),
                "{range}"
            );
        }
        for range in ["bytes=1000-", "bytes=5000-6000", "bytes=-0"] {
            let resp = get(range).await;
            assert_eq!(resp.status(), 416, "{range}");
            assert_eq!(hdr(&resp, "content-range").as_deref(), Some("bytes */1000"));
        }
        for range in [
            "bytes=0-1,5-6",
            "bytes=5-1",
            "items=0-5",
            "bytes=a-b",
            "bytes=",
            "bytes=-",
        ] {
            let resp = get(range).await;
            assert_eq!(resp.status(), 200, "{range}");
            assert_eq!(hdr(&resp, "content-range"), None);
            assert_eq!(
                resp.bytes().await.unwrap().to_vec(),
                content(path, 0, 0..1000),
                "{range}"
            );
        }
        // HEAD with a range: 206 head, no body.
        let resp = client()
            .head(origin.url(path))
            .header("range", "bytes=100-199")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 206);
        assert_eq!(hdr(&resp, "content-length").as_deref(), Some("100"));
        // A range near the end of a 5 GiB object: nothing is materialized.
        let big = format!("/obj/{}/huge", 5u64 << 30);
        let start = (5u64 << 30) - 100_000;
        let resp = client()
            .get(origin.url(&big))
            .header("range", format!("bytes={start}-"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 206);
        assert_eq!(
            resp.bytes().await.unwrap().to_vec(),
            content(&big, 0, start..5u64 << 30)
        );
        // /download ignores Range and is not cacheable.
        let resp = client()
            .get(origin.url("/download/5000"))
            .header("range", "bytes=0-9")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(hdr(&resp, "cache-control").as_deref(), Some("no-store"));
        assert_eq!(
            resp.bytes().await.unwrap().to_vec(),
            content("/download/5000", 0, 0..5000)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditionals_and_versions() {
    bounded(async {
        let origin = Origin::start().await;
        let path = "/obj/4096/v.bin";
        let tag0 = etag(path, 0);
        let resp = client()
            .get(origin.url(path))
            .header("if-none-match", &tag0)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 304);
        assert_eq!(hdr(&resp, "etag"), Some(tag0.clone()));
        assert!(resp.bytes().await.unwrap().is_empty());
        let resp = client()
            .get(origin.url(path))
            .header("if-none-match", format!("\"x\", W/{tag0}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 304);
        let resp = client()
            .get(origin.url(path))
            .header("if-none-match", "\"other\"")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let resp = client()
            .get(origin.url(path))
            .header("if-modified-since", "Wed, 21 Oct 2015 07:28:00 GMT")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 304);
        let resp = client()
            .get(origin.url(path))
            .header("if-modified-since", "Wed, 21 Oct 2015 07:27:59 GMT")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        // If-Range: matching → 206, not matching → 200 whole.
        let resp = client()
            .get(origin.url(path))
            .header("range", "bytes=0-9")
            .header("if-range", &tag0)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 206);
        let resp = client()
            .get(origin.url(path))
            .header("range", "bytes=0-9")
            .header("if-range", "\"v9-0\"")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.bytes().await.unwrap().len(), 4096);

        // A new version changes ETag, Last-Modified and content.
        origin.set_etag_version(3);
        let resp = client()
            .get(origin.url(path))
            .header("if-none-match", &tag0)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let tag3 = hdr(&resp, "etag").unwrap();
        assert_eq!(tag3, etag(path, 3));
        assert!(tag3.starts_with("\"v3-"));
        assert_ne!(tag3, tag0);
        assert_eq!(
            hdr(&resp, "last-modified").as_deref(),
            Some("Wed, 21 Oct 2015 07:28:03 GMT")
        );
        let body = resp.bytes().await.unwrap().to_vec();
        assert_eq!(body, content(path, 3, 0..4096));
        assert_ne!(body, content(path, 0, 0..4096));
        let resp = client()
            .get(origin.url(path))
            .header("range", "bytes=0-9")
            .header("if-range", &tag0)
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            200,
            "stale If-Range gives the whole new object"
        );

        // Cache-Control and extra headers.
        origin.set_cache_control(None);
        origin.set_extra_header("Vary", "Accept-Encoding");
        origin.set_extra_header("Set-Cookie", "a=1");
        origin.set_extra_header("set-cookie", "b=2");
        let resp = client().get(origin.url(path)).send().await.unwrap();
        assert_eq!(hdr(&resp, "cache-control"), None);
        assert_eq!(hdr(&resp, "vary").as_deref(), Some("Accept-Encoding"));
        assert_eq!(resp.headers().get_all("set-cookie").iter().count(), 1);
        assert_eq!(hdr(&resp, "set-cookie").as_deref(), Some("b=2"));
        origin.set_cache_control(Some("public, max-age=5"));
        origin.clear_extra_headers();
        let resp = client().get(origin.url(path)).send().await.unwrap();
        assert_eq!(
            hdr(&resp, "cache-control").as_deref(),
            Some("public, max-age=5")
        );
        assert_eq!(hdr(&resp, "vary"), None);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_headers() {
    bounded(async {
        let origin = Origin::start().await;
        let resp = client()
            .get(origin.url("/echo-headers"))
            .header("x-probe", "hello world")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(hdr(&resp, "cache-control").as_deref(), Some("no-store"));
        let body = resp.text().await.unwrap();
        assert!(body.lines().any(|l| l == "x-probe: hello world"), "{body}");
        assert!(
            body.lines().any(|l| l.starts_with("host: 127.0.0.1:")),
            "{body}"
        );
        let rec = origin.log().pop().unwrap();
        assert_eq!(rec.method, "GET");
        assert_eq!(rec.path, "/echo-headers");
        assert_eq!(rec.header("X-PROBE"), Some("hello world"));
        assert_eq!(rec.header("x-absent"), None);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_status() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_fault(Fault::Status(503));
        let resp = client().get(origin.url("/obj/100/a")).send().await.unwrap();
        assert_eq!(resp.status(), 503);
        assert_eq!(hdr(&resp, "cache-control"), None);
        assert_eq!(resp.text().await.unwrap(), "fault status 503\n");
        let resp = client()
            .put(origin.url("/up"))
            .body("xyz")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 503);
        assert_eq!(
            origin.log().last().unwrap().body_len,
            3,
            "the body is still read"
        );
        origin.set_fault(Fault::Status(304));
        let resp = client().get(origin.url("/obj/100/a")).send().await.unwrap();
        assert_eq!(resp.status(), 304);
        origin.clear_fault();
        let resp = client().get(origin.url("/obj/100/a")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.bytes().await.unwrap().to_vec(),
            content("/obj/100/a", 0, 0..100)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_hang_until_client_timeout_and_origin_drop() {
    bounded(async {
        let origin = Origin::start().await;
        origin.set_fault(Fault::Hang);
        let c = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let started = Instant::now();
        let err = c.get(origin.url("/obj/100/a")).send().await.unwrap_err();
        assert!(err.is_timeout(), "{err:?}");
        assert!(started.elapsed() >= Duration::from_millis(290));
        assert_eq!(origin.requests(), 1);
        assert_eq!(origin.log().len(), 1);

        // A raw connection is held open (no answer) until the Origin drops.
        let mut s = TcpStream::connect(origin.addr()).await.unwrap();
        s.write_all(b"GET /obj/10/a HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(origin.wait_requests(2, Duration::from_secs(5)).await);
        let mut buf = [0u8; 64];
        assert!(
            tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf))
                .await
                .is_err(),
            "no answer"
        );
        drop(origin);
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the socket is closed when the Origin drops")
            .unwrap_or(0);
        assert_eq!(n, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_reset_mid_body_after_exact_bytes() {
    bounded(async {
        let origin = Origin::start().await;
        let path = "/obj/1048576/reset.bin";
        for after in [0u64, 1, 100_000, 65_536 * 3 + 7] {
            origin.set_fault(Fault::ResetMidBody { after });
            let resp = client().get(origin.url(path)).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(hdr(&resp, "content-length").as_deref(), Some("1048576"));
            let mut stream = resp.bytes_stream();
            let mut got = Vec::new();
            let mut failed = false;
            while let Some(item) = stream.next().await {
                match item {
                    Ok(b) => got.extend_from_slice(&b),
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            assert!(failed, "after={after}: the client sees an error");
            assert_eq!(got.len() as u64, after, "after={after}");
            assert_eq!(got, content(path, 0, 0..after));
        }

        // Raw: the head, exactly `after` bytes, then ECONNRESET.
        origin.set_fault(Fault::ResetMidBody { after: 5000 });
        let mut s = TcpStream::connect(origin.addr()).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut raw = Vec::new();
        let mut tmp = [0u8; 8192];
        let err = loop {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut tmp))
                .await
                .unwrap()
            {
                Ok(0) => panic!("clean EOF instead of a reset"),
                Ok(n) => raw.extend_from_slice(&tmp[..n]),
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
        let (head, body) = split_head(&raw);
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert_eq!(body, &content(path, 0, 0..5000)[..]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_ignore_range_and_chunked_no_length() {
    bounded(async {
        let origin = Origin::start().await;
        let path = "/obj/200000/c.bin";
        origin.set_fault(Fault::IgnoreRange);
        let resp = client()
            .get(origin.url(path))
            .header("range", "bytes=10-19")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(hdr(&resp, "content-range"), None);
        assert_eq!(
            resp.bytes().await.unwrap().to_vec(),
            content(path, 0, 0..200_000)
        );

        origin.set_fault(Fault::ChunkedNoLength);
        let resp = client()
            .get(origin.url(path))
            .header("range", "bytes=10-19")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(hdr(&resp, "content-length"), None);
        assert_eq!(hdr(&resp, "transfer-encoding").as_deref(), Some("chunked"));
        assert_eq!(
            resp.bytes().await.unwrap().to_vec(),
            content(path, 0, 0..200_000)
        );

        // Raw, with Connection: close: decode the chunks by hand.
        let raw = raw_exchange(
            &origin,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        let (head, mut rest) = split_head(&raw);
        assert!(
            !head.to_ascii_lowercase().contains("content-length"),
            "{head}"
        );
        let mut body = Vec::new();
        loop {
            let i = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let n = usize::from_str_radix(std::str::from_utf8(&rest[..i]).unwrap(), 16).unwrap();
            rest = &rest[i + 2..];
            if n == 0 {
                assert_eq!(rest, b"\r\n");
                break;
            }
            body.extend_from_slice(&rest[..n]);
            assert_eq!(&rest[n..n + 2], b"\r\n");
            rest = &rest[n + 2..];
        }
        assert_eq!(body, content(path, 0, 0..200_000));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_slow_and_delay_headers() {
    bounded(async {
        let origin = Origin::start().await;
        let path = "/obj/50000/s.bin";
        origin.set_fault(Fault::Slow {
            bytes_per_sec: 200_000,
        });
        let started = Instant::now();
        let resp = client().get(origin.url(path)).send().await.unwrap();
        let body = resp.bytes().await.unwrap();
        let took = started.elapsed();
        assert_eq!(body.to_vec(), content(path, 0, 0..50_000));
        // 20 000-byte pieces at t = 0, 0.1, 0.2 s.
        assert!(took >= Duration::from_millis(190), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");

        origin.set_fault(Fault::DelayHeaders(Duration::from_millis(300)));
        let started = Instant::now();
        let resp = client().get(origin.url(path)).send().await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(290));
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.bytes().await.unwrap().len(), 50_000);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuse_then_resume_on_same_port() {
    bounded(async {
        let origin = Origin::start().await;
        let addr = origin.addr();
        assert_eq!(
            client()
                .get(origin.url("/obj/10/a"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        origin.refuse().await;
        let err = TcpStream::connect(addr).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        let err = client()
            .get(origin.url("/obj/10/a"))
            .send()
            .await
            .unwrap_err();
        assert!(err.is_connect(), "{err:?}");
        origin.refuse().await; // idempotent
        origin.resume().await;
        origin.resume().await; // idempotent
        assert_eq!(origin.addr(), addr);
        let resp = client().get(origin.url("/obj/10/a")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.bytes().await.unwrap().to_vec(),
            content("/obj/10/a", 0, 0..10)
        );

        // Dropping the Origin closes the listener.
        drop(origin);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match TcpStream::connect(addr).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
                _ => {
                    assert!(Instant::now() < deadline, "still accepting after drop");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_counted_not_kept() {
    bounded(async {
        let origin = Origin::start().await;
        // Content-Length.
        let data = content("/up", 0, 0..300_001);
        let resp = client().put(origin.url("/up/a")).body(data.clone()).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), format!("len=300001 crc={:08x}", crc32fast::hash(&data)));
        let rec = origin.log().pop().unwrap();
        assert_eq!((rec.method.as_str(), rec.path.as_str()), ("PUT", "/up/a"));
        assert_eq!(rec.body_len, 300_001);
        assert_eq!(rec.body_crc, crc32fast::hash(&data));
        assert_eq!(rec.header("content-length"), Some("300001"));

        // Chunked (a stream body without a length).
        let pieces: Vec<Vec<u8>> = (0..10u64).map(|i| content("/up", 0, i * 70_000..(i + 1) * 70_000)).collect();
        let stream = futures::stream::iter(pieces.into_iter().map(Ok::<_, std::io::Error>));
        let resp = client().post(origin.url("/up/b")).body(reqwest::Body::wrap_stream(stream)).send().await.unwrap();
        let want = content("/up", 0, 0..700_000);
        assert_eq!(resp.text().await.unwrap(), format!("len=700000 crc={:08x}", crc32fast::hash(&want)));
        let rec = origin.log().pop().unwrap();
        assert_eq!(rec.header("transfer-encoding"), Some("chunked"));
        assert_eq!((rec.body_len, rec.body_crc), (700_000, crc32fast::hash(&want)));

        // Raw chunked with extensions, trailers and Expect: 100-continue, then a second request
        // on the same connection.
        let mut s = TcpStream::connect(origin.addr()).await.unwrap();
        s.write_all(b"POST /raw HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let mut tmp = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut tmp).await.unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&tmp[..n]);
        }
        assert!(buf.starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"));
        buf.drain(..25);
        s.write_all(b"5;ext=1\r\nhello\r\nA\r\n 012345678\r\n0\r\nX-Trailer: t\r\n\r\n").await.unwrap();
        let (head, body) = read_one_response(&mut s, &mut buf).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(String::from_utf8(body).unwrap(), format!("len=15 crc={:08x}", crc32fast::hash(b"hello 012345678")));
        s.write_all(b"PUT /raw2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc").await.unwrap();
        let (_, body) = read_one_response(&mut s, &mut buf).await;
        assert_eq!(String::from_utf8(body).unwrap(), format!("len=3 crc={:08x}", crc32fast::hash(b"abc")));

        // A bad chunk size is a 400 and the connection closes.
        let raw = raw_exchange(&origin, b"POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").await;
        assert!(raw.starts_with(b"HTTP/1.1 400"), "{}", String::from_utf8_lossy(&raw));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_close_and_malformed() {
    bounded(async {
        let origin = Origin::start().await;
        let mut s = TcpStream::connect(origin.addr()).await.unwrap();
        let mut buf = Vec::new();
        for i in 0..3u64 {
            let path = format!("/obj/{}/k", 1000 + i);
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
            let (head, body) = read_one_response(&mut s, &mut buf).await;
            assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
            assert!(!head.to_ascii_lowercase().contains("connection: close"));
            assert_eq!(body, content(&path, 0, 0..1000 + i));
        }
        let log = origin.log();
        assert_eq!(log.len(), 3);
        assert!(log.iter().all(|r| r.conn == log[0].conn), "one connection");
        assert_eq!(origin.connections(), 1);
        // Connection: close is honoured: the server closes after the response.
        s.write_all(b"GET /obj/5/k HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.unwrap().unwrap();
        buf.extend_from_slice(&rest);
        let (head, body) = split_head(&buf);
        assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
        assert_eq!(body, &content("/obj/5/k", 0, 0..5)[..]);
        // HTTP/1.0 without keep-alive is closed too.
        let raw = raw_exchange(&origin, b"GET /obj/5/k HTTP/1.0\r\n\r\n").await;
        assert!(raw.starts_with(b"HTTP/1.1 200 OK"));

        // Malformed requests: 400 and close; not counted.
        let before = origin.requests();
        for raw in [
            &b"GET / HTTP/1.1\r\nHost: a\r\nBad Header Line\r\n\r\n"[..],
            b"GARBAGE\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let out = raw_exchange(&origin, raw).await;
            assert!(out.starts_with(b"HTTP/1.1 400"), "{:?} -> {:?}", String::from_utf8_lossy(raw), String::from_utf8_lossy(&out));
        }
        // An oversized head.
        let mut huge = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        huge.resize(100_000, b'a');
        huge.extend_from_slice(b"\r\n\r\n");
        let out = raw_exchange(&origin, &huge).await;
        assert!(out.starts_with(b"HTTP/1.1 400"));
        assert_eq!(origin.requests(), before);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_counters_and_bound() {
    bounded(async {
        let origin = Origin::start().await;
        for i in 0..5u64 {
            let resp = client()
                .get(origin.url(&format!("/obj/{}/l?i={i}", 100 * (i + 1))))
                .send()
                .await
                .unwrap();
            resp.bytes().await.unwrap();
        }
        assert_eq!(origin.requests(), 5);
        assert_eq!(origin.body_bytes_sent(), 100 + 200 + 300 + 400 + 500);
        let log = origin.log();
        assert_eq!(log.len(), 5);
        assert_eq!(
            log[4].path, "/obj/500/l?i=4",
            "the query is kept in the log"
        );
        assert!(log.iter().all(|r| r.method == "GET" && r.body_len == 0));
        origin.reset_stats();
        assert_eq!(
            (
                origin.requests(),
                origin.body_bytes_sent(),
                origin.log().len()
            ),
            (0, 0, 0)
        );

        // The log keeps only the last LOG_CAPACITY requests: pipeline more than that on one
        // connection, reading responses concurrently.
        let total = origin::LOG_CAPACITY + 50;
        let s = TcpStream::connect(origin.addr()).await.unwrap();
        let (mut rd, mut wr) = s.into_split();
        let writer = tokio::spawn(async move {
            let mut batch = Vec::new();
            for i in 0..total {
                batch.extend_from_slice(
                    format!("HEAD /missing/{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
                );
                if batch.len() > 32 * 1024 || i + 1 == total {
                    wr.write_all(&batch).await.unwrap();
                    batch.clear();
                }
            }
            wr
        });
        let mut seen = 0;
        let mut tail = Vec::new();
        let mut tmp = vec![0u8; 65536];
        while seen < total {
            let n = rd.read(&mut tmp).await.unwrap();
            assert!(n > 0);
            tail.extend_from_slice(&tmp[..n]);
            while let Some(i) = tail.windows(4).position(|w| w == b"\r\n\r\n") {
                assert!(tail.starts_with(b"HTTP/1.1 404"));
                tail.drain(..i + 4);
                seen += 1;
            }
        }
        let _wr = writer.await.unwrap();
        assert_eq!(origin.requests(), total as u64);
        let log = origin.log();
        assert_eq!(log.len(), origin::LOG_CAPACITY);
        assert_eq!(log[0].path, "/missing/50");
        assert_eq!(log.last().unwrap().path, format!("/missing/{}", total - 1));
        assert_eq!(origin.body_bytes_sent(), 0, "HEAD sends no body");
    })
    .await;
}
