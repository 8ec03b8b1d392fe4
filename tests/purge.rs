//! `POST /purge` on the admin listener, seen from outside: the real binary against the
//! in-process origin, which counts the requests for every target. A purged object is fetched
//! from the origin again by the next request; every other object stays a hit. Objects are
//! 5,000 bytes (one chunk), so one origin request fetches one object whole.
//!
//! Objects are cached, then the proxy is restarted over the same disk tier before purging, so
//! the purged objects live only on disk (nothing in memory): purge must find them there.

mod common;

use common::cache_files;
use common::origin::{content, Fault, Origin};
use common::proxy::Proxy;
use common::reply::{get, records_for, send, start, within, Reply};
use reqwest::StatusCode;
use std::time::{Duration, Instant};

const TOKEN: &str = "purge-test-token";
const SIZE: u64 = 5000;
const TEST_LIMIT: Duration = Duration::from_secs(60);

/// One caching route, memory and disk tiers, an hour of stale-if-error; one try per origin
/// request and a breaker that never opens, so origin request counts are exact. `admin.token`
/// is set when `token` is (the harness writes `admin:` with `listen` just before this text).
fn config(origin: &Origin, token: Option<&str>) -> String {
    let token = token.map(|t| format!("  token: {t}\n")).unwrap_or_default();
    format!(
        "{token}cache:\n  chunk_size: 64KiB\n  stale_if_error: 1h\n  memory:\n    capacity: 64MiB\n  disk:\n    path: {{DIR}}/cache\n    capacity: 64MiB\nupstreams:\n  origin:\n    servers: [\"{}\"]\n    connect_timeout: 500ms\n    read_timeout: 2s\n    retry:\n      attempts: 1\n    circuit_breaker:\n      failure_threshold: 1000\nroutes:\n  - path_prefix: /\n    upstream: origin\n    cache: true\n",
        origin.addr()
    )
}

/// `POST /purge?<query>` on the admin listener, with `Authorization: Bearer <token>` if given.
async fn purge(proxy: &Proxy, query: &str, token: Option<&str>) -> (StatusCode, String) {
    purge_with(proxy, reqwest::Method::POST, query, token).await
}

async fn purge_with(
    proxy: &Proxy,
    method: reqwest::Method,
    query: &str,
    token: Option<&str>,
) -> (StatusCode, String) {
    let mut req =
        common::reply::client().request(method, format!("http://{}/purge?{query}", proxy.admin));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = send(req).await;
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

/// `purged <n>` from a purge with the right token.
async fn purged(proxy: &Proxy, query: &str) -> u64 {
    let (status, body) = purge(proxy, query, Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK, "purge {query}: {body}");
    body.trim()
        .strip_prefix("purged ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("purge {query}: body {body:?}"))
}

/// GET `target` (path and query) whole and check the bytes.
async fn fetch(proxy: &Proxy, target: &str) -> Reply {
    let r = send(get(proxy, target)).await;
    assert_eq!(r.status, StatusCode::OK, "GET {target}");
    let path = target.split('?').next().unwrap_or(target);
    assert!(
        r.body == content(path, 0, 0..SIZE),
        "GET {target}: bytes differ"
    );
    r
}

/// Origin requests for `target` so far.
fn origin_count(origin: &Origin, target: &str) -> usize {
    records_for(origin, target).len()
}

/// GET each target and check which ones reached the origin: exactly one request for each in
/// `refetched`, none for the others, which must be hits.
async fn check(origin: &Origin, proxy: &Proxy, targets: &[&str], refetched: &[&str]) {
    for t in targets {
        let before = origin_count(origin, t);
        let r = fetch(proxy, t).await;
        let asked = origin_count(origin, t) - before;
        if refetched.contains(t) {
            assert_eq!(
                asked,
                1,
                "{t} fetched again (cache-status {:?})",
                r.cache_status()
            );
            assert!(
                !r.cache_status().contains("hit"),
                "{t}: {}",
                r.cache_status()
            );
        } else {
            assert_eq!(
                asked,
                0,
                "{t} stays cached (cache-status {:?})",
                r.cache_status()
            );
            assert!(
                r.cache_status().contains("hit"),
                "{t}: {}",
                r.cache_status()
            );
        }
    }
}

/// Wait until the disk tier holds `files` entry files (background chunk writes done), then
/// restart the proxy over it: every object now lives only on disk.
async fn restart_from_disk(proxy: &mut Proxy, files: usize) {
    let dir = proxy.dir.join("cache");
    let deadline = Instant::now() + Duration::from_secs(10);
    while cache_files(&dir).len() < files {
        assert!(Instant::now() < deadline, "disk writes did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::task::block_in_place(|| proxy.restart());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_needs_the_token_and_a_valid_query() {
    within(TEST_LIMIT, async {
        let origin = Origin::start().await;
        let proxy = start(config(&origin, Some(TOKEN))).await;
        let target = "/obj/5000/auth/a.bin";
        fetch(&proxy, target).await;
        let q = "path=/obj/5000/auth/a.bin";

        let (status, _) = purge(&proxy, q, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "no token");
        let (status, _) = purge(&proxy, q, Some("purge-test-tokem")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "wrong token");
        let (status, _) = purge_with(&proxy, reqwest::Method::GET, q, Some(TOKEN)).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        for (bad, names) in [
            ("path=auth/a.bin", "path"),
            ("path=/a%zz", "path"),
            ("tag=a&path=/a", "path and tag"),
            ("", "path or tag"),
            ("path=/a&soft=yes", "soft"),
            ("path=/a&purge=1", "purge"),
        ] {
            let (status, body) = purge(&proxy, bad, Some(TOKEN)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}: {body}");
            assert!(body.contains(names), "{bad:?}: {body}");
        }
        // Nothing was purged by any of them.
        check(&origin, &proxy, &[target], &[]).await;
        assert_eq!(origin_count(&origin, target), 1);

        assert_eq!(purged(&proxy, q).await, 1);
        check(&origin, &proxy, &[target], &[target]).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_is_refused_without_a_configured_token() {
    within(TEST_LIMIT, async {
        let origin = Origin::start().await;
        let proxy = start(config(&origin, None)).await;
        let target = "/obj/5000/untokened.bin";
        fetch(&proxy, target).await;
        let (status, body) = purge(&proxy, "path=/obj/5000/untokened.bin", Some(TOKEN)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        check(&origin, &proxy, &[target], &[]).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_path_and_prefix_refetches_only_those() {
    within(TEST_LIMIT, async {
        let origin = Origin::start().await;
        let mut proxy = start(config(&origin, Some(TOKEN))).await;
        let a = "/obj/5000/v/a.bin";
        let a_query = "/obj/5000/v/a.bin?x=1";
        let b = "/obj/5000/v/b.bin";
        let c = "/obj/5000/w/c%20d.bin";
        let all = [a, a_query, b, c];
        for t in all {
            fetch(&proxy, t).await;
        }
        restart_from_disk(&mut proxy, 2 * all.len()).await;

        // Every query string of the path: two objects.
        assert_eq!(purged(&proxy, "path=/obj/5000/v/a.bin").await, 2);
        check(&origin, &proxy, &all, &[a, a_query]).await;

        // Restricted to another host: nothing; to the requests' host: the three under /v/.
        let prefix = "path=/obj/5000/v/&prefix=1";
        assert_eq!(
            purged(&proxy, &format!("{prefix}&host=other.example")).await,
            0
        );
        check(&origin, &proxy, &all, &[]).await;
        assert_eq!(purged(&proxy, &format!("{prefix}&host=127.0.0.1")).await, 3);
        check(&origin, &proxy, &all, &[a, a_query, b]).await;

        // Percent-encoded parameter, matched against the path as the client sent it.
        assert_eq!(
            purged(&proxy, "path=%2Fobj%2F5000%2Fw%2Fc%2520d.bin").await,
            1
        );
        check(&origin, &proxy, &all, &[c]).await;
        assert_eq!(purged(&proxy, "path=/obj/5000/w/c%20d.bin").await, 1);
        check(&origin, &proxy, &all, &[c]).await;
        assert_eq!(
            purged(&proxy, "path=/obj/5000/w/").await,
            0,
            "exact path only"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_tag_refetches_only_tagged_objects() {
    within(TEST_LIMIT, async {
        let origin = Origin::start().await;
        let mut proxy = start(config(&origin, Some(TOKEN))).await;
        let a = "/obj/5000/t/a.bin";
        let b = "/obj/5000/t/b.bin";
        let c = "/obj/5000/t/c.bin";
        let d = "/obj/5000/t/d.bin";
        let all = [a, b, c, d];
        // The origin's extra headers apply to every response: set before each fetch.
        origin.set_extra_header("Surrogate-Key", "video season-1");
        fetch(&proxy, a).await;
        origin.set_extra_header("Surrogate-Key", "video");
        fetch(&proxy, b).await;
        origin.clear_extra_headers();
        origin.set_extra_header("Cache-Tag", "Season-1, red");
        fetch(&proxy, c).await;
        origin.clear_extra_headers();
        fetch(&proxy, d).await;
        restart_from_disk(&mut proxy, 2 * all.len()).await;

        assert_eq!(purged(&proxy, "tag=season-1").await, 2);
        // Fetched again without tags now.
        check(&origin, &proxy, &all, &[a, c]).await;
        // The tags are those of the version stored now: `a` no longer carries `video`.
        assert_eq!(purged(&proxy, "tag=video").await, 1);
        check(&origin, &proxy, &all, &[b]).await;
        assert_eq!(purged(&proxy, "tag=red").await, 0);
        check(&origin, &proxy, &all, &[]).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purge_keeps_a_stale_copy_for_errors_and_revalidates() {
    within(TEST_LIMIT, async {
        let origin = Origin::start().await;
        let mut proxy = start(config(&origin, Some(TOKEN))).await;
        let soft = "/obj/5000/s/soft.bin";
        let hard = "/obj/5000/s/hard.bin";
        let other = "/obj/5000/s/other.bin";
        for t in [soft, hard, other] {
            fetch(&proxy, t).await;
        }
        restart_from_disk(&mut proxy, 6).await;

        assert_eq!(purged(&proxy, "path=/obj/5000/s/soft.bin&soft=1").await, 1);
        assert_eq!(purged(&proxy, "path=/obj/5000/s/hard.bin").await, 1);
        proxy
            .assert_metric_lines(&[
                "edgeslice_purged_objects_total{mode=\"soft\"} 1",
                "edgeslice_purged_objects_total{mode=\"hard\"} 1",
                "edgeslice_admin_calls_total{action=\"purge\",result=\"ok\"} 2",
            ])
            .await;

        origin.set_fault(Fault::Status(503));
        let before = origin_count(&origin, soft);
        let r = fetch(&proxy, soft).await;
        assert!(
            r.cache_status().contains("stale-if-error"),
            "soft-purged copy served on error: {}",
            r.cache_status()
        );
        assert_eq!(
            origin_count(&origin, soft) - before,
            1,
            "it asked the origin first"
        );
        // A hard purge left nothing to fall back on.
        let r = send(get(&proxy, hard)).await;
        assert!(r.status.is_server_error(), "hard-purged: {}", r.status);
        check(&origin, &proxy, &[other], &[]).await;

        origin.clear_fault();
        let before = records_for(&origin, soft).len();
        let r = fetch(&proxy, soft).await;
        let asked = &records_for(&origin, soft)[before..];
        assert_eq!(asked.len(), 1, "one revalidation");
        assert!(
            asked[0].header("if-none-match").is_some(),
            "a conditional request: {:?}",
            asked[0].headers
        );
        assert!(
            r.cache_status().contains("fwd=stale"),
            "revalidated: {}",
            r.cache_status()
        );
        check(&origin, &proxy, &[soft, other], &[]).await;
        check(&origin, &proxy, &[hard], &[hard]).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_path_takes_every_vary_variant() {
    within(TEST_LIMIT, async {
        let origin = Origin::start().await;
        let proxy = start(config(&origin, Some(TOKEN))).await;
        let varied = "/obj/5000/vary/a.bin";
        let other = "/obj/5000/vary/b.bin";
        let lang = |l: &'static str| get(&proxy, varied).header("accept-language", l);
        origin.set_extra_header("Vary", "Accept-Language");
        for l in ["en", "fr", "en"] {
            assert_eq!(send(lang(l)).await.status, StatusCode::OK);
        }
        origin.clear_extra_headers();
        fetch(&proxy, other).await;
        assert_eq!(origin_count(&origin, varied), 2, "one fetch per variant");

        assert_eq!(purged(&proxy, "path=/obj/5000/vary/a.bin").await, 2);
        origin.set_extra_header("Vary", "Accept-Language");
        for (l, total) in [("en", 3), ("fr", 4), ("en", 4), ("fr", 4)] {
            let r = send(lang(l)).await;
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(
                origin_count(&origin, varied),
                total,
                "{l}: {}",
                r.cache_status()
            );
        }
        check(&origin, &proxy, &[other], &[]).await;
    })
    .await
}

/// Purges of objects only the disk holds are bans that one background pass over the disk
/// applies, every ban pending when it starts at once: thirty purges sent together cost a few
/// passes, not a scan each, and each answer still counts its object. A restart in between
/// would keep them (tested in `cache::store`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_sent_together_share_passes_over_the_disk() {
    within(TEST_LIMIT, async {
        let origin = Origin::start().await;
        let mut proxy = start(config(&origin, Some(TOKEN))).await;
        let targets: Vec<String> = (0..30).map(|i| format!("/obj/5000/many/{i}.bin")).collect();
        let extra = "/obj/5000/many-kept.bin";
        for t in &targets {
            fetch(&proxy, t).await;
        }
        fetch(&proxy, extra).await;
        restart_from_disk(&mut proxy, 2 * (targets.len() + 1)).await;

        let calls: Vec<_> = targets
            .iter()
            .map(|t| {
                let url = format!("http://{}/purge?path={t}", proxy.admin);
                tokio::spawn(async move {
                    let r = send(common::reply::client().post(url).bearer_auth(TOKEN)).await;
                    (r.status, String::from_utf8_lossy(&r.body).into_owned())
                })
            })
            .collect();
        for c in calls {
            let (status, body) = c.await.expect("purge call");
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(body.trim(), "purged 1");
        }
        let stats = proxy.stats().await;
        let passes = stats["purge_passes"];
        eprintln!("30 purges sent together: {passes} passes over the disk");
        assert!(
            (1..=10).contains(&passes),
            "{passes} passes over the disk for 30 purges"
        );
        assert_eq!(stats["purges_pending"], 0, "every purge applied");
        let all: Vec<&str> = targets.iter().map(String::as_str).chain([extra]).collect();
        let refetched: Vec<&str> = targets.iter().map(String::as_str).collect();
        check(&origin, &proxy, &all, &refetched).await;
    })
    .await
}
