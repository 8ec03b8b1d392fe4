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
