//! HTTPS origins (issue 22, "HTTPS origins"): a real nginx (nginx-light) serving TLS with
//! certificates from a CA made at test time (tests/common/tls.rs), behind the real binary.
//!
//! What the origin saw is read from nginx's own logs: every request with its connection
//! serial, `$host`, `$ssl_server_name` (the SNI), protocol and user agent.
//!
//! Needs `nginx` (nginx-light) and `openssl`-capable nginx: a missing binary fails the test.

mod common;

use common::nginx::{content, Nginx, TlsAccess, TlsOrigin};
use common::proxy::Proxy;
use common::tls::{CertFiles, TestCa};
use std::collections::BTreeSet;
use std::time::Duration;

const OLD: Duration = Duration::from_secs(30 * 86_400);

fn tls_origin(cert: &CertFiles, http2: bool) -> Nginx {
    Nginx::start_tls(&TlsOrigin {
        cert: cert.cert.clone(),
        key: cert.key.clone(),
        http2,
        keepalive_requests: None,
    })
}

/// `size` bytes at `path` on `nginx`, old enough to be cached by heuristic freshness.
fn put(nginx: &Nginx, path: &str, size: usize) -> Vec<u8> {
    let data = nginx.put_file(path, size);
    nginx.age_file(path, OLD);
    data
}

async fn get(proxy: &Proxy, path: &str, range: Option<&str>) -> (u16, Vec<u8>) {
    let mut req = common::client().get(proxy.url(path));
    if let Some(r) = range {
        req = req.header("range", r);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.bytes().await.expect("body").to_vec())
}

/// The value of the metric line starting with `name{` that has every label of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|lab| l.contains(lab)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Whole objects and ranges, cold then warm, byte-exact, from `path` of `nginx` (a 300 KB
/// file in 64 KiB chunks); the warm round asks the origin nothing.
async fn whole_and_ranges(proxy: &Proxy, nginx: &Nginx, path: &str) {
    let data = put(nginx, path, 300_000);
    let before = origin_requests(nginx);
    let (s, body) = get(proxy, path, Some("bytes=70000-140000")).await;
    assert_eq!(
        s,
        206,
        "{}\n{:?}\n{}",
        proxy.log(),
        nginx.tls_accesses(),
        nginx.error_log()
    );
    assert!(body == data[70_000..=140_000], "cold range bytes differ");
    let (s, body) = get(proxy, path, None).await;
    assert_eq!(s, 200);
    assert!(body == data, "cold whole object differs");
    nginx.settle(Duration::from_secs(2));
    let cold = origin_requests(nginx) - before;
    assert!(cold >= 1, "the cold requests reached the origin");
    for _ in 0..2 {
        let (s, body) = get(proxy, path, None).await;
        assert_eq!(s, 200);
        assert!(body == data, "warm whole object differs");
        let (s, body) = get(proxy, path, Some("bytes=299000-")).await;
        assert_eq!(s, 206);
        assert!(body == data[299_000..], "warm suffix range differs");
        let (s, body) = get(proxy, path, Some("bytes=1-1")).await;
        assert_eq!((s, body.as_slice()), (206, &data[1..2]));
    }
    nginx.settle(Duration::from_secs(1));
    assert_eq!(
        origin_requests(nginx) - before,
        cold,
        "warm requests went to the origin"
    );
}

/// Requests nginx logged over TLS, health checks left out.
fn origin_requests(nginx: &Nginx) -> usize {
    nginx
        .tls_accesses()
        .iter()
        .filter(|a| a.user_agent != "edgeslice-health-check")
        .count()
}

const CACHE: &str = "cache:\n  chunk_size: 64KiB\n  memory:\n    capacity: 64MiB\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_ca_https_origin_serves_byte_exact_and_reuses_connections() {
    let mut ca = TestCa::new("edgeslice test origin CA");
    let cert = ca.issue(&["origin.test"], 30);
    let nginx = tls_origin(&cert, false);
    // Two groups on the one server: by IP with no name (no SNI; verified against the
    // certificate's IP entry), and with `tls.sni`; a pass-through route on the first.
    let yaml = format!(
        "{CACHE}upstreams:\n  by_ip:\n    servers: [\"{addr}\"]\n    tls:\n      ca: {ca}\n  \
         named:\n    servers: [\"{addr}\"]\n    tls:\n      sni: origin.test\n      ca: {ca}\nroutes:\n  \
         - path_prefix: /named/\n    upstream: named\n    cache: true\n  \
         - path_prefix: /pass/\n    upstream: by_ip\n    cache: false\n  \
         - path_prefix: /\n    upstream: by_ip\n    cache: true\n",
        addr = nginx.addr,
        ca = ca.ca_path().display()
    );
    let proxy = Proxy::start(&yaml);
    whole_and_ranges(&proxy, &nginx, "/ip/a.bin").await;
    whole_and_ranges(&proxy, &nginx, "/named/a.bin").await;
    nginx.settle(Duration::from_secs(1));
    let log = nginx.tls_accesses();
    assert!(!log.is_empty(), "nginx logged no fill over TLS");
    // The named group sent its SNI; the IP group sent none.
    assert!(
        log.iter().any(|a| a.sni == "origin.test"),
        "no fill carried SNI origin.test: {log:?}"
    );
    assert!(
        log.iter().any(|a| a.sni.is_empty() || a.sni == "-"),
        "no fill went without SNI (by IP): {log:?}"
    );
    // The client's Host went to the origin (no `host` set).
    let client_host = format!("127.0.0.1:{}", proxy.addr.port());
    assert!(
        log.iter()
            .all(|a| a.host == "127.0.0.1" || a.host == client_host),
        "{log:?}"
    );

    // Pass-through over TLS: byte-exact, and a POST reaches the origin (nginx answers 405 to a
    // POST on a static file: the answer is passed on).
    let data = put(&nginx, "/pass/p.bin", 100_000);
    let n_fills = log.len();
    for _ in 0..2 {
        let (s, body) = get(&proxy, "/pass/p.bin", None).await;
        assert_eq!(s, 200);
        assert!(body == data, "pass-through bytes differ");
    }
    let resp = common::client()
        .post(proxy.url("/pass/p.bin"))
        .body("x=1")
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status().as_u16(), 405);
    nginx.settle(Duration::from_secs(1));
    let log = nginx.tls_accesses();
    let pass_gets = log[n_fills..]
        .iter()
        .filter(|a| a.method == "GET" && a.status == 200)
        .count();
    assert!(pass_gets >= 2, "{log:?}");
    assert!(log[n_fills..]
        .iter()
        .any(|a| a.method == "POST" && a.status == 405));

    // Connections are reused: many fills of distinct objects, few TLS connections.
    let before: BTreeSet<u64> = log.iter().map(|a| a.connection).collect();
    let n_before = log.len();
    for i in 0..40 {
        let path = format!("/reuse/{i}.bin");
        let data = put(&nginx, &path, 1000 + i);
        let (s, body) = get(&proxy, &path, None).await;
        assert_eq!(s, 200);
        assert!(body == data, "{path} differs");
    }
    nginx.settle(Duration::from_secs(2));
    let log = nginx.tls_accesses();
    let new: Vec<&TlsAccess> = log[n_before..].iter().collect();
    let conns: BTreeSet<u64> = new
        .iter()
        .map(|a| a.connection)
        .filter(|c| !before.contains(c))
        .collect();
    assert!(new.len() >= 40, "each object was fetched: {}", new.len());
    let all: BTreeSet<u64> = log.iter().map(|a| a.connection).collect();
    eprintln!(
        "h1: {} origin requests over {} TLS connections ({} new for the last {})",
        log.len(),
        all.len(),
        conns.len(),
        new.len()
    );
    assert!(
        all.len() * 5 <= log.len(),
        "{} origin requests over {} TLS connections",
        log.len(),
        all.len()
    );
    assert!(
        conns.len() <= 4,
        "{} origin requests opened {} new TLS connections (reuse expected)",
        new.len(),
        conns.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_override_sets_sni_and_host_for_fills_pass_through_and_health_checks() {
    let mut ca = TestCa::new("edgeslice test origin CA");
    let cert = ca.issue(&["origin.test", "bucket.origin.test"], 30);
    let nginx = tls_origin(&cert, false);
    nginx.put_bytes("/health", b"ok\n");
    let yaml = format!(
        "{CACHE}upstreams:\n  store:\n    servers: [\"{addr}\"]\n    host: bucket.origin.test\n    \
         tls:\n      ca: {ca}\n    health_check:\n      path: /health\n      interval: 200ms\n\
         routes:\n  - path_prefix: /pass/\n    upstream: store\n    cache: false\n  \
         - path_prefix: /\n    upstream: store\n    cache: true\n",
        addr = nginx.addr,
        ca = ca.ca_path().display()
    );
    let proxy = Proxy::start(&yaml);
    whole_and_ranges(&proxy, &nginx, "/h/a.bin").await;
    let data = put(&nginx, "/pass/b.bin", 5000);
    let (s, body) = get(&proxy, "/pass/b.bin", None).await;
    assert_eq!(s, 200);
    assert!(body == data);
    // Health checks go over TLS too, within a few intervals.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut log = nginx.tls_accesses();
    while !log
        .iter()
        .filter(|a| a.user_agent == "edgeslice-health-check")
        .any(|a| a.status == 200)
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
        log = nginx.tls_accesses();
    }
    nginx.settle(Duration::from_secs(1));
    let log = nginx.tls_accesses();
    let checks: Vec<_> = log
        .iter()
        .filter(|a| a.user_agent == "edgeslice-health-check")
        .collect();
    assert!(
        checks.len() >= 2,
        "health checks reached nginx over TLS: {log:?}"
    );
    // Every request of every kind: Host and SNI are the group's `host`.
    for a in &log {
        assert_eq!(a.host, "bucket.origin.test", "{a:?}");
        assert_eq!(a.sni, "bucket.origin.test", "{a:?}");
        assert_eq!(a.protocol, "HTTP/1.1", "{a:?}");
    }
    assert!(log
        .iter()
        .any(|a| a.method == "GET" && a.user_agent != "edgeslice-health-check"));
    // The cache key stays the client's host: the object is a hit for the same client host.
    let before = nginx.requests();
    let (s, body) = get(&proxy, "/h/a.bin", None).await;
    assert_eq!(s, 200);
    assert!(body == content("/h/a.bin", 300_000));
    let fills = log
        .iter()
        .filter(|a| a.user_agent != "edgeslice-health-check")
        .count();
    assert!(fills >= 2);
    let after = nginx
        .tls_accesses()
        .iter()
        .filter(|a| a.user_agent != "edgeslice-health-check")
        .count();
    assert_eq!(after, fills, "a hit reached the origin ({before} before)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_failures_are_502_uncached_charged_and_logged_once() {
    let mut ca = TestCa::new("edgeslice test origin CA");
    let mut other_ca = TestCa::new("some other CA");
    let good = ca.issue(&["origin.test"], 30);
    let wrong_name = ca.issue(&["elsewhere.test"], 30);
    // Valid from now to now: expired a second later.
    let expired = ca.issue(&["origin.test"], 0);
    let unknown = other_ca.issue(&["origin.test"], 30);
    std::thread::sleep(Duration::from_millis(1100));
    let origins = [
        ("unknown_ca", tls_origin(&unknown, false)),
        ("wrong_name", tls_origin(&wrong_name, false)),
        ("expired", tls_origin(&expired, false)),
        ("good", tls_origin(&good, false)),
    ];
    let mut yaml = format!("{CACHE}upstreams:\n");
    for (name, n) in &origins {
        yaml += &format!(
            "  {name}:\n    servers: [\"{}\"]\n    retry:\n      attempts: 1\n    tls:\n      sni: origin.test\n      ca: {}\n",
            n.addr,
            ca.ca_path().display()
        );
    }
    // `verify: false` reaches the server with the unknown CA.
    yaml += &format!(
        "  unverified:\n    servers: [\"{}\"]\n    tls:\n      sni: origin.test\n      verify: false\n",
        origins[0].1.addr
    );
    yaml += "routes:\n";
    for (name, _) in &origins {
        yaml += &format!(
            "  - path_prefix: /{name}/pass/\n    upstream: {name}\n    cache: false\n  - path_prefix: /{name}/\n    upstream: {name}\n    cache: true\n"
        );
    }
    yaml += "  - path_prefix: /unverified/\n    upstream: unverified\n    cache: true\n";
    let proxy = Proxy::start(&yaml);
    assert!(
        proxy.log_contains("upstreams.unverified.tls.verify (line"),
        "no warning at start:\n{}",
        proxy.log()
    );
    for (name, nginx) in &origins[..3] {
        let path = format!("/{name}/x.bin");
        put(nginx, &path, 10_000);
        put(nginx, &format!("/{name}/pass/y.bin"), 1000);
        for _ in 0..8 {
            let (s, _) = get(&proxy, &path, None).await;
            assert_eq!(s, 502, "{name}");
            let (s, _) = get(&proxy, &path, Some("bytes=0-99")).await;
            assert_eq!(s, 502, "{name}");
            let (s, _) = get(&proxy, &format!("/{name}/pass/y.bin"), None).await;
            assert_eq!(s, 502, "{name} pass-through");
        }
        nginx.settle(Duration::from_secs(1));
        assert_eq!(nginx.requests(), 0, "{name}: a request got through");
    }
    // The good group works, and the unverified one reaches the unknown-CA server.
    let data = put(&origins[3].1, "/good/x.bin", 10_000);
    let (s, body) = get(&proxy, "/good/x.bin", None).await;
    assert_eq!(s, 200);
    assert!(body == data);
    let data = put(&origins[0].1, "/unverified/x.bin", 10_000);
    for _ in 0..2 {
        let (s, body) = get(&proxy, "/unverified/x.bin", None).await;
        assert_eq!(s, 200);
        assert!(body == data, "unverified bytes differ");
    }
    // Nothing stored for the failed ones: once the trust is right (same server, verify off),
    // the first request still goes to the origin. Checked on the unknown-CA server through
    // the failing group again: still 502, still nothing at nginx.
    let (s, _) = get(&proxy, "/unknown_ca/x.bin", None).await;
    assert_eq!(s, 502, "a failure was stored or served");
    // Logged once per server and cause, not per request (24 failing requests each).
    let log = proxy.log();
    for (_, nginx) in &origins[..3] {
        let needle = format!("TLS to {} failed", nginx.addr);
        assert_eq!(
            log.matches(&needle).count(),
            1,
            "{needle} logged other than once:\n{log}"
        );
    }
    // Nor any other line about them per request (the once-lines are all there is).
    let tls_lines = log
        .lines()
        .filter(|l| l.contains("TLS connect() failed"))
        .count();
    assert_eq!(tls_lines, 3, "per-request TLS lines:\n{log}");
    // Charged to the server: counted as connect failures and its breaker opened.
    let m = proxy.metrics().await;
    for (name, nginx) in &origins[..3] {
        let server = format!("server=\"{}\"", nginx.addr);
        let up = format!("upstream=\"{name}\"");
        let failed = metric(
            &m,
            "edgeslice_origin_requests_total",
            &[&server, &up, "outcome=\"connect\""],
        )
        .unwrap_or(0.0);
        assert!(
            failed >= 5.0,
            "{name}: {failed} connect failures counted\n{m}"
        );
        let state = metric(&m, "edgeslice_breaker_state", &[&server, &up]);
        assert!(
            state.is_some_and(|s| s >= 1.0),
            "{name}: breaker not open ({state:?})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_origin_fills_byte_exact_over_one_connection() {
    let mut ca = TestCa::new("edgeslice test origin CA");
    let cert = ca.issue(&["origin.test"], 30);
    let nginx = tls_origin(&cert, true);
    let yaml = format!(
        "{CACHE}upstreams:\n  h2:\n    servers: [\"{addr}\"]\n    http2: true\n    host: h2.origin.test\n    tls:\n      \
         sni: origin.test\n      ca: {ca}\nroutes:\n  - path_prefix: /pass/\n    upstream: h2\n    \
         cache: false\n  - path_prefix: /\n    upstream: h2\n    cache: true\n",
        addr = nginx.addr,
        ca = ca.ca_path().display()
    );
    let proxy = Proxy::start(&yaml);
    whole_and_ranges(&proxy, &nginx, "/a.bin").await;
    let data = put(&nginx, "/pass/p.bin", 200_000);
    let (s, body) = get(&proxy, "/pass/p.bin", None).await;
    assert_eq!(s, 200);
    assert!(body == data, "pass-through over h2 differs");
    for i in 0..20 {
        let path = format!("/many/{i}.bin");
        let data = put(&nginx, &path, 70_000 + i);
        let (s, body) = get(&proxy, &path, None).await;
        assert_eq!(s, 200);
        assert!(body == data, "{path} differs");
    }
    nginx.settle(Duration::from_secs(2));
    let log = nginx.tls_accesses();
    assert!(log.len() >= 22, "{log:?}");
    assert!(
        log.iter().all(|a| a.protocol == "HTTP/2.0"),
        "not all over HTTP/2: {log:?}"
    );
    // `host` is the :authority of fills and pass-through alike.
    assert!(log.iter().all(|a| a.host == "h2.origin.test"), "{log:?}");
    let conns: BTreeSet<u64> = log.iter().map(|a| a.connection).collect();
    eprintln!(
        "h2: {} requests over {} connections",
        log.len(),
        conns.len()
    );
    assert!(
        conns.len() <= 3,
        "{} requests over {} connections",
        log.len(),
        conns.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_are_resumed_on_new_connections() {
    let mut ca = TestCa::new("edgeslice test origin CA");
    let cert = ca.issue(&["origin.test"], 30);
    // One request per connection: every fill needs a new TLS connection.
    let nginx = Nginx::start_tls(&TlsOrigin {
        cert: cert.cert.clone(),
        key: cert.key.clone(),
        http2: false,
        keepalive_requests: Some(1),
    });
    let yaml = format!(
        "{CACHE}upstreams:\n  o:\n    servers: [\"{addr}\"]\n    tls:\n      sni: origin.test\n      ca: {ca}\nroutes:\n  - upstream: o\n    cache: true\n",
        addr = nginx.addr,
        ca = ca.ca_path().display()
    );
    let proxy = Proxy::start(&yaml);
    for i in 0..12 {
        let path = format!("/s/{i}.bin");
        let data = put(&nginx, &path, 5000 + i);
        let (s, body) = get(&proxy, &path, None).await;
        assert_eq!(s, 200);
        assert!(body == data, "{path} differs");
    }
    nginx.settle(Duration::from_secs(2));
    let log = nginx.tls_accesses();
    let conns: BTreeSet<u64> = log.iter().map(|a| a.connection).collect();
    let resumed = log.iter().filter(|a| a.session_reused).count();
    assert!(log.len() >= 12 && conns.len() >= 12, "{log:?}");
    eprintln!(
        "{resumed} of {} new TLS connections resumed a session",
        log.len()
    );
    // The first handshake is full; the later ones resume its session.
    assert!(
        resumed >= log.len() - 2,
        "{resumed} of {} new TLS connections resumed a session: {log:?}",
        log.len()
    );
}

/// A transfer cut mid-body over TLS is resumed (over TLS, If-Range, from the next byte) on the
/// other server; the object is whole and stored whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_over_tls_is_resumed_over_tls() {
    use common::origin::{content as obj_content, Fault, Origin};
    use common::tls::TlsFront;
    let mut ca = TestCa::new("edgeslice test origin CA");
    let cert = ca.issue(&["origin.test"], 30);
    let flaky = Origin::start().await;
    let steady = Origin::start().await;
    let flaky_tls = TlsFront::start(flaky.addr(), &cert).await;
    let steady_tls = TlsFront::start(steady.addr(), &cert).await;
    let yaml = format!(
        "cache:\n  chunk_size: 1MiB\n  memory:\n    capacity: 64MiB\nupstreams:\n  o:\n    servers: [\"{a}\", \"{b}\"]\n    \
         tls:\n      sni: origin.test\n      ca: {ca}\nroutes:\n  - upstream: o\n    cache: true\n",
        a = flaky_tls.addr,
        b = steady_tls.addr,
        ca = ca.ca_path().display()
    );
    let proxy = Proxy::start(&yaml);
    let size: u64 = 3 * 1024 * 1024 + 17;
    let mut resumed = 0;
    for i in 0..4 {
        let path = format!("/obj/{size}/tls-cut-{i}.bin");
        // Whichever server the fill goes to first cuts it (once each: a resume may meet the
        // other's cut too, and then comes back).
        flaky.set_fault_times(Fault::ResetMidBody { after: 100_000 }, 1);
        steady.set_fault_times(Fault::ResetMidBody { after: 100_000 }, 1);
        let (s, body) = get(&proxy, &path, None).await;
        assert_eq!(s, 200, "object {i}");
        assert_eq!(body.len() as u64, size, "object {i}: cut short");
        assert!(
            body == obj_content(&path, 0, 0..size),
            "object {i}: wrong bytes"
        );
        let resumes: Vec<_> = flaky
            .log()
            .into_iter()
            .chain(steady.log())
            .filter(|r| r.path == path && r.header("if-range").is_some())
            .collect();
        resumed += resumes.len();
        let before = flaky.requests() + steady.requests();
        let (s, body) = get(&proxy, &path, Some("bytes=99990-100009")).await;
        assert_eq!(s, 206);
        assert!(
            body == obj_content(&path, 0, 99_990..100_010),
            "object {i}: hit bytes"
        );
        assert_eq!(
            flaky.requests() + steady.requests(),
            before,
            "object {i}: not a hit"
        );
    }
    assert!(resumed >= 4, "{resumed} resumes (If-Range) over TLS");
    assert!(flaky_tls.accepted() + steady_tls.accepted() >= 2);
    let s = proxy.stats().await;
    assert!(s["origin_resumes"] >= 4, "{s:?}");
}

/// `tls.ca` is read again on reload: the same path with other certificates rebuilds the
/// group, and verification follows the new file (502 before, the object after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reads_the_ca_file_again() {
    let mut ca = TestCa::new("edgeslice test origin CA");
    let other = TestCa::new("some other CA");
    let cert = ca.issue(&["origin.test"], 30);
    let nginx = tls_origin(&cert, false);
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = dir.path().join("origin-ca.pem");
    std::fs::copy(other.ca_path(), &ca_file).expect("copy CA");
    let yaml = format!(
        "{CACHE}upstreams:\n  o:\n    servers: [\"{addr}\"]\n    retry:\n      attempts: 1\n    tls:\n      sni: origin.test\n      ca: {ca}\nroutes:\n  - upstream: o\n    cache: true\n",
        addr = nginx.addr,
        ca = ca_file.display()
    );
    let proxy = Proxy::start(&yaml);
    let data = put(&nginx, "/r.bin", 20_000);
    let (s, _) = get(&proxy, "/r.bin", None).await;
    assert_eq!(s, 502, "trusted a CA it was not given");
    std::fs::copy(ca.ca_path(), &ca_file).expect("copy CA");
    let pid = proxy.pid().to_string();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    assert!(
        proxy.log_contains("upstream pools 0 kept and 1 new"),
        "the changed CA file did not rebuild the pool:\n{}",
        proxy.log()
    );
    let (s, body) = get(&proxy, "/r.bin", None).await;
    assert_eq!(s, 200, "{}", proxy.log());
    assert!(body == data);
}

#[test]
fn check_mode_warns_about_verify_false() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("edgeslice.yaml");
    std::fs::write(
        &conf,
        "listen:\n  - 127.0.0.1:8080\nupstreams:\n  store:\n    servers: [\"127.0.0.1:8443\"]\n    tls:\n      verify: false\nroutes:\n  - upstream: store\n",
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgeslice"))
        .arg("-t")
        .arg("-c")
        .arg(&conf)
        .output()
        .expect("run -t");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: upstreams.store.tls.verify (line 7)"),
        "{stderr}"
    );
    // A CA file that is missing is an error naming the key and line.
    std::fs::write(
        &conf,
        "listen:\n  - 127.0.0.1:8080\nupstreams:\n  store:\n    servers: [\"127.0.0.1:8443\"]\n    tls:\n      ca: /nonexistent/ca.pem\nroutes:\n  - upstream: store\n",
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgeslice"))
        .arg("-t")
        .arg("-c")
        .arg(&conf)
        .output()
        .expect("run -t");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("upstreams.store.tls.ca (line 7"),
        "{stderr}"
    );
}
