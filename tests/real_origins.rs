//! Real static origins nobody here wrote, behind the shipped defaults: `python3 -m http.server`
//! (Last-Modified, no Cache-Control, ignores Range) and nginx (ETag + Last-Modified, ranges,
//! no Cache-Control). Their files are cached by heuristic freshness (RFC 9111 §4.2.2): a Range
//! request is a 206 with exact bytes, the next one is a hit, and the origin sees one request.
//! Origin requests are counted from the servers' own logs.
//!
//! Needs `python3` and `nginx` (nginx-light): a missing binary fails the test.

mod common;

use common::nginx::{content, Nginx};
use common::proxy::{free_port, Proxy};
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

const OLD: Duration = Duration::from_secs(30 * 86_400);

/// The shipped defaults (no `cache:` section at all) with one route to `origin`.
fn default_config(origin: std::net::SocketAddr) -> String {
    format!(
        "upstreams:\n  origin:\n    servers: [\"{origin}\"]\nroutes:\n  - path_prefix: /\n    upstream: origin\n"
    )
}

/// `python3 -m http.server` on a free loopback port serving `dir`; its request log lines are
/// collected (it logs each request to stderr).
struct PyServer {
    child: Child,
    addr: std::net::SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl PyServer {
    fn start(dir: &std::path::Path) -> PyServer {
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new("python3")
                .args([
                    "-m",
                    "http.server",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                ])
                .current_dir(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("python3 must be installed");
            let log = Arc::new(Mutex::new(Vec::new()));
            let stderr = child.stderr.take().unwrap();
            let sink = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
            let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if TcpStream::connect(addr).is_ok() {
                    return PyServer { child, addr, log };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("python3 -m http.server did not start");
    }

    /// Requests logged for `path` so far.
    fn requests(&self, path: &str) -> usize {
        let needle = format!("\"GET {path} ");
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(&needle))
            .count()
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get_range(proxy: &Proxy, path: &str, range: &str) -> (u16, String, Vec<u8>) {
    let r = common::client()
        .get(proxy.url(path))
        .header("range", range)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    let cs = common::header_text(r.headers(), "cache-status");
    (status, cs, r.bytes().await.expect("body").to_vec())
}

/// Wait (bounded) until `f` holds.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_http_server_files_are_cached_by_heuristic_freshness() {
    let dir = tempfile::tempdir().unwrap();
    let size = 3 << 20;
    let data = content("/file.bin", size);
    let file = dir.path().join("file.bin");
    std::fs::write(&file, &data).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(SystemTime::now() - OLD)
        .unwrap();
    let py = PyServer::start(dir.path());
    let proxy = Proxy::start(&default_config(py.addr));

    let (status, cs, body) = get_range(&proxy, "/file.bin", "bytes=0-99").await;
    assert_eq!(status, 206, "{cs}");
    assert_eq!(body, data[..100], "exact bytes");
    assert_eq!(cs, "edgeslice; fwd=miss; stored");
    // The server ignored Range: its whole 200 fills every chunk; wait until it has.
    eventually("the origin's log line", || py.requests("/file.bin") == 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (range, from, to) in [
        ("bytes=0-99", 0, 100),
        ("bytes=2000000-2099999", 2_000_000, 2_100_000),
        ("bytes=-10", size - 10, size),
    ] {
        let (status, cs, body) = get_range(&proxy, "/file.bin", range).await;
        assert_eq!(status, 206, "{range}");
        assert_eq!(body, data[from..to], "{range}: exact bytes");
        assert_eq!(cs, "edgeslice; hit", "{range}");
    }
    assert_eq!(py.requests("/file.bin"), 1, "one origin request in all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_static_files_are_cached_by_heuristic_freshness() {
    let nginx = Nginx::start();
    let size = 5 << 20;
    let data = nginx.put_file("/static/video.mp4", size);
    nginx.age_file("/static/video.mp4", OLD);
    let proxy = Proxy::start(&default_config(nginx.addr));

    let (status, cs, body) = get_range(&proxy, "/static/video.mp4", "bytes=1048000-1049999").await;
    assert_eq!(status, 206, "{cs}");
    assert_eq!(body, data[1_048_000..1_050_000], "exact bytes");
    assert_eq!(cs, "edgeslice; fwd=miss; stored");
    nginx.settle(Duration::from_secs(5));
    assert_eq!(nginx.requests(), 1);
    // The discovery fetched from the range's chunk on: the same range is a hit now.
    let (status, cs, body) = get_range(&proxy, "/static/video.mp4", "bytes=1048000-1049999").await;
    assert_eq!((status, cs.as_str()), (206, "edgeslice; hit"));
    assert_eq!(body, data[1_048_000..1_050_000]);
    // The whole object: the chunks not fetched yet are fetched once, the rest is cached.
    let r = common::client()
        .get(proxy.url("/static/video.mp4"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.bytes().await.unwrap() == data, "exact bytes");
    nginx.settle(Duration::from_secs(5));
    assert!(
        nginx.body_bytes_sent() <= size as u64,
        "no origin byte twice: {:?}",
        nginx.accesses()
    );
}
