//! Loop prevention with `CDN-Loop` (RFC 8586), against the real binary: every request
//! edgeslice sends upstream carries the list it received with `cluster.cdn_id` appended; a
//! request holding our id twice gets 508 and reaches no origin; two real tiers (edge → shield →
//! origin) serve normally with the default id on both, and a loop (edge → shield → edge) ends
//! with 508 at once instead of going round.

mod common;

use common::origin::{content, Origin};
use common::proxy::Proxy;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// One group `origin` at `upstream`: `/download/` is passed through, the rest cached.
fn config(upstream: SocketAddr, cluster: &str) -> String {
    format!(
        "cache:\n  chunk_size: 64KiB\nupstreams:\n  origin:\n    servers: [\"{upstream}\"]\n    connect_timeout: 500ms\n    read_timeout: 2s\n    retry: {{attempts: 1}}\nroutes:\n  - path_prefix: /download/\n    upstream: origin\n    cache: false\n  - path_prefix: /\n    upstream: origin\n{cluster}"
    )
}

async fn get(proxy: &Proxy, path: &str, cdn_loop: &[&str]) -> (u16, Vec<u8>) {
    let mut req = common::client().get(proxy.url(path));
    for v in cdn_loop {
        req = req.header("cdn-loop", *v);
    }
    let resp = tokio::time::timeout(Duration::from_secs(10), req.send())
        .await
        .expect("answered within 10 s")
        .expect("request");
    let status = resp.status().as_u16();
    (status, resp.bytes().await.unwrap_or_default().to_vec())
}

/// The `CDN-Loop` lines of the origin's last request to `path`.
fn seen(origin: &Origin, path: &str) -> Vec<String> {
    let log = origin.log();
    let r = log
        .iter()
        .rev()
        .find(|r| r.path == path)
        .unwrap_or_else(|| panic!("the origin saw no request for {path}"));
    r.header_all("cdn-loop")
        .into_iter()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_and_pass_through_carry_the_list_with_our_id() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&config(origin.addr(), ""));

    // A cache fill: no list received, ours alone.
    let (status, body) = get(&proxy, "/obj/100000/a", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(body, content("/obj/100000/a", 0, 0..100_000));
    assert_eq!(seen(&origin, "/obj/100000/a"), ["edgeslice"]);
    // A fill started by a request from another CDN: its list, then ours.
    let (status, _) = get(&proxy, "/obj/1000/b", &["other-cdn; x=\"1,2\""]).await;
    assert_eq!(status, 200);
    assert_eq!(
        seen(&origin, "/obj/1000/b"),
        ["other-cdn; x=\"1,2\", edgeslice"]
    );
    // Stored answers carry no CDN-Loop of anyone's, and the list is not in the key: a second
    // request with another list is a hit.
    let before = origin.requests();
    let resp = common::client()
        .get(proxy.url("/obj/1000/b"))
        .header("cdn-loop", "third")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("cdn-loop").is_none());
    assert!(
        common::header_text(resp.headers(), "cache-status").contains("hit"),
        "{:?}",
        resp.headers()
    );
    assert_eq!(origin.requests(), before);

    // Pass-through: every line received, as one list, then ours; an unclosed quote would
    // hide what follows it, so that element is not forwarded.
    let (status, _) = get(
        &proxy,
        "/download/10",
        &["a, b;p=1", "c", "d; q=\"open, edgeslice"],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(seen(&origin, "/download/10"), ["a, b;p=1, c, edgeslice"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_id_twice_is_508_before_any_origin_request() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&config(origin.addr(), ""));
    for (path, list) in [
        ("/obj/1000/x", &["edgeslice, other, EdgeSlice; p=1"][..]),
        ("/download/1000", &["edgeslice", "other, edgeslice"][..]),
    ] {
        let (status, body) = get(&proxy, path, list).await;
        assert_eq!(status, 508, "{path}");
        let text = String::from_utf8_lossy(&body);
        assert!(text.starts_with("508 loop detected"), "{text}");
    }
    assert_eq!(origin.requests(), 0);
    // Once is the normal edge → shield path.
    let (status, _) = get(&proxy, "/obj/1000/x", &["edgeslice"]).await;
    assert_eq!(status, 200);
    assert_eq!(seen(&origin, "/obj/1000/x"), ["edgeslice, edgeslice"]);
    proxy
        .assert_metric_lines(&["edgeslice_loops_detected_total 2"])
        .await;
    // Answered by edgeslice, and access-logged like any answer (the log is flushed at least
    // every 200 ms).
    let logged = |log: &str| {
        log.lines()
            .filter(|l| l.contains("GET /obj/1000/x 508") || l.contains("GET /download/1000 508"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while logged(&proxy.log()) < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(logged(&proxy.log()), 2, "{}", proxy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_cdn_id_replaces_the_default() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&config(origin.addr(), "cluster:\n  cdn_id: shield\n"));
    let (status, _) = get(&proxy, "/obj/1000/s", &["edgeslice, edgeslice"]).await;
    assert_eq!(status, 200, "another tier's id, however often, is not ours");
    assert_eq!(
        seen(&origin, "/obj/1000/s"),
        ["edgeslice, edgeslice, shield"]
    );
    let (status, _) = get(&proxy, "/obj/1000/t", &["Shield, x, shield"]).await;
    assert_eq!(status, 508);
    assert!(origin.log().iter().all(|r| r.path != "/obj/1000/t"));
}

/// Rewrite `proxy`'s upstream from `from` to `to` and reload it by SIGHUP.
async fn repoint(proxy: &Proxy, from: SocketAddr, to: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    // The reload task says when it listens; before that SIGHUP is ignored.
    while !proxy.log_contains("reload: SIGHUP or POST /reload") {
        assert!(Instant::now() < deadline, "no reload task");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let conf = proxy.dir.join("edgeslice.yaml");
    let text = std::fs::read_to_string(&conf).expect("config");
    let (from, to) = (format!("\"{from}\""), format!("\"{to}\""));
    assert!(text.contains(&from));
    std::fs::write(&conf, text.replace(&from, &to)).expect("rewrite config");
    proxy.signal(libc::SIGHUP);
    while !proxy
        .metrics()
        .await
        .contains("edgeslice_config_reloads_total{result=\"ok\"} 1")
    {
        assert!(
            Instant::now() < deadline,
            "reload not applied:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tiers_serve_and_a_loop_between_them_ends_with_508() {
    let origin = Origin::start().await;
    // edge → shield → origin, both tiers with the default id.
    let shield = Proxy::start(&config(origin.addr(), ""));
    let edge = Proxy::start(&config(shield.addr, ""));
    for path in ["/obj/300000/chain", "/download/3000"] {
        let (status, body) = get(&edge, path, &[]).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(body, content(path, 0, 0..body.len() as u64), "{path}");
        assert_eq!(seen(&origin, path), ["edgeslice, edgeslice"], "{path}");
    }

    // edge → shield → edge: the shield's upstream now points at the edge.
    repoint(&shield, origin.addr(), edge.addr).await;
    let before = origin.requests();
    for path in ["/obj/5000/loop", "/download/5000"] {
        let t0 = Instant::now();
        let (status, _) = get(&edge, path, &[]).await;
        assert_eq!(status, 508, "{path}");
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "{path}: {:?}",
            t0.elapsed()
        );
    }
    assert_eq!(origin.requests(), before);
    // The edge saw each request come back once (edgeslice twice) and stopped it there; the
    // shield never saw our id twice.
    edge.assert_metric_lines(&["edgeslice_loops_detected_total 2"])
        .await;
    shield
        .assert_metric_lines(&["edgeslice_loops_detected_total 0"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revalidations_carry_it_too() {
    let origin = Origin::start().await;
    origin.set_cache_control(Some("max-age=1"));
    let proxy = Proxy::start(&config(origin.addr(), "cluster:\n  cdn_id: edge-eu\n"));
    let (status, _) = get(&proxy, "/obj/1000/r", &[]).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, _) = get(&proxy, "/obj/1000/r", &["lower-tier"]).await;
    assert_eq!(status, 200);
    let log = origin.log();
    let conditional = log
        .iter()
        .rev()
        .find(|r| r.path == "/obj/1000/r" && r.header("if-none-match").is_some())
        .expect("a revalidation");
    assert_eq!(conditional.header_all("cdn-loop"), ["lower-tier, edge-eu"]);
}
