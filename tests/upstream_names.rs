//! Upstream server names resolved at run time (issue 25, "Names that resolve later"), against
//! the real binary.
//!
//! How resolution is controlled: edgeslice runs in a mount namespace of its own (`unshare
//! --mount`, as root: the tests and CI run as root), keeping the host's network so loopback
//! origins are reachable, with two files of the test bind-mounted over `/etc/hosts` and
//! `/etc/resolv.conf`. The hosts file says what each name resolves to, and is rewritten in
//! place (truncated and written: the bind mount keeps the same file); edgeslice reads it again
//! on every lookup. resolv.conf names a loopback name server nothing listens on (each test its
//! own `127.53.0.N`), so a name not in the hosts file gets no answer, without a query leaving
//! the machine. The hosts file is enough here: hickory's DNS path (NXDOMAIN against no answer)
//! is covered by the unit tests of `origin::resolve` on its classification, and the real
//! resolver's file handling is what these tests need to be true to.
//!
//! Origins listen on distinct loopback addresses (127.0.0.2, 127.0.0.3, ...) on one port, so
//! that "origin A" and "origin B" are two addresses of one `name:port`. Waits are bounded; no
//! assertion is on elapsed time except "within a few resolve intervals" (a bound, not a speed).

mod common;

use common::origin::{content, Origin};
use common::proxy::Proxy;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The test's own `/etc/hosts` and `/etc/resolv.conf`, and how to start edgeslice over them.
/// A lookup of a name not in the hosts file waits for the dead name server (`timeout:1
/// attempts:1`: about 4 s for A and AAAA), so a round takes up to that plus `resolve_interval`:
/// the waits below allow 20 s.
struct Resolution {
    _dir: tempfile::TempDir,
    hosts: PathBuf,
    resolv: PathBuf,
}

impl Resolution {
    /// `nameserver` is the loopback address where no name server listens.
    fn new(nameserver: &str) -> Resolution {
        let dir = tempfile::tempdir().expect("tempdir");
        let hosts = dir.path().join("hosts");
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").expect("hosts");
        std::fs::write(
            &resolv,
            format!("nameserver {nameserver}\noptions timeout:1 attempts:1\n"),
        )
        .expect("resolv.conf");
        Resolution {
            _dir: dir,
            hosts,
            resolv,
        }
    }

    /// Rewrite the hosts file in place: `name` resolves to `ips` (none: not at all).
    fn set(&self, name: &str, ips: &[IpAddr]) {
        let mut text = String::from("127.0.0.1 localhost\n");
        for ip in ips {
            text.push_str(&format!("{ip} {name}\n"));
        }
        // Truncate and write the same file: a new file renamed over it would not be seen
        // through the bind mount.
        std::fs::write(&self.hosts, text).expect("rewrite hosts");
    }

    /// The command that runs edgeslice (appended: its path and arguments) with these files as
    /// its `/etc/hosts` and `/etc/resolv.conf`.
    fn launcher(&self) -> Vec<String> {
        let q = |p: &Path| p.display().to_string();
        vec![
            "unshare".into(),
            "--mount".into(),
            "--propagation".into(),
            "private".into(),
            "sh".into(),
            "-c".into(),
            format!(
                "mount --bind '{}' /etc/hosts && mount --bind '{}' /etc/resolv.conf && exec \"$0\" \"$@\"",
                q(&self.hosts),
                q(&self.resolv)
            ),
        ]
    }
}

/// Whether this machine lets the test make a mount namespace (root, `unshare`); the tests need
/// it and fail loudly without it.
fn assert_namespaces_work() {
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .output()
        .expect("run unshare (util-linux)");
    assert!(
        out.status.success(),
        "these tests need to run as root with `unshare --mount`: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Origins on `ips`, all on one port (retried with another port when one is taken).
async fn origins_on(ips: &[[u8; 4]]) -> Vec<Origin> {
    'port: for _ in 0..20 {
        let port = common::proxy::free_port();
        let mut started = Vec::new();
        for ip in ips {
            match Origin::start_at(SocketAddr::from((*ip, port))).await {
                Some(o) => started.push(o),
                None => continue 'port,
            }
        }
        return started;
    }
    panic!("no port free on every one of {ips:?}");
}

/// A route on host `pass.test` passed through and one on `cache.test` through the chunk cache,
/// both to the group `o` of `servers`.
fn config(servers: &str) -> String {
    format!(
        "cache:\n  chunk_size: 64KiB\nupstreams:\n  o:\n    servers: [{servers}]\n    resolve_interval: 1s\n    connect_timeout: 500ms\n    retry: {{attempts: 2, backoff: 10ms, max_backoff: 20ms}}\nroutes:\n  - host: pass.test\n    upstream: o\n    cache: false\n  - host: cache.test\n    upstream: o\n"
    )
}

/// GET `path` with `Host: host`: status and body.
async fn get(proxy: &Proxy, host: &str, path: &str) -> (u16, Vec<u8>) {
    let resp = common::client()
        .get(proxy.url(path))
        .header("host", host)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("an answer from edgeslice");
    let status = resp.status().as_u16();
    (status, resp.bytes().await.expect("body").to_vec())
}

/// Ask until `done` says the answer is the one awaited, for at most `within`.
async fn until<F: Fn(u16, &[u8]) -> bool>(
    proxy: &Proxy,
    host: &str,
    path: &str,
    within: Duration,
    done: F,
) -> (u16, Vec<u8>) {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = get(proxy, host, path).await;
        if done(status, &body) || Instant::now() >= deadline {
            return (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

#[test]
fn a_name_that_does_not_resolve_is_a_warning_of_test_mode_not_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("edgeslice.yaml");
    std::fs::write(
        &conf,
        "listen: [\"127.0.0.1:0\"]\nupstreams:\n  o:\n    servers: [\"origin.invalid:80\", \"127.0.0.1:9\"]\nroutes:\n  - upstream: o\n",
    )
    .expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_edgeslice"))
        .args(["-t", "-c"])
        .arg(&conf)
        .output()
        .expect("run edgeslice -t");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("test is successful"), "{stdout}");
    assert!(
        stderr.contains(
            "edgeslice: warning: upstreams.o.servers[0]: origin.invalid:80 does not resolve now"
        ),
        "{stderr}"
    );
    // The address beside it is not looked up, and nothing else is said.
    assert_eq!(stderr.matches("warning").count(), 1, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_resolves_later_is_served_once_it_does() {
    assert_namespaces_work();
    let names = Resolution::new("127.53.0.1");
    let origin = origins_on(&[[127, 0, 0, 2]]).await.remove(0);
    let port = origin.addr().port();
    let proxy = Proxy::start_launched(&config(&format!("\"origin:{port}\"")), &names.launcher());
    assert!(
        proxy.log_contains("origin") && proxy.log_contains("does not resolve"),
        "the start says the name does not resolve:\n{}",
        proxy.log()
    );

    // No server: both routes answer 502 at once, nothing reaches an origin.
    for host in ["pass.test", "cache.test"] {
        let started = Instant::now();
        let (status, _) = get(&proxy, host, "/download/100000").await;
        assert_eq!(status, 502, "{host}");
        // A bound against a hang (no server to wait on), not a speed figure.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{host}: a group with no server answers without waiting on one"
        );
    }
    assert_eq!(origin.requests(), 0);

    // Once it resolves, within a few resolve intervals, both routes serve the exact bytes.
    names.set("origin", &[ip(2)]);
    let want = content("/download/100000", 0, 0..100_000);
    for host in ["pass.test", "cache.test"] {
        let (status, body) = until(
            &proxy,
            host,
            "/download/100000",
            Duration::from_secs(20),
            |s, _| s == 200,
        )
        .await;
        assert_eq!(status, 200, "{host}: served once the name resolves");
        assert!(body == want, "{host}: the origin's exact bytes");
    }
    assert!(origin.requests() >= 1);
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("edgeslice_upstream_servers{upstream=\"o\"} 1"),
        "{metrics}"
    );
    let failures = metrics
        .lines()
        .find(|l| l.starts_with("edgeslice_upstream_resolve_failures_total{upstream=\"o\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        failures >= 1.0,
        "the failed lookups are counted:\n{metrics}"
    );
    // Said once, not per round (it failed on every round until it resolved) nor per request.
    let log = proxy.log();
    assert_eq!(log.matches("does not resolve (").count(), 1, "{log}");
    assert!(
        log.contains(&format!("origin:{port} resolves to [127.0.0.2:{port}]")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_follows_a_name_that_moves_and_fans_out_over_its_addresses() {
    assert_namespaces_work();
    let names = Resolution::new("127.53.0.2");
    let mut origins = origins_on(&[[127, 0, 0, 3], [127, 0, 0, 4]]).await;
    let (b, a) = (origins.remove(1), origins.remove(0));
    let port = a.addr().port();
    let name = "origin.edgeslice.test";
    names.set(name, &[ip(3)]);
    let proxy = Proxy::start_launched(&config(&format!("\"{name}:{port}\"")), &names.launcher());
    let want = content("/download/5000", 0, 0..5000);
    let (status, body) = get(&proxy, "pass.test", "/download/5000").await;
    assert_eq!(status, 200);
    assert!(body == want);
    assert!(a.requests() >= 1 && b.requests() == 0);

    // The name moves from A to B: traffic follows, and A is asked no more.
    names.set(name, &[ip(4)]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.requests() == 0 && Instant::now() < deadline {
        let (status, body) = get(&proxy, "pass.test", "/download/5000").await;
        assert_eq!(status, 200);
        assert!(body == want);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(b.requests() >= 1, "traffic moved to B");
    let a_before = a.requests();
    for _ in 0..10 {
        let (status, body) = get(&proxy, "pass.test", "/download/5000").await;
        assert_eq!(status, 200);
        assert!(body == want);
    }
    assert_eq!(a.requests(), a_before, "A is no longer a server");

    // The name has two addresses: both are servers (round robin reaches both).
    names.set(name, &[ip(3), ip(4)]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut served_by_a = 0;
    while Instant::now() < deadline {
        let before = a.requests();
        let (status, body) = get(&proxy, "pass.test", "/download/5000").await;
        assert_eq!(status, 200);
        assert!(body == want);
        if a.requests() > before {
            served_by_a += 1;
            if served_by_a >= 3 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served_by_a >= 3, "A is a server again beside B");
    let (a_now, b_now) = (a.requests(), b.requests());
    for _ in 0..10 {
        let (status, _) = get(&proxy, "pass.test", "/download/5000").await;
        assert_eq!(status, 200);
    }
    assert!(
        a.requests() > a_now && b.requests() > b_now,
        "both addresses get requests: A {} B {}",
        a.requests() - a_now,
        b.requests() - b_now
    );
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("edgeslice_upstream_servers{upstream=\"o\"} 2"),
        "{metrics}"
    );
}

/// `cluster.peers` names are resolved the same way, every `cluster.resolve_interval`: a peer
/// whose name does not resolve is a down peer (the node fills its shards itself), becomes a
/// peer asked for its shards once it resolves, and is followed when its name moves. The peers
/// here are in-process origins standing in for edgeslice nodes (same bytes and validators).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_names_resolve_later_and_move() {
    assert_namespaces_work();
    let names = Resolution::new("127.53.0.9");
    let mut peers = origins_on(&[[127, 0, 0, 2], [127, 0, 0, 3]]).await;
    let port = peers[0].addr().port();
    let origin = Origin::start().await;
    let proxy = Proxy::start_launched(
        &format!(
            "cache:\n  chunk_size: 64KiB\nupstreams:\n  o:\n    servers: [\"{}\"]\nroutes:\n  - upstream: o\ncluster:\n  self: me.test:1\n  peers: [me.test:1, peer.test:{port}]\n  resolve_interval: 1s\n  shard_size: 128KiB\n  peer_timeout: 1s\n",
            origin.addr()
        ),
        &names.launcher(),
    );
    let metric = |text: &str, state: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("edgeslice_cluster_peers{{state=\"{state}\"}}")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    // Not resolving: a down peer, and every shard from the origin.
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "down"), Some(1.0), "{m}");
    let path = "/obj/1048576/a";
    let (status, body) = get(&proxy, "any.test", path).await;
    assert_eq!(status, 200);
    assert!(body == content(path, 0, 0..1 << 20));
    assert!(peers.iter().all(|p| p.log().is_empty()));
    // Resolving: asked for its shards.
    names.set("peer.test", &[ip(2)]);
    let asked = |p: &Origin, path: &str| p.log().iter().any(|r| r.path == path);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut i = 0;
    while !asked(&peers[0], &format!("/obj/1048576/b{i}")) && Instant::now() < deadline {
        i += 1;
        let (status, _) = get(&proxy, "any.test", &format!("/obj/1048576/b{i}")).await;
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        asked(&peers[0], &format!("/obj/1048576/b{i}")),
        "the peer was never asked"
    );
    assert_eq!(metric(&proxy.metrics().await, "up"), Some(2.0));
    // Moved: the name now resolves to the other address, and that one is asked.
    names.set("peer.test", &[ip(3)]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut j = 0;
    while !asked(&peers[1], &format!("/obj/1048576/c{j}")) && Instant::now() < deadline {
        j += 1;
        let (status, body) = get(&proxy, "any.test", &format!("/obj/1048576/c{j}")).await;
        assert_eq!(status, 200);
        assert!(body == content(&format!("/obj/1048576/c{j}"), 0, 0..1 << 20));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        asked(&peers[1], &format!("/obj/1048576/c{j}")),
        "the moved peer was never asked"
    );
    drop(peers.remove(0));
}
