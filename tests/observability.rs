//! Observability and operations (issue 12), against the real binary:
//!
//! * the Grafana dashboard (`conf/grafana/edgeslice.json`) and the alert rules
//!   (`conf/prometheus-rules.yml`) query only metric names a running edgeslice exposes (its
//!   `edgeslice_*` and `process_*` families), with the label values their matchers assume, and
//!   the dashboard has every panel operators rely on;
//! * `promtool check metrics` accepts the scraped `/metrics` text, `promtool check rules` the
//!   rules and `promtool check config` the example scrape config (`conf/prometheus.yml`);
//! * a real Prometheus scrapes the admin listener (`up == 1`) and evaluates every dashboard
//!   and rule expression without error;
//! * a graceful upgrade (`-u` + SIGQUIT) hands the listeners over with no refused connection
//!   and no cut download.
//!
//! Needs `prometheus` and `promtool` (Debian `prometheus`; `.ci/run` installs it): a missing
//! binary fails the test, it never skips.

mod common;

use common::origin::{content, Fault, Origin};
use common::proxy::{free_port, Proxy};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/grafana/edgeslice.json");
const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/prometheus-rules.yml");
const SCRAPE_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/prometheus.yml");

// ---------------------------------------------------------------------------------------------
// Plain HTTP/1.1 over std sockets (one request per connection), bounded by timeouts.

/// A response: status and body (checked against Content-Length when there is one).
struct Response {
    status: u16,
    body: Vec<u8>,
}

/// Why a request failed: at connect, or after (write, read, framing).
#[derive(Debug)]
enum Failure {
    Connect(std::io::Error),
    Exchange(String),
}

/// `GET path` with `Host: host` and `Connection: close` on a new connection.
fn get(addr: SocketAddr, host: &str, path: &str, timeout: Duration) -> Result<Response, Failure> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(Failure::Connect)?;
    let io = |e: std::io::Error| Failure::Exchange(e.to_string());
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(io)?;
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut head = httparse::Response::new(&mut headers);
    let len = match head.parse(&raw) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => {
            return Err(Failure::Exchange(format!(
                "no complete response head in {} bytes: {:?}",
                raw.len(),
                String::from_utf8_lossy(&raw[..raw.len().min(200)])
            )))
        }
    };
    let status = head.code.unwrap_or(0);
    let headers = common::owned_headers(head.headers);
    let body = raw[len..].to_vec();
    if let Some((_, cl)) = headers.iter().find(|(n, _)| n == "content-length") {
        if cl.parse::<usize>().ok() != Some(body.len()) {
            return Err(Failure::Exchange(format!(
                "Content-Length {cl} but {} body bytes",
                body.len()
            )));
        }
    }
    Ok(Response { status, body })
}

/// Wait for `cond` every 20 ms, at most `limit`; true if it held.
fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Processes the test owns: killed (SIGKILL) on drop, whatever the test's outcome.

struct Owned {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Owned {
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Owned {
        let file = std::fs::File::create(&log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log clone"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {name} ({e}): is it installed?"));
        Owned {
            name,
            child: Some(child),
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// `Some(status)` once it has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; errors are reported, not undefined.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed", self.name);
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The edgeslice binary with `-c conf` (and `-u` for an upgrade), logging to `log`.
fn edgeslice(name: &'static str, conf: &Path, upgrade: bool, log: PathBuf) -> Owned {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgeslice"));
    cmd.arg("-c").arg(conf).env("RUST_LOG", "info");
    if upgrade {
        cmd.arg("-u");
    }
    Owned::spawn(name, &mut cmd, log)
}

// ---------------------------------------------------------------------------------------------
// (d) Graceful upgrade.

/// One probe of the hand-over: a new connection and a GET every ~20 ms.
struct Probe {
    n: usize,
    /// Start, relative to the test's clock.
    at: Duration,
    result: Result<(), String>,
    connect_failed: bool,
}

const PROBE_SIZE: usize = 4096;

fn probe_path(n: usize) -> String {
    format!("/obj/{PROBE_SIZE}/p{n}")
}

fn probe_loop(addr: SocketAddr, t0: Instant, stop: Arc<AtomicBool>, out: Arc<Mutex<Vec<Probe>>>) {
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let started = Instant::now();
        let path = probe_path(n);
        let (result, connect_failed) = match get(addr, "fast", &path, Duration::from_secs(5)) {
            Ok(r) if r.status == 200 && r.body == content(&path, 0, 0..PROBE_SIZE as u64) => {
                (Ok(()), false)
            }
            Ok(r) => (
                Err(format!(
                    "status {} with {} body bytes",
                    r.status,
                    r.body.len()
                )),
                false,
            ),
            Err(Failure::Connect(e)) => (Err(format!("connect: {e}")), true),
            Err(Failure::Exchange(e)) => (Err(e), false),
        };
        out.lock().unwrap().push(Probe {
            n,
            at: started - t0,
            result,
            connect_failed,
        });
        std::thread::sleep(Duration::from_millis(20).saturating_sub(started.elapsed()));
    }
}

/// Probe numbers an instance's access log shows it answered.
fn answered(log: &str) -> BTreeSet<usize> {
    let marker = format!("/obj/{PROBE_SIZE}/p");
    log.lines()
        .filter(|l| l.contains(" 200 "))
        .filter_map(|l| {
            let i = l.find(&marker)? + marker.len();
            let digits: String = l[i..].chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// The upgrade config: a slow origin for the download (host `slow`, the default route) and a
/// fast one for the probes (host `fast`), a memory and a disk tier. `grace_period` is what
/// keeps in-flight responses of the old instance alive after it stops accepting (see README
/// "Graceful upgrade").
fn upgrade_config(
    dir: &Path,
    addr: SocketAddr,
    admin: SocketAddr,
    slow: SocketAddr,
    fast: SocketAddr,
) -> String {
    let d = dir.display();
    format!(
        "server:\n  threads: 2\n  pid_file: {d}/edgeslice.pid\n  upgrade_sock: {d}/upgrade.sock\n  grace_period: 6s\n  graceful_shutdown_timeout: 2s\n\
         listen:\n  - {addr}\nadmin:\n  listen: {admin}\n\
         cache:\n  memory:\n    capacity: 64MiB\n  disk:\n    path: {d}/cache\n    capacity: 64MiB\n\
         upstreams:\n  slow:\n    servers: [\"{slow}\"]\n    read_timeout: 5s\n    deadline: 60s\n  fast:\n    servers: [\"{fast}\"]\n\
         routes:\n  - host: fast\n    upstream: fast\n  - path_prefix: /\n    upstream: slow\n"
    )
}

/// Start instance A on fresh ports (retried if a port was taken meanwhile).
fn start_a(dir: &Path, slow: SocketAddr, fast: SocketAddr) -> (Owned, PathBuf, SocketAddr) {
    let conf = dir.join("edgeslice.yaml");
    let mut last = String::new();
    for _ in 0..5 {
        let (addr, admin) = common::proxy::listen_and_admin_addrs();
        std::fs::write(&conf, upgrade_config(dir, addr, admin, slow, fast)).expect("config");
        let mut a = edgeslice("edgeslice A", &conf, false, dir.join("a.log"));
        let up = wait_until(Duration::from_secs(20), || {
            a.exited().is_some()
                || get(admin, "admin", "/healthz", Duration::from_secs(1))
                    .is_ok_and(|r| r.status == 200)
        });
        if up && a.exited().is_none() {
            return (a, conf, addr);
        }
        last = a.log();
    }
    panic!("edgeslice A did not start:\n{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_upgrade_hands_over_without_refusals_or_cut_downloads() {
    let slow = Arc::new(Origin::start().await);
    let fast = Arc::new(Origin::start().await);
    // 1 MiB at 128 KiB/s: about 8 s, so the download is still running when A stops accepting
    // (5 s after SIGQUIT, Pingora's fixed hand-over window) and ends within A's grace period.
    const DOWNLOAD: u64 = 1 << 20;
    slow.set_fault(Fault::Slow {
        bytes_per_sec: 128 * 1024,
    });
    let slow_origin = slow.clone();
    let (slow_addr, fast_addr) = (slow.addr(), fast.addr());
    tokio::task::spawn_blocking(move || {
        upgrade_scenario(slow_origin, slow_addr, fast_addr, DOWNLOAD)
    })
    .await
    .expect("upgrade scenario");
    drop(fast);
}

fn upgrade_scenario(slow: Arc<Origin>, slow_addr: SocketAddr, fast_addr: SocketAddr, size: u64) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (mut a, conf, addr) = start_a(dir, slow_addr, fast_addr);
    let t0 = Instant::now();

    // Probes from now to the end: every one must be answered, by A or by B.
    let stop = Arc::new(AtomicBool::new(false));
    let probes = Arc::new(Mutex::new(Vec::new()));
    let prober = {
        let (stop, probes) = (stop.clone(), probes.clone());
        std::thread::spawn(move || probe_loop(addr, t0, stop, probes))
    };

    // The download through A, in flight during the hand-over.
    let (done_tx, done_rx) = mpsc::channel();
    let path = format!("/obj/{size}/download");
    {
        let path = path.clone();
        std::thread::spawn(move || {
            let r = get(addr, "slow", &path, Duration::from_secs(30));
            let _ = done_tx.send((r, t0.elapsed()));
        });
    }
    assert!(
        wait_until(Duration::from_secs(10), || slow.body_bytes_sent() > 0),
        "the download never reached the slow origin\nA log:\n{}",
        tail(&a.log(), 30)
    );

    // B takes over: started with -u, it waits on upgrade_sock for A's listeners; SIGQUIT makes
    // A send them (Pingora gives B 5 tries 1 s apart to receive them).
    let mut b = edgeslice("edgeslice B", &conf, true, dir.join("b.log"));
    let sock = dir.join("upgrade.sock");
    assert!(
        wait_until(Duration::from_secs(5), || sock.exists()),
        "B did not open {}\nB log:\n{}",
        sock.display(),
        b.log()
    );
    a.signal(libc::SIGQUIT);
    let t_quit = t0.elapsed();
    assert!(
        wait_until(Duration::from_secs(10), || b
            .log()
            .contains("Bootstrap done")
            || b.exited().is_some()),
        "B did not receive the listeners\nB log:\n{}\nA log:\n{}",
        b.log(),
        tail(&a.log(), 30)
    );
    assert!(b.exited().is_none(), "B exited:\n{}", b.log());
    assert!(
        wait_until(Duration::from_secs(15), || a
            .log()
            .contains("Broadcasting graceful shutdown")),
        "A never stopped accepting\nA log:\n{}",
        tail(&a.log(), 30)
    );
    let t_a_stopped = t0.elapsed();

    let (download, t_done) = done_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the download did not finish within 30 s");
    let download = download.unwrap_or_else(|e| {
        panic!(
            "the in-flight download failed: {e:?}\nA log:\n{}",
            tail(&a.log(), 30)
        )
    });
    assert_eq!(download.status, 200);
    assert_eq!(
        download.body.len() as u64,
        size,
        "the in-flight download was cut"
    );
    assert!(
        download.body == content(&path, 0, 0..size),
        "the in-flight download has wrong bytes"
    );

    let mut a_status = None;
    assert!(
        wait_until(Duration::from_secs(20), || {
            a_status = a.exited();
            a_status.is_some()
        }),
        "A did not exit within 20 s of its download's end\nA log:\n{}",
        tail(&a.log(), 30)
    );
    let t_a_exit = t0.elapsed();
    // Keep probing B alone for a second.
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    prober.join().expect("prober");
    assert!(b.exited().is_none(), "B exited:\n{}", b.log());

    let probes = std::mem::take(&mut *probes.lock().unwrap());
    let failed: Vec<String> = probes
        .iter()
        .filter_map(|p| {
            p.result
                .as_ref()
                .err()
                .map(|e| format!("probe {} at {:?}: {e}", p.n, p.at))
        })
        .collect();
    let refused = probes.iter().filter(|p| p.connect_failed).count();
    // Every probe that started after A stopped accepting was answered by B (its access log
    // says so; lines are flushed within 200 ms).
    let must_be_b: BTreeSet<usize> = probes
        .iter()
        .filter(|p| p.at > t_a_stopped + Duration::from_millis(100))
        .map(|p| p.n)
        .collect();
    let mut by_b = BTreeSet::new();
    wait_until(Duration::from_secs(3), || {
        by_b = answered(&b.log());
        must_be_b.is_subset(&by_b)
    });
    let by_a = answered(&a.log());
    let last_a = by_a.iter().next_back().copied().unwrap_or(0);
    eprintln!(
        "upgrade: SIGQUIT at {t_quit:?}, A stopped accepting at {t_a_stopped:?}, download of {} bytes done at {t_done:?}, A exited ({a_status:?}) at {t_a_exit:?}; \
         {} probes, {} failed, {refused} connects failed; A answered {} (last #{last_a}), B answered {}",
        download.body.len(),
        probes.len(),
        failed.len(),
        by_a.len(),
        by_b.len(),
    );
    assert!(
        failed.is_empty(),
        "{} of {} probes failed:\n{}\nA log:\n{}\nB log:\n{}",
        failed.len(),
        probes.len(),
        failed.join("\n"),
        tail(&a.log(), 30),
        tail(&b.log(), 30)
    );
    assert!(
        t_done > t_a_stopped,
        "the download ended ({t_done:?}) before A stopped accepting ({t_a_stopped:?}): it proves nothing"
    );
    assert!(
        !must_be_b.is_empty(),
        "no probe ran after A stopped accepting"
    );
    let missing: Vec<_> = must_be_b.difference(&by_b).collect();
    assert!(
        missing.is_empty(),
        "probes after A stopped accepting that B's log does not show: {missing:?}\nB log:\n{}",
        tail(&b.log(), 30)
    );
    assert!(
        a_status.is_some_and(|s| s.success()),
        "A exited with {a_status:?}"
    );
    // B serves on its own now.
    let after = get(addr, "fast", &probe_path(0), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("B does not answer: {e:?}"));
    assert_eq!(after.status, 200);
}

// ---------------------------------------------------------------------------------------------
// (a)–(c) The dashboard, the rules and the metrics a running edgeslice exposes.

/// Panels operators rely on (issue 12): the dashboard must keep these titles.
const REQUIRED_PANELS: &[&str] = &[
    "Requests by cache result",
    "Hit ratio (requests and bytes)",
    "Response throughput by cache result",
    "Latency percentiles (time to last byte)",
    "Origin requests by server and outcome",
    "Origin errors by server",
    "Origin traffic by server",
    "Retries and resumes",
    "Retry ratio",
    "Breaker state",
    "Breaker transitions",
    "Cache occupancy vs capacity",
    "Connections",
    "Shaping",
    "Shaping clients and refusals",
    "CPU",
    "Memory and file descriptors",
];

/// A proxy with one route of each kind, by host: the default caching route, `pass`
/// (pass-through), `flaky` (an upstream whose first server refuses connections, with a breaker
/// that trips at once, so misses there are retried on the second) and `shaped` (paced, one
/// download per client).
fn workload_config(origin: &Origin, dead: SocketAddr) -> String {
    let o = origin.addr();
    format!(
        "cache:\n  chunk_size: 64KiB\n  memory:\n    capacity: 16MiB\n  disk:\n    path: {{DIR}}/cache\n    capacity: 16MiB\n\
         upstreams:\n  origin:\n    servers: [\"{o}\"]\n    connect_timeout: 500ms\n    read_timeout: 2s\n\
         \x20 flaky:\n    servers: [\"{dead}\", \"{o}\"]\n    connect_timeout: 500ms\n    read_timeout: 2s\n    circuit_breaker: {{failure_threshold: 1, open_for: 1s}}\n    retry: {{attempts: 3, backoff: 1ms}}\n\
         shaping:\n  classes:\n    slow:\n      rate: 256KiB/s\n      burst: 16KiB\n      max_downloads: 1\n\
         routes:\n  - host: pass\n    upstream: origin\n    cache: false\n  - host: flaky\n    upstream: flaky\n  - host: shaped\n    upstream: origin\n    shaping: slow\n  - path_prefix: /\n    upstream: origin\n"
    )
}

/// A loopback address nothing listens on (the port was just free).
fn dead_addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

/// Start a proxy, drive a small workload through it (a miss, a hit, a pass-through, an origin
/// error, an application 404, retried misses on a refusing server, a shaped download and one
/// refused beside it) and return the proxy with its `/metrics` text.
async fn scraped(origin: &Origin) -> (Proxy, String) {
    origin.set_cache_control(Some("max-age=3600"));
    let yaml = workload_config(origin, dead_addr());
    let proxy = tokio::task::spawn_blocking(move || Proxy::start(&yaml))
        .await
        .expect("proxy start");
    let addr = proxy.addr;
    tokio::task::spawn_blocking(move || workload(addr))
        .await
        .expect("workload");
    let text = proxy.metrics().await;
    (proxy, text)
}

fn workload(addr: SocketAddr) {
    let t = Duration::from_secs(10);
    let expect = |host: &str, path: &str, status: u16| {
        let r = get(addr, host, path, t).unwrap_or_else(|e| panic!("GET {host}{path}: {e:?}"));
        assert_eq!(r.status, status, "GET {host}{path}");
        r
    };
    expect("default", "/obj/100000/a", 200); // miss
    expect("default", "/obj/100000/a", 200); // hit
    expect("pass", "/obj/3000/p", 200); // pass-through
    expect("default", "/status/503/e", 503); // an origin error
    expect("pass", "/nothing", 404);
    for i in 0..4 {
        expect("flaky", &format!("/obj/5000/f{i}"), 200); // retried past the dead server
    }
    // A shaped download, and a second one beside it refused (max_downloads 1).
    let first = std::thread::spawn(move || get(addr, "shaped", "/obj/262144/s", t));
    std::thread::sleep(Duration::from_millis(150));
    let second = get(addr, "shaped", "/obj/262144/s2", t).expect("second shaped GET");
    let first = first.join().expect("shaped download").expect("shaped GET");
    assert_eq!(first.status, 200);
    assert_eq!(first.body.len(), 262144);
    assert_eq!(second.status, 429, "the second download of one client");
}

/// Names in an exposition: family names (`# HELP`/`# TYPE`) and sample names (a histogram's
/// `_bucket`, `_sum` and `_count` among them).
fn exposed_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line
            .strip_prefix("# TYPE ")
            .or_else(|| line.strip_prefix("# HELP "))
        {
            if let Some(name) = rest.split_whitespace().next() {
                out.insert(name.to_string());
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            out.insert(line[..end].to_string());
        }
    }
    out
}

/// Label values the dashboard's and the rules' matchers assume (`cache=~"hit|stale|revalidated"`,
/// `cache!~"pass|none"`, `outcome!~"[1-4]xx"`, `edgeslice_breaker_state == 2`, ...): a value
/// outside these would silently fall out of a ratio or an error panel.
const LABEL_VALUES: &[(&str, &str, &[&str])] = &[
    (
        "edgeslice_http_requests_total",
        "cache",
        &[
            "hit",
            "stale",
            "revalidated",
            "partial",
            "miss",
            "pass",
            "none",
        ],
    ),
    (
        "edgeslice_http_requests_total",
        "status_class",
        &["1xx", "2xx", "3xx", "4xx", "5xx", "none"],
    ),
    (
        "edgeslice_http_requests_total",
        "protocol",
        &["http1", "h2"],
    ),
    (
        "edgeslice_origin_requests_total",
        "outcome",
        &[
            "1xx",
            "2xx",
            "3xx",
            "4xx",
            "5xx",
            "connect",
            "connect_timeout",
            "read_timeout",
            "reset",
            "framing",
            "too_slow",
            "gateway_status",
        ],
    ),
    (
        "edgeslice_cache_bytes",
        "tier",
        &["memory", "disk", "metadata", "disk_index", "responses"],
    ),
    (
        "edgeslice_cache_capacity_bytes",
        "tier",
        &["memory", "disk", "metadata", "disk_index", "responses"],
    ),
    (
        "edgeslice_connections_open",
        "listener",
        &["client", "admin"],
    ),
    (
        "edgeslice_breaker_transitions_total",
        "to",
        &["open", "half_open", "closed"],
    ),
    (
        "edgeslice_shaping_refused_total",
        "reason",
        &["downloads", "connections"],
    ),
];

/// One sample line of an exposition: name, labels, value.
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: String,
}

fn samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = line[..end].to_string();
        let mut labels = Vec::new();
        let mut rest = &line[end..];
        if let Some(inner) = rest.strip_prefix('{') {
            let (mut key, mut value, mut in_value, mut escaped) =
                (String::new(), String::new(), false, false);
            let mut close = inner.len();
            for (i, c) in inner.char_indices() {
                if in_value {
                    match (escaped, c) {
                        (false, '\\') => escaped = true,
                        (false, '"') => {
                            in_value = false;
                            labels.push((std::mem::take(&mut key), std::mem::take(&mut value)));
                        }
                        (true, 'n') => {
                            value.push('\n');
                            escaped = false;
                        }
                        (_, c) => {
                            value.push(c);
                            escaped = false;
                        }
                    }
                } else {
                    match c {
                        '}' => {
                            close = i + 1;
                            break;
                        }
                        '"' => in_value = true,
                        '=' | ',' | ' ' => {}
                        c => key.push(c),
                    }
                }
            }
            rest = &inner[close..];
        }
        out.push(Sample {
            name,
            labels,
            value: rest.trim().split(' ').next().unwrap_or("").to_string(),
        });
    }
    out
}

/// Every metric name in `expr`: `edgeslice_[a-z0-9_]+`, and `process_[a-z0-9_]+` (the process
/// figures the binary exports beside its own).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = BTreeSet::new();
    for prefix in ["edgeslice_", "process_"] {
        let mut from = 0;
        while let Some(i) = expr[from..].find(prefix) {
            let start = from + i;
            let end = start
                + expr[start..]
                    .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                    .unwrap_or(expr.len() - start);
            let before_ok = !expr[..start].chars().next_back().is_some_and(ident);
            if before_ok && end > start + prefix.len() {
                out.insert(expr[start..end].to_string());
            }
            from = end.max(start + 1);
        }
    }
    out
}

/// The string values of `keys` anywhere under `v`, each with its path.
fn strings_under(
    v: &serde_json::Value,
    keys: &[&str],
    path: &str,
    out: &mut Vec<(String, String)>,
) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                let p = format!("{path}.{k}");
                match x {
                    serde_json::Value::String(s) if keys.contains(&k.as_str()) => {
                        out.push((p, s.clone()))
                    }
                    _ => strings_under(x, keys, &p, out),
                }
            }
        }
        serde_json::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                strings_under(x, keys, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(DASHBOARD).expect("read the dashboard");
    serde_json::from_str(&text).expect("the dashboard is not valid JSON")
}

fn rules() -> serde_json::Value {
    let text = std::fs::read_to_string(RULES).expect("read the rules");
    serde_saphyr::from_str(&text).expect("the rules are not valid YAML")
}

/// Every panel, those inside collapsed rows included.
fn panels(d: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("dashboard.panels") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

/// `(where, expression)` of every PromQL expression in the dashboard (panel targets) and the
/// rules; template variable queries separately (they are Grafana's `label_values(...)`).
fn dashboard_exprs(d: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    strings_under(&d["panels"], &["expr"], "panels", &mut out);
    out
}

fn rule_exprs(r: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    strings_under(r, &["expr"], "rules", &mut out);
    out
}

fn variable_queries(d: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    strings_under(
        &d["templating"],
        &["query", "definition"],
        "templating",
        &mut out,
    );
    out
}

#[test]
fn dashboard_has_the_required_panels_and_no_empty_query() {
    let d = dashboard();
    let datasource = d["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(datasource["query"], "prometheus");
    let var = format!("${{{}}}", datasource["name"].as_str().unwrap());
    let all = panels(&d);
    let titles: BTreeSet<&str> = all.iter().filter_map(|p| p["title"].as_str()).collect();
    for want in REQUIRED_PANELS {
        assert!(
            titles.contains(want),
            "no panel titled {want:?}; have {titles:?}"
        );
    }
    let mut ids = BTreeSet::new();
    for p in &all {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate id in {title}"
        );
        assert!(p["gridPos"]["w"].as_u64().is_some(), "{title}: no gridPos");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], var.as_str(), "{title}: datasource");
        let targets = p["targets"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or("");
            assert!(!expr.trim().is_empty(), "{title}: empty expr");
            assert!(
                !metric_names(expr).is_empty(),
                "{title}: {expr} reads no metric"
            );
        }
    }
    let rules = rule_exprs(&rules());
    assert!(rules.len() >= 2, "rules: {rules:?}");
    assert!(rules.iter().all(|(_, e)| !e.trim().is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_rules_query_only_metrics_the_binary_exposes() {
    let origin = Origin::start().await;
    let (_proxy, text) = scraped(&origin).await;
    let exposed = exposed_names(&text);
    let d = dashboard();
    let mut queries = dashboard_exprs(&d);
    queries.extend(variable_queries(&d));
    queries.extend(rule_exprs(&rules()));
    let mut used = BTreeSet::new();
    let mut missing = Vec::new();
    for (at, expr) in &queries {
        for name in metric_names(expr) {
            if !exposed.contains(&name) {
                missing.push(format!("{name} (in {at})"));
            }
            used.insert(name);
        }
    }
    let exposed_edgeslice: Vec<_> = exposed
        .iter()
        .filter(|n| n.starts_with("edgeslice_"))
        .collect();
    eprintln!(
        "{} queries use {} metric names; /metrics exposes {} edgeslice names",
        queries.len(),
        used.len(),
        exposed_edgeslice.len()
    );
    assert!(
        missing.is_empty(),
        "queried but not exposed:\n{}\n\nexposed: {exposed_edgeslice:?}",
        missing.join("\n")
    );

    // The label values the matchers assume, and those the workload must have produced.
    let samples = samples(&text);
    let values = |family: &str, label: &str| -> BTreeSet<String> {
        samples
            .iter()
            .filter(|s| s.name == family)
            .filter_map(|s| s.labels.iter().find(|(k, _)| k == label))
            .map(|(_, v)| v.clone())
            .collect()
    };
    for (family, label, allowed) in LABEL_VALUES {
        let seen = values(family, label);
        let unknown: Vec<_> = seen
            .iter()
            .filter(|v| !allowed.contains(&v.as_str()))
            .collect();
        assert!(
            unknown.is_empty(),
            "{family}{{{label}}} has values the dashboard does not expect: {unknown:?}"
        );
    }
    let cache = values("edgeslice_http_requests_total", "cache");
    for want in ["hit", "miss", "none"] {
        assert!(
            cache.contains(want),
            "no cache=\"{want}\" after the workload: {cache:?}"
        );
    }
    let outcomes = values("edgeslice_origin_requests_total", "outcome");
    assert!(outcomes.contains("connect"), "outcomes: {outcomes:?}");
    for s in samples
        .iter()
        .filter(|s| s.name == "edgeslice_breaker_state")
    {
        assert!(
            ["0", "1", "2"].contains(&s.value.as_str()),
            "edgeslice_breaker_state {:?} = {}",
            s.labels,
            s.value
        );
    }
}

/// Run `promtool` with `args`, `stdin` piped in; its exit status and output.
fn promtool(args: &[&str], stdin: &str) -> (ExitStatus, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): install Debian's prometheus (apt-get install prometheus)")
        });
    let mut input = child.stdin.take().expect("promtool stdin");
    let stdin = stdin.to_string();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(stdin.as_bytes());
    });
    let out = child.wait_with_output().expect("promtool output");
    let _ = writer.join();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_metrics_the_rules_and_the_scrape_config() {
    let origin = Origin::start().await;
    let (_proxy, text) = scraped(&origin).await;
    let (status, out) = promtool(&["check", "metrics"], &text);
    eprintln!("promtool check metrics: {status}\n{out}");
    assert!(
        status.success(),
        "promtool check metrics failed ({status}):\n{out}\n--- scraped text ---\n{text}"
    );
    for args in [
        &["check", "rules", RULES][..],
        &["check", "config", SCRAPE_CONFIG][..],
    ] {
        let (status, out) = promtool(args, "");
        assert!(
            status.success(),
            "promtool {args:?} failed ({status}):\n{out}"
        );
    }
}

/// A real Prometheus on a free loopback port, scraping `target` every second with the example
/// rules loaded; killed on drop.
fn start_prometheus(dir: &Path, target: SocketAddr) -> (Owned, SocketAddr) {
    let conf = dir.join("prometheus.yml");
    std::fs::write(
        &conf,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {RULES}\n\
             scrape_configs:\n  - job_name: edgeslice\n    metrics_path: /metrics\n    static_configs:\n      - targets: [\"{target}\"]\n"
        ),
    )
    .expect("prometheus.yml");
    let mut last = String::new();
    for attempt in 0..3 {
        let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", conf.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"));
        let mut p = Owned::spawn(
            "prometheus",
            &mut cmd,
            dir.join(format!("prometheus-{attempt}.log")),
        );
        let ready = wait_until(Duration::from_secs(15), || {
            p.exited().is_some()
                || get(web, "prometheus", "/-/ready", Duration::from_secs(1))
                    .is_ok_and(|r| r.status == 200)
        });
        if ready && p.exited().is_none() {
            return (p, web);
        }
        last = p.log();
    }
    panic!("prometheus did not start:\n{last}");
}

/// `GET /api/v1/<path>` with `query` on Prometheus, as JSON.
async fn prometheus_api(web: SocketAddr, path: &str, query: &[(&str, &str)]) -> serde_json::Value {
    let r = common::client()
        .get(format!("http://{web}/api/v1/{path}"))
        .query(query)
        .send()
        .await
        .unwrap_or_else(|e| panic!("prometheus /api/v1/{path}: {e}"));
    let text = r.text().await.expect("prometheus body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("prometheus /api/v1/{path}: {e}: {text}"))
}

/// A dashboard expression as Prometheus can evaluate it: Grafana's variables replaced.
fn without_variables(expr: &str) -> String {
    let expr = expr
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "1m");
    let mut out = String::new();
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        // `$name` or `${name}`: every other variable is a multi-value label matcher.
        if chars.peek() == Some(&'{') {
            for c in chars.by_ref() {
                if c == '}' {
                    break;
                }
            }
        } else {
            while chars
                .peek()
                .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
            {
                chars.next();
            }
        }
        out.push_str(".*");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_admin_listener_and_evaluates_every_query() {
    let origin = Origin::start().await;
    let (proxy, _) = scraped(&origin).await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    let admin = proxy.admin;
    let (prometheus, web) = tokio::task::spawn_blocking(move || start_prometheus(&dir, admin))
        .await
        .expect("start prometheus");
    let t0 = Instant::now();
    let up = loop {
        let v = prometheus_api(web, "query", &[("query", "up")]).await;
        let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
        if let Some(s) = result.iter().find(|s| s["metric"]["job"] == "edgeslice") {
            if s["value"][1] == "1" {
                break t0.elapsed();
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no up == 1 for the edgeslice target within 30 s: {v}\ntargets: {}\nprometheus log:\n{}",
            prometheus_api(web, "targets", &[]).await,
            tail(&prometheus.log(), 40)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("prometheus: up == 1 after {up:?}");
    // The scraped samples are there, under the names the dashboard reads.
    let v = prometheus_api(
        web,
        "query",
        &[("query", "sum(edgeslice_http_requests_total)")],
    )
    .await;
    assert!(
        v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .is_some_and(|n| n > 0.0),
        "no edgeslice_http_requests_total in prometheus: {v}"
    );
    // Every dashboard expression is valid PromQL.
    let d = dashboard();
    let exprs = dashboard_exprs(&d);
    for (at, expr) in &exprs {
        let q = without_variables(expr);
        let v = prometheus_api(web, "query", &[("query", q.as_str())]).await;
        assert_eq!(v["status"], "success", "{at}: {q}\n{v}");
    }
    // The alert rules are loaded and evaluate without error.
    let want_rules = rule_exprs(&rules()).len();
    let t1 = Instant::now();
    loop {
        let v = prometheus_api(web, "rules", &[]).await;
        let loaded: Vec<serde_json::Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let healthy = loaded.iter().filter(|r| r["health"] == "ok").count();
        if loaded.len() == want_rules && healthy == want_rules {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(15),
            "rules not all loaded and healthy: {v}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "prometheus: {} dashboard expressions evaluated, rules healthy after {:?}",
        exprs.len(),
        t1.elapsed()
    );
}
