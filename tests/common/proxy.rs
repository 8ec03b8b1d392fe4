//! Starts the real `edgeslice` binary on loopback ports chosen by the OS, with a config written
//! to a temporary directory, and stops it (SIGKILL) on drop.
//!
//! Pingora binds its listeners itself and does not report the port it got, so the harness asks
//! the OS for a free port (bind `127.0.0.1:0`, read it, release it) and hands that to the proxy.
//! A start that loses the race for the port is retried with new ports.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

thread_local! {
    /// The listen address [`Proxy::start_at`] asks for.
    static FIXED_LISTEN: std::cell::Cell<Option<SocketAddr>> = const { std::cell::Cell::new(None) };
}

pub struct Proxy {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
    yaml: String,
    /// Extra lines of the `server` section (indented two spaces).
    server_extra: String,
    /// The TLS listener, when started with one ([`Proxy::start_tls`]).
    pub tls_addr: Option<SocketAddr>,
    /// The lines of its `listen` entry after `address` (indented four spaces).
    tls_entry: String,
    /// The listener serves prior-knowledge HTTP/2 beside HTTP/1.1 (`h2c: true`).
    h2c: bool,
    /// The command the binary is started through (its path and arguments follow), if any.
    launcher: Vec<String>,
    /// Started by [`Proxy::start_at`]: a restart listens on the same address.
    fixed_listen: bool,
    _tmp: Option<tempfile::TempDir>,
}

/// A port the OS just handed out on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").port()
}

/// Whether process `pid` holds a listening TCP socket on the IPv4 address `addr` (its socket
/// inode in `/proc/net/tcp` is one of the process's descriptors).
pub fn listens_on(pid: u32, addr: SocketAddr) -> bool {
    let std::net::IpAddr::V4(ip) = addr.ip() else {
        return false;
    };
    // /proc/net/tcp writes the address as the 32-bit word in host (little-endian) order.
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(ip.octets()),
        addr.port()
    );
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // local_address, state (0A: LISTEN), inode.
            (f.len() > 9 && f[1] == local && f[3] == "0A").then(|| format!("socket:[{}]", f[9]))
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .any(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
}

/// Two distinct free addresses on 127.0.0.1, for a proxy's listener and its admin listener:
/// held at once while picked, since two [`free_port`] calls can return the same port (the admin
/// listener would then answer in the proxy's place).
pub fn listen_and_admin_addrs() -> (SocketAddr, SocketAddr) {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    let addr = |l: &TcpListener| l.local_addr().expect("local addr");
    (addr(&a), addr(&b))
}

/// Whether the admin listener at `admin` answers `GET /healthz` with 200.
pub fn healthy(admin: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&admin, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    buf.starts_with(b"HTTP/1.1 200")
}

impl Proxy {
    /// Start with `yaml` holding everything but `server`, `listen` and `admin`; `{DIR}` in it is
    /// replaced by the proxy's private temporary directory (use it for `cache.disk.path`).
    pub fn start(yaml: &str) -> Proxy {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut p = Proxy::start_in(&dir, yaml);
        p._tmp = Some(tmp);
        p
    }

    /// [`Proxy::start`] with extra `server` keys (`server_extra`: lines indented two spaces;
    /// `{DIR}` is replaced as in `yaml`).
    pub fn start_with_server(yaml: &str, server_extra: &str) -> Proxy {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut p = Proxy::start_in_with(&dir, yaml, server_extra);
        p._tmp = Some(tmp);
        p
    }

    /// [`Proxy::start_with_server`] with the listener written `{address: ..., h2c: true}`.
    pub fn start_h2c(yaml: &str, server_extra: &str) -> Proxy {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut p = Proxy::start_in_full(&dir, yaml, server_extra, None, true, &[]);
        p._tmp = Some(tmp);
        p
    }

    /// Start in an existing directory (to restart over the same disk cache).
    pub fn start_in(dir: &Path, yaml: &str) -> Proxy {
        Proxy::start_in_with(dir, yaml, "")
    }

    /// [`Proxy::start_with_server`] with a second listener, on [`Proxy::tls_addr`]: its
    /// `listen` entry is `address: ...` followed by `tls_entry` (lines indented four spaces,
    /// e.g. a `tls:` section and `http2: false`).
    pub fn start_tls(yaml: &str, server_extra: &str, tls_entry: &str) -> Proxy {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut p = Proxy::start_in_full(&dir, yaml, server_extra, Some(tls_entry), false, &[]);
        p._tmp = Some(tmp);
        p
    }

    /// `https://localhost:PORT{path}` on the TLS listener (certificates name `localhost`).
    pub fn tls_url(&self, host: &str, path: &str) -> String {
        let port = self.tls_addr.expect("started with a TLS listener").port();
        format!("https://{host}:{port}{path}")
    }

    fn start_in_with(dir: &Path, yaml: &str, server_extra: &str) -> Proxy {
        Proxy::start_in_full(dir, yaml, server_extra, None, false, &[])
    }

    /// [`Proxy::start`] listening on `addr` (127.0.0.1, a port from [`free_port`]), for
    /// configurations that must name the listener before it starts (a cluster's peers).
    pub fn start_at(addr: SocketAddr, yaml: &str) -> Proxy {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        FIXED_LISTEN.with(|f| f.set(Some(addr)));
        let mut p = Proxy::start_in_full(&dir, yaml, "", None, false, &[]);
        FIXED_LISTEN.with(|f| f.set(None));
        p._tmp = Some(tmp);
        p.fixed_listen = true;
        p
    }

    /// [`Proxy::start`] through `launcher`: the binary's path and arguments are appended to
    /// it (e.g. `unshare ... sh -c '...; exec "$0" "$@"'`), which must exec it in the end so
    /// that the child is the proxy itself.
    pub fn start_launched(yaml: &str, launcher: &[String]) -> Proxy {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut p = Proxy::start_in_full(&dir, yaml, "", None, false, launcher);
        p._tmp = Some(tmp);
        p
    }

    /// Start with the plain listener, written `{address: ..., h2c: true}` when `h2c`, and a
    /// TLS listener when `tls_entry` is given.
    fn start_in_full(
        dir: &Path,
        yaml: &str,
        server_extra: &str,
        tls_entry: Option<&str>,
        h2c: bool,
        launcher: &[String],
    ) -> Proxy {
        let mut last_log = String::new();
        for _ in 0..5 {
            let (mut addr, admin) = listen_and_admin_addrs();
            if let Some(fixed) = FIXED_LISTEN.with(|f| f.get()) {
                addr = fixed;
            }
            let tls_addr = tls_entry.map(|_| {
                // Apart from the two above (held while picked for the same reason).
                loop {
                    let a = TcpListener::bind("127.0.0.1:0")
                        .and_then(|l| l.local_addr())
                        .expect("bind port 0");
                    if a != addr && a != admin {
                        break a;
                    }
                }
            });
            let body = yaml.replace("{DIR}", &dir.display().to_string());
            let extra = server_extra.replace("{DIR}", &dir.display().to_string());
            let entry = if h2c {
                format!("{{address: \"{addr}\", h2c: true}}")
            } else {
                addr.to_string()
            };
            let tls_listen = match (tls_addr, tls_entry) {
                (Some(a), Some(entry)) => format!("  - address: {a}\n{entry}"),
                _ => String::new(),
            };
            let full = format!(
                "server:\n  threads: 2\n  pid_file: {d}/edgeslice.pid\n  upgrade_sock: {d}/upgrade.sock\n  graceful_shutdown_timeout: 1s\n{extra}listen:\n  - {entry}\n{tls_listen}admin:\n  listen: {admin}\n{body}",
                d = dir.display()
            );
            let conf = dir.join("edgeslice.yaml");
            std::fs::write(&conf, &full).expect("write config");
            let log_path = dir.join("edgeslice.log");
            let log = std::fs::File::create(&log_path).expect("log file");
            let bin = env!("CARGO_BIN_EXE_edgeslice");
            let mut command = match launcher.split_first() {
                Some((first, rest)) => {
                    let mut c = Command::new(first);
                    c.args(rest).arg(bin);
                    c
                }
                None => Command::new(bin),
            };
            let child = command
                .arg("-c")
                .arg(&conf)
                .env(
                    "RUST_LOG",
                    std::env::var("EDGESLICE_TEST_LOG").unwrap_or_else(|_| "info".into()),
                )
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log clone"))
                .stderr(log)
                .spawn()
                .expect("spawn edgeslice");
            let mut p = Proxy {
                child: Some(child),
                addr,
                admin,
                dir: dir.to_path_buf(),
                yaml: yaml.to_string(),
                server_extra: server_extra.to_string(),
                tls_addr,
                tls_entry: tls_entry.unwrap_or_default().to_string(),
                h2c,
                launcher: launcher.to_vec(),
                fixed_listen: false,
                _tmp: None,
            };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Some(Ok(Some(_))) = p.child.as_mut().map(|c| c.try_wait()) {
                    break; // exited: most likely lost the port race
                }
                // Both ports must be the child's own: between `free_port` and the child's bind,
                // another test's server can take a port, and would then answer in its place.
                let pid = p.pid();
                if healthy(admin)
                    && listens_on(pid, admin)
                    && listens_on(pid, addr)
                    && tls_addr.is_none_or(|a| listens_on(pid, a))
                {
                    return p;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            last_log = std::fs::read_to_string(&log_path).unwrap_or_default();
            p.kill();
        }
        panic!("edgeslice did not start; last log:\n{last_log}");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn status_field(&self, field: &str) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Resident memory now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_field("VmRSS:")
    }

    /// Peak resident memory since start, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_field("VmHWM:")
    }

    /// The proxy's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("edgeslice.log")).unwrap_or_default()
    }

    /// The admin endpoint's `GET /metrics` text (asserted 200 in the Prometheus text format).
    pub async fn metrics(&self) -> String {
        let resp = super::client()
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .expect("GET /metrics");
        let status = resp.status();
        let content_type = super::header_text(resp.headers(), "content-type");
        let text = resp.text().await.expect("/metrics body");
        assert_eq!(status, 200, "GET /metrics: {text}");
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
        text
    }

    /// Assert that `/metrics` has each of `lines`, exactly (a sample and its value).
    pub async fn assert_metric_lines(&self, lines: &[&str]) {
        let text = self.metrics().await;
        for line in lines {
            assert!(text.lines().any(|l| l == *line), "{line} missing:\n{text}");
        }
    }

    /// The admin endpoint's `/stats` counters.
    pub async fn stats(&self) -> std::collections::HashMap<String, u64> {
        let text = super::client()
            .get(format!("http://{}/stats", self.admin))
            .send()
            .await
            .expect("GET /stats")
            .text()
            .await
            .expect("/stats body");
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(k, v)| (k.to_string(), v.parse().unwrap_or(0)))
            .collect()
    }

    /// Whether the log contains `needle` within a few seconds (log lines such as the access
    /// log are written after the response is complete).
    pub fn log_contains(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, no goodbye: what a crash or an OOM kill looks like.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, a graceful shutdown (what a rolling restart sends), and wait for the exit (at
    /// most 30 s, then SIGKILL).
    pub fn terminate(&mut self) {
        self.signal(libc::SIGTERM);
        if !self.exited_within(Duration::from_secs(30)) {
            self.kill();
            panic!("edgeslice did not exit within 30 s of SIGTERM");
        }
    }

    /// Send `signal` to the running process, without waiting.
    pub fn signal(&self, signal: libc::c_int) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as libc::pid_t, signal) };
        }
    }

    /// Whether the process has exited (and been reaped) within `limit`.
    pub fn exited_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while let Some(c) = &mut self.child {
            if let Ok(Some(_)) = c.try_wait() {
                self.child = None;
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// `GET /readyz` on the admin endpoint: status and body.
    pub async fn readyz(&self) -> (u16, String) {
        let resp = super::client()
            .get(format!("http://{}/readyz", self.admin))
            .send()
            .await
            .expect("GET /readyz");
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap_or_default())
    }

    /// Kill and start again over the same directory and config.
    pub fn restart(&mut self) {
        self.kill();
        let tmp = self._tmp.take();
        let tls_entry = (!self.tls_entry.is_empty()).then_some(self.tls_entry.as_str());
        FIXED_LISTEN.with(|f| f.set(self.fixed_listen.then_some(self.addr)));
        let mut next = Proxy::start_in_full(
            &self.dir,
            &self.yaml,
            &self.server_extra,
            tls_entry,
            self.h2c,
            &self.launcher,
        );
        FIXED_LISTEN.with(|f| f.set(None));
        next._tmp = tmp;
        next.fixed_listen = self.fixed_listen;
        *self = next;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill();
    }
}
