//! Clients that vanish or stall must not pin the node (issue 20, B.7 and B.10), against the
//! real binary with raw sockets:
//!
//! - a shaped download whose client resets or closes ends at once, cached or passed through:
//!   its connection slot (`client_connections_open`), its download (`shaping_active_clients`,
//!   its share of `shaping.total_rate`), its origin connection, and the pacing it reserved;
//! - a pass-through response to a client that stopped reading holds a bounded buffer.
//!
//! Ghosts come from their own loopback addresses (127.0.0.x), so they are shaping clients of
//! their own. Time bounds here are generous "it ends at all" bounds: before the fix, 200
//! ghosts held their slots for over a minute.

mod common;

use common::origin::{content, Origin};
use common::proxy::Proxy;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// How long a freed resource may take to show as freed: the ghosts' paced waits run tens of
/// seconds, so anything that only ends when they do fails this by far.
const FREED_WITHIN: Duration = Duration::from_secs(4);

/// A cached route `/obj/` and a pass-through route `/download/`, both shaped by `standard`.
fn shaped(origin: &Origin, class: &str, total_rate: &str) -> String {
    format!(
        "cache:\n  chunk_size: 256KiB\n  memory:\n    capacity: 64MiB\nupstreams:\n  origin:\n    servers: [\"{}\"]\n    read_timeout: 20s\nshaping:\n  total_rate: {total_rate}\n  classes:\n    standard:\n{class}routes:\n  - path_prefix: /obj/\n    upstream: origin\n    shaping: standard\n  - path_prefix: /download/\n    upstream: origin\n    cache: false\n    shaping: standard\n",
        origin.addr()
    )
}

fn proxy_addr(p: &Proxy) -> SocketAddr {
    p.url("")
        .trim_start_matches("http://")
        .parse()
        .expect("proxy address")
}

/// A connection from 127.0.0.`from` that sent `GET path`.
async fn request_from(addr: SocketAddr, from: u8, path: &str) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind((IpAddr::from([127, 0, 0, from]), 0).into())
        .expect("bind");
    let mut s = sock.connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    s
}

/// How a ghost leaves.
#[derive(Debug, Clone, Copy)]
enum Leave {
    /// Close with SO_LINGER 0: a RST.
    Reset,
    /// Its sending side shut (a FIN), the socket kept open and never read again.
    Fin,
}

/// Make every ghost leave; FIN ghosts' sockets are returned (kept open until dropped).
async fn leave(ghosts: Vec<TcpStream>, how: Leave) -> Vec<TcpStream> {
    let mut kept = Vec::new();
    for mut g in ghosts {
        match how {
            Leave::Reset => {
                g.set_zero_linger().expect("linger");
                drop(g);
            }
            Leave::Fin => {
                g.shutdown().await.expect("shutdown");
                kept.push(g);
            }
        }
    }
    kept
}

/// Poll `/stats` until `done` holds; how long that took, or a failure naming `what`.
async fn until(
    proxy: &Proxy,
    what: &str,
    within: Duration,
    done: impl Fn(&std::collections::HashMap<String, u64>) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let s = proxy.stats().await;
        if done(&s) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{what}: not within {within:?}; stats {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until `f` holds, or fail naming `what`.
async fn until_true(what: &str, within: Duration, f: impl Fn() -> bool) -> Duration {
    let started = Instant::now();
    while !f() {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

/// A whole response read from a fresh client of 127.0.0.`from`: (status, body).
async fn fetch_from(proxy: &Proxy, from: u8, path: &str) -> (u16, Vec<u8>) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .local_address(IpAddr::from([127, 0, 0, from]))
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let resp = client.get(proxy.url(path)).send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.bytes().await.expect("body").to_vec())
}

/// `n` shaped downloads of one client (127.0.0.2) that fill the connection cap.
async fn ghosts_arrive(proxy: &Proxy, n: usize, paths: &dyn Fn(usize) -> String) -> Vec<TcpStream> {
    let addr = proxy_addr(proxy);
    let mut ghosts = Vec::new();
    for i in 0..n {
        ghosts.push(request_from(addr, 2, &paths(i)).await);
    }
    until(proxy, "every ghost admitted", FREED_WITHIN, |s| {
        s["client_connections_open"] == n as u64
    })
    .await;
    ghosts
}

/// The ghosts leave `how` after 0.3 s. Every slot and download must be freed at once, and the
/// cap must admit a new client.
async fn ghosts_leave(proxy: &Proxy, ghosts: Vec<TcpStream>, how: Leave) {
    let n = ghosts.len();
    let paced_aborts = |s: &std::collections::HashMap<String, u64>| {
        s.get("client_paced_aborts").copied().unwrap_or(0)
    };
    let aborts_before = paced_aborts(&proxy.stats().await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = proxy.stats().await;
    assert_eq!(s["shaping_active_clients"], 1, "{how:?}: {s:?}");
    let kept = leave(ghosts, how).await;
    let took = until(proxy, "slots freed", FREED_WITHIN, |s| {
        s["client_connections_open"] == 0
    })
    .await;
    let s = proxy.stats().await;
    assert_eq!(s["shaping_active_clients"], 0, "{how:?}: {s:?}");
    assert!(
        paced_aborts(&s) > aborts_before,
        "{how:?}: ghosts were waiting on their pacing: {s:?}"
    );
    println!("{how:?}: {n} ghosts freed their slots within {took:?}");
    drop(kept);
}

/// The freed cap admits a new client, whose bytes are exact.
async fn a_new_client_is_served(proxy: &Proxy) {
    let (status, body) = fetch_from(proxy, 9, "/obj/4096/after").await;
    assert_eq!(status, 200);
    assert_eq!(body, content("/obj/4096/after", 0, 0..4096));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_shaped_cached_downloads_free_their_slots_at_once() {
    let origin = Origin::start().await;
    let class = "      rate: 256KiB/s\n      burst: 64KiB\n";
    let n = 200;
    let proxy = Proxy::start_with_server(&shaped(&origin, class, "0"), "  max_connections: 200\n");
    // Half the ghosts read a cached object (their pieces wait on the client's pacing, shared
    // by 100 downloads); the other half cold objects (waiting on fills behind 16 slots).
    let hot = format!("/obj/{}/hot", 256 * KIB);
    let (status, body) = fetch_from(&proxy, 3, &hot).await;
    assert_eq!((status, body.len() as u64), (200, 256 * KIB));
    for (round, how) in [Leave::Reset, Leave::Fin].into_iter().enumerate() {
        let paths = |i: usize| {
            if i.is_multiple_of(2) {
                hot.clone()
            } else {
                format!("/obj/{}/cold-{round}-{i}", 4 * MIB)
            }
        };
        let ghosts = ghosts_arrive(&proxy, n, &paths).await;
        ghosts_leave(&proxy, ghosts, how).await;
        a_new_client_is_served(&proxy).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_shaped_pass_through_downloads_free_their_slots_and_origin_connections() {
    let origin = Origin::start().await;
    let class = "      rate: 256KiB/s\n      burst: 64KiB\n";
    let n = 200;
    let proxy = Proxy::start_with_server(&shaped(&origin, class, "0"), "  max_connections: 200\n");
    for how in [Leave::Reset, Leave::Fin] {
        origin.reset_stats();
        let paths = |i: usize| format!("/download/{}", 8 * MIB + i as u64);
        // Idle pooled connections (from the last round's new client) stay open.
        let idle = origin.open_connections();
        let ghosts = ghosts_arrive(&proxy, n, &paths).await;
        // Every ghost's request reached the origin, on a connection of its own.
        until_true("origin requests", FREED_WITHIN, || {
            origin.requests() >= n as u64
        })
        .await;
        assert!(origin.open_connections() >= n as u64);
        ghosts_leave(&proxy, ghosts, how).await;
        // Aborted mid-body, none of them can be reused: the origin sees them all close.
        let took = until_true("origin connections closed", FREED_WITHIN, || {
            origin.open_connections() <= idle
        })
        .await;
        println!("{how:?}: origin connections closed within {took:?}");
        a_new_client_is_served(&proxy).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ghosts_give_back_their_share_of_total_rate() {
    let origin = Origin::start().await;
    let class = "      rate: 1MiB/s\n      burst: 64KiB\n";
    let proxy = Proxy::start(&shaped(&origin, class, "1MiB/s"));
    let addr = proxy_addr(&proxy);
    // One live client, and twenty ghost clients of their own addresses, cached and not.
    let live_path = format!("/download/{}", 4 * MIB);
    let live = {
        let proxy_url = proxy.url(&live_path);
        tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .no_proxy()
                .local_address(IpAddr::from([127, 0, 0, 3]))
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client");
            let resp = client.get(proxy_url).send().await.expect("request");
            assert_eq!(resp.status(), 200);
            // Within the client's timeout: a live client left with a 21st of the rate after
            // the others went (a pacer still owing at the old rate) took minutes.
            resp.bytes().await.expect("body")
        })
    };
    let mut ghosts = Vec::new();
    for i in 0..20u8 {
        let path = if i.is_multiple_of(2) {
            format!("/download/{}", 64 * MIB + u64::from(i))
        } else {
            format!("/obj/{}/share-{i}", 4 * MIB)
        };
        ghosts.push(request_from(addr, 10 + i, &path).await);
    }
    until(&proxy, "all 21 clients active", FREED_WITHIN, |s| {
        s["shaping_active_clients"] == 21
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (resets, fins): (Vec<_>, Vec<_>) =
        ghosts.into_iter().enumerate().partition(|(i, _)| i % 4 < 2);
    leave(resets.into_iter().map(|(_, g)| g).collect(), Leave::Reset).await;
    let _kept = leave(fins.into_iter().map(|(_, g)| g).collect(), Leave::Fin).await;
    // The ghosts' downloads end, so their shares go back to the live client.
    let took = until(&proxy, "only the live client active", FREED_WITHIN, |s| {
        s["shaping_active_clients"] == 1
    })
    .await;
    println!("ghost clients gone from total_rate within {took:?}");
    let t = Instant::now();
    let body = live.await.expect("live download");
    println!("the live download ended {:?} later", t.elapsed());
    assert_eq!(body.as_ref(), content(&live_path, 0, 0..4 * MIB).as_slice());
}

/// 64 ghost downloads of one client each reserved a piece of the client's pacing (together
/// 16 s of it at 64 KiB/s) and left: a new download of that client starts as if they had never
/// been, rather than behind bytes nobody was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pacing_reserved_by_ghosts_is_given_back() {
    let origin = Origin::start().await;
    let class = "      rate: 64KiB/s\n      burst: 16KiB\n";
    let proxy = Proxy::start(&shaped(&origin, class, "0"));
    let addr = proxy_addr(&proxy);
    let hot = format!("/obj/{}/hot", 64 * KIB);
    let (status, _) = fetch_from(&proxy, 3, &hot).await;
    assert_eq!(status, 200);
    for (from, path) in [(2u8, hot.clone()), (4, format!("/download/{}", 64 * KIB))] {
        let mut ghosts = Vec::new();
        for _ in 0..64 {
            ghosts.push(request_from(addr, from, &path).await);
        }
        until(&proxy, "every ghost admitted", FREED_WITHIN, |s| {
            s["client_connections_open"] == 64
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        leave(ghosts, Leave::Reset).await;
        until(&proxy, "slots freed", FREED_WITHIN, |s| {
            s["client_connections_open"] == 0
        })
        .await;
        // 64 KiB at 64 KiB/s with a 16 KiB burst: under a second, not 16 s or more.
        let started = Instant::now();
        let (status, body) = fetch_from(&proxy, from, &path).await;
        let took = started.elapsed();
        assert_eq!(status, 200, "{path}");
        assert_eq!(body, content(&path, 0, 0..64 * KIB), "{path}");
        println!("{path}: after the ghosts, a new download took {took:?}");
        assert!(
            took < Duration::from_secs(6),
            "{path}: held back by pacing nobody used: {took:?}"
        );
    }
}

/// What a pass-through response buffers for a client that stopped reading, at most: Pingora's
/// pipeline holds up to ten pieces of one upstream read each, plus the read buffer, and reads
/// are 16 KiB (vendor/README.md): 10 x 16 KiB + 16 KiB. It was 10 x 64 KiB + 64 KiB.
const PASS_THROUGH_BUFFER_KIB: u64 = 176;
/// A proxied request's own state while it is in progress (Pingora's sessions and tasks, the
/// origin connection), measured with nothing buffered (an origin trickling 2 KB/s): 60 KiB.
/// With allocator slack, what each stalled reader may cost beyond the buffer.
const REQUEST_STATE_KIB: u64 = 96;

/// 200 clients that send a GET for a large pass-through object, read its first bytes and stop
/// reading with the connection open (a small receive buffer, so the kernel hides little):
/// each costs the proxy a bounded amount of memory until `send_timeout`, and when they go,
/// their slots and origin connections go too. Measured: 240 KiB each (723 KiB with Pingora's
/// 64 KiB upstream reads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_pass_through_readers_hold_a_bounded_buffer_each() {
    use tokio::io::AsyncReadExt;
    let origin = Origin::start().await;
    let proxy = Proxy::start(&format!(
        "upstreams:\n  origin:\n    servers: [\"{}\"]\nroutes:\n  - path_prefix: /\n    upstream: origin\n    cache: false\n",
        origin.addr()
    ));
    let addr = proxy_addr(&proxy);
    let n = 200u64;
    // One request first, so that what every connection shares (pools, buffers, code) is in.
    let (status, _) = fetch_from(&proxy, 3, "/download/1000").await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = proxy.rss_kib();
    let mut readers = Vec::new();
    let mut first = vec![0u8; 64 * 1024];
    for i in 0..n {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.set_recv_buffer_size(4096).expect("rcvbuf");
        let mut s = sock.connect(addr).await.expect("connect");
        let req = format!(
            "GET /download/{} HTTP/1.1\r\nHost: x\r\n\r\n",
            256 * MIB + i
        );
        s.write_all(req.as_bytes()).await.expect("send");
        let got = s.read(&mut first).await.expect("first bytes");
        assert!(got > 0);
        readers.push(s);
    }
    // Let every pipeline fill as far as it will.
    until_true("every origin request", FREED_WITHIN, || {
        origin.requests() > n
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let grown = proxy.rss_kib().saturating_sub(base);
    let each = grown / n;
    println!("{n} stalled pass-through readers: RSS +{grown} KiB, {each} KiB each");
    assert!(proxy.rss_kib() > 0, "could not read the proxy's RSS");
    assert!(
        each <= PASS_THROUGH_BUFFER_KIB + REQUEST_STATE_KIB,
        "{each} KiB per stalled reader, over the {PASS_THROUGH_BUFFER_KIB} KiB bound plus {REQUEST_STATE_KIB} KiB of request state"
    );
    // Each holds its slot and its origin connection until send_timeout; gone, they free both.
    let s = proxy.stats().await;
    assert_eq!(s["client_connections_open"], n, "{s:?}");
    assert!(origin.open_connections() >= n);
    leave(readers, Leave::Reset).await;
    until(&proxy, "slots freed", FREED_WITHIN, |s| {
        s["client_connections_open"] == 0
    })
    .await;
    until_true("origin connections closed", FREED_WITHIN, || {
        origin.open_connections() <= 1
    })
    .await;
}
