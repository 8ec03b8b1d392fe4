//! Issue 20, connection-level abuse (B.8, B.9, C.12 and two smaller items), with raw sockets on
//! loopback against the real binary: slow request bodies hold no origin connection and end on
//! `server.body_min_rate`; legitimate uploads pass intact; stalled headers cannot hold the
//! admin listener's cap; client-caused errors are counted, not logged; a pipelined request with
//! a large Cookie is answered; answers given before a request was parsed are access-logged.

mod common;

use common::origin::{content, Origin};
use common::proxy::Proxy;
use common::raw::{connect, exchange, routes, Reader};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The value of `name{labels}` in the metrics text.
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .unwrap_or(-1.0) as u64
}

/// Clients that send a POST header and then one body byte every `every`, from threads; each
/// returns the status it got and when.
fn tricklers(
    addr: SocketAddr,
    n: usize,
    content_length: usize,
    first: usize,
    every: Duration,
) -> Vec<std::thread::JoinHandle<Option<(u16, Duration)>>> {
    (0..n)
        .map(|i| {
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut s = connect(addr);
                let head = format!(
                    "POST /upload/{i} HTTP/1.1\r\nHost: example.com\r\nContent-Length: {content_length}\r\n\r\n"
                );
                s.write_all(head.as_bytes()).ok()?;
                s.write_all(&vec![b'x'; first]).ok()?;
                s.set_nonblocking(true).ok()?;
                let mut reader_buf = Vec::new();
                let mut sent = first;
                while started.elapsed() < Duration::from_secs(20) && sent < content_length {
                    std::thread::sleep(every);
                    let mut chunk = [0u8; 4096];
                    match s.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(k) => {
                            reader_buf.extend_from_slice(&chunk[..k]);
                            break;
                        }
                        Err(_) => {}
                    }
                    if s.write_all(b"y").is_err() {
                        break;
                    }
                    sent += 1;
                }
                s.set_nonblocking(false).ok()?;
                let mut r = Reader {
                    s,
                    buf: reader_buf,
                };
                let resp = r.response()?;
                Some((resp.status, started.elapsed()))
            })
        })
        .collect()
}

/// B.8: a body trickling one byte at a time is read before any origin connection is taken,
/// and ends with 408 once it falls behind `body_min_rate` past `body_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_hold_no_origin_connection_and_end_on_the_min_rate() {
    let origin = Origin::start().await;
    let proxy = Proxy::start_with_server(
        &routes(&origin, false),
        "  body_timeout: 2s\n  body_min_rate: 500B/s\n",
    );
    let clients = tricklers(proxy.addr, 40, 1000, 1, Duration::from_millis(300));
    // While they trickle: no origin connection, whatever each read's wait.
    let mut max_open = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        max_open = max_open.max(origin.open_connections());
    }
    let results: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    eprintln!(
        "slow bodies: origin connections {} (open at most {max_open}); results {:?}",
        origin.connections(),
        &results[..3]
    );
    assert_eq!(
        origin.connections(),
        0,
        "no origin connection for a body not in"
    );
    for r in &results {
        let (status, after) = r.expect("an answer");
        assert_eq!(status, 408);
        // 2 s grace, about 7 bytes earned at 500 B/s: generous for a loaded machine.
        assert!(after < Duration::from_secs(8), "ended after {after:?}");
    }
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "edgeslice_client_errors_total{kind=\"timeout\"}"),
        40
    );
    // Every slot is given back.
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.stats().await["client_connections_open"] > 0 {
        assert!(Instant::now() < deadline, "client connections left open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// B.8, a body larger than is read before connecting: its first piece takes an origin
/// connection, which the min-rate bound then releases (the body's bytes earn their time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_trickling_body_releases_its_origin_connection_at_its_deadline() {
    let origin = Origin::start().await;
    let proxy = Proxy::start_with_server(
        &routes(&origin, false),
        "  body_timeout: 2s\n  body_min_rate: 64KiB/s\n",
    );
    // 70 KB at once (earning about 1.1 s), then a byte every 300 ms of a 10 MB body.
    let clients = tricklers(proxy.addr, 10, 10 << 20, 70_000, Duration::from_millis(300));
    let mut max_open = 0;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        max_open = max_open.max(origin.open_connections());
    }
    let results: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    for r in &results {
        let (status, after) = r.expect("an answer");
        assert_eq!(status, 408);
        assert!(after < Duration::from_secs(10), "ended after {after:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while origin.open_connections() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} origin connections still open",
            origin.open_connections()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "large trickling bodies: {} origin connections opened, at most {max_open} at once, 0 left",
        origin.connections()
    );
    assert!(max_open <= 10, "one per client at most: {max_open}");
}

/// Uploads at a fair rate, of every framing, reach the origin byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_at_a_fair_rate_pass_intact() {
    let origin = Origin::start().await;
    let proxy = Proxy::start_with_server(
        &routes(&origin, false),
        "  body_timeout: 2s\n  body_min_rate: 500B/s\n",
    );
    let body: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let crc = |b: &[u8]| crc32fast::hash(b);

    // Content-Length, larger than is read before connecting, in one go.
    let mut req = format!(
        "POST /up/cl HTTP/1.1\r\nHost: example.com\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    assert_eq!(exchange(proxy.addr, &req).expect("answer").status, 200);

    // Chunked.
    let mut req =
        b"PUT /up/chunked HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for piece in body.chunks(50_000) {
        req.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        req.extend_from_slice(piece);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(exchange(proxy.addr, &req).expect("answer").status, 200);

    // Slow but steady: 200 KB over about 3 s (past body_timeout, well above the rate).
    let mut s = connect(proxy.addr);
    s.write_all(b"POST /up/steady HTTP/1.1\r\nHost: example.com\r\nContent-Length: 200000\r\n\r\n")
        .unwrap();
    for piece in body[..200_000].chunks(7_000) {
        s.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(Reader::new(s).response().expect("answer").status, 200);

    // Expect: 100-continue: one 100, then the answer.
    let mut s = connect(proxy.addr);
    s.write_all(b"POST /up/expect HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
        .unwrap();
    let mut r = Reader::new(s);
    assert_eq!(r.response().expect("100").status, 100);
    r.s.write_all(&body[..5000]).unwrap();
    let last = r.response().expect("answer");
    assert_eq!(
        last.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&last.body)
    );

    let log = origin.log();
    let seen = |path: &str| {
        log.iter()
            .find(|r| r.path == path)
            .unwrap_or_else(|| panic!("{path} reached the origin"))
            .clone()
    };
    for (path, want) in [
        ("/up/cl", &body[..]),
        ("/up/chunked", &body[..]),
        ("/up/steady", &body[..200_000]),
        ("/up/expect", &body[..5000]),
    ] {
        let r = seen(path);
        assert_eq!(r.body_len, want.len() as u64, "{path}");
        assert_eq!(r.body_crc, crc(want), "{path}: bytes intact");
    }
    assert!(
        seen("/up/expect").header("expect").is_none(),
        "the proxy answered the 100 itself"
    );
}

/// C.12: bad chunked bodies and aborted uploads are counted, not logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_counted_not_logged() {
    let origin = Origin::start().await;
    let proxy = Proxy::start_with_server(&routes(&origin, false), "  access_log: false\n");
    let before = proxy.log().lines().count();
    const N: u64 = 200;
    for i in 0..N {
        // A bad chunk size.
        let req = format!(
            "POST /bad/{i} HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nxx\r\n0\r\n\r\n"
        );
        let r = exchange(proxy.addr, req.as_bytes()).expect("an answer");
        assert_eq!(r.status, 400);
        // An upload the client gives up on.
        let mut s = connect(proxy.addr);
        let req = format!(
            "POST /short/{i} HTTP/1.1\r\nHost: example.com\r\nContent-Length: 1000\r\n\r\nabc"
        );
        s.write_all(req.as_bytes()).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let _ = Reader::new(s).response();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "edgeslice_client_errors_total{kind=\"malformed\"}"),
        N
    );
    assert_eq!(
        metric(&m, "edgeslice_client_errors_total{kind=\"closed\"}"),
        N
    );
    let log = proxy.log();
    let added: Vec<&str> = log.lines().skip(before).collect();
    assert!(
        added.len() <= 5,
        "{} log lines for {} client errors: {:#?}",
        added.len(),
        2 * N,
        &added[..added.len().min(6)]
    );
    assert_eq!(origin.connections(), 0, "no origin heard of them");
}

/// B.9: connections that never finish their header cannot hold the admin listener's cap:
/// /healthz still answers, each probe making room by closing the longest-stalled header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_headers_cannot_hold_the_admin_listener() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&routes(&origin, true));
    let admin = proxy.admin;
    let stalled: Vec<TcpStream> = (0..80)
        .filter_map(|_| {
            let mut s = connect(admin);
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nX-Slow: ")
                .ok()?;
            Some(s)
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ok = 0;
    for _ in 0..30 {
        let started = Instant::now();
        let r = exchange(
            admin,
            b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
        );
        if r.as_ref().is_some_and(|r| r.status == 200) && started.elapsed() < Duration::from_secs(2)
        {
            ok += 1;
        }
    }
    let stats = proxy.stats().await;
    eprintln!(
        "admin with {} stalled headers: {ok}/30 probes 200; reclaimed {}, refused {}",
        stalled.len(),
        stats["admin_connections_reclaimed"],
        stats["admin_connections_refused"]
    );
    assert_eq!(ok, 30, "every probe answered 200 promptly");
    // Each connection past the cap made room (stalled headers, or ones not yet read); none
    // was refused.
    assert!(stats["admin_connections_reclaimed"] >= 80 - 64);
    assert_eq!(stats["admin_connections_refused"], 0);
    drop(stalled);
}

/// B.9 on the proxy listener: the same class at `max_connections`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_headers_cannot_hold_the_proxy_listener() {
    let origin = Origin::start().await;
    let proxy = Proxy::start_with_server(&routes(&origin, true), "  max_connections: 20\n");
    let stalled: Vec<TcpStream> = (0..25)
        .filter_map(|_| {
            let mut s = connect(proxy.addr);
            s.write_all(b"GET /obj/10/x HTTP/1.1\r\nHost: example.com\r\nX-Slow: ")
                .ok()?;
            Some(s)
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..10 {
        let r = exchange(
            proxy.addr,
            format!("GET /obj/10/ok{i} HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .expect("an answer");
        assert_eq!(r.status, 200);
    }
    // A reclaimed header got a 408 before its close.
    let mut answered_408 = 0;
    for mut s in stalled {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 64];
        if matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"HTTP/1.1 408")) {
            answered_408 += 1;
        }
    }
    eprintln!("{answered_408} of 25 stalled headers got 408");
    assert!(answered_408 >= 5, "{answered_408} stalled headers got 408");
}

/// The pipelined case: two requests in one write, the second with a 20 KB Cookie, are both
/// answered, byte for byte; over the limits the second is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_request_with_a_large_cookie_is_answered() {
    let origin = Origin::start().await;
    let proxy = Proxy::start_with_server(&routes(&origin, true), "  max_header_size: 32KiB\n");
    for (cookie, first_path) in [(20_000, "/obj/100/a"), (30_000, "/obj/5000/b")] {
        let mut s = connect(proxy.addr);
        let mut all =
            format!("GET {first_path} HTTP/1.1\r\nHost: example.com\r\n\r\n").into_bytes();
        all.extend_from_slice(
            format!(
                "GET /obj/300/c{cookie} HTTP/1.1\r\nHost: example.com\r\nCookie: k={}\r\n\r\n",
                "v".repeat(cookie)
            )
            .as_bytes(),
        );
        s.write_all(&all).unwrap();
        let mut r = Reader::new(s);
        let size: u64 = first_path.split('/').nth(2).unwrap().parse().unwrap();
        let first = r.response().expect("first answer");
        assert_eq!(first.status, 200);
        assert_eq!(first.body, content(first_path, 0, 0..size));
        let second = r.response().expect("second answer");
        assert_eq!(
            second.status, 200,
            "a {cookie}-byte Cookie in the second request"
        );
        let path = format!("/obj/300/c{cookie}");
        assert_eq!(second.body, content(&path, 0, 0..300), "bytes exact");
    }
    // Over max_header_size, the second is 431; the first is still answered.
    let mut s = connect(proxy.addr);
    let mut all = b"GET /obj/100/d HTTP/1.1\r\nHost: example.com\r\n\r\n".to_vec();
    all.extend_from_slice(
        format!(
            "GET /obj/300/e HTTP/1.1\r\nHost: example.com\r\nCookie: k={}\r\n\r\n",
            "v".repeat(40_000)
        )
        .as_bytes(),
    );
    s.write_all(&all).unwrap();
    let mut r = Reader::new(s);
    assert_eq!(r.response().expect("first").status, 200);
    assert_eq!(r.response().expect("second").status, 431);
}

/// Every answer has its access-log line, also those given before a request was parsed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_before_parsing_are_access_logged() {
    let origin = Origin::start().await;
    let proxy = Proxy::start_with_server(
        &routes(&origin, true),
        "  access_log_path: {DIR}/access.log\n  header_timeout: 1s\n  max_uri_size: 1KiB\n  max_header_size: 4KiB\n",
    );
    let status = |req: &[u8]| exchange(proxy.addr, req).map(|r| r.status);
    // Pingora's parser: a field line without a colon.
    assert_eq!(
        status(b"GET / HTTP/1.1\r\nHost: example.com\r\nBad Header\r\n\r\n"),
        Some(400)
    );
    // The guard: request line, header size.
    let long = format!(
        "GET /{} HTTP/1.1\r\nHost: example.com\r\n\r\n",
        "a".repeat(2000)
    );
    assert_eq!(status(long.as_bytes()), Some(414));
    let big = format!(
        "GET / HTTP/1.1\r\nHost: example.com\r\nX: {}\r\n\r\n",
        "b".repeat(5000)
    );
    assert_eq!(status(big.as_bytes()), Some(431));
    // A header that never ends.
    assert_eq!(status(b"GET / HTTP/1.1\r\nHost: exa"), Some(408));
    let path = proxy.dir.join("access.log");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let found: Vec<u16> = [400u16, 414, 431, 408]
            .into_iter()
            .filter(|s| text.lines().any(|l| l.contains(&format!(" - - {s} "))))
            .collect();
        if found.len() == 4 {
            assert_eq!(text.lines().count(), 4, "one line each: {text}");
            break;
        }
        assert!(Instant::now() < deadline, "access log: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
