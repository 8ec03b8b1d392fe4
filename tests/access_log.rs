//! The access log as operators read it: JSON lines with the documented fields, written off the
//! request path to `server.access_log_path`.

mod common;

use common::origin::Origin;
use common::proxy::Proxy;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_carry_the_documented_fields() {
    let origin = Origin::start().await;
    let yaml = format!(
        "cache:\n  memory:\n    capacity: 16MiB\nupstreams:\n  origin:\n    servers: [\"{}\"]\nroutes:\n  - path_prefix: /download/\n    upstream: origin\n    cache: false\n  - path_prefix: /\n    upstream: origin\n",
        origin.addr()
    );
    // The server section is the harness's: add the two keys to it.
    let proxy = Proxy::start_with_server(
        &yaml,
        "  access_log_format: json\n  access_log_path: {DIR}/access.log\n",
    );
    let paths = [
        "/obj/4096/a.bin",
        "/obj/4096/a.bin",
        "/download/100",
        "/nope",
    ];
    for (i, p) in paths.iter().enumerate() {
        let _ = common::client()
            .get(proxy.url(p))
            .header("x-request-id", format!("rid-{i}"))
            .send()
            .await
            .expect("request")
            .bytes()
            .await;
    }
    let log_path = proxy.dir.join("access.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= paths.len() || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(lines.len(), paths.len(), "{lines:?}");
    // A line is written once its response is complete, so a client's next request may be
    // logged first: lines are matched by request id, not by position.
    let parsed: Vec<serde_json::Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    for (line, v) in lines.iter().zip(&parsed) {
        for k in edgeslice::access_log::FIELDS {
            assert!(v.get(k).is_some(), "{k} missing in {line}");
        }
        assert_eq!(v["method"], "GET");
        assert_eq!(v["client"], "127.0.0.1");
    }
    let v = |i: usize| {
        let rid = format!("rid-{i}");
        let found = parsed
            .iter()
            .find(|v| v["request_id"] == rid.as_str())
            .unwrap_or_else(|| panic!("no line for {rid}: {lines:?}"));
        assert_eq!(found["path"], paths[i]);
        found.clone()
    };
    assert_eq!(v(0)["status"], 200);
    assert_eq!(v(0)["bytes"], 4096);
    assert!(v(0)["cache"].as_str().unwrap().contains("fwd=miss"));
    assert_eq!(v(1)["cache"], "edgeslice; hit");
    assert_eq!(v(2)["upstream"], origin.addr().to_string());
    assert_eq!(v(3)["status"], 404);
}

/// Lines in `path` so far.
fn lines_of(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_file_after_logrotate_moved_it() {
    let origin = Origin::start().await;
    let yaml = format!(
        "upstreams:\n  origin:\n    servers: [\"{}\"]\nroutes:\n  - path_prefix: /\n    upstream: origin\n",
        origin.addr()
    );
    let proxy = Proxy::start_with_server(&yaml, "  access_log_path: {DIR}/access.log\n");
    let log_path = proxy.dir.join("access.log");
    let rotated = proxy.dir.join("access.log.1");
    let get = |rid: String| {
        let url = proxy.url("/obj/100/rot");
        async move {
            common::client()
                .get(url)
                .header("x-request-id", rid)
                .send()
                .await
                .expect("request")
                .bytes()
                .await
                .expect("body");
        }
    };
    get("before-rotate".into()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lines_of(&log_path)
        .iter()
        .any(|l| l.contains("rid=before-rotate"))
    {
        assert!(Instant::now() < deadline, "the first line never came");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // logrotate: move the file away, then signal.
    std::fs::rename(&log_path, &rotated).unwrap();
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(proxy.pid() as i32, libc::SIGUSR1) }, 0);
    // Lines logged while the writer has not yet reopened may still go to the moved file (as
    // with nginx); within a few requests they go to a new file at the configured path.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut i = 0;
    loop {
        get(format!("after-rotate-{i}")).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if lines_of(&log_path)
            .iter()
            .any(|l| l.contains("rid=after-rotate"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new file at {} after SIGUSR1",
            log_path.display()
        );
        i += 1;
    }
    let old = lines_of(&rotated);
    assert!(
        old.iter().any(|l| l.contains("rid=before-rotate")),
        "{old:?}"
    );
    assert!(
        !lines_of(&log_path)
            .iter()
            .any(|l| l.contains("rid=before-rotate")),
        "the new file starts after the rotation"
    );
    assert!(proxy.log_contains("reopened"), "the reopen is logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_sink_never_delays_responses() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("access.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // A reader that never reads: the proxy can open the pipe, and its writes block once the
    // pipe's 64 KiB are full.
    let _reader = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap()
    };
    let yaml = format!(
        "upstreams:\n  origin:\n    servers: [\"{}\"]\nroutes:\n  - path_prefix: /\n    upstream: origin\n",
        origin.addr()
    );
    let proxy =
        Proxy::start_with_server(&yaml, &format!("  access_log_path: {}\n", fifo.display()));
    // More lines than the pipe and the writer's queue (16,384 lines) hold: with a log that
    // waited for its sink, these requests would hang once both were full.
    let total = 20_000;
    let client = common::client();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            let url = proxy.url("/obj/512/logged");
            tokio::spawn(async move {
                let mut slowest = Duration::ZERO;
                for _ in 0..total / 8 {
                    let start = Instant::now();
                    let resp = client.get(&url).send().await.expect("request");
                    assert_eq!(resp.status(), 200);
                    resp.bytes().await.expect("body");
                    slowest = slowest.max(start.elapsed());
                }
                slowest
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for t in tasks {
        slowest = slowest.max(t.await.unwrap());
    }
    let stats = proxy.stats().await;
    eprintln!(
        "{total} requests with a stalled log sink: slowest {slowest:?}, {} lines dropped",
        stats["access_log_dropped"]
    );
    assert!(
        stats["access_log_dropped"] > 0,
        "the sink stalled, so lines were dropped and counted"
    );
}
