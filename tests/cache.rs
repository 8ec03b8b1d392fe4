//! The chunk cache seen from outside: origin cost of cold and warm ranges, coalescing,
//! restarts after SIGKILL, corrupt files, capacity bounds, version changes, range-ignoring and
//! chunked origins, and a randomized comparison of ranges against the origin's bytes.

mod common;

use common::cache_files;
use common::origin::{content, Fault, Origin};
use common::proxy::Proxy;
use reqwest::StatusCode;
use std::time::{Duration, Instant};

const CHUNK: u64 = 64 * 1024;

fn config(origin: &Origin, memory: &str, disk: &str) -> String {
    format!(
        "cache:\n  chunk_size: 64KiB\n  memory:\n    capacity: {memory}\n  disk:\n    path: {{DIR}}/cache\n    capacity: {disk}\nupstreams:\n  origin:\n    servers: [\"{}\"]\n    connect_timeout: 500ms\n    read_timeout: 2s\nroutes:\n  - path_prefix: /\n    upstream: origin\n    cache: true\n",
        origin.addr()
    )
}

async fn get(
    proxy: &Proxy,
    path: &str,
    range: Option<&str>,
) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
    let mut req = common::client().get(proxy.url(path));
    if let Some(r) = range {
        req = req.header("range", r);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
    (status, headers, body)
}

fn cache_status(h: &reqwest::header::HeaderMap) -> String {
    common::header_text(h, "cache-status")
}

/// Wait until the disk tier holds at least `n` files (writes are asynchronous).
fn wait_for_files(dir: &std::path::Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cache_files(dir).len() >= n {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "disk tier never reached {n} files (has {})",
        cache_files(dir).len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_range_in_cold_object_costs_one_chunk() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&config(&origin, "64MiB", "64MiB"));
    let size = 64 * CHUNK;
    let path = format!("/obj/{size}/mid.bin");
    let start = 40 * CHUNK + 1000;
    let (status, h, body) = get(
        &proxy,
        &path,
        Some(&format!("bytes={}-{}", start, start + 99)),
    )
    .await;
    assert_eq!(status, 206);
    assert_eq!(body, content(&path, 0, start..start + 100));
    assert_eq!(
        h["content-range"],
        format!("bytes {}-{}/{size}", start, start + 99).as_str()
    );
    assert_eq!(origin.requests(), 1, "{:?}", origin.log());
    assert!(
        origin.body_bytes_sent() <= CHUNK,
        "origin sent {} bytes",
        origin.body_bytes_sent()
    );
    assert!(
        cache_status(&h).contains("fwd=miss"),
        "{}",
        cache_status(&h)
    );
    // Warm: the same range again costs nothing and is a hit.
    let (status, h, body2) = get(
        &proxy,
        &path,
        Some(&format!("bytes={}-{}", start, start + 99)),
    )
    .await;
    assert_eq!((status, body2), (StatusCode::PARTIAL_CONTENT, body));
    assert_eq!(origin.requests(), 1);
    assert_eq!(cache_status(&h), "edgeslice; hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_clients_share_fetches() {
    let origin = Origin::start().await;
    // A slow origin keeps the fetch in flight while every client arrives.
    origin.set_fault(Fault::Slow {
        bytes_per_sec: 2 * 1024 * 1024,
    });
    let proxy = Proxy::start(&config(&origin, "64MiB", "64MiB"));
    let size = 16 * CHUNK;
    let path = format!("/obj/{size}/shared.bin");
    let (a, b) = (2 * CHUNK, 6 * CHUNK - 1);
    let range = format!("bytes={a}-{b}");
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let url = proxy.url(&path);
        let range = range.clone();
        tasks.push(tokio::spawn(async move {
            let resp = common::client()
                .get(url)
                .header("range", range)
                .send()
                .await
                .unwrap();
            (resp.status(), resp.bytes().await.unwrap().to_vec())
        }));
    }
    let want = content(&path, 0, a..b + 1);
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 206);
        assert!(body == want, "a client got wrong bytes");
    }
    assert_eq!(
        origin.body_bytes_sent(),
        4 * CHUNK,
        "exactly the 4 chunks were fetched once: {:?}",
        origin
            .log()
            .iter()
            .map(|r| r.header("range").map(str::to_string))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_ranges_survive_sigkill_without_origin_requests() {
    let origin = Origin::start().await;
    let mut proxy = Proxy::start(&config(&origin, "64MiB", "64MiB"));
    let size = 8 * CHUNK + 123;
    let path = format!("/obj/{size}/restart.bin");
    let (status, _, body) = get(&proxy, &path, None).await;
    assert_eq!(status, 200);
    assert!(body == content(&path, 0, 0..size));
    // 9 chunks + 1 metadata entry.
    wait_for_files(&proxy.dir.join("cache"), 10);
    proxy.restart(); // SIGKILL, then start over the same directory
    origin.reset_stats();
    for r in [
        "bytes=0-99",
        "bytes=100000-300000",
        "bytes=-500",
        "bytes=524288-",
    ] {
        let (status, h, body) = get(&proxy, &path, Some(r)).await;
        assert_eq!(status, 206, "{r}");
        assert_eq!(cache_status(&h), "edgeslice; hit", "{r}");
        let cr = h["content-range"].to_str().unwrap().to_string();
        let (a, b) = cr
            .trim_start_matches("bytes ")
            .split('/')
            .next()
            .unwrap()
            .split_once('-')
            .unwrap();
        let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
        assert!(body == content(&path, 0, a..b + 1), "{r}");
    }
    let (_, _, body) = get(&proxy, &path, None).await;
    assert!(body == content(&path, 0, 0..size));
    assert_eq!(origin.requests(), 0, "{:?}", origin.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_and_truncated_chunk_files_are_refetched() {
    let origin = Origin::start().await;
    let mut proxy = Proxy::start(&config(&origin, "64MiB", "64MiB"));
    let size = 4 * CHUNK;
    let path = format!("/obj/{size}/corrupt.bin");
    let (_, _, body) = get(&proxy, &path, None).await;
    assert!(body == content(&path, 0, 0..size));
    let dir = proxy.dir.join("cache");
    wait_for_files(&dir, 5);
    proxy.kill();
    // Flip a byte near the end of every big (chunk) file; truncate one of them.
    let mut chunk_files: Vec<_> = cache_files(&dir)
        .into_iter()
        .filter(|p| {
            std::fs::metadata(p)
                .map(|m| m.len() > CHUNK)
                .unwrap_or(false)
        })
        .collect();
    chunk_files.sort();
    assert_eq!(chunk_files.len(), 4);
    for (i, f) in chunk_files.iter().enumerate() {
        let mut data = std::fs::read(f).unwrap();
        if i == 0 {
            data.truncate(data.len() - 10);
        } else {
            let n = data.len();
            data[n - 7] ^= 0xff;
        }
        std::fs::write(f, data).unwrap();
    }
    proxy.restart();
    origin.reset_stats();
    let (status, _, body) = get(&proxy, &path, None).await;
    assert_eq!(status, 200);
    assert!(
        body == content(&path, 0, 0..size),
        "corrupt bytes were served"
    );
    assert!(
        origin.requests() >= 1,
        "the corrupted chunks were refetched"
    );
    // The origin counts a write once it returns, which can be after the proxy has passed the
    // bytes on: let the count settle before comparing.
    let settle = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while origin.body_bytes_sent() < size && std::time::Instant::now() < settle {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        origin.body_bytes_sent(),
        size,
        "every damaged chunk was fetched again, once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_disk_stay_within_capacity() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&config(&origin, "2MiB", "4MiB"));
    let dir = proxy.dir.join("cache");
    // 16 MiB through: 8x memory, 4x disk.
    for i in 0..32 {
        let size = 8 * CHUNK;
        let path = format!("/obj/{size}/fill-{i}.bin");
        let (status, _, body) = get(&proxy, &path, None).await;
        assert_eq!(status, 200);
        assert!(body == content(&path, 0, 0..size));
        let s = proxy.stats().await;
        assert!(
            s["cache_memory_bytes"] <= 2 << 20,
            "memory {}",
            s["cache_memory_bytes"]
        );
        assert!(
            s["cache_disk_bytes"] <= 4 << 20,
            "disk {}",
            s["cache_disk_bytes"]
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let on_disk: u64 = cache_files(&dir)
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    assert!(on_disk <= 4 << 20, "files on disk: {on_disk} bytes");
    assert!(
        on_disk > 1 << 20,
        "the disk tier is in use: {on_disk} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etag_change_mid_object_never_mixes_versions() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&config(&origin, "64MiB", "64MiB"));
    let size = 8 * CHUNK;
    let path = format!("/obj/{size}/version.bin");
    // Warm the first two chunks with version 0.
    let (status, _, _) = get(&proxy, &path, Some(&format!("bytes=0-{}", 2 * CHUNK - 1))).await;
    assert_eq!(status, 206);
    origin.set_etag_version(1);
    // The whole object now needs chunks 2..8 from an origin that has moved on.
    let resp = common::client().get(proxy.url(&path)).send().await.unwrap();
    let body = resp.bytes().await.map(|b| b.to_vec());
    let v0 = content(&path, 0, 0..size);
    let v1 = content(&path, 1, 0..size);
    match body {
        Ok(b) if b.len() as u64 == size => {
            assert!(b == v0 || b == v1, "a complete body mixed versions")
        }
        Ok(b) => assert!(
            v0.starts_with(&b) || v1.starts_with(&b),
            "a truncated body mixed versions"
        ),
        Err(_) => {} // aborted mid-body: acceptable, never wrong bytes
    }
    // After the change, clients get the new version, whole and exact.
    let (status, _, b) = get(&proxy, &path, None).await;
    assert_eq!(status, 200);
    assert!(b == v1, "the new version is served after the change");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_ignoring_range_works_and_is_cached() {
    let origin = Origin::start().await;
    origin.set_fault(Fault::IgnoreRange);
    let proxy = Proxy::start(&config(&origin, "64MiB", "64MiB"));
    let size = 5 * CHUNK + 7;
    let path = format!("/obj/{size}/norange.bin");
    let (status, _, body) = get(&proxy, &path, Some("bytes=100000-100099")).await;
    assert_eq!(status, 206);
    assert!(body == content(&path, 0, 100_000..100_100));
    let (status, _, body) = get(&proxy, &path, None).await;
    assert_eq!(status, 200);
    assert!(body == content(&path, 0, 0..size));
    assert_eq!(
        origin.requests(),
        1,
        "the whole body was split into chunks as it passed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_origin_without_length_works_and_is_cached() {
    let origin = Origin::start().await;
    origin.set_fault(Fault::ChunkedNoLength);
    let proxy = Proxy::start(&config(&origin, "64MiB", "64MiB"));
    let size = 3 * CHUNK + 5;
    let path = format!("/obj/{size}/chunked.bin");
    // Concurrent cold clients: one streams the origin's body as it arrives, the others wait
    // for it to be cached; the origin is asked once.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = proxy.url(&path);
        tasks.push(tokio::spawn(async move {
            let resp = common::client().get(url).send().await.unwrap();
            (resp.status(), resp.bytes().await.unwrap().to_vec())
        }));
    }
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200);
        assert!(body == content(&path, 0, 0..size));
    }
    let (status, h, body) = get(&proxy, &path, Some("bytes=-10")).await;
    assert_eq!(status, 206);
    assert_eq!(cache_status(&h), "edgeslice; hit");
    assert!(body == content(&path, 0, size - 10..size));
    assert_eq!(origin.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_semantics_edge_cases() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&config(&origin, "64MiB", "64MiB"));
    let size = 3 * CHUNK;
    let path = format!("/obj/{size}/edges.bin");
    let (s, h, _) = get(&proxy, &path, Some(&format!("bytes={size}-"))).await;
    assert_eq!(s, 416);
    assert_eq!(h["content-range"], format!("bytes */{size}").as_str());
    let (s, h, b) = get(&proxy, &path, Some("bytes=10-999999999")).await;
    assert_eq!(s, 206);
    assert_eq!(
        h["content-range"],
        format!("bytes 10-{}/{size}", size - 1).as_str()
    );
    assert!(b == content(&path, 0, 10..size));
    let (s, _, b) = get(&proxy, &path, Some("items=0-5")).await;
    assert_eq!(
        (s, b.len() as u64),
        (StatusCode::OK, size),
        "unknown units are ignored"
    );
    let (s, _, b) = get(&proxy, &path, Some("bytes=5-1")).await;
    assert_eq!(
        (s, b.len() as u64),
        (StatusCode::OK, size),
        "invalid ranges are ignored"
    );
    // Range amplification: more than max_ranges, or overlapping beyond the length → 200.
    let many: Vec<String> = (0..20)
        .map(|i| format!("{}-{}", i * 10, i * 10 + 5))
        .collect();
    let (s, _, b) = get(&proxy, &path, Some(&format!("bytes={}", many.join(",")))).await;
    assert_eq!((s, b.len() as u64), (StatusCode::OK, size));
    let (s, _, _) = get(&proxy, &path, Some("bytes=0-,0-,0-")).await;
    assert_eq!(s, 200);
    // HEAD carries the headers, no body.
    let resp = common::client()
        .head(proxy.url(&path))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], size.to_string().as_str());
    // If-Range: a matching strong ETag keeps the range, another one gets the whole object.
    let etag = resp.headers()["etag"].to_str().unwrap().to_string();
    let r = common::client()
        .get(proxy.url(&path))
        .header("range", "bytes=0-9")
        .header("if-range", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    let r = common::client()
        .get(proxy.url(&path))
        .header("range", "bytes=0-9")
        .header("if-range", "\"other\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Conditional GET.
    let r = common::client()
        .get(proxy.url(&path))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(
        r.headers().get("etag").map(|v| v.to_str().unwrap()),
        Some(etag.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncacheable_responses_pass_through() {
    let origin = Origin::start().await;
    origin.set_cache_control(Some("no-store"));
    let proxy = Proxy::start(&config(&origin, "64MiB", "64MiB"));
    let path = format!("/obj/{}/private.bin", 2 * CHUNK);
    for _ in 0..3 {
        let (s, h, b) = get(&proxy, &path, Some("bytes=5-9")).await;
        assert_eq!(s, 206);
        assert_eq!(b, content(&path, 0, 5..10));
        assert!(
            cache_status(&h).contains("fwd=bypass"),
            "{}",
            cache_status(&h)
        );
    }
    let before = origin.requests();
    let _ = get(&proxy, &path, Some("bytes=5-9")).await;
    assert_eq!(
        origin.requests(),
        before + 1,
        "every request went to the origin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_bytes_arrive_before_the_object_is_fetched_whole() {
    // A ranged origin, and one that sends a chunked body with no length.
    let rate = 512 * 1024;
    for fault in [
        Fault::Slow {
            bytes_per_sec: rate,
        },
        Fault::SlowChunked {
            bytes_per_sec: rate,
        },
    ] {
        first_bytes_stream(fault).await;
    }
}

async fn first_bytes_stream(fault: Fault) {
    use futures::StreamExt;
    let origin = Origin::start().await;
    // 1 MiB object at 512 KiB/s: about two seconds to fetch whole.
    origin.set_fault(fault.clone());
    let proxy = Proxy::start(&config(&origin, "64MiB", "64MiB"));
    let size = 16 * CHUNK;
    let path = format!("/obj/{size}/stream.bin");
    let resp = common::client().get(proxy.url(&path)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.expect("a first piece").expect("body");
    let sent_when_first_arrived = origin.body_bytes_sent();
    assert!(!first.is_empty());
    assert!(
        sent_when_first_arrived < size / 2,
        "{fault:?}: the first byte waited for {sent_when_first_arrived} of {size} origin bytes"
    );
    let mut body = first.to_vec();
    while let Some(piece) = stream.next().await {
        body.extend_from_slice(&piece.unwrap());
    }
    assert!(body == content(&path, 0, 0..size));
}
