//! Observability and operations (issue 12), against the real binary:
//!
//! * the Grafana dashboard (`conf/grafana/edgeslice.json`) and the alert rules
//!   (`conf/prometheus-rules.yml`) query only metric names a running edgeslice exposes, and the
//!   dashboard has every panel operators rely on;
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
use common::proxy::free_port;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

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
    let headers: Vec<(String, String)> = head
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
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
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
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
