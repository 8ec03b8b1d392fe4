//! TLS listeners against the real binary and real clients (curl, `openssl s_client`, raw
//! sockets, the openssl crate): byte-exact objects and ranges over HTTPS/1.1 cold and warm,
//! the certificate chosen by SNI, the protocol floor, `-t` errors naming the key and line,
//! the expiry gauge and warning, a certificate swapped by reload under load, silent
//! connections beside a working client, and the handshake + header deadline from accept.
//!
//! Certificates come from a test CA made at test time (tests/common/tls.rs). `http2: false`
//! on these listeners: HTTP/2 is served by the h2 part of issue 22.

mod common;

use common::origin::{content, Origin};
use common::proxy::Proxy;
use common::tls::{CertFiles, Got, TestCa};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn routes(origin: &Origin) -> String {
    format!(
        "  token: tls-token-1\ncache:\n  memory:\n    capacity: 64MiB\nupstreams:\n  origin:\n    servers: [\"{}\"]\n    connect_timeout: 1s\n    read_timeout: 5s\nroutes:\n  - upstream: origin\n",
        origin.addr()
    )
}

/// The lines of a TLS `listen` entry after its address.
fn tls_entry(certs: &[&CertFiles], extra: &str) -> String {
    let mut s = String::from("    tls:\n      certificates:\n");
    for c in certs {
        s.push_str(&format!(
            "        - {{cert: {}, key: {}}}\n",
            c.cert.display(),
            c.key.display()
        ));
    }
    s.push_str(extra);
    s.push_str("    http2: false\n");
    s
}

/// `curl --http1.1 --cacert CA` on `path` (resolving `host` to 127.0.0.1), with `extra` args.
fn curl(ca: &Path, tls: SocketAddr, host: &str, path: &str, extra: &[&str]) -> Result<Got, String> {
    common::tls::curl(ca, tls, host, path, false, extra)
}

/// `openssl s_client` to `addr` with `args`, sending an empty stdin; its output.
fn s_client(addr: SocketAddr, args: &[&str]) -> String {
    let mut child = Command::new("openssl")
        .arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run openssl s_client");
    drop(child.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "openssl s_client hung");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out: Output = child.wait_with_output().expect("output");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The negotiated protocol from s_client's `New, TLSv1.3, Cipher is ...` line; `None` when
/// the handshake failed (`New, (NONE), Cipher is (NONE)`).
fn negotiated(out: &str) -> Option<String> {
    let line = out.lines().find(|l| l.starts_with("New, "))?;
    let proto = line.trim_start_matches("New, ").split(',').next()?.trim();
    (proto != "(NONE)").then(|| proto.to_string())
}

/// The leaf certificate s_client was shown, as PEM.
fn presented(out: &str) -> String {
    let begin = out
        .find("-----BEGIN CERTIFICATE-----")
        .expect("a certificate shown");
    let end = out[begin..]
        .find("-----END CERTIFICATE-----")
        .expect("its end")
        + begin;
    format!("{}-----END CERTIFICATE-----\n", &out[begin..end])
}

fn pem_text(c: &CertFiles) -> String {
    String::from_utf8(c.pem.clone()).expect("PEM text")
}

fn not_after_unix(c: &CertFiles) -> i64 {
    let cert = openssl::x509::X509::from_pem(&c.pem).expect("pem");
    let epoch = openssl::asn1::Asn1Time::from_unix(0).expect("epoch");
    let d = epoch.diff(cert.not_after()).expect("diff");
    i64::from(d.days) * 86_400 + i64::from(d.secs)
}

fn origin_requests_for(origin: &Origin, path: &str) -> usize {
    origin.log().iter().filter(|r| r.path == path).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_objects_and_ranges_are_byte_exact_cold_and_warm() {
    let origin = Origin::start().await;
    let mut ca = TestCa::new("edgeslice test CA");
    let site = ca.issue(&["localhost"], 90);
    let proxy = Proxy::start_tls(&routes(&origin), "", &tls_entry(&[&site], ""));
    let tls = proxy.tls_addr.unwrap();
    let ca_path = ca.ca_path().to_path_buf();
    let size: u64 = 2_500_000;
    let path = format!("/obj/{size}/whole");
    let want = content(&path, 0, 0..size);
    let run = {
        let ca_path = ca_path.clone();
        move |p: String, extra: Vec<String>| {
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            curl(&ca_path, tls, "localhost", &p, &extra).expect("curl")
        }
    };
    // Whole object, cold then warm.
    for round in ["cold", "warm"] {
        let (p, r) = (path.clone(), run.clone());
        let got = tokio::task::spawn_blocking(move || r(p, vec![]))
            .await
            .unwrap();
        assert_eq!(got.status, 200, "{round}: {}", got.headers);
        assert!(
            got.body == want,
            "{round}: body differs ({} bytes)",
            got.body.len()
        );
    }
    let fetched = origin_requests_for(&origin, &path);
    assert!(fetched >= 1, "the cold request reached the origin");
    // Ranges over the chunk boundary, the tail, a suffix; cold (new object) then warm.
    let rpath = format!("/obj/{size}/ranges");
    let rwant = content(&rpath, 0, 0..size);
    for round in ["cold", "warm"] {
        for (range, from, to) in [
            ("0-0", 0u64, 1u64),
            ("1048570-1048600", 1_048_570, 1_048_601),
            ("2000000-", 2_000_000, size),
            ("-1000", size - 1000, size),
        ] {
            let (p, r) = (rpath.clone(), run.clone());
            let arg = vec!["-r".to_string(), range.to_string()];
            let got = tokio::task::spawn_blocking(move || r(p, arg))
                .await
                .unwrap();
            assert_eq!(got.status, 206, "{round} {range}: {}", got.headers);
            assert!(
                got.body == rwant[from as usize..to as usize],
                "{round} {range}: body differs"
            );
            let cr = format!("content-range: bytes {from}-{}/{size}", to - 1);
            assert!(
                got.headers.to_ascii_lowercase().contains(&cr),
                "{round} {range}: {}",
                got.headers
            );
        }
        // Two ranges: multipart/byteranges with both parts byte-exact.
        let (p, r) = (rpath.clone(), run.clone());
        let arg = vec!["-r".to_string(), "10-19,2000000-2000009".to_string()];
        let got = tokio::task::spawn_blocking(move || r(p, arg))
            .await
            .unwrap();
        assert_eq!(got.status, 206);
        let body = String::from_utf8_lossy(&got.body).into_owned();
        let lower = got.headers.to_ascii_lowercase();
        assert!(lower.contains("multipart/byteranges"), "{}", got.headers);
        for (from, to) in [(10usize, 20usize), (2_000_000, 2_000_010)] {
            let want_part = &rwant[from..to];
            assert!(
                got.body.windows(want_part.len()).any(|w| w == want_part),
                "{round}: part {from}-{to} missing from {body:?}"
            );
            assert!(
                body.contains(&format!("bytes {from}-{}/{size}", to - 1)),
                "{body}"
            );
        }
    }
    let after_cold = origin_requests_for(&origin, &rpath);
    // Warm: nothing more from the origin for either object.
    let (p, r) = (path.clone(), run.clone());
    let got = tokio::task::spawn_blocking(move || r(p, vec!["-r".into(), "5-5000".into()]))
        .await
        .unwrap();
    assert_eq!(got.status, 206);
    assert!(got.body == want[5..5001]);
    assert_eq!(
        origin_requests_for(&origin, &path),
        fetched,
        "the warm object came from the origin again"
    );
    assert_eq!(origin_requests_for(&origin, &rpath), after_cold);
    // The origin was told the client came over TLS.
    let fills = origin.log();
    let fill = fills.iter().find(|r| r.path == path).expect("the fill");
    assert_eq!(fill.header("x-forwarded-proto"), Some("https"));
    assert_eq!(
        fill.header("host"),
        Some("localhost"),
        "the listener's port is a default"
    );
    // The plain listener's request for the same URL is another object: the origin is told
    // `X-Forwarded-Proto: http` and may answer it otherwise (a redirect to https, served to
    // HTTPS clients, would loop), so the scheme is part of the key (as nginx's `$scheme`).
    let plain = common::client()
        .get(proxy.url(&path))
        .header("host", "localhost")
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 200);
    assert!(plain.bytes().await.unwrap() == want);
    assert!(
        origin_requests_for(&origin, &path) > fetched,
        "an HTTP request was answered from what was stored for HTTPS"
    );
    let fills = origin.log();
    let http_fill = fills
        .iter()
        .rev()
        .find(|r| r.path == path)
        .expect("the plain fill");
    assert_eq!(http_fill.header("x-forwarded-proto"), Some("http"));
    // Each is a hit of its own scheme from now on.
    let before = origin_requests_for(&origin, &path);
    let (p, r) = (path.clone(), run.clone());
    let got = tokio::task::spawn_blocking(move || r(p, vec![]))
        .await
        .unwrap();
    assert!(got.status == 200 && got.body == want);
    let plain = common::client()
        .get(proxy.url(&path))
        .header("host", "localhost")
        .send()
        .await
        .unwrap();
    assert!(plain.bytes().await.unwrap() == want);
    assert_eq!(origin_requests_for(&origin, &path), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_chooses_each_names_certificate_and_the_first_otherwise() {
    let origin = Origin::start().await;
    let mut ca = TestCa::new("edgeslice test CA");
    let site = ca.issue(&["site.test", "*.img.site.test"], 90);
    let other = ca.issue(&["other.test", "www.other.test"], 90);
    let proxy = Proxy::start_tls(&routes(&origin), "", &tls_entry(&[&site, &other], ""));
    let tls = proxy.tls_addr.unwrap();
    let ca_file = ca.ca_path().display().to_string();
    let cases: [(&[&str], &CertFiles); 8] = [
        (&["-servername", "site.test"], &site),
        (&["-servername", "other.test"], &other),
        (&["-servername", "WWW.Other.Test"], &other),
        (&["-servername", "a.img.site.test"], &site),
        // A wildcard covers exactly one label.
        (&["-servername", "b.a.img.site.test"], &site),
        (&["-servername", "img.other.test"], &site),
        (&["-servername", "unknown.example"], &site),
        (&["-noservername"], &site),
    ];
    for (args, want) in cases {
        let mut all = vec!["-CAfile", ca_file.as_str()];
        all.extend_from_slice(args);
        let out = tokio::task::spawn_blocking({
            let all: Vec<String> = all.iter().map(|s| s.to_string()).collect();
            move || s_client(tls, &all.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        .unwrap();
        assert!(negotiated(&out).is_some(), "{args:?}: {out}");
        assert_eq!(
            presented(&out),
            pem_text(want),
            "{args:?} got the wrong certificate"
        );
    }
    // Real clients verify each name against the certificate it gets.
    for host in [
        "site.test",
        "x.img.site.test",
        "other.test",
        "www.other.test",
    ] {
        let ca_path = ca.ca_path().to_path_buf();
        let got =
            tokio::task::spawn_blocking(move || curl(&ca_path, tls, host, "/obj/100/sni", &[]))
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("{host}: {e}"));
        assert_eq!(got.status, 200);
        assert_eq!(got.body, content("/obj/100/sni", 0, 0..100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_tls_1_2_and_1_3_with_resumption_and_alpn_and_min_version_1_3_refuses_1_2() {
    let origin = Origin::start().await;
    let mut ca = TestCa::new("edgeslice test CA");
    let site = ca.issue(&["localhost"], 90);
    let proxy = Proxy::start_tls(&routes(&origin), "", &tls_entry(&[&site], ""));
    let tls = proxy.tls_addr.unwrap();
    let check = move |args: Vec<&str>| {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            s_client(tls, &args.iter().map(String::as_str).collect::<Vec<_>>())
        })
    };
    // OpenSSL 3 refuses the old versions itself at its default security level.
    for old in ["-tls1", "-tls1_1"] {
        let out = check(vec![old, "-cipher", "DEFAULT@SECLEVEL=0"])
            .await
            .unwrap();
        assert_eq!(negotiated(&out), None, "{old} was accepted: {out}");
        assert!(
            out.contains("alert protocol version") || out.contains("unsupported protocol"),
            "{old}: {out}"
        );
    }
    let out = check(vec!["-tls1_2"]).await.unwrap();
    assert_eq!(negotiated(&out).as_deref(), Some("TLSv1.2"), "{out}");
    let out = check(vec!["-tls1_3"]).await.unwrap();
    assert_eq!(negotiated(&out).as_deref(), Some("TLSv1.3"), "{out}");
    // A cipher outside the intermediate profile is refused (CBC, RSA key exchange).
    let out = check(vec![
        "-tls1_2",
        "-cipher",
        "AES128-SHA:ECDHE-ECDSA-AES128-SHA",
    ])
    .await
    .unwrap();
    assert_eq!(negotiated(&out), None, "{out}");
    // http2: false: ALPN picks http/1.1 even when h2 is offered first.
    let out = check(vec!["-alpn", "h2,http/1.1"]).await.unwrap();
    assert!(out.contains("ALPN protocol: http/1.1"), "{out}");
    // Session resumption (TLS 1.2 session cache, and tickets).
    let dir = tempfile::tempdir().unwrap();
    let sess = dir.path().join("sess").display().to_string();
    for extra in [vec!["-no_ticket"], vec![]] {
        let mut first = vec!["-tls1_2", "-sess_out", sess.as_str()];
        first.extend(extra.iter().copied());
        let out = check(first).await.unwrap();
        assert!(out.contains("New, TLSv1.2"), "{out}");
        let mut again = vec!["-tls1_2", "-sess_in", sess.as_str()];
        again.extend(extra.iter().copied());
        let out = check(again).await.unwrap();
        assert!(
            out.contains("Reused, TLSv1.2"),
            "{extra:?}: not resumed: {out}"
        );
    }
    drop(proxy);

    // min_version 1.3 (and http2 on: ALPN offers h2 first).
    let entry = tls_entry(&[&site], "      min_version: 1.3\n").replace("    http2: false\n", "");
    let proxy = Proxy::start_tls(&routes(&origin), "", &entry);
    let tls = proxy.tls_addr.unwrap();
    let check = move |args: Vec<&str>| {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            s_client(tls, &args.iter().map(String::as_str).collect::<Vec<_>>())
        })
    };
    let out = check(vec!["-tls1_2"]).await.unwrap();
    assert_eq!(
        negotiated(&out),
        None,
        "1.2 accepted under min_version 1.3: {out}"
    );
    let out = check(vec!["-tls1_3", "-alpn", "http/1.1,h2"])
        .await
        .unwrap();
    assert_eq!(negotiated(&out).as_deref(), Some("TLSv1.3"), "{out}");
    assert!(out.contains("ALPN protocol: h2"), "{out}");
    let out = check(vec!["-tls1_3", "-alpn", "http/1.1"]).await.unwrap();
    assert!(out.contains("ALPN protocol: http/1.1"), "{out}");
}

fn edgeslice_t(conf: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edgeslice"))
        .arg("-t")
        .arg("-c")
        .arg(conf)
        .output()
        .expect("run edgeslice -t");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A certificate file and a key file.
type Pair<'a> = (&'a Path, &'a Path);

#[test]
fn test_mode_names_the_certificate_key_and_line() {
    let mut ca = TestCa::new("edgeslice test CA");
    let site = ca.issue(&["site.test"], 90);
    let other = ca.issue(&["other.test"], 90);
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("edgeslice.yaml");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let write = |c0: (&Path, &Path), c1: (&Path, &Path), min: &str| {
        let yaml = format!(
            "listen:\n  - 127.0.0.1:18080\n  - address: 127.0.0.1:18443\n    tls:\n      certificates:\n        - cert: {}\n          key: {}\n        - cert: {}\n          key: {}\n      min_version: {min}\nupstreams:\n  o:\n    servers: [\"127.0.0.1:1\"]\nroutes:\n  - upstream: o\n",
            c0.0.display(), c0.1.display(), c1.0.display(), c1.1.display()
        );
        std::fs::write(&conf, yaml).unwrap();
    };
    let good0 = (site.cert.as_path(), site.key.as_path());
    let good1 = (other.cert.as_path(), other.key.as_path());
    write(good0, good1, "\"1.2\"");
    let (code, out) = edgeslice_t(&conf);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("test is successful"), "{out}");
    let missing = dir.path().join("missing.key");
    let cases: Vec<(Pair, Pair, &str, &str, &str)> = vec![
        // A missing key file.
        (
            good0,
            (other.cert.as_path(), missing.as_path()),
            "1.2",
            "listen[1].tls.certificates[1].key (line 9",
            "cannot read",
        ),
        // A key that does not match its certificate.
        (
            (site.cert.as_path(), other.key.as_path()),
            good1,
            "1.2",
            "listen[1].tls.certificates[0].key (line 7",
            "does not match",
        ),
        // A missing certificate file.
        (
            (missing.as_path(), site.key.as_path()),
            good1,
            "1.2",
            "listen[1].tls.certificates[0].cert (line 6",
            "cannot read",
        ),
        // A certificate file with no certificate.
        (
            good0,
            (empty.as_path(), other.key.as_path()),
            "1.2",
            "listen[1].tls.certificates[1].cert (line 8",
            "certificate",
        ),
        // A key file with no key (a certificate in its place).
        (
            good0,
            (other.cert.as_path(), other.cert.as_path()),
            "1.2",
            "listen[1].tls.certificates[1].key (line 9",
            "private key",
        ),
        // An unknown min_version.
        (
            good0,
            good1,
            "\"1.1\"",
            "listen[1].tls.min_version (line 10",
            "unknown TLS version",
        ),
    ];
    for (c0, c1, min, key, what) in cases {
        write(c0, c1, min);
        let (code, out) = edgeslice_t(&conf);
        assert_eq!(code, 1, "accepted: {out}");
        assert!(
            out.contains(key) && out.contains(what),
            "expected {key:?} / {what:?}, got: {out}"
        );
        assert!(!out.contains("panicked"), "{out}");
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn post_reload(proxy: &Proxy) -> (u16, String) {
    let resp = common::client()
        .post(format!("http://{}/reload", proxy.admin))
        .bearer_auth("tls-token-1")
        .send()
        .await
        .expect("POST /reload");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

fn expiry_lines(metrics: &str) -> Vec<String> {
    metrics
        .lines()
        .filter(|l| l.starts_with("edgeslice_tls_certificate_expiry_seconds{"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_gauge_and_the_fourteen_day_warning_follow_reloads() {
    let origin = Origin::start().await;
    let mut ca = TestCa::new("edgeslice test CA");
    let soon = ca.issue(&["soon.test"], 5);
    let later = ca.issue(&["later.test", "www.later.test"], 400);
    let proxy = Proxy::start_tls(&routes(&origin), "", &tls_entry(&[&soon, &later], ""));
    let listener = proxy.tls_addr.unwrap().to_string();
    let metrics = proxy.metrics().await;
    let mut want = vec![
        format!(
            "edgeslice_tls_certificate_expiry_seconds{{listener=\"{listener}\",name=\"later.test\"}} {}",
            not_after_unix(&later)
        ),
        format!(
            "edgeslice_tls_certificate_expiry_seconds{{listener=\"{listener}\",name=\"soon.test\"}} {}",
            not_after_unix(&soon)
        ),
    ];
    want.sort();
    assert_eq!(expiry_lines(&metrics), want, "{metrics}");
    assert!((not_after_unix(&soon) - unix_now() - 5 * 86_400).abs() < 3600);
    assert!(
        proxy.log_contains("certificate \"soon.test\""),
        "{}",
        proxy.log()
    );
    let warnings = |p: &Proxy, name: &str| {
        p.log()
            .lines()
            .filter(|l| l.contains("WARN") && l.contains(&format!("certificate \"{name}\"")))
            .count()
    };
    assert_eq!(warnings(&proxy, "soon.test"), 1, "{}", proxy.log());
    assert_eq!(warnings(&proxy, "later.test"), 0, "{}", proxy.log());
    // The soon-expiring certificate is renewed in place (same files), the other replaced by a
    // different one: the reload warns again only about what still expires soon, and the
    // gauge loses the series of the certificate no longer served.
    let renewed = ca.issue(&["soon.test"], 200);
    std::fs::copy(&renewed.cert, &soon.cert).unwrap();
    std::fs::copy(&renewed.key, &soon.key).unwrap();
    let replaced = ca.issue(&["third.test"], 10);
    std::fs::copy(&replaced.cert, &later.cert).unwrap();
    std::fs::copy(&replaced.key, &later.key).unwrap();
    let (status, body) = post_reload(&proxy).await;
    assert_eq!(status, 200, "{body}");
    let metrics = proxy.metrics().await;
    let mut want = vec![
        format!(
            "edgeslice_tls_certificate_expiry_seconds{{listener=\"{listener}\",name=\"soon.test\"}} {}",
            not_after_unix(&renewed)
        ),
        format!(
            "edgeslice_tls_certificate_expiry_seconds{{listener=\"{listener}\",name=\"third.test\"}} {}",
            not_after_unix(&replaced)
        ),
    ];
    want.sort();
    assert_eq!(expiry_lines(&metrics), want, "{metrics}");
    assert!(proxy.log_contains("certificate \"third.test\""));
    assert_eq!(
        warnings(&proxy, "soon.test"),
        1,
        "warned again after renewal"
    );
    assert_eq!(warnings(&proxy, "third.test"), 1);
}

/// Handshakes on `tls` with SNI `host`: the leaf certificate presented, as PEM.
fn served_cert(tls: SocketAddr, host: &str) -> String {
    presented(&s_client(tls, &["-servername", host]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_a_certificate_under_load_with_no_failed_request() {
    let origin = Origin::start().await;
    let mut ca = TestCa::new("edgeslice test CA");
    let first = ca.issue(&["localhost"], 90);
    let proxy = Proxy::start_tls(&routes(&origin), "", &tls_entry(&[&first], ""));
    let tls = proxy.tls_addr.unwrap();
    let path = "/obj/200000/reload";
    let want = Arc::new(content(path, 0, 0..200_000));
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut loops = Vec::new();
    // Two loops of new connections (a handshake each) and one of keep-alive requests (curl
    // reuses its connection across the URLs of one run).
    for kind in 0..3 {
        let (stop, ok, failures, want) = (stop.clone(), ok.clone(), failures.clone(), want.clone());
        let ca_path = ca.ca_path().to_path_buf();
        loops.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let n = if kind == 2 { 10 } else { 1 };
                let dir = tempfile::tempdir().unwrap();
                let mut cmd = Command::new("curl");
                cmd.args(["-sS", "--http1.1", "--max-time", "20", "--fail", "--cacert"])
                    .arg(&ca_path)
                    .args(["--resolve", &format!("localhost:{}:127.0.0.1", tls.port())]);
                for i in 0..n {
                    cmd.arg("-o").arg(dir.path().join(i.to_string()));
                    cmd.arg(format!("https://localhost:{}{path}", tls.port()));
                }
                let out = cmd.output().expect("curl");
                let bodies_ok = (0..n).all(|i| {
                    std::fs::read(dir.path().join(i.to_string())).is_ok_and(|b| b == *want)
                });
                if out.status.success() && bodies_ok {
                    ok.fetch_add(n, Ordering::Relaxed);
                } else {
                    failures.lock().unwrap().push(format!(
                        "{:?} {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            }
        }));
    }
    let wait_ok = |at_least: u64| {
        let ok = ok.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while ok.load(Ordering::Relaxed) < at_least {
                assert!(
                    Instant::now() < deadline,
                    "the client loops made no progress"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_ok(20).await;
    assert_eq!(served_cert(tls, "localhost"), pem_text(&first));
    // Swap the files in place and reload: by SIGHUP, then by POST /reload.
    let second = ca.issue(&["localhost"], 120);
    std::fs::copy(&second.cert, &first.cert).unwrap();
    std::fs::copy(&second.key, &first.key).unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_cert(tls, "localhost") != pem_text(&second) {
        assert!(
            Instant::now() < deadline,
            "new handshakes still see the old certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let n = ok.load(Ordering::Relaxed);
    wait_ok(n + 20).await;
    let third = ca.issue(&["localhost"], 150);
    std::fs::copy(&third.cert, &first.cert).unwrap();
    std::fs::copy(&third.key, &first.key).unwrap();
    let (status, body) = post_reload(&proxy).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(served_cert(tls, "localhost"), pem_text(&third));
    let n = ok.load(Ordering::Relaxed);
    wait_ok(n + 20).await;
    // A failed reload (a key that does not match) keeps the certificate in force.
    let fourth = ca.issue(&["localhost"], 160);
    std::fs::copy(&fourth.cert, &first.cert).unwrap();
    let (status, body) = post_reload(&proxy).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("listen[1].tls.certificates[0].key") && body.contains("does not match"),
        "{body}"
    );
    assert_eq!(served_cert(tls, "localhost"), pem_text(&third));
    let n = ok.load(Ordering::Relaxed);
    wait_ok(n + 20).await;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    eprintln!(
        "{} requests through three reloads, {} failed",
        ok.load(Ordering::Relaxed),
        failures.len()
    );
    assert!(failures.is_empty(), "failed requests: {failures:?}");
}

/// Whether the server has closed `s` (a read sees the end of stream or a reset), waiting at
/// most until `deadline`.
fn closed_by(s: &mut TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 64];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_do_not_starve_a_real_client_or_healthz() {
    assert!(
        common::raise_nofile() >= 4096,
        "the test needs 4096 descriptors"
    );
    let origin = Origin::start().await;
    let mut ca = TestCa::new("edgeslice test CA");
    let site = ca.issue(&["localhost"], 90);
    let proxy = Proxy::start_tls(
        &routes(&origin),
        "  max_connections: 500\n  header_timeout: 4s\n",
        &tls_entry(&[&site], ""),
    );
    let tls = proxy.tls_addr.unwrap();
    let opened = Instant::now();
    // 2,000 connections that never send a ClientHello.
    let mut silent = tokio::task::spawn_blocking(move || {
        (0..2000)
            .map(|_| TcpStream::connect(tls).expect("connect"))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    // A real client beside them: each request (a new connection and handshake) succeeds.
    let path = "/obj/50000/beside";
    let want = content(path, 0, 0..50_000);
    for i in 0..5 {
        let ca_path = ca.ca_path().to_path_buf();
        let start = Instant::now();
        let got = tokio::task::spawn_blocking(move || curl(&ca_path, tls, "localhost", path, &[]))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("request {i} failed beside the silent connections: {e}"));
        let took = start.elapsed();
        assert_eq!(got.status, 200);
        assert!(got.body == want, "request {i}: body differs");
        assert!(
            took < Duration::from_secs(3),
            "request {i} took {took:?} (header_timeout 4s)"
        );
    }
    let start = Instant::now();
    let health = common::client()
        .get(format!("http://{}/healthz", proxy.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "/healthz took {:?}",
        start.elapsed()
    );
    let stats = proxy.stats().await;
    eprintln!(
        "open {} reclaimed {} refused {}",
        stats["client_connections_open"],
        stats["client_connections_reclaimed"],
        stats["client_connections_refused"]
    );
    assert!(stats["client_connections_open"] <= 500);
    assert!(stats["client_connections_reclaimed"] >= 1500, "{stats:?}");
    assert_eq!(stats["client_connections_refused"], 0);
    // Every silent connection is closed: reclaimed at the cap, or at header_timeout.
    let deadline = opened + Duration::from_secs(4) + Duration::from_secs(6);
    let silent_closed = tokio::task::spawn_blocking(move || {
        silent
            .iter_mut()
            .map(|s| closed_by(s, deadline))
            .filter(|c| *c)
            .count()
    })
    .await
    .unwrap();
    assert_eq!(
        silent_closed, 2000,
        "silent connections still open after header_timeout"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.stats().await["client_connections_open"] > 0 {
        assert!(Instant::now() < deadline, "connections left open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_and_the_header_together_must_arrive_within_header_timeout_of_accept() {
    let origin = Origin::start().await;
    let mut ca = TestCa::new("edgeslice test CA");
    let site = ca.issue(&["localhost"], 90);
    let proxy = Proxy::start_tls(
        &routes(&origin),
        "  header_timeout: 3s\n",
        &tls_entry(&[&site], ""),
    );
    let tls = proxy.tls_addr.unwrap();
    let ca_path = ca.ca_path().to_path_buf();
    let result = tokio::task::spawn_blocking(move || {
        let mut b = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls()).unwrap();
        b.set_ca_file(&ca_path).unwrap();
        let connector = b.build();
        let tcp = TcpStream::connect(tls).unwrap();
        let accepted = Instant::now();
        // The ClientHello comes 1.5 s after accept, the handshake completes...
        std::thread::sleep(Duration::from_millis(1500));
        let mut s = connector.connect("localhost", tcp).expect("handshake");
        let handshaken = accepted.elapsed();
        // ...then the header trickles, a byte every 100 ms: it would need 4 s more.
        let header = b"GET /obj/100/trickle HTTP/1.1\r\nHost: localhost\r\nX-Pad: aaaaaaaa\r\n\r\n";
        let mut cut = None;
        for b in header.iter() {
            if s.write_all(&[*b]).and_then(|_| s.flush()).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            if accepted.elapsed() > Duration::from_secs(3) {
                break;
            }
        }
        s.get_ref()
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    cut.get_or_insert(accepted.elapsed());
                }
            }
        }
        (handshaken, cut, got)
    })
    .await
    .unwrap();
    let (handshaken, cut, got) = result;
    let cut = cut.expect("an answer");
    eprintln!("handshake done at {handshaken:?}, 408 at {cut:?}");
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 408"),
        "{got:?}"
    );
    // Cut at 3 s from accept, not 3 s from the handshake's end (4.5 s).
    assert!(cut >= Duration::from_millis(2900), "cut early: {cut:?}");
    assert!(
        cut < Duration::from_millis(4400),
        "cut {cut:?}: counted from the handshake?"
    );

    // Never finishing a handshake: closed at header_timeout too (a ClientHello's first bytes,
    // then nothing).
    let start = Instant::now();
    let closed = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(tls).unwrap();
        s.write_all(&[0x16, 0x03, 0x01, 0x02]).unwrap();
        closed_by(&mut s, Instant::now() + Duration::from_secs(10))
    })
    .await
    .unwrap();
    assert!(closed);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(6),
        "{took:?}"
    );
    // Both count as header timeouts: the 408, and the handshake that never ended.
    assert_eq!(proxy.stats().await["client_header_timeouts"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tls_keepalive_connections_are_reclaimed_at_the_cap() {
    let origin = Origin::start().await;
    let mut ca = TestCa::new("edgeslice test CA");
    let site = ca.issue(&["localhost"], 90);
    let proxy = Proxy::start_tls(
        &routes(&origin),
        "  max_connections: 40\n",
        &tls_entry(&[&site], ""),
    );
    let tls = proxy.tls_addr.unwrap();
    let ca_path = ca.ca_path().to_path_buf();
    let path = "/obj/3000/idle";
    let want = content(path, 0, 0..3000);
    // 60 connections, each idle after one answered request (keep-alive).
    let (held, want) = tokio::task::spawn_blocking(move || {
        let mut b = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls()).unwrap();
        b.set_ca_file(&ca_path).unwrap();
        let connector = b.build();
        let held: Vec<_> = (0..60)
            .map(|i| {
                let tcp = TcpStream::connect(tls).unwrap();
                tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut s = connector.connect("localhost", tcp).expect("handshake");
                s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
                    .unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 8192];
                while !got.ends_with(&want) {
                    let n = s.read(&mut buf).unwrap_or(0);
                    assert!(n > 0, "connection {i}: response cut: {got:?}");
                    got.extend_from_slice(&buf[..n]);
                }
                assert!(got.starts_with(b"HTTP/1.1 200"), "connection {i}");
                s
            })
            .collect();
        (held, want)
    })
    .await
    .unwrap();
    assert_eq!(held.len(), 60);
    // A new client is served; the idle ones made room.
    let ca_path = ca.ca_path().to_path_buf();
    let got = tokio::task::spawn_blocking(move || curl(&ca_path, tls, "localhost", path, &[]))
        .await
        .unwrap()
        .expect("a new client at the cap");
    assert_eq!(got.status, 200);
    assert!(got.body == want);
    let stats = proxy.stats().await;
    assert!(stats["client_connections_open"] <= 40, "{stats:?}");
    assert!(stats["client_connections_reclaimed"] >= 20, "{stats:?}");
    assert_eq!(stats["client_connections_refused"], 0);
    // The oldest idle connections were closed (close_notify, then the end of the stream).
    let closed = tokio::task::spawn_blocking(move || {
        held.into_iter()
            .take(20)
            .map(|mut s| {
                s.get_ref()
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let mut buf = [0u8; 16];
                match s.read(&mut buf) {
                    Ok(0) => true,
                    Ok(_) => false,
                    // A read timeout: still open.
                    Err(e) => !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                }
            })
            .filter(|c| *c)
            .count()
    })
    .await
    .unwrap();
    assert_eq!(closed, 20, "the 20 longest-idle connections were reclaimed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testssl_finds_only_tls_1_2_and_1_3_and_strong_ciphers() {
    let origin = Origin::start().await;
    let mut ca = TestCa::new("edgeslice test CA");
    let site = ca.issue(&["localhost"], 90);
    let proxy = Proxy::start_tls(&routes(&origin), "", &tls_entry(&[&site], ""));
    let tls = proxy.tls_addr.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("testssl.json");
    // Debian installs it as `testssl`, upstream as `testssl.sh`.
    let bin = ["testssl", "testssl.sh"]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok())
        .expect("testssl.sh is installed (.ci/run)");
    let out = tokio::task::spawn_blocking({
        let json = json.clone();
        move || {
            let mut child = Command::new(bin)
                .args([
                    "--quiet",
                    "--color",
                    "0",
                    "--protocols",
                    "--std",
                    "--jsonfile",
                ])
                .arg(&json)
                .arg(tls.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run testssl");
            let deadline = Instant::now() + Duration::from_secs(240);
            while child.try_wait().expect("wait").is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("testssl did not finish in 240 s");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            child.wait_with_output().expect("testssl output")
        }
    })
    .await
    .unwrap();
    let text = std::fs::read_to_string(&json).unwrap_or_else(|e| {
        panic!(
            "no testssl JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let findings: Vec<serde_json::Value> = serde_json::from_str(&text).expect("testssl JSON");
    let finding = |id: &str| -> String {
        findings
            .iter()
            .find(|f| f["id"] == id)
            .and_then(|f| f["finding"].as_str())
            .unwrap_or_else(|| panic!("no {id} in {text}"))
            .to_string()
    };
    for id in ["SSLv2", "SSLv3", "TLS1", "TLS1_1"] {
        assert_eq!(finding(id), "not offered", "{id}");
    }
    assert!(finding("TLS1_2").starts_with("offered"), "{text}");
    assert!(finding("TLS1_3").starts_with("offered"), "{text}");
    for id in [
        "cipherlist_NULL",
        "cipherlist_aNULL",
        "cipherlist_EXPORT",
        "cipherlist_LOW",
        "cipherlist_3DES_IDEA",
        "cipherlist_AVERAGE",
    ] {
        assert_eq!(finding(id), "not offered", "{id}");
    }
    assert_eq!(finding("cipherlist_STRONG"), "offered");
    assert_eq!(
        finding("ALPN"),
        "http/1.1",
        "http2: false offers http/1.1 only"
    );
}
