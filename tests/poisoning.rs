//! Nothing a client sends may decide what another client gets (issue 20, part A): the attacker
//! sends forged forwarding and override fields, other spellings of the query, the host and the
//! path, and credentials; a byte-logging origin shows what every fill forwarded, and the next,
//! plain client must get the answer to its own request.
//!
//! Attack requests go over raw sockets (an HTTP client library would normalise them first).

mod common;

use common::origin::{content, Origin, RequestRecord};
use common::proxy::Proxy;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One raw request (`Connection: close` is added); returns the status, the header fields
/// (lower-case names) and the body.
fn raw(addr: SocketAddr, head: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let req = format!("{}Connection: close\r\n\r\n", head.replace('\n', "\r\n"));
    s.write_all(req.as_bytes()).expect("send");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(&buf)));
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(&buf[..end + 4]).expect("response head");
    let status = resp.code.unwrap_or(0);
    let fields: Vec<(String, String)> = common::owned_headers(resp.headers)
        .into_iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v))
        .collect();
    let mut body = buf[end + 4..].to_vec();
    if let Some(n) = find(&fields, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.truncate(n);
    }
    (status, fields, body)
}

fn find<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn get(
    addr: SocketAddr,
    target: &str,
    host: &str,
    extra: &str,
) -> (u16, Vec<(String, String)>, String) {
    let (status, fields, body) = raw(
        addr,
        &format!("GET {target} HTTP/1.1\nHost: {host}\n{extra}"),
    );
    (status, fields, String::from_utf8_lossy(&body).into_owned())
}

fn records(origin: &Origin, path_start: &str) -> Vec<RequestRecord> {
    origin
        .log()
        .into_iter()
        .filter(|r| r.path.starts_with(path_start))
        .collect()
}

fn cache_config(origin: &Origin, route_extra: &str) -> String {
    format!(
        "cache:\n  chunk_size: 64KiB\n  memory:\n    capacity: 32MiB\nupstreams:\n  origin:\n    servers: [\"{}\"]\nroutes:\n  - path_prefix: /pass/\n    upstream: origin\n    cache: false\n  - path_prefix: /\n    upstream: origin\n    cache: true\n{route_extra}",
        origin.addr()
    )
}

/// Forwarding and override fields an attacker may forge.
const FORGED: &str = "X-Forwarded-For: 6.6.6.6\nX-Forwarded-Proto: javascript\nX-Forwarded-Host: evil.example\nX-Forwarded-Port: 6666\nX-Forwarded-Scheme: javascript\nX-Forwarded-Prefix: /evil\nForwarded: for=6.6.6.6;host=evil.example;proto=javascript\nX-Real-IP: 6.6.6.6\nTrue-Client-IP: 6.6.6.6\nX-Original-URL: /evil-admin\nX-Rewrite-URL: /evil-admin\nX-HTTP-Method-Override: DELETE\nX-HTTP-Method: DELETE\nX-Method-Override: DELETE\nX-Host: evil.example\n";

fn evil(text: &str) -> bool {
    ["6.6.6.6", "javascript", "evil", "DELETE", "6666"]
        .iter()
        .any(|e| text.to_ascii_lowercase().contains(&e.to_ascii_lowercase()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_send_what_the_proxy_asserts_not_what_the_client_claims() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&cache_config(&origin, ""));
    let host = "media.example.com";
    for target in ["/reflect/page", "/reflect/redirect/a"] {
        // The attacker goes first and its answer is stored.
        let (status, _, _) = get(proxy.addr, target, host, FORGED);
        assert!(status == 200 || status == 301, "{target}: {status}");
        // The victim asks plainly and gets a hit: the stored answer must be the one the
        // proxy's own assertions produced.
        let (status, fields, body) = get(proxy.addr, target, host, "");
        let cache = find(&fields, "cache-status").unwrap_or("");
        assert!(
            cache.contains("hit"),
            "{target}: second request not a hit: {cache}"
        );
        assert!(
            !evil(&body),
            "{target}: the victim got the attacker's answer:\n{body}"
        );
        if status == 301 {
            assert_eq!(
                find(&fields, "location"),
                Some("http://media.example.com/reflect/redirect/a"),
                "{target}"
            );
        }
        // What the fill sent: the proxy's own X-Forwarded-For and -Proto, none of the forged
        // fields.
        let fills = records(&origin, target);
        assert_eq!(fills.len(), 1, "{target}: one fill");
        let fill = &fills[0];
        assert_eq!(
            fill.header("x-forwarded-for"),
            Some("127.0.0.1"),
            "{target}"
        );
        assert_eq!(fill.header("x-forwarded-proto"), Some("http"), "{target}");
        for (name, value) in &fill.headers {
            assert!(
                !evil(value),
                "{target}: the fill forwarded the client's {name}: {value}"
            );
        }
    }

    // Pass-through forwards by the same rule: the proxy's X-Forwarded-For and -Proto, no
    // forwarding claims; the client's own override fields still reach the origin (its answer
    // is the client's alone).
    let (status, _, body) = get(proxy.addr, "/pass/echo", host, FORGED);
    assert_eq!(status, 404, "{body}");
    let seen = records(&origin, "/pass/echo")
        .pop()
        .expect("pass-through reached the origin");
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    for name in [
        "x-forwarded-host",
        "x-forwarded-port",
        "forwarded",
        "x-real-ip",
        "true-client-ip",
    ] {
        assert_eq!(seen.header(name), None, "pass-through forwarded {name}");
    }
    assert_eq!(seen.header("x-http-method-override"), Some("DELETE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_in_front_vouches_for_the_client_not_for_what_came_before() {
    let origin = Origin::start().await;
    let proxy = Proxy::start_with_server(
        &cache_config(&origin, ""),
        "  trusted_proxies: [127.0.0.0/8]\n",
    );
    let xff = "X-Forwarded-For: 6.6.6.6, 198.51.100.4\nX-Forwarded-Proto: https\nX-Forwarded-Host: evil.example\n";
    let (status, _, _) = get(proxy.addr, "/reflect/trusted", "h.example", xff);
    assert_eq!(status, 200);
    let (status, _, _) = get(proxy.addr, "/pass/trusted", "h.example", xff);
    assert_eq!(status, 404);
    for path in ["/reflect/trusted", "/pass/trusted"] {
        let seen = records(&origin, path).pop().expect("reached the origin");
        assert_eq!(
            seen.header("x-forwarded-for"),
            Some("198.51.100.4, 127.0.0.1"),
            "{path}"
        );
        assert_eq!(seen.header("x-forwarded-proto"), Some("https"), "{path}");
    }
    // Even from a trusted peer, a fill carries no forwarding field it cannot key.
    assert_eq!(
        records(&origin, "/reflect/trusted")[0].header("x-forwarded-host"),
        None
    );
    assert_eq!(
        records(&origin, "/pass/trusted")[0].header("x-forwarded-host"),
        Some("evil.example")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_forwarded_query_parameter_is_in_the_key() {
    let origin = Origin::start().await;
    let keep = "    cache_key: {query: [v]}\n";
    let proxy = Proxy::start(&cache_config(&origin, keep));
    let host = "q.example";
    // Each spelling an origin might read as `v` (or not), then the plain URL.
    for attack in [
        "/reflect/q?%76=EVIL",
        "/reflect/q?V=EVIL",
        "/reflect/q?v%20=EVIL",
        "/reflect/q?v+=EVIL",
        "/reflect/q?v=EVIL&v=1",
        "/reflect/q?v=1&v=EVIL",
        "/reflect/q?v=1&x=EVIL",
        "/reflect/q?v=1;v=EVIL",
        "/reflect/q?v=%45VIL",
    ] {
        let (status, _, _) = get(proxy.addr, attack, host, "");
        assert_eq!(status, 200, "{attack}");
    }
    for plain in ["/reflect/q?v=1", "/reflect/q"] {
        let (status, _, body) = get(proxy.addr, plain, host, "");
        assert_eq!(status, 200);
        assert!(!evil(&body), "{plain} got the attacker's answer:\n{body}");
        let first = body.lines().next().unwrap_or("");
        assert_eq!(first, format!("target: {plain}"), "{plain}");
    }
    // Whatever reached the origin was keyed: a request whose target carried EVIL was one whose
    // key did, and no two fills asked for one target (one object per keyed target).
    let fills = records(&origin, "/reflect/q");
    let mut targets: Vec<&str> = fills.iter().map(|r| r.path.as_str()).collect();
    for t in &targets {
        let q = t.split_once('?').map_or("", |(_, q)| q);
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            assert!(
                pair.starts_with("v="),
                "forwarded an unkeyed parameter: {t}"
            );
        }
    }
    let n = targets.len();
    targets.sort();
    targets.dedup();
    assert_eq!(targets.len(), n, "one fill per keyed target: {targets:?}");

    // `ignore`: the origin never sees a query; `all`: two spellings of one query, one object.
    let ignore = "    cache_key: {query: ignore}\n";
    let proxy = Proxy::start(&cache_config(&origin, ignore));
    get(proxy.addr, "/reflect/i?v=EVIL", host, "");
    let (_, _, body) = get(proxy.addr, "/reflect/i", host, "");
    assert!(!evil(&body), "{body}");
    assert!(records(&origin, "/reflect/i")
        .iter()
        .all(|r| r.path == "/reflect/i"));
    let proxy = Proxy::start(&cache_config(&origin, ""));
    get(proxy.addr, "/reflect/all?%76=1", host, "");
    let (_, fields, _) = get(proxy.addr, "/reflect/all?v=1", host, "");
    assert!(find(&fields, "cache-status").unwrap_or("").contains("hit"));
    assert_eq!(records(&origin, "/reflect/all").len(), 1);
    assert_eq!(records(&origin, "/reflect/all")[0].path, "/reflect/all?v=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_are_validated_normalised_and_keyed_as_forwarded() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&cache_config(&origin, ""));
    for bad in [
        "GET /reflect/h HTTP/1.1\nHost: www.example.com:evil.net\n",
        "GET /reflect/h HTTP/1.1\nHost: x evil\n",
        "GET /reflect/h HTTP/1.1\nHost: a..b\n",
        "GET /reflect/h HTTP/1.1\nHost: www.example.com:99999\n",
        "GET /reflect/h HTTP/1.1\nHost: www.example.com\nHost: evil.example\n",
        "GET /reflect/h HTTP/1.1\nHost: \n",
        // A Connection field that would strip the Host or a forwarding field (Pingora refuses
        // to forward it on pass-through): refused alike on a cached route, before any fill.
        "GET /reflect/h HTTP/1.1\nHost: www.example.com\nConnection: Host\n",
        "GET /reflect/h HTTP/1.1\nHost: www.example.com\nConnection: X-Forwarded-Proto\n",
        // HTTP/1.0 needs a Host too (it would reach the origin as HTTP/1.1 without one).
        "GET /reflect/h HTTP/1.0\n",
        "GET /reflect/h HTTP/1.1\n",
    ] {
        let (status, _, _) = raw(proxy.addr, bad);
        assert_eq!(status, 400, "{bad:?}");
    }
    assert!(
        records(&origin, "/reflect/h").is_empty(),
        "a bad host reached the origin"
    );

    // A port is part of the authority: keyed and forwarded together.
    let (status, fields, _) = get(
        proxy.addr,
        "/reflect/redirect/h",
        "www.example.com:6666",
        "",
    );
    assert_eq!(status, 301);
    assert_eq!(
        find(&fields, "location"),
        Some("http://www.example.com:6666/reflect/redirect/h")
    );
    let (status, fields, _) = get(proxy.addr, "/reflect/redirect/h", "www.example.com", "");
    assert_eq!(status, 301);
    assert_eq!(
        find(&fields, "location"),
        Some("http://www.example.com/reflect/redirect/h"),
        "the port-6666 answer was served to a request without it"
    );
    // Case, a trailing dot and the default port name the same object, and the origin sees
    // the canonical host.
    for spelling in [
        "WWW.Example.COM",
        "www.example.com.",
        "www.example.com:80",
        "www.example.com.:80",
    ] {
        let (status, fields, _) = get(proxy.addr, "/reflect/redirect/h", spelling, "");
        assert_eq!(status, 301, "{spelling}");
        assert_eq!(
            find(&fields, "location"),
            Some("http://www.example.com/reflect/redirect/h"),
            "{spelling}"
        );
        assert!(
            find(&fields, "cache-status").unwrap_or("").contains("hit"),
            "{spelling}: not the stored object"
        );
    }
    let hosts: Vec<String> = records(&origin, "/reflect/redirect/h")
        .iter()
        .map(|r| r.header("host").unwrap_or("").to_string())
        .collect();
    assert_eq!(hosts, ["www.example.com:6666", "www.example.com"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_routed_shaped_and_keyed_in_one_spelling() {
    let origin = Origin::start().await;
    // `/obj/` on media.example.com is shaped; everything else is not.
    let yaml = format!(
        "cache:\n  chunk_size: 64KiB\n  memory:\n    capacity: 32MiB\nupstreams:\n  origin:\n    servers: [\"{}\"]\nshaping:\n  classes:\n    slow:\n      rate: 64MiB/s\nroutes:\n  - host: media.example.com\n    path_prefix: /obj/\n    upstream: origin\n    shaping: slow\n  - path_prefix: /\n    upstream: origin\n",
        origin.addr()
    );
    let proxy = Proxy::start(&yaml);
    let size = 100_000u64;
    let canonical = format!("/obj/{size}/f.bin");
    let want = content(&canonical, 0, 0..size);
    let mut shaped_before = proxy.stats().await["shaping_bytes"];
    for (target, host) in [
        (canonical.clone(), "media.example.com"),
        (format!("/x/../obj/{size}/f.bin"), "media.example.com"),
        (format!("//obj/{size}/f.bin"), "media.example.com"),
        (format!("/%6Fbj/{size}/f.bin"), "media.example.com"),
        (format!("/obj%2F{size}/f.bin"), "media.example.com"),
        (format!("/./obj/./{size}//f.bin"), "media.example.com"),
        (format!("/obj/{size}/x/%2E%2E/f.bin"), "media.example.com"),
        (canonical.clone(), "media.example.com."),
        (canonical.clone(), "MEDIA.example.com:80"),
    ] {
        let (status, fields, body) = raw(
            proxy.addr,
            &format!("GET {target} HTTP/1.1\nHost: {host}\n"),
        );
        assert_eq!(status, 200, "{target} {host}");
        assert!(body == want, "{target} {host}: wrong bytes");
        let shaped = proxy.stats().await["shaping_bytes"];
        assert!(
            shaped >= shaped_before + size,
            "{target} (Host {host}) stepped around the shaped route: {shaped_before} -> {shaped}"
        );
        shaped_before = shaped;
        if target != canonical || host != "media.example.com" {
            assert!(
                find(&fields, "cache-status").unwrap_or("").contains("hit"),
                "{target} {host}: a separate cache object"
            );
        }
    }
    let fills = records(&origin, "/obj/");
    assert!(!fills.is_empty());
    assert!(
        fills.iter().all(|r| r.path == canonical),
        "the origin was asked for another spelling: {:?}",
        fills.iter().map(|r| &r.path).collect::<Vec<_>>()
    );
    // A malformed escape is refused, not guessed at.
    let (status, _, _) = raw(
        proxy.addr,
        "GET /obj/%zz HTTP/1.1\nHost: media.example.com\n",
    );
    assert_eq!(status, 400);
    let (status, _, _) = raw(
        proxy.addr,
        "GET /obj/a%00b HTTP/1.1\nHost: media.example.com\n",
    );
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentialed_requests_never_get_an_answer_fetched_without_them() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&cache_config(&origin, ""));
    let host = "app.example";
    let alice = "Cookie: session=alice\n";
    let bearer = "Authorization: Bearer good\n";
    for round in 0..3 {
        // A logged-in user, a token holder and an anonymous visitor, in turn: each gets its
        // own answer, whatever the others did before (the anonymous answer sets a cookie and
        // is not stored; round 0 is cold, later rounds follow a hit-for-pass mark).
        let (status, fields, body) = get(proxy.addr, "/session/page", host, alice);
        assert_eq!(
            (status, body.as_str()),
            (200, "hello alice\n"),
            "round {round}"
        );
        assert_eq!(
            find(&fields, "set-cookie"),
            None,
            "round {round}: logged out"
        );
        let (status, _, body) = get(proxy.addr, "/session/page", host, bearer);
        assert_eq!((status, body.as_str()), (200, "secret\n"), "round {round}");
        let (status, fields, body) = get(proxy.addr, "/session/page", host, "");
        assert_eq!(
            (status, body.as_str()),
            (200, "anonymous\n"),
            "round {round}"
        );
        assert!(find(&fields, "set-cookie").is_some());
    }
    // A stored anonymous answer that varies on Cookie answers anonymous requests only.
    let (_, _, body) = get(proxy.addr, "/session/cacheable", host, "");
    assert_eq!(body, "anonymous\n");
    let (_, fields, body) = get(proxy.addr, "/session/cacheable", host, "");
    assert_eq!(body, "anonymous\n");
    assert!(
        find(&fields, "cache-status").unwrap_or("").contains("hit"),
        "{fields:?}"
    );
    let (_, _, body) = get(proxy.addr, "/session/cacheable", host, alice);
    assert_eq!(body, "hello alice\n");
    let (_, _, body) = get(proxy.addr, "/session/cacheable", host, bearer);
    assert_eq!(body, "secret\n");
    // The credentials reached the origin on the requests that carried them, and no fill
    // carried any.
    for r in records(&origin, "/session/") {
        let cookie = r.header("cookie");
        let auth = r.header("authorization");
        if cookie.is_some() || auth.is_some() {
            assert!(
                cookie == Some("session=alice") || auth == Some("Bearer good"),
                "{r:?}"
            );
        }
    }
}
