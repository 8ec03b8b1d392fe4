//! Reload in place, against the real binary: SIGHUP and `POST /reload` put a rewritten config
//! file in force without a restart; requests in flight finish on the config they started with;
//! the cache stays warm; a file that does not load is refused with `edgeslice -t`'s message and
//! changes nothing; keys that cannot change live are named and left as they run.

mod common;

use common::origin::{content, Fault, Origin};
use common::proxy::{free_port, Proxy};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOKEN: &str = "reload-token-1";

const OBJ_ROUTE: &str = "  - path_prefix: /obj/\n    upstream: origin\n";
const DOWNLOAD_ROUTE: &str =
    "  - path_prefix: /download/\n    upstream: origin\n    cache: false\n";
const STATUS_ROUTE: &str = "  - path_prefix: /status/\n    upstream: origin\n    cache: false\n";

/// The config below the harness's `admin: listen:` line: it starts with the admin token.
fn config(origin: &Origin, routes: &str) -> String {
    format!(
        "  token: {TOKEN}\ncache:\n  memory:\n    capacity: 64MiB\nupstreams:\n  origin:\n    servers: [\"{}\"]\n    connect_timeout: 500ms\n    read_timeout: 5s\nroutes:\n{routes}",
        origin.addr()
    )
}

fn conf_path(proxy: &Proxy) -> PathBuf {
    proxy.dir.join("edgeslice.yaml")
}

/// Rewrite the proxy's config file, replacing the first `from` by `to`.
fn edit_config(proxy: &Proxy, from: &str, to: &str) {
    let text = std::fs::read_to_string(conf_path(proxy)).expect("read config");
    assert!(text.contains(from), "{from:?} not in the config:\n{text}");
    std::fs::write(conf_path(proxy), text.replacen(from, to, 1)).expect("write config");
}

async fn get(proxy: &Proxy, path: &str) -> (u16, String, Vec<u8>) {
    let resp = common::client()
        .get(proxy.url(path))
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let cache_status = common::header_text(resp.headers(), "cache-status");
    let body = resp.bytes().await.expect("body").to_vec();
    (status, cache_status, body)
}

async fn post_reload(proxy: &Proxy, token: Option<&str>) -> (u16, String) {
    let mut req = common::client().post(format!("http://{}/reload", proxy.admin));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("POST /reload");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("/reload body"))
}

fn origin_saw(origin: &Origin, path: &str) -> usize {
    origin.log().iter().filter(|r| r.path == path).count()
}

/// Log lines containing `needle`.
fn log_lines(proxy: &Proxy, needle: &str) -> usize {
    proxy.log().lines().filter(|l| l.contains(needle)).count()
}

const IN_FORCE: &str = " in force: ";
const REFUSED: &str = "reload refused";

/// Wait until the log has `n` lines with `needle`.
fn wait_log_lines(proxy: &Proxy, needle: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while log_lines(proxy, needle) < n {
        assert!(
            Instant::now() < deadline,
            "never {n} lines with {needle:?}; log:\n{}",
            proxy.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sighup(proxy: &Proxy) {
    // The reload task says when it listens; before that SIGHUP is ignored.
    assert!(
        proxy.log_contains("reload: SIGHUP or POST /reload"),
        "{}",
        proxy.log()
    );
    // SAFETY: kill(2) on the child this test started.
    let rc = unsafe { libc::kill(proxy.pid() as i32, libc::SIGHUP) };
    assert_eq!(rc, 0, "kill -HUP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_route_comes_with_sighup_and_post_reload_and_the_cache_stays_warm() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&config(&origin, OBJ_ROUTE));
    let warm = "/obj/300000/warm.bin";
    let (status, _, body) = get(&proxy, warm).await;
    assert_eq!(status, 200);
    assert!(body == content(warm, 0, 0..300_000), "warm object bytes");
    let (_, cache_status, _) = get(&proxy, warm).await;
    assert!(cache_status.contains("hit"), "{cache_status}");
    let warm_fetches = origin_saw(&origin, warm);

    // No route for /download/ yet: the proxy answers 404 itself.
    assert_eq!(get(&proxy, "/download/1000").await.0, 404);
    assert_eq!(origin_saw(&origin, "/download/1000"), 0);

    edit_config(&proxy, OBJ_ROUTE, &format!("{OBJ_ROUTE}{DOWNLOAD_ROUTE}"));
    sighup(&proxy);
    wait_log_lines(&proxy, IN_FORCE, 1);
    let (status, _, body) = get(&proxy, "/download/1000").await;
    assert_eq!(status, 200);
    assert!(body == content("/download/1000", 0, 0..1000));
    // Same cache instance, nothing dropped: still a hit, no new origin request.
    let (status, cache_status, body) = get(&proxy, warm).await;
    assert_eq!(status, 200);
    assert!(cache_status.contains("hit"), "{cache_status}");
    assert!(body == content(warm, 0, 0..300_000));
    assert_eq!(origin_saw(&origin, warm), warm_fetches);

    // POST /reload: only with the token.
    edit_config(
        &proxy,
        DOWNLOAD_ROUTE,
        &format!("{DOWNLOAD_ROUTE}{STATUS_ROUTE}"),
    );
    assert_eq!(post_reload(&proxy, None).await.0, 401);
    assert_eq!(post_reload(&proxy, Some("not-the-token")).await.0, 401);
    assert_eq!(
        get(&proxy, "/status/203").await.0,
        404,
        "reloaded without the token"
    );
    assert_eq!(
        post_reload(&proxy, Some(TOKEN)).await,
        (200, "reloaded\n".to_string())
    );
    assert_eq!(get(&proxy, "/status/203").await.0, 203);
    let (_, cache_status, _) = get(&proxy, warm).await;
    assert!(cache_status.contains("hit"), "{cache_status}");
    assert_eq!(origin_saw(&origin, warm), warm_fetches);

    // admin.token itself is live: the next call needs the new one.
    edit_config(&proxy, TOKEN, "reload-token-2");
    assert_eq!(post_reload(&proxy, Some(TOKEN)).await.0, 200);
    assert_eq!(post_reload(&proxy, Some(TOKEN)).await.0, 401);
    assert_eq!(post_reload(&proxy, Some("reload-token-2")).await.0, 200);
}

/// Downloads `path` in a task, counting the bytes received so far in `progress`.
fn download(
    proxy: &Proxy,
    path: &str,
    progress: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<(u16, Vec<u8>)> {
    let url = proxy.url(path);
    tokio::spawn(async move {
        let mut resp = common::client().get(url).send().await.expect("request");
        let status = resp.status().as_u16();
        let mut body = Vec::new();
        while let Some(piece) = resp.chunk().await.expect("body piece") {
            body.extend_from_slice(&piece);
            progress.store(body.len() as u64, Ordering::Relaxed);
        }
        (status, body)
    })
}

async fn wait_progress(progress: &[&AtomicU64], at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while progress
        .iter()
        .any(|p| p.load(Ordering::Relaxed) < at_least)
    {
        assert!(
            Instant::now() < deadline,
            "downloads stalled below {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first wrong byte at {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_in_flight_finish_on_their_config_across_two_reloads() {
    let origin = Origin::start().await;
    let routes = format!("{OBJ_ROUTE}{DOWNLOAD_ROUTE}");
    let proxy = Proxy::start(&config(&origin, &routes));
    // 6 MiB at 1 MiB/s from the origin: each download spans both reloads.
    const SIZE: u64 = 6 << 20;
    origin.set_fault(Fault::Slow {
        bytes_per_sec: 1 << 20,
    });
    let cached = format!("/obj/{SIZE}/big.bin");
    let passed = format!("/download/{SIZE}");
    let (p1, p2) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let d1 = download(&proxy, &cached, p1.clone());
    let d2 = download(&proxy, &passed, p2.clone());
    wait_progress(&[&p1, &p2], 1 << 20).await;

    // Reload 1: the upstream changes (a new pool), a route is added.
    edit_config(&proxy, "read_timeout: 5s", "read_timeout: 6s");
    edit_config(
        &proxy,
        DOWNLOAD_ROUTE,
        &format!("{DOWNLOAD_ROUTE}{STATUS_ROUTE}"),
    );
    assert_eq!(
        post_reload(&proxy, Some(TOKEN)).await,
        (200, "reloaded\n".to_string())
    );
    assert!(p1.load(Ordering::Relaxed) < SIZE && p2.load(Ordering::Relaxed) < SIZE);
    wait_progress(&[&p1, &p2], 3 << 20).await;

    // Reload 2 (SIGHUP): the downloads' own routes are gone.
    edit_config(&proxy, &routes, "");
    sighup(&proxy);
    wait_log_lines(&proxy, IN_FORCE, 2);
    assert_eq!(get(&proxy, "/status/203").await.0, 203);
    assert!(
        p1.load(Ordering::Relaxed) < SIZE && p2.load(Ordering::Relaxed) < SIZE,
        "a download ended before the second reload"
    );

    let (status, body) = d1.await.expect("cached download");
    assert_eq!(status, 200);
    assert_same(&body, &content(&cached, 0, 0..SIZE), "cached download");
    let (status, body) = d2.await.expect("pass-through download");
    assert_eq!(status, 200);
    assert_same(
        &body,
        &content(&passed, 0, 0..SIZE),
        "pass-through download",
    );

    // The new config was in force all along for new requests: those routes are gone.
    let seen = origin_saw(&origin, &passed);
    assert_eq!(get(&proxy, &passed).await.0, 404);
    assert_eq!(get(&proxy, &cached).await.0, 404);
    assert_eq!(origin_saw(&origin, &passed), seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_is_refused_with_the_check_message_and_the_old_config_serves() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&config(&origin, OBJ_ROUTE));
    assert_eq!(get(&proxy, "/obj/1000/a").await.0, 200);

    edit_config(&proxy, "    upstream: origin\n", "    upstream: nowhere\n");
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_edgeslice"))
        .arg("-t")
        .arg("-c")
        .arg(conf_path(&proxy))
        .output()
        .expect("edgeslice -t");
    assert!(!check.status.success());
    let message = String::from_utf8(check.stderr).expect("utf-8");
    assert!(message.contains("routes[0].upstream (line"), "{message}");

    let (status, answer) = post_reload(&proxy, Some(TOKEN)).await;
    assert_eq!(status, 422);
    assert_eq!(answer, message);
    // The old route still reaches the origin.
    let (status, _, body) = get(&proxy, "/obj/2000/b").await;
    assert_eq!(status, 200);
    assert!(body == content("/obj/2000/b", 0, 0..2000));
    assert_eq!(origin_saw(&origin, "/obj/2000/b"), 1);

    // SIGHUP with the same file: logged, and still serving.
    sighup(&proxy);
    wait_log_lines(&proxy, REFUSED, 2);
    assert!(proxy.log().contains(message.trim_end()), "{}", proxy.log());
    assert_eq!(get(&proxy, "/obj/3000/c").await.0, 200);
    assert_eq!(log_lines(&proxy, IN_FORCE), 0);

    // Fixed, it loads.
    edit_config(&proxy, "    upstream: nowhere\n", "    upstream: origin\n");
    assert_eq!(post_reload(&proxy, Some(TOKEN)).await.0, 200);

    // Operators see both refusals (POST and SIGHUP) and the success.
    proxy
        .assert_metric_lines(&[
            "edgeslice_config_reloads_total{result=\"error\"} 2",
            "edgeslice_config_reloads_total{result=\"ok\"} 1",
            "edgeslice_admin_calls_total{action=\"reload\",result=\"error\"} 1",
            "edgeslice_admin_calls_total{action=\"reload\",result=\"ok\"} 1",
        ])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_cannot_change_live_are_named_and_left_as_they_run() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&config(&origin, OBJ_ROUTE));
    let capacity = proxy.stats().await["cache_memory_capacity_bytes"];
    assert_eq!(capacity, 64 << 20);

    let elsewhere = format!("127.0.0.1:{}", free_port());
    edit_config(
        &proxy,
        &format!("  - {}\n", proxy.addr),
        &format!("  - {elsewhere}\n"),
    );
    edit_config(&proxy, "capacity: 64MiB", "capacity: 32MiB");
    // A live change in the same file is applied all the same.
    edit_config(&proxy, OBJ_ROUTE, &format!("{OBJ_ROUTE}{DOWNLOAD_ROUTE}"));
    let (status, answer) = post_reload(&proxy, Some(TOKEN)).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.starts_with("reloaded\n"), "{answer}");
    let named = answer.lines().nth(1).unwrap_or("");
    assert!(
        named.contains("listen") && named.contains("cache.memory.capacity"),
        "{answer}"
    );
    assert!(!named.contains("routes"), "{answer}");
    assert!(
        proxy.log_contains("not applied (not live; restart, or upgrade gracefully with -u): listen, cache.memory.capacity"),
        "{}",
        proxy.log()
    );

    // Left as they run: the old listener, the old cache size.
    assert_eq!(get(&proxy, "/download/1000").await.0, 200);
    assert!(std::net::TcpStream::connect(&elsewhere).is_err());
    assert_eq!(proxy.stats().await["cache_memory_capacity_bytes"], capacity);

    // Named again on SIGHUP (the file still differs from what runs).
    sighup(&proxy);
    wait_log_lines(&proxy, IN_FORCE, 2);
    wait_log_lines(&proxy, "not applied (not live", 2);
}

/// Wait until the origin has seen `n` requests for `path`.
async fn wait_origin(origin: &Origin, path: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while origin_saw(origin, path) < n {
        assert!(
            Instant::now() < deadline,
            "the origin saw {} of {n} requests for {path}",
            origin_saw(origin, path)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_follow_the_reloaded_upstreams() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&config(&origin, OBJ_ROUTE));
    let checked = |path: &str| {
        format!(
            "    read_timeout: 5s\n    health_check:\n      path: {path}\n      interval: 50ms\n"
        )
    };
    // Added by a reload: the new pool is checked.
    edit_config(&proxy, "    read_timeout: 5s\n", &checked("/obj/1/first"));
    assert_eq!(post_reload(&proxy, Some(TOKEN)).await.0, 200);
    wait_origin(&origin, "/obj/1/first", 3).await;

    // Changed: the new pool is checked and the replaced one no longer is. The new loop's
    // checks are the clock: ten more of them, and at most one more of the old (one may have
    // been under way at the swap).
    edit_config(&proxy, "/obj/1/first", "/obj/1/second");
    assert_eq!(post_reload(&proxy, Some(TOKEN)).await.0, 200);
    wait_origin(&origin, "/obj/1/second", 1).await;
    let first = origin_saw(&origin, "/obj/1/first");
    let second = origin_saw(&origin, "/obj/1/second");
    wait_origin(&origin, "/obj/1/second", second + 10).await;
    assert!(
        origin_saw(&origin, "/obj/1/first") <= first + 1,
        "the replaced pool is still health-checked"
    );

    // An unchanged reload keeps the pool and its loop.
    assert_eq!(post_reload(&proxy, Some(TOKEN)).await.0, 200);
    assert!(
        proxy.log_contains("1 kept and 0 new (1 health-checked)"),
        "{}",
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_policy_reloads_over_the_same_stored_objects() {
    let origin = Origin::start().await;
    let yaml = config(&origin, OBJ_ROUTE).replace("cache:\n", "cache:\n  max_ranges: 1\n");
    let proxy = Proxy::start(&yaml);
    let path = "/obj/100000/ranges.bin";
    let two_ranges = || async {
        let resp = common::client()
            .get(proxy.url(path))
            .header("range", "bytes=0-9,20-29")
            .send()
            .await
            .expect("request");
        let h = resp.headers().clone();
        let text = |n: &str| common::header_text(&h, n);
        (
            resp.status().as_u16(),
            text("content-type"),
            text("cache-status"),
        )
    };
    let (status, _, body) = get(&proxy, path).await;
    assert_eq!(status, 200);
    assert!(body == content(path, 0, 0..100_000));
    // Over cache.max_ranges: the whole object.
    let (status, _, cache_status) = two_ranges().await;
    assert_eq!(status, 200);
    assert!(cache_status.contains("hit"), "{cache_status}");
    let fetched = origin_saw(&origin, path);

    edit_config(&proxy, "max_ranges: 1", "max_ranges: 4");
    assert_eq!(
        post_reload(&proxy, Some(TOKEN)).await,
        (200, "reloaded\n".to_string())
    );
    let (status, content_type, cache_status) = two_ranges().await;
    assert_eq!(status, 206);
    assert!(
        content_type.starts_with("multipart/byteranges"),
        "{content_type}"
    );
    assert!(cache_status.contains("hit"), "{cache_status}");
    assert_eq!(origin_saw(&origin, path), fetched);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_asked_at_once_run_one_at_a_time() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&config(&origin, OBJ_ROUTE));
    edit_config(&proxy, OBJ_ROUTE, &format!("{OBJ_ROUTE}{DOWNLOAD_ROUTE}"));
    sighup(&proxy);
    let answers =
        futures::future::join_all((0..12).map(|_| post_reload(&proxy, Some(TOKEN)))).await;
    // Each is done whole or refused at once (queue full): never a failure or a mix.
    let done = answers.iter().filter(|(s, _)| *s == 200).count();
    for (status, body) in &answers {
        assert!(
            (*status == 200 && body == "reloaded\n") || *status == 503,
            "{status} {body}"
        );
    }
    assert!(done >= 1, "{answers:?}");
    // The SIGHUP's reload and each answered one: one "in force" line each.
    wait_log_lines(&proxy, IN_FORCE, done + 1);
    assert_eq!(log_lines(&proxy, IN_FORCE), done + 1, "{}", proxy.log());
    assert_eq!(log_lines(&proxy, "reloading "), done + 1);
    // Each reload's start and end are next to each other in the log.
    let log = proxy.log();
    let steps: Vec<bool> = log
        .lines()
        .filter(|l| l.contains("reloading ") || l.contains(IN_FORCE))
        .map(|l| l.contains(IN_FORCE))
        .collect();
    for pair in steps.chunks(2) {
        assert_eq!(pair, [false, true], "interleaved reloads:\n{log}");
    }
    assert_eq!(get(&proxy, "/download/1000").await.0, 200);
}
