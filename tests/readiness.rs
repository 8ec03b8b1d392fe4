//! Issue 25, point 3: `/readyz` turns 503 at a graceful shutdown's start, before the listeners
//! close, so that a load balancer drains the node first. On SIGTERM the node answers
//! `/readyz` 503 `shutting down` at once and keeps serving for `server.drain_delay`; then it
//! closes its listeners and exits. A SIGINT during the drain ends it. (503 while the disk index
//! loads is shown by tests/disk_index_load.rs.)

mod common;

use common::origin::{content, Origin};
use common::proxy::Proxy;
use std::time::{Duration, Instant};

const SIZE: u64 = 200_000;

fn config(origin: &Origin) -> String {
    format!(
        "cache:\n  chunk_size: 64KiB\n  memory:\n    capacity: 16MiB\nupstreams:\n  origin:\n    servers: [\"{}\"]\n    connect_timeout: 500ms\n    read_timeout: 2s\nroutes:\n  - path_prefix: /\n    upstream: origin\n    cache: true\n",
        origin.addr()
    )
}

/// A whole GET on a new connection: 200 and the exact bytes.
async fn served_exact(proxy: &Proxy, path: &str, what: &str) {
    let fresh = common::client();
    let resp = fresh
        .get(proxy.url(path))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{what}: {path}: {e}"));
    assert_eq!(resp.status().as_u16(), 200, "{what}: {path}");
    let body = resp.bytes().await.expect("body");
    assert!(
        body[..] == content(path, 0, 0..SIZE)[..],
        "{what}: {path}: wrong bytes"
    );
}

/// `/readyz` until it says 503 `shutting down` (within 5 s of the signal).
async fn wait_not_ready(proxy: &Proxy) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = proxy.readyz().await;
        if status == 503 {
            assert_eq!(body, "shutting down\n");
            return;
        }
        assert_eq!(status, 200, "{body}");
        assert!(Instant::now() < deadline, "still ready 5 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a TCP connection to `addr` is refused (the listener is closed).
fn refused(addr: std::net::SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_readyz_503_while_the_node_still_serves_then_it_exits() {
    let origin = Origin::start().await;
    let mut proxy = Proxy::start_with_server(&config(&origin), "  drain_delay: 4s\n");
    assert_eq!(proxy.readyz().await, (200, "ready\n".to_string()));
    served_exact(&proxy, &format!("/obj/{SIZE}/before.bin"), "before SIGTERM").await;

    let sent = Instant::now();
    proxy.signal(libc::SIGTERM);
    wait_not_ready(&proxy).await;
    // Not ready, still serving: a new connection gets a miss filled from the origin and a hit.
    let during = format!("/obj/{SIZE}/during-the-drain.bin");
    served_exact(&proxy, &during, "draining, a miss").await;
    served_exact(&proxy, &during, "draining, a hit").await;
    served_exact(
        &proxy,
        &format!("/obj/{SIZE}/before.bin"),
        "draining, an older hit",
    )
    .await;
    assert!(
        proxy.log_contains("SIGTERM: not ready (/readyz 503)"),
        "{}",
        proxy.log()
    );

    // Then the listeners close and the process exits by itself.
    assert!(
        proxy.exited_within(Duration::from_secs(20)),
        "no exit 20 s after the drain:\n{}",
        proxy.log()
    );
    assert!(
        sent.elapsed() >= Duration::from_secs(4),
        "exited before server.drain_delay was over"
    );
    assert!(
        refused(proxy.addr),
        "the proxy listener still accepts after the exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_during_the_drain_ends_it() {
    let origin = Origin::start().await;
    // A drain far longer than the test: only the SIGINT can end it.
    let mut proxy = Proxy::start_with_server(&config(&origin), "  drain_delay: 10m\n");
    proxy.signal(libc::SIGTERM);
    wait_not_ready(&proxy).await;
    served_exact(&proxy, &format!("/obj/{SIZE}/draining.bin"), "draining").await;
    proxy.signal(libc::SIGINT);
    assert!(
        proxy.exited_within(Duration::from_secs(20)),
        "SIGINT did not end a 10-minute drain:\n{}",
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_drain_delay_sigterm_closes_the_listeners_at_once() {
    let origin = Origin::start().await;
    let mut proxy = Proxy::start(&config(&origin));
    served_exact(&proxy, &format!("/obj/{SIZE}/x.bin"), "before SIGTERM").await;
    proxy.signal(libc::SIGTERM);
    assert!(
        proxy.exited_within(Duration::from_secs(20)),
        "no exit after SIGTERM:\n{}",
        proxy.log()
    );
    assert!(!proxy.log().contains("still serving for server.drain_delay"));
}
