//! Connection hardening (issue 10), with raw sockets on loopback against the real binary:
//! keep-alive, header, body and send timeouts; `max_connections` reclaiming idle connections
//! while the admin listener keeps answering; pipelining on the cached and pass-through paths;
//! strict request lines (400, 414, 431, absolute-form routing); RSS after 10,000 connections.

mod common;

use common::origin::{content, Origin};
use common::proxy::Proxy;
use common::raw::{connect, exchange, routes, Reader};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn get(path: &str, host: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keepalive_connection_closes_after_keepalive_timeout() {
    let origin = Origin::start().await;
    let proxy = Proxy::start_with_server(&routes(&origin, true), "  keepalive_timeout: 1s\n");
    let mut r = Reader::new(connect(proxy.addr));
    for _ in 0..2 {
        r.s.write_all(&get("/obj/100/ka", "example.com")).unwrap();
        let resp = r.response().expect("response");
        assert_eq!(resp.status, 200);
    }
    let closed = r
        .wait_close(Duration::from_secs(5))
        .expect("an idle connection is closed");
    eprintln!("idle keep-alive closed after {closed:?} (keepalive_timeout 1s)");
    assert!(
        closed >= Duration::from_millis(900),
        "closed after {closed:?}: before keepalive_timeout"
    );
    assert!(
        closed <= Duration::from_secs(2),
        "closed after {closed:?}: later than keepalive_timeout + 1 s"
    );
    let stats = proxy.stats().await;
    assert!(stats["client_keepalive_closed"] >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_header_is_cut_off_after_header_timeout_with_408() {
    let origin = Origin::start().await;
    let proxy = Proxy::start_with_server(&routes(&origin, true), "  header_timeout: 1s\n");
    let mut s = connect(proxy.addr);
    let start = Instant::now();
    s.write_all(b"GET /obj/100/slow HTTP/1.1\r\n").unwrap();
    // One header line every 300 ms: each read makes progress, the header never ends.
    let writer = {
        let mut s = s.try_clone().unwrap();
        std::thread::spawn(move || {
            for i in 0..20 {
                std::thread::sleep(Duration::from_millis(300));
                if s.write_all(format!("X-Line-{i}: v\r\n").as_bytes())
                    .is_err()
                {
                    break;
                }
            }
        })
    };
    let mut r = Reader::new(s);
    let resp = r.response().expect("an answer before the close");
    let elapsed = start.elapsed();
    eprintln!(
        "trickled header answered {} after {elapsed:?} (header_timeout 1s)",
        resp.status
    );
    assert_eq!(resp.status, 408);
    assert!(
        elapsed <= Duration::from_secs(2),
        "cut off after {elapsed:?}"
    );
    assert!(
        r.wait_close(Duration::from_secs(4)).is_some(),
        "then closed"
    );
    writer.join().unwrap();
    // A connection that never sends a byte is closed too, quietly.
    let mut idle = Reader::new(connect(proxy.addr));
    let closed = idle.wait_close(Duration::from_secs(4)).expect("closed");
    assert!(
        closed <= Duration::from_secs(2),
        "silent connection closed after {closed:?}"
    );
    assert_eq!(origin.requests(), 0, "nothing reached the origin");
    assert!(proxy.stats().await["client_header_timeouts"] >= 1);
    assert_no_error_lines(&proxy);
}

/// Hostile or departing clients are routine: they must not write ERROR lines (any client could
/// flood the log).
fn assert_no_error_lines(proxy: &Proxy) {
    let log = proxy.log();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "ERROR lines: {errors:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_downloads_are_not_errors() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&routes(&origin, true));
    for cached in [false, true] {
        for i in 0..10 {
            let mut r = Reader::new(connect(proxy.addr));
            r.s.write_all(&get(&format!("/obj/8388608/abort-{i}"), "example.com"))
                .unwrap();
            assert!(r.fill(), "the download started (cached: {cached})");
            // Gone after the first bytes.
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_no_error_lines(&proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_is_cut_off_after_body_timeout() {
    let origin = Origin::start().await;
    let proxy = Proxy::start_with_server(&routes(&origin, false), "  body_timeout: 1s\n");
    let mut s = connect(proxy.addr);
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: example.com\r\nContent-Length: 1000\r\n\r\n0123456789",
    )
    .unwrap();
    let mut r = Reader::new(s);
    let start = Instant::now();
    let closed = r
        .wait_close(Duration::from_secs(5))
        .expect("a stalled body ends the connection");
    eprintln!("stalled body: connection closed after {closed:?} (body_timeout 1s)");
    assert!(
        start.elapsed() <= Duration::from_secs(3),
        "closed after {closed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_after_send_timeout() {
    let origin = Origin::start().await;
    let proxy = Proxy::start_with_server(&routes(&origin, true), "  send_timeout: 1s\n");
    let mut s = small_rcvbuf_socket(proxy.addr);
    s.write_all(&get("/obj/67108864/never-read", "example.com"))
        .unwrap();
    // Read nothing. The proxy's writes stall once the socket buffers are full.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let stats = proxy.stats().await;
        if stats["client_send_timeouts"] >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no send timeout within 15 s: {:?}",
            stats.get("client_send_timeouts")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The connection is gone: reading drains what was buffered, then ends.
    let mut r = Reader::new(s);
    assert!(r.wait_close(Duration::from_secs(10)).is_some());
}

/// A client socket with a small receive buffer, so that a stalled reader stalls the proxy's
/// writes after little data.
fn small_rcvbuf_socket(addr: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    // SAFETY: a fresh socket fd, owned by the TcpStream made from it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let size: libc::c_int = 16 * 1024;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &size as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let SocketAddr::V4(v4) = addr else {
            panic!("IPv4 loopback expected")
        };
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "connect");
        TcpStream::from_raw_fd(fd)
    }
}

/// Open `n` keep-alive connections, each after one answered request.
fn idle_connections(addr: SocketAddr, n: usize, path: &str) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = connect(addr);
            s.write_all(&get(path, "example.com")).unwrap();
            let mut r = Reader::new(s);
            let resp = r
                .response()
                .unwrap_or_else(|| panic!("response on connection {i}"));
            assert_eq!(resp.status, 200, "connection {i}");
            r.s
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_idle_connections_make_room_and_admin_stays_responsive() {
    assert!(
        common::raise_nofile() >= 4096,
        "the test needs 4096 descriptors"
    );
    let origin = Origin::start().await;
    let proxy = Proxy::start_with_server(&routes(&origin, true), "  max_connections: 1000\n");
    let held = tokio::task::spawn_blocking({
        let addr = proxy.addr;
        move || idle_connections(addr, 1200, "/obj/1000/small")
    })
    .await
    .unwrap();
    assert_eq!(held.len(), 1200);
    // A new client is served.
    let resp = exchange(proxy.addr, &get("/obj/1000/small", "example.com")).expect("served");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, content("/obj/1000/small", 0, 0..1000));
    // The admin listener answers at once.
    let start = Instant::now();
    let health =
        exchange(proxy.admin, b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n").expect("healthz");
    let took = start.elapsed();
    eprintln!("/healthz with 1200 idle client connections held: {took:?}");
    assert_eq!(health.status, 200);
    assert!(took < Duration::from_secs(1), "/healthz took {took:?}");
    let stats = proxy.stats().await;
    eprintln!(
        "open {} reclaimed {} refused {}",
        stats["client_connections_open"],
        stats["client_connections_reclaimed"],
        stats["client_connections_refused"]
    );
    assert!(stats["client_connections_reclaimed"] >= 200);
    assert!(stats["client_connections_open"] <= 1000);
    assert_eq!(stats["client_connections_refused"], 0);
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_cap_with_nothing_idle_new_connections_are_refused_at_once() {
    let origin = Origin::start().await;
    let yaml = format!(
        "upstreams:\n  origin:\n    servers: [\"{}\"]\n    read_timeout: 30s\n    deadline: 60s\nroutes:\n  - path_prefix: /\n    upstream: origin\n    cache: false\n",
        origin.addr()
    );
    let proxy = Proxy::start_with_server(&yaml, "  max_connections: 4\n");
    // Four connections whose requests wait on a hanging origin: busy, not reclaimable.
    origin.set_fault(common::origin::Fault::Hang);
    let busy: Vec<TcpStream> = (0..4)
        .map(|i| {
            let mut s = connect(proxy.addr);
            s.write_all(&get(&format!("/obj/10/busy-{i}"), "example.com"))
                .unwrap();
            s
        })
        .collect();
    assert!(
        origin.wait_requests(4, Duration::from_secs(10)).await,
        "the four requests reach the origin"
    );
    let start = Instant::now();
    let resp = exchange(proxy.addr, &get("/obj/10/x", "example.com")).expect("an answer");
    assert_eq!(resp.status, 503);
    assert_eq!(resp.header("retry-after"), Some("1"));
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "refused after {:?}",
        start.elapsed()
    );
    assert!(proxy.stats().await["client_connections_refused"] >= 1);
    // Once they go, clients are served again.
    drop(busy);
    origin.clear_fault();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = exchange(proxy.addr, &get("/obj/10/x", "example.com")).expect("answer");
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still {}", r.status);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Send GETs for `paths` on one connection without waiting for answers, cut into pieces at
/// `cuts` (60 ms apart; none: one write), and check the answers come in order with exact bytes
/// and the connection is still usable afterwards.
fn pipelined(proxy: &Proxy, paths: &[&str], cuts: &[usize]) {
    let mut s = connect(proxy.addr);
    let all: Vec<u8> = paths.iter().flat_map(|p| get(p, "example.com")).collect();
    let mut prev = 0;
    for &c in cuts {
        s.write_all(&all[prev..c]).unwrap();
        prev = c;
        std::thread::sleep(Duration::from_millis(60));
    }
    s.write_all(&all[prev..]).unwrap();
    let mut r = Reader::new(s);
    for p in paths {
        let resp = r
            .response()
            .unwrap_or_else(|| panic!("no response for {p} ({cuts:?})"));
        assert_eq!(resp.status, 200, "{p}");
        let size: u64 = p.split('/').nth(2).unwrap().parse().unwrap();
        assert_eq!(
            resp.body,
            content(p, 0, 0..size),
            "{p}: bytes in order ({cuts:?})"
        );
    }
    r.s.write_all(&get(paths[0], "example.com")).unwrap();
    assert_eq!(r.response().expect("after the pipeline").status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_on_the_cached_path() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&routes(&origin, true));
    let paths = ["/obj/3000/p1", "/obj/70000/p2", "/obj/10/p3"];
    pipelined(&proxy, &paths, &[]); // cold: misses
    pipelined(&proxy, &paths, &[]); // warm: hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_on_pass_through() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&routes(&origin, false));
    pipelined(
        &proxy,
        &["/obj/3000/q1", "/obj/70000/q2", "/obj/10/q3"],
        &[],
    );
    assert!(origin.requests() >= 4);
}

/// Pipelined requests that arrive in pieces: a header split across writes, the next request
/// sent while the previous one is being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_arriving_in_pieces_are_answered_in_order() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&routes(&origin, true));
    let paths = ["/obj/5000/r1", "/obj/200000/r2", "/obj/10/r3", "/obj/70/r4"];
    for cuts in [[10usize, 50, 60], [30, 31, 90], [1, 2, 3]] {
        pipelined(&proxy, &paths, &cuts);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_lines_are_strict() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&routes(&origin, true));
    let status = |req: &[u8]| exchange(proxy.addr, req).map(|r| r.status);
    assert_eq!(
        status(b"GET foo HTTP/1.1\r\nHost: example.com\r\n\r\n"),
        Some(400)
    );
    assert_eq!(
        status(b"GET /obj/10/a HTTP/1.1\r\n\r\n"),
        Some(400),
        "HTTP/1.1 without Host"
    );
    // A 1 MiB header: 431, before the proxy has read (or buffered) it all.
    let mut big = b"GET /obj/10/a HTTP/1.1\r\nHost: example.com\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 1 << 20));
    big.extend_from_slice(b"\r\n\r\n");
    assert_eq!(status(&big), Some(431));
    // 300 header fields (Pingora parses at most 256): 431 too.
    let mut many = b"GET /obj/10/a HTTP/1.1\r\nHost: example.com\r\n".to_vec();
    for i in 0..300 {
        many.extend_from_slice(format!("X-F{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(status(&many), Some(431));
    // A 20 KiB target: 414, whether it is seen whole or arrives in pieces.
    let long = format!("/obj/10/{}", "a".repeat(20 << 10));
    assert_eq!(status(&get(&long, "example.com")), Some(414));
    let just_over = format!("/obj/10/{}", "a".repeat((8 << 10) - 7));
    assert_eq!(status(&get(&just_over, "example.com")), Some(414));
    assert_eq!(origin.requests(), 0, "none of these reached the origin");
    // The limits are not off by one the other way: a large but allowed request is served.
    let fine = format!("/obj/10/{}", "a".repeat(4000));
    assert_eq!(status(&get(&fine, "example.com")), Some(200));
    assert_no_error_lines(&proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_routes_by_its_authority() {
    let a = Origin::start().await;
    let b = Origin::start().await;
    let yaml = format!(
        "upstreams:\n  a:\n    servers: [\"{}\"]\n  b:\n    servers: [\"{}\"]\nroutes:\n  - host: a.example\n    path_prefix: /\n    upstream: a\n  - host: b.example\n    path_prefix: /\n    upstream: b\n",
        a.addr(),
        b.addr()
    );
    let proxy = Proxy::start(&yaml);
    // No Host at all: the authority is the host.
    let r = exchange(
        proxy.addr,
        b"GET http://b.example/obj/100/abs HTTP/1.1\r\n\r\n",
    )
    .expect("answer");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, content("/obj/100/abs", 0, 0..100));
    assert_eq!((a.requests(), b.requests() > 0), (0, true));
    let seen = b.log();
    let last = seen.last().expect("b saw the request");
    assert_eq!(
        last.header("host"),
        Some("b.example"),
        "the origin gets the authority as Host"
    );
    assert!(
        last.path.starts_with("/obj/100/abs"),
        "origin-form upstream: {}",
        last.path
    );
    // The same object by origin-form with Host is the same cache entry: a hit.
    let before = b.requests();
    let r = exchange(proxy.addr, &get("/obj/100/abs", "b.example")).expect("answer");
    assert_eq!(r.status, 200);
    assert_eq!(
        b.requests(),
        before,
        "served from the entry the absolute-form request made"
    );
    // Port in the authority, upper case: routed the same.
    let r = exchange(
        proxy.addr,
        b"GET http://A.EXAMPLE:80/obj/100/abs2 HTTP/1.1\r\n\r\n",
    )
    .expect("answer");
    assert_eq!(r.status, 200);
    assert!(a.requests() > 0);
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rss_after_ten_thousand_connections_returns_near_where_it_started() {
    assert!(
        common::raise_nofile() >= 12_000,
        "the test needs 12000 descriptors"
    );
    let origin = Origin::start().await;
    let proxy = Proxy::start_with_server(&routes(&origin, true), "  max_connections: 11000\n");
    // Warm up: the object cached, the runtime's threads started.
    let warm = idle_connections(proxy.addr, 50, "/obj/1000/rss");
    drop(warm);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = rss_kib(proxy.pid());
    let addr = proxy.addr;
    let held = tokio::task::spawn_blocking(move || idle_connections(addr, 10_000, "/obj/1000/rss"))
        .await
        .unwrap();
    let open = rss_kib(proxy.pid());
    assert_eq!(proxy.stats().await["client_connections_open"], 10_000);
    drop(held);
    // Wait for the proxy to see every close.
    let deadline = Instant::now() + Duration::from_secs(20);
    while proxy.stats().await["client_connections_open"] > 0 {
        assert!(Instant::now() < deadline, "connections still open");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let end = rss_kib(proxy.pid());
    eprintln!(
        "RSS: {} MiB at start, {} MiB with 10,000 idle keep-alive connections ({} KiB each), {} MiB after they closed ({:+} MiB)",
        start / 1024,
        open / 1024,
        open.saturating_sub(start) / 10_000,
        end / 1024,
        (end as i64 - start as i64) / 1024
    );
    assert!(start > 0 && end > 0);
    assert!(
        end <= start + 32 * 1024,
        "RSS {} MiB after the connections closed, {} MiB at start",
        end / 1024,
        start / 1024
    );
}
