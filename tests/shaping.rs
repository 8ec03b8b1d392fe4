//! Per-client shaping against the real binary. Clients are told apart by source address: each
//! test client binds its own loopback address (127.0.0.2, 127.0.0.3, ...).
//!
//! Rates are kept low (1 MiB/s and below) so that the pacing, not the machine, sets the pace.

mod common;

use common::origin::{content, Origin};
use common::proxy::Proxy;
use std::net::IpAddr;
use std::time::{Duration, Instant};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// A cached route `/obj/` and a pass-through route `/download/`, both shaped by `standard`.
fn config(origin: &Origin, class: &str, total_rate: &str) -> String {
    format!(
        "cache:\n  chunk_size: 256KiB\n  memory:\n    capacity: 64MiB\nupstreams:\n  origin:\n    servers: [\"{}\"]\nshaping:\n  total_rate: {total_rate}\n  classes:\n    standard:\n{class}routes:\n  - path_prefix: /obj/\n    upstream: origin\n    shaping: standard\n  - path_prefix: /download/\n    upstream: origin\n    cache: false\n    shaping: standard\n",
        origin.addr()
    )
}

fn client_from(n: u8) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(IpAddr::from([127, 0, 0, n]))
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// Download `path` from `client`; returns (status, exact bytes?, seconds taken).
async fn download(
    proxy: &Proxy,
    client: &reqwest::Client,
    path: &str,
    len: u64,
) -> (u16, bool, f64) {
    let started = Instant::now();
    let resp = client.get(proxy.url(path)).send().await.expect("request");
    let status = resp.status().as_u16();
    let body = resp.bytes().await.expect("body");
    let took = started.elapsed().as_secs_f64();
    (
        status,
        body.as_ref() == content(path, 0, 0..len).as_slice(),
        took,
    )
}

fn within(got: f64, want: f64, tolerance: f64) -> bool {
    (got - want).abs() <= want * tolerance
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_one_connection_gets_its_rate() {
    let origin = Origin::start().await;
    let class = "      rate: 1MiB/s\n      burst: 256KiB\n";
    let proxy = Proxy::start(&config(&origin, class, "0"));
    let len = 3 * MIB;
    for path in [format!("/obj/{len}/one.bin"), format!("/download/{len}")] {
        let (status, exact, took) = download(&proxy, &client_from(2), &path, len).await;
        assert_eq!(status, 200, "{path}");
        assert!(exact, "{path}: exact bytes");
        // Allowing for the burst: (len - burst) at the rate.
        let rate = (len - 256 * KIB) as f64 / took;
        println!("{path}: {:.0} KiB/s over {took:.2}s", rate / 1024.0);
        assert!(within(rate, MIB as f64, 0.10), "{path}: {rate:.0} B/s");
    }
    let s = proxy.stats().await;
    assert!(s["shaping_bytes"] >= 2 * len - 512 * KIB, "{s:?}");
    assert!(s["shaping_delayed_us"] > 1_000_000, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_two_connections_share_its_rate() {
    let origin = Origin::start().await;
    let class = "      rate: 1MiB/s\n      burst: 128KiB\n";
    let proxy = Proxy::start(&config(&origin, class, "0"));
    let len = 2 * MIB;
    let (a, b) = (client_from(2), client_from(2));
    let (pa, pb) = (format!("/obj/{len}/two-a.bin"), format!("/download/{len}"));
    let started = Instant::now();
    let ((sa, ea, ta), (sb, eb, tb)) = tokio::join!(
        download(&proxy, &a, &pa, len),
        download(&proxy, &b, &pb, len)
    );
    let all = started.elapsed().as_secs_f64();
    assert_eq!((sa, sb), (200, 200));
    assert!(ea && eb, "exact bytes");
    let together = (2 * len - 128 * KIB) as f64 / all;
    println!(
        "together {:.0} KiB/s; a {ta:.2}s, b {tb:.2}s",
        together / 1024.0
    );
    assert!(
        within(together, MIB as f64, 0.10),
        "together: {together:.0} B/s"
    );
    // While both run, each gets half: they finish at about the same time.
    let (ra, rb) = (len as f64 / ta, len as f64 / tb);
    for r in [ra, rb] {
        assert!(
            within(r, MIB as f64 / 2.0, 0.25),
            "each half: {ra:.0} / {rb:.0} B/s"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_each_get_their_full_rate() {
    let origin = Origin::start().await;
    let class = "      rate: 1MiB/s\n      burst: 128KiB\n";
    let proxy = Proxy::start(&config(&origin, class, "0"));
    let len = 2 * MIB;
    let (a, b) = (client_from(2), client_from(3));
    let (pa, pb) = (format!("/obj/{len}/c2.bin"), format!("/obj/{len}/c3.bin"));
    let ((sa, ea, ta), (sb, eb, tb)) = tokio::join!(
        download(&proxy, &a, &pa, len),
        download(&proxy, &b, &pb, len)
    );
    assert_eq!((sa, sb), (200, 200));
    assert!(ea && eb);
    for t in [ta, tb] {
        let r = (len - 128 * KIB) as f64 / t;
        assert!(
            within(r, MIB as f64, 0.10),
            "each its full rate: {r:.0} B/s"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_rate_is_shared_evenly_and_held() {
    let origin = Origin::start().await;
    let class = "      rate: 1MiB/s\n      burst: 64KiB\n";
    let proxy = Proxy::start(&config(&origin, class, "1536KiB/s"));
    let len = 2 * MIB;
    let clients: Vec<reqwest::Client> = (2..5).map(client_from).collect();
    let paths: Vec<String> = (2..5).map(|n| format!("/obj/{len}/cap-{n}.bin")).collect();
    let started = Instant::now();
    let results = futures::future::join_all(
        clients
            .iter()
            .zip(&paths)
            .map(|(c, p)| download(&proxy, c, p, len)),
    )
    .await;
    let all = started.elapsed().as_secs_f64();
    let share = 512.0 * KIB as f64;
    for (status, exact, took) in &results {
        assert_eq!(*status, 200);
        assert!(*exact);
        let r = len as f64 / took;
        assert!(
            within(r, share, 0.10),
            "a third of the cap each: {r:.0} B/s ({results:?})"
        );
    }
    let total = (3 * len) as f64 / all;
    assert!(
        total <= 1536.0 * KIB as f64 * 1.10,
        "at the cap: {total:.0} B/s"
    );
    assert!(
        within(total, 1536.0 * KIB as f64, 0.10),
        "at the cap: {total:.0} B/s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_downloads_a_client_gets_429_at_once_and_others_are_served() {
    let origin = Origin::start().await;
    let class = "      rate: 256KiB/s\n      burst: 64KiB\n      max_downloads: 1\n";
    let proxy = Proxy::start(&config(&origin, class, "0"));
    let a = client_from(2);
    let len = MIB;
    let first = a
        .get(proxy.url(&format!("/download/{len}")))
        .send()
        .await
        .expect("first download");
    assert_eq!(first.status(), 200);
    // The first download is in progress (about 4 s at this rate): a second one is refused now.
    let started = Instant::now();
    let second = a
        .get(proxy.url("/obj/4096/second.bin"))
        .send()
        .await
        .expect("second");
    let took = started.elapsed();
    assert_eq!(second.status(), 429);
    assert_eq!(
        second
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert!(took < Duration::from_millis(100), "at once: {took:?}");
    // Another client is unaffected.
    let (status, exact, _) = download(&proxy, &client_from(3), "/obj/4096/other.bin", 4096).await;
    assert_eq!(status, 200);
    assert!(exact);
    // When the first ends, the client may start another.
    let body = first.bytes().await.expect("first body");
    assert_eq!(body.len() as u64, len);
    let (status, _, _) = download(&proxy, &a, "/obj/4096/third.bin", 4096).await;
    assert_eq!(status, 200);
    let s = proxy.stats().await;
    assert_eq!(s["shaping_refused_downloads"], 1, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_after_sends_the_first_bytes_at_full_speed() {
    let origin = Origin::start().await;
    let class = "      rate: 256KiB/s\n      burst: 32KiB\n      rate_after: 1MiB\n";
    let proxy = Proxy::start(&config(&origin, class, "0"));
    let len = 1536 * KIB;
    let path = format!("/download/{len}");
    let started = Instant::now();
    let mut resp = client_from(2)
        .get(proxy.url(&path))
        .send()
        .await
        .expect("request");
    let mut got = 0u64;
    let mut first_mib = None;
    while let Some(piece) = resp.chunk().await.expect("body") {
        got += piece.len() as u64;
        if got >= MIB && first_mib.is_none() {
            first_mib = Some(started.elapsed());
        }
    }
    let all = started.elapsed();
    assert_eq!(got, len);
    let first = first_mib.expect("a mebibyte arrived");
    // Paced, the first MiB would take 4 s; unpaced it takes a blink.
    assert!(
        first < Duration::from_millis(2000),
        "first MiB at full speed: {first:?}"
    );
    // The rest (512 KiB less the burst) is paced at 256 KiB/s: about 1.9 s in all.
    assert!(all > Duration::from_millis(1690), "then paced: {all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_a_new_connection_of_that_client_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = Origin::start().await;
    let class = "      rate: 64KiB/s\n      burst: 16KiB\n      max_connections: 2\n";
    let proxy = Proxy::start(&config(&origin, class, "0"));
    let addr: std::net::SocketAddr = proxy
        .url("")
        .trim_start_matches("http://")
        .parse()
        .expect("proxy address");
    let connect_from = |n: u8| async move {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind((IpAddr::from([127, 0, 0, n]), 0).into())
            .expect("bind");
        sock.connect(addr).await.expect("connect")
    };
    // Reads one response head (and whatever came with it) from a kept-alive connection.
    async fn head(s: &mut tokio::net::TcpStream, path: &str) -> String {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("send");
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
    let mut c1 = connect_from(2).await;
    let mut c2 = connect_from(2).await;
    assert!(head(&mut c1, "/obj/100/a.bin")
        .await
        .starts_with("HTTP/1.1 200"));
    assert!(head(&mut c2, "/obj/100/b.bin")
        .await
        .starts_with("HTTP/1.1 200"));
    // A third connection of the same client is refused: 429, then closed.
    let mut c3 = connect_from(2).await;
    let answer = head(&mut c3, "/obj/100/c.bin").await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), c3.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(_))),
        "the refused connection is closed"
    );
    // Another client is unaffected, and the first two connections keep working.
    let mut other = connect_from(3).await;
    assert!(head(&mut other, "/obj/100/d.bin")
        .await
        .starts_with("HTTP/1.1 200"));
    assert!(head(&mut c1, "/obj/100/e.bin")
        .await
        .starts_with("HTTP/1.1 200"));
    // When one of them closes, a new connection of that client is admitted.
    drop(c2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c4 = connect_from(2).await;
    assert!(head(&mut c4, "/obj/100/f.bin")
        .await
        .starts_with("HTTP/1.1 200"));
    let s = proxy.stats().await;
    assert_eq!(s["shaping_refused_connections"], 1, "{s:?}");
}
