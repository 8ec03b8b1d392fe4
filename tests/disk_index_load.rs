//! Issue 23, point 1: the disk tier's index loads in the background, from a snapshot after a
//! clean shutdown (SIGTERM) and by a scan after a crash (SIGKILL), on the real binary. Every
//! answer has the exact bytes, whether the index has loaded or not; once it has, everything on
//! disk is served without an origin request. (Serving while the load is held back is shown by
//! the gated unit test `cache::disk::tests::while_the_index_loads_reads_puts_and_removes_are_right`;
//! start-up times are measured by `benches/disk_scale.sh`.)

mod common;

use common::origin::{content, Origin};
use common::proxy::Proxy;
use std::time::{Duration, Instant};

const KIB: u64 = 1024;
const OBJECTS: usize = 24;
const SIZE: u64 = 256 * KIB;
/// 64 KiB chunks: four chunks and a metadata entry per object.
const ENTRIES: u64 = OBJECTS as u64 * 5;

fn config(origin: &Origin) -> String {
    format!(
        "cache:\n  chunk_size: 64KiB\n  memory:\n    capacity: 1MiB\n  disk:\n    path: {{DIR}}/cache\n    capacity: 256MiB\nupstreams:\n  origin:\n    servers: [\"{}\"]\n    connect_timeout: 500ms\n    read_timeout: 5s\nroutes:\n  - path_prefix: /\n    upstream: origin\n",
        origin.addr()
    )
}

fn paths() -> Vec<String> {
    (0..OBJECTS)
        .map(|i| format!("/obj/{SIZE}/loaded-{i}.bin"))
        .collect()
}

/// Every object, concurrently: 200 and the exact bytes, never an error.
async fn fetch_all(proxy: &Proxy, what: &str) {
    let tasks: Vec<_> = paths()
        .into_iter()
        .map(|path| {
            let url = proxy.url(&path);
            tokio::spawn(async move {
                let resp = common::client().get(&url).send().await.expect("request");
                let status = resp.status().as_u16();
                let body = resp.bytes().await.expect("body");
                (path, status, body)
            })
        })
        .collect();
    for t in tasks {
        let (path, status, body) = t.await.expect("task");
        assert_eq!(status, 200, "{what}: {path}");
        assert!(
            body[..] == content(&path, 0, 0..SIZE)[..],
            "{what}: {path}: wrong bytes"
        );
    }
}

/// Fill every object and wait until the disk tier has indexed all their entries. A chunk copy
/// is skipped when the disk's write queue is full (96 chunks are written at once here): the
/// objects are asked for again until every entry is on disk (a partial hit fills the rest).
async fn fill(proxy: &Proxy) {
    let mut last = 0;
    for _ in 0..5 {
        fetch_all(proxy, "filling").await;
        // Until the writes in flight have landed: the count stops moving.
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = proxy.stats().await["cache_disk_entries"];
            if now == ENTRIES {
                return;
            }
            if now == last {
                break;
            }
            last = now;
        }
    }
    panic!("disk entries after five rounds: {last} of {ENTRIES}");
}

/// Wait for `/readyz` to say ready; returns what it said before (503s while loading).
async fn wait_ready(proxy: &Proxy) -> Vec<(u16, String)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let (status, body) = proxy.readyz().await;
        if status == 200 {
            assert_eq!(body, "ready\n");
            return seen;
        }
        assert_eq!(status, 503, "{body}");
        assert!(body.starts_with("loading the disk index"), "{body}");
        seen.push((status, body));
        assert!(Instant::now() < deadline, "never ready:\n{}", proxy.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// After the load, everything is on disk: no origin request, and the figures say so.
async fn all_from_disk(proxy: &Proxy, origin: &Origin, what: &str) {
    origin.reset_stats();
    fetch_all(proxy, what).await;
    assert_eq!(origin.requests(), 0, "{what}: {:?}", origin.log());
    let stats = proxy.stats().await;
    assert_eq!(stats["cache_disk_entries"], ENTRIES, "{stats:?}");
    assert_eq!(stats["cache_disk_index_loading"], 0);
    assert!(stats["cache_disk_index_resident_bytes"] > 0);
    proxy
        .assert_metric_lines(&[
            "edgeslice_cache_disk_index_loading 0",
            &format!("edgeslice_cache_disk_entries {ENTRIES}"),
        ])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_leaves_a_snapshot_that_the_next_start_loads() {
    let origin = Origin::start().await;
    let mut proxy = Proxy::start(&config(&origin));
    let dir = proxy.dir.join("cache");
    wait_ready(&proxy).await;
    fill(&proxy).await;
    proxy.terminate();
    assert!(
        proxy.log().contains("index snapshot written: 120 entries"),
        "{}",
        proxy.log()
    );
    assert!(dir.join("EDGESLICE-CACHE.index").exists());

    proxy.restart();
    // Served from the first request, with the exact bytes, loaded or not.
    fetch_all(&proxy, "right after the start").await;
    wait_ready(&proxy).await;
    assert!(
        proxy.log_contains("index loaded from its snapshot"),
        "{}",
        proxy.log()
    );
    assert!(
        !dir.join("EDGESLICE-CACHE.index").exists(),
        "a snapshot is trusted once: a crash later must not find it"
    );
    all_from_disk(&proxy, &origin, "after a clean restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_kill_the_index_is_rebuilt_by_a_scan_while_serving() {
    let origin = Origin::start().await;
    let mut proxy = Proxy::start(&config(&origin));
    wait_ready(&proxy).await;
    fill(&proxy).await;

    proxy.restart(); // SIGKILL: no snapshot
    fetch_all(&proxy, "right after the start").await;
    wait_ready(&proxy).await;
    let log = proxy.log();
    assert!(log.contains("no index snapshot"), "{log}");
    assert!(proxy.log_contains("index loaded from a scan of the files"));
    all_from_disk(&proxy, &origin, "after a kill and a scan").await;

    // A clean shutdown now writes a snapshot again, and the start after it uses it.
    proxy.terminate();
    proxy.restart();
    wait_ready(&proxy).await;
    assert!(proxy.log_contains("index loaded from its snapshot"));
    all_from_disk(&proxy, &origin, "after the next clean restart").await;
}
