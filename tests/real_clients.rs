//! Real clients against a real origin: aria2c segmented downloads and many concurrent cold
//! downloads through edgeslice from an nginx static origin, with the origin's traffic counted
//! from nginx's access log. Each chunk of a cold object must be fetched from the origin once
//! (origin bytes ≤ the object plus one chunk), whatever the clients' ranges overlap.
//!
//! Needs `nginx` (nginx-light) and `aria2c` (aria2): a missing binary fails the test.

mod common;

use common::nginx::{content, Nginx};
use common::proxy::Proxy;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHUNK: u64 = 1 << 20;

/// The cache with its default chunk size (1 MiB), memory tier `memory` and a disk tier of
/// `disk` (none when empty); nginx sends no Cache-Control, so `default_ttl` makes its files
/// storable.
fn config(nginx: &Nginx, memory: &str, disk: &str) -> String {
    let disk = if disk.is_empty() {
        String::new()
    } else {
        format!("  disk:\n    path: {{DIR}}/cache\n    capacity: {disk}\n")
    };
    format!(
        "cache:\n  default_ttl: 1h\n  memory:\n    capacity: {memory}\n{disk}upstreams:\n  origin:\n    servers: [\"{}\"]\n    connect_timeout: 1s\n    read_timeout: 10s\nroutes:\n  - path_prefix: /\n    upstream: origin\n    cache: true\n",
        nginx.addr
    )
}

/// Origin bytes over the object's size, printed for the record; asserts the bound.
fn assert_each_chunk_fetched_once(nginx: &Nginx, proxy: &Proxy, size: u64, what: &str) {
    nginx.settle(Duration::from_secs(5));
    let sent = nginx.body_bytes_sent();
    let ratio = sent as f64 / size as f64;
    eprintln!(
        "{what}: origin sent {sent} bytes for a {size}-byte object ({ratio:.3}x) in {} requests",
        nginx.requests()
    );
    assert!(
        sent <= size + CHUNK,
        "{what}: origin sent {sent} bytes ({ratio:.3}x the object): chunks fetched twice\n\
         origin requests: {:?}\nproxy log tail:\n{}",
        nginx.accesses(),
        tail(&proxy.log(), 40)
    );
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Run `aria2c -x16 -s16 -k1M` on `url` into `dir/out.bin`, within `limit`.
fn aria2c(url: &str, dir: &std::path::Path, limit: Duration) -> Vec<u8> {
    let mut child = Command::new("aria2c")
        .args([
            "-x16",
            "-s16",
            "-k1M",
            "--allow-overwrite=true",
            "--auto-file-renaming=false",
            "--file-allocation=none",
            "--max-tries=1",
            "--connect-timeout=5",
            "--timeout=20",
            "--quiet=true",
            "--console-log-level=error",
        ])
        .arg(format!("--dir={}", dir.display()))
        .arg("--out=out.bin")
        .arg(url)
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("all_proxy")
        .env_remove("ALL_PROXY")
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run aria2c ({e}): install aria2 (apt-get install aria2)")
        });
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("aria2c wait") {
            assert!(status.success(), "aria2c failed: {status}");
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("aria2c did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::read(dir.join("out.bin")).expect("aria2c output")
}

/// The default memory tier (256 MiB), no disk.
#[test]
fn aria2c_x16_cold_object_fetches_each_chunk_once() {
    let nginx = Nginx::start();
    let size = 128 * CHUNK;
    let want = nginx.put_file("/aria.bin", size as usize);
    let proxy = Proxy::start(&config(&nginx, "256MiB", ""));
    let out = tempfile::tempdir().expect("tempdir");
    let got = aria2c(&proxy.url("/aria.bin"), out.path(), Duration::from_secs(60));
    assert_eq!(
        got.len(),
        want.len(),
        "aria2c got a file of the wrong length"
    );
    assert!(got == want, "aria2c got wrong bytes");
    assert_each_chunk_fetched_once(&nginx, &proxy, size, "aria2c -x16");
}

/// The same with a memory tier smaller than the object and a disk tier behind it.
#[test]
fn aria2c_x16_cold_object_larger_than_memory_fetches_each_chunk_once() {
    let nginx = Nginx::start();
    let size = 96 * CHUNK;
    let want = nginx.put_file("/aria-disk.bin", size as usize);
    let proxy = Proxy::start(&config(&nginx, "32MiB", "1GiB"));
    let out = tempfile::tempdir().expect("tempdir");
    let got = aria2c(
        &proxy.url("/aria-disk.bin"),
        out.path(),
        Duration::from_secs(60),
    );
    assert!(got == want, "aria2c got wrong bytes");
    assert_each_chunk_fetched_once(&nginx, &proxy, size, "aria2c -x16, 32 MiB memory + disk");
}

/// `n` clients download `path` whole at once; each body is compared as it streams.
async fn concurrent_downloads(proxy: &Proxy, path: &str, size: usize, n: usize) {
    let want = std::sync::Arc::new(content(path, size));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let url = proxy.url(path);
        let want = want.clone();
        tasks.push(tokio::spawn(async move {
            let mut resp = common::client().get(url).send().await.expect("request");
            assert_eq!(resp.status(), 200);
            let mut at = 0usize;
            while let Some(piece) = resp.chunk().await.expect("body") {
                let end = at + piece.len();
                assert!(
                    end <= want.len() && piece[..] == want[at..end],
                    "wrong bytes at {at}"
                );
                at = end;
            }
            assert_eq!(at, want.len(), "short body");
        }));
    }
    let all = async {
        for t in tasks {
            t.await.expect("download task");
        }
    };
    tokio::time::timeout(Duration::from_secs(90), all)
        .await
        .expect("downloads did not finish in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_downloads_fetch_each_chunk_once() {
    let nginx = Nginx::start();
    let size = 64 * CHUNK;
    nginx.put_file("/many.bin", size as usize);
    let proxy = Proxy::start(&config(&nginx, "256MiB", ""));
    concurrent_downloads(&proxy, "/many.bin", size as usize, 32).await;
    assert_each_chunk_fetched_once(&nginx, &proxy, size, "32 concurrent downloads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_downloads_larger_than_memory_fetch_each_chunk_once() {
    // A quarter of the object fits in memory, the rest goes to disk: lagging clients need
    // chunks the leaders' fills pushed out of memory.
    let nginx = Nginx::start();
    let size = 64 * CHUNK;
    nginx.put_file("/many-small.bin", size as usize);
    let proxy = Proxy::start(&config(&nginx, "16MiB", "1GiB"));
    concurrent_downloads(&proxy, "/many-small.bin", size as usize, 32).await;
    assert_each_chunk_fetched_once(
        &nginx,
        &proxy,
        size,
        "32 concurrent downloads, 16 MiB memory + disk for a 64 MiB object",
    );
}
